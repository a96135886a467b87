//! Nimbus state store: a Dynamo-style replicated key-value store for
//! instance metadata. See `README.md` in this crate for the design.
//!
//! Embedded use (the control plane's node and every agent's): start a
//! [`node::Node`] with a [`tcp::TcpTransport`], serve it with
//! [`tcp::serve_tls`], and talk to it through [`api::LocalClient`] (a
//! [`api::KvClient`]).
//!
//! The feature `test-support` adds what tests and tools need: the
//! in-process simulated network (`sim`), loopback ports (`local`), a
//! throwaway CA (`tls::dev`) and the network clients (`clients`:
//! `TcpClient`, `HttpClient`, `JsonClient`, `HttpTransport`). The feature
//! `tools` builds the binaries `store-node` and `store-bench`.

pub mod admin;
pub mod anti_entropy;
pub mod api;
#[cfg(feature = "test-support")]
pub mod clients;
pub mod clock;
pub mod codec;
pub mod coordinator;
pub mod error;
pub mod handoff;
pub mod http;
pub mod json;
#[cfg(feature = "test-support")]
pub mod local;
pub mod membership;
pub mod merge;
pub mod merkle;
pub mod metrics;
pub mod node;
pub mod ring;
pub mod rpc;
#[cfg(feature = "test-support")]
pub mod sim;
pub mod storage;
pub mod tcp;
pub mod tls;

pub use api::{get_reconciled, Context, GetResult, KvClient, LocalClient};
#[cfg(feature = "test-support")]
pub use clients::{HttpClient, HttpTransport, JsonClient, TcpClient};
pub use error::{RpcError, StorageError, StoreError};
pub use node::{Config, JoinState, Node, NotReady};
pub use storage::Fsync;
pub use tcp::TcpTransport;
pub use tls::{TlsConfig, TlsError};

#[cfg(test)]
pub(crate) mod test_util {
    /// Property tests run a fixed seed so CI is deterministic (plus the
    /// committed cases in `proptest-regressions/`, replayed first). Set
    /// `PROPTEST_RNG_SEED` (and e.g. `PROPTEST_CASES=5000`) to explore.
    pub fn proptest_config() -> proptest::test_runner::Config {
        let mut c = proptest::test_runner::Config::default();
        if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
            c.rng_seed = proptest::test_runner::RngSeed::Fixed(0x6e69_6d62_7573);
        }
        c
    }
}
