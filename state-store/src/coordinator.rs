//! Client operations: the quorum coordinator.
//!
//! Any node coordinates any request. For a key it computes the preference
//! list (first N distinct nodes on the ring) and, per preference-list slot,
//! runs one task that tries the owner if it is believed alive and otherwise
//! (or when the call fails) the next unused healthy fallback node from the
//! ring walk, carrying a hint that names the owner (sloppy quorum). The
//! coordinator answers as soon as W (write) or R (read) slots succeeded;
//! the remaining slots finish in the background. Reads then repair every
//! stale owner that answered (read repair).

use crate::api::{Context, GetResult};
use crate::clock::{NodeId, Record, VersionVector};
use crate::error::{check_key, check_value, RpcError, StoreError};
use crate::node::{merge_all, Node};
use crate::rpc::{Request, Response};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Reply of one preference-list slot.
struct SlotReply {
    node: NodeId,
    /// The node answered as the owner itself (not as a stand-in).
    is_owner: bool,
    record: Option<Record>,
}

struct Plan {
    pref: Vec<NodeId>,
    fallbacks: Arc<Mutex<VecDeque<NodeId>>>,
}

impl Node {
    fn plan(&self, key: &[u8]) -> Result<Plan, StoreError> {
        let ring = self.membership.ring();
        let walk = ring.walk(ring.partition_of(key));
        if walk.is_empty() {
            return Err(StoreError::NoNodes);
        }
        let n = self.cfg.n.min(walk.len());
        let fallbacks: VecDeque<NodeId> = walk[n..].iter().filter(|x| self.membership.is_alive(x)).cloned().collect();
        Ok(Plan { pref: walk[..n].to_vec(), fallbacks: Arc::new(Mutex::new(fallbacks)) })
    }

    fn next_fallback(fb: &Mutex<VecDeque<NodeId>>) -> Option<NodeId> {
        fb.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }

    /// Write `value` (or a tombstone when `None`) with the causal context
    /// the caller read. Returns after W replicas acknowledged durably.
    ///
    /// The write is coordinated by a preference-list node (this one if it
    /// is in the list, else the request is forwarded to the first one that
    /// answers); only when no owner is reachable does this node coordinate
    /// as a stand-in.
    ///
    /// Returns the context of the new version (the read context plus the
    /// new write), so a client can overwrite its own write without reading.
    pub async fn put(self: &Arc<Self>, key: &[u8], value: Option<Vec<u8>>, context: &Context) -> Result<Context, StoreError> {
        check_key(key)?;
        if let Some(v) = &value {
            check_value(v)?;
        }
        let plan = self.plan(key)?;
        if !plan.pref.contains(&self.cfg.id) {
            // forwarded writes wait for the remote coordinator's quorum
            let timeout = self.cfg.request_timeout * 3;
            for owner in plan.pref.iter().filter(|o| self.membership.is_alive(o)) {
                let req = Request::Coordinate { key: key.to_vec(), value: value.clone(), context: context.0.clone() };
                match self.call_with_timeout(owner, req, timeout).await {
                    Ok(Response::Written(vv)) => return Ok(Context(vv)),
                    Ok(Response::Failed(e)) => return Err(e),
                    // never delivered: safe to try the next owner
                    Err(RpcError::Unreachable(_)) => continue,
                    // possibly applied: retrying here could apply it twice
                    // (as two siblings), so let the client decide
                    Err(RpcError::Timeout(n)) => return Err(StoreError::OutcomeUnknown(n)),
                    _ => continue,
                }
            }
        }
        self.coordinate_put(key, value, context.0.clone()).await
    }

    /// Coordinate a write here: store it locally first (minting its dot),
    /// then replicate this node's full state of the key to the other
    /// preference-list slots.
    pub(crate) async fn coordinate_put(
        self: &Arc<Self>,
        key: &[u8],
        value: Option<Vec<u8>>,
        context: VersionVector,
    ) -> Result<Context, StoreError> {
        check_key(key)?;
        let plan = self.plan(key)?;
        let needed = self.cfg.w.min(plan.pref.len()).max(1);
        // As an owner we store into our data; as a stand-in we hold the
        // write as a hint for the first owner, and that slot is covered.
        let me = self.cfg.id.clone();
        let hint_owner = if plan.pref.contains(&me) { None } else { plan.pref.first().cloned() };
        {
            // we are no longer a fallback candidate for the other slots
            let mut fb = plan.fallbacks.lock().unwrap_or_else(|p| p.into_inner());
            fb.retain(|x| *x != me);
        }
        let mut written = context.clone();
        // replicate as soon as the write is applied locally; the local
        // fsync runs in parallel and counts as one ack when it completes
        // Dots are minted for an actor, not for the node: a fresh actor per
        // incarnation (a write replicated before a crash lost its local
        // copy must not be implied by later dots of this node) and a
        // one-off actor per stand-in write (a stand-in does not keep what
        // it handed off).
        let actor = match &hint_owner {
            None => self.actor.clone(),
            Some(_) => {
                let n = self.stand_in_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("{}/h{n}", self.actor)
            }
        };
        let (record, dot, durable) = self.storage.coordinate(&actor, key, value, context, hint_owner.as_deref()).await?;
        written.add(&dot);
        let written = Context(written);
        let covered = hint_owner.clone().unwrap_or(me.clone());
        let mut acks = 0;
        let (tx, mut rx) = mpsc::channel::<bool>(plan.pref.len() + 1);
        let local = tx.clone();
        tokio::spawn(async move {
            let ok = match durable.wait().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "local write failed");
                    false
                }
            };
            let _ = local.send(ok).await;
        });
        self.spawn_replicas(key, record, plan, covered, tx);
        while let Some(ok) = rx.recv().await {
            if ok {
                acks += 1;
                if acks >= needed {
                    return Ok(written);
                }
            }
        }
        Err(StoreError::QuorumFailed { got: acks, needed })
    }

    /// One task per preference-list slot other than `covered`: try the
    /// owner, else successive healthy fallbacks with a hint.
    fn spawn_replicas(self: &Arc<Self>, key: &[u8], record: Record, plan: Plan, covered: NodeId, tx: mpsc::Sender<bool>) {
        for owner in plan.pref.into_iter().filter(|o| *o != covered) {
            let (node, tx, fb, key, record) = (self.clone(), tx.clone(), plan.fallbacks.clone(), key.to_vec(), record.clone());
            tokio::spawn(async move {
                if node.membership.is_alive(&owner)
                    && node.call(&owner, Request::Put { key: key.clone(), record: record.clone() }).await.is_ok()
                {
                    let _ = tx.send(true).await;
                    return;
                }
                while let Some(stand_in) = Node::next_fallback(&fb) {
                    let req = Request::Hinted { owner: owner.clone(), key: key.clone(), record: record.clone() };
                    if node.call(&stand_in, req).await.is_ok() {
                        tracing::debug!(%owner, %stand_in, "hinted write");
                        let _ = tx.send(true).await;
                        return;
                    }
                }
                let _ = tx.send(false).await;
            });
        }
    }

    /// Read all surviving versions of `key` from R replicas.
    pub async fn get(self: &Arc<Self>, key: &[u8]) -> Result<GetResult, StoreError> {
        check_key(key)?;
        let plan = self.plan(key)?;
        let needed = self.cfg.r.min(plan.pref.len()).max(1);
        let (tx, mut rx) = mpsc::channel::<Option<SlotReply>>(plan.pref.len());
        for owner in plan.pref {
            let (node, tx, fb, key) = (self.clone(), tx.clone(), plan.fallbacks.clone(), key.to_vec());
            tokio::spawn(async move {
                if node.membership.is_alive(&owner) {
                    if let Ok(Response::Record(record)) = node.call(&owner, Request::Get { key: key.clone() }).await {
                        let _ = tx.send(Some(SlotReply { node: owner, is_owner: true, record })).await;
                        return;
                    }
                }
                while let Some(stand_in) = Node::next_fallback(&fb) {
                    if let Ok(Response::Record(record)) = node.call(&stand_in, Request::Get { key: key.clone() }).await {
                        let _ = tx.send(Some(SlotReply { node: stand_in, is_owner: false, record })).await;
                        return;
                    }
                }
                let _ = tx.send(None).await;
            });
        }
        drop(tx);
        let mut replies = Vec::new();
        while let Some(r) = rx.recv().await {
            if let Some(r) = r {
                replies.push(r);
                if replies.len() >= needed {
                    break;
                }
            }
        }
        if replies.len() < needed {
            return Err(StoreError::QuorumFailed { got: replies.len(), needed });
        }
        let merged = merge_all(replies.iter().filter_map(|r| r.record.as_ref()));
        // Read repair: wait for the slower replicas in the background, then
        // bring every stale owner up to the merged version.
        let node = self.clone();
        let key = key.to_vec();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                if let Some(r) = r {
                    replies.push(r);
                }
            }
            let merged = merge_all(replies.iter().filter_map(|r| r.record.as_ref()));
            if merged.siblings.is_empty() {
                return;
            }
            for r in replies.iter().filter(|r| r.is_owner && r.record.as_ref() != Some(&merged)) {
                tracing::debug!(node = %r.node, "read repair");
                let _ = node.call(&r.node, Request::Put { key: key.clone(), record: merged.clone() }).await;
            }
        });
        Ok(GetResult { values: merged.values(), deleted: merged.siblings.iter().any(|s| s.value.is_none()), context: Context(merged.context()) })
    }
}
