//! Typed errors for every layer.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Maximum key length in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Maximum value length in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Maximum encoded causal-context length in bytes.
pub const MAX_CONTEXT_BYTES: usize = 64 * 1024;

/// Errors of the on-disk engine.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("corrupt stored record: {0}")]
    Corrupt(String),
    #[error("storage writer has stopped")]
    Closed,
}

impl StorageError {
    pub fn engine<E: std::fmt::Display>(e: E) -> Self {
        StorageError::Engine(e.to_string())
    }
}

/// Errors of one node-to-node call.
#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcError {
    /// Not delivered: the connection could not be made or the request
    /// could not be handed to it. Safe to send elsewhere.
    #[error("node {0} is unreachable")]
    Unreachable(String),
    /// The request was sent but the connection failed before its reply
    /// arrived: it may have taken effect.
    #[error("connection to {0} failed after the request was sent")]
    Lost(String),
    #[error("request to {0} timed out")]
    Timeout(String),
    /// The TLS handshake failed (certificate refused on either side, or
    /// the peer does not speak TLS): nothing was sent.
    #[error("TLS handshake with {node} failed: {reason}")]
    Tls { node: String, reason: String },
    #[error("node {node} failed the request: {msg}")]
    Remote { node: String, msg: String },
    /// A message could not be encoded, or a reply decoded (the request
    /// may then have taken effect).
    #[error("message encoding: {0}")]
    Codec(String),
}

/// Errors returned to clients of the store.
#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreError {
    #[error("key must not be empty")]
    EmptyKey,
    #[error("key is {len} bytes; the limit is {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value is {len} bytes; the limit is {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("malformed causal context: {0}")]
    BadContext(String),
    #[error("quorum not reached: {got} of {needed} replicas acknowledged")]
    QuorumFailed { got: usize, needed: usize },
    #[error("coordinator {0} did not answer in time; the write may or may not have been applied")]
    OutcomeUnknown(String),
    #[error("invalid configuration: {0}")]
    BadConfig(String),
    #[error("the ring has no members")]
    NoNodes,
    #[error("storage: {0}")]
    Storage(String),
    #[error("transport: {0}")]
    Transport(String),
    /// The TLS handshake failed or the node refused this client's
    /// certificate: nothing was sent.
    #[error("TLS: {0}")]
    Tls(String),
    /// A node's ring parameters disagree with this one's: it is refused
    /// (at its join, and its gossip afterwards).
    #[error("ring parameters disagree: node {node} has {theirs}, node {me} has {ours}; every node of a cluster must be started with the same --n and --partitions")]
    RingMismatch { me: String, ours: crate::membership::RingParams, node: String, theirs: crate::membership::RingParams },
    /// This node's join was refused (see the error inside); it serves no
    /// client operations.
    #[error("this node is not part of the ring: {0}")]
    NotInRing(Box<StoreError>),
}

impl StoreError {
    /// The error's name, as the JSON API's `code`.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::EmptyKey => "EmptyKey",
            StoreError::KeyTooLarge { .. } => "KeyTooLarge",
            StoreError::ValueTooLarge { .. } => "ValueTooLarge",
            StoreError::BadContext(_) => "BadContext",
            StoreError::QuorumFailed { .. } => "QuorumFailed",
            StoreError::OutcomeUnknown(_) => "OutcomeUnknown",
            StoreError::BadConfig(_) => "BadConfig",
            StoreError::NoNodes => "NoNodes",
            StoreError::Storage(_) => "Storage",
            StoreError::Transport(_) => "Transport",
            StoreError::Tls(_) => "Tls",
            StoreError::RingMismatch { .. } => "RingMismatch",
            StoreError::NotInRing(_) => "NotInRing",
        }
    }

    /// The HTTP status of the JSON API for this error: 400 for bad input
    /// (nothing was written), 503 when the store cannot serve now, 504
    /// when a write's outcome is unknown, 500 otherwise.
    pub fn http_status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            StoreError::EmptyKey | StoreError::KeyTooLarge { .. } | StoreError::ValueTooLarge { .. } | StoreError::BadContext(_) => {
                StatusCode::BAD_REQUEST
            }
            StoreError::QuorumFailed { .. } | StoreError::NoNodes | StoreError::NotInRing(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::OutcomeUnknown(_) => StatusCode::GATEWAY_TIMEOUT,
            StoreError::BadConfig(_)
            | StoreError::Storage(_)
            | StoreError::Transport(_)
            | StoreError::Tls(_)
            | StoreError::RingMismatch { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StorageError> for StoreError {
    fn from(e: StorageError) -> Self {
        StoreError::Storage(e.to_string())
    }
}

/// Validate a key against the documented limits.
pub fn check_key(key: &[u8]) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::KeyTooLarge { len: key.len(), max: MAX_KEY_BYTES });
    }
    Ok(())
}

/// Validate a value against the documented limits.
pub fn check_value(value: &[u8]) -> Result<(), StoreError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(StoreError::ValueTooLarge { len: value.len(), max: MAX_VALUE_BYTES });
    }
    Ok(())
}
