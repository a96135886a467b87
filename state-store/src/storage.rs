//! Durable local storage on fjall (an LSM tree with a write-ahead journal).
//!
//! Keyspaces:
//! * `data`:   `partition(u32 BE) ++ key` → bincode(`Record`)
//! * `hints`:  `keylen(u16 BE) ++ key ++ owner` → bincode(`Record`), writes
//!   held for an unreachable owner (sloppy quorum)
//! * `meta`:   the incarnation stamp (see [`Storage::incarnation`])
//!
//! The Merkle trees (one per partition) live in memory: rebuilt from the
//! data by one scan when the store opens, then updated by the writer in the
//! same step that commits each batch, so they always describe the committed
//! data. Keeping them off disk halves the bytes each write commits.
//!
//! Every write (replica merge, coordinated write, hint, hint removal, GC
//! drop) is applied to an in-memory overlay of the keys it touches and
//! committed as one atomic fjall write batch (one journal append), written
//! to the operating system before it is acknowledged, so it survives a
//! crash of the process. When it reaches the disk depends on [`Fsync`]:
//! * `Always`: one writer thread performs *group commit*: it drains every
//!   queued write into one batch (later writes of the batch see earlier
//!   ones), commits it with `PersistMode::SyncData` (fdatasync before the
//!   batch becomes visible) and only then acknowledges each write, so many
//!   concurrent writes share one fsync.
//! * `Periodic(interval)`: the batch (of one write) commits on the caller's
//!   thread under a lock, with `PersistMode::Buffer`, and a syncer thread
//!   fdatasyncs the journal every interval.
//!
//! A torn last batch is discarded as a whole on recovery. Memtable flushes
//! and compactions run on fjall's background thread; the store's own
//! background thread frees flushed memtables outside fjall's locks (see
//! [`background_loop`]).

use crate::clock::{Dot, Record, Sibling, VersionVector};
use crate::error::StorageError;
use crate::merkle::{bucket_of, key_digest, Digest, MerkleTree};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, RwLock};
use tokio::sync::oneshot;

/// Largest number of queued writes applied in one batch.
const MAX_BATCH: usize = 512;

const INCARNATION: &[u8] = b"incarnation";
/// The Merkle trees as of a clean close (see [`Storage::merkle_snapshot_used`]).
const MERKLE_SNAPSHOT: &[u8] = b"merkle-trees";
/// Format tag of the snapshot: magic and version.
const MERKLE_SNAPSHOT_MAGIC: &[u8; 4] = b"MRK1";

/// `MRK1 ‖ partitions (u32 BE) ‖ every partition's leaves (u128 BE)`.
fn encode_trees(trees: &[MerkleTree]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + trees.len() * crate::merkle::LEAVES * 16);
    out.extend_from_slice(MERKLE_SNAPSHOT_MAGIC);
    out.extend_from_slice(&(trees.len() as u32).to_be_bytes());
    for t in trees {
        for l in &t.leaves {
            out.extend_from_slice(&l.to_be_bytes());
        }
    }
    out
}

/// The trees of a snapshot for `partitions` partitions; `None` when it is
/// not one (another format or partition count: then the trees are rebuilt).
fn decode_trees(b: &[u8], partitions: u32) -> Option<Vec<MerkleTree>> {
    let rest = b.strip_prefix(MERKLE_SNAPSHOT_MAGIC)?;
    let (n, mut rest) = rest.split_first_chunk::<4>()?;
    if u32::from_be_bytes(*n) != partitions || rest.len() != partitions as usize * crate::merkle::LEAVES * 16 {
        return None;
    }
    let mut trees = Vec::with_capacity(partitions as usize);
    for _ in 0..partitions {
        let mut t = MerkleTree::default();
        for leaf in t.leaves.iter_mut() {
            let (d, r) = rest.split_first_chunk::<16>()?;
            *leaf = u128::from_be_bytes(*d);
            rest = r;
        }
        trees.push(t);
    }
    Some(trees)
}

/// The committed Merkle trees, indexed by partition.
type Trees = Arc<RwLock<Vec<MerkleTree>>>;

/// Bytes of recently written records kept in memory per store.
const CACHE_BYTES: u64 = 64 << 20;
/// Default size at which the data memtable is flushed (fjall's default).
/// A flush fsyncs under fjall's journal lock and, at its end, under the
/// tree's version lock; commits wait meanwhile. Larger memtables flush
/// less often but stall longer (in store-bench, 256 MiB gave stalls of up
/// to 0.5 s and no fewer slow operations over 40 s).
pub const DEFAULT_MEMTABLE_BYTES: u64 = 64 << 20;
/// A commit (a journal append) normally takes about 10 µs; one of 2 ms or
/// more waited for the engine and is counted in [`WriterStats`].
pub const SLOW_COMMIT_US: u64 = 2_000;

/// Weighs a cached record by its key and encoded size.
#[derive(Clone)]
struct RecordBytes;
impl quick_cache::Weighter<Vec<u8>, Arc<[u8]>> for RecordBytes {
    fn weight(&self, key: &Vec<u8>, val: &Arc<[u8]>) -> u64 {
        (key.len() + val.len()) as u64
    }
}

/// Write-through cache of encoded records by data key. Only the writer
/// fills it, after each commit (and removes dropped keys), so it never
/// holds anything older than the committed data: a point read in an LSM
/// memtable full of versions of the same keys cost ~15% of the CPU of
/// store-bench. Readers that miss go to fjall.
type RecordCache = quick_cache::sync::Cache<Vec<u8>, Arc<[u8]>, RecordBytes>;

/// When a node's writes reach the disk (see the crate README, "Durability
/// and fsync policy"). Either way a write is in the operating system
/// before it is acknowledged, so it survives a crash (SIGKILL) of the
/// process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// fdatasync the journal before acknowledging each group commit: an
    /// acknowledged write also survives a power loss of the machine.
    Always,
    /// A syncer thread fdatasyncs the journal every interval: a power loss
    /// of the machine can lose up to the interval's writes *on that
    /// replica* (the others, and anti-entropy, still have them).
    Periodic(std::time::Duration),
}

impl std::str::FromStr for Fsync {
    type Err = String;
    /// `always`, or an interval in milliseconds such as `100ms`.
    fn from_str(s: &str) -> Result<Fsync, String> {
        if s == "always" {
            return Ok(Fsync::Always);
        }
        match s.strip_suffix("ms").and_then(|n| n.parse::<u64>().ok()) {
            Some(ms) if ms > 0 => Ok(Fsync::Periodic(std::time::Duration::from_millis(ms))),
            _ => Err(format!("fsync policy must be `always` or an interval like `100ms`; got `{s}`")),
        }
    }
}

pub fn encode_record(r: &Record) -> Result<Vec<u8>, StorageError> {
    bincode::serialize(r).map_err(|e| StorageError::Corrupt(e.to_string()))
}

pub fn decode_record(b: &[u8]) -> Result<Record, StorageError> {
    bincode::deserialize(b).map_err(|e| StorageError::Corrupt(e.to_string()))
}

fn encode_vv(v: &VersionVector) -> Result<Vec<u8>, StorageError> {
    bincode::serialize(v).map_err(|e| StorageError::Corrupt(e.to_string()))
}

fn decode_vv(b: &[u8]) -> Result<VersionVector, StorageError> {
    bincode::deserialize(b).map_err(|e| StorageError::Corrupt(e.to_string()))
}

fn data_key(partition: u32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len());
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// `(partition, key)` of a data-keyspace key, the inverse of `data_key`.
fn split_data_key(dk: &[u8]) -> Result<(u32, &[u8]), StorageError> {
    match dk {
        [a, b, c, d, key @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), key)),
        _ => Err(StorageError::Corrupt("data key shorter than its partition prefix".into())),
    }
}

fn hint_prefix(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + key.len());
    k.extend_from_slice(&(key.len() as u16).to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn hint_key(key: &[u8], owner: &str) -> Vec<u8> {
    let mut k = hint_prefix(key);
    k.extend_from_slice(owner.as_bytes());
    k
}

fn split_hint_key(hk: &[u8]) -> Option<(Vec<u8>, String)> {
    let len = u16::from_be_bytes([*hk.first()?, *hk.get(1)?]) as usize;
    let key = hk.get(2..2 + len)?.to_vec();
    let owner = String::from_utf8(hk.get(2 + len..)?.to_vec()).ok()?;
    Some((key, owner))
}

/// A stored hint: a write meant for `owner`.
#[derive(Debug, Clone)]
pub struct Hint {
    pub owner: String,
    pub key: Vec<u8>,
    pub record: Record,
}

enum Op {
    Merge {
        key: Vec<u8>,
        record: Record,
    },
    HintMerge {
        owner: String,
        key: Vec<u8>,
        record: Record,
    },
    HintRemoveIf {
        owner: String,
        key: Vec<u8>,
        expected: Record,
    },
    DropIf {
        key: Vec<u8>,
        digest: Digest,
    },
    /// Collect a tombstone: drop the record if its digest still matches
    /// and keep its context as the key's grave.
    BuryIf {
        key: Vec<u8>,
        digest: Digest,
    },
    /// Join `covered` into the key's grave and drop the siblings it covers.
    Bury {
        key: Vec<u8>,
        covered: VersionVector,
    },
    /// Remove graves that are unchanged.
    ForgetGraves {
        graves: Vec<(Vec<u8>, VersionVector)>,
    },
    Coordinate {
        node: String,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        context: VersionVector,
        written_ms: u64,
        hint_owner: Option<String>,
        /// receives the merged state as soon as it is applied, before the
        /// commit's fsync
        applied: std::sync::Mutex<Option<oneshot::Sender<(Record, Dot)>>>,
    },
}

enum OpResult {
    Merged(Record),
    Coordinated,
    Done(bool),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<OpResult, StorageError>>,
}

/// Resolves when a coordinated write is durable.
pub struct Durable(oneshot::Receiver<Result<OpResult, StorageError>>);

impl Durable {
    pub async fn wait(self) -> Result<(), StorageError> {
        match self.0.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StorageError::Closed),
        }
    }
}

/// The database and its keyspaces (cheap to clone: handles), the
/// in-memory Merkle trees and the number of stored hints.
#[derive(Clone)]
struct Db {
    db: Database,
    data: Keyspace,
    hints: Keyspace,
    /// per collected key, the version vector its tombstone covered
    graves: Keyspace,
    /// some grave exists (on disk or committed); merges skip the lookup
    /// while none does
    any_graves: Arc<std::sync::atomic::AtomicBool>,
    trees: Trees,
    /// hints on disk; reads skip the hint scan while it is zero
    hint_count: Arc<AtomicU64>,
    fsync: Fsync,
    cache: Arc<RecordCache>,
}

impl Db {
    /// The committed grave under data key `dk`.
    fn grave(&self, dk: &[u8]) -> Result<Option<VersionVector>, StorageError> {
        if !self.any_graves.load(Ordering::Acquire) {
            return Ok(None);
        }
        match self.graves.get(dk).map_err(StorageError::engine)? {
            Some(b) => Ok(Some(decode_vv(&b)?)),
            None => Ok(None),
        }
    }

    /// The committed encoded record under data key `dk`.
    fn data_bytes(&self, dk: &[u8]) -> Result<Option<Arc<[u8]>>, StorageError> {
        if let Some(v) = self.cache.get(dk) {
            return Ok(Some(v));
        }
        Ok(self.data.get(dk).map_err(StorageError::engine)?.map(|v| Arc::from(&v[..])))
    }
}

pub struct Storage {
    db: Db,
    /// the `meta` keyspace: incarnation stamp, Merkle snapshot
    meta: Keyspace,
    partitions: u32,
    incarnation: u64,
    /// the trees came from the snapshot of a clean close, not a scan
    merkle_snapshot_used: bool,
    /// `Fsync::Always`: the group-commit writer thread and its queue
    tx: Option<std_mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// `Fsync::Periodic`: writes commit on the caller's thread under this
    /// lock (it holds the last dot counter handed out)
    inline: Option<tokio::sync::Mutex<Minter>>,
    /// the background thread (memtable reaping, periodic fsync) and its
    /// stop signal
    syncer: Option<(std_mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    stats: Arc<WriterStats>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        // Closing the queue stops the writer; joining it releases its
        // database handle so the database can be reopened at once (fjall
        // stops its background threads when the last handle is dropped).
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        if let Some((stop, h)) = self.syncer.take() {
            drop(stop);
            let _ = h.join();
        }
        // Nothing writes any more: save the Merkle trees, which describe
        // every committed write, for the next opening. Then sync what the
        // syncer has not synced yet, the snapshot included.
        let snapshot = encode_trees(&self.db.trees.read().unwrap_or_else(|e| e.into_inner()));
        if let Err(e) = self.meta.insert(MERKLE_SNAPSHOT, snapshot) {
            tracing::warn!(error = %e, "cannot save the Merkle trees; the next opening rebuilds them");
        }
        if let Err(e) = self.db.db.persist(PersistMode::SyncAll) {
            tracing::warn!(error = %e, "final journal sync failed");
        }
    }
}

fn get_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    if b.len() == 8 {
        a.copy_from_slice(b);
    }
    u64::from_be_bytes(a)
}

impl Storage {
    /// Open (or create) the database in directory `path`. The data
    /// keyspace's memtable is sealed and flushed to a table once it holds
    /// `memtable_bytes` (see [`DEFAULT_MEMTABLE_BYTES`]).
    pub fn open(path: &Path, partitions: u32, fsync: Fsync, memtable_bytes: u64) -> Result<Storage, StorageError> {
        let db = Database::builder(path)
            // every fsync is ours: per group commit, or the syncer's
            .manual_journal_persist(true)
            .worker_threads(1)
            .open()
            .map_err(StorageError::engine)?;
        let ks = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default).map_err(StorageError::engine);
        let data =
            db.keyspace("data", || KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes)).map_err(StorageError::engine)?;
        let (hints, meta, graves) = (ks("hints")?, ks("meta")?, ks("graves")?);
        let any_graves = Arc::new(std::sync::atomic::AtomicBool::new(!graves.is_empty().map_err(StorageError::engine)?));
        // A new incarnation stamp, durable before any write of this
        // incarnation: strictly greater than every earlier one.
        let last = meta.get(INCARNATION).map_err(StorageError::engine)?.map(|v| get_u64(&v)).unwrap_or(0);
        let incarnation = (last + 1).max(crate::membership::now_us());
        meta.insert(INCARNATION, incarnation.to_be_bytes()).map_err(StorageError::engine)?;
        // The Merkle trees of the last clean close, if it was one; removed
        // durably before any write, so after a crash of this opening the
        // next one rebuilds the trees from the data instead.
        let snapshot = meta.get(MERKLE_SNAPSHOT).map_err(StorageError::engine)?;
        if snapshot.is_some() {
            meta.remove(MERKLE_SNAPSHOT).map_err(StorageError::engine)?;
        }
        db.persist(PersistMode::SyncAll).map_err(StorageError::engine)?;
        // fjall's flush and compaction thread(s) started with the database
        lower_priority_of_threads_named(FJALL_WORKER);
        let saved = snapshot.and_then(|b| decode_trees(&b, partitions));
        let merkle_snapshot_used = saved.is_some();
        let trees = match saved {
            Some(t) => t,
            None => build_trees(&data, partitions)?,
        };
        let hint_count = Arc::new(AtomicU64::new(hints.len().map_err(StorageError::engine)? as u64));
        let cache = Arc::new(RecordCache::with_weighter(100_000, CACHE_BYTES, RecordBytes));
        let db = Db { data, hints, graves, any_graves, trees: Arc::new(RwLock::new(trees)), hint_count, fsync, cache, db: db.clone() };
        let stats = Arc::new(WriterStats::default());
        // With an fsync per commit, a writer thread batches concurrent
        // writes behind each fsync (group commit). Without one a commit is
        // a journal append of a few microseconds, and handing it to another
        // thread (two wake-ups on a loaded machine) costs more than it.
        let (tx, writer, inline) = match fsync {
            Fsync::Always => {
                let (tx, rx) = std_mpsc::channel::<Job>();
                let (wdb, wstats) = (db.clone(), stats.clone());
                let writer = std::thread::Builder::new()
                    .name("store-writer".into())
                    .spawn(move || writer_loop(wdb, partitions, rx, wstats))
                    .map_err(|e| StorageError::Engine(e.to_string()))?;
                (Some(tx), Some(writer), None)
            }
            Fsync::Periodic(_) => (None, None, Some(tokio::sync::Mutex::new(Minter::default()))),
        };
        let sync_every = match fsync {
            Fsync::Always => None,
            Fsync::Periodic(every) => Some(every),
        };
        let (stop, stopped) = std_mpsc::channel::<()>();
        let (dir, sdb, sdata, sstats) = (path.to_path_buf(), db.db.clone(), db.data.clone(), stats.clone());
        let h = std::thread::Builder::new()
            .name("store-syncer".into())
            .spawn(move || background_loop(&dir, &sdb, &sdata, sync_every, &stopped, &sstats))
            .map_err(|e| StorageError::Engine(e.to_string()))?;
        let syncer = Some((stop, h));
        Ok(Storage { db, meta, partitions, incarnation, merkle_snapshot_used, tx, writer, inline, syncer, stats })
    }

    /// Whether this opening took its Merkle trees from the snapshot the
    /// previous one saved when it closed cleanly (else it rebuilt them with
    /// one scan of the data). The snapshot is removed, durably, when the
    /// store opens, so it is only ever used right after a clean close.
    pub fn merkle_snapshot_used(&self) -> bool {
        self.merkle_snapshot_used
    }

    /// This opening's incarnation stamp: `max(previous + 1, now_µs)`,
    /// written and fsynced at open. A node names the actor of the dots it
    /// mints after it, so dots of different incarnations never collide and
    /// the dot counter itself can live in memory.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }
    /// Group-commit counters since open.
    pub fn writer_stats(&self) -> WriterSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        WriterSnapshot {
            commits: self.stats.commits.load(Relaxed),
            writes: self.stats.writes.load(Relaxed),
            busy_us: self.stats.busy_us.load(Relaxed),
            commit_us: self.stats.commit_us.load(Relaxed),
            commit_max_us: self.stats.commit_max_us.load(Relaxed),
            slow_commits: self.stats.slow_commits.load(Relaxed),
            memtables_freed: self.stats.memtables_freed.load(Relaxed),
            syncs: self.stats.syncs.load(Relaxed),
            sync_us: self.stats.sync_us.load(Relaxed),
        }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Commit `job` here (periodic fsync) or queue it for the group-commit
    /// writer; either way its reply channel carries the outcome.
    async fn dispatch(&self, job: Job) -> Result<(), StorageError> {
        match (&self.inline, &self.tx) {
            (Some(minter), _) => {
                // An async lock: a commit waiting for another one (which
                // may be stuck behind fjall sealing its journal) yields its
                // worker thread to other requests instead of blocking it.
                let mut minter = minter.lock().await;
                run_batch(&self.db, self.partitions, vec![job], &mut minter, &self.stats);
                Ok(())
            }
            (None, Some(tx)) => tx.send(job).map_err(|_| StorageError::Closed),
            (None, None) => Err(StorageError::Closed),
        }
    }

    async fn submit(&self, op: Op) -> Result<OpResult, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.dispatch(Job { op, reply }).await?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Merge `record` into the stored record of `key`; returns the result.
    /// Resolves only after the change is fsynced.
    pub async fn merge(&self, key: &[u8], record: Record) -> Result<Record, StorageError> {
        match self.submit(Op::Merge { key: key.to_vec(), record }).await? {
            OpResult::Merged(r) => Ok(r),
            _ => Err(StorageError::Closed),
        }
    }

    /// Store (merge) a hinted write meant for `owner`.
    pub async fn hint_merge(&self, owner: &str, key: &[u8], record: Record) -> Result<(), StorageError> {
        self.submit(Op::HintMerge { owner: owner.to_string(), key: key.to_vec(), record }).await.map(|_| ())
    }

    /// Remove a hint if it still equals what was delivered.
    pub async fn hint_remove_if(&self, owner: &str, key: &[u8], expected: Record) -> Result<bool, StorageError> {
        match self.submit(Op::HintRemoveIf { owner: owner.to_string(), key: key.to_vec(), expected }).await? {
            OpResult::Done(b) => Ok(b),
            _ => Ok(false),
        }
    }

    /// Delete `key` if its current digest is `digest` (tombstone GC).
    pub async fn drop_if(&self, key: &[u8], digest: Digest) -> Result<bool, StorageError> {
        match self.submit(Op::DropIf { key: key.to_vec(), digest }).await? {
            OpResult::Done(b) => Ok(b),
            _ => Ok(false),
        }
    }

    /// Collect the tombstone of `key`: drop the record if its digest is
    /// still `digest`, and keep the version vector it covered (its
    /// context) as the key's *grave*. From then on every merge into the
    /// key drops the siblings the grave covers, so an older copy that
    /// surfaces later (a hint, a node back from a long outage) cannot bring
    /// the deleted value back. Returns whether it dropped the record.
    pub async fn bury_if(&self, key: &[u8], digest: Digest) -> Result<bool, StorageError> {
        match self.submit(Op::BuryIf { key: key.to_vec(), digest }).await? {
            OpResult::Done(b) => Ok(b),
            _ => Ok(false),
        }
    }

    /// Join `covered` into the grave of `key` (a replica that collected
    /// the key told us) and drop the stored siblings it covers. Returns
    /// whether the stored record changed.
    pub async fn bury(&self, key: &[u8], covered: VersionVector) -> Result<bool, StorageError> {
        match self.submit(Op::Bury { key: key.to_vec(), covered }).await? {
            OpResult::Done(b) => Ok(b),
            _ => Ok(false),
        }
    }

    /// The grave of `key`: what its collected tombstone covered, if any.
    pub fn grave(&self, key: &[u8]) -> Result<Option<VersionVector>, StorageError> {
        self.db.grave(&data_key(crate::ring::partition_of(key, self.partitions), key))
    }

    /// Coordinate a client write: atomically mint a fresh dot for `node`
    /// (counter: one more than the last this opening minted; `node` must
    /// be an actor of this incarnation, see [`Storage::incarnation`]), merge the new
    /// sibling into the local copy (the data table, or the hint for
    /// `hint_owner` when coordinating as a stand-in), and return the node's
    /// full local state of the key (data merged with all hints for it).
    /// Replicating that full state, not just the new sibling, keeps the
    /// invariant that whoever holds a dot `(node, c)` also holds every
    /// earlier dot of `node` for the key or a version that supersedes it,
    /// which is what lets a plain version vector serve as the context.
    ///
    /// Returns as soon as the write is applied in the current transaction,
    /// with a [`Durable`] handle that resolves once it is fsynced, so the
    /// caller can replicate while the local commit is in flight.
    pub async fn coordinate(
        &self,
        node: &str,
        key: &[u8],
        value: Option<Vec<u8>>,
        context: VersionVector,
        hint_owner: Option<&str>,
    ) -> Result<(Record, Dot, Durable), StorageError> {
        let (atx, arx) = oneshot::channel();
        let op = Op::Coordinate {
            node: node.to_string(),
            key: key.to_vec(),
            value,
            context,
            written_ms: crate::membership::now_ms(),
            hint_owner: hint_owner.map(str::to_string),
            applied: std::sync::Mutex::new(Some(atx)),
        };
        let (reply, rx) = oneshot::channel();
        self.dispatch(Job { op, reply }).await?;
        match arx.await {
            Ok((r, d)) => Ok((r, d, Durable(rx))),
            // not applied: the durable reply carries the error
            Err(_) => match rx.await {
                Ok(Err(e)) => Err(e),
                _ => Err(StorageError::Closed),
            },
        }
    }

    /// The stored record of `key` (replica data only).
    pub fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        let p = crate::ring::partition_of(key, self.partitions);
        match self.db.data_bytes(&data_key(p, key))? {
            Some(v) => Ok(Some(decode_record(&v)?)),
            None => Ok(None),
        }
    }

    /// Replica data merged with any hints held for `key`; what a replica
    /// (or a sloppy-quorum stand-in) answers to a read. One snapshot.
    pub fn get_with_hints(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        if self.db.hint_count.load(Ordering::Acquire) == 0 {
            return self.get(key);
        }
        let snap = self.db.db.snapshot();
        let p = crate::ring::partition_of(key, self.partitions);
        let mut out = match snap.get(&self.db.data, data_key(p, key)).map_err(StorageError::engine)? {
            Some(v) => Some(decode_record(&v)?),
            None => None,
        };
        for item in snap.prefix(&self.db.hints, hint_prefix(key)) {
            let (_, v) = item.into_inner().map_err(StorageError::engine)?;
            let rec = decode_record(&v)?;
            match &mut out {
                Some(o) => {
                    o.merge(&rec);
                }
                None => out = Some(rec),
            }
        }
        Ok(out)
    }

    /// The Merkle tree of partition `p`.
    pub fn merkle(&self, p: u32) -> Result<MerkleTree, StorageError> {
        let trees = self.db.trees.read().unwrap_or_else(|e| e.into_inner());
        trees.get(p as usize).cloned().ok_or_else(|| StorageError::Corrupt(format!("no partition {p}")))
    }

    /// Per-key digests of partition `p` restricted to the given leaves.
    pub fn key_digests(&self, p: u32, leaves: &[usize]) -> Result<BTreeMap<Vec<u8>, Digest>, StorageError> {
        let mut out = BTreeMap::new();
        for item in self.db.data.prefix(p.to_be_bytes()) {
            let (k, v) = item.into_inner().map_err(StorageError::engine)?;
            let (_, key) = split_data_key(&k)?;
            if leaves.contains(&bucket_of(key)) {
                out.insert(key.to_vec(), key_digest(key, &v));
            }
        }
        Ok(out)
    }

    /// Partitions of which this node stores at least one key.
    pub fn partitions_with_data(&self) -> Result<Vec<u32>, StorageError> {
        self.partitions_in(&self.db.data)
    }

    /// Partitions with at least one entry in `ks` (keyed by data key).
    fn partitions_in(&self, ks: &Keyspace) -> Result<Vec<u32>, StorageError> {
        let mut out = Vec::new();
        for p in 0..self.partitions {
            if let Some(item) = ks.prefix(p.to_be_bytes()).next() {
                item.into_inner().map_err(StorageError::engine)?;
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Every stored `(key, record)` of partition `p`.
    pub fn partition_records(&self, p: u32) -> Result<Vec<(Vec<u8>, Record)>, StorageError> {
        records(self.db.data.prefix(p.to_be_bytes()))
    }

    /// Partitions that hold at least one grave.
    pub fn partitions_with_graves(&self) -> Result<Vec<u32>, StorageError> {
        if !self.db.any_graves.load(Ordering::Acquire) {
            return Ok(Vec::new());
        }
        self.partitions_in(&self.db.graves)
    }

    /// Every `(key, grave)` of partition `p`.
    pub fn partition_graves(&self, p: u32) -> Result<Vec<(Vec<u8>, VersionVector)>, StorageError> {
        let mut out = Vec::new();
        for item in self.db.graves.prefix(p.to_be_bytes()) {
            let (k, v) = item.into_inner().map_err(StorageError::engine)?;
            out.push((split_data_key(&k)?.1.to_vec(), decode_vv(&v)?));
        }
        Ok(out)
    }

    /// Forget each of `graves` that is unchanged (its partition moved away
    /// and the new owners acknowledged them).
    pub async fn forget_graves(&self, graves: Vec<(Vec<u8>, VersionVector)>) -> Result<(), StorageError> {
        self.submit(Op::ForgetGraves { graves }).await.map(|_| ())
    }

    /// Every stored `(key, record)`; used by handoff on leave and by
    /// tombstone GC. Reads one consistent snapshot.
    pub fn scan(&self) -> Result<Vec<(Vec<u8>, Record)>, StorageError> {
        records(self.db.data.iter())
    }

    /// Number of stored keys (counts them: admin and tests only).
    pub fn len(&self) -> Result<u64, StorageError> {
        Ok(self.db.data.len().map_err(StorageError::engine)? as u64)
    }

    pub fn is_empty(&self) -> Result<bool, StorageError> {
        self.db.data.is_empty().map_err(StorageError::engine)
    }

    /// All pending hints.
    pub fn hints(&self) -> Result<Vec<Hint>, StorageError> {
        let mut out = Vec::new();
        for item in self.db.hints.iter() {
            let (k, v) = item.into_inner().map_err(StorageError::engine)?;
            let (key, owner) = split_hint_key(&k).ok_or_else(|| StorageError::Corrupt("hint key".into()))?;
            out.push(Hint { owner, key, record: decode_record(&v)? });
        }
        Ok(out)
    }

    pub fn hint_count(&self) -> Result<u64, StorageError> {
        Ok(self.db.hints.len().map_err(StorageError::engine)? as u64)
    }
}

/// Decode the `(key, record)` pairs of an iteration over the data keyspace
/// (keys without their partition prefix).
fn records(items: impl Iterator<Item = fjall::Guard>) -> Result<Vec<(Vec<u8>, Record)>, StorageError> {
    let mut out = Vec::new();
    for item in items {
        let (k, v) = item.into_inner().map_err(StorageError::engine)?;
        out.push((split_data_key(&k)?.1.to_vec(), decode_record(&v)?));
    }
    Ok(out)
}

/// The Merkle tree of every partition, from one scan of the data.
fn build_trees(data: &Keyspace, partitions: u32) -> Result<Vec<MerkleTree>, StorageError> {
    let mut trees = vec![MerkleTree::default(); partitions as usize];
    for item in data.iter() {
        let (k, v) = item.into_inner().map_err(StorageError::engine)?;
        let (p, key) = split_data_key(&k)?;
        match trees.get_mut(p as usize) {
            Some(t) => t.toggle(key, key_digest(key, &v)),
            None => return Err(StorageError::Corrupt("data key outside the partition range".into())),
        }
    }
    Ok(trees)
}

/// Counters of the commits (group commits on the writer thread, or inline
/// commits of one write each) and of the periodic fsyncs.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub commits: std::sync::atomic::AtomicU64,
    pub writes: std::sync::atomic::AtomicU64,
    /// time spent in apply + commit (fsync), microseconds
    pub busy_us: std::sync::atomic::AtomicU64,
    /// of which in the batch commit (journal append + fdatasync), microseconds
    pub commit_us: std::sync::atomic::AtomicU64,
    /// the longest batch commit, and how many took `SLOW_COMMIT_US` or more
    pub commit_max_us: std::sync::atomic::AtomicU64,
    pub slow_commits: std::sync::atomic::AtomicU64,
    /// flushed memtables the background thread freed
    pub memtables_freed: std::sync::atomic::AtomicU64,
    /// periodic fsyncs and their total time, microseconds
    pub syncs: std::sync::atomic::AtomicU64,
    pub sync_us: std::sync::atomic::AtomicU64,
}

/// Snapshot of [`WriterStats`].
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WriterSnapshot {
    pub commits: u64,
    pub writes: u64,
    pub busy_us: u64,
    pub commit_us: u64,
    pub commit_max_us: u64,
    pub slow_commits: u64,
    pub memtables_freed: u64,
    pub syncs: u64,
    pub sync_us: u64,
}

/// How often the background thread looks for flushed memtables to free.
const REAP_TICK: std::time::Duration = std::time::Duration::from_millis(20);

/// The store's background thread (both policies).
///
/// It frees flushed memtables of the data keyspace. Otherwise the last
/// reference to a flushed 64 MiB memtable is dropped by fjall while it
/// holds the tree's version lock, which every commit takes, and the tens
/// of thousands of frees behind that drop stalled commits for 15-70 ms in
/// store-bench. The thread keeps a reference to each memtable it has seen
/// active and drops it once it is the only holder left (at most
/// `REAP_TICK` after fjall let go of it), outside every engine lock.
///
/// Under `Fsync::Periodic(every)` it also fdatasyncs the active journal
/// about every `every` through a descriptor of its own. fjall's `persist`
/// would hold the journal lock for the whole fsync and stall commits
/// behind it; an fsync on another descriptor of the same file flushes the
/// same pages without that lock. The active journal is the
/// highest-numbered `<n>.jnl` in the database directory (fjall's layout);
/// when a journal is sealed fjall fsyncs it itself. If none is found, or
/// it was removed before we opened it, fall back to `persist`.
fn background_loop(
    dir: &Path,
    db: &Database,
    data: &Keyspace,
    sync_every: Option<std::time::Duration>,
    stop: &std_mpsc::Receiver<()>,
    stats: &WriterStats,
) {
    use fjall::AbstractTree;
    lower_priority(current_tid());
    let tick = sync_every.map_or(REAP_TICK, |e| e.min(REAP_TICK));
    let mut memtables = vec![data.tree.active_memtable()];
    let mut last_sync = std::time::Instant::now();
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(tick) {
        let active = data.tree.active_memtable();
        if memtables.last().map(|m| m.id()) != Some(active.id()) {
            memtables.push(active);
        }
        memtables.retain(|m| {
            let others = Arc::strong_count(m) > 1;
            if !others {
                stats.memtables_freed.fetch_add(1, Ordering::Relaxed);
            }
            others
        });
        if let Some(every) = sync_every {
            if last_sync.elapsed() >= every {
                last_sync = std::time::Instant::now();
                sync_journal(dir, db, stats);
            }
        }
    }
}

/// One periodic fdatasync of the active journal (see [`background_loop`]).
fn sync_journal(dir: &Path, db: &Database, stats: &WriterStats) {
    let started = std::time::Instant::now();
    let own_fd = active_journal(dir).map(|p| std::fs::File::open(p).and_then(|f| f.sync_data()));
    let res = match own_fd {
        Some(Ok(())) => Ok(()),
        // no journal found, or it was sealed and removed between the
        // listing and the open: let fjall sync whatever is active now
        None | Some(Err(_)) => db.persist(PersistMode::SyncData).map_err(|e| e.to_string()),
    };
    if let Err(e) = res {
        tracing::error!(error = %e, "periodic journal fsync failed");
    }
    stats.syncs.fetch_add(1, Ordering::Relaxed);
    stats.sync_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
}

/// Name fjall gives its flush/compaction threads.
const FJALL_WORKER: &str = "fjall:worker";
/// Nice value of background threads (flush, compaction, periodic fsync).
const BACKGROUND_NICE: i32 = 10;

/// Background work (memtable flushes, compactions, periodic fsyncs) runs at
/// a lower CPU priority than request handling, as RocksDB lowers its
/// compaction pool's: on a loaded machine a flush then takes longer instead
/// of preempting the threads that answer requests (in store-bench this
/// cut the operations slower than 5 ms by about a third). Best effort:
/// failures are logged and ignored.
fn lower_priority(tid: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes plain integers and touches no memory.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE) };
        if rc != 0 {
            tracing::debug!(tid, error = %std::io::Error::last_os_error(), "cannot lower thread priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = tid;
}

fn current_tid() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no arguments and cannot fail.
        unsafe { libc::gettid() }
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// Lower the priority of every thread of this process called `name`
/// (threads of other stores in the process included; that is idempotent).
fn lower_priority_of_threads_named(name: &str) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
                lower_priority(tid);
            }
        }
    }
}

fn active_journal(dir: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n: u64 = name.to_str()?.strip_suffix(".jnl")?.parse().ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

fn writer_loop(db: Db, partitions: u32, rx: std_mpsc::Receiver<Job>, stats: Arc<WriterStats>) {
    let mut minter = Minter::default();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        run_batch(&db, partitions, jobs, &mut minter, &stats);
    }
}

/// Apply and commit `jobs` as one batch and answer each.
/// Mints the dots of the writes this store coordinates.
///
/// A coordinated write is replicated as soon as it is applied to the batch,
/// before the batch commits. If the commit then fails, the replicas hold a
/// dot this node's own data lacks, and a later dot of the same actor would
/// claim (through the contexts readers build) that whoever holds it also
/// holds the lost one. So after a failed commit the store mints for a new
/// actor (`actor~k`), exactly as a restart does.
#[derive(Debug, Default)]
struct Minter {
    /// highest counter handed out, even in a batch whose commit failed
    last: u64,
    /// commits that failed so far
    failed: u64,
}

impl Minter {
    fn mint(&mut self, actor: &str) -> Dot {
        self.last += 1;
        let node = if self.failed == 0 { actor.to_string() } else { format!("{actor}~{}", self.failed) };
        Dot { node, counter: self.last }
    }

    fn commit_failed(&mut self) {
        self.failed += 1;
    }
}

fn run_batch(db: &Db, partitions: u32, jobs: Vec<Job>, minter: &mut Minter, stats: &WriterStats) {
    let ops: Vec<&Op> = jobs.iter().map(|j| &j.op).collect();
    let started = std::time::Instant::now();
    let mut commit_us = 0;
    let outcome = apply_batch(db, partitions, &ops, minter, &mut commit_us);
    stats.commit_us.fetch_add(commit_us, Ordering::Relaxed);
    stats.commit_max_us.fetch_max(commit_us, Ordering::Relaxed);
    if commit_us >= SLOW_COMMIT_US {
        stats.slow_commits.fetch_add(1, Ordering::Relaxed);
    }
    stats.commits.fetch_add(1, Ordering::Relaxed);
    stats.writes.fetch_add(ops.len() as u64, Ordering::Relaxed);
    stats.busy_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    match outcome {
        Ok(results) => {
            for (job, res) in jobs.into_iter().zip(results) {
                let _ = job.reply.send(res);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "storage batch failed");
            minter.commit_failed();
            for job in jobs {
                let _ = job.reply.send(Err(StorageError::Engine(e.to_string())));
            }
        }
    }
}

/// The writes of one batch, applied over the database: reads see the
/// batch's own earlier writes; `None` is a deletion.
struct Overlay<'a> {
    db: &'a Db,
    data: HashMap<Vec<u8>, Option<Vec<u8>>>,
    hints: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// hints this batch adds minus those it removes
    hint_delta: i64,
    /// graves written (`None`: removed)
    graves: HashMap<Vec<u8>, Option<VersionVector>>,
    /// trees of the partitions this batch touches, committed state + batch
    merkle: HashMap<u32, MerkleTree>,
}

impl<'a> Overlay<'a> {
    fn new(db: &'a Db) -> Self {
        Overlay { db, data: HashMap::new(), hints: BTreeMap::new(), hint_delta: 0, graves: HashMap::new(), merkle: HashMap::new() }
    }

    fn data_get(&self, dk: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.data.get(dk) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.db.data_bytes(dk)?.map(|v| v.to_vec())),
        }
    }

    fn grave(&self, dk: &[u8]) -> Result<Option<VersionVector>, StorageError> {
        match self.graves.get(dk) {
            Some(g) => Ok(g.clone()),
            None => self.db.grave(dk),
        }
    }

    /// Store `record` under `dk` (replacing `old`, its encoding if any;
    /// an empty record deletes), keeping the partition's tree in step.
    fn put_data(&mut self, p: u32, key: &[u8], dk: Vec<u8>, old: Option<&[u8]>, record: &Record) -> Result<(), StorageError> {
        let enc = if record.siblings.is_empty() { None } else { Some(encode_record(record)?) };
        let tree = self.tree(p)?;
        if let Some(b) = old {
            tree.toggle(key, key_digest(key, b));
        }
        if let Some(e) = &enc {
            tree.toggle(key, key_digest(key, e));
        }
        self.data.insert(dk, enc);
        Ok(())
    }

    /// Join `covered` into the grave of `key` and drop the stored siblings
    /// it covers. Returns whether the stored record changed.
    fn bury(&mut self, partitions: u32, key: &[u8], covered: &VersionVector) -> Result<bool, StorageError> {
        let p = crate::ring::partition_of(key, partitions);
        let dk = data_key(p, key);
        let mut grave = self.grave(&dk)?.unwrap_or_default();
        grave.join(covered);
        let old = self.data_get(&dk)?;
        let mut changed = false;
        if let Some(b) = &old {
            let mut rec = decode_record(b)?;
            let before = rec.siblings.len();
            rec.siblings.retain(|s| !grave.covers(&s.dot));
            if rec.siblings.len() != before {
                self.put_data(p, key, dk.clone(), Some(b), &rec)?;
                changed = true;
            }
        }
        self.graves.insert(dk, Some(grave));
        Ok(changed)
    }

    fn hint_get(&self, hk: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.hints.get(hk) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.db.hints.get(hk).map_err(StorageError::engine)?.map(|v| v.to_vec())),
        }
    }

    /// Every hint whose key starts with `prefix`, overlay applied.
    fn hints_with_prefix(&self, prefix: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, StorageError> {
        let mut out = BTreeMap::new();
        if self.hints.is_empty() && self.db.hint_count.load(Ordering::Acquire) == 0 {
            return Ok(out);
        }
        for item in self.db.hints.prefix(prefix) {
            let (k, v) = item.into_inner().map_err(StorageError::engine)?;
            out.insert(k.to_vec(), v.to_vec());
        }
        for (k, v) in self.hints.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out)
    }

    fn tree(&mut self, p: u32) -> Result<&mut MerkleTree, StorageError> {
        if !self.merkle.contains_key(&p) {
            // the writer is the trees' only writer: this is the committed tree
            let t = self.db.trees.read().unwrap_or_else(|e| e.into_inner()).get(p as usize).cloned();
            self.merkle.insert(p, t.ok_or_else(|| StorageError::Corrupt(format!("no partition {p}")))?);
        }
        Ok(self.merkle.get_mut(&p).expect("inserted above"))
    }

    fn merge_data(&mut self, partitions: u32, key: &[u8], record: &Record) -> Result<Record, StorageError> {
        let p = crate::ring::partition_of(key, partitions);
        let dk = data_key(p, key);
        // siblings a collected tombstone covered stay collected
        let buried;
        let record = match self.grave(&dk)? {
            Some(g) if record.siblings.iter().any(|s| g.covers(&s.dot)) => {
                buried = Record { siblings: record.siblings.iter().filter(|s| !g.covers(&s.dot)).cloned().collect() };
                &buried
            }
            _ => record,
        };
        let old = self.data_get(&dk)?;
        let mut cur = match &old {
            Some(b) => decode_record(b)?,
            None => Record::default(),
        };
        if (cur.merge(record) || old.is_none()) && !cur.siblings.is_empty() {
            self.put_data(p, key, dk, old.as_deref(), &cur)?;
        }
        Ok(cur)
    }

    fn merge_hint(&mut self, owner: &str, key: &[u8], record: &Record) -> Result<Record, StorageError> {
        let hk = hint_key(key, owner);
        let mut cur = match self.hint_get(&hk)? {
            Some(b) => decode_record(&b)?,
            None => {
                self.hint_delta += 1;
                Record::default()
            }
        };
        cur.merge(record);
        self.hints.insert(hk, Some(encode_record(&cur)?));
        Ok(cur)
    }

    /// Data record merged with every hint held for `key`.
    fn full_state(&self, partitions: u32, key: &[u8]) -> Result<Record, StorageError> {
        let p = crate::ring::partition_of(key, partitions);
        let mut out = match self.data_get(&data_key(p, key))? {
            Some(v) => decode_record(&v)?,
            None => Record::default(),
        };
        for v in self.hints_with_prefix(&hint_prefix(key))?.values() {
            out.merge(&decode_record(v)?);
        }
        Ok(out)
    }

    /// Write everything as one atomic batch; after the fdatasync, publish
    /// the batch's Merkle trees and hint count.
    fn commit(self) -> Result<(), StorageError> {
        let mode = match self.db.fsync {
            Fsync::Always => PersistMode::SyncData,
            // written to the OS (survives a crash of the process); the
            // syncer thread makes it durable within the interval
            Fsync::Periodic(_) => PersistMode::Buffer,
        };
        let mut b = self.db.db.batch().durability(Some(mode));
        let mut cached = Vec::with_capacity(self.data.len());
        for (k, v) in self.data {
            match v {
                Some(v) => {
                    cached.push((k.clone(), Some(Arc::<[u8]>::from(&v[..]))));
                    b.insert(&self.db.data, k, v)
                }
                None => {
                    cached.push((k.clone(), None));
                    b.remove(&self.db.data, k)
                }
            }
        }
        for (k, v) in self.hints {
            match v {
                Some(v) => b.insert(&self.db.hints, k, v),
                None => b.remove(&self.db.hints, k),
            }
        }
        let new_graves = self.graves.values().any(Option::is_some);
        for (k, g) in self.graves {
            match g {
                Some(g) => b.insert(&self.db.graves, k, encode_vv(&g)?),
                None => b.remove(&self.db.graves, k),
            }
        }
        b.commit().map_err(StorageError::engine)?;
        if new_graves {
            self.db.any_graves.store(true, Ordering::Release);
        }
        for (k, v) in cached {
            match v {
                Some(v) => self.db.cache.insert(k, v),
                None => {
                    self.db.cache.remove(&k);
                }
            }
        }
        let mut trees = self.db.trees.write().unwrap_or_else(|e| e.into_inner());
        for (p, t) in self.merkle {
            if let Some(slot) = trees.get_mut(p as usize) {
                *slot = t;
            }
        }
        let c = &self.db.hint_count;
        if self.hint_delta >= 0 {
            c.fetch_add(self.hint_delta as u64, Ordering::AcqRel);
        } else {
            c.fetch_sub(self.hint_delta.unsigned_abs(), Ordering::AcqRel);
        }
        Ok(())
    }
}

/// Apply a batch as one atomic write. Engine failures fail the whole batch.
fn apply_batch(
    db: &Db,
    partitions: u32,
    ops: &[&Op],
    minter: &mut Minter,
    commit_us: &mut u64,
) -> Result<Vec<Result<OpResult, StorageError>>, StorageError> {
    let mut w = Overlay::new(db);
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let res = match op {
            Op::Merge { key, record } => w.merge_data(partitions, key, record).map(OpResult::Merged),
            Op::HintMerge { owner, key, record } => w.merge_hint(owner, key, record).map(|_| OpResult::Done(true)),
            Op::Coordinate { node, key, value, context, written_ms, hint_owner, applied } => {
                // never reused, even when this batch fails to commit
                let dot = minter.mint(node);
                let rec =
                    Record::single(Sibling { dot: dot.clone(), context: context.clone(), value: value.clone(), written_ms: *written_ms });
                let stored = match hint_owner {
                    None => w.merge_data(partitions, key, &rec).map(|_| ()),
                    Some(o) => w.merge_hint(o, key, &rec).map(|_| ()),
                };
                let state = stored.and_then(|_| w.full_state(partitions, key));
                if let Ok(r) = &state {
                    if let Some(tx) = applied.lock().ok().and_then(|mut g| g.take()) {
                        let _ = tx.send((r.clone(), dot.clone()));
                    }
                }
                state.map(|_| OpResult::Coordinated)
            }
            Op::HintRemoveIf { owner, key, expected } => {
                let hk = hint_key(key, owner);
                let same = match w.hint_get(&hk)? {
                    Some(b) => decode_record(&b).map(|r| &r == expected).unwrap_or(false),
                    None => false,
                };
                if same {
                    w.hints.insert(hk, None);
                    w.hint_delta -= 1;
                }
                Ok(OpResult::Done(same))
            }
            Op::DropIf { key, digest } => {
                let p = crate::ring::partition_of(key, partitions);
                let dk = data_key(p, key);
                let mut dropped = false;
                if let Some(b) = w.data_get(&dk)? {
                    if key_digest(key, &b) == *digest {
                        w.put_data(p, key, dk, Some(&b), &Record::default())?;
                        dropped = true;
                    }
                }
                Ok(OpResult::Done(dropped))
            }
            Op::BuryIf { key, digest } => {
                let p = crate::ring::partition_of(key, partitions);
                let dk = data_key(p, key);
                let mut dropped = false;
                if let Some(b) = w.data_get(&dk)? {
                    if key_digest(key, &b) == *digest {
                        let covered = decode_record(&b)?.context();
                        dropped = w.bury(partitions, key, &covered)?;
                    }
                }
                Ok(OpResult::Done(dropped))
            }
            Op::Bury { key, covered } => w.bury(partitions, key, covered).map(OpResult::Done),
            Op::ForgetGraves { graves } => {
                for (key, g) in graves {
                    let dk = data_key(crate::ring::partition_of(key, partitions), key);
                    if w.grave(&dk)?.as_ref() == Some(g) {
                        w.graves.insert(dk, None);
                    }
                }
                Ok(OpResult::Done(true))
            }
        };
        results.push(res);
    }
    let commit_started = std::time::Instant::now();
    w.commit()?;
    *commit_us += commit_started.elapsed().as_micros() as u64;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Dot, Sibling, VersionVector};

    fn rec(n: &str, c: u64, v: &str) -> Record {
        Record::single(Sibling {
            dot: Dot { node: n.into(), counter: c },
            context: VersionVector::new(),
            value: Some(v.into()),
            written_ms: 1,
        })
    }

    #[tokio::test]
    async fn flushed_memtables_are_freed_by_the_background_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Storage::open(
            &dir.path().join("db"),
            16,
            Fsync::Periodic(std::time::Duration::from_millis(5)),
            crate::node::MIN_MEMTABLE_BYTES,
        )
        .expect("open");
        // Writes through 1 MiB memtables, in bursts of about 400 KiB with a
        // pause between them so that the background thread (nice 10) sees
        // memtables while they are active, until one has been flushed and
        // freed; at most 64 MiB in all.
        let value = "v".repeat(2048);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut i = 0u64;
        while s.writer_stats().memtables_freed == 0 {
            assert!(std::time::Instant::now() < deadline, "no flushed memtable freed after {i} writes");
            if i < 32 * 1024 {
                for _ in 0..200 {
                    s.merge(format!("k{i}").as_bytes(), rec("a", i + 1, &value)).await.expect("merge");
                    i += 1;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn merge_persists_and_merkle_tracks_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let p = crate::ring::partition_of(b"k1", 16);
        let all_leaves: Vec<usize> = (0..crate::merkle::LEAVES).collect();
        let rebuilt = |s: &Storage| {
            let digests = s.key_digests(p, &all_leaves).expect("digests");
            MerkleTree::from_digests(digests.iter().map(|(k, d)| (k.as_slice(), *d)))
        };
        let first;
        {
            let s = Storage::open(&path, 16, Fsync::Always, DEFAULT_MEMTABLE_BYTES).expect("open");
            first = s.incarnation();
            s.merge(b"k1", rec("a", 1, "x")).await.expect("merge");
            let r = s.merge(b"k1", rec("b", 1, "y")).await.expect("merge");
            assert_eq!(r.siblings.len(), 2);
            s.hint_merge("owner", b"k2", rec("a", 2, "z")).await.expect("hint");
            // the tree kept up to date write by write equals one built from the data
            assert_eq!(s.merkle(p).expect("merkle"), rebuilt(&s));
            assert_ne!(s.merkle(p).expect("merkle"), MerkleTree::default());
        }
        let s = Storage::open(&path, 16, Fsync::Periodic(std::time::Duration::from_millis(5)), DEFAULT_MEMTABLE_BYTES).expect("reopen");
        assert!(s.incarnation() > first, "every opening is a new incarnation");
        assert_eq!(s.get(b"k1").expect("get").map(|r| r.siblings.len()), Some(2));
        let hints = s.hints().expect("hints");
        assert_eq!(hints.len(), 1);
        assert_eq!(hints[0].owner, "owner");
        assert!(s.get(b"k2").expect("get").is_none());
        assert!(s.get_with_hints(b"k2").expect("get").is_some());
        assert_eq!(s.merkle(p).expect("merkle"), rebuilt(&s));
        // a dropped key is gone from reads (and from the record cache)
        let k1 = s.get(b"k1").expect("get").expect("k1");
        let d = crate::merkle::key_digest(b"k1", &encode_record(&k1).expect("encode"));
        assert!(!s.drop_if(b"k1", d ^ 1).await.expect("drop"), "a changed record is kept");
        assert!(s.drop_if(b"k1", d).await.expect("drop"));
        assert!(s.get(b"k1").expect("get").is_none());
        assert_eq!(s.merkle(p).expect("merkle"), MerkleTree::default());
        assert!(!s.hint_remove_if("owner", b"k2", rec("a", 9, "q")).await.expect("rm"));
        assert!(s.hint_remove_if("owner", b"k2", hints[0].record.clone()).await.expect("rm"));
        assert_eq!(s.hint_count().expect("count"), 0);
    }

    #[tokio::test]
    async fn merkle_trees_are_saved_at_a_clean_close_and_used_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let every = Fsync::Periodic(std::time::Duration::from_millis(5));
        let all = |s: &Storage| (0..16).map(|p| s.merkle(p).expect("merkle")).collect::<Vec<_>>();
        let saved;
        {
            let s = Storage::open(&path, 16, every, DEFAULT_MEMTABLE_BYTES).expect("open");
            assert!(!s.merkle_snapshot_used(), "a new store has no snapshot");
            for i in 0..40u64 {
                s.merge(format!("k{i}").as_bytes(), rec("a", i + 1, "v")).await.expect("merge");
            }
            saved = all(&s);
        }
        {
            let s = Storage::open(&path, 16, every, DEFAULT_MEMTABLE_BYTES).expect("reopen");
            assert!(s.merkle_snapshot_used(), "a clean close saves the trees");
            assert_eq!(all(&s), saved);
            assert_eq!(all(&s), build_trees(&s.db.data, 16).expect("scan"));
            assert!(
                s.meta.get(MERKLE_SNAPSHOT).expect("meta").is_none(),
                "the snapshot is gone while the store is open, so a crash now means a rebuild"
            );
            s.merge(b"late", rec("b", 1, "w")).await.expect("merge");
        }
        let s = Storage::open(&path, 16, every, DEFAULT_MEMTABLE_BYTES).expect("reopen");
        assert!(s.merkle_snapshot_used());
        assert_ne!(all(&s), saved, "the second close saved the later write too");
        assert_eq!(all(&s), build_trees(&s.db.data, 16).expect("scan"));
        drop(s);
        // a snapshot for another partition count is not used
        let s = Storage::open(&path, 32, every, DEFAULT_MEMTABLE_BYTES).expect("reopen");
        assert!(!s.merkle_snapshot_used());
    }

    #[tokio::test]
    async fn a_collected_tombstone_keeps_older_copies_from_coming_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let every = Fsync::Periodic(std::time::Duration::from_millis(5));
        let tree_ok = |s: &Storage| {
            let built = build_trees(&s.db.data, 16).expect("scan");
            (0..16u32).all(|q| s.merkle(q).expect("merkle") == built[q as usize])
        };
        // a tombstone written by b after reading a's value
        let mut ctx = VersionVector::new();
        ctx.add(&Dot { node: "a".into(), counter: 1 });
        let tomb = Record::single(Sibling { dot: Dot { node: "b".into(), counter: 1 }, context: ctx, value: None, written_ms: 1 });
        {
            let s = Storage::open(&path, 16, every, DEFAULT_MEMTABLE_BYTES).expect("open");
            assert!(s.grave(b"k").expect("grave").is_none());
            s.merge(b"k", rec("a", 1, "old")).await.expect("merge");
            let stored = s.merge(b"k", tomb.clone()).await.expect("merge");
            assert!(stored.is_tombstone());
            let d = key_digest(b"k", &encode_record(&stored).expect("encode"));
            assert!(!s.bury_if(b"k", d ^ 1).await.expect("bury"), "a changed record is not collected");
            assert!(s.bury_if(b"k", d).await.expect("bury"));
            assert!(s.get(b"k").expect("get").is_none());
            assert!(tree_ok(&s));
        }
        // the grave survives a restart, and the old value cannot come back
        let s = Storage::open(&path, 16, every, DEFAULT_MEMTABLE_BYTES).expect("reopen");
        let grave = s.grave(b"k").expect("grave").expect("a grave");
        assert!(grave.covers(&Dot { node: "a".into(), counter: 1 }) && grave.covers(&Dot { node: "b".into(), counter: 1 }));
        s.merge(b"k", rec("a", 1, "old")).await.expect("merge");
        s.merge(b"k", tomb).await.expect("merge");
        assert!(s.get(b"k").expect("get").is_none(), "a covered copy was stored again");
        assert!(tree_ok(&s));
        // a new write (a dot the grave does not cover) is stored
        s.merge(b"k", rec("c", 1, "new")).await.expect("merge");
        assert_eq!(s.get(b"k").expect("get").map(|r| r.values()), Some(vec![b"new".to_vec()]));
        // burying what another replica collected drops only covered siblings
        let mut both = rec("a", 2, "stale");
        both.merge(&rec("c", 1, "new"));
        s.merge(b"k2", both).await.expect("merge");
        let mut covered = VersionVector::new();
        covered.add(&Dot { node: "a".into(), counter: 2 });
        assert!(s.bury(b"k2", covered).await.expect("bury"));
        assert_eq!(s.get(b"k2").expect("get").map(|r| r.values()), Some(vec![b"new".to_vec()]));
        assert!(tree_ok(&s));
    }

    #[test]
    fn after_a_failed_commit_dots_belong_to_a_new_actor() {
        let mut m = Minter::default();
        assert_eq!(m.mint("a@1"), Dot { node: "a@1".into(), counter: 1 });
        m.commit_failed();
        let d = m.mint("a@1");
        assert_ne!(d.node, "a@1", "a dot minted after a lost commit must not extend the old actor");
        assert_eq!(d.counter, 2, "counters are never reused");
        m.commit_failed();
        let e = m.mint("a@1");
        assert!(e.node != "a@1" && e.node != d.node, "each failure starts another actor: {e:?}");
    }
}
