//! Anti-entropy with Merkle trees, and tombstone garbage collection.
//!
//! For every partition it replicates, a node compares its tree with each
//! other replica's: equal roots end the exchange; otherwise it descends to
//! the differing leaves, fetches the per-key digests of those leaves only,
//! and for the differing keys pulls the peer's records and pushes back the
//! merged result. Merging is deterministic, so afterwards both replicas
//! hold identical records and identical roots. Keys of partitions the node
//! no longer replicates (after a ring change) are handed to their owners
//! and then dropped.

use crate::merkle::{diff_keys, MerkleTree};
use crate::node::Node;
use crate::rpc::{Request, Response};
use crate::storage::encode_record;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Keys per `PutMany` when handing off a partition.
const HANDOFF_BATCH: usize = 256;

/// What one anti-entropy round did (`POST /admin/anti-entropy` answers it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AntiEntropyReport {
    /// Number of the round on this node since it started (1, 2, ...).
    pub round: u64,
    /// Partitions this node replicates, all compared.
    pub partitions: usize,
    /// Partition exchanges with live replicas, and how many failed (their
    /// keys wait for a later round).
    pub exchanges: usize,
    pub failed_exchanges: usize,
    /// Keys that differed between this node and a replica and were
    /// exchanged (pulled, merged and pushed back).
    pub keys_repaired: usize,
    /// Keys and graves of partitions this node no longer replicates,
    /// handed to their owners and dropped here.
    pub keys_handed_off: usize,
    pub duration_ms: u64,
}

/// Serialises rounds and publishes each one's report.
pub(crate) struct AntiEntropyState {
    running: tokio::sync::Mutex<u64>,
    done: tokio::sync::watch::Sender<AntiEntropyReport>,
}

impl Default for AntiEntropyState {
    fn default() -> Self {
        AntiEntropyState { running: tokio::sync::Mutex::new(0), done: tokio::sync::watch::channel(AntiEntropyReport::default()).0 }
    }
}

impl Node {
    /// One anti-entropy pass over all partitions this node replicates.
    /// Returns the number of keys exchanged or handed off (see
    /// [`Node::run_anti_entropy`] for the full report).
    pub async fn anti_entropy_round(self: &Arc<Self>) -> usize {
        let r = self.run_anti_entropy().await;
        r.keys_repaired + r.keys_handed_off
    }

    /// Run one full anti-entropy round now and return what it did. Rounds
    /// never overlap: if one is running (the periodic loop's or another
    /// caller's) this waits for it to end and then runs a fresh one, so
    /// the report covers every write acknowledged before the call.
    pub async fn run_anti_entropy(self: &Arc<Self>) -> AntiEntropyReport {
        let mut count = self.anti_entropy.running.lock().await;
        let start = std::time::Instant::now();
        *count += 1;
        let mut report = AntiEntropyReport { round: *count, ..Default::default() };
        let ring = self.membership.ring();
        let partitions = ring.replicated_partitions(&self.cfg.id, self.cfg.n);
        report.partitions = partitions.len();
        for p in partitions {
            for peer in ring.preference_list(p, self.cfg.n) {
                if peer == self.cfg.id || !self.membership.is_alive(&peer) {
                    continue;
                }
                report.exchanges += 1;
                match self.sync_partition(p, &peer).await {
                    Ok(n) => report.keys_repaired += n,
                    Err(e) => {
                        report.failed_exchanges += 1;
                        tracing::debug!(partition = p, %peer, error = %e, "anti-entropy exchange failed")
                    }
                }
            }
        }
        if report.keys_repaired > 0 {
            tracing::info!(exchanged = report.keys_repaired, "anti-entropy repaired keys");
        }
        report.keys_handed_off = self.hand_off_foreign_partitions(&ring).await;
        report.duration_ms = start.elapsed().as_millis() as u64;
        let m = &self.metrics;
        m.anti_entropy_rounds.fetch_add(1, Ordering::Relaxed);
        m.anti_entropy_errors.fetch_add(report.failed_exchanges as u64, Ordering::Relaxed);
        m.anti_entropy_keys_repaired.fetch_add(report.keys_repaired as u64, Ordering::Relaxed);
        m.anti_entropy_keys_handed_off.fetch_add(report.keys_handed_off as u64, Ordering::Relaxed);
        self.anti_entropy.done.send_replace(report.clone());
        report
    }

    /// Wait for the next anti-entropy round to end (one started by the
    /// periodic loop or by anyone calling [`Node::run_anti_entropy`]) and
    /// return its report.
    pub async fn next_anti_entropy_round(&self) -> AntiEntropyReport {
        let mut rx = self.anti_entropy.done.subscribe();
        rx.mark_unchanged();
        // the sender lives as long as the node, which `self` keeps alive
        let _ = rx.changed().await;
        let r = rx.borrow().clone();
        r
    }

    /// Keys of partitions this node no longer replicates (the ring changed
    /// since it stored them): push them to every current owner and, once
    /// all N have acknowledged, delete the local copy if it did not change
    /// meanwhile. Nothing is deleted before N owners hold it; a partition
    /// whose owners are not all alive waits for a later round. Skipped
    /// until the node has run for `fail_timeout` (its first ring view may
    /// still miss members). Returns the keys handed off.
    async fn hand_off_foreign_partitions(&self, ring: &crate::ring::Ring) -> usize {
        if self.started.elapsed() < self.cfg.fail_timeout {
            return 0;
        }
        let partitions: std::collections::BTreeSet<u32> = match (self.storage.partitions_with_data(), self.storage.partitions_with_graves())
        {
            (Ok(d), Ok(g)) => d.into_iter().chain(g).collect(),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot list stored partitions");
                return 0;
            }
        };
        let mut moved = 0;
        for p in partitions {
            let owners = ring.preference_list(p, self.cfg.n);
            if owners.is_empty() || owners.contains(&self.cfg.id) || !owners.iter().all(|o| self.membership.is_alive(o)) {
                continue;
            }
            // graves first: the owners then bury stale copies, the ones
            // handed over below included
            match self.hand_off_graves(p, &owners).await {
                Some(n) => moved += n,
                None => continue,
            }
            let records = match self.storage.partition_records(p) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cannot read a foreign partition");
                    continue;
                }
            };
            for chunk in records.chunks(HANDOFF_BATCH) {
                let mut all = true;
                for o in &owners {
                    if self.call(o, Request::PutMany { items: chunk.to_vec() }).await.is_err() {
                        all = false;
                        break;
                    }
                }
                if !all {
                    break;
                }
                for (key, record) in chunk {
                    let Ok(enc) = encode_record(record) else { continue };
                    match self.storage.drop_if(key, crate::merkle::key_digest(key, &enc)).await {
                        Ok(true) => moved += 1,
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot drop a handed-off key"),
                    }
                }
            }
        }
        if moved > 0 {
            tracing::info!(moved, "handed off keys of partitions this node no longer replicates");
        }
        moved
    }

    /// Give the graves of foreign partition `p` to all its owners, then
    /// forget them here. `None` when an owner did not acknowledge.
    async fn hand_off_graves(&self, p: u32, owners: &[String]) -> Option<usize> {
        let graves = match self.storage.partition_graves(p) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cannot read the graves of a foreign partition");
                return None;
            }
        };
        for chunk in graves.chunks(HANDOFF_BATCH) {
            for o in owners {
                if self.call(o, Request::Bury { items: chunk.to_vec() }).await.is_err() {
                    return None;
                }
            }
        }
        let n = graves.len();
        if n > 0 {
            if let Err(e) = self.storage.forget_graves(graves).await {
                tracing::warn!(partition = p, error = %e, "cannot forget handed-off graves");
            }
        }
        Some(n)
    }

    async fn sync_partition(&self, p: u32, peer: &String) -> Result<usize, String> {
        let local = self.storage.merkle(p).map_err(|e| e.to_string())?;
        let remote = match self.call(peer, Request::MerkleLeaves { partition: p }).await.map_err(|e| e.to_string())? {
            Response::Leaves(b) => MerkleTree::decode(&b).ok_or("bad merkle leaves")?,
            _ => return Err("unexpected response".into()),
        };
        if local.root() == remote.root() {
            return Ok(0);
        }
        let leaves = local.diff_leaves(&remote);
        let req = Request::KeyDigests { partition: p, leaves: leaves.iter().map(|l| *l as u32).collect() };
        let remote_digests: BTreeMap<Vec<u8>, u128> = match self.call(peer, req).await.map_err(|e| e.to_string())? {
            Response::Digests(d) => d.into_iter().collect(),
            _ => return Err("unexpected response".into()),
        };
        let local_digests = self.storage.key_digests(p, &leaves).map_err(|e| e.to_string())?;
        let keys = diff_keys(&local_digests, &remote_digests);
        if keys.is_empty() {
            return Ok(0);
        }
        let pull: Vec<Vec<u8>> = keys.iter().filter(|k| remote_digests.contains_key(*k)).cloned().collect();
        if !pull.is_empty() {
            if let Response::Records(recs) = self.call(peer, Request::GetMany { keys: pull }).await.map_err(|e| e.to_string())? {
                for (k, r) in recs {
                    if let Some(r) = r {
                        self.storage.merge(&k, r).await.map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        let mut push = Vec::with_capacity(keys.len());
        // keys we collected that the peer still holds: it buries them too
        let mut bury = Vec::new();
        for k in &keys {
            if let Some(r) = self.storage.get(k).map_err(|e| e.to_string())? {
                push.push((k.clone(), r));
            } else if let Some(g) = self.storage.grave(k).map_err(|e| e.to_string())? {
                bury.push((k.clone(), g));
            }
        }
        let n = keys.len();
        self.call(peer, Request::PutMany { items: push }).await.map_err(|e| e.to_string())?;
        if !bury.is_empty() {
            self.call(peer, Request::Bury { items: bury }).await.map_err(|e| e.to_string())?;
        }
        Ok(n)
    }

    /// Merkle roots of every partition as stored locally.
    pub fn partition_roots(&self) -> Vec<u128> {
        (0..self.cfg.partitions).map(|p| self.storage.merkle(p).map(|t| t.root()).unwrap_or(0)).collect()
    }

    /// Drop tombstones older than the grace period once every replica of
    /// the key holds the very same tombstone. Only the first live node of
    /// the preference list runs this for a key. Returns keys removed.
    pub async fn gc_tombstones(self: &Arc<Self>) -> usize {
        let grace_ms = self.cfg.tombstone_grace.as_millis() as u64;
        let now = crate::membership::now_ms();
        let rows = match self.storage.scan() {
            Ok(r) => r,
            Err(_) => return 0,
        };
        let ring = self.membership.ring();
        let mut removed = 0;
        for (key, record) in rows {
            if !record.is_tombstone() || now.saturating_sub(record.newest_ms()) < grace_ms {
                continue;
            }
            let owners = ring.preference_list(ring.partition_of(&key), self.cfg.n);
            if owners.first() != Some(&self.cfg.id) {
                continue;
            }
            let Ok(enc) = encode_record(&record) else { continue };
            let digest = crate::merkle::key_digest(&key, &enc);
            let mut all = true;
            for o in &owners {
                match self.call(o, Request::GcProbe { key: key.clone() }).await {
                    Ok(Response::Digest(Some(d))) if d == digest => {}
                    _ => {
                        all = false;
                        break;
                    }
                }
            }
            if !all {
                continue;
            }
            for o in &owners {
                if let Err(e) = self.call(o, Request::GcDrop { key: key.clone(), digest }).await {
                    tracing::warn!(owner = %o, error = %e, "tombstone drop failed; anti-entropy will retry later");
                }
            }
            removed += 1;
        }
        self.metrics.tombstones_collected.fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }
}
