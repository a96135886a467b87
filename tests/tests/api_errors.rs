//! Bad input answers with a clear 4xx code and creates nothing.

use base64::Engine;
use nimbus_tests::Cloud;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn counts(cloud: &Cloud) -> (i64, i64) {
    let (i,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances").fetch_one(cloud.db()).await.unwrap();
    let (r,): (i64,) = sqlx::query_as("SELECT count(*) FROM reservations").fetch_one(cloud.db()).await.unwrap();
    (i, r)
}

fn assert_error(resp: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(resp.0, status, "{:?}", resp.1);
    assert_eq!(resp.1["code"], code, "{:?}", resp.1);
    assert!(resp.1["message"].as_str().is_some_and(|m| !m.is_empty()), "{:?}", resp.1);
    assert!(resp.1["request_id"].as_str().is_some_and(|m| m.len() == 36), "{:?}", resp.1);
}

#[tokio::test]
async fn bad_launches_are_rejected_and_create_nothing() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 64, 65536, 1000).await.unwrap();
    let image = cloud.register_test_image().await.unwrap();
    let launch = |body: Value| cloud.call(Method::POST, "/v1/instances", Some(body));

    // Malformed JSON.
    let resp = cloud
        .http
        .post(format!("{}/v1/instances", cloud.url))
        .bearer_auth(&cloud.user_token)
        .header("content-type", "application/json")
        .body("{\"instance_type\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.headers().contains_key("x-request-id"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "MalformedRequest");

    assert_error(&launch(json!({"instance_type": 5})).await.unwrap(), StatusCode::BAD_REQUEST, "MalformedRequest");
    assert_error(&launch(json!({"instance_type": "t3.nano", "bogus": 1})).await.unwrap(), StatusCode::BAD_REQUEST, "MalformedRequest");
    assert_error(
        &launch(json!({"instance_type": "t3.nano", "image_id": "ami-00000000000000000"})).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidAMIID.NotFound",
    );
    assert_error(
        &launch(json!({"instance_type": "t3.nano", "image_id": "ami-nope"})).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidAMIID.Malformed",
    );
    assert_error(&launch(json!({"instance_type": "z9.huge"})).await.unwrap(), StatusCode::BAD_REQUEST, "InvalidParameterValue");
    assert_error(
        &launch(json!({"instance_type": "t3.nano", "min_count": 0, "max_count": 0})).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidParameterValue",
    );
    assert_error(
        &launch(json!({"instance_type": "t3.nano", "min_count": 1, "max_count": 101})).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidParameterValue",
    );
    assert_error(
        &launch(json!({"instance_type": "t3.nano", "min_count": 3, "max_count": 2})).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidParameterValue",
    );
    let big = base64::engine::general_purpose::STANDARD.encode(vec![b'#'; 16 * 1024 + 1]);
    assert_error(
        &launch(json!({"instance_type": "t3.nano", "user_data": big})).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidParameterValue",
    );
    assert_error(
        &launch(json!({"instance_type": "t3.nano", "user_data": "%%% not base64"})).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidParameterValue",
    );
    // More than fits (64 vCPUs / 2 per t3.nano = 32): all or nothing.
    assert_error(
        &launch(json!({"instance_type": "t3.nano", "min_count": 33, "max_count": 40})).await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
        "InsufficientInstanceCapacity",
    );
    assert_eq!(counts(&cloud).await, (0, 0), "a rejected launch must leave nothing behind");
    let accounting = cloud.vcpu_accounting().await.unwrap();
    assert!(accounting.iter().all(|(_, _, used, _)| *used == 0), "{accounting:?}");

    // Exactly 16 KiB of user data is fine; min/max places what fits.
    let ok = base64::engine::general_purpose::STANDARD.encode(vec![b'#'; 16 * 1024]);
    let r = cloud
        .post(
            "/v1/instances",
            json!({"instance_type": "t3.nano", "image_id": image.image_id, "user_data": ok, "min_count": 2, "max_count": 40}),
        )
        .await
        .unwrap();
    assert_eq!(r["instances"].as_array().unwrap().len(), 32);
    assert_eq!(counts(&cloud).await, (32, 1));
}

#[tokio::test]
async fn every_call_needs_a_valid_token() {
    let cloud = Cloud::start().await.unwrap();
    for (method, path) in [
        (Method::GET, "/v1/instances"),
        (Method::POST, "/v1/instances"),
        (Method::GET, "/v1/hosts"),
        (Method::GET, "/v1/images"),
        (Method::GET, "/v1/instance-types"),
        (Method::POST, "/v1/instances/terminate"),
    ] {
        let body = (method == Method::POST).then(|| json!({}));
        assert_error(&cloud.call_as(None, method.clone(), path, body.clone()).await.unwrap(), StatusCode::UNAUTHORIZED, "AuthFailure");
        assert_error(
            &cloud.call_as(Some("wrong"), method.clone(), path, body.clone()).await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "AuthFailure",
        );
        // The join token is for hosts, not for the API.
        assert_error(
            &cloud.call_as(Some(&cloud.join_token.clone()), method, path, body).await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "AuthFailure",
        );
    }
    // Hosts: the admin token cannot register a host, a made-up credential cannot poll.
    let reg = json!({"name": "h", "availability_zone": "az1", "hypervisor": "test", "vcpus": 1, "memory_mib": 1, "disk_gib": 1});
    assert_error(
        &cloud.call(Method::POST, "/v1/agent/register", Some(reg.clone())).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "AuthFailure",
    );
    assert_error(
        &cloud.call_as(Some("h-0123456789abcdef0.secret"), Method::GET, "/v1/agent/assignments", None).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "AuthFailure",
    );
    let (status, cred) = cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/register", Some(reg)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{cred}");
    let bearer = format!("{}.{}", cred["host_id"].as_str().unwrap(), cred["secret"].as_str().unwrap());
    let (status, _) = cloud.call_as(Some(&bearer), Method::GET, "/v1/agent/assignments", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let forged = format!("{}.{}", cred["host_id"].as_str().unwrap(), "0".repeat(64));
    assert_error(
        &cloud.call_as(Some(&forged), Method::GET, "/v1/agent/assignments", None).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "AuthFailure",
    );
    // A host credential is not an API token.
    assert_error(&cloud.call_as(Some(&bearer), Method::GET, "/v1/instances", None).await.unwrap(), StatusCode::UNAUTHORIZED, "AuthFailure");
}

#[tokio::test]
async fn unknown_ids_routes_and_filters() {
    let cloud = Cloud::start().await.unwrap();
    assert_error(
        &cloud.call(Method::GET, "/v1/instances/i-0123456789abcdef0", None).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidInstanceID.NotFound",
    );
    assert_error(
        &cloud.call(Method::GET, "/v1/instances/bogus", None).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidInstanceID.Malformed",
    );
    assert_error(
        &cloud.call(Method::POST, "/v1/instances/terminate", Some(json!({"instance_ids": ["i-0123456789abcdef0"]}))).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidInstanceID.NotFound",
    );
    assert_error(
        &cloud.call(Method::POST, "/v1/instances/terminate", Some(json!({"instance_ids": []}))).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "MissingParameter",
    );
    assert_error(
        &cloud.call(Method::GET, "/v1/instances?state=exploded", None).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidParameterValue",
    );
    assert_error(
        &cloud.call(Method::GET, "/v1/instances?next_token=garbage", None).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidParameterValue",
    );
    assert_error(
        &cloud.call(Method::GET, "/v1/instances?max_results=0", None).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidParameterValue",
    );
    assert_error(&cloud.call(Method::GET, "/v1/nothing-here", None).await.unwrap(), StatusCode::NOT_FOUND, "NotFound");
    let bad_image = json!({"name": "x", "source_url": "ftp://x", "kernel": {"name": "k", "sha256": "0".repeat(64)}, "root_disk": {"name": "r", "sha256": "0".repeat(64)}});
    assert_error(&cloud.call(Method::POST, "/v1/images", Some(bad_image)).await.unwrap(), StatusCode::BAD_REQUEST, "InvalidParameterValue");
    let traversal = json!({"name": "x", "source_url": "file:///tmp", "kernel": {"name": "../etc/passwd", "sha256": "0".repeat(64)}, "root_disk": {"name": "r", "sha256": "0".repeat(64)}});
    assert_error(&cloud.call(Method::POST, "/v1/images", Some(traversal)).await.unwrap(), StatusCode::BAD_REQUEST, "InvalidParameterValue");
    // No default image yet.
    assert_error(
        &cloud.call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano"}))).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "MissingParameter",
    );
    let types = cloud.get("/v1/instance-types").await.unwrap();
    let nano = types["instance_types"].as_array().unwrap().iter().find(|t| t["name"] == "t3.nano").cloned().unwrap();
    assert_eq!(nano, json!({"name": "t3.nano", "vcpus": 2, "memory_mib": 512, "disk_gib": 8}));
}

/// Every constraint the service turns into an API error exists, under the
/// name `db::Constraint` gives it, in a database the migrations made: a
/// renamed one would otherwise turn its error into a Conflict or a 500.
#[tokio::test]
async fn the_constraints_the_service_names_exist() {
    let cloud = Cloud::start().await.unwrap();
    for c in nimbus_control_plane::db::Constraint::ALL {
        let found: Option<(i32,)> = sqlx::query_as(
            "SELECT 1 FROM pg_constraint WHERE conname = $1 UNION ALL SELECT 1 FROM pg_class WHERE relname = $1 AND relkind = 'i' LIMIT 1",
        )
        .bind(c.name())
        .fetch_optional(cloud.db())
        .await
        .unwrap();
        assert!(found.is_some(), "{c:?}: no constraint or unique index named {}", c.name());
    }
}
