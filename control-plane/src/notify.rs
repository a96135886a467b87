//! Wake-ups for agents' long polls.
//!
//! Every transaction that changes what a host must run bumps `hosts.generation`
//! and calls `pg_notify('nimbus_host', host_id)`; PostgreSQL delivers the
//! notification when (and only if) the transaction commits, to every control
//! plane replica. One listener task per process fans it out to the long polls
//! waiting for that host. A lost notification only delays an agent until its
//! poll times out: the generation in the database is the truth.

use sqlx::postgres::{PgListener, PgPool};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

pub const CHANNEL: &str = "nimbus_host";

#[derive(Clone, Default)]
pub struct HostEvents {
    senders: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

impl HostEvents {
    /// A receiver that changes whenever `host_id` is notified.
    pub fn subscribe(&self, host_id: &str) -> watch::Receiver<u64> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders.entry(host_id.to_string()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    pub fn notify(&self, host_id: &str) {
        let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = senders.get(host_id) {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn notify_all(&self) {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders.retain(|_, tx| tx.receiver_count() > 0);
        for tx in senders.values() {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Listens for `nimbus_host` notifications until the process ends.
    pub fn spawn_listener(&self, pool: PgPool) {
        let events = self.clone();
        tokio::spawn(async move {
            loop {
                match PgListener::connect_with(&pool).await {
                    Ok(mut listener) => {
                        if let Err(e) = listener.listen(CHANNEL).await {
                            tracing::warn!(error = %e, "LISTEN failed");
                        } else {
                            // Anything may have changed while we were not listening.
                            events.notify_all();
                            loop {
                                match listener.try_recv().await {
                                    Ok(Some(n)) => events.notify(n.payload()),
                                    Ok(None) => {
                                        tracing::warn!("notification connection lost; reconnecting");
                                        events.notify_all();
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "notification listener failed");
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot connect notification listener"),
                }
                events.notify_all();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}
