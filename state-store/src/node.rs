//! A store node: local storage, membership, transport, and the background
//! loops (gossip, hint delivery, anti-entropy, tombstone GC). The client
//! operations live in `coordinator`, the repair loops in `handoff` and
//! `anti_entropy`.

use crate::api::Context;
use crate::clock::{NodeId, Record};
use crate::error::{check_key, RpcError, StorageError, StoreError};
use crate::membership::{Member, Membership, RingParams};
use crate::merkle::key_digest;
use crate::rpc::{Handler, Request, Response, Transport};
use crate::storage::{encode_record, Fsync, Storage};
use async_trait::async_trait;
use rand::seq::SliceRandom;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Node configuration. `Config::new` gives production-like defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id: its advertised `host:port` over HTTP.
    pub id: NodeId,
    /// Directory holding the store (fjall database in `store/`). Made (or
    /// closed) 0700 at start: the store holds every tenant's documents, and
    /// the files fjall writes inside follow the umask.
    pub data_dir: PathBuf,
    /// Other nodes to contact first.
    pub seeds: Vec<NodeId>,
    /// Replicas per key, read quorum, write quorum.
    pub n: usize,
    pub r: usize,
    pub w: usize,
    /// Number of equal-sized partitions (fixed for the cluster's life).
    pub partitions: u32,
    /// Timeout of one node-to-node call.
    pub request_timeout: Duration,
    /// A read that has fewer than R replies after this long asks one more
    /// replica (speculative retry).
    pub read_hedge: Duration,
    /// Fraction of reads (0.0..=1.0) that ask every replica and repair all
    /// stale owners, not only the R they answer from.
    pub read_repair_chance: f64,
    pub gossip_interval: Duration,
    pub fail_timeout: Duration,
    pub hint_interval: Duration,
    pub anti_entropy_interval: Duration,
    /// Tombstones younger than this are never garbage-collected.
    pub tombstone_grace: Duration,
    /// How often the tombstone GC scans the local store.
    pub gc_interval: Duration,
    /// When writes reach the disk (default: fdatasync every 100 ms).
    pub fsync: Fsync,
    /// Size at which the data memtable is flushed to a table; applies when
    /// the store is created (fjall keeps it with the store). At least 1 MiB.
    pub memtable_bytes: u64,
    /// Spawn the periodic background loops (tests may drive them by hand).
    pub background: bool,
}

/// Smallest accepted [`Config::memtable_bytes`].
pub const MIN_MEMTABLE_BYTES: u64 = 1 << 20;

impl Config {
    /// Check the settings: `1 <= R, W <= N`, at least one partition, a
    /// memtable of at least [`MIN_MEMTABLE_BYTES`].
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.n == 0 || self.r == 0 || self.w == 0 || self.r > self.n || self.w > self.n {
            return Err(StoreError::BadConfig(format!("need 1 <= R, W <= N; got N={} R={} W={}", self.n, self.r, self.w)));
        }
        if !(0.0..=1.0).contains(&self.read_repair_chance) {
            return Err(StoreError::BadConfig(format!("read_repair_chance must be in 0..=1; got {}", self.read_repair_chance)));
        }
        if self.partitions == 0 {
            return Err(StoreError::BadConfig("partitions must be at least 1".into()));
        }
        if self.memtable_bytes < MIN_MEMTABLE_BYTES {
            return Err(StoreError::BadConfig(format!(
                "memtable_bytes must be at least {MIN_MEMTABLE_BYTES}; got {}",
                self.memtable_bytes
            )));
        }
        Ok(())
    }

    pub fn new(id: impl Into<NodeId>, data_dir: impl Into<PathBuf>) -> Config {
        Config {
            id: id.into(),
            data_dir: data_dir.into(),
            seeds: Vec::new(),
            n: 3,
            r: 2,
            w: 2,
            partitions: crate::ring::DEFAULT_PARTITIONS,
            request_timeout: Duration::from_millis(500),
            read_hedge: Duration::from_millis(10),
            read_repair_chance: 0.1,
            gossip_interval: Duration::from_millis(500),
            fail_timeout: Duration::from_secs(3),
            hint_interval: Duration::from_secs(1),
            anti_entropy_interval: Duration::from_secs(10),
            tombstone_grace: Duration::from_secs(24 * 3600),
            gc_interval: Duration::from_secs(600),
            fsync: Fsync::Periodic(Duration::from_millis(100)),
            memtable_bytes: crate::storage::DEFAULT_MEMTABLE_BYTES,
            background: true,
        }
    }
}

pub struct Node {
    pub(crate) cfg: Config,
    pub(crate) storage: Arc<Storage>,
    pub(crate) membership: Membership,
    transport: Arc<dyn Transport>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    me: Weak<Node>,
    /// Actor id for the dots this incarnation mints: `id@incarnation`.
    pub(crate) actor: String,
    /// Distinguishes the one-off actors of stand-in writes.
    pub(crate) stand_in_writes: std::sync::atomic::AtomicU64,
    /// Rotates which other owners a read asks first.
    pub(crate) read_turn: std::sync::atomic::AtomicUsize,
    pub(crate) started: std::time::Instant,
    /// Outcome of [`Node::join`].
    join_state: Mutex<JoinState>,
    /// The join was refused (kept beside `join_state` for the request path).
    join_refused: std::sync::atomic::AtomicBool,
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) anti_entropy: crate::anti_entropy::AntiEntropyState,
}

/// Why a node is not ready (`GET /readyz` answers 503 with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum NotReady {
    #[error("the node has not joined the ring yet")]
    JoinPending,
    #[error("the join was refused: {0}")]
    JoinRefused(String),
    #[error("the node is leaving or has left the ring")]
    NotJoined,
    #[error("{alive} of the ring's {members} nodes are alive; quorum operations need {needed} (R={r}, W={w})")]
    NoQuorum { alive: usize, members: usize, needed: usize, r: usize, w: usize },
}

/// Where the node is with its [`Node::join`].
#[derive(Debug, Clone)]
pub enum JoinState {
    /// `join` has not completed yet.
    Pending,
    /// Joined: every peer reached agreed on the ring parameters.
    Joined,
    /// A peer refused this node (ring parameters disagree): it serves no
    /// client operations.
    Refused(StoreError),
}

impl Node {
    /// Open storage and start the node. Registering it with a transport
    /// (HTTP server or simulator) is the caller's job.
    pub async fn start(cfg: Config, transport: Arc<dyn Transport>) -> Result<Arc<Node>, StoreError> {
        cfg.validate()?;
        private_dir(&cfg.data_dir).map_err(|e| StorageError::Engine(format!("{}: {e}", cfg.data_dir.display())))?;
        let storage = Arc::new(Storage::open(&cfg.data_dir.join("store"), cfg.partitions, cfg.fsync, cfg.memtable_bytes)?);
        let params = RingParams { n: cfg.n as u32, partitions: cfg.partitions };
        let membership = Membership::new(cfg.id.clone(), &cfg.seeds, params, cfg.fail_timeout);
        let cfg_id = cfg.id.clone();
        let incarnation = storage.incarnation();
        let node = Arc::new_cyclic(|me| Node {
            cfg,
            storage,
            membership,
            transport,
            tasks: Mutex::new(Vec::new()),
            me: me.clone(),
            actor: format!("{}@{}", cfg_id, incarnation),
            stand_in_writes: std::sync::atomic::AtomicU64::new(0),
            read_turn: std::sync::atomic::AtomicUsize::new(0),
            started: std::time::Instant::now(),
            join_state: Mutex::new(JoinState::Pending),
            join_refused: std::sync::atomic::AtomicBool::new(false),
            metrics: crate::metrics::Metrics::default(),
            anti_entropy: Default::default(),
        });
        if node.cfg.background {
            node.spawn_loops();
        }
        tracing::info!(id = %node.cfg.id, "node started");
        Ok(node)
    }

    pub fn id(&self) -> &NodeId {
        &self.cfg.id
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Ready: joined the ring (the join completed and was not refused, and
    /// the node is not leaving) and enough ring members alive for quorum
    /// operations: max(R, W), capped by the ring's size as N is.
    pub fn readiness(&self) -> Result<(), NotReady> {
        match self.join_state() {
            JoinState::Pending => return Err(NotReady::JoinPending),
            JoinState::Refused(e) => return Err(NotReady::JoinRefused(e.to_string())),
            JoinState::Joined => {}
        }
        if !self.membership.is_joined() {
            return Err(NotReady::NotJoined);
        }
        let ring = self.membership.ring();
        let members = ring.nodes().len();
        let alive = ring.nodes().iter().filter(|n| self.membership.is_alive(n)).count();
        let needed = self.cfg.r.max(self.cfg.w).min(self.cfg.n).min(members).max(1);
        if alive < needed {
            return Err(NotReady::NoQuorum { alive, members, needed, r: self.cfg.r, w: self.cfg.w });
        }
        Ok(())
    }

    /// Stop the background loops (the node keeps answering requests until
    /// dropped).
    pub fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = self.tasks.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        for t in tasks {
            t.abort();
        }
    }

    /// Call another node (or ourselves, locally) with the request timeout.
    /// A failed call marks the peer suspect.
    pub(crate) async fn call(&self, to: &NodeId, req: Request) -> Result<Response, RpcError> {
        self.call_with_timeout(to, req, self.cfg.request_timeout).await
    }

    pub(crate) async fn call_with_timeout(&self, to: &NodeId, req: Request, timeout: Duration) -> Result<Response, RpcError> {
        if *to == self.cfg.id {
            return Ok(self.handle_local(req).await);
        }
        let res = match tokio::time::timeout(timeout, self.transport.call(&self.cfg.id, to, req)).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout(to.clone())),
        };
        match res {
            Ok(Response::Error(msg)) => Err(RpcError::Remote { node: to.clone(), msg }),
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::debug!(peer = %to, error = %e, "call failed");
                self.membership.mark_suspect(to);
                Err(e)
            }
        }
    }

    /// Answer a client request that arrived over the framed transport
    /// (`ClientGet`/`ClientPut`); other requests go to `handle_local`.
    pub async fn handle_client(self: &Arc<Self>, req: Request) -> Response {
        match req {
            Request::ClientGet { key } => match self.get(&key).await {
                Ok(r) => Response::Got(r),
                Err(e) => Response::Failed(e),
            },
            Request::ClientPut { key, value, context } => match self.put(&key, value, &Context(context)).await {
                Ok(ctx) => Response::Written(ctx.0),
                Err(e) => Response::Failed(e),
            },
            other => self.handle_local(other).await,
        }
    }

    /// Answer a node-to-node request. A node that is leaving (or has left)
    /// refuses writes: its data has been, or is being, handed over, and a
    /// write it accepted now could stay behind.
    pub async fn handle_local(&self, req: Request) -> Response {
        let write = matches!(
            req,
            Request::Coordinate { .. } | Request::Put { .. } | Request::Hinted { .. } | Request::PutMany { .. } | Request::Bury { .. }
        );
        if write && !self.membership.is_joined() {
            return Response::Error(format!("node {} is leaving the ring and takes no writes", self.cfg.id));
        }
        // peers are checked like clients: a key over the limit never
        // reaches the storage layer, whose hint keys encode its length
        let bad_key = match &req {
            Request::Put { key, .. } | Request::Hinted { key, .. } | Request::Coordinate { key, .. } => check_key(key).err(),
            Request::PutMany { items } => items.iter().find_map(|(k, _)| check_key(k).err()),
            Request::Bury { items } => items.iter().find_map(|(k, _)| check_key(k).err()),
            _ => None,
        };
        if let Some(e) = bad_key {
            return Response::Error(e.to_string());
        }
        if let Request::Coordinate { key, value, context } = req {
            // coordinating needs an owning handle for the replica tasks
            let Some(me) = self.me.upgrade() else { return Response::Error("node is stopping".into()) };
            return match me.coordinate_put(&key, value, context).await {
                Ok(ctx) => Response::Written(ctx.0),
                Err(e) => Response::Failed(e),
            };
        }
        match self.handle_inner(req).await {
            Ok(r) => r,
            Err(e) => Response::Error(e.to_string()),
        }
    }

    async fn handle_inner(&self, req: Request) -> Result<Response, StorageError> {
        Ok(match req {
            Request::Get { key } => Response::Record(self.storage.get_with_hints(&key)?),
            Request::Put { key, record } => {
                self.storage.merge(&key, record).await?;
                Response::Ok
            }
            Request::Hinted { owner, key, record } => {
                if owner == self.cfg.id {
                    self.storage.merge(&key, record).await?;
                } else {
                    self.storage.hint_merge(&owner, &key, record).await?;
                }
                Response::Ok
            }
            Request::Gossip { from, params, members } => {
                let ours = self.membership.params();
                if params != ours {
                    let err = StoreError::RingMismatch { me: self.cfg.id.clone(), ours, node: from.clone(), theirs: params };
                    self.metrics.ring_refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if self.membership.refuse(&from, err.to_string()) {
                        tracing::error!(peer = %from, error = %err, "refused a node whose ring parameters disagree");
                    }
                    return Ok(Response::Failed(err));
                }
                self.membership.accept(&from);
                self.membership.merge(&members);
                Response::Members(self.membership.snapshot())
            }
            Request::MerkleLeaves { partition } => Response::Leaves(self.storage.merkle(partition)?.encode()),
            Request::KeyDigests { partition, leaves } => {
                let leaves: Vec<usize> = leaves.into_iter().map(|l| l as usize).collect();
                Response::Digests(self.storage.key_digests(partition, &leaves)?.into_iter().collect())
            }
            Request::GetMany { keys } => {
                let mut out = Vec::with_capacity(keys.len());
                for k in keys {
                    let r = self.storage.get(&k)?;
                    out.push((k, r));
                }
                Response::Records(out)
            }
            Request::PutMany { items } => {
                let futs = items.into_iter().map(|(k, r)| {
                    let s = self.storage.clone();
                    async move { s.merge(&k, r).await }
                });
                for r in futures::future::join_all(futs).await {
                    r?;
                }
                Response::Ok
            }
            Request::GcProbe { key } => {
                let d = match self.storage.get(&key)? {
                    Some(r) if r.is_tombstone() => Some(key_digest(&key, &encode_record(&r)?)),
                    _ => None,
                };
                Response::Digest(d)
            }
            Request::GcDrop { key, digest } => {
                self.storage.bury_if(&key, digest).await?;
                Response::Ok
            }
            Request::Bury { items } => {
                for (k, covered) in items {
                    self.storage.bury(&k, covered).await?;
                }
                Response::Ok
            }
            Request::Coordinate { .. } | Request::ClientGet { .. } | Request::ClientPut { .. } => Response::Error("unreachable".into()),
        })
    }

    /// One gossip exchange with a random peer.
    pub async fn gossip_round(&self) {
        let view = self.membership.tick();
        let peer = {
            let peers = self.membership.gossip_peers();
            peers.choose(&mut rand::thread_rng()).cloned()
        };
        if let Some(peer) = peer {
            let _ = self.gossip_with(&peer, view).await;
        }
    }

    /// A push-pull exchange with `peer`. `Err` only when the peer refused
    /// us because the ring parameters disagree; the peer is then refused
    /// here too (out of our ring, no more gossip).
    async fn gossip_with(&self, peer: &NodeId, members: Vec<Member>) -> Result<(), StoreError> {
        let req = Request::Gossip { from: self.cfg.id.clone(), params: self.membership.params(), members };
        match self.call(peer, req).await {
            Ok(Response::Members(m)) => {
                self.membership.merge(&m);
                Ok(())
            }
            Ok(Response::Failed(e @ StoreError::RingMismatch { .. })) => {
                self.metrics.ring_refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if self.membership.refuse(peer, e.to_string()) {
                    tracing::error!(%peer, error = %e, "a peer refused this node: ring parameters disagree");
                }
                Err(e)
            }
            _ => Ok(()),
        }
    }

    /// Announce this node to its seeds and every peer it learns of: the
    /// explicit join. Peers add it to their ring on receipt; its partitions
    /// are then filled by anti-entropy. Peers that cannot be reached are
    /// not an error (they learn of this node by gossip later), but a peer
    /// whose ring parameters (N, partitions) disagree refuses the join:
    /// the error names both sides' parameters, and from then on this node
    /// answers client operations with [`StoreError::NotInRing`].
    pub async fn join(&self) -> Result<(), StoreError> {
        // a second pass reaches the peers learned from the seeds
        for _ in 0..2 {
            let view = self.membership.tick();
            for peer in self.membership.gossip_peers() {
                if let Err(e) = self.gossip_with(&peer, view.clone()).await {
                    tracing::error!(error = %e, "join refused");
                    self.join_refused.store(true, std::sync::atomic::Ordering::Release);
                    *self.join_state.lock().unwrap_or_else(|p| p.into_inner()) = JoinState::Refused(e.clone());
                    return Err(e);
                }
            }
        }
        *self.join_state.lock().unwrap_or_else(|p| p.into_inner()) = JoinState::Joined;
        Ok(())
    }

    pub fn join_state(&self) -> JoinState {
        self.join_state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `Err(NotInRing)` when this node's join was refused.
    pub(crate) fn check_in_ring(&self) -> Result<(), StoreError> {
        if !self.join_refused.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        match self.join_state() {
            JoinState::Refused(e) => Err(StoreError::NotInRing(Box::new(e))),
            _ => Ok(()),
        }
    }

    /// Gossip with every known peer once (used on leave and removal).
    pub async fn gossip_all(&self) {
        let view = self.membership.tick();
        for peer in self.membership.gossip_peers() {
            let _ = self.gossip_with(&peer, view.clone()).await;
        }
    }

    fn spawn_loops(self: &Arc<Self>) {
        let mut tasks = Vec::new();
        tasks.push(spawn_periodic(Arc::downgrade(self), self.cfg.gossip_interval, |n| async move { n.gossip_round().await }));
        tasks.push(spawn_periodic(Arc::downgrade(self), self.cfg.hint_interval, |n| async move {
            n.deliver_hints().await;
        }));
        tasks.push(spawn_periodic(Arc::downgrade(self), self.cfg.anti_entropy_interval, |n| async move {
            n.run_anti_entropy().await;
        }));
        tasks.push(spawn_periodic(Arc::downgrade(self), self.cfg.gc_interval, |n| async move {
            n.gc_tombstones().await;
        }));
        if let Ok(mut t) = self.tasks.lock() {
            t.extend(tasks);
        }
    }
}

/// Creates `dir` (and missing parents) as its owner's alone, 0700 whatever
/// the umask, and closes an existing one: nothing below it is reachable by
/// other users, whatever modes the files inside have.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn spawn_periodic<F, Fut>(node: Weak<Node>, every: Duration, f: F) -> JoinHandle<()>
where
    F: Fn(Arc<Node>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut iv = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            let Some(n) = node.upgrade() else { return };
            f(n).await;
        }
    })
}

#[async_trait]
impl Handler for Node {
    async fn handle(&self, req: Request) -> Response {
        self.handle_local(req).await
    }
}

/// Merge helper shared by the coordinator and repair paths.
pub(crate) fn merge_all<'a>(records: impl IntoIterator<Item = &'a Record>) -> Record {
    let mut out = Record::default();
    for r in records {
        out.merge(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_settings_are_validated() {
        let mut c = Config::new("a", "/tmp/unused");
        assert!(c.validate().is_ok());
        c.w = 4;
        assert!(matches!(c.validate(), Err(StoreError::BadConfig(_))));
        c.w = 2;
        c.r = 0;
        assert!(matches!(c.validate(), Err(StoreError::BadConfig(_))));
        c.r = 2;
        c.memtable_bytes = 1000;
        assert!(matches!(c.validate(), Err(StoreError::BadConfig(_))));
    }

    /// Issue 18, finding 7: the store's files were 0644 in 0755 directories,
    /// every tenant's user-data readable by any local user.
    #[test]
    fn the_data_directory_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let new = tmp.path().join("a/b");
        private_dir(&new).unwrap();
        assert_eq!((mode(&tmp.path().join("a")), mode(&new)), (0o700, 0o700));
        // One made by an older version (or by hand) is closed.
        let old = tmp.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&old).unwrap();
        assert_eq!(mode(&old), 0o700);
    }
}
