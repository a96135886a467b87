//! Admin view of a node: ring, membership and hint backlog.

use crate::clock::NodeId;
use crate::membership::MemberView;
use crate::node::Node;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminView {
    pub id: NodeId,
    pub n: usize,
    pub r: usize,
    pub w: usize,
    pub partitions: u32,
    pub members: Vec<MemberView>,
    /// Partition tokens owned per node.
    pub ring_tokens: BTreeMap<NodeId, usize>,
    /// Preference list (N nodes) of every partition, by partition index.
    pub preference_lists: Vec<Vec<NodeId>>,
    /// Partitions this node replicates.
    pub replicated_partitions: usize,
    pub stored_keys: u64,
    pub hint_backlog: u64,
    pub hints_by_owner: BTreeMap<NodeId, u64>,
    /// Nodes refused because their ring parameters disagree, with why.
    #[serde(default)]
    pub refused_members: BTreeMap<NodeId, String>,
    /// Why the node is not ready (`None`: ready).
    #[serde(default)]
    pub not_ready: Option<String>,
    /// Group commits since start (commits, writes, µs busy).
    pub writer: crate::storage::WriterSnapshot,
}

impl Node {
    pub fn admin_view(&self) -> AdminView {
        let ring = self.membership.ring();
        let mut hints_by_owner = BTreeMap::new();
        let hints = self.storage.hints().unwrap_or_default();
        for h in &hints {
            *hints_by_owner.entry(h.owner.clone()).or_insert(0) += 1;
        }
        AdminView {
            id: self.cfg.id.clone(),
            n: self.cfg.n,
            r: self.cfg.r,
            w: self.cfg.w,
            partitions: self.cfg.partitions,
            members: self.membership.view(),
            ring_tokens: ring.token_counts().into_iter().collect(),
            preference_lists: (0..ring.partitions()).map(|p| ring.preference_list(p, self.cfg.n)).collect(),
            replicated_partitions: ring.replicated_partitions(&self.cfg.id, self.cfg.n).len(),
            stored_keys: self.storage.len().unwrap_or(0),
            hint_backlog: hints.len() as u64,
            hints_by_owner,
            refused_members: self.membership.refused(),
            not_ready: self.readiness().err().map(|e| e.to_string()),
            writer: self.storage.writer_stats(),
        }
    }
}
