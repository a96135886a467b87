//! Accounts on the REST front door: each sees and touches only its own
//! instances, tags and key pairs; operator-only calls refuse accounts.

use nimbus_tests::{instance_ids, Cloud};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Bob's answer to a call naming `id`, with `id` written as `<id>` (the
/// message names it): (status, body without the request id).
async fn answer(cloud: &Cloud, token: &str, m: Method, path: &str, body: Option<Value>, id: &str) -> (StatusCode, String) {
    let (status, mut body) = cloud.call_as(Some(token), m, path, body).await.unwrap();
    if let Some(o) = body.as_object_mut() {
        o.remove("request_id");
    }
    (status, body.to_string().replace(id, "<id>"))
}

/// Every call of Bob's that names one of Alice's instances, tags or key
/// pairs answers exactly as it does for one that does not exist, and
/// changes nothing anywhere; lists and his account show him only his own.
#[tokio::test]
async fn accounts_are_isolated_on_the_rest_api() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 32, 32768, 500).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let alice = cloud.create_account("alice").await.unwrap();
    let bob = cloud.create_account("bob").await.unwrap();
    let call = |token: &str, m: Method, path: &str, body: Option<Value>| {
        let (token, path) = (token.to_string(), path.to_string());
        let cloud = &cloud;
        async move { cloud.call_as(Some(&token), m, &path, body).await.unwrap() }
    };

    // Alice: two instances (one running, one stopped), tags, a key pair, console output.
    let launch = json!({"instance_type": "t3.nano", "max_count": 2, "client_token": "shared-token",
        "tags": [{"key": "team", "value": "red"}]});
    let (status, r) = call(&alice, Method::POST, "/v1/instances", Some(launch.clone())).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let ids = instance_ids(&r);
    assert_eq!(r["owner_id"].as_str().unwrap().len(), 12);
    assert_ne!(r["owner_id"], "000000000000");
    assert_eq!(r["instances"][0]["tags"], json!([{"key": "team", "value": "red"}]));
    let (status, k) = call(&alice, Method::POST, "/v1/key-pairs", Some(json!({"name": "k1"}))).await;
    assert_eq!(status, StatusCode::OK, "{k}");
    assert!(k["key_material"].as_str().unwrap().contains("OPENSSH PRIVATE KEY"));
    cloud.wait_for_state_as(&alice, &ids, "running", T).await.unwrap();
    let (status, _) = call(&alice, Method::POST, "/v1/instances/stop", Some(json!({"instance_ids": [ids[1]]}))).await;
    assert_eq!(status, StatusCode::OK);
    cloud.wait_for_state_as(&alice, &ids[1..], "stopped", T).await.unwrap();
    std::fs::write(agent.state_dir.join("instances").join(&ids[0]).join("console.log"), "alice's console\n").unwrap();
    let console = format!("/v1/instances/{}/console", ids[0]);
    cloud
        .wait_until(T, || async { Ok(call(&alice, Method::GET, &console, None).await.1["output"] != Value::Null) })
        .await
        .expect("alice's console shipped");

    // Bob, on each of Alice's instances, and on an id nobody has.
    let before = cloud.everything().await.unwrap();
    let missing = "i-0123456789abcdef0";
    let mut calls = Vec::new();
    for id in [&ids[0], &ids[1]] {
        let one = json!({"instance_ids": [id]});
        calls.extend([
            (Method::GET, format!("/v1/instances/{id}"), None, id.clone()),
            (Method::GET, format!("/v1/instances?instance_id={id}"), None, id.clone()),
            (Method::POST, "/v1/instances/stop".to_string(), Some(one.clone()), id.clone()),
            (Method::POST, "/v1/instances/start".to_string(), Some(one.clone()), id.clone()),
            (Method::POST, "/v1/instances/reboot".to_string(), Some(one.clone()), id.clone()),
            (Method::POST, "/v1/instances/terminate".to_string(), Some(one.clone()), id.clone()),
            (Method::DELETE, format!("/v1/instances/{id}"), None, id.clone()),
            (Method::GET, format!("/v1/instances/{id}/console"), None, id.clone()),
            (Method::POST, "/v1/tags".to_string(), Some(json!({"resource_ids": [id], "tags": [{"key": "x", "value": "y"}]})), id.clone()),
            (Method::POST, "/v1/tags/delete".to_string(), Some(json!({"resource_ids": [id], "tags": [{"key": "team"}]})), id.clone()),
            (Method::GET, format!("/v1/tags?resource_id={id}"), None, id.clone()),
        ]);
    }
    calls.extend([
        (Method::DELETE, "/v1/key-pairs/k1".to_string(), None, "k1".to_string()),
        (Method::POST, "/v1/instances".to_string(), Some(json!({"instance_type": "t3.nano", "key_name": "k1"})), "k1".to_string()),
    ]);
    for (m, path, body, id) in calls {
        let (other, ghost) = if id.starts_with("i-") { (id.clone(), missing) } else { (id.clone(), "no-such-key") };
        let theirs = answer(&cloud, &bob, m.clone(), &path, body.clone(), &other).await;
        let (gpath, gbody) =
            (path.replace(&other, ghost), body.map(|b| serde_json::from_str(&b.to_string().replace(&other, ghost)).unwrap()));
        let nobodys = answer(&cloud, &bob, m.clone(), &gpath, gbody, ghost).await;
        assert_eq!(theirs, nobodys, "{m} {path}: another account's resource answers as a missing one");
        if id.starts_with("i-") && path != format!("/v1/tags?resource_id={id}") {
            assert_eq!(theirs.0, StatusCode::BAD_REQUEST, "{m} {path}: {theirs:?}");
            assert!(theirs.1.contains("\"code\":\"InvalidInstanceID.NotFound\""), "{m} {path}: {theirs:?}");
        }
        assert_eq!(cloud.everything().await.unwrap(), before, "{m} {path} changed nothing");
    }
    // Lists, tags and key pairs: only his own (none).
    assert_eq!(call(&bob, Method::GET, "/v1/instances", None).await.1["instances"], json!([]));
    assert_eq!(call(&bob, Method::GET, "/v1/tags", None).await.1["tags"], json!([]));
    assert_eq!(call(&bob, Method::GET, "/v1/key-pairs", None).await.1["key_pairs"], json!([]));
    let (status, body) = call(&alice, Method::POST, "/v1/key-pairs", Some(json!({"name": "k1"}))).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("InvalidKeyPair.Duplicate")), "alice's key is still there");
    // His account shows his usage, not hers.
    let (status, mine) = call(&bob, Method::GET, "/v1/account", None).await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    assert_eq!(mine["usage"], json!({"instances": 0, "vcpus": 0}));
    assert_eq!(call(&alice, Method::GET, "/v1/account", None).await.1["usage"], json!({"instances": 2, "vcpus": 4}));
    assert_ne!(mine["account_id"], r["owner_id"]);

    // One client token, two accounts: Bob's launch is his own, not a retry of Alice's.
    let (status, his) = call(&bob, Method::POST, "/v1/instances", Some(launch.clone())).await;
    assert_eq!(status, StatusCode::OK, "{his}");
    assert_ne!(his["reservation_id"], r["reservation_id"]);
    assert_eq!(his["owner_id"], mine["account_id"]);
    let his_ids = instance_ids(&his);
    assert_eq!(his_ids.len(), 2);
    assert!(his_ids.iter().all(|i| !ids.contains(i)));
    let (_, again) = call(&bob, Method::POST, "/v1/instances", Some(launch.clone())).await;
    assert_eq!(again["reservation_id"], his["reservation_id"], "his retry finds his reservation");
    let mut different = launch.clone();
    different["instance_type"] = json!("t3.micro");
    let (status, body) = call(&alice, Method::POST, "/v1/instances", Some(different)).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("IdempotentParameterMismatch")), "alice's token is still hers");
    let (_, list) = call(&alice, Method::GET, "/v1/instances", None).await;
    let listed: Vec<&str> = list["instances"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    let states: Vec<&str> = list["instances"].as_array().unwrap().iter().map(|i| i["state"]["name"].as_str().unwrap()).collect();
    assert_eq!(states, ["running", "stopped"], "Alice's instances as she left them");

    // Operator-only calls.
    for (m, path, body) in [
        (Method::GET, "/v1/hosts", None),
        (Method::POST, "/v1/admin/accounts", Some(json!({"name": "mallory"}))),
        (Method::POST, "/v1/images", Some(json!({"name": "x"}))),
    ] {
        let (status, body) = call(&alice, m, path, body).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("UnauthorizedOperation")), "{path}");
    }
    // A wrong secret is refused.
    let forged = format!("{}:{}", alice.split(':').next().unwrap(), "x".repeat(40));
    let (status, body) = call(&forged, Method::GET, "/v1/instances", None).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("AuthFailure")));
}

#[tokio::test]
async fn stop_start_reboot_and_state_rules_on_rest() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let user = cloud.create_account("carol").await.unwrap();
    let call = |m: Method, path: &str, body: Option<serde_json::Value>| {
        let (token, path) = (user.clone(), path.to_string());
        let cloud = &cloud;
        async move { cloud.call_as(Some(&token), m, &path, body).await.unwrap() }
    };
    let (_, r) = call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano"}))).await;
    let id = instance_ids(&r).remove(0);
    let wait = |state: &'static str| {
        let (cloud, token, id) = (&cloud, user.clone(), id.clone());
        async move {
            cloud
                .wait_until(std::time::Duration::from_secs(30), || {
                    let (token, id) = (token.clone(), id.clone());
                    async move {
                        let (_, i) = cloud.call_as(Some(&token), Method::GET, &format!("/v1/instances/{id}"), None).await?;
                        Ok(i["state"]["name"] == state)
                    }
                })
                .await
                .unwrap()
        }
    };
    wait("running").await;
    let (status, body) = call(Method::POST, "/v1/instances/start", Some(json!({"instance_ids": [id]}))).await;
    assert_eq!(status, StatusCode::OK, "starting a running instance is a no-op: {body}");
    let (_, body) = call(Method::POST, "/v1/instances/stop", Some(json!({"instance_ids": [id]}))).await;
    assert_eq!(body["stopping_instances"][0]["current_state"]["name"], "stopping");
    wait("stopped").await;
    let (status, body) = call(Method::POST, "/v1/instances/reboot", Some(json!({"instance_ids": [id]}))).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("IncorrectInstanceState")));
    let (_, body) = call(Method::POST, "/v1/instances/start", Some(json!({"instance_ids": [id]}))).await;
    assert_eq!(body["starting_instances"][0]["current_state"]["name"], "pending");
    wait("running").await;
    let (status, _) = call(Method::POST, "/v1/instances/reboot", Some(json!({"instance_ids": [id]}))).await;
    assert_eq!(status, StatusCode::OK);
    let id2 = id.clone();
    cloud
        .wait_until(std::time::Duration::from_secs(30), || {
            let id = id2.clone();
            let cloud = &cloud;
            async move {
                let (done,): (i64,) =
                    sqlx::query_as("SELECT reboots_done FROM instances WHERE id = $1").bind(&id).fetch_one(cloud.db()).await?;
                Ok(done == 1)
            }
        })
        .await
        .expect("the agent carried out the reboot");
    let (status, body) = call(Method::POST, "/v1/instances/terminate", Some(json!({"instance_ids": [id]}))).await;
    assert_eq!((status, &body["terminating_instances"][0]["current_state"]["name"]), (StatusCode::OK, &json!("shutting-down")), "{body}");
    wait("terminated").await;
    let (status, body) = call(Method::POST, "/v1/instances/start", Some(json!({"instance_ids": [id]}))).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("IncorrectInstanceState")));
}
