//! Instance lifecycle through the real control plane and agents on the test driver.

use nimbus_host_agent::domain;
use nimbus_host_agent::reconcile::AgentEvent;
use nimbus_tests::{await_event, define_test_domain, instance_ids, test_domain_state, AgentHandle, Cloud};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

async fn host_id(cloud: &Cloud, name: &str) -> String {
    let hosts = cloud.get("/v1/hosts").await.unwrap();
    hosts["hosts"].as_array().unwrap().iter().find(|h| h["name"] == name).unwrap()["host_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn terminate_releases_capacity_only_after_the_agent_confirms() {
    let cloud = Cloud::start().await.unwrap();
    let mut agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "max_count": 2})).await.unwrap();
    let ids = instance_ids(&r);
    assert!(r["instances"].as_array().unwrap().iter().all(|i| i["state"]["name"] == "pending" && i["state"]["code"] == 0));
    let running = cloud.wait_for_state(&ids, "running", T).await.unwrap();
    assert!(running.iter().all(|i| i["state"]["code"] == 16));
    assert_eq!(test_domain_state(&ids[0]).await, Some(true));
    let dir = agent.state_dir.join("instances").join(&ids[0]);
    assert!(dir.join("root.qcow2").exists() && dir.join("seed.iso").exists());
    assert_eq!(cloud.vcpu_accounting().await.unwrap()[0].2, 4);

    // With the agent down, terminating cannot be confirmed: capacity stays held.
    agent.stop().await;
    let t = cloud.post("/v1/instances/terminate", json!({"instance_ids": [ids[0]]})).await.unwrap();
    assert_eq!(t["terminating_instances"][0]["previous_state"]["name"], "running");
    assert_eq!(t["terminating_instances"][0]["current_state"]["name"], "shutting-down");
    assert_eq!(t["terminating_instances"][0]["current_state"]["code"], 32);
    // Idempotent: again, same answer, nothing changes.
    let again = cloud.post("/v1/instances/terminate", json!({"instance_ids": [ids[0]]})).await.unwrap();
    assert_eq!(again["terminating_instances"][0]["previous_state"]["name"], "shutting-down");
    assert_eq!(again["terminating_instances"][0]["current_state"]["name"], "shutting-down");
    let acct = cloud.vcpu_accounting().await.unwrap();
    assert_eq!((acct[0].2, acct[0].3), (4, 4), "capacity must stay held until the agent confirms");
    assert_eq!(test_domain_state(&ids[0]).await, Some(true), "the guest is still there");

    // The agent comes back, removes the guest, confirms; only then is capacity free.
    cloud.start_agent(&mut agent).await.unwrap();
    cloud.wait_for_state(&ids[..1], "terminated", T).await.unwrap();
    assert_eq!(test_domain_state(&ids[0]).await, None);
    assert!(!dir.exists(), "the guest's files are removed");
    let acct = cloud.vcpu_accounting().await.unwrap();
    assert_eq!((acct[0].2, acct[0].3), (2, 2));
    // The other instance was untouched, and terminating a terminated instance is fine.
    assert_eq!(test_domain_state(&ids[1]).await, Some(true));
    let (status, body) = cloud.call(Method::DELETE, &format!("/v1/instances/{}", ids[0]), None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["current_state"]["name"], "terminated");
}

#[tokio::test]
async fn a_restarted_agent_converges() {
    let cloud = Cloud::start().await.unwrap();
    let mut agent = cloud.add_agent("a", "az1", 16, 16384, 100).await.unwrap();
    let hid = host_id(&cloud, &agent.name).await;
    let image = cloud.register_test_image().await.unwrap();

    // Launches while the agent is down stay pending, then run once it is back.
    agent.stop().await;
    let pending = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "max_count": 2})).await.unwrap());

    // A crash between "define" and "start": a domain defined but not running,
    // its files half made. And a leftover domain of this host that nothing assigns.
    let crashed = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap()).remove(0);
    let orphan = "i-0000000000000dead".to_string();
    let files = agent.state_dir.join("instances");
    for id in [&crashed, &orphan] {
        define_test_domain(&hid, id, &files.join(id)).await.unwrap();
    }
    assert_eq!(test_domain_state(&crashed).await, Some(false));
    let list = cloud.get("/v1/instances?state=pending").await.unwrap();
    assert_eq!(list["instances"].as_array().unwrap().len(), 3);

    cloud.start_agent(&mut agent).await.unwrap();
    let mut all = pending.clone();
    all.push(crashed.clone());
    let running = cloud.wait_for_state(&all, "running", T).await.unwrap();
    assert!(running.iter().all(|i| i["image_id"] == image.image_id.as_str()));
    assert_eq!(test_domain_state(&crashed).await, Some(true), "the half-made guest was adopted and started");
    cloud
        .wait_until(T, || async { Ok(test_domain_state(&orphan).await.is_none() && !files.join(&orphan).exists()) })
        .await
        .expect("the orphan is removed");
    for id in &pending {
        assert_eq!(test_domain_state(id).await, Some(true));
    }

    // A guest that dies on its own is started again (level-triggered).
    let victim = domain::domain_name(&pending[0]);
    tokio::task::spawn_blocking(move || {
        let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
        conn.lookup_domain_by_name(&victim).unwrap().destroy().unwrap();
    })
    .await
    .unwrap();
    let id = pending[0].clone();
    cloud.wait_until(T, || async { Ok(test_domain_state(&id).await == Some(true)) }).await.expect("restarted by the agent's resync");
}

#[tokio::test]
async fn client_token_makes_launch_idempotent() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 64, 65536, 1000).await.unwrap();
    let _b = cloud.add_agent("b", "az2", 64, 65536, 1000).await.unwrap();
    let image = cloud.register_test_image().await.unwrap();
    let mut other = serde_json::to_value(&image).unwrap();
    let other = cloud
        .post(
            "/v1/images",
            json!({"name": "other", "source_url": other["source_url"].take(), "kernel": other["kernel"].take(),
            "root_disk": other["root_disk"].take()}),
        )
        .await
        .unwrap();
    let key = |name: &str| {
        use base64::Engine;
        let mut blob = Vec::new();
        for part in [b"ssh-ed25519".as_slice(), &[name.len() as u8; 32]] {
            blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
            blob.extend_from_slice(part);
        }
        json!({"name": name, "public_key": format!("ssh-ed25519 {}", base64::engine::general_purpose::STANDARD.encode(blob))})
    };
    cloud.post("/v1/key-pairs/import", key("k1")).await.unwrap();
    cloud.post("/v1/key-pairs/import", key("k22")).await.unwrap();

    let body = json!({"instance_type": "t3.nano", "min_count": 1, "max_count": 2, "client_token": "tok-1",
        "user_data": "aGk=", "key_name": "k1", "availability_zone": "az1",
        "tags": [{"key": "a", "value": "1"}, {"key": "b", "value": "2"}]});
    let first = cloud.post("/v1/instances", body.clone()).await.unwrap();
    let second = cloud.post("/v1/instances", body.clone()).await.unwrap();
    assert_eq!(first["reservation_id"], second["reservation_id"]);
    assert_eq!(instance_ids(&first), instance_ids(&second));
    assert_eq!(instance_ids(&first).len(), 2);

    // The same request written differently is a retry: tags in another
    // order, the default image named, base64 with surrounding whitespace.
    let with = |changes: Value| {
        let mut b = body.clone();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                b.as_object_mut().unwrap().remove(k);
            } else {
                b[k] = v.clone();
            }
        }
        b
    };
    for same in [
        json!({"tags": [{"key": "b", "value": "2"}, {"key": "a", "value": "1"}]}),
        json!({"image_id": image.image_id}),
        json!({"user_data": " aGk=\n"}),
    ] {
        let again = cloud.post("/v1/instances", with(same.clone())).await.unwrap();
        assert_eq!(again["reservation_id"], first["reservation_id"], "{same}: a retry");
    }
    // Any other parameter: IdempotentParameterMismatch, and nothing launched.
    for changed in [
        json!({"instance_type": "t3.micro"}),
        json!({"image_id": other["image_id"]}),
        json!({"min_count": 2}),
        json!({"max_count": 3}),
        json!({"user_data": "aGo="}),
        json!({"user_data": null}),
        json!({"key_name": "k22"}),
        json!({"key_name": null}),
        json!({"availability_zone": "az2"}),
        json!({"availability_zone": null}),
        json!({"tags": [{"key": "a", "value": "1"}, {"key": "b", "value": "3"}]}),
        json!({"tags": [{"key": "a", "value": "1"}]}),
        json!({"tags": null}),
    ] {
        let (status, err) = cloud.call(Method::POST, "/v1/instances", Some(with(changed.clone()))).await.unwrap();
        assert_eq!((status, err["code"].as_str()), (StatusCode::CONFLICT, Some("IdempotentParameterMismatch")), "{changed}: {err}");
    }
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 2);

    // Ten concurrent retries of a new token: one reservation.
    let body = json!({"instance_type": "t3.nano", "client_token": "tok-2"});
    let answers = futures::future::join_all((0..10).map(|_| cloud.post("/v1/instances", body.clone()))).await;
    let reservations: std::collections::BTreeSet<String> =
        answers.into_iter().map(|a| a.unwrap()["reservation_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(reservations.len(), 1);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 3);

    // A retry after what the launch named is gone (its key pair deleted,
    // its image deregistered) is still a retry: the original reservation.
    let body = json!({"instance_type": "t3.nano", "client_token": "tok-3", "image_id": other["image_id"], "key_name": "k22"});
    let first = cloud.post("/v1/instances", body.clone()).await.unwrap();
    cloud.call(Method::DELETE, "/v1/key-pairs/k22", None).await.unwrap();
    let id = other["image_id"].as_str().unwrap();
    let (status, _) = cloud.call_as(Some(&cloud.admin_token), Method::DELETE, &format!("/v1/images/{id}"), None).await.unwrap();
    assert!(status.is_success(), "deregistered: {status}");
    let again = cloud.post("/v1/instances", body.clone()).await.unwrap();
    assert_eq!(again["reservation_id"], first["reservation_id"], "a retry: {again}");
    let (status, err) = cloud.call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano", "image_id": id}))).await.unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::BAD_REQUEST, Some("InvalidAMIID.NotFound")), "a new launch is refused: {err}");
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 4);
}

#[tokio::test]
async fn describe_filters_and_paginates() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 64, 65536, 1000).await.unwrap();
    let _b = cloud.add_agent("b", "az2", 64, 65536, 1000).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let launched = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "max_count": 5})).await.unwrap();
    let nanos = instance_ids(&launched);
    let nanos_in_az2: Vec<String> = launched["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["availability_zone"] == "az2")
        .map(|i| i["instance_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(nanos_in_az2.len(), 2, "spread: 5 over two zones puts 2 in the second: {launched}");
    let micros = instance_ids(
        &cloud.post("/v1/instances", json!({"instance_type": "t3.micro", "max_count": 2, "availability_zone": "az2"})).await.unwrap(),
    );

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/instances?max_results=3&next_token={t}"),
            None => "/v1/instances?max_results=3".to_string(),
        };
        let page = cloud.get(&path).await.unwrap();
        pages += 1;
        seen.extend(page["instances"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap().to_string()));
        match page["next_token"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut expected = nanos.clone();
    expected.extend(micros.clone());
    assert_eq!(seen, expected, "every instance once, in launch order");

    let page = cloud.get("/v1/instances?instance_type=t3.micro").await.unwrap();
    let listed: Vec<&str> = page["instances"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap()).collect();
    assert_eq!(listed, micros);
    let page = cloud.get("/v1/instances?availability_zone=az2&instance_type=t3.nano,t3.micro").await.unwrap();
    let listed: Vec<&str> = page["instances"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap()).collect();
    let mut expected_az2 = nanos_in_az2.clone();
    expected_az2.extend(micros.clone());
    assert_eq!(listed, expected_az2, "az2's nanos and both micros, in launch order");
    cloud.post("/v1/instances/terminate", json!({"instance_ids": [nanos[0]]})).await.unwrap();
    cloud.wait_for_state(&nanos[..1], "terminated", T).await.unwrap();
    let page = cloud.get("/v1/instances?state=terminated").await.unwrap();
    assert_eq!(page["instances"].as_array().unwrap().len(), 1);
    assert_eq!(page["instances"][0]["instance_id"], nanos[0].as_str());
    let one = cloud.get(&format!("/v1/instances/{}", micros[1])).await.unwrap();
    assert_eq!(one["instance_type"], "t3.micro");
}

#[tokio::test]
async fn an_instance_the_host_cannot_build_ends_terminated_with_a_reason() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let image = cloud.register_test_image().await.unwrap();
    // Same files, a wrong digest for the kernel: the agent must refuse it.
    let mut bad = serde_json::to_value(&image).unwrap();
    let req = json!({
        "name": "corrupt",
        "source_url": bad["source_url"].take(),
        "kernel": {"name": "vmlinuz", "sha256": "1".repeat(64)},
        "root_disk": bad["root_disk"].take(),
    });
    let corrupt = cloud.post("/v1/images", req).await.unwrap();
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "image_id": corrupt["image_id"]})).await.unwrap();
    let ids = instance_ids(&r);
    let done = cloud.wait_for_state(&ids, "terminated", T).await.unwrap();
    let reason = done[0]["state_reason"].as_str().unwrap();
    assert!(reason.contains("checksum mismatch"), "{reason}");
    assert!(reason.contains("after 3 attempts"), "a failure is retried before it terminates the instance: {reason}");
    let acct = cloud.vcpu_accounting().await.unwrap();
    assert_eq!((acct[0].2, acct[0].3), (0, 0));
}

/// Image files can come from an HTTP server; the agent downloads, verifies and caches them.
#[tokio::test]
async fn images_are_fetched_over_http() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let local = cloud.register_test_image().await.unwrap();
    let dir = local.source_url.as_deref().unwrap().strip_prefix("file://").unwrap().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = tokio::process::Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory", &dir, &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    cloud.wait_until(T, || async move { Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()) }).await.unwrap();
    let mut req = serde_json::to_value(&local).unwrap();
    let req = json!({
        "name": "over-http",
        "source_url": format!("http://127.0.0.1:{port}/"),
        "kernel": req["kernel"].take(),
        "initrd": req["initrd"].take(),
        "root_disk": req["root_disk"].take(),
    });
    let image = cloud.post("/v1/images", req).await.unwrap();
    // Drop the copies the first image's launches might have cached: start clean.
    let _ = std::fs::remove_dir_all(agent.state_dir.join("images"));
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "image_id": image["image_id"]})).await.unwrap();
    cloud.wait_for_state(&instance_ids(&r), "running", T).await.unwrap();
    let cached = agent.state_dir.join("images").join(local.root_disk.unwrap().sha256);
    assert!(cached.exists(), "the base disk was downloaded into the cache");
    server.kill().await.unwrap();
}

/// The next pass the agent completes: whether it was a full resync.
async fn next_pass(agent: &mut AgentHandle, within: Duration) -> bool {
    await_event(&mut agent.events, within, |e| match e {
        AgentEvent::PassCompleted { full, reported, .. } => {
            assert!(reported, "the control plane took the report");
            Some(*full)
        }
        _ => None,
    })
    .await
    .unwrap()
}

/// The wake-up: an agent waits in a long poll of 60 s, and LISTEN/NOTIFY
/// ends it as soon as a change commits; the poll answers only the changes
/// (a delta) and the pass they bring carries each operation out. So each of
/// launch, stop, start, reboot and terminate is done by the next pass, a
/// delta one, within a few seconds and not at the poll's timeout.
#[tokio::test]
async fn a_long_poll_is_woken_by_each_change_and_answered_with_it() {
    const POLL: Duration = Duration::from_secs(60);
    // Well under the poll: only a wake-up makes it.
    const WOKEN_WITHIN: Duration = Duration::from_secs(15);
    let cloud = Cloud::start().await.unwrap();
    let mut agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    cloud.restart_agent_with(&mut agent, |c| c.poll_ms = POLL.as_millis() as u64).await.unwrap();
    // The restarted agent's first pass is a resync; then it waits in its poll.
    assert!(next_pass(&mut agent, T).await, "the first pass is full");

    let state = |id: String| {
        let cloud = &cloud;
        async move { cloud.get(&format!("/v1/instances/{id}")).await.unwrap()["state"]["name"].as_str().unwrap().to_string() }
    };
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap()).remove(0);
    assert!(!next_pass(&mut agent, WOKEN_WITHIN).await, "a launch is carried out by a delta pass");
    assert_eq!(state(id.clone()).await, "running");

    for (op, after) in [("stop", "stopped"), ("start", "running")] {
        cloud.post(&format!("/v1/instances/{op}"), json!({"instance_ids": [id]})).await.unwrap();
        assert!(!next_pass(&mut agent, WOKEN_WITHIN).await, "{op}: a delta pass");
        assert_eq!(state(id.clone()).await, after, "{op}");
    }
    cloud.post("/v1/instances/reboot", json!({"instance_ids": [id]})).await.unwrap();
    assert!(!next_pass(&mut agent, WOKEN_WITHIN).await, "reboot: a delta pass");
    let (done,): (i64,) = sqlx::query_as("SELECT reboots_done FROM instances WHERE id = $1").bind(&id).fetch_one(cloud.db()).await.unwrap();
    assert_eq!(done, 1, "the reboot was carried out");

    cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await.unwrap();
    assert!(!next_pass(&mut agent, WOKEN_WITHIN).await, "terminate: a delta pass");
    assert_eq!(state(id.clone()).await, "terminated");
    assert_eq!(test_domain_state(&id).await, None);
}
