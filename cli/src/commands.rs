//! One function per subcommand: build the request, call the API, print.

use crate::args::{AdminCommand, Cli, Command, OutputFormat, RunInstancesArgs, TerminateInstancesArgs};
use crate::client::Client;
use crate::error::CliError;
use crate::manifest::{self, RegisterOptions};
use crate::output;
use crate::wait::{self, Goal};
use nimbus_proto::api::StateView;
use nimbus_proto::InstanceState;
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
        Command::DescribeImages => {
            let r = client.describe_images().await?;
            render(out, &r.raw, || output::images_table(&r.body.images))
        }
        Command::DescribeInstanceTypes => {
            let r = client.describe_instance_types().await?;
            render(out, &r.raw, || output::instance_types_table(&r.body.instance_types))
        }
        Command::RegisterImage(a) => {
            let opts = RegisterOptions { name: a.name, description: a.description, source_url: a.source_url, default: a.default };
            let req = manifest::load_request(&a.manifest, &opts)?;
            let r = client.register_image(&req).await?;
            render(out, &r.raw, || output::images_table(std::slice::from_ref(&r.body)))
        }
        Command::DescribeAccount => {
            let r = client.describe_account().await?;
            render(out, &r.raw, || output::account(&r.body))
        }
        Command::Admin(AdminCommand::SetAccountLimits { account, max_instances, max_vcpus }) => {
            let r = client.set_account_limits(&account, max_instances, max_vcpus).await?;
            render(out, &r.raw, || output::account(&r.body))
        }
        Command::Admin(AdminCommand::ResetHost { host }) => {
            let r = client.reset_host(&host).await?;
            render(out, &r.raw, || {
                format!(
                    "host {}: credential reset; its agent registers again with the join token (it retries every 10 s)",
                    r.body["host_id"].as_str().unwrap_or_default()
                )
            })
        }
        Command::Admin(AdminCommand::CreateAccount { name }) => {
            let r = client.create_account(&name).await?;
            let field = |k: &str| r.body[k].as_str().unwrap_or_default().to_string();
            render(out, &r.raw, || {
                format!(
                    "account {} ({})\naccess key id:     {}\nsecret access key: {}   (shown once)\nNIMBUS_TOKEN={}:{}",
                    field("account_id"),
                    field("name"),
                    field("access_key_id"),
                    field("secret_access_key"),
                    field("access_key_id"),
                    field("secret_access_key")
                )
            })
        }
    };
    println!("{text}");
    Ok(())
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
        r.body.instances = ids
            .iter()
            .filter_map(|id| done.body.instances.iter().find(|i| &i.instance_id == id).cloned())
            .collect();
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
