//! testbed: a control plane on a fresh database with one host agent on
//! libvirt's test driver, a default image and one account, for tests written
//! in other languages (tests/python). Prints one JSON line
//! `{"endpoint", "access_key_id", "secret_access_key", "region", "image_id",
//! "admin_token", "user_token", "state_dir"}`, then one JSON line per guest
//! the agent rebooted (`{"event": "rebooted", "instance_id"}`), and runs
//! until its standard input closes.

use nimbus_tests::nimbus_host_agent::reconcile::AgentEvent;
use nimbus_tests::Cloud;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::broadcast::error::RecvError;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cloud = Cloud::start().await?;
    let agent = cloud.add_agent("testbed", "nimbus-1a", 64, 65536, 1000).await?;
    let image = cloud.register_test_image().await?;
    let account = cloud.post("/v1/admin/accounts", json!({"name": "testbed"})).await?;
    println!(
        "{}",
        json!({
            "endpoint": cloud.url,
            "access_key_id": account["access_key_id"],
            "secret_access_key": account["secret_access_key"],
            "region": "nimbus-1",
            "image_id": image.image_id,
            "admin_token": cloud.admin_token,
            "user_token": cloud.user_token,
            "state_dir": agent.state_dir,
        })
    );
    let mut events = agent.events.resubscribe();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(AgentEvent::Rebooted { instance_id, .. }) => println!("{}", json!({"event": "rebooted", "instance_id": instance_id})),
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            }
        }
    });
    let mut sink = Vec::new();
    tokio::io::stdin().read_to_end(&mut sink).await?;
    Ok(())
}
