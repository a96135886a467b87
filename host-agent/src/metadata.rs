//! The instance metadata service (`http://169.254.169.254/`).
//!
//! Each guest gets its own HTTP server on a unix socket,
//! `<run dir>/<instance id>.sock`; QEMU's user-mode network forwards the
//! guest's connections to 169.254.169.254:80 to that socket (guestfwd). The
//! socket alone identifies the guest: nothing the guest sends is trusted to
//! say who it is, and a guest can reach only its own server. Only root and
//! QEMU's group can reach the socket (see [`crate::access`]): other local
//! users cannot read a tenant's user-data, and no local process can stand in
//! for the server (a loopback port could be taken by anyone after an agent
//! restart; this path lies in a directory only root writes). The run
//! directory is separate from the state directory because a unix socket's
//! path must be short (108 bytes, QEMU connects by path).
//!
//! A guest must not be able to hurt the agent, which every guest on the host
//! depends on: request heads are bounded ([`MAX_HEAD`]), a body is read and
//! dropped chunk by chunk and only up to [`MAX_BODY`] (more closes the
//! connection), and nothing a guest sends is buffered beyond one head.
//!
//! QEMU's guestfwd carries all of a guest's connections, one after another,
//! over a single connection to this server. So the server never closes a
//! connection because a request said `Connection: close` (busybox wget does),
//! and always sends `Content-Length`, so the guest knows where each answer
//! ends. Requests are parsed with `httparse` and routed through an axum
//! `Router`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use nimbus_proto::agent::InstanceMetadata;
use nimbus_proto::metadata::{document_key, InstanceDocument};
use nimbus_proto::network::Nic;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
struct Content {
    meta: InstanceMetadata,
    user_data: Option<Vec<u8>>,
    /// The instance's VPC interfaces (`local-ipv4`, `mac`, `network/…`).
    nics: Vec<Nic>,
    /// The state store's document this content was made from (none: from
    /// the assignment). Of two copies of one version the store's wins: it
    /// has the tags, region and launch time the assignment lacks.
    doc: Option<Box<InstanceDocument>>,
}

impl Content {
    fn from_document(doc: InstanceDocument) -> Content {
        let meta = InstanceMetadata {
            version: doc.version,
            instance_id: doc.instance_id.clone(),
            reservation_id: doc.reservation_id.clone(),
            instance_type: doc.instance_type.clone(),
            image_id: doc.image_id.clone(),
            availability_zone: doc.availability_zone.clone(),
            ami_launch_index: doc.ami_launch_index,
            owner_id: doc.account_id.clone(),
            public_keys: doc.public_keys.clone(),
            options: doc.options,
            tags: doc.tags.clone(),
        };
        let user_data = doc.user_data.as_deref().and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
        Content { meta, user_data, nics: doc.nics.clone(), doc: Some(Box::new(doc)) }
    }

    /// Whether `self` should replace `current`: a newer version, or any
    /// copy of the same version over the assignment's (so the store's copy
    /// wins a tie, and is never replaced by an assignment of its version).
    fn supersedes(&self, current: &Content) -> bool {
        self.meta.version > current.meta.version || (self.meta.version == current.meta.version && current.doc.is_none())
    }
}

type Shared = Arc<RwLock<Content>>;

/// IMDSv2 session tokens of one instance: token → expiry.
type Tokens = Arc<Mutex<HashMap<String, tokio::time::Instant>>>;

/// Most live tokens an instance may hold (each `PUT` makes one; the oldest go first).
const MAX_TOKENS: usize = 1024;
/// EC2's bounds of a token's life, seconds.
const TOKEN_TTL: std::ops::RangeInclusive<u64> = 1..=21600;
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// What one instance's requests are answered from.
#[derive(Clone)]
struct Guest {
    content: Shared,
    tokens: Tokens,
}

struct Entry {
    guest: Guest,
    /// The unix-socket server (QEMU user-mode networking), if any.
    socket_task: Option<JoinHandle<()>>,
}

/// The metadata service of every guest on the host: one content per
/// instance, reached through the instance's unix socket (user-mode
/// networking) or on its VPC's network (169.254.169.254 in the VPC's
/// namespace, the instance known by the source address of the connection,
/// which anti-spoofing makes trustworthy).
#[derive(Clone)]
pub struct MetadataServers {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    /// (VNI, private address) → instance.
    addresses: Arc<RwLock<HashMap<(u32, Ipv4Addr), String>>>,
    /// Per VNI, the listener in the VPC's namespace.
    vpc_listeners: Arc<Mutex<HashMap<u32, JoinHandle<()>>>>,
    /// Gets each socket (root:its group, 0660) so that QEMU can connect.
    qemu: crate::access::QemuUser,
    /// Where the sockets live (root:QEMU's group, 0710).
    dir: PathBuf,
    /// The host's state-store node and what opens documents, once it runs:
    /// documents newer than the assignments' copies come from it (see
    /// [`MetadataServers::refresh`]).
    store: Arc<std::sync::OnceLock<DocumentSource>>,
    /// Refreshes so far: quorum reads run on every [`QUORUM_EVERY`]th.
    refreshes: Arc<std::sync::atomic::AtomicU64>,
}

/// Documents this host holds no replica of (or an older one) are read by
/// quorum on every this-many refreshes only, at most [`QUORUM_READS_AT_ONCE`]
/// at a time: in a ring larger than N nodes most documents are not local,
/// and a quorum read per guest per refresh would be network work on the
/// metadata service's hot path.
const QUORUM_EVERY: u64 = 5;
const QUORUM_READS_AT_ONCE: usize = 8;

/// How long a quorum read of a document may take (when the local replica
/// has none: this host holds no replica of it, or has not received it yet).
const QUORUM_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The longest run directory whose sockets fit a unix socket address
/// (`<dir>/i-<17 hex>.sock` within 107 bytes).
pub const MAX_RUN_DIR_LEN: usize = 107 - "/i-0123456789abcdef0.sock".len();

/// Where the metadata server of an instance listens, given the run directory.
pub fn socket_path(run_dir: &FsPath, instance_id: &str) -> PathBuf {
    run_dir.join(format!("{instance_id}.sock"))
}

fn router(guest: Guest) -> Router {
    let content = guest.content.clone();
    Router::new()
        .route("/", get(|| async { "latest\n" }))
        .route("/latest", get(|| async { "api/\ndynamic\nmeta-data\nuser-data\n" }))
        .route("/latest/", get(|| async { "api/\ndynamic\nmeta-data\nuser-data\n" }))
        .route("/latest/meta-data", get(listing))
        .route("/latest/meta-data/", get(listing))
        .route("/latest/meta-data/{*key}", get(meta_data))
        .route("/latest/user-data", get(serve_user_data))
        .route("/latest/dynamic", get(|| async { "instance-identity/\n" }))
        .route("/latest/dynamic/", get(|| async { "instance-identity/\n" }))
        .route("/latest/dynamic/instance-identity", get(|| async { "document\n" }))
        .route("/latest/dynamic/instance-identity/", get(|| async { "document\n" }))
        .route("/latest/dynamic/instance-identity/document", get(identity))
        .with_state(content)
        .route("/latest/api/token", axum::routing::put(new_token).with_state(guest.clone()))
        .layer(axum::middleware::from_fn_with_state(guest, imds_policy))
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

/// EC2's rules, before any route: nothing when the endpoint is disabled; a
/// token, when sent, must be live (401 otherwise, in either mode); without
/// one, IMDSv1 only when tokens are optional.
async fn imds_policy(State(g): State<Guest>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let options = g.content.read().unwrap_or_else(|p| p.into_inner()).meta.options;
    if !options.endpoint_enabled {
        return plain(StatusCode::FORBIDDEN, "Forbidden\n");
    }
    if req.method() == axum::http::Method::PUT {
        return next.run(req).await;
    }
    match req.headers().get(TOKEN_HEADER) {
        Some(t) => {
            let live = {
                let mut tokens = g.tokens.lock().unwrap_or_else(|p| p.into_inner());
                let now = tokio::time::Instant::now();
                tokens.retain(|_, expiry| *expiry > now);
                t.to_str().ok().is_some_and(|t| tokens.contains_key(t))
            };
            if !live {
                return plain(StatusCode::UNAUTHORIZED, "Unauthorized\n");
            }
        }
        None if options.tokens_required => return plain(StatusCode::UNAUTHORIZED, "Unauthorized\n"),
        None => {}
    }
    next.run(req).await
}

/// `PUT /latest/api/token`: a session token living TTL seconds (1 to
/// 21600, from `X-aws-ec2-metadata-token-ttl-seconds`). Refused when the
/// request went through a proxy (`X-Forwarded-For`), as EC2 refuses it.
async fn new_token(State(g): State<Guest>, headers: axum::http::HeaderMap) -> Response {
    if headers.contains_key("x-forwarded-for") {
        return plain(StatusCode::FORBIDDEN, "Forbidden\n");
    }
    let ttl = headers.get(TTL_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    let Some(ttl) = ttl.filter(|t| TOKEN_TTL.contains(t)) else {
        return plain(StatusCode::BAD_REQUEST, "Bad Request\n");
    };
    let token = {
        use rand::RngCore;
        let mut b = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut b);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    {
        let mut tokens = g.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        tokens.retain(|_, expiry| *expiry > now);
        if tokens.len() >= MAX_TOKENS {
            if let Some(oldest) = tokens.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone()) {
                tokens.remove(&oldest);
            }
        }
        tokens.insert(token.clone(), now + std::time::Duration::from_secs(ttl));
    }
    ([(TTL_HEADER, ttl.to_string())], token).into_response()
}

impl MetadataServers {
    pub fn new(qemu: crate::access::QemuUser, dir: PathBuf) -> MetadataServers {
        MetadataServers {
            entries: Arc::default(),
            addresses: Arc::default(),
            vpc_listeners: Arc::default(),
            qemu,
            dir,
            store: Arc::default(),
            refreshes: Arc::default(),
        }
    }

    /// The socket of an instance's metadata server.
    pub fn socket(&self, instance_id: &str) -> PathBuf {
        socket_path(&self.dir, instance_id)
    }

    /// Publishes what the instance is served (new, or its latest version),
    /// and its VPC addresses, for its VPC's metadata server.
    pub fn publish(&self, meta: &InstanceMetadata, user_data_b64: Option<&str>, nics: &[Nic]) {
        self.publish_content(meta, user_data_b64, nics);
    }

    fn publish_content(&self, meta: &InstanceMetadata, user_data_b64: Option<&str>, nics: &[Nic]) -> Guest {
        let user_data = user_data_b64.and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
        let content = Content { meta: meta.clone(), user_data, nics: nics.to_vec(), doc: None };
        self.install(content, true)
    }

    /// Serves `content` to its instance: a new entry when `create`, else
    /// only over an older content of an instance served here.
    fn install(&self, content: Content, create: bool) -> Guest {
        let id = &content.meta.instance_id.clone();
        let nics = content.nics.clone();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get(id) {
            let mut current = e.guest.content.write().unwrap_or_else(|p| p.into_inner());
            if !content.supersedes(&current) {
                return e.guest.clone();
            }
            *current = content.clone();
        } else if !create {
            return Guest { content: Arc::new(RwLock::new(content)), tokens: Arc::default() };
        }
        {
            let mut addresses = self.addresses.write().unwrap_or_else(|p| p.into_inner());
            addresses.retain(|_, owner| owner != id);
            for n in &nics {
                addresses.insert((n.vni, n.private_ip), id.clone());
            }
        }
        match entries.get(id) {
            Some(e) => e.guest.clone(),
            None => {
                let guest = Guest { content: Arc::new(RwLock::new(content)), tokens: Arc::default() };
                entries.insert(id.clone(), Entry { guest: guest.clone(), socket_task: None });
                guest
            }
        }
    }

    /// Reads documents through `source` from now on (see [`MetadataServers::refresh`]).
    pub fn attach_store(&self, source: DocumentSource) {
        let _ = self.store.set(source);
    }

    /// Brings every served instance up to the state store's document: the
    /// host's own replica first (a local read, no network), a quorum read
    /// when it has none or one older than what is served (the assignment
    /// named a newer version: this replica missed writes while its node was
    /// down, and anti-entropy has not caught up yet). A document is only
    /// ever served if the control plane signed it for the instance it names
    /// and for this host, and it opens with this host's key; and only over
    /// an older copy ([`DocumentSource`]).
    pub async fn refresh(&self) {
        let Some(source) = self.store.get().cloned() else { return };
        let ids: Vec<(String, u64)> = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, e)| (id.clone(), e.guest.content.read().unwrap_or_else(|p| p.into_inner()).meta.version))
            .collect();
        let quorum_due = self.refreshes.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(QUORUM_EVERY);
        source.keep_only(ids.iter().map(|(id, _)| id.as_str()));
        let mut remote = Vec::new();
        for (id, served) in ids {
            match source.local(&id) {
                Some(d) if d.version >= served => {
                    self.install(Content::from_document(d), false);
                }
                _ if quorum_due => remote.push(id),
                _ => {}
            }
        }
        use futures::StreamExt;
        let mut reads = futures::stream::iter(remote).map(|id| {
            let source = source.clone();
            async move { source.quorum(&id).await }
        })
        .buffer_unordered(QUORUM_READS_AT_ONCE);
        while let Some(read) = reads.next().await {
            if let Some(d) = read {
                self.install(Content::from_document(d), false);
            }
        }
    }

    /// The store's document of `instance_id` (the host's replica, else a
    /// quorum read), if the store runs here and has one.
    pub async fn document(&self, instance_id: &str) -> Option<InstanceDocument> {
        let source = self.store.get().cloned()?;
        source.read(instance_id, 0).await
    }

    /// Serves `doc` to its instance (new or not): on its unix socket, or,
    /// for an instance with VPC interfaces, on its VPCs' networks (the
    /// namespace of each VNI from `namespace_of`, none without a data plane).
    /// Used when no assignment can be had (see `Reconciler::serve_from_store`).
    pub async fn ensure_document(&self, doc: InstanceDocument, namespace_of: impl Fn(u32) -> Option<String>) -> std::io::Result<()> {
        let content = Content::from_document(doc.clone());
        let vpcs: Vec<(u32, String)> = doc.nics.iter().filter_map(|n| namespace_of(n.vni).map(|ns| (n.vni, ns))).collect();
        if vpcs.is_empty() {
            // User-mode networking (no data plane here): the unix socket.
            self.ensure(&content.meta, doc.user_data.as_deref()).await?;
        } else {
            self.publish(&content.meta, doc.user_data.as_deref(), &doc.nics);
            for (vni, ns) in vpcs {
                self.ensure_vpc(vni, &ns).await?;
            }
        }
        self.install(content, false);
        Ok(())
    }

    /// The version of the document an instance is served (tests, benchmarks).
    pub fn served_version(&self, instance_id: &str) -> Option<(u64, bool)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let c = entries.get(instance_id)?.guest.content.read().unwrap_or_else(|p| p.into_inner()).clone();
        Some((c.meta.version, c.doc.is_some()))
    }

    /// Serves the instance on its unix socket (QEMU user-mode networking),
    /// replacing whatever file is there (a socket left by an earlier agent,
    /// which QEMU then reconnects to). Returns the socket's path.
    pub async fn ensure(&self, meta: &InstanceMetadata, user_data_b64: Option<&str>) -> std::io::Result<PathBuf> {
        let content = self.publish_content(meta, user_data_b64, &[]);
        let socket = self.socket(&meta.instance_id);
        let running = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries.get(&meta.instance_id).and_then(|e| e.socket_task.as_ref()).is_some_and(|t| !t.is_finished())
        };
        if running {
            return Ok(socket);
        }
        self.qemu.private_dir(&self.dir).await?;
        match tokio::fs::remove_file(&socket).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(&socket)?;
        self.qemu.connectable(&socket).await?;
        let app = router(content);
        let instance_id = meta.instance_id.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        tokio::spawn(serve_connection(conn, app.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(%instance_id, error = %e, "metadata server cannot accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get_mut(&meta.instance_id) {
            if let Some(old) = e.socket_task.replace(task) {
                old.abort();
            }
        }
        Ok(socket)
    }

    /// Answers 169.254.169.254:80 in the VPC namespace `netns` (made there
    /// by a thread that entered it). Each connection is served the content
    /// of the instance whose address it comes from; any other is closed.
    pub async fn ensure_vpc(&self, vni: u32, netns: &str) -> std::io::Result<()> {
        if self.vpc_listeners.lock().unwrap_or_else(|p| p.into_inner()).get(&vni).is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        let addr = std::net::SocketAddr::from((crate::network::METADATA_IP, 80));
        let listener = crate::network::testing::in_netns(netns, move || -> std::io::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })??;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let this = self.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, peer)) => {
                        let std::net::IpAddr::V4(ip) = peer.ip() else { continue };
                        let owner = this.addresses.read().unwrap_or_else(|p| p.into_inner()).get(&(vni, ip)).cloned();
                        let guest = owner.and_then(|id| this.entries.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|e| e.guest.clone()));
                        match guest {
                            Some(c) => {
                                // Answers go out at once (no Nagle wait for the guest's next request).
                                let _ = conn.set_nodelay(true);
                                tokio::spawn(serve_connection(conn, router(c)));
                            }
                            None => tracing::debug!(vni, %ip, "metadata request from an address of no instance here"),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(vni, error = %e, "VPC metadata server cannot accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        if let Some(old) = self.vpc_listeners.lock().unwrap_or_else(|p| p.into_inner()).insert(vni, task) {
            old.abort();
        }
        Ok(())
    }

    /// Stops the listener of a VPC that left this host.
    pub fn stop_vpc(&self, vni: u32) {
        if let Some(t) = self.vpc_listeners.lock().unwrap_or_else(|p| p.into_inner()).remove(&vni) {
            t.abort();
        }
    }

    /// The VNIs with a listener.
    pub fn vpc_listeners(&self) -> Vec<u32> {
        self.vpc_listeners.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }

    /// Removes the sockets of instances not in `wanted` (left by an agent
    /// that crashed before it removed them).
    pub async fn sweep(&self, wanted: &std::collections::HashSet<&str>) {
        let Ok(mut dir) = tokio::fs::read_dir(&self.dir).await else { return };
        while let Ok(Some(entry)) = dir.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".sock").filter(|id| id.starts_with("i-")) {
                if !wanted.contains(id) {
                    self.stop(id);
                }
            }
        }
    }

    /// Stops the instance's service: its socket server and file, its addresses.
    pub fn stop(&self, instance_id: &str) {
        if let Some(e) = self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(instance_id) {
            if let Some(t) = e.socket_task {
                t.abort();
            }
        }
        self.addresses.write().unwrap_or_else(|p| p.into_inner()).retain(|_, owner| owner != instance_id);
        let _ = std::fs::remove_file(self.socket(instance_id));
    }

    /// Stops every server (the agent is stopping), leaving the sockets: the
    /// guests keep running, and the next agent replaces them.
    pub fn stop_all(&self) {
        for (_, e) in self.entries.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            if let Some(t) = e.socket_task {
                t.abort();
            }
        }
        for (_, t) in self.vpc_listeners.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            t.abort();
        }
    }
}

/// Where a host's documents come from and what makes them trustworthy:
/// its store node, its id and key (documents are sealed for it), and the
/// control plane's document keys (documents are signed with one).
#[derive(Clone)]
pub struct DocumentSource {
    pub node: Arc<nimbus_state_store::Node>,
    pub host_id: String,
    pub key: nimbus_records::KeyPair,
    pub trusted: nimbus_records::TrustedKeys,
    /// Per instance, the digest of the siblings last opened and what they
    /// gave: the refresh reads every document ten times a second, and
    /// checks a signature and decrypts only when the stored value changed.
    opened: Arc<Mutex<HashMap<String, ([u8; 32], Option<InstanceDocument>)>>>,
}

impl DocumentSource {
    pub fn new(node: Arc<nimbus_state_store::Node>, host_id: String, key: nimbus_records::KeyPair, trusted: nimbus_records::TrustedKeys) -> Self {
        DocumentSource { node, host_id, key, trusted, opened: Arc::default() }
    }

    /// The document of `id`: the host's replica when it has one at least
    /// `at_least` new, else a quorum read.
    async fn read(&self, id: &str, at_least: u64) -> Option<InstanceDocument> {
        match self.local(id) {
            Some(d) if d.version >= at_least => Some(d),
            _ => self.quorum(id).await,
        }
    }

    /// The host's replica's copy of `id`'s document, if it holds one.
    fn local(&self, id: &str) -> Option<InstanceDocument> {
        match self.node.storage().get(document_key(id).as_bytes()) {
            Ok(r) => self.open(id, &r.map(|r| r.values()).unwrap_or_default()),
            Err(e) => {
                tracing::warn!(instance_id = %id, error = %e, "cannot read the local replica");
                None
            }
        }
    }

    /// Forgets what was opened for instances no longer served.
    fn keep_only<'a>(&self, served: impl Iterator<Item = &'a str>) {
        let served: std::collections::HashSet<&str> = served.collect();
        self.opened.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| served.contains(id.as_str()));
    }

    /// `id`'s document by a quorum read (bounded by [`QUORUM_READ_TIMEOUT`]).
    async fn quorum(&self, id: &str) -> Option<InstanceDocument> {
        use nimbus_state_store::KvClient;
        let client = nimbus_state_store::LocalClient(self.node.clone());
        match tokio::time::timeout(QUORUM_READ_TIMEOUT, client.get(document_key(id).as_bytes())).await {
            Ok(Ok(got)) => self.open(id, &got.values),
            Ok(Err(e)) => {
                tracing::debug!(instance_id = %id, error = %e, "quorum read of a document failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Of the stored siblings, the newest the control plane signed for
    /// `id`, opened with this host's key: a forged one (any version) counts
    /// as absent, one sealed for another host is not served.
    fn open(&self, id: &str, siblings: &[Vec<u8>]) -> Option<InstanceDocument> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for s in siblings {
            h.update((s.len() as u64).to_be_bytes());
            h.update(s);
        }
        let digest: [u8; 32] = h.finalize().into();
        if let Some((seen, doc)) = self.opened.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            if *seen == digest {
                return doc.clone();
            }
        }
        let doc = nimbus_records::newest_sealed(siblings, &self.trusted, id).and_then(|sealed| {
            match sealed.open(&self.trusted, id, &self.host_id, &self.key) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::debug!(instance_id = %id, error = %e, "a stored document is not for this host; not served");
                    None
                }
            }
        });
        self.opened.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), (digest, doc.clone()));
        doc
    }
}

/// Largest request head accepted; metadata requests are tiny.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body read (and dropped: the service takes no bodies).
pub const MAX_BODY: usize = 4 * 1024;

/// The path to route: a dated API version (`/2009-04-04/…`, what
/// cloud-init's EC2 data source asks for) is served as `latest`.
fn versioned(path: &str) -> String {
    if !path.starts_with('/') {
        return "/".to_string();
    }
    let rest = &path[1..];
    let (first, tail) = rest.split_once('/').map_or((rest, ""), |(a, b)| (a, b));
    let dated = first.len() == 10 && first.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    if dated {
        format!("/latest/{tail}")
    } else {
        path.to_string()
    }
}

/// What a request head says, or why it is refused.
enum Head {
    Request { method: String, path: String, headers: Vec<(String, Vec<u8>)>, head_len: usize, body_len: usize },
    /// Answer this status and close the connection.
    Refuse(StatusCode),
}

fn parse_head(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let mut body_len = 0;
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Some(Head::Refuse(StatusCode::LENGTH_REQUIRED));
                }
                if h.name.eq_ignore_ascii_case("content-length") {
                    match std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<usize>().ok()) {
                        Some(len) if len <= MAX_BODY => body_len = len,
                        Some(_) => return Some(Head::Refuse(StatusCode::PAYLOAD_TOO_LARGE)),
                        None => return Some(Head::Refuse(StatusCode::BAD_REQUEST)),
                    }
                }
            }
            let (method, path) = (req.method.unwrap_or("GET").to_string(), req.path.unwrap_or("/").to_string());
            let headers = req.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
            Some(Head::Request { method, path, headers, head_len: n, body_len })
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => None,
        Ok(httparse::Status::Partial) => Some(Head::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)),
        Err(_) => Some(Head::Refuse(StatusCode::BAD_REQUEST)),
    }
}

async fn write_status<S: AsyncWrite + Unpin>(conn: &mut S, status: StatusCode) {
    let head = format!("HTTP/1.1 {} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let _ = conn.write_all(head.as_bytes()).await;
}

/// Answers requests on one connection until the peer closes it or sends
/// something the service refuses (then after answering the refusal).
async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S, app: Router) {
    use tower::ServiceExt;
    // Holds at most one head (MAX_HEAD) plus what one read brought after it.
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        // Read until one whole request head is buffered.
        let (method, path, headers, head_len, body_len) = loop {
            match parse_head(&buf) {
                Some(Head::Request { method, path, headers, head_len, body_len }) => break (method, path, headers, head_len, body_len),
                Some(Head::Refuse(status)) => return write_status(&mut conn, status).await,
                None => {}
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        // Drop the body (at most MAX_BODY): what was buffered, then the rest as it comes.
        let buffered = buf.len().min(head_len + body_len);
        buf.drain(..buffered);
        let mut rest = head_len + body_len - buffered;
        while rest > 0 {
            match conn.read(&mut chunk[..rest.min(4096)]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest -= n,
            }
        }

        let mut request = axum::http::Request::builder()
            .method(if method == "HEAD" { "GET" } else { method.as_str() })
            .uri(versioned(&path));
        for (name, value) in &headers {
            request = request.header(name.as_str(), value.as_slice());
        }
        let (status, ttl, body) = match request.body(axum::body::Body::empty()) {
            Ok(req) => match app.clone().oneshot(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let ttl = resp.headers().get(TTL_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
                    (status, ttl, axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap_or_default())
                }
                Err(never) => match never {},
            },
            Err(_) => (StatusCode::BAD_REQUEST, None, Default::default()),
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\n{}Content-Length: {}\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            ttl.map(|t| format!("X-aws-ec2-metadata-token-ttl-seconds: {t}\r\n")).unwrap_or_default(),
            if method == "HEAD" { 0 } else { body.len() }
        );
        if conn.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        if method != "HEAD" && conn.write_all(&body).await.is_err() {
            return;
        }
    }
}

type Ctx = State<Shared>;

const KEYS: &[&str] = &[
    "ami-id",
    "ami-launch-index",
    "hostname",
    "instance-id",
    "instance-type",
    "local-hostname",
    "placement/availability-zone",
    "reservation-id",
];

async fn listing(State(c): Ctx) -> String {
    let c = c.read().unwrap_or_else(|p| p.into_inner()).clone();
    let has_keys = !c.meta.public_keys.is_empty();
    let mut out = String::new();
    for k in KEYS {
        if let Some((dir, _)) = k.split_once('/') {
            let entry = format!("{dir}/\n");
            if !out.contains(&entry) {
                out.push_str(&entry);
            }
        } else {
            out.push_str(k);
            out.push('\n');
        }
    }
    if has_keys {
        out.push_str("public-keys/\n");
    }
    if c.meta.options.tags_enabled {
        out.push_str("tags/\n");
    }
    if let Some(n) = c.nics.first() {
        out.push_str("local-ipv4\nmac\nnetwork/\n");
        if n.public_ip.is_some() {
            out.push_str("public-ipv4\n");
        }
    }
    out
}

/// `network/interfaces/macs/...` as EC2 serves it.
fn network(nics: &[Nic], path: &str) -> Option<String> {
    let path = path.trim_end_matches('/');
    let lines = |v: Vec<String>| Some(v.join("\n"));
    match path {
        "" => Some("interfaces/".into()),
        "interfaces" => Some("macs/".into()),
        "interfaces/macs" => lines(nics.iter().map(|n| format!("{}/", n.mac)).collect()),
        _ => {
            let rest = path.strip_prefix("interfaces/macs/")?;
            let (mac, key) = rest.split_once('/').unwrap_or((rest, ""));
            let n = nics.iter().find(|n| n.mac == mac)?;
            match key {
                "" => {
                    let mut keys = vec!["device-number", "local-ipv4s", "mac", "security-group-ids", "subnet-ipv4-cidr-block", "vpc-id"];
                    if n.public_ip.is_some() {
                        keys.push("public-ipv4s");
                    }
                    lines(keys.into_iter().map(str::to_string).collect())
                }
                "device-number" => Some(n.device_index.to_string()),
                "local-ipv4s" => Some(n.private_ip.to_string()),
                "mac" => Some(n.mac.clone()),
                "security-group-ids" => lines(n.group_ids.clone()),
                "subnet-ipv4-cidr-block" => Some(n.subnet.to_string()),
                "vpc-id" => Some(n.vpc_id.clone()),
                "public-ipv4s" => n.public_ip.map(|p| p.to_string()),
                _ => None,
            }
        }
    }
}

/// `public-keys/...` as EC2 serves it: `0=<name>` per key, then
/// `N/` → `openssh-key`, `N/openssh-key` → the key.
fn public_keys(keys: &[(String, String)], path: &str) -> Option<String> {
    if keys.is_empty() {
        return None;
    }
    if path.is_empty() {
        return Some(keys.iter().enumerate().map(|(i, (name, _))| format!("{i}={name}")).collect::<Vec<_>>().join("\n"));
    }
    let (index, rest) = path.split_once('/').unwrap_or((path, ""));
    // Digits only: "+1" or "01" would parse too.
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) || (index.len() > 1 && index.starts_with('0')) {
        return None;
    }
    let (_, key) = keys.get(index.parse::<usize>().ok()?)?;
    match rest {
        "" => Some("openssh-key".to_string()),
        "openssh-key" => Some(key.clone()),
        _ => None,
    }
}

async fn meta_data(State(c): Ctx, Path(key): Path<String>) -> Response {
    let c = c.read().unwrap_or_else(|p| p.into_inner()).clone();
    let m = &c.meta;
    let value = match key.trim_end_matches('/') {
        "ami-id" => m.image_id.clone(),
        "ami-launch-index" => m.ami_launch_index.to_string(),
        "hostname" | "local-hostname" => m.instance_id.clone(),
        "instance-id" => m.instance_id.clone(),
        "instance-type" => m.instance_type.clone(),
        "placement" => "availability-zone".to_string(),
        "placement/availability-zone" => m.availability_zone.clone(),
        "reservation-id" => m.reservation_id.clone(),
        "local-ipv4" | "mac" | "public-ipv4" => {
            let primary = c.nics.iter().find(|n| n.device_index == 0);
            match (key.trim_end_matches('/'), primary) {
                ("local-ipv4", Some(n)) => n.private_ip.to_string(),
                ("mac", Some(n)) => n.mac.clone(),
                ("public-ipv4", Some(Nic { public_ip: Some(p), .. })) => p.to_string(),
                _ => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
            }
        }
        "tags" if m.options.tags_enabled => "instance".to_string(),
        "tags/instance" if m.options.tags_enabled => m.tags.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join("\n"),
        k if m.options.tags_enabled && k.starts_with("tags/instance/") => match m.tags.iter().find(|(t, _)| t == &k["tags/instance/".len()..]) {
            Some((_, v)) => v.clone(),
            None => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
        },
        k if k == "network" || k.starts_with("network/") => match network(&c.nics, k.strip_prefix("network").unwrap_or("").trim_start_matches('/')) {
            Some(v) => v,
            None => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
        },
        "public-keys" => match public_keys(&m.public_keys, "") {
            Some(v) => v,
            None => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
        },
        k if k.starts_with("public-keys/") => match public_keys(&m.public_keys, &k["public-keys/".len()..]) {
            Some(v) => v,
            None => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
        },
        _ => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
    };
    value.into_response()
}

async fn serve_user_data(State(c): Ctx) -> Response {
    match c.read().unwrap_or_else(|p| p.into_inner()).user_data.clone() {
        Some(data) => data.into_response(),
        None => (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
    }
}

async fn identity(State(c): Ctx) -> Response {
    let c = c.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(doc) = &c.doc {
        return axum::Json(doc.identity()).into_response();
    }
    let m = c.meta;
    axum::Json(serde_json::json!({
        "instanceId": m.instance_id,
        "imageId": m.image_id,
        "instanceType": m.instance_type,
        "availabilityZone": m.availability_zone,
        "accountId": m.owner_id,
        "architecture": "x86_64",
    }))
    .into_response()
}

/// One request to a guest's metadata socket, made as the guest makes it
/// (for tests, and for an operator looking at what a guest is served):
/// `(status, body)`. A new connection per call.
pub async fn request(socket: &FsPath, method: &str, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut conn = tokio::net::UnixStream::connect(socket).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).await?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut hdrs);
        if let httparse::Status::Complete(n) = resp.parse(&buf).map_err(|_| bad("bad response head"))? {
            let status = resp.code.ok_or_else(|| bad("no status"))?;
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                .ok_or_else(|| bad("no Content-Length"))?;
            let body_len = if method == "HEAD" { 0 } else { len };
            while buf.len() < n + body_len {
                let got = conn.read(&mut chunk).await?;
                if got == 0 {
                    return Err(bad("connection closed mid-body"));
                }
                buf.extend_from_slice(&chunk[..got]);
            }
            return Ok((status, buf[n..n + body_len].to_vec()));
        }
        let got = conn.read(&mut chunk).await?;
        if got == 0 {
            return Err(bad("connection closed before a response"));
        }
        buf.extend_from_slice(&chunk[..got]);
    }
}

/// Metadata of a made-up instance, for tests.
#[cfg(test)]
pub(crate) fn sample_metadata(id: &str) -> InstanceMetadata {
    InstanceMetadata {
        version: 0,
        instance_id: id.into(),
        reservation_id: "r-0123456789abcdef0".into(),
        instance_type: "t3.nano".into(),
        image_id: "ami-0123456789abcdef0".into(),
        availability_zone: "az1".into(),
        ami_launch_index: 0,
        owner_id: "000000000000".into(),
        public_keys: Vec::new(),
        options: Default::default(),
        tags: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str) -> InstanceMetadata {
        sample_metadata(id)
    }

    /// Servers whose sockets live in a temporary directory.
    struct Fixture {
        servers: MetadataServers,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            Fixture { servers: MetadataServers::new(crate::access::QemuUser::root(), dir.path().join("run")), _dir: dir }
        }
        async fn serve(&self, m: &InstanceMetadata, user_data: Option<&str>) -> PathBuf {
            self.servers.ensure(m, user_data).await.unwrap()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.servers.stop_all();
        }
    }

    async fn get(socket: &FsPath, path: &str) -> (u16, String) {
        let (status, body) = request(socket, "GET", path, &[]).await.unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    fn document(id: &str, version: u64, tag: &str) -> InstanceDocument {
        InstanceDocument {
            options: nimbus_proto::agent::MetadataOptions { tags_enabled: true, ..Default::default() },
            ..InstanceDocument::example(id, version, tag)
        }
    }

    /// The store's document replaces the assignment's copy of its version
    /// or older, never a newer one; an assignment never replaces the
    /// store's copy of its own version; nothing is served to an instance
    /// this host does not serve.
    #[tokio::test]
    async fn store_documents_replace_only_older_copies() {
        let f = Fixture::new();
        let id = "i-000000000000000aa";
        let mut m = meta(id);
        m.version = 2;
        let socket = f.serve(&m, None).await;
        assert_eq!(get(&socket, "/latest/meta-data/tags/instance/Name").await.0, 404);
        f.servers.install(Content::from_document(document(id, 1, "old")), false);
        assert_eq!(f.servers.served_version(id), Some((2, false)), "an older document is ignored");
        f.servers.install(Content::from_document(document(id, 2, "two")), false);
        assert_eq!(f.servers.served_version(id), Some((2, true)), "the store's copy wins a tie");
        assert_eq!(get(&socket, "/latest/meta-data/tags/instance/Name").await, (200, "two".to_string()));
        let identity = get(&socket, "/latest/dynamic/instance-identity/document").await.1;
        assert!(identity.contains("\"region\":\"nimbus-1\""), "{identity}");
        f.servers.publish(&m, None, &[]);
        assert_eq!(f.servers.served_version(id), Some((2, true)), "the assignment of that version does not replace it");
        m.version = 3;
        f.servers.publish(&m, None, &[]);
        assert_eq!(f.servers.served_version(id), Some((3, false)), "a newer assignment does");
        f.servers.install(Content::from_document(document("i-000000000000000bb", 9, "x")), false);
        assert_eq!(f.servers.served_version("i-000000000000000bb"), None, "not served here: not installed");
    }

    #[tokio::test]
    async fn each_guest_sees_only_its_own_metadata() {
        let f = Fixture::new();
        let a = f.serve(&meta("i-000000000000000aa"), Some("aGVsbG8=")).await;
        let b = f.serve(&meta("i-000000000000000bb"), None).await;
        assert_eq!(get(&a, "/latest/meta-data/instance-id").await, (200, "i-000000000000000aa".into()));
        assert_eq!(get(&b, "/latest/meta-data/instance-id").await, (200, "i-000000000000000bb".into()));
        assert_eq!(get(&a, "/latest/user-data").await, (200, "hello".into()));
        assert_eq!(get(&b, "/latest/user-data").await.0, 404);
        assert_eq!(get(&a, "/latest/meta-data/placement/availability-zone").await, (200, "az1".into()));
        assert_eq!(get(&a, "/latest/meta-data/nope").await.0, 404);
        // Stopped: nothing answers on the socket any more, and it is gone.
        f.servers.stop("i-000000000000000aa");
        assert!(request(&a, "GET", "/latest/meta-data/instance-id", &[]).await.is_err());
        assert!(!a.exists());
        // A sweep removes the sockets of instances no longer wanted.
        let stale = f.servers.socket("i-0000000000000dead");
        std::fs::write(&stale, b"").unwrap();
        f.servers.sweep(&["i-000000000000000bb"].into_iter().collect()).await;
        assert!(!stale.exists() && b.exists());
        assert_eq!(get(&b, "/latest/meta-data/instance-id").await.0, 200);
    }

    /// A restarted agent takes its socket back: a file someone left at the
    /// path is replaced, and the socket is QEMU's group's only.
    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_closed_to_others() {
        use std::os::unix::fs::MetadataExt;
        let f = Fixture::new();
        let socket = f.servers.socket("i-000000000000000ab");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let _stale = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(f.serve(&meta("i-000000000000000ab"), None).await, socket);
        assert_eq!(get(&socket, "/latest/meta-data/instance-id").await, (200, "i-000000000000000ab".into()));
        assert_eq!(std::fs::metadata(&socket).unwrap().mode() & 0o777, 0o660);
        assert_eq!(std::fs::metadata(socket.parent().unwrap()).unwrap().mode() & 0o777, 0o710);
    }

    #[tokio::test]
    async fn public_keys_are_served_like_ec2() {
        let f = Fixture::new();
        let none = f.serve(&meta("i-000000000000000dd"), None).await;
        let listing = get(&none, "/latest/meta-data/").await;
        assert_eq!(listing.0, 200);
        assert!(!listing.1.contains("public-keys"), "no keys, no listing entry: {}", listing.1);
        assert_eq!(get(&none, "/latest/meta-data/public-keys/").await.0, 404);
        assert_eq!(get(&none, "/latest/meta-data/public-keys/0/openssh-key").await.0, 404);

        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample user@example".to_string();
        let mut m = meta("i-000000000000000ee");
        m.public_keys = vec![("my-key".into(), key.clone())];
        let s = f.serve(&m, None).await;
        let listing = get(&s, "/latest/meta-data/").await.1;
        assert!(listing.lines().any(|l| l == "public-keys/"), "{listing}");
        assert_eq!(get(&s, "/latest/meta-data/public-keys").await, (200, "0=my-key".into()));
        assert_eq!(get(&s, "/latest/meta-data/public-keys/").await, (200, "0=my-key".into()));
        assert_eq!(get(&s, "/latest/meta-data/public-keys/0").await, (200, "openssh-key".into()));
        assert_eq!(get(&s, "/latest/meta-data/public-keys/0/").await, (200, "openssh-key".into()));
        assert_eq!(get(&s, "/latest/meta-data/public-keys/0/openssh-key").await, (200, key.clone()));
        for missing in ["public-keys/1/", "public-keys/1/openssh-key", "public-keys/00/openssh-key", "public-keys/+0/", "public-keys/0/nope", "public-keys/my-key"] {
            assert_eq!(get(&s, &format!("/latest/meta-data/{missing}")).await.0, 404, "{missing}");
        }
        // Keys can change (a later assignment): the same server answers the new ones.
        m.public_keys.push(("second".into(), "ssh-rsa AAAAB3 second".into()));
        assert_eq!(f.serve(&m, None).await, s);
        assert_eq!(get(&s, "/latest/meta-data/public-keys/").await, (200, "0=my-key\n1=second".into()));
        assert_eq!(get(&s, "/latest/meta-data/public-keys/1/openssh-key").await, (200, "ssh-rsa AAAAB3 second".into()));
    }

    /// guestfwd sends every guest connection down one host connection: the
    /// server must answer request after request on it, `Connection: close` or
    /// not, and a small body on the way is skipped.
    #[tokio::test]
    async fn one_connection_carries_many_requests() {
        let f = Fixture::new();
        let socket = f.serve(&meta("i-000000000000000cc"), None).await;
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let req = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n";
        let with_body = "POST /latest/meta-data/instance-id HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        conn.write_all(format!("{req}{with_body}{req}").as_bytes()).await.unwrap();
        let expected = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n\r\ni-000000000000000cc";
        let mut got = vec![0u8; expected.len()];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), expected);
        let mut got = vec![0u8; 12];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 405", "POST is not a method of the metadata service");
        conn.write_all(b"GET /nope HTTP/1.1\r\n\r\n").await.unwrap();
        let mut all = Vec::new();
        let mut chunk = [0u8; 512];
        while !String::from_utf8_lossy(&all).contains("HTTP/1.1 404") {
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&all));
            all.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(String::from_utf8_lossy(&all).matches("i-000000000000000cc").count(), 1, "{}", String::from_utf8_lossy(&all));
    }

    /// The attack of the security review: a guest sends a huge body. The
    /// server must not read (let alone buffer) it: it answers 413 and closes
    /// the connection at once, having read no more than the head.
    #[tokio::test]
    async fn a_huge_body_is_refused_unread_and_the_connection_closed() {
        let f = Fixture::new();
        let socket = f.serve(&meta("i-000000000000000ff"), None).await;
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        conn.write_all(b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 268435456\r\n\r\n").await.unwrap();
        let mut resp = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(30), conn.read_to_end(&mut resp)).await;
        assert!(read.is_ok(), "the server kept the connection open, waiting for 256 MiB");
        assert!(resp.starts_with(b"HTTP/1.1 413"), "{}", String::from_utf8_lossy(&resp));
        // Sending the body now fails or goes nowhere: the server closed its side.
        let mut sent = 0usize;
        let chunk = vec![0u8; 64 * 1024];
        while sent < 64 << 20 {
            match conn.write(&chunk).await {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        assert!(sent < 64 << 20, "64 MiB went into a connection the server should have closed");
        // Chunked bodies have no length to check: refused as well.
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        conn.write_all(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
        let mut resp = Vec::new();
        conn.read_to_end(&mut resp).await.unwrap();
        assert!(resp.starts_with(b"HTTP/1.1 411"), "{}", String::from_utf8_lossy(&resp));
        // A head that never ends is cut off at MAX_HEAD.
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let endless = format!("GET / HTTP/1.1\r\nX-Pad: {}", "a".repeat(MAX_HEAD + 1));
        conn.write_all(endless.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        // The server closes with bytes of ours unread: the answer comes, then a reset.
        let _ = conn.read_to_end(&mut resp).await;
        assert!(resp.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&resp));
    }
}

#[cfg(test)]
mod imds_tests {
    use super::*;
    use nimbus_proto::agent::MetadataOptions;

    async fn serve(options: MetadataOptions, tags: Vec<(String, String)>) -> (MetadataServers, PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let servers = MetadataServers::new(crate::access::QemuUser::root(), dir.path().join("run"));
        let mut m = sample_metadata("i-0000000000000000a");
        m.options = options;
        m.tags = tags;
        let socket = servers.ensure(&m, None).await.unwrap();
        (servers, socket, dir)
    }

    async fn call(socket: &FsPath, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let (status, body) = request(socket, method, path, headers).await.unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    /// IMDSv2 as EC2 answers it: a token from `PUT /latest/api/token` (TTL
    /// 1 to 21600 s, never through a proxy), sent back in a header; a bad or
    /// expired token is 401 in either mode; without one, IMDSv1 only while
    /// tokens are optional.
    #[tokio::test(start_paused = true)]
    async fn tokens_are_issued_checked_and_expire() {
        let (_s, socket, _d) = serve(MetadataOptions::default(), vec![]).await;
        let path = "/latest/meta-data/instance-id";
        assert_eq!(call(&socket, "GET", path, &[]).await, (200, "i-0000000000000000a".into()), "IMDSv1 while tokens are optional");
        for bad in [vec![], vec![(TTL_HEADER, "0")], vec![(TTL_HEADER, "21601")], vec![(TTL_HEADER, "ten")]] {
            assert_eq!(call(&socket, "PUT", "/latest/api/token", &bad).await.0, 400, "{bad:?}");
        }
        assert_eq!(call(&socket, "PUT", "/latest/api/token", &[(TTL_HEADER, "60"), ("X-Forwarded-For", "10.0.0.1")]).await.0, 403);
        assert_eq!(call(&socket, "POST", "/latest/api/token", &[(TTL_HEADER, "60")]).await.0, 405);
        let (status, token) = call(&socket, "PUT", "/latest/api/token", &[(TTL_HEADER, "2")]).await;
        assert_eq!(status, 200);
        assert!(token.len() >= 40, "{token}");
        assert_eq!(call(&socket, "GET", path, &[(TOKEN_HEADER, &token)]).await.0, 200);
        assert_eq!(call(&socket, "GET", path, &[(TOKEN_HEADER, "made-up")]).await.0, 401, "a bad token is refused even in optional mode");
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        assert_eq!(call(&socket, "GET", path, &[(TOKEN_HEADER, &token)]).await.0, 401, "expired");
        // The TTL comes back in a header.
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        conn.write_all(b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = conn.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n"), "{}", String::from_utf8_lossy(&buf[..n]));
    }

    #[tokio::test]
    async fn required_tokens_disabled_endpoint_and_tags() {
        let required = MetadataOptions { tokens_required: true, ..Default::default() };
        let (_s, socket, _d) = serve(required, vec![("Name".into(), "web".into())]).await;
        assert_eq!(call(&socket, "GET", "/latest/meta-data/instance-id", &[]).await.0, 401);
        let (_, token) = call(&socket, "PUT", "/latest/api/token", &[(TTL_HEADER, "60")]).await;
        assert_eq!(call(&socket, "GET", "/latest/meta-data/instance-id", &[(TOKEN_HEADER, &token)]).await.0, 200);
        assert_eq!(call(&socket, "GET", "/latest/meta-data/tags/instance", &[(TOKEN_HEADER, &token)]).await.0, 404, "tags are off by default");

        let off = MetadataOptions { endpoint_enabled: false, ..Default::default() };
        let (_s2, socket, _d2) = serve(off, vec![]).await;
        assert_eq!(call(&socket, "GET", "/latest/meta-data/instance-id", &[]).await.0, 403);
        assert_eq!(call(&socket, "PUT", "/latest/api/token", &[(TTL_HEADER, "60")]).await.0, 403);

        let tags = MetadataOptions { tags_enabled: true, ..Default::default() };
        let (_s3, socket, _d3) = serve(tags, vec![("Name".into(), "web".into()), ("env".into(), "prod".into())]).await;
        assert!(call(&socket, "GET", "/latest/meta-data/", &[]).await.1.lines().any(|l| l == "tags/"));
        assert_eq!(call(&socket, "GET", "/latest/meta-data/tags/instance", &[]).await, (200, "Name\nenv".into()));
        assert_eq!(call(&socket, "GET", "/latest/meta-data/tags/instance/env", &[]).await, (200, "prod".into()));
        assert_eq!(call(&socket, "GET", "/latest/meta-data/tags/instance/nope", &[]).await.0, 404);
    }

    /// cloud-init's EC2 data source asks for dated versions and directories
    /// with a trailing slash.
    #[tokio::test]
    async fn dated_versions_and_directories_are_served_like_latest() {
        let (_s, socket, _d) = serve(MetadataOptions::default(), vec![]).await;
        assert_eq!(call(&socket, "GET", "/2009-04-04/meta-data/instance-id", &[]).await, (200, "i-0000000000000000a".into()));
        assert_eq!(call(&socket, "GET", "/2021-03-23/meta-data/placement/", &[]).await, (200, "availability-zone".into()));
        assert_eq!(call(&socket, "GET", "/2021-03-23/dynamic/instance-identity/", &[]).await, (200, "document\n".into()));
        assert_eq!(call(&socket, "GET", "/2021-3-23/meta-data/instance-id", &[]).await.0, 404, "not a date");
    }
}
