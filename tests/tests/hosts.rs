//! The host side of the control plane, driven through `/v1/agent/*` the way
//! an agent drives it: registration, reports, and what the operator then
//! sees in `GET /v1/hosts`.

use nimbus_tests::Cloud;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Registers a host named `name` with the join token; returns its bearer credential and id.
async fn register(cloud: &Cloud, name: &str) -> (String, String) {
    let reg = json!({"name": name, "availability_zone": "az1", "hypervisor": "test", "vcpus": 4, "memory_mib": 4096, "disk_gib": 40});
    let (status, cred) = cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/register", Some(reg)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{cred}");
    let id = cred["host_id"].as_str().unwrap().to_string();
    (format!("{id}.{}", cred["secret"].as_str().unwrap()), id)
}

async fn report(cloud: &Cloud, bearer: &str, body: Value) -> (StatusCode, Value) {
    cloud.call_as(Some(bearer), Method::POST, "/v1/agent/report", Some(body)).await.unwrap()
}

async fn host(cloud: &Cloud, id: &str) -> Value {
    let hosts = cloud.get("/v1/hosts").await.unwrap();
    hosts["hosts"].as_array().unwrap().iter().find(|h| h["host_id"] == id).cloned().unwrap()
}

/// An agent's problems (a slow guest start and its likely cause) show in the
/// host listing until a report without them; bad problem lists are refused
/// and change nothing.
#[tokio::test]
async fn hosts_show_the_problems_their_agents_report() {
    let cloud = Cloud::start().await.unwrap();
    let (bearer, id) = register(&cloud, "sick").await;
    let h = host(&cloud, &id).await;
    assert_eq!((h["health"].as_str(), h["problems"].as_array().map(Vec::len)), (Some("ok"), Some(0)));

    let problem = "starting a guest took 52.0 s (a healthy host takes under 10 s); likely cause: /dev/kvm is not root:kvm 0660";
    let (status, body) = report(&cloud, &bearer, json!({"observations": [], "problems": [problem]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let h = host(&cloud, &id).await;
    assert_eq!(h["health"], "degraded");
    assert_eq!(h["problems"], json!([problem]));

    for bad in [json!(vec!["x"; 9]), json!(["x".repeat(1025)]), json!(["nul \u{0} inside"])] {
        let (status, body) = report(&cloud, &bearer, json!({"observations": [], "problems": bad})).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("InvalidParameterValue")), "{body}");
    }
    assert_eq!(host(&cloud, &id).await["problems"], json!([problem]), "a refused report changes nothing");

    let (status, _) = report(&cloud, &bearer, json!({"observations": []})).await;
    assert_eq!(status, StatusCode::OK);
    let h = host(&cloud, &id).await;
    assert_eq!((h["health"].as_str(), h["problems"].clone()), (Some("ok"), json!([])), "healed");
}
