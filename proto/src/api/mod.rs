//! REST/JSON bodies of the `/v1` API.

mod accounts;
mod answers;

pub use accounts::*;
pub use answers::*;

use crate::InstanceState;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Upper bound of decoded user-data, as EC2.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// Every error the API returns has this body, whatever the front door.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    pub request_id: String,
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunInstancesRequest {
    /// Image to boot (`ami-` + 17 hex). Absent: the default image.
    #[serde(default)]
    pub image_id: Option<String>,
    pub instance_type: String,
    #[serde(default = "one")]
    pub min_count: u32,
    #[serde(default = "one")]
    pub max_count: u32,
    #[serde(default)]
    pub availability_zone: Option<String>,
    /// Base64, at most [`MAX_USER_DATA_BYTES`] once decoded (as EC2's `UserData`).
    #[serde(default)]
    pub user_data: Option<String>,
    /// Idempotency token: a retry with the same token and parameters returns the
    /// original reservation instead of launching again.
    #[serde(default)]
    pub client_token: Option<String>,
    /// Key pair whose public key the instance gets through its metadata.
    #[serde(default)]
    pub key_name: Option<String>,
    /// Tags given to every launched instance.
    #[serde(default)]
    pub tags: Vec<ResourceTag>,
    /// Subnet of the primary interface (`subnet-...`); it fixes the zone.
    /// Absent: the default subnet of the zone the instance is placed in.
    #[serde(default)]
    pub subnet_id: Option<String>,
    /// Security groups of the primary interface (`sg-...`); none: the VPC's default group.
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    /// Security groups by name, in the interface's VPC (EC2's `SecurityGroup.N`).
    #[serde(default)]
    pub security_group_names: Vec<String>,
    /// The primary interface's private address (one instance only).
    #[serde(default)]
    pub private_ip_address: Option<String>,
    /// Map a public address from the operator's pool to the primary interface
    /// (absent: the subnet's MapPublicIpOnLaunch).
    #[serde(default)]
    pub associate_public_ip_address: Option<bool>,
    /// Interfaces given one by one (EC2's `NetworkInterface.N`): exclusive
    /// of the instance-level subnet, groups and address above.
    #[serde(default)]
    pub network_interfaces: Vec<NetworkInterfaceSpec>,
    /// Tags given to every interface the launch creates.
    #[serde(default)]
    pub network_interface_tags: Vec<ResourceTag>,
    /// How the instance's metadata service answers (EC2's `MetadataOptions`);
    /// absent: EC2's defaults (tokens optional, endpoint enabled, tags off).
    #[serde(default)]
    pub metadata_options: Option<MetadataOptionsRequest>,
}

/// EC2's `MetadataOptions` of RunInstances and ModifyInstanceMetadataOptions
/// (`POST /v1/instances/{id}/metadata-options`): each field left out keeps
/// its value (its default at launch).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetadataOptionsRequest {
    /// `optional` (IMDSv1 and v2) or `required` (session tokens only).
    #[serde(default)]
    pub http_tokens: Option<String>,
    /// `enabled` or `disabled`: whether the service answers at all.
    #[serde(default)]
    pub http_endpoint: Option<String>,
    /// `enabled` or `disabled`: tags under `meta-data/tags/instance/`.
    #[serde(default)]
    pub instance_metadata_tags: Option<String>,
    /// 1 to 64: the IP TTL of the token response (`PUT /latest/api/token`).
    #[serde(default)]
    pub http_put_response_hop_limit: Option<u32>,
    /// Only `disabled` (Nimbus serves IPv4 only).
    #[serde(default)]
    pub http_protocol_ipv6: Option<String>,
}

/// An instance's metadata options as DescribeInstances and
/// ModifyInstanceMetadataOptions show them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceMetadataOptions {
    /// `applied` once the metadata service serves them, `pending` until then.
    pub state: String,
    pub http_tokens: String,
    pub http_endpoint: String,
    pub instance_metadata_tags: String,
    pub http_put_response_hop_limit: u32,
    pub http_protocol_ipv6: String,
}

/// The answer of `POST /v1/instances/{id}/metadata-options`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModifyMetadataOptionsResult {
    pub instance_id: String,
    pub instance_metadata_options: InstanceMetadataOptions,
}

/// One interface of a launch.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceSpec {
    pub device_index: u32,
    #[serde(default)]
    pub subnet_id: Option<String>,
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    #[serde(default)]
    pub associate_public_ip_address: Option<bool>,
    /// Default true: the interface (and its address) goes with the instance.
    #[serde(default)]
    pub delete_on_termination: Option<bool>,
    #[serde(default)]
    pub private_ip_address: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResourceTag {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

fn one() -> u32 {
    1
}

impl RunInstancesRequest {
    /// One instance of `instance_type` from the default image, nothing else set.
    pub fn of_type(instance_type: &str) -> RunInstancesRequest {
        RunInstancesRequest {
            image_id: None,
            instance_type: instance_type.to_string(),
            min_count: 1,
            max_count: 1,
            availability_zone: None,
            user_data: None,
            client_token: None,
            key_name: None,
            tags: Vec::new(),
            subnet_id: None,
            security_group_ids: Vec::new(),
            security_group_names: Vec::new(),
            private_ip_address: None,
            associate_public_ip_address: None,
            network_interfaces: Vec::new(),
            network_interface_tags: Vec::new(),
            metadata_options: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateView {
    pub code: u16,
    pub name: InstanceState,
}

impl From<InstanceState> for StateView {
    fn from(s: InstanceState) -> Self {
        StateView { code: s.code(), name: s }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    pub reservation_id: String,
    pub image_id: String,
    pub instance_type: String,
    pub state: StateView,
    pub availability_zone: String,
    pub launch_time: DateTime<Utc>,
    pub ami_launch_index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    #[serde(default)]
    pub tags: Vec<ResourceTag>,
    /// The primary interface's private address (absent once terminated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_dns_name: Option<String>,
    /// The public (or Elastic) address of the primary interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// The security groups of the instance's interfaces.
    #[serde(default)]
    pub security_groups: Vec<GroupRef>,
    #[serde(default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// `127.0.0.1:PORT` on the instance's host, forwarded to the guest's
    /// port 22 (guests on QEMU user-mode networking; VPC guests are reached
    /// at their addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_options: Option<InstanceMetadataOptions>,
}

/// A security group named by id and name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupRef {
    pub group_id: String,
    pub group_name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vpc {
    pub vpc_id: String,
    pub cidr_block: String,
    pub is_default: bool,
    pub state: String,
    pub owner_id: String,
    #[serde(default)]
    pub tags: Vec<ResourceTag>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Subnet {
    pub subnet_id: String,
    pub vpc_id: String,
    pub cidr_block: String,
    pub availability_zone: String,
    pub default_for_az: bool,
    pub map_public_ip_on_launch: bool,
    /// Addresses still free (the first four and the last are reserved).
    pub available_ip_address_count: u64,
    pub state: String,
    pub owner_id: String,
    #[serde(default)]
    pub tags: Vec<ResourceTag>,
}

/// A security group and its allow rules.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecurityGroup {
    pub group_id: String,
    pub group_name: String,
    pub description: String,
    pub vpc_id: String,
    pub owner_id: String,
    pub ingress: Vec<SecurityGroupRule>,
    pub egress: Vec<SecurityGroupRule>,
    #[serde(default)]
    pub tags: Vec<ResourceTag>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecurityGroupRule {
    pub rule_id: String,
    pub group_id: String,
    pub egress: bool,
    /// `-1` (all), `tcp`, `udp` or `icmp`.
    pub protocol: String,
    /// Port range, or ICMP type and code; -1: all.
    pub from_port: i32,
    pub to_port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referenced_group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Rules to authorize or revoke (EC2's IpPermissions): one rule per CIDR
/// and per group.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IpPermission {
    /// `tcp`, `udp`, `icmp`, `-1`/`all` (or 6, 17, 1).
    pub protocol: String,
    #[serde(default)]
    pub from_port: Option<i32>,
    #[serde(default)]
    pub to_port: Option<i32>,
    #[serde(default)]
    pub cidrs: Vec<String>,
    #[serde(default)]
    pub group_ids: Vec<String>,
    /// Groups by name, in the group's VPC.
    #[serde(default)]
    pub group_names: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A public address of the account: an Elastic IP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Address {
    pub allocation_id: String,
    pub public_ip: String,
    pub domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_interface_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip_address: Option<String>,
    pub owner_id: String,
    #[serde(default)]
    pub tags: Vec<ResourceTag>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkInterface {
    pub network_interface_id: String,
    pub subnet_id: String,
    pub vpc_id: String,
    pub availability_zone: String,
    pub private_ip_address: String,
    pub private_dns_name: String,
    pub mac_address: String,
    /// `in-use` (attached) or `available`.
    pub status: String,
    pub groups: Vec<GroupRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<InterfaceAttachment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub association: Option<InterfaceAssociation>,
    pub owner_id: String,
    #[serde(default)]
    pub tags: Vec<ResourceTag>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterfaceAttachment {
    pub attachment_id: String,
    pub instance_id: String,
    pub device_index: u32,
    pub status: String,
    pub attach_time: Option<DateTime<Utc>>,
    pub delete_on_termination: bool,
}

/// The public address mapped to an interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterfaceAssociation {
    pub public_ip: String,
    /// Set for an Elastic IP, absent for an address assigned at launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
}

/// `POST /v1/vpcs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateVpcRequest {
    pub cidr_block: String,
}

/// `POST /v1/subnets`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateSubnetRequest {
    pub vpc_id: String,
    pub cidr_block: String,
    #[serde(default)]
    pub availability_zone: Option<String>,
}

/// `POST /v1/subnets/{id}/attributes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModifySubnetRequest {
    pub map_public_ip_on_launch: bool,
}

/// `POST /v1/security-groups`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateSecurityGroupRequest {
    pub group_name: String,
    pub description: String,
    /// Absent: the default VPC.
    #[serde(default)]
    pub vpc_id: Option<String>,
}

/// `POST /v1/security-groups/{id}/{ingress|egress}` (authorize) and
/// `.../revoke`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RulesRequest {
    pub rules: Vec<IpPermission>,
}

/// `POST /v1/addresses/{allocation_id}/associate`: an instance (its primary
/// interface) or an interface.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AssociateAddressRequest {
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub network_interface_id: Option<String>,
    #[serde(default)]
    pub private_ip_address: Option<String>,
    /// Move the address even if it is associated elsewhere.
    #[serde(default)]
    pub allow_reassociation: bool,
}

/// `POST /v1/instances/{id}/attributes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModifyInstanceRequest {
    /// A stopped instance's new type.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// The primary interface's security groups.
    #[serde(default)]
    pub security_group_ids: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reservation {
    pub reservation_id: String,
    pub owner_id: String,
    pub instances: Vec<Instance>,
}

/// `GET /v1/instances`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceList {
    pub instances: Vec<Instance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// `POST /v1/instances/terminate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TerminateInstancesRequest {
    pub instance_ids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateChange {
    pub instance_id: String,
    pub previous_state: StateView,
    pub current_state: StateView,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TerminateInstancesResponse {
    pub terminating_instances: Vec<StateChange>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Host {
    pub host_id: String,
    pub name: String,
    pub availability_zone: String,
    pub hypervisor: String,
    /// `available` while heartbeats arrive, `unreachable` when they stopped.
    pub status: String,
    pub total: Resources,
    pub used: Resources,
    pub instance_count: u32,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// `ok`, or `degraded` when the host's agent reports problems.
    #[serde(default = "healthy")]
    pub health: String,
    /// What the agent reported wrong with the host (slow guest starts and
    /// their likely cause, for instance).
    #[serde(default)]
    pub problems: Vec<String>,
}

fn healthy() -> String {
    "ok".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostList {
    pub hosts: Vec<Host>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceType {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceTypeList {
    pub instance_types: Vec<InstanceType>,
}

/// One file of an image: where it lies below the image's source and its digest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageFile {
    /// File name relative to the image's `source_url` (no `/`, no `..`).
    pub name: String,
    /// Lower-case hex SHA-256 of the file's content.
    pub sha256: String,
}

/// How a guest of the image boots.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BootStyle {
    /// Direct kernel boot: the host gives the kernel, initrd and command line.
    #[default]
    Kernel,
    /// The firmware boots the image's own boot loader from its disk (every
    /// standard cloud qcow2: Debian's, Ubuntu's).
    Disk,
}

impl BootStyle {
    pub fn as_str(self) -> &'static str {
        match self {
            BootStyle::Kernel => "kernel",
            BootStyle::Disk => "disk",
        }
    }
}

impl std::str::FromStr for BootStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kernel" => Ok(BootStyle::Kernel),
            "disk" => Ok(BootStyle::Disk),
            other => Err(format!("boot style {other:?} is neither kernel nor disk")),
        }
    }
}

/// `POST /v1/images` (operator): registers an image whose files an agent
/// can fetch, in one of two forms:
///
/// - files below a directory: `source_url` (`file:///dir` on every host, or
///   `http(s)://host/dir`), `root_disk`, and for direct kernel boot `kernel`
///   (and `initrd`, `cmdline`): what an image recipe's manifest describes;
/// - one qcow2 disk that boots itself (any standard cloud image):
///   `disk_url` (`file:///path/disk.qcow2` or `http(s)://...`) and its `sha256`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterImageRequest {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The directory holding the files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
    /// The one qcow2 file of a disk-booted image (instead of `source_url`
    /// and `root_disk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_url: Option<String>,
    /// Lower-case hex SHA-256 of the file at `disk_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Absent: `kernel` when a kernel is given, `disk` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootStyle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<ImageFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<ImageFile>,
    /// qcow2 base disk, the backing file of every instance's root overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk: Option<ImageFile>,
    /// The root disk's virtual size in bytes, if known (an instance type
    /// with a smaller disk cannot launch the image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk_size: Option<u64>,
    /// Kernel command line (direct kernel boot).
    #[serde(default)]
    pub cmdline: String,
    /// Make this the image used when a launch names none (it must be public).
    #[serde(default)]
    pub default: bool,
    /// Visible to every account. Absent: public when the operator owns it,
    /// private when registered for an account (`owner_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
    /// The account that owns the image; absent: the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
}

/// `POST /v1/instances/{id}/image`: an image made of the instance's disk
/// (EC2's CreateImage).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateImageRequest {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Copy the disk while the guest runs (crash-consistent); otherwise the
    /// guest is shut down cleanly first and started again after.
    #[serde(default)]
    pub no_reboot: bool,
    /// Tags of the new image.
    #[serde(default)]
    pub tags: Vec<ResourceTag>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Image {
    pub image_id: String,
    pub name: String,
    pub description: Option<String>,
    pub owner_id: String,
    /// Where the files come from: shown to the operator only (tenants see
    /// no host paths or internal URLs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
    #[serde(default)]
    pub boot: BootStyle,
    #[serde(default)]
    pub kernel: Option<ImageFile>,
    pub initrd: Option<ImageFile>,
    /// Absent while the image is being made.
    pub root_disk: Option<ImageFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk_size: Option<u64>,
    pub cmdline: String,
    pub default: bool,
    /// Visible to every account (else to its owner only).
    #[serde(default)]
    pub public: bool,
    /// `pending`, `available` or `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// The instance a CreateImage made it of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_instance_id: Option<String>,
    pub creation_date: DateTime<Utc>,
    #[serde(default)]
    pub tags: Vec<ResourceTag>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageList {
    pub images: Vec<Image>,
}
