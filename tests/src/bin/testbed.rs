//! testbed: a control plane on a fresh database with one host agent on
//! libvirt's test driver, a default image and one account, for tests written
//! in other languages (tests/python). Prints one JSON line
//! `{"endpoint", "access_key_id", "secret_access_key", "region", "image_id"}`
//! and runs until its standard input closes.

use nimbus_tests::Cloud;
use serde_json::json;
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cloud = Cloud::start().await?;
    let _agent = cloud.add_agent("testbed", "nimbus-1a", 64, 65536, 1000).await?;
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
        })
    );
    let mut sink = Vec::new();
    tokio::io::stdin().read_to_end(&mut sink).await?;
    Ok(())
}
