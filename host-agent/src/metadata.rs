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
//! connection), and nothing a guest sends is buffered beyond one head. Nor
//! can it hold the agent's file descriptors ([`ConnectionLimits`]): a
//! request (head, body, and taking its answer) must be done within
//! [`ConnectionLimits::request_timeout`] of its first byte, a VPC connection
//! idle between requests for [`ConnectionLimits::idle_timeout`] is closed, an
//! instance holds at most [`ConnectionLimits::per_instance`] connections (a
//! new one closes its oldest) and all instances together at most
//! [`ConnectionLimits::total`] (a new one closes the oldest connection of
//! the instance holding the most), so one guest's flood costs other guests
//! nothing; every connection of an instance closes when its service stops
//! ([`MetadataServers::stop`], at termination) or its guest stops
//! ([`MetadataServers::close_connections`]).
//!
//! The IMDSv2 token response leaves with the instance's hop limit as its IP
//! TTL (EC2's `HttpPutResponseHopLimit`, default 1), so a token does not
//! reach a container or host routed behind the guest; other answers keep
//! the system's TTL. (Only on the VPC listener: a unix socket carries no IP.)
//!
//! QEMU's guestfwd carries all of a guest's connections, one after another,
//! over a single connection to this server. So the server never closes a
//! connection because a request said `Connection: close` (busybox wget does),
//! and always sends `Content-Length`, so the guest knows where each answer
//! ends. Nor does it close that connection for being idle: QEMU would
//! reconnect only a second later, and a request sent meanwhile would be lost
//! (only root and QEMU's group reach the socket, one connection per guest).
//! Requests are parsed with `httparse` and routed through an axum `Router`.

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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
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
    /// Set when the instance's service stops: no connection is admitted after.
    stopped: Arc<AtomicBool>,
}

impl Guest {
    fn new(content: Content) -> Guest {
        Guest { content: Arc::new(RwLock::new(content)), tokens: Arc::default(), stopped: Arc::default() }
    }
}

/// Bounds on the metadata service's connections (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A request's head and body must have arrived, and its answer been
    /// taken, within this of the request's first byte.
    pub request_timeout: Duration,
    /// A VPC connection idle this long between requests (or before the
    /// first) is closed. Not the unix socket's (QEMU's one stream per guest).
    pub idle_timeout: Duration,
    /// Connections one instance may hold; a new one closes its oldest.
    pub per_instance: usize,
    /// Connections of all instances; a new one closes the oldest of the
    /// instance holding the most.
    pub total: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { request_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(60), per_instance: 16, total: 256 }
    }
}

impl ConnectionLimits {
    /// The defaults, with the total cut to a quarter of the process's file
    /// descriptor limit (at least 64), so guests cannot use up what the
    /// agent needs for libvirt, the store and the control plane.
    pub fn for_this_process() -> ConnectionLimits {
        let d = ConnectionLimits::default();
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(soft, _)| soft).unwrap_or(1024);
        let total = usize::try_from(soft / 4).unwrap_or(usize::MAX).clamp(64, 1024);
        ConnectionLimits { total, per_instance: d.per_instance.min(total), ..d }
    }
}

/// The live connections of every instance: what the caps count, and how an
/// instance's connections are closed (dropping a sender ends its task).
struct Connections {
    limits: ConnectionLimits,
    inner: Mutex<ConnectionTable>,
}

#[derive(Default)]
struct ConnectionTable {
    next: u64,
    total: usize,
    /// Per instance, by age (ids only grow): the close signal of each connection.
    by_instance: HashMap<String, std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>>,
}

impl ConnectionTable {
    /// Closes the oldest connection of `instance_id`.
    fn close_oldest(&mut self, instance_id: &str) {
        if let Some(conns) = self.by_instance.get_mut(instance_id) {
            if conns.pop_first().is_some() {
                self.total -= 1;
            }
            if conns.is_empty() {
                self.by_instance.remove(instance_id);
            }
        }
    }
}

impl Connections {
    fn new(limits: ConnectionLimits) -> Connections {
        Connections { limits, inner: Mutex::default() }
    }

    /// Admits a new connection of `instance_id`, closing what the caps
    /// require first; `None` once the instance's service stopped.
    fn admit(&self, instance_id: &str, stopped: &AtomicBool) -> Option<(u64, tokio::sync::oneshot::Receiver<()>)> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if stopped.load(Ordering::SeqCst) {
            return None;
        }
        while t.by_instance.get(instance_id).is_some_and(|c| c.len() >= self.limits.per_instance.max(1)) {
            t.close_oldest(instance_id);
            tracing::debug!(%instance_id, "metadata connection closed: the instance's cap");
        }
        while t.total >= self.limits.total.max(1) {
            let Some(heaviest) = t.by_instance.iter().max_by_key(|(_, c)| c.len()).map(|(id, _)| id.clone()) else { break };
            t.close_oldest(&heaviest);
            tracing::debug!(instance_id = %heaviest, "metadata connection closed: the host's cap");
        }
        let id = t.next;
        t.next += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        t.by_instance.entry(instance_id.to_string()).or_default().insert(id, tx);
        t.total += 1;
        Some((id, rx))
    }

    /// Forgets a connection that ended.
    fn release(&self, instance_id: &str, id: u64) {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conns) = t.by_instance.get_mut(instance_id) {
            if conns.remove(&id).is_some() {
                if conns.is_empty() {
                    t.by_instance.remove(instance_id);
                }
                t.total -= 1;
            }
        }
    }

    /// Closes every connection of `instance_id`; how many there were.
    fn close_instance(&self, instance_id: &str) -> usize {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.by_instance.remove(instance_id).map_or(0, |c| c.len());
        t.total -= n;
        n
    }

    fn close_all(&self) {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.by_instance.clear();
        t.total = 0;
    }

    fn count(&self, instance_id: &str) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).by_instance.get(instance_id).map_or(0, |c| c.len())
    }
}

/// Releases a connection's place in [`Connections`] when its task ends.
struct Admitted {
    connections: Arc<Connections>,
    instance_id: String,
    id: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.connections.release(&self.instance_id, self.id);
    }
}

/// What the service needs of a connection besides reading and writing.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The IP TTL of what the connection sends (`None`: no IP, a unix socket).
    fn ip_ttl(&self) -> Option<u32> {
        None
    }
    fn set_ip_ttl(&self, _ttl: u32) {}
}

impl Connection for tokio::net::UnixStream {}

impl Connection for tokio::net::TcpStream {
    fn ip_ttl(&self) -> Option<u32> {
        self.ttl().ok()
    }
    fn set_ip_ttl(&self, ttl: u32) {
        if let Err(e) = self.set_ttl(ttl) {
            tracing::warn!(error = %e, ttl, "cannot set the TTL of a metadata connection");
        }
    }
}

/// The IP TTL a response must leave with (the token response's hop limit).
#[derive(Debug, Clone, Copy)]
struct HopLimit(u8);

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
    /// Every live connection, per instance.
    connections: Arc<Connections>,
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
    let hop_limit = g.content.read().unwrap_or_else(|p| p.into_inner()).meta.options.hop_limit;
    let mut resp = ([(TTL_HEADER, ttl.to_string())], token).into_response();
    resp.extensions_mut().insert(HopLimit(hop_limit.max(1)));
    resp
}

impl MetadataServers {
    pub fn new(qemu: crate::access::QemuUser, dir: PathBuf) -> MetadataServers {
        MetadataServers::with_limits(qemu, dir, ConnectionLimits::for_this_process())
    }

    pub fn with_limits(qemu: crate::access::QemuUser, dir: PathBuf, limits: ConnectionLimits) -> MetadataServers {
        MetadataServers {
            entries: Arc::default(),
            addresses: Arc::default(),
            vpc_listeners: Arc::default(),
            qemu,
            dir,
            store: Arc::default(),
            refreshes: Arc::default(),
            connections: Arc::new(Connections::new(limits)),
        }
    }

    /// Serves one connection of `instance_id` (its content `guest`) in a
    /// task of its own, within the caps; nothing once the instance's
    /// service stopped.
    fn serve<S: Connection>(&self, instance_id: &str, guest: &Guest, conn: S, app: Router, idle: Option<Duration>) {
        let Some((id, closed)) = self.connections.admit(instance_id, &guest.stopped) else { return };
        let admitted = Admitted { connections: self.connections.clone(), instance_id: instance_id.to_string(), id };
        let timeouts = Timeouts { request: self.connections.limits.request_timeout, idle };
        tokio::spawn(async move {
            let _admitted = admitted;
            tokio::select! {
                _ = serve_connection(conn, app, timeouts) => {}
                // Evicted, or the instance's service stopped: dropping the connection closes it.
                _ = closed => {}
            }
        });
    }

    /// Closes every metadata connection of an instance (its guest stopped:
    /// a VPC guest's connections would otherwise stay open until they idle
    /// out). Returns how many there were.
    pub fn close_connections(&self, instance_id: &str) -> usize {
        self.connections.close_instance(instance_id)
    }

    /// The live metadata connections of an instance (tests).
    pub fn connection_count(&self, instance_id: &str) -> usize {
        self.connections.count(instance_id)
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
            return Guest::new(content);
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
                let guest = Guest::new(content);
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
        let app = router(content.clone());
        let instance_id = meta.instance_id.clone();
        let this = self.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => this.serve(&instance_id, &content, conn, app.clone(), None),
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
                        let guest = owner.and_then(|id| {
                            let g = this.entries.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|e| e.guest.clone());
                            g.map(|g| (id, g))
                        });
                        match guest {
                            Some((id, g)) => {
                                // Answers go out at once (no Nagle wait for the guest's next request).
                                let _ = conn.set_nodelay(true);
                                let idle = Some(this.connections.limits.idle_timeout);
                                this.serve(&id, &g, conn, router(g.clone()), idle);
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

    /// Stops the instance's service: its socket server and file, its
    /// addresses, and every connection it has (on either listener).
    pub fn stop(&self, instance_id: &str) {
        if let Some(e) = self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(instance_id) {
            // Before the connections close: none is admitted after them.
            e.guest.stopped.store(true, Ordering::SeqCst);
            if let Some(t) = e.socket_task {
                t.abort();
            }
        }
        self.addresses.write().unwrap_or_else(|p| p.into_inner()).retain(|_, owner| owner != instance_id);
        let closed = self.connections.close_instance(instance_id);
        if closed > 0 {
            tracing::debug!(%instance_id, closed, "metadata connections closed");
        }
        let _ = std::fs::remove_file(self.socket(instance_id));
    }

    /// Stops every server (the agent is stopping), leaving the sockets: the
    /// guests keep running, and the next agent replaces them.
    pub fn stop_all(&self) {
        for (_, e) in self.entries.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            e.guest.stopped.store(true, Ordering::SeqCst);
            if let Some(t) = e.socket_task {
                t.abort();
            }
        }
        for (_, t) in self.vpc_listeners.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            t.abort();
        }
        self.connections.close_all();
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

async fn write_status<S: AsyncWrite + Unpin>(conn: &mut S, status: StatusCode, timeout: Duration) {
    let head = format!("HTTP/1.1 {} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let _ = tokio::time::timeout(timeout, conn.write_all(head.as_bytes())).await;
}

/// How long a connection may take (see [`ConnectionLimits`]).
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    request: Duration,
    /// Between requests; `None`: no limit (the unix socket).
    idle: Option<Duration>,
}

/// Reads into `chunk` before `deadline` (if any); `None` when the peer
/// closed, failed or ran out of time.
async fn read_before<S: AsyncRead + Unpin>(conn: &mut S, chunk: &mut [u8], deadline: Option<tokio::time::Instant>) -> Option<usize> {
    let read = match deadline {
        Some(d) => tokio::time::timeout_at(d, conn.read(chunk)).await.ok()?,
        None => conn.read(chunk).await,
    };
    match read {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

/// Answers requests on one connection until the peer closes it, sends
/// something the service refuses (then after answering the refusal), takes
/// longer than `timeouts.request` over a request, or idles longer than
/// `timeouts.idle` between requests.
async fn serve_connection<S: Connection>(mut conn: S, app: Router, timeouts: Timeouts) {
    use tower::ServiceExt;
    // Holds at most one head (MAX_HEAD) plus what one read brought after it.
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // The system's TTL, restored after a token response went out with the hop limit.
    let default_ttl = conn.ip_ttl();
    let mut ttl_lowered = false;
    loop {
        // The request's clock starts with its first byte (already here when pipelined).
        let now = tokio::time::Instant::now();
        let mut deadline = (!buf.is_empty()).then(|| now + timeouts.request);
        let idle_until = timeouts.idle.map(|i| now + i);
        // Read until one whole request head is buffered.
        let (method, path, headers, head_len, body_len) = loop {
            match parse_head(&buf) {
                Some(Head::Request { method, path, headers, head_len, body_len }) => break (method, path, headers, head_len, body_len),
                Some(Head::Refuse(status)) => return write_status(&mut conn, status, timeouts.request).await,
                None => {}
            }
            let Some(n) = read_before(&mut conn, &mut chunk, deadline.or(idle_until)).await else { return };
            buf.extend_from_slice(&chunk[..n]);
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + timeouts.request);
        };
        let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + timeouts.request);
        // Drop the body (at most MAX_BODY): what was buffered, then the rest as it comes.
        let buffered = buf.len().min(head_len + body_len);
        buf.drain(..buffered);
        let mut rest = head_len + body_len - buffered;
        while rest > 0 {
            let want = rest.min(chunk.len());
            let Some(n) = read_before(&mut conn, &mut chunk[..want], Some(deadline)).await else { return };
            rest -= n;
        }

        let mut request = axum::http::Request::builder()
            .method(if method == "HEAD" { "GET" } else { method.as_str() })
            .uri(versioned(&path));
        for (name, value) in &headers {
            request = request.header(name.as_str(), value.as_slice());
        }
        let (status, ttl, hop_limit, body) = match request.body(axum::body::Body::empty()) {
            Ok(req) => match app.clone().oneshot(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let ttl = resp.headers().get(TTL_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
                    let hop_limit = resp.extensions().get::<HopLimit>().map(|h| h.0);
                    (status, ttl, hop_limit, axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap_or_default())
                }
                Err(never) => match never {},
            },
            Err(_) => (StatusCode::BAD_REQUEST, None, None, Default::default()),
        };
        // A token leaves with the instance's hop limit as its TTL; later
        // answers with the system's again.
        match (hop_limit, default_ttl) {
            (Some(h), Some(_)) => {
                conn.set_ip_ttl(u32::from(h));
                ttl_lowered = true;
            }
            (None, Some(d)) if ttl_lowered => {
                conn.set_ip_ttl(d);
                ttl_lowered = false;
            }
            _ => {}
        }
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\n{}Content-Length: {}\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            ttl.map(|t| format!("X-aws-ec2-metadata-token-ttl-seconds: {t}\r\n")).unwrap_or_default(),
            if method == "HEAD" { 0 } else { body.len() }
        );
        // The answer must be taken in time too (a guest that never reads holds nothing).
        let write = async {
            conn.write_all(head.as_bytes()).await?;
            if method != "HEAD" {
                conn.write_all(&body).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        if !matches!(tokio::time::timeout(timeouts.request, write).await, Ok(Ok(()))) {
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

/// The attacks of issue 18 on the metadata service: a guest holding
/// half-sent requests (finding 5) and the hop limit (finding 10).
#[cfg(test)]
mod connection_tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// The connections the server holds on the listener at `socket`
    /// (accepted ones, and those waiting to be: the kernel gives them the
    /// listener's path in /proc/net/unix; clients' sockets have none).
    fn server_side(socket: &FsPath) -> usize {
        let path = socket.to_string_lossy();
        let table = std::fs::read_to_string("/proc/net/unix").unwrap();
        table.lines().filter(|l| l.split_whitespace().nth(7) == Some(&path)).filter(|l| l.split_whitespace().nth(5) == Some("03")).count()
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// Waits (at most `bound`) for `cond`; whether it came.
    async fn eventually(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        while !cond() {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Clients that sent half a request and wait; each drops its socket
    /// once the server closed the connection. Aborted on drop.
    struct HalfSent {
        closed: Arc<AtomicUsize>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl HalfSent {
        async fn open(socket: &FsPath, n: usize) -> HalfSent {
            let closed = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..n {
                let mut conn = tokio::net::UnixStream::connect(socket).await.unwrap();
                conn.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Slow: ").await.unwrap();
                let closed = closed.clone();
                tasks.push(tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                    closed.fetch_add(1, Ordering::SeqCst);
                }));
            }
            HalfSent { closed, tasks }
        }

        fn closed(&self) -> usize {
            self.closed.load(Ordering::SeqCst)
        }
    }

    impl Drop for HalfSent {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    /// Stops every server when the test ends, passed or failed.
    struct Servers(MetadataServers, #[allow(dead_code)] tempfile::TempDir);

    impl Servers {
        fn new(limits: ConnectionLimits) -> Servers {
            let dir = tempfile::tempdir().unwrap();
            Servers(MetadataServers::with_limits(crate::access::QemuUser::root(), dir.path().join("run"), limits), dir)
        }
    }

    impl Drop for Servers {
        fn drop(&mut self) {
            self.0.stop_all();
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Finding 5: a guest held 1,000 half-sent requests and the agent's
    /// descriptors went from 23 to 1,023. Now an instance holds at most its
    /// cap (a new connection closes its oldest), all guests together at most
    /// the host's (a new one closes the oldest of the guest holding the
    /// most), and another guest's metadata answers all along.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_half_sent_requests_is_capped_per_guest_and_per_host() {
        let limits = ConnectionLimits { request_timeout: HOUR, idle_timeout: HOUR, per_instance: 8, total: 24 };
        let s = Servers::new(limits);
        let ids = ["i-00000000000000a01", "i-00000000000000a02", "i-00000000000000a03", "i-00000000000000b01"];
        let mut sockets = Vec::new();
        for id in ids {
            sockets.push(s.0.ensure(&sample_metadata(id), None).await.unwrap());
        }
        let (attackers, victim) = (&sockets[..3], &sockets[3]);
        let before = open_fds();
        let mut floods = Vec::new();
        for socket in attackers {
            let flood = HalfSent::open(socket, 150).await;
            // Every connection the server did not keep is closed (and its client with it).
            assert!(
                eventually(Duration::from_secs(60), || flood.closed() >= 150 - limits.per_instance && server_side(socket) <= limits.per_instance).await,
                "the guest keeps {} connections open on the server ({} closed)",
                server_side(socket),
                flood.closed()
            );
            floods.push(flood);
        }
        let held: usize = attackers.iter().map(|s| server_side(s)).sum();
        assert!(held <= limits.total, "{held} connections held for the attackers");
        // The descriptors of this process: the clients still open, the
        // server's side of them, and some slack for the tests running beside.
        let fds = open_fds();
        assert!(fds <= before + 2 * limits.total + 32, "descriptors went from {before} to {fds}");
        for (i, id) in ids[..3].iter().enumerate() {
            assert!(s.0.connection_count(id) <= limits.per_instance, "{id}: {}", s.0.connection_count(id));
            assert_eq!(s.0.connection_count(id), server_side(&attackers[i]));
        }
        // The host is full of the attackers' connections, yet the other guest is answered.
        for _ in 0..3 {
            let (status, body) = request(victim, "GET", "/latest/meta-data/instance-id", &[]).await.unwrap();
            assert_eq!((status, body.as_slice()), (200, ids[3].as_bytes()));
        }
        let total: usize = sockets.iter().map(|s| server_side(s)).sum();
        assert!(total <= limits.total, "{total} connections in all");
    }

    /// Finding 5: half-sent requests stayed open forever. Now a request must
    /// be done within the request timeout of its first byte (sending a byte
    /// now and then does not extend it), and a VPC connection idle for the
    /// idle timeout closes (see `token_responses_leave_with_the_hop_limit`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_sent_requests_are_closed_after_the_request_timeout() {
        let limits = ConnectionLimits { request_timeout: Duration::from_millis(1500), idle_timeout: HOUR, per_instance: 8, total: 24 };
        let s = Servers::new(limits);
        let id = "i-00000000000000c01";
        let socket = s.0.ensure(&sample_metadata(id), None).await.unwrap();
        let started = tokio::time::Instant::now();
        let flood = HalfSent::open(&socket, 6).await;
        // A trickle: a byte of the head every 200 ms.
        let mut trickle = tokio::net::UnixStream::connect(&socket).await.unwrap();
        trickle.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let cut = tokio::spawn(async move {
            for _ in 0..600 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if trickle.write_all(b"X").await.is_err() {
                    return true;
                }
            }
            false
        });
        assert!(eventually(Duration::from_secs(30), || flood.closed() == 6).await, "{} of 6 half-sent requests closed", flood.closed());
        assert!(started.elapsed() >= Duration::from_millis(1400), "closed before the timeout: {:?}", started.elapsed());
        assert!(tokio::time::timeout(Duration::from_secs(30), cut).await.unwrap().unwrap(), "a trickled head kept its connection");
        assert!(eventually(Duration::from_secs(10), || server_side(&socket) == 0 && s.0.connection_count(id) == 0).await);
        // Whole requests are answered as ever, also one after another on one connection.
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let expected = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n\r\n{id}");
        for _ in 0..2 {
            conn.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n").await.unwrap();
            let mut got = vec![0u8; expected.len()];
            tokio::time::timeout(Duration::from_secs(30), conn.read_exact(&mut got)).await.unwrap().unwrap();
            assert_eq!(String::from_utf8_lossy(&got), expected);
        }
    }

    /// Finding 5: the connections of a terminated guest stayed open for
    /// good. Now stopping an instance's service (termination), or its guest
    /// (a stop), closes every connection it has.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instances_connections_close_when_it_stops_or_terminates() {
        let s = Servers::new(ConnectionLimits { request_timeout: HOUR, idle_timeout: HOUR, per_instance: 8, total: 24 });
        let (gone, stopped, other) = ("i-00000000000000d01", "i-00000000000000d02", "i-00000000000000d03");
        let mut sockets = Vec::new();
        for id in [gone, stopped, other] {
            sockets.push(s.0.ensure(&sample_metadata(id), None).await.unwrap());
        }
        let floods = [HalfSent::open(&sockets[0], 5).await, HalfSent::open(&sockets[1], 5).await, HalfSent::open(&sockets[2], 5).await];
        assert!(eventually(Duration::from_secs(30), || sockets.iter().all(|s| server_side(s) == 5)).await);
        s.0.stop(gone);
        assert!(eventually(Duration::from_secs(10), || floods[0].closed() == 5).await, "{} of 5 closed at termination", floods[0].closed());
        assert!(eventually(Duration::from_secs(10), || server_side(&sockets[0]) == 0).await);
        assert_eq!(s.0.connection_count(gone), 0);
        assert_eq!(s.0.close_connections(stopped), 5);
        assert!(eventually(Duration::from_secs(10), || floods[1].closed() == 5).await, "{} of 5 closed at the stop", floods[1].closed());
        // The stopped instance is still served (for its next start); the other is untouched.
        assert_eq!(request(&sockets[1], "GET", "/latest/meta-data/instance-id", &[]).await.unwrap().0, 200);
        assert_eq!((floods[2].closed(), s.0.connection_count(other)), (0, 5));
    }

    /// The server's packets to `client` with a payload, as (TTL, payload),
    /// read from a raw socket in the namespace.
    fn packets_from_metadata(raw: &socket2::Socket, client_port: u16) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 65536];
        while let Ok(n) = raw.recv(&mut buf) {
            // SAFETY: recv initialised the first n bytes.
            let p: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if p.len() < ihl + 20 || p[9] != 6 || p[12..16] != crate::network::METADATA_IP.octets() {
                continue;
            }
            let tcp = &p[ihl..];
            let (sport, dport) = (u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]));
            let data = usize::from(tcp[12] >> 4) * 4;
            if sport == 80 && dport == client_port && tcp.len() > data {
                out.push((p[8], tcp[data..].to_vec()));
            }
        }
        out
    }

    async fn ip(args: &[&str]) {
        let out = tokio::process::Command::new("ip").args(args).output().await.unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Reads one answer (head and Content-Length body) from `conn`.
    async fn answer(conn: &mut tokio::net::TcpStream) -> String {
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|v| v.parse().ok()).unwrap();
                if body.len() >= len {
                    return text;
                }
            }
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    }

    /// Finding 10: `http_put_response_hop_limit` was shown but the token
    /// response left with TTL 64, so a token reached any host or container
    /// routed behind the guest. Now its TTL is the instance's hop limit (as
    /// EC2's), other answers keep the system's; and (finding 5) a VPC
    /// connection that sends nothing is closed after the idle timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_responses_leave_with_the_hop_limit_as_ttl() {
        let ns = crate::network::testing::ScratchNs::new("imds").await;
        let guest_ip = Ipv4Addr::new(10, 9, 0, 5);
        ip(&["-n", &ns.name, "addr", "add", &format!("{}/32", crate::network::METADATA_IP), "dev", "lo"]).await;
        ip(&["-n", &ns.name, "addr", "add", &format!("{guest_ip}/32"), "dev", "lo"]).await;
        let s = Servers::new(ConnectionLimits { request_timeout: HOUR, idle_timeout: Duration::from_secs(1), per_instance: 8, total: 24 });
        let nic = Nic {
            eni_id: "eni-0123456789abcdef0".into(),
            device_index: 0,
            mac: "02:00:00:00:00:05".into(),
            private_ip: guest_ip,
            subnet: nimbus_proto::network::Cidr::parse("10.9.0.0/24").unwrap(),
            gateway: Ipv4Addr::new(10, 9, 0, 1),
            vpc_id: "vpc-0123456789abcdef0".into(),
            vni: 7,
            public_ip: None,
            group_ids: vec!["sg-0123456789abcdef0".into()],
        };
        let mut m = sample_metadata("i-00000000000000e01");
        s.0.publish(&m, None, std::slice::from_ref(&nic));
        s.0.ensure_vpc(7, &ns.name).await.unwrap();
        let raw = crate::network::testing::in_netns(&ns.name, || -> std::io::Result<socket2::Socket> {
            let r = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::from(nix::libc::SOCK_RAW), Some(socket2::Protocol::TCP))?;
            r.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok(r)
        })
        .unwrap()
        .unwrap();
        let connect = |ns: String| async move {
            let sock = crate::network::testing::in_netns(&ns, move || -> std::io::Result<std::net::TcpStream> {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.bind(&std::net::SocketAddr::from((guest_ip, 0)).into())?;
                s.set_nonblocking(true)?;
                Ok(s.into())
            })
            .unwrap()
            .unwrap();
            tokio::net::TcpSocket::from_std_stream(sock).connect((crate::network::METADATA_IP, 80).into()).await.unwrap()
        };

        for hop_limit in [1u8, 3] {
            m.options.hop_limit = hop_limit;
            m.version += 1;
            s.0.publish(&m, None, std::slice::from_ref(&nic));
            let mut conn = connect(ns.name.clone()).await;
            let port = conn.local_addr().unwrap().port();
            conn.write_all(b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n").await.unwrap();
            let token = answer(&mut conn).await;
            assert!(token.starts_with("HTTP/1.1 200"), "{token}");
            conn.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n").await.unwrap();
            let id = answer(&mut conn).await;
            assert!(id.ends_with("i-00000000000000e01"), "{id}");
            let raw = raw.try_clone().unwrap();
            let packets = tokio::task::spawn_blocking(move || packets_from_metadata(&raw, port)).await.unwrap();
            let ttl_of = |text: &str| packets.iter().find(|(_, p)| String::from_utf8_lossy(p).contains(text)).map(|(t, _)| *t);
            let token_body = token.split_once("\r\n\r\n").unwrap().1;
            assert_eq!(ttl_of(token_body), Some(hop_limit), "the token response's TTL: {packets:?}");
            assert_eq!(ttl_of("i-00000000000000e01"), Some(64), "other answers keep the system's TTL: {packets:?}");
        }

        // A connection that sends nothing is closed once idle for the idle timeout.
        let mut idle = connect(ns.name.clone()).await;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(30), idle.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "an idle connection stayed open: {read:?}");
        assert_eq!(s.0.connection_count("i-00000000000000e01"), 0);
    }
}
