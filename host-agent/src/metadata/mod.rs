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
//! path must be short (108 bytes, QEMU connects by path). A VPC guest is
//! served on 169.254.169.254 in its VPC's namespace instead, known by the
//! source address of its connection.
//!
//! This module is the service's life cycle: which instances are served
//! what, their listeners, and the refresh from the state store. The rooms:
//!
//! | module | job |
//! |---|---|
//! | `content` | what one instance is served (from its assignment or the store's document; the newer wins) |
//! | `documents` | [`DocumentSource`]: reading and opening sealed documents from the host's store node |
//! | `routes` | what each path answers, and EC2's rules before any route |
//! | `tokens` | IMDSv2 session tokens, their headers, the token response's hop limit |
//! | `http` | the HTTP/1 framing: bounded heads, dropped bodies, answers with `Content-Length` |
//! | `limits` | [`ConnectionLimits`]: timeouts and caps per instance and per host, closing an instance's connections |
//! | `client` | [`request`], a request as a guest makes it (tests, benchmarks) |
//!
//! A guest must not be able to hurt the agent, which every guest on the
//! host depends on: what it sends is bounded (`http`), and so are the
//! connections it holds (`limits`).

mod client;
mod content;
mod documents;
mod http;
mod limits;
mod routes;
#[cfg(test)]
mod testing;
mod tokens;

pub use client::request;
pub use documents::DocumentSource;
pub use http::{MAX_BODY, MAX_HEAD};
pub use limits::ConnectionLimits;
#[cfg(test)]
pub(crate) use testing::sample_metadata;
pub use tokens::{TOKEN_HEADER, TTL_HEADER};

use axum::Router;
use content::{Content, Guest};
use http::{Connection, Timeouts};
use limits::Connections;
use nimbus_proto::agent::InstanceMetadata;
use nimbus_proto::metadata::InstanceDocument;
use nimbus_proto::network::Nic;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::task::JoinHandle;

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

/// The longest run directory whose sockets fit a unix socket address
/// (`<dir>/i-<17 hex>.sock` within 107 bytes).
pub const MAX_RUN_DIR_LEN: usize = 107 - "/i-0123456789abcdef0.sock".len();

/// Where the metadata server of an instance listens, given the run directory.
pub fn socket_path(run_dir: &Path, instance_id: &str) -> PathBuf {
    run_dir.join(format!("{instance_id}.sock"))
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
        let Some((admitted, closed)) = self.connections.admit(instance_id, &guest.stopped) else { return };
        let timeouts = Timeouts { request: self.connections.limits.request_timeout, idle };
        tokio::spawn(async move {
            let _admitted = admitted;
            tokio::select! {
                _ = http::serve_connection(conn, app, timeouts) => {}
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
        self.install(Content::from_assignment(meta, user_data_b64, nics), true)
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
        let mut reads = futures::stream::iter(remote)
            .map(|id| {
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
        let app = routes::router(content.clone());
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
                                this.serve(&id, &g, conn, routes::router(g.clone()), idle);
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

#[cfg(test)]
mod tests {
    use super::testing::{get, sample_metadata, Fixture};
    use super::*;

    fn meta(id: &str) -> InstanceMetadata {
        sample_metadata(id)
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
}
