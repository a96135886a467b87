//! Accounts and their access keys.

use super::{Caller, Service};
use crate::auth::secrets::{self, MasterKey};
use crate::error::{Result, ServiceError};
use serde::{Deserialize, Serialize};

/// A new account's credentials; the secret is shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NewAccount {
    pub account_id: String,
    pub name: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl Service {
    fn master_key(&self) -> Result<MasterKey> {
        let hex = self
            .config
            .master_key
            .as_deref()
            .ok_or_else(|| ServiceError::Internal("no master key is configured (--master-key / NIMBUS_MASTER_KEY)".into()))?;
        MasterKey::from_hex(hex).map_err(|e| ServiceError::Internal(format!("master key: {e}")))
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
        let sealed = secrets::seal(&master, &access_key_id, &secret).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let mut tx = self.db.begin().await?;
        sqlx::query("INSERT INTO accounts (id, name) VALUES ($1, $2)")
            .bind(&account_id)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if crate::db::is_unique_violation(&e, "accounts_name_key") {
                    ServiceError::Conflict(format!("an account named {name} already exists"))
                } else {
                    e.into()
                }
            })?;
        sqlx::query("INSERT INTO access_keys (id, account_id, secret_sealed) VALUES ($1, $2, $3)")
            .bind(&access_key_id)
            .bind(&account_id)
            .bind(&sealed)
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
        let row: Option<(String, Vec<u8>)> =
            sqlx::query_as("SELECT account_id, secret_sealed FROM access_keys WHERE id = $1")
                .bind(access_key_id)
                .fetch_optional(&self.db)
                .await?;
        let Some((account_id, sealed)) = row else { return Ok(None) };
        let secret = secrets::open(&self.master_key()?, access_key_id, &sealed)
            .map_err(|e| ServiceError::Internal(format!("cannot open the secret of {access_key_id}: {e}")))?;
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

    /// The availability zones that have hosts.
    pub async fn describe_availability_zones(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT availability_zone FROM hosts ORDER BY 1").fetch_all(&self.db).await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}
