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
//! `background`).
//!
//! The module is split by job:
//! * `keys`: how keys, records and version vectors are encoded on disk;
//! * `snapshot`: the in-memory Merkle trees' snapshot (saved at a clean
//!   close) and their rebuild from the data;
//! * `writer`: the writes as operations, the batch overlay, commits
//!   (inline or on the group-commit writer thread) and dot minting;
//! * `background`: the background thread (memtable reaper, periodic
//!   fdatasync of the journal);
//! * `niceness`: background threads at a lower CPU priority (through
//!   `/proc/self/task`).

mod background;
mod keys;
mod niceness;
mod snapshot;
#[cfg(test)]
mod tests;
mod writer;

pub use keys::{decode_record, encode_record};
pub use writer::{Durable, SLOW_COMMIT_US};

use crate::clock::{Dot, Record, VersionVector};
use crate::error::StorageError;
use crate::merkle::{bucket_of, key_digest, Digest, MerkleTree};
use background::background_loop;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use keys::{data_key, decode_vv, get_u64, hint_prefix, split_data_key, split_hint_key};
use niceness::{lower_priority_of_threads_named, FJALL_WORKER};
use snapshot::{build_trees, decode_trees, encode_trees, MERKLE_SNAPSHOT};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, RwLock};
use tokio::sync::oneshot;
use writer::{run_batch, writer_loop};
use writer::{Job, Minter, Op, OpResult};

const INCARNATION: &[u8] = b"incarnation";

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

/// A stored hint: a write meant for `owner`.
#[derive(Debug, Clone)]
pub struct Hint {
    pub owner: String,
    pub key: Vec<u8>,
    pub record: Record,
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
