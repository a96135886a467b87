//! Idempotency by client token: a launch with a token the account used
//! before answers with that launch's reservation when the requests are the
//! same ([`RequestKey`]'s digest), else IdempotentParameterMismatch, before
//! anything the launch named is looked up again. Concurrent retries are
//! serialised by the unique `(account, client_token)` index of
//! `reservations` (see `placement`).

use crate::error::{Result, ServiceError};
use crate::service::{Caller, Service};
use nimbus_proto::api::Reservation;
use sha2::{Digest, Sha256};

/// What makes two launches "the same request" for a ClientToken: the
/// request as given (the default image named when none was, tags sorted,
/// user-data decoded), nothing that a later change could alter — a retry
/// after the key pair was deleted or the image deregistered still finds
/// the original reservation, as EC2's does.
pub(super) struct RequestKey<'a> {
    pub(super) image_id: &'a str,
    pub(super) instance_type: &'a str,
    pub(super) zone: Option<&'a str>,
    /// The network part of the request as given.
    pub(super) network_key: &'a str,
    pub(super) min: u32,
    pub(super) max: u32,
    pub(super) metadata: &'a crate::service::metadata_options::Options,
    pub(super) key_name: Option<&'a str>,
    pub(super) tags: &'a [(String, String)],
    pub(super) user_data: Option<&'a [u8]>,
}

impl RequestKey<'_> {
    pub(super) fn digest(&self) -> Vec<u8> {
        let mut h = Sha256::new();
        for part in
            [self.image_id.as_bytes(), self.instance_type.as_bytes(), self.zone.unwrap_or("").as_bytes(), self.network_key.as_bytes()]
        {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(self.min.to_be_bytes());
        h.update(self.max.to_be_bytes());
        h.update(self.metadata.key());
        let key = self.key_name.unwrap_or("");
        h.update((key.len() as u64).to_be_bytes());
        h.update(key.as_bytes());
        for (k, v) in self.tags {
            h.update((k.len() as u64).to_be_bytes());
            h.update(k.as_bytes());
            h.update((v.len() as u64).to_be_bytes());
            h.update(v.as_bytes());
        }
        match self.user_data {
            Some(u) => {
                h.update([1]);
                h.update(u);
            }
            None => h.update([0]),
        }
        h.finalize().to_vec()
    }
}

impl Service {
    /// The reservation an earlier launch with this token made, if any;
    /// IdempotentParameterMismatch if that launch asked for something else.
    pub(super) async fn launched_with_token(&self, caller: &Caller, token: &str, digest: &[u8]) -> Result<Option<Reservation>> {
        let existing: Option<(String, Vec<u8>)> =
            sqlx::query_as("SELECT id, request_sha256 FROM reservations WHERE account_id = $1 AND client_token = $2")
                .bind(&caller.account_id)
                .bind(token)
                .fetch_optional(&self.db)
                .await?;
        match existing {
            None => Ok(None),
            Some((_, existing_digest)) if existing_digest != digest => Err(ServiceError::IdempotentParameterMismatch(token.to_string())),
            Some((id, _)) => self.reservation(caller, &id).await.map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_distinguishes_parameters() {
        let metadata = Default::default();
        let digest = |ud: Option<&[u8]>, max| {
            RequestKey {
                image_id: "ami-1",
                instance_type: "t3.nano",
                zone: None,
                network_key: "",
                min: 1,
                max,
                metadata: &metadata,
                key_name: None,
                tags: &[],
                user_data: ud,
            }
            .digest()
        };
        assert_eq!(digest(None, 1), digest(None, 1));
        assert_ne!(digest(None, 1), digest(None, 2));
        assert_ne!(digest(None, 1), digest(Some(&[]), 1));
    }
}
