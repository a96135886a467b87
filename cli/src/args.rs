//! The command line (clap derive) and its conversion into API requests.

use crate::client::InstanceQuery;
use crate::error::CliError;
use base64::Engine;
use clap::{Args, Parser, Subcommand, ValueEnum};
use nimbus_proto::api::{MetadataOptionsRequest, RunInstancesRequest, MAX_USER_DATA_BYTES};
use nimbus_proto::InstanceState;
use std::path::PathBuf;

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:8787";

/// nimbus: launch, list and terminate VM instances on a Nimbus control plane.
#[derive(Debug, Parser)]
#[command(name = "nimbus", version, propagate_version = true)]
pub struct Cli {
    /// Base URL of the Nimbus REST API.
    #[arg(long, global = true, env = "NIMBUS_ENDPOINT", default_value = DEFAULT_ENDPOINT, help_heading = "Global options")]
    pub endpoint: String,
    /// API token, sent as `Authorization: Bearer <token>`.
    #[arg(long, global = true, env = "NIMBUS_TOKEN", hide_env_values = true, help_heading = "Global options")]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table, help_heading = "Global options")]
    pub output: OutputFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Launch instances (POST /v1/instances).
    RunInstances(RunInstancesArgs),
    /// List instances (GET /v1/instances), following pages.
    DescribeInstances(DescribeInstancesArgs),
    /// Terminate instances (POST /v1/instances/terminate).
    TerminateInstances(TerminateInstancesArgs),
    /// List hypervisor hosts and their capacity (GET /v1/hosts).
    DescribeHosts,
    /// List the images you may launch (GET /v1/images), with DescribeImages' filters.
    DescribeImages(DescribeImagesArgs),
    /// Deregister one of your images (DELETE /v1/images/{id}): no new
    /// launches; running instances keep running.
    DeregisterImage { image_id: String },
    /// Make an image of an instance's disk (POST /v1/instances/{id}/image);
    /// the instance is shut down cleanly and started again unless --no-reboot.
    CreateImage {
        instance_id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Copy the disk while the guest runs (crash-consistent).
        #[arg(long)]
        no_reboot: bool,
    },
    /// List instance types (GET /v1/instance-types).
    DescribeInstanceTypes,
    /// Your account: its limits and what it holds (GET /v1/account).
    DescribeAccount,
    /// Make a key pair (POST /v1/key-pairs): the private key is shown once;
    /// with --out it goes to that file instead (mode 0600).
    CreateKeyPair {
        /// The key pair's name.
        name: String,
        /// ed25519 (default) or rsa.
        #[arg(long)]
        key_type: Option<String>,
        /// Write the private key here (a new file, 0600) rather than to stdout.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
    /// Import an OpenSSH public key as a key pair (POST /v1/key-pairs/import).
    ImportKeyPair {
        name: String,
        /// File holding the public key (e.g. ~/.ssh/id_ed25519.pub).
        #[arg(long, value_name = "PATH")]
        public_key_file: PathBuf,
    },
    /// List key pairs (GET /v1/key-pairs).
    DescribeKeyPairs,
    /// Delete a key pair (DELETE /v1/key-pairs/{name}); instances keep their key.
    DeleteKeyPair { name: String },
    /// Register an image (operator, POST /v1/images): a recipe's manifest,
    /// or one bootable qcow2 (a path on every host, or an http(s) URL) with its SHA-256.
    RegisterImage(RegisterImageArgs),
    /// Change a stopped instance's type, or its security groups (POST /v1/instances/{id}/attributes).
    ModifyInstanceAttribute {
        instance_id: String,
        #[arg(long)]
        instance_type: Option<String>,
        /// The primary interface's groups (repeat or separate with commas).
        #[arg(long = "security-group-ids", value_name = "SG", value_delimiter = ',')]
        security_group_ids: Vec<String>,
    },
    /// Change how an instance's metadata service answers (POST
    /// /v1/instances/{id}/metadata-options); options left out keep their value.
    ModifyInstanceMetadataOptions {
        instance_id: String,
        #[command(flatten)]
        options: MetadataOptionsArgs,
    },
    /// List VPCs (GET /v1/vpcs); your default VPC is made on first use.
    DescribeVpcs,
    /// Create a VPC, a /16 to a /28 (POST /v1/vpcs).
    CreateVpc {
        #[arg(long)]
        cidr_block: String,
    },
    /// Delete a VPC without subnets or groups (DELETE /v1/vpcs/{id}).
    DeleteVpc { vpc_id: String },
    /// List subnets (GET /v1/subnets).
    DescribeSubnets {
        #[arg(long)]
        vpc_id: Option<String>,
    },
    /// Create a subnet in a VPC and zone (POST /v1/subnets).
    CreateSubnet {
        #[arg(long)]
        vpc_id: String,
        #[arg(long)]
        cidr_block: String,
        #[arg(long)]
        availability_zone: Option<String>,
    },
    /// Delete a subnet without interfaces (DELETE /v1/subnets/{id}).
    DeleteSubnet { subnet_id: String },
    /// Map public addresses on launch, or not (POST /v1/subnets/{id}/attributes).
    ModifySubnetAttribute {
        subnet_id: String,
        #[arg(long, value_name = "BOOL")]
        map_public_ip_on_launch: bool,
    },
    /// List security groups and their rules (GET /v1/security-groups).
    DescribeSecurityGroups {
        #[arg(long)]
        vpc_id: Option<String>,
    },
    /// Create a security group: no inbound, all outbound (POST /v1/security-groups).
    CreateSecurityGroup {
        #[arg(long)]
        group_name: String,
        #[arg(long)]
        description: String,
        /// Default: your default VPC.
        #[arg(long)]
        vpc_id: Option<String>,
    },
    /// Delete a security group no interface uses (DELETE /v1/security-groups/{id}).
    DeleteSecurityGroup { group_id: String },
    /// Allow inbound traffic (POST /v1/security-groups/{id}/ingress).
    AuthorizeSecurityGroupIngress(RuleArgs),
    /// Allow outbound traffic (POST /v1/security-groups/{id}/egress).
    AuthorizeSecurityGroupEgress(RuleArgs),
    /// Remove an inbound rule (POST /v1/security-groups/{id}/ingress/revoke).
    RevokeSecurityGroupIngress(RuleArgs),
    /// Remove an outbound rule (POST /v1/security-groups/{id}/egress/revoke).
    RevokeSecurityGroupEgress(RuleArgs),
    /// Allocate an Elastic IP from the operator's pool (POST /v1/addresses).
    AllocateAddress,
    /// List your Elastic IPs (GET /v1/addresses).
    DescribeAddresses,
    /// Map an Elastic IP to an instance or interface (POST /v1/addresses/{id}/associate).
    AssociateAddress {
        allocation_id: String,
        #[arg(long)]
        instance_id: Option<String>,
        #[arg(long)]
        network_interface_id: Option<String>,
        /// Move it even if it is associated elsewhere.
        #[arg(long)]
        allow_reassociation: bool,
    },
    /// Unmap an Elastic IP (POST /v1/addresses/{id}/disassociate).
    DisassociateAddress { allocation_id: String },
    /// Return an Elastic IP to the pool (DELETE /v1/addresses/{id}).
    ReleaseAddress { allocation_id: String },
    /// List network interfaces (GET /v1/network-interfaces).
    DescribeNetworkInterfaces {
        #[arg(long)]
        instance_id: Option<String>,
    },
    /// Operator commands.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Create an account and its access key (POST /v1/admin/accounts). The
    /// secret is shown once; use `<access key id>:<secret>` as the CLI token,
    /// or both with the AWS CLI and SDKs.
    CreateAccount {
        /// Account name (1 to 64 of A-Z a-z 0-9 - _ . @).
        #[arg(long)]
        name: String,
    },
    /// Reset a host's credential (POST /v1/hosts/{id}/reset-credential): its
    /// agent's credential stops working at once, and the next registration of
    /// the host's name with the join token takes the host over (its id and
    /// instances). For a reinstalled machine or a lost credential; without
    /// it, the join token alone cannot re-register a name.
    ResetHost {
        /// The host's id (h-...) or name.
        host: String,
    },
    /// Set an account's limits (PUT /v1/admin/accounts/{id}/limits). A
    /// limit left out goes back to the control plane's default.
    SetAccountLimits {
        /// The account id (12 digits).
        account: String,
        /// Instances the account may hold at once (pending to stopped).
        #[arg(long)]
        max_instances: Option<u32>,
        /// vCPUs its instances may hold at once.
        #[arg(long)]
        max_vcpus: Option<u32>,
        /// Elastic IPs it may hold.
        #[arg(long)]
        max_elastic_ips: Option<u32>,
        /// Images it may hold (pending or available).
        #[arg(long)]
        max_images: Option<u32>,
        /// Bytes its images may take in the image store.
        #[arg(long)]
        max_image_bytes: Option<u64>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Wait until the instances reach the target state.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300, requires = "wait")]
    pub timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct RunInstancesArgs {
    /// Instance type, e.g. t3.micro (see describe-instance-types).
    #[arg(long)]
    pub instance_type: String,
    /// Image to boot (ami-...); the default image when absent.
    #[arg(long)]
    pub image_id: Option<String>,
    /// Launch exactly N instances (same as --min-count N --max-count N).
    #[arg(long, value_name = "N", conflicts_with_all = ["min_count", "max_count"],
          value_parser = clap::value_parser!(u32).range(1..))]
    pub count: Option<u32>,
    /// Launch at least A instances, or none at all (default 1).
    #[arg(long, value_name = "A", value_parser = clap::value_parser!(u32).range(1..))]
    pub min_count: Option<u32>,
    /// Launch up to B instances, as many as capacity allows (default: --min-count's value).
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_count: Option<u32>,
    /// Availability zone; any zone when absent.
    #[arg(long)]
    pub availability_zone: Option<String>,
    /// File whose content is the user data (sent base64-encoded, at most 16 KiB).
    #[arg(long, value_name = "PATH", conflicts_with = "user_data")]
    pub user_data_file: Option<PathBuf>,
    /// User data given inline (sent base64-encoded, at most 16 KiB).
    #[arg(long, value_name = "STRING")]
    pub user_data: Option<String>,
    /// Idempotency token: retrying with the same token returns the same reservation.
    #[arg(long)]
    pub client_token: Option<String>,
    /// Subnet of the instance's interface (it fixes the zone); the zone's default subnet when absent.
    #[arg(long)]
    pub subnet_id: Option<String>,
    /// Security groups of the interface (repeat or separate with commas); the VPC's default group when absent.
    #[arg(long = "security-group-ids", value_name = "SG", value_delimiter = ',')]
    pub security_group_ids: Vec<String>,
    /// The interface's private address (one instance only).
    #[arg(long)]
    pub private_ip_address: Option<String>,
    /// Map a public address from the operator's pool (true/false; default: the subnet's setting).
    #[arg(long, value_name = "BOOL")]
    pub associate_public_ip_address: Option<bool>,
    /// Key pair whose public key the instance gets (SSH as root on the tiny image).
    #[arg(long)]
    pub key_name: Option<String>,
    #[command(flatten)]
    pub metadata: MetadataOptionsArgs,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// EC2's MetadataOptions: how the instance metadata service answers.
#[derive(Debug, Clone, Default, Args)]
pub struct MetadataOptionsArgs {
    /// `required`: only requests with an IMDSv2 session token are answered; `optional`: also without.
    #[arg(long, value_parser = ["optional", "required"])]
    pub http_tokens: Option<String>,
    /// `disabled`: the metadata service does not answer the instance at all.
    #[arg(long, value_parser = ["enabled", "disabled"])]
    pub http_endpoint: Option<String>,
    /// `enabled`: the instance's tags are served under meta-data/tags/instance/.
    #[arg(long, value_parser = ["enabled", "disabled"])]
    pub instance_metadata_tags: Option<String>,
    /// 1 to 64 (kept and shown, as EC2 does).
    #[arg(long, value_name = "HOPS", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub http_put_response_hop_limit: Option<u32>,
}

impl MetadataOptionsArgs {
    /// The request's options, or `None` when no flag was given.
    pub fn to_request(&self) -> Option<MetadataOptionsRequest> {
        let r = MetadataOptionsRequest {
            http_tokens: self.http_tokens.clone(),
            http_endpoint: self.http_endpoint.clone(),
            instance_metadata_tags: self.instance_metadata_tags.clone(),
            http_put_response_hop_limit: self.http_put_response_hop_limit,
            http_protocol_ipv6: None,
        };
        (r != MetadataOptionsRequest::default()).then_some(r)
    }
}

fn parse_state(s: &str) -> Result<InstanceState, String> {
    s.parse::<InstanceState>().map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Args)]
pub struct DescribeInstancesArgs {
    /// Only these instances (repeat the flag or separate with commas).
    #[arg(long = "instance-id", value_name = "ID", value_delimiter = ',')]
    pub instance_ids: Vec<String>,
    /// Only instances in these states: pending, running, shutting-down, terminated, stopping, stopped.
    #[arg(long = "state", value_name = "S", value_delimiter = ',', value_parser = parse_state)]
    pub states: Vec<InstanceState>,
    /// Only instances in these availability zones.
    #[arg(long = "availability-zone", value_name = "Z", value_delimiter = ',')]
    pub availability_zones: Vec<String>,
    /// Only instances of these types.
    #[arg(long = "instance-type", value_name = "T", value_delimiter = ',')]
    pub instance_types: Vec<String>,
    /// Print one page of at most N instances and the token of the next page.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_results: Option<u32>,
    /// With --max-results: the page to print (a token printed by a previous call).
    #[arg(long, value_name = "TOKEN", requires = "max_results")]
    pub next_token: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct TerminateInstancesArgs {
    /// Instances to terminate.
    #[arg(value_name = "ID", required = true, num_args = 1..)]
    pub instance_ids: Vec<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, Args, Default)]
pub struct DescribeImagesArgs {
    /// Only these images (repeat or separate with commas).
    #[arg(long = "image-ids", value_name = "AMI", value_delimiter = ',')]
    pub image_ids: Vec<String>,
    /// Owners: self, amazon (the operator's images) or account ids.
    #[arg(long = "owners", value_name = "OWNER", value_delimiter = ',')]
    pub owners: Vec<String>,
    /// Images these accounts may launch: self, all, or account ids.
    #[arg(long = "executable-users", value_name = "USER", value_delimiter = ',')]
    pub executable_users: Vec<String>,
    /// Name, with * and ? wildcards.
    #[arg(long)]
    pub name: Option<String>,
    /// pending, available or failed.
    #[arg(long)]
    pub state: Option<String>,
}

impl DescribeImagesArgs {
    pub fn to_query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        for (k, v) in [("image_id", &self.image_ids), ("owner", &self.owners), ("executable_by", &self.executable_users)] {
            if !v.is_empty() {
                q.push((k, v.join(",")));
            }
        }
        q.extend(self.name.clone().map(|n| ("name", n)));
        q.extend(self.state.clone().map(|s| ("state", s)));
        q
    }
}

#[derive(Debug, Clone, Args)]
pub struct RegisterImageArgs {
    /// The recipe's manifest.json; the image files lie next to it.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["disk", "disk_url"], required_unless_present_any = ["disk", "disk_url"])]
    pub manifest: Option<PathBuf>,
    /// A bootable qcow2 (any standard cloud image) at this path on every host.
    #[arg(long, value_name = "PATH", conflicts_with = "disk_url", requires = "sha256")]
    pub disk: Option<PathBuf>,
    /// A bootable qcow2 at this http(s) URL.
    #[arg(long, value_name = "URL", requires = "sha256")]
    pub disk_url: Option<String>,
    /// The SHA-256 of --disk or --disk-url (hosts refuse a file that differs).
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// The account that owns the image (default: the operator).
    #[arg(long, value_name = "ACCOUNT")]
    pub owner: Option<String>,
    /// Visible to every account (default: when the operator owns it).
    #[arg(long, conflicts_with = "private")]
    pub public: bool,
    /// Visible to its owner only.
    #[arg(long)]
    pub private: bool,
    /// Image name (default: the manifest's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Free-text description.
    #[arg(long)]
    pub description: Option<String>,
    /// Where agents fetch the files (default: file://<directory of the manifest>).
    #[arg(long, value_name = "URL")]
    pub source_url: Option<String>,
    /// Make this the image used when a launch names none.
    #[arg(long)]
    pub default: bool,
}

impl RunInstancesArgs {
    /// `(min_count, max_count)`: `--count N` is `(N, N)`; `--min-count` alone
    /// is `(A, A)`; `--max-count` alone is `(1, B)`; nothing is `(1, 1)`.
    pub fn counts(&self) -> Result<(u32, u32), CliError> {
        let (min, max) = match (self.count, self.min_count, self.max_count) {
            (Some(n), _, _) => (n, n),
            (None, Some(a), Some(b)) => (a, b),
            (None, Some(a), None) => (a, a),
            (None, None, Some(b)) => (1, b),
            (None, None, None) => (1, 1),
        };
        if min > max {
            return Err(CliError::Usage(format!("--min-count {min} is greater than --max-count {max}")));
        }
        Ok((min, max))
    }

    /// The user data, base64-encoded, read from the file or the flag.
    pub fn user_data_base64(&self) -> Result<Option<String>, CliError> {
        let raw: Vec<u8> = match (&self.user_data_file, &self.user_data) {
            (Some(path), _) => {
                std::fs::read(path).map_err(|e| CliError::Usage(format!("cannot read --user-data-file {}: {e}", path.display())))?
            }
            (None, Some(s)) => s.clone().into_bytes(),
            (None, None) => return Ok(None),
        };
        if raw.len() > MAX_USER_DATA_BYTES {
            return Err(CliError::Usage(format!("user data is {} bytes; at most {MAX_USER_DATA_BYTES} are allowed", raw.len())));
        }
        Ok(Some(base64::engine::general_purpose::STANDARD.encode(raw)))
    }

    pub fn to_request(&self) -> Result<RunInstancesRequest, CliError> {
        let (min_count, max_count) = self.counts()?;
        Ok(RunInstancesRequest {
            metadata_options: self.metadata.to_request(),
            key_name: self.key_name.clone(),
            tags: Vec::new(),
            image_id: self.image_id.clone(),
            instance_type: self.instance_type.clone(),
            min_count,
            max_count,
            availability_zone: self.availability_zone.clone(),
            user_data: self.user_data_base64()?,
            client_token: self.client_token.clone(),
            subnet_id: self.subnet_id.clone(),
            security_group_ids: self.security_group_ids.clone(),
            security_group_names: Vec::new(),
            private_ip_address: self.private_ip_address.clone(),
            associate_public_ip_address: self.associate_public_ip_address,
            network_interfaces: Vec::new(),
            network_interface_tags: Vec::new(),
        })
    }
}

impl DescribeInstancesArgs {
    pub fn to_query(&self) -> InstanceQuery {
        InstanceQuery {
            instance_ids: self.instance_ids.clone(),
            states: self.states.clone(),
            availability_zones: self.availability_zones.clone(),
            instance_types: self.instance_types.clone(),
            max_results: self.max_results,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nimbus").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunInstancesArgs {
        let mut v = vec!["run-instances"];
        v.extend_from_slice(args);
        match parse(&v).unwrap().command {
            Command::RunInstances(a) => a,
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_instances_minimal_request() {
        let req = run_args(&["--instance-type", "t3.micro"]).to_request().unwrap();
        assert_eq!(req, RunInstancesRequest::of_type("t3.micro"));
    }

    #[test]
    fn run_instances_full_request_with_base64_user_data() {
        let req = run_args(&[
            "--instance-type",
            "t3.small",
            "--image-id",
            "ami-0123456789abcdef0",
            "--count",
            "3",
            "--availability-zone",
            "az-1",
            "--user-data",
            "#!/bin/sh\necho hi\n",
            "--client-token",
            "tok-1",
        ])
        .to_request()
        .unwrap();
        assert_eq!(req.image_id.as_deref(), Some("ami-0123456789abcdef0"));
        assert_eq!((req.min_count, req.max_count), (3, 3));
        assert_eq!(req.availability_zone.as_deref(), Some("az-1"));
        assert_eq!(req.user_data.as_deref(), Some("IyEvYmluL3NoCmVjaG8gaGkK"));
        assert_eq!(req.client_token.as_deref(), Some("tok-1"));
    }

    #[test]
    fn user_data_file_is_read_raw_and_encoded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ud");
        std::fs::write(&path, [0u8, 255, b'a']).unwrap();
        let a = run_args(&["--instance-type", "t", "--user-data-file", path.to_str().unwrap()]);
        assert_eq!(a.user_data_base64().unwrap().as_deref(), Some("AP9h"));
        let missing = run_args(&["--instance-type", "t", "--user-data-file", "/nonexistent/ud"]);
        assert_eq!(missing.to_request().unwrap_err().exit_code(), 2);
    }

    #[test]
    fn user_data_too_large_is_rejected_locally() {
        let big = "x".repeat(MAX_USER_DATA_BYTES + 1);
        let e = run_args(&["--instance-type", "t", "--user-data", &big]).to_request().unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let ok = "x".repeat(MAX_USER_DATA_BYTES);
        assert!(run_args(&["--instance-type", "t", "--user-data", &ok]).to_request().is_ok());
    }

    #[test]
    fn count_handling() {
        let c = |a: &[&str]| {
            let mut v = vec!["--instance-type", "t"];
            v.extend_from_slice(a);
            run_args(&v).counts()
        };
        assert_eq!(c(&[]).unwrap(), (1, 1));
        assert_eq!(c(&["--count", "4"]).unwrap(), (4, 4));
        assert_eq!(c(&["--min-count", "2", "--max-count", "5"]).unwrap(), (2, 5));
        assert_eq!(c(&["--min-count", "2"]).unwrap(), (2, 2));
        assert_eq!(c(&["--max-count", "5"]).unwrap(), (1, 5));
        assert_eq!(c(&["--min-count", "5", "--max-count", "2"]).unwrap_err().exit_code(), 2);
        // Usage errors caught by clap (exit code 2).
        for bad in [
            &["run-instances", "--instance-type", "t", "--count", "2", "--min-count", "1"][..],
            &["run-instances", "--instance-type", "t", "--count", "0"],
            &["run-instances", "--instance-type", "t", "--user-data", "a", "--user-data-file", "f"],
            &["run-instances", "--instance-type", "t", "--timeout", "5"],
            &["run-instances"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn describe_instances_filters() {
        let cli = parse(&[
            "describe-instances",
            "--instance-id",
            "i-0000000000000000a,i-0000000000000000b",
            "--instance-id",
            "i-0000000000000000c",
            "--state",
            "running",
            "--state",
            "shutting-down",
            "--availability-zone",
            "az-1",
            "--instance-type",
            "t3.micro",
            "--max-results",
            "10",
            "--output",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        let Command::DescribeInstances(a) = cli.command else { panic!() };
        let q = a.to_query();
        assert_eq!(q.instance_ids.len(), 3);
        assert_eq!(q.states, vec![InstanceState::Running, InstanceState::ShuttingDown]);
        assert_eq!(q.availability_zones, vec!["az-1"]);
        assert_eq!(q.instance_types, vec!["t3.micro"]);
        assert_eq!(q.max_results, Some(10));
        assert_eq!(parse(&["describe-instances", "--state", "bogus"]).unwrap_err().exit_code(), 2);
        assert_eq!(parse(&["describe-instances", "--max-results", "0"]).unwrap_err().exit_code(), 2);
        assert_eq!(parse(&["describe-instances", "--next-token", "x"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn global_flags_anywhere_and_terminate_needs_ids() {
        let cli = parse(&["describe-hosts", "--endpoint", "http://h:1", "--token", "s3cret", "-o", "json"]).unwrap();
        assert_eq!(cli.endpoint, "http://h:1");
        assert_eq!(cli.token.as_deref(), Some("s3cret"));
        assert!(matches!(cli.command, Command::DescribeHosts));
        assert_eq!(parse(&["terminate-instances"]).unwrap_err().exit_code(), 2);
        let cli = parse(&["terminate-instances", "i-1", "i-2", "--wait", "--timeout", "9"]).unwrap();
        let Command::TerminateInstances(t) = cli.command else { panic!() };
        assert_eq!(t.instance_ids, vec!["i-1", "i-2"]);
        assert!(t.wait.wait);
        assert_eq!(t.wait.timeout, 9);
    }
}

/// A rule of a security group: a protocol, ports, and CIDRs or groups.
#[derive(Debug, Clone, Args)]
pub struct RuleArgs {
    /// The group (sg-...).
    pub group_id: String,
    /// tcp, udp, icmp or -1 (all).
    #[arg(long, default_value = "tcp")]
    pub protocol: String,
    /// One port (same as --from-port N --to-port N); for ICMP, the type.
    #[arg(long, conflicts_with_all = ["from_port", "to_port"], allow_negative_numbers = true)]
    pub port: Option<i32>,
    #[arg(long, allow_negative_numbers = true)]
    pub from_port: Option<i32>,
    #[arg(long, allow_negative_numbers = true)]
    pub to_port: Option<i32>,
    /// Peer networks (repeat or separate with commas).
    #[arg(long = "cidr", value_delimiter = ',')]
    pub cidrs: Vec<String>,
    /// Peer groups (sg-...).
    #[arg(long = "source-group", value_delimiter = ',')]
    pub groups: Vec<String>,
}

impl RuleArgs {
    pub fn to_permission(&self) -> nimbus_proto::api::IpPermission {
        nimbus_proto::api::IpPermission {
            protocol: self.protocol.clone(),
            from_port: self.port.or(self.from_port),
            to_port: if self.protocol == "icmp" { self.to_port } else { self.port.or(self.to_port) },
            cidrs: self.cidrs.clone(),
            group_ids: self.groups.clone(),
            group_names: Vec::new(),
            description: None,
        }
    }
}
