//! The host's share of the VPC network, as the control plane tells an agent.
//!
//! Level-triggered like the rest of the agent protocol: every
//! [`crate::agent::Assignments`] answer carries the whole [`HostNetwork`] of
//! the host (the VPCs its instances' interfaces are in, their peers, the
//! security groups of its interfaces and the members of the groups those
//! rules name), and each [`crate::agent::Assignment`] its instance's
//! interfaces ([`Nic`]). The agent makes the host match it on every pass;
//! nothing is sent as an event that could be lost.
//!
//! Group references stay references: a rule "from sg-X" names the group, and
//! the group's member addresses travel once per group in
//! [`HostNetwork::members`], not once per rule (Neutron's known failure: the
//! default group's rules expanded per address made RPC messages of hundreds
//! of megabytes).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// One network interface of an instance, as its host must plumb it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Nic {
    /// `eni-...`.
    pub eni_id: String,
    /// 0 for the primary interface.
    pub device_index: u32,
    /// `02:xx:xx:xx:xx:xx` (locally administered, unicast).
    pub mac: String,
    pub private_ip: Ipv4Addr,
    /// The subnet's network address and prefix length.
    pub subnet: Cidr,
    /// The subnet's first host address: the VPC router, answered on every host.
    pub gateway: Ipv4Addr,
    pub vpc_id: String,
    /// The VPC's VXLAN network identifier (1 to 16,777,215).
    pub vni: u32,
    /// The public (or Elastic) address mapped to `private_ip`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<Ipv4Addr>,
    /// Security groups of the interface (`sg-...`), at least one.
    pub group_ids: Vec<String>,
}

/// An IPv4 network: address and prefix length (`172.31.0.0/20`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`; the address must be the network's (no host bits set).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = s.split_once('/')?;
        let addr: Ipv4Addr = a.parse().ok()?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let prefix: u8 = p.parse().ok()?;
        let c = Cidr { addr, prefix };
        (prefix <= 32 && c.network() == addr).then_some(c)
    }

    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// Whether `other` lies wholly inside this network.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.covers(other) || other.covers(self)
    }

    /// The number of addresses in the network.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The `n`th address of the network (0 is the network address).
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.network()).wrapping_add(n as u32)))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Everything a host needs beyond its instances' own interfaces.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostNetwork {
    /// The VPCs that have an interface on this host.
    pub vpcs: Vec<VpcOnHost>,
    /// The security groups of this host's interfaces.
    pub groups: Vec<SecurityGroup>,
    /// Member private addresses of every group that a rule in `groups` names
    /// as its source or destination (and of the groups themselves), per group id.
    pub members: BTreeMap<String, Vec<Ipv4Addr>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VpcOnHost {
    pub vpc_id: String,
    pub vni: u32,
    pub cidr: Cidr,
    /// Every subnet of the VPC with its router address (the first host
    /// address): the host routes between them.
    pub subnets: Vec<SubnetOnHost>,
    /// Underlay addresses of the other hosts that have interfaces in this VPC.
    pub peers: Vec<Ipv4Addr>,
    /// The VPC's interfaces on other hosts: the host routes to them without
    /// ARP across the VXLAN (the router's addresses are the same on every
    /// host, so router ARP must stay local) and forwards to their MACs
    /// without flooding.
    #[serde(default)]
    pub remote_nics: Vec<RemoteNic>,
}

/// An interface of the VPC on another host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteNic {
    pub ip: Ipv4Addr,
    pub mac: String,
    /// The underlay address of its host.
    pub host: Ipv4Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubnetOnHost {
    pub subnet_id: String,
    pub cidr: Cidr,
    pub gateway: Ipv4Addr,
}

/// A security group: stateful; everything not allowed is dropped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecurityGroup {
    pub group_id: String,
    pub vpc_id: String,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

/// The code of an ICMP rule that allows every code of its type (EC2's -1;
/// no real code, which is one byte).
pub const ANY_ICMP_CODE: u16 = u16::MAX;

/// One allow rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub protocol: Protocol,
    /// Port range (TCP/UDP), or ICMP type (`from`) and code (`to`); `None`: all.
    /// An ICMP rule for one type and every code has `to` = [`ANY_ICMP_CODE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<(u16, u16)>,
    /// The peer: the source of an ingress rule, the destination of an egress one.
    pub peer: Peer,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// EC2's `-1`.
    All,
    Tcp,
    Udp,
    Icmp,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    Cidr(Cidr),
    /// Members of a security group (their addresses are in [`HostNetwork::members`]).
    Group(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_strictly_and_compare() {
        let vpc = Cidr::parse("172.31.0.0/16").unwrap();
        let sub = Cidr::parse("172.31.16.0/20").unwrap();
        assert!(vpc.covers(&sub) && !sub.covers(&vpc) && vpc.overlaps(&sub));
        assert!(!sub.overlaps(&Cidr::parse("172.31.32.0/20").unwrap()));
        for bad in ["172.31.0.1/16", "172.31.0.0", "172.31.0.0/33", "172.31.0.0/", "x/16", "172.31.0.0/+1", "172.31.0.0/016"] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
        assert_eq!(sub.size(), 4096);
        assert_eq!(sub.nth(1), Some(Ipv4Addr::new(172, 31, 16, 1)));
        assert_eq!(sub.nth(4095), Some(Ipv4Addr::new(172, 31, 31, 255)));
        assert_eq!(sub.nth(4096), None);
        assert!(sub.contains(Ipv4Addr::new(172, 31, 31, 200)) && !sub.contains(Ipv4Addr::new(172, 31, 32, 0)));
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().mask(), 0);
        assert_eq!(sub.to_string(), "172.31.16.0/20");
    }

    #[test]
    fn a_host_network_round_trips_as_json() {
        let mut members = BTreeMap::new();
        members.insert("sg-1".to_string(), vec![Ipv4Addr::new(172, 31, 0, 5)]);
        let n = HostNetwork {
            vpcs: vec![VpcOnHost {
                vpc_id: "vpc-1".into(),
                vni: 7,
                cidr: Cidr::parse("172.31.0.0/16").unwrap(),
                subnets: vec![SubnetOnHost {
                    subnet_id: "subnet-1".into(),
                    cidr: Cidr::parse("172.31.0.0/20").unwrap(),
                    gateway: Ipv4Addr::new(172, 31, 0, 1),
                }],
                peers: vec![Ipv4Addr::new(10, 0, 0, 2)],
                remote_nics: vec![RemoteNic {
                    ip: Ipv4Addr::new(172, 31, 0, 9),
                    mac: "02:00:00:00:00:09".into(),
                    host: Ipv4Addr::new(10, 0, 0, 2),
                }],
            }],
            groups: vec![SecurityGroup {
                group_id: "sg-1".into(),
                vpc_id: "vpc-1".into(),
                ingress: vec![
                    Rule { protocol: Protocol::Tcp, ports: Some((22, 22)), peer: Peer::Cidr(Cidr::parse("0.0.0.0/0").unwrap()) },
                    Rule { protocol: Protocol::All, ports: None, peer: Peer::Group("sg-1".into()) },
                ],
                egress: vec![Rule { protocol: Protocol::All, ports: None, peer: Peer::Cidr(Cidr::parse("0.0.0.0/0").unwrap()) }],
            }],
            members,
        };
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<HostNetwork>(&json).unwrap(), n);
    }
}
