//! The VPC data plane on real kernel networking: two simulated hosts (network
//! namespaces) on an underlay, an outside world, and stand-in guests whose
//! interfaces are veth ends handed to the data plane as taps. The control
//! plane's part is played by literal `HostNetwork`s.

use nimbus_host_agent::network::testing::{connect, nic, vpc, Echo, FakeGuest, Topology, OUTSIDE_IP};
use nimbus_host_agent::network::DataPlane;
use nimbus_proto::network::{Cidr, HostNetwork, Peer, Protocol, Rule, SecurityGroup};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The VPCs' two subnets, one per zone.
const SUBNETS: &[(&str, &str)] = &[("subnet-a", "172.31.0.0/20"), ("subnet-b", "172.31.16.0/20")];

const T: Duration = Duration::from_secs(5);
const BLOCKED: Duration = Duration::from_secs(2);

fn cidr(s: &str) -> Cidr {
    Cidr::parse(s).unwrap()
}

fn any() -> Cidr {
    cidr("0.0.0.0/0")
}

fn group(id: &str, vpc: &str, ingress: Vec<Rule>) -> SecurityGroup {
    SecurityGroup {
        group_id: id.into(),
        vpc_id: vpc.into(),
        ingress,
        egress: vec![Rule { protocol: Protocol::All, ports: None, peer: Peer::Cidr(any()) }],
    }
}

fn tcp(port: u16, peer: Peer) -> Rule {
    Rule { protocol: Protocol::Tcp, ports: Some((port, port)), peer }
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_vpcs_security_groups_public_addresses_and_spoofing() {
    let topo = Topology::new(2).await;
    let (h0, h1) = (DataPlane::new(topo.hosts[0].vpc_config()), DataPlane::new(topo.hosts[1].vpc_config()));
    let (u0, u1) = (topo.hosts[0].underlay_ip, topo.hosts[1].underlay_ip);
    let public = Ipv4Addr::new(198, 51, 100, 10);

    // VPC 100: a on host 0; b (with a public address) and c (other subnet) on host 1.
    // VPC 200 reuses a's address on host 0: overlapping VPCs never meet.
    let a = nic(1, 100, Ipv4Addr::new(172, 31, 0, 5), "172.31.0.0/20", &["sg-app"], None);
    let b = nic(2, 100, Ipv4Addr::new(172, 31, 0, 6), "172.31.0.0/20", &["sg-app"], Some(public));
    let c = nic(3, 100, Ipv4Addr::new(172, 31, 16, 7), "172.31.16.0/20", &["sg-app"], None);
    let d = nic(4, 200, Ipv4Addr::new(172, 31, 0, 5), "172.31.0.0/20", &["sg-other"], None);
    let app = |extra: Vec<Rule>| {
        let mut rules = vec![tcp(8080, Peer::Group("sg-app".into()))];
        rules.extend(extra);
        group("sg-app", "vpc-100", rules)
    };
    let mut members = BTreeMap::new();
    members.insert("sg-app".to_string(), vec![a.private_ip, b.private_ip, c.private_ip]);
    members.insert("sg-other".to_string(), vec![d.private_ip]);
    let other = group("sg-other", "vpc-200", vec![tcp(8080, Peer::Cidr(any()))]);
    let net0 = |app: SecurityGroup| HostNetwork {
        vpcs: vec![vpc(100, Some(u1), SUBNETS, &[&b, &c]), vpc(200, None, SUBNETS, &[])],
        groups: vec![app, other.clone()],
        members: members.clone(),
    };
    let net1 =
        |app: SecurityGroup| HostNetwork { vpcs: vec![vpc(100, Some(u0), SUBNETS, &[&a])], groups: vec![app], members: members.clone() };

    h0.reconcile(&net0(app(vec![])), &[a.clone(), d.clone()], true).await.unwrap();
    h1.reconcile(&net1(app(vec![])), &[b.clone(), c.clone()], true).await.unwrap();
    h0.prepare(&[a.clone(), d.clone()]).await.unwrap();
    h1.prepare(&[b.clone(), c.clone()]).await.unwrap();
    let mtu = h0.mtu();
    let (ga, gb, gc, gd) =
        (FakeGuest::new(&a, mtu).await, FakeGuest::new(&b, mtu).await, FakeGuest::new(&c, mtu).await, FakeGuest::new(&d, mtu).await);

    let _servers = [
        Echo::start(&gb.ns.name, 8080).await,
        Echo::start(&gb.ns.name, 22).await,
        Echo::start(&gb.ns.name, 9999).await,
        Echo::start(&gc.ns.name, 8080).await,
        Echo::start(&ga.ns.name, 8080).await,
    ];
    // Same subnet across hosts, and another subnet across hosts (routed on the sending host).
    assert_eq!(connect(&ga.ns.name, None, addr(b.private_ip, 8080), T).await, Ok("hello 172.31.0.5".into()));
    assert_eq!(connect(&ga.ns.name, None, addr(c.private_ip, 8080), T).await, Ok("hello 172.31.0.5".into()));
    assert_eq!(connect(&gc.ns.name, None, addr(a.private_ip, 8080), T).await, Ok("hello 172.31.16.7".into()));
    // Not allowed by the group: dropped.
    assert!(connect(&ga.ns.name, None, addr(b.private_ip, 9999), BLOCKED).await.is_err());
    assert!(connect(&ga.ns.name, None, addr(b.private_ip, 22), BLOCKED).await.is_err());
    // Another VPC, same address as a: it reaches nothing of VPC 100.
    assert!(connect(&gd.ns.name, None, addr(b.private_ip, 8080), BLOCKED).await.is_err());
    // The outside reaches b's public address only once a rule allows it.
    assert!(connect(&topo.outside.name, None, addr(public, 22), BLOCKED).await.is_err());
    let open = app(vec![tcp(22, Peer::Cidr(cidr(nimbus_host_agent::network::testing::INTERNET)))]);
    h1.reconcile(&net1(open.clone()), &[b.clone(), c.clone()], false).await.unwrap();
    assert_eq!(connect(&topo.outside.name, None, addr(public, 22), T).await, Ok(format!("hello {OUTSIDE_IP}")));
    // A revoked rule stops new connections.
    h1.reconcile(&net1(app(vec![])), &[b.clone(), c.clone()], false).await.unwrap();
    assert!(connect(&topo.outside.name, None, addr(public, 22), BLOCKED).await.is_err());

    // A guest that claims another address gets nowhere; its own still works.
    let spoofed = Ipv4Addr::new(172, 31, 0, 9);
    let _ =
        tokio::process::Command::new("ip").args(["-n", &ga.ns.name, "addr", "add", &format!("{spoofed}/20"), "dev", "eth0"]).status().await;
    assert!(connect(&ga.ns.name, Some(spoofed), addr(b.private_ip, 8080), BLOCKED).await.is_err());
    assert_eq!(connect(&ga.ns.name, Some(a.private_ip), addr(b.private_ip, 8080), T).await, Ok("hello 172.31.0.5".into()));

    // Level-triggered: a full pass over an intact host changes nothing that works.
    h0.reconcile(&net0(app(vec![])), &[a.clone(), d.clone()], true).await.unwrap();
    assert_eq!(connect(&ga.ns.name, None, addr(b.private_ip, 8080), T).await, Ok("hello 172.31.0.5".into()));

    // A VPC with no interface left on a host is removed from it.
    h0.reconcile(
        &HostNetwork { vpcs: vec![vpc(100, Some(u1), SUBNETS, &[&b, &c])], groups: vec![app(vec![])], members: members.clone() },
        std::slice::from_ref(&a),
        false,
    )
    .await
    .unwrap();
    let list = String::from_utf8(std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    assert!(!list.contains(&h0.vpc_ns_name(200)), "{list}");
    assert!(list.contains(&h0.vpc_ns_name(100)), "{list}");
    drop((ga, gb, gc, gd));
}
