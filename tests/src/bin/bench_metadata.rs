//! bench-metadata: the metadata service as a guest sees it, served from the
//! host's state-store replica.
//!
//! A control plane and two agents with store nodes (a ring of three, all
//! in this process, on libvirt's test driver: the metadata server is the
//! agent's, whatever runs the guest) and one instance; then:
//!
//! 1. GET `meta-data/instance-id` on the guest's metadata socket, on **one
//!    reused connection** (as cloud-init keeps its connection) and on a new
//!    connection per request: p50/p99/p99.9, with everything up;
//! 2. the same with the control plane and its database down
//!    (`Cloud::outage`);
//! 3. after recovery: API change (a tag, `POST /v1/tags`) → the new value
//!    served to the guest, p50/p99 over N changes.
//!
//! Needs `DATABASE_URL` (as the tests). Prints the figures.

use anyhow::{bail, Context};
use clap::Parser;
use nimbus_host_agent::HypervisorChoice;
use nimbus_tests::{free_local_addr, instance_ids, AgentHandle, Cloud};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    /// GETs per measurement.
    #[arg(long, default_value_t = 5000)]
    gets: usize,
    /// API changes measured.
    #[arg(long, default_value_t = 100)]
    changes: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(what: &str, mut lat: Vec<Duration>) {
    lat.sort();
    println!(
        "{what}: n={} p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        lat.len(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(percentile(&lat, 0.999)),
        ms(percentile(&lat, 1.0))
    );
}

/// One HTTP/1.1 connection to a metadata socket, kept open across requests.
struct Conn {
    stream: tokio::net::UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(socket: &Path) -> anyhow::Result<Conn> {
        Ok(Conn { stream: tokio::net::UnixStream::connect(socket).await?, buf: Vec::with_capacity(4096) })
    }

    /// GET `path`: (status, body).
    async fn get(&mut self, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n");
        self.stream.write_all(req.as_bytes()).await?;
        let mut chunk = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp.parse(&self.buf)? {
                let status = resp.code.context("no status")?;
                let len: usize = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                    .context("no Content-Length")?;
                while self.buf.len() < n + len {
                    let got = self.stream.read(&mut chunk).await?;
                    if got == 0 {
                        bail!("closed mid-body");
                    }
                    self.buf.extend_from_slice(&chunk[..got]);
                }
                let body = self.buf[n..n + len].to_vec();
                self.buf.drain(..n + len);
                return Ok((status, body));
            }
            let got = self.stream.read(&mut chunk).await?;
            if got == 0 {
                bail!("closed before a response");
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }
}

async fn measure(label: &str, socket: &Path, id: &str, gets: usize) -> anyhow::Result<()> {
    let path = "/latest/meta-data/instance-id";
    let mut conn = Conn::open(socket).await?;
    for _ in 0..100 {
        conn.get(path).await?;
    }
    let mut reused = Vec::with_capacity(gets);
    for _ in 0..gets {
        let t0 = Instant::now();
        let (status, body) = conn.get(path).await?;
        reused.push(t0.elapsed());
        if status != 200 || body != id.as_bytes() {
            bail!("{label}: answered {status} {:?}", String::from_utf8_lossy(&body));
        }
    }
    summary(&format!("{label}: GET on one reused connection"), reused);
    let mut fresh = Vec::with_capacity(gets / 5);
    for _ in 0..gets / 5 {
        let t0 = Instant::now();
        let (status, _) = Conn::open(socket).await?.get(path).await?;
        fresh.push(t0.elapsed());
        if status != 200 {
            bail!("{label}: answered {status}");
        }
    }
    summary(&format!("{label}: GET on a new connection each"), fresh);
    Ok(())
}

async fn store_agent(cloud: &Cloud, name: &str) -> anyhow::Result<AgentHandle> {
    let addr = free_local_addr()?;
    cloud.add_agent_configured(name, "az1", (8, 8192, 80), HypervisorChoice::Test, |c| c.store_listen = Some(addr)).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cloud = Cloud::start().await?;
    cloud.register_test_image().await?;
    let a = store_agent(&cloud, "a").await?;
    let b = store_agent(&cloud, "b").await?;
    let node = cloud.service.store.node.clone();
    cloud
        .wait_until(Duration::from_secs(30), || {
            let node = node.clone();
            async move { Ok(node.membership().view().iter().filter(|m| m.alive).count() >= 3) }
        })
        .await?;
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await?).pop().context("no instance")?;
    cloud.wait_for_state(std::slice::from_ref(&id), "running", Duration::from_secs(30)).await?;
    let host = cloud.host_of(&id).await?;
    let agent = if a.host_id.as_deref() == Some(&host) { &a } else { &b };
    let socket = agent.metadata_socket(&id);
    // Served from the store: the identity document has the region only the store's has.
    cloud
        .wait_until(Duration::from_secs(30), || async {
            let (s, body) = nimbus_host_agent::metadata::request(&socket, "GET", "/latest/dynamic/instance-identity/document", &[]).await?;
            Ok(s == 200 && String::from_utf8_lossy(&body).contains("\"region\""))
        })
        .await?;
    println!(
        "ring of 3 (control plane + 2 agents, mutual TLS), instance {id}; {} build",
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    measure("everything up", &socket, &id, args.gets).await?;
    cloud.outage().await?;
    if cloud.get("/v1/instances").await.is_ok() {
        bail!("the control plane still answers");
    }
    measure("PostgreSQL and control plane down", &socket, &id, args.gets).await?;
    cloud.recover().await?;
    cloud.post(&format!("/v1/instances/{id}/metadata-options"), json!({"instance_metadata_tags": "enabled"})).await?;
    let mut conn = Conn::open(&socket).await?;
    let mut lat = Vec::with_capacity(args.changes);
    for i in 0..args.changes {
        let value = format!("v{i}");
        let t0 = Instant::now();
        cloud.post("/v1/tags", json!({"resource_ids": [id], "tags": [{"key": "bench", "value": value}]})).await?;
        loop {
            let (status, body) = conn.get("/latest/meta-data/tags/instance/bench").await?;
            if status == 200 && body == value.as_bytes() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("change {i} not visible after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(t0.elapsed());
    }
    let mut sorted = lat.clone();
    sorted.sort();
    println!(
        "API change (tag) -> visible in the guest's metadata, {} changes: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (target p99 <= 1000 ms)",
        sorted.len(),
        ms(percentile(&sorted, 0.5)),
        ms(percentile(&sorted, 0.99)),
        ms(percentile(&sorted, 1.0))
    );
    Ok(())
}
