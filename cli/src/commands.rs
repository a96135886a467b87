//! One function per subcommand: build the request, call the API, print.

use crate::args::{AdminCommand, Cli, Command, OutputFormat, RuleArgs, RunInstancesArgs, TerminateInstancesArgs};
use crate::client::Client;
use crate::error::CliError;
use crate::manifest::{self, RegisterOptions};
use crate::output;
use crate::wait::{self, Goal};
use nimbus_proto::api::StateView;
use nimbus_proto::InstanceState;
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// Runs the parsed command line, printing its result on stdout.
pub async fn execute(cli: Cli) -> Result<(), CliError> {
    let token = cli.token.as_deref().unwrap_or_default();
    let client = Client::new(&cli.endpoint, token)?;
    let out = cli.output;
    let text = match cli.command {
        Command::RunInstances(a) => run_instances(&client, out, &a).await?,
        Command::DescribeInstances(a) => {
            let q = a.to_query();
            let r = if a.max_results.is_some() {
                client.describe_instances_page(&q, a.next_token.as_deref()).await?
            } else {
                client.describe_instances_all(&q).await?
            };
            render(out, &r.raw, || output::instance_page(&r.body))
        }
        Command::TerminateInstances(a) => terminate_instances(&client, out, &a).await?,
        Command::DescribeHosts => {
            let r = client.describe_hosts().await?;
            render(out, &r.raw, || output::hosts_table(&r.body.hosts))
        }
        Command::DescribeImages(a) => {
            let r = client.describe_images(&a.to_query()).await?;
            render(out, &r.raw, || output::images_table(&r.body.images))
        }
        Command::DeregisterImage { image_id } => {
            let r = client.call(Method::DELETE, &["v1", "images", &image_id], &[], None).await?;
            render(out, &r.raw, || format!("{image_id}: deregistered"))
        }
        Command::CreateImage { instance_id, name, description, no_reboot } => {
            let body = serde_json::json!({ "name": name, "description": description, "no_reboot": no_reboot });
            let r = client.call(Method::POST, &["v1", "instances", &instance_id, "image"], &[], Some(&body)).await?;
            let i: nimbus_proto::api::Image =
                serde_json::from_value(r.raw.clone()).map_err(|e| CliError::Usage(format!("unexpected answer: {e}")))?;
            render(out, &r.raw, || output::images_table(&[i]))
        }
        Command::DescribeInstanceTypes => {
            let r = client.describe_instance_types().await?;
            render(out, &r.raw, || output::instance_types_table(&r.body.instance_types))
        }
        Command::RegisterImage(a) => {
            let public = match (a.public, a.private) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let mut req = match (&a.manifest, &a.disk, &a.disk_url) {
                (Some(m), _, _) => {
                    let opts = RegisterOptions {
                        name: a.name.clone(),
                        description: a.description.clone(),
                        source_url: a.source_url.clone(),
                        default: a.default,
                    };
                    manifest::load_request(m, &opts)?
                }
                (None, disk, url) => {
                    let disk_url = match (disk, url) {
                        (Some(path), _) => manifest::file_url(path)?,
                        (None, Some(u)) => u.clone(),
                        (None, None) => return Err(CliError::Usage("give --manifest, --disk or --disk-url".into())),
                    };
                    let name = a.name.clone().ok_or_else(|| CliError::Usage("--name is required with --disk or --disk-url".into()))?;
                    nimbus_proto::api::RegisterImageRequest {
                        name,
                        description: a.description.clone(),
                        disk_url: Some(disk_url),
                        sha256: a.sha256.as_ref().map(|s| s.to_ascii_lowercase()),
                        default: a.default,
                        ..Default::default()
                    }
                }
            };
            req.owner_id = a.owner.clone();
            req.public = public;
            let r = client.register_image(&req).await?;
            render(out, &r.raw, || output::images_table(std::slice::from_ref(&r.body)))
        }
        Command::ModifyInstanceAttribute { instance_id, instance_type, security_group_ids } => {
            let body = serde_json::json!({
                "instance_type": instance_type,
                "security_group_ids": (!security_group_ids.is_empty()).then_some(security_group_ids),
            });
            let r = client.call(Method::POST, &["v1", "instances", &instance_id, "attributes"], &[], Some(&body)).await?;
            let i: nimbus_proto::api::Instance =
                serde_json::from_value(r.raw.clone()).map_err(|e| CliError::Usage(format!("unexpected answer: {e}")))?;
            render(out, &r.raw, || output::instances_table(&[i]))
        }
        Command::ModifyInstanceMetadataOptions { instance_id, options } => {
            let Some(body) = options.to_request() else {
                return Err(CliError::Usage(
                    "give at least one of --http-tokens, --http-endpoint, --instance-metadata-tags, --http-put-response-hop-limit".into(),
                ));
            };
            let body = serde_json::to_value(body).map_err(|e| CliError::Usage(format!("metadata options: {e}")))?;
            let r = client.call(Method::POST, &["v1", "instances", &instance_id, "metadata-options"], &[], Some(&body)).await?;
            render(out, &r.raw, || output::objects_table(&r.raw, "", METADATA_OPTIONS_COLUMNS))
        }
        Command::DescribeVpcs => {
            let r = client.call(Method::GET, &["v1", "vpcs"], &[], None).await?;
            render(out, &r.raw, || output::objects_table(&r.raw, "vpcs", VPC_COLUMNS))
        }
        Command::CreateVpc { cidr_block } => {
            let r = client.call(Method::POST, &["v1", "vpcs"], &[], Some(&serde_json::json!({ "cidr_block": cidr_block }))).await?;
            render(out, &r.raw, || output::objects_table(&r.raw, "", VPC_COLUMNS))
        }
        Command::DescribeSubnets { vpc_id } => {
            let q: Vec<(&'static str, String)> = vpc_id.map(|v| ("vpc_id", v)).into_iter().collect();
            let r = client.call(Method::GET, &["v1", "subnets"], &q, None).await?;
            render(out, &r.raw, || output::objects_table(&r.raw, "subnets", SUBNET_COLUMNS))
        }
        Command::CreateSubnet { vpc_id, cidr_block, availability_zone } => {
            let body = serde_json::json!({ "vpc_id": vpc_id, "cidr_block": cidr_block, "availability_zone": availability_zone });
            let r = client.call(Method::POST, &["v1", "subnets"], &[], Some(&body)).await?;
            render(out, &r.raw, || output::objects_table(&r.raw, "", SUBNET_COLUMNS))
        }
        Command::ModifySubnetAttribute { subnet_id, map_public_ip_on_launch } => {
            let body = serde_json::json!({ "map_public_ip_on_launch": map_public_ip_on_launch });
            let r = client.call(Method::POST, &["v1", "subnets", &subnet_id, "attributes"], &[], Some(&body)).await?;
            render(out, &r.raw, || format!("{subnet_id}: map public IP on launch {map_public_ip_on_launch}"))
        }
        Command::DescribeSecurityGroups { vpc_id } => {
            let q: Vec<(&'static str, String)> = vpc_id.map(|v| ("vpc_id", v)).into_iter().collect();
            let r = client.call(Method::GET, &["v1", "security-groups"], &q, None).await?;
            render(out, &r.raw, || output::security_groups(&r.raw))
        }
        Command::CreateSecurityGroup { group_name, description, vpc_id } => {
            let body = serde_json::json!({ "group_name": group_name, "description": description, "vpc_id": vpc_id });
            let r = client.call(Method::POST, &["v1", "security-groups"], &[], Some(&body)).await?;
            render(out, &r.raw, || output::security_groups(&serde_json::json!({ "security_groups": [r.raw.clone()] })))
        }
        Command::AuthorizeSecurityGroupIngress(a) => rules(&client, out, &a, "ingress", false).await?,
        Command::AuthorizeSecurityGroupEgress(a) => rules(&client, out, &a, "egress", false).await?,
        Command::RevokeSecurityGroupIngress(a) => rules(&client, out, &a, "ingress", true).await?,
        Command::RevokeSecurityGroupEgress(a) => rules(&client, out, &a, "egress", true).await?,
        Command::AllocateAddress => {
            let r = client.call(Method::POST, &["v1", "addresses"], &[], None).await?;
            render(out, &r.raw, || output::objects_table(&r.raw, "", ADDRESS_COLUMNS))
        }
        Command::DescribeAddresses => {
            let r = client.call(Method::GET, &["v1", "addresses"], &[], None).await?;
            render(out, &r.raw, || output::objects_table(&r.raw, "addresses", ADDRESS_COLUMNS))
        }
        Command::AssociateAddress { allocation_id, instance_id, network_interface_id, allow_reassociation } => {
            let req =
                nimbus_proto::api::AssociateAddressRequest { instance_id, network_interface_id, allow_reassociation, ..Default::default() };
            let r = client.associate_address(&allocation_id, &req).await?;
            render(out, &r.raw, || format!("{allocation_id}: associated ({})", r.body.association_id))
        }
        Command::DescribeNetworkInterfaces { instance_id } => {
            let q: Vec<(&'static str, String)> = instance_id.map(|v| ("attachment.instance-id", v)).into_iter().collect();
            let r = client.call(Method::GET, &["v1", "network-interfaces"], &q, None).await?;
            render(out, &r.raw, || {
                output::objects_table(
                    &r.raw,
                    "network_interfaces",
                    &[
                        ("ID", "network_interface_id"),
                        ("INSTANCE", "attachment.instance_id"),
                        ("INDEX", "attachment.device_index"),
                        ("SUBNET", "subnet_id"),
                        ("PRIVATE-IP", "private_ip_address"),
                        ("PUBLIC-IP", "association.public_ip"),
                        ("MAC", "mac_address"),
                        ("STATUS", "status"),
                        ("GROUPS", "groups"),
                    ],
                )
            })
        }
        Command::DeleteVpc { vpc_id: id } => done(&client, out, Method::DELETE, &["v1", "vpcs", &id], &id).await?,
        Command::DeleteSubnet { subnet_id: id } => done(&client, out, Method::DELETE, &["v1", "subnets", &id], &id).await?,
        Command::DeleteSecurityGroup { group_id: id } => done(&client, out, Method::DELETE, &["v1", "security-groups", &id], &id).await?,
        Command::ReleaseAddress { allocation_id: id } => done(&client, out, Method::DELETE, &["v1", "addresses", &id], &id).await?,
        Command::DisassociateAddress { allocation_id: id } => {
            done(&client, out, Method::POST, &["v1", "addresses", &id, "disassociate"], &id).await?
        }
        Command::CreateKeyPair { name, key_type, out: file } => {
            let r = client.create_key_pair(&nimbus_proto::api::CreateKeyPairRequest { name, key_type }).await?;
            let material = r.body.key_material.clone();
            if let Some(path) = &file {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| CliError::Usage(format!("cannot create {}: {e}", path.display())))?;
                f.write_all(material.as_bytes()).map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display())))?;
            }
            let k = &r.body.key_pair;
            let summary = format!("{} {} {}", k.key_name, k.key_type, k.key_fingerprint);
            match (out, &file) {
                (OutputFormat::Json, Some(_)) => {
                    let mut v = r.raw.clone();
                    v["key_material"] = serde_json::Value::Null;
                    output::json(&v)
                }
                (OutputFormat::Json, None) => output::json(&r.raw),
                (OutputFormat::Table, Some(p)) => format!("{summary}\nprivate key written to {}", p.display()),
                (OutputFormat::Table, None) => format!("{summary}\n{material}"),
            }
        }
        Command::ImportKeyPair { name, public_key_file } => {
            let key = std::fs::read_to_string(&public_key_file)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", public_key_file.display())))?;
            let req = nimbus_proto::api::ImportKeyPairRequest { name, public_key: key.trim().to_string() };
            let r = client.import_key_pair(&req).await?;
            render(out, &r.raw, || format!("{} {}", r.body.key_name, r.body.key_fingerprint))
        }
        Command::DescribeKeyPairs => {
            let r = client.call(Method::GET, &["v1", "key-pairs"], &[], None).await?;
            render(out, &r.raw, || {
                output::objects_table(
                    &r.raw,
                    "key_pairs",
                    &[("NAME", "key_name"), ("ID", "key_pair_id"), ("TYPE", "key_type"), ("FINGERPRINT", "key_fingerprint")],
                )
            })
        }
        Command::DeleteKeyPair { name } => done(&client, out, Method::DELETE, &["v1", "key-pairs", &name], &name).await?,
        Command::DescribeAccount => {
            let r = client.describe_account().await?;
            render(out, &r.raw, || output::account(&r.body))
        }
        Command::Admin(AdminCommand::SetAccountLimits {
            account,
            max_instances,
            max_vcpus,
            max_elastic_ips,
            max_images,
            max_image_bytes,
        }) => {
            let limits = nimbus_proto::api::SetLimits { max_instances, max_vcpus, max_elastic_ips, max_images, max_image_bytes };
            let r = client.set_account_limits(&account, &limits).await?;
            render(out, &r.raw, || output::account(&r.body))
        }
        Command::Admin(AdminCommand::ResetHost { host }) => {
            let r = client.reset_host(&host).await?;
            render(out, &r.raw, || {
                format!("host {}: credential reset; its agent registers again with the join token (it retries every 10 s)", r.body.host_id)
            })
        }
        Command::Admin(AdminCommand::CreateAccount { name }) => {
            let r = client.create_account(&name).await?;
            let a = &r.body;
            render(out, &r.raw, || {
                format!(
                    "account {} ({})\naccess key id:     {}\nsecret access key: {}   (shown once)\nNIMBUS_TOKEN={}:{}",
                    a.account_id, a.name, a.access_key_id, a.secret_access_key, a.access_key_id, a.secret_access_key
                )
            })
        }
    };
    println!("{text}");
    Ok(())
}

const METADATA_OPTIONS_COLUMNS: &[(&str, &str)] = &[
    ("INSTANCE", "instance_id"),
    ("STATE", "instance_metadata_options.state"),
    ("TOKENS", "instance_metadata_options.http_tokens"),
    ("ENDPOINT", "instance_metadata_options.http_endpoint"),
    ("TAGS", "instance_metadata_options.instance_metadata_tags"),
    ("HOPS", "instance_metadata_options.http_put_response_hop_limit"),
];
const VPC_COLUMNS: &[(&str, &str)] = &[("ID", "vpc_id"), ("CIDR", "cidr_block"), ("DEFAULT", "is_default"), ("STATE", "state")];
const SUBNET_COLUMNS: &[(&str, &str)] = &[
    ("ID", "subnet_id"),
    ("VPC", "vpc_id"),
    ("CIDR", "cidr_block"),
    ("AZ", "availability_zone"),
    ("DEFAULT", "default_for_az"),
    ("PUBLIC-IP", "map_public_ip_on_launch"),
    ("FREE", "available_ip_address_count"),
];
const ADDRESS_COLUMNS: &[(&str, &str)] = &[
    ("ALLOCATION", "allocation_id"),
    ("PUBLIC-IP", "public_ip"),
    ("INSTANCE", "instance_id"),
    ("INTERFACE", "network_interface_id"),
    ("PRIVATE-IP", "private_ip_address"),
];

/// A call whose answer is empty: prints `<id>: done`.
async fn done(client: &Client, out: OutputFormat, method: Method, segments: &[&str], id: &str) -> Result<String, CliError> {
    let r = client.call(method, segments, &[], None).await?;
    Ok(render(out, &r.raw, || format!("{id}: done")))
}

/// Authorizes or revokes one rule of a group.
async fn rules(client: &Client, out: OutputFormat, a: &RuleArgs, direction: &str, revoke: bool) -> Result<String, CliError> {
    let body = serde_json::json!({ "rules": [a.to_permission()] });
    let mut segments = vec!["v1", "security-groups", a.group_id.as_str(), direction];
    if revoke {
        segments.push("revoke");
    }
    let r = client.call(Method::POST, &segments, &[], Some(&body)).await?;
    Ok(render(out, &r.raw, || {
        if revoke {
            format!("{}: {direction} rule revoked", a.group_id)
        } else {
            output::objects_table(
                &r.raw,
                "rules",
                &[
                    ("RULE", "rule_id"),
                    ("PROTOCOL", "protocol"),
                    ("FROM", "from_port"),
                    ("TO", "to_port"),
                    ("CIDR", "cidr"),
                    ("GROUP", "referenced_group_id"),
                ],
            )
        }
    }))
}

fn render(out: OutputFormat, raw: &Value, table: impl FnOnce() -> String) -> String {
    match out {
        OutputFormat::Json => output::json(raw),
        OutputFormat::Table => table(),
    }
}

async fn run_instances(client: &Client, out: OutputFormat, a: &RunInstancesArgs) -> Result<String, CliError> {
    let req = a.to_request()?;
    let mut r = client.run_instances(&req).await?;
    if a.wait.wait {
        let ids: Vec<String> = r.body.instances.iter().map(|i| i.instance_id.clone()).collect();
        eprintln!("launched {} (reservation {}); waiting for running", ids.join(" "), r.body.reservation_id);
        let done = wait::wait_for(client, &ids, Goal::Running, Duration::from_secs(a.wait.timeout)).await?;
        // Show the instances as they are now, in the reservation's order.
        let raws: Vec<Value> = ids.iter().filter_map(|id| wait::raw_instance(&done.raw, id).cloned()).collect();
        r.body.instances = ids.iter().filter_map(|id| done.body.instances.iter().find(|i| &i.instance_id == id).cloned()).collect();
        if let Some(obj) = r.raw.as_object_mut() {
            obj.insert("instances".into(), Value::Array(raws));
        }
    }
    Ok(render(out, &r.raw, || output::reservation(&r.body)))
}

async fn terminate_instances(client: &Client, out: OutputFormat, a: &TerminateInstancesArgs) -> Result<String, CliError> {
    let mut r = client.terminate_instances(&a.instance_ids).await?;
    if a.wait.wait {
        let done = wait::wait_for(client, &a.instance_ids, Goal::Terminated, Duration::from_secs(a.wait.timeout)).await?;
        // Report the state reached as the current state (an instance no longer listed is terminated).
        let terminated = StateView::from(InstanceState::Terminated);
        for c in &mut r.body.terminating_instances {
            c.current_state = done
                .body
                .instances
                .iter()
                .find(|i| i.instance_id == c.instance_id)
                .map(|i| i.state.clone())
                .unwrap_or_else(|| terminated.clone());
        }
        if let Some(Value::Array(items)) = r.raw.get_mut("terminating_instances") {
            for item in items {
                let id = item.get("instance_id").and_then(Value::as_str).unwrap_or_default().to_string();
                let state = wait::raw_instance(&done.raw, &id)
                    .and_then(|i| i.get("state").cloned())
                    .unwrap_or_else(|| serde_json::to_value(&terminated).unwrap_or(Value::Null));
                if let Some(obj) = item.as_object_mut() {
                    obj.insert("current_state".into(), state);
                }
            }
        }
    }
    Ok(render(out, &r.raw, || output::state_changes_table(&r.body.terminating_instances)))
}
