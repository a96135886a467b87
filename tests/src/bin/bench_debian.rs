//! bench-debian: the Debian 12 cloud image under the whole stack.
//!
//! 1. (API call → cloud-init's finished line on the console) ÷ (`virsh
//!    create` of the very same domain XML, with fresh files → the same
//!    line), median of `--runs` (3) each, and their ratio (target ≤ 1.05).
//! 2. CreateImage of a `--disk-gib` (2) GiB disk holding data in one MiB of
//!    every `--fill-every` (2: half full), on the test driver (no guest to
//!    stop: the flatten, digest, upload and store), API call → `available`,
//!    median of `--runs`.
//! 3. CreateImage of the (stopped) Debian guest of part 1's last run, API
//!    call → `available`, once.
//!
//! Needs `DATABASE_URL`, `NIMBUS_DEBIAN_IMAGE_DIR` (`images/build-debian.sh`),
//! `NIMBUS_TEST_DIR` reachable by QEMU, and libvirtd.

use anyhow::{bail, Context};
use clap::Parser;
use nimbus_host_agent::HypervisorChoice;
use nimbus_tests::baseline::{median, virsh, Baseline};
use nimbus_tests::{instance_ids, read_console, Cloud};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Runs of each kind.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Virtual size of the disk of part 2, GiB.
    #[arg(long, default_value_t = 2)]
    disk_gib: u64,
    /// Part 2's disk has data in one MiB of every `fill_every` (the rest
    /// unallocated): 1 = full. The default, half full, keeps the bench
    /// within the free space of our CI machines (peak ~2x the data: the
    /// host's cache, the flattened copy, the store).
    #[arg(long, default_value_t = 2)]
    fill_every: u64,
    #[arg(long)]
    skip_boot: bool,
    #[arg(long)]
    skip_create_image: bool,
}

/// Waits for cloud-init's finished line; returns when it was seen.
async fn wait_finished(console: &Path) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let text = read_console(console);
        if text.lines().any(|l| l.contains("Cloud-init v. ") && l.contains(" finished at ")) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("no cloud-init finished line in {}", console.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_available(cloud: &Cloud, ami: &str) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let v = cloud.get(&format!("/v1/images/{ami}")).await?;
        match v["state"].as_str() {
            Some("available") => return Ok(Instant::now()),
            Some("failed") => bail!("image failed: {v}"),
            _ if Instant::now() > deadline => bail!("image not available in time: {v}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn boot(runs: usize, image_dir: &Path) -> anyhow::Result<()> {
    let cloud = Cloud::start().await?;
    let agent = cloud.add_agent_with("bench-debian", "az1", 4, 4096, 50, HypervisorChoice::Auto).await?;
    let image = cloud.register_image_dir(image_dir, true).await?;
    let instances_dir = agent.state_dir.join("instances");
    let (mut api, mut direct) = (Vec::new(), Vec::new());
    let mut last = None;
    for run in 0..runs {
        let t0 = Instant::now();
        let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await?;
        let id = instance_ids(&r).pop().context("no instance")?;
        let seen = wait_finished(&instances_dir.join(&id).join("console.log")).await?;
        api.push(seen - t0);
        let xml = virsh(&["dumpxml", &format!("nimbus-{id}")])?;
        // Stopped, not terminated: its metadata server keeps serving the
        // socket the same XML names (a missing guestfwd socket slows QEMU),
        // and no second guest competes for the CPU.
        cloud.post("/v1/instances/stop", json!({"instance_ids": [id]})).await?;
        cloud.wait_for_state(std::slice::from_ref(&id), "stopped", Duration::from_secs(300)).await?;

        // The same XML straight to libvirt, with fresh files.
        let baseline = Baseline::prepare(&cloud, &agent, &image, &id, &xml).await?;
        let (t0, _) = baseline.create()?;
        let seen = wait_finished(&baseline.files.console_log()).await;
        baseline.remove().await?;
        direct.push(seen? - t0);
        if run + 1 == runs {
            // Kept for part 3.
            last = Some(id.clone());
        } else {
            cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await?;
            cloud.wait_for_state(std::slice::from_ref(&id), "terminated", Duration::from_secs(120)).await?;
        }
        println!(
            "  run {}: API -> cloud-init finished {:.1} s, virsh create -> cloud-init finished {:.1} s",
            run + 1,
            api[run].as_secs_f64(),
            direct[run].as_secs_f64()
        );
    }
    let (a, d) = (median(api), median(direct));
    println!(
        "debian ({}): median of {runs}: API -> cloud-init finished {:.1} s, virsh create -> same line {:.1} s, ratio {:.3} (target <= 1.05)",
        cloud.get("/v1/hosts").await?["hosts"][0]["hypervisor"].as_str().unwrap_or("?"),
        a.as_secs_f64(),
        d.as_secs_f64(),
        a.as_secs_f64() / d.as_secs_f64()
    );
    if let Some(id) = last {
        let t0 = Instant::now();
        let made = cloud.post(&format!("/v1/instances/{id}/image"), json!({"name": "bench-debian-image"})).await?;
        let ami = made["image_id"].as_str().context("no image id")?.to_string();
        let done = wait_available(&cloud, &ami).await?;
        let made = cloud.get(&format!("/v1/images/{ami}")).await?;
        println!(
            "CreateImage of the stopped Debian guest ({} GiB virtual, booted once): API -> available {:.1} s",
            made["root_disk_size"].as_u64().unwrap_or(0) >> 30,
            (done - t0).as_secs_f64()
        );
    }
    Ok(())
}

/// A base disk of `gib` GiB with pseudo-random bytes (nothing compresses)
/// in one MiB of every `every`, holes elsewhere.
fn full_disk(dir: &Path, gib: u64, every: u64) -> anyhow::Result<PathBuf> {
    use std::io::{Seek, Write};
    let raw = dir.join("full.raw");
    let mut f = std::fs::File::create(&raw)?;
    f.set_len(gib << 30)?;
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut block = vec![0u8; 1 << 20];
    for mib in (0..(gib << 10)).filter(|m| m % every.max(1) == 0) {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.seek(std::io::SeekFrom::Start(mib << 20))?;
        f.write_all(&block)?;
    }
    f.sync_all()?;
    drop(f);
    let qcow2 = dir.join("full.qcow2");
    let out = std::process::Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2).output()?;
    if !out.status.success() {
        bail!("qemu-img: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::remove_file(&raw)?;
    Ok(qcow2)
}

async fn create_image(runs: usize, gib: u64, every: u64) -> anyhow::Result<()> {
    let cloud = Cloud::start().await?;
    let _agent = cloud.add_agent("bench-image", "az1", 8, 8192, 100).await?;
    let dir = cloud.dir.path().join("disk");
    std::fs::create_dir_all(&dir)?;
    let t0 = Instant::now();
    let disk = full_disk(&dir, gib, every)?;
    let digest = nimbus_host_agent::disks::sha256_file(&disk).await?;
    let data = (gib << 10).div_ceil(every.max(1));
    println!("  made a {gib} GiB disk with {data} MiB of data in {:.1} s", t0.elapsed().as_secs_f64());
    let image =
        cloud.post("/v1/images", json!({"name": "full-disk", "disk_url": format!("file://{}", disk.display()), "sha256": digest})).await?;
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "image_id": image["image_id"]})).await?;
    let id = instance_ids(&r).pop().context("no instance")?;
    cloud.wait_for_state(std::slice::from_ref(&id), "running", Duration::from_secs(300)).await?;
    let mut times = Vec::new();
    for run in 0..runs {
        let t0 = Instant::now();
        let made = cloud.post(&format!("/v1/instances/{id}/image"), json!({"name": format!("full-copy-{run}"), "no_reboot": true})).await?;
        let ami = made["image_id"].as_str().context("no image id")?.to_string();
        let done = wait_available(&cloud, &ami).await?;
        times.push(done - t0);
        println!("  run {}: CreateImage of a {gib} GiB disk ({data} MiB of data) -> available {:.1} s", run + 1, times[run].as_secs_f64());
        // Each made image is deregistered so the store keeps one file at a time.
        cloud.call(reqwest::Method::DELETE, &format!("/v1/images/{ami}"), None).await?;
    }
    println!(
        "CreateImage of a {gib} GiB disk with {data} MiB of data (test driver: flatten, SHA-256, upload, store): median of {runs} {:.1} s",
        median(times).as_secs_f64()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.skip_create_image {
        create_image(args.runs, args.disk_gib, args.fill_every).await?;
    }
    if !args.skip_boot {
        let image_dir =
            PathBuf::from(std::env::var("NIMBUS_DEBIAN_IMAGE_DIR").context("NIMBUS_DEBIAN_IMAGE_DIR must name the built Debian image")?);
        boot(args.runs, &image_dir).await?;
    }
    Ok(())
}
