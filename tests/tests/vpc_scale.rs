//! The cost of a host's network in its assignments: one host with 1,000
//! interfaces whose group has 50 rules (some naming other groups). Every
//! answer of the long poll carries the whole HostNetwork, so it must stay a
//! few set-based queries (service/network/agent_view.rs::host_network).

use nimbus_tests::{Cloud, CloudOptions};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn a_host_with_a_thousand_interfaces_gets_its_network_quickly() {
    let cloud = Cloud::start_with(CloudOptions { default_limits: (2000, 4000), ..Default::default() }).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let reg = json!({"name": "big", "availability_zone": "az1", "hypervisor": "test", "vcpus": 4000, "memory_mib": 1u64 << 30, "disk_gib": 1u64 << 30, "underlay_ip": "10.9.0.1"});
    let (status, cred) = cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/register", Some(reg)).await.unwrap();
    assert_eq!(status, 200, "{cred}");
    let bearer = format!("{}.{}", cred["host_id"].as_str().unwrap(), cred["secret"].as_str().unwrap());

    let sg = cloud.post("/v1/security-groups", json!({"group_name": "web", "description": "web"})).await.unwrap();
    let sg = sg["group_id"].as_str().unwrap().to_string();
    let mut peers = Vec::new();
    for i in 0..5 {
        let g = cloud.post("/v1/security-groups", json!({"group_name": format!("peer{i}"), "description": "p"})).await.unwrap();
        peers.push(g["group_id"].as_str().unwrap().to_string());
    }
    let mut rules: Vec<Value> = (0..45)
        .map(|i| json!({"protocol": "tcp", "from_port": 1000 + i, "to_port": 1000 + i, "cidrs": [format!("10.{i}.0.0/16")]}))
        .collect();
    rules.extend(peers.iter().map(|p| json!({"protocol": "-1", "group_ids": [p]})));
    cloud.post(&format!("/v1/security-groups/{sg}/ingress"), json!({ "rules": rules })).await.unwrap();

    for _ in 0..10 {
        let r = cloud
            .post("/v1/instances", json!({"instance_type": "t3.nano", "min_count": 100, "max_count": 100, "security_group_ids": [sg]}))
            .await
            .unwrap();
        assert_eq!(r["instances"].as_array().unwrap().len(), 100);
    }

    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (status, a) = cloud.call_as(Some(&bearer), Method::GET, "/v1/agent/assignments?after=0", None).await.unwrap();
        times.push(started.elapsed());
        assert_eq!(status, 200);
        assert_eq!(a["instances"].as_array().unwrap().len(), 1000);
        assert!(a["instances"].as_array().unwrap().iter().all(|i| i["nics"].as_array().map(Vec::len) == Some(1)));
        let net = &a["network"];
        assert_eq!(net["groups"][0]["ingress"].as_array().unwrap().len(), 50);
        assert_eq!(net["members"][&sg].as_array().unwrap().len(), 1000);
        assert_eq!(net["members"].as_object().unwrap().len(), 6, "the group and the five it names");
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!("full assignments of 1,000 instances with their network: median {median:?}, all {times:?}");
    // A query per interface would cost seconds here; five set-based ones cost little.
    assert!(median < Duration::from_secs(3), "median {median:?}");
}
