//! PostgreSQL pool, migrations and the retry rule for transactions.

use sqlx::postgres::{PgPool, PgPoolOptions};
use std::time::Duration;

pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let pool = PgPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(10)).connect(url).await?;
    sqlx::migrate!("../migrations").run(&pool).await?;
    Ok(pool)
}

/// Deadlocks and serialization failures abort a transaction that may succeed
/// when run again.
pub fn is_retryable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("40001") | Some("40P01")),
        _ => false,
    }
}

/// Whether the error is a violation of an integrity constraint (class 23:
/// unique, foreign key, check, exclusion, not null): what a concurrent
/// change makes of a request that was valid when it was checked.
pub fn is_constraint_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("23")),
        _ => false,
    }
}

/// Every constraint (or unique index) of the schema whose violation the
/// service turns into an API error: named once here, and each checked to
/// exist in a migrated database (`tests/tests/api_errors.rs`), so a renamed
/// constraint cannot silently become a 500.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Constraint {
    AccountName,
    HostName,
    HostStoreIp,
    ImageNamePerAccount,
    KeyPairName,
    GroupNamePerVpc,
    SubnetsNoOverlap,
    InterfaceGroupExists,
    InterfaceMac,
}

impl Constraint {
    pub const ALL: &'static [Constraint] = &[
        Constraint::AccountName,
        Constraint::HostName,
        Constraint::HostStoreIp,
        Constraint::ImageNamePerAccount,
        Constraint::KeyPairName,
        Constraint::GroupNamePerVpc,
        Constraint::SubnetsNoOverlap,
        Constraint::InterfaceGroupExists,
        Constraint::InterfaceMac,
    ];

    /// Its name in the schema (`migrations/`).
    pub fn name(self) -> &'static str {
        match self {
            Constraint::AccountName => "accounts_name_key",
            Constraint::HostName => "hosts_name_key",
            Constraint::HostStoreIp => "hosts_store_ip",
            Constraint::ImageNamePerAccount => "images_account_name",
            Constraint::KeyPairName => "key_pairs_pkey",
            Constraint::GroupNamePerVpc => "security_groups_name_per_vpc",
            Constraint::SubnetsNoOverlap => "subnets_no_overlap",
            Constraint::InterfaceGroupExists => "network_interface_groups_group_id_fkey",
            Constraint::InterfaceMac => "network_interfaces_mac_key",
        }
    }

    /// Whether `err` is a violation of this constraint (of any kind: unique,
    /// foreign key, exclusion, check).
    pub fn violated_by(self, err: &sqlx::Error) -> bool {
        match err {
            sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("23")) && db.constraint() == Some(self.name()),
            _ => false,
        }
    }
}
