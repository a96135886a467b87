//! Merkle trees for anti-entropy, one per partition per replica.
//!
//! Each key contributes a 128-bit digest of `(key, encoded record)` to one
//! of `LEAVES` buckets chosen by its hash; a leaf is the XOR of its keys'
//! digests, so a write updates a leaf in O(1) without rescanning. Inner
//! nodes hash their two children up to the root. Two replicas compare roots,
//! descend only into differing subtrees, and then exchange per-key digests
//! of the differing leaves only, so in-sync data is never transferred.

use std::collections::BTreeMap;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64, Xxh3Default};

/// Leaves per partition tree (a power of two).
pub const LEAVES: usize = 64;

pub type Digest = u128;

/// Leaf bucket of a key (uses low hash bits; the partition uses high bits).
pub fn bucket_of(key: &[u8]) -> usize {
    (xxh3_64(key) as usize) & (LEAVES - 1)
}

/// Digest of one key's stored state.
pub fn key_digest(key: &[u8], encoded_record: &[u8]) -> Digest {
    // streaming: the same digest as hashing the concatenation, no copy
    let mut h = Xxh3Default::new();
    h.update(&(key.len() as u64).to_be_bytes());
    h.update(key);
    h.update(encoded_record);
    h.digest128()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleTree {
    pub leaves: [Digest; LEAVES],
}

impl Default for MerkleTree {
    fn default() -> Self {
        MerkleTree { leaves: [0; LEAVES] }
    }
}

impl MerkleTree {
    /// Build from `(key, digest)` pairs.
    pub fn from_digests<'a>(it: impl IntoIterator<Item = (&'a [u8], Digest)>) -> Self {
        let mut t = MerkleTree::default();
        for (k, d) in it {
            t.toggle(k, d);
        }
        t
    }

    /// Add or remove (XOR is its own inverse) a key digest.
    /// The pair is hashed again so that leaf XORs of structured digests
    /// cannot cancel out.
    pub fn toggle(&mut self, key: &[u8], d: Digest) {
        let mut h = Xxh3Default::new();
        h.update(&d.to_be_bytes());
        h.update(key);
        self.leaves[bucket_of(key)] ^= h.digest128();
    }

    /// Levels from leaves (index 0) up to the root (last, length 1).
    pub fn levels(&self) -> Vec<Vec<Digest>> {
        let mut levels = vec![self.leaves.to_vec()];
        while levels.last().map(|l| l.len()).unwrap_or(1) > 1 {
            let prev = levels.last().cloned().unwrap_or_default();
            let next = prev
                .chunks(2)
                .map(|c| {
                    let mut b = [0u8; 32];
                    b[..16].copy_from_slice(&c[0].to_be_bytes());
                    b[16..].copy_from_slice(&c.get(1).copied().unwrap_or(0).to_be_bytes());
                    xxh3_128(&b)
                })
                .collect();
            levels.push(next);
        }
        levels
    }

    pub fn root(&self) -> Digest {
        self.levels().last().and_then(|l| l.first().copied()).unwrap_or(0)
    }

    /// Leaf indices whose contents differ, found by descending only into
    /// subtrees whose hashes differ.
    pub fn diff_leaves(&self, other: &MerkleTree) -> Vec<usize> {
        let a = self.levels();
        let b = other.levels();
        let mut frontier = vec![0usize];
        for lvl in (0..a.len()).rev() {
            let mut next = Vec::new();
            for i in frontier {
                if a[lvl][i] != b[lvl][i] {
                    if lvl == 0 {
                        next.push(i);
                    } else {
                        next.push(2 * i);
                        next.push(2 * i + 1);
                    }
                }
            }
            frontier = next;
        }
        frontier
    }

    pub fn encode(&self) -> Vec<u8> {
        self.leaves.iter().flat_map(|d| d.to_be_bytes()).collect()
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != LEAVES * 16 {
            return None;
        }
        let mut t = MerkleTree::default();
        for (i, c) in b.chunks_exact(16).enumerate() {
            let mut a = [0u8; 16];
            a.copy_from_slice(c);
            t.leaves[i] = u128::from_be_bytes(a);
        }
        Some(t)
    }
}

/// Keys whose digests differ between two per-key digest maps (present on
/// one side only, or with different digests).
pub fn diff_keys(a: &BTreeMap<Vec<u8>, Digest>, b: &BTreeMap<Vec<u8>, Digest>) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = a.iter().filter(|(k, d)| b.get(*k) != Some(*d)).map(|(k, _)| k.clone()).collect();
    out.extend(b.keys().filter(|k| !a.contains_key(*k)).cloned());
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::test_util::proptest_config())]
        #[test]
        fn diff_finds_exactly_the_differing_keys(
            common in proptest::collection::btree_map(proptest::collection::vec(any::<u8>(), 1..12), any::<u128>(), 0..200),
            changed in proptest::collection::btree_set(0usize..200, 0..10),
            only_b in proptest::collection::btree_map(proptest::collection::vec(any::<u8>(), 13..16), any::<u128>(), 0..5),
        ) {
            let a = common.clone();
            let mut b = common.clone();
            let keys: Vec<_> = common.keys().cloned().collect();
            let mut expected = std::collections::BTreeSet::new();
            for i in changed {
                if let Some(k) = keys.get(i) {
                    b.insert(k.clone(), common[k].wrapping_add(1));
                    expected.insert(k.clone());
                }
            }
            for (k, d) in &only_b { b.insert(k.clone(), *d); expected.insert(k.clone()); }
            let ta = MerkleTree::from_digests(a.iter().map(|(k, d)| (k.as_slice(), *d)));
            let tb = MerkleTree::from_digests(b.iter().map(|(k, d)| (k.as_slice(), *d)));
            prop_assert_eq!(ta.root() == tb.root(), expected.is_empty());
            // restrict the per-key exchange to the differing leaves only
            let leaves: std::collections::BTreeSet<usize> = ta.diff_leaves(&tb).into_iter().collect();
            let pick = |m: &BTreeMap<Vec<u8>, Digest>| -> BTreeMap<Vec<u8>, Digest> {
                m.iter().filter(|(k, _)| leaves.contains(&bucket_of(k))).map(|(k, d)| (k.clone(), *d)).collect()
            };
            let found: std::collections::BTreeSet<_> = diff_keys(&pick(&a), &pick(&b)).into_iter().collect();
            prop_assert_eq!(found, expected);
            prop_assert_eq!(MerkleTree::decode(&ta.encode()), Some(ta));
        }
    }

    #[test]
    fn key_digest_hashes_length_key_and_record() {
        // the streaming form must equal the digest of the concatenation:
        // replicas of different versions compare these
        let mut buf = 3u64.to_be_bytes().to_vec();
        buf.extend_from_slice(b"key");
        buf.extend_from_slice(b"record bytes");
        assert_eq!(key_digest(b"key", b"record bytes"), xxh3_128(&buf));
    }

    #[test]
    fn toggle_is_incremental() {
        let mut t = MerkleTree::default();
        let empty = t.root();
        t.toggle(b"k", 7);
        assert_ne!(t.root(), empty);
        t.toggle(b"k", 7);
        assert_eq!(t.root(), empty);
    }
}
