//! Attacks on the VPC data plane, replayed with real packets in network
//! namespaces (issue 18, findings 1, 2 and 9): VXLAN injected from the
//! internet, from a guest and from a compromised peer; a guest reaching its
//! host and the underlay; VPC sources spoofed through a public address;
//! broadcast between instances. Each check fails on a data plane without
//! the corresponding rule.

use nimbus_host_agent::network::testing::{connect, in_netns, nic, vpc, Echo, FakeGuest, Topology, OUTSIDE_IP};
use nimbus_host_agent::network::DataPlane;
use nimbus_proto::network::{Cidr, HostNetwork, Peer, Protocol, Rule, SecurityGroup};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

/// The subnet of every interface here.
const SUBNET_A: &str = "172.31.0.0/20";
/// The VPCs' one subnet.
const SUBNETS: &[(&str, &str)] = &[("subnet-a", SUBNET_A)];

const T: Duration = Duration::from_secs(5);
const BLOCKED: Duration = Duration::from_secs(2);
/// How long a listener waits for a datagram that must not arrive.
const QUIET: Duration = Duration::from_millis(1500);

fn cidr(s: &str) -> Cidr {
    Cidr::parse(s).unwrap()
}

/// The group every interface here is in: everything from its members (as
/// EC2's default group), TCP 22 from anywhere.
fn app() -> SecurityGroup {
    SecurityGroup {
        group_id: "sg-app".into(),
        vpc_id: "vpc-100".into(),
        ingress: vec![
            Rule { protocol: Protocol::All, ports: None, peer: Peer::Group("sg-app".into()) },
            Rule { protocol: Protocol::Tcp, ports: Some((22, 22)), peer: Peer::Cidr(cidr("0.0.0.0/0")) },
        ],
        egress: vec![Rule { protocol: Protocol::All, ports: None, peer: Peer::Cidr(cidr("0.0.0.0/0")) }],
    }
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(mac.split(':')) {
        *o = u8::from_str_radix(part, 16).unwrap();
    }
    out
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from_be_bytes([chunk[0], 0]) };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet carrying a UDP datagram (UDP checksum 0: none).
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0x40, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet carrying a UDP datagram (with its mandatory checksum).
fn ipv6_udp(src: [u8; 16], dst: [u8; 16], dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&udp);
    let c = checksum(&pseudo);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&udp);
    p
}

/// A gratuitous ARP reply: `ip` is at `mac`.
fn garp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 2];
    a.extend_from_slice(&mac);
    a.extend_from_slice(&ip.octets());
    a.extend_from_slice(&[0xff; 6]);
    a.extend_from_slice(&ip.octets());
    ethernet([0xff; 6], mac, 0x0806, &a)
}

/// A link-local IPv6 address from a MAC (EUI-64, as the kernel makes it).
fn link_local(mac: [u8; 6]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[8] = mac[0] ^ 0x02;
    a[9] = mac[1];
    a[10] = mac[2];
    a[11] = 0xff;
    a[12] = 0xfe;
    a[13] = mac[3];
    a[14] = mac[4];
    a[15] = mac[5];
    a
}

/// Sends `frame` in a VXLAN datagram with `vni` from namespace `ns`
/// (from `source` if given) to `to`:4789.
fn send_vxlan(ns: &str, source: Option<Ipv4Addr>, to: Ipv4Addr, vni: u32, frame: &[u8]) {
    let mut dgram = vec![0x08, 0, 0, 0];
    dgram.extend_from_slice(&vni.to_be_bytes()[1..]);
    dgram.push(0);
    dgram.extend_from_slice(frame);
    in_netns(ns, move || {
        let sock = UdpSocket::bind((source.unwrap_or(Ipv4Addr::UNSPECIFIED), 0)).unwrap();
        for _ in 0..3 {
            sock.send_to(&dgram, (to, 4789)).unwrap();
        }
    })
    .unwrap();
}

/// A UDP listener in namespace `ns` on `port` (IPv4 or, with `v6`, IPv6).
fn listen_udp(ns: &str, port: u16, v6: bool) -> UdpSocket {
    in_netns(ns, move || {
        let s = if v6 { UdpSocket::bind(("::", port)) } else { UdpSocket::bind(("0.0.0.0", port)) }.unwrap();
        s.set_read_timeout(Some(QUIET)).unwrap();
        s
    })
    .unwrap()
}

/// Whether a datagram whose payload is `marker` arrives within [`QUIET`].
fn received(sock: &UdpSocket, marker: &[u8]) -> bool {
    let mut buf = [0u8; 2048];
    let deadline = std::time::Instant::now() + QUIET;
    while std::time::Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == marker => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// Sends one datagram from namespace `ns`, bound to `source`.
fn send_udp(ns: &str, source: Ipv4Addr, to: SocketAddr, payload: &'static [u8], broadcast: bool) {
    in_netns(ns, move || {
        let s = UdpSocket::bind((source, 0)).unwrap();
        s.set_broadcast(broadcast).unwrap();
        for _ in 0..3 {
            let _ = s.send_to(payload, to);
        }
    })
    .unwrap();
}

async fn sh(args: &[&str]) {
    let st = tokio::process::Command::new(args[0]).args(&args[1..]).status().await.unwrap();
    assert!(st.success(), "{args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overlay_the_host_and_the_public_side_refuse_what_does_not_belong() {
    let topo = Topology::new(2).await;
    // Host 1's operator lets its own private network (172.16.0.0/12, which
    // holds the VPC's range) reach public addresses: VPC sources from
    // outside must be dropped all the same.
    let mut c1 = topo.hosts[1].vpc_config();
    c1.outside_allow = vec![cidr("172.16.0.0/12")];
    let (h0, h1) = (DataPlane::new(topo.hosts[0].vpc_config()), DataPlane::new(c1));
    let (u0, u1) = (topo.hosts[0].underlay_ip, topo.hosts[1].underlay_ip);
    let public = Ipv4Addr::new(198, 51, 100, 10);
    // VPC 100: a on host 0, b (public address) on host 1; VPC 200 (another
    // account): e on host 1.
    let a = nic(1, 100, Ipv4Addr::new(172, 31, 0, 5), SUBNET_A, &["sg-app"], None);
    let b = nic(2, 100, Ipv4Addr::new(172, 31, 0, 6), SUBNET_A, &["sg-app"], Some(public));
    let e = nic(3, 200, Ipv4Addr::new(172, 31, 0, 9), SUBNET_A, &["sg-e"], Some(Ipv4Addr::new(198, 51, 100, 11)));
    // f: b's neighbour on host 1, in the same group.
    let f = nic(4, 100, Ipv4Addr::new(172, 31, 0, 7), SUBNET_A, &["sg-app"], None);
    let mut members = BTreeMap::new();
    members.insert("sg-app".to_string(), vec![a.private_ip, b.private_ip, f.private_ip]);
    members.insert("sg-e".to_string(), vec![e.private_ip]);
    let open_e = SecurityGroup {
        group_id: "sg-e".into(),
        vpc_id: "vpc-200".into(),
        ingress: vec![],
        egress: vec![Rule { protocol: Protocol::All, ports: None, peer: Peer::Cidr(cidr("0.0.0.0/0")) }],
    };
    let net0 = HostNetwork { vpcs: vec![vpc(100, Some(u1), SUBNETS, &[&b, &f])], groups: vec![app()], members: members.clone() };
    let net1 = HostNetwork {
        vpcs: vec![vpc(100, Some(u0), SUBNETS, &[&a]), vpc(200, None, SUBNETS, &[])],
        groups: vec![app(), open_e],
        members: members.clone(),
    };
    h0.reconcile(&net0, std::slice::from_ref(&a), true).await.unwrap();
    h1.reconcile(&net1, &[b.clone(), e.clone(), f.clone()], true).await.unwrap();
    h0.prepare(std::slice::from_ref(&a)).await.unwrap();
    h1.prepare(&[b.clone(), e.clone(), f.clone()]).await.unwrap();
    let mtu = h0.mtu();
    let (ga, gb, ge) = (FakeGuest::new(&a, mtu).await, FakeGuest::new(&b, mtu).await, FakeGuest::new(&e, mtu).await);
    let gf = FakeGuest::new(&f, mtu).await;
    let _ssh = Echo::start(&gb.ns.name, 22).await;
    let _member = Echo::start(&gb.ns.name, 8080).await;

    // What works: a reaches b across hosts (a member), the outside reaches
    // b's public address on 22.
    assert_eq!(connect(&ga.ns.name, None, SocketAddr::from((b.private_ip, 8080)), T).await, Ok("hello 172.31.0.5".into()));
    assert_eq!(connect(&topo.outside.name, None, SocketAddr::from((public, 22)), T).await, Ok(format!("hello {OUTSIDE_IP}")));

    let (bmac, amac) = (mac_bytes(&b.mac), mac_bytes(&a.mac));
    let listener = listen_udp(&gb.ns.name, 9000, false);
    let spoofed_src = Ipv4Addr::new(172, 31, 0, 250);

    // 1. VXLAN from the internet: VNI 100, an inner frame that passes for
    // a's (its MAC and address, which b's group lets in).
    let as_a = |marker: &[u8]| ethernet(bmac, amac, 0x0800, &ipv4_udp(a.private_ip, b.private_ip, 9000, marker));
    send_vxlan(&topo.outside.name, None, u1, 100, &as_a(b"from-outside"));
    assert!(!received(&listener, b"from-outside"), "VXLAN from the internet was delivered to a guest");

    // 1. From a guest of another VPC (e, VNI 200, with a public address)
    // through its own host's underlay address: the VXLAN socket is never
    // reached, nor anything else of the host, nor the underlay.
    send_vxlan(&ge.ns.name, None, u1, 100, &as_a(b"from-guest"));
    assert!(!received(&listener, b"from-guest"), "a guest injected VXLAN through its host");
    let host_listener = listen_udp(&topo.hosts[1].ns.name, 7171, false);
    send_udp(&ge.ns.name, e.private_ip, SocketAddr::from((u1, 7171)), b"to-my-host", false);
    assert!(!received(&host_listener, b"to-my-host"), "a guest reached a service of its host");
    let other_host_listener = listen_udp(&topo.hosts[0].ns.name, 7171, false);
    send_udp(&gb.ns.name, b.private_ip, SocketAddr::from((u0, 7171)), b"to-the-underlay", false);
    assert!(!received(&other_host_listener, b"to-the-underlay"), "a guest reached another host on the underlay");
    // The internet stays reachable for a guest with a public address.
    let _internet = Echo::start(&topo.outside.name, 7070).await;
    assert_eq!(connect(&gb.ns.name, None, SocketAddr::from((OUTSIDE_IP, 7070)), T).await, Ok(format!("hello {public}")));

    // 1. From a compromised peer (host 0, a real peer of VNI 100, with a MAC
    // it holds): a source address it does not hold, IPv6, and a gratuitous
    // ARP claiming b's address are all dropped on arrival.
    send_vxlan(
        &topo.hosts[0].ns.name,
        Some(u0),
        u1,
        100,
        &ethernet(bmac, amac, 0x0800, &ipv4_udp(spoofed_src, b.private_ip, 9000, b"peer-spoof")),
    );
    assert!(!received(&listener, b"peer-spoof"), "a peer sent from an address it does not hold");
    let listener6 = listen_udp(&gb.ns.name, 9006, true);
    let v6 = ipv6_udp(link_local(amac), link_local(bmac), 9006, b"peer-v6");
    send_vxlan(&topo.hosts[0].ns.name, Some(u0), u1, 100, &ethernet(bmac, amac, 0x86dd, &v6));
    assert!(!received(&listener6, b"peer-v6"), "IPv6 crossed the overlay");
    for _ in 0..5 {
        send_vxlan(&topo.hosts[0].ns.name, Some(u0), u1, 100, &garp(amac, b.private_ip));
    }
    let neigh = tokio::process::Command::new("ip")
        .args(["-n", &h1.vpc_ns_name(100), "neigh", "show", &b.private_ip.to_string()])
        .output()
        .await
        .unwrap();
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    assert!(!neigh.contains(&a.mac), "a peer's ARP claimed another host's address: {neigh}");
    assert_eq!(connect(&topo.outside.name, None, SocketAddr::from((public, 22)), T).await, Ok(format!("hello {OUTSIDE_IP}")));
    // The same peer sending as itself (a's MAC and address) is delivered.
    send_vxlan(
        &topo.hosts[0].ns.name,
        Some(u0),
        u1,
        100,
        &ethernet(bmac, amac, 0x0800, &ipv4_udp(a.private_ip, b.private_ip, 9000, b"peer-honest")),
    );
    assert!(received(&listener, b"peer-honest"), "a peer's own traffic must pass");

    // 2. A VPC source spoofed from the internet through b's public address
    // (a member's address: the group lets its members in). The outside
    // holds the address on its loopback and sends from it.
    sh(&["ip", "-n", &topo.outside.name, "addr", "add", "172.31.0.5/32", "dev", "lo"]).await;
    send_udp(&topo.outside.name, a.private_ip, SocketAddr::from((public, 9000)), b"spoofed-member", false);
    assert!(!received(&listener, b"spoofed-member"), "a VPC source spoofed from outside passed the group");
    // A private source from outside too (it could only be spoofed).
    sh(&["ip", "-n", &topo.outside.name, "addr", "add", "10.1.2.3/32", "dev", "lo"]).await;
    assert!(connect(&topo.outside.name, Some(Ipv4Addr::new(10, 1, 2, 3)), SocketAddr::from((public, 22)), BLOCKED).await.is_err());
    let rp = tokio::process::Command::new("ip")
        .args(["netns", "exec", &h1.vpc_ns_name(100), "sysctl", "-n", "net.ipv4.conf.all.rp_filter"])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&rp.stdout).trim(), "1", "strict reverse-path filtering in the VPC");

    // 9. Broadcast between instances: a and f are members of b's group, so
    // b takes their unicast; a subnet or a limited broadcast reaches nobody,
    // from the same host (f) or another (a): as in EC2, a VPC carries
    // unicast only.
    let bcast_listener = listen_udp(&gb.ns.name, 9100, false);
    for (g, src, name) in [(&gf, f.private_ip, "same host"), (&ga, a.private_ip, "another host")] {
        send_udp(&g.ns.name, src, SocketAddr::from((Ipv4Addr::new(172, 31, 15, 255), 9100)), b"subnet-bcast", true);
        assert!(!received(&bcast_listener, b"subnet-bcast"), "a subnet broadcast from {name} reached b");
        send_udp(&g.ns.name, src, SocketAddr::from((Ipv4Addr::BROADCAST, 9100)), b"limited-bcast", true);
        assert!(!received(&bcast_listener, b"limited-bcast"), "a limited broadcast from {name} reached b");
        send_udp(&g.ns.name, src, SocketAddr::from((b.private_ip, 9100)), b"unicast", false);
        assert!(received(&bcast_listener, b"unicast"), "unicast between members passes ({name})");
    }
}
