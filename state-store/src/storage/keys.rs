//! On-disk encodings: keys of the `data`, `graves` and `hints` keyspaces,
//! records and version vectors (bincode), and the `meta` keyspace's
//! integers.

use crate::clock::{Record, VersionVector};
use crate::error::StorageError;

pub fn encode_record(r: &Record) -> Result<Vec<u8>, StorageError> {
    bincode::serialize(r).map_err(|e| StorageError::Corrupt(e.to_string()))
}

pub fn decode_record(b: &[u8]) -> Result<Record, StorageError> {
    bincode::deserialize(b).map_err(|e| StorageError::Corrupt(e.to_string()))
}

pub(super) fn encode_vv(v: &VersionVector) -> Result<Vec<u8>, StorageError> {
    bincode::serialize(v).map_err(|e| StorageError::Corrupt(e.to_string()))
}

pub(super) fn decode_vv(b: &[u8]) -> Result<VersionVector, StorageError> {
    bincode::deserialize(b).map_err(|e| StorageError::Corrupt(e.to_string()))
}

pub(super) fn data_key(partition: u32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len());
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// `(partition, key)` of a data-keyspace key, the inverse of `data_key`.
pub(super) fn split_data_key(dk: &[u8]) -> Result<(u32, &[u8]), StorageError> {
    match dk {
        [a, b, c, d, key @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), key)),
        _ => Err(StorageError::Corrupt("data key shorter than its partition prefix".into())),
    }
}

pub(super) fn hint_prefix(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + key.len());
    k.extend_from_slice(&(key.len() as u16).to_be_bytes());
    k.extend_from_slice(key);
    k
}

pub(super) fn hint_key(key: &[u8], owner: &str) -> Vec<u8> {
    let mut k = hint_prefix(key);
    k.extend_from_slice(owner.as_bytes());
    k
}

pub(super) fn split_hint_key(hk: &[u8]) -> Option<(Vec<u8>, String)> {
    let len = u16::from_be_bytes([*hk.first()?, *hk.get(1)?]) as usize;
    let key = hk.get(2..2 + len)?.to_vec();
    let owner = String::from_utf8(hk.get(2 + len..)?.to_vec()).ok()?;
    Some((key, owner))
}

pub(super) fn get_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    if b.len() == 8 {
        a.copy_from_slice(b);
    }
    u64::from_be_bytes(a)
}
