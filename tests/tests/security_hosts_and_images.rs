//! Issue 18's findings on hosts, images and limits (5 to 8, and 10 in the
//! agent's own tests), kept as tests so that they stay fixed. Each test
//! names the finding it covers; each failed before its fix.

use nimbus_host_agent::HypervisorChoice;
use nimbus_tests::{free_local_addr, instance_ids, Cloud, CloudOptions};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);

/// Every file below `dir` (not following links).
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Whether local user `user` can read `file` (`runuser … cat`).
fn readable_by(user: &str, file: &Path) -> bool {
    let out = std::process::Command::new("runuser").args(["-u", user, "--", "cat"]).arg(file).output().expect("runuser");
    out.status.success()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

/// Finding 7: as uid 65534, `strings` on the control plane's store journal
/// printed every tenant's user-data (0644 files in 0755 directories); the
/// QEMU user could read the agent's store; private images in the image
/// store were 0644. Now the store directories are 0700 and the image
/// store's files 0600: neither `nobody` nor the QEMU user reads any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_and_stored_images_are_closed_to_local_users() {
    let cloud = Cloud::start().await.unwrap();
    let addr = free_local_addr().unwrap();
    let agent =
        cloud.add_agent_configured("a", "az1", (8, 8192, 100), HypervisorChoice::Test, |c| c.store_listen = Some(addr)).await.unwrap();
    cloud.register_test_image().await.unwrap();
    // user-data: "tenant-secret-user-data", as the document carries it (base64).
    let secret = "dGVuYW50LXNlY3JldC11c2VyLWRhdGE=";
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "user_data": secret})).await.unwrap()).remove(0);
    cloud.wait_for_state(std::slice::from_ref(&id), "running", T).await.unwrap();
    let cp_store = cloud.dir.path().join("cp-store");
    let agent_store = agent.state_dir.join("store");
    // The document is in both nodes' files (sealed for its host: its
    // instance id shows, its user-data does not; see finding 3).
    let has = |f: &std::path::Path, what: &str| std::fs::read(f).is_ok_and(|b| b.windows(what.len()).any(|w| w == what.as_bytes()));
    for store in [&cp_store, &agent_store] {
        let holds = || files_below(store).iter().any(|f| has(f, &format!("\"instance_id\":\"{id}\"")));
        cloud.wait_until(T, || async { Ok(holds()) }).await.unwrap_or_else(|_| panic!("{}: no file holds the document", store.display()));
        assert!(!files_below(store).iter().any(|f| has(f, secret)), "{}: user-data in the clear", store.display());
    }
    // An image of the instance: a private disk in the image store.
    let made = cloud.post(&format!("/v1/instances/{id}/image"), json!({"name": "private-snapshot"})).await.unwrap();
    let ami = made["image_id"].as_str().unwrap().to_string();
    cloud
        .wait_until(T, || async {
            let i = cloud.get(&format!("/v1/images/{ami}")).await?;
            anyhow::ensure!(i["state"] != "failed", "{i}");
            Ok(i["state"] == "available")
        })
        .await
        .unwrap();
    let image_store = cloud.dir.path().join("image-store");

    let stored = files_below(&image_store);
    assert!(!stored.is_empty());
    let qemu = "libvirt-qemu";
    for f in files_below(&cp_store).iter().chain(&stored) {
        assert!(!readable_by("nobody", f), "nobody reads {}", f.display());
    }
    for f in files_below(&agent_store) {
        assert!(!readable_by("nobody", &f), "nobody reads {}", f.display());
        assert!(!readable_by(qemu, &f), "the QEMU user reads {}", f.display());
    }
    assert_eq!(mode(&cp_store), 0o700);
    assert_eq!(mode(&agent_store), 0o700);
    assert_eq!(mode(&image_store), 0o700);
    for f in &stored {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
}

/// Finding 5, end to end: the connections a terminated guest held open
/// with half-sent requests stayed open in the agent for good. Now the
/// termination closes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_guests_metadata_connections_are_closed() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let ids =
        instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "min_count": 2, "max_count": 2})).await.unwrap());
    cloud.wait_for_state(&ids, "running", T).await.unwrap();
    let (doomed, other) = (&ids[0], &ids[1]);
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut c = tokio::net::UnixStream::connect(agent.metadata_socket(doomed)).await.unwrap();
        c.write_all(b"GET /latest/user-data HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Slow: ").await.unwrap();
        held.push(c);
    }
    // Open (the agent's request timeout, 10 s, would close them too: the
    // termination must close them well before).
    let opened = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    for c in &mut held {
        assert!(tokio::time::timeout(Duration::from_millis(50), c.read(&mut buf)).await.is_err(), "closed before the termination");
    }
    cloud.post("/v1/instances/terminate", json!({"instance_ids": [doomed]})).await.unwrap();
    cloud.wait_for_state(std::slice::from_ref(doomed), "terminated", T).await.unwrap();
    for c in &mut held {
        let read = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .expect("a connection of the terminated guest is still open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    let took = opened.elapsed();
    assert!(took < Duration::from_secs(8), "the termination took {took:?}: the request timeout may have closed them instead");
    // The other guest is served as before.
    let (status, body) =
        nimbus_host_agent::metadata::request(&agent.metadata_socket(other), "GET", "/latest/meta-data/instance-id", &[]).await.unwrap();
    assert_eq!((status, body.as_slice()), (200, other.as_bytes()));
}

/// A qcow2 at `dir/name` whose header names `backing` (a raw file of the
/// host) as its backing file; its SHA-256.
fn evil_disk(dir: &Path, name: &str, backing: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(backing)
        .args(["-F", "raw"])
        .arg(dir.join(name))
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(dir.join(name)).unwrap()))
}

/// Finding 6: a base image whose qcow2 header names a backing file of the
/// host (`secret.raw`) was flattened by CreateImage into an image holding
/// that file. Now such a disk is refused wherever it enters: at
/// registration (a file the control plane reads), by the host's cache
/// (one served over http: the instance fails, the image fails, nothing is
/// cached), and by the image store (an upload). (The flattening's pinned
/// chain: `disks.rs`'s `create_image_never_copies_a_file_a_base_names`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_naming_a_host_file_is_refused_at_registration_fetch_and_upload() {
    let cloud = Cloud::start().await.unwrap();
    let mut agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let secret = cloud.dir.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    let dir = cloud.dir.path().join("evil");
    let digest = evil_disk(&dir, "evil.qcow2", &secret);

    // Registration of a file the control plane can read.
    let (status, body) = cloud
        .call(
            reqwest::Method::POST,
            "/v1/images",
            Some(json!({"name": "evil-local", "disk_url": format!("file://{}/evil.qcow2", dir.display()), "sha256": digest})),
        )
        .await
        .unwrap();
    assert_eq!((status.as_u16(), body["code"].as_str()), (400, Some("InvalidParameterValue")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("backing file"), "{body}");
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM images").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 0);

    // One the control plane cannot check (http): the host refuses it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _server = tokio::process::Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory", dir.to_str().unwrap(), &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    cloud.wait_until(T, || async move { Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()) }).await.unwrap();
    let evil = cloud
        .post("/v1/images", json!({"name": "evil-remote", "disk_url": format!("http://127.0.0.1:{port}/evil.qcow2"), "sha256": digest}))
        .await
        .unwrap();
    let ids = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "image_id": evil["image_id"]})).await.unwrap());
    let gone = cloud.wait_for_state(&ids, "terminated", T).await.unwrap();
    let reason = gone[0]["state_reason"].as_str().unwrap();
    assert!(reason.contains("evil.qcow2: refused: not a standalone qcow2"), "{reason}");
    assert!(!reason.contains(secret.to_str().unwrap()), "no host path in a tenant's view: {reason}");
    let image = cloud.get(&format!("/v1/images/{}", evil["image_id"].as_str().unwrap())).await.unwrap();
    assert_eq!(image["state"], "failed", "{image}");
    assert!(!agent.state_dir.join("images").join(&digest).exists(), "not in the host's cache");

    // An upload (a host that sends such a disk for an image it makes).
    cloud.register_test_image().await.unwrap();
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap()).remove(0);
    cloud.wait_for_state(std::slice::from_ref(&id), "running", T).await.unwrap();
    let cred: serde_json::Value = serde_json::from_slice(&std::fs::read(agent.state_dir.join("credential.json")).unwrap()).unwrap();
    agent.stop().await;
    let made = cloud.post(&format!("/v1/instances/{id}/image"), json!({"name": "made-evil"})).await.unwrap();
    let ami = made["image_id"].as_str().unwrap();
    let body = std::fs::read(dir.join("evil.qcow2")).unwrap();
    let resp = cloud
        .http
        .put(format!("{}/v1/agent/images/{ami}", cloud.url))
        .bearer_auth(format!("{}.{}", cred["host_id"].as_str().unwrap(), cred["secret"].as_str().unwrap()))
        .header(nimbus_proto::agent::UPLOAD_SHA256_HEADER, &digest)
        .header(nimbus_proto::agent::UPLOAD_VIRTUAL_SIZE_HEADER, (16u64 << 20).to_string())
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!((status.as_u16(), answer["code"].as_str()), (400, Some("InvalidParameterValue")), "{answer}");
    let image = cloud.get(&format!("/v1/images/{ami}")).await.unwrap();
    assert_eq!(image["state"], "failed", "{image}");
    assert!(!cloud.dir.path().join("image-store").join(&digest).exists(), "not in the image store");
}

/// Waits until every image in `ids` is available (as the account of `token` sees it).
async fn all_available(cloud: &Cloud, token: &str, ids: &[String]) {
    for id in ids {
        cloud
            .wait_until(T, || async {
                let (_, i) = cloud.call_as(Some(token), reqwest::Method::GET, &format!("/v1/images/{id}"), None).await?;
                anyhow::ensure!(i["state"] != "failed", "{i}");
                Ok(i["state"] == "available")
            })
            .await
            .unwrap();
    }
}

async fn create_image(cloud: &Cloud, token: &str, instance: &str, name: &str) -> (u16, serde_json::Value) {
    let (status, body) = cloud
        .call_as(Some(token), reqwest::Method::POST, &format!("/v1/instances/{instance}/image"), Some(json!({ "name": name })))
        .await
        .unwrap();
    (status.as_u16(), body)
}

/// Finding 8: per-account limits covered instances, vCPUs and Elastic IPs
/// but not images, so one account could fill the control plane's disk
/// with CreateImage. Now an account holds at most `max_images` images
/// (concurrent CreateImage calls count each other) and its images at most
/// `max_image_bytes` in the image store (an upload beyond it is refused
/// and its image fails); the operator sets both, others are unaffected,
/// and both show in the account and its attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_quotas_bound_what_an_account_stores() {
    let cloud = Cloud::start_with(CloudOptions { image_limits: (3, 500 << 30), ..Default::default() }).await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 64, 65536, 1000).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let me = cloud.user_token.clone();
    let ids =
        instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "min_count": 6, "max_count": 6})).await.unwrap());
    cloud.wait_for_state(&ids, "running", T).await.unwrap();
    let account = cloud.get("/v1/account").await.unwrap();
    assert_eq!(account["image_quota"], json!({"max_images": 3, "max_image_bytes": 500u64 << 30, "images": 0, "image_bytes": 0}));

    // Six CreateImage calls at once, of six instances: three fit.
    let names: Vec<String> = (0..ids.len()).map(|i| format!("image-{i}")).collect();
    let calls = ids.iter().zip(&names).map(|(id, name)| create_image(&cloud, &me, id, name));
    let results = futures::future::join_all(calls).await;
    let made: Vec<String> = results.iter().filter(|r| r.0 == 200).map(|r| r.1["image_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(made.len(), 3, "{results:?}");
    for r in results.iter().filter(|r| r.0 != 200) {
        assert_eq!((r.0, r.1["code"].as_str()), (400, Some("ResourceLimitExceeded")), "{r:?}");
    }
    all_available(&cloud, &me, &made).await;
    let quota = cloud.get("/v1/account").await.unwrap()["image_quota"].clone();
    assert_eq!(quota["images"], 3, "{quota}");
    let used = quota["image_bytes"].as_u64().unwrap();
    assert!(used > 0, "{quota}");
    let (status, body) = create_image(&cloud, &me, &ids[5], "one-too-many").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("ResourceLimitExceeded")), "{body}");

    // Another account is not affected.
    let bob = cloud.create_account("bob").await.unwrap();
    let (_, r) =
        cloud.call_as(Some(&bob), reqwest::Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano"}))).await.unwrap();
    let bobs = instance_ids(&r);
    cloud.wait_for_state_as(&bob, &bobs, "running", T).await.unwrap();
    let (status, body) = create_image(&cloud, &bob, &bobs[0], "bobs-image").await;
    assert_eq!(status, 200, "{body}");

    // The operator raises the count; the bytes then bind: a disk larger
    // than what is left is refused at its upload, and its image fails.
    let account_id = cloud.get("/v1/account").await.unwrap()["account_id"].as_str().unwrap().to_string();
    let limits = format!("/v1/admin/accounts/{account_id}/limits");
    let (status, view) =
        cloud.call(reqwest::Method::PUT, &limits, Some(json!({"max_images": 10, "max_image_bytes": used + 1}))).await.unwrap();
    assert_eq!(status.as_u16(), 200, "{view}");
    assert_eq!((view["image_quota"]["max_images"].as_u64(), view["image_quota"]["max_image_bytes"].as_u64()), (Some(10), Some(used + 1)));
    let (status, body) = create_image(&cloud, &me, &ids[3], "too-big").await;
    assert_eq!(status, 200, "{body}");
    let too_big = body["image_id"].as_str().unwrap().to_string();
    cloud
        .wait_until(T, || async { Ok(cloud.get(&format!("/v1/images/{too_big}")).await?["state"] == "failed") })
        .await
        .expect("the upload over the byte limit fails its image");
    let failed = cloud.get(&format!("/v1/images/{too_big}")).await.unwrap();
    assert!(failed["state_reason"].as_str().unwrap().contains("image storage"), "{failed}");
    assert_eq!(cloud.get("/v1/account").await.unwrap()["image_quota"]["image_bytes"], used, "nothing more is stored");
    // With the bytes used up, CreateImage is refused at once.
    cloud.call(reqwest::Method::PUT, &limits, Some(json!({"max_images": 10, "max_image_bytes": used}))).await.unwrap();
    let (status, body) = create_image(&cloud, &me, &ids[4], "no-room").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("ResourceLimitExceeded")), "{body}");
    // Room again: made.
    cloud.call(reqwest::Method::PUT, &limits, Some(json!({"max_images": 10}))).await.unwrap();
    let (status, body) = create_image(&cloud, &me, &ids[4], "room-again").await;
    assert_eq!(status, 200, "{body}");
    all_available(&cloud, &me, &[body["image_id"].as_str().unwrap().to_string()]).await;
    // Only the operator sets them.
    let (status, _) = cloud.call_as(Some(&me), reqwest::Method::PUT, &limits, Some(json!({"max_images": 1000}))).await.unwrap();
    assert_eq!(status.as_u16(), 403);

    // DescribeAccountAttributes shows them.
    let carol = cloud.ec2_account("carol").await.unwrap();
    let (status, xml) = cloud.ec2(&carol, "Action=DescribeAccountAttributes").await.unwrap();
    assert_eq!(status, 200, "{xml}");
    assert!(xml.contains("<attributeName>max-images</attributeName><attributeValueSet><item><attributeValue>3</attributeValue>"), "{xml}");
    assert!(
        xml.contains(&format!(
            "<attributeName>max-image-bytes</attributeName><attributeValueSet><item><attributeValue>{}</attributeValue>",
            500u64 << 30
        )),
        "{xml}"
    );
}
