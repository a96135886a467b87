//! Partitioning: Dynamo "strategy 3". The hash space is cut into `Q`
//! equal-sized partitions; each partition's token is owned by one node
//! (its virtual node). Partitions are assigned to members by a balanced
//! rendezvous ranking: every node ranks each partition by
//! `hash(node, partition)`, and each partition goes to its best-ranked node
//! that still has fewer than `ceil(Q / S)` partitions. The assignment is a
//! pure function of the member set, so every node that agrees on membership
//! computes the same ring without coordination, and a membership change
//! moves few partitions. The preference list of a key is the first `N`
//! distinct nodes met walking the ring clockwise from the key's partition.

use crate::clock::NodeId;
use xxhash_rust::xxh3::xxh3_64;

/// Default number of partitions.
pub const DEFAULT_PARTITIONS: u32 = 256;

/// Partition index of a key for a ring of `q` partitions.
pub fn partition_of(key: &[u8], q: u32) -> u32 {
    let h = xxh3_64(key) as u128;
    ((h * q as u128) >> 64) as u32
}

#[derive(Debug, Clone)]
pub struct Ring {
    q: u32,
    nodes: Vec<NodeId>,
    /// owner[p] = index into `nodes` of the node owning partition p's token.
    owner: Vec<usize>,
    /// walk[p] = all distinct nodes in clockwise order starting at p.
    walk: Vec<Vec<usize>>,
}

impl Ring {
    /// Build the ring for a member set. `members` need not be sorted.
    pub fn new(members: &[NodeId], q: u32) -> Ring {
        let q = q.max(1);
        let mut nodes: Vec<NodeId> = members.to_vec();
        nodes.sort();
        nodes.dedup();
        let s = nodes.len();
        let mut owner = vec![0usize; q as usize];
        if s > 0 {
            let cap = (q as usize).div_ceil(s);
            let mut load = vec![0usize; s];
            for p in 0..q {
                let mut ranked: Vec<(u64, usize)> = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let mut buf = n.as_bytes().to_vec();
                        buf.extend_from_slice(&p.to_be_bytes());
                        (xxh3_64(&buf), i)
                    })
                    .collect();
                ranked.sort_unstable_by(|a, b| b.cmp(a));
                let chosen = ranked.iter().map(|(_, i)| *i).find(|i| load[*i] < cap).unwrap_or(ranked[0].1);
                load[chosen] += 1;
                owner[p as usize] = chosen;
            }
        }
        let mut walk = Vec::with_capacity(q as usize);
        for p in 0..q as usize {
            let mut seen = Vec::with_capacity(s);
            for i in 0..q as usize {
                if seen.len() == s {
                    break;
                }
                let o = owner[(p + i) % q as usize];
                if !seen.contains(&o) {
                    seen.push(o);
                }
            }
            walk.push(seen);
        }
        Ring { q, nodes, owner, walk }
    }

    pub fn partitions(&self) -> u32 {
        self.q
    }

    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    pub fn partition_of(&self, key: &[u8]) -> u32 {
        partition_of(key, self.q)
    }

    /// Node owning partition `p`'s token.
    pub fn token_owner(&self, p: u32) -> Option<&NodeId> {
        if self.nodes.is_empty() {
            return None;
        }
        self.owner.get(p as usize).map(|i| &self.nodes[*i])
    }

    /// All distinct nodes in ring-walk order from partition `p`: the first
    /// `N` are the preference list, the rest are sloppy-quorum fallbacks.
    pub fn walk(&self, p: u32) -> Vec<NodeId> {
        match self.walk.get(p as usize) {
            Some(w) => w.iter().map(|i| self.nodes[*i].clone()).collect(),
            None => Vec::new(),
        }
    }

    /// The first `n` distinct nodes for partition `p`.
    pub fn preference_list(&self, p: u32, n: usize) -> Vec<NodeId> {
        let mut w = self.walk(p);
        w.truncate(n);
        w
    }

    /// Partitions for which `node` is among the `n` replicas.
    pub fn replicated_partitions(&self, node: &str, n: usize) -> Vec<u32> {
        let Some(idx) = self.nodes.iter().position(|x| x == node) else {
            return Vec::new();
        };
        (0..self.q).filter(|p| self.walk[*p as usize].iter().take(n).any(|i| *i == idx)).collect()
    }

    /// Number of partition tokens owned by each node.
    pub fn token_counts(&self) -> Vec<(NodeId, usize)> {
        let mut counts = vec![0usize; self.nodes.len()];
        for o in &self.owner {
            if !self.nodes.is_empty() {
                counts[*o] += 1;
            }
        }
        self.nodes.iter().cloned().zip(counts).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<NodeId> {
        (0..n).map(|i| format!("10.0.0.{i}:7000")).collect()
    }

    #[test]
    fn balance_8_nodes_256_partitions() {
        let ring = Ring::new(&members(8), 256);
        let mean = 256.0 / 8.0;
        for (n, c) in ring.token_counts() {
            assert!((c as f64) <= 1.2 * mean, "{n} holds {c} tokens, mean {mean}");
        }
        // replica load (N=3) is balanced too
        for n in ring.nodes() {
            let c = ring.replicated_partitions(n, 3).len() as f64;
            assert!(c <= 1.2 * (256.0 * 3.0 / 8.0), "{n} replicates {c} partitions");
        }
    }

    #[test]
    fn preference_lists_are_distinct_and_deterministic() {
        let a = Ring::new(&members(5), 256);
        let mut rev = members(5);
        rev.reverse();
        let b = Ring::new(&rev, 256);
        for p in 0..256 {
            let pl = a.preference_list(p, 3);
            assert_eq!(pl.len(), 3);
            let mut d = pl.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3);
            assert_eq!(pl, b.preference_list(p, 3));
            assert_eq!(a.walk(p).len(), 5);
        }
    }

    #[test]
    fn adding_a_node_moves_few_tokens() {
        let a = Ring::new(&members(8), 256);
        let b = Ring::new(&members(9), 256);
        let moved = (0..256).filter(|p| a.token_owner(*p) != b.token_owner(*p)).count();
        // ideal is 256/9 ≈ 28; allow slack for the capacity cap
        assert!(moved < 100, "moved {moved}");
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut hits = vec![0u32; 256];
        for i in 0..25600 {
            hits[partition_of(format!("key-{i}").as_bytes(), 256) as usize] += 1;
        }
        assert!(hits.iter().all(|h| *h > 40 && *h < 180));
    }
}
