//! Test harness: a real control plane on a fresh PostgreSQL database, and
//! host agents in this process.
//!
//! Needs `DATABASE_URL` pointing at a PostgreSQL role that may create
//! databases (the README's test command starts one: `scripts/pg.sh`). Each
//! [`Cloud`] gets its own database, so tests run in parallel.
//!
//! Agents use libvirt's `test:///default` driver unless told otherwise: a
//! real libvirt code path whose state lives in this process while any
//! connection to it is open. [`Cloud::start`] holds one open, so domains
//! survive an agent's restart, as they would survive on a real host.
//!
//! A test's database is dropped with its [`Cloud`], passed or failed; the
//! first [`Cloud`] of a process also drops the databases of runs that
//! crashed (older than an hour). To show that "nothing happens", await
//! completed passes of an agent ([`AgentHandle::passes`]), never a sleep.
//! Bounds on real guests are multiplied by `NIMBUS_TEST_TIME_SCALE`
//! ([`scaled`]; default 1), for slow or shared machines.

mod agents;
pub mod baseline;
mod cloud;
mod database;
mod util;

pub use agents::*;
pub use cloud::*;
pub(crate) use database::*;
pub use util::*;

pub use nimbus_control_plane;
pub use nimbus_host_agent;
