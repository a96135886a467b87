//! Background jobs woken by PostgreSQL notifications: the one loop the
//! outbox relay and the network relay share.
//!
//! A job is a `pass` that does a batch of work and says whether more may be
//! waiting. The loop runs passes back to back while there is more; then
//! waits for a `NOTIFY` on its channel (sent by the transactions that give
//! it work, delivered on their commit) or at most `idle`; after a failed
//! pass it waits a backoff that doubles up to [`MAX_BACKOFF`]. Without a
//! listener connection it polls. Passes must be idempotent: a notification
//! may wake the job with nothing to do, and a crash may repeat a pass.

use sqlx::PgPool;
use std::future::Future;
use std::time::Duration;

/// The longest backoff after a failed pass.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a job is woken and paced.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// The longest wait between passes when nothing wakes the job.
    pub idle: Duration,
    /// The shortest time between the starts of two passes (batches what
    /// arrives meanwhile into one pass).
    pub min_interval: Duration,
}

/// Runs `pass` until the task is aborted or `db` is closed (see the module doc).
pub async fn run_woken<F, Fut, E>(db: PgPool, channel: &'static str, name: &'static str, pace: Pace, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
    E: std::fmt::Display,
{
    let mut listener: Option<sqlx::postgres::PgListener> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        // The service stopped (its pool was closed).
        if db.is_closed() {
            return;
        }
        if listener.is_none() {
            match sqlx::postgres::PgListener::connect_with(&db).await {
                Ok(mut l) => match l.listen(channel).await {
                    Ok(()) => listener = Some(l),
                    Err(e) => tracing::warn!(job = name, error = %e, "cannot listen; polling"),
                },
                Err(e) => tracing::warn!(job = name, error = %e, "cannot listen; polling"),
            }
        }
        let started = tokio::time::Instant::now();
        let wait = match pass().await {
            Ok(true) => Duration::ZERO,
            Ok(false) => {
                backoff = Duration::from_millis(100);
                pace.idle
            }
            Err(e) => {
                tracing::warn!(job = name, error = %e, retry_in = ?backoff, "pass failed");
                let b = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                b
            }
        };
        if !wait.is_zero() {
            match &mut listener {
                Some(l) => match tokio::time::timeout(wait, l.recv()).await {
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(job = name, error = %e, "notification listener lost");
                        listener = None;
                    }
                },
                None => tokio::time::sleep(wait.min(Duration::from_millis(200))).await,
            }
        }
        tokio::time::sleep_until(started + pace.min_interval).await;
    }
}
