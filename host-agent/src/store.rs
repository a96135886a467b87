//! The host's state-store node, embedded in the agent process.
//!
//! Why embedded rather than a process the agent supervises: the metadata
//! service (this process) reads its guests' documents from the node's local
//! replica on every refresh, and in-process that read is a function call
//! on the node's storage (microseconds, no socket, no serialisation) for
//! every document this node holds a replica of (the others are quorum
//! reads); the
//! node shares the agent's lifetime, its TLS identity and its logs, and
//! there is one fewer daemon to install, supervise and upgrade. The cost:
//! an agent crash takes the node down too, which the ring tolerates like
//! any node failure (N=3, R=W=2, hinted handoff, anti-entropy).
//!
//! Identity: the agent makes an ECDSA P-256 key once
//! (`<state dir>/tls/key.pem`, root's alone) and, at every start, after
//! registering, has the control plane's CA certify it
//! (`POST /v1/agent/certificate`, authenticated by the host credential);
//! the answer carries the CA and the seeds of the ring (the control
//! plane's node and other hosts'). The certificate and CA are kept next to
//! the key, so an agent that restarts while the control plane is down
//! still starts its node with the certificate it had. A running agent
//! renews it every `--cert-renew-secs` (30 days; certificates last a
//! year): [`renew`], then [`HostStore::present`] swaps it into the node's
//! TLS for every later handshake.

use crate::client::ControlPlane;
use nimbus_proto::agent::{CertificateRequest, HostCredential};
use nimbus_state_store::{tcp, LocalClient, Node, TcpTransport, TlsConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum HostStoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the host's key: {0}")]
    Key(String),
    #[error("no certificate: the control plane cannot be reached ({0}) and none is saved")]
    NoCertificate(String),
    #[error("state store TLS: {0}")]
    Tls(#[from] nimbus_state_store::TlsError),
    #[error("state store node: {0}")]
    Node(#[from] nimbus_state_store::StoreError),
}

/// The running node and its listener.
pub struct HostStore {
    pub node: Arc<Node>,
    pub address: String,
    server: tokio::task::JoinHandle<()>,
    /// Shared with the node's listener and transport.
    tls: TlsConfig,
    /// Follows the control plane's revocation list (see [`follow_revocations`]).
    revocations: tokio::task::JoinHandle<()>,
    /// Who writes this host's records, and with which key.
    pub host_id: String,
    pub key: nimbus_records::KeyPair,
    /// The control plane's document keys.
    pub trusted: nimbus_records::TrustedKeys,
}

impl std::fmt::Debug for HostStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStore").field("address", &self.address).finish_non_exhaustive()
    }
}

impl Drop for HostStore {
    fn drop(&mut self) {
        self.node.shutdown();
        self.server.abort();
        self.revocations.abort();
    }
}

impl HostStore {
    pub fn client(&self) -> LocalClient {
        LocalClient(self.node.clone())
    }

    /// Presents a renewed certificate from now on (new connections, in and out).
    pub fn present(&self, certified: &Certified) -> Result<(), HostStoreError> {
        Ok(self.tls.replace_identity(certified.cert_pem.as_bytes(), certified.key_pem.as_bytes())?)
    }

    /// What the metadata service reads this host's documents through.
    pub fn documents(&self) -> crate::metadata::DocumentSource {
        crate::metadata::DocumentSource::new(self.node.clone(), self.host_id.clone(), self.key.clone(), self.trusted.clone())
    }
}

/// How often a host's node reads the control plane's revocation list.
pub const REVOCATION_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Applies the control plane's revocation list (`cluster/revoked`, signed
/// by its document key) to this node's TLS every [`REVOCATION_REFRESH`]:
/// revoked certificates are refused in later handshakes, and connections
/// open with them closed. A list that does not verify is ignored; without
/// the store, the last list stays.
async fn follow_revocations(node: Arc<Node>, tls: TlsConfig, trusted: nimbus_records::TrustedKeys) {
    use nimbus_state_store::KvClient;
    let key = nimbus_proto::agent::REVOCATION_KEY;
    let client = LocalClient(node);
    let mut tick = tokio::time::interval(REVOCATION_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let got = match client.get(key.as_bytes()).await {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the revocation list");
                continue;
            }
        };
        let Some((_, payload)) = nimbus_records::ClusterRecord::newest(&got.values, key, &trusted) else { continue };
        let Ok(list) = serde_json::from_slice::<Vec<String>>(&payload) else { continue };
        let digests: Vec<[u8; 32]> = list.iter().filter_map(|h| hex::decode(h).ok()?.try_into().ok()).collect();
        tls.set_revoked(digests);
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HostStoreError + '_ {
    move |source| HostStoreError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` (through a temporary file, root's alone).
async fn write_private(path: &Path, bytes: &[u8]) -> Result<(), HostStoreError> {
    let tmp = path.with_extension("part");
    tokio::fs::write(&tmp, bytes).await.map_err(io(&tmp))?;
    crate::access::agent_only(&tmp).await.map_err(io(&tmp))?;
    tokio::fs::rename(&tmp, path).await.map_err(io(path))
}

/// The host's key (PEM), made on first use.
async fn host_key(dir: &Path) -> Result<rcgen::KeyPair, HostStoreError> {
    let path = dir.join("key.pem");
    match tokio::fs::read_to_string(&path).await {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|e| HostStoreError::Key(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate().map_err(|e| HostStoreError::Key(e.to_string()))?;
            write_private(&path, key.serialize_pem().as_bytes()).await?;
            tracing::info!(path = %path.display(), "made this host's key");
            Ok(key)
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// This host's key and certificate (PEM), the CA, the ring's seeds.
pub struct Certified {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub seeds: Vec<String>,
    /// The control plane's document keys (saved beside the certificate).
    pub trusted: nimbus_records::TrustedKeys,
}

/// Has the control plane's CA certify this host's key (made on first use),
/// naming `store_address` if the host runs a store node; with the control
/// plane unreachable, the certificate saved last time.
pub async fn certify(
    cp: &ControlPlane,
    cred: &HostCredential,
    state_dir: &Path,
    store_address: Option<String>,
) -> Result<Certified, HostStoreError> {
    match renew(cp, cred, state_dir, store_address).await {
        Ok(c) => Ok(c),
        Err(HostStoreError::NoCertificate(e)) => {
            let dir = state_dir.join("tls");
            if !tokio::fs::try_exists(dir.join("cert.pem")).await.unwrap_or(false) {
                return Err(HostStoreError::NoCertificate(e));
            }
            tracing::warn!(error = %e, "cannot renew the certificate; starting with the saved one");
            let raw = tokio::fs::read(dir.join("seeds.json")).await.unwrap_or_default();
            let keys = tokio::fs::read(dir.join("document-keys.json")).await.unwrap_or_default();
            let trusted = nimbus_records::TrustedKeys(serde_json::from_slice(&keys).unwrap_or_default());
            saved(&dir, &host_key(&dir).await?, serde_json::from_slice(&raw).unwrap_or_default(), trusted).await
        }
        Err(e) => Err(e),
    }
}

/// A new certificate for this host's key from the control plane's CA,
/// saved next to the key (`NoCertificate` when the control plane refuses
/// or cannot be reached).
pub async fn renew(
    cp: &ControlPlane,
    cred: &HostCredential,
    state_dir: &Path,
    store_address: Option<String>,
) -> Result<Certified, HostStoreError> {
    use base64::Engine;
    let dir = state_dir.join("tls");
    tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
    let key = host_key(&dir).await?;
    let req = CertificateRequest { public_key: base64::engine::general_purpose::STANDARD.encode(key.public_key_raw()), store_address };
    let grant = cp.certificate(cred, &req).await.map_err(|e| HostStoreError::NoCertificate(e.to_string()))?;
    let (cert_path, ca_path, seeds_path) = (dir.join("cert.pem"), dir.join("ca.pem"), dir.join("seeds.json"));
    write_private(&cert_path, grant.certificate_pem.as_bytes()).await?;
    write_private(&ca_path, grant.ca_pem.as_bytes()).await?;
    let json = serde_json::to_vec(&grant.store_seeds).unwrap_or_default();
    write_private(&seeds_path, &json).await?;
    let keys_path = dir.join("document-keys.json");
    write_private(&keys_path, &serde_json::to_vec(&grant.document_keys).unwrap_or_default()).await?;
    tracing::info!(not_after = %grant.not_after, seeds = ?grant.store_seeds, "certificate issued by the control plane's CA");
    saved(&dir, &key, grant.store_seeds, nimbus_records::TrustedKeys(grant.document_keys)).await
}

/// `key` with the certificate and CA saved in `dir`.
async fn saved(
    dir: &Path,
    key: &rcgen::KeyPair,
    seeds: Vec<String>,
    trusted: nimbus_records::TrustedKeys,
) -> Result<Certified, HostStoreError> {
    let (cert_path, ca_path) = (dir.join("cert.pem"), dir.join("ca.pem"));
    let cert_pem = tokio::fs::read_to_string(&cert_path).await.map_err(io(&cert_path))?;
    let ca_pem = tokio::fs::read_to_string(&ca_path).await.map_err(io(&ca_path))?;
    Ok(Certified { key_pem: key.serialize_pem(), cert_pem, ca_pem, seeds, trusted })
}

/// Starts the host's node listening on `listen` (its id; the IP is named by
/// its certificate, so it must be an address the other nodes reach).
pub async fn start(certified: &Certified, host_id: &str, state_dir: &Path, listen: SocketAddr) -> Result<HostStore, HostStoreError> {
    let address = listen.to_string();
    let key = nimbus_records::KeyPair::from_pem(&certified.key_pem).map_err(|e| HostStoreError::Key(e.to_string()))?;
    // The control plane is the administrator (the client API, /admin);
    // other hosts' nodes may only replicate.
    let tls = TlsConfig::from_pem(certified.ca_pem.as_bytes(), certified.cert_pem.as_bytes(), certified.key_pem.as_bytes())?
        .with_admin_name(nimbus_proto::agent::CONTROL_PLANE_NAME)?;
    let seeds = certified.seeds.clone();
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(io(Path::new(&address)))?;
    let mut cfg = nimbus_state_store::Config::new(address.clone(), state_dir.join("store"));
    cfg.seeds = seeds.into_iter().filter(|s| *s != address).collect();
    let node = Node::start(cfg, Arc::new(TcpTransport::with_tls(tls.clone()))).await?;
    let server = tcp::serve_tls(node.clone(), listener, tls.clone());
    let joining = node.clone();
    tokio::spawn(async move {
        if let Err(e) = joining.join().await {
            tracing::error!(error = %e, "this host's store node was refused by the ring");
        }
    });
    tracing::info!(%address, "state store node started");
    let revocations = tokio::spawn(follow_revocations(node.clone(), tls.clone(), certified.trusted.clone()));
    Ok(HostStore { node, address, server, tls, revocations, host_id: host_id.to_string(), key, trusted: certified.trusted.clone() })
}

/// Writes `value` (JSON) under `key`, superseding whatever this node's
/// quorum read saw (the host is the only writer of its guests' console and
/// status records, so no siblings are left behind).
pub async fn write_record<T: serde::Serialize>(store: &HostStore, key: &str, value: &T) -> Result<(), nimbus_state_store::StoreError> {
    use nimbus_state_store::KvClient;
    let bytes = serde_json::to_vec(value).map_err(|e| nimbus_state_store::StoreError::Transport(format!("encoding {key}: {e}")))?;
    // Signed by this host: the control plane takes a record only from the
    // instance's host (`nimbus_records::SignedRecord`).
    let signed = nimbus_records::SignedRecord::sign(key, &store.host_id, &bytes, &store.key);
    let client = store.client();
    let got = client.get(key.as_bytes()).await?;
    client.put(key.as_bytes(), signed.encode(), &got.context).await?;
    Ok(())
}

/// What the host observes of its guests, written to the store:
/// console tails (`console/<id>`) when they change, and status checks
/// (`status/<id>`) when they change.
#[derive(Default)]
pub struct Observed {
    /// The checks last written, per instance.
    written: std::collections::HashMap<String, (nimbus_proto::metadata::Check, nimbus_proto::metadata::Check)>,
    /// Instances whose guest showed life (wrote to its console).
    alive: std::collections::HashSet<String>,
}

impl Observed {
    /// Writes the console tails the observations carry (taking them out of
    /// the report: the control plane reads them from the store) and the
    /// status checks that changed. Returns the observations whose tails
    /// were written (for the console tracker), and leaves those whose write
    /// failed in the report, which then carries them as before.
    pub async fn write(
        &mut self,
        store: &HostStore,
        observations: &mut [nimbus_proto::agent::Observation],
    ) -> Vec<nimbus_proto::agent::Observation> {
        use nimbus_proto::metadata::{console_key, status_key, Check, ConsoleRecord, StatusRecord};
        use nimbus_proto::ObservedState;
        let now = chrono::Utc::now();
        let mut written = Vec::new();
        for o in observations.iter_mut() {
            if let Some(output) = o.console.clone() {
                let record = ConsoleRecord { instance_id: o.instance_id.clone(), output, at: now };
                match write_record(store, &console_key(&o.instance_id), &record).await {
                    Ok(()) => {
                        self.alive.insert(o.instance_id.clone());
                        written.push(o.clone());
                        o.console = None;
                    }
                    Err(e) => {
                        tracing::warn!(instance_id = %o.instance_id, error = %e, "cannot write the console tail to the store; reporting it")
                    }
                }
            }
            let checks = match o.state {
                ObservedState::Running => {
                    (Check::Passed, if self.alive.contains(&o.instance_id) { Check::Passed } else { Check::Initializing })
                }
                ObservedState::Failed => (Check::Failed, Check::Failed),
                ObservedState::Absent => {
                    self.forget(&o.instance_id);
                    continue;
                }
                _ => continue,
            };
            if self.written.get(&o.instance_id) == Some(&checks) {
                continue;
            }
            let record = StatusRecord { instance_id: o.instance_id.clone(), system: checks.0, instance: checks.1, at: now };
            match write_record(store, &status_key(&o.instance_id), &record).await {
                Ok(()) => {
                    self.written.insert(o.instance_id.clone(), checks);
                }
                Err(e) => tracing::warn!(instance_id = %o.instance_id, error = %e, "cannot write status checks to the store"),
            }
        }
        written
    }

    /// Forgets instances that are gone.
    pub fn forget(&mut self, instance_id: &str) {
        self.written.remove(instance_id);
        self.alive.remove(instance_id);
    }
}
