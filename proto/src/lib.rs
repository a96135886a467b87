//! Wire types shared by the Nimbus control plane, host agent and CLI.
//!
//! Three groups, one module each:
//! - [`state`]: the instance lifecycle (EC2's states and codes) and what an agent observes.
//! - [`api`]: the REST/JSON bodies of `/v1` (what the CLI and users send and receive).
//! - [`agent`]: the host-agent protocol (`/v1/agent/*`): registration, assignments, reports.
//! - [`network`]: the VPC network a host must plumb (interfaces, VPCs, security groups).
//! - [`metadata`]: what the state store holds per instance (metadata document, console, status checks).
//!
//! Plain data only: no I/O, no business logic.

pub mod agent;
pub mod api;
pub mod image;
pub mod metadata;
pub mod network;
pub mod state;

pub use state::{Desired, InstanceState, ObservedState};

/// Whether `s` is exactly `len` lower-case hex digits.
pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
