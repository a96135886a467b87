//! `nimbus`: the command-line client of the Nimbus REST API.
//!
//! - [`args`]: the command line and its conversion into requests;
//! - [`client`]: typed HTTP calls of `/v1`;
//! - [`output`]: tables and JSON;
//! - [`manifest`]: image recipe manifests → image registrations;
//! - [`wait`]: `--wait` polling;
//! - [`commands`]: one function per subcommand;
//! - [`error`]: the error type and exit codes.

pub mod args;
pub mod client;
pub mod commands;
pub mod error;
pub mod manifest;
pub mod output;
pub mod wait;
