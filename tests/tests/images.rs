//! Images over the real control plane and agents on libvirt's test driver:
//! registration of a qcow2 by path or URL with its SHA-256 (a wrong digest
//! is refused and no host runs it), owners and visibility across accounts,
//! DescribeImages' filters, DeregisterImage, and CreateImage (its errors,
//! and an image made on one host launched on another).

use nimbus_tests::{instance_ids, test_domain_state, xml_error_code as code, xml_values as values, Cloud, Ec2Keys};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn token(k: &Ec2Keys) -> String {
    format!("{}:{}", k.akid, k.secret)
}

/// A small real qcow2 (nothing boots from it on the test driver) and its digest.
fn make_disk(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    let out = std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&path).arg("32M").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let digest = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
    (path, digest)
}

async fn describe(cloud: &Cloud, k: &Ec2Keys, q: &str) -> String {
    let (status, xml) = cloud.ec2(k, &format!("Action=DescribeImages{q}")).await.unwrap();
    assert_eq!(status, 200, "{xml}");
    xml
}

async fn run(cloud: &Cloud, k: &Ec2Keys, extra: &str) -> Vec<String> {
    let image_id = cloud.get("/v1/images").await.unwrap()["images"][0]["image_id"].as_str().unwrap().to_string();
    let (status, xml) =
        cloud.ec2(k, &format!("Action=RunInstances&ImageId={image_id}&InstanceType=t3.nano&MinCount=1&MaxCount=1{extra}")).await.unwrap();
    assert_eq!(status, 200, "{xml}");
    values(&xml, "instanceId").into_iter().map(str::to_string).collect()
}

async fn create(cloud: &Cloud, k: &Ec2Keys, instance: &str, name: &str) -> (u16, String) {
    cloud.ec2(k, &format!("Action=CreateImage&InstanceId={instance}&Name={name}")).await.unwrap()
}

async fn image_state(cloud: &Cloud, token: &str, id: &str) -> Value {
    let (status, body) = cloud.call_as(Some(token), Method::GET, &format!("/v1/images/{id}"), None).await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    body
}

/// A qcow2 registered from an http(s) URL (and from a path) with a SHA-256
/// that is not its own: the host refuses the file, the instance fails with
/// the reason, the image becomes `failed`, a new launch is refused, and no
/// host runs or caches it. The right digest launches a disk-booted guest
/// with its root disk at the instance type's size.
#[tokio::test]
async fn a_qcow2_with_a_wrong_sha256_is_refused_and_no_host_runs_it() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let dir = cloud.dir.path().join("qcow2");
    let (disk, digest) = make_disk(&dir, "disk.qcow2");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = tokio::process::Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory", dir.to_str().unwrap(), &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    cloud.wait_until(T, || async move { Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()) }).await.unwrap();

    let wrong = hex::encode(Sha256::digest(b"some other file"));
    let bad = cloud
        .post("/v1/images", json!({"name": "wrong-digest", "disk_url": format!("http://127.0.0.1:{port}/disk.qcow2"), "sha256": wrong}))
        .await
        .unwrap();
    assert_eq!((bad["boot"].as_str(), bad["state"].as_str(), bad["public"].as_bool()), (Some("disk"), Some("available"), Some(true)));
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "image_id": bad["image_id"]})).await.unwrap();
    let ids = instance_ids(&r);
    let gone = cloud.wait_for_state(&ids, "terminated", T).await.unwrap();
    let reason = gone[0]["state_reason"].as_str().unwrap();
    assert!(reason.contains("disk.qcow2: checksum mismatch"), "{reason}");
    assert_eq!(test_domain_state(&ids[0]).await, None, "no domain of it on the host");
    assert!(!agent.state_dir.join("images").join(&wrong).exists(), "nothing under the wrong digest in the cache");
    assert!(!agent.state_dir.join("images").join(&digest).exists(), "the refused file was not kept under its real digest either");
    let failed = image_state(&cloud, &cloud.user_token, bad["image_id"].as_str().unwrap()).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(failed["state_reason"].as_str().unwrap().contains("differs from the one registered"), "{failed}");
    let (status, body) =
        cloud.call(Method::POST, "/v1/instances", Some(json!({"instance_type": "t3.nano", "image_id": bad["image_id"]}))).await.unwrap();
    assert_eq!((status.as_u16(), body["code"].as_str()), (400, Some("InvalidAMIID.Unavailable")), "{body}");

    // Malformed registrations: nothing is created.
    for (req, expected) in [
        (json!({"name": "no-digest", "disk_url": "file:///x/disk.qcow2"}), "MissingParameter"),
        (json!({"name": "bad-digest", "disk_url": "file:///x/disk.qcow2", "sha256": "abc"}), "InvalidParameterValue"),
        (json!({"name": "ftp", "disk_url": "ftp://h/disk.qcow2", "sha256": digest}), "InvalidParameterValue"),
        (json!({"name": "x", "disk_url": "file:///x/disk.qcow2", "sha256": digest}), "InvalidAMIName.Malformed"),
        (
            json!({"name": "both", "disk_url": "file:///x/d.qcow2", "sha256": digest, "source_url": "file:///x"}),
            "InvalidParameterCombination",
        ),
        (json!({"name": "wrong-digest", "disk_url": "file:///x/d.qcow2", "sha256": digest}), "InvalidAMIName.Duplicate"),
    ] {
        let (status, body) = cloud.call(Method::POST, "/v1/images", Some(req.clone())).await.unwrap();
        assert_eq!(body["code"].as_str(), Some(expected), "{req}: {status} {body}");
    }
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM images").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 1, "only the one image registered");

    // The right digest, from a path on the host: a disk-booted guest runs,
    // its overlay at the type's size (t3.nano: 8 GiB) over the cached disk.
    let good = cloud
        .post("/v1/images", json!({"name": "by-path", "disk_url": format!("file://{}", disk.display()), "sha256": digest}))
        .await
        .unwrap();
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "image_id": good["image_id"]})).await.unwrap();
    let ids = instance_ids(&r);
    cloud.wait_for_state(&ids, "running", T).await.unwrap();
    assert_eq!(test_domain_state(&ids[0]).await, Some(true));
    assert!(agent.state_dir.join("images").join(&digest).exists());
    let overlay = agent.state_dir.join("instances").join(&ids[0]).join("root.qcow2");
    let info = std::process::Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(&overlay).output().unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 8u64 << 30, "{info}");
    server.kill().await.unwrap();
}

/// Owners and visibility: the operator's public images are everyone's, an
/// account's private image only its own; DescribeImages' Owner,
/// ExecutableBy and filters select among what the caller may see;
/// DeregisterImage leaves running instances running and refuses new
/// launches.
#[tokio::test]
async fn owners_visibility_filters_and_deregistration_across_accounts() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 16, 16384, 200).await.unwrap();
    let alice = cloud.ec2_account("alice").await.unwrap();
    let bob = cloud.ec2_account("bob").await.unwrap();
    let dir = cloud.dir.path().join("disks");
    let (disk, digest) = make_disk(&dir, "disk.qcow2");
    let url = format!("file://{}", disk.display());
    let public = cloud.post("/v1/images", json!({"name": "debian-public", "disk_url": url, "sha256": digest})).await.unwrap();
    let private = cloud
        .post("/v1/images", json!({"name": "alice-private", "disk_url": url, "sha256": digest, "owner_id": alice.account_id}))
        .await
        .unwrap();
    assert_eq!((private["public"].as_bool(), private["owner_id"].as_str()), (Some(false), Some(alice.account_id.as_str())));
    let (pub_id, priv_id) = (public["image_id"].as_str().unwrap(), private["image_id"].as_str().unwrap());

    let ids = |xml: &str| -> Vec<String> {
        let mut v: Vec<String> = values(xml, "imageId").into_iter().map(str::to_string).collect();
        v.sort();
        v
    };
    let sorted = |mut v: Vec<&str>| -> Vec<String> {
        v.sort();
        v.into_iter().map(str::to_string).collect()
    };
    // Everything visible: alice both, bob the public one.
    assert_eq!(ids(&describe(&cloud, &alice, "").await), sorted(vec![pub_id, priv_id]));
    assert_eq!(ids(&describe(&cloud, &bob, "").await), sorted(vec![pub_id]));
    let xml = describe(&cloud, &alice, &format!("&ImageId.1={priv_id}")).await;
    assert_eq!(values(&xml, "isPublic"), vec!["false"]);
    assert_eq!(values(&xml, "imageOwnerId"), vec![alice.account_id.as_str()]);
    // Owners.
    assert_eq!(ids(&describe(&cloud, &alice, "&Owner.1=self").await), sorted(vec![priv_id]));
    assert_eq!(ids(&describe(&cloud, &alice, "&Owner.1=amazon").await), sorted(vec![pub_id]));
    assert_eq!(
        ids(&describe(&cloud, &bob, &format!("&Owner.1={}", alice.account_id)).await),
        Vec::<String>::new(),
        "bob sees none of alice's private images"
    );
    assert_eq!(ids(&describe(&cloud, &bob, "&Owner.1=self").await), Vec::<String>::new());
    // ExecutableBy: self is what the caller may launch; all is the public ones.
    assert_eq!(ids(&describe(&cloud, &alice, "&ExecutableBy.1=self").await), sorted(vec![pub_id, priv_id]));
    assert_eq!(ids(&describe(&cloud, &alice, "&ExecutableBy.1=all").await), sorted(vec![pub_id]));
    // Filters.
    assert_eq!(ids(&describe(&cloud, &alice, "&Filter.1.Name=name&Filter.1.Value.1=alice-*").await), sorted(vec![priv_id]));
    assert_eq!(ids(&describe(&cloud, &alice, "&Filter.1.Name=name&Filter.1.Value.1=debian-publi%3F").await), sorted(vec![pub_id]));
    assert_eq!(ids(&describe(&cloud, &alice, "&Filter.1.Name=state&Filter.1.Value.1=pending").await), Vec::<String>::new());
    assert_eq!(ids(&describe(&cloud, &alice, "&Filter.1.Name=state&Filter.1.Value.1=available").await).len(), 2);
    assert_eq!(ids(&describe(&cloud, &alice, &format!("&Filter.1.Name=image-id&Filter.1.Value.1={pub_id}")).await), sorted(vec![pub_id]));
    assert_eq!(ids(&describe(&cloud, &alice, "&Filter.1.Name=is-public&Filter.1.Value.1=false").await), sorted(vec![priv_id]));
    let (status, xml) = cloud.ec2(&alice, "Action=DescribeImages&Filter.1.Name=colour&Filter.1.Value.1=red").await.unwrap();
    assert_eq!((status, code(&xml)), (400, "InvalidParameterValue"), "{xml}");
    // Naming another account's private image is as naming a missing one.
    let (status, xml) = cloud.ec2(&bob, &format!("Action=DescribeImages&ImageId.1={priv_id}")).await.unwrap();
    assert_eq!((status, code(&xml)), (400, "InvalidAMIID.NotFound"), "{xml}");
    let (status, xml) =
        cloud.ec2(&bob, &format!("Action=RunInstances&ImageId={priv_id}&InstanceType=t3.nano&MinCount=1&MaxCount=1")).await.unwrap();
    assert_eq!((status, code(&xml)), (400, "InvalidAMIID.NotFound"), "{xml}");
    // REST lists the same.
    let (_, list) = cloud.call_as(Some(&token(&bob)), Method::GET, "/v1/images?owner=amazon&name=debian-*", None).await.unwrap();
    assert_eq!(list["images"].as_array().unwrap().len(), 1, "{list}");

    // Alice runs her image, then deregisters it: the instance keeps running,
    // no new launch, and it is described no more.
    let (status, xml) =
        cloud.ec2(&alice, &format!("Action=RunInstances&ImageId={priv_id}&InstanceType=t3.nano&MinCount=1&MaxCount=1")).await.unwrap();
    assert_eq!(status, 200, "{xml}");
    let running: Vec<String> = values(&xml, "instanceId").into_iter().map(str::to_string).collect();
    cloud.wait_for_state_as(&token(&alice), &running, "running", T).await.unwrap();
    let (status, xml) = cloud.ec2(&bob, &format!("Action=DeregisterImage&ImageId={pub_id}")).await.unwrap();
    assert_eq!((status, code(&xml)), (403, "UnauthorizedOperation"), "only its owner deregisters an image: {xml}");
    let (status, xml) = cloud.ec2(&bob, &format!("Action=DeregisterImage&ImageId={priv_id}")).await.unwrap();
    assert_eq!((status, code(&xml)), (400, "InvalidAMIID.NotFound"), "{xml}");
    let (status, xml) = cloud.ec2(&alice, &format!("Action=DeregisterImage&ImageId={priv_id}")).await.unwrap();
    assert_eq!(status, 200, "{xml}");
    let (status, xml) =
        cloud.ec2(&alice, &format!("Action=RunInstances&ImageId={priv_id}&InstanceType=t3.nano&MinCount=1&MaxCount=1")).await.unwrap();
    assert_eq!((status, code(&xml)), (400, "InvalidAMIID.NotFound"), "{xml}");
    assert_eq!(ids(&describe(&cloud, &alice, "&Owner.1=self").await), Vec::<String>::new());
    _agent.passes(2).await.unwrap();
    let still = cloud.wait_for_state_as(&token(&alice), &running, "running", T).await.unwrap();
    assert_eq!(still[0]["image_id"], priv_id);
    assert_eq!(test_domain_state(&running[0]).await, Some(true), "the guest still runs");
    // Its name is free again.
    cloud
        .post("/v1/images", json!({"name": "alice-private", "disk_url": url, "sha256": digest, "owner_id": alice.account_id}))
        .await
        .unwrap();
}

/// CreateImage: its errors (another account's instance, a malformed or
/// used name, an instance neither running nor stopped) make nothing; an
/// image of a running instance goes pending → available (the guest shut
/// down cleanly and started again), its disk in the image store, and an
/// instance of it launches on another host, which fetches it from there.
#[tokio::test]
async fn create_image_errors_and_an_image_made_on_one_host_launches_on_another() {
    let cloud = Cloud::start().await.unwrap();
    let a = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let b = cloud.add_agent("b", "az2", 8, 8192, 100).await.unwrap();
    let _image = cloud.register_test_image().await.unwrap();
    let alice = cloud.ec2_account("alice").await.unwrap();
    let bob = cloud.ec2_account("bob").await.unwrap();
    let mine = run(&cloud, &alice, "&Placement.AvailabilityZone=az1").await;
    cloud.wait_for_state_as(&token(&alice), &mine, "running", T).await.unwrap();
    let id = &mine[0];
    let images_before: (i64,) = sqlx::query_as("SELECT count(*) FROM images").fetch_one(cloud.db()).await.unwrap();

    let (status, xml) = create(&cloud, &bob, id, "stolen").await;
    assert_eq!((status, code(&xml)), (400, "InvalidInstanceID.NotFound"), "another account's instance: {xml}");
    let (status, xml) = create(&cloud, &alice, id, "x").await;
    assert_eq!((status, code(&xml)), (400, "InvalidAMIName.Malformed"), "{xml}");
    let (status, xml) = create(&cloud, &alice, "i-nothex", "fine-name").await;
    assert_eq!((status, code(&xml)), (400, "InvalidInstanceID.Malformed"), "{xml}");
    let doomed = run(&cloud, &alice, "&Placement.AvailabilityZone=az1").await;
    cloud.wait_for_state_as(&token(&alice), &doomed, "running", T).await.unwrap();
    let (status, _) = cloud.ec2(&alice, &format!("Action=TerminateInstances&InstanceId.1={}", doomed[0])).await.unwrap();
    assert_eq!(status, 200);
    cloud.wait_for_state_as(&token(&alice), &doomed, "terminated", T).await.unwrap();
    let (status, xml) = create(&cloud, &alice, &doomed[0], "of-a-terminated-one").await;
    assert_eq!((status, code(&xml)), (400, "IncorrectInstanceState"), "{xml}");
    let images_after: (i64,) = sqlx::query_as("SELECT count(*) FROM images").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(images_before, images_after, "no error made an image");

    // The image: pending at once, then available.
    let mut stops = a.events.resubscribe();
    let (status, xml) = create(&cloud, &alice, id, "alice-snapshot").await;
    assert_eq!(status, 200, "{xml}");
    let ami = values(&xml, "imageId")[0].to_string();
    let (status, xml) = create(&cloud, &alice, id, "alice-snapshot").await;
    assert_eq!((status, code(&xml)), (400, "InvalidAMIName.Duplicate"), "{xml}");
    let first = image_state(&cloud, &token(&alice), &ami).await;
    assert!(first["state"] == "pending" || first["state"] == "available", "{first}");
    assert_eq!(first["source_instance_id"], id.as_str());
    let t = token(&alice);
    cloud
        .wait_until(T, || {
            let (cloud, t, ami) = (&cloud, &t, &ami);
            async move {
                let s = image_state(cloud, t, ami).await;
                anyhow::ensure!(s["state"] != "failed", "image failed: {s}");
                Ok(s["state"] == "available")
            }
        })
        .await
        .unwrap();
    // It was shut down cleanly (no NoReboot) and runs again.
    nimbus_tests::await_event(&mut stops, T, |e| {
        matches!(e, nimbus_host_agent::reconcile::AgentEvent::Stopped { instance_id, .. } if instance_id == id).then_some(())
    })
    .await
    .unwrap();
    cloud.wait_until(T, || async { Ok(test_domain_state(id).await == Some(true)) }).await.unwrap();
    let made = image_state(&cloud, &t, &ami).await;
    let digest = made["root_disk"]["sha256"].as_str().unwrap().to_string();
    assert_eq!((made["boot"].as_str(), made["public"].as_bool()), (Some("kernel"), Some(false)), "{made}");
    assert!(cloud.dir.path().join("image-store").join(&digest).exists(), "the disk is in the image store");
    assert!(a.state_dir.join("images").join(&digest).exists(), "and in the making host's cache");
    let (status, xml) = cloud.ec2(&bob, &format!("Action=DescribeImages&ImageId.1={ami}")).await.unwrap();
    assert_eq!((status, code(&xml)), (400, "InvalidAMIID.NotFound"), "private to alice: {xml}");

    // Launched on the other host, which fetches the disk from the store.
    let (status, xml) = cloud
        .ec2(
            &alice,
            &format!("Action=RunInstances&ImageId={ami}&InstanceType=t3.nano&MinCount=1&MaxCount=1&Placement.AvailabilityZone=az2"),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{xml}");
    let copy: Vec<String> = values(&xml, "instanceId").into_iter().map(str::to_string).collect();
    cloud.wait_for_state_as(&t, &copy, "running", T).await.unwrap();
    assert_eq!(cloud.host_of(&copy[0]).await.unwrap(), b.host_id.clone().unwrap());
    let fetched = b.state_dir.join("images").join(&digest);
    assert_eq!(hex::encode(Sha256::digest(std::fs::read(&fetched).unwrap())), digest);

    // Deregistered while an instance runs it: the file stays in the store
    // until no instance needs it.
    let (status, _) = cloud.ec2(&alice, &format!("Action=DeregisterImage&ImageId={ami}")).await.unwrap();
    assert_eq!(status, 200);
    assert!(cloud.dir.path().join("image-store").join(&digest).exists());
    let (status, _) = cloud.ec2(&alice, &format!("Action=TerminateInstances&InstanceId.1={}", copy[0])).await.unwrap();
    assert_eq!(status, 200);
    cloud.wait_for_state_as(&t, &copy, "terminated", T).await.unwrap();
    // The report that confirmed the termination removed it (no sweep needed).
    let stored = cloud.dir.path().join("image-store").join(&digest);
    cloud.wait_until(T, || async { Ok(!stored.exists()) }).await.expect("unused and deregistered: removed from the store");
}
