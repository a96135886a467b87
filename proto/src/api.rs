//! REST/JSON bodies of the `/v1` API.

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

/// `POST /v1/images`: registers an image whose files an agent can fetch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterImageRequest {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// `file:///dir` (on every host) or `http(s)://host/dir`: the files are below it.
    pub source_url: String,
    pub kernel: ImageFile,
    #[serde(default)]
    pub initrd: Option<ImageFile>,
    /// qcow2 base disk, the backing file of every instance's root overlay.
    pub root_disk: ImageFile,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Make this the image used when a launch names none.
    #[serde(default)]
    pub default: bool,
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
    pub kernel: ImageFile,
    pub initrd: Option<ImageFile>,
    pub root_disk: ImageFile,
    pub cmdline: String,
    pub default: bool,
    pub state: String,
    pub creation_date: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageList {
    pub images: Vec<Image>,
}
