//! SSH key pairs: created here (the private key is shown once, never
//! stored) or imported from an OpenSSH public key. An instance launched with
//! a key pair gets its public key through the metadata service.

use super::{Caller, Service};
use crate::error::{Result, ServiceError};
use crate::ids;
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey};

pub use nimbus_proto::api::{KeyPair, NewKeyPair};

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || !name.is_ascii() || name.chars().any(|c| c.is_control()) {
        return Err(ServiceError::InvalidParameterValue("KeyName must be 1 to 255 printable ASCII characters".into()));
    }
    Ok(())
}

fn key_type(k: &PublicKey) -> &'static str {
    match k.algorithm() {
        Algorithm::Ed25519 => "ed25519",
        Algorithm::Rsa { .. } => "rsa",
        _ => "other",
    }
}

struct Row {
    id: String,
    name: String,
    fingerprint: String,
    public_key: String,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl Row {
    fn into_key_pair(self) -> KeyPair {
        let kt = PublicKey::from_openssh(&self.public_key).map(|k| key_type(&k)).unwrap_or("other");
        KeyPair {
            key_pair_id: self.id,
            key_name: self.name,
            key_fingerprint: self.fingerprint,
            key_type: kt.to_string(),
            public_key: self.public_key,
            create_time: self.created_at,
        }
    }
}

impl Service {
    /// Generates a key pair (`ed25519`, the default, or `rsa` 2048).
    pub async fn create_key_pair(&self, caller: &Caller, name: &str, kind: Option<&str>) -> Result<NewKeyPair> {
        validate_name(name)?;
        let algorithm = match kind.unwrap_or("ed25519") {
            "ed25519" => Algorithm::Ed25519,
            "rsa" => Algorithm::Rsa { hash: None },
            other => return Err(ServiceError::InvalidParameterValue(format!("KeyType must be ed25519 or rsa, not {other:?}"))),
        };
        if matches!(algorithm, Algorithm::Rsa { .. }) {
            self.rsa_keygen.take(&caller.account_id).map_err(|wait| {
                ServiceError::RequestLimitExceeded(format!(
                    "Request limit exceeded: RSA key generation is limited per account; retry in {} s (ed25519 keys are not limited)",
                    wait.as_secs() + 1
                ))
            })?;
        }
        let private = tokio::task::spawn_blocking(move || {
            let mut rng = ssh_key::rand_core::OsRng;
            match algorithm {
                Algorithm::Rsa { .. } => ssh_key::private::RsaKeypair::random(&mut rng, 2048).map(PrivateKey::from),
                other => PrivateKey::random(&mut rng, other),
            }
        })
        .await
        .map_err(|e| ServiceError::internal("key generation", e))?
        .map_err(|e| ServiceError::internal("key generation", e))?;
        let material = private.to_openssh(LineEnding::LF).map_err(|e| ServiceError::internal("encoding a private key", e))?.to_string();
        let key_pair = self.store_key(caller, name, private.public_key()).await?;
        Ok(NewKeyPair { key_pair, key_material: material })
    }

    /// Imports an OpenSSH public key (`ssh-ed25519 AAAA… comment`).
    pub async fn import_key_pair(&self, caller: &Caller, name: &str, public_key: &str) -> Result<KeyPair> {
        validate_name(name)?;
        let key = PublicKey::from_openssh(public_key.trim())
            .map_err(|_| ServiceError::InvalidKeyFormat("Key is not in valid OpenSSH public key format".into()))?;
        self.store_key(caller, name, &key).await
    }

    async fn store_key(&self, caller: &Caller, name: &str, key: &PublicKey) -> Result<KeyPair> {
        let openssh = key.to_openssh().map_err(|e| ServiceError::internal("encoding a public key", e))?;
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let row = sqlx::query_as!(
            Row,
            "INSERT INTO key_pairs (id, account_id, name, fingerprint, public_key) VALUES ($1, $2, $3, $4, $5) \
             RETURNING id, name, fingerprint, public_key, created_at",
            ids::new_id("key"),
            caller.account_id,
            name,
            fingerprint,
            openssh
        )
        .fetch_one(&self.db)
        .await
        .map_err(|e| {
            if crate::db::Constraint::KeyPairName.violated_by(&e) {
                ServiceError::KeyPairDuplicate(name.to_string())
            } else {
                e.into()
            }
        })?;
        Ok(row.into_key_pair())
    }

    /// The caller's key pairs, all or the named ones (each must exist).
    pub async fn describe_key_pairs(&self, caller: &Caller, names: &[String]) -> Result<Vec<KeyPair>> {
        let rows = sqlx::query_as!(
            Row,
            "SELECT id, name, fingerprint, public_key, created_at FROM key_pairs \
             WHERE account_id = $1 AND (cardinality($2::text[]) = 0 OR name = ANY($2)) ORDER BY name",
            caller.account_id,
            names
        )
        .fetch_all(&self.db)
        .await?;
        if let Some(missing) = names.iter().find(|n| !rows.iter().any(|r| &r.name == *n)) {
            return Err(ServiceError::KeyPairNotFound(missing.clone()));
        }
        Ok(rows.into_iter().map(Row::into_key_pair).collect())
    }

    /// Deletes a key pair; idempotent, as in EC2.
    pub async fn delete_key_pair(&self, caller: &Caller, name: &str) -> Result<()> {
        sqlx::query!("DELETE FROM key_pairs WHERE account_id = $1 AND name = $2", caller.account_id, name).execute(&self.db).await?;
        Ok(())
    }

    /// The public key of the caller's key pair `name`, for a launch.
    pub(crate) async fn key_pair_public_key(&self, caller: &Caller, name: &str) -> Result<String> {
        let row = sqlx::query_scalar!("SELECT public_key FROM key_pairs WHERE account_id = $1 AND name = $2", caller.account_id, name)
            .fetch_optional(&self.db)
            .await?;
        row.ok_or_else(|| ServiceError::KeyPairNotFound(name.to_string()))
    }
}
