//! Control-plane configuration (flags or environment; see `nimbus-control-plane --help`).

use clap::{Parser, ValueEnum};
use nimbus_proto::network::Cidr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the scheduler chooses among the hosts of one availability zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlacementPolicy {
    /// Fill the fullest host that still fits (fewer hosts in use, room kept for large launches).
    Pack,
    /// Use the emptiest host (fault isolation, less noisy neighbours).
    Spread,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "nimbus-control-plane", about = "Nimbus control plane: REST API, scheduler, host registry")]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "NIMBUS_LISTEN", default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Bearer token of the administrator (all `/v1` calls in this release).
    #[arg(long, env = "NIMBUS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
    /// Token a host agent presents once to register and receive its own credential.
    #[arg(long, env = "NIMBUS_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: String,
    /// Placement within an availability zone.
    #[arg(long, env = "NIMBUS_PLACEMENT", value_enum, default_value = "spread")]
    pub placement: PlacementPolicy,
    /// A host whose last heartbeat is older than this gets no new instances.
    #[arg(long, env = "NIMBUS_HOST_TIMEOUT_SECS", default_value_t = 30)]
    pub host_timeout_secs: u64,
    /// Largest MaxCount of one launch.
    #[arg(long, env = "NIMBUS_MAX_COUNT", default_value_t = 100)]
    pub max_count: u32,
    /// 64 hex digits: the AES-256 key that seals access-key secrets (needed
    /// to create accounts and to verify SigV4 requests).
    #[arg(long, env = "NIMBUS_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Region name the EC2 front door reports.
    #[arg(long, env = "NIMBUS_REGION", default_value = "nimbus-1")]
    pub region: String,
    /// Size of the PostgreSQL connection pool.
    #[arg(long, env = "NIMBUS_DB_CONNECTIONS", default_value_t = 20)]
    pub db_connections: u32,
    /// Instances an account may hold (pending to stopped) unless the operator
    /// set its own limit (`nimbus admin set-account-limits`).
    #[arg(long, env = "NIMBUS_DEFAULT_MAX_INSTANCES", default_value_t = 256)]
    pub default_max_instances: u32,
    /// RSA key pairs an account may generate at once (each is a CPU burst);
    /// then one every `--rsa-key-interval-secs`.
    #[arg(long, env = "NIMBUS_RSA_KEY_BURST", default_value_t = 5)]
    pub rsa_key_burst: u32,
    #[arg(long, env = "NIMBUS_RSA_KEY_INTERVAL_SECS", default_value_t = 60)]
    pub rsa_key_interval_secs: u64,
    /// vCPUs an account's instances may hold unless the operator set its own limit.
    #[arg(long, env = "NIMBUS_DEFAULT_MAX_VCPUS", default_value_t = 1024)]
    pub default_max_vcpus: u32,
    /// The public addresses Elastic IPs and auto-assigned public IPs come
    /// from, e.g. 198.51.100.0/24 (its first and last address are never
    /// handed out). None: AllocateAddress and public IPs fail
    /// (InsufficientAddressCapacity), and default subnets do not map public
    /// addresses on launch.
    #[arg(long, env = "NIMBUS_PUBLIC_POOL", value_parser = parse_pool)]
    pub public_pool: Option<Cidr>,
    /// Elastic IPs an account may hold unless the operator set its own limit.
    #[arg(long, env = "NIMBUS_DEFAULT_MAX_ELASTIC_IPS", default_value_t = 5)]
    pub default_max_elastic_ips: u32,
    /// Images (pending or available) an account may hold unless the
    /// operator set its own limit: CreateImage beyond it is refused.
    #[arg(long, env = "NIMBUS_DEFAULT_MAX_IMAGES", default_value_t = 100)]
    pub default_max_images: u32,
    /// Bytes an account's images may take in the image store unless the
    /// operator set its own limit: an upload beyond it is refused (and its
    /// image fails). 500 GiB.
    #[arg(long, env = "NIMBUS_DEFAULT_MAX_IMAGE_BYTES", default_value_t = 500 << 30)]
    pub default_max_image_bytes: u64,
    /// Directory of the image store: the disks of the images CreateImage
    /// makes (uploaded by the instance's agent, fetched by every host).
    #[arg(long, env = "NIMBUS_IMAGE_STORE_DIR", default_value = "/var/lib/nimbus/image-store")]
    pub image_store_dir: PathBuf,
    /// Largest image (bytes) an agent may upload to the store.
    #[arg(long, env = "NIMBUS_MAX_IMAGE_BYTES", default_value_t = 256 << 30)]
    pub max_image_bytes: u64,
    /// Where this control plane's state-store node listens (mutual TLS with
    /// certificates of the control plane's CA); also its node id, so an
    /// address the hosts reach (its IP is in the node's certificate).
    #[arg(long, env = "NIMBUS_STORE_LISTEN", default_value = "127.0.0.1:7400")]
    pub store_listen: SocketAddr,
    /// The store node's data directory.
    #[arg(long, env = "NIMBUS_STORE_DIR", default_value = "/var/lib/nimbus/control-plane/store")]
    pub store_dir: PathBuf,
    /// Other store nodes to join the ring through (comma-separated `ip:port`),
    /// e.g. other control planes' nodes. Hosts are told the rest at registration.
    #[arg(long, env = "NIMBUS_STORE_SEEDS", value_delimiter = ',')]
    pub store_seeds: Vec<String>,
    /// The TLS listener (the whole API; agents' certificates checked on
    /// the agent protocol): agents connect with `--control-plane
    /// https://ADDR --control-plane-ca ca.pem`. With it, the plaintext
    /// --listen refuses the agent protocol.
    #[arg(long, env = "NIMBUS_AGENT_LISTEN")]
    pub agent_listen: Option<SocketAddr>,
    /// Local development only: with --agent-listen, still serve the agent
    /// protocol on the plaintext --listen (credentials then travel unencrypted).
    #[arg(long, env = "NIMBUS_INSECURE_AGENT_PLAINTEXT")]
    pub insecure_agent_plaintext: bool,
    /// Names (DNS names or IP addresses) the control plane's certificate
    /// carries besides the IPs of --store-listen and --agent-listen.
    #[arg(long, env = "NIMBUS_TLS_NAMES", value_delimiter = ',')]
    pub tls_names: Vec<String>,
    /// Write the CA certificate (public; what agents trust with
    /// --control-plane-ca) to this file at start.
    #[arg(long, env = "NIMBUS_CA_CERT_OUT")]
    pub ca_cert_out: Option<PathBuf>,
    /// Publish instance documents from the outbox to the state store
    /// (`--outbox-relay false`: tests drive the relay by hand).
    #[arg(long, env = "NIMBUS_OUTBOX_RELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub outbox_relay: bool,
    /// A terminated instance is forgotten this long after it ended: its
    /// rows, its client token, and its document, console tail and status
    /// checks in the state store (DescribeInstances shows it for the first
    /// hour only). At least an hour.
    #[arg(long, env = "NIMBUS_TERMINATED_RETENTION_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(crate::service::retention::MIN_RETENTION_SECS..))]
    pub terminated_retention_secs: u64,
}

/// A public pool: an IPv4 network of /16 to /32.
fn parse_pool(s: &str) -> Result<Cidr, String> {
    let c = Cidr::parse(s).ok_or_else(|| format!("{s:?} is not an IPv4 network a.b.c.d/n"))?;
    if c.prefix < 16 {
        return Err("the public pool must be a /16 or smaller".into());
    }
    Ok(c)
}

impl Config {
    pub fn host_timeout(&self) -> Duration {
        Duration::from_secs(self.host_timeout_secs)
    }
}
