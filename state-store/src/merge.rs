//! Application-level reconciliation of siblings.
//!
//! The store never merges values itself: `get` returns every concurrent
//! sibling and `api::get_reconciled` lets the caller supply a merge
//! function whose result is written back with the read context. This module
//! provides the instance-metadata reconciler used by Nimbus: `Terminated`
//! always wins (a terminated instance must never come back to life), other
//! states take the furthest one along the lifecycle, and tag maps are
//! merged key by key (on a conflicting value the greatest string wins, so
//! the result does not depend on sibling order).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    Terminated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMeta {
    pub state: InstanceState,
    pub tags: BTreeMap<String, String>,
}

/// Reconcile two instance records. Commutative, associative, idempotent.
pub fn merge_instance(a: &InstanceMeta, b: &InstanceMeta) -> InstanceMeta {
    let state = a.state.max(b.state);
    let mut tags = a.tags.clone();
    for (k, v) in &b.tags {
        let e = tags.entry(k.clone()).or_insert_with(|| v.clone());
        if v > e {
            *e = v.clone();
        }
    }
    InstanceMeta { state, tags }
}

/// Merge function over encoded siblings (JSON `InstanceMeta`), suitable
/// for `api::get_reconciled`. Siblings that do not decode are skipped; if
/// none decodes, the first sibling is kept unchanged.
pub fn reconcile_instance_json(siblings: &[Vec<u8>]) -> Vec<u8> {
    let decoded: Vec<InstanceMeta> = siblings.iter().filter_map(|s| serde_json::from_slice(s).ok()).collect();
    let mut it = decoded.iter();
    match it.next() {
        Some(first) => {
            let merged = it.fold(first.clone(), |acc, x| merge_instance(&acc, x));
            serde_json::to_vec(&merged).unwrap_or_default()
        }
        None => siblings.first().cloned().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(state: InstanceState, tags: &[(&str, &str)]) -> InstanceMeta {
        InstanceMeta { state, tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn terminated_wins_and_tags_merge() {
        let a = meta(InstanceState::Terminated, &[("team", "a")]);
        let b = meta(InstanceState::Running, &[("env", "prod")]);
        let m = merge_instance(&b, &a);
        assert_eq!(m.state, InstanceState::Terminated);
        assert_eq!(m.tags.len(), 2);
        let enc = reconcile_instance_json(&[serde_json::to_vec(&b).unwrap_or_default(), serde_json::to_vec(&a).unwrap_or_default()]);
        let back: InstanceMeta = serde_json::from_slice(&enc).expect("decodes");
        assert_eq!(back, m);
    }

    fn arb() -> impl Strategy<Value = InstanceMeta> {
        (0u8..5, proptest::collection::btree_map("[a-c]", "[x-z]", 0..3)).prop_map(|(s, tags)| InstanceMeta {
            state: [
                InstanceState::Pending,
                InstanceState::Running,
                InstanceState::Stopping,
                InstanceState::Stopped,
                InstanceState::Terminated,
            ][s as usize],
            tags,
        })
    }

    proptest! {
        #![proptest_config(crate::test_util::proptest_config())]
        #[test]
        fn merge_is_order_independent(a in arb(), b in arb(), c in arb()) {
            prop_assert_eq!(merge_instance(&a, &b), merge_instance(&b, &a));
            prop_assert_eq!(merge_instance(&merge_instance(&a, &b), &c), merge_instance(&a, &merge_instance(&b, &c)));
            prop_assert_eq!(merge_instance(&a, &a), a.clone());
            if a.state == InstanceState::Terminated { prop_assert_eq!(merge_instance(&a, &b).state, InstanceState::Terminated); }
        }
    }
}
