//! In-process cluster on the simulated network.
#![allow(dead_code)]

use nimbus_state_store::rpc::Handler;
use nimbus_state_store::sim::SimNetwork;
use nimbus_state_store::{Config, Node};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub net: Arc<SimNetwork>,
    pub ids: Vec<String>,
    pub nodes: Mutex<Vec<Option<Arc<Node>>>>,
    /// applied to every node's config on (re)start
    pub tweak: fn(&mut Config),
}

pub fn config(dir: &std::path::Path, id: &str, seeds: &[String]) -> Config {
    let mut c = Config::new(id, dir.join(id));
    c.seeds = seeds.to_vec();
    c.request_timeout = Duration::from_millis(1000);
    c.gossip_interval = Duration::from_millis(20);
    c.fail_timeout = Duration::from_millis(1500);
    // repair loops are driven explicitly by the tests
    c.hint_interval = Duration::from_secs(3600);
    c.anti_entropy_interval = Duration::from_secs(3600);
    c.tombstone_grace = Duration::from_secs(3600);
    c.gc_interval = Duration::from_secs(3600);
    c
}

/// Await a condition, checking it after every short pause, for at most
/// `limit`. Panics with `what` on timeout.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, limit: Duration, mut f: F) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Cluster {
    pub async fn start(n: usize, seed: u64) -> Cluster {
        Cluster::start_with(n, seed, |_| {}).await
    }

    /// Start with `tweak` applied to every node's config.
    pub async fn start_with(n: usize, seed: u64, tweak: fn(&mut Config)) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let net = SimNetwork::new(seed);
        let ids: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let c = Cluster { dir, net, ids: ids.clone(), nodes: Mutex::new(vec![None; n]), tweak };
        for i in 0..n {
            c.restart(i).await;
        }
        c.wait_all_alive().await;
        c
    }

    /// Index of node `id` in `ids`.
    pub fn index(&self, id: &str) -> usize {
        self.ids.iter().position(|x| x == id).expect("a node of the cluster")
    }

    /// The key's preference list (N=3) in node 0's view of the ring.
    pub fn preference_list(&self, key: &[u8]) -> Vec<String> {
        let ring = self.node(0).expect("n0").membership().ring();
        ring.preference_list(ring.partition_of(key), 3)
    }

    /// The record node `id` stores for `key` (replica data only).
    pub fn stored(&self, id: &str, key: &[u8]) -> Option<nimbus_state_store::clock::Record> {
        self.node(self.index(id)).and_then(|n| n.storage().get(key).ok().flatten())
    }

    /// A live node that holds at least one hint.
    pub fn hint_holder(&self) -> Option<Arc<Node>> {
        self.live().into_iter().find(|n| n.storage().hint_count().unwrap_or(0) > 0)
    }

    pub fn node(&self, i: usize) -> Option<Arc<Node>> {
        self.nodes.lock().expect("lock")[i].clone()
    }

    pub fn live(&self) -> Vec<Arc<Node>> {
        self.nodes.lock().expect("lock").iter().flatten().cloned().collect()
    }

    /// Start (or restart, reopening its on-disk store) node `i`.
    pub async fn restart(&self, i: usize) -> Arc<Node> {
        let mut cfg = config(self.dir.path(), &self.ids[i], &self.ids);
        (self.tweak)(&mut cfg);
        let start = std::time::Instant::now();
        let node = loop {
            // the killed instance's database closes when its last
            // in-flight task lets go of it
            match Node::start(cfg.clone(), self.net.clone()).await {
                Ok(n) => break n,
                Err(e) => {
                    assert!(start.elapsed() < Duration::from_secs(10), "cannot reopen {}: {e}", self.ids[i]);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let h: Arc<dyn Handler> = node.clone();
        let w: Weak<dyn Handler> = Arc::downgrade(&h);
        self.net.register(&self.ids[i], w);
        self.nodes.lock().expect("lock")[i] = Some(node.clone());
        node
    }

    /// Crash node `i`: unreachable at once, background loops stopped, and
    /// its handle dropped (the store file is closed when in-flight work
    /// ends; acknowledged writes were already fsynced).
    pub fn kill(&self, i: usize) {
        self.net.kill(&self.ids[i]);
        if let Some(n) = self.nodes.lock().expect("lock")[i].take() {
            n.shutdown();
        }
    }

    pub async fn wait_all_alive(&self) {
        wait_until("all live nodes see each other alive", Duration::from_secs(20), || {
            let live = self.live();
            live.iter().all(|a| live.iter().all(|b| a.membership().is_alive(b.id())))
        })
        .await;
    }

    /// Deliver hints until no node holds any.
    pub async fn drain_hints(&self) {
        for _ in 0..50 {
            let mut left = 0;
            for n in self.live() {
                n.deliver_hints().await;
                left += n.storage().hint_count().expect("hint count");
            }
            if left == 0 {
                return;
            }
        }
        panic!("hints not drained");
    }

    /// Run anti-entropy everywhere until a full round exchanges nothing.
    pub async fn converge(&self) -> usize {
        let mut total = 0;
        for _ in 0..20 {
            let mut round = 0;
            for n in self.live() {
                round += n.anti_entropy_round().await;
            }
            total += round;
            if round == 0 {
                return total;
            }
        }
        panic!("anti-entropy did not converge");
    }

    /// (partitions checked, partitions whose replicas' roots differ)
    pub fn root_mismatches(&self) -> (usize, usize) {
        let live = self.live();
        let Some(first) = live.first() else { return (0, 0) };
        let ring = first.membership().ring();
        let n = first.config().n;
        let roots: std::collections::HashMap<String, Vec<u128>> = live.iter().map(|x| (x.id().clone(), x.partition_roots())).collect();
        let mut bad = 0;
        for p in 0..ring.partitions() {
            let reps: Vec<u128> = ring.preference_list(p, n).iter().map(|id| roots.get(id).map(|r| r[p as usize]).unwrap_or(1)).collect();
            if reps.windows(2).any(|w| w[0] != w[1]) {
                bad += 1;
            }
        }
        (ring.partitions() as usize, bad)
    }
}
