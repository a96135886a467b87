//! The Nimbus host agent: registers a hypervisor machine with the control
//! plane and converges its libvirt guests to what the control plane assigns.
//! See ARCHITECTURE.md at the repository root for the map.

pub mod access;
pub mod client;
pub mod console;
pub mod disks;
pub mod domain;
pub mod health;
pub mod images;
pub mod libvirt;
pub mod metadata;
pub mod network;
pub mod power;
pub mod reconcile;
mod setup;
pub mod store;

use clap::{Parser, ValueEnum};
use client::{ClientError, ControlPlane};
use domain::Hypervisor;
use nimbus_proto::agent::{HostCredential, Observation, RegisterHost, Report};
use reconcile::{AgentEvent, Reconciler};
pub use setup::Capacity;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HypervisorChoice {
    /// KVM where it really boots guests, QEMU/TCG otherwise.
    Auto,
    Kvm,
    Qemu,
    Xen,
    /// libvirt's in-memory test driver (`test:///default`).
    Test,
}

/// How guests are networked on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkChoice {
    /// The VPC data plane when `--underlay-address` is given and this agent
    /// may create network namespaces; QEMU user-mode networking otherwise.
    Auto,
    /// The VPC data plane: bridges, VXLAN, nftables (needs root).
    Vpc,
    /// QEMU user-mode networking: a guest reaches only its metadata service.
    User,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "nimbus-agent", about = "Nimbus host agent: runs the guests the control plane places here")]
pub struct AgentConfig {
    /// Base URL of the control plane: `https://` for its TLS listener
    /// (mutual TLS once this host has its certificate), `http://` for local
    /// development.
    #[arg(long, env = "NIMBUS_CONTROL_PLANE", default_value = "http://127.0.0.1:8787")]
    pub control_plane: String,
    /// The control plane's CA certificate (PEM; `--ca-cert-out` of the
    /// control plane), the only root trusted for an `https://` control plane.
    #[arg(long, env = "NIMBUS_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,
    /// Join token, used to register (and re-register if the credential is lost).
    #[arg(long, env = "NIMBUS_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: String,
    /// Unique name of this host.
    #[arg(long, env = "NIMBUS_HOST_NAME")]
    pub name: String,
    #[arg(long, env = "NIMBUS_AVAILABILITY_ZONE", default_value = "nimbus-1a")]
    pub availability_zone: String,
    #[arg(long, env = "NIMBUS_HYPERVISOR", value_enum, default_value = "auto")]
    pub hypervisor: HypervisorChoice,
    /// libvirt URI; derived from the hypervisor when absent.
    #[arg(long, env = "NIMBUS_LIBVIRT_URI")]
    pub libvirt_uri: Option<String>,
    /// Directory for the credential, the image cache and guests' files.
    #[arg(long, env = "NIMBUS_STATE_DIR", default_value = "/var/lib/nimbus")]
    pub state_dir: PathBuf,
    /// Directory for the guests' metadata sockets. Short: a socket's path
    /// must fit in 107 bytes, and QEMU connects to it by path.
    #[arg(long, env = "NIMBUS_RUN_DIR", default_value = "/run/nimbus")]
    pub run_dir: PathBuf,
    /// vCPUs offered to guests (default: host CPUs x cpu-allocation-ratio).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory offered to guests in MiB (default: host memory less reserved-memory-mib).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Disk offered to guests in GiB (default: 90% of the free space of state-dir).
    #[arg(long)]
    pub disk_gib: Option<u64>,
    #[arg(long, default_value_t = 4.0)]
    pub cpu_allocation_ratio: f64,
    #[arg(long, default_value_t = 1024)]
    pub reserved_memory_mib: u64,
    /// Longest wait of one long poll; also the heartbeat and resync period.
    #[arg(long, default_value_t = 5000)]
    pub poll_ms: u64,
    /// Seconds a guest gets to shut down after an ACPI request before it is powered off.
    #[arg(long, env = "NIMBUS_STOP_TIMEOUT_SECS", default_value_t = 30)]
    pub stop_timeout_secs: u64,
    /// Guest networking: the VPC data plane or QEMU user-mode networking.
    #[arg(long, env = "NIMBUS_NETWORK", value_enum, default_value = "auto")]
    pub network: NetworkChoice,
    /// This host's address on the underlay (VXLAN tunnels end here); enables the VPC data plane.
    #[arg(long, env = "NIMBUS_UNDERLAY_ADDRESS")]
    pub underlay_address: Option<std::net::Ipv4Addr>,
    /// The network namespace that holds the underlay and the uplink (default: the agent's own).
    #[arg(long, env = "NIMBUS_NETWORK_NAMESPACE")]
    pub network_namespace: Option<String>,
    /// The interface facing the public network: the host answers ARP there
    /// for its instances' public addresses.
    #[arg(long, env = "NIMBUS_UPLINK")]
    pub uplink: Option<String>,
    /// Prefix of the VPC namespaces' names (unique per host on one machine).
    #[arg(long, env = "NIMBUS_NETNS_PREFIX", default_value = "nimbus")]
    pub netns_prefix: String,
    /// The underlay's MTU; guests get 50 bytes less (VXLAN).
    #[arg(long, default_value_t = 1500)]
    pub underlay_mtu: u32,
    /// Destinations guests must never reach through this host, besides the
    /// underlay's own network, which is always denied (comma-separated
    /// CIDRs: e.g. the operator's management network).
    #[arg(long, env = "NIMBUS_GUEST_DENY", value_delimiter = ',', value_parser = parse_cidr)]
    pub guest_deny: Vec<nimbus_proto::network::Cidr>,
    /// Private source ranges allowed to reach instances' public addresses
    /// from outside (comma-separated CIDRs: the operator's own network).
    /// Otherwise a source inside a private, shared, loopback, link-local or
    /// multicast range is taken as spoofed and dropped.
    #[arg(long, env = "NIMBUS_OUTSIDE_ALLOW", value_delimiter = ',', value_parser = parse_cidr)]
    pub outside_allow: Vec<nimbus_proto::network::Cidr>,
    /// The user QEMU runs guests as (libvirt's `user` in qemu.conf); it and
    /// its primary group own what guests' QEMUs must open (see ARCHITECTURE.md).
    #[arg(long, env = "NIMBUS_QEMU_USER", default_value = "libvirt-qemu")]
    pub qemu_user: String,
    /// Cached image files no instance of this host uses are removed once
    /// unused this long (seconds).
    #[arg(long, env = "NIMBUS_IMAGE_CACHE_TTL_SECS", default_value_t = 86400)]
    pub image_cache_ttl_secs: u64,
    /// Where this host's state-store node listens (`ip:port`, also its node
    /// id; the IP must be one the other nodes reach). Without it the host
    /// runs no store node and serves metadata from its assignments only.
    #[arg(long, env = "NIMBUS_STORE_LISTEN")]
    pub store_listen: Option<std::net::SocketAddr>,
    /// How often a running agent renews this host's certificate (seconds,
    /// at most 180 days; certificates last a year, and every start renews
    /// too).
    #[arg(long, env = "NIMBUS_CERT_RENEW_SECS", default_value_t = 30 * 86_400,
          value_parser = clap::value_parser!(u64).range(1..=180 * 86_400))]
    pub cert_renew_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Libvirt(#[from] libvirt::LibvirtError),
    #[error("state directory {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Access(#[from] access::AccessError),
    #[error("{0}")]
    Config(String),
    #[error("this host's certificate: {0}")]
    Certificate(#[from] store::HostStoreError),
}

/// How long an agent whose name is held by another credential waits between
/// registration attempts (the operator's reset ends the wait).
const REREGISTER_BACKOFF: Duration = Duration::from_secs(10);

/// How long an agent waits to try again after a failed certificate renewal.
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// The HTTP client of the control plane. With `--control-plane-ca`: the
/// control plane must present a certificate of that CA valid for
/// [`nimbus_proto::agent::CONTROL_PLANE_NAME`] (whatever address it is
/// reached at), a name no host certificate carries, so no host can pass
/// for the control plane; `identity` (this host's certificate and key, PEM)
/// is presented when given.
async fn control_plane_client(config: &AgentConfig, identity: Option<&[u8]>) -> Result<reqwest::Client, AgentError> {
    let b = reqwest::Client::builder();
    let Some(path) = &config.control_plane_ca else {
        let b = match identity {
            Some(id) => {
                b.identity(reqwest::Identity::from_pem(id).map_err(|e| AgentError::Config(format!("this host's certificate: {e}")))?)
            }
            None => b,
        };
        return b.build().map_err(|e| AgentError::Config(e.to_string()));
    };
    let pem = tokio::fs::read(path).await.map_err(|source| AgentError::State { path: path.clone(), source })?;
    let tls = control_plane_tls(&pem, identity).map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
    b.use_preconfigured_tls(tls).build().map_err(|e| AgentError::Config(e.to_string()))
}

/// The rustls side of [`control_plane_client`].
pub fn control_plane_tls(ca_pem: &[u8], identity: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(ca.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(ControlPlaneVerifier(inner)));
    match identity {
        Some(id) => {
            let certs = CertificateDer::pem_slice_iter(id).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::from_pem_slice(id).map_err(|e| e.to_string())?;
            builder.with_client_auth_cert(certs, key).map_err(|e| e.to_string())
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Checks a server certificate as the control plane's: the CA's chain and
/// the control plane's name, not the name the URL happened to use.
#[derive(Debug)]
struct ControlPlaneVerifier(std::sync::Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ControlPlaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let name = rustls_pki_types::ServerName::try_from(nimbus_proto::agent::CONTROL_PLANE_NAME)
            .map_err(|_| rustls::Error::General("the control plane's name".into()))?;
        self.0.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// How often the metadata service looks for newer documents in the state store.
const METADATA_REFRESH: Duration = Duration::from_millis(100);

/// Aborts a task when dropped (the agent's helpers end with its run).
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// A host agent, built and ready to [`Agent::run`].
pub struct Agent {
    config: AgentConfig,
    cp: ControlPlane,
    reconciler: Reconciler,
    /// Observations that finished after their pass (see [`Reconciler::new`]).
    late: mpsc::UnboundedReceiver<Observation>,
    capacity: Capacity,
    /// The embedded state-store node, once certified (see `store.rs`).
    store: Option<std::sync::Arc<store::HostStore>>,
    /// Console tails and status checks written to the store.
    observed: tokio::sync::Mutex<store::Observed>,
    /// The client `cp` uses (with this host's certificate once it has one).
    cp_http: reqwest::Client,
}

impl Agent {
    /// Builds the agent of `config`, one named step after another (`setup.rs`).
    pub async fn new(config: AgentConfig) -> Result<Agent, AgentError> {
        let run_dir = setup::run_dir(&config)?;
        let (hypervisor, uri) = setup::hypervisor(&config).await?;
        let qemu = setup::qemu_user(&config, hypervisor)?;
        setup::private_dirs(&config, &run_dir, qemu).await?;
        let lv = libvirt::Libvirt::open(&uri).await?;
        let capacity = Capacity::detect(&config, &lv).await?;
        let network = setup::data_plane(&config)?;
        let saved_identity = setup::saved_identity(&config).await;
        let http = control_plane_client(&config, saved_identity.as_deref().map(str::as_bytes)).await?;
        let (reconciler, late) = Reconciler::new(setup::reconciler(&config, lv, hypervisor, qemu, run_dir, network)?);
        let cp = ControlPlane::new(&config.control_plane, http.clone());
        Ok(Agent { cp, config, reconciler, late, capacity, store: None, observed: Default::default(), cp_http: http })
    }

    /// Events of the agent's work (guest started, removed).
    pub fn events(&self) -> broadcast::Receiver<AgentEvent> {
        self.reconciler.subscribe()
    }

    pub fn hypervisor(&self) -> Hypervisor {
        self.reconciler.hypervisor()
    }

    fn credential_path(&self) -> PathBuf {
        self.config.state_dir.join("credential.json")
    }

    /// The saved credential, or a new one from registering. A registration
    /// sends the saved credential (if any) as proof that this machine is the
    /// host registered under its name; without it, or once the control plane
    /// no longer accepts it, only the operator's reset lets the name be taken
    /// again (the control plane answers `HostAlreadyRegistered` meanwhile).
    async fn credential(&self, force_register: bool) -> Result<HostCredential, AgentError> {
        let path = self.credential_path();
        let saved = match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice::<HostCredential>(&bytes).ok(),
            Err(_) => None,
        };
        if let (false, Some(cred)) = (force_register, &saved) {
            return Ok(cred.clone());
        }
        // The secret to be registered with is saved first: if this agent
        // stops before it saved the answer, the next one asks again with the
        // same secret, and the name is still its own.
        let pending = self.config.state_dir.join("credential.pending");
        let state = |p: &std::path::Path, source| AgentError::State { path: p.to_path_buf(), source };
        let secret = match tokio::fs::read_to_string(&pending).await {
            Ok(s) if nimbus_proto::agent::is_host_secret(s.trim()) => s.trim().to_string(),
            _ => {
                let bytes: [u8; 32] = rand::random();
                let secret = hex::encode(bytes);
                let tmp = pending.with_extension("part");
                tokio::fs::write(&tmp, &secret).await.map_err(|e| state(&tmp, e))?;
                access::agent_only(&tmp).await.map_err(|e| state(&tmp, e))?;
                tokio::fs::rename(&tmp, &pending).await.map_err(|e| state(&pending, e))?;
                secret
            }
        };
        let Capacity { vcpus, memory_mib, disk_gib } = self.capacity;
        let req = RegisterHost {
            name: self.config.name.clone(),
            availability_zone: self.config.availability_zone.clone(),
            hypervisor: self.reconciler.hypervisor().as_str().to_string(),
            vcpus,
            memory_mib,
            disk_gib,
            current_credential: saved.map(|c| c.bearer()),
            underlay_ip: self.reconciler.network().map(|n| n.config().underlay_ip),
            secret: Some(secret),
        };
        let cred = self.cp.register(&self.config.join_token, &req).await?;
        let tmp = path.with_extension("json.part");
        let json = serde_json::to_vec(&cred).map_err(|e| AgentError::Config(e.to_string()))?;
        tokio::fs::write(&tmp, json).await.map_err(|e| state(&tmp, e))?;
        // The host's secret: root's alone.
        access::agent_only(&tmp).await.map_err(|e| state(&tmp, e))?;
        tokio::fs::rename(&tmp, &path).await.map_err(|e| state(&path, e))?;
        // Saved: the next registration makes a new secret.
        if let Err(e) = tokio::fs::remove_file(&pending).await {
            tracing::warn!(error = %e, path = %pending.display(), "cannot remove the registered secret's file");
        }
        tracing::info!(host_id = %cred.host_id, vcpus, memory_mib, disk_gib, "registered with the control plane");
        Ok(cred)
    }

    /// Presents `certified` to an https:// control plane from now on (a
    /// new client: the control plane refuses certificates older than the
    /// one a host renewed with), also for the image store.
    async fn present(&mut self, certified: &store::Certified, cred: &HostCredential) -> Result<(), AgentError> {
        let identity = format!("{}{}", certified.cert_pem, certified.key_pem);
        let http = control_plane_client(&self.config, Some(identity.as_bytes())).await?;
        self.cp = ControlPlane::new(&self.config.control_plane, http.clone());
        self.cp_http = http;
        self.set_store_access(cred);
        Ok(())
    }

    /// Renews this host's certificate (presenting the current one) and
    /// presents the new one to the control plane and in the store node.
    async fn renew_certificate(&mut self, cred: &HostCredential) -> Result<(), AgentError> {
        let store_address = self.config.store_listen.map(|a| a.to_string());
        let certified = store::renew(&self.cp, cred, &self.config.state_dir, store_address).await?;
        if self.config.control_plane.starts_with("https://") {
            self.present(&certified, cred).await?;
        }
        if let Some(s) = &self.store {
            s.present(&certified)?;
        }
        tracing::info!("certificate renewed");
        Ok(())
    }

    /// The image store is reached with the host's credential.
    fn set_store_access(&self, cred: &HostCredential) {
        let access = images::StoreAccess { base: self.config.control_plane.clone(), bearer: cred.bearer(), client: self.cp_http.clone() };
        *self.reconciler.images().store.write().unwrap_or_else(|p| p.into_inner()) = Some(access);
    }

    /// Sends a report; on delivery, remembers the console output it carried.
    /// With a store node, console tails and status checks go to the store
    /// instead (a tail whose write failed goes with the report).
    async fn report(&self, cred: &HostCredential, mut observations: Vec<Observation>) -> Result<(), ClientError> {
        if let Some(store) = &self.store {
            let written = self.observed.lock().await.write(store, &mut observations).await;
            self.reconciler.console_delivered(&written);
        }
        let deferred = console::fit_budget(&mut observations, console::REPORT_BUDGET);
        if deferred > 0 {
            tracing::debug!(deferred, "console tails left for a later report");
        }
        let kvm = match self.reconciler.hypervisor() {
            Hypervisor::Kvm | Hypervisor::Qemu => health::kvm_device(std::path::Path::new("/dev/kvm")),
            Hypervisor::Xen | Hypervisor::Test => health::KvmDevice::Absent,
        };
        let problems = health::problems(self.reconciler.libvirt().starts.last(), &kvm);
        let images = self.reconciler.take_image_problems();
        let report = Report { observations, problems, images };
        if let Err(e) = self.cp.report(cred, &report).await {
            // Kept for the next report (within what one report may carry).
            for p in report.images {
                self.reconciler.image_problem(&p.image_id, p.message);
            }
            return Err(e);
        }
        self.reconciler.console_delivered(&report.observations);
        Ok(())
    }

    /// Runs until `shutdown` resolves. Guests keep running when the agent
    /// stops; the next agent adopts them.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let wait = Duration::from_millis(self.config.poll_ms);
        let mut cred = loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = self.credential(false) => match r {
                    Ok(c) => break c,
                    Err(e @ AgentError::Client(ClientError::Api { status: 409, .. })) => {
                        // Another machine's name, or ours with a lost credential: the
                        // operator decides (nimbus admin reset-host); keep asking.
                        tracing::error!(error = %e, "this host's name is registered to a credential this agent does not hold; retrying every 10 s");
                        tokio::time::sleep(REREGISTER_BACKOFF).await;
                    }
                    Err(AgentError::Client(ClientError::Api { status, code, message })) if status < 500 => {
                        return Err(AgentError::Config(format!("registration refused: {code}: {message}")));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register yet; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        self.reconciler.set_host_id(&cred.host_id);
        self.set_store_access(&cred);
        // A certificate from the control plane's CA: for the store node,
        // and for mutual TLS with an https:// control plane.
        let tls = self.config.control_plane.starts_with("https://");
        if self.config.store_listen.is_some() || tls {
            let store_address = self.config.store_listen.map(|a| a.to_string());
            let certified = loop {
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    r = store::certify(&self.cp, &cred, &self.config.state_dir, store_address.clone()) => match r {
                        Ok(c) => break c,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot get this host's certificate yet; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            };
            if tls {
                self.present(&certified, &cred).await?;
                tracing::info!("mutual TLS with the control plane");
            }
            if let Some(listen) = self.config.store_listen {
                loop {
                    tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        r = store::start(&certified, &cred.host_id, &self.config.state_dir, listen) => match r {
                            Ok(s) => {
                                self.reconciler.metadata().attach_store(s.documents());
                                self.store = Some(std::sync::Arc::new(s));
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot start the state store node yet; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                }
            }
        }
        // Documents newer than the assignments' reach the guests within
        // one refresh interval of reaching this host's replica.
        let refresher = self.store.is_some().then(|| {
            let servers = self.reconciler.metadata().clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(METADATA_REFRESH);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    servers.refresh().await;
                }
            })
        });
        let _refresher = AbortOnDrop(refresher);
        let certified = self.config.store_listen.is_some() || tls;
        let mut renew_at = tokio::time::Instant::now() + Duration::from_secs(self.config.cert_renew_secs);
        let mut after = 0;
        let mut backoff = Duration::from_millis(200);
        loop {
            let polled = tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep_until(renew_at), if certified => {
                    let again = match self.renew_certificate(&cred).await {
                        Ok(()) => Duration::from_secs(self.config.cert_renew_secs),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot renew this host's certificate; trying again in a minute");
                            RENEW_RETRY.min(Duration::from_secs(self.config.cert_renew_secs))
                        }
                    };
                    renew_at = tokio::time::Instant::now() + again;
                    continue;
                }
                Some(first) = self.late.recv() => {
                    // A stop finished after its pass: report it now (the poll
                    // is simply made again).
                    let mut observations = vec![first];
                    while let Ok(o) = self.late.try_recv() {
                        observations.push(o);
                    }
                    tracing::debug!(count = observations.len(), "reporting observations made after their pass");
                    if let Err(e) = self.report(&cred, observations).await {
                        tracing::warn!(error = %e, "cannot report; the next pass observes again");
                    }
                    continue;
                }
                r = self.cp.assignments(&cred, after, wait) => r,
            };
            let assignments = match polled {
                Ok(a) => a,
                Err(ClientError::Unauthorized(msg)) => {
                    tracing::warn!(%msg, "credential rejected; registering again");
                    match self.credential(true).await {
                        Ok(c) => {
                            self.reconciler.set_host_id(&c.host_id);
                            self.set_store_access(&c);
                            cred = c;
                            after = 0;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "re-registration failed; retrying every 10 s");
                            tokio::select! {
                                _ = &mut shutdown => break,
                                _ = tokio::time::sleep(REREGISTER_BACKOFF) => {}
                            }
                        }
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch assignments");
                    if after == 0 && self.store.is_some() {
                        // None yet since this agent started: its guests'
                        // metadata comes from the store meanwhile.
                        let served = self.reconciler.serve_from_store().await;
                        tracing::info!(served, "serving guests' metadata from the state store until the control plane answers");
                    }
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            // A poll that timed out (or the first) carries the full list: a
            // resync. One that returned because something changed: the changes.
            let observations = if assignments.full {
                self.reconciler.converge(&assignments.instances, &assignments.network).await
            } else {
                self.reconciler.converge_changes(&assignments.instances, &assignments.network).await
            };
            let reported = match self.report(&cred, observations).await {
                // Only a delivered report moves us past this generation.
                Ok(()) => {
                    after = assignments.generation;
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot report; will converge and report again");
                    false
                }
            };
            let pass = AgentEvent::PassCompleted { full: assignments.full, generation: assignments.generation, reported };
            self.reconciler.announce(pass);
        }
        self.reconciler.metadata().stop_all();
        Ok(())
    }
}

fn parse_cidr(s: &str) -> Result<nimbus_proto::network::Cidr, String> {
    nimbus_proto::network::Cidr::parse(s).ok_or_else(|| format!("{s:?} is not an IPv4 CIDR (a.b.c.d/n)"))
}
