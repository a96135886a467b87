//! The agent's view of the network: each host's [`HostNetwork`] (the VPCs
//! with an interface on it, their subnets, peers and remote interfaces, the
//! security groups of its interfaces with their rules, the members of
//! those groups and of every group their rules name) and its instances'
//! interfaces, sent in every assignments answer. Computed in the caller's
//! snapshot (the assignments transaction, `REPEATABLE READ`) by five
//! set-based queries whatever the number of interfaces.

use super::rules::{protocol_of, RuleKey};
use super::util::{db_cidr, db_ip};
use crate::error::{Result, ServiceError};
use nimbus_proto::network::{self as wire, HostNetwork, Nic, SubnetOnHost, VpcOnHost};
use sqlx::PgConnection;
use std::collections::{BTreeSet, HashMap};

/// One interface on the host, with its subnet, VPC, public address and groups.
#[derive(sqlx::FromRow)]
struct NicRow {
    instance_id: String,
    eni_id: String,
    device_index: i32,
    mac: String,
    private_ip: String,
    subnet_id: String,
    subnet_cidr: String,
    vpc_id: String,
    vni: i32,
    public_ip: Option<String>,
    group_ids: Vec<String>,
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
    let rows: Vec<NicRow> = sqlx::query_as(
        "SELECT n.instance_id, n.id AS eni_id, n.device_index, n.mac, host(n.private_ip) AS private_ip, s.id AS subnet_id, \
                s.cidr::text AS subnet_cidr, n.vpc_id, v.vni, host(p.public_ip) AS public_ip, \
                ARRAY(SELECT g.group_id FROM network_interface_groups g WHERE g.interface_id = n.id ORDER BY g.group_id) AS group_ids \
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
    for NicRow {
        instance_id: instance,
        eni_id: eni,
        device_index: idx,
        mac,
        private_ip: ip,
        subnet_id,
        subnet_cidr: cidr,
        vpc_id,
        vni,
        public_ip: public,
        group_ids: groups,
    } in rows
    {
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
