//! Accounts on the REST front door: each sees and touches only its own
//! instances, tags and key pairs; operator-only calls refuse accounts.

use nimbus_tests::{instance_ids, Cloud};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn accounts_are_isolated_on_the_rest_api() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 32, 32768, 500).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let alice = cloud.create_account("alice").await.unwrap();
    let bob = cloud.create_account("bob").await.unwrap();
    let call = |token: &str, m: Method, path: &str, body: Option<serde_json::Value>| {
        let (token, path) = (token.to_string(), path.to_string());
        let cloud = &cloud;
        async move { cloud.call_as(Some(&token), m, &path, body).await.unwrap() }
    };

    let (status, r) = call(&alice, Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano", "max_count": 2,
        "tags": [{"key": "team", "value": "red"}]}))).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let ids = instance_ids(&r);
    assert_eq!(r["owner_id"].as_str().unwrap().len(), 12);
    assert_ne!(r["owner_id"], "000000000000");
    assert_eq!(r["instances"][0]["tags"], json!([{"key": "team", "value": "red"}]));

    // Bob: sees nothing, and every id of Alice's answers as if it did not exist.
    let (_, list) = call(&bob, Method::GET, "/v1/instances", None).await;
    assert_eq!(list["instances"], json!([]));
    for (m, path, body) in [
        (Method::GET, format!("/v1/instances/{}", ids[0]), None),
        (Method::POST, "/v1/instances/terminate".to_string(), Some(json!({"instance_ids": [ids[0]]}))),
        (Method::POST, "/v1/instances/stop".to_string(), Some(json!({"instance_ids": [ids[0]]}))),
        (Method::POST, "/v1/instances/reboot".to_string(), Some(json!({"instance_ids": [ids[0]]}))),
        (Method::GET, format!("/v1/instances/{}/console", ids[0]), None),
        (Method::POST, "/v1/tags".to_string(), Some(json!({"resource_ids": [ids[0]], "tags": [{"key": "x", "value": "y"}]}))),
    ] {
        let (status, body) = call(&bob, m, &path, body).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("InvalidInstanceID.NotFound")), "{path}");
    }
    let (_, tags) = call(&bob, Method::GET, "/v1/tags", None).await;
    assert_eq!(tags["tags"], json!([]));
    // Alice's instances are untouched.
    let (_, list) = call(&alice, Method::GET, "/v1/instances?tag=team=red", None).await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 2);
    assert!(list["instances"].as_array().unwrap().iter().all(|i| i["state"]["name"] != "shutting-down"));

    // Key pairs are per account.
    let (status, k) = call(&alice, Method::POST, "/v1/key-pairs", Some(json!({"name": "k1"}))).await;
    assert_eq!(status, StatusCode::OK, "{k}");
    assert!(k["key_material"].as_str().unwrap().contains("OPENSSH PRIVATE KEY"));
    let (_, bobs) = call(&bob, Method::GET, "/v1/key-pairs", None).await;
    assert_eq!(bobs["key_pairs"], json!([]));
    let (status, body) = call(&bob, Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano", "key_name": "k1"}))).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("InvalidKeyPair.NotFound")));
    let (status, body) = call(&alice, Method::POST, "/v1/key-pairs", Some(json!({"name": "k1"}))).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("InvalidKeyPair.Duplicate")));

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
                let (done,): (i64,) = sqlx::query_as("SELECT reboots_done FROM instances WHERE id = $1").bind(&id).fetch_one(cloud.db()).await?;
                Ok(done == 1)
            }
        })
        .await
        .expect("the agent carried out the reboot");
    call(Method::POST, "/v1/instances/terminate", Some(json!({"instance_ids": [id]}))).await;
    wait("terminated").await;
    let (status, body) = call(Method::POST, "/v1/instances/start", Some(json!({"instance_ids": [id]}))).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("IncorrectInstanceState")));
}
