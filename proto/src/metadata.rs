//! What Nimbus keeps in the state store (`nimbus-state-store`), per instance:
//!
//! - `instance/<id>`: the [`InstanceDocument`] the guest and tools read
//!   (identity, user-data, public keys, tags, network configuration,
//!   placement, state, metadata options). Written only by the control
//!   plane's outbox relay; every version is numbered.
//! - `console/<id>`: the tail of the guest's serial console
//!   ([`ConsoleRecord`]), written by the instance's host agent.
//! - `status/<id>`: the status checks the host observes ([`StatusRecord`]).
//!
//! Plain data only. How they are stored (the document sealed for its host
//! and signed by the control plane, the records signed by their host), and
//! which of concurrent siblings wins, is `nimbus-records`'.

use crate::agent::MetadataOptions;
use crate::network::Nic;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

pub const DOCUMENT_PREFIX: &str = "instance/";
pub const CONSOLE_PREFIX: &str = "console/";
pub const STATUS_PREFIX: &str = "status/";

/// The store key of an instance's metadata document.
pub fn document_key(instance_id: &str) -> String {
    format!("{DOCUMENT_PREFIX}{instance_id}")
}

/// The store key of an instance's console tail.
pub fn console_key(instance_id: &str) -> String {
    format!("{CONSOLE_PREFIX}{instance_id}")
}

/// The store key of an instance's status checks.
pub fn status_key(instance_id: &str) -> String {
    format!("{STATUS_PREFIX}{instance_id}")
}

/// The architecture every Nimbus guest has.
pub const ARCHITECTURE: &str = "x86_64";

/// One instance's metadata document, as the control plane publishes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceDocument {
    /// Bumped by every PostgreSQL transaction that changes the document
    /// (`instances.doc_version`): a replayed or reordered write of an
    /// older version never replaces a newer one.
    pub version: u64,
    pub instance_id: String,
    /// The owning account (`accountId` of the identity document).
    pub account_id: String,
    pub reservation_id: String,
    pub ami_launch_index: u32,
    pub image_id: String,
    pub instance_type: String,
    pub region: String,
    pub availability_zone: String,
    pub architecture: String,
    /// When the instance was launched (`pendingTime`).
    pub launch_time: DateTime<Utc>,
    /// EC2's state name (`pending`, `running`, ...).
    pub state: String,
    /// Raw user-data, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// SSH public keys, as (name, key).
    #[serde(default)]
    pub public_keys: Vec<(String, String)>,
    /// The instance's tags, sorted by key.
    #[serde(default)]
    pub tags: Vec<(String, String)>,
    #[serde(default)]
    pub options: MetadataOptions,
    /// The instance's VPC interfaces, by device index.
    #[serde(default)]
    pub nics: Vec<Nic>,
}

impl InstanceDocument {
    /// The primary interface's private address.
    pub fn private_ip(&self) -> Option<Ipv4Addr> {
        self.nics.iter().find(|n| n.device_index == 0).map(|n| n.private_ip)
    }

    /// EC2's instance identity document (`dynamic/instance-identity/document`),
    /// every field EC2 has, in its order.
    pub fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "accountId": self.account_id,
            "architecture": self.architecture,
            "availabilityZone": self.availability_zone,
            "billingProducts": null,
            "devpayProductCodes": null,
            "marketplaceProductCodes": null,
            "imageId": self.image_id,
            "instanceId": self.instance_id,
            "instanceType": self.instance_type,
            "kernelId": null,
            "pendingTime": self.launch_time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "privateIp": self.private_ip().map(|ip| ip.to_string()),
            "ramdiskId": null,
            "region": self.region,
            "version": "2017-09-30",
        })
    }
}

/// The tail of a guest's serial console, as its host last read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConsoleRecord {
    pub instance_id: String,
    /// At most [`crate::agent::CONSOLE_TAIL_BYTES`] bytes, base64.
    pub output: String,
    /// When the host read it.
    pub at: DateTime<Utc>,
}

/// The result of one status check.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    Passed,
    Failed,
    /// Not decided yet (the guest has not shown life since it started).
    Initializing,
}

impl Check {
    /// EC2's name of a check's detail (`passed`, `failed`, `initializing`).
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Passed => "passed",
            Check::Failed => "failed",
            Check::Initializing => "initializing",
        }
    }
}

/// What a host observes of one of its guests (DescribeInstanceStatus):
/// the system check (the host runs the guest's domain) and the instance
/// check (the guest showed life since it started: it wrote to its console
/// or asked its metadata service).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusRecord {
    pub instance_id: String,
    pub system: Check,
    pub instance: Check,
    /// When the host last observed a change.
    pub at: DateTime<Utc>,
}

#[cfg(any(test, feature = "test-support"))]
impl InstanceDocument {
    /// A running instance's document at `version`, tagged `Name=tag`, for tests.
    pub fn example(instance_id: &str, version: u64, tag: &str) -> InstanceDocument {
        InstanceDocument {
            version,
            instance_id: instance_id.into(),
            account_id: "123456789012".into(),
            reservation_id: "r-0123456789abcdef0".into(),
            ami_launch_index: 0,
            image_id: "ami-0123456789abcdef0".into(),
            instance_type: "t3.nano".into(),
            region: "nimbus-1".into(),
            availability_zone: "az1".into(),
            architecture: ARCHITECTURE.into(),
            launch_time: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            state: "running".into(),
            user_data: None,
            public_keys: vec![],
            tags: vec![("Name".into(), tag.into())],
            options: MetadataOptions::default(),
            nics: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(version: u64, tag: &str) -> InstanceDocument {
        InstanceDocument::example("i-0123456789abcdef0", version, tag)
    }

    #[test]
    fn the_identity_document_has_every_field_of_ec2s() {
        let mut d = doc(1, "a");
        d.nics.push(Nic {
            eni_id: "eni-0123456789abcdef0".into(),
            device_index: 0,
            mac: "02:00:00:00:00:01".into(),
            private_ip: Ipv4Addr::new(172, 31, 0, 5),
            subnet: crate::network::Cidr { addr: Ipv4Addr::new(172, 31, 0, 0), prefix: 20 },
            gateway: Ipv4Addr::new(172, 31, 0, 1),
            vpc_id: "vpc-0123456789abcdef0".into(),
            vni: 7,
            public_ip: None,
            group_ids: vec!["sg-0123456789abcdef0".into()],
        });
        let id = d.identity();
        let keys: Vec<&str> = id.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
        let mut expected = vec![
            "accountId",
            "architecture",
            "availabilityZone",
            "billingProducts",
            "devpayProductCodes",
            "marketplaceProductCodes",
            "imageId",
            "instanceId",
            "instanceType",
            "kernelId",
            "pendingTime",
            "privateIp",
            "ramdiskId",
            "region",
            "version",
        ];
        expected.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, expected);
        assert_eq!(id["privateIp"], "172.31.0.5");
        assert_eq!(id["pendingTime"], "2023-11-14T22:13:20Z");
        assert_eq!(id["region"], "nimbus-1");
    }
}
