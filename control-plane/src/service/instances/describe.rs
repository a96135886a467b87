//! DescribeInstances: the caller's visible instances, filtered (ids,
//! states, zones, types, images, tags, and network filters through
//! `instance_network_facts`), a page at a time (keyset pagination by `seq`,
//! the token opaque), each with its tags and interfaces; and reservations.

use super::rows::{InstanceRow, INSTANCE_COLUMNS};
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::network::like_pattern;
use crate::service::visibility::instance_visible;
use crate::service::{Caller, Service};
use base64::Engine;
use nimbus_proto::api::{Instance, InstanceList, Reservation};
use nimbus_proto::InstanceState;
use std::collections::BTreeSet;

pub const MAX_PAGE: u32 = 1000;
pub const DEFAULT_PAGE: u32 = 100;

/// A tag filter of DescribeInstances; its values are EC2 filter values
/// (`*` and `?` are wildcards), any of which may match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFilter {
    /// `tag-key`: the instance has a tag whose key matches one of these.
    Key(Vec<String>),
    /// `tag:KEY`: the instance's tag KEY has a value matching one of these.
    Value { key: String, values: Vec<String> },
}

/// Filters of a describe call; every present filter must match, each by one
/// of its values, which may hold EC2's wildcards (`*`, `?`) as in every
/// Describe (one rule: `network::filters`).
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    pub instance_ids: Vec<String>,
    pub states: Vec<InstanceState>,
    pub availability_zones: Vec<String>,
    pub instance_types: Vec<String>,
    pub image_ids: Vec<String>,
    /// `tag:KEY` and `tag-key` filters.
    pub tags: Vec<TagFilter>,
    /// Network filters (`vpc-id`, `subnet-id`, `private-ip-address`,
    /// `ip-address`, `instance.group-id`, `network-interface.*`, ...): any of the values.
    pub network: Vec<(String, Vec<String>)>,
    pub max_results: Option<u32>,
    pub next_token: Option<String>,
}

fn encode_token(seq: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("seq:{seq}"))
}

fn decode_token(token: &str) -> Result<i64> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("seq:").and_then(|n| n.parse().ok()))
        .ok_or_else(|| ServiceError::InvalidParameterValue("next_token is not a token this API returned".into()))
}

/// The network filters of DescribeInstances, checked; `private-dns-name`
/// becomes the private address it names.
fn network_filters(filters: &[(String, Vec<String>)]) -> Result<Vec<(String, Vec<String>)>> {
    const KNOWN: &[&str] = &[
        "vpc-id",
        "subnet-id",
        "private-ip-address",
        "ip-address",
        "instance.group-id",
        "instance.group-name",
        "group-id",
        "group-name",
        "network-interface.network-interface-id",
        "network-interface.vpc-id",
        "network-interface.subnet-id",
        "network-interface.mac-address",
        "network-interface.addresses.private-ip-address",
        "network-interface.private-ip-address",
        "network-interface.attachment.device-index",
        "network-interface.attachment.attachment-id",
        "network-interface.status",
        "network-interface.group-id",
        "network-interface.group-name",
        "network-interface.association.public-ip",
    ];
    let mut out = Vec::new();
    for (name, values) in filters {
        if name == "private-dns-name" || name == "network-interface.private-dns-name" {
            let ips = values
                .iter()
                .map(|v| {
                    let host = v.split('.').next().unwrap_or("");
                    host.strip_prefix("ip-").map(|h| h.replace('-', ".")).unwrap_or_default()
                })
                .collect();
            let target = if name == "private-dns-name" { "private-ip-address" } else { "network-interface.addresses.private-ip-address" };
            out.push((target.to_string(), ips));
        } else if KNOWN.contains(&name.as_str()) {
            out.push((name.clone(), values.clone()));
        } else {
            return Err(ServiceError::InvalidParameterValue(format!("The filter '{name}' is invalid")));
        }
    }
    Ok(out)
}

impl Service {
    pub(crate) async fn reservation(&self, caller: &Caller, reservation_id: &str) -> Result<Reservation> {
        let rows = sqlx::query_as::<_, InstanceRow>(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE reservation_id = $1 AND account_id = $2 ORDER BY ami_launch_index"
        ))
        .bind(reservation_id)
        .bind(&caller.account_id)
        .fetch_all(&self.db)
        .await?;
        Ok(Reservation {
            reservation_id: reservation_id.to_string(),
            owner_id: caller.account_id.clone(),
            instances: self.with_tags(caller, rows).await?,
        })
    }

    pub async fn describe_instances(&self, caller: &Caller, filter: InstanceFilter) -> Result<InstanceList> {
        for id in &filter.instance_ids {
            if !ids::is_valid(ids::INSTANCE, id) {
                return Err(ServiceError::InstanceIdMalformed(id.clone()));
            }
        }
        let limit = filter.max_results.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ServiceError::InvalidParameterValue(format!("max_results must be between 1 and {MAX_PAGE}")));
        }
        let after = filter.next_token.as_deref().map(decode_token).transpose()?.unwrap_or(0);
        let network_filters = network_filters(&filter.network)?;
        let opt = |v: &Vec<String>| if v.is_empty() { None } else { Some(v.clone()) };
        let like = |v: &[String]| v.iter().map(|p| like_pattern(p)).collect::<Vec<_>>();
        let like_opt = |v: &Vec<String>| if v.is_empty() { None } else { Some(like(v)) };
        let tag_filters: Vec<serde_json::Value> = filter
            .tags
            .iter()
            .map(|t| match t {
                TagFilter::Key(keys) => serde_json::json!({ "k": null, "v": like(keys) }),
                TagFilter::Value { key, values } => serde_json::json!({ "k": key, "v": like(values) }),
            })
            .collect();
        let states: Vec<String> = filter.states.iter().map(|s| s.as_str().to_string()).collect();
        let mut rows = sqlx::query_as::<_, InstanceRow>(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE account_id = $1 AND seq > $2 AND {visible} \
               AND ($3::text[] IS NULL OR id = ANY($3)) AND ($4::text[] IS NULL OR state = ANY($4)) \
               AND ($5::text[] IS NULL OR availability_zone LIKE ANY($5)) AND ($6::text[] IS NULL OR instance_type LIKE ANY($6)) \
               AND ($8::text[] IS NULL OR image_id LIKE ANY($8)) \
               AND NOT EXISTS (SELECT 1 FROM jsonb_to_recordset($9::jsonb) AS f(k text, v text[]) WHERE NOT EXISTS \
                   (SELECT 1 FROM tags t WHERE t.account_id = instances.account_id AND t.resource_id = instances.id \
                      AND CASE WHEN f.k IS NULL THEN t.key LIKE ANY(f.v) ELSE t.key = f.k AND t.value LIKE ANY(f.v) END)) \
               AND NOT EXISTS (SELECT 1 FROM jsonb_to_recordset($10::jsonb) AS f(k text, v text[]) WHERE NOT EXISTS \
                   (SELECT 1 FROM instance_network_facts x WHERE x.instance_id = instances.id AND x.name = f.k AND x.value LIKE ANY(f.v))) \
             ORDER BY seq LIMIT $7",
            visible = instance_visible()
        ))
        .bind(&caller.account_id)
        .bind(after)
        .bind(opt(&filter.instance_ids))
        .bind(opt(&states))
        .bind(like_opt(&filter.availability_zones))
        .bind(like_opt(&filter.instance_types))
        .bind(i64::from(limit) + 1)
        .bind(like_opt(&filter.image_ids))
        .bind(serde_json::Value::Array(tag_filters))
        .bind(serde_json::Value::Array(network_filters.iter().map(|(k, v)| serde_json::json!({"k": k, "v": like(v)})).collect()))
        .fetch_all(&self.db)
        .await?;
        let next_token = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(|r| encode_token(r.seq))
        } else {
            None
        };
        if filter.next_token.is_none() {
            // Naming an instance that does not exist (or is another account's) is an error, as in EC2.
            let found: BTreeSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            if let Some(missing) = filter.instance_ids.iter().find(|id| !found.contains(id.as_str())) {
                if filter.instance_ids.len() <= limit as usize {
                    return Err(ServiceError::InstanceNotFound(missing.clone()));
                }
            }
        }
        Ok(InstanceList { instances: self.with_tags(caller, rows).await?, next_token })
    }

    async fn with_tags(&self, caller: &Caller, rows: Vec<InstanceRow>) -> Result<Vec<Instance>> {
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let mut tags = self.tags_of(caller, &ids).await?;
        let mut out = rows
            .into_iter()
            .map(|r| {
                let t = tags.remove(&r.id).unwrap_or_default();
                let mut i = r.into_api()?;
                i.tags = t.into_iter().map(|(key, value)| nimbus_proto::api::ResourceTag { key, value }).collect();
                Ok(i)
            })
            .collect::<Result<Vec<_>>>()?;
        self.with_network(caller, &mut out).await?;
        Ok(out)
    }

    pub async fn describe_instance(&self, caller: &Caller, id: &str) -> Result<Instance> {
        let filter = InstanceFilter { instance_ids: vec![id.to_string()], ..Default::default() };
        let mut list = self.describe_instances(caller, filter).await?;
        list.instances.pop().ok_or_else(|| ServiceError::InstanceNotFound(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        assert_eq!(decode_token(&encode_token(42)).unwrap(), 42);
        assert!(decode_token("garbage").is_err());
        assert!(decode_token("").is_err());
    }
}
