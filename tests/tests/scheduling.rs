//! Placement against real PostgreSQL with agents on libvirt's test driver.

use nimbus_control_plane::PlacementPolicy;
use nimbus_tests::{instance_ids, Cloud, CloudOptions};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

async fn hosts_by_name(cloud: &Cloud) -> HashMap<String, serde_json::Value> {
    let hosts = cloud.get("/v1/hosts").await.unwrap();
    hosts["hosts"].as_array().unwrap().iter().map(|h| (h["host_id"].as_str().unwrap().to_string(), h.clone())).collect()
}

#[tokio::test]
async fn spread_alternates_zones_and_hosts() {
    let cloud = Cloud::start_with(CloudOptions { placement: PlacementPolicy::Spread, ..Default::default() }).await.unwrap();
    let _a = cloud.add_agent("a", "az1", 16, 16384, 200).await.unwrap();
    let _b = cloud.add_agent("b", "az1", 16, 16384, 200).await.unwrap();
    let _c = cloud.add_agent("c", "az2", 16, 16384, 200).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "min_count": 4, "max_count": 4})).await.unwrap();
    let hosts = hosts_by_name(&cloud).await;
    let zones: Vec<&str> = r["instances"].as_array().unwrap().iter().map(|i| i["availability_zone"].as_str().unwrap()).collect();
    assert_eq!(zones.iter().filter(|z| **z == "az1").count(), 2, "{zones:?}");
    assert_eq!(zones.iter().filter(|z| **z == "az2").count(), 2, "{zones:?}");
    // Within az1, spread puts the two instances on different hosts.
    let mut az1_hosts = Vec::new();
    for i in r["instances"].as_array().unwrap() {
        let host = cloud.host_of(i["instance_id"].as_str().unwrap()).await.unwrap();
        assert_eq!(hosts[&host]["availability_zone"], i["availability_zone"]);
        if i["availability_zone"] == "az1" {
            az1_hosts.push(host);
        }
    }
    assert_eq!(az1_hosts.len(), 2);
    assert_ne!(az1_hosts[0], az1_hosts[1]);
    // A requested zone is honoured.
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "availability_zone": "az2", "max_count": 3})).await.unwrap();
    assert!(r["instances"].as_array().unwrap().iter().all(|i| i["availability_zone"] == "az2"));
    let (status, body) =
        cloud.call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano", "availability_zone": "az9"}))).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("InsufficientInstanceCapacity")));
}

#[tokio::test]
async fn pack_fills_one_host_before_the_next() {
    let cloud = Cloud::start_with(CloudOptions { placement: PlacementPolicy::Pack, ..Default::default() }).await.unwrap();
    let _a = cloud.add_agent("a", "az1", 8, 16384, 200).await.unwrap();
    let _b = cloud.add_agent("b", "az1", 8, 16384, 200).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let mut placed = Vec::new();
    for _ in 0..5 {
        let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap();
        placed.push(cloud.host_of(r["instances"][0]["instance_id"].as_str().unwrap()).await.unwrap());
    }
    // 8 vCPUs hold four t3.nano: the first four share a host, the fifth opens the other.
    assert!(placed[..4].iter().all(|h| *h == placed[0]), "{placed:?}");
    assert_ne!(placed[4], placed[0], "{placed:?}");
}

/// 200 launches at once onto room for 20: exactly 20 win, none over-commits,
/// the rest are told InsufficientInstanceCapacity, and the bookkeeping in
/// PostgreSQL agrees with itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_launches_never_overcommit() {
    let cloud =
        Cloud::start_with(CloudOptions { placement: PlacementPolicy::Spread, db_connections: 30, ..Default::default() }).await.unwrap();
    // t3.nano needs 2 vCPUs: 10 + 6 + 4 vCPUs-worth of room = 10 instances;
    // memory limits host c to 2 instances (1024 MiB).
    let _a = cloud.add_agent("a", "az1", 20, 65536, 1000).await.unwrap();
    let _b = cloud.add_agent("b", "az2", 12, 65536, 1000).await.unwrap();
    let _c = cloud.add_agent("c", "az2", 16, 1024, 1000).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let capacity = 10 + 6 + 2;

    let launches = (0..200).map(|_| {
        let cloud = &cloud;
        async move { cloud.call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano"}))).await.unwrap() }
    });
    let results = futures::future::join_all(launches).await;
    let mut ok = Vec::new();
    let mut insufficient = 0;
    for (status, body) in &results {
        match *status {
            StatusCode::OK => ok.extend(instance_ids(body)),
            StatusCode::SERVICE_UNAVAILABLE if body["code"] == "InsufficientInstanceCapacity" => insufficient += 1,
            other => panic!("unexpected answer {other}: {body}"),
        }
    }
    println!("launched {}, refused {insufficient}", ok.len());
    assert_eq!(ok.len(), capacity);
    assert_eq!(insufficient, 200 - capacity);

    // Count from PostgreSQL.
    let accounting = cloud.vcpu_accounting().await.unwrap();
    for (host, total, used, held) in &accounting {
        assert!(used <= total, "{host} over-committed: {used} > {total}");
        assert_eq!(used, held, "{host}: counter and instances disagree");
    }
    let (over,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM hosts h WHERE (SELECT coalesce(sum(memory_mib), 0) FROM instances i \
         WHERE i.host_id = h.id AND i.capacity_held) > h.total_memory_mib",
    )
    .fetch_one(cloud.db())
    .await
    .unwrap();
    assert_eq!(over, 0);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n as usize, capacity, "refused launches must leave no rows");
    assert_eq!(cloud.account_usage_mismatches().await.unwrap(), vec![]);

    // And the agents really start all of them.
    cloud.wait_for_state(&ok, "running", Duration::from_secs(60)).await.unwrap();
}

/// 32 clients of one account launch as fast as they can against its
/// instance limit: exactly the limit is used (the usage counter is claimed
/// conditionally at the end of each launch, with no account-wide lock), the
/// rest are told InstanceLimitExceeded, and the counter matches the rows;
/// terminations confirmed by the agent give it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_accounts_concurrent_clients_use_exactly_its_limit() {
    let limit = 40;
    let cloud =
        Cloud::start_with(CloudOptions { db_connections: 40, default_limits: (limit, 10_000), ..Default::default() }).await.unwrap();
    let _a = cloud.add_agent("a", "az1", 1000, 1 << 20, 100_000).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let clients = (0..32).map(|_| {
        let cloud = &cloud;
        async move {
            let mut mine = Vec::new();
            loop {
                let (status, body) = cloud.call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano"}))).await.unwrap();
                match status {
                    StatusCode::OK => mine.extend(instance_ids(&body)),
                    StatusCode::BAD_REQUEST if body["code"] == "InstanceLimitExceeded" => return mine,
                    other => panic!("unexpected answer {other}: {body}"),
                }
            }
        }
    });
    let launched: Vec<String> = futures::future::join_all(clients).await.into_iter().flatten().collect();
    assert_eq!(launched.len(), limit as usize);
    assert_eq!(cloud.get("/v1/account").await.unwrap()["usage"], json!({"instances": limit, "vcpus": 2 * limit}));
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, i64::from(limit));
    assert_eq!(cloud.account_usage_mismatches().await.unwrap(), vec![]);

    // Terminations confirmed by the agent give the usage back.
    cloud.call(Method::POST, "/v1/instances/terminate", Some(json!({"instance_ids": launched}))).await.unwrap();
    cloud.wait_for_state(&launched, "terminated", Duration::from_secs(60)).await.unwrap();
    assert_eq!(cloud.get("/v1/account").await.unwrap()["usage"], json!({"instances": 0, "vcpus": 0}));
    assert_eq!(cloud.account_usage_mismatches().await.unwrap(), vec![]);
}

#[tokio::test]
async fn min_count_is_all_or_nothing_and_max_count_takes_what_fits() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 10, 65536, 1000).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let (status, body) =
        cloud.call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano", "min_count": 6, "max_count": 8}))).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("InsufficientInstanceCapacity")), "{body}");
    assert_eq!(cloud.vcpu_accounting().await.unwrap()[0].2, 0);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM reservations").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 0, "a refused launch leaves no reservation");
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "min_count": 2, "max_count": 8})).await.unwrap();
    assert_eq!(instance_ids(&r).len(), 5);
    let launch_indexes: Vec<u64> = r["instances"].as_array().unwrap().iter().map(|i| i["ami_launch_index"].as_u64().unwrap()).collect();
    assert_eq!(launch_indexes, vec![0, 1, 2, 3, 4]);
}

/// A host whose agent stopped heartbeating gets no new instances, and shows
/// as unreachable; when the agent returns, it is used again. The timeout
/// (10 s) is five times the agents' heartbeat (a report every 2 s), so that
/// a loaded machine does not make the live host look dead.
#[tokio::test]
async fn hosts_without_heartbeat_get_no_instances() {
    let cloud = Cloud::start_with(CloudOptions { host_timeout_secs: 10, ..Default::default() }).await.unwrap();
    let mut a = cloud.add_agent("a", "az1", 64, 65536, 1000).await.unwrap();
    let _b = cloud.add_agent("b", "az1", 4, 65536, 1000).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let status = |name: String| {
        let cloud = &cloud;
        async move {
            let hosts = cloud.get("/v1/hosts").await?;
            Ok::<String, anyhow::Error>(
                hosts["hosts"].as_array().unwrap().iter().find(|h| h["name"] == name.as_str()).unwrap()["status"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        }
    };
    assert_eq!(status(a.name.clone()).await.unwrap(), "available");
    a.stop().await;
    cloud.wait_until(Duration::from_secs(60), || async { Ok(status(a.name.clone()).await? == "unreachable") }).await.unwrap();
    // Only b (room for two t3.nano) takes launches now.
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "max_count": 5})).await.unwrap();
    assert_eq!(instance_ids(&r).len(), 2);
    let hosts = hosts_by_name(&cloud).await;
    for i in r["instances"].as_array().unwrap() {
        assert_eq!(hosts[&cloud.host_of(i["instance_id"].as_str().unwrap()).await.unwrap()]["status"], "available");
    }
    let (status_code, body) = cloud.call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano"}))).await.unwrap();
    assert_eq!((status_code, body["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("InsufficientInstanceCapacity")));

    cloud.start_agent(&mut a).await.unwrap();
    cloud.wait_until(Duration::from_secs(60), || async { Ok(status(a.name.clone()).await? == "available") }).await.unwrap();
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap();
    assert_eq!(cloud.host_of(&instance_ids(&r)[0]).await.unwrap(), a.host_id.clone().unwrap(), "the returned host takes it (b is full)");
}
