//! bench-launch: launch latency through the whole stack.
//!
//! 1. Test driver: API call → domain started by the agent on libvirt's
//!    `test:///default`, one launch at a time, p50/p99/max over N launches
//!    (the instances stay running, so later launches see a fuller host).
//! 2. Real guest (QEMU/TCG here, KVM on hardware): (API call → console
//!    marker) ÷ (`virsh create` of the very same domain XML → marker), median
//!    of R runs each. The marker is the guest's `NIMBUS-BOOT instance-id=` line.
//!
//! Needs what the tests need: `DATABASE_URL` and, for part 2,
//! `NIMBUS_IMAGE_DIR` and libvirtd (scripts/bench.sh sets them up).

use anyhow::{bail, Context};
use clap::Parser;
use nimbus_host_agent::reconcile::AgentEvent;
use nimbus_host_agent::HypervisorChoice;
use nimbus_tests::baseline::{median, virsh, Baseline};
use nimbus_tests::{instance_ids, Cloud, CloudOptions};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Launches on the test driver.
    #[arg(long, default_value_t = 500)]
    launches: usize,
    /// Real-guest runs of each kind (API and virsh).
    #[arg(long, default_value_t = 5)]
    real_runs: usize,
    /// Skip the real-guest part.
    #[arg(long)]
    skip_real: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn test_driver(launches: usize) -> anyhow::Result<()> {
    let limit = launches as u32 + 1;
    let cloud = Cloud::start_with(CloudOptions { db_connections: 10, default_limits: (limit, limit * 2), ..Default::default() }).await?;
    let mut agent =
        cloud.add_agent("bench", "az1", (launches as u32 + 1) * 2, (launches as u64 + 1) * 512, (launches as u64 + 1) * 8).await?;
    cloud.register_test_image().await?;
    let mut lat = Vec::with_capacity(launches);
    let mut api = Vec::with_capacity(launches);
    for _ in 0..launches {
        let t0 = Instant::now();
        let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await?;
        api.push(t0.elapsed());
        let id = instance_ids(&r).pop().context("no instance in the reservation")?;
        let started = loop {
            match tokio::time::timeout(Duration::from_secs(10), agent.events.recv()).await {
                Ok(Ok(AgentEvent::Started { instance_id, at })) if instance_id == id => break at,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => bail!("agent events: {e}"),
                Err(_) => bail!("instance {id} was not started within 10 s"),
            }
        };
        lat.push(started.duration_since(t0));
    }
    lat.sort();
    api.sort();
    println!("test driver: the launch call alone: p50 {:.2} ms  p99 {:.2} ms", ms(percentile(&api, 0.50)), ms(percentile(&api, 0.99)));
    println!(
        "test driver: API call -> domain started, {launches} launches: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (target p99 <= 20 ms)",
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().unwrap_or(&Duration::ZERO)),
    );
    agent.stop().await;
    Ok(())
}

const MARKER: &str = "NIMBUS-BOOT instance-id=";

/// Waits until the console log shows the marker line for `id`; returns when it was seen.
async fn wait_marker(console: &Path, id: &str) -> anyhow::Result<Instant> {
    let want = format!("{MARKER}{id}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if std::fs::read_to_string(console).map(|t| t.contains(&want)).unwrap_or(false) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("no marker for {id} in {}", console.display());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `virsh create` itself (libvirt starting QEMU, not the guest booting)
/// takes about half a second on a healthy host. Seconds mean the host is
/// broken, and a ratio measured on it says nothing: both sides pay the same
/// cost (on a fresh machine, 52 s per start gave a ratio of 1.0).
const VIRSH_CREATE_SANITY: Duration = Duration::from_secs(5);

async fn real_guest(runs: usize) -> anyhow::Result<()> {
    let image_dir = PathBuf::from(std::env::var("NIMBUS_IMAGE_DIR").context("NIMBUS_IMAGE_DIR must name the built tiny image")?);
    let cloud = Cloud::start().await?;
    let agent = cloud.add_agent_with("bench-real", "az1", 4, 4096, 50, HypervisorChoice::Auto).await?;
    let image = cloud.register_image_dir(&image_dir, true).await?;
    let instances_dir = agent.state_dir.join("instances");
    // One launch first, not counted: caches the image files and warms the page cache.
    let warm = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await?).pop().context("no instance")?;
    wait_marker(&instances_dir.join(&warm).join("console.log"), &warm).await?;
    // The agent reports slow domain starts as host problems: refuse to measure on such a host.
    let host = &cloud.get("/v1/hosts").await?["hosts"][0];
    if host["health"] != "ok" {
        bail!("the host is not healthy, so its figures would mean nothing: {}", host["problems"]);
    }
    cloud.post("/v1/instances/terminate", json!({"instance_ids": [warm]})).await?;
    cloud.wait_for_state(&[warm], "terminated", Duration::from_secs(60)).await?;
    let (mut api, mut direct) = (Vec::new(), Vec::new());
    for run in 0..runs {
        // Through the whole stack.
        let t0 = Instant::now();
        let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await?;
        let id = instance_ids(&r).pop().context("no instance")?;
        let console = instances_dir.join(&id).join("console.log");
        let seen = wait_marker(&console, &id).await?;
        api.push(seen - t0);
        let xml = virsh(&["dumpxml", &format!("nimbus-{id}")])?;
        cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await?;
        cloud.wait_for_state(std::slice::from_ref(&id), "terminated", Duration::from_secs(60)).await?;

        // The same XML straight to libvirt, with fresh files.
        let baseline = Baseline::prepare(&cloud, &agent, &image, &id, &xml).await?;
        let (t0, create) = baseline.create()?;
        if create > VIRSH_CREATE_SANITY {
            baseline.remove().await?;
            bail!(
                "`virsh create` alone took {:.1} s (a healthy host: ~0.5 s); is /dev/kvm root:kvm 0660? \
                 (libvirt re-probes QEMU on every start when the QEMU user cannot open it; scripts/install-deps.sh fixes it)",
                create.as_secs_f64()
            );
        }
        let seen = wait_marker(&baseline.files.console_log(), &id).await;
        baseline.remove().await?;
        direct.push(seen? - t0);
        println!(
            "  run {}: API -> marker {:.2} s, virsh create -> marker {:.2} s",
            run + 1,
            api[run].as_secs_f64(),
            direct[run].as_secs_f64()
        );
    }
    let (a, d) = (median(api), median(direct));
    println!(
        "real guest ({}): median API -> marker {:.3} s, virsh create -> marker {:.3} s, ratio {:.3} (target <= 1.05)",
        cloud.get("/v1/hosts").await?["hosts"][0]["hypervisor"].as_str().unwrap_or("?"),
        a.as_secs_f64(),
        d.as_secs_f64(),
        a.as_secs_f64() / d.as_secs_f64()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    test_driver(args.launches).await?;
    if !args.skip_real {
        real_guest(args.real_runs).await?;
    }
    Ok(())
}
