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
        .map(|i| Rule {
            protocol: Protocol::Tcp,
            ports: Some((1000 + i, 1000 + i)),
            peer: Peer::Cidr(Cidr::parse("10.0.0.0/8").unwrap_or(Cidr { addr: Ipv4Addr::new(10, 0, 0, 0), prefix: 8 })),
        })
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
            subnets: vec![SubnetOnHost {
                subnet_id: "subnet-bench".into(),
                cidr: subnet,
                gateway: subnet.nth(1).unwrap_or(Ipv4Addr::UNSPECIFIED),
            }],
            peers: vec![],
            remote_nics: vec![],
        }],
        groups: vec![SecurityGroup {
            group_id: "sg-bench".into(),
            vpc_id: "vpc-bench".into(),
            ingress: group_rules(rules, extra),
            egress: vec![],
        }],
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// Whether the VPC namespaces of `prefix` hold a rule for TCP port `port`.
async fn has_rule(prefix: &str, port: u16) -> anyhow::Result<bool> {
    let list = String::from_utf8(tokio::process::Command::new("ip").args(["netns", "list"]).output().await?.stdout)?;
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(&format!("{prefix}-v"))) {
        let out = tokio::process::Command::new("ip").args(["netns", "exec", ns, "nft", "list", "table", "inet", "nimbus"]).output().await?;
        if String::from_utf8_lossy(&out.stdout).contains(&format!("tcp dport {port} accept")) {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn rules(changes: usize) -> anyhow::Result<()> {
    use nimbus_tests::{instance_ids, Cloud};
    use serde_json::json;
    let topo = Topology::new(3).await;
    let cloud = Cloud::start().await?;
    let mut agents = Vec::new();
    for (i, host) in topo.hosts.iter().enumerate() {
        agents.push(
            cloud
                .add_vpc_agent(&format!("h{i}"), &format!("az{i}"), (8, 8192, 100), nimbus_host_agent::HypervisorChoice::Test, host)
                .await?,
        );
    }
    cloud.register_test_image().await?;
    let g = cloud.post("/v1/security-groups", json!({"group_name": "bench", "description": "bench"})).await?;
    let gid = g["group_id"].as_str().unwrap_or_default().to_string();
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = cloud
            .post("/v1/instances", json!({"instance_type": "t3.nano", "availability_zone": format!("az{i}"), "security_group_ids": [gid]}))
            .await?;
        ids.extend(instance_ids(&r));
    }
    cloud.wait_for_state(&ids, "running", Duration::from_secs(60)).await?;
    let mut took = Vec::new();
    for i in 0..changes {
        let port = 20000 + i as u16;
        let t0 = Instant::now();
        cloud
            .post(
                &format!("/v1/security-groups/{gid}/ingress"),
                json!({"rules": [{"protocol": "tcp", "from_port": port, "to_port": port, "cidrs": ["10.0.0.0/8"]}]}),
            )
            .await?;
        for h in &topo.hosts {
            while !has_rule(&h.prefix, port).await? {
                anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "rule {port} not on {} within 30 s", h.prefix);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        took.push(t0.elapsed());
    }
    took.sort();
    println!(
        "rules: AuthorizeSecurityGroupIngress -> rule in the ruleset of all 3 hosts, {changes} changes: p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms (target p99 <= 1 s; \
         includes ~10-30 ms of polling with nft)",
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        percentile(&took, 0.99).as_secs_f64() * 1e3,
        took.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    drop(agents);
    Ok(())
}

/// API call -> the guest's NIMBUS-READY line, for `launches` guests one after another.
async fn launch_times(cloud: &nimbus_tests::Cloud, agent: &nimbus_tests::AgentHandle, launches: usize) -> anyhow::Result<Vec<Duration>> {
    use nimbus_tests::instance_ids;
    use serde_json::json;
    let mut took = Vec::new();
    for _ in 0..launches {
        let t0 = Instant::now();
        let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await?;
        let id = instance_ids(&r).pop().ok_or_else(|| anyhow::anyhow!("no instance"))?;
        let console = agent.state_dir.join("instances").join(&id).join("console.log");
        loop {
            if nimbus_tests::read_console(&console).contains("NIMBUS-READY") {
                break;
            }
            anyhow::ensure!(t0.elapsed() < nimbus_tests::scaled(Duration::from_secs(180)), "{id} not ready within 180 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        took.push(t0.elapsed());
        cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await?;
        cloud.wait_for_state(&[id], "terminated", Duration::from_secs(120)).await?;
    }
    took.sort();
    Ok(took)
}

async fn launch(launches: usize) -> anyhow::Result<()> {
    use nimbus_host_agent::HypervisorChoice;
    let image = std::path::PathBuf::from(
        std::env::var("NIMBUS_IMAGE_DIR").map_err(|_| anyhow::anyhow!("NIMBUS_IMAGE_DIR must name the tiny image"))?,
    );
    let topo = Topology::new(1).await;
    let (user, vpc) = {
        let cloud = nimbus_tests::Cloud::start().await?;
        let agent = cloud.add_agent_with("user", "az1", 4, 4096, 50, HypervisorChoice::Auto).await?;
        cloud.register_image_dir(&image, true).await?;
        let user = launch_times(&cloud, &agent, launches).await?;
        drop(agent);
        let cloud = nimbus_tests::Cloud::start().await?;
        let agent = cloud.add_vpc_agent("vpc", "az1", (4, 4096, 50), HypervisorChoice::Auto, &topo.hosts[0]).await?;
        cloud.register_image_dir(&image, true).await?;
        (user, launch_times(&cloud, &agent, launches).await?)
    };
    let (u, v) = (user[user.len() / 2], vpc[vpc.len() / 2]);
    println!(
        "launch: API call -> NIMBUS-READY, median of {launches}: user-mode networking {:.2} s, VPC {:.2} s, VPC overhead {:+.2} s ({:+.0}%)",
        u.as_secs_f64(),
        v.as_secs_f64(),
        v.as_secs_f64() - u.as_secs_f64(),
        (v.as_secs_f64() / u.as_secs_f64() - 1.0) * 100.0
    );
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
    if want("rules") {
        rules(args.changes).await?;
    }
    if want("launch") {
        launch(args.launches).await?;
    }
    Ok(())
}
