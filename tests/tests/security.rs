//! The attacks of the security review (issue 13), kept as tests so that they
//! stay fixed. Each test names the finding it covers; each failed before its
//! fix.

use nimbus_tests::{instance_ids, Cloud};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn assert_error(resp: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(resp.0, status, "{:?}", resp.1);
    assert_eq!(resp.1["code"], code, "{:?}", resp.1);
}

/// Finding 1: the control plane's database role was a superuser with the
/// password `nimbus`, open to every local user on loopback. Now it owns only
/// its database, and its password is random (scripts/pg.sh; scripts/test.sh
/// exports the control plane's URL as NIMBUS_APP_DATABASE_URL).
#[tokio::test]
async fn the_control_planes_database_role_is_no_superuser_and_has_no_known_password() {
    let url = std::env::var("NIMBUS_APP_DATABASE_URL")
        .expect("NIMBUS_APP_DATABASE_URL (the control plane's database URL, `scripts/pg.sh url`) must be set: run scripts/test.sh");
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let (superuser, createdb, createrole, bypassrls): (bool, bool, bool, bool) =
        sqlx::query_as("SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((superuser, createdb, createrole, bypassrls), (false, false, false, false));
    let (owner,): (String,) =
        sqlx::query_as("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()").fetch_one(&db).await.unwrap();
    let (me,): (String,) = sqlx::query_as("SELECT current_user::text").fetch_one(&db).await.unwrap();
    assert_eq!(owner, me, "the control plane's role owns its database");
    // Nothing else may read a control-plane table (e.g. user-data), nor write one.
    let e = sqlx::query("SELECT * FROM pg_read_file('/etc/passwd')").execute(&db).await.unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");
    db.close().await;

    // The well-known password opens nothing any more.
    let parsed = reqwest::Url::parse(&url).unwrap();
    assert!(parsed.password().is_some_and(|p| p.len() >= 32 && p != "nimbus"), "a random password");
    let mut guessed = parsed.clone();
    guessed.set_password(Some("nimbus")).unwrap();
    let e = sqlx::PgPool::connect(guessed.as_str()).await.unwrap_err();
    assert!(e.to_string().contains("password authentication failed"), "{e}");
}

/// Finding 4 (and 10, 11): local users could read tenants' data on an agent
/// host (credential 0644, overlays 0644 in a 0755 tree, metadata on loopback
/// ports anyone could connect to, or take over after an agent restart), and
/// cached kernels were relabelled to the QEMU user. Now: the state directory
/// is closed, the metadata service is a unix socket only root and QEMU's
/// group reach, and libvirt relabels nothing.
#[tokio::test]
async fn an_agent_hosts_files_and_metadata_are_closed_to_local_users() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "user_data": "c2VjcmV0"})).await.unwrap();
    let id = instance_ids(&r).remove(0);
    cloud.wait_for_state(std::slice::from_ref(&id), "running", T).await.unwrap();
    let qemu = nimbus_host_agent::access::QemuUser::lookup("libvirt-qemu").unwrap();
    let dir = &agent.state_dir;
    let guest = dir.join("instances").join(&id);
    for d in [dir.clone(), dir.join("images"), dir.join("instances"), guest.clone()] {
        assert_eq!(owner_mode(&d), (0, qemu.gid, 0o710), "{}", d.display());
    }
    assert_eq!(owner_mode(&dir.join("credential.json")), (0, 0, 0o600));
    assert_eq!(owner_mode(&guest.join("root.qcow2")), (qemu.uid, qemu.gid, 0o600));
    assert_eq!(owner_mode(&guest.join("seed.iso")), (0, qemu.gid, 0o640));
    for cached in std::fs::read_dir(dir.join("images")).unwrap() {
        assert_eq!(owner_mode(&cached.unwrap().path()), (0, qemu.gid, 0o640));
    }
    let socket = agent.metadata_socket(&id);
    assert_eq!(owner_mode(&socket), (0, qemu.gid, 0o660));
    assert_eq!(owner_mode(socket.parent().unwrap()), (0, qemu.gid, 0o710));
    // The socket answers (what the guest's QEMU forwards to is checked by
    // domain.rs's tests: the test driver drops qemu:commandline).
    let (status, body) = nimbus_host_agent::metadata::request(&socket, "GET", "/latest/user-data", &[]).await.unwrap();
    assert_eq!((status, body.as_slice()), (200, b"secret".as_slice()));
    let name = nimbus_host_agent::domain::domain_name(&id);
    let xml = tokio::task::spawn_blocking(move || {
        let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
        conn.lookup_domain_by_name(&name).unwrap().xml_desc(0).unwrap()
    })
    .await
    .unwrap();
    // libvirt is told to relabel nothing.
    assert!(xml.contains("<seclabel type='static' model='dac' relabel='no'>"), "{xml}");
}

/// Registers a host named `name` with the join token (and `proof`, a bearer
/// credential, if given): the response.
async fn register(cloud: &Cloud, name: &str, proof: Option<&str>) -> (StatusCode, Value) {
    let mut reg = json!({"name": name, "availability_zone": "az1", "hypervisor": "test", "vcpus": 4, "memory_mib": 4096, "disk_gib": 40});
    if let Some(p) = proof {
        reg["current_credential"] = json!(p);
    }
    cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/register", Some(reg)).await.unwrap()
}

fn bearer(cred: &Value) -> String {
    format!("{}.{}", cred["host_id"].as_str().unwrap(), cred["secret"].as_str().unwrap())
}

async fn poll_status(cloud: &Cloud, bearer: &str) -> StatusCode {
    cloud.call_as(Some(bearer), Method::GET, "/v1/agent/assignments", None).await.unwrap().0
}

/// Finding 3: anyone holding the join token (every host has it) could
/// re-register an existing host's name, lock the real host out and receive
/// its assignments. Now a taken name needs the host's current credential, or
/// the operator's explicit reset.
#[tokio::test]
async fn the_join_token_alone_cannot_take_over_a_registered_host() {
    let cloud = Cloud::start().await.unwrap();
    let (status, real) = register(&cloud, "victim", None).await;
    assert_eq!(status, StatusCode::OK);
    let real_bearer = bearer(&real);

    // The impostor: join token, same name, no proof (or a made-up one).
    assert_error(&register(&cloud, "victim", None).await, StatusCode::CONFLICT, "HostAlreadyRegistered");
    let forged = format!("{}.{}", real["host_id"].as_str().unwrap(), "0".repeat(64));
    assert_error(&register(&cloud, "victim", Some(&forged)).await, StatusCode::CONFLICT, "HostAlreadyRegistered");
    assert_eq!(poll_status(&cloud, &real_bearer).await, StatusCode::OK, "the real host is not locked out");

    // The host itself, with its credential, rotates it and keeps its id.
    let (status, rotated) = register(&cloud, "victim", Some(&real_bearer)).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_eq!(rotated["host_id"], real["host_id"]);
    assert_eq!(poll_status(&cloud, &real_bearer).await, StatusCode::UNAUTHORIZED, "the old secret is gone");
    let rotated_bearer = bearer(&rotated);
    assert_eq!(poll_status(&cloud, &rotated_bearer).await, StatusCode::OK);

    // Only the operator resets; then the name is free for its machine.
    let reset = format!("/v1/hosts/{}/reset-credential", real["host_id"].as_str().unwrap());
    assert_error(
        &cloud.call_as(Some(&cloud.user_token), Method::POST, &reset, None).await.unwrap(),
        StatusCode::FORBIDDEN,
        "UnauthorizedOperation",
    );
    assert_error(
        &cloud.call(Method::POST, "/v1/hosts/h-0123456789abcdef0/reset-credential", None).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidHostID.NotFound",
    );
    let (status, body) = cloud.call(Method::POST, "/v1/hosts/victim/reset-credential", None).await.unwrap();
    assert_eq!((status, &body["host_id"]), (StatusCode::OK, &real["host_id"]), "by name too");
    assert_eq!(poll_status(&cloud, &rotated_bearer).await, StatusCode::UNAUTHORIZED, "a reset credential stops working at once");
    let (status, again) = register(&cloud, "victim", None).await;
    assert_eq!((status, &again["host_id"]), (StatusCode::OK, &real["host_id"]));
    assert_eq!(poll_status(&cloud, &bearer(&again)).await, StatusCode::OK);
    assert_error(&register(&cloud, "victim", None).await, StatusCode::CONFLICT, "HostAlreadyRegistered");
}

/// A registration whose answer was lost (the agent stopped before it saved
/// the credential) is repeated with the secret the agent made and saved
/// first: the same host, the same secret. Another secret, or none, is still
/// an impostor; a malformed secret is refused.
#[tokio::test]
async fn a_lost_registration_answer_is_repeated_with_the_agents_own_secret() {
    let cloud = Cloud::start().await.unwrap();
    let with_secret = |secret: &str| {
        let reg = json!({"name": "h", "availability_zone": "az1", "hypervisor": "test", "vcpus": 4, "memory_mib": 4096,
                         "disk_gib": 40, "secret": secret});
        cloud.call_as(Some(&cloud.join_token), Method::POST, "/v1/agent/register", Some(reg))
    };
    let mine = "ab".repeat(32);
    let (status, first) = with_secret(&mine).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["secret"], mine.as_str(), "the host holds the secret it made");
    let (status, again) = with_secret(&mine).await.unwrap();
    assert_eq!((status, &again["host_id"], &again["secret"]), (StatusCode::OK, &first["host_id"], &first["secret"]));
    assert_eq!(poll_status(&cloud, &bearer(&again)).await, StatusCode::OK);
    assert_error(&with_secret(&"cd".repeat(32)).await.unwrap(), StatusCode::CONFLICT, "HostAlreadyRegistered");
    assert_error(&register(&cloud, "h", None).await, StatusCode::CONFLICT, "HostAlreadyRegistered");
    for bad in ["AB".repeat(32), "ab".repeat(31), format!("{}.x", "a".repeat(62))] {
        assert_error(&with_secret(&bad).await.unwrap(), StatusCode::BAD_REQUEST, "InvalidParameterValue");
    }
    assert_eq!(poll_status(&cloud, &bearer(&first)).await, StatusCode::OK, "the host was not disturbed");
}

/// The agent's side: it saves the secret before registering, so an agent
/// stopped after the control plane registered it but before it saved the
/// answer (here: the credential file removed) gets its name back at the
/// next start instead of `HostAlreadyRegistered` until an operator's reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_lost_its_registration_answer_registers_again() {
    let cloud = Cloud::start().await.unwrap();
    let mut agent = cloud.add_agent("lost", "az1", 8, 8192, 100).await.unwrap();
    let host_id = agent.host_id.clone();
    agent.stop().await;
    let cred: Value = serde_json::from_slice(&std::fs::read(agent.state_dir.join("credential.json")).unwrap()).unwrap();
    // The state a stop between the answer and its saving leaves.
    std::fs::write(agent.state_dir.join("credential.pending"), cred["secret"].as_str().unwrap()).unwrap();
    std::fs::remove_file(agent.state_dir.join("credential.json")).unwrap();
    cloud.start_agent(&mut agent).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap());
    cloud.wait_for_state(&id, "running", Duration::from_secs(60)).await.expect("the agent has its name back and works");
    let saved: Value = serde_json::from_slice(&std::fs::read(agent.state_dir.join("credential.json")).unwrap()).unwrap();
    assert_eq!((saved["host_id"].as_str(), &saved["secret"]), (host_id.as_deref(), &cred["secret"]), "the same host and secret");
    assert!(!agent.state_dir.join("credential.pending").exists(), "the pending secret is gone once the answer is saved");
}

/// The agent's side of a reset: its credential is refused, it registers
/// again with the join token, and keeps running its guests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_credential_was_reset_registers_again_and_keeps_its_guests() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let first = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap());
    cloud.wait_for_state(&first, "running", T).await.unwrap();
    let cred_file = agent.state_dir.join("credential.json");
    let before = std::fs::read(&cred_file).unwrap();
    let host_id = agent.host_id.clone().unwrap();
    cloud.post(&format!("/v1/hosts/{host_id}/reset-credential"), json!({})).await.unwrap();
    cloud.wait_until(T, || async { Ok(std::fs::read(&cred_file)? != before) }).await.expect("the agent registered again");
    let cred: Value = serde_json::from_slice(&std::fs::read(&cred_file).unwrap()).unwrap();
    assert_eq!(cred["host_id"], host_id.as_str(), "same host");
    let second = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap());
    cloud.wait_for_state(&second, "running", T).await.unwrap();
    cloud.wait_for_state(&first, "running", T).await.unwrap();
}

/// Sends a request head announcing a `len`-byte body and no body; returns the
/// status line the server answers within 10 s (None: it kept waiting for
/// the body).
async fn status_without_body(cloud: &Cloud, method: &str, path: &str, token: Option<&str>, len: usize) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = cloud.url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {len}\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string()),
        _ => None,
    }
}

/// Finding 5: request bodies (up to 64 MiB) were read and parsed before the
/// join token was checked. Now every route authenticates from the head
/// alone, before it reads a byte of body; and each has a small limit (but
/// an authenticated host's report), enforced from `Content-Length` before
/// reading too.
#[tokio::test]
async fn bodies_are_read_only_after_authentication_and_within_small_limits() {
    let cloud = Cloud::start().await.unwrap();
    // (path, a length within the route's limit, one over it)
    for (path, within, over) in
        [("/v1/agent/register", 8 << 10, 1 << 20), ("/v1/agent/report", 60 << 20, 65 << 20), ("/v1/instances", 100 << 10, 1 << 20)]
    {
        for token in [None, Some("not-a-credential"), Some("h-0123456789abcdef0.forged"), Some("AKIAAAAAAAAAAAAAAAAA:wrong")] {
            let status = status_without_body(&cloud, "POST", path, token, within).await;
            assert_eq!(status.as_deref(), Some("HTTP/1.1 401 Unauthorized"), "{path} with {token:?}: answered before any body");
            let status = status_without_body(&cloud, "POST", path, token, over).await;
            assert_eq!(status.as_deref(), Some("HTTP/1.1 413 Payload Too Large"), "{path} with {token:?}: refused from the head");
        }
    }
    // Authenticated, a registration or a tenant call gets no large body either.
    let join = cloud.join_token.clone();
    let status = status_without_body(&cloud, "POST", "/v1/agent/register", Some(&join), 1 << 20).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 413 Payload Too Large"));
    let status = status_without_body(&cloud, "POST", "/v1/instances", Some(&cloud.user_token.clone()), 1 << 20).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 413 Payload Too Large"));
    let padded = json!({"instance_type": "t3.nano", "user_data": "A".repeat(200 * 1024)});
    assert_error(
        &cloud.call(Method::POST, "/v1/instances", Some(padded)).await.unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
    );
}

/// Finding 12: one host credential could hold any number of long polls
/// open. Now a new poll of a host ends the wait of the one before: of many
/// concurrent polls, all but the newest answer at once.
#[tokio::test]
async fn a_host_holds_one_long_poll_at_a_time() {
    let cloud = Cloud::start().await.unwrap();
    let (_, cred) = register(&cloud, "poller", None).await;
    let b = bearer(&cred);
    let (_, first) = cloud.call_as(Some(&b), Method::GET, "/v1/agent/assignments", None).await.unwrap();
    let generation = first["generation"].as_i64().unwrap();
    let path = format!("/v1/agent/assignments?after={generation}&wait_ms=30000");
    let started = std::time::Instant::now();
    let polls = (0..20).map(|_| {
        let (cloud, b, path) = (&cloud, b.clone(), path.clone());
        async move {
            let (status, _) = cloud.call_as(Some(&b), Method::GET, &path, None).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            started.elapsed()
        }
    });
    let mut took: Vec<Duration> = futures::future::join_all(polls).await;
    took.sort();
    assert!(took[18] < Duration::from_secs(10), "19 of 20 polls answer at once, superseded by a newer one: {took:?}");
    assert!(took[19] >= Duration::from_secs(29), "the newest waits its full time: {took:?}");
}

/// Finding 6: CreateTags took any number of resource ids and wrote each
/// (resource, tag) pair with its own statement (4,000 copies of one id with
/// 48 tags: 226 s in one transaction). Now ids are deduplicated, at most
/// 1,000, and one statement writes them all.
#[tokio::test]
async fn create_tags_is_bounded_and_set_based() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap()).remove(0);
    let tags: Vec<Value> = (0..48).map(|i| json!({"key": format!("k{i}"), "value": "v"})).collect();
    let t0 = std::time::Instant::now();
    let (status, body) =
        cloud.call(Method::POST, "/v1/tags", Some(json!({"resource_ids": vec![id.clone(); 4000], "tags": tags}))).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    // The old code took 226 s for this; a bound far above the new cost, far below the old.
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM tags WHERE resource_id = $1").bind(&id).fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 48);
    let many: Vec<String> = (0..1001).map(|i| format!("i-{i:017x}")).collect();
    assert_error(
        &cloud.call(Method::POST, "/v1/tags", Some(json!({"resource_ids": many, "tags": [{"key": "k", "value": "v"}]}))).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidParameterValue",
    );
    let dup = json!({"resource_ids": [id], "tags": [{"key": "k", "value": "1"}, {"key": "k", "value": "2"}]});
    assert_error(&cloud.call(Method::POST, "/v1/tags", Some(dup)).await.unwrap(), StatusCode::BAD_REQUEST, "InvalidParameterValue");
    // Over 50 tags on the resource: refused, nothing written.
    let three: Vec<Value> = (0..3).map(|i| json!({"key": format!("x{i}"), "value": "v"})).collect();
    assert_error(
        &cloud.call(Method::POST, "/v1/tags", Some(json!({"resource_ids": [id], "tags": three}))).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "TagLimitExceeded",
    );
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM tags WHERE resource_id = $1").bind(&id).fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 48, "all or nothing");
}

/// Finding 7: no per-account quotas, so one tenant could fill every host.
/// Now each account has instance and vCPU limits (the operator's per
/// account, else the defaults), checked inside the launch transaction.
#[tokio::test]
async fn accounts_have_limits_enforced_in_the_launch_transaction() {
    let cloud = Cloud::start_with(nimbus_tests::CloudOptions { default_limits: (4, 6), ..Default::default() }).await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 64, 65536, 1000).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let account = cloud.get("/v1/account").await.unwrap();
    assert_eq!(account["limits"], json!({"max_instances": 4, "max_vcpus": 6}));
    assert_eq!(account["usage"], json!({"instances": 0, "vcpus": 0}));

    // t3.nano has 2 vCPUs: 6 vCPUs allow 3 of them, whatever max_count asks.
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "min_count": 1, "max_count": 10})).await.unwrap();
    assert_eq!(instance_ids(&r).len(), 3);
    assert_error(
        &cloud.call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano"}))).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "VcpuLimitExceeded",
    );
    let account = cloud.get("/v1/account").await.unwrap();
    assert_eq!(account["usage"], json!({"instances": 3, "vcpus": 6}));

    // Only the operator raises them; the instance limit binds next.
    let id = account["account_id"].as_str().unwrap().to_string();
    let path = format!("/v1/admin/accounts/{id}/limits");
    assert_error(
        &cloud.call_as(Some(&cloud.user_token), Method::PUT, &path, Some(json!({"max_vcpus": 100}))).await.unwrap(),
        StatusCode::FORBIDDEN,
        "UnauthorizedOperation",
    );
    let (status, body) = cloud.call_as(Some(&cloud.admin_token), Method::PUT, &path, Some(json!({"max_vcpus": 100}))).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["limits"], json!({"max_instances": 4, "max_vcpus": 100}));
    assert_error(
        &cloud
            .call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano", "min_count": 2, "max_count": 2})))
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "InstanceLimitExceeded",
    );
    let (i,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(i, 3, "a refused launch creates nothing");
    assert_error(
        &cloud.call_as(Some(&cloud.admin_token), Method::PUT, "/v1/admin/accounts/123456789012/limits", Some(json!({}))).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidAccountID.NotFound",
    );

    // Concurrent launches of one account count each other: 20 racing
    // launches of one instance fill the last slot once.
    let launches = (0..20).map(|_| cloud.call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano"}))));
    let results = futures::future::join_all(launches).await;
    let ok = results.iter().filter(|r| r.as_ref().unwrap().0 == StatusCode::OK).count();
    assert_eq!(ok, 1, "{results:?}");
    for r in results.iter().map(|r| r.as_ref().unwrap()).filter(|r| r.0 != StatusCode::OK) {
        assert_error(r, StatusCode::BAD_REQUEST, "InstanceLimitExceeded");
    }
    assert_eq!(cloud.get("/v1/account").await.unwrap()["usage"], json!({"instances": 4, "vcpus": 8}));
}

/// Finding 8: SigV4 requests signed for another region or service (e.g.
/// `us-west-2/s3`, `xx/iam`) were accepted. Finding 7's limits show in
/// DescribeAccountAttributes.
#[tokio::test]
async fn sigv4_scope_must_be_ec2_in_our_region_and_limits_show_in_account_attributes() {
    let cloud = Cloud::start().await.unwrap();
    let a = cloud.post("/v1/admin/accounts", json!({"name": "scoped"})).await.unwrap();
    let (akid, secret) = (a["access_key_id"].as_str().unwrap(), a["secret_access_key"].as_str().unwrap());
    let form = "Action=DescribeAccountAttributes&Version=2016-11-15";
    let now = std::time::SystemTime::now();
    for (region, service, why) in
        [("us-west-2", "s3", "correct service"), ("xx", "iam", "correct service"), ("us-west-2", "ec2", "valid region")]
    {
        let (status, xml) = cloud.ec2_signed(akid, secret, form, now, region, service).await.unwrap();
        assert_eq!(status, 401, "{region}/{service}: {xml}");
        assert!(xml.contains("<Code>AuthFailure</Code>") && xml.contains(why), "{region}/{service}: {xml}");
    }
    let (status, xml) = cloud.ec2_signed(akid, secret, form, now, "nimbus-1", "ec2").await.unwrap();
    assert_eq!(status, 200, "{xml}");
    assert!(xml.contains("<attributeName>max-instances</attributeName><attributeValueSet><item><attributeValue>256</attributeValue></item></attributeValueSet>"), "{xml}");
    let (_, xml) = cloud.ec2_signed(akid, secret, &format!("{form}&AttributeName.1=max-vcpus"), now, "nimbus-1", "ec2").await.unwrap();
    assert!(xml.contains("<attributeValue>1024</attributeValue>") && !xml.contains("max-instances"), "{xml}");
    let (status, xml) = cloud.ec2_signed(akid, secret, &format!("{form}&AttributeName.1=bogus"), now, "nimbus-1", "ec2").await.unwrap();
    assert_eq!(status, 400, "{xml}");
}

/// Finding 9: control characters in tags made the account's own
/// DescribeInstances invalid XML. Now they are refused on input, in tags
/// of a launch and of CreateTags alike.
#[tokio::test]
async fn control_characters_in_tags_are_refused() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    for (k, v) in [("bell\u{7}", "x"), ("k", "nul\u{0}"), ("k", "esc\u{1b}[31m"), ("k", "del\u{7f}"), ("k", "line\nbreak")] {
        let launch = json!({"instance_type": "t3.nano", "tags": [{"key": k, "value": v}]});
        assert_error(
            &cloud.call(Method::POST, "/v1/instances", Some(launch)).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "InvalidParameterValue",
        );
    }
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap()).remove(0);
    let bad = json!({"resource_ids": [id], "tags": [{"key": "k", "value": "a\u{1}b"}]});
    assert_error(&cloud.call(Method::POST, "/v1/tags", Some(bad)).await.unwrap(), StatusCode::BAD_REQUEST, "InvalidParameterValue");
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM tags").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 0);
}

/// Finding 13: tenants saw which host runs their instances (`host_id`),
/// the operator's image source path, and an image's actual SHA-256 in a
/// failed instance's state reason. Now they see none of it; the operator
/// keeps the source, the agent's log the digests.
#[tokio::test]
async fn tenants_see_no_hosts_source_paths_or_digests() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let image = cloud.register_test_image().await.unwrap();
    let host_id = agent.host_id.clone().unwrap();
    let source = image.source_url.clone().unwrap();
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap()).remove(0);
    cloud.wait_for_state(std::slice::from_ref(&id), "running", T).await.unwrap();
    let seen = [
        cloud.get("/v1/instances").await.unwrap().to_string(),
        cloud.get(&format!("/v1/instances/{id}")).await.unwrap().to_string(),
        cloud.get("/v1/images").await.unwrap().to_string(),
    ];
    for text in &seen {
        assert!(!text.contains(&host_id) && !text.contains("host_id"), "{text}");
        assert!(!text.contains(&source) && !text.contains("source_url"), "{text}");
    }
    let (_, operator_view) = cloud.call_as(Some(&cloud.admin_token), Method::GET, "/v1/images", None).await.unwrap();
    assert_eq!(operator_view["images"][0]["source_url"], source.as_str(), "the operator sees the source");

    // A corrupt image: the reason names the file and the failure, not the digests.
    let bad = json!({"name": "corrupt", "source_url": source, "kernel": {"name": "vmlinuz", "sha256": "ab".repeat(32)},
                     "root_disk": {"name": "root.qcow2", "sha256": image.root_disk.as_ref().unwrap().sha256}});
    let bad = cloud.post("/v1/images", bad).await.unwrap();
    let failed =
        instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "image_id": bad["image_id"]})).await.unwrap());
    let gone = cloud.wait_for_state(&failed, "terminated", T).await.unwrap();
    let reason = gone[0]["state_reason"].as_str().unwrap();
    assert!(reason.contains("image file vmlinuz: checksum mismatch"), "{reason}");
    assert!(!reason.contains(&"ab".repeat(32)) && !reason.contains(&image.kernel.as_ref().unwrap().sha256), "no digest: {reason}");
}

/// Finding 15: RSA key generation, a CPU burst per call, was unthrottled.
/// Now each account gets a burst (5 by default), then one key per interval
/// (a minute by default; an hour here, so that slow debug-build key
/// generation cannot earn a token back during the test); ed25519 is free.
#[tokio::test]
async fn rsa_key_generation_is_rate_limited_per_account() {
    let cloud = Cloud::start_with(nimbus_tests::CloudOptions { rsa_keys: (2, 3600), ..Default::default() }).await.unwrap();
    for i in 0..2 {
        cloud.post("/v1/key-pairs", json!({"name": format!("rsa{i}"), "key_type": "rsa"})).await.unwrap();
    }
    let third = cloud.call(Method::POST, "/v1/key-pairs", Some(json!({"name": "rsa5", "key_type": "rsa"}))).await.unwrap();
    assert_error(&third, StatusCode::SERVICE_UNAVAILABLE, "RequestLimitExceeded");
    cloud.post("/v1/key-pairs", json!({"name": "ed", "key_type": "ed25519"})).await.unwrap();
    let other = cloud.create_account("someone-else").await.unwrap();
    let (status, body) =
        cloud.call_as(Some(&other), Method::POST, "/v1/key-pairs", Some(json!({"name": "rsa", "key_type": "rsa"}))).await.unwrap();
    assert_eq!(status, StatusCode::OK, "another account has its own allowance: {body}");
    let names: Vec<String> = cloud.get("/v1/key-pairs").await.unwrap()["key_pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.contains(&"rsa5".to_string()), "a throttled call creates nothing: {names:?}");
}
