//! Helpers of the network's files: CIDRs and addresses as a caller gives
//! them and as the database stores them, the DNS name of a private
//! address, ids checked by prefix, lists, tags of a described resource.

use crate::error::{Result, ServiceError};
use crate::ids;
use nimbus_proto::api::ResourceTag;
use nimbus_proto::network::Cidr;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

pub(crate) fn parse_cidr(s: &str, what: &str) -> Result<Cidr> {
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

pub(crate) fn opt_list(v: &[String]) -> Option<Vec<String>> {
    (!v.is_empty()).then(|| v.to_vec())
}

pub(crate) fn tags_into(tags: &mut BTreeMap<String, Vec<(String, String)>>, id: &str) -> Vec<ResourceTag> {
    tags.remove(id).unwrap_or_default().into_iter().map(|(key, value)| ResourceTag { key, value }).collect()
}
