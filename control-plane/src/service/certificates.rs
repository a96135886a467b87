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
    /// The SHA-256 digests of the certificates `host_id` may present: the
    /// one it was last issued, and the one it presented when it asked for
    /// that (until its next renewal); with `unexpired`, only those still
    /// valid.
    pub async fn host_certificate_digests(&self, host_id: &str, unexpired: bool) -> Result<Vec<Vec<u8>>> {
        let row: Option<(Option<Vec<u8>>, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT CASE WHEN NOT $2 OR tls_cert_not_after > now() THEN tls_cert_sha256 END, \
                    CASE WHEN NOT $2 OR tls_prev_cert_not_after > now() THEN tls_prev_cert_sha256 END \
             FROM hosts WHERE id = $1",
        )
        .bind(host_id)
        .bind(unexpired)
        .fetch_optional(&self.db)
        .await?;
        Ok(row.map(|(current, previous)| current.into_iter().chain(previous).collect()).unwrap_or_default())
    }

    /// Certifies `host_id`'s public key (and its store node's address),
    /// records the certificate's digest and the node's address, and
    /// answers the certificate, the CA and the ring's seeds. `presented`:
    /// the certificate the host renewed with, which stays valid until the
    /// next renewal.
    pub async fn issue_host_certificate(&self, host_id: &str, req: &CertificateRequest, presented: Option<[u8; 32]>) -> Result<CertificateGrant> {
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
        // (SET sees the row as it was: the presented certificate is the
        // current or the previous one, or none of this host's.)
        sqlx::query(
            "UPDATE hosts SET tls_cert_sha256 = $2, tls_cert_not_after = $3, store_address = $4, \
                 tls_prev_cert_sha256 = CASE WHEN $5 = tls_cert_sha256 THEN tls_cert_sha256 \
                                             WHEN $5 = tls_prev_cert_sha256 THEN tls_prev_cert_sha256 END, \
                 tls_prev_cert_not_after = CASE WHEN $5 = tls_cert_sha256 THEN tls_cert_not_after \
                                                WHEN $5 = tls_prev_cert_sha256 THEN tls_prev_cert_not_after END \
             WHERE id = $1",
        )
        .bind(host_id)
        .bind(&digest)
        .bind(not_after)
        .bind(&req.store_address)
        .bind(presented.map(|p| p.to_vec()))
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
