//! Node-to-node messages and the transport abstraction.
//!
//! The node logic only sees [`Transport`]; production uses the framed
//! protocol ([`crate::tcp::TcpTransport`]); with the feature `test-support`,
//! `clients::HttpTransport` carries the same messages over HTTP and the
//! fault tests use the in-process `sim::SimNetwork`, which can cut links,
//! kill nodes and drop requests or replies with a seeded random generator.

use crate::api::GetResult;
use crate::clock::VersionVector;
use crate::clock::{NodeId, Record};
use crate::error::{RpcError, StoreError};
use crate::membership::{Member, RingParams};
use crate::merkle::Digest;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Replica read: stored data merged with hints held for the key.
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Replica write: merge `record` into the key.
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        record: Record,
    },
    /// Sloppy-quorum write meant for `owner`.
    Hinted {
        owner: NodeId,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        record: Record,
    },
    /// Push-pull gossip of membership and heartbeats, with the sender's
    /// ring parameters (a receiver whose parameters differ refuses it with
    /// `Response::Failed(StoreError::RingMismatch)`).
    Gossip { from: NodeId, params: RingParams, members: Vec<Member> },
    /// Encoded Merkle leaves of one partition.
    MerkleLeaves { partition: u32 },
    /// Per-key digests of the given leaves of one partition.
    KeyDigests { partition: u32, leaves: Vec<u32> },
    /// Records of several keys (replica data only).
    GetMany { keys: Vec<Vec<u8>> },
    /// Merge several records.
    PutMany { items: Vec<(Vec<u8>, Record)> },
    /// Digest of the key's record if it is a tombstone.
    GcProbe {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Collect the key's tombstone if its digest still matches (it leaves
    /// a grave: see `Storage::bury_if`).
    GcDrop {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        digest: Digest,
    },
    /// Anti-entropy: these keys were collected; join each version vector
    /// into the key's grave and drop the siblings it covers.
    Bury { items: Vec<(Vec<u8>, VersionVector)> },
    /// Client write forwarded to a preference-list node to coordinate.
    Coordinate {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
        context: VersionVector,
    },
    /// Client API over the framed transport: a quorum read.
    ClientGet {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Client API over the framed transport: a quorum write (None deletes).
    ClientPut {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
        context: VersionVector,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Ok,
    Record(Option<Record>),
    Members(Vec<Member>),
    Leaves(#[serde(with = "serde_bytes")] Vec<u8>),
    Digests(Vec<(Vec<u8>, Digest)>),
    Records(Vec<(Vec<u8>, Option<Record>)>),
    Digest(Option<Digest>),
    Error(String),
    /// A coordinated write succeeded; the clock of the new version.
    Written(VersionVector),
    /// Result of a client read.
    Got(GetResult),
    /// A coordinated write failed with a client-visible error.
    Failed(StoreError),
}

/// Something that can answer node-to-node requests.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, req: Request) -> Response;
}

/// Delivers a request to another node and returns its response. Timeouts
/// are applied by the caller.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn call(&self, from: &NodeId, to: &NodeId, req: Request) -> Result<Response, RpcError>;
}
