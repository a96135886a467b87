//! Accounts and their access keys.

use super::{Caller, Service};
use crate::auth::secrets::{self, MasterKey};
use crate::error::{Result, ServiceError};

pub use nimbus_proto::api::{AccountView, Limits, NewAccount, SetLimits, Usage};

/// How many of a launch of `max` instances of `vcpus` each fit the account's
/// limits given its usage: `Err` when not even `min` do.
pub fn fit_limits(limits: Limits, usage: Usage, vcpus: u32, min: u32, max: u32) -> Result<u32> {
    let by_count = limits.max_instances.saturating_sub(usage.instances);
    let by_vcpus = limits.max_vcpus.saturating_sub(usage.vcpus) / vcpus.max(1);
    if by_count < min {
        return Err(ServiceError::InstanceLimitExceeded(format!(
            "You have requested more instances ({min}) than your current instance limit of {} allows ({} in use)",
            limits.max_instances, usage.instances
        )));
    }
    if by_vcpus < min {
        return Err(ServiceError::VcpuLimitExceeded(format!(
            "You have requested more vCPU capacity ({}) than your current vCPU limit of {} allows ({} in use)",
            u64::from(min) * u64::from(vcpus),
            limits.max_vcpus,
            usage.vcpus
        )));
    }
    Ok(max.min(by_count).min(by_vcpus))
}

impl Service {
    fn master_key(&self) -> Result<MasterKey> {
        let hex = self
            .config
            .master_key
            .as_deref()
            .ok_or_else(|| ServiceError::Internal("no master key is configured (--master-key / NIMBUS_MASTER_KEY)".into()))?;
        MasterKey::from_hex(hex).map_err(|e| ServiceError::internal("the master key", e))
    }

    /// Creates an account with one access key.
    pub async fn create_account(&self, name: &str) -> Result<NewAccount> {
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b)) {
            return Err(ServiceError::InvalidParameterValue("account name must be 1 to 64 of [A-Za-z0-9-_.@]".into()));
        }
        let master = self.master_key()?;
        let account_id = {
            use rand::Rng;
            let n: u64 = rand::thread_rng().gen_range(100_000_000_000..1_000_000_000_000);
            n.to_string()
        };
        let access_key_id = secrets::generate_access_key_id();
        let secret = secrets::generate_secret_access_key();
        let sealed = secrets::seal(&master, &access_key_id, &secret).map_err(|e| ServiceError::internal("sealing a secret", e))?;
        let mut tx = self.db.begin().await?;
        sqlx::query!("INSERT INTO accounts (id, name) VALUES ($1, $2)", account_id, name).execute(&mut *tx).await.map_err(|e| {
            if crate::db::Constraint::AccountName.violated_by(&e) {
                ServiceError::Conflict(format!("an account named {name} already exists"))
            } else {
                e.into()
            }
        })?;
        sqlx::query!("INSERT INTO access_keys (id, account_id, secret_sealed) VALUES ($1, $2, $3)", access_key_id, account_id, sealed)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(%account_id, %name, %access_key_id, "account created");
        Ok(NewAccount { account_id, name: name.to_string(), access_key_id, secret_access_key: secret })
    }

    /// The account and secret of an access key, if it exists.
    pub async fn access_key(&self, access_key_id: &str) -> Result<Option<(Caller, String)>> {
        if !secrets::is_valid_access_key_id(access_key_id) {
            return Ok(None);
        }
        let row =
            sqlx::query!("SELECT account_id, secret_sealed FROM access_keys WHERE id = $1", access_key_id).fetch_optional(&self.db).await?;
        let Some(row) = row else { return Ok(None) };
        let (account_id, sealed) = (row.account_id, row.secret_sealed);
        let secret = secrets::open(&self.master_key()?, access_key_id, &sealed)
            .map_err(|e| ServiceError::internal(format!("cannot open the secret of {access_key_id}"), e))?;
        Ok(Some((Caller::account(account_id), secret)))
    }

    /// The account of a REST bearer credential `<access key id>:<secret>`.
    pub async fn authenticate_account(&self, bearer: &str) -> Result<Caller> {
        use subtle::ConstantTimeEq;
        let denied = || ServiceError::AuthFailure("invalid credentials".into());
        let (akid, secret) = bearer.split_once(':').ok_or_else(denied)?;
        let (caller, expected) = self.access_key(akid).await?.ok_or_else(denied)?;
        if bool::from(expected.as_bytes().ct_eq(secret.as_bytes())) {
            Ok(caller)
        } else {
            Err(denied())
        }
    }

    /// The account's effective limits and usage (its counters in
    /// `account_usage`; no lock: a launch checks the limits again with
    /// [`claim_usage`] when it commits).
    pub(crate) async fn limits_and_usage(&self, conn: &mut sqlx::PgConnection, account_id: &str) -> Result<(String, Limits, Usage)> {
        let row = sqlx::query!(
            "SELECT a.name, a.max_instances, a.max_vcpus, a.max_elastic_ips, u.instances, u.vcpus \
             FROM accounts a JOIN account_usage u ON u.account_id = a.id WHERE a.id = $1",
            account_id
        )
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| ServiceError::AccountNotFound(account_id.to_string()))?;
        let limits = Limits {
            max_instances: row.max_instances.map_or(self.config.default_max_instances, |n| n as u32),
            max_vcpus: row.max_vcpus.map_or(self.config.default_max_vcpus, |n| n as u32),
            max_elastic_ips: row.max_elastic_ips.map_or(self.config.default_max_elastic_ips, |n| n as u32),
        };
        Ok((row.name, limits, Usage { instances: row.instances.max(0) as u32, vcpus: row.vcpus.max(0) as u32 }))
    }

    /// The caller's account: its limits and what it holds.
    pub async fn describe_account(&self, caller: &Caller) -> Result<AccountView> {
        let mut conn = self.db.acquire().await?;
        let (name, limits, usage) = self.limits_and_usage(&mut conn, &caller.account_id).await?;
        let image_quota = self.image_quota(&mut conn, &caller.account_id, false, None).await?;
        Ok(AccountView { account_id: caller.account_id.clone(), name, max_elastic_ips: limits.max_elastic_ips, limits, usage, image_quota })
    }

    /// The operator sets an account's limits (`None`: back to the default).
    /// Lowering a limit below the usage stops new launches, nothing more.
    pub async fn set_account_limits(&self, account_id: &str, set: &SetLimits) -> Result<AccountView> {
        if [set.max_instances, set.max_vcpus, set.max_elastic_ips, set.max_images].iter().any(|l| l.is_some_and(|n| n > i32::MAX as u32)) {
            return Err(ServiceError::InvalidParameterValue("limits must be at most 2147483647".into()));
        }
        if set.max_image_bytes.is_some_and(|n| n > i64::MAX as u64) {
            return Err(ServiceError::InvalidParameterValue("max_image_bytes must be at most 9223372036854775807".into()));
        }
        let done = sqlx::query!(
            "UPDATE accounts SET max_instances = $2, max_vcpus = $3, max_elastic_ips = $4, max_images = $5, max_image_bytes = $6 WHERE id = $1",
            account_id,
            set.max_instances.map(|n| n as i32),
            set.max_vcpus.map(|n| n as i32),
            set.max_elastic_ips.map(|n| n as i32),
            set.max_images.map(|n| n as i32),
            set.max_image_bytes.map(|n| n as i64)
        )
        .execute(&self.db)
        .await?;
        if done.rows_affected() == 0 {
            return Err(ServiceError::AccountNotFound(account_id.to_string()));
        }
        tracing::info!(%account_id, ?set, "account limits set");
        self.describe_account(&Caller::account(account_id.to_string())).await
    }

    /// The availability zones that have hosts.
    pub async fn describe_availability_zones(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar!("SELECT DISTINCT availability_zone FROM hosts ORDER BY 1").fetch_all(&self.db).await?)
    }
}

/// Adds `instances` and `vcpus` (either may be negative) to the account's
/// usage when the caller's transaction commits, if what rises stays within
/// `limits`; otherwise the commit fails with [`is_over_limit`]. The claim is
/// an insert; a deferred trigger applies it during the commit (migration
/// `0013_account_usage.sql`), so the account's usage row is never locked
/// across a round trip and launches of one account do not wait for each
/// other's transactions, only for each other's commits.
pub(crate) async fn claim_usage(
    conn: &mut sqlx::PgConnection,
    account_id: &str,
    limits: Option<Limits>,
    instances: i64,
    vcpus: i64,
) -> Result<()> {
    claim_usages(conn, &[(account_id, instances, vcpus)], limits).await
}

/// Lowers the usage of accounts whose instances released their capacity:
/// `(instances, vcpus)` per account, applied at commit in account order.
pub(crate) async fn release_usage(conn: &mut sqlx::PgConnection, released: &std::collections::BTreeMap<String, (i64, i64)>) -> Result<()> {
    let claims: Vec<(&str, i64, i64)> = released.iter().map(|(a, (n, v))| (a.as_str(), -n, -v)).collect();
    claim_usages(conn, &claims, None).await
}

async fn claim_usages(conn: &mut sqlx::PgConnection, claims: &[(&str, i64, i64)], limits: Option<Limits>) -> Result<()> {
    if claims.is_empty() {
        return Ok(());
    }
    let accounts: Vec<&str> = claims.iter().map(|c| c.0).collect();
    let instances: Vec<i32> = claims.iter().map(|c| c.1 as i32).collect();
    let vcpus: Vec<i32> = claims.iter().map(|c| c.2 as i32).collect();
    sqlx::query!(
        "INSERT INTO usage_claims (account_id, instances, vcpus, max_instances, max_vcpus) \
         SELECT a, n, v, $4, $5 FROM unnest($1::text[], $2::int[], $3::int[]) WITH ORDINALITY AS c(a, n, v, o) ORDER BY o",
        &accounts as &[&str],
        &instances,
        &vcpus,
        limits.map(|l| i64::from(l.max_instances)),
        limits.map(|l| i64::from(l.max_vcpus))
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Whether a commit failed because a usage claim did not fit the account's
/// limits (a concurrent launch of the account used the room first).
pub(crate) fn is_over_limit(e: &ServiceError) -> bool {
    matches!(e, ServiceError::Database(sqlx::Error::Database(d)) if d.code().as_deref() == Some("NQ001"))
}
