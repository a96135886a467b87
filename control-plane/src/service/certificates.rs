//! Host certificates (`POST /v1/agent/certificate`): the CA
//! ([`crate::auth::ca`]) certifies a key the host made, for its store node
//! and its side of mutual TLS; the answer also names the store nodes the
//! host joins the ring through.

use super::Service;
use crate::auth::ca::{self, CaError};
use crate::error::{Result, ServiceError};
use nimbus_proto::agent::{CertificateGrant, CertificateRequest};
use sha2::{Digest, Sha256};

/// At most this many seeds are handed out (the control plane's node and
/// the most recently seen hosts'); gossip finds the rest.
const MAX_SEEDS: i64 = 8;

impl From<CaError> for ServiceError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::BadPublicKey | CaError::BadAddress(_) => ServiceError::InvalidParameterValue(e.to_string()),
            CaError::Generate(_) | CaError::Sealed(_) => ServiceError::Internal(e.to_string()),
        }
    }
}

impl Service {
    /// The SHA-256 of the certificate `host_id` was last issued.
    pub async fn host_certificate_digest(&self, host_id: &str) -> Result<Option<Vec<u8>>> {
        let row: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT tls_cert_sha256 FROM hosts WHERE id = $1").bind(host_id).fetch_optional(&self.db).await?;
        Ok(row.and_then(|(d,)| d))
    }

    /// The digest of `host_id`'s certificate while it is valid.
    pub async fn unexpired_host_certificate_digest(&self, host_id: &str) -> Result<Option<Vec<u8>>> {
        let row: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT tls_cert_sha256 FROM hosts WHERE id = $1 AND tls_cert_not_after > now()")
                .bind(host_id)
                .fetch_optional(&self.db)
                .await?;
        Ok(row.and_then(|(d,)| d))
    }

    /// Certifies `host_id`'s public key (and its store node's address),
    /// records the certificate's digest and the node's address, and
    /// answers the certificate, the CA and the ring's seeds.
    pub async fn issue_host_certificate(&self, host_id: &str, req: &CertificateRequest) -> Result<CertificateGrant> {
        let key = ca::parse_public_key(&req.public_key)?;
        let ip = req.store_address.as_deref().map(ca::store_address_ip).transpose()?;
        // A node address is one node's: not the control plane's, not another
        // host's. (Certificates name the IP, not the port: nodes that share
        // a machine, as in local development, share an IP and so trust each
        // other's certificates for it; on separate hosts each has its own.)
        if let Some(addr) = &req.store_address {
            let taken: Option<(String,)> = sqlx::query_as("SELECT id FROM hosts WHERE store_address = $1 AND id <> $2")
                .bind(addr)
                .bind(host_id)
                .fetch_optional(&self.db)
                .await?;
            if taken.is_some() || *addr == self.store.address {
                return Err(ServiceError::Conflict(format!("the store address {addr} is another node's")));
            }
        }
        let (pem, der, not_after) = self.store.ca.issue_host(host_id, &key, ip)?;
        let digest = Sha256::digest(&der).to_vec();
        sqlx::query("UPDATE hosts SET tls_cert_sha256 = $2, tls_cert_not_after = $3, store_address = $4 WHERE id = $1")
            .bind(host_id)
            .bind(&digest)
            .bind(not_after)
            .bind(&req.store_address)
            .execute(&self.db)
            .await?;
        let others: Vec<(String,)> = sqlx::query_as(
            "SELECT store_address FROM hosts WHERE store_address IS NOT NULL AND id <> $1 \
             ORDER BY last_heartbeat DESC NULLS LAST LIMIT $2",
        )
        .bind(host_id)
        .bind(MAX_SEEDS - 1)
        .fetch_all(&self.db)
        .await?;
        let mut store_seeds = vec![self.store.address.clone()];
        store_seeds.extend(others.into_iter().map(|(a,)| a).filter(|a| Some(a) != req.store_address.as_ref()));
        tracing::info!(%host_id, store_address = ?req.store_address, "host certificate issued");
        Ok(CertificateGrant { certificate_pem: pem, ca_pem: self.store.ca.cert_pem().to_string(), not_after, store_seeds })
    }
}
