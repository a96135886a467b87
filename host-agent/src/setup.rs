//! How an agent is built from its configuration, one named step each (in
//! the order [`crate::Agent::new`] takes them): the run directory, the
//! hypervisor, QEMU's user, the directories closed to local users, the
//! host's [`Capacity`], the VPC data plane, the certificate saved at the
//! last start, and what the reconciler works with.

use crate::access::QemuUser;
use crate::domain::Hypervisor;
use crate::libvirt::{self, Libvirt};
use crate::network::{self, DataPlane};
use crate::{images, metadata, reconcile, AgentConfig, AgentError, HypervisorChoice, NetworkChoice};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What this host offers guests, registered with the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Capacity {
    /// What the configuration says, each part it leaves out measured: the
    /// host's CPUs times the allocation ratio, its memory less the reserved
    /// memory, 90% of the state directory's free space.
    pub async fn detect(config: &AgentConfig, lv: &Libvirt) -> Result<Capacity, AgentError> {
        let (cpus, mem) = lv.node_resources().await?;
        let vcpus = config.vcpus.unwrap_or(((cpus as f64) * config.cpu_allocation_ratio).floor() as u32);
        let memory_mib = config.memory_mib.unwrap_or(mem.saturating_sub(config.reserved_memory_mib));
        let disk_gib = match config.disk_gib {
            Some(d) => d,
            None => {
                let st = nix::sys::statvfs::statvfs(&config.state_dir)
                    .map_err(|e| AgentError::State { path: config.state_dir.clone(), source: e.into() })?;
                (st.blocks_available() as u64 * st.fragment_size() as u64 / (1 << 30)) * 9 / 10
            }
        };
        Ok(Capacity { vcpus, memory_mib, disk_gib })
    }
}

fn state_error(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError {
    let path = path.to_path_buf();
    move |source| AgentError::State { path, source }
}

/// The run directory (the guests' metadata sockets), absolute.
pub(crate) fn run_dir(config: &AgentConfig) -> Result<PathBuf, AgentError> {
    let run_dir = std::path::absolute(&config.run_dir).map_err(state_error(&config.run_dir))?;
    if run_dir.to_string_lossy().contains(',') || run_dir.as_os_str().len() > metadata::MAX_RUN_DIR_LEN {
        // QEMU's options use ',' as a separator, and a socket's path is short.
        return Err(AgentError::Config(format!(
            "the run directory {} must be at most {} bytes long and hold no comma",
            run_dir.display(),
            metadata::MAX_RUN_DIR_LEN
        )));
    }
    Ok(run_dir)
}

/// The hypervisor guests run on, and the libvirt URI that reaches it.
pub(crate) async fn hypervisor(config: &AgentConfig) -> Result<(Hypervisor, String), AgentError> {
    Ok(match (config.hypervisor, &config.libvirt_uri) {
        (HypervisorChoice::Auto, uri) => {
            let d = libvirt::detect().await?;
            tracing::info!(hypervisor = d.hypervisor.as_str(), reason = %d.reason, "hypervisor detected");
            (d.hypervisor, uri.clone().unwrap_or(d.uri))
        }
        (HypervisorChoice::Kvm, uri) => (Hypervisor::Kvm, uri.clone().unwrap_or("qemu:///system".into())),
        (HypervisorChoice::Qemu, uri) => (Hypervisor::Qemu, uri.clone().unwrap_or("qemu:///system".into())),
        (HypervisorChoice::Xen, uri) => (Hypervisor::Xen, uri.clone().unwrap_or("xen:///system".into())),
        (HypervisorChoice::Test, uri) => (Hypervisor::Test, uri.clone().unwrap_or("test:///default".into())),
    })
}

/// Who QEMU runs guests as (see [`crate::access`]).
pub(crate) fn qemu_user(config: &AgentConfig, hypervisor: Hypervisor) -> Result<QemuUser, AgentError> {
    match (hypervisor, QemuUser::lookup(&config.qemu_user)) {
        (_, Ok(q)) => Ok(q),
        // No QEMU user opens files of a Xen PV guest or of the test driver.
        (Hypervisor::Xen | Hypervisor::Test, Err(_)) => Ok(QemuUser::root()),
        (_, Err(e)) => Err(e.into()),
    }
}

/// Makes (or closes) the state directory, its image cache and guests'
/// directory, and the run directory: closed to local users, as guests'
/// files hold tenants' data (see [`crate::access`]).
pub(crate) async fn private_dirs(config: &AgentConfig, run_dir: &Path, qemu: QemuUser) -> Result<(), AgentError> {
    for dir in [config.state_dir.clone(), config.state_dir.join("images"), config.state_dir.join("instances"), run_dir.to_path_buf()] {
        qemu.private_dir(&dir).await.map_err(state_error(&dir))?;
    }
    Ok(())
}

/// The VPC data plane, when the configuration asks for it and this agent
/// can build it; `None`: QEMU user-mode networking.
pub(crate) fn data_plane(config: &AgentConfig) -> Result<Option<DataPlane>, AgentError> {
    let network = match (config.network, config.underlay_address) {
        (NetworkChoice::User, _) => None,
        (NetworkChoice::Vpc, None) => return Err(AgentError::Config("--network vpc needs --underlay-address".into())),
        (NetworkChoice::Auto, None) => None,
        (NetworkChoice::Auto, Some(_)) if !nix::unistd::geteuid().is_root() => {
            tracing::warn!("not root: cannot build the VPC data plane; guests get QEMU user-mode networking");
            None
        }
        (NetworkChoice::Vpc | NetworkChoice::Auto, Some(underlay_ip)) => Some(DataPlane::new(network::VpcConfig {
            underlay_ip,
            host_ns: match &config.network_namespace {
                Some(n) => network::cmd::Ns::named(n),
                None => network::cmd::Ns::own(),
            },
            uplink: config.uplink.clone(),
            prefix: config.netns_prefix.clone(),
            underlay_mtu: config.underlay_mtu,
            guest_deny: config.guest_deny.clone(),
            outside_allow: config.outside_allow.clone(),
        })),
    };
    tracing::info!(vpc = network.is_some(), underlay = ?config.underlay_address, "guest networking");
    Ok(network)
}

/// For an https control plane, the certificate (and key, PEM) saved at the
/// last start, if any: it is presented at once, since renewing it needs it
/// (a credential alone gets no certificate once the host has one).
pub(crate) async fn saved_identity(config: &AgentConfig) -> Option<String> {
    if !config.control_plane.starts_with("https://") {
        return None;
    }
    let tls = config.state_dir.join("tls");
    match (tokio::fs::read_to_string(tls.join("cert.pem")).await, tokio::fs::read_to_string(tls.join("key.pem")).await) {
        (Ok(cert), Ok(key)) => Some(format!("{cert}{key}")),
        _ => None,
    }
}

/// What the reconciler works with: the image cache, the guests' directory,
/// the metadata service, the data plane and the configured policies.
pub(crate) fn reconciler(
    config: &AgentConfig,
    libvirt: Libvirt,
    hypervisor: Hypervisor,
    qemu: QemuUser,
    run_dir: PathBuf,
    network: Option<DataPlane>,
) -> Result<reconcile::Setup, AgentError> {
    Ok(reconcile::Setup {
        libvirt,
        hypervisor,
        // Registered sources: any http(s) server, trusted by the usual roots.
        images: images::ImageCache::new(
            config.state_dir.join("images"),
            reqwest::Client::builder().build().map_err(|e| AgentError::Config(e.to_string()))?,
            qemu,
        ),
        instances_dir: config.state_dir.join("instances"),
        metadata: metadata::MetadataServers::new(qemu, run_dir),
        qemu,
        network,
        stop_timeout: Duration::from_secs(config.stop_timeout_secs),
        image_cache_ttl: Duration::from_secs(config.image_cache_ttl_secs),
    })
}
