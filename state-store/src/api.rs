//! The typed client API, identical in-process and over HTTP.

use crate::clock::VersionVector;
use crate::error::{StoreError, MAX_CONTEXT_BYTES};
use crate::node::Node;
use async_trait::async_trait;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Opaque causal context returned by `get` and passed back to `put` or
/// `delete`. Its string form is URL-safe base64.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context(pub(crate) VersionVector);

impl Context {
    /// The empty context: a blind write, concurrent with everything stored.
    pub fn empty() -> Self {
        Context::default()
    }

    pub fn encode(&self) -> String {
        let bytes = bincode::serialize(&self.0).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn decode(s: &str) -> Result<Context, StoreError> {
        if s.is_empty() {
            return Ok(Context::empty());
        }
        if s.len() > MAX_CONTEXT_BYTES {
            return Err(StoreError::BadContext(format!("{} bytes exceeds the {} byte limit", s.len(), MAX_CONTEXT_BYTES)));
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).map_err(|e| StoreError::BadContext(e.to_string()))?;
        let vv: VersionVector = decode_limited(&bytes)?;
        Ok(Context(vv))
    }
}

/// Deserialize a context with a size limit so a hostile length prefix
/// cannot make us allocate huge buffers.
fn decode_limited<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StoreError> {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .reject_trailing_bytes()
        .with_limit(MAX_CONTEXT_BYTES as u64)
        .deserialize(b)
        .map_err(|e| StoreError::BadContext(e.to_string()))
}

/// Result of a read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetResult {
    /// Live concurrent values (siblings). Empty when the key is absent or
    /// deleted.
    #[serde(with = "bytes_vec")]
    pub values: Vec<Vec<u8>>,
    /// True when one of the surviving versions is a delete.
    pub deleted: bool,
    /// Pass this to `put`/`delete` to supersede every version read.
    pub context: Context,
}

impl GetResult {
    pub fn single(&self) -> Option<&[u8]> {
        match self.values.as_slice() {
            [v] => Some(v),
            _ => None,
        }
    }
}

/// Typed client operations.
#[async_trait]
pub trait KvClient: Send + Sync {
    async fn get(&self, key: &[u8]) -> Result<GetResult, StoreError>;
    /// Write `value` superseding the versions described by `context`;
    /// returns the context of the new version.
    async fn put(&self, key: &[u8], value: Vec<u8>, context: &Context) -> Result<Context, StoreError>;
    /// Write a tombstone superseding the versions described by `context`.
    async fn delete(&self, key: &[u8], context: &Context) -> Result<Context, StoreError>;
}

/// In-process client: the calling process hosts the node.
#[derive(Clone)]
pub struct LocalClient(pub Arc<Node>);

#[async_trait]
impl KvClient for LocalClient {
    async fn get(&self, key: &[u8]) -> Result<GetResult, StoreError> {
        self.0.get(key).await
    }
    async fn put(&self, key: &[u8], value: Vec<u8>, context: &Context) -> Result<Context, StoreError> {
        self.0.put(key, Some(value), context).await
    }
    async fn delete(&self, key: &[u8], context: &Context) -> Result<Context, StoreError> {
        self.0.put(key, None, context).await
    }
}

/// Read a key and, if it has several siblings, reconcile them with the
/// application's `merge` function and write the result back with the read
/// context, so the siblings are superseded. Returns the reconciled value.
pub async fn get_reconciled<C, F>(client: &C, key: &[u8], merge: F) -> Result<Option<Vec<u8>>, StoreError>
where
    C: KvClient + ?Sized,
    F: Fn(&[Vec<u8>]) -> Vec<u8>,
{
    let res = client.get(key).await?;
    match res.values.len() {
        0 => Ok(None),
        1 if !res.deleted => Ok(res.values.into_iter().next()),
        _ => {
            let merged = merge(&res.values);
            client.put(key, merged.clone(), &res.context).await?;
            Ok(Some(merged))
        }
    }
}

/// Serde helper: a list of byte strings encoded as bytes (not as
/// sequences of numbers), which bincode reads in one copy.
mod bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|b| serde_bytes::Bytes::new(b)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v: Vec<serde_bytes::ByteBuf> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|b| b.into_vec()).collect())
    }
}
