//! The host-agent protocol: `/v1/agent/*`.
//!
//! The agent registers once with the join token and receives a per-host
//! credential. It then loops: long-poll its assignments (the desired state of
//! every instance placed on it), converge libvirt to them, report what it
//! observed. The loop is level-triggered: each assignment list is complete, so
//! an agent that crashed or missed a notification repairs everything on its
//! next pass.

use crate::api::{BootStyle, ImageFile};
use crate::ObservedState;
use serde::{Deserialize, Serialize};

/// `POST /v1/agent/register`, authenticated by the join token.
///
/// A new name registers a new host. A name already registered is taken only
/// with proof: `current_credential`, the host's present bearer credential
/// (its secret is then rotated, its capacity updated), or after the operator
/// reset the host's credential (`POST /v1/hosts/{id}/reset-credential`). The
/// join token alone never takes over a host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterHost {
    /// Stable, unique name of the machine; re-registering the same name keeps its host id.
    pub name: String,
    pub availability_zone: String,
    /// `kvm`, `qemu`, `xen` or `test`.
    pub hypervisor: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    /// `<host_id>.<secret>` of the host registered under `name`, if the caller holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_credential: Option<String>,
    /// The host's address on the underlay network (VXLAN tunnels end there):
    /// present when the host runs the VPC data plane, absent for a host in
    /// QEMU user-mode networking (its guests reach only the metadata service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<std::net::Ipv4Addr>,
    /// The secret the host is to hold after this registration
    /// ([`HOST_SECRET_LEN`] hex digits), made and saved by the agent before
    /// it asks: if the answer is lost (the agent stopped before saving it),
    /// the agent asks again with the same secret, which proves the name is
    /// its own. Without it the control plane makes the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Length of a host secret: 32 random bytes, hex.
pub const HOST_SECRET_LEN: usize = 64;

/// Whether `s` has the form of a host secret.
pub fn is_host_secret(s: &str) -> bool {
    crate::is_lower_hex(s, HOST_SECRET_LEN)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostCredential {
    pub host_id: String,
    /// Secret shown once; sent back as `Authorization: Bearer <host_id>.<secret>`.
    pub secret: String,
}

impl HostCredential {
    pub fn bearer(&self) -> String {
        format!("{}.{}", self.host_id, self.secret)
    }
}

/// What the control plane wants of one instance.
pub use crate::state::Desired as DesiredState;

/// The image an instance boots: its files, each pinned by its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageSpec {
    pub image_id: String,
    #[serde(default)]
    pub boot: BootStyle,
    /// The directory the kernel and initrd (and the root disk, unless it is
    /// in the store) lie below: `file:///dir` or `http(s)://host/dir`.
    #[serde(default)]
    pub source_url: Option<String>,
    /// The root disk is in the control plane's image store (images made by
    /// CreateImage): fetched with `GET /v1/agent/images/{sha256}`.
    #[serde(default)]
    pub root_disk_in_store: bool,
    /// Direct kernel boot only.
    #[serde(default)]
    pub kernel: Option<ImageFile>,
    pub initrd: Option<ImageFile>,
    pub root_disk: ImageFile,
    pub cmdline: String,
}

/// An image to make of the instance's disk (CreateImage), asked for in the
/// instance's assignment until it is made or has failed: the agent flattens
/// the guest's disk into one qcow2 (after a clean shutdown unless
/// `no_reboot`, then starts the guest again), and uploads it with
/// `PUT /v1/agent/images/{image_id}`, which makes the image available.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageTask {
    pub image_id: String,
    pub no_reboot: bool,
}

/// Headers of `PUT /v1/agent/images/{image_id}`: the digest the agent
/// computed of the body (the control plane checks it while it stores the
/// body) and the disk's virtual size in bytes.
pub const UPLOAD_SHA256_HEADER: &str = "x-nimbus-sha256";
pub const UPLOAD_VIRTUAL_SIZE_HEADER: &str = "x-nimbus-virtual-size";

/// An image the agent could not make (CreateImage) or whose file differs
/// from its digest: the control plane marks it `failed` with `message`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageProblem {
    pub image_id: String,
    pub message: String,
}

/// What the metadata service answers for the instance, as of the
/// assignment (the state store's document, [`crate::metadata::InstanceDocument`],
/// is newer when its version is higher).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceMetadata {
    /// The document version this copy was taken at (`instances.doc_version`).
    #[serde(default)]
    pub version: u64,
    pub instance_id: String,
    pub reservation_id: String,
    pub instance_type: String,
    pub image_id: String,
    pub availability_zone: String,
    pub ami_launch_index: u32,
    pub owner_id: String,
    /// SSH public keys served at `public-keys/N/openssh-key`, as (name, key).
    #[serde(default)]
    pub public_keys: Vec<(String, String)>,
    /// How the metadata service answers this instance (EC2's MetadataOptions).
    #[serde(default)]
    pub options: MetadataOptions,
    /// The instance's tags, served under `meta-data/tags/instance/` when
    /// `options.instance_metadata_tags` allows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<(String, String)>,
}

/// EC2's `MetadataOptions` of an instance.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct MetadataOptions {
    /// IMDSv2 only: every request needs a session token (`PUT /latest/api/token`).
    pub tokens_required: bool,
    /// The service answers at all (EC2's `HttpEndpoint`).
    pub endpoint_enabled: bool,
    /// Tags under `meta-data/tags/instance/` (EC2's `InstanceMetadataTags`).
    pub tags_enabled: bool,
    /// The IP TTL of the IMDSv2 token response (EC2's
    /// `HttpPutResponseHopLimit`, 1 to 64): with 1, a token never reaches
    /// a container or a host routed behind the guest.
    #[serde(default = "default_hop_limit")]
    pub hop_limit: u8,
}

fn default_hop_limit() -> u8 {
    1
}

impl Default for MetadataOptions {
    /// EC2's defaults: tokens optional, endpoint enabled, tags off, one hop.
    fn default() -> Self {
        MetadataOptions { tokens_required: false, endpoint_enabled: true, tags_enabled: false, hop_limit: default_hop_limit() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    pub instance_id: String,
    pub desired: DesiredState,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image: ImageSpec,
    /// Raw user-data, base64.
    pub user_data: Option<String>,
    pub metadata: InstanceMetadata,
    /// How many reboots the user asked for, ever. The agent reboots a
    /// running guest once for each request it has not yet carried out.
    #[serde(default)]
    pub reboots: i64,
    /// The instance's network interfaces, by device index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::network::Nic>,
    /// Images to make of this instance's disk, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub create_images: Vec<ImageTask>,
}

/// `GET /v1/agent/assignments?after=G&wait_ms=T`. Returns at once when the
/// host's generation is past `after`, otherwise when it changes or after
/// `wait_ms`. With `full`, the list is every instance that holds capacity on
/// the host (a resync: anything else of this host's must go); without, only
/// the instances whose desired state changed after `after`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignments {
    pub generation: i64,
    pub full: bool,
    pub instances: Vec<Assignment>,
    /// The host's whole share of the VPC network, in every answer (full or
    /// not): a rule change reaches the host as a delta with no instance in it.
    #[serde(default)]
    pub network: crate::network::HostNetwork,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Observation {
    pub instance_id: String,
    pub state: ObservedState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The reboot requests carried out so far (see [`Assignment::reboots`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboots: Option<i64>,
    /// The end of the guest's serial console log (at most
    /// [`CONSOLE_TAIL_BYTES`]), base64, when it changed since the last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// `127.0.0.1:PORT` on the host forwarded to the guest's port 22 (QEMU
    /// user-mode networking), when the guest has a domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_endpoint: Option<String>,
}

/// How much of the console log an agent ships (EC2 returns the last 64 KiB).
pub const CONSOLE_TAIL_BYTES: usize = 64 * 1024;

/// `POST /v1/agent/report`: also the host's heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    pub observations: Vec<Observation>,
    /// What the agent finds wrong with its host, as of this report (empty
    /// when healthy); shown by `describe-hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Images that could not be made, or whose file differs from its digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageProblem>,
}

/// At most this many image problems per report.
pub const MAX_IMAGE_PROBLEMS: usize = 256;

/// At most this many host problems per report, each at most
/// [`MAX_PROBLEM_BYTES`].
pub const MAX_PROBLEMS: usize = 8;
pub const MAX_PROBLEM_BYTES: usize = 1024;

/// `POST /v1/agent/certificate`, authenticated by the host's credential:
/// the control plane's CA certifies the host's own key (generated on the
/// host; the private key never leaves it). The certificate serves the
/// host's state-store node (its address as IP SAN) and the agent's side of
/// mutual TLS with the control plane.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    /// The public key, an uncompressed ECDSA P-256 point (65 bytes), base64.
    pub public_key: String,
    /// `ip:port` where the host's store node listens (its node id), if it runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_address: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertificateGrant {
    /// The host's certificate, PEM.
    pub certificate_pem: String,
    /// The control plane's CA certificate, PEM: every store node and the
    /// control plane present certificates it signed.
    pub ca_pem: String,
    pub not_after: chrono::DateTime<chrono::Utc>,
    /// Store nodes to join the ring through (`ip:port`): the control
    /// plane's and other hosts'.
    pub store_seeds: Vec<String>,
    /// The control plane's document keys (key id → uncompressed P-256
    /// point, base64): what signs instance documents and the revocation
    /// list in the state store (see `nimbus-records`).
    #[serde(default)]
    pub document_keys: std::collections::BTreeMap<String, String>,
}

/// The name the control plane's certificate carries (a DNS SAN no host
/// certificate ever has): agents accept a control plane, and store nodes
/// an administrator, only with a certificate valid for it.
pub const CONTROL_PLANE_NAME: &str = "control-plane.nimbus.internal";

/// The state-store key of the revocation list (certificates of reset
/// hosts), signed by the control plane's document key.
pub const REVOCATION_KEY: &str = "cluster/revoked";
