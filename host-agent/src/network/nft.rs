//! The nftables ruleset of one VPC's namespace on a host, rendered from
//! typed data (as domain XML is), and replaced as a whole in one `nft -f`
//! transaction: a packet meets either the old rules or the new ones.
//!
//! Three tables:
//! - `inet nimbus`: security groups, stateful. Bridged IPv4 (guest to guest,
//!   through `br_netfilter`) and routed IPv4 (other subnets, the public leg)
//!   both pass the forward hook, where conntrack works. Established and
//!   related packets pass first; a new flow from a local interface must match
//!   an egress rule of its groups, a new flow to a local interface an ingress
//!   rule of its groups. Flows whose other end is on another host are checked
//!   there. Interfaces with the same groups share one pair of chains, and a
//!   group named by a rule is a set of member addresses: the ruleset grows
//!   with groups and rules, not with interfaces times rules.
//! - `ip nimbus_nat`: a public address is DNATed to its interface's private
//!   address on the way in and SNATed back on the way out; an interface
//!   without one cannot leave through the public leg.
//! - `bridge nimbus_guard`: anti-spoofing on every guest's bridge port (its own MAC,
//!   its own address in IPv4 and ARP, nothing but IPv4 and ARP, no IPv4
//!   broadcast or multicast: as in EC2, a VPC carries unicast only); the
//!   same for what arrives over the VXLAN (only the pairs of MAC and
//!   address the VPC's other hosts hold: their interfaces', and their
//!   routers' MACs with their interfaces' addresses, for traffic they
//!   routed; see [`render_host`] for who may send on the VXLAN at all);
//!   and no ARP about the VPC router's addresses crosses the VXLAN (each
//!   host answers for the router itself).
//!
//! Addresses are trustworthy in the first two tables because the third drops
//! anything a guest or a peer sends from another address, and the forward
//! hook drops what arrives from the public side with a source inside the
//! VPC or a martian or private source (unless the operator allows that
//! outside range), before conntrack can let it through.

use nimbus_proto::network::{Cidr, Peer, Protocol, Rule, SecurityGroup};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::Ipv4Addr;

/// One local interface, as the ruleset sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNic {
    /// The interface's port on the bridge.
    pub port: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub public_ip: Option<Ipv4Addr>,
    pub group_ids: Vec<String>,
}

/// Everything one VPC namespace's ruleset is made of.
#[derive(Debug, Clone)]
pub struct VpcRules<'a> {
    pub nics: &'a [LocalNic],
    pub groups: &'a BTreeMap<String, SecurityGroup>,
    pub members: &'a BTreeMap<String, Vec<Ipv4Addr>>,
    /// The VPC's address range: never a source from the public side.
    pub vpc_cidr: Cidr,
    /// The VPC's subnets (their broadcast addresses are dropped).
    pub subnets: &'a [Cidr],
    /// The router's addresses (one per subnet).
    pub gateways: &'a [Ipv4Addr],
    /// (MAC, address) pairs that may arrive over the VXLAN: each remote
    /// interface's own, and its host's router MAC with its address.
    pub remote: &'a [(String, Ipv4Addr)],
    /// Private ranges the operator lets reach public addresses from
    /// outside (martian and private sources are dropped otherwise).
    pub outside_allow: &'a [Cidr],
    /// The metadata service's address, answered in the namespace.
    pub metadata: Ipv4Addr,
    pub bridge: &'a str,
    pub vxlan: &'a str,
    /// The public leg (veth to the host's namespace).
    pub public: &'a str,
}

/// Sources that never come from the outside: "this network", private
/// ranges (RFC 1918, shared address space), loopback, link-local, and
/// multicast and reserved (224.0.0.0/3).
pub const MARTIANS: &[&str] =
    &["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3"];

/// An nft set name for a group (`sg-0abc…` → `m_0abc…`).
fn set_name(group_id: &str) -> String {
    format!("m_{}", group_id.trim_start_matches("sg-").replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
}

fn elements<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if v.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", v.join(", "))
    }
}

/// The match of one rule (without its verdict). `dir` is `saddr` for
/// ingress (the peer is the source), `daddr` for egress.
fn rule_match(r: &Rule, dir: &str) -> String {
    let mut m = String::new();
    match &r.peer {
        Peer::Cidr(c) if c.prefix == 0 => {}
        Peer::Cidr(c) => write!(m, "ip {dir} {c} ").unwrap_or(()),
        Peer::Group(g) => write!(m, "ip {dir} @{} ", set_name(g)).unwrap_or(()),
    }
    match (r.protocol, r.ports) {
        (Protocol::All, _) => {}
        (Protocol::Tcp, None) => m.push_str("meta l4proto tcp "),
        (Protocol::Udp, None) => m.push_str("meta l4proto udp "),
        (Protocol::Icmp, None) => m.push_str("meta l4proto icmp "),
        (p @ (Protocol::Tcp | Protocol::Udp), Some((from, to))) => {
            let proto = if p == Protocol::Tcp { "tcp" } else { "udp" };
            if from == to {
                write!(m, "{proto} dport {from} ").unwrap_or(());
            } else {
                write!(m, "{proto} dport {from}-{to} ").unwrap_or(());
            }
        }
        // ICMP: (type, code); a code above 255 means any code of the type.
        (Protocol::Icmp, Some((ty, code))) => {
            write!(m, "icmp type {ty} ").unwrap_or(());
            if code <= 255 {
                write!(m, "icmp code {code} ").unwrap_or(());
            }
        }
    }
    m
}

/// Renders the whole script: the three tables, created if missing, deleted
/// and declared anew (one transaction).
pub fn render(v: &VpcRules<'_>) -> String {
    let mut s = String::new();
    for t in ["inet nimbus", "ip nimbus_nat", "bridge nimbus_guard"] {
        let _ = writeln!(s, "table {t}\ndelete table {t}");
    }

    // ---- security groups -------------------------------------------------------
    // Interfaces sharing a set of groups share chains eg_N / in_N.
    let mut sets: BTreeMap<BTreeSet<&str>, usize> = BTreeMap::new();
    for n in v.nics {
        let key: BTreeSet<&str> = n.group_ids.iter().map(String::as_str).collect();
        let next = sets.len();
        sets.entry(key).or_insert(next);
    }
    // Every group named by a rule of a local interface's groups, and the groups themselves.
    let mut named: BTreeSet<&str> = BTreeSet::new();
    for g in v.nics.iter().flat_map(|n| n.group_ids.iter()).filter_map(|g| v.groups.get(g)) {
        for r in g.ingress.iter().chain(g.egress.iter()) {
            if let Peer::Group(p) = &r.peer {
                named.insert(p);
            }
        }
    }
    let _ = writeln!(s, "table inet nimbus {{");
    for g in &named {
        let members = v.members.get(*g).map(Vec::as_slice).unwrap_or(&[]);
        let _ = writeln!(s, "  set {} {{ type ipv4_addr;{} }}", set_name(g), elements(members));
    }
    let natted: Vec<Ipv4Addr> = v.nics.iter().filter(|n| n.public_ip.is_some()).map(|n| n.ip).collect();
    let _ = writeln!(s, "  set natted {{ type ipv4_addr;{} }}", elements(&natted));
    for (groups, i) in &sets {
        let rules = |ingress: bool| -> BTreeSet<String> {
            groups
                .iter()
                .filter_map(|g| v.groups.get(*g))
                .flat_map(|g| if ingress { g.ingress.iter() } else { g.egress.iter() })
                .map(|r| rule_match(r, if ingress { "saddr" } else { "daddr" }))
                .collect()
        };
        let _ = writeln!(s, "  chain eg_{i} {{");
        for m in rules(false) {
            let _ = writeln!(s, "    {m}return");
        }
        let _ = writeln!(s, "    drop\n  }}\n  chain in_{i} {{");
        for m in rules(true) {
            let _ = writeln!(s, "    {m}accept");
        }
        let _ = writeln!(s, "    drop\n  }}");
    }
    let vmap = |chain: &str| {
        elements(v.nics.iter().map(|n| {
            let key: BTreeSet<&str> = n.group_ids.iter().map(String::as_str).collect();
            format!("{} : jump {chain}_{}", n.ip, sets.get(&key).copied().unwrap_or(0))
        }))
    };
    let _ = writeln!(s, "  map egress {{ type ipv4_addr : verdict;{} }}", vmap("eg"));
    let _ = writeln!(s, "  map ingress {{ type ipv4_addr : verdict;{} }}", vmap("in"));
    // Sources from the public side that cannot be genuine: the VPC's own
    // (a member of a group that allows its members would be let in),
    // martian and private ranges (unless the operator allows them).
    let _ = writeln!(s, "  set martians {{ type ipv4_addr; flags interval;{} }}", elements(MARTIANS));
    let _ = writeln!(s, "  set outside_allow {{ type ipv4_addr; flags interval;{} }}", elements(v.outside_allow));
    let _ = write!(
        s,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    \
         iifname \"{public}\" ip saddr {vpc} drop\n    \
         iifname \"{public}\" ip saddr != @outside_allow ip saddr @martians drop\n    \
         ct state established,related accept\n    ct state invalid drop\n    \
         iifname \"{public}\" ct status & dnat != dnat drop\n    ip saddr vmap @egress\n    ip daddr vmap @ingress\n    \
         oifname \"{public}\" ip saddr != @natted drop\n  }}\n",
        public = v.public,
        vpc = v.vpc_cidr
    );
    // The namespace itself answers only the metadata service (and pings of the router).
    let _ = write!(
        s,
        "  chain input {{\n    type filter hook input priority filter; policy drop;\n    iifname \"lo\" accept\n    \
         ct state established,related accept\n    iifname \"{br}\" ip daddr {md} tcp dport 80 accept\n    \
         iifname \"{br}\" icmp type echo-request accept\n  }}\n}}\n",
        br = v.bridge,
        md = v.metadata
    );

    // ---- public addresses --------------------------------------------------------
    let _ = writeln!(s, "table ip nimbus_nat {{");
    let pairs: Vec<(Ipv4Addr, Ipv4Addr)> = v.nics.iter().filter_map(|n| n.public_ip.map(|p| (p, n.ip))).collect();
    let _ = writeln!(s, "  map to_private {{ type ipv4_addr : ipv4_addr;{} }}", elements(pairs.iter().map(|(p, i)| format!("{p} : {i}"))));
    let _ = writeln!(s, "  map to_public {{ type ipv4_addr : ipv4_addr;{} }}", elements(pairs.iter().map(|(p, i)| format!("{i} : {p}"))));
    let _ = write!(
        s,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         iifname \"{public}\" dnat to ip daddr map @to_private\n  }}\n  \
         chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         oifname \"{public}\" snat to ip saddr map @to_public\n  }}\n}}\n",
        public = v.public
    );

    // ---- anti-spoofing and router ARP ----------------------------------------------
    let _ = writeln!(s, "table bridge nimbus_guard {{");
    let _ = writeln!(s, "  set gateways {{ type ipv4_addr;{} }}", elements(v.gateways));
    // Broadcast and multicast destinations: the limited broadcast, the
    // multicast range, each subnet's broadcast address.
    let broadcasts: BTreeSet<String> = ["255.255.255.255".to_string(), "224.0.0.0/4".to_string()]
        .into_iter()
        .chain(v.subnets.iter().filter_map(|c| c.nth(c.size().saturating_sub(1))).map(|a| a.to_string()))
        .collect();
    let _ = writeln!(s, "  set broadcasts {{ type ipv4_addr; flags interval;{} }}", elements(&broadcasts));
    let remote: BTreeSet<String> = v.remote.iter().map(|(mac, ip)| format!("{} . {ip}", mac.to_lowercase())).collect();
    let _ = writeln!(s, "  set remote {{ type ether_addr . ipv4_addr;{} }}", elements(&remote));
    for (i, n) in v.nics.iter().enumerate() {
        let _ = write!(
            s,
            "  chain g_{i} {{\n    ether saddr != {mac} drop\n    ether type arp arp saddr ether != {mac} drop\n    \
             ether type arp arp saddr ip != {ip} drop\n    ether type ip ip saddr != {ip} drop\n    \
             ether type != {{ ip, arp }} drop\n    ether type ip pkttype {{ broadcast, multicast }} drop\n    \
             ether type ip ip daddr @broadcasts drop\n  }}\n",
            mac = n.mac,
            ip = n.ip
        );
    }
    // What arrives over the VXLAN: IPv4 and ARP only, from the pairs the
    // VPC's other hosts hold, never to a broadcast address.
    let _ = write!(
        s,
        "  chain overlay {{\n    ether type != {{ ip, arp }} drop\n    ether type ip ether saddr . ip saddr != @remote drop\n    \
         ether type arp ether saddr . arp saddr ip != @remote drop\n    ether type ip pkttype {{ broadcast, multicast }} drop\n    \
         ether type ip ip daddr @broadcasts drop\n  }}\n"
    );
    let _ = writeln!(
        s,
        "  map ports {{ type ifname : verdict;{} }}",
        elements(v.nics.iter().enumerate().map(|(i, n)| format!("\"{}\" : jump g_{i}", n.port)))
    );
    let _ = write!(
        s,
        "  chain prerouting {{\n    type filter hook prerouting priority -300; policy accept;\n    iifname vmap @ports\n    \
         iifname \"{vx}\" jump overlay\n    \
         iifname \"{vx}\" ether type arp arp saddr ip @gateways drop\n    \
         iifname \"{vx}\" ether type arp arp daddr ip @gateways drop\n  }}\n  \
         chain forward {{\n    type filter hook forward priority filter; policy accept;\n    \
         oifname \"{vx}\" ether type arp arp daddr ip @gateways drop\n  }}\n  \
         chain output {{\n    type filter hook output priority filter; policy accept;\n    \
         oifname \"{vx}\" ether type arp drop\n  }}\n}}\n",
        vx = v.vxlan
    );
    s
}

/// What the host's own namespace (where the VXLAN sockets and the VPCs'
/// public legs are) lets through, as the table `inet nimbus_host`.
#[derive(Debug, Clone, Default)]
pub struct HostRules {
    /// The host ends of the VPCs' public legs (`nv<vni>`).
    pub legs: Vec<String>,
    /// Who may send VXLAN here: (peer's underlay address, VNI, inner
    /// source MAC) for each VPC's other hosts and the MACs they hold (their
    /// interfaces' and their router's).
    pub vxlan: Vec<(Ipv4Addr, u32, String)>,
    /// Destinations guests never reach through the host: the underlay
    /// (other hosts, the control plane, the store) and what the operator adds.
    pub guest_deny: Vec<Cidr>,
}

/// The VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// Renders the host namespace's table (replaced as a whole, one
/// transaction): a guest reaches nothing of the host itself and nothing on
/// the underlay; VXLAN is accepted only from a peer of the VPC its VNI
/// names, carrying a source MAC that peer holds (the VNI is the 24 bits
/// after the VXLAN flags: transport header bit 96; the inner source MAC
/// follows the 8-byte UDP and VXLAN headers and the inner destination
/// MAC: bit 176).
pub fn render_host(h: &HostRules) -> String {
    let mut s = String::from("table inet nimbus_host\ndelete table inet nimbus_host\ntable inet nimbus_host {\n");
    let _ = writeln!(s, "  set legs {{ type ifname;{} }}", elements(h.legs.iter().map(|l| format!("\"{l}\""))));
    let vx: BTreeSet<String> =
        h.vxlan.iter().map(|(peer, vni, mac)| format!("{peer} . {vni} . 0x{}", mac.replace(':', "").to_lowercase())).collect();
    let _ = writeln!(s, "  set vxlan_peers {{ typeof ip saddr . @th,96,24 . @th,176,48;{} }}", elements(&vx));
    let _ = writeln!(s, "  set guest_deny {{ type ipv4_addr; flags interval;{} }}", elements(&h.guest_deny));
    let _ = write!(
        s,
        "  chain input {{\n    type filter hook input priority filter; policy accept;\n    \
         iifname @legs drop\n    \
         udp dport {VXLAN_PORT} ip saddr . @th,96,24 . @th,176,48 @vxlan_peers accept\n    \
         udp dport {VXLAN_PORT} drop\n  }}\n  \
         chain forward {{\n    type filter hook forward priority filter; policy accept;\n    \
         iifname @legs ip daddr @guest_deny drop\n    \
         iifname @legs meta nfproto ipv6 drop\n  }}\n}}\n"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_proto::network::Cidr;

    fn group(id: &str, ingress: Vec<Rule>) -> SecurityGroup {
        SecurityGroup {
            group_id: id.into(),
            vpc_id: "vpc-1".into(),
            ingress,
            egress: vec![Rule { protocol: Protocol::All, ports: None, peer: Peer::Cidr(Cidr::parse("0.0.0.0/0").unwrap()) }],
        }
    }

    type Sample = (Vec<LocalNic>, BTreeMap<String, SecurityGroup>, BTreeMap<String, Vec<Ipv4Addr>>);

    fn sample() -> Sample {
        let nics = vec![
            LocalNic {
                port: "np000000000001".into(),
                mac: "02:00:00:00:00:05".into(),
                ip: Ipv4Addr::new(172, 31, 0, 5),
                public_ip: None,
                group_ids: vec!["sg-1".into()],
            },
            LocalNic {
                port: "np000000000002".into(),
                mac: "02:00:00:00:00:06".into(),
                ip: Ipv4Addr::new(172, 31, 0, 6),
                public_ip: Some(Ipv4Addr::new(198, 51, 100, 10)),
                group_ids: vec!["sg-1".into(), "sg-2".into()],
            },
        ];
        let mut groups = BTreeMap::new();
        groups.insert(
            "sg-1".to_string(),
            group("sg-1", vec![Rule { protocol: Protocol::All, ports: None, peer: Peer::Group("sg-1".into()) }]),
        );
        groups.insert(
            "sg-2".to_string(),
            group(
                "sg-2",
                vec![
                    Rule { protocol: Protocol::Tcp, ports: Some((22, 22)), peer: Peer::Cidr(Cidr::parse("0.0.0.0/0").unwrap()) },
                    Rule { protocol: Protocol::Udp, ports: Some((1000, 2000)), peer: Peer::Cidr(Cidr::parse("10.0.0.0/8").unwrap()) },
                    Rule { protocol: Protocol::Icmp, ports: Some((8, u16::MAX)), peer: Peer::Cidr(Cidr::parse("10.0.0.0/8").unwrap()) },
                ],
            ),
        );
        let mut members = BTreeMap::new();
        members.insert("sg-1".to_string(), vec![Ipv4Addr::new(172, 31, 0, 5), Ipv4Addr::new(172, 31, 0, 6), Ipv4Addr::new(172, 31, 16, 9)]);
        (nics, groups, members)
    }

    const SUBNETS: &[Cidr] =
        &[Cidr { addr: Ipv4Addr::new(172, 31, 0, 0), prefix: 20 }, Cidr { addr: Ipv4Addr::new(172, 31, 16, 0), prefix: 20 }];
    const ALLOW: &[Cidr] = &[Cidr { addr: Ipv4Addr::new(10, 20, 0, 0), prefix: 16 }];

    fn remote() -> Vec<(String, Ipv4Addr)> {
        vec![("02:00:00:00:00:09".into(), Ipv4Addr::new(172, 31, 16, 9)), ("02:4e:0a:63:00:0c".into(), Ipv4Addr::new(172, 31, 16, 9))]
    }

    fn rules<'a>(
        nics: &'a [LocalNic],
        groups: &'a BTreeMap<String, SecurityGroup>,
        members: &'a BTreeMap<String, Vec<Ipv4Addr>>,
        gw: &'a [Ipv4Addr],
        remote: &'a [(String, Ipv4Addr)],
    ) -> VpcRules<'a> {
        VpcRules {
            nics,
            groups,
            members,
            vpc_cidr: Cidr { addr: Ipv4Addr::new(172, 31, 0, 0), prefix: 16 },
            subnets: SUBNETS,
            gateways: gw,
            remote,
            outside_allow: ALLOW,
            metadata: Ipv4Addr::new(169, 254, 169, 254),
            bridge: "br0",
            vxlan: "vx0",
            public: "pub",
        }
    }

    #[test]
    fn interfaces_with_the_same_groups_share_chains_and_groups_are_sets() {
        let (nics, groups, members) = sample();
        let gw = [Ipv4Addr::new(172, 31, 0, 1)];
        let s = render(&rules(&nics, &groups, &members, &gw, &remote()));
        assert!(s.contains("set m_1 { type ipv4_addr; elements = { 172.31.0.5, 172.31.0.6, 172.31.16.9 }; }"), "{s}");
        assert!(
            s.contains("map ingress { type ipv4_addr : verdict; elements = { 172.31.0.5 : jump in_0, 172.31.0.6 : jump in_1 }; }"),
            "{s}"
        );
        assert!(s.contains("    ip saddr @m_1 accept\n"), "{s}");
        assert!(s.contains("    tcp dport 22 accept\n"), "0.0.0.0/0 matches every source: {s}");
        assert!(s.contains("    ip saddr 10.0.0.0/8 udp dport 1000-2000 accept\n"), "{s}");
        assert!(s.contains("    ip saddr 10.0.0.0/8 icmp type 8 accept\n"), "{s}");
        assert!(s.contains("map to_private { type ipv4_addr : ipv4_addr; elements = { 198.51.100.10 : 172.31.0.6 }; }"), "{s}");
        assert!(s.contains("ether type ip ip saddr != 172.31.0.6 drop"), "{s}");
        assert!(s.contains("\"np000000000002\" : jump g_1"), "{s}");
        // The overlay: the remote pairs, broadcast addresses, the public side's drops.
        assert!(s.contains("set remote { type ether_addr . ipv4_addr; elements = { 02:00:00:00:00:09 . 172.31.16.9, 02:4e:0a:63:00:0c . 172.31.16.9 }; }"), "{s}");
        assert!(s.contains("elements = { 172.31.15.255, 172.31.31.255, 224.0.0.0/4, 255.255.255.255 }"), "{s}");
        assert!(s.contains("iifname \"pub\" ip saddr 172.31.0.0/16 drop"), "{s}");
        assert!(s.contains("set outside_allow { type ipv4_addr; flags interval; elements = { 10.20.0.0/16 }; }"), "{s}");
        // The same input renders the same text (the agent skips unchanged rulesets).
        assert_eq!(s, render(&rules(&nics, &groups, &members, &gw, &remote())));
        // No interface: still a valid, empty ruleset.
        let empty = render(&rules(&[], &groups, &members, &gw, &[]));
        assert!(empty.contains("map ingress { type ipv4_addr : verdict; }"), "{empty}");
    }

    /// The kernel accepts what we render (checked in a scratch namespace).
    #[tokio::test]
    async fn the_kernel_accepts_the_ruleset() {
        let ns = crate::network::testing::ScratchNs::new("nft").await;
        let (nics, groups, members) = sample();
        let gw = [Ipv4Addr::new(172, 31, 0, 1), Ipv4Addr::new(172, 31, 16, 1)];
        for script in [render(&rules(&nics, &groups, &members, &gw, &remote())), render(&rules(&[], &groups, &members, &gw, &[]))] {
            ns.ns().nft(&script).await.unwrap_or_else(|e| panic!("{e}\n{script}"));
        }
        // Applying again replaces the tables (nothing doubled).
        ns.ns().nft(&render(&rules(&nics, &groups, &members, &gw, &remote()))).await.unwrap();
        // The host's table, with peers and without.
        let host = HostRules {
            legs: vec!["nv7".into(), "nv9".into()],
            vxlan: vec![
                (Ipv4Addr::new(10, 99, 0, 12), 7, "02:00:00:00:00:09".into()),
                (Ipv4Addr::new(10, 99, 0, 12), 7, "02:4e:0a:63:00:0c".into()),
            ],
            guest_deny: vec![Cidr { addr: Ipv4Addr::new(10, 99, 0, 0), prefix: 24 }],
        };
        for script in [render_host(&host), render_host(&HostRules::default())] {
            ns.ns().nft(&script).await.unwrap_or_else(|e| panic!("{e}\n{script}"));
        }
        assert!(render_host(&host).contains("10.99.0.12 . 7 . 0x024e0a63000c"), "{}", render_host(&host));
    }
}
