//! VPC networking: VPCs, subnets, security groups and their rules, network
//! interfaces and their private addresses, public addresses (Elastic IPs and
//! addresses assigned at launch from the operator's pool), and each host's
//! share of it all ([`HostNetwork`], computed for every assignments answer).
//!
//! Every account has a default VPC (172.31.0.0/16) with a default subnet
//! (a /20) per availability zone of the registered hosts and a default
//! security group, created lazily by [`Service::ensure_default_network`].
//!
//! Every change that alters some host's [`HostNetwork`] or an instance's
//! interfaces reaches the hosts it affects: the hosts the changing
//! transaction knows directly are bumped in it ([`bump_hosts`]: a launch's
//! placement hosts, an interface's own host), and what other hosts must
//! learn is recorded for the network relay, which bumps them after the
//! commit ([`super::network_changes`], where the reason is):
//! - a rule authorized or revoked: the hosts with an interface in the group;
//! - an interface added or removed (launch, termination confirmed, groups
//!   changed): the hosts with an interface in its VPC (their `peers` and
//!   remote interfaces), in its groups or in a group whose rules name them
//!   (their `members`);
//! - a subnet added or deleted, a host's underlay address changed: the
//!   hosts with an interface in the VPC;
//! - a public address associated or disassociated: the interface's host.
//!
//! Lock order: account → instances → VPCs → security groups → interfaces →
//! public addresses → hosts; launches lock no VPC or group.

use super::network_changes::Change;
use super::{Caller, Service};
use crate::error::{Result, ServiceError};
use crate::ids;
use nimbus_proto::api::{
    Address, GroupRef, InterfaceAssociation, InterfaceAttachment, IpPermission, NetworkInterface, ResourceTag, RunInstancesRequest,
    SecurityGroup, SecurityGroupRule, Subnet, Vpc,
};
use nimbus_proto::network::{self as wire, Cidr, HostNetwork, Nic, Peer, Protocol, Rule, SubnetOnHost, VpcOnHost};
use sqlx::PgConnection;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

pub const DEFAULT_VPC_CIDR: &str = "172.31.0.0/16";
/// VPCs an account may have, the default one included (EC2's default quota).
pub const MAX_VPCS: i64 = 5;
pub const MAX_SUBNETS_PER_VPC: i64 = 200;
pub const MAX_GROUPS_PER_VPC: i64 = 500;
/// Rules per group and direction (EC2's default quota).
pub const MAX_RULES_PER_DIRECTION: i64 = 60;
pub const MAX_GROUPS_PER_INTERFACE: usize = 5;
/// Device indexes 0 to 7.
pub const MAX_INTERFACES: usize = 8;
const DEFAULT_GROUP_DESCRIPTION: &str = "default VPC security group";

// ---------------------------------------------------------------- filters

/// Describe filters (EC2's `Filter.N.Name` / `Filter.N.Value.M`): every
/// filter must match one of its values; values may hold `*` and `?`.
pub type Filters = Vec<(String, Vec<String>)>;

fn glob(pattern: &str, value: &str) -> bool {
    let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
    let (mut pi, mut vi, mut star, mut mark) = (0, 0, None, 0);
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Refuses a filter this resource does not know (tags are always known).
fn check_filter_names(filters: &Filters, known: &[&str]) -> Result<()> {
    for (name, _) in filters {
        if !(known.contains(&name.as_str()) || name == "tag-key" || name.starts_with("tag:")) {
            return Err(ServiceError::InvalidParameterValue(format!("The filter '{name}' is invalid")));
        }
    }
    Ok(())
}

/// Whether a resource with these facts and tags passes every filter.
fn passes(filters: &Filters, facts: &[(&str, String)], tags: &[ResourceTag]) -> bool {
    filters.iter().all(|(name, values)| {
        let candidates: Vec<&str> = if name == "tag-key" {
            tags.iter().map(|t| t.key.as_str()).collect()
        } else if let Some(key) = name.strip_prefix("tag:") {
            tags.iter().filter(|t| t.key == key).map(|t| t.value.as_str()).collect()
        } else {
            facts.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
        };
        candidates.iter().any(|c| values.iter().any(|v| glob(v, c)))
    })
}

fn yes_no(b: bool) -> String {
    b.to_string()
}

// ---------------------------------------------------------------- helpers

fn parse_cidr(s: &str, what: &str) -> Result<Cidr> {
    Cidr::parse(s).ok_or_else(|| {
        ServiceError::InvalidParameterValue(format!("Value ({s}) for parameter {what} is invalid. This is not a valid CIDR block."))
    })
}

pub(crate) fn db_cidr(s: &str) -> Result<Cidr> {
    Cidr::parse(s).ok_or_else(|| ServiceError::Internal(format!("bad CIDR in database: {s}")))
}

pub(crate) fn db_ip(s: &str) -> Result<Ipv4Addr> {
    s.parse().map_err(|_| ServiceError::Internal(format!("bad address in database: {s}")))
}

/// The first four addresses and the last of a subnet are reserved, as in EC2.
pub fn usable_addresses(c: &Cidr) -> u64 {
    c.size().saturating_sub(5)
}

fn is_reserved(c: &Cidr, ip: Ipv4Addr) -> bool {
    let off = u64::from(u32::from(ip).wrapping_sub(u32::from(c.network())));
    off < 4 || off + 1 == c.size()
}

pub fn private_dns_name(ip: &str, region: &str) -> String {
    format!("ip-{}.{region}.compute.internal", ip.replace('.', "-"))
}

fn check_id(prefix: &str, id: &str, malformed: impl Fn(String) -> ServiceError) -> Result<()> {
    if ids::is_valid(prefix, id) {
        Ok(())
    } else {
        Err(malformed(id.to_string()))
    }
}

fn distinct(v: &[String]) -> Vec<String> {
    v.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect()
}

fn opt_list(v: &[String]) -> Option<Vec<String>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// Bumps the generation of `hosts` (in id order, the order every
/// transaction locks hosts in) and notifies their agents on commit.
pub(crate) async fn bump_hosts(conn: &mut PgConnection, hosts: &BTreeSet<String>) -> Result<BTreeMap<String, i64>> {
    if hosts.is_empty() {
        return Ok(BTreeMap::new());
    }
    let ids: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "WITH h AS (SELECT id FROM hosts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE) \
         UPDATE hosts SET generation = generation + 1 FROM h WHERE hosts.id = h.id RETURNING hosts.id, hosts.generation",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_notify($1, h) FROM unnest($2::text[]) AS h").bind(crate::notify::CHANNEL).bind(&ids).execute(&mut *conn).await?;
    Ok(rows.into_iter().collect())
}

async fn lock_rows(conn: &mut PgConnection, table: &str, ids: &BTreeSet<String>) -> Result<Vec<String>> {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let rows: Vec<(String,)> = sqlx::query_as(&format!("SELECT id FROM {table} WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE"))
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Locks VPC rows (id order): their set of hosts or subnets is changing.
pub(crate) async fn lock_vpcs(conn: &mut PgConnection, ids: &BTreeSet<String>) -> Result<Vec<String>> {
    lock_rows(conn, "vpcs", ids).await
}

/// Locks security-group rows (id order): their members or rules are changing.
pub(crate) async fn lock_groups(conn: &mut PgConnection, ids: &BTreeSet<String>) -> Result<Vec<String>> {
    lock_rows(conn, "security_groups", ids).await
}

async fn host_set(conn: &mut PgConnection, sql: &str, ids: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    if ids.is_empty() {
        return Ok(BTreeSet::new());
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let rows: Vec<(String,)> = sqlx::query_as(sql).bind(&ids).fetch_all(&mut *conn).await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Hosts with an interface in one of the VPCs.
pub(crate) async fn hosts_in_vpcs(conn: &mut PgConnection, vpcs: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    host_set(
        conn,
        "SELECT DISTINCT i.host_id FROM network_interfaces n JOIN instances i ON i.id = n.instance_id WHERE n.vpc_id = ANY($1)",
        vpcs,
    )
    .await
}

/// Hosts with an interface in one of the groups (their rules changed).
pub(crate) async fn hosts_in_groups(conn: &mut PgConnection, groups: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    host_set(
        conn,
        "SELECT DISTINCT i.host_id FROM network_interface_groups ng JOIN network_interfaces n ON n.id = ng.interface_id \
         JOIN instances i ON i.id = n.instance_id WHERE ng.group_id = ANY($1)",
        groups,
    )
    .await
}

/// Hosts that hold the member addresses of one of the groups: those with an
/// interface in it, or in a group with a rule naming it.
pub(crate) async fn hosts_seeing_groups(conn: &mut PgConnection, groups: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    host_set(
        conn,
        "SELECT DISTINCT i.host_id FROM network_interface_groups ng JOIN network_interfaces n ON n.id = ng.interface_id \
         JOIN instances i ON i.id = n.instance_id \
         WHERE ng.group_id = ANY($1) OR ng.group_id IN (SELECT group_id FROM security_group_rules WHERE peer_group_id = ANY($1))",
        groups,
    )
    .await
}

// ---------------------------------------------------------------- rules

/// A rule in its stored form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct RuleKey {
    pub protocol: &'static str,
    pub from: i32,
    pub to: i32,
    pub cidr: Option<String>,
    pub peer: Option<String>,
}

impl RuleKey {
    fn describe(&self) -> String {
        let peer = self.cidr.clone().or_else(|| self.peer.clone()).unwrap_or_default();
        format!("peer: {peer}, {}, from port: {}, to port: {}, ALLOW", self.protocol.to_uppercase(), self.from, self.to)
    }

    /// The agent's form of the rule.
    fn to_wire(&self) -> Result<Rule> {
        let protocol = match self.protocol {
            "-1" => Protocol::All,
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "icmp" => Protocol::Icmp,
            other => return Err(ServiceError::Internal(format!("bad protocol in database: {other}"))),
        };
        let ports = match protocol {
            Protocol::All => None,
            Protocol::Tcp | Protocol::Udp => Some((self.from as u16, self.to as u16)),
            Protocol::Icmp if self.from < 0 => None,
            Protocol::Icmp => Some((self.from as u16, if self.to < 0 { wire::ANY_ICMP_CODE } else { self.to as u16 })),
        };
        let peer = match (&self.cidr, &self.peer) {
            (Some(c), _) => Peer::Cidr(db_cidr(c)?),
            (None, Some(g)) => Peer::Group(g.clone()),
            (None, None) => return Err(ServiceError::Internal("a rule without a peer in the database".into())),
        };
        Ok(Rule { protocol, ports, peer })
    }
}

fn protocol_of(p: &str) -> Result<&'static str> {
    match p.to_ascii_lowercase().as_str() {
        "tcp" | "6" => Ok("tcp"),
        "udp" | "17" => Ok("udp"),
        "icmp" | "1" => Ok("icmp"),
        "-1" | "all" => Ok("-1"),
        _ => Err(ServiceError::InvalidParameterValue(format!(
            "Invalid value '{p}' for IP protocol: Nimbus supports tcp, udp, icmp and -1 (all)"
        ))),
    }
}

/// The (protocol, from, to) of a permission, checked as EC2 checks them.
fn ports_of(protocol: &'static str, from: Option<i32>, to: Option<i32>) -> Result<(i32, i32)> {
    match protocol {
        "-1" => Ok((-1, -1)),
        "tcp" | "udp" => {
            let (Some(from), Some(to)) = (from, to) else {
                return Err(ServiceError::InvalidParameterValue(
                    "Invalid value for portRange. Must specify both from and to ports with TCP/UDP.".into(),
                ));
            };
            if from == -1 && to == -1 {
                return Ok((0, 65535));
            }
            if !(0..=65535).contains(&from) || !(0..=65535).contains(&to) || from > to {
                return Err(ServiceError::InvalidParameterValue(format!(
                    "Invalid port range {from}-{to}: ports are 0 to 65535, from <= to"
                )));
            }
            Ok((from, to))
        }
        _ => {
            let (t, c) = (from.unwrap_or(-1), to.unwrap_or(-1));
            if !(-1..=255).contains(&t) || !(-1..=255).contains(&c) {
                return Err(ServiceError::InvalidParameterValue(format!("Invalid ICMP type {t} or code {c}: -1 or 0 to 255")));
            }
            Ok(if t == -1 { (-1, -1) } else { (t, c) })
        }
    }
}

fn rule_view(id: String, group_id: &str, egress: bool, k: &RuleKey, description: Option<String>) -> SecurityGroupRule {
    SecurityGroupRule {
        rule_id: id,
        group_id: group_id.to_string(),
        egress,
        protocol: k.protocol.to_string(),
        from_port: k.from,
        to_port: k.to,
        cidr: k.cidr.clone(),
        referenced_group_id: k.peer.clone(),
        description,
    }
}

#[derive(sqlx::FromRow)]
struct RuleRow {
    id: String,
    group_id: String,
    egress: bool,
    protocol: String,
    from_port: i32,
    to_port: i32,
    cidr: Option<String>,
    peer_group_id: Option<String>,
    description: Option<String>,
}

impl RuleRow {
    fn key(&self) -> Result<RuleKey> {
        Ok(RuleKey {
            protocol: protocol_of(&self.protocol)?,
            from: self.from_port,
            to: self.to_port,
            cidr: self.cidr.clone(),
            peer: self.peer_group_id.clone(),
        })
    }
}

const RULE_COLUMNS: &str = "id, group_id, egress, protocol, from_port, to_port, cidr::text AS cidr, peer_group_id, description";

/// A security group named by id, or by name (in the default VPC, as EC2's `GroupName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupSel {
    Id(String),
    Name(String),
}

// ---------------------------------------------------------------- rows

#[derive(sqlx::FromRow, Clone, Debug)]
struct SubnetRow {
    id: String,
    vpc_id: String,
    availability_zone: String,
    cidr: String,
    default_for_az: bool,
    map_public_ip_on_launch: bool,
}

const SUBNET_COLUMNS: &str = "id, vpc_id, availability_zone, cidr::text AS cidr, default_for_az, map_public_ip_on_launch";

/// A subnet as a launch needs it.
#[derive(Debug, Clone)]
pub(crate) struct SubnetInfo {
    pub id: String,
    pub vpc_id: String,
    pub zone: String,
    pub cidr: Cidr,
    pub map_public: bool,
}

impl SubnetRow {
    fn info(&self) -> Result<SubnetInfo> {
        Ok(SubnetInfo {
            id: self.id.clone(),
            vpc_id: self.vpc_id.clone(),
            zone: self.availability_zone.clone(),
            cidr: db_cidr(&self.cidr)?,
            map_public: self.map_public_ip_on_launch,
        })
    }
}

#[derive(sqlx::FromRow)]
struct InterfaceRow {
    id: String,
    subnet_id: String,
    vpc_id: String,
    availability_zone: String,
    private_ip: String,
    mac: String,
    instance_id: Option<String>,
    device_index: Option<i32>,
    attachment_id: Option<String>,
    delete_on_termination: bool,
    attached_at: Option<chrono::DateTime<chrono::Utc>>,
    public_ip: Option<String>,
    allocation_id: Option<String>,
    association_id: Option<String>,
    group_ids: Vec<String>,
    group_names: Vec<String>,
}

const INTERFACE_SELECT: &str = "SELECT n.id, n.subnet_id, n.vpc_id, s.availability_zone, host(n.private_ip) AS private_ip, n.mac, \
        n.instance_id, n.device_index, n.attachment_id, n.delete_on_termination, n.attached_at, \
        host(p.public_ip) AS public_ip, p.allocation_id, p.association_id, \
        ARRAY(SELECT g.id FROM network_interface_groups ng JOIN security_groups g ON g.id = ng.group_id \
              WHERE ng.interface_id = n.id ORDER BY g.id) AS group_ids, \
        ARRAY(SELECT g.name FROM network_interface_groups ng JOIN security_groups g ON g.id = ng.group_id \
              WHERE ng.interface_id = n.id ORDER BY g.id) AS group_names \
     FROM network_interfaces n JOIN subnets s ON s.id = n.subnet_id \
     LEFT JOIN public_addresses p ON p.network_interface_id = n.id";

impl InterfaceRow {
    fn view(self, owner: &str, region: &str) -> NetworkInterface {
        let attachment = match (self.instance_id, self.device_index, self.attachment_id) {
            (Some(instance_id), Some(idx), Some(attachment_id)) => Some(InterfaceAttachment {
                attachment_id,
                instance_id,
                device_index: idx as u32,
                status: "attached".into(),
                attach_time: self.attached_at,
                delete_on_termination: self.delete_on_termination,
            }),
            _ => None,
        };
        NetworkInterface {
            status: if attachment.is_some() { "in-use" } else { "available" }.to_string(),
            private_dns_name: private_dns_name(&self.private_ip, region),
            network_interface_id: self.id,
            subnet_id: self.subnet_id,
            vpc_id: self.vpc_id,
            availability_zone: self.availability_zone,
            private_ip_address: self.private_ip,
            mac_address: self.mac,
            groups: self
                .group_ids
                .into_iter()
                .zip(self.group_names)
                .map(|(group_id, group_name)| GroupRef { group_id, group_name })
                .collect(),
            attachment,
            association: self.public_ip.map(|public_ip| InterfaceAssociation {
                public_ip,
                allocation_id: self.allocation_id,
                association_id: self.association_id,
            }),
            owner_id: owner.to_string(),
            tags: Vec::new(),
        }
    }
}

fn tags_into(tags: &mut BTreeMap<String, Vec<(String, String)>>, id: &str) -> Vec<ResourceTag> {
    tags.remove(id).unwrap_or_default().into_iter().map(|(key, value)| ResourceTag { key, value }).collect()
}

// ---------------------------------------------------------------- launch plans

/// One interface of a launch, resolved before its transaction.
#[derive(Debug, Clone)]
pub(crate) struct NicPlan {
    pub device_index: u32,
    /// `None`: the default subnet of the zone the instance is placed in.
    pub subnet: Option<SubnetInfo>,
    pub groups: Vec<String>,
    pub private_ip: Option<Ipv4Addr>,
    pub public: Option<bool>,
    pub delete_on_termination: bool,
}

/// A launch's network: one VPC, the interfaces of each instance.
#[derive(Debug, Clone)]
pub(crate) struct LaunchNetwork {
    pub vpc_id: String,
    /// The zone the subnets fix, if they name one.
    pub zone: Option<String>,
    pub nics: Vec<NicPlan>,
    pub nic_tags: Vec<(String, String)>,
}

impl LaunchNetwork {
    pub fn groups(&self) -> BTreeSet<String> {
        self.nics.iter().flat_map(|n| n.groups.iter().cloned()).collect()
    }
}

/// The network part of a launch request, canonical, for its idempotency digest.
pub(crate) fn request_key(req: &RunInstancesRequest) -> String {
    serde_json::json!([
        req.subnet_id,
        req.security_group_ids,
        req.security_group_names,
        req.private_ip_address,
        req.associate_public_ip_address,
        req.network_interfaces,
        req.network_interface_tags,
    ])
    .to_string()
}

/// One launched instance as the network needs it.
pub(crate) struct Placed<'a> {
    pub instance_id: &'a str,
    pub zone: &'a str,
}

impl Service {
    // ------------------------------------------------------------ default network

    /// The account's default VPC, created with its default security group
    /// and a default subnet per zone of the registered hosts if missing
    /// (a zone that appeared since gets its subnet now). Idempotent and
    /// safe under concurrency: its own transaction, the VPC row locked while
    /// subnets are added.
    pub async fn ensure_default_network(&self, account_id: &str) -> Result<String> {
        super::retrying(|| self.try_ensure_default_network(account_id)).await
    }

    async fn try_ensure_default_network(&self, account_id: &str) -> Result<String> {
        const MISSING_ZONES: &str = "SELECT DISTINCT h.availability_zone FROM hosts h WHERE NOT EXISTS \
             (SELECT 1 FROM subnets s WHERE s.vpc_id = $1 AND s.default_for_az AND s.availability_zone = h.availability_zone) ORDER BY 1";
        let existing: Option<(String, Vec<String>)> = sqlx::query_as(&format!(
            "SELECT v.id, ARRAY({}) FROM vpcs v WHERE v.account_id = $2 AND v.is_default",
            MISSING_ZONES.replace("$1", "v.id")
        ))
        .bind(account_id)
        .bind(account_id)
        .fetch_optional(&self.db)
        .await?;
        if let Some((id, missing)) = &existing {
            if missing.is_empty() {
                return Ok(id.clone());
            }
        }
        let mut tx = self.db.begin().await?;
        let new_id = ids::new_id(ids::VPC);
        let inserted = sqlx::query(
            "INSERT INTO vpcs (id, account_id, cidr, is_default) VALUES ($1, $2, $3::cidr, true) \
             ON CONFLICT (account_id) WHERE is_default DO NOTHING",
        )
        .bind(&new_id)
        .bind(account_id)
        .bind(DEFAULT_VPC_CIDR)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 1 {
            create_default_group(&mut tx, account_id, &new_id).await?;
        }
        let (vpc_id, vpc_cidr): (String, String) =
            sqlx::query_as("SELECT id, cidr::text FROM vpcs WHERE account_id = $1 AND is_default FOR NO KEY UPDATE")
                .bind(account_id)
                .fetch_one(&mut *tx)
                .await?;
        let missing: Vec<(String,)> = sqlx::query_as(MISSING_ZONES).bind(&vpc_id).fetch_all(&mut *tx).await?;
        if !missing.is_empty() {
            let vpc = db_cidr(&vpc_cidr)?;
            let taken: Vec<(String,)> =
                sqlx::query_as("SELECT cidr::text FROM subnets WHERE vpc_id = $1").bind(&vpc_id).fetch_all(&mut *tx).await?;
            let mut taken: Vec<Cidr> = taken.iter().map(|t| db_cidr(&t.0)).collect::<Result<_>>()?;
            for (zone,) in missing {
                let block = (0..vpc.size() / 4096)
                    .filter_map(|i| Some(Cidr { addr: vpc.nth(i * 4096)?, prefix: 20 }))
                    .find(|c| !taken.iter().any(|t| t.overlaps(c)));
                let Some(block) = block else {
                    tracing::warn!(%account_id, %zone, "no free /20 left in the default VPC for the zone's default subnet");
                    continue;
                };
                sqlx::query(
                    "INSERT INTO subnets (id, account_id, vpc_id, availability_zone, cidr, default_for_az, map_public_ip_on_launch) \
                     VALUES ($1, $2, $3, $4, $5::cidr, true, $6)",
                )
                .bind(ids::new_id(ids::SUBNET))
                .bind(account_id)
                .bind(&vpc_id)
                .bind(&zone)
                .bind(block.to_string())
                .bind(self.config.public_pool.is_some())
                .execute(&mut *tx)
                .await?;
                taken.push(block);
            }
            let change = Change { vpcs: BTreeSet::from([vpc_id.clone()]), ..Default::default() };
            super::network_changes::note(&mut tx, &change).await?;
        }
        tx.commit().await?;
        Ok(vpc_id)
    }

    // ------------------------------------------------------------ VPCs

    pub async fn create_vpc(&self, caller: &Caller, cidr_block: &str) -> Result<Vpc> {
        let cidr = parse_cidr(cidr_block, "cidrBlock")?;
        if !(16..=28).contains(&cidr.prefix) {
            return Err(ServiceError::VpcRange(format!("The CIDR '{cidr}' is invalid: a VPC is a /16 to a /28")));
        }
        self.ensure_default_network(&caller.account_id).await?;
        let mut tx = self.db.begin().await?;
        sqlx::query("SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE").bind(&caller.account_id).execute(&mut *tx).await?;
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM vpcs WHERE account_id = $1").bind(&caller.account_id).fetch_one(&mut *tx).await?;
        if n >= MAX_VPCS {
            return Err(ServiceError::VpcLimitExceeded(format!("The maximum number of VPCs ({MAX_VPCS}) has been reached.")));
        }
        let id = ids::new_id(ids::VPC);
        sqlx::query("INSERT INTO vpcs (id, account_id, cidr) VALUES ($1, $2, $3::cidr)")
            .bind(&id)
            .bind(&caller.account_id)
            .bind(cidr.to_string())
            .execute(&mut *tx)
            .await?;
        create_default_group(&mut tx, &caller.account_id, &id).await?;
        tx.commit().await?;
        tracing::info!(vpc_id = %id, %cidr, "VPC created");
        Ok(Vpc {
            vpc_id: id,
            cidr_block: cidr.to_string(),
            is_default: false,
            state: "available".into(),
            owner_id: caller.account_id.clone(),
            tags: vec![],
        })
    }

    /// Deletes a VPC with no subnets and no groups but its default one.
    pub async fn delete_vpc(&self, caller: &Caller, vpc_id: &str) -> Result<()> {
        check_id(ids::VPC, vpc_id, ServiceError::VpcIdMalformed)?;
        let mut tx = self.db.begin().await?;
        let row: Option<(bool,)> = sqlx::query_as("SELECT is_default FROM vpcs WHERE id = $1 AND account_id = $2 FOR UPDATE")
            .bind(vpc_id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (is_default,) = row.ok_or_else(|| ServiceError::VpcNotFound(vpc_id.to_string()))?;
        if is_default {
            return Err(ServiceError::OperationNotPermitted(format!("The default VPC {vpc_id} cannot be deleted in Nimbus")));
        }
        let (subnets, groups): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM subnets WHERE vpc_id = $1), (SELECT count(*) FROM security_groups WHERE vpc_id = $1 AND NOT is_default)",
        )
        .bind(vpc_id)
        .fetch_one(&mut *tx)
        .await?;
        if subnets > 0 || groups > 0 {
            return Err(ServiceError::DependencyViolation(format!(
                "The vpc '{vpc_id}' has dependencies and cannot be deleted ({subnets} subnet(s), {groups} security group(s))."
            )));
        }
        let dependent = |e: sqlx::Error| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
                ServiceError::DependencyViolation(format!("The vpc '{vpc_id}' has dependencies and cannot be deleted."))
            }
            _ => e.into(),
        };
        sqlx::query("DELETE FROM security_groups WHERE vpc_id = $1").bind(vpc_id).execute(&mut *tx).await.map_err(dependent)?;
        sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = $2")
            .bind(&caller.account_id)
            .bind(vpc_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM vpcs WHERE id = $1").bind(vpc_id).execute(&mut *tx).await.map_err(dependent)?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn describe_vpcs(&self, caller: &Caller, vpc_ids: &[String], filters: &Filters) -> Result<Vec<Vpc>> {
        for id in vpc_ids {
            check_id(ids::VPC, id, ServiceError::VpcIdMalformed)?;
        }
        check_filter_names(
            filters,
            &[
                "vpc-id",
                "cidr",
                "cidr-block",
                "cidrBlock",
                "cidr-block-association.cidr-block",
                "is-default",
                "isDefault",
                "state",
                "owner-id",
            ],
        )?;
        self.ensure_default_network(&caller.account_id).await?;
        let rows: Vec<(String, String, bool)> = sqlx::query_as(
            "SELECT id, cidr::text, is_default FROM vpcs WHERE account_id = $1 AND ($2::text[] IS NULL OR id = ANY($2)) ORDER BY created_at, id",
        )
        .bind(&caller.account_id)
        .bind(opt_list(vpc_ids))
        .fetch_all(&self.db)
        .await?;
        if let Some(missing) = vpc_ids.iter().find(|id| !rows.iter().any(|r| &r.0 == *id)) {
            return Err(ServiceError::VpcNotFound(missing.clone()));
        }
        let mut tags = self.tags_of(caller, &rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()).await?;
        Ok(rows
            .into_iter()
            .map(|(id, cidr, is_default)| Vpc {
                tags: tags_into(&mut tags, &id),
                vpc_id: id,
                cidr_block: cidr,
                is_default,
                state: "available".into(),
                owner_id: caller.account_id.clone(),
            })
            .filter(|v| {
                let facts = [
                    ("vpc-id", v.vpc_id.clone()),
                    ("cidr", v.cidr_block.clone()),
                    ("cidr-block", v.cidr_block.clone()),
                    ("cidrBlock", v.cidr_block.clone()),
                    ("cidr-block-association.cidr-block", v.cidr_block.clone()),
                    ("is-default", yes_no(v.is_default)),
                    ("isDefault", yes_no(v.is_default)),
                    ("state", v.state.clone()),
                    ("owner-id", v.owner_id.clone()),
                ];
                passes(filters, &facts, &v.tags)
            })
            .collect())
    }

    // ------------------------------------------------------------ subnets

    pub async fn create_subnet(&self, caller: &Caller, vpc_id: &str, cidr_block: &str, zone: Option<&str>) -> Result<Subnet> {
        check_id(ids::VPC, vpc_id, ServiceError::VpcIdMalformed)?;
        let cidr = parse_cidr(cidr_block, "cidrBlock")?;
        if !(16..=28).contains(&cidr.prefix) {
            return Err(ServiceError::SubnetRange(format!("The CIDR '{cidr}' is invalid: a subnet is a /16 to a /28")));
        }
        let zones = self.describe_availability_zones().await?;
        let zone = match zone {
            Some(z) if zones.iter().any(|k| k == z) => z.to_string(),
            Some(z) => {
                return Err(ServiceError::InvalidParameterValue(format!(
                    "Value ({z}) for parameter availabilityZone is invalid. Subnets can currently only be created in the following availability zones: {}.",
                    zones.join(", ")
                )))
            }
            None => zones.first().cloned().ok_or_else(|| ServiceError::InvalidParameterValue("no availability zone has a host yet".into()))?,
        };
        self.ensure_default_network(&caller.account_id).await?;
        let mut tx = self.db.begin().await?;
        let vpc: Option<(String,)> = sqlx::query_as("SELECT cidr::text FROM vpcs WHERE id = $1 AND account_id = $2 FOR NO KEY UPDATE")
            .bind(vpc_id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (vpc_cidr,) = vpc.ok_or_else(|| ServiceError::VpcNotFound(vpc_id.to_string()))?;
        if !db_cidr(&vpc_cidr)?.covers(&cidr) {
            return Err(ServiceError::SubnetRange(format!("The CIDR '{cidr}' is invalid: it is not within the VPC's {vpc_cidr}.")));
        }
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM subnets WHERE vpc_id = $1").bind(vpc_id).fetch_one(&mut *tx).await?;
        if n >= MAX_SUBNETS_PER_VPC {
            return Err(ServiceError::SubnetLimitExceeded(format!(
                "The maximum number of subnets ({MAX_SUBNETS_PER_VPC}) has been reached."
            )));
        }
        let id = ids::new_id(ids::SUBNET);
        sqlx::query("INSERT INTO subnets (id, account_id, vpc_id, availability_zone, cidr) VALUES ($1, $2, $3, $4, $5::cidr)")
            .bind(&id)
            .bind(&caller.account_id)
            .bind(vpc_id)
            .bind(&zone)
            .bind(cidr.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.constraint() == Some("subnets_no_overlap") => {
                    ServiceError::SubnetConflict(format!("The CIDR '{cidr}' conflicts with another subnet"))
                }
                _ => e.into(),
            })?;
        let change = Change { vpcs: BTreeSet::from([vpc_id.to_string()]), ..Default::default() };
        super::network_changes::note(&mut tx, &change).await?;
        tx.commit().await?;
        tracing::info!(subnet_id = %id, %vpc_id, %cidr, %zone, "subnet created");
        Ok(Subnet {
            subnet_id: id,
            vpc_id: vpc_id.to_string(),
            cidr_block: cidr.to_string(),
            availability_zone: zone,
            default_for_az: false,
            map_public_ip_on_launch: false,
            available_ip_address_count: usable_addresses(&cidr),
            state: "available".into(),
            owner_id: caller.account_id.clone(),
            tags: vec![],
        })
    }

    /// Deletes a subnet without interfaces (a default subnet comes back
    /// when its zone next needs one).
    pub async fn delete_subnet(&self, caller: &Caller, subnet_id: &str) -> Result<()> {
        check_id(ids::SUBNET, subnet_id, ServiceError::SubnetIdMalformed)?;
        let mut tx = self.db.begin().await?;
        let vpc: Option<(String,)> = sqlx::query_as("SELECT vpc_id FROM subnets WHERE id = $1 AND account_id = $2")
            .bind(subnet_id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (vpc_id,) = vpc.ok_or_else(|| ServiceError::SubnetNotFound(subnet_id.to_string()))?;
        let vpcs = BTreeSet::from([vpc_id]);
        lock_vpcs(&mut tx, &vpcs).await?;
        let deleted = sqlx::query("DELETE FROM subnets WHERE id = $1 AND account_id = $2")
            .bind(subnet_id)
            .bind(&caller.account_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
                    ServiceError::DependencyViolation(format!("The subnet '{subnet_id}' has dependencies and cannot be deleted."))
                }
                _ => e.into(),
            })?;
        if deleted.rows_affected() == 0 {
            return Err(ServiceError::SubnetNotFound(subnet_id.to_string()));
        }
        sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = $2")
            .bind(&caller.account_id)
            .bind(subnet_id)
            .execute(&mut *tx)
            .await?;
        super::network_changes::note(&mut tx, &Change { vpcs, ..Default::default() }).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn modify_subnet_attribute(&self, caller: &Caller, subnet_id: &str, map_public_ip_on_launch: bool) -> Result<()> {
        check_id(ids::SUBNET, subnet_id, ServiceError::SubnetIdMalformed)?;
        let done = sqlx::query("UPDATE subnets SET map_public_ip_on_launch = $3 WHERE id = $1 AND account_id = $2")
            .bind(subnet_id)
            .bind(&caller.account_id)
            .bind(map_public_ip_on_launch)
            .execute(&self.db)
            .await?;
        if done.rows_affected() == 0 {
            return Err(ServiceError::SubnetNotFound(subnet_id.to_string()));
        }
        Ok(())
    }

    pub async fn describe_subnets(&self, caller: &Caller, subnet_ids: &[String], filters: &Filters) -> Result<Vec<Subnet>> {
        for id in subnet_ids {
            check_id(ids::SUBNET, id, ServiceError::SubnetIdMalformed)?;
        }
        check_filter_names(
            filters,
            &[
                "subnet-id",
                "vpc-id",
                "vpcId",
                "availability-zone",
                "availabilityZone",
                "default-for-az",
                "defaultForAz",
                "state",
                "cidr",
                "cidr-block",
                "cidrBlock",
                "map-public-ip-on-launch",
                "owner-id",
                "available-ip-address-count",
            ],
        )?;
        self.ensure_default_network(&caller.account_id).await?;
        let rows = sqlx::query_as::<_, SubnetRow>(&format!(
            "SELECT {SUBNET_COLUMNS} FROM subnets WHERE account_id = $1 AND ($2::text[] IS NULL OR id = ANY($2)) \
             ORDER BY vpc_id, availability_zone, cidr"
        ))
        .bind(&caller.account_id)
        .bind(opt_list(subnet_ids))
        .fetch_all(&self.db)
        .await?;
        if let Some(missing) = subnet_ids.iter().find(|id| !rows.iter().any(|r| &r.id == *id)) {
            return Err(ServiceError::SubnetNotFound(missing.clone()));
        }
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let used: Vec<(String, i64)> =
            sqlx::query_as("SELECT subnet_id, count(*) FROM network_interfaces WHERE subnet_id = ANY($1) GROUP BY subnet_id")
                .bind(&ids)
                .fetch_all(&self.db)
                .await?;
        let used: HashMap<String, i64> = used.into_iter().collect();
        let mut tags = self.tags_of(caller, &ids).await?;
        let mut out = Vec::new();
        for r in rows {
            let cidr = db_cidr(&r.cidr)?;
            let s = Subnet {
                available_ip_address_count: usable_addresses(&cidr).saturating_sub(used.get(&r.id).copied().unwrap_or(0) as u64),
                tags: tags_into(&mut tags, &r.id),
                subnet_id: r.id,
                vpc_id: r.vpc_id,
                cidr_block: r.cidr,
                availability_zone: r.availability_zone,
                default_for_az: r.default_for_az,
                map_public_ip_on_launch: r.map_public_ip_on_launch,
                state: "available".into(),
                owner_id: caller.account_id.clone(),
            };
            let facts = [
                ("subnet-id", s.subnet_id.clone()),
                ("vpc-id", s.vpc_id.clone()),
                ("vpcId", s.vpc_id.clone()),
                ("availability-zone", s.availability_zone.clone()),
                ("availabilityZone", s.availability_zone.clone()),
                ("default-for-az", yes_no(s.default_for_az)),
                ("defaultForAz", yes_no(s.default_for_az)),
                ("state", s.state.clone()),
                ("cidr", s.cidr_block.clone()),
                ("cidr-block", s.cidr_block.clone()),
                ("cidrBlock", s.cidr_block.clone()),
                ("map-public-ip-on-launch", yes_no(s.map_public_ip_on_launch)),
                ("owner-id", s.owner_id.clone()),
                ("available-ip-address-count", s.available_ip_address_count.to_string()),
            ];
            if passes(filters, &facts, &s.tags) {
                out.push(s);
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------ security groups

    /// The group's id and VPC; a name is looked up in `vpc_id`, or in the
    /// default VPC without one.
    async fn resolve_group(&self, caller: &Caller, sel: &GroupSel, vpc_id: Option<&str>) -> Result<(String, String)> {
        let row: Option<(String, String)> = match sel {
            GroupSel::Id(id) => {
                check_id(ids::SECURITY_GROUP, id, ServiceError::GroupIdMalformed)?;
                sqlx::query_as("SELECT id, vpc_id FROM security_groups WHERE id = $1 AND account_id = $2")
                    .bind(id)
                    .bind(&caller.account_id)
                    .fetch_optional(&self.db)
                    .await?
            }
            GroupSel::Name(name) => {
                let vpc = match vpc_id {
                    Some(v) => v.to_string(),
                    None => self.ensure_default_network(&caller.account_id).await?,
                };
                sqlx::query_as("SELECT id, vpc_id FROM security_groups WHERE name = $1 AND vpc_id = $2 AND account_id = $3")
                    .bind(name)
                    .bind(&vpc)
                    .bind(&caller.account_id)
                    .fetch_optional(&self.db)
                    .await?
            }
        };
        row.ok_or_else(|| {
            ServiceError::GroupNotFound(match sel {
                GroupSel::Id(id) => format!("The security group '{id}' does not exist"),
                GroupSel::Name(n) => format!("The security group '{n}' does not exist in the VPC"),
            })
        })
    }

    /// Group ids and names resolved in `vpc_id`: each must be the caller's
    /// and in that VPC. Returns distinct ids, sorted.
    pub(crate) async fn groups_in_vpc(&self, caller: &Caller, vpc_id: &str, group_ids: &[String], names: &[String]) -> Result<Vec<String>> {
        for id in group_ids {
            check_id(ids::SECURITY_GROUP, id, ServiceError::GroupIdMalformed)?;
        }
        if group_ids.is_empty() && names.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, name FROM security_groups WHERE account_id = $1 AND vpc_id = $2 AND (id = ANY($3) OR name = ANY($4))",
        )
        .bind(&caller.account_id)
        .bind(vpc_id)
        .bind(group_ids)
        .bind(names)
        .fetch_all(&self.db)
        .await?;
        let mut out = BTreeSet::new();
        for id in group_ids {
            if !rows.iter().any(|r| &r.0 == id) {
                return Err(ServiceError::GroupNotFound(format!("The security group '{id}' does not exist in VPC '{vpc_id}'")));
            }
            out.insert(id.clone());
        }
        for name in names {
            let Some(r) = rows.iter().find(|r| &r.1 == name) else {
                return Err(ServiceError::GroupNotFound(format!("The security group '{name}' does not exist in VPC '{vpc_id}'")));
            };
            out.insert(r.0.clone());
        }
        Ok(out.into_iter().collect())
    }

    /// Creates a group (no inbound, all outbound, as EC2) in `vpc_id`, or
    /// in the default VPC.
    pub async fn create_security_group(
        &self,
        caller: &Caller,
        name: &str,
        description: &str,
        vpc_id: Option<&str>,
    ) -> Result<SecurityGroup> {
        if name.is_empty() || name.chars().count() > 255 || name.chars().any(char::is_control) {
            return Err(ServiceError::InvalidParameterValue("GroupName must be 1 to 255 characters".into()));
        }
        if name.starts_with("sg-") {
            return Err(ServiceError::InvalidParameterValue("Group names may not be in the format sg-*".into()));
        }
        if name == "default" {
            return Err(ServiceError::GroupReserved("The security group name 'default' is reserved".into()));
        }
        if description.is_empty() {
            return Err(ServiceError::MissingParameter("GroupDescription".into()));
        }
        if description.chars().count() > 255 || description.chars().any(char::is_control) {
            return Err(ServiceError::InvalidParameterValue("GroupDescription must be at most 255 characters".into()));
        }
        let default_vpc = self.ensure_default_network(&caller.account_id).await?;
        let vpc_id = match vpc_id {
            Some(v) => {
                check_id(ids::VPC, v, ServiceError::VpcIdMalformed)?;
                v.to_string()
            }
            None => default_vpc,
        };
        let mut tx = self.db.begin().await?;
        let found: Option<(String,)> = sqlx::query_as("SELECT id FROM vpcs WHERE id = $1 AND account_id = $2 FOR KEY SHARE")
            .bind(&vpc_id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            return Err(ServiceError::VpcNotFound(vpc_id));
        }
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM security_groups WHERE vpc_id = $1").bind(&vpc_id).fetch_one(&mut *tx).await?;
        if n >= MAX_GROUPS_PER_VPC {
            return Err(ServiceError::SecurityGroupLimitExceeded(format!(
                "The maximum number of security groups per VPC ({MAX_GROUPS_PER_VPC}) has been reached."
            )));
        }
        let id = ids::new_id(ids::SECURITY_GROUP);
        sqlx::query("INSERT INTO security_groups (id, account_id, vpc_id, name, description) VALUES ($1, $2, $3, $4, $5)")
            .bind(&id)
            .bind(&caller.account_id)
            .bind(&vpc_id)
            .bind(name)
            .bind(description)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if crate::db::is_unique_violation(&e, "security_groups_name_per_vpc") {
                    ServiceError::GroupDuplicate(name.to_string(), vpc_id.clone())
                } else {
                    e.into()
                }
            })?;
        let all = RuleKey { protocol: "-1", from: -1, to: -1, cidr: Some("0.0.0.0/0".into()), peer: None };
        let egress = insert_rules(&mut tx, &id, true, &[all], None).await?;
        tx.commit().await?;
        tracing::info!(group_id = %id, %vpc_id, %name, "security group created");
        Ok(SecurityGroup {
            group_id: id,
            group_name: name.to_string(),
            description: description.to_string(),
            vpc_id,
            owner_id: caller.account_id.clone(),
            ingress: vec![],
            egress,
            tags: vec![],
        })
    }

    /// Deletes a group that no interface uses and no other group's rule names.
    pub async fn delete_security_group(&self, caller: &Caller, sel: &GroupSel) -> Result<String> {
        let (id, _) = self.resolve_group(caller, sel, None).await?;
        let mut tx = self.db.begin().await?;
        let row: Option<(bool,)> = sqlx::query_as("SELECT is_default FROM security_groups WHERE id = $1 AND account_id = $2 FOR UPDATE")
            .bind(&id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (is_default,) = row.ok_or_else(|| ServiceError::GroupNotFound(format!("The security group '{id}' does not exist")))?;
        if is_default {
            return Err(ServiceError::CannotDelete(format!("the specified group: \"{id}\" name: \"default\" cannot be deleted by a user")));
        }
        sqlx::query("DELETE FROM security_groups WHERE id = $1").bind(&id).execute(&mut *tx).await.map_err(|e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
                ServiceError::DependencyViolation(format!("resource {id} has a dependent object"))
            }
            _ => e.into(),
        })?;
        sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = $2")
            .bind(&caller.account_id)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn describe_security_groups(
        &self,
        caller: &Caller,
        group_ids: &[String],
        names: &[String],
        filters: &Filters,
    ) -> Result<Vec<SecurityGroup>> {
        for id in group_ids {
            check_id(ids::SECURITY_GROUP, id, ServiceError::GroupIdMalformed)?;
        }
        check_filter_names(filters, &["group-id", "group-name", "description", "vpc-id", "owner-id"])?;
        let default_vpc = self.ensure_default_network(&caller.account_id).await?;
        type Row = (String, String, String, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, name, description, vpc_id FROM security_groups WHERE account_id = $1 \
               AND ($2::text[] IS NULL OR id = ANY($2)) AND ($3::text[] IS NULL OR (name = ANY($3) AND vpc_id = $4)) \
             ORDER BY created_at, id",
        )
        .bind(&caller.account_id)
        .bind(opt_list(group_ids))
        .bind(opt_list(names))
        .bind(&default_vpc)
        .fetch_all(&self.db)
        .await?;
        if let Some(missing) = group_ids.iter().find(|id| !rows.iter().any(|r| &r.0 == *id)) {
            return Err(ServiceError::GroupNotFound(format!("The security group '{missing}' does not exist")));
        }
        if let Some(missing) = names.iter().find(|n| !rows.iter().any(|r| &r.1 == *n)) {
            return Err(ServiceError::GroupNotFound(format!(
                "The security group '{missing}' does not exist in default VPC '{default_vpc}'"
            )));
        }
        let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let rules = sqlx::query_as::<_, RuleRow>(&format!(
            "SELECT {RULE_COLUMNS} FROM security_group_rules WHERE group_id = ANY($1) ORDER BY group_id, egress, protocol, from_port, to_port, cidr, peer_group_id"
        ))
        .bind(&ids)
        .fetch_all(&self.db)
        .await?;
        let mut by_group: HashMap<String, (Vec<SecurityGroupRule>, Vec<SecurityGroupRule>)> = HashMap::new();
        for r in rules {
            let k = r.key()?;
            let v = rule_view(r.id.clone(), &r.group_id, r.egress, &k, r.description.clone());
            let e = by_group.entry(r.group_id.clone()).or_default();
            if r.egress {
                e.1.push(v)
            } else {
                e.0.push(v)
            }
        }
        let mut tags = self.tags_of(caller, &ids).await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, description, vpc_id)| {
                let (ingress, egress) = by_group.remove(&id).unwrap_or_default();
                SecurityGroup {
                    tags: tags_into(&mut tags, &id),
                    group_id: id,
                    group_name: name,
                    description,
                    vpc_id,
                    owner_id: caller.account_id.clone(),
                    ingress,
                    egress,
                }
            })
            .filter(|g| {
                let facts = [
                    ("group-id", g.group_id.clone()),
                    ("group-name", g.group_name.clone()),
                    ("description", g.description.clone()),
                    ("vpc-id", g.vpc_id.clone()),
                    ("owner-id", g.owner_id.clone()),
                ];
                passes(filters, &facts, &g.tags)
            })
            .collect())
    }

    /// The rules of IpPermissions, with referenced groups resolved in `vpc_id`.
    async fn rule_keys(&self, caller: &Caller, vpc_id: &str, perms: &[IpPermission]) -> Result<Vec<(RuleKey, Option<String>)>> {
        if perms.is_empty() {
            return Err(ServiceError::MissingParameter("IpPermissions".into()));
        }
        let mut out = Vec::new();
        for p in perms {
            let protocol = protocol_of(&p.protocol)?;
            let (from, to) = ports_of(protocol, p.from_port, p.to_port)?;
            if p.cidrs.is_empty() && p.group_ids.is_empty() && p.group_names.is_empty() {
                return Err(ServiceError::PermissionMalformed("A permission must name a CIDR or a security group".into()));
            }
            if let Some(d) = &p.description {
                if d.chars().count() > 255 || d.chars().any(char::is_control) {
                    return Err(ServiceError::InvalidParameterValue("A rule description is at most 255 characters".into()));
                }
            }
            for c in &p.cidrs {
                let cidr = parse_cidr(c, "CidrIp")?;
                out.push((RuleKey { protocol, from, to, cidr: Some(cidr.to_string()), peer: None }, p.description.clone()));
            }
            for g in self.groups_in_vpc(caller, vpc_id, &p.group_ids, &p.group_names).await? {
                out.push((RuleKey { protocol, from, to, cidr: None, peer: Some(g) }, p.description.clone()));
            }
        }
        Ok(out)
    }

    /// Adds allow rules to a group; all or nothing (a rule that exists,
    /// even twice in the request, is InvalidPermission.Duplicate).
    pub async fn authorize_security_group(
        &self,
        caller: &Caller,
        sel: &GroupSel,
        egress: bool,
        perms: &[IpPermission],
    ) -> Result<Vec<SecurityGroupRule>> {
        let (group_id, vpc_id) = self.resolve_group(caller, sel, None).await?;
        let keys = self.rule_keys(caller, &vpc_id, perms).await?;
        let mut seen = BTreeSet::new();
        for (k, _) in &keys {
            if !seen.insert(k.clone()) {
                return Err(ServiceError::PermissionDuplicate(format!("the specified rule \"{}\" already exists", k.describe())));
            }
        }
        super::retrying(|| self.try_authorize(&group_id, egress, &keys)).await
    }

    async fn try_authorize(&self, group_id: &str, egress: bool, keys: &[(RuleKey, Option<String>)]) -> Result<Vec<SecurityGroupRule>> {
        let mut tx = self.db.begin().await?;
        let mut groups: BTreeSet<String> = keys.iter().filter_map(|(k, _)| k.peer.clone()).collect();
        groups.insert(group_id.to_string());
        let locked = lock_groups(&mut tx, &groups).await?;
        if let Some(gone) = groups.iter().find(|g| !locked.contains(g)) {
            return Err(ServiceError::GroupNotFound(format!("The security group '{gone}' does not exist")));
        }
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM security_group_rules WHERE group_id = $1 AND egress = $2")
            .bind(group_id)
            .bind(egress)
            .fetch_one(&mut *tx)
            .await?;
        if n + keys.len() as i64 > MAX_RULES_PER_DIRECTION {
            return Err(ServiceError::RulesPerSecurityGroupLimitExceeded(format!(
                "The maximum number of rules per security group and direction ({MAX_RULES_PER_DIRECTION}) has been reached."
            )));
        }
        let just_keys: Vec<RuleKey> = keys.iter().map(|(k, _)| k.clone()).collect();
        let descriptions: Vec<Option<String>> = keys.iter().map(|(_, d)| d.clone()).collect();
        let created = insert_rules(&mut tx, group_id, egress, &just_keys, Some(&descriptions)).await?;
        if created.len() < keys.len() {
            let dup = just_keys.iter().find(|k| {
                !created.iter().any(|c| {
                    c.protocol == k.protocol
                        && c.from_port == k.from
                        && c.to_port == k.to
                        && c.cidr == k.cidr
                        && c.referenced_group_id == k.peer
                })
            });
            return Err(ServiceError::PermissionDuplicate(format!(
                "the specified rule \"{}\" already exists",
                dup.map(RuleKey::describe).unwrap_or_default()
            )));
        }
        let change = Change { rules_of: BTreeSet::from([group_id.to_string()]), ..Default::default() };
        super::network_changes::note(&mut tx, &change).await?;
        tx.commit().await?;
        tracing::info!(%group_id, egress, rules = created.len(), "security group rules authorized");
        Ok(created)
    }

    /// Removes rules given as permissions, or by rule id; all or nothing (a
    /// rule that does not exist is InvalidPermission.NotFound).
    pub async fn revoke_security_group(
        &self,
        caller: &Caller,
        sel: &GroupSel,
        egress: bool,
        perms: &[IpPermission],
        rule_ids: &[String],
    ) -> Result<()> {
        let (group_id, vpc_id) = self.resolve_group(caller, sel, None).await?;
        let keys: Vec<RuleKey> = if rule_ids.is_empty() {
            self.rule_keys(caller, &vpc_id, perms).await?.into_iter().map(|(k, _)| k).collect()
        } else {
            Vec::new()
        };
        let (group_id, keys) = (&group_id, &keys);
        super::retrying(|| async move {
            let mut tx = self.db.begin().await?;
            let mut groups: BTreeSet<String> = keys.iter().filter_map(|k| k.peer.clone()).collect();
            groups.insert(group_id.clone());
            lock_groups(&mut tx, &groups).await?;
            let rows = sqlx::query_as::<_, RuleRow>(&format!(
                "SELECT {RULE_COLUMNS} FROM security_group_rules WHERE group_id = $1 AND egress = $2"
            ))
            .bind(&group_id)
            .bind(egress)
            .fetch_all(&mut *tx)
            .await?;
            let mut doomed = BTreeSet::new();
            for k in keys {
                let mut found = None;
                for r in &rows {
                    if &r.key()? == k {
                        found = Some(r.id.clone());
                    }
                }
                let id = found.ok_or_else(|| {
                    ServiceError::PermissionNotFound(format!(
                        "The specified rule \"{}\" does not exist in this security group.",
                        k.describe()
                    ))
                })?;
                doomed.insert(id);
            }
            for id in rule_ids {
                if !rows.iter().any(|r| &r.id == id) {
                    return Err(ServiceError::SecurityGroupRuleNotFound(id.clone()));
                }
                doomed.insert(id.clone());
            }
            let doomed: Vec<String> = doomed.into_iter().collect();
            sqlx::query("DELETE FROM security_group_rules WHERE id = ANY($1)").bind(&doomed).execute(&mut *tx).await?;
            let change = Change { rules_of: BTreeSet::from([group_id.clone()]), ..Default::default() };
            super::network_changes::note(&mut tx, &change).await?;
            tx.commit().await?;
            tracing::info!(%group_id, egress, rules = doomed.len(), "security group rules revoked");
            Ok::<_, ServiceError>(())
        })
        .await
    }

    pub async fn describe_security_group_rules(
        &self,
        caller: &Caller,
        rule_ids: &[String],
        filters: &Filters,
    ) -> Result<Vec<SecurityGroupRule>> {
        check_filter_names(filters, &["group-id", "security-group-rule-id"])?;
        let rows = sqlx::query_as::<_, RuleRow>(&format!(
            "SELECT {} FROM security_group_rules r JOIN security_groups g ON g.id = r.group_id \
             WHERE g.account_id = $1 AND ($2::text[] IS NULL OR r.id = ANY($2)) ORDER BY r.group_id, r.egress, r.id",
            RULE_COLUMNS.split(", ").map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", ")
        ))
        .bind(&caller.account_id)
        .bind(opt_list(rule_ids))
        .fetch_all(&self.db)
        .await?;
        if let Some(missing) = rule_ids.iter().find(|id| !rows.iter().any(|r| &r.id == *id)) {
            return Err(ServiceError::SecurityGroupRuleNotFound(missing.clone()));
        }
        let mut out = Vec::new();
        for r in rows {
            let k = r.key()?;
            let v = rule_view(r.id.clone(), &r.group_id, r.egress, &k, r.description.clone());
            if passes(filters, &[("group-id", v.group_id.clone()), ("security-group-rule-id", v.rule_id.clone())], &[]) {
                out.push(v);
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------ interfaces

    /// Interfaces of the caller, by id and/or instance.
    pub(crate) async fn interfaces(
        &self,
        caller: &Caller,
        ids: Option<&[String]>,
        instances: Option<&[String]>,
    ) -> Result<Vec<NetworkInterface>> {
        let rows = sqlx::query_as::<_, InterfaceRow>(&format!(
            "{INTERFACE_SELECT} WHERE n.account_id = $1 AND ($2::text[] IS NULL OR n.id = ANY($2)) \
               AND ($3::text[] IS NULL OR n.instance_id = ANY($3)) ORDER BY n.instance_id, n.device_index, n.id"
        ))
        .bind(&caller.account_id)
        .bind(ids)
        .bind(instances)
        .fetch_all(&self.db)
        .await?;
        Ok(rows.into_iter().map(|r| r.view(&caller.account_id, &self.config.region)).collect())
    }

    pub async fn describe_network_interfaces(
        &self,
        caller: &Caller,
        eni_ids: &[String],
        filters: &Filters,
    ) -> Result<Vec<NetworkInterface>> {
        for id in eni_ids {
            check_id(ids::NETWORK_INTERFACE, id, ServiceError::NetworkInterfaceIdMalformed)?;
        }
        check_filter_names(
            filters,
            &[
                "network-interface-id",
                "vpc-id",
                "subnet-id",
                "availability-zone",
                "private-ip-address",
                "addresses.private-ip-address",
                "private-dns-name",
                "mac-address",
                "status",
                "group-id",
                "group-name",
                "attachment.instance-id",
                "attachment.attachment-id",
                "attachment.device-index",
                "attachment.status",
                "attachment.delete-on-termination",
                "association.public-ip",
                "association.allocation-id",
                "association.association-id",
                "owner-id",
            ],
        )?;
        let mut list = self.interfaces(caller, opt_list(eni_ids).as_deref(), None).await?;
        if let Some(missing) = eni_ids.iter().find(|id| !list.iter().any(|n| &n.network_interface_id == *id)) {
            return Err(ServiceError::NetworkInterfaceNotFound(missing.clone()));
        }
        let mut tags = self.tags_of(caller, &list.iter().map(|n| n.network_interface_id.clone()).collect::<Vec<_>>()).await?;
        for n in &mut list {
            n.tags = tags_into(&mut tags, &n.network_interface_id);
        }
        list.retain(|n| {
            let mut facts = vec![
                ("network-interface-id", n.network_interface_id.clone()),
                ("vpc-id", n.vpc_id.clone()),
                ("subnet-id", n.subnet_id.clone()),
                ("availability-zone", n.availability_zone.clone()),
                ("private-ip-address", n.private_ip_address.clone()),
                ("addresses.private-ip-address", n.private_ip_address.clone()),
                ("private-dns-name", n.private_dns_name.clone()),
                ("mac-address", n.mac_address.clone()),
                ("status", n.status.clone()),
                ("owner-id", n.owner_id.clone()),
            ];
            for g in &n.groups {
                facts.push(("group-id", g.group_id.clone()));
                facts.push(("group-name", g.group_name.clone()));
            }
            if let Some(a) = &n.attachment {
                facts.push(("attachment.instance-id", a.instance_id.clone()));
                facts.push(("attachment.attachment-id", a.attachment_id.clone()));
                facts.push(("attachment.device-index", a.device_index.to_string()));
                facts.push(("attachment.status", a.status.clone()));
                facts.push(("attachment.delete-on-termination", yes_no(a.delete_on_termination)));
            }
            if let Some(a) = &n.association {
                facts.push(("association.public-ip", a.public_ip.clone()));
                if let Some(x) = &a.allocation_id {
                    facts.push(("association.allocation-id", x.clone()));
                }
                if let Some(x) = &a.association_id {
                    facts.push(("association.association-id", x.clone()));
                }
            }
            passes(filters, &facts, &n.tags)
        });
        Ok(list)
    }

    /// Deletes an interface that is not attached (one kept after its
    /// instance ended, DeleteOnTermination false); its address returns to
    /// the subnet and an Elastic IP on it is disassociated.
    pub async fn delete_network_interface(&self, caller: &Caller, eni_id: &str) -> Result<()> {
        check_id(ids::NETWORK_INTERFACE, eni_id, ServiceError::NetworkInterfaceIdMalformed)?;
        let mut tx = self.db.begin().await?;
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT instance_id FROM network_interfaces WHERE id = $1 AND account_id = $2 FOR UPDATE")
                .bind(eni_id)
                .bind(&caller.account_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (instance,) = row.ok_or_else(|| ServiceError::NetworkInterfaceNotFound(eni_id.to_string()))?;
        if let Some(i) = instance {
            return Err(ServiceError::DependencyViolation(format!("Network interface '{eni_id}' is currently in use by {i}.")));
        }
        sqlx::query("UPDATE public_addresses SET network_interface_id = NULL, association_id = NULL WHERE network_interface_id = $1 AND allocation_id IS NOT NULL")
            .bind(eni_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM public_addresses WHERE network_interface_id = $1").bind(eni_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM network_interfaces WHERE id = $1").bind(eni_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = $2")
            .bind(&caller.account_id)
            .bind(eni_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    // ------------------------------------------------------------ public addresses

    fn pool(&self) -> Result<Cidr> {
        self.config.public_pool.ok_or_else(|| {
            ServiceError::InsufficientAddressCapacity("No public address pool is configured (the operator's --public-pool)".into())
        })
    }

    /// Allocates an Elastic IP from the pool, within the account's limit.
    pub async fn allocate_address(&self, caller: &Caller) -> Result<Address> {
        let pool = self.pool()?;
        let mut tx = self.db.begin().await?;
        let limit: Option<(Option<i32>,)> = sqlx::query_as("SELECT max_elastic_ips FROM accounts WHERE id = $1 FOR NO KEY UPDATE")
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (limit,) = limit.ok_or_else(|| ServiceError::AccountNotFound(caller.account_id.clone()))?;
        let limit = limit.map_or(i64::from(self.config.default_max_elastic_ips), i64::from);
        let (held,): (i64,) = sqlx::query_as("SELECT count(*) FROM public_addresses WHERE account_id = $1 AND allocation_id IS NOT NULL")
            .bind(&caller.account_id)
            .fetch_one(&mut *tx)
            .await?;
        if held >= limit {
            return Err(ServiceError::AddressLimitExceeded(format!("The maximum number of addresses ({limit}) has been reached.")));
        }
        let allocation_id = ids::new_id(ids::ALLOCATION);
        let ip = allocate_public(&mut tx, pool, &caller.account_id, &[(Some(allocation_id.clone()), None)]).await?;
        tx.commit().await?;
        let public_ip = ip.into_iter().next().unwrap_or_default();
        tracing::info!(%allocation_id, %public_ip, "Elastic IP allocated");
        Ok(Address {
            allocation_id,
            public_ip,
            domain: "vpc".into(),
            association_id: None,
            instance_id: None,
            network_interface_id: None,
            private_ip_address: None,
            owner_id: caller.account_id.clone(),
            tags: vec![],
        })
    }

    /// The allocation id of an Elastic IP named by allocation id or address.
    async fn resolve_address(&self, caller: &Caller, allocation_id: Option<&str>, public_ip: Option<&str>) -> Result<String> {
        match (allocation_id, public_ip) {
            (Some(a), _) => {
                let row: Option<(String,)> =
                    sqlx::query_as("SELECT allocation_id FROM public_addresses WHERE allocation_id = $1 AND account_id = $2")
                        .bind(a)
                        .bind(&caller.account_id)
                        .fetch_optional(&self.db)
                        .await?;
                row.map(|r| r.0).ok_or_else(|| ServiceError::AllocationNotFound(a.to_string()))
            }
            (None, Some(ip)) => {
                let ip4: Ipv4Addr =
                    ip.parse().map_err(|_| ServiceError::InvalidParameterValue(format!("Invalid value '{ip}' for PublicIp")))?;
                let row: Option<(String,)> = sqlx::query_as(
                    "SELECT allocation_id FROM public_addresses WHERE public_ip = $1::inet AND account_id = $2 AND allocation_id IS NOT NULL",
                )
                .bind(ip4.to_string())
                .bind(&caller.account_id)
                .fetch_optional(&self.db)
                .await?;
                row.map(|r| r.0).ok_or_else(|| ServiceError::AddressNotFound(ip.to_string()))
            }
            (None, None) => Err(ServiceError::MissingParameter("AllocationId".into())),
        }
    }

    /// Maps an Elastic IP to an instance's primary interface or to an
    /// interface; returns the association id. An address assigned at
    /// launch on the target goes back to the pool; another Elastic IP on it
    /// is disassociated; an address associated elsewhere moves only with
    /// `allow_reassociation` (else Resource.AlreadyAssociated).
    pub async fn associate_address(
        &self,
        caller: &Caller,
        allocation_id: Option<&str>,
        public_ip: Option<&str>,
        target: &nimbus_proto::api::AssociateAddressRequest,
    ) -> Result<String> {
        let allocation_id = self.resolve_address(caller, allocation_id, public_ip).await?;
        let eni_id = match (&target.instance_id, &target.network_interface_id) {
            (Some(_), Some(_)) => {
                return Err(ServiceError::InvalidParameterCombination("Name either an instance or a network interface, not both".into()))
            }
            (None, None) => return Err(ServiceError::MissingParameter("InstanceId".into())),
            (Some(i), None) => {
                if !ids::is_valid(ids::INSTANCE, i) {
                    return Err(ServiceError::InstanceIdMalformed(i.clone()));
                }
                let row: Option<(String,)> = sqlx::query_as(
                    "SELECT n.id FROM network_interfaces n JOIN instances i ON i.id = n.instance_id \
                     WHERE i.id = $1 AND i.account_id = $2 AND n.device_index = 0 AND i.capacity_held",
                )
                .bind(i)
                .bind(&caller.account_id)
                .fetch_optional(&self.db)
                .await?;
                row.ok_or_else(|| ServiceError::InstanceNotFound(i.clone()))?.0
            }
            (None, Some(n)) => {
                check_id(ids::NETWORK_INTERFACE, n, ServiceError::NetworkInterfaceIdMalformed)?;
                n.clone()
            }
        };
        // `None`: the interface changed under us; look again (a few times).
        for _ in 0..super::TX_ATTEMPTS {
            if let Some(id) = super::retrying(|| self.try_associate(caller, &allocation_id, &eni_id, target)).await? {
                return Ok(id);
            }
        }
        Err(ServiceError::Internal(format!("the network interface {eni_id} kept changing while {allocation_id} was associated")))
    }

    /// `Ok(None)`: the interface moved between our read and our lock; try again.
    async fn try_associate(
        &self,
        caller: &Caller,
        allocation_id: &str,
        eni_id: &str,
        target: &nimbus_proto::api::AssociateAddressRequest,
    ) -> Result<Option<String>> {
        let mut tx = self.db.begin().await?;
        // Lock order: instance, interface, address, hosts.
        let owner: Option<(Option<String>,)> =
            sqlx::query_as("SELECT instance_id FROM network_interfaces WHERE id = $1 AND account_id = $2")
                .bind(eni_id)
                .bind(&caller.account_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (instance,) = owner.ok_or_else(|| ServiceError::NetworkInterfaceNotFound(eni_id.to_string()))?;
        if let Some(i) = &instance {
            sqlx::query("SELECT 1 FROM instances WHERE id = $1 FOR UPDATE").bind(i).execute(&mut *tx).await?;
        }
        let row: Option<(Option<String>, String, Option<String>)> = sqlx::query_as(
            "SELECT instance_id, host(private_ip), (SELECT host_id FROM instances WHERE id = n.instance_id) \
             FROM network_interfaces n WHERE id = $1 FOR UPDATE",
        )
        .bind(eni_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (instance_now, private_ip, host) = row.ok_or_else(|| ServiceError::NetworkInterfaceNotFound(eni_id.to_string()))?;
        if instance_now != instance {
            return Ok(None);
        }
        if let Some(p) = &target.private_ip_address {
            if p != &private_ip {
                return Err(ServiceError::InvalidParameterValue(format!("The private address {p} is not the interface's ({private_ip})")));
            }
        }
        let addr: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT network_interface_id, association_id FROM public_addresses WHERE allocation_id = $1 AND account_id = $2 FOR UPDATE",
        )
        .bind(allocation_id)
        .bind(&caller.account_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (current, association) = addr.ok_or_else(|| ServiceError::AllocationNotFound(allocation_id.to_string()))?;
        if current.as_deref() == Some(eni_id) {
            return association.map(Some).ok_or_else(|| ServiceError::Internal("an associated address without an association id".into()));
        }
        let mut hosts: BTreeSet<String> = host.into_iter().collect();
        let mut touched: Vec<String> = instance.into_iter().collect();
        if let Some(other) = &current {
            if !target.allow_reassociation {
                return Err(ServiceError::AlreadyAssociated(format!("resource {allocation_id} is already associated with {other}")));
            }
            let was: Option<(Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT n.instance_id, i.host_id FROM network_interfaces n LEFT JOIN instances i ON i.id = n.instance_id WHERE n.id = $1",
            )
            .bind(other)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((i, h)) = was {
                touched.extend(i);
                hosts.extend(h);
            }
        }
        // What the target had: an address from launch goes back to the pool, an Elastic IP is disassociated.
        sqlx::query("DELETE FROM public_addresses WHERE network_interface_id = $1 AND allocation_id IS NULL")
            .bind(eni_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE public_addresses SET network_interface_id = NULL, association_id = NULL WHERE network_interface_id = $1")
            .bind(eni_id)
            .execute(&mut *tx)
            .await?;
        let association_id = ids::new_id(ids::ASSOCIATION);
        sqlx::query("UPDATE public_addresses SET network_interface_id = $2, association_id = $3 WHERE allocation_id = $1")
            .bind(allocation_id)
            .bind(eni_id)
            .bind(&association_id)
            .execute(&mut *tx)
            .await?;
        self.touch_instances(&mut tx, &hosts, touched).await?;
        tx.commit().await?;
        tracing::info!(%allocation_id, %eni_id, %association_id, "Elastic IP associated");
        Ok(Some(association_id))
    }

    /// Bumps `hosts` and marks `instances` (on them) changed at their
    /// host's new generation, so a delta carries their new interfaces.
    pub(crate) async fn touch_instances(&self, conn: &mut PgConnection, hosts: &BTreeSet<String>, instances: Vec<String>) -> Result<()> {
        let generations = bump_hosts(conn, hosts).await?;
        if !instances.is_empty() {
            let (h, g): (Vec<String>, Vec<i64>) = generations.into_iter().unzip();
            sqlx::query(
                "UPDATE instances SET changed_generation = g.gen FROM unnest($2::text[], $3::bigint[]) AS g(host, gen) \
                 WHERE instances.id = ANY($1) AND instances.host_id = g.host",
            )
            .bind(&instances)
            .bind(&h)
            .bind(&g)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Unmaps an Elastic IP named by its association id, its address or
    /// (REST) its allocation id; an address that is not associated is
    /// InvalidAssociationID.NotFound.
    pub async fn disassociate_address(
        &self,
        caller: &Caller,
        association_id: Option<&str>,
        allocation_id: Option<&str>,
        public_ip: Option<&str>,
    ) -> Result<()> {
        if association_id.is_none() && (allocation_id.is_some() || public_ip.is_some()) {
            let allocation = self.resolve_address(caller, allocation_id, public_ip).await?;
            let row: Option<(Option<String>,)> = sqlx::query_as("SELECT association_id FROM public_addresses WHERE allocation_id = $1")
                .bind(&allocation)
                .fetch_optional(&self.db)
                .await?;
            let association =
                row.and_then(|r| r.0).ok_or_else(|| ServiceError::AssociationNotFound(format!("{allocation} is not associated")))?;
            return Box::pin(self.disassociate_address(caller, Some(&association), None, None)).await;
        }
        let allocation_id = match (association_id, public_ip) {
            (Some(a), _) => {
                let row: Option<(String,)> =
                    sqlx::query_as("SELECT allocation_id FROM public_addresses WHERE association_id = $1 AND account_id = $2")
                        .bind(a)
                        .bind(&caller.account_id)
                        .fetch_optional(&self.db)
                        .await?;
                row.ok_or_else(|| ServiceError::AssociationNotFound(a.to_string()))?.0
            }
            (None, Some(_)) => self.resolve_address(caller, None, public_ip).await?,
            (None, None) => return Err(ServiceError::MissingParameter("AssociationId".into())),
        };
        let allocation_id = &allocation_id;
        super::retrying(|| async move {
            let mut tx = self.db.begin().await?;
            let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT n.instance_id, i.host_id FROM public_addresses p JOIN network_interfaces n ON n.id = p.network_interface_id \
                 LEFT JOIN instances i ON i.id = n.instance_id WHERE p.allocation_id = $1",
            )
            .bind(&allocation_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((instance, host)) = row else {
                return match association_id {
                    Some(a) => Err(ServiceError::AssociationNotFound(a.to_string())),
                    None => Ok(()),
                };
            };
            if let Some(i) = &instance {
                sqlx::query("SELECT 1 FROM instances WHERE id = $1 FOR UPDATE").bind(i).execute(&mut *tx).await?;
            }
            let done = sqlx::query(
                "UPDATE public_addresses SET network_interface_id = NULL, association_id = NULL \
                 WHERE allocation_id = $1 AND ($2::text IS NULL OR association_id = $2) AND network_interface_id IS NOT NULL",
            )
            .bind(&allocation_id)
            .bind(association_id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                if let Some(a) = association_id {
                    return Err(ServiceError::AssociationNotFound(a.to_string()));
                }
            }
            self.touch_instances(&mut tx, &host.into_iter().collect(), instance.into_iter().collect()).await?;
            tx.commit().await?;
            Ok::<_, ServiceError>(())
        })
        .await
    }

    /// Returns an Elastic IP to the pool; it must not be associated.
    pub async fn release_address(&self, caller: &Caller, allocation_id: Option<&str>, public_ip: Option<&str>) -> Result<()> {
        let allocation_id = self.resolve_address(caller, allocation_id, public_ip).await?;
        let mut tx = self.db.begin().await?;
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT network_interface_id FROM public_addresses WHERE allocation_id = $1 FOR UPDATE")
                .bind(&allocation_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (eni,) = row.ok_or_else(|| ServiceError::AllocationNotFound(allocation_id.clone()))?;
        if let Some(eni) = eni {
            return Err(ServiceError::AddressInUse(format!(
                "The address with allocation id [{allocation_id}] is in use (associated with {eni})"
            )));
        }
        sqlx::query("DELETE FROM public_addresses WHERE allocation_id = $1").bind(&allocation_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = $2")
            .bind(&caller.account_id)
            .bind(&allocation_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn describe_addresses(
        &self,
        caller: &Caller,
        public_ips: &[String],
        allocation_ids: &[String],
        filters: &Filters,
    ) -> Result<Vec<Address>> {
        check_filter_names(
            filters,
            &[
                "allocation-id",
                "association-id",
                "domain",
                "instance-id",
                "network-interface-id",
                "private-ip-address",
                "public-ip",
                "network-interface-owner-id",
            ],
        )?;
        type Row = (String, String, Option<String>, Option<String>, Option<String>, Option<String>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT p.allocation_id, host(p.public_ip), p.association_id, p.network_interface_id, n.instance_id, host(n.private_ip) \
             FROM public_addresses p LEFT JOIN network_interfaces n ON n.id = p.network_interface_id \
             WHERE p.account_id = $1 AND p.allocation_id IS NOT NULL ORDER BY p.public_ip",
        )
        .bind(&caller.account_id)
        .fetch_all(&self.db)
        .await?;
        for ip in public_ips {
            if !rows.iter().any(|r| &r.1 == ip) {
                return Err(ServiceError::AddressNotFound(ip.clone()));
            }
        }
        for a in allocation_ids {
            if !rows.iter().any(|r| &r.0 == a) {
                return Err(ServiceError::AllocationNotFound(a.clone()));
            }
        }
        let mut tags = self.tags_of(caller, &rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()).await?;
        Ok(rows
            .into_iter()
            .filter(|r| {
                (public_ips.is_empty() || public_ips.contains(&r.1)) && (allocation_ids.is_empty() || allocation_ids.contains(&r.0))
            })
            .map(|(allocation_id, public_ip, association_id, network_interface_id, instance_id, private_ip_address)| Address {
                tags: tags_into(&mut tags, &allocation_id),
                allocation_id,
                public_ip,
                domain: "vpc".into(),
                association_id,
                instance_id,
                network_interface_id,
                private_ip_address,
                owner_id: caller.account_id.clone(),
            })
            .filter(|a| {
                let mut facts =
                    vec![("allocation-id", a.allocation_id.clone()), ("public-ip", a.public_ip.clone()), ("domain", a.domain.clone())];
                for (k, v) in [
                    ("association-id", &a.association_id),
                    ("instance-id", &a.instance_id),
                    ("network-interface-id", &a.network_interface_id),
                    ("private-ip-address", &a.private_ip_address),
                ] {
                    if let Some(v) = v {
                        facts.push((k, v.clone()));
                    }
                }
                if a.network_interface_id.is_some() {
                    facts.push(("network-interface-owner-id", a.owner_id.clone()));
                }
                passes(filters, &facts, &a.tags)
            })
            .collect())
    }

    // ------------------------------------------------------------ launches

    /// Resolves the network of a launch (before its transaction): the
    /// interfaces, their subnets (which fix the zone), groups and addresses.
    pub(crate) async fn resolve_launch_network(&self, caller: &Caller, req: &RunInstancesRequest) -> Result<LaunchNetwork> {
        use nimbus_proto::api::NetworkInterfaceSpec;
        let specs: Vec<NetworkInterfaceSpec> = if req.network_interfaces.is_empty() {
            vec![NetworkInterfaceSpec {
                device_index: 0,
                subnet_id: req.subnet_id.clone(),
                security_group_ids: req.security_group_ids.clone(),
                associate_public_ip_address: req.associate_public_ip_address,
                delete_on_termination: None,
                private_ip_address: req.private_ip_address.clone(),
            }]
        } else {
            if req.subnet_id.is_some() || !req.security_group_ids.is_empty() || !req.security_group_names.is_empty() {
                return Err(ServiceError::InvalidParameterCombination(
                    "Network interfaces and an instance-level subnet ID or security groups may not be specified on the same request".into(),
                ));
            }
            if req.private_ip_address.is_some() || req.associate_public_ip_address.is_some() {
                return Err(ServiceError::InvalidParameterCombination(
                    "Network interfaces and an instance-level private IP address or public IP setting may not be specified on the same request".into(),
                ));
            }
            req.network_interfaces.clone()
        };
        if specs.len() > MAX_INTERFACES {
            return Err(ServiceError::InvalidParameterValue(format!("At most {MAX_INTERFACES} network interfaces")));
        }
        let indexes: BTreeSet<u32> = specs.iter().map(|s| s.device_index).collect();
        if indexes.len() != specs.len() || !indexes.contains(&0) || indexes.iter().any(|i| *i as usize >= MAX_INTERFACES) {
            return Err(ServiceError::InvalidParameterValue(
                "Network interfaces need distinct device indexes from 0 to 7, one of them 0".into(),
            ));
        }
        if specs.len() > 1 && specs.iter().any(|s| s.associate_public_ip_address == Some(true)) {
            return Err(ServiceError::InvalidParameterCombination(
                "The associatePublicIPAddress parameter cannot be specified when launching with multiple network interfaces.".into(),
            ));
        }
        if req.max_count > 1 && specs.iter().any(|s| s.private_ip_address.is_some()) {
            return Err(ServiceError::InvalidParameterCombination(
                "A private IP address can be given only when launching one instance".into(),
            ));
        }
        let default_vpc = self.ensure_default_network(&caller.account_id).await?;
        // Subnets named, each the caller's.
        let named: Vec<String> = distinct(&specs.iter().filter_map(|s| s.subnet_id.clone()).collect::<Vec<_>>());
        for id in &named {
            check_id(ids::SUBNET, id, ServiceError::SubnetIdMalformed)?;
        }
        let rows = sqlx::query_as::<_, SubnetRow>(&format!("SELECT {SUBNET_COLUMNS} FROM subnets WHERE account_id = $1 AND id = ANY($2)"))
            .bind(&caller.account_id)
            .bind(&named)
            .fetch_all(&self.db)
            .await?;
        let mut subnets: HashMap<String, SubnetInfo> = HashMap::new();
        for r in &rows {
            subnets.insert(r.id.clone(), r.info()?);
        }
        if let Some(missing) = named.iter().find(|id| !subnets.contains_key(*id)) {
            return Err(ServiceError::SubnetNotFound(missing.clone()));
        }
        let primary = specs.iter().find(|s| s.device_index == 0).and_then(|s| s.subnet_id.clone());
        if primary.is_none() && !named.is_empty() {
            return Err(ServiceError::InvalidParameterCombination("Name the subnet of the primary interface (device index 0) too".into()));
        }
        let vpcs: BTreeSet<&str> = subnets.values().map(|s| s.vpc_id.as_str()).collect();
        let zones: BTreeSet<&str> = subnets.values().map(|s| s.zone.as_str()).collect();
        if vpcs.len() > 1 {
            return Err(ServiceError::InvalidParameterValue("The network interfaces of an instance must be in one VPC".into()));
        }
        if zones.len() > 1 {
            return Err(ServiceError::InvalidParameterValue(
                "The network interfaces of an instance must be in one availability zone".into(),
            ));
        }
        let vpc_id = vpcs.first().map(|v| v.to_string()).unwrap_or(default_vpc);
        let zone = zones.first().map(|z| z.to_string());
        if let (Some(z), Some(asked)) = (&zone, &req.availability_zone) {
            if z != asked {
                return Err(ServiceError::InvalidParameterValue(format!("The subnet is in availability zone {z}, not {asked}")));
            }
        }
        let (default_group,): (String,) =
            sqlx::query_as("SELECT id FROM security_groups WHERE vpc_id = $1 AND is_default").bind(&vpc_id).fetch_one(&self.db).await?;
        let mut nics = Vec::new();
        for s in &specs {
            let subnet = s.subnet_id.as_ref().or(primary.as_ref()).and_then(|id| subnets.get(id)).cloned();
            let names: &[String] = if s.device_index == 0 { &req.security_group_names } else { &[] };
            let mut groups = self.groups_in_vpc(caller, &vpc_id, &s.security_group_ids, names).await?;
            if groups.is_empty() {
                groups.push(default_group.clone());
            }
            if groups.len() > MAX_GROUPS_PER_INTERFACE {
                return Err(ServiceError::SecurityGroupsPerInterfaceLimitExceeded(format!(
                    "An interface has at most {MAX_GROUPS_PER_INTERFACE} security groups"
                )));
            }
            let private_ip = match &s.private_ip_address {
                None => None,
                Some(p) => {
                    let ip: Ipv4Addr =
                        p.parse().map_err(|_| ServiceError::InvalidParameterValue(format!("Invalid value '{p}' for PrivateIpAddress")))?;
                    let Some(sub) = &subnet else {
                        return Err(ServiceError::InvalidParameterCombination("A private IP address needs a subnet".into()));
                    };
                    if !sub.cidr.contains(ip) {
                        return Err(ServiceError::InvalidParameterValue(format!(
                            "Address {ip} does not fall within the subnet's address range"
                        )));
                    }
                    if is_reserved(&sub.cidr, ip) {
                        return Err(ServiceError::InvalidParameterValue(format!("Address {ip} is in subnet's reserved address range")));
                    }
                    Some(ip)
                }
            };
            if s.associate_public_ip_address == Some(true) {
                self.pool()?;
            }
            nics.push(NicPlan {
                device_index: s.device_index,
                subnet,
                groups,
                private_ip,
                public: s.associate_public_ip_address,
                delete_on_termination: s.delete_on_termination.unwrap_or(true),
            });
        }
        nics.sort_by_key(|n| n.device_index);
        let nic_tags = req.network_interface_tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect::<Vec<_>>();
        super::tags::validate_tags(&nic_tags)?;
        Ok(LaunchNetwork { vpc_id, zone, nics, nic_tags })
    }

    /// How many instances of a launch whose subnets are all named fit the
    /// addresses those subnets have free, as committed now (no lock: a
    /// concurrent launch may take some before this one allocates, which
    /// then finds too few and plans again, see `Service::try_launch`).
    pub(crate) async fn fit_addresses(&self, conn: &mut PgConnection, net: &LaunchNetwork) -> Result<Option<u32>> {
        if net.nics.iter().any(|n| n.subnet.is_none()) {
            return Ok(None);
        }
        let mut need: BTreeMap<String, (u64, Cidr)> = BTreeMap::new();
        for n in &net.nics {
            if let Some(s) = &n.subnet {
                need.entry(s.id.clone()).or_insert((0, s.cidr)).0 += 1;
            }
        }
        let ids: Vec<String> = need.keys().cloned().collect();
        let used: Vec<(String, i64)> =
            sqlx::query_as("SELECT subnet_id, count(*) FROM network_interfaces WHERE subnet_id = ANY($1) GROUP BY subnet_id")
                .bind(&ids)
                .fetch_all(&mut *conn)
                .await?;
        let used: HashMap<String, i64> = used.into_iter().collect();
        let fit = need
            .iter()
            .map(|(id, (per_instance, cidr))| {
                usable_addresses(cidr).saturating_sub(used.get(id).copied().unwrap_or(0) as u64) / per_instance
            })
            .min()
            .unwrap_or(u64::MAX);
        Ok(Some(fit.min(u64::from(u32::MAX)) as u32))
    }

    /// What a launch's new interfaces change for hosts other than its
    /// placement hosts: the VPC's hosts (a new remote interface, maybe a
    /// new peer) and those holding the members of its groups. Recorded for
    /// the network relay, no lock taken (see [`super::network_changes`]).
    pub(crate) fn launch_change(net: &LaunchNetwork) -> Change {
        Change { vpcs: BTreeSet::from([net.vpc_id.clone()]), members_of: net.groups(), rules_of: BTreeSet::new() }
    }

    /// Creates the interfaces of launched instances: addresses from their
    /// subnets (the UNIQUE (vpc, address) constraint settles any race), the
    /// groups, public addresses, tags. All or nothing with the launch.
    pub(crate) async fn attach_launch(
        &self,
        conn: &mut PgConnection,
        caller: &Caller,
        net: &LaunchNetwork,
        placed: &[Placed<'_>],
    ) -> Result<()> {
        let defaults =
            sqlx::query_as::<_, SubnetRow>(&format!("SELECT {SUBNET_COLUMNS} FROM subnets WHERE vpc_id = $1 AND default_for_az"))
                .bind(&net.vpc_id)
                .fetch_all(&mut *conn)
                .await?;
        let mut default_of: HashMap<String, SubnetInfo> = HashMap::new();
        for d in &defaults {
            default_of.insert(d.availability_zone.clone(), d.info()?);
        }
        struct NewNic {
            id: String,
            instance: String,
            device_index: i32,
            subnet: SubnetInfo,
            private_ip: Option<Ipv4Addr>,
            delete_on_termination: bool,
            public: bool,
        }
        let mut nics = Vec::new();
        for p in placed {
            for n in &net.nics {
                let subnet = match &n.subnet {
                    Some(s) => s.clone(),
                    None => default_of.get(p.zone).cloned().ok_or_else(|| {
                        ServiceError::InvalidParameterValue(format!("Availability zone {} has no default subnet; name a subnet", p.zone))
                    })?,
                };
                let public = net.nics.len() == 1 && n.public.unwrap_or(subnet.map_public);
                nics.push(NewNic {
                    id: ids::new_id(ids::NETWORK_INTERFACE),
                    instance: p.instance_id.to_string(),
                    device_index: n.device_index as i32,
                    subnet,
                    private_ip: n.private_ip,
                    delete_on_termination: n.delete_on_termination,
                    public,
                });
            }
        }
        // Addresses, per subnet: free ones from a random place in the subnet
        // on (concurrent launches into one subnet rarely want the same
        // address, so they do not wait for each other); a conflict (a
        // concurrent allocation, waited for by the insert) makes us pick
        // again, and each round settles at least one address.
        let mut by_subnet: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, n) in nics.iter().enumerate() {
            by_subnet.entry(n.subnet.id.clone()).or_default().push(i);
        }
        for (subnet_id, members) in by_subnet {
            let (fixed, mut auto): (Vec<usize>, Vec<usize>) = members.into_iter().partition(|i| nics[*i].private_ip.is_some());
            for i in fixed {
                let ip = nics[i].private_ip.map(|a| a.to_string()).unwrap_or_default();
                if insert_interfaces(conn, caller, &nics[i..=i].iter().map(|n| (n, ip.clone())).map(nic_row).collect::<Vec<_>>())
                    .await?
                    .is_empty()
                {
                    return Err(ServiceError::AddressInUse(format!("Address {ip} is in use.")));
                }
            }
            let mut rounds = 0;
            while !auto.is_empty() {
                rounds += 1;
                let free: Vec<(String,)> = sqlx::query_as(
                    "WITH s AS (SELECT network(cidr) AS net, (2::bigint ^ (32 - masklen(cidr)))::bigint - 2 AS last FROM subnets WHERE id = $1), \
                          r AS (SELECT 4 + floor(random() * (last - 3))::bigint AS start FROM s) \
                     SELECT host(c.a) FROM (SELECT set_masklen(s.net + n, 32) AS a FROM s, r, \
                         LATERAL (SELECT generate_series(r.start, s.last) UNION ALL SELECT generate_series(4, r.start - 1)) AS g(n)) c \
                     WHERE NOT EXISTS (SELECT 1 FROM network_interfaces x WHERE x.subnet_id = $1 AND x.private_ip = c.a) \
                     LIMIT $2",
                )
                .bind(&subnet_id)
                .bind(auto.len() as i64)
                .fetch_all(&mut *conn)
                .await?;
                if free.len() < auto.len() || rounds > 64 {
                    return Err(ServiceError::InsufficientFreeAddressesInSubnet(format!(
                        "There are not enough free addresses in subnet '{subnet_id}' to satisfy the requested number of instances."
                    )));
                }
                let rows: Vec<NicRowOwned> = auto.iter().zip(free).map(|(i, (ip,))| nic_row((&nics[*i], ip))).collect();
                let inserted = insert_interfaces(conn, caller, &rows).await?;
                auto.retain(|i| !inserted.contains(&nics[*i].id));
            }
        }
        // Groups.
        let (ifs, gs): (Vec<String>, Vec<String>) = nics
            .iter()
            .flat_map(|n| {
                let plan = net.nics.iter().find(|p| p.device_index as i32 == n.device_index);
                plan.map(|p| p.groups.clone()).unwrap_or_default().into_iter().map(move |g| (n.id.clone(), g))
            })
            .unzip();
        // A group deleted since the launch resolved it: the foreign key says so.
        sqlx::query("INSERT INTO network_interface_groups (interface_id, group_id) SELECT * FROM unnest($1::text[], $2::text[])")
            .bind(&ifs)
            .bind(&gs)
            .execute(&mut *conn)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.constraint() == Some("network_interface_groups_group_id_fkey") => {
                    ServiceError::GroupNotFound("A security group of the launch does not exist".into())
                }
                _ => e.into(),
            })?;
        super::network_changes::note(conn, &Self::launch_change(net)).await?;
        // Public addresses.
        let want: Vec<(Option<String>, Option<String>)> = nics.iter().filter(|n| n.public).map(|n| (None, Some(n.id.clone()))).collect();
        if !want.is_empty() {
            allocate_public(conn, self.pool()?, &caller.account_id, &want).await?;
        }
        let ids: Vec<String> = nics.iter().map(|n| n.id.clone()).collect();
        super::tags::insert_new_tags(conn, &caller.account_id, &ids, &net.nic_tags).await?;
        return Ok(());

        type NicRowOwned = (String, String, String, String, String, bool, i32);
        fn nic_row((n, ip): (&NewNic, String)) -> NicRowOwned {
            (n.id.clone(), n.instance.clone(), n.subnet.id.clone(), n.subnet.vpc_id.clone(), ip, n.delete_on_termination, n.device_index)
        }
        async fn insert_interfaces(conn: &mut PgConnection, caller: &Caller, rows: &[NicRowOwned]) -> Result<BTreeSet<String>> {
            let col = |f: fn(&NicRowOwned) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
            let (ids_, instances, subnets, vpcs, ips) = (col(|r| &r.0), col(|r| &r.1), col(|r| &r.2), col(|r| &r.3), col(|r| &r.4));
            let dots: Vec<bool> = rows.iter().map(|r| r.5).collect();
            let indexes: Vec<i32> = rows.iter().map(|r| r.6).collect();
            let macs: Vec<String> = rows.iter().map(|_| ids::new_mac()).collect();
            let attachments: Vec<String> = rows.iter().map(|_| ids::new_id(ids::ATTACHMENT)).collect();
            let done: Vec<(String,)> = sqlx::query_as(
                "INSERT INTO network_interfaces (id, account_id, instance_id, subnet_id, vpc_id, private_ip, delete_on_termination, \
                     device_index, mac, attachment_id, attached_at) \
                 SELECT id, $1, inst, sub, vpc, ip::inet, dot, idx, mac, att, now() \
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[], $8::int[], $9::text[], $10::text[]) \
                      AS t(id, inst, sub, vpc, ip, dot, idx, mac, att) \
                 ON CONFLICT ON CONSTRAINT network_interfaces_one_address DO NOTHING RETURNING id",
            )
            .bind(&caller.account_id)
            .bind(&ids_)
            .bind(&instances)
            .bind(&subnets)
            .bind(&vpcs)
            .bind(&ips)
            .bind(&dots)
            .bind(&indexes)
            .bind(&macs)
            .bind(&attachments)
            .fetch_all(&mut *conn)
            .await?;
            Ok(done.into_iter().map(|r| r.0).collect())
        }
    }

    /// Adds the network of each instance (its interfaces) to its view.
    pub(crate) async fn with_network(&self, caller: &Caller, instances: &mut [nimbus_proto::api::Instance]) -> Result<()> {
        if instances.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = instances.iter().map(|i| i.instance_id.clone()).collect();
        let mut by_instance: HashMap<String, Vec<NetworkInterface>> = HashMap::new();
        for n in self.interfaces(caller, None, Some(ids.as_slice())).await? {
            if let Some(a) = &n.attachment {
                by_instance.entry(a.instance_id.clone()).or_default().push(n);
            }
        }
        for i in instances {
            let nics = by_instance.remove(&i.instance_id).unwrap_or_default();
            if let Some(p) = nics.iter().find(|n| n.attachment.as_ref().is_some_and(|a| a.device_index == 0)) {
                i.private_ip_address = Some(p.private_ip_address.clone());
                i.private_dns_name = Some(p.private_dns_name.clone());
                i.public_ip_address = p.association.as_ref().map(|a| a.public_ip.clone());
                i.vpc_id = Some(p.vpc_id.clone());
                i.subnet_id = Some(p.subnet_id.clone());
            }
            let groups: BTreeSet<GroupRef> = nics.iter().flat_map(|n| n.groups.iter().cloned()).collect();
            i.security_groups = groups.into_iter().collect();
            i.network_interfaces = nics;
        }
        Ok(())
    }

    /// Replaces the security groups of an instance's primary interface
    /// (ModifyInstanceAttribute groupSet), in the caller's transaction,
    /// which holds the instance's row lock.
    pub(crate) async fn set_instance_groups(
        &self,
        conn: &mut PgConnection,
        caller: &Caller,
        instance_id: &str,
        group_ids: &[String],
    ) -> Result<()> {
        if group_ids.is_empty() {
            return Err(ServiceError::MissingParameter("GroupId".into()));
        }
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT n.id, n.vpc_id, i.host_id FROM network_interfaces n JOIN instances i ON i.id = n.instance_id \
             WHERE n.instance_id = $1 AND n.device_index = 0",
        )
        .bind(instance_id)
        .fetch_optional(&mut *conn)
        .await?;
        let (eni, vpc_id, host) =
            row.ok_or_else(|| ServiceError::IncorrectInstanceState(format!("The instance '{instance_id}' has no network interface")))?;
        let new = self.groups_in_vpc(caller, &vpc_id, group_ids, &[]).await?;
        if new.len() > MAX_GROUPS_PER_INTERFACE {
            return Err(ServiceError::SecurityGroupsPerInterfaceLimitExceeded(format!(
                "An interface has at most {MAX_GROUPS_PER_INTERFACE} security groups"
            )));
        }
        let old: Vec<(String,)> = sqlx::query_as("SELECT group_id FROM network_interface_groups WHERE interface_id = $1")
            .bind(&eni)
            .fetch_all(&mut *conn)
            .await?;
        let mut all: BTreeSet<String> = old.into_iter().map(|r| r.0).collect();
        all.extend(new.iter().cloned());
        let locked = lock_groups(conn, &all).await?;
        if let Some(gone) = new.iter().find(|g| !locked.contains(g)) {
            return Err(ServiceError::GroupNotFound(format!("The security group '{gone}' does not exist")));
        }
        sqlx::query("DELETE FROM network_interface_groups WHERE interface_id = $1").bind(&eni).execute(&mut *conn).await?;
        sqlx::query("INSERT INTO network_interface_groups (interface_id, group_id) SELECT $1, g FROM unnest($2::text[]) AS g")
            .bind(&eni)
            .bind(&new)
            .execute(&mut *conn)
            .await?;
        super::network_changes::note(conn, &Change { members_of: all, ..Default::default() }).await?;
        self.touch_instances(conn, &BTreeSet::from([host]), vec![instance_id.to_string()]).await
    }
}

async fn create_default_group(conn: &mut PgConnection, account_id: &str, vpc_id: &str) -> Result<()> {
    let id = ids::new_id(ids::SECURITY_GROUP);
    sqlx::query(
        "INSERT INTO security_groups (id, account_id, vpc_id, name, description, is_default) VALUES ($1, $2, $3, 'default', $4, true)",
    )
    .bind(&id)
    .bind(account_id)
    .bind(vpc_id)
    .bind(DEFAULT_GROUP_DESCRIPTION)
    .execute(&mut *conn)
    .await?;
    let from_self = RuleKey { protocol: "-1", from: -1, to: -1, cidr: None, peer: Some(id.clone()) };
    let anywhere = RuleKey { protocol: "-1", from: -1, to: -1, cidr: Some("0.0.0.0/0".into()), peer: None };
    insert_rules(conn, &id, false, &[from_self], None).await?;
    insert_rules(conn, &id, true, &[anywhere], None).await?;
    Ok(())
}

/// Inserts rules (each once: an existing one is skipped); returns those inserted.
async fn insert_rules(
    conn: &mut PgConnection,
    group_id: &str,
    egress: bool,
    keys: &[RuleKey],
    descriptions: Option<&[Option<String>]>,
) -> Result<Vec<SecurityGroupRule>> {
    let ids: Vec<String> = keys.iter().map(|_| ids::new_id(ids::SECURITY_GROUP_RULE)).collect();
    let protocols: Vec<&str> = keys.iter().map(|k| k.protocol).collect();
    let froms: Vec<i32> = keys.iter().map(|k| k.from).collect();
    let tos: Vec<i32> = keys.iter().map(|k| k.to).collect();
    let cidrs: Vec<Option<String>> = keys.iter().map(|k| k.cidr.clone()).collect();
    let peers: Vec<Option<String>> = keys.iter().map(|k| k.peer.clone()).collect();
    let descs: Vec<Option<String>> = descriptions.map(|d| d.to_vec()).unwrap_or_else(|| vec![None; keys.len()]);
    let rows = sqlx::query_as::<_, RuleRow>(&format!(
        "INSERT INTO security_group_rules (id, group_id, egress, protocol, from_port, to_port, cidr, peer_group_id, description) \
         SELECT id, $2, $3, p, f, t, c::cidr, g, d FROM unnest($1::text[], $4::text[], $5::int[], $6::int[], $7::text[], $8::text[], $9::text[]) \
              AS r(id, p, f, t, c, g, d) \
         ON CONFLICT ON CONSTRAINT security_group_rules_unique DO NOTHING RETURNING {RULE_COLUMNS}"
    ))
    .bind(&ids)
    .bind(group_id)
    .bind(egress)
    .bind(&protocols)
    .bind(&froms)
    .bind(&tos)
    .bind(&cidrs)
    .bind(&peers)
    .bind(&descs)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let k = r.key()?;
            Ok(rule_view(r.id.clone(), &r.group_id, r.egress, &k, r.description.clone()))
        })
        .collect()
}

/// Takes public addresses from the pool, one per `(allocation id,
/// interface)` wanted: random free ones (concurrent allocators rarely
/// collide; a collision only makes us pick again; the primary key settles
/// it). Returns the addresses in order.
async fn allocate_public(
    conn: &mut PgConnection,
    pool: Cidr,
    account_id: &str,
    wanted: &[(Option<String>, Option<String>)],
) -> Result<Vec<String>> {
    let (first, last) = if pool.prefix >= 31 { (0, pool.size() - 1) } else { (1, pool.size() - 2) };
    let mut out: Vec<Option<String>> = vec![None; wanted.len()];
    for _ in 0..8 {
        let todo: Vec<usize> = (0..wanted.len()).filter(|i| out[*i].is_none()).collect();
        if todo.is_empty() {
            break;
        }
        let free: Vec<(String,)> = sqlx::query_as(
            "SELECT host(c.a) FROM (SELECT set_masklen($1::cidr + n, 32) AS a FROM generate_series($2::bigint, $3::bigint) AS n) c \
             WHERE NOT EXISTS (SELECT 1 FROM public_addresses p WHERE p.public_ip = c.a) ORDER BY random() LIMIT $4",
        )
        .bind(pool.to_string())
        .bind(first as i64)
        .bind(last as i64)
        .bind(todo.len() as i64)
        .fetch_all(&mut *conn)
        .await?;
        if free.len() < todo.len() {
            return Err(ServiceError::InsufficientAddressCapacity("There are no free addresses left in the public address pool".into()));
        }
        let mut ips: Vec<String> = free.into_iter().map(|r| r.0).collect();
        ips.sort();
        let allocs: Vec<Option<String>> = todo.iter().map(|i| wanted[*i].0.clone()).collect();
        let enis: Vec<Option<String>> = todo.iter().map(|i| wanted[*i].1.clone()).collect();
        let inserted: Vec<(String,)> = sqlx::query_as(
            "INSERT INTO public_addresses (public_ip, account_id, allocation_id, network_interface_id) \
             SELECT ip::inet, $1, a, e FROM unnest($2::text[], $3::text[], $4::text[]) AS t(ip, a, e) \
             ON CONFLICT (public_ip) DO NOTHING RETURNING host(public_ip)",
        )
        .bind(account_id)
        .bind(&ips)
        .bind(&allocs)
        .bind(&enis)
        .fetch_all(&mut *conn)
        .await?;
        for (k, i) in todo.iter().enumerate() {
            if inserted.iter().any(|r| r.0 == ips[k]) {
                out[*i] = Some(ips[k].clone());
            }
        }
    }
    out.into_iter()
        .map(|o| o.ok_or_else(|| ServiceError::InsufficientAddressCapacity("The public address pool is contended; try again".into())))
        .collect()
}

/// Frees the interfaces of instances whose host confirmed they are gone
/// (the report transaction, which holds their rows): those with
/// DeleteOnTermination are deleted (their address returns to the subnet),
/// the others detached; addresses assigned at launch return to the pool,
/// Elastic IPs on deleted interfaces are disassociated. Records what other
/// hosts must learn for the network relay; returns the hosts to bump now
/// (the reporting host, when anything changed).
pub(crate) async fn release_interfaces(conn: &mut PgConnection, instances: &[String], host_id: &str) -> Result<BTreeSet<String>> {
    let rows: Vec<(String, String, bool, String)> = sqlx::query_as(
        "SELECT id, vpc_id, delete_on_termination, account_id FROM network_interfaces WHERE instance_id = ANY($1) ORDER BY id",
    )
    .bind(instances)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(BTreeSet::new());
    }
    let all: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let vpcs: BTreeSet<String> = rows.iter().map(|r| r.1.clone()).collect();
    let accounts: Vec<String> = rows.iter().map(|r| r.3.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let groups: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT group_id FROM network_interface_groups WHERE interface_id = ANY($1)")
        .bind(&all)
        .fetch_all(&mut *conn)
        .await?;
    let groups: BTreeSet<String> = groups.into_iter().map(|r| r.0).collect();
    sqlx::query("SELECT 1 FROM network_interfaces WHERE id = ANY($1) ORDER BY id FOR UPDATE").bind(&all).execute(&mut *conn).await?;
    let (doomed, kept): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.2);
    let doomed: Vec<String> = doomed.into_iter().map(|r| r.0).collect();
    let kept: Vec<String> = kept.into_iter().map(|r| r.0).collect();
    sqlx::query("DELETE FROM public_addresses WHERE network_interface_id = ANY($1) AND allocation_id IS NULL")
        .bind(&all)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE public_addresses SET network_interface_id = NULL, association_id = NULL WHERE network_interface_id = ANY($1)")
        .bind(&doomed)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM network_interfaces WHERE id = ANY($1)").bind(&doomed).execute(&mut *conn).await?;
    sqlx::query("DELETE FROM tags WHERE account_id = ANY($1) AND resource_id = ANY($2)")
        .bind(&accounts)
        .bind(&doomed)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE network_interfaces SET instance_id = NULL, device_index = NULL, attachment_id = NULL, attached_at = NULL WHERE id = ANY($1)",
    )
    .bind(&kept)
    .execute(&mut *conn)
    .await?;
    super::network_changes::note(conn, &Change { vpcs, members_of: groups, rules_of: BTreeSet::new() }).await?;
    Ok(BTreeSet::from([host_id.to_string()]))
}

/// A host's share of the network and its instances' interfaces (by
/// instance id): five set-based queries, whatever the number of interfaces.
/// A host without the VPC data plane (no underlay address: its guests are on
/// QEMU user-mode networking) gets its interfaces only: it programs no
/// network, and the rest costs queries over the whole VPC.
pub(crate) async fn host_network(
    conn: &mut PgConnection,
    host_id: &str,
    data_plane: bool,
) -> Result<(HostNetwork, HashMap<String, Vec<Nic>>)> {
    type NicRow = (String, String, i32, String, String, String, String, String, i32, Option<String>, Vec<String>);
    let rows: Vec<NicRow> = sqlx::query_as(
        "SELECT n.instance_id, n.id, n.device_index, n.mac, host(n.private_ip), s.id, s.cidr::text, n.vpc_id, v.vni, host(p.public_ip), \
                ARRAY(SELECT g.group_id FROM network_interface_groups g WHERE g.interface_id = n.id ORDER BY g.group_id) \
         FROM network_interfaces n JOIN instances i ON i.id = n.instance_id JOIN subnets s ON s.id = n.subnet_id \
         JOIN vpcs v ON v.id = n.vpc_id LEFT JOIN public_addresses p ON p.network_interface_id = n.id \
         WHERE i.host_id = $1 ORDER BY n.instance_id, n.device_index",
    )
    .bind(host_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut nics: HashMap<String, Vec<Nic>> = HashMap::new();
    let mut vpc_ids = BTreeSet::new();
    let mut group_ids = BTreeSet::new();
    for (instance, eni, idx, mac, ip, subnet_id, cidr, vpc_id, vni, public, groups) in rows {
        let subnet = db_cidr(&cidr)?;
        vpc_ids.insert(vpc_id.clone());
        group_ids.extend(groups.iter().cloned());
        nics.entry(instance).or_default().push(Nic {
            eni_id: eni,
            device_index: idx as u32,
            mac,
            private_ip: db_ip(&ip)?,
            gateway: subnet.nth(1).ok_or_else(|| ServiceError::Internal(format!("subnet {subnet_id} has no first host address")))?,
            subnet,
            vpc_id,
            vni: vni as u32,
            public_ip: public.as_deref().map(db_ip).transpose()?,
            group_ids: groups,
        });
    }
    let mut net = HostNetwork::default();
    if vpc_ids.is_empty() || !data_plane {
        return Ok((net, nics));
    }
    let vpc_list: Vec<String> = vpc_ids.into_iter().collect();
    let subnets: Vec<(String, i32, String, String, String)> = sqlx::query_as(
        "SELECT v.id, v.vni, v.cidr::text, s.id, s.cidr::text FROM vpcs v JOIN subnets s ON s.vpc_id = v.id WHERE v.id = ANY($1) ORDER BY v.id, s.cidr",
    )
    .bind(&vpc_list)
    .fetch_all(&mut *conn)
    .await?;
    // The VPCs' interfaces on other hosts with the VPC data plane: their
    // hosts are the peers, and each is a static neighbour on this host.
    let remote: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT n.vpc_id, host(n.private_ip), n.mac, host(h.underlay_ip) FROM network_interfaces n \
         JOIN instances i ON i.id = n.instance_id JOIN hosts h ON h.id = i.host_id \
         WHERE n.vpc_id = ANY($1) AND i.host_id <> $2 AND h.underlay_ip IS NOT NULL ORDER BY 1, 2",
    )
    .bind(&vpc_list)
    .bind(host_id)
    .fetch_all(&mut *conn)
    .await?;
    for (vpc_id, vni, cidr, subnet_id, subnet_cidr) in subnets {
        if net.vpcs.last().is_none_or(|v: &VpcOnHost| v.vpc_id != vpc_id) {
            net.vpcs.push(VpcOnHost {
                vpc_id: vpc_id.clone(),
                vni: vni as u32,
                cidr: db_cidr(&cidr)?,
                subnets: vec![],
                peers: vec![],
                remote_nics: vec![],
            });
        }
        let c = db_cidr(&subnet_cidr)?;
        if let Some(v) = net.vpcs.last_mut() {
            v.subnets.push(SubnetOnHost { subnet_id, cidr: c, gateway: c.nth(1).unwrap_or(c.addr) });
        }
    }
    for (vpc_id, ip, mac, underlay) in remote {
        if let Some(v) = net.vpcs.iter_mut().find(|v| v.vpc_id == vpc_id) {
            let host = db_ip(&underlay)?;
            if !v.peers.contains(&host) {
                v.peers.push(host);
            }
            v.remote_nics.push(wire::RemoteNic { ip: db_ip(&ip)?, mac, host });
        }
    }
    for v in &mut net.vpcs {
        v.peers.sort();
    }
    let group_list: Vec<String> = group_ids.iter().cloned().collect();
    type GroupRuleRow = (String, String, Option<bool>, Option<String>, Option<i32>, Option<i32>, Option<String>, Option<String>);
    let rules: Vec<GroupRuleRow> = sqlx::query_as(
        "SELECT g.id, g.vpc_id, r.egress, r.protocol, r.from_port, r.to_port, r.cidr::text, r.peer_group_id \
         FROM security_groups g LEFT JOIN security_group_rules r ON r.group_id = g.id WHERE g.id = ANY($1) \
         ORDER BY g.id, r.egress, r.protocol, r.from_port, r.to_port, r.cidr, r.peer_group_id",
    )
    .bind(&group_list)
    .fetch_all(&mut *conn)
    .await?;
    let mut named = group_ids.clone();
    for (group_id, vpc_id, egress, protocol, from, to, cidr, peer) in rules {
        if net.groups.last().is_none_or(|g: &wire::SecurityGroup| g.group_id != group_id) {
            net.groups.push(wire::SecurityGroup { group_id: group_id.clone(), vpc_id, ingress: vec![], egress: vec![] });
        }
        let (Some(egress), Some(protocol), Some(from), Some(to)) = (egress, protocol, from, to) else { continue };
        if let Some(p) = &peer {
            named.insert(p.clone());
        }
        let rule = RuleKey { protocol: protocol_of(&protocol)?, from, to, cidr, peer }.to_wire()?;
        if let Some(g) = net.groups.last_mut() {
            if egress {
                g.egress.push(rule)
            } else {
                g.ingress.push(rule)
            }
        }
    }
    let named: Vec<String> = named.into_iter().collect();
    let members: Vec<(String, String)> = sqlx::query_as(
        "SELECT ng.group_id, host(n.private_ip) FROM network_interface_groups ng JOIN network_interfaces n ON n.id = ng.interface_id \
         WHERE ng.group_id = ANY($1) AND n.instance_id IS NOT NULL ORDER BY ng.group_id, n.private_ip",
    )
    .bind(&named)
    .fetch_all(&mut *conn)
    .await?;
    for g in &named {
        net.members.insert(g.clone(), Vec::new());
    }
    for (g, ip) in members {
        net.members.entry(g).or_default().push(db_ip(&ip)?);
    }
    Ok((net, nics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_ec2_filters() {
        assert!(glob("web-*", "web-1") && glob("*", "") && glob("a?c", "abc") && glob("172.31.*", "172.31.0.0/20"));
        assert!(!glob("web-*", "db-1") && !glob("a?c", "ac") && !glob("abc", "abcd"));
    }

    #[test]
    fn reserved_addresses_are_the_first_four_and_the_last() {
        let c = Cidr::parse("10.0.0.0/28").unwrap();
        assert_eq!(usable_addresses(&c), 11);
        for n in [0, 1, 2, 3, 15] {
            assert!(is_reserved(&c, c.nth(n).unwrap()), "{n}");
        }
        for n in 4..15 {
            assert!(!is_reserved(&c, c.nth(n).unwrap()), "{n}");
        }
    }

    #[test]
    fn permissions_are_checked_as_ec2_checks_them() {
        assert_eq!(protocol_of("6").unwrap(), "tcp");
        assert_eq!(protocol_of("ALL").unwrap(), "-1");
        assert!(protocol_of("47").is_err());
        assert_eq!(ports_of("tcp", Some(22), Some(22)).unwrap(), (22, 22));
        assert!(ports_of("tcp", Some(22), None).is_err());
        assert!(ports_of("udp", Some(100), Some(99)).is_err());
        assert!(ports_of("tcp", Some(0), Some(65536)).is_err());
        assert_eq!(ports_of("-1", Some(5), Some(6)).unwrap(), (-1, -1));
        assert_eq!(ports_of("icmp", Some(-1), Some(3)).unwrap(), (-1, -1));
        assert_eq!(ports_of("icmp", Some(8), Some(-1)).unwrap(), (8, -1));
        let k = RuleKey { protocol: "icmp", from: 8, to: -1, cidr: Some("0.0.0.0/0".into()), peer: None };
        assert_eq!(k.to_wire().unwrap().ports, Some((8, wire::ANY_ICMP_CODE)));
        let k = RuleKey { protocol: "-1", from: -1, to: -1, cidr: None, peer: Some("sg-1".into()) };
        assert_eq!(k.to_wire().unwrap(), Rule { protocol: Protocol::All, ports: None, peer: Peer::Group("sg-1".into()) });
    }

    #[test]
    fn filters_need_every_name_to_match_one_value() {
        let facts = [("vpc-id", "vpc-1".to_string()), ("is-default", "true".to_string())];
        let tags = [ResourceTag { key: "Name".into(), value: "main".into() }];
        let f = |v: Vec<(&str, Vec<&str>)>| -> Filters {
            v.into_iter().map(|(n, vs)| (n.to_string(), vs.into_iter().map(String::from).collect())).collect()
        };
        assert!(passes(&f(vec![("vpc-id", vec!["vpc-2", "vpc-1"]), ("tag:Name", vec!["m*"])]), &facts, &tags));
        assert!(!passes(&f(vec![("vpc-id", vec!["vpc-1"]), ("is-default", vec!["false"])]), &facts, &tags));
        assert!(passes(&f(vec![("tag-key", vec!["Name"])]), &facts, &tags));
        assert!(check_filter_names(&f(vec![("bogus", vec![])]), &["vpc-id"]).is_err());
    }
}
