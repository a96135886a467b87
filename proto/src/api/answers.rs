//! REST answers that wrap a list, an id or nothing: one type each, so the
//! server, the CLI and the tests' harness share the shape.

use super::{Address, NetworkInterface, SecurityGroup, SecurityGroupRule, StateChange, Subnet, Vpc};
use serde::{Deserialize, Serialize};

/// The answer of a call that returns nothing but success: `{}`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Done {}

/// `POST /v1/instances/stop`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoppingInstances {
    pub stopping_instances: Vec<StateChange>,
}

/// `POST /v1/instances/start`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StartingInstances {
    pub starting_instances: Vec<StateChange>,
}

/// `GET /v1/instances/{id}/console`: the console tail, base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConsoleOutput {
    pub instance_id: String,
    pub output: String,
    pub timestamp: Option<chrono::DateTime<chrono::Utc>>,
}

/// `POST /v1/hosts/{id}/reset-credential`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostReset {
    pub host_id: String,
}

/// `GET /v1/vpcs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VpcList {
    pub vpcs: Vec<Vpc>,
}

/// `GET /v1/subnets`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubnetList {
    pub subnets: Vec<Subnet>,
}

/// `GET /v1/security-groups`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecurityGroupList {
    pub security_groups: Vec<SecurityGroup>,
}

/// Rules of a group (`GET /v1/security-group-rules`) or those an
/// authorization added.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RuleList {
    pub rules: Vec<SecurityGroupRule>,
}

/// `GET /v1/addresses`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddressList {
    pub addresses: Vec<Address>,
}

/// `POST /v1/addresses/{id}/associate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Association {
    pub association_id: String,
}

/// `GET /v1/network-interfaces`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkInterfaceList {
    pub network_interfaces: Vec<NetworkInterface>,
}
