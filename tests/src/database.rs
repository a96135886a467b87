//! Each test's own database, dropped with it; old ones of crashed runs too.

use crate::*;
use anyhow::Context;
use std::time::Duration;

/// Test databases are named `nimbus_test_<unix seconds>_<random>`, so that a
/// later run can tell how old a leftover is.
const DATABASE_PREFIX: &str = "nimbus_test_";
/// A test database this old belongs to a run that crashed (no test runs
/// this long): the next run drops it.
const STALE_DATABASE: Duration = Duration::from_secs(3600);

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// When a test database was created, from its name (None: not one of ours,
/// or named by an older harness, whose age cannot be known).
fn database_created(name: &str) -> Option<u64> {
    let (secs, random) = name.strip_prefix(DATABASE_PREFIX)?.split_once('_')?;
    let hex = random.len() == 8 && random.bytes().all(|b| b.is_ascii_hexdigit());
    if hex && secs.len() >= 9 && secs.bytes().all(|b| b.is_ascii_digit()) {
        secs.parse().ok()
    } else {
        None
    }
}

/// Drops the test databases of earlier runs that crashed (older than
/// [`STALE_DATABASE`]); once per process.
async fn drop_stale_databases(admin: &sqlx::PgPool) {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let names: Vec<(String,)> =
                match sqlx::query_as("SELECT datname::text FROM pg_database WHERE datname LIKE 'nimbus\\_test\\_%'").fetch_all(admin).await
                {
                    Ok(n) => n,
                    Err(e) => return eprintln!("cannot list test databases: {e}"),
                };
            let now = unix_now();
            for (name,) in names {
                let Some(created) = database_created(&name) else { continue };
                if now.saturating_sub(created) > STALE_DATABASE.as_secs() {
                    // Another process may drop it at the same time: errors are only reported.
                    if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(admin).await {
                        eprintln!("cannot drop stale test database {name}: {e}");
                    }
                }
            }
        })
        .await;
}

/// A test's own database, dropped with it (see [`Drop`]).
pub(crate) struct TestDatabase {
    /// `DATABASE_URL`: the tests' role, which created the database and may drop it.
    admin_url: String,
    name: String,
    pub(crate) url: String,
}

impl TestDatabase {
    /// Creates a database of its own for one test.
    pub(crate) async fn create() -> anyhow::Result<TestDatabase> {
        let admin_url = std::env::var("DATABASE_URL")
            .context("DATABASE_URL is not set: run the tests with scripts/test.sh, which starts PostgreSQL")?;
        let name = format!("{DATABASE_PREFIX}{}_{}", unix_now(), &random_suffix()[..8]);
        let admin = sqlx::PgPool::connect(&admin_url).await.context("connect to DATABASE_URL")?;
        drop_stale_databases(&admin).await;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await?;
        admin.close().await;
        let (base, _) = admin_url.rsplit_once('/').context("DATABASE_URL has no database name")?;
        let url = format!("{base}/{name}");
        Ok(TestDatabase { admin_url, name, url })
    }
}

impl Drop for TestDatabase {
    /// Drops the database, closing the control plane's connections to it
    /// (`WITH (FORCE)`). On a thread of its own with its own runtime: a drop
    /// cannot await, and may run on any runtime or none.
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let admin = sqlx::PgPool::connect(&url).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await?;
                admin.close().await;
                Ok::<_, anyhow::Error>(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cannot drop test database {}: {e}", self.name),
            Err(_) => eprintln!("dropping test database {} panicked", self.name),
        }
    }
}

impl TestDatabase {
    /// Lets sessions into the database, or shuts it to them (ending the open ones).
    pub(crate) async fn allow_connections(&self, allow: bool) -> anyhow::Result<()> {
        let admin = sqlx::PgPool::connect(&self.admin_url).await?;
        sqlx::query(&format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {allow}", self.name)).execute(&admin).await?;
        if !allow {
            sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
                .bind(&self.name)
                .execute(&admin)
                .await?;
        }
        admin.close().await;
        Ok(())
    }
}
