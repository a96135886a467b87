//! Hosts: registration, credentials, assignments (the agent's desired state)
//! and reports (the agent's observations, which drive instance states and
//! release capacity).

use super::instances::parse_state;
use super::Service;
use crate::error::{Result, ServiceError};
use crate::ids;
use base64::Engine;
use nimbus_proto::agent::{Assignment, Assignments, DesiredState, HostCredential, ImageSpec, InstanceMetadata, RegisterHost, Report};
use nimbus_proto::api::{Host, ImageFile, Resources};
use nimbus_proto::ObservedState;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Longest long poll an agent may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

fn secret_digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn validate_register(req: &RegisterHost) -> Result<()> {
    let name_ok = |s: &str| !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !name_ok(&req.name) {
        return Err(ServiceError::InvalidParameterValue("host name must be 1 to 253 of [A-Za-z0-9._-]".into()));
    }
    if !name_ok(&req.availability_zone) || req.availability_zone.len() > 64 {
        return Err(ServiceError::InvalidParameterValue("availability_zone must be 1 to 64 of [A-Za-z0-9._-]".into()));
    }
    if !["kvm", "qemu", "xen", "test"].contains(&req.hypervisor.as_str()) {
        return Err(ServiceError::InvalidParameterValue("hypervisor must be kvm, qemu, xen or test".into()));
    }
    if req.vcpus > 1_000_000 || req.memory_mib > i64::MAX as u64 / 2 || req.disk_gib > i64::MAX as u64 / 2 {
        return Err(ServiceError::InvalidParameterValue("capacity out of range".into()));
    }
    if req.secret.as_deref().is_some_and(|s| !nimbus_proto::agent::is_host_secret(s)) {
        return Err(ServiceError::InvalidParameterValue(format!(
            "secret must be {} lower-case hex digits",
            nimbus_proto::agent::HOST_SECRET_LEN
        )));
    }
    if let Some(ip) = req.underlay_ip {
        if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
            return Err(ServiceError::InvalidParameterValue(format!("underlay_ip {ip} is not a unicast address")));
        }
    }
    Ok(())
}

fn validate_problems(problems: &[String]) -> Result<()> {
    use nimbus_proto::agent::{MAX_PROBLEMS, MAX_PROBLEM_BYTES};
    if problems.len() > MAX_PROBLEMS || problems.iter().any(|p| p.len() > MAX_PROBLEM_BYTES || p.contains('\0')) {
        return Err(ServiceError::InvalidParameterValue(format!(
            "a report carries at most {MAX_PROBLEMS} problems of at most {MAX_PROBLEM_BYTES} bytes each, without NUL"
        )));
    }
    Ok(())
}

struct HostRow {
    id: String,
    name: String,
    availability_zone: String,
    hypervisor: String,
    total_vcpus: i32,
    total_memory_mib: i64,
    total_disk_gib: i64,
    used_vcpus: i32,
    used_memory_mib: i64,
    used_disk_gib: i64,
    last_heartbeat: Option<chrono::DateTime<chrono::Utc>>,
    alive: bool,
    instance_count: i64,
    problems: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct AssignmentRow {
    id: String,
    desired_state: String,
    vcpus: i32,
    memory_mib: i64,
    disk_gib: i64,
    user_data: Option<Vec<u8>>,
    reservation_id: String,
    instance_type: String,
    image_id: String,
    availability_zone: String,
    ami_launch_index: i32,
    account_id: String,
    boot: String,
    source_url: Option<String>,
    kernel: Option<String>,
    kernel_sha256: Option<String>,
    initrd: Option<String>,
    initrd_sha256: Option<String>,
    root_disk: String,
    root_disk_sha256: Option<String>,
    root_disk_in_store: bool,
    cmdline: String,
    create_images: sqlx::types::Json<Vec<nimbus_proto::agent::ImageTask>>,
    reboots: i64,
    key_name: Option<String>,
    public_key: Option<String>,
    doc_version: i64,
    metadata_tokens_required: bool,
    metadata_endpoint_enabled: bool,
    metadata_tags_enabled: bool,
    metadata_hop_limit: i32,
}

impl AssignmentRow {
    fn into_assignment(self) -> Result<Assignment> {
        let desired: DesiredState =
            self.desired_state.parse().map_err(|e| ServiceError::Internal(format!("bad desired state in database: {e}")))?;
        Ok(Assignment {
            desired,
            vcpus: self.vcpus as u32,
            memory_mib: self.memory_mib as u64,
            disk_gib: self.disk_gib as u64,
            user_data: self.user_data.map(|u| base64::engine::general_purpose::STANDARD.encode(u)),
            image: ImageSpec {
                image_id: self.image_id.clone(),
                boot: super::images::parse_boot(&self.boot)?,
                source_url: self.source_url,
                root_disk_in_store: self.root_disk_in_store,
                kernel: super::images::optional_file(self.kernel, self.kernel_sha256),
                initrd: super::images::optional_file(self.initrd, self.initrd_sha256),
                // Only available images launch, and they have their digest.
                root_disk: ImageFile {
                    name: self.root_disk,
                    sha256: self
                        .root_disk_sha256
                        .ok_or_else(|| ServiceError::Internal(format!("image {} has no root disk digest", self.image_id)))?,
                },
                cmdline: self.cmdline,
            },
            metadata: InstanceMetadata {
                version: self.doc_version as u64,
                instance_id: self.id.clone(),
                reservation_id: self.reservation_id,
                instance_type: self.instance_type,
                image_id: self.image_id,
                availability_zone: self.availability_zone,
                ami_launch_index: self.ami_launch_index as u32,
                owner_id: self.account_id,
                public_keys: match (self.key_name, self.public_key) {
                    (Some(name), Some(key)) => vec![(name, key)],
                    _ => Vec::new(),
                },
                options: nimbus_proto::agent::MetadataOptions {
                    tokens_required: self.metadata_tokens_required,
                    endpoint_enabled: self.metadata_endpoint_enabled,
                    tags_enabled: self.metadata_tags_enabled,
                    hop_limit: self.metadata_hop_limit.clamp(1, 255) as u8,
                },
                // In the state store's document (the metadata service's source).
                tags: Vec::new(),
            },
            reboots: self.reboots,
            nics: Vec::new(),
            create_images: self.create_images.0,
            instance_id: self.id,
        })
    }
}

impl Service {
    /// Registers a new host, or re-registers an existing one by name when
    /// the caller proves the host's current credential or the operator reset
    /// it (keeping its id, rotating its secret). The join token alone never
    /// takes over a registered name. Capacity may not shrink below what its
    /// instances hold.
    pub async fn register_host(&self, req: RegisterHost) -> Result<HostCredential> {
        validate_register(&req)?;
        let secret = req.secret.clone().unwrap_or_else(ids::new_secret);
        let conflict = |e: sqlx::Error| match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23514") => {
                ServiceError::Conflict(format!("host {} cannot shrink below the capacity its instances hold", req.name))
            }
            _ if crate::db::Constraint::HostName.violated_by(&e) => ServiceError::HostAlreadyRegistered(req.name.clone()),
            _ => e.into(),
        };
        let underlay = req.underlay_ip.map(|ip| ip.to_string());
        let mut tx = self.db.begin().await?;
        let existing = sqlx::query!("SELECT id, credential_sha256 FROM hosts WHERE name = $1 FOR UPDATE", req.name)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| (r.id, r.credential_sha256));
        let host_id = match existing {
            None => ids::new_id(ids::HOST),
            Some((id, stored)) => {
                let holds = |digest: &Vec<u8>, secret: &str| bool::from(digest.ct_eq(&secret_digest(secret)));
                let proven = match (&stored, req.current_credential.as_deref().and_then(|c| c.split_once('.'))) {
                    // Reset by the operator: the name is free for its machine to take back.
                    (None, _) => true,
                    (Some(digest), Some((cred_id, cred_secret))) => cred_id == id && holds(digest, cred_secret),
                    // The same registration again (its answer was lost): the
                    // caller made the secret this host holds.
                    (Some(digest), None) => req.secret.as_deref().is_some_and(|s| holds(digest, s)),
                };
                if !proven {
                    tracing::warn!(host_id = %id, name = %req.name, "refused to re-register a host without its credential");
                    return Err(ServiceError::HostAlreadyRegistered(req.name.clone()));
                }
                // A new underlay address changes the peers of every host sharing a VPC with this one.
                // ($2 goes in as text, no INET type in the build; cast to inet as before.)
                let moved = sqlx::query_scalar!(
                    r#"SELECT underlay_ip IS DISTINCT FROM $2::text::inet AS "moved!" FROM hosts WHERE id = $1"#,
                    id,
                    underlay
                )
                .fetch_one(&mut *tx)
                .await?;
                if moved {
                    let vpcs = sqlx::query_scalar!(
                        "SELECT DISTINCT n.vpc_id FROM network_interfaces n JOIN instances i ON i.id = n.instance_id WHERE i.host_id = $1",
                        id
                    )
                    .fetch_all(&mut *tx)
                    .await?;
                    let vpcs = vpcs.into_iter().collect();
                    super::network::relay::note(&mut tx, &super::network::relay::Change { vpcs, ..Default::default() }).await?;
                    super::network::fanout::bump_hosts(&mut tx, &std::collections::BTreeSet::from([id.clone()])).await?;
                }
                id
            }
        };
        // A new host, or the proven re-registration of one (a new secret,
        // its capacity as it says now, its assignments sent in full again).
        // ($9 goes in as text, no INET type in the build; cast to inet as before.)
        sqlx::query!(
            "INSERT INTO hosts (id, name, availability_zone, hypervisor, credential_sha256, total_vcpus, \
                 total_memory_mib, total_disk_gib, last_heartbeat, underlay_ip) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(), $9::text::inet) \
             ON CONFLICT (id) DO UPDATE SET availability_zone = EXCLUDED.availability_zone, \
                 hypervisor = EXCLUDED.hypervisor, credential_sha256 = EXCLUDED.credential_sha256, \
                 total_vcpus = EXCLUDED.total_vcpus, total_memory_mib = EXCLUDED.total_memory_mib, \
                 total_disk_gib = EXCLUDED.total_disk_gib, last_heartbeat = now(), \
                 generation = hosts.generation + 1, underlay_ip = EXCLUDED.underlay_ip",
            host_id,
            req.name,
            req.availability_zone,
            req.hypervisor,
            secret_digest(&secret),
            req.vcpus as i32,
            req.memory_mib as i64,
            req.disk_gib as i64,
            underlay
        )
        .execute(&mut *tx)
        .await
        .map_err(conflict)?;
        tx.commit().await.map_err(conflict)?;
        tracing::info!(%host_id, name = %req.name, zone = %req.availability_zone, hypervisor = %req.hypervisor,
            vcpus = req.vcpus, memory_mib = req.memory_mib, disk_gib = req.disk_gib, "host registered");
        Ok(HostCredential { host_id, secret })
    }

    /// The operator's reset of a host's credential (the host id or its
    /// name): the current credential stops working at once, and the next
    /// registration of the name with the join token takes the host (its id,
    /// its instances) over. For a reinstalled machine, or a lost credential.
    /// Its certificate goes too (the new machine has its key certified).
    /// Its certificates are revoked: every store node refuses them within
    /// a bound ([`super::revocation`]).
    pub async fn reset_host_credential(&self, host: &str) -> Result<String> {
        let mut tx = self.db.begin().await?;
        let row = sqlx::query_scalar!("SELECT id FROM hosts WHERE id = $1 OR name = $1 FOR UPDATE", host).fetch_optional(&mut *tx).await?;
        let id = row.ok_or_else(|| ServiceError::HostNotFound(host.to_string()))?;
        super::revocation::revoke_host(&mut tx, &id).await?;
        sqlx::query!(
            "UPDATE hosts SET credential_sha256 = NULL, tls_cert_sha256 = NULL, tls_cert_not_after = NULL, \
                 tls_prev_cert_sha256 = NULL, tls_prev_cert_not_after = NULL WHERE id = $1",
            id
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::warn!(host_id = %id, "host credential reset by the operator; its certificates are revoked");
        Ok(id)
    }

    /// The host a `<host_id>.<secret>` bearer credential belongs to.
    pub async fn authenticate_host(&self, bearer: &str) -> Result<String> {
        let denied = || ServiceError::AuthFailure("invalid host credential".into());
        let (host_id, secret) = bearer.split_once('.').ok_or_else(denied)?;
        if !ids::is_valid(ids::HOST, host_id) {
            return Err(denied());
        }
        let stored = sqlx::query_scalar!("SELECT credential_sha256 FROM hosts WHERE id = $1", host_id).fetch_optional(&self.db).await?;
        match stored {
            Some(Some(digest)) if bool::from(digest.ct_eq(&secret_digest(secret))) => Ok(host_id.to_string()),
            _ => Err(denied()),
        }
    }

    /// Waits up to `wait` for the host's generation to pass `after`. Then
    /// answers the changes since `after` (instances whose desired state
    /// changed, including those terminated since); after a timeout, or when
    /// `after` is 0, the full list of instances that hold capacity.
    pub async fn assignments(&self, host_id: &str, after: i64, wait: Duration) -> Result<Assignments> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        // Only the newest poll of a host waits (see HostEvents::begin_poll).
        let mut ticket = self.events.begin_poll(host_id);
        // Subscribe before reading, so a change between the read and the wait wakes us.
        let mut changes = self.events.subscribe(host_id);
        let generation = loop {
            let generation = sqlx::query_scalar!("SELECT generation FROM hosts WHERE id = $1", host_id).fetch_one(&self.db).await?;
            if generation > after {
                break generation;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break generation },
                _ = ticket.superseded() => break generation,
                _ = tokio::time::sleep_until(deadline) => break generation,
            }
        };
        // One snapshot for the answer: the generation, the instances and the
        // network agree (a change committed after it bumps the generation
        // again, and the agent's next poll returns at once).
        let full = after <= 0 || generation <= after;
        let mut tx = self.db.begin().await?;
        sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        let host = sqlx::query!(r#"SELECT generation, underlay_ip IS NOT NULL AS "data_plane!" FROM hosts WHERE id = $1"#, host_id)
            .fetch_one(&mut *tx)
            .await?;
        let (generation, data_plane) = (host.generation, host.data_plane);
        // Runtime: the instance filter is spliced in (all held, or changed since `after`).
        let rows = sqlx::query_as::<_, AssignmentRow>(&format!(
            "SELECT i.id, i.desired_state, i.vcpus, i.memory_mib, i.disk_gib, i.user_data, i.reservation_id, \
                    i.instance_type, i.image_id, i.availability_zone, i.ami_launch_index, i.account_id, \
                    m.boot, m.source_url, m.kernel, m.kernel_sha256, m.initrd, m.initrd_sha256, m.root_disk, \
                    m.root_disk_sha256, m.root_disk_in_store, m.cmdline, i.reboots, i.key_name, i.public_key, \
                    i.doc_version, i.metadata_tokens_required, i.metadata_endpoint_enabled, i.metadata_tags_enabled, i.metadata_hop_limit, \
                    (SELECT coalesce(jsonb_agg(jsonb_build_object('image_id', p.id, 'no_reboot', p.no_reboot) \
                         ORDER BY p.created_at, p.id), '[]'::jsonb) \
                     FROM images p WHERE p.source_instance_id = i.id AND p.state = 'pending') AS create_images \
             FROM instances i JOIN images m ON m.id = i.image_id \
             WHERE i.host_id = $1 AND {} ORDER BY i.seq",
            if full { "i.capacity_held" } else { "i.changed_generation > $2" }
        ))
        .bind(host_id)
        .bind(after)
        .fetch_all(&mut *tx)
        .await?;
        let (network, mut nics) = super::network::host_network(&mut tx, host_id, data_plane).await?;
        tx.commit().await?;
        let instances = rows
            .into_iter()
            .map(|r| {
                let mut a = r.into_assignment()?;
                a.nics = nics.remove(&a.instance_id).unwrap_or_default();
                Ok(a)
            })
            .collect::<Result<_>>()?;
        Ok(Assignments { generation, full, instances, network })
    }

    /// Applies an agent's observations and records its heartbeat.
    pub async fn report(&self, host_id: &str, report: &Report) -> Result<()> {
        validate_problems(&report.problems)?;
        self.record_guest_output(host_id, report).await?;
        self.record_image_problems(host_id, &report.images).await?;
        super::retrying(|| self.try_report(host_id, report)).await
    }

    /// Console tails and completed reboots: plain facts about the guest,
    /// stored outside the state-transition transaction (one statement each).
    async fn record_guest_output(&self, host_id: &str, report: &Report) -> Result<()> {
        let (mut ids, mut consoles) = (vec![], vec![]);
        let (mut rids, mut reboots) = (vec![], vec![]);
        let (mut sids, mut endpoints) = (vec![], vec![]);
        for o in &report.observations {
            if let Some(c) = &o.console {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(c)
                    .map_err(|_| ServiceError::InvalidParameterValue("console must be base64".into()))?;
                let tail = raw.len().saturating_sub(nimbus_proto::agent::CONSOLE_TAIL_BYTES);
                ids.push(o.instance_id.as_str());
                consoles.push(raw[tail..].to_vec());
            }
            if let Some(n) = o.reboots {
                rids.push(o.instance_id.as_str());
                reboots.push(n);
            }
            if let Some(e) = &o.ssh_endpoint {
                if e.parse::<std::net::SocketAddr>().is_err() {
                    return Err(ServiceError::InvalidParameterValue("ssh_endpoint must be an address:port".into()));
                }
                sids.push(o.instance_id.as_str());
                endpoints.push(e.as_str());
            }
        }
        if !sids.is_empty() {
            sqlx::query!(
                "UPDATE instances SET ssh_endpoint = e.ep FROM unnest($2::text[], $3::text[]) AS e(id, ep) \
                 WHERE instances.id = e.id AND instances.host_id = $1 AND instances.ssh_endpoint IS DISTINCT FROM e.ep",
                host_id,
                &sids as &[&str],
                &endpoints as &[&str]
            )
            .execute(&self.db)
            .await?;
        }
        if !ids.is_empty() {
            sqlx::query!(
                "UPDATE instances SET console_output = c.out, console_updated_at = now() \
                 FROM unnest($2::text[], $3::bytea[]) AS c(id, out) WHERE instances.id = c.id AND instances.host_id = $1",
                host_id,
                &ids as &[&str],
                &consoles
            )
            .execute(&self.db)
            .await?;
        }
        if !rids.is_empty() {
            sqlx::query!(
                "UPDATE instances SET reboots_done = GREATEST(reboots_done, r.n) \
                 FROM unnest($2::text[], $3::bigint[]) AS r(id, n) WHERE instances.id = r.id AND instances.host_id = $1",
                host_id,
                &rids as &[&str],
                &reboots
            )
            .execute(&self.db)
            .await?;
        }
        Ok(())
    }

    async fn try_report(&self, host_id: &str, report: &Report) -> Result<()> {
        let mut tx = self.db.begin().await?;
        let ids: Vec<&str> = report.observations.iter().map(|o| o.instance_id.as_str()).collect();
        let failures: Vec<&str> =
            report.observations.iter().filter(|o| o.state == ObservedState::Failed).map(|o| o.instance_id.as_str()).collect();
        // Lock order everywhere: instances (by id), then hosts. A running
        // instance that should run needs no change unless it failed, so the
        // common heartbeat locks no instance row.
        let rows = sqlx::query!(
            "SELECT id, state, desired_state, vcpus, memory_mib, disk_gib, account_id FROM instances \
             WHERE host_id = $1 AND id = ANY($2) AND capacity_held \
               AND (state <> 'running' OR desired_state <> 'running' OR id = ANY($3)) \
             ORDER BY id FOR UPDATE",
            host_id,
            &ids as &[&str],
            &failures as &[&str]
        )
        .fetch_all(&mut *tx)
        .await?;
        let (mut released, mut running, mut terminated, mut failed) = ((0i64, 0i64, 0i64), vec![], vec![], vec![]);
        let (mut failed_reasons, mut bump, mut stopped) = (vec![], false, vec![]);
        let mut released_by_account: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for r in rows {
            let (id, state, desired, vcpus, memory, disk, account) =
                (r.id, r.state, r.desired_state, r.vcpus, r.memory_mib, r.disk_gib, r.account_id);
            let Some(obs) = report.observations.iter().find(|o| o.instance_id == id) else { continue };
            let state = parse_state(&state)?;
            let desired: nimbus_proto::Desired =
                desired.parse().map_err(|e| ServiceError::Internal(format!("bad desired state in database: {e}")))?;
            if obs.state == ObservedState::Failed && desired != nimbus_proto::Desired::Terminated {
                // The guest cannot be built here: terminate it (the agent cleans up
                // and confirms, which releases the capacity) and say why.
                let reason = obs.message.clone().unwrap_or_else(|| "the host could not start the instance".into());
                tracing::warn!(instance_id = %id, %host_id, %reason, "instance failed on its host");
                failed.push(id);
                failed_reasons.push(format!("Server.InternalError: {reason}"));
                bump = true;
                continue;
            }
            match state.on_observed(obs.state, desired) {
                Some(nimbus_proto::InstanceState::Running) => running.push(id),
                Some(nimbus_proto::InstanceState::Stopped) => stopped.push(id),
                Some(nimbus_proto::InstanceState::Terminated) => {
                    released.0 += i64::from(vcpus);
                    released.1 += memory;
                    released.2 += disk;
                    let by_account = released_by_account.entry(account).or_default();
                    by_account.0 += 1;
                    by_account.1 += i64::from(vcpus);
                    terminated.push(id);
                }
                _ => {}
            }
        }
        if !running.is_empty() {
            sqlx::query!("UPDATE instances SET state = 'running', state_changed_at = now() WHERE id = ANY($1)", &running)
                .execute(&mut *tx)
                .await?;
        }
        if !stopped.is_empty() {
            sqlx::query!("UPDATE instances SET state = 'stopped', state_changed_at = now() WHERE id = ANY($1)", &stopped)
                .execute(&mut *tx)
                .await?;
        }
        if !terminated.is_empty() {
            sqlx::query!(
                "UPDATE instances SET state = 'terminated', capacity_held = false, state_changed_at = now() WHERE id = ANY($1)",
                &terminated
            )
            .execute(&mut *tx)
            .await?;
            // Their interfaces and addresses go back (in this transaction):
            // the hosts that saw them are bumped, in id order, before the
            // heartbeat below touches this host's row again.
            let hosts = super::network::release_interfaces(&mut tx, &terminated, host_id).await?;
            super::network::fanout::bump_hosts(&mut tx, &hosts).await?;
            // An image still being made of a terminated instance never will be.
            sqlx::query!(
                "UPDATE images SET state = 'failed', state_changed_at = now(), \
                     state_reason = 'the instance was terminated before the image was made' \
                 WHERE source_instance_id = ANY($1) AND state = 'pending'",
                &terminated
            )
            .execute(&mut *tx)
            .await?;
        }
        let generation = sqlx::query_scalar!(
            "UPDATE hosts SET last_heartbeat = now(), used_vcpus = used_vcpus - $2, used_memory_mib = used_memory_mib - $3, \
                 used_disk_gib = used_disk_gib - $4, generation = generation + $5, problems = $6 WHERE id = $1 RETURNING generation",
            host_id,
            released.0 as i32,
            released.1,
            released.2,
            i64::from(bump),
            &report.problems
        )
        .fetch_one(&mut *tx)
        .await?;
        if !failed.is_empty() {
            sqlx::query!(
                "UPDATE instances SET state = 'shutting-down', desired_state = 'terminated', state_changed_at = now(), \
                     state_reason = r.reason, changed_generation = $3 \
                 FROM unnest($1::text[], $2::text[]) AS r(id, reason) WHERE instances.id = r.id",
                &failed,
                &failed_reasons,
                generation
            )
            .execute(&mut *tx)
            .await?;
        }
        if bump {
            sqlx::query!("SELECT pg_notify($1, $2)", crate::notify::CHANNEL, host_id).execute(&mut *tx).await?;
        }
        // The accounts' usage, lowered as the transaction commits.
        super::accounts::release_usage(&mut tx, &released_by_account).await?;
        tx.commit().await?;
        if !running.is_empty() || !terminated.is_empty() {
            tracing::info!(%host_id, running = running.len(), terminated = terminated.len(), "instance states observed");
        }
        if !terminated.is_empty() {
            self.drop_stored_disks_of(&terminated).await;
        }
        Ok(())
    }

    pub async fn describe_hosts(&self) -> Result<Vec<Host>> {
        let rows = sqlx::query_as!(
            HostRow,
            r#"SELECT h.id, h.name, h.availability_zone, h.hypervisor, h.total_vcpus, h.total_memory_mib, h.total_disk_gib,
                    h.used_vcpus, h.used_memory_mib, h.used_disk_gib, h.last_heartbeat, h.problems,
                    coalesce(h.last_heartbeat > now() - make_interval(secs => $1), false) AS "alive!",
                    (SELECT count(*) FROM instances i WHERE i.host_id = h.id AND i.capacity_held) AS "instance_count!"
             FROM hosts h ORDER BY h.availability_zone, h.name"#,
            self.config.host_timeout().as_secs_f64()
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Host {
                host_id: r.id,
                name: r.name,
                availability_zone: r.availability_zone,
                hypervisor: r.hypervisor,
                status: if r.alive { "available" } else { "unreachable" }.to_string(),
                total: Resources { vcpus: r.total_vcpus as u32, memory_mib: r.total_memory_mib as u64, disk_gib: r.total_disk_gib as u64 },
                used: Resources { vcpus: r.used_vcpus as u32, memory_mib: r.used_memory_mib as u64, disk_gib: r.used_disk_gib as u64 },
                instance_count: r.instance_count as u32,
                last_heartbeat: r.last_heartbeat,
                health: if r.problems.is_empty() { "ok" } else { "degraded" }.to_string(),
                problems: r.problems,
            })
            .collect())
    }
}
