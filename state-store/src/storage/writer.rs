//! Writes: the operations a store applies, the overlay a batch of them is
//! applied to (reads see the batch's earlier writes, Merkle trees kept in
//! step), its commit as one atomic fjall batch, the group-commit writer
//! thread (`Fsync::Always`) and the minting of dots.

use super::keys::{data_key, decode_record, encode_record, encode_vv, hint_key, hint_prefix};
use super::{Db, Fsync, WriterStats};
use crate::clock::{Dot, Record, Sibling, VersionVector};
use crate::error::StorageError;
use crate::merkle::{key_digest, Digest, MerkleTree};
use fjall::PersistMode;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Largest number of queued writes applied in one batch.
const MAX_BATCH: usize = 512;
/// A commit (a journal append) normally takes about 10 µs; one of 2 ms or
/// more waited for the engine and is counted in [`WriterStats`].
pub const SLOW_COMMIT_US: u64 = 2_000;

pub(super) enum Op {
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

pub(super) enum OpResult {
    Merged(Record),
    Coordinated,
    Done(bool),
}

pub(super) struct Job {
    pub(super) op: Op,
    pub(super) reply: oneshot::Sender<Result<OpResult, StorageError>>,
}

/// Resolves when a coordinated write is durable.
pub struct Durable(pub(super) oneshot::Receiver<Result<OpResult, StorageError>>);

impl Durable {
    pub async fn wait(self) -> Result<(), StorageError> {
        match self.0.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StorageError::Closed),
        }
    }
}

pub(super) fn writer_loop(db: Db, partitions: u32, rx: std_mpsc::Receiver<Job>, stats: Arc<WriterStats>) {
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
pub(super) struct Minter {
    /// highest counter handed out, even in a batch whose commit failed
    last: u64,
    /// commits that failed so far
    failed: u64,
}

impl Minter {
    pub(super) fn mint(&mut self, actor: &str) -> Dot {
        self.last += 1;
        let node = if self.failed == 0 { actor.to_string() } else { format!("{actor}~{}", self.failed) };
        Dot { node, counter: self.last }
    }

    pub(super) fn commit_failed(&mut self) {
        self.failed += 1;
    }
}

pub(super) fn run_batch(db: &Db, partitions: u32, jobs: Vec<Job>, minter: &mut Minter, stats: &WriterStats) {
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
