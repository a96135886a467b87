//! Nimbus state store: a Dynamo-style replicated key-value store for
//! instance metadata. See `README.md` in this crate for the design.
//!
//! Embedded use: start a [`node::Node`] with a [`rpc::Transport`]
//! (`http::HttpTransport` plus `http::serve`, or `sim::SimNetwork` in
//! tests) and talk to it through [`api::LocalClient`]; remote use goes
//! through [`http::HttpClient`]. Both implement [`api::KvClient`].

pub mod admin;
pub mod anti_entropy;
pub mod api;
pub mod clock;
pub mod coordinator;
pub mod error;
pub mod handoff;
pub mod http;
pub mod membership;
pub mod merge;
pub mod merkle;
pub mod node;
pub mod ring;
pub mod rpc;
pub mod sim;
pub mod storage;
pub mod tcp;

pub use api::{get_reconciled, Context, GetResult, KvClient, LocalClient};
pub use error::{RpcError, StorageError, StoreError};
pub use http::{HttpClient, HttpTransport};
pub use tcp::{TcpClient, TcpTransport};
pub use node::{Config, Node};
