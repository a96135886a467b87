//! The Merkle trees' persistence: the snapshot saved in the `meta`
//! keyspace at a clean close (used once, by the next opening) and, when
//! there is none, their rebuild from one scan of the data.

use super::keys::split_data_key;
use crate::error::StorageError;
use crate::merkle::{key_digest, MerkleTree};
use fjall::Keyspace;

/// The Merkle trees as of a clean close (see [`super::Storage::merkle_snapshot_used`]).
pub(super) const MERKLE_SNAPSHOT: &[u8] = b"merkle-trees";
/// Format tag of the snapshot: magic and version.
const MERKLE_SNAPSHOT_MAGIC: &[u8; 4] = b"MRK1";

/// `MRK1 ‖ partitions (u32 BE) ‖ every partition's leaves (u128 BE)`.
pub(super) fn encode_trees(trees: &[MerkleTree]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + trees.len() * crate::merkle::LEAVES * 16);
    out.extend_from_slice(MERKLE_SNAPSHOT_MAGIC);
    out.extend_from_slice(&(trees.len() as u32).to_be_bytes());
    for t in trees {
        for l in &t.leaves {
            out.extend_from_slice(&l.to_be_bytes());
        }
    }
    out
}

/// The trees of a snapshot for `partitions` partitions; `None` when it is
/// not one (another format or partition count: then the trees are rebuilt).
pub(super) fn decode_trees(b: &[u8], partitions: u32) -> Option<Vec<MerkleTree>> {
    let rest = b.strip_prefix(MERKLE_SNAPSHOT_MAGIC)?;
    let (n, mut rest) = rest.split_first_chunk::<4>()?;
    if u32::from_be_bytes(*n) != partitions || rest.len() != partitions as usize * crate::merkle::LEAVES * 16 {
        return None;
    }
    let mut trees = Vec::with_capacity(partitions as usize);
    for _ in 0..partitions {
        let mut t = MerkleTree::default();
        for leaf in t.leaves.iter_mut() {
            let (d, r) = rest.split_first_chunk::<16>()?;
            *leaf = u128::from_be_bytes(*d);
            rest = r;
        }
        trees.push(t);
    }
    Some(trees)
}

/// The Merkle tree of every partition, from one scan of the data.
pub(super) fn build_trees(data: &Keyspace, partitions: u32) -> Result<Vec<MerkleTree>, StorageError> {
    let mut trees = vec![MerkleTree::default(); partitions as usize];
    for item in data.iter() {
        let (k, v) = item.into_inner().map_err(StorageError::engine)?;
        let (p, key) = split_data_key(&k)?;
        match trees.get_mut(p as usize) {
            Some(t) => t.toggle(key, key_digest(key, &v)),
            None => return Err(StorageError::Corrupt("data key outside the partition range".into())),
        }
    }
    Ok(trees)
}
