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
            CaError::Generate(_) | CaError::Sealed(_) => ServiceError::internal("the cluster CA", e),
        }
    }
}

impl Service {
    /// The SHA-256 digests of the certificates `host_id` may present: the
    /// one it was last issued, and the one it presented when it asked for
    /// that (until its next renewal); with `unexpired`, only those still
    /// valid.
    pub async fn host_certificate_digests(&self, host_id: &str, unexpired: bool) -> Result<Vec<Vec<u8>>> {
        struct Digests {
            current: Option<Vec<u8>>,
            previous: Option<Vec<u8>>,
        }
        let row = sqlx::query_as!(
            Digests,
            r#"SELECT CASE WHEN NOT $2 OR tls_cert_not_after > now() THEN tls_cert_sha256 END AS "current?",
                    CASE WHEN NOT $2 OR tls_prev_cert_not_after > now() THEN tls_prev_cert_sha256 END AS "previous?"
             FROM hosts WHERE id = $1"#,
            host_id,
            unexpired
        )
        .fetch_optional(&self.db)
        .await?;
        Ok(row.map(|d| d.current.into_iter().chain(d.previous).collect()).unwrap_or_default())
    }

    /// Certifies `host_id`'s public key (and its store node's address),
    /// records the certificate's digest and the node's address, and
    /// answers the certificate, the CA and the ring's seeds. `presented`:
    /// the certificate the host renewed with, which stays valid until the
    /// next renewal.
    pub async fn issue_host_certificate(
        &self,
        host_id: &str,
        req: &CertificateRequest,
        presented: Option<[u8; 32]>,
    ) -> Result<CertificateGrant> {
        let key = ca::parse_public_key(&req.public_key)?;
        let ip = req.store_address.as_deref().map(ca::store_address_ip).transpose()?;
        // A certificate names the node's IP address (not its port), and
        // clients check the IP: so an address is one node's, compared by IP.
        // Not the control plane's (any of the addresses it serves on), not
        // another host's, and a real unicast address (nodes sharing a
        // machine use distinct loopback addresses: 127.0.0.0/8 is all loopback).
        if let Some(ip) = ip {
            if ip.is_unspecified() || ip.is_multicast() || ip == std::net::IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
                return Err(ServiceError::InvalidParameterValue(format!("{ip} is not a node address")));
            }
            let others = sqlx::query_scalar!(
                r#"SELECT store_address AS "store_address!" FROM hosts WHERE store_address IS NOT NULL AND id <> $1"#,
                host_id
            )
            .fetch_all(&self.db)
            .await?;
            let host_taken = others.iter().any(|a| ca::store_address_ip(a).ok() == Some(ip));
            if host_taken || self.control_plane_ips().contains(&ip) {
                tracing::warn!(%host_id, %ip, "refused a certificate for another node's address");
                return Err(ServiceError::Conflict(format!("the address {ip} is another node's")));
            }
        }
        let (pem, der, not_after) = self.store.ca.issue_host(host_id, &key, ip)?;
        let digest = Sha256::digest(&der).to_vec();
        // Documents are sealed for the host's key: a new key needs every
        // document of the host's instances sealed again (a new version).
        let old_key = sqlx::query_scalar!("SELECT public_key FROM hosts WHERE id = $1", host_id).fetch_one(&self.db).await?;
        if old_key.as_deref() != Some(key.as_slice()) {
            let mut tx = self.db.begin().await?;
            sqlx::query!("UPDATE hosts SET public_key = $2 WHERE id = $1", host_id, key).execute(&mut *tx).await?;
            sqlx::query!("UPDATE instances SET doc_version = doc_version + 1 WHERE host_id = $1 AND capacity_held", host_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        // (SET sees the row as it was: the presented certificate is the
        // current or the previous one, or none of this host's.)
        // $6 goes in as text (no INET type in the build), cast to inet as before.
        sqlx::query!(
            "UPDATE hosts SET tls_cert_sha256 = $2, tls_cert_not_after = $3, store_address = $4, store_ip = $6::text::inet, \
                 tls_prev_cert_sha256 = CASE WHEN $5 = tls_cert_sha256 THEN tls_cert_sha256 \
                                             WHEN $5 = tls_prev_cert_sha256 THEN tls_prev_cert_sha256 END, \
                 tls_prev_cert_not_after = CASE WHEN $5 = tls_cert_sha256 THEN tls_cert_not_after \
                                                WHEN $5 = tls_prev_cert_sha256 THEN tls_prev_cert_not_after END \
             WHERE id = $1",
            host_id,
            digest,
            not_after,
            req.store_address,
            presented.map(|p| p.to_vec()),
            ip.map(|i| i.to_string())
        )
        .execute(&self.db)
        .await
        .map_err(|e| {
            if crate::db::Constraint::HostStoreIp.violated_by(&e) {
                ServiceError::Conflict(format!("the address {} is another node's", ip.map(|i| i.to_string()).unwrap_or_default()))
            } else {
                e.into()
            }
        })?;
        let others = sqlx::query_scalar!(
            r#"SELECT store_address AS "store_address!" FROM hosts WHERE store_address IS NOT NULL AND id <> $1
             ORDER BY last_heartbeat DESC NULLS LAST LIMIT $2"#,
            host_id,
            MAX_SEEDS - 1
        )
        .fetch_all(&self.db)
        .await?;
        let mut store_seeds = vec![self.store.address.clone()];
        store_seeds.extend(others.into_iter().filter(|a| Some(a) != req.store_address.as_ref()));
        tracing::info!(%host_id, store_address = ?req.store_address, "host certificate issued");
        Ok(CertificateGrant {
            certificate_pem: pem,
            ca_pem: self.store.ca.cert_pem().to_string(),
            not_after,
            store_seeds,
            document_keys: self.store.trusted_keys().0,
        })
    }

    /// The addresses the control plane serves on (its store node, its API
    /// and agent listeners, the addresses its certificate names): no host
    /// may have a certificate for one.
    fn control_plane_ips(&self) -> Vec<std::net::IpAddr> {
        let mut ips: Vec<std::net::IpAddr> = self.config.tls_names.iter().filter_map(|n| n.parse().ok()).collect();
        ips.extend(ca::store_address_ip(&self.store.address).ok());
        ips.extend(self.config.agent_listen.map(|a| a.ip()));
        ips.push(self.config.listen.ip());
        ips
    }
}
