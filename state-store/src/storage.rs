//! Durable local storage on redb.
//!
//! Tables:
//! * `data`:   `partition(u32 BE) ++ key` → bincode(`Record`)
//! * `merkle`: partition → 64 leaf digests (updated in the same transaction
//!   as the data, so the tree on disk always matches the data on disk)
//! * `hints`:  `keylen(u16 BE) ++ key ++ owner` → bincode(`Record`), writes
//!   held for an unreachable owner (sloppy quorum)
//! * `meta`:   the per-node dot counter (updated in the same transaction as
//!   the write it numbers, so it never repeats after a crash)
//!
//! fsync policy: all writes go through one writer thread that performs
//! *group commit*: it drains every queued write, applies them in one redb
//! transaction with `Durability::Immediate` (fsync on commit), and only
//! then acknowledges each of them. An acknowledged write is therefore on
//! disk, and many concurrent writes share one fsync.

use crate::clock::{Dot, Record, Sibling, VersionVector};
use crate::error::StorageError;
use crate::merkle::{bucket_of, key_digest, Digest, MerkleTree};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use tokio::sync::oneshot;

const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data");
const MERKLE: TableDefinition<u32, &[u8]> = TableDefinition::new("merkle");
const HINTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("hints");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Largest number of queued writes applied in one transaction.
const MAX_BATCH: usize = 512;

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

pub struct Storage {
    db: Arc<Database>,
    partitions: u32,
    tx: Option<std_mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    stats: Arc<WriterStats>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        // Closing the queue stops the writer; joining it releases its
        // database handle so the file can be reopened at once.
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

impl Storage {
    /// Open (or create) the database at `path`.
    pub fn open(path: &Path, partitions: u32) -> Result<Storage, StorageError> {
        let db = Database::create(path).map_err(StorageError::engine)?;
        {
            let w = db.begin_write().map_err(StorageError::engine)?;
            w.open_table(DATA).map_err(StorageError::engine)?;
            w.open_table(MERKLE).map_err(StorageError::engine)?;
            w.open_table(HINTS).map_err(StorageError::engine)?;
            w.open_table(META).map_err(StorageError::engine)?;
            w.commit().map_err(StorageError::engine)?;
        }
        let db = Arc::new(db);
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

    /// A counter from the `meta` table (e.g. `dot_counter`).
    pub fn get_meta(&self, name: &str) -> Result<Option<u64>, StorageError> {
        let r = self.db.begin_read().map_err(StorageError::engine)?;
        let t = r.open_table(META).map_err(StorageError::engine)?;
        Ok(t.get(name).map_err(StorageError::engine)?.map(|v| v.value()))
    }

    /// The stored record of `key` (replica data only).
    pub fn get(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        let p = crate::ring::partition_of(key, self.partitions);
        let r = self.db.begin_read().map_err(StorageError::engine)?;
        let t = r.open_table(DATA).map_err(StorageError::engine)?;
        match t.get(data_key(p, key).as_slice()).map_err(StorageError::engine)? {
            Some(v) => Ok(Some(decode_record(v.value())?)),
            None => Ok(None),
        }
    }

    /// Replica data merged with any hints held for `key`; what a replica
    /// (or a sloppy-quorum stand-in) answers to a read.
    pub fn get_with_hints(&self, key: &[u8]) -> Result<Option<Record>, StorageError> {
        let mut out = self.get(key)?;
        let r = self.db.begin_read().map_err(StorageError::engine)?;
        let t = r.open_table(HINTS).map_err(StorageError::engine)?;
        let prefix = hint_prefix(key);
        for item in t.range(prefix.as_slice()..).map_err(StorageError::engine)? {
            let (k, v) = item.map_err(StorageError::engine)?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            let rec = decode_record(v.value())?;
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
        let r = self.db.begin_read().map_err(StorageError::engine)?;
        let t = r.open_table(MERKLE).map_err(StorageError::engine)?;
        match t.get(p).map_err(StorageError::engine)? {
            Some(v) => MerkleTree::decode(v.value()).ok_or_else(|| StorageError::Corrupt(format!("merkle {p}"))),
            None => Ok(MerkleTree::default()),
        }
    }

    /// Per-key digests of partition `p` restricted to the given leaves.
    pub fn key_digests(&self, p: u32, leaves: &[usize]) -> Result<BTreeMap<Vec<u8>, Digest>, StorageError> {
        let r = self.db.begin_read().map_err(StorageError::engine)?;
        let t = r.open_table(DATA).map_err(StorageError::engine)?;
        let lo = p.to_be_bytes();
        let mut out = BTreeMap::new();
        for item in t.range(lo.as_slice()..).map_err(StorageError::engine)? {
            let (k, v) = item.map_err(StorageError::engine)?;
            let k = k.value();
            if k.get(..4) != Some(lo.as_slice()) {
                break;
            }
            let key = &k[4..];
            if leaves.contains(&bucket_of(key)) {
                out.insert(key.to_vec(), key_digest(key, v.value()));
            }
        }
        Ok(out)
    }

    /// Every stored `(key, record)`; used by handoff on leave and by
    /// tombstone GC. Reads one consistent snapshot.
    pub fn scan(&self) -> Result<Vec<(Vec<u8>, Record)>, StorageError> {
        let r = self.db.begin_read().map_err(StorageError::engine)?;
        let t = r.open_table(DATA).map_err(StorageError::engine)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(StorageError::engine)? {
            let (k, v) = item.map_err(StorageError::engine)?;
            out.push((k.value()[4..].to_vec(), decode_record(v.value())?));
        }
        Ok(out)
    }

    /// Number of stored keys.
    pub fn len(&self) -> Result<u64, StorageError> {
        let r = self.db.begin_read().map_err(StorageError::engine)?;
        let t = r.open_table(DATA).map_err(StorageError::engine)?;
        t.len().map_err(StorageError::engine)
    }

    pub fn is_empty(&self) -> Result<bool, StorageError> {
        Ok(self.len()? == 0)
    }

    /// All pending hints.
    pub fn hints(&self) -> Result<Vec<Hint>, StorageError> {
        let r = self.db.begin_read().map_err(StorageError::engine)?;
        let t = r.open_table(HINTS).map_err(StorageError::engine)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(StorageError::engine)? {
            let (k, v) = item.map_err(StorageError::engine)?;
            let (key, owner) = split_hint_key(k.value()).ok_or_else(|| StorageError::Corrupt("hint key".into()))?;
            out.push(Hint { owner, key, record: decode_record(v.value())? });
        }
        Ok(out)
    }

    pub fn hint_count(&self) -> Result<u64, StorageError> {
        let r = self.db.begin_read().map_err(StorageError::engine)?;
        let t = r.open_table(HINTS).map_err(StorageError::engine)?;
        t.len().map_err(StorageError::engine)
    }
}

/// Counters of the group-commit writer.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub commits: std::sync::atomic::AtomicU64,
    pub writes: std::sync::atomic::AtomicU64,
    /// time spent in apply + commit (fsync), microseconds
    pub busy_us: std::sync::atomic::AtomicU64,
    /// of which in commit (page writes + fsync), microseconds
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

fn writer_loop(db: Arc<Database>, partitions: u32, rx: std_mpsc::Receiver<Job>, stats: Arc<WriterStats>) {
    // highest dot counter handed out, even in a batch whose commit failed
    let mut last_dot = 0u64;
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
        let outcome = apply_batch(&db, partitions, &ops, &mut last_dot, &mut commit_us);
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

type BytesTable<'t> = redb::Table<'t, &'static [u8], &'static [u8]>;

fn merge_data(
    data: &mut BytesTable<'_>,
    merkle: &mut redb::Table<'_, u32, &'static [u8]>,
    partitions: u32,
    key: &[u8],
    record: &Record,
) -> Result<Record, StorageError> {
    let p = crate::ring::partition_of(key, partitions);
    let dk = data_key(p, key);
    let old = data.get(dk.as_slice()).map_err(StorageError::engine)?.map(|v| v.value().to_vec());
    let mut cur = match &old {
        Some(b) => decode_record(b)?,
        None => Record::default(),
    };
    if cur.merge(record) || old.is_none() {
        let enc = encode_record(&cur)?;
        data.insert(dk.as_slice(), enc.as_slice()).map_err(StorageError::engine)?;
        let mut tree = match merkle.get(p).map_err(StorageError::engine)? {
            Some(v) => MerkleTree::decode(v.value()).unwrap_or_default(),
            None => MerkleTree::default(),
        };
        if let Some(b) = &old {
            tree.toggle(key, key_digest(key, b));
        }
        tree.toggle(key, key_digest(key, &enc));
        merkle.insert(p, tree.encode().as_slice()).map_err(StorageError::engine)?;
    }
    Ok(cur)
}

fn merge_hint(hints: &mut BytesTable<'_>, owner: &str, key: &[u8], record: &Record) -> Result<Record, StorageError> {
    let hk = hint_key(key, owner);
    let old = hints.get(hk.as_slice()).map_err(StorageError::engine)?.map(|v| v.value().to_vec());
    let mut cur = match &old {
        Some(b) => decode_record(b)?,
        None => Record::default(),
    };
    cur.merge(record);
    hints.insert(hk.as_slice(), encode_record(&cur)?.as_slice()).map_err(StorageError::engine)?;
    Ok(cur)
}

/// Data record merged with every hint held for `key`.
fn full_state(data: &BytesTable<'_>, hints: &BytesTable<'_>, partitions: u32, key: &[u8]) -> Result<Record, StorageError> {
    let p = crate::ring::partition_of(key, partitions);
    let mut out = match data.get(data_key(p, key).as_slice()).map_err(StorageError::engine)? {
        Some(v) => decode_record(v.value())?,
        None => Record::default(),
    };
    let prefix = hint_prefix(key);
    for item in hints.range(prefix.as_slice()..).map_err(StorageError::engine)? {
        let (k, v) = item.map_err(StorageError::engine)?;
        if !k.value().starts_with(&prefix) {
            break;
        }
        out.merge(&decode_record(v.value())?);
    }
    Ok(out)
}

/// Apply a batch in one transaction. Engine failures fail the whole batch.
fn apply_batch(
    db: &Database,
    partitions: u32,
    ops: &[&Op],
    last_dot: &mut u64,
    commit_us: &mut u64,
) -> Result<Vec<Result<OpResult, StorageError>>, StorageError> {
    let mut w = db.begin_write().map_err(StorageError::engine)?;
    w.set_durability(Durability::Immediate);
    let mut results = Vec::with_capacity(ops.len());
    {
        let mut data = w.open_table(DATA).map_err(StorageError::engine)?;
        let mut merkle = w.open_table(MERKLE).map_err(StorageError::engine)?;
        let mut hints = w.open_table(HINTS).map_err(StorageError::engine)?;
        let mut meta = w.open_table(META).map_err(StorageError::engine)?;
        for op in ops {
            let res = match op {
                Op::Merge { key, record } => merge_data(&mut data, &mut merkle, partitions, key, record).map(OpResult::Merged),
                Op::HintMerge { owner, key, record } => merge_hint(&mut hints, owner, key, record).map(|_| OpResult::Done(true)),
                Op::Coordinate { node, key, value, context, written_ms, hint_owner, applied } => {
                    let last = meta.get("dot_counter").map_err(StorageError::engine)?.map(|v| v.value()).unwrap_or(0);
                    let counter = (last.max(*last_dot) + 1).max(written_ms.saturating_mul(1000));
                    *last_dot = counter;
                    meta.insert("dot_counter", counter).map_err(StorageError::engine)?;
                    let dot = Dot { node: node.clone(), counter };
                    let rec = Record::single(Sibling {
                        dot: dot.clone(),
                        context: context.clone(),
                        value: value.clone(),
                        written_ms: *written_ms,
                    });
                    let stored = match hint_owner {
                        None => merge_data(&mut data, &mut merkle, partitions, key, &rec).map(|_| ()),
                        Some(o) => merge_hint(&mut hints, o, key, &rec).map(|_| ()),
                    };
                    let state = stored.and_then(|_| full_state(&data, &hints, partitions, key));
                    if let Ok(r) = &state {
                        if let Some(tx) = applied.lock().ok().and_then(|mut g| g.take()) {
                            let _ = tx.send((r.clone(), dot.clone()));
                        }
                    }
                    state.map(|_| OpResult::Coordinated)
                }
                Op::HintRemoveIf { owner, key, expected } => {
                    let hk = hint_key(key, owner);
                    let old = hints.get(hk.as_slice()).map_err(StorageError::engine)?.map(|v| v.value().to_vec());
                    let same = match &old {
                        Some(b) => decode_record(b).map(|r| &r == expected).unwrap_or(false),
                        None => false,
                    };
                    if same {
                        hints.remove(hk.as_slice()).map_err(StorageError::engine)?;
                    }
                    Ok(OpResult::Done(same))
                }
                Op::DropIf { key, digest } => {
                    let p = crate::ring::partition_of(key, partitions);
                    let dk = data_key(p, key);
                    let old = data.get(dk.as_slice()).map_err(StorageError::engine)?.map(|v| v.value().to_vec());
                    let mut dropped = false;
                    if let Some(b) = old {
                        let d = key_digest(key, &b);
                        if d == *digest {
                            data.remove(dk.as_slice()).map_err(StorageError::engine)?;
                            let mut tree = match merkle.get(p).map_err(StorageError::engine)? {
                                Some(v) => MerkleTree::decode(v.value()).unwrap_or_default(),
                                None => MerkleTree::default(),
                            };
                            tree.toggle(key, d);
                            merkle.insert(p, tree.encode().as_slice()).map_err(StorageError::engine)?;
                            dropped = true;
                        }
                    }
                    Ok(OpResult::Done(dropped))
                }
            };
            results.push(res);
        }
    }
    let commit_started = std::time::Instant::now();
    w.commit().map_err(StorageError::engine)?;
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
