//! Revoked host certificates: refused by every store node within a bound.
//!
//! A host certificate is valid for a year. When the operator resets a
//! host's credential (a reinstalled or compromised machine), its current
//! and previous certificates are recorded in `revoked_certificates` until
//! they expire, in the same transaction. The revocation job (one per
//! control plane, woken by `NOTIFY nimbus_revoked`, at the latest every
//! [`IDLE`]) then makes the control plane's own store node refuse them
//! (handshakes, and connections already open with them are closed) and
//! publishes the list to the state store (`cluster/revoked`, a
//! [`ClusterRecord`] signed by the document key), where every host's agent
//! reads it every few seconds and hands it to its node the same way. A
//! host that cannot reach the store keeps the list it has; the bound holds
//! for the nodes that can.
//!
//! (The control plane's own agent API needs none of this: it accepts only
//! the certificates PostgreSQL holds for a host, which the reset clears.)

use super::Service;
use crate::error::Result;
use nimbus_proto::agent::REVOCATION_KEY;
use nimbus_records::ClusterRecord;
use nimbus_state_store::KvClient;
use sqlx::PgConnection;
use std::time::Duration;

/// The channel the revocation job listens on.
pub const CHANNEL: &str = "nimbus_revoked";
/// The longest wait between passes (the list is published again, and its
/// expired entries dropped, at least this often).
pub const IDLE: Duration = Duration::from_secs(30);

/// Records the certificates `host_id` holds as revoked (in the caller's
/// transaction, before they are cleared) and wakes the job on commit.
pub(crate) async fn revoke_host(conn: &mut PgConnection, host_id: &str) -> Result<()> {
    sqlx::query!(
        "INSERT INTO revoked_certificates (sha256, host_id, not_after) \
         SELECT d, id, n FROM hosts, LATERAL (VALUES (tls_cert_sha256, tls_cert_not_after), (tls_prev_cert_sha256, tls_prev_cert_not_after)) AS c(d, n) \
         WHERE id = $1 AND d IS NOT NULL AND n IS NOT NULL \
         ON CONFLICT (sha256) DO NOTHING",
        host_id
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!("SELECT pg_notify($1, '')", CHANNEL).execute(&mut *conn).await?;
    Ok(())
}

impl Service {
    /// The certificates revoked now (unexpired), by SHA-256.
    pub async fn revoked_certificates(&self) -> Result<Vec<[u8; 32]>> {
        let rows = sqlx::query_scalar!("SELECT sha256 FROM revoked_certificates WHERE not_after > now() ORDER BY sha256")
            .fetch_all(&self.db)
            .await?;
        Ok(rows.into_iter().filter_map(|d| d.try_into().ok()).collect())
    }

    /// One pass: drops expired entries, applies the list to this control
    /// plane's node and publishes it to the store if the store's differs.
    pub async fn publish_revocations(&self) -> std::result::Result<bool, RevocationError> {
        sqlx::query!("DELETE FROM revoked_certificates WHERE not_after <= now()")
            .execute(&self.db)
            .await
            .map_err(crate::error::ServiceError::from)?;
        let revoked = self.revoked_certificates().await?;
        self.store.tls.set_revoked(revoked.iter().copied());
        let payload = serde_json::to_vec(&revoked.iter().map(hex::encode).collect::<Vec<_>>()).unwrap_or_default();
        let client = self.store.client();
        let got = client.get(REVOCATION_KEY.as_bytes()).await?;
        let current = ClusterRecord::newest(&got.values, REVOCATION_KEY, &self.store.trusted_keys());
        if current.as_ref().map(|(_, p)| p) == Some(&payload) && got.values.len() <= 1 {
            return Ok(false);
        }
        let version = current.map_or(0, |(v, _)| v).max(chrono::Utc::now().timestamp_millis() as u64) + 1;
        let record = ClusterRecord::sign(REVOCATION_KEY, version, &payload, &self.store.doc_key);
        client.put(REVOCATION_KEY.as_bytes(), record.encode(), &got.context).await?;
        tracing::info!(revoked = revoked.len(), version, "revocation list published");
        Ok(false)
    }

    /// Starts the revocation job (see the module doc).
    pub fn start_revocation(&self) -> tokio::task::JoinHandle<()> {
        let service = self.clone();
        let pace = crate::jobs::Pace { idle: IDLE, min_interval: Duration::from_millis(100) };
        tokio::spawn(async move {
            let db = service.db.clone();
            crate::jobs::run_woken(db, CHANNEL, "revocation", pace, || service.publish_revocations()).await
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("revocation: {0}")]
    Service(#[from] crate::error::ServiceError),
    #[error("revocation: state store: {0}")]
    Store(#[from] nimbus_state_store::StoreError),
}
