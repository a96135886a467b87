//! The wire codec: bincode with fixed-width integers, as the framed
//! protocol's payloads (`tcp`) and the bincode HTTP bodies (`clients`)
//! carry them. Decoding is bounded, so a hostile length prefix cannot make
//! a node allocate more than the caller's limit.

use bincode::Options;
use serde::Serialize;

/// Decode a bincode payload or body (requests, replies) of at most `limit` bytes.
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8], limit: usize) -> Result<T, String> {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(limit as u64)
        .deserialize(b)
        .map_err(|e| e.to_string())
}

/// Encode a bincode payload or body.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).unwrap_or_default()
}
