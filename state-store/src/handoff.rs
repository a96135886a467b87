//! Hinted handoff and graceful leave.
//!
//! A stand-in node keeps each hinted write in its `hints` table, keyed by
//! (key, intended owner). The delivery loop sends every hint whose owner is
//! alive back to it and deletes the hint only after the owner acknowledged
//! the (durable) write, and only if the hint did not change meanwhile. If
//! the owner has left the ring, the hint goes to the key's current
//! preference list instead.

use crate::clock::NodeId;
use crate::error::StoreError;
use crate::membership::Status;
use crate::node::Node;
use crate::rpc::Request;
use std::sync::Arc;

/// Outcome of a graceful leave.
#[derive(Debug, Clone, Default)]
pub struct LeaveReport {
    pub keys_handed_off: usize,
    pub hints_handed_off: usize,
}

impl Node {
    /// Deliver pending hints to owners that are reachable. Returns how many
    /// hints were delivered and removed.
    pub async fn deliver_hints(self: &Arc<Self>) -> usize {
        let hints = match self.storage.hints() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read hints");
                return 0;
            }
        };
        let mut delivered = 0;
        for h in hints {
            let in_ring = self.membership.ring().nodes().contains(&h.owner);
            let targets: Vec<NodeId> = if in_ring {
                if !self.membership.is_alive(&h.owner) {
                    continue;
                }
                vec![h.owner.clone()]
            } else {
                let ring = self.membership.ring();
                ring.preference_list(ring.partition_of(&h.key), self.cfg.n)
            };
            let mut all_ok = !targets.is_empty();
            for t in &targets {
                if self.call(t, Request::Put { key: h.key.clone(), record: h.record.clone() }).await.is_err() {
                    all_ok = false;
                }
            }
            if all_ok {
                match self.storage.hint_remove_if(&h.owner, &h.key, h.record.clone()).await {
                    Ok(true) => delivered += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot remove hint"),
                }
            }
        }
        if delivered > 0 {
            tracing::info!(delivered, "hints handed off");
            self.metrics.hints_delivered.fetch_add(delivered as u64, std::sync::atomic::Ordering::Relaxed);
        }
        delivered
    }

    /// Hand every hint still held here to another live node, as a hint
    /// for the same owner (removed here only after that node acknowledged).
    /// Fails, keeping the rest, if a hint finds no taker.
    async fn rehome_hints(self: &Arc<Self>) -> Result<usize, StoreError> {
        let mut moved = 0;
        for h in self.storage.hints()? {
            let ring = self.membership.ring();
            let takers: Vec<NodeId> = ring
                .walk(ring.partition_of(&h.key))
                .into_iter()
                .filter(|n| *n != self.cfg.id && *n != h.owner && self.membership.is_alive(n))
                .collect();
            let mut taken = false;
            for t in takers {
                let req = Request::Hinted { owner: h.owner.clone(), key: h.key.clone(), record: h.record.clone() };
                if self.call(&t, req).await.is_ok() {
                    taken = true;
                    break;
                }
            }
            if !taken {
                tracing::warn!(owner = %h.owner, "no live node takes a hint; the leave stops here");
                return Err(StoreError::QuorumFailed { got: 0, needed: 1 });
            }
            // changed meanwhile (merged with a newer write): the next
            // leave attempt moves the new version
            if self.storage.hint_remove_if(&h.owner, &h.key, h.record.clone()).await? {
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Remove a permanently failed node from the ring on its behalf and
    /// tell every peer. Its hints then go to the keys' new preference
    /// lists and anti-entropy rebuilds the missing replicas.
    pub async fn remove_member(self: &Arc<Self>, id: &str) -> Result<(), StoreError> {
        if !self.membership.remove(id) {
            return Err(StoreError::BadConfig(format!("cannot remove member {id}")));
        }
        self.gossip_all().await;
        Ok(())
    }

    /// Leave the cluster: stop owning partitions, hand every stored key and
    /// hint to the new owners (each must acknowledge), then announce `Left`.
    pub async fn leave(self: &Arc<Self>) -> Result<LeaveReport, StoreError> {
        self.membership.set_status(Status::Leaving);
        self.gossip_all().await;
        let mut report = LeaveReport::default();
        // Two passes: writes that reached us while peers still saw us as an
        // owner are picked up by the second one.
        for _ in 0..2 {
            report.keys_handed_off = 0;
            let ring = self.membership.ring();
            for (key, record) in self.storage.scan()? {
                let owners = ring.preference_list(ring.partition_of(&key), self.cfg.n);
                let mut acks = 0;
                for o in owners.iter().filter(|o| **o != self.cfg.id) {
                    if self.call(o, Request::Put { key: key.clone(), record: record.clone() }).await.is_ok() {
                        acks += 1;
                    } else {
                        // owner down: leave the data with a live node as a hint
                        let ring_nodes = ring.walk(ring.partition_of(&key));
                        for stand_in in ring_nodes.iter().skip(self.cfg.n) {
                            let req = Request::Hinted { owner: o.clone(), key: key.clone(), record: record.clone() };
                            if self.membership.is_alive(stand_in) && self.call(stand_in, req).await.is_ok() {
                                acks += 1;
                                break;
                            }
                        }
                    }
                }
                if acks == 0 {
                    return Err(StoreError::QuorumFailed { got: 0, needed: 1 });
                }
                report.keys_handed_off += 1;
            }
        }
        // the graves of collected keys go with the data, so that the new
        // owners bury stale copies too
        let ring = self.membership.ring();
        for p in self.storage.partitions_with_graves()? {
            let graves = self.storage.partition_graves(p)?;
            let mut acks = 0;
            for o in ring.preference_list(p, self.cfg.n).iter().filter(|o| **o != self.cfg.id) {
                if self.call(o, Request::Bury { items: graves.clone() }).await.is_ok() {
                    acks += 1;
                }
            }
            if acks == 0 {
                return Err(StoreError::QuorumFailed { got: 0, needed: 1 });
            }
        }
        report.hints_handed_off = self.deliver_hints().await;
        // hints whose owners are down stay hints, on another node
        report.hints_handed_off += self.rehome_hints().await?;
        self.membership.set_status(Status::Left);
        self.gossip_all().await;
        self.shutdown();
        Ok(report)
    }
}
