//! Membership and failure detection by push-pull gossip.
//!
//! Every member entry carries a status (`Joined`, `Leaving`, `Left`) with a
//! version, and a heartbeat. Both are wall-clock milliseconds taken when the
//! owner changed them, so they keep increasing across restarts. Merging two
//! views keeps the higher status version and the higher heartbeat. A node is
//! considered alive while its heartbeat keeps advancing within
//! `fail_timeout` (as observed locally); a failed RPC marks it suspect until
//! a newer heartbeat arrives. Liveness never changes the ring: only explicit
//! join and leave do (as in Dynamo), so a crashed node keeps its partitions
//! and the others cover for it with hinted handoff.

use crate::clock::NodeId;
use crate::ring::Ring;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Joined,
    Leaving,
    Left,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub status: Status,
    pub version: u64,
    pub heartbeat: u64,
}

/// Parameters every node of a cluster must agree on: they decide where
/// keys live. Carried in every gossip exchange (and so in the join); a
/// node whose parameters differ is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingParams {
    /// replicas per key (N)
    pub n: u32,
    /// fixed number of partitions (Q)
    pub partitions: u32,
}

impl std::fmt::Display for RingParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "N={} partitions={}", self.n, self.partitions)
    }
}

/// One member as seen by the local node (for the admin view).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    pub id: NodeId,
    pub status: Status,
    pub alive: bool,
    pub heartbeat: u64,
}

struct Entry {
    member: Member,
    last_seen: Instant,
    suspect: bool,
}

struct Inner {
    members: BTreeMap<NodeId, Entry>,
    ring: Arc<Ring>,
    ring_members: Vec<NodeId>,
}

pub struct Membership {
    me: NodeId,
    params: RingParams,
    /// nodes refused because their ring parameters disagree, with the
    /// reason: never merged from gossip (so a new node never enters the
    /// ring), not alive, not gossiped with, left out of the views this
    /// node sends; cleared when that node gossips with agreeing ones. A
    /// member already in the ring (a seed, or a member restarted with other
    /// parameters) stays in it as a down node, as after a crash: liveness
    /// never changes the ring
    refused: Mutex<BTreeMap<NodeId, String>>,
    partitions: u32,
    fail_timeout: Duration,
    inner: Mutex<Inner>,
    /// our own status is `Joined` (kept beside `inner` so that the write
    /// path can ask without taking the lock)
    joined: std::sync::atomic::AtomicBool,
}

impl Membership {
    /// Start as a `Joined` member, knowing the seeds as members.
    pub fn new(me: NodeId, seeds: &[NodeId], params: RingParams, fail_timeout: Duration) -> Membership {
        let partitions = params.partitions;
        let now = Instant::now();
        let mut members = BTreeMap::new();
        let t = now_ms();
        members.insert(
            me.clone(),
            Entry { member: Member { id: me.clone(), status: Status::Joined, version: t, heartbeat: t }, last_seen: now, suspect: false },
        );
        for s in seeds {
            if *s != me {
                members.insert(
                    s.clone(),
                    Entry {
                        member: Member { id: s.clone(), status: Status::Joined, version: 0, heartbeat: 0 },
                        last_seen: now,
                        suspect: false,
                    },
                );
            }
        }
        let m = Membership {
            me,
            params,
            refused: Mutex::new(BTreeMap::new()),
            partitions,
            fail_timeout,
            inner: Mutex::new(Inner { members, ring: Arc::new(Ring::new(&[], partitions)), ring_members: Vec::new() }),
            joined: std::sync::atomic::AtomicBool::new(false),
        };
        {
            let mut g = m.lock();
            m.rebuild_ring(&mut g);
        }
        m
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refused_lock(&self) -> MutexGuard<'_, BTreeMap<NodeId, String>> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn params(&self) -> RingParams {
        self.params
    }

    /// Refuse `id`, whose ring parameters disagree with ours: it is down
    /// for us from now on. Returns true the first time.
    pub fn refuse(&self, id: &str, reason: String) -> bool {
        id != self.me && self.refused_lock().insert(id.to_string(), reason).is_none()
    }

    /// `id` gossiped with agreeing parameters: no longer refused.
    pub fn accept(&self, id: &str) {
        self.refused_lock().remove(id);
    }

    /// Refused nodes and why.
    pub fn refused(&self) -> BTreeMap<NodeId, String> {
        self.refused_lock().clone()
    }

    fn rebuild_ring(&self, g: &mut Inner) {
        let active: Vec<NodeId> = g.members.values().filter(|e| e.member.status == Status::Joined).map(|e| e.member.id.clone()).collect();
        self.joined.store(active.contains(&self.me), std::sync::atomic::Ordering::Release);
        if active != g.ring_members {
            tracing::info!(members = ?active, "ring membership changed");
            g.ring = Arc::new(Ring::new(&active, self.partitions));
            g.ring_members = active;
        }
    }

    /// Whether this node is a `Joined` member (not leaving or gone).
    pub fn is_joined(&self) -> bool {
        self.joined.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// The current ring (members with status `Joined`).
    pub fn ring(&self) -> Arc<Ring> {
        self.lock().ring.clone()
    }

    pub fn is_alive(&self, id: &str) -> bool {
        if id == self.me {
            return true;
        }
        if self.refused_lock().contains_key(id) {
            return false;
        }
        let g = self.lock();
        match g.members.get(id) {
            Some(e) => e.member.status != Status::Left && !e.suspect && e.last_seen.elapsed() < self.fail_timeout,
            None => false,
        }
    }

    /// Mark a peer down after a failed call, until a newer heartbeat.
    pub fn mark_suspect(&self, id: &str) {
        if let Some(e) = self.lock().members.get_mut(id) {
            e.suspect = true;
        }
    }

    /// Advance our own heartbeat and return the full view to gossip.
    pub fn tick(&self) -> Vec<Member> {
        let mut g = self.lock();
        let me = self.me.clone();
        if let Some(e) = g.members.get_mut(&me) {
            e.member.heartbeat = now_ms().max(e.member.heartbeat + 1);
        }
        let refused = self.refused_lock().clone();
        g.members.values().filter(|e| !refused.contains_key(&e.member.id)).map(|e| e.member.clone()).collect()
    }

    /// The view sent to peers (refused nodes left out).
    pub fn snapshot(&self) -> Vec<Member> {
        let refused = self.refused_lock().clone();
        self.lock().members.values().filter(|e| !refused.contains_key(&e.member.id)).map(|e| e.member.clone()).collect()
    }

    /// Merge a view received by gossip.
    pub fn merge(&self, view: &[Member]) {
        let refused = self.refused_lock().clone();
        let mut g = self.lock();
        let now = Instant::now();
        for m in view.iter().filter(|m| !refused.contains_key(&m.id)) {
            if m.id == self.me {
                // Someone believes we left or are leaving with a newer
                // version (e.g. a stale view after restart): re-assert.
                if let Some(e) = g.members.get_mut(&self.me) {
                    if m.version > e.member.version && m.status != e.member.status {
                        e.member.version = m.version + 1;
                    }
                }
                continue;
            }
            match g.members.get_mut(&m.id) {
                Some(e) => {
                    if m.version > e.member.version {
                        e.member.version = m.version;
                        e.member.status = m.status;
                    }
                    if m.heartbeat > e.member.heartbeat {
                        e.member.heartbeat = m.heartbeat;
                        e.last_seen = now;
                        e.suspect = false;
                    }
                }
                None => {
                    g.members.insert(m.id.clone(), Entry { member: m.clone(), last_seen: now, suspect: false });
                }
            }
        }
        self.rebuild_ring(&mut g);
    }

    /// Change our own status (explicit leave).
    pub fn set_status(&self, status: Status) {
        let mut g = self.lock();
        let me = self.me.clone();
        if let Some(e) = g.members.get_mut(&me) {
            e.member.status = status;
            e.member.version = now_ms().max(e.member.version + 1);
        }
        self.rebuild_ring(&mut g);
    }

    /// Declare another member `Left` on its behalf (an operator removing a
    /// permanently failed node). Returns false for unknown ids and for us.
    pub fn remove(&self, id: &str) -> bool {
        if id == self.me {
            return false;
        }
        let mut g = self.lock();
        let Some(e) = g.members.get_mut(id) else { return false };
        e.member.status = Status::Left;
        e.member.version = now_ms().max(e.member.version + 1);
        self.rebuild_ring(&mut g);
        true
    }

    pub fn status_of(&self, id: &str) -> Option<Status> {
        self.lock().members.get(id).map(|e| e.member.status)
    }

    /// Peers worth gossiping with (everyone not known to have left).
    pub fn gossip_peers(&self) -> Vec<NodeId> {
        let refused = self.refused_lock().clone();
        self.lock()
            .members
            .values()
            .filter(|e| e.member.id != self.me && e.member.status != Status::Left && !refused.contains_key(&e.member.id))
            .map(|e| e.member.id.clone())
            .collect()
    }

    pub fn view(&self) -> Vec<MemberView> {
        let ids: Vec<(NodeId, Status, u64)> =
            self.lock().members.values().map(|e| (e.member.id.clone(), e.member.status, e.member.heartbeat)).collect();
        ids.into_iter().map(|(id, status, heartbeat)| MemberView { alive: self.is_alive(&id), id, status, heartbeat }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossip_merge_spreads_status_and_liveness() {
        let p = RingParams { n: 3, partitions: 16 };
        let a = Membership::new("a".into(), &["b".into()], p, Duration::from_secs(5));
        let b = Membership::new("b".into(), &[], p, Duration::from_secs(5));
        let c = Membership::new("c".into(), &["b".into()], p, Duration::from_secs(5));
        b.merge(&c.tick());
        a.merge(&b.tick());
        assert_eq!(a.ring().nodes().len(), 3);
        assert!(a.is_alive("c"));
        assert!(c.is_joined());
        c.set_status(Status::Leaving);
        assert!(!c.is_joined(), "a leaving node takes no writes");
        b.merge(&c.tick());
        a.merge(&b.tick());
        assert_eq!(a.status_of("c"), Some(Status::Leaving));
        assert_eq!(a.ring().nodes().len(), 2);
        a.mark_suspect("b");
        assert!(!a.is_alive("b"));
        a.merge(&b.tick());
        assert!(a.is_alive("b"));
    }
}
