//! The network of a launch: resolved before its transaction
//! ([`Service::resolve_launch_network`]: the interfaces asked for, or one
//! from the instance-level subnet, groups and addresses; their subnets,
//! which fix the zone and must be in one VPC; their groups, each the
//! caller's and in that VPC; a fixed private address inside its subnet and
//! not reserved), then created in it ([`Service::attach_launch`]: free
//! addresses of each subnet from a random place on, the zone's default
//! subnet when none was named, a MAC `02:` + random, the groups, a public
//! address from the pool when asked or when the subnet maps one, the
//! interfaces' tags), the change recorded for the relay: no VPC or group
//! is locked.

use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::network::addresses::allocate_public;
use crate::service::network::relay::{self, Change};
use crate::service::network::subnets::{is_reserved, SubnetInfo, SubnetRow, SUBNET_COLUMNS};
use crate::service::network::util::{check_id, distinct};
use crate::service::network::{usable_addresses, MAX_GROUPS_PER_INTERFACE, MAX_INTERFACES};
use crate::service::{Caller, Service};
use nimbus_proto::api::RunInstancesRequest;
use nimbus_proto::network::Cidr;
use sqlx::PgConnection;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

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
        crate::service::tags::validate_tags(&nic_tags)?;
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
    /// the network relay, no lock taken (see [`relay`]).
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
                let rows: Vec<NicInsert> = auto.iter().zip(free).map(|(i, (ip,))| nic_row((&nics[*i], ip))).collect();
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
            .map_err(|e| {
                if crate::db::Constraint::InterfaceGroupExists.violated_by(&e) {
                    ServiceError::GroupNotFound("A security group of the launch does not exist".into())
                } else {
                    e.into()
                }
            })?;
        relay::note(conn, &Self::launch_change(net)).await?;
        // Public addresses.
        let want: Vec<(Option<String>, Option<String>)> = nics.iter().filter(|n| n.public).map(|n| (None, Some(n.id.clone()))).collect();
        if !want.is_empty() {
            allocate_public(conn, self.pool()?, &caller.account_id, &want).await?;
        }
        let ids: Vec<String> = nics.iter().map(|n| n.id.clone()).collect();
        crate::service::tags::insert_new_tags(conn, &caller.account_id, &ids, &net.nic_tags).await?;
        return Ok(());

        /// One interface row to insert, its address chosen.
        struct NicInsert {
            id: String,
            instance_id: String,
            subnet_id: String,
            vpc_id: String,
            private_ip: String,
            delete_on_termination: bool,
            device_index: i32,
        }
        fn nic_row((n, ip): (&NewNic, String)) -> NicInsert {
            NicInsert {
                id: n.id.clone(),
                instance_id: n.instance.clone(),
                subnet_id: n.subnet.id.clone(),
                vpc_id: n.subnet.vpc_id.clone(),
                private_ip: ip,
                delete_on_termination: n.delete_on_termination,
                device_index: n.device_index,
            }
        }
        async fn insert_interfaces(conn: &mut PgConnection, caller: &Caller, rows: &[NicInsert]) -> Result<BTreeSet<String>> {
            let col = |f: fn(&NicInsert) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
            let (ids_, instances, subnets, vpcs, ips) =
                (col(|r| &r.id), col(|r| &r.instance_id), col(|r| &r.subnet_id), col(|r| &r.vpc_id), col(|r| &r.private_ip));
            let dots: Vec<bool> = rows.iter().map(|r| r.delete_on_termination).collect();
            let indexes: Vec<i32> = rows.iter().map(|r| r.device_index).collect();
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
}
