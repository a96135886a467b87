//! Durable local storage on fjall (an LSM tree with a write-ahead journal).
//!
//! Keyspaces:
//! * `data`:   `partition(u32 BE) ++ key` → bincode(`Record`)
//! * `merkle`: `partition(u32 BE)` → 64 leaf digests (written in the same
//!   atomic batch as the data, so the tree on disk always matches the data
//!   on disk)
//! * `hints`:  `keylen(u16 BE) ++ key ++ owner` → bincode(`Record`), writes
//!   held for an unreachable owner (sloppy quorum)
//! * `meta`:   the per-node dot counter (written in the same batch as the
//!   write it numbers, so it never repeats after a crash)
//!
//! fsync policy: all writes go through one writer thread that performs
//! *group commit*: it drains every queued write, applies them to an
//! in-memory overlay of the keys they touch (so later writes of the batch
//! see earlier ones), then commits one atomic fjall write batch (one journal
//! append) with `PersistMode::SyncData` (fdatasync before the batch becomes
//! visible), and only then acknowledges each write. An acknowledged write
//! is therefore in the journal on disk, a torn last batch is discarded as a
//! whole on recovery, and many concurrent writes share one fsync. Memtable
//! flushes and compactions run on fjall's background threads.

use crate::clock::{Dot, Record, Sibling, VersionVector};
use crate::error::StorageError;
use crate::merkle::{bucket_of, key_digest, Digest, MerkleTree};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Largest number of queued writes applied in one batch.
const MAX_BATCH: usize = 512;

const DOT_COUNTER: &[u8] = b"dot_counter";

pub fn encode_record(r: &Record) -> Result<Vec<u8>, StorageError> {
    bincode::serialize(r).map_err(|e| StorageError::Corrupt(e.to_string()))
}

pub fn decode_record(b: &[u8]) -> Result<Record, StorageError> {
    bincode::deserialize(b).map_err(|e| StorageError::Corrupt(e.to_string()))
}

fn data_key(partition: u32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len());
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(key);
    k
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
    Merge { key: Vec<u8>, record: Record },
    HintMerge { owner: String, key: Vec<u8>, record: Record },
    HintRemoveIf { owner: String, key: Vec<u8>, expected: Record },
    DropIf { key: Vec<u8>, digest: Digest },
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

/// The database and its keyspaces (cheap to clone: handles).
#[derive(Clone)]
struct Db {
    db: Database,
    data: Keyspace,
    merkle: Keyspace,
    hints: Keyspace,
    meta: Keyspace,
}

pub struct Storage {
    db: Db,
    partitions: u32,
    tx: Option<std_mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
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
    /// Open (or create) the database in directory `path`.
    pub fn open(path: &Path, partitions: u32) -> Result<Storage, StorageError> {
        let db = Database::builder(path)
            // the writer thread persists each batch itself
            .manual_journal_persist(true)
            .worker_threads(1)
            .open()
            .map_err(StorageError::engine)?;
        let ks = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default).map_err(StorageError::engine);
        let db = Db { data: ks("data")?, merkle: ks("merkle")?, hints: ks("hints")?, meta: ks("meta")?, db: db.clone() };
        let (tx, rx) = std_mpsc::channel::<Job>();
        let wdb = db.clone();
        let stats = Arc::new(WriterStats::default());
        let wstats = stats.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(wdb, partitions, rx, wstats))
            .map_err(|e| StorageError::Engine(e.to_string()))?;
        Ok(Storage { db, partitions, tx: Some(tx), writer: Some(writer), stats })
    }
    /// Group-commit counters since open.
    pub fn writer_stats(&self) -> WriterSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        WriterSnapshot {
            commits: self.stats.commits.load(Relaxed),
            writes: self.stats.writes.load(Relaxed),
            busy_us: self.stats.busy_us.load(Relaxed),
            commit_us: self.stats.commit_us.load(Relaxed),
        }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    async fn submit(&self, op: Op) -> Result<OpResult, StorageError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(StorageError::Closed)?;
        tx.send(Job { op, reply }).map_err(|_| StorageError::Closed)?;
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

    /// Coordinate a client write: atomically mint a fresh dot for `node`
    /// (from a durable per-node counter that only grows), merge the new
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
        let tx = self.tx.as_ref().ok_or(StorageError::Closed)?;
        tx.send(Job { op, reply }).map_err(|_| StorageError::Closed)?;
        match arx.await {
            Ok((r, d)) => Ok((r, d, Durable(rx))),
            // not applied: the durable reply carries the error
            Err(_) => match rx.await {
                Ok(Err(e)) => Err(e),
                _ => Err(StorageError::Closed),
            },
        }
    }

    /// A counter from the `meta` keyspace (e.g. `dot_counter`).
    pub fn get_meta(&self, name: &str) -> Result<Option<u64>, StorageError> {
        Ok(self.db.meta.get(name.as_bytes()).map_err(StorageError::engine)?.map(|v| get_u64(&v)))
    }

    /// The stored record of `key` (replica data only).
    pub fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        let p = crate::ring::partition_of(key, self.partitions);
        match self.db.data.get(data_key(p, key)).map_err(StorageError::engine)? {
            Some(v) => Ok(Some(decode_record(&v)?)),
            None => Ok(None),
        }
    }

    /// Replica data merged with any hints held for `key`; what a replica
    /// (or a sloppy-quorum stand-in) answers to a read. One snapshot.
    pub fn get_with_hints(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
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
        match self.db.merkle.get(p.to_be_bytes()).map_err(StorageError::engine)? {
            Some(v) => MerkleTree::decode(&v).ok_or_else(|| StorageError::Corrupt(format!("merkle {p}"))),
            None => Ok(MerkleTree::default()),
        }
    }

    /// Per-key digests of partition `p` restricted to the given leaves.
    pub fn key_digests(&self, p: u32, leaves: &[usize]) -> Result<BTreeMap<Vec<u8>, Digest>, StorageError> {
        let mut out = BTreeMap::new();
        for item in self.db.data.prefix(p.to_be_bytes()) {
            let (k, v) = item.into_inner().map_err(StorageError::engine)?;
            let key = &k[4..];
            if leaves.contains(&bucket_of(key)) {
                out.insert(key.to_vec(), key_digest(key, &v));
            }
        }
        Ok(out)
    }

    /// Every stored `(key, record)`; used by handoff on leave and by
    /// tombstone GC. Reads one consistent snapshot.
    pub fn scan(&self) -> Result<Vec<(Vec<u8>, Record)>, StorageError> {
        let mut out = Vec::new();
        for item in self.db.data.iter() {
            let (k, v) = item.into_inner().map_err(StorageError::engine)?;
            out.push((k[4..].to_vec(), decode_record(&v)?));
        }
        Ok(out)
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

/// Counters of the group-commit writer.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub commits: std::sync::atomic::AtomicU64,
    pub writes: std::sync::atomic::AtomicU64,
    /// time spent in apply + commit (fsync), microseconds
    pub busy_us: std::sync::atomic::AtomicU64,
    /// of which in the batch commit (journal append + fdatasync), microseconds
    pub commit_us: std::sync::atomic::AtomicU64,
}

/// Snapshot of [`WriterStats`].
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WriterSnapshot {
    pub commits: u64,
    pub writes: u64,
    pub busy_us: u64,
    pub commit_us: u64,
}

fn writer_loop(db: Db, partitions: u32, rx: std_mpsc::Receiver<Job>, stats: Arc<WriterStats>) {
    // highest dot counter handed out, even in a batch whose commit failed
    let mut last_dot = 0u64;
    // Merkle trees as committed (the writer is their only writer), so a
    // write does not read its partition's tree back from the LSM tree
    let mut trees: HashMap<u32, MerkleTree> = HashMap::new();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let ops: Vec<&Op> = jobs.iter().map(|j| &j.op).collect();
        let started = std::time::Instant::now();
        let mut commit_us = 0;
        let outcome = apply_batch(&db, partitions, &ops, &mut last_dot, &mut trees, &mut commit_us);
        stats.commit_us.fetch_add(commit_us, std::sync::atomic::Ordering::Relaxed);
        stats.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        stats.writes.fetch_add(ops.len() as u64, std::sync::atomic::Ordering::Relaxed);
        stats.busy_us.fetch_add(started.elapsed().as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
        match outcome {
            Ok(results) => {
                for (job, res) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(res);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "storage batch failed");
                for job in jobs {
                    let _ = job.reply.send(Err(StorageError::Engine(e.to_string())));
                }
            }
        }
    }
}

/// The writes of one batch, applied over the database: reads see the
/// batch's own earlier writes; `None` is a deletion.
struct Overlay<'a> {
    db: &'a Db,
    /// committed Merkle trees cached by the writer
    trees: &'a HashMap<u32, MerkleTree>,
    data: HashMap<Vec<u8>, Option<Vec<u8>>>,
    hints: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    merkle: HashMap<u32, MerkleTree>,
    dot_counter: Option<u64>,
}

impl<'a> Overlay<'a> {
    fn new(db: &'a Db, trees: &'a HashMap<u32, MerkleTree>) -> Self {
        Overlay { db, trees, data: HashMap::new(), hints: BTreeMap::new(), merkle: HashMap::new(), dot_counter: None }
    }

    fn data_get(&self, dk: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.data.get(dk) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.db.data.get(dk).map_err(StorageError::engine)?.map(|v| v.to_vec())),
        }
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
            let t = match self.trees.get(&p) {
                Some(t) => t.clone(),
                None => match self.db.merkle.get(p.to_be_bytes()).map_err(StorageError::engine)? {
                    Some(v) => MerkleTree::decode(&v).unwrap_or_default(),
                    None => MerkleTree::default(),
                },
            };
            self.merkle.insert(p, t);
        }
        Ok(self.merkle.get_mut(&p).expect("inserted above"))
    }

    fn last_dot(&mut self) -> Result<u64, StorageError> {
        if let Some(c) = self.dot_counter {
            return Ok(c);
        }
        let c = self.db.meta.get(DOT_COUNTER).map_err(StorageError::engine)?.map(|v| get_u64(&v)).unwrap_or(0);
        self.dot_counter = Some(c);
        Ok(c)
    }

    fn merge_data(&mut self, partitions: u32, key: &[u8], record: &Record) -> Result<Record, StorageError> {
        let p = crate::ring::partition_of(key, partitions);
        let dk = data_key(p, key);
        let old = self.data_get(&dk)?;
        let mut cur = match &old {
            Some(b) => decode_record(b)?,
            None => Record::default(),
        };
        if cur.merge(record) || old.is_none() {
            let enc = encode_record(&cur)?;
            let tree = self.tree(p)?;
            if let Some(b) = &old {
                tree.toggle(key, key_digest(key, b));
            }
            tree.toggle(key, key_digest(key, &enc));
            self.data.insert(dk, Some(enc));
        }
        Ok(cur)
    }

    fn merge_hint(&mut self, owner: &str, key: &[u8], record: &Record) -> Result<Record, StorageError> {
        let hk = hint_key(key, owner);
        let mut cur = match self.hint_get(&hk)? {
            Some(b) => decode_record(&b)?,
            None => Record::default(),
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

    /// Write everything as one atomic batch; returns after fdatasync with
    /// the Merkle trees it wrote.
    fn commit(self) -> Result<HashMap<u32, MerkleTree>, StorageError> {
        let mut b = self.db.db.batch().durability(Some(PersistMode::SyncData));
        for (k, v) in self.data {
            match v {
                Some(v) => b.insert(&self.db.data, k, v),
                None => b.remove(&self.db.data, k),
            }
        }
        for (k, v) in self.hints {
            match v {
                Some(v) => b.insert(&self.db.hints, k, v),
                None => b.remove(&self.db.hints, k),
            }
        }
        for (p, t) in &self.merkle {
            b.insert(&self.db.merkle, p.to_be_bytes(), t.encode());
        }
        if let Some(c) = self.dot_counter {
            b.insert(&self.db.meta, DOT_COUNTER, c.to_be_bytes());
        }
        b.commit().map_err(StorageError::engine)?;
        Ok(self.merkle)
    }
}

/// Apply a batch as one atomic write. Engine failures fail the whole batch.
fn apply_batch(
    db: &Db,
    partitions: u32,
    ops: &[&Op],
    last_dot: &mut u64,
    trees: &mut HashMap<u32, MerkleTree>,
    commit_us: &mut u64,
) -> Result<Vec<Result<OpResult, StorageError>>, StorageError> {
    let mut w = Overlay::new(db, trees);
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let res = match op {
            Op::Merge { key, record } => w.merge_data(partitions, key, record).map(OpResult::Merged),
            Op::HintMerge { owner, key, record } => w.merge_hint(owner, key, record).map(|_| OpResult::Done(true)),
            Op::Coordinate { node, key, value, context, written_ms, hint_owner, applied } => {
                let last = w.last_dot()?;
                let counter = (last.max(*last_dot) + 1).max(written_ms.saturating_mul(1000));
                *last_dot = counter;
                w.dot_counter = Some(counter);
                let dot = Dot { node: node.clone(), counter };
                let rec = Record::single(Sibling {
                    dot: dot.clone(),
                    context: context.clone(),
                    value: value.clone(),
                    written_ms: *written_ms,
                });
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
                }
                Ok(OpResult::Done(same))
            }
            Op::DropIf { key, digest } => {
                let p = crate::ring::partition_of(key, partitions);
                let dk = data_key(p, key);
                let mut dropped = false;
                if let Some(b) = w.data_get(&dk)? {
                    let d = key_digest(key, &b);
                    if d == *digest {
                        w.data.insert(dk, None);
                        w.tree(p)?.toggle(key, d);
                        dropped = true;
                    }
                }
                Ok(OpResult::Done(dropped))
            }
        };
        results.push(res);
    }
    let commit_started = std::time::Instant::now();
    let written = w.commit()?;
    // only committed trees enter the cache
    trees.extend(written);
    *commit_us += commit_started.elapsed().as_micros() as u64;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Dot, Sibling, VersionVector};

    fn rec(n: &str, c: u64, v: &str) -> Record {
        Record::single(Sibling { dot: Dot { node: n.into(), counter: c }, context: VersionVector::new(), value: Some(v.into()), written_ms: 1 })
    }

    #[tokio::test]
    async fn merge_persists_and_merkle_tracks_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let p;
        {
            let s = Storage::open(&path, 16).expect("open");
            s.merge(b"k1", rec("a", 1, "x")).await.expect("merge");
            let r = s.merge(b"k1", rec("b", 1, "y")).await.expect("merge");
            assert_eq!(r.siblings.len(), 2);
            s.hint_merge("owner", b"k2", rec("a", 2, "z")).await.expect("hint");
            p = crate::ring::partition_of(b"k1", 16);
        }
        let s = Storage::open(&path, 16).expect("reopen");
        assert_eq!(s.get(b"k1").expect("get").map(|r| r.siblings.len()), Some(2));
        let hints = s.hints().expect("hints");
        assert_eq!(hints.len(), 1);
        assert_eq!(hints[0].owner, "owner");
        assert!(s.get(b"k2").expect("get").is_none());
        assert!(s.get_with_hints(b"k2").expect("get").is_some());
        // stored tree equals a tree rebuilt from the data
        let digests = s.key_digests(p, &(0..crate::merkle::LEAVES).collect::<Vec<_>>()).expect("digests");
        let rebuilt = MerkleTree::from_digests(digests.iter().map(|(k, d)| (k.as_slice(), *d)));
        assert_eq!(s.merkle(p).expect("merkle"), rebuilt);
        assert!(!s.hint_remove_if("owner", b"k2", rec("a", 9, "q")).await.expect("rm"));
        assert!(s.hint_remove_if("owner", b"k2", hints[0].record.clone()).await.expect("rm"));
        assert_eq!(s.hint_count().expect("count"), 0);
    }
}
