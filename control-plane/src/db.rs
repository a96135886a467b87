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

/// Whether the error is a violation of the unique constraint `name`.
pub fn is_unique_violation(err: &sqlx::Error, name: &str) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().as_deref() == Some("23505") && db.constraint() == Some(name),
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
