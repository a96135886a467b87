//! Client operations: the quorum coordinator.
//!
//! Any node coordinates any request. For a key it computes the preference
//! list (first N distinct nodes on the ring). A write goes to every
//! preference-list slot: the owner if it is believed alive and otherwise
//! (or when the call fails) the next unused healthy fallback node from the
//! ring walk, carrying a hint that names the owner (sloppy quorum); the
//! coordinator answers after W acks and the remaining slots finish in the
//! background. A read asks R replicas, more only on failure, slowness or
//! a read-repair draw (see [`Node::get`]), and repairs the stale ones.

use crate::api::{Context, GetResult};
use crate::clock::{NodeId, Record, VersionVector};
use crate::error::{check_key, check_value, RpcError, StoreError};
use crate::metrics::Op;
use crate::node::{merge_all, Node};
use crate::rpc::{Request, Response};
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Reply of one replica (or stand-in) to a read.
struct SlotReply {
    node: NodeId,
    /// The node answered as the owner itself (not as a stand-in).
    is_owner: bool,
    record: Option<Record>,
}

/// One write slot: resolves to whether it was acknowledged.
type Slot = Pin<Box<dyn Future<Output = bool> + Send>>;

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
    /// the caller read. Returns after W replicas acknowledged.
    ///
    /// The write is coordinated by a preference-list node (this one if it
    /// is in the list, else the request is forwarded to the first one that
    /// answers); only when no owner is reachable does this node coordinate
    /// as a stand-in.
    ///
    /// Returns the context of the new version (the read context plus the
    /// new write), so a client can overwrite its own write without reading.
    pub async fn put(self: &Arc<Self>, key: &[u8], value: Option<Vec<u8>>, context: &Context) -> Result<Context, StoreError> {
        let op = if value.is_some() { Op::Put } else { Op::Delete };
        let start = std::time::Instant::now();
        let res = self.put_inner(key, value, context).await;
        self.metrics.op(op, res.is_ok(), start.elapsed());
        res
    }

    async fn put_inner(self: &Arc<Self>, key: &[u8], value: Option<Vec<u8>>, context: &Context) -> Result<Context, StoreError> {
        self.check_in_ring()?;
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
                    Err(RpcError::Unreachable(_) | RpcError::Tls { .. }) => continue,
                    // refused (e.g. it is leaving), or answered with
                    // something else: not applied
                    Err(RpcError::Remote { .. }) | Ok(_) => continue,
                    // possibly applied: retrying here could apply it twice
                    // (as two siblings), so let the client decide
                    Err(RpcError::Timeout(_) | RpcError::Lost(_) | RpcError::Codec(_)) => {
                        return Err(StoreError::OutcomeUnknown(owner.clone()))
                    }
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
        // Dots are minted for an actor, not for the node: a fresh actor per
        // incarnation (a write replicated before a crash lost its local
        // copy must not be implied by later dots of this node) and a
        // one-off actor per stand-in write (a stand-in does not keep what
        // it handed off).
        let actor = match &hint_owner {
            None => self.actor.clone(),
            Some(_) => {
                let n = self.stand_in_writes.fetch_add(1, Ordering::Relaxed);
                format!("{}/h{n}", self.actor)
            }
        };
        let (record, dot, durable) = self.storage.coordinate(&actor, key, value, context, hint_owner.as_deref()).await?;
        written.add(&dot);
        let written = Context(written);
        let covered = hint_owner.unwrap_or(me);
        // Replicate as soon as the write is applied locally; the local
        // commit completes in parallel and counts as one ack. All slots are
        // polled here; those still running after W acks finish in one
        // background task.
        let mut slots: FuturesUnordered<Slot> = FuturesUnordered::new();
        slots.push(Box::pin(async move {
            match durable.wait().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "local write failed");
                    false
                }
            }
        }));
        for owner in plan.pref.into_iter().filter(|o| *o != covered) {
            slots.push(self.clone().replicate(owner, key.to_vec(), record.clone(), plan.fallbacks.clone()));
        }
        let mut acks = 0;
        while let Some(ok) = slots.next().await {
            if ok {
                acks += 1;
                if acks >= needed {
                    if !slots.is_empty() {
                        tokio::spawn(async move { while slots.next().await.is_some() {} });
                    }
                    return Ok(written);
                }
            }
        }
        Err(StoreError::QuorumFailed { got: acks, needed })
    }

    /// One preference-list slot of a write: the owner if it is believed
    /// alive, else successive healthy fallbacks with a hint naming it, and
    /// when no fallback is left, the owner after all (the suspicion may be
    /// stale: one failed call marks a node down until its next heartbeat).
    /// Boxed: the write path recurses through `call` → `handle_local`, and
    /// the explicitly `Send` future breaks the cycle for the compiler.
    fn replicate(self: Arc<Self>, owner: NodeId, key: Vec<u8>, record: Record, fallbacks: Arc<Mutex<VecDeque<NodeId>>>) -> Slot {
        Box::pin(async move {
            let believed_alive = self.membership.is_alive(&owner);
            if believed_alive && self.call(&owner, Request::Put { key: key.clone(), record: record.clone() }).await.is_ok() {
                return true;
            }
            while let Some(stand_in) = Node::next_fallback(&fallbacks) {
                let req = Request::Hinted { owner: owner.clone(), key: key.clone(), record: record.clone() };
                if self.call(&stand_in, req).await.is_ok() {
                    tracing::debug!(%owner, %stand_in, "hinted write");
                    return true;
                }
            }
            !believed_alive && self.call(&owner, Request::Put { key, record }).await.is_ok()
        })
    }

    /// Read all surviving versions of `key`.
    ///
    /// Asks R replicas (this node first when it is one, then the other
    /// live owners in rotating order), and one more candidate whenever a
    /// call fails or when the replies are not in after `read_hedge`
    /// (speculative retry): live fallbacks stand in for owners that are
    /// down, and owners believed down are tried last. A fallback's reply
    /// counts toward R only in place of an owner that is believed down or
    /// whose call failed: while R live owners can still answer, the read
    /// waits for them (a fallback that never held the key would otherwise
    /// make it look missing). Answers from the first R counted replies;
    /// stale replicas among them are repaired in the
    /// background. With probability `read_repair_chance` the read asks
    /// every candidate at once instead, and after answering waits for all
    /// of them and repairs every stale owner (Dynamo's read repair over
    /// the whole preference list). Replicas a read does not ask are
    /// brought up to date by anti-entropy.
    pub async fn get(self: &Arc<Self>, key: &[u8]) -> Result<GetResult, StoreError> {
        let start = std::time::Instant::now();
        let res = self.get_inner(key).await;
        self.metrics.op(Op::Get, res.is_ok(), start.elapsed());
        res
    }

    async fn get_inner(self: &Arc<Self>, key: &[u8]) -> Result<GetResult, StoreError> {
        self.check_in_ring()?;
        check_key(key)?;
        let plan = self.plan(key)?;
        let needed = self.cfg.r.min(plan.pref.len()).max(1);
        let me = &self.cfg.id;
        let (mut owners, suspects): (Vec<NodeId>, Vec<NodeId>) =
            plan.pref.into_iter().partition(|o| o == me || self.membership.is_alive(o));
        // owners believed alive whose calls have not failed (yet)
        let live_owners: Vec<NodeId> = owners.clone();
        let mut live_left = live_owners.len();
        if !owners.is_empty() {
            let turn = self.read_turn.fetch_add(1, Ordering::Relaxed) % owners.len();
            owners.rotate_left(turn);
            // stable: this node first, the rotation among the others kept
            owners.sort_by_key(|o| o != me);
        }
        let fallbacks: Vec<NodeId> = std::mem::take(&mut *plan.fallbacks.lock().unwrap_or_else(|p| p.into_inner())).into();
        let mut candidates: VecDeque<(NodeId, bool)> = owners
            .into_iter()
            .map(|o| (o, true))
            .chain(fallbacks.into_iter().map(|f| (f, false)))
            .chain(suspects.into_iter().map(|o| (o, true)))
            .collect();
        let full = self.cfg.read_repair_chance > 0.0 && rand::random::<f64>() < self.cfg.read_repair_chance;
        let mut tally = Tally { needed, replies: Vec::with_capacity(needed), spare: Vec::new(), stand_ins: 0 };
        let mut inflight = FuturesUnordered::new();
        // ask the next candidate; false when there is none left
        let launch_next =
            |candidates: &mut VecDeque<(NodeId, bool)>, inflight: &mut FuturesUnordered<_>, tally: &mut Tally, live_left: &mut usize| {
                let Some((target, is_owner)) = candidates.pop_front() else { return false };
                if target == *me {
                    // a local read: no message, no task
                    match self.storage.get_with_hints(key) {
                        Ok(record) => tally.add(SlotReply { node: target, is_owner, record }, *live_left),
                        Err(e) => {
                            tracing::warn!(error = %e, "local read failed");
                            if live_owners.contains(&target) {
                                *live_left -= 1;
                                tally.promote(*live_left);
                            }
                        }
                    }
                } else {
                    inflight.push(self.read_replica(target, is_owner, key.to_vec()));
                }
                true
            };
        let wanted = if full { usize::MAX } else { needed };
        while tally.replies.len() + inflight.len() < wanted && launch_next(&mut candidates, &mut inflight, &mut tally, &mut live_left) {}
        let hedge = tokio::time::sleep(self.cfg.read_hedge);
        tokio::pin!(hedge);
        let mut hedged = false;
        while tally.replies.len() < needed {
            if inflight.is_empty() {
                if launch_next(&mut candidates, &mut inflight, &mut tally, &mut live_left) {
                    continue;
                }
                break;
            }
            tokio::select! {
                Some(r) = inflight.next() => match r {
                    Ok(r) => tally.add(r, live_left),
                    Err(node) => {
                        if live_owners.contains(&node) {
                            live_left -= 1;
                            tally.promote(live_left);
                        }
                        launch_next(&mut candidates, &mut inflight, &mut tally, &mut live_left);
                    }
                },
                _ = &mut hedge, if !hedged => {
                    hedged = true;
                    launch_next(&mut candidates, &mut inflight, &mut tally, &mut live_left);
                }
            }
        }
        if tally.replies.len() < needed {
            return Err(StoreError::QuorumFailed { got: tally.replies.len(), needed });
        }
        // replies that did not count still carry data (e.g. hints)
        let mut replies = tally.replies;
        replies.append(&mut tally.spare);
        let merged = merge_all(replies.iter().filter_map(|r| r.record.as_ref()));
        let result = GetResult {
            values: merged.values(),
            deleted: merged.siblings.iter().any(|s| s.value.is_none()),
            context: Context(merged.context()),
        };
        let stale = replies.iter().any(|r| r.is_owner && r.record.as_ref() != Some(&merged));
        if stale || (full && !inflight.is_empty()) {
            // read repair, in the background: in a full read, wait for the
            // slower replicas first (each call is bounded by the request
            // timeout), then bring every stale owner up to the merged version
            let node = self.clone();
            let key = key.to_vec();
            tokio::spawn(async move {
                if full {
                    while let Some(r) = inflight.next().await {
                        replies.extend(r.ok());
                    }
                }
                drop(inflight);
                let merged = merge_all(replies.iter().filter_map(|r| r.record.as_ref()));
                if merged.siblings.is_empty() {
                    return;
                }
                for r in replies.iter().filter(|r| r.is_owner && r.record.as_ref() != Some(&merged)) {
                    tracing::debug!(node = %r.node, "read repair");
                    if node.call(&r.node, Request::Put { key: key.clone(), record: merged.clone() }).await.is_ok() {
                        node.metrics.read_repairs.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        Ok(result)
    }

    /// Read one replica (or stand-in); the node's id when the call failed.
    fn read_replica(
        self: &Arc<Self>,
        target: NodeId,
        is_owner: bool,
        key: Vec<u8>,
    ) -> impl Future<Output = Result<SlotReply, NodeId>> + Send + 'static {
        let node = self.clone();
        async move {
            match node.call(&target, Request::Get { key }).await {
                Ok(Response::Record(record)) => Ok(SlotReply { node: target, is_owner, record }),
                _ => Err(target),
            }
        }
    }
}

/// The replies of a read: those that count toward R, and fallbacks'
/// replies held back while enough live owners can still answer.
struct Tally {
    needed: usize,
    replies: Vec<SlotReply>,
    spare: Vec<SlotReply>,
    /// fallbacks' replies counted in place of owners
    stand_ins: usize,
}

impl Tally {
    /// Add a reply; `live_left` is how many owners believed alive have
    /// not failed. A fallback counts only for an owner short of R.
    fn add(&mut self, r: SlotReply, live_left: usize) {
        if r.is_owner {
            self.replies.push(r);
        } else if self.stand_ins < self.needed.saturating_sub(live_left) {
            self.stand_ins += 1;
            self.replies.push(r);
        } else {
            self.spare.push(r);
        }
    }

    /// An owner failed: held-back fallback replies may now count.
    fn promote(&mut self, live_left: usize) {
        while self.stand_ins < self.needed.saturating_sub(live_left) {
            let Some(r) = self.spare.pop() else { break };
            self.stand_ins += 1;
            self.replies.push(r);
        }
    }
}
