//! The VPC data plane of a host: what makes the host match the
//! [`HostNetwork`] and the [`Nic`]s the control plane assigns.
//!
//! Per VPC with an interface on the host, one network namespace
//! (`<prefix>-v<vni>`), the VPC's router on this host:
//!
//! ```text
//!   guest ─ macvtap ─ ntXXXX ═ npXXXX ─┐ (veth pair)
//!   guest ─ …                    ══ np… ┤ br0 (router: every subnet's first address;
//!                                │      169.254.169.254 on lo: metadata)
//!   VXLAN nx<vni> (VNI, to peers)┘
//!   pub ── veth ── nv<vni> in the host's namespace (public addresses)
//! ```
//!
//! - Overlapping VPCs (every account's default VPC is 172.31.0.0/16) never
//!   meet: each has its own namespace, so its own routes, conntrack table and
//!   nftables ruleset.
//! - The VXLAN device is created in the host's namespace, where its UDP
//!   socket lives on the underlay, and moved into the VPC's; broadcast is
//!   replicated to the VPC's other hosts (`peers`, one all-zero forwarding
//!   entry each: no multicast).
//! - Every host answers for the VPC router itself (same addresses, a
//!   per-host MAC); ARP about the router never crosses the VXLAN (see
//!   [`nft`]). Routing between subnets happens on the sending host.
//! - A guest's interface is a veth pair made with one end in libvirt's
//!   namespace (`nt…`) and the other straight in the VPC's, on `br0`
//!   (`np…`); libvirt gives the guest a macvtap in passthrough mode on the
//!   first end (`<interface type='direct'>`). libvirt 9.0 can attach a guest
//!   only to a device in its own namespace, and moving a device between
//!   namespaces costs about 17 ms of RCU grace periods here (17 s for 1,000
//!   interfaces), where creating a pair with its far end in place costs
//!   well under 1 ms.
//! - A public address: the host answers ARP for it on its uplink (proxy
//!   entry) and routes it to the VPC's veth; the VPC's namespace DNATs it to
//!   the private address, and SNATs the way back.
//! - Security groups and anti-spoofing: [`nft`], one transaction per VPC.
//!
//! Level-triggered: every pass compares what the host has (`ip -json`
//! listings) with what it should have and changes only the difference; a
//! VPC whose inputs did not change since its last pass is skipped, except
//! on full passes (the periodic resync), which check everything.

pub mod cmd;
pub mod nft;
pub mod testing;

use cmd::Ns;
use nimbus_proto::network::{Cidr, HostNetwork, Nic, SecurityGroup, VpcOnHost};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{tool} failed: {stderr}")]
    Command { tool: &'static str, stderr: String },
    #[error("cannot parse {0}")]
    Parse(String),
}

/// Where the metadata service answers on every VPC's network.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The VPC namespace's end of the public leg.
const PUBLIC_IP: &str = "169.254.0.2/32";
const BRIDGE: &str = "br0";
const PUBLIC: &str = "pub";
/// VXLAN over IPv4 and UDP costs 50 bytes of the underlay's MTU.
const VXLAN_OVERHEAD: u32 = 50;

/// How this host joins the VPC network.
#[derive(Debug, Clone)]
pub struct VpcConfig {
    /// This host's underlay address (VXLAN tunnels end here).
    pub underlay_ip: Ipv4Addr,
    /// The namespace holding the underlay and the uplink (the host's own
    /// namespace in production; a test topology's simulated host here).
    pub host_ns: Ns,
    /// The interface facing the public network, where the host answers ARP
    /// for its instances' public addresses.
    pub uplink: Option<String>,
    /// Prefix of the VPC namespaces' names: unique per host on a machine.
    pub prefix: String,
    pub underlay_mtu: u32,
    /// Destinations guests must not reach through the host, besides the
    /// underlay's own network (which is always denied).
    pub guest_deny: Vec<Cidr>,
    /// Private or martian source ranges the operator lets reach public
    /// addresses from outside (its own network); others are dropped.
    pub outside_allow: Vec<Cidr>,
}

/// The MAC of a host's VPC routers, derived from its underlay address (one
/// per host; every host's router has the same IP addresses).
pub fn router_mac(underlay_ip: Ipv4Addr) -> String {
    let o = underlay_ip.octets();
    format!("02:4e:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// The guest's static network configuration, cloud-init `network-config`
/// version 2 (in the NoCloud seed): each interface matched by MAC, its
/// address, the MTU that fits the VXLAN, and the default route through the
/// primary interface's router.
pub fn guest_network_config(nics: &[Nic], mtu: u32) -> String {
    let mut s = String::from("version: 2\nethernets:\n");
    for n in nics {
        s.push_str(&format!(
            "  eth{i}:\n    match:\n      macaddress: \"{mac}\"\n    set-name: eth{i}\n    mtu: {mtu}\n    addresses:\n      - {ip}/{prefix}\n",
            i = n.device_index,
            mac = n.mac,
            ip = n.private_ip,
            prefix = n.subnet.prefix
        ));
        if n.device_index == 0 {
            s.push_str(&format!("    routes:\n      - to: 0.0.0.0/0\n        via: {}\n", n.gateway));
        }
    }
    s
}

fn eni_hex(eni_id: &str) -> String {
    let hex: String = eni_id.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    hex[hex.len().saturating_sub(12)..].to_string()
}

/// The guest's end of an interface's veth pair, in libvirt's namespace: the
/// parent of the guest's macvtap (`nt` + the last 12 hex digits of its id).
pub fn guest_link(eni_id: &str) -> String {
    format!("nt{}", eni_hex(eni_id))
}

/// The bridge's end of an interface's veth pair, in the VPC's namespace:
/// where anti-spoofing and the guest's security groups apply.
pub fn port_name(eni_id: &str) -> String {
    format!("np{}", eni_hex(eni_id))
}

#[derive(Clone)]
pub struct DataPlane {
    cfg: Arc<VpcConfig>,
    /// The MAC of this host's VPC routers (per host: see the module doc).
    router_mac: String,
    /// Per VNI, the inputs last applied (to skip unchanged VPCs on delta passes).
    applied: Arc<Mutex<HashMap<u32, String>>>,
}

impl DataPlane {
    pub fn new(cfg: VpcConfig) -> DataPlane {
        let router_mac = router_mac(cfg.underlay_ip);
        DataPlane { cfg: Arc::new(cfg), router_mac, applied: Arc::default() }
    }

    pub fn config(&self) -> &VpcConfig {
        &self.cfg
    }

    pub fn mtu(&self) -> u32 {
        self.cfg.underlay_mtu - VXLAN_OVERHEAD
    }

    /// The namespace of a VPC's router on this host.
    pub fn vpc_ns_name(&self, vni: u32) -> String {
        format!("{}-v{vni}", self.cfg.prefix)
    }

    fn vpc_ns(&self, vni: u32) -> Ns {
        Ns::named(&self.vpc_ns_name(vni))
    }

    /// Makes the host match `net` and `nics` (the interfaces of every
    /// instance assigned here). `full`: check every VPC, changed or not.
    pub async fn reconcile(&self, net: &HostNetwork, nics: &[Nic], full: bool) -> Result<(), NetError> {
        let groups: BTreeMap<String, SecurityGroup> = net.groups.iter().map(|g| (g.group_id.clone(), g.clone())).collect();
        let existing = self.vpc_namespaces().await?;
        self.ensure_host_rules(net, full).await?;
        for vpc in &net.vpcs {
            let local: Vec<&Nic> = nics.iter().filter(|n| n.vni == vpc.vni).collect();
            let digest = serde_json::to_string(&(vpc, &local, &net.groups, &net.members)).unwrap_or_default();
            let ns_exists = existing.contains(&self.vpc_ns_name(vpc.vni));
            let unchanged = self.applied.lock().unwrap_or_else(|p| p.into_inner()).get(&vpc.vni) == Some(&digest);
            if ns_exists && unchanged && !full {
                continue;
            }
            self.ensure_vpc(vpc, &local, &groups, &net.members, ns_exists).await?;
            self.applied.lock().unwrap_or_else(|p| p.into_inner()).insert(vpc.vni, digest);
        }
        // VPCs that no longer have an interface here.
        let wanted: HashSet<String> = net.vpcs.iter().map(|v| self.vpc_ns_name(v.vni)).collect();
        for name in existing.difference(&wanted) {
            tracing::info!(netns = %name, "removing a VPC that has no interface on this host any more");
            let vni = name.rsplit_once("-v").and_then(|(_, v)| v.parse::<u32>().ok());
            if let Some(vni) = vni {
                // Deleted first, and at once: a namespace is torn down
                // asynchronously, and until then its VXLAN holds the VNI and
                // port (the VPC coming back would find them taken).
                let _ = Ns::named(name).run("ip", &["link", "del", &format!("nx{vni}")]).await;
            }
            Ns::own().run("ip", &["netns", "del", name]).await?;
            if let Some(vni) = vni {
                self.applied.lock().unwrap_or_else(|p| p.into_inner()).remove(&vni);
                // The veth's host end went with its peer; a half-made VXLAN may be left.
                let _ = self.cfg.host_ns.run("ip", &["link", "del", &format!("nx{vni}")]).await;
            }
        }
        self.ensure_public_routes(nics).await
    }

    /// The host namespace's table ([`nft::render_host`]): no guest reaches
    /// the host or the underlay, VXLAN only from the VPCs' peers. Applied
    /// before any VPC's devices exist (so a new VXLAN socket is never open
    /// without it), when its inputs changed, and on full passes.
    async fn ensure_host_rules(&self, net: &HostNetwork, full: bool) -> Result<(), NetError> {
        let underlay = self.underlay_network().await?;
        let mut rules = nft::HostRules {
            legs: net.vpcs.iter().map(|v| format!("nv{}", v.vni)).collect(),
            vxlan: Vec::new(),
            guest_deny: std::iter::once(underlay).chain(self.cfg.guest_deny.iter().copied()).collect(),
        };
        for v in &net.vpcs {
            for r in &v.remote_nics {
                rules.vxlan.push((r.host, v.vni, r.mac.clone()));
                rules.vxlan.push((r.host, v.vni, router_mac(r.host)));
            }
        }
        rules.vxlan.sort();
        rules.vxlan.dedup();
        let script = nft::render_host(&rules);
        const HOST_KEY: u32 = u32::MAX;
        let unchanged = self.applied.lock().unwrap_or_else(|p| p.into_inner()).get(&HOST_KEY) == Some(&script);
        if unchanged && !full {
            return Ok(());
        }
        self.cfg.host_ns.nft(&script).await?;
        self.applied.lock().unwrap_or_else(|p| p.into_inner()).insert(HOST_KEY, script);
        Ok(())
    }

    /// The underlay's network: the prefix of the underlay address on the
    /// host namespace's interface that carries it (a /32 if none does).
    async fn underlay_network(&self) -> Result<Cidr, NetError> {
        let v = self.cfg.host_ns.json("ip", &["-4", "addr", "show"]).await?;
        let ip = self.cfg.underlay_ip;
        let prefix = v
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .find(|a| a["local"].as_str() == Some(&ip.to_string()))
            .and_then(|a| a["prefixlen"].as_u64())
            .unwrap_or(32) as u8;
        let c = Cidr { addr: ip, prefix };
        Ok(Cidr { addr: c.network(), prefix })
    }

    /// The VPC namespaces of this host that exist.
    async fn vpc_namespaces(&self) -> Result<HashSet<String>, NetError> {
        let list = Ns::own().json("ip", &["netns", "list"]).await?;
        let prefix = format!("{}-v", self.cfg.prefix);
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["name"].as_str())
            .filter(|n| n.strip_prefix(&prefix).is_some_and(|v| v.parse::<u32>().is_ok()))
            .map(str::to_string)
            .collect())
    }

    async fn ensure_vpc(
        &self,
        vpc: &VpcOnHost,
        local: &[&Nic],
        groups: &BTreeMap<String, SecurityGroup>,
        members: &BTreeMap<String, Vec<Ipv4Addr>>,
        ns_exists: bool,
    ) -> Result<(), NetError> {
        let (vni, name) = (vpc.vni, self.vpc_ns_name(vpc.vni));
        let ns = self.vpc_ns(vni);
        let (vx, leg, mtu) = (format!("nx{vni}"), format!("nv{vni}"), self.mtu());
        if !ns_exists {
            tracing::info!(netns = %name, vni, vpc_id = %vpc.vpc_id, "creating the VPC's router on this host");
            Ns::own().run("ip", &["netns", "add", &name]).await?;
        }
        // Routing and bridged IPv4 through nftables; no IPv6 in a VPC until
        // it is offered; strict reverse-path filtering (a source must route
        // back where it came from).
        ns.sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.bridge.bridge-nf-call-iptables", "1"),
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
            ("net.ipv4.conf.all.rp_filter", "1"),
            ("net.ipv4.conf.default.rp_filter", "1"),
        ])
        .await?;
        let links = link_names(&ns).await?;
        let mut lines = vec!["link set lo up".to_string(), format!("addr replace {METADATA_IP}/32 dev lo")];
        if !links.contains(BRIDGE) {
            lines.push(format!("link add {BRIDGE} type bridge"));
        }
        lines.push(format!("link set {BRIDGE} address {} mtu {mtu} up", self.router_mac));
        ns.batch("ip", &lines).await?;

        // The VXLAN: made in the host's namespace (its socket stays there), moved in.
        if !links.contains(&vx) {
            let host = &self.cfg.host_ns;
            let _ = host.run("ip", &["link", "del", &vx]).await;
            host.batch(
                "ip",
                &[
                    format!("link add {vx} type vxlan id {vni} local {} dstport 4789 nolearning", self.cfg.underlay_ip),
                    format!("link set {vx} netns {name}"),
                ],
            )
            .await?;
        }
        // The public leg.
        if !links.contains(PUBLIC) {
            let host = &self.cfg.host_ns;
            let _ = host.run("ip", &["link", "del", &leg]).await;
            host.batch("ip", &[format!("link add {leg} type veth peer name {PUBLIC} netns {name}"), format!("link set {leg} up")]).await?;
            host.sysctl(&format!("net.ipv4.conf.{leg}.proxy_arp"), "1").await?;
        }
        self.cfg.host_ns.sysctl("net.ipv4.ip_forward", "1").await?;
        ns.sysctl(&format!("net.ipv4.conf.{PUBLIC}.proxy_arp"), "1").await?;
        ns.batch(
            "ip",
            &[
                format!("link set {vx} master {BRIDGE} mtu {mtu} up"),
                format!("link set {PUBLIC} up"),
                format!("addr replace {PUBLIC_IP} dev {PUBLIC}"),
                format!("route replace default dev {PUBLIC}"),
            ],
        )
        .await?;

        // The router's addresses: one per subnet.
        let want: BTreeSet<String> = vpc.subnets.iter().map(|s| format!("{}/{}", s.gateway, s.cidr.prefix)).collect();
        let have = addresses(&ns, BRIDGE).await?;
        let mut lines: Vec<String> = have.difference(&want).map(|a| format!("addr del {a} dev {BRIDGE}")).collect();
        lines.extend(want.difference(&have).map(|a| format!("addr add {a} dev {BRIDGE}")));
        ns.batch("ip", &lines).await?;

        // Flooding to the VPC's other hosts.
        let want: BTreeSet<String> = vpc.peers.iter().map(|p| p.to_string()).collect();
        let have = flood_entries(&ns, &vx).await?;
        let mut lines: Vec<String> = have.difference(&want).map(|d| format!("fdb del 00:00:00:00:00:00 dev {vx} dst {d}")).collect();
        lines.extend(want.difference(&have).map(|d| format!("fdb append 00:00:00:00:00:00 dev {vx} dst {d}")));
        ns.batch("bridge", &lines).await?;

        // The VPC's interfaces on other hosts: static neighbours (no ARP over
        // the VXLAN from the router) and forwarding entries (no flooding).
        let want: BTreeSet<(String, String, String)> =
            vpc.remote_nics.iter().map(|r| (r.ip.to_string(), r.mac.to_lowercase(), r.host.to_string())).collect();
        let have = remote_entries(&ns, &vx).await?;
        let mut ip_lines = Vec::new();
        let mut fdb_lines = Vec::new();
        for (ip, mac, host) in have.difference(&want) {
            ip_lines.push(format!("neigh del {ip} dev {BRIDGE}"));
            fdb_lines.push(format!("fdb del {mac} dev {vx} dst {host} self"));
            fdb_lines.push(format!("fdb del {mac} dev {vx} master"));
        }
        for (ip, mac, host) in want.difference(&have) {
            ip_lines.push(format!("neigh replace {ip} lladdr {mac} dev {BRIDGE} nud permanent"));
            fdb_lines.push(format!("fdb replace {mac} dev {vx} dst {host} self permanent"));
            fdb_lines.push(format!("fdb replace {mac} dev {vx} master static"));
        }
        ns.batch("ip", &ip_lines).await?;
        ns.batch("bridge", &fdb_lines).await?;

        // Public addresses reach the bridge (so the public leg answers ARP for them).
        let want: BTreeSet<String> = local.iter().filter_map(|n| n.public_ip).map(|p| format!("{p}/32")).collect();
        let have = host_routes(&ns, BRIDGE).await?;
        let mut lines: Vec<String> = have.difference(&want).map(|r| format!("route del {r} dev {BRIDGE}")).collect();
        lines.extend(want.difference(&have).map(|r| format!("route replace {r} dev {BRIDGE}")));
        ns.batch("ip", &lines).await?;

        // Ports: those of local interfaces on the bridge, no others (deleting
        // a port deletes its pair).
        let ports: BTreeSet<String> = local.iter().map(|n| port_name(&n.eni_id)).collect();
        let mut lines = Vec::new();
        for l in links.iter().filter(|l| l.starts_with("np")) {
            if ports.contains(l) {
                lines.push(format!("link set {l} master {BRIDGE} mtu {mtu} up"));
            } else {
                lines.push(format!("link del {l}"));
            }
        }
        ns.batch("ip", &lines).await?;

        // Security groups, NAT, anti-spoofing: one transaction.
        let nics: Vec<nft::LocalNic> = local
            .iter()
            .map(|n| nft::LocalNic {
                port: port_name(&n.eni_id),
                mac: n.mac.clone(),
                ip: n.private_ip,
                public_ip: n.public_ip,
                group_ids: n.group_ids.clone(),
            })
            .collect();
        let gateways: Vec<Ipv4Addr> = vpc.subnets.iter().map(|s| s.gateway).collect();
        let subnets: Vec<Cidr> = vpc.subnets.iter().map(|s| s.cidr).collect();
        let remote: Vec<(String, Ipv4Addr)> =
            vpc.remote_nics.iter().flat_map(|r| [(r.mac.clone(), r.ip), (router_mac(r.host), r.ip)]).collect();
        let script = nft::render(&nft::VpcRules {
            nics: &nics,
            groups,
            members,
            vpc_cidr: vpc.cidr,
            subnets: &subnets,
            remote: &remote,
            outside_allow: &self.cfg.outside_allow,
            gateways: &gateways,
            metadata: METADATA_IP,
            bridge: BRIDGE,
            vxlan: &vx,
            public: PUBLIC,
        });
        ns.nft(&script).await
    }

    /// In the host's namespace: each local public address routed to its
    /// VPC's veth, and answered for on the uplink.
    async fn ensure_public_routes(&self, nics: &[Nic]) -> Result<(), NetError> {
        let host = &self.cfg.host_ns;
        let want: BTreeMap<String, String> =
            nics.iter().filter_map(|n| n.public_ip.map(|p| (format!("{p}/32"), format!("nv{}", n.vni)))).collect();
        let routes = host.json("ip", &["route", "show", "proto", "static"]).await?;
        let have: BTreeMap<String, String> = routes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["dev"].as_str().is_some_and(|d| d.starts_with("nv")))
            .filter_map(|r| Some((format!("{}/32", r["dst"].as_str()?), r["dev"].as_str()?.to_string())))
            .collect();
        let mut lines: Vec<String> =
            have.iter().filter(|(r, d)| want.get(*r) != Some(d)).map(|(r, d)| format!("route del {r} dev {d}")).collect();
        lines.extend(want.iter().filter(|(r, d)| have.get(*r) != Some(d)).map(|(r, d)| format!("route replace {r} dev {d} proto static")));
        if let Some(uplink) = &self.cfg.uplink {
            let proxies = host.json("ip", &["neigh", "show", "proxy", "dev", uplink]).await?;
            let have: BTreeSet<String> =
                proxies.as_array().into_iter().flatten().filter_map(|p| p["dst"].as_str().map(str::to_string)).collect();
            let want: BTreeSet<String> = nics.iter().filter_map(|n| n.public_ip.map(|p| p.to_string())).collect();
            lines.extend(have.difference(&want).map(|p| format!("neigh del proxy {p} dev {uplink}")));
            lines.extend(want.difference(&have).map(|p| format!("neigh add proxy {p} dev {uplink}")));
        }
        host.batch("ip", &lines).await
    }

    /// Before a guest with `nics` starts: each interface's veth pair
    /// exists, its guest end in libvirt's namespace (the parent of the
    /// guest's macvtap), its port end on the VPC's bridge; made in one batch,
    /// the port created straight in the VPC's namespace.
    pub async fn prepare(&self, nics: &[Nic]) -> Result<(), NetError> {
        let own = link_names(&Ns::own()).await?;
        let mut lines = Vec::new();
        let mut plug: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for n in nics {
            let (link, port) = (guest_link(&n.eni_id), port_name(&n.eni_id));
            if !own.contains(&link) {
                lines.push(format!(
                    "link add {link} mtu {mtu} type veth peer name {port} netns {ns}",
                    mtu = self.mtu(),
                    ns = self.vpc_ns_name(n.vni)
                ));
            }
            lines.push(format!("link set {link} mtu {} up", self.mtu()));
            plug.entry(n.vni).or_default().push(format!("link set {port} master {BRIDGE} mtu {} up", self.mtu()));
        }
        Ns::own().batch("ip", &lines).await?;
        for (vni, lines) in plug {
            self.vpc_ns(vni).batch("ip", &lines).await?;
        }
        Ok(())
    }

    /// Removes the interfaces of a guest that is gone (both ends of each pair).
    pub async fn remove(&self, nics: &[Nic]) {
        let lines: Vec<String> = nics.iter().map(|n| format!("link del {}", guest_link(&n.eni_id))).collect();
        for line in lines {
            let args: Vec<&str> = line.split(' ').collect();
            let _ = Ns::own().run("ip", &args).await;
        }
    }
}

async fn link_names(ns: &Ns) -> Result<BTreeSet<String>, NetError> {
    let links = ns.json("ip", &["link", "show"]).await?;
    Ok(links.as_array().into_iter().flatten().filter_map(|l| l["ifname"].as_str().map(str::to_string)).collect())
}

/// `a.b.c.d/n` of every IPv4 address on `dev`.
async fn addresses(ns: &Ns, dev: &str) -> Result<BTreeSet<String>, NetError> {
    let v = ns.json("ip", &["-4", "addr", "show", "dev", dev]).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"].as_u64()?)))
        .collect())
}

/// Destinations of the all-zero (flooding) entries of a VXLAN device.
async fn flood_entries(ns: &Ns, vx: &str) -> Result<BTreeSet<String>, NetError> {
    let v = ns.json("bridge", &["fdb", "show", "dev", vx]).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["mac"] == "00:00:00:00:00:00")
        .filter_map(|e: &Value| e["dst"].as_str().map(str::to_string))
        .collect())
}

/// The remote interfaces programmed in a VPC namespace: (ip, mac, host) of
/// every permanent neighbour on the bridge whose MAC has a VXLAN entry.
async fn remote_entries(ns: &Ns, vx: &str) -> Result<BTreeSet<(String, String, String)>, NetError> {
    let neigh = ns.json("ip", &["neigh", "show", "dev", BRIDGE, "nud", "permanent"]).await?;
    let fdb = ns.json("bridge", &["fdb", "show", "dev", vx]).await?;
    let hosts: BTreeMap<String, String> = fdb
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["mac"] != "00:00:00:00:00:00")
        .filter_map(|e| Some((e["mac"].as_str()?.to_lowercase(), e["dst"].as_str()?.to_string())))
        .collect();
    Ok(neigh
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let (ip, mac) = (n["dst"].as_str()?.to_string(), n["lladdr"].as_str()?.to_lowercase());
            let host = hosts.get(&mac)?.clone();
            Some((ip, mac, host))
        })
        .collect())
}

/// The /32 routes on `dev` (`a.b.c.d/32`).
async fn host_routes(ns: &Ns, dev: &str) -> Result<BTreeSet<String>, NetError> {
    let v = ns.json("ip", &["route", "show", "dev", dev]).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["dst"].as_str())
        .filter(|d| !d.contains('/'))
        .map(|d| format!("{d}/32"))
        .collect())
}
