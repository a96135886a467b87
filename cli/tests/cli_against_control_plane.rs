//! The `nimbus` binary against a real control plane (on a fresh PostgreSQL
//! database) with host agents on libvirt's `test:///default` driver: output,
//! `--wait`, pagination, image registration and exit codes, each checked
//! against what the API and the database hold afterwards.
//!
//! Needs `DATABASE_URL` (see `scripts/pg.sh`).

use nimbus_tests::{instance_ids, Cloud, TempDir};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    out: String,
    err: String,
}

impl Run {
    /// Asserts success and returns itself.
    fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "nimbus failed: stderr: {}\nstdout: {}", self.err, self.out);
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.out).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.out))
    }

    /// The whitespace-separated cells of each stdout line after the first `skip`.
    fn rows(&self, skip: usize) -> Vec<Vec<String>> {
        self.out.lines().skip(skip).map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
    }
}

/// Runs the binary with exactly `args`, the environment's NIMBUS_* removed.
/// Asynchronous: the control plane and agents run on this test's runtime.
async fn nimbus_raw(args: &[&str]) -> Run {
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(args)
        .env_remove("NIMBUS_ENDPOINT")
        .env_remove("NIMBUS_TOKEN")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run nimbus");
    Run {
        code: o.status.code(),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs the binary against `cloud`: operator commands with the admin token,
/// the others as the account "tester".
async fn nimbus(cloud: &Cloud, args: &[&str]) -> Run {
    let operator = args.iter().any(|a| matches!(*a, "describe-hosts" | "register-image" | "admin"));
    let token = if operator { cloud.admin_token.as_str() } else { cloud.user_token.as_str() };
    let mut all = vec!["--endpoint", cloud.url.as_str(), "--token", token];
    all.extend_from_slice(args);
    nimbus_raw(&all).await
}

async fn host_id(cloud: &Cloud, name: &str) -> String {
    let hosts = cloud.get("/v1/hosts").await.unwrap();
    let host = hosts["hosts"].as_array().unwrap().iter().find(|h| h["name"] == name).expect("host listed");
    host["host_id"].as_str().unwrap().to_string()
}

/// `{id: state}` of the given instances, from the API.
async fn api_states(cloud: &Cloud, ids: &[String]) -> Vec<(String, String)> {
    let list = cloud.get(&format!("/v1/instances?instance_id={}", ids.join(","))).await.unwrap();
    let mut v: Vec<(String, String)> = list["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["instance_id"].as_str().unwrap().to_string(), i["state"]["name"].as_str().unwrap().to_string()))
        .collect();
    v.sort();
    v
}

async fn instance_count(cloud: &Cloud) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances").fetch_one(cloud.db()).await.unwrap();
    n
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Writes an image as a recipe would: a kernel, an initrd, a real (empty)
/// qcow2 root disk and `manifest.json` with their digests. `kernel_sha256`
/// overrides the kernel's digest. Returns the manifest's path.
fn write_image_dir(dir: &Path, kernel_sha256: Option<String>) -> std::path::PathBuf {
    let kernel = format!("kernel of {}", dir.display()).into_bytes();
    let initrd = format!("initrd of {}", dir.display()).into_bytes();
    std::fs::write(dir.join("vmlinuz"), &kernel).unwrap();
    std::fs::write(dir.join("initrd.img"), &initrd).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.join("rootfs.qcow2"))
        .arg("16M")
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "qemu-img: {}", String::from_utf8_lossy(&out.stderr));
    let root = std::fs::read(dir.join("rootfs.qcow2")).unwrap();
    let manifest = json!({
        "name": "cli-tiny",
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "root_disk": "rootfs.qcow2",
        "root_disk_format": "qcow2",
        "cmdline": "console=ttyS0",
        "sha256": {
            "vmlinuz": kernel_sha256.unwrap_or_else(|| sha256_hex(&kernel)),
            "initrd.img": sha256_hex(&initrd),
            "rootfs.qcow2": sha256_hex(&root),
        },
        "recipe_version": 1,
    });
    let path = dir.join("manifest.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn run_instances_wait_lists_running_instances_and_terminate_wait_ends_terminated() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 16, 16384, 200).await.unwrap();
    let hid = host_id(&cloud, &agent.name).await;
    let image = cloud.register_test_image().await.unwrap();

    let run = nimbus(&cloud, &["run-instances", "--instance-type", "t3.nano", "--count", "3", "--wait"]).await.ok();
    let rows = run.rows(0);
    assert_eq!(rows[0][0], "RESERVATION", "{}", run.out);
    let reservation_id = rows[0][1].clone();
    assert!(reservation_id.starts_with("r-"), "{}", run.out);
    assert_eq!(rows[1], ["ID", "STATE", "TYPE", "AZ", "IMAGE", "LAUNCHED", "PRIVATE-IP", "PUBLIC-IP"]);
    assert_eq!(rows.len(), 5, "three instance rows: {}", run.out);
    for row in &rows[2..] {
        assert_eq!(&row[1..5], ["running", "t3.nano", "az1", image.image_id.as_str()], "{}", run.out);
    }
    assert!(!run.out.contains(&hid), "tenants do not see which host runs their instances: {}", run.out);
    let ids: Vec<String> = rows[2..].iter().map(|r| r[0].clone()).collect();

    // The database agrees: three instances of this reservation, running on the agent's host.
    let db: Vec<(String, String, String)> =
        sqlx::query_as("SELECT id, state, host_id FROM instances WHERE reservation_id = $1 ORDER BY ami_launch_index")
            .bind(&reservation_id)
            .fetch_all(cloud.db())
            .await
            .unwrap();
    assert_eq!(db.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), ids);
    assert!(db.iter().all(|r| r.1 == "running" && r.2 == hid), "{db:?}");
    assert_eq!(instance_count(&cloud).await, 3);

    // Terminate one and wait: the table reports running → terminated.
    let term = nimbus(&cloud, &["terminate-instances", &ids[0], "--wait"]).await.ok();
    assert_eq!(term.rows(0), [vec!["ID", "PREVIOUS", "CURRENT"], vec![ids[0].as_str(), "running", "terminated"]]);
    let mut expected =
        vec![(ids[0].clone(), "terminated".to_string()), (ids[1].clone(), "running".to_string()), (ids[2].clone(), "running".to_string())];
    expected.sort();
    assert_eq!(api_states(&cloud, &ids).await, expected);
    // Terminated means the agent confirmed: the capacity of one instance is free again.
    let acct = cloud.vcpu_accounting().await.unwrap();
    assert_eq!((acct[0].2, acct[0].3), (4, 4), "{acct:?}");
}

#[tokio::test]
async fn client_token_with_user_data_file_returns_the_same_reservation() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let dir = TempDir::new("cli-user-data");
    let user_data: &[u8] = b"#!/bin/sh\necho hello\n\xff\x00 binary tail\n";
    let path = dir.path().join("user-data");
    std::fs::write(&path, user_data).unwrap();
    let path = path.to_str().unwrap();

    let args = ["run-instances", "--instance-type", "t3.micro", "--user-data-file", path, "--client-token", "cli-tok-1", "-o", "json"];
    let first = nimbus(&cloud, &args).await.ok().json();
    let second = nimbus(&cloud, &args).await.ok().json();
    assert!(first["reservation_id"].as_str().unwrap().starts_with("r-"), "{first}");
    assert_eq!(first["reservation_id"], second["reservation_id"]);
    let ids = instance_ids(&first);
    assert_eq!(ids.len(), 1, "{first}");
    assert_eq!(instance_ids(&second), ids);
    assert_eq!(first["instances"][0]["instance_type"], "t3.micro");

    // One instance launched, carrying the file's bytes as its user data.
    assert_eq!(instance_count(&cloud).await, 1);
    let (stored,): (Option<Vec<u8>>,) =
        sqlx::query_as("SELECT user_data FROM instances WHERE id = $1").bind(&ids[0]).fetch_one(cloud.db()).await.unwrap();
    assert_eq!(stored.as_deref(), Some(user_data));

    // The same token with other parameters is refused, and launches nothing.
    let other = ["run-instances", "--instance-type", "t3.small", "--user-data-file", path, "--client-token", "cli-tok-1"];
    let refused = nimbus(&cloud, &other).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.err.starts_with("error: IdempotentParameterMismatch: "), "{}", refused.err);
    assert_eq!(instance_count(&cloud).await, 1);
}

#[tokio::test]
async fn describe_instances_pages_and_filters_by_state() {
    let cloud = Cloud::start().await.unwrap();
    let mut agent = cloud.add_agent("a", "az1", 256, 65536, 1000).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let launched =
        nimbus(&cloud, &["run-instances", "--instance-type", "t3.nano", "--count", "7", "--wait", "-o", "json"]).await.ok().json();
    let ids = instance_ids(&launched);
    assert_eq!(ids.len(), 7);
    assert!(launched["instances"].as_array().unwrap().iter().all(|i| i["state"]["name"] == "running"), "{launched}");

    // One page at a time with --max-results 3, following the printed tokens.
    let mut pages = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut args = vec!["describe-instances", "--max-results", "3", "-o", "json"];
        if let Some(t) = &token {
            args.extend(["--next-token", t.as_str()]);
        }
        let page = nimbus(&cloud, &args).await.ok().json();
        pages.push(instance_ids(&page));
        match page["next_token"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(pages.concat(), ids, "every instance once, in launch order");
    // The table view of a page ends with the next page's token.
    let first = nimbus(&cloud, &["describe-instances", "--max-results", "3"]).await.ok();
    let lines: Vec<&str> = first.out.lines().collect();
    assert_eq!(lines.len(), 5, "{}", first.out);
    assert!(lines[4].starts_with("NEXT TOKEN: "), "{}", first.out);
    let tok = lines[4].trim_start_matches("NEXT TOKEN: ");
    let second = nimbus(&cloud, &["describe-instances", "--max-results", "3", "--next-token", tok, "-o", "json"]).await.ok().json();
    assert_eq!(instance_ids(&second), pages[1]);
    // Without --max-results: all of them, no token.
    let all = nimbus(&cloud, &["describe-instances"]).await.ok();
    let rows = all.rows(1);
    assert_eq!(rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>(), ids, "{}", all.out);
    assert!(!all.out.contains("NEXT TOKEN"));

    // --state filters.
    nimbus(&cloud, &["terminate-instances", &ids[0], &ids[1], "--wait"]).await.ok();
    let running = nimbus(&cloud, &["describe-instances", "--state", "running", "-o", "json"]).await.ok().json();
    assert_eq!(instance_ids(&running), ids[2..]);
    let terminated = nimbus(&cloud, &["describe-instances", "--state", "terminated"]).await.ok();
    let rows = terminated.rows(1);
    assert_eq!(
        rows.iter().map(|r| (r[0].as_str(), r[1].as_str())).collect::<Vec<_>>(),
        [(ids[0].as_str(), "terminated"), (ids[1].as_str(), "terminated")]
    );
    let both = nimbus(&cloud, &["describe-instances", "--state", "terminated,running", "-o", "json"]).await.ok().json();
    assert_eq!(instance_ids(&both), ids);
    let none = nimbus(&cloud, &["describe-instances", "--state", "pending", "-o", "json"]).await.ok().json();
    assert_eq!(none["instances"], json!([]));

    // More than the server's page (100): the CLI follows every page. The agent
    // is stopped first so the 100 new instances stay pending and build nothing.
    agent.stop().await;
    let more = nimbus(&cloud, &["run-instances", "--instance-type", "t3.nano", "--count", "100", "-o", "json"]).await.ok().json();
    let more_ids = instance_ids(&more);
    assert_eq!(more_ids.len(), 100);
    let all = nimbus(&cloud, &["describe-instances", "-o", "json"]).await.ok().json();
    assert!(all.get("next_token").is_none(), "all pages were followed");
    let listed = instance_ids(&all);
    assert_eq!(listed.len(), 107);
    assert_eq!(listed, [ids.clone(), more_ids.clone()].concat(), "every instance once, in launch order");
    let pending = nimbus(&cloud, &["describe-instances", "--state", "pending", "-o", "json"]).await.ok().json();
    assert_eq!(instance_ids(&pending), more_ids);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances WHERE state = 'pending'").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 100);
}

#[tokio::test]
async fn describe_hosts_instance_types_and_images() {
    let cloud = Cloud::start().await.unwrap();
    let a = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let b = cloud.add_agent("b", "az2", 4, 4096, 50).await.unwrap();
    let (ha, hb) = (host_id(&cloud, &a.name).await, host_id(&cloud, &b.name).await);
    let image = cloud.register_test_image().await.unwrap();
    nimbus(&cloud, &["run-instances", "--instance-type", "t3.micro", "--availability-zone", "az2", "--wait"]).await.ok();

    // Hosts: one row each, used/total capacity (b holds the t3.micro).
    let hosts = nimbus(&cloud, &["describe-hosts"]).await.ok();
    let rows = hosts.rows(0);
    assert_eq!(rows[0], ["ID", "NAME", "AZ", "HYPERVISOR", "STATUS", "HEALTH", "VCPU", "MEM", "DISK", "INSTANCES", "HEARTBEAT"]);
    assert_eq!(rows.len(), 3, "{}", hosts.out);
    let row = |id: &str| rows.iter().find(|r| r[0] == id).unwrap_or_else(|| panic!("{id} missing: {}", hosts.out)).clone();
    let (ra, rb) = (row(&ha), row(&hb));
    assert_eq!((ra[1].as_str(), ra[2].as_str(), ra[4].as_str(), ra[5].as_str()), (a.name.as_str(), "az1", "available", "ok"));
    assert_eq!(&ra[6..12], ["0/8", "0/8192", "MiB", "0/100", "GiB", "0"]);
    assert_eq!((rb[1].as_str(), rb[2].as_str(), rb[4].as_str(), rb[5].as_str()), (b.name.as_str(), "az2", "available", "ok"));
    assert_eq!(&rb[6..12], ["2/4", "1024/4096", "MiB", "8/50", "GiB", "1"]);
    let hosts = nimbus(&cloud, &["describe-hosts", "-o", "json"]).await.ok().json();
    let mut got: Vec<(String, String, u64, u64)> = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["availability_zone"].as_str().unwrap().to_string(),
                h["total"]["vcpus"].as_u64().unwrap(),
                h["used"]["vcpus"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, [(a.name.clone(), "az1".into(), 8, 0), (b.name.clone(), "az2".into(), 4, 2)]);

    // Instance types: exactly the catalog in the database.
    let catalog: Vec<(String, i32, i64, i64)> =
        sqlx::query_as("SELECT name, vcpus, memory_mib, disk_gib FROM instance_types ORDER BY name").fetch_all(cloud.db()).await.unwrap();
    assert!(catalog.len() >= 3);
    let expected: BTreeSet<Vec<String>> =
        catalog.iter().map(|(n, c, m, d)| vec![n.clone(), c.to_string(), m.to_string(), d.to_string()]).collect();
    let types = nimbus(&cloud, &["describe-instance-types"]).await.ok();
    assert_eq!(
        types.out.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["NAME", "VCPUS", "MEMORY", "(MiB)", "DISK", "(GiB)"]
    );
    assert_eq!(types.rows(1).into_iter().collect::<BTreeSet<_>>(), expected);
    assert_eq!(types.rows(1).len(), catalog.len());
    let types = nimbus(&cloud, &["describe-instance-types", "-o", "json"]).await.ok().json();
    let got: BTreeSet<Vec<String>> = types["instance_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            vec![t["name"].as_str().unwrap().to_string(), t["vcpus"].to_string(), t["memory_mib"].to_string(), t["disk_gib"].to_string()]
        })
        .collect();
    assert_eq!(got, expected);

    // Images: the one registered, as the default; its source is the operator's to see.
    let images = nimbus(&cloud, &["describe-images"]).await.ok();
    let rows = images.rows(0);
    assert_eq!(rows[0], ["ID", "NAME", "OWNER", "STATE", "PUBLIC", "DEFAULT", "BOOT", "ROOT", "DISK", "SOURCE", "CREATED"]);
    assert_eq!(rows.len(), 2, "{}", images.out);
    assert_eq!(
        &rows[1][..9],
        [image.image_id.as_str(), "test-image", "000000000000", "available", "yes", "yes", "kernel", "root.qcow2", "-"]
    );
    let images = nimbus(&cloud, &["describe-images", "-o", "json"]).await.ok().json();
    assert_eq!(images["images"].as_array().unwrap().len(), 1);
    let tenants_view = nimbus_proto::api::Image { source_url: None, ..image.clone() };
    assert_eq!(images["images"][0], serde_json::to_value(&tenants_view).unwrap());
    let images = nimbus_raw(&["--endpoint", cloud.url.as_str(), "--token", cloud.admin_token.as_str(), "describe-images", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(images["images"][0], serde_json::to_value(&image).unwrap(), "the operator sees the source");
}

#[tokio::test]
async fn register_image_from_a_manifest_then_boot_it() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let good = TempDir::new("cli-image");
    let manifest = write_image_dir(good.path(), None);
    let text: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();

    let reg = nimbus(
        &cloud,
        &["register-image", "--manifest", manifest.to_str().unwrap(), "--default", "--description", "from the cli test", "-o", "json"],
    )
    .await
    .ok()
    .json();
    let image_id = reg["image_id"].as_str().unwrap().to_string();
    assert!(image_id.starts_with("ami-"), "{reg}");
    let source_url = format!("file://{}", good.path().canonicalize().unwrap().display());
    assert_eq!(reg["source_url"], source_url.as_str());
    assert_eq!(reg["name"], "cli-tiny");
    assert_eq!(reg["description"], "from the cli test");
    assert_eq!(reg["default"], true);
    assert_eq!(reg["cmdline"], "console=ttyS0");
    let row: (String, String, String, Option<String>, String, bool) =
        sqlx::query_as("SELECT source_url, kernel, kernel_sha256, initrd_sha256, root_disk_sha256, is_default FROM images WHERE id = $1")
            .bind(&image_id)
            .fetch_one(cloud.db())
            .await
            .unwrap();
    assert_eq!(
        row,
        (
            source_url.clone(),
            "vmlinuz".to_string(),
            text["sha256"]["vmlinuz"].as_str().unwrap().to_string(),
            Some(text["sha256"]["initrd.img"].as_str().unwrap().to_string()),
            text["sha256"]["rootfs.qcow2"].as_str().unwrap().to_string(),
            true
        )
    );

    // The agent fetches the files from the manifest's directory and checks
    // their digests: an instance of the (default) image runs.
    let run = nimbus(&cloud, &["run-instances", "--instance-type", "t3.nano", "--wait", "-o", "json"]).await.ok().json();
    assert_eq!(run["instances"][0]["image_id"], image_id.as_str());
    assert_eq!(run["instances"][0]["state"]["name"], "running");

    // A manifest whose kernel digest is wrong (but well-formed) registers, and
    // `--wait` fails with the agent's reason.
    let bad = TempDir::new("cli-image-bad");
    let bad_manifest = write_image_dir(bad.path(), Some(sha256_hex(b"not the kernel")));
    let reg_bad = nimbus(&cloud, &["register-image", "--manifest", bad_manifest.to_str().unwrap(), "--name", "corrupt", "-o", "json"])
        .await
        .ok()
        .json();
    let bad_id = reg_bad["image_id"].as_str().unwrap();
    assert_eq!(reg_bad["default"], false);
    let failed = nimbus(&cloud, &["run-instances", "--instance-type", "t3.nano", "--image-id", bad_id, "--wait"]).await;
    assert_eq!(failed.code, Some(1), "{failed:?}");
    assert!(failed.err.contains("instead of running") && failed.err.contains("checksum mismatch"), "{}", failed.err);

    // The images table lists both; only the first is the default.
    let images = nimbus(&cloud, &["describe-images"]).await.ok();
    let mut rows: Vec<(String, String, String)> = images.rows(1).into_iter().map(|r| (r[0].clone(), r[1].clone(), r[5].clone())).collect();
    rows.sort();
    let mut expected =
        vec![(image_id.clone(), "cli-tiny".to_string(), "yes".to_string()), (bad_id.to_string(), "corrupt".to_string(), "no".to_string())];
    expected.sort();
    assert_eq!(rows, expected, "{}", images.out);

    // A digest that is not 64 hex digits is refused before any request.
    let mut broken = text.clone();
    broken["sha256"]["rootfs.qcow2"] = json!("abc123");
    let broken_path = good.path().join("broken.json");
    std::fs::write(&broken_path, broken.to_string()).unwrap();
    let refused = nimbus(&cloud, &["register-image", "--manifest", broken_path.to_str().unwrap()]).await;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(refused.err.contains("rootfs.qcow2") && refused.err.contains("64 hex digits"), "{}", refused.err);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM images").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(n, 2);
}

#[tokio::test]
async fn errors_exit_with_their_codes() {
    let cloud = Cloud::start().await.unwrap();
    let _a = cloud.add_agent("a", "az1", 4, 4096, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();

    // API errors: exit 1, one line naming the API's error code.
    let wrong = nimbus_raw(&["--endpoint", &cloud.url, "--token", "not-the-token", "describe-hosts"]).await;
    assert_eq!(wrong.code, Some(1), "{wrong:?}");
    assert!(wrong.err.starts_with("error: AuthFailure: "), "{}", wrong.err);
    assert!(wrong.out.is_empty());
    let unknown = nimbus(&cloud, &["run-instances", "--instance-type", "t9.enormous"]).await;
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(unknown.err.starts_with("error: InvalidParameterValue: Invalid value 't9.enormous' for InstanceType"), "{}", unknown.err);
    // 3 × 2 vCPUs do not fit on a 4-vCPU host: nothing is launched.
    let full = nimbus(&cloud, &["run-instances", "--instance-type", "t3.nano", "--count", "3"]).await;
    assert_eq!(full.code, Some(1), "{full:?}");
    assert!(full.err.starts_with("error: InsufficientInstanceCapacity: "), "{}", full.err);
    assert_eq!(instance_count(&cloud).await, 0);
    // ... while 2 do.
    let fits = nimbus(&cloud, &["run-instances", "--instance-type", "t3.nano", "--count", "2", "-o", "json"]).await.ok().json();
    assert_eq!(instance_ids(&fits).len(), 2);
    assert_eq!(instance_count(&cloud).await, 2);
    let missing = nimbus(&cloud, &["terminate-instances", "i-0000000000000beef"]).await;
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(missing.err.starts_with("error: InvalidInstanceID.NotFound: "), "{}", missing.err);

    // No token: a usage error (exit 2), before any request.
    let no_token = nimbus_raw(&["--endpoint", &cloud.url, "describe-hosts"]).await;
    assert_eq!(no_token.code, Some(2), "{no_token:?}");
    assert!(no_token.err.contains("NIMBUS_TOKEN"), "{}", no_token.err);

    // Nothing listening: exit 3, naming the endpoint. (Bind a port, note it, drop it.)
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let refused = nimbus_raw(&["--endpoint", &endpoint, "--token", &cloud.admin_token, "describe-hosts"]).await;
    assert_eq!(refused.code, Some(3), "{refused:?}");
    assert!(refused.err.starts_with(&format!("error: cannot reach the Nimbus API at {endpoint}")), "{}", refused.err);
}

/// The operator creates an account; its token launches in its own account
/// and is refused operator commands.
#[tokio::test]
async fn admin_create_account_and_use_its_token() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let created = nimbus(&cloud, &["-o", "json", "admin", "create-account", "--name", "erin"]).await.ok().json();
    let token = format!("{}:{}", created["access_key_id"].as_str().unwrap(), created["secret_access_key"].as_str().unwrap());
    let as_erin = |args: &[&str]| {
        let mut all = vec!["--endpoint", cloud.url.as_str(), "--token", token.as_str()];
        all.extend_from_slice(args);
        let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        async move { nimbus_raw(&all.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let r = as_erin(&["-o", "json", "run-instances", "--instance-type", "t3.nano", "--wait"]).await.ok().json();
    assert_eq!(r["owner_id"], created["account_id"]);
    let refused = as_erin(&["describe-hosts"]).await;
    assert_eq!(refused.code, Some(1));
    assert!(refused.err.contains("UnauthorizedOperation"), "{}", refused.err);
    // The operator's own listing does not show erin's instance.
    let mine = nimbus(&cloud, &["-o", "json", "describe-instances"]).await.ok().json();
    assert_eq!(mine["instances"].as_array().unwrap().len(), 0);
    let duplicate = nimbus(&cloud, &["admin", "create-account", "--name", "erin"]).await;
    assert_eq!(duplicate.code, Some(1));
}

#[tokio::test]
async fn vpc_commands_create_a_network_and_launch_into_it() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 16, 16384, 200).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let vpcs = nimbus(&cloud, &["describe-vpcs"]).await.ok();
    assert_eq!(vpcs.rows(0)[1][1..3], ["172.31.0.0/16", "true"], "the default VPC: {}", vpcs.out);
    let vpc = nimbus(&cloud, &["create-vpc", "--cidr-block", "10.1.0.0/16", "-o", "json"]).await.ok().json();
    let vpc_id = vpc["vpc_id"].as_str().unwrap();
    let subnet = nimbus(&cloud, &["create-subnet", "--vpc-id", vpc_id, "--cidr-block", "10.1.2.0/24", "-o", "json"]).await.ok().json();
    let subnet_id = subnet["subnet_id"].as_str().unwrap();
    let sg = nimbus(&cloud, &["create-security-group", "--group-name", "web", "--description", "web", "--vpc-id", vpc_id, "-o", "json"])
        .await
        .ok()
        .json();
    let sg_id = sg["group_id"].as_str().unwrap();
    let rule = nimbus(&cloud, &["authorize-security-group-ingress", sg_id, "--port", "22", "--cidr", "0.0.0.0/0"]).await.ok();
    assert_eq!(rule.rows(1)[0][1..4], ["tcp", "22", "22"], "{}", rule.out);
    let dup = nimbus(&cloud, &["authorize-security-group-ingress", sg_id, "--port", "22", "--cidr", "0.0.0.0/0"]).await;
    assert!(dup.err.contains("InvalidPermission.Duplicate"), "{}", dup.err);
    let groups = nimbus(&cloud, &["describe-security-groups", "--vpc-id", vpc_id]).await.ok();
    assert!(groups.out.contains(&format!("RULE {sg_id} IN tcp 22-22 0.0.0.0/0")), "{}", groups.out);

    let run = nimbus(
        &cloud,
        &[
            "run-instances",
            "--instance-type",
            "t3.nano",
            "--subnet-id",
            subnet_id,
            "--security-group-ids",
            sg_id,
            "--private-ip-address",
            "10.1.2.10",
        ],
    )
    .await
    .ok();
    assert_eq!(run.rows(0)[2][6..], ["10.1.2.10", "-"], "{}", run.out);
    let enis = nimbus(&cloud, &["describe-network-interfaces"]).await.ok();
    let row = &enis.rows(0)[1];
    assert_eq!((row[3].as_str(), row[4].as_str(), row[8].as_str()), (subnet_id, "10.1.2.10", sg_id), "{}", enis.out);
    // No public pool: no Elastic IPs, with EC2's code.
    let alloc = nimbus(&cloud, &["allocate-address"]).await;
    assert!(alloc.err.contains("InsufficientAddressCapacity"), "{}", alloc.err);
    let del = nimbus(&cloud, &["delete-subnet", subnet_id]).await;
    assert!(del.err.contains("DependencyViolation"), "{}", del.err);
}

/// Key pairs from the command line: made with the private key written to a
/// new 0600 file (never printed then), listed, used at launch, deleted; an
/// existing file is never overwritten.
#[tokio::test]
async fn key_pairs_are_made_listed_used_and_deleted() {
    use std::os::unix::fs::PermissionsExt;
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let file = cloud.dir.path().join("demo.pem");
    let made = nimbus(&cloud, &["create-key-pair", "demo", "--out", file.to_str().unwrap()]).await.ok();
    assert!(made.out.contains("private key written to"), "{}", made.out);
    assert!(!made.out.contains("PRIVATE KEY"), "the key went to the file, not the terminal: {}", made.out);
    let pem = std::fs::read_to_string(&file).unwrap();
    assert!(pem.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"), "{pem}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let again = nimbus(&cloud, &["create-key-pair", "demo2", "--out", file.to_str().unwrap()]).await;
    assert_ne!(again.code, Some(0), "an existing file is not overwritten");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), pem);

    let listed = nimbus(&cloud, &["describe-key-pairs"]).await.ok();
    assert!(listed.rows(1).iter().any(|r| r[0] == "demo" && r[2] == "ed25519"), "{}", listed.out);
    let run = nimbus(&cloud, &["-o", "json", "run-instances", "--instance-type", "t3.nano", "--key-name", "demo"]).await.ok().json();
    assert_eq!(run["instances"][0]["key_name"], "demo");
    nimbus(&cloud, &["delete-key-pair", "demo"]).await.ok();
    assert!(!nimbus(&cloud, &["describe-key-pairs"]).await.ok().out.contains("demo "), "deleted");
}

/// Metadata options at launch (`run-instances --http-tokens required ...`)
/// and changed afterwards (`modify-instance-metadata-options`); bad values
/// are usage errors, and a modify with no option says what to give.
#[tokio::test]
async fn metadata_options_at_launch_and_modified() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let run = nimbus(
        &cloud,
        &["-o", "json", "run-instances", "--instance-type", "t3.nano", "--http-tokens", "required", "--instance-metadata-tags", "enabled"],
    )
    .await
    .ok()
    .json();
    let id = run["instances"][0]["instance_id"].as_str().unwrap().to_string();
    let opts = &run["instances"][0]["metadata_options"];
    assert_eq!(
        (opts["http_tokens"].as_str(), opts["instance_metadata_tags"].as_str(), opts["http_endpoint"].as_str()),
        (Some("required"), Some("enabled"), Some("enabled")),
        "{run}"
    );
    let bad = nimbus(&cloud, &["run-instances", "--instance-type", "t3.nano", "--http-tokens", "sometimes"]).await;
    assert_eq!(bad.code, Some(2), "a usage error: {}", bad.err);
    let none = nimbus(&cloud, &["modify-instance-metadata-options", &id]).await;
    assert_eq!(none.code, Some(2), "{}", none.err);
    assert!(none.err.contains("--http-tokens"), "{}", none.err);
    let changed =
        nimbus(&cloud, &["modify-instance-metadata-options", &id, "--http-endpoint", "disabled", "--http-tokens", "optional"]).await.ok();
    let row = changed.rows(1).into_iter().next().unwrap_or_default();
    assert_eq!(
        row.get(0..6).map(|r| r.to_vec()),
        Some(vec![id.clone(), row[1].clone(), "optional".into(), "disabled".into(), "enabled".into(), "1".into()]),
        "{}",
        changed.out
    );
    let described = nimbus(&cloud, &["-o", "json", "describe-instances", "--instance-id", &id]).await.ok().json();
    let opts = &described["instances"][0]["metadata_options"];
    assert_eq!((opts["http_tokens"].as_str(), opts["http_endpoint"].as_str()), (Some("optional"), Some("disabled")), "{described}");
}

/// `register-image --disk` (a qcow2 on the host, with its SHA-256) for an
/// account, `describe-images` with owners and a name pattern, `create-image`
/// of a running instance (pending, then available), `deregister-image`.
#[tokio::test]
async fn images_by_disk_path_create_image_and_deregister() {
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let tester = cloud.get("/v1/account").await.unwrap()["account_id"].as_str().unwrap().to_string();
    let dir = TempDir::new("cli-disk");
    let disk = dir.path().join("disk.qcow2");
    let out = std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg("32M").output().unwrap();
    assert!(out.status.success());
    let digest = sha256_hex(&std::fs::read(&disk).unwrap());

    // Without --sha256 the command line refuses (usage error, exit 2).
    let refused = nimbus(&cloud, &["register-image", "--name", "mine", "--disk", disk.to_str().unwrap()]).await;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    let reg = nimbus(
        &cloud,
        &[
            "register-image",
            "--name",
            "mine",
            "--disk",
            disk.to_str().unwrap(),
            "--sha256",
            &digest.to_uppercase(),
            "--owner",
            &tester,
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        (reg["boot"].as_str(), reg["public"].as_bool(), reg["owner_id"].as_str()),
        (Some("disk"), Some(false), Some(tester.as_str()))
    );
    let ami = reg["image_id"].as_str().unwrap().to_string();

    let mine = nimbus(&cloud, &["describe-images", "--owners", "self", "--name", "mi*", "-o", "json"]).await.ok().json();
    let ids: Vec<&str> = mine["images"].as_array().unwrap().iter().map(|i| i["image_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [ami.as_str()]);
    let amazon = nimbus(&cloud, &["describe-images", "--owners", "amazon", "-o", "json"]).await.ok().json();
    assert!(amazon["images"].as_array().unwrap().is_empty(), "{amazon}");

    let run =
        nimbus(&cloud, &["run-instances", "--instance-type", "t3.nano", "--image-id", &ami, "--wait", "-o", "json"]).await.ok().json();
    let id = run["instances"][0]["instance_id"].as_str().unwrap().to_string();
    let made = nimbus(&cloud, &["create-image", &id, "--name", "mine-copy", "--no-reboot", "-o", "json"]).await.ok().json();
    assert_eq!(made["state"], "pending");
    let copy = made["image_id"].as_str().unwrap().to_string();
    let dup = nimbus(&cloud, &["create-image", &id, "--name", "mine-copy"]).await;
    assert_eq!(dup.code, Some(1));
    assert!(dup.err.contains("InvalidAMIName.Duplicate"), "{}", dup.err);
    cloud
        .wait_until(std::time::Duration::from_secs(60), || {
            let (cloud, copy) = (&cloud, &copy);
            async move {
                Ok(nimbus(cloud, &["describe-images", "--image-ids", copy, "-o", "json"]).await.ok().json()["images"][0]["state"]
                    == "available")
            }
        })
        .await
        .unwrap();

    let gone = nimbus(&cloud, &["deregister-image", &copy]).await.ok();
    assert!(gone.out.contains("deregistered"), "{}", gone.out);
    let missing = nimbus(&cloud, &["describe-images", "--image-ids", &copy]).await;
    assert_eq!(missing.code, Some(1));
    assert!(missing.err.contains("InvalidAMIID.NotFound"), "{}", missing.err);
}
