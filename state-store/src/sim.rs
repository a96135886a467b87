//! In-process simulated network for fault tests: nodes register their
//! handler; links can be cut, nodes killed, and requests or replies
//! dropped with a seeded random generator (so a fixed seed gives the same
//! drop decisions for the same sequence of calls).

use crate::clock::NodeId;
use crate::error::RpcError;
use crate::rpc::{Handler, Request, Response, Transport};
use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

struct State {
    handlers: HashMap<NodeId, Weak<dyn Handler>>,
    down: HashSet<NodeId>,
    cut: HashSet<(NodeId, NodeId)>,
    /// nodes that accept requests but never answer
    hung: HashSet<NodeId>,
    /// nodes whose connections break after each request is handled
    lossy: HashSet<NodeId>,
    /// nodes that take this long to answer
    slow: HashMap<NodeId, std::time::Duration>,
    drop_rate: f64,
    rng: StdRng,
    dropped: u64,
}

pub struct SimNetwork {
    state: Mutex<State>,
}

impl SimNetwork {
    pub fn new(seed: u64) -> Arc<SimNetwork> {
        Arc::new(SimNetwork {
            state: Mutex::new(State {
                handlers: HashMap::new(),
                down: HashSet::new(),
                cut: HashSet::new(),
                hung: HashSet::new(),
                lossy: HashSet::new(),
                slow: HashMap::new(),
                drop_rate: 0.0,
                rng: StdRng::seed_from_u64(seed),
                dropped: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, id: &NodeId, h: Weak<dyn Handler>) {
        let mut s = self.lock();
        s.handlers.insert(id.clone(), h);
        s.down.remove(id);
    }

    /// Make a node unreachable (its process is gone).
    pub fn kill(&self, id: &NodeId) {
        let mut s = self.lock();
        s.down.insert(id.clone());
        s.handlers.remove(id);
    }

    /// Cut all links between the two groups (both directions).
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut s = self.lock();
        for x in a {
            for y in b {
                s.cut.insert((x.clone(), y.clone()));
                s.cut.insert((y.clone(), x.clone()));
            }
        }
    }

    /// Requests to `id` never get an answer (exercises timeouts).
    pub fn hang(&self, id: &NodeId) {
        self.lock().hung.insert(id.clone());
    }

    /// Requests to `id` take effect, but the connection breaks before
    /// the reply arrives (the caller gets `RpcError::Lost`).
    pub fn lose_replies_from(&self, id: &NodeId) {
        self.lock().lossy.insert(id.clone());
    }

    /// Requests to `id` are answered only after `delay`.
    pub fn slow_down(&self, id: &NodeId, delay: std::time::Duration) {
        self.lock().slow.insert(id.clone(), delay);
    }

    /// Heal cuts, hung, lossy and slow nodes.
    pub fn heal(&self) {
        let mut s = self.lock();
        s.cut.clear();
        s.hung.clear();
        s.lossy.clear();
        s.slow.clear();
    }

    /// Probability that a request, or independently its reply, is lost.
    pub fn set_drop_rate(&self, p: f64) {
        self.lock().drop_rate = p;
    }

    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn roll(&self) -> bool {
        let mut s = self.lock();
        let rate = s.drop_rate.min(1.0);
        if rate > 0.0 && s.rng.gen_bool(rate) {
            s.dropped += 1;
            true
        } else {
            false
        }
    }
}

#[async_trait]
impl Transport for SimNetwork {
    async fn call(&self, from: &NodeId, to: &NodeId, req: Request) -> Result<Response, RpcError> {
        let (handler, hung, lossy, delay) = {
            let s = self.lock();
            if s.down.contains(to) || s.down.contains(from) || s.cut.contains(&(from.clone(), to.clone())) {
                return Err(RpcError::Unreachable(to.clone()));
            }
            (s.handlers.get(to).and_then(|w| w.upgrade()), s.hung.contains(to), s.lossy.contains(to), s.slow.get(to).copied())
        };
        if hung {
            return futures::future::pending().await;
        }
        let Some(h) = handler else {
            return Err(RpcError::Unreachable(to.clone()));
        };
        if self.roll() {
            return Err(RpcError::Timeout(to.clone()));
        }
        tokio::task::yield_now().await;
        let resp = h.handle(req).await;
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if lossy {
            return Err(RpcError::Lost(to.clone()));
        }
        if self.roll() {
            // the request took effect but the reply was lost
            return Err(RpcError::Timeout(to.clone()));
        }
        Ok(resp)
    }
}
