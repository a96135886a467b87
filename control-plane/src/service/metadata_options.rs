//! EC2's `MetadataOptions` of an instance: given at launch (RunInstances),
//! changed by ModifyInstanceMetadataOptions, shown by DescribeInstances.
//! A change bumps the instance's document version (the outbox trigger) and
//! so reaches the metadata service through the state store.

use super::{Caller, Service};
use crate::error::{Result, ServiceError};
use crate::ids;
use nimbus_proto::api::{InstanceMetadataOptions, MetadataOptionsRequest, ModifyMetadataOptionsResult};

/// The options as PostgreSQL keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Options {
    pub metadata_tokens_required: bool,
    pub metadata_endpoint_enabled: bool,
    pub metadata_tags_enabled: bool,
    pub metadata_hop_limit: i32,
}

impl Default for Options {
    /// EC2's defaults: tokens optional, endpoint enabled, tags off, one hop.
    fn default() -> Self {
        Options { metadata_tokens_required: false, metadata_endpoint_enabled: true, metadata_tags_enabled: false, metadata_hop_limit: 1 }
    }
}

fn choice(field: &str, value: &Option<String>, yes: &str, no: &str, current: bool) -> Result<bool> {
    match value.as_deref() {
        None => Ok(current),
        Some(v) if v == yes => Ok(true),
        Some(v) if v == no => Ok(false),
        Some(v) => {
            Err(ServiceError::InvalidParameterValue(format!("Value ({v}) for parameter {field} is invalid. Valid values: {no}, {yes}")))
        }
    }
}

impl Options {
    /// `self` changed by what `req` names (left-out fields keep their value).
    pub fn apply(self, req: &MetadataOptionsRequest) -> Result<Options> {
        let hop = match req.http_put_response_hop_limit {
            None => self.metadata_hop_limit,
            Some(h @ 1..=64) => h as i32,
            Some(h) => {
                return Err(ServiceError::InvalidParameterValue(format!("HttpPutResponseHopLimit must be between 1 and 64; got {h}")))
            }
        };
        match req.http_protocol_ipv6.as_deref() {
            None | Some("disabled") => {}
            Some(v) => {
                return Err(ServiceError::InvalidParameterValue(format!("HttpProtocolIpv6 {v}: only disabled (Nimbus serves IPv4)")))
            }
        }
        Ok(Options {
            metadata_tokens_required: choice("HttpTokens", &req.http_tokens, "required", "optional", self.metadata_tokens_required)?,
            metadata_endpoint_enabled: choice("HttpEndpoint", &req.http_endpoint, "enabled", "disabled", self.metadata_endpoint_enabled)?,
            metadata_tags_enabled: choice(
                "InstanceMetadataTags",
                &req.instance_metadata_tags,
                "enabled",
                "disabled",
                self.metadata_tags_enabled,
            )?,
            metadata_hop_limit: hop,
        })
    }

    pub fn to_api(self, state: &str) -> InstanceMetadataOptions {
        let on = |b: bool| if b { "enabled" } else { "disabled" }.to_string();
        InstanceMetadataOptions {
            state: state.to_string(),
            http_tokens: if self.metadata_tokens_required { "required" } else { "optional" }.to_string(),
            http_endpoint: on(self.metadata_endpoint_enabled),
            instance_metadata_tags: on(self.metadata_tags_enabled),
            http_put_response_hop_limit: self.metadata_hop_limit.max(1) as u32,
            http_protocol_ipv6: "disabled".to_string(),
        }
    }

    /// For the launch digest.
    pub fn key(self) -> [u8; 4] {
        [
            self.metadata_tokens_required as u8,
            self.metadata_endpoint_enabled as u8,
            self.metadata_tags_enabled as u8,
            self.metadata_hop_limit.clamp(0, 255) as u8,
        ]
    }
}

impl Service {
    /// ModifyInstanceMetadataOptions: changes the named options of a
    /// pending, running, stopping or stopped instance. The answer says
    /// `pending`, as EC2's does: the guest sees the change once the outbox
    /// relay published it and the host's metadata service picked it up.
    pub async fn modify_instance_metadata_options(
        &self,
        caller: &Caller,
        instance_id: &str,
        req: &MetadataOptionsRequest,
    ) -> Result<ModifyMetadataOptionsResult> {
        if !ids::is_valid(ids::INSTANCE, instance_id) {
            return Err(ServiceError::InstanceIdMalformed(instance_id.to_string()));
        }
        let mut tx = self.db.begin().await?;
        let row = sqlx::query!(
            "SELECT state, metadata_tokens_required, metadata_endpoint_enabled, metadata_tags_enabled, metadata_hop_limit \
             FROM instances WHERE account_id = $1 AND id = $2 FOR UPDATE",
            caller.account_id,
            instance_id
        )
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| {
            let current = Options {
                metadata_tokens_required: r.metadata_tokens_required,
                metadata_endpoint_enabled: r.metadata_endpoint_enabled,
                metadata_tags_enabled: r.metadata_tags_enabled,
                metadata_hop_limit: r.metadata_hop_limit,
            };
            (r.state, current)
        });
        let (state, current) = row.ok_or_else(|| ServiceError::InstanceNotFound(instance_id.to_string()))?;
        if state == "terminated" || state == "shutting-down" {
            return Err(ServiceError::IncorrectInstanceState(format!(
                "The instance '{instance_id}' is not in a state from which its metadata options can be modified"
            )));
        }
        let new = current.apply(req)?;
        sqlx::query!(
            "UPDATE instances SET metadata_tokens_required = $2, metadata_endpoint_enabled = $3, metadata_tags_enabled = $4, \
             metadata_hop_limit = $5 WHERE id = $1",
            instance_id,
            new.metadata_tokens_required,
            new.metadata_endpoint_enabled,
            new.metadata_tags_enabled,
            new.metadata_hop_limit
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ModifyMetadataOptionsResult { instance_id: instance_id.to_string(), instance_metadata_options: new.to_api("pending") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_change_only_what_is_named_and_refuse_bad_values() {
        let d = Options::default();
        let req = |t: Option<&str>, e: Option<&str>, g: Option<&str>| MetadataOptionsRequest {
            http_tokens: t.map(str::to_string),
            http_endpoint: e.map(str::to_string),
            instance_metadata_tags: g.map(str::to_string),
            ..Default::default()
        };
        let o = d.apply(&req(Some("required"), None, Some("enabled"))).unwrap();
        assert!(o.metadata_tokens_required && o.metadata_endpoint_enabled && o.metadata_tags_enabled);
        let o = o.apply(&req(None, Some("disabled"), None)).unwrap();
        assert!(o.metadata_tokens_required && !o.metadata_endpoint_enabled && o.metadata_tags_enabled);
        assert!(d.apply(&req(Some("sometimes"), None, None)).is_err());
        assert!(d.apply(&req(None, Some("on"), None)).is_err());
        let hop = |h| MetadataOptionsRequest { http_put_response_hop_limit: Some(h), ..Default::default() };
        assert!(d.apply(&hop(0)).is_err() && d.apply(&hop(65)).is_err());
        assert_eq!(d.apply(&hop(64)).unwrap().metadata_hop_limit, 64);
        let v6 = MetadataOptionsRequest { http_protocol_ipv6: Some("enabled".into()), ..Default::default() };
        assert!(d.apply(&v6).is_err());
        let api = d.to_api("applied");
        assert_eq!(
            (api.http_tokens.as_str(), api.http_endpoint.as_str(), api.instance_metadata_tags.as_str()),
            ("optional", "enabled", "disabled")
        );
    }
}
