//! Instances: launch, describe, terminate.

use super::observed::Observed;
use super::scheduler::{self, Claim, Need};
use super::{Caller, Service};
use crate::error::{Result, ServiceError};
use crate::ids;
use base64::Engine;
use nimbus_proto::api::{Instance, InstanceList, Reservation, RunInstancesRequest, StateChange, MAX_USER_DATA_BYTES};
use nimbus_proto::InstanceState;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;

/// How often a launch re-plans after losing a race for capacity.
const MAX_PLACEMENT_ATTEMPTS: u32 = 16;
pub const MAX_PAGE: u32 = 1000;
/// Terminated instances stay visible this long, then disappear (as in EC2).
pub const TERMINATED_VISIBLE_FOR: &str = "1 hour";
/// The SQL condition of an instance the API still shows.
pub(crate) const VISIBLE: &str = "(state <> 'terminated' OR state_changed_at > now() - interval '1 hour')";
pub const DEFAULT_PAGE: u32 = 100;

#[derive(sqlx::FromRow)]
pub(crate) struct InstanceRow {
    pub id: String,
    pub seq: i64,
    pub reservation_id: String,
    pub ami_launch_index: i32,
    pub image_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub launch_time: chrono::DateTime<chrono::Utc>,
    pub key_name: Option<String>,
    pub ssh_endpoint: Option<String>,
    #[sqlx(flatten)]
    pub metadata: super::metadata_options::Options,
}

const INSTANCE_COLUMNS: &str = "id, seq, reservation_id, ami_launch_index, image_id, instance_type, \
     availability_zone, state, state_reason, launch_time, key_name, ssh_endpoint, \
     metadata_tokens_required, metadata_endpoint_enabled, metadata_tags_enabled, metadata_hop_limit";

pub(crate) fn parse_state(s: &str) -> Result<InstanceState> {
    s.parse().map_err(|e| ServiceError::Internal(format!("bad state in database: {e}")))
}

impl InstanceRow {
    fn into_api(self) -> Result<Instance> {
        Ok(Instance {
            metadata_options: Some(self.metadata.to_api("applied")),
            state: parse_state(&self.state)?.into(),
            instance_id: self.id,
            reservation_id: self.reservation_id,
            image_id: self.image_id,
            instance_type: self.instance_type,
            availability_zone: self.availability_zone,
            launch_time: self.launch_time,
            ami_launch_index: self.ami_launch_index as u32,
            state_reason: self.state_reason,
            key_name: self.key_name,
            tags: Vec::new(),
            private_ip_address: None,
            private_dns_name: None,
            public_ip_address: None,
            vpc_id: None,
            subnet_id: None,
            security_groups: Vec::new(),
            network_interfaces: Vec::new(),
            // Only while the guest runs (a stopped guest's port is not listened on).
            ssh_endpoint: self.ssh_endpoint.filter(|_| self.state == "running"),
        })
    }
}

/// Filters of a describe call; every present filter must match.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    pub instance_ids: Vec<String>,
    pub states: Vec<InstanceState>,
    pub availability_zones: Vec<String>,
    pub instance_types: Vec<String>,
    pub image_ids: Vec<String>,
    /// `tag:KEY` filters (any of the values) and `tag-key` filters (values `None`).
    pub tags: Vec<(String, Option<Vec<String>>)>,
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

/// A validated launch.
#[derive(Debug)]
struct LaunchSpec {
    image_id: String,
    instance_type: String,
    need: Need,
    min: u32,
    max: u32,
    zone: Option<String>,
    user_data: Option<Vec<u8>>,
    key_name: Option<String>,
    public_key: Option<String>,
    tags: Vec<(String, String)>,
    metadata: super::metadata_options::Options,
}

/// What makes two launches "the same request" for a ClientToken: the
/// request as given (the default image named when none was, tags sorted,
/// user-data decoded), nothing that a later change could alter — a retry
/// after the key pair was deleted or the image deregistered still finds
/// the original reservation, as EC2's does.
struct RequestKey<'a> {
    image_id: &'a str,
    instance_type: &'a str,
    zone: Option<&'a str>,
    /// The network part of the request as given.
    network_key: &'a str,
    min: u32,
    max: u32,
    metadata: &'a super::metadata_options::Options,
    key_name: Option<&'a str>,
    tags: &'a [(String, String)],
    user_data: Option<&'a [u8]>,
}

impl RequestKey<'_> {
    fn digest(&self) -> Vec<u8> {
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

/// The root disk of an instance has its type's size: an image with a
/// larger disk does not fit (EC2 answers InvalidBlockDeviceMapping).
pub fn fits_disk(image: &nimbus_proto::api::Image, disk_gib: u64) -> Result<()> {
    match image.root_disk_size {
        Some(size) if size > disk_gib << 30 => Err(ServiceError::InvalidBlockDeviceMapping(format!(
            "Volume of size {disk_gib} GiB is smaller than the image {}'s disk of {} GiB: choose an instance type with a larger disk",
            image.image_id,
            size.div_ceil(1 << 30)
        ))),
        _ => Ok(()),
    }
}

/// Checks everything about a launch that does not need the database.
pub fn validate_run(req: &RunInstancesRequest, max_count: u32) -> Result<(Option<Vec<u8>>, Option<String>)> {
    if req.min_count < 1 {
        return Err(ServiceError::InvalidParameterValue("min_count must be at least 1".into()));
    }
    if req.max_count < req.min_count {
        return Err(ServiceError::InvalidParameterValue("max_count must not be less than min_count".into()));
    }
    if req.max_count > max_count {
        return Err(ServiceError::InvalidParameterValue(format!("max_count must be at most {max_count}")));
    }
    if req.instance_type.is_empty() {
        return Err(ServiceError::MissingParameter("instance_type".into()));
    }
    let user_data = match &req.user_data {
        None => None,
        Some(b64) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| ServiceError::InvalidParameterValue("user_data must be base64".into()))?;
            if raw.len() > MAX_USER_DATA_BYTES {
                return Err(ServiceError::InvalidParameterValue(format!(
                    "user_data is {} bytes once decoded; the limit is {MAX_USER_DATA_BYTES}",
                    raw.len()
                )));
            }
            Some(raw)
        }
    };
    if let Some(token) = &req.client_token {
        if token.is_empty() || token.len() > 64 || !token.is_ascii() {
            return Err(ServiceError::InvalidParameterValue("client_token must be 1 to 64 ASCII characters".into()));
        }
    }
    let zone = match &req.availability_zone {
        Some(z) if z.is_empty() || z.len() > 64 => {
            return Err(ServiceError::InvalidParameterValue("availability_zone must be 1 to 64 characters".into()))
        }
        other => other.clone(),
    };
    Ok((user_data, zone))
}

impl Service {
    /// Everything a launch checks before it places anything (for DryRun).
    pub async fn check_run_instances(&self, caller: &Caller, req: &RunInstancesRequest) -> Result<()> {
        validate_run(req, self.config.max_count)?;
        let image = self.launch_image(caller, req.image_id.as_deref()).await?;
        let itype = self.instance_type(&req.instance_type).await?;
        fits_disk(&image, itype.disk_gib)?;
        if let Some(k) = &req.key_name {
            self.key_pair_public_key(caller, k).await?;
        }
        self.resolve_launch_network(caller, req).await?;
        Ok(())
    }

    pub async fn run_instances(&self, caller: &Caller, req: RunInstancesRequest) -> Result<Reservation> {
        let (user_data, zone) = validate_run(&req, self.config.max_count)?;
        let mut tags: Vec<(String, String)> = req.tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect();
        super::tags::validate_tags(&tags)?;
        tags.sort();
        let metadata = match &req.metadata_options {
            Some(o) => super::metadata_options::Options::default().apply(o)?,
            None => Default::default(),
        };
        // A retry is answered before anything it named is looked up again.
        let image_named = match &req.image_id {
            Some(id) => id.clone(),
            None => self.default_image_id().await?.unwrap_or_default(),
        };
        let network_key = super::network::request_key(&req);
        let digest = RequestKey {
            image_id: &image_named,
            instance_type: &req.instance_type,
            zone: zone.as_deref(),
            network_key: &network_key,
            min: req.min_count,
            max: req.max_count,
            metadata: &metadata,
            key_name: req.key_name.as_deref(),
            tags: &tags,
            user_data: user_data.as_deref(),
        }
        .digest();
        if let Some(token) = req.client_token.as_deref() {
            if let Some(reservation) = self.launched_with_token(caller, token, &digest).await? {
                return Ok(reservation);
            }
        }

        let image = self.launch_image(caller, req.image_id.as_deref()).await?;
        let itype = self.instance_type(&req.instance_type).await?;
        fits_disk(&image, itype.disk_gib)?;
        let public_key = match &req.key_name {
            Some(k) => Some(self.key_pair_public_key(caller, k).await?),
            None => None,
        };
        let network = self.resolve_launch_network(caller, &req).await?;
        let spec = LaunchSpec {
            image_id: image.image_id,
            instance_type: itype.name,
            need: Need { vcpus: itype.vcpus.into(), memory_mib: itype.memory_mib as i64, disk_gib: itype.disk_gib as i64 },
            min: req.min_count,
            max: req.max_count,
            zone,
            user_data,
            key_name: req.key_name.clone(),
            public_key,
            tags,
            metadata,
        };
        for attempt in 1..=MAX_PLACEMENT_ATTEMPTS {
            match self.try_launch(caller, &spec, &network, &digest, req.client_token.as_deref()).await {
                Ok(Some(reservation)) => return Ok(reservation),
                Ok(None) => {
                    super::count_placement_retry();
                    tracing::debug!(attempt, "lost a race for capacity or quota; planning again")
                }
                Err(ServiceError::Database(e)) if crate::db::is_retryable(&e) => {
                    super::count_placement_retry();
                    tracing::debug!(attempt, error = %e, "retrying launch transaction")
                }
                // Two random MACs met (40 random bits): draw again.
                Err(ServiceError::Database(e)) if crate::db::is_unique_violation(&e, "network_interfaces_mac_key") => {
                    tracing::warn!(attempt, "MAC address collision; retrying launch transaction")
                }
                Err(e) => return Err(e),
            }
        }
        Err(ServiceError::InsufficientInstanceCapacity("capacity is contended by concurrent launches; try again".into()))
    }

    /// The reservation an earlier launch with this token made, if any;
    /// IdempotentParameterMismatch if that launch asked for something else.
    async fn launched_with_token(&self, caller: &Caller, token: &str, digest: &[u8]) -> Result<Option<Reservation>> {
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

    /// One launch transaction. `Ok(None)`: capacity was taken by a concurrent
    /// launch after we planned; nothing was written.
    async fn try_launch(
        &self,
        caller: &Caller,
        spec: &LaunchSpec,
        net: &super::network::LaunchNetwork,
        digest: &[u8],
        client_token: Option<&str>,
    ) -> Result<Option<Reservation>> {
        let mut tx = self.db.begin().await?;
        let reservation_id = ids::new_id(ids::RESERVATION);
        // With a token, the unique (account, token) index serialises retries:
        // a concurrent retry waits here until the first commits, then finds it.
        let inserted = sqlx::query(
            "INSERT INTO reservations (id, account_id, client_token, request_sha256) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (account_id, client_token) DO NOTHING",
        )
        .bind(&reservation_id)
        .bind(&caller.account_id)
        .bind(client_token)
        .bind(digest)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            // A concurrent retry committed first.
            tx.rollback().await?;
            let token = client_token.unwrap_or_default();
            return match self.launched_with_token(caller, token, digest).await? {
                Some(reservation) => Ok(Some(reservation)),
                None => Err(ServiceError::Internal(format!("the reservation of client token {token} vanished"))),
            };
        }

        // The account's limits against its usage as last committed; the
        // claim at the end checks them again (a concurrent launch of the
        // account may commit meanwhile), without locking the account here.
        let (_, limits, usage) = self.limits_and_usage(&mut tx, &caller.account_id).await?;
        let mut allowed = match super::accounts::fit_limits(limits, usage, spec.need.vcpus as u32, spec.min, spec.max) {
            Ok(n) => n,
            Err(e) => {
                tx.rollback().await?;
                return Err(e);
            }
        };
        // The image stays launchable until we commit: a DeregisterImage
        // (which locks the row FOR UPDATE) waits for this launch, and then
        // sees its instances; one that committed first makes this launch fail.
        let launchable: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM images WHERE id = $1 AND state = 'available' FOR SHARE")
            .bind(&spec.image_id)
            .fetch_optional(&mut *tx)
            .await?;
        if launchable.is_none() {
            tx.rollback().await?;
            return Err(ServiceError::ImageNotFound(spec.image_id.clone()));
        }
        // Named subnets: as many instances as they have free addresses for.
        let fitted = self.fit_addresses(&mut tx, net).await?;
        if let Some(fit) = fitted {
            if fit < spec.min {
                tx.rollback().await?;
                let subnet = net.nics.first().and_then(|n| n.subnet.as_ref()).map(|s| s.id.clone()).unwrap_or_default();
                return Err(ServiceError::InsufficientFreeAddressesInSubnet(format!(
                    "There are not enough free addresses in subnet '{subnet}' to satisfy the requested number of instances."
                )));
            }
            allowed = allowed.min(fit);
        }
        // A subnet fixes the zone.
        let zone = net.zone.as_deref().or(spec.zone.as_deref());
        let hosts = scheduler::schedulable_hosts(&mut tx, self.config.host_timeout()).await?;
        let placements = scheduler::plan(&hosts, spec.need, allowed, zone, self.config.placement, rand::random());
        if placements.len() < spec.min as usize {
            tx.rollback().await?;
            return Err(ServiceError::InsufficientInstanceCapacity(format!(
                "{} of the {} instance(s) of type {} fit{}",
                placements.len(),
                spec.min,
                spec.instance_type,
                zone.map(|z| format!(" in {z}")).unwrap_or_default()
            )));
        }
        // Only the placement hosts are bumped here; the other hosts whose
        // network the new interfaces change learn it from the network relay
        // after the commit (`attach_launch` records the change).
        let generations = match scheduler::claim(&mut tx, &placements, spec.need).await? {
            Claim::Claimed(g) => g,
            Claim::Raced => {
                tx.rollback().await?;
                return Ok(None);
            }
        };
        let changed: Vec<i64> = placements.iter().map(|h| generations.get(h).copied().unwrap_or(0)).collect();
        let zones: std::collections::HashMap<&str, &str> = hosts.iter().map(|h| (h.id.as_str(), h.availability_zone.as_str())).collect();
        let ids: Vec<String> = placements.iter().map(|_| ids::new_id(ids::INSTANCE)).collect();
        let indexes: Vec<i32> = (0..placements.len() as i32).collect();
        let placed_zones: Vec<String> = placements.iter().map(|h| zones.get(h.as_str()).copied().unwrap_or("").to_string()).collect();
        sqlx::query(
            "INSERT INTO instances (id, account_id, reservation_id, ami_launch_index, image_id, instance_type, \
                 vcpus, memory_mib, disk_gib, availability_zone, host_id, state, desired_state, user_data, changed_generation, \
                 key_name, public_key, metadata_tokens_required, metadata_endpoint_enabled, metadata_tags_enabled, metadata_hop_limit) \
             SELECT id, $2, $3, idx, $4, $5, $6, $7, $8, zone, host, 'pending', 'running', $9, gen, $14, $15, $16, $17, $18, $19 \
             FROM unnest($1::text[], $10::int[], $11::text[], $12::text[], $13::bigint[]) AS t(id, idx, zone, host, gen)",
        )
        .bind(&ids)
        .bind(&caller.account_id)
        .bind(&reservation_id)
        .bind(&spec.image_id)
        .bind(&spec.instance_type)
        .bind(spec.need.vcpus as i32)
        .bind(spec.need.memory_mib)
        .bind(spec.need.disk_gib)
        .bind(&spec.user_data)
        .bind(&indexes)
        .bind(&placed_zones)
        .bind(&placements)
        .bind(&changed)
        .bind(&spec.key_name)
        .bind(&spec.public_key)
        .bind(spec.metadata.metadata_tokens_required)
        .bind(spec.metadata.metadata_endpoint_enabled)
        .bind(spec.metadata.metadata_tags_enabled)
        .bind(spec.metadata.metadata_hop_limit)
        .execute(&mut *tx)
        .await?;
        let placed: Vec<super::network::Placed> =
            ids.iter().zip(&placed_zones).map(|(id, zone)| super::network::Placed { instance_id: id, zone }).collect();
        match self.attach_launch(&mut tx, caller, net, &placed).await {
            Ok(()) => {}
            // Named subnets had room when counted, and a concurrent launch
            // took some of it since: plan again with a new count.
            Err(ServiceError::InsufficientFreeAddressesInSubnet(_)) if fitted.is_some() => {
                tx.rollback().await?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        super::tags::insert_new_tags(&mut tx, &caller.account_id, &ids, &spec.tags).await?;
        // The account's usage, checked against its limits as the transaction
        // commits: a concurrent launch of the account that committed since we
        // read the usage may have used the room; then plan again.
        let count = ids.len() as i64;
        super::accounts::claim_usage(&mut tx, &caller.account_id, Some(limits), count, count * spec.need.vcpus).await?;
        match tx.commit().await.map_err(ServiceError::from) {
            Ok(()) => {}
            Err(e) if super::accounts::is_over_limit(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        tracing::info!(%reservation_id, count = ids.len(), instance_type = %spec.instance_type, "instances launched");
        self.reservation(caller, &reservation_id).await.map(Some)
    }

    async fn reservation(&self, caller: &Caller, reservation_id: &str) -> Result<Reservation> {
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
        let states: Vec<String> = filter.states.iter().map(|s| s.as_str().to_string()).collect();
        let mut rows = sqlx::query_as::<_, InstanceRow>(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE account_id = $1 AND seq > $2 AND {VISIBLE} \
               AND ($3::text[] IS NULL OR id = ANY($3)) AND ($4::text[] IS NULL OR state = ANY($4)) \
               AND ($5::text[] IS NULL OR availability_zone = ANY($5)) AND ($6::text[] IS NULL OR instance_type = ANY($6)) \
               AND ($8::text[] IS NULL OR image_id = ANY($8)) \
               AND NOT EXISTS (SELECT 1 FROM jsonb_to_recordset($9::jsonb) AS f(k text, v text[]) WHERE NOT EXISTS \
                   (SELECT 1 FROM tags t WHERE t.account_id = instances.account_id AND t.resource_id = instances.id \
                      AND t.key = f.k AND (f.v IS NULL OR t.value = ANY(f.v)))) \
               AND NOT EXISTS (SELECT 1 FROM jsonb_to_recordset($10::jsonb) AS f(k text, v text[]) WHERE NOT EXISTS \
                   (SELECT 1 FROM instance_network_facts x WHERE x.instance_id = instances.id AND x.name = f.k AND x.value = ANY(f.v))) \
             ORDER BY seq LIMIT $7"
        ))
        .bind(&caller.account_id)
        .bind(after)
        .bind(opt(&filter.instance_ids))
        .bind(opt(&states))
        .bind(opt(&filter.availability_zones))
        .bind(opt(&filter.instance_types))
        .bind(i64::from(limit) + 1)
        .bind(opt(&filter.image_ids))
        .bind(serde_json::Value::Array(filter.tags.iter().map(|(k, v)| serde_json::json!({"k": k, "v": v})).collect()))
        .bind(serde_json::Value::Array(network_filters.iter().map(|(k, v)| serde_json::json!({"k": k, "v": v})).collect()))
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

    /// DescribeInstanceStatus: the instances the filter selects, each with
    /// its status checks (for running ones, what their hosts last wrote to
    /// the state store; see [`status_checks`]).
    pub async fn describe_instance_status(&self, caller: &Caller, filter: InstanceFilter) -> Result<InstanceStatusList> {
        let list = self.describe_instances(caller, filter).await?;
        let running: Vec<String> =
            list.instances.iter().filter(|i| i.state.name == InstanceState::Running).map(|i| i.instance_id.clone()).collect();
        let observed = self.stored_status(&running).await;
        let statuses = list
            .instances
            .into_iter()
            .map(|instance| {
                let checks = status_checks(instance.state.name, observed.get(&instance.instance_id).unwrap_or(&Observed::Unread));
                InstanceStatus { instance, checks }
            })
            .collect();
        Ok(InstanceStatusList { statuses, next_token: list.next_token })
    }

    pub async fn describe_instance(&self, caller: &Caller, id: &str) -> Result<Instance> {
        let filter = InstanceFilter { instance_ids: vec![id.to_string()], ..Default::default() };
        let mut list = self.describe_instances(caller, filter).await?;
        list.instances.pop().ok_or_else(|| ServiceError::InstanceNotFound(id.to_string()))
    }

    /// Asks for the instances to go away. Idempotent: terminating a
    /// terminating or terminated instance reports its state and changes
    /// nothing. Either every id is known to the caller or nothing changes.
    pub async fn terminate_instances(&self, caller: &Caller, instance_ids: &[String]) -> Result<Vec<StateChange>> {
        self.change_instances(caller, instance_ids, Op::Terminate).await
    }

    /// Stops the guests (ACPI shutdown, then hard stop after a timeout); their
    /// disks stay, and so does their place on the host.
    pub async fn stop_instances(&self, caller: &Caller, instance_ids: &[String]) -> Result<Vec<StateChange>> {
        self.change_instances(caller, instance_ids, Op::Stop).await
    }

    pub async fn start_instances(&self, caller: &Caller, instance_ids: &[String]) -> Result<Vec<StateChange>> {
        self.change_instances(caller, instance_ids, Op::Start).await
    }

    /// Asks the agents to reboot the guests (once per call).
    pub async fn reboot_instances(&self, caller: &Caller, instance_ids: &[String]) -> Result<()> {
        self.change_instances(caller, instance_ids, Op::Reboot).await.map(|_| ())
    }

    async fn change_instances(&self, caller: &Caller, instance_ids: &[String], op: Op) -> Result<Vec<StateChange>> {
        if instance_ids.is_empty() {
            return Err(ServiceError::MissingParameter("instance_ids".into()));
        }
        if instance_ids.len() > MAX_PAGE as usize {
            return Err(ServiceError::InvalidParameterValue(format!("at most {MAX_PAGE} instance ids per call")));
        }
        for id in instance_ids {
            if !ids::is_valid(ids::INSTANCE, id) {
                return Err(ServiceError::InstanceIdMalformed(id.clone()));
            }
        }
        let unique: Vec<String> = instance_ids.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        super::retrying(|| self.try_change(caller, &unique, op)).await
    }

    async fn try_change(&self, caller: &Caller, ids: &[String], op: Op) -> Result<Vec<StateChange>> {
        let mut tx = self.db.begin().await?;
        // Lock order everywhere: instances (by id), then hosts (by id).
        let rows: Vec<(String, String, String)> = sqlx::query_as(&format!(
            "SELECT id, state, host_id FROM instances WHERE account_id = $1 AND id = ANY($2) AND {VISIBLE} ORDER BY id FOR UPDATE"
        ))
        .bind(&caller.account_id)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        if let Some(missing) = ids.iter().find(|id| !rows.iter().any(|r| &r.0 == *id)) {
            return Err(ServiceError::InstanceNotFound(missing.clone()));
        }
        let mut changes = Vec::with_capacity(rows.len());
        let mut changed: Vec<String> = Vec::new();
        let mut hosts: BTreeSet<String> = BTreeSet::new();
        for (id, state, host) in rows {
            let prev = parse_state(&state)?;
            let next = op.next(prev).map_err(|_| {
                ServiceError::IncorrectInstanceState(format!("The instance '{id}' is not in a state from which it can be {}", op.verb()))
            })?;
            let current = match next {
                Some(next) => {
                    changed.push(id.clone());
                    hosts.insert(host);
                    next
                }
                None => prev,
            };
            changes.push(StateChange { instance_id: id, previous_state: prev.into(), current_state: current.into() });
        }
        if !changed.is_empty() {
            let hosts: Vec<String> = hosts.into_iter().collect();
            let reboot = op == Op::Reboot;
            let (state, desired) = op.target();
            sqlx::query(
                "WITH h AS (SELECT id FROM hosts WHERE id = ANY($2) ORDER BY id FOR UPDATE), \
                      bumped AS (UPDATE hosts SET generation = generation + 1 FROM h WHERE hosts.id = h.id \
                                 RETURNING hosts.id, hosts.generation) \
                 UPDATE instances SET state = coalesce($3, state), desired_state = coalesce($4, desired_state), \
                        reboots = reboots + $5, state_reason = CASE WHEN $5 = 0 THEN NULL ELSE state_reason END, \
                        state_changed_at = CASE WHEN $5 = 0 THEN now() ELSE state_changed_at END, \
                        changed_generation = bumped.generation \
                 FROM bumped WHERE instances.host_id = bumped.id AND instances.id = ANY($1)",
            )
            .bind(&changed)
            .bind(&hosts)
            .bind(state.map(|s| s.as_str()))
            .bind(desired.map(|d| d.as_str()))
            .bind(i64::from(reboot))
            .execute(&mut *tx)
            .await?;
            sqlx::query("SELECT pg_notify($1, h) FROM unnest($2::text[]) AS h")
                .bind(crate::notify::CHANNEL)
                .bind(&hosts)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        // Answer in the order the caller asked.
        changes.sort_by_key(|c| ids.iter().position(|i| *i == c.instance_id));
        Ok(changes)
    }

    /// The tail of the guest's serial console as its host last wrote it to
    /// the state store (or, from a host without a store node, reported it).
    pub async fn console_output(&self, caller: &Caller, instance_id: &str) -> Result<ConsoleOutput> {
        if !ids::is_valid(ids::INSTANCE, instance_id) {
            return Err(ServiceError::InstanceIdMalformed(instance_id.to_string()));
        }
        type Row = (Option<Vec<u8>>, Option<chrono::DateTime<chrono::Utc>>);
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT console_output, console_updated_at FROM instances WHERE account_id = $1 AND id = $2 AND {VISIBLE}"
        ))
        .bind(&caller.account_id)
        .bind(instance_id)
        .fetch_optional(&self.db)
        .await?;
        let (output, at) = row.ok_or_else(|| ServiceError::InstanceNotFound(instance_id.to_string()))?;
        // The newer of the two: a host writes its tails to the store, or,
        // without a store node (or while the store refused), reports them.
        if let Some(rec) = self.stored_console(instance_id).await {
            if let Ok(stored) = base64::engine::general_purpose::STANDARD.decode(&rec.output) {
                if at.is_none_or(|reported| rec.at >= reported) {
                    return Ok(ConsoleOutput { instance_id: instance_id.to_string(), output: stored, timestamp: Some(rec.at) });
                }
            }
        }
        Ok(ConsoleOutput { instance_id: instance_id.to_string(), output: output.unwrap_or_default(), timestamp: at })
    }
}

/// An instance and its status checks (DescribeInstanceStatus).
#[derive(Debug, Clone)]
pub struct InstanceStatus {
    pub instance: Instance,
    /// (system, instance) checks as (status, reachability detail).
    pub checks: [(&'static str, &'static str); 2],
}

#[derive(Debug, Clone)]
pub struct InstanceStatusList {
    pub statuses: Vec<InstanceStatus>,
    pub next_token: Option<String>,
}

/// EC2's status checks of an instance in `state` (DescribeInstanceStatus):
/// (system, instance) as (status, reachability detail). For a running
/// instance, what its host wrote to the state store; without a record (a
/// host that runs no store node), `ok` as the host reported it running;
/// when the store could not be read, `insufficient-data`; `initializing`
/// while pending.
pub fn status_checks(state: InstanceState, observed: &Observed<nimbus_proto::metadata::StatusRecord>) -> [(&'static str, &'static str); 2] {
    use nimbus_proto::metadata::Check;
    let of = |c: Check| match c {
        Check::Passed => ("ok", "passed"),
        Check::Failed => ("impaired", "failed"),
        Check::Initializing => ("initializing", "initializing"),
    };
    match (state, observed) {
        (InstanceState::Running, Observed::Found(r)) => [of(r.system), of(r.instance)],
        (InstanceState::Running, Observed::Absent) => [("ok", "passed"); 2],
        (InstanceState::Running, Observed::Unread) => [("insufficient-data", "insufficient-data"); 2],
        (InstanceState::Pending, _) => [("initializing", "initializing"); 2],
        _ => [("not-applicable", "not-applicable"); 2],
    }
}

/// The value of one instance attribute (DescribeInstanceAttribute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeValue {
    Text(String),
    Bool(bool),
    /// No value (an empty element).
    Empty,
    Groups(Vec<nimbus_proto::api::GroupRef>),
}

impl Service {
    /// One attribute of an instance, by EC2's name: `instanceType`,
    /// `userData`, `groupSet`, `disableApiTermination`, `disableApiStop`,
    /// `instanceInitiatedShutdownBehavior`, `rootDeviceName`,
    /// `sourceDestCheck`, `ebsOptimized`, `enaSupport`, `kernel`, `ramdisk`,
    /// `blockDeviceMapping`, `productCodes`.
    pub async fn describe_instance_attribute(&self, caller: &Caller, instance_id: &str, attribute: &str) -> Result<AttributeValue> {
        let i = self.describe_instance(caller, instance_id).await?;
        Ok(match attribute {
            "instanceType" => AttributeValue::Text(i.instance_type),
            "userData" => {
                let (data,): (Option<Vec<u8>>,) = sqlx::query_as("SELECT user_data FROM instances WHERE id = $1 AND account_id = $2")
                    .bind(instance_id)
                    .bind(&caller.account_id)
                    .fetch_one(&self.db)
                    .await?;
                match data {
                    Some(d) => AttributeValue::Text(base64::engine::general_purpose::STANDARD.encode(d)),
                    None => AttributeValue::Empty,
                }
            }
            "groupSet" => AttributeValue::Groups(i.security_groups),
            "disableApiTermination" | "disableApiStop" | "ebsOptimized" | "enaSupport" => AttributeValue::Bool(false),
            "sourceDestCheck" => AttributeValue::Bool(true),
            "instanceInitiatedShutdownBehavior" => AttributeValue::Text("stop".into()),
            "rootDeviceName" => AttributeValue::Text("/dev/vda".into()),
            "kernel" | "ramdisk" | "blockDeviceMapping" | "productCodes" => AttributeValue::Empty,
            other => {
                return Err(ServiceError::InvalidParameterValue(format!(
                    "Value ({other}) for parameter attribute is invalid. Unknown attribute."
                )))
            }
        })
    }

    /// Changes a stopped instance's type (its host keeps room for it: the
    /// difference is claimed on the host atomically, or the change is
    /// refused) and/or its primary interface's security groups.
    pub async fn modify_instance(&self, caller: &Caller, instance_id: &str, req: &nimbus_proto::api::ModifyInstanceRequest) -> Result<()> {
        if !ids::is_valid(ids::INSTANCE, instance_id) {
            return Err(ServiceError::InstanceIdMalformed(instance_id.to_string()));
        }
        if req.instance_type.is_none() && req.security_group_ids.is_none() {
            return Err(ServiceError::MissingParameter("an attribute to modify".into()));
        }
        let itype = match &req.instance_type {
            Some(t) => Some(self.instance_type(t).await?),
            None => None,
        };
        let itype = &itype;
        super::retrying(|| async move {
            let mut tx = self.db.begin().await?;
            let (_, limits, usage) = self.limits_and_usage(&mut tx, &caller.account_id).await?;
            let over_limit = || {
                ServiceError::VcpuLimitExceeded(format!(
                    "You have requested more vCPU capacity than your current vCPU limit of {} allows ({} in use)",
                    limits.max_vcpus, usage.vcpus
                ))
            };
            type Row = (String, String, i32, i64, i64, String);
            let row: Option<Row> = sqlx::query_as(&format!(
                "SELECT state, instance_type, vcpus, memory_mib, disk_gib, host_id FROM instances \
                 WHERE id = $1 AND account_id = $2 AND {VISIBLE} FOR UPDATE"
            ))
            .bind(instance_id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
            let (state, old_type, vcpus, memory, disk, host) = row.ok_or_else(|| ServiceError::InstanceNotFound(instance_id.to_string()))?;
            let state = parse_state(&state)?;
            if matches!(state, InstanceState::Terminated | InstanceState::ShuttingDown) {
                return Err(ServiceError::IncorrectInstanceState(format!("The instance '{instance_id}' is not in a state from which it can be modified")));
            }
            // Groups before the host's capacity: lock order (groups, then hosts).
            if let Some(groups) = &req.security_group_ids {
                self.set_instance_groups(&mut tx, caller, instance_id, groups).await?;
            }
            if let Some(t) = itype.as_ref().filter(|t| t.name != old_type) {
                if state != InstanceState::Stopped {
                    return Err(ServiceError::IncorrectInstanceState(format!("The instance '{instance_id}' is not in the 'stopped' state.")));
                }
                let delta = (i64::from(t.vcpus) - i64::from(vcpus), t.memory_mib as i64 - memory, t.disk_gib as i64 - disk);
                if delta.0 > 0 && i64::from(usage.vcpus) + delta.0 > i64::from(limits.max_vcpus) {
                    return Err(over_limit());
                }
                let claimed: Option<(i64,)> = sqlx::query_as(
                    "UPDATE hosts SET used_vcpus = used_vcpus + $2, used_memory_mib = used_memory_mib + $3, \
                            used_disk_gib = used_disk_gib + $4, generation = generation + 1 \
                     WHERE id = $1 AND used_vcpus + $2 <= total_vcpus AND used_memory_mib + $3 <= total_memory_mib \
                           AND used_disk_gib + $4 <= total_disk_gib RETURNING generation",
                )
                .bind(&host)
                .bind(delta.0 as i32)
                .bind(delta.1)
                .bind(delta.2)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((generation,)) = claimed else {
                    return Err(ServiceError::InsufficientInstanceCapacity(format!(
                        "There is not enough capacity on the instance's host for type {}; the instance keeps type {old_type}",
                        t.name
                    )));
                };
                sqlx::query(
                    "UPDATE instances SET instance_type = $2, vcpus = $3, memory_mib = $4, disk_gib = $5, changed_generation = $6 WHERE id = $1",
                )
                .bind(instance_id)
                .bind(&t.name)
                .bind(t.vcpus as i32)
                .bind(t.memory_mib as i64)
                .bind(t.disk_gib as i64)
                .bind(generation)
                .execute(&mut *tx)
                .await?;
                sqlx::query("SELECT pg_notify($1, $2)").bind(crate::notify::CHANNEL).bind(&host).execute(&mut *tx).await?;
                // The account's vCPUs, checked again as the transaction commits.
                super::accounts::claim_usage(&mut tx, &caller.account_id, Some(limits), 0, delta.0).await?;
            }
            match tx.commit().await.map_err(ServiceError::from) {
                Err(e) if super::accounts::is_over_limit(&e) => return Err(over_limit()),
                other => other?,
            }
            Ok::<_, ServiceError>(())
        })
        .await
    }
}

/// See [`Service::console_output`].
#[derive(Debug, Clone)]
pub struct ConsoleOutput {
    pub instance_id: String,
    pub output: Vec<u8>,
    pub timestamp: Option<chrono::DateTime<chrono::Utc>>,
}

/// A user's request to change instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Terminate,
    Stop,
    Start,
    Reboot,
}

impl Op {
    /// The state after the request; `Ok(None)`: no change; `Err`: not allowed.
    fn next(self, s: InstanceState) -> Result<Option<InstanceState>, nimbus_proto::state::NotAllowed> {
        match self {
            Op::Terminate => Ok(s.on_terminate()),
            Op::Stop => s.on_stop(),
            Op::Start => s.on_start(),
            // A reboot changes no state, but must reach the agent.
            Op::Reboot => match s {
                InstanceState::Running | InstanceState::Pending => Ok(Some(s)),
                _ => Err(nimbus_proto::state::NotAllowed(s)),
            },
        }
    }

    /// The state and desired state every changed instance gets (`None`: kept).
    fn target(self) -> (Option<InstanceState>, Option<nimbus_proto::Desired>) {
        use nimbus_proto::Desired;
        match self {
            Op::Terminate => (Some(InstanceState::ShuttingDown), Some(Desired::Terminated)),
            Op::Stop => (Some(InstanceState::Stopping), Some(Desired::Stopped)),
            Op::Start => (Some(InstanceState::Pending), Some(Desired::Running)),
            Op::Reboot => (None, None),
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Op::Terminate => "terminated",
            Op::Stop => "stopped",
            Op::Start => "started",
            Op::Reboot => "rebooted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> RunInstancesRequest {
        RunInstancesRequest::of_type("t3.nano")
    }

    #[test]
    fn counts_are_checked() {
        let mut r = req();
        r.min_count = 0;
        assert!(matches!(validate_run(&r, 100), Err(ServiceError::InvalidParameterValue(_))));
        let mut r = req();
        r.min_count = 3;
        r.max_count = 2;
        assert!(matches!(validate_run(&r, 100), Err(ServiceError::InvalidParameterValue(_))));
        let mut r = req();
        r.max_count = 101;
        assert!(matches!(validate_run(&r, 100), Err(ServiceError::InvalidParameterValue(_))));
        r.max_count = 100;
        assert!(validate_run(&r, 100).is_ok());
    }

    #[test]
    fn user_data_is_base64_and_bounded() {
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![b'x'; n]);
        let mut r = req();
        r.user_data = Some(b64(MAX_USER_DATA_BYTES));
        assert_eq!(validate_run(&r, 100).unwrap().0.unwrap().len(), MAX_USER_DATA_BYTES);
        r.user_data = Some(b64(MAX_USER_DATA_BYTES + 1));
        assert!(matches!(validate_run(&r, 100), Err(ServiceError::InvalidParameterValue(_))));
        r.user_data = Some("not base64!".into());
        assert!(matches!(validate_run(&r, 100), Err(ServiceError::InvalidParameterValue(_))));
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        assert_eq!(decode_token(&encode_token(42)).unwrap(), 42);
        assert!(decode_token("garbage").is_err());
        assert!(decode_token("").is_err());
    }

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
