//! Anti-entropy with Merkle trees, and tombstone garbage collection.
//!
//! For every partition it replicates, a node compares its tree with each
//! other replica's: equal roots end the exchange; otherwise it descends to
//! the differing leaves, fetches the per-key digests of those leaves only,
//! and for the differing keys pulls the peer's records and pushes back the
//! merged result. Merging is deterministic, so afterwards both replicas
//! hold identical records and identical roots.

use crate::merkle::{diff_keys, MerkleTree};
use crate::node::Node;
use crate::rpc::{Request, Response};
use crate::storage::encode_record;
use std::collections::BTreeMap;
use std::sync::Arc;

impl Node {
    /// One anti-entropy pass over all partitions this node replicates.
    /// Returns the number of keys exchanged.
    pub async fn anti_entropy_round(self: &Arc<Self>) -> usize {
        let ring = self.membership.ring();
        let mut exchanged = 0;
        for p in ring.replicated_partitions(&self.cfg.id, self.cfg.n) {
            for peer in ring.preference_list(p, self.cfg.n) {
                if peer == self.cfg.id || !self.membership.is_alive(&peer) {
                    continue;
                }
                match self.sync_partition(p, &peer).await {
                    Ok(n) => exchanged += n,
                    Err(e) => tracing::debug!(partition = p, %peer, error = %e, "anti-entropy exchange failed"),
                }
            }
        }
        if exchanged > 0 {
            tracing::info!(exchanged, "anti-entropy repaired keys");
        }
        exchanged
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
        for k in &keys {
            if let Some(r) = self.storage.get(k).map_err(|e| e.to_string())? {
                push.push((k.clone(), r));
            }
        }
        let n = keys.len();
        self.call(peer, Request::PutMany { items: push }).await.map_err(|e| e.to_string())?;
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
        removed
    }
}
