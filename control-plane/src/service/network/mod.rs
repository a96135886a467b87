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
pub(crate) mod subnets;
mod vpcs;

pub(crate) use agent_view::host_network;
pub use filters::Filters;
pub use groups::{GroupSel, MAX_GROUPS_PER_INTERFACE, MAX_GROUPS_PER_VPC, MAX_RULES_PER_DIRECTION};
pub(crate) use interfaces::release_interfaces;
pub use subnets::{usable_addresses, MAX_SUBNETS_PER_VPC};
pub use vpcs::{DEFAULT_VPC_CIDR, MAX_VPCS};

use crate::error::{Result, ServiceError};
use crate::ids;
use nimbus_proto::api::ResourceTag;
use nimbus_proto::network::Cidr;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Device indexes 0 to 7.
pub const MAX_INTERFACES: usize = 8;

fn parse_cidr(s: &str, what: &str) -> Result<Cidr> {
    Cidr::parse(s).ok_or_else(|| {
        ServiceError::InvalidParameterValue(format!("Value ({s}) for parameter {what} is invalid. This is not a valid CIDR block."))
    })
}

pub(crate) fn db_cidr(s: &str) -> Result<Cidr> {
    Cidr::parse(s).ok_or_else(|| ServiceError::Internal(format!("bad CIDR in database: {s}")))
}

pub(crate) fn db_ip(s: &str) -> Result<Ipv4Addr> {
    s.parse().map_err(|_| ServiceError::Internal(format!("bad address in database: {s}")))
}

pub fn private_dns_name(ip: &str, region: &str) -> String {
    format!("ip-{}.{region}.compute.internal", ip.replace('.', "-"))
}

pub(crate) fn check_id(prefix: &str, id: &str, malformed: impl Fn(String) -> ServiceError) -> Result<()> {
    if ids::is_valid(prefix, id) {
        Ok(())
    } else {
        Err(malformed(id.to_string()))
    }
}

pub(crate) fn distinct(v: &[String]) -> Vec<String> {
    v.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect()
}

fn opt_list(v: &[String]) -> Option<Vec<String>> {
    (!v.is_empty()).then(|| v.to_vec())
}

fn tags_into(tags: &mut BTreeMap<String, Vec<(String, String)>>, id: &str) -> Vec<ResourceTag> {
    tags.remove(id).unwrap_or_default().into_iter().map(|(key, value)| ResourceTag { key, value }).collect()
}
