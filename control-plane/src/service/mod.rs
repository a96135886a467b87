//! The service layer: every operation of the API, whatever the front door.
//!
//! REST handlers and the EC2 Query front door decode a request,
//! call one method here with the authenticated [`Caller`], and encode the
//! result. Business rules, validation of meaning, and all database access live
//! here and below.

pub mod accounts;
pub mod catalog;
pub mod certificates;
pub mod hosts;
pub mod image_quota;
pub mod images;
pub mod instances;
pub mod keypairs;
pub mod launch;
pub mod metadata_options;
pub mod network;
pub mod observed;
pub mod outbox;
pub mod retention;
pub mod revocation;
pub mod scheduler;
pub mod tags;
pub mod throttle;
pub mod visibility;

use crate::config::Config;
use crate::error::{Result, ServiceError};
use crate::notify::HostEvents;
use sqlx::PgPool;

/// How many times one operation runs its transaction when deadlocks or
/// serialization failures abort it, before the caller gets the error.
pub(crate) const TX_ATTEMPTS: u32 = 16;

/// Runs `attempt` (one transaction) again while it fails with an error
/// that may pass when run again ([`crate::db::is_retryable`]), at most
/// [`TX_ATTEMPTS`] times, sleeping a random 0–2^n ms (at most 64 ms) in
/// between so that two colliding transactions do not collide again.
pub(crate) async fn retrying<T, Fut>(mut attempt: impl FnMut() -> Fut) -> Result<T>
where
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut n = 0;
    loop {
        match attempt().await {
            Err(ServiceError::Database(e)) if crate::db::is_retryable(&e) && n + 1 < TX_ATTEMPTS => {
                n += 1;
                tracing::debug!(attempt = n, error = %e, "transaction aborted; running it again");
                let ms = rand::random::<u64>() % (1 << n.min(6));
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            other => return other,
        }
    }
}

static PLACEMENT_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Launch transactions run again since start because a concurrent launch
/// took the capacity or the account's quota they had planned on, or a
/// deadlock or serialization failure aborted them (process-wide).
pub fn placement_retries() -> u64 {
    PLACEMENT_RETRIES.load(std::sync::atomic::Ordering::Relaxed)
}

pub(crate) fn count_placement_retry() {
    PLACEMENT_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The account every call of the admin token acts as.
pub const ADMIN_ACCOUNT: &str = "000000000000";

/// Who is calling, as established by authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub account_id: String,
    /// The operator (admin token): may also register images, see hosts and
    /// create accounts. Its own instances belong to the admin account.
    pub admin: bool,
}

impl Caller {
    pub fn admin() -> Caller {
        Caller { account_id: ADMIN_ACCOUNT.to_string(), admin: true }
    }

    pub fn account(account_id: String) -> Caller {
        Caller { account_id, admin: false }
    }
}

#[derive(Clone)]
pub struct Service {
    pub db: PgPool,
    pub config: Config,
    pub events: HostEvents,
    /// RSA key generation per account (a CPU burst per call).
    pub rsa_keygen: throttle::Throttle,
    /// The disks of the images CreateImage makes.
    pub image_store: crate::image_store::ImageStore,
    /// The CA and the control plane's state-store node.
    pub store: std::sync::Arc<crate::store::Store>,
}

impl Service {
    pub fn new(db: PgPool, config: Config, events: HostEvents, store: std::sync::Arc<crate::store::Store>) -> Service {
        let rsa_keygen = throttle::Throttle::new(config.rsa_key_burst, std::time::Duration::from_secs(config.rsa_key_interval_secs.max(1)));
        let image_store = crate::image_store::ImageStore::new(config.image_store_dir.clone(), config.max_image_bytes);
        Service { db, config, events, rsa_keygen, image_store, store }
    }
}
