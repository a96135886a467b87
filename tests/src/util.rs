//! Small helpers of the tests: tracing, local addresses, keys, temporary
//! directories, time scaling, test-driver domains, agent events, XML.

use crate::*;
use anyhow::bail;
use nimbus_host_agent::reconcile::AgentEvent;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};
use std::time::Duration;
use tokio::sync::broadcast;

static TRACING: Once = Once::new();

pub(crate) fn init_tracing() {
    TRACING.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("NIMBUS_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
    });
}

/// A loopback address of its own with a port free now, for a host's store
/// node (whose id must stay the same across restarts, so port 0 will not
/// do). Each call of a process gets another address of 127.0.0.0/8 (all of
/// it is loopback): a host's certificate names its node's IP, which no
/// other node (the control plane's is on 127.0.0.1) may share.
pub fn free_local_addr() -> anyhow::Result<std::net::SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes start at different places, so concurrent test binaries
    // rarely hand out the same address (ports differ anyway).
    let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id().wrapping_mul(97);
    let ip = std::net::Ipv4Addr::new(127, 1 + (n / 250 % 250) as u8, 0, 2 + (n % 250) as u8);
    let port = nimbus_state_store::local::free_port()?;
    // The port is free on 127.0.0.1; on this address too, or another one is found.
    for port in std::iter::once(port).chain(std::iter::repeat_with(|| nimbus_state_store::local::free_port().unwrap_or(0))).take(16) {
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return Ok(std::net::SocketAddr::from((ip, port)));
        }
    }
    anyhow::bail!("no free port on {ip}")
}

/// Whether libvirt (qemu:///system) knows a domain of this name.
pub fn domain_exists(name: &str) -> bool {
    std::process::Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "domstate", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// An ed25519 public key in OpenSSH form (a fixed key), built from its wire
/// encoding, for importing as a key pair.
pub fn ed25519_public_key(comment: &str) -> String {
    use base64::Engine;
    let mut blob = Vec::new();
    for part in [b"ssh-ed25519".as_slice(), &[7u8; 32]] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    format!("ssh-ed25519 {} {comment}", base64::engine::general_purpose::STANDARD.encode(blob))
}

/// 16 random hex digits (names, nonces).
pub fn random_suffix() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::var_os("NIMBUS_TEST_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        // Absolute: paths under it become file:// URLs and libvirt paths.
        let base = std::path::absolute(&base).unwrap_or(base);
        let dir = base.join(format!("nimbus-{tag}-{}", random_suffix()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The factor real-guest bounds are multiplied by: `NIMBUS_TEST_TIME_SCALE`
/// (a positive number, default 1), read once per process.
pub fn time_scale() -> f64 {
    static SCALE: OnceLock<f64> = OnceLock::new();
    *SCALE.get_or_init(|| match std::env::var("NIMBUS_TEST_TIME_SCALE") {
        Err(_) => 1.0,
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => f,
            _ => panic!("NIMBUS_TEST_TIME_SCALE must be a positive number, not {v:?}"),
        },
    })
}

/// `d` times [`time_scale`]: every bound on what a real guest does.
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}

/// On libvirt's test driver: `None` when no domain is named for the
/// instance, else whether it runs.
pub async fn test_domain_state(instance_id: &str) -> Option<bool> {
    let name = nimbus_host_agent::domain::domain_name(instance_id);
    tokio::task::spawn_blocking(move || {
        let conn = virt::connect::Connect::open(Some("test:///default")).ok()?;
        let dom = conn.lookup_domain_by_name(&name).ok()?;
        dom.is_active().ok()
    })
    .await
    .ok()
    .flatten()
}

/// Defines (does not start) on the test driver the domain an agent of
/// `host_id` would define for `instance_id`, its files under `dir`.
pub async fn define_test_domain(host_id: &str, instance_id: &str, dir: &Path) -> anyhow::Result<()> {
    use nimbus_host_agent::domain::{render, GuestSpec, Hypervisor};
    std::fs::create_dir_all(dir)?;
    let xml = render(&GuestSpec {
        hypervisor: Hypervisor::Test,
        host_id: host_id.to_string(),
        instance_id: instance_id.to_string(),
        vcpus: 2,
        memory_mib: 512,
        kernel: Some("/nonexistent/kernel".into()),
        initrd: None,
        cmdline: String::new(),
        root_disk: dir.join("root.qcow2"),
        base_disk: "/nonexistent/base".into(),
        seed_iso: dir.join("seed.iso"),
        console_log: dir.join("console.log"),
        metadata_socket: dir.join("metadata.sock"),
        ssh_port: None,
        qemu: nimbus_host_agent::access::QemuUser::root(),
        nics: Vec::new(),
    })?;
    tokio::task::spawn_blocking(move || {
        let conn = virt::connect::Connect::open(Some("test:///default"))?;
        conn.define_domain_xml(&xml)?;
        Ok::<_, virt::error::Error>(())
    })
    .await??;
    Ok(())
}

/// Receives events until `f` picks one (returns `Some`), or fails after
/// `timeout` or when the agent is gone.
pub async fn await_event<T>(
    events: &mut broadcast::Receiver<AgentEvent>,
    timeout: Duration,
    mut f: impl FnMut(&AgentEvent) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => bail!("no such agent event within {timeout:?}"),
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => bail!("missed {n} agent events"),
            Ok(Err(broadcast::error::RecvError::Closed)) => bail!("the agent stopped"),
            Ok(Ok(e)) => {
                if let Some(t) = f(&e) {
                    return Ok(t);
                }
            }
        }
    }
}

/// A guest's serial console log as text (`\r` dropped): lossy, since a
/// guest may print any bytes (user-data scripts do); empty when missing.
pub fn read_console(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).replace('\r', "")
}

/// The instance ids of a reservation's JSON.
pub fn instance_ids(reservation: &Value) -> Vec<String> {
    reservation["instances"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["instance_id"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// The texts of every `<tag>…</tag>` of an XML answer, in order.
pub fn xml_values<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.match_indices(&open)
        .filter_map(|(i, _)| {
            let rest = &xml[i + open.len()..];
            rest.find(&close).map(|j| &rest[..j])
        })
        .collect()
}

/// The error code of an EC2 error answer ("" if none).
pub fn xml_error_code(xml: &str) -> &str {
    xml_values(xml, "Code").first().copied().unwrap_or("")
}
