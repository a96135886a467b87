//! VPC networking: VPCs, subnets, security groups and their rules, network
//! interfaces and their private addresses, public addresses (Elastic IPs and
//! addresses assigned at launch from the operator's pool), and each host's
//! share of it all ([`HostNetwork`], computed for every assignments answer).
//!
//! Every account has a default VPC (172.31.0.0/16) with a default subnet
//! (a /20) per availability zone of the registered hosts and a default
//! security group, created lazily by [`Service::ensure_default_network`].
//!
//! Every change that alters some host's [`HostNetwork`] or an instance's
//! interfaces reaches the hosts it affects: the hosts the changing
//! transaction knows directly are bumped in it ([`fanout::bump_hosts`]: a launch's
//! placement hosts, an interface's own host), and what other hosts must
//! learn is recorded for the network relay, which bumps them after the
//! commit ([`relay`], where the reason is):
//! - a rule authorized or revoked: the hosts with an interface in the group;
//! - an interface added or removed (launch, termination confirmed, groups
//!   changed): the hosts with an interface in its VPC (their `peers` and
//!   remote interfaces), in its groups or in a group whose rules name them
//!   (their `members`);
//! - a subnet added or deleted, a host's underlay address changed: the
//!   hosts with an interface in the VPC;
//! - a public address associated or disassociated: the interface's host.
//!
//! Lock order: account → instances → VPCs → security groups → interfaces →
//! public addresses → hosts; launches lock no VPC or group.

pub(crate) mod addresses;
mod agent_view;
pub(crate) mod fanout;
mod filters;
mod groups;
mod interfaces;
pub mod relay;
mod rules;
pub(crate) mod subnets;
pub(crate) mod util;
mod vpcs;

pub(crate) use agent_view::host_network;
pub(crate) use filters::like_pattern;
pub use filters::Filters;
pub use groups::{GroupSel, MAX_GROUPS_PER_INTERFACE, MAX_GROUPS_PER_VPC, MAX_RULES_PER_DIRECTION};
pub(crate) use interfaces::release_interfaces;
pub use interfaces::MAX_INTERFACES;
pub use subnets::{usable_addresses, MAX_SUBNETS_PER_VPC};
pub use util::private_dns_name;
pub(crate) use util::{db_cidr, db_ip};
pub use vpcs::{DEFAULT_VPC_CIDR, MAX_VPCS};
