//! bench-scheduler: placements per second with many hosts and one account.
//!
//! N simulated hosts (default 1,000 in three zones) register through the
//! real agent API and then behave like the agent without libvirt: each
//! long-polls its assignments and reports what it was told as done (running,
//! stopped, absent), which is also its heartbeat. C clients of **one
//! account** (default 32) launch one t3.nano at a time for a fixed time,
//! alternating the REST door and the EC2 door (SigV4). Prints placements/s,
//! launch latency p50/p99/p99.9, placement retries, errors by code, and
//! `pgbench -N` on the same PostgreSQL in the same run; then checks from SQL
//! that no host is over-committed, that every host's `used_*` and every
//! account's usage equal what its instances hold.
//!
//! Needs `DATABASE_URL` (as the tests). The control plane runs in this
//! process, on the same cores as PostgreSQL and the load.
//!
//! ```sh
//! DATABASE_URL=$(scripts/pg.sh test-url) cargo run --release -p nimbus-tests --bin bench-scheduler -- --hosts 1000 --clients 32 --secs 20
//! ```

use anyhow::{bail, Context};
use clap::Parser;
use nimbus_host_agent::client::ControlPlane;
use nimbus_proto::agent::{Observation, RegisterHost, Report};
use nimbus_proto::{Desired as DesiredState, ObservedState};
use nimbus_tests::{Cloud, CloudOptions, Ec2Keys};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Simulated hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Concurrent clients, all of one account.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of launching.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Seconds of `pgbench -N` before the launches (0: skip).
    #[arg(long, default_value_t = 10)]
    pgbench_secs: u64,
    /// The control plane's database connections.
    #[arg(long, default_value_t = 40)]
    db_connections: u32,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A host that does at once whatever it is assigned.
async fn simulated_host(cp: ControlPlane, cred: nimbus_proto::agent::HostCredential, stop: Arc<AtomicBool>) {
    let mut after = 0;
    while !stop.load(Ordering::Relaxed) {
        let a = match cp.assignments(&cred, after, Duration::from_secs(10)).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "simulated host: assignments");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        after = a.generation;
        let observations = a
            .instances
            .iter()
            .map(|i| Observation {
                instance_id: i.instance_id.clone(),
                state: match i.desired {
                    DesiredState::Running => ObservedState::Running,
                    DesiredState::Stopped => ObservedState::Stopped,
                    DesiredState::Terminated => ObservedState::Absent,
                },
                message: None,
                reboots: Some(i.reboots),
                console: None,
                ssh_endpoint: None,
            })
            .collect();
        if let Err(e) = cp.report(&cred, &Report { observations, problems: vec![], images: vec![] }).await {
            tracing::warn!(error = %e, "simulated host: report");
        }
    }
}

#[derive(Default)]
struct ClientStats {
    latencies: Vec<Duration>,
    rest: Vec<Duration>,
    ec2: Vec<Duration>,
    placed: usize,
    errors: BTreeMap<String, usize>,
}

async fn client(cloud: Arc<Cloud>, keys: Ec2Keys, image_id: String, until: Instant, n: usize) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut rest = n.is_multiple_of(2);
    while Instant::now() < until {
        let t0 = Instant::now();
        let outcome: Result<(), String> = if rest {
            match cloud.call(reqwest::Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano"}))).await {
                Ok((s, _)) if s.is_success() => Ok(()),
                Ok((_, body)) => Err(body["code"].as_str().unwrap_or("?").to_string()),
                Err(e) => Err(format!("transport: {e}")),
            }
        } else {
            let form = format!("Action=RunInstances&ImageId={image_id}&InstanceType=t3.nano&MinCount=1&MaxCount=1");
            match cloud.ec2(&keys, &form).await {
                Ok((200, _)) => Ok(()),
                Ok((_, xml)) => Err(nimbus_tests::xml_error_code(&xml).to_string()),
                Err(e) => Err(format!("transport: {e}")),
            }
        };
        stats.latencies.push(t0.elapsed());
        if rest {
            stats.rest.push(t0.elapsed())
        } else {
            stats.ec2.push(t0.elapsed())
        }
        match outcome {
            Ok(()) => stats.placed += 1,
            Err(code) => *stats.errors.entry(code).or_default() += 1,
        }
        rest = !rest;
    }
    stats
}

/// `pgbench -N` (single-row updates, one commit each) on a scratch database
/// of the same server: transactions per second.
fn pgbench(database_url: &str, secs: u64) -> anyhow::Result<f64> {
    let bin = "/usr/lib/postgresql/15/bin/pgbench";
    let (base, _) = database_url.rsplit_once('/').context("DATABASE_URL has no database")?;
    let name = format!("nimbus_bench_pgbench_{}", nimbus_tests::random_suffix());
    let url = format!("{base}/{name}");
    let admin = format!("{base}/postgres");
    let psql = |sql: &str| std::process::Command::new("/usr/lib/postgresql/15/bin/psql").args(["-q", "-X", &admin, "-c", sql]).status();
    if !psql(&format!("CREATE DATABASE {name}"))?.success() {
        bail!("cannot create the pgbench database");
    }
    let run = || -> anyhow::Result<f64> {
        let init = std::process::Command::new(bin).args(["-q", "-i", "-s", "8", &url]).output()?;
        if !init.status.success() {
            bail!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
        }
        let out = std::process::Command::new(bin).args(["-N", "-c", "8", "-j", "2", "-T", &secs.to_string(), &url]).output()?;
        if !out.status.success() {
            bail!("pgbench -N: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let tps = text
            .lines()
            .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()))
            .context("pgbench printed no tps")?;
        Ok(tps)
    };
    let tps = run();
    let _ = psql(&format!("DROP DATABASE {name}"));
    tps
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let database_url = std::env::var("DATABASE_URL").context("DATABASE_URL")?;

    let pgbench_tps = if args.pgbench_secs > 0 { Some(pgbench(&database_url, args.pgbench_secs)?) } else { None };
    if let Some(tps) = pgbench_tps {
        println!("pgbench -N (8 clients, {} s): {tps:.0} tps", args.pgbench_secs);
    }

    let cloud = Arc::new(
        Cloud::start_with(CloudOptions {
            db_connections: args.db_connections,
            default_limits: (10_000_000, 100_000_000),
            ..Default::default()
        })
        .await?,
    );
    let image = cloud.register_test_image().await?;
    let (akid, secret) = cloud.user_token.split_once(':').context("user token")?;
    let account: serde_json::Value = cloud.get("/v1/account").await?;
    let keys = Ec2Keys {
        account_id: account["account_id"].as_str().unwrap_or_default().to_string(),
        akid: akid.to_string(),
        secret: secret.to_string(),
    };

    // Hosts: register, then long-poll and report.
    let t0 = Instant::now();
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.hosts + 64).build()?;
    let cp = ControlPlane::new(&cloud.url, http);
    let stop = Arc::new(AtomicBool::new(false));
    let mut host_tasks = Vec::new();
    let registrations = futures::future::join_all((0..args.hosts).map(|i| {
        let cp = cp.clone();
        let join = cloud.join_token.clone();
        async move {
            let req = RegisterHost {
                name: format!("sim-{i:05}"),
                availability_zone: format!("az{}", i % 3 + 1),
                hypervisor: "test".into(),
                vcpus: 64,
                memory_mib: 256 * 1024,
                disk_gib: 4000,
                current_credential: None,
                underlay_ip: None,
                secret: None,
            };
            cp.register(&join, &req).await
        }
    }))
    .await;
    for r in registrations {
        let cred = r?;
        host_tasks.push(tokio::spawn(simulated_host(cp.clone(), cred, stop.clone())));
    }
    println!("{} hosts registered in {:.1} s", args.hosts, t0.elapsed().as_secs_f64());

    let until = Instant::now() + Duration::from_secs(args.secs);
    let started = Instant::now();
    let clients: Vec<_> =
        (0..args.clients).map(|n| tokio::spawn(client(cloud.clone(), keys.clone(), image.image_id.clone(), until, n))).collect();
    let mut all = ClientStats::default();
    for c in clients {
        let s = c.await?;
        all.latencies.extend(s.latencies);
        all.rest.extend(s.rest);
        all.ec2.extend(s.ec2);
        all.placed += s.placed;
        for (k, v) in s.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies.sort();
    let rate = all.placed as f64 / elapsed;
    println!(
        "{} hosts, {} clients of one account, {:.0} s: {} placed, {rate:.0} placements/s; launch latency p50 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms  max {:.1} ms",
        args.hosts,
        args.clients,
        elapsed,
        all.placed,
        ms(percentile(&all.latencies, 0.50)),
        ms(percentile(&all.latencies, 0.99)),
        ms(percentile(&all.latencies, 0.999)),
        ms(all.latencies.last().copied().unwrap_or_default()),
    );
    for (door, l) in [("REST", &mut all.rest), ("EC2", &mut all.ec2)] {
        l.sort();
        println!(
            "  {door} door: {} launches, p50 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms",
            l.len(),
            ms(percentile(l, 0.50)),
            ms(percentile(l, 0.99)),
            ms(percentile(l, 0.999))
        );
    }
    println!("placement retries (capacity or quota races): {}", nimbus_control_plane::service::placement_retries());
    println!("errors by code: {:?}", all.errors);
    if let Some(tps) = pgbench_tps {
        println!("placements/s ÷ pgbench -N tps: {:.2}", rate / tps);
    }

    // Invariants, from SQL.
    let accounting = cloud.vcpu_accounting().await?;
    let mut bad = 0;
    for (host, total, used, held) in &accounting {
        if used > total || used != held {
            bad += 1;
            println!("HOST {host}: total {total}, used {used}, held {held}");
        }
    }
    let (over,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM hosts h WHERE h.used_memory_mib > h.total_memory_mib OR h.used_disk_gib > h.total_disk_gib \
            OR h.used_memory_mib <> (SELECT coalesce(sum(memory_mib), 0) FROM instances i WHERE i.host_id = h.id AND i.capacity_held)",
    )
    .fetch_one(cloud.db())
    .await?;
    let usage = cloud.account_usage_mismatches().await?;
    println!(
        "invariants: {} hosts with vCPU accounting wrong, {over} with memory/disk wrong, {} accounts with usage wrong",
        bad,
        usage.len()
    );
    stop.store(true, Ordering::Relaxed);
    for t in host_tasks {
        t.abort();
    }
    if bad > 0 || over > 0 || !usage.is_empty() {
        bail!("an invariant does not hold");
    }
    Ok(())
}
