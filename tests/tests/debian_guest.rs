//! End to end with the Debian 12 cloud image (`images/build-debian.sh`),
//! a real TCG guest booting its own boot loader from its disk:
//!
//! 1. launch it with a key pair and a cloud-config user-data that writes a
//!    file and copies it to the serial console; wait for that line and for
//!    cloud-init's finished line;
//! 2. SSH in as `debian` through the loopback port the API reports
//!    (`ssh_endpoint`), the host key checked against the one the guest
//!    printed on its console, and read the file back;
//! 3. change a file, CreateImage (clean stop and start), launch the new
//!    image: the file is there;
//! 4. terminate both: no domain, no guest files, no half-made image left.
//!
//! Needs the image in `NIMBUS_DEBIAN_IMAGE_DIR` and libvirtd;
//! `scripts/test.sh` provides both (and builds the image only when the
//! recipe changed). A TCG boot to cloud-init's end takes 80-120 s here;
//! bounds are generous and scaled by `NIMBUS_TEST_TIME_SCALE`. The agent's
//! handle destroys its guests when the test ends, passed or failed.

use nimbus_host_agent::HypervisorChoice;
use nimbus_tests::{domain_exists, instance_ids, read_console, scaled, Cloud};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FINISHED: &str = "Cloud-init v. ";
const FINISHED_AT: &str = " finished at ";

fn cloud_init_finished(console: &str) -> bool {
    console.lines().any(|l| l.contains(FINISHED) && l.contains(FINISHED_AT))
}

/// Waits until the guest's console holds `line` and cloud-init's finished line.
async fn await_console(console: &Path, line: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = read_console(console);
        if text.contains(line) && cloud_init_finished(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {line:?} and cloud-init finished line within {timeout:?}; console:\n{text}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `known_hosts` for `[127.0.0.1]:port` from the host keys the guest printed.
fn known_hosts(console: &str, port: u16, path: &Path) {
    let text = console.replace('\r', "");
    let start = text.rfind("-----BEGIN SSH HOST KEY KEYS-----").expect("the guest prints its host keys");
    let end = start + text[start..].find("-----END SSH HOST KEY KEYS-----").expect("end of the host keys");
    let lines: Vec<String> = text[start..end]
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (kind, key) = (parts.next()?, parts.next()?);
            Some(format!("[127.0.0.1]:{port} {kind} {key}\n"))
        })
        .collect();
    assert!(!lines.is_empty(), "host keys on the console");
    std::fs::write(path, lines.concat()).unwrap();
}

async fn ssh(key: &Path, known: &Path, port: u16, cmd: &str) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("ssh")
            .arg("-i")
            .arg(key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p"])
            .arg(port.to_string())
            .args(["debian@127.0.0.1", cmd])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "ssh timed out".to_string())?
    .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// SSH until it answers (sshd may come up a moment after cloud-init's line).
async fn ssh_until(key: &Path, known: &Path, port: u16, cmd: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        match ssh(key, known, port, cmd).await {
            Ok(out) => return out,
            Err(e) if Instant::now() < deadline => eprintln!("ssh not yet: {}", e.trim()),
            Err(e) => panic!("ssh -p {port} {cmd:?} failed for {timeout:?}: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn instance(cloud: &Cloud, id: &str) -> Value {
    let (s, v) = cloud.call(Method::GET, &format!("/v1/instances/{id}"), None).await.unwrap();
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

fn port_of(i: &Value) -> u16 {
    let endpoint = i["ssh_endpoint"].as_str().unwrap_or_else(|| panic!("a running user-mode guest has an ssh_endpoint: {i}"));
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    assert_eq!(host, "127.0.0.1");
    port.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_with_cloud_init_ssh_and_create_image() {
    let image_dir = PathBuf::from(
        std::env::var("NIMBUS_DEBIAN_IMAGE_DIR").expect("NIMBUS_DEBIAN_IMAGE_DIR must name the built Debian image: run scripts/test.sh"),
    );
    let boot = scaled(Duration::from_secs(600));
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent_with("debian", "az1", 4, 4096, 50, HypervisorChoice::Auto).await.unwrap();
    let image = cloud.register_image_dir(&image_dir, false).await.unwrap();
    assert_eq!(image.boot.as_str(), "disk");
    let keys = cloud.dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let (s, k) = cloud.call(Method::POST, "/v1/key-pairs", Some(json!({"name": "e2e"}))).await.unwrap();
    assert_eq!(s, StatusCode::OK, "{k}");
    let key = keys.join("e2e");
    std::fs::write(&key, k["key_material"].as_str().unwrap()).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // 1. Launch with a cloud-config that writes a file and copies it to the console.
    let nonce = nimbus_tests::random_suffix();
    let line = format!("NIMBUS-E2E {nonce}");
    let user_data = format!(
        "#cloud-config\nwrite_files:\n  - path: /var/tmp/nimbus-e2e\n    content: \"{line}\\n\"\nruncmd:\n  - [sh, -c, 'cat /var/tmp/nimbus-e2e > /dev/ttyS0']\n"
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&user_data);
    let started = Instant::now();
    let r = cloud
        .post("/v1/instances", json!({"instance_type": "t3.nano", "image_id": image.image_id, "key_name": "e2e", "user_data": b64}))
        .await
        .unwrap();
    let id = instance_ids(&r).remove(0);
    cloud.wait_for_state(std::slice::from_ref(&id), "running", scaled(Duration::from_secs(120))).await.unwrap();
    let console_path = agent.state_dir.join("instances").join(&id).join("console.log");
    let console = await_console(&console_path, &line, boot).await;
    println!("debian guest {id}: cloud-init finished {:.1} s after the API call", started.elapsed().as_secs_f64());

    // 2. SSH through the forwarded port, host key from the console.
    let i = instance(&cloud, &id).await;
    let port = port_of(&i);
    let known = keys.join("known_hosts");
    known_hosts(&console, port, &known);
    let got = ssh_until(&key, &known, port, "cat /var/tmp/nimbus-e2e", scaled(Duration::from_secs(120))).await;
    assert_eq!(got.trim(), line);
    assert_eq!(ssh(&key, &known, port, "hostname").await.unwrap().trim(), id, "hostname from the metadata");
    // The guest reaches the metadata service the way cloud-init's Ec2 data
    // source does (an IMDSv2 token, then a dated path), on 169.254.169.254.
    let ec2 = "python3 -c \"import urllib.request as u; m='http://169.254.169.254'; \
        t=u.urlopen(u.Request(m+'/latest/api/token', method='PUT', headers={'X-aws-ec2-metadata-token-ttl-seconds': '60'})).read().decode(); \
        print(u.urlopen(u.Request(m+'/2009-04-04/meta-data/instance-id', headers={'X-aws-ec2-metadata-token': t})).read().decode())\"";
    assert_eq!(ssh(&key, &known, port, ec2).await.unwrap().trim(), id, "the EC2 metadata API from inside the guest");
    // The root file system grew to the type's 8 GiB disk (the image's is 2 GiB).
    let size: u64 = ssh(&key, &known, port, "df --output=size -B1 / | tail -1").await.unwrap().trim().parse().unwrap();
    assert!(size > 6 << 30, "root file system of {size} bytes");

    // 3. Change a file, make an image (clean stop and start), launch it.
    let changed = format!("changed {nonce}");
    ssh(&key, &known, port, &format!("echo '{changed}' | sudo -n tee /etc/nimbus-e2e-changed && sync")).await.unwrap();
    let t0 = Instant::now();
    let made = cloud.post(&format!("/v1/instances/{id}/image"), json!({"name": "debian-e2e-copy"})).await.unwrap();
    let ami = made["image_id"].as_str().unwrap().to_string();
    assert_eq!(made["state"], "pending");
    cloud
        .wait_until(boot, || {
            let (cloud, ami) = (&cloud, &ami);
            async move {
                let v = cloud.get(&format!("/v1/images/{ami}")).await?;
                anyhow::ensure!(v["state"] != "failed", "image failed: {v}");
                Ok(v["state"] == "available")
            }
        })
        .await
        .unwrap();
    println!("CreateImage of {id}: available {:.1} s after the call", t0.elapsed().as_secs_f64());
    // The source instance runs again; terminate it so the copy boots alone.
    cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await.unwrap();
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "image_id": ami, "key_name": "e2e"})).await.unwrap();
    let copy = instance_ids(&r).remove(0);
    cloud.wait_for_state(std::slice::from_ref(&copy), "running", scaled(Duration::from_secs(120))).await.unwrap();
    let copy_console = agent.state_dir.join("instances").join(&copy).join("console.log");
    let text = await_console(&copy_console, "SSH HOST KEY KEYS", boot).await;
    let copy_port = port_of(&instance(&cloud, &copy).await);
    let copy_known = keys.join("known_hosts_copy");
    known_hosts(&text, copy_port, &copy_known);
    let got = ssh_until(&key, &copy_known, copy_port, "cat /etc/nimbus-e2e-changed", scaled(Duration::from_secs(120))).await;
    assert_eq!(got.trim(), changed, "the changed file is in the new image");
    assert_eq!(ssh(&key, &copy_known, copy_port, "hostname").await.unwrap().trim(), copy, "cloud-init ran again for the new instance");

    // 4. Terminate: nothing left on the host.
    cloud.post("/v1/instances/terminate", json!({"instance_ids": [copy]})).await.unwrap();
    cloud.wait_for_state(&[id.clone(), copy.clone()], "terminated", scaled(Duration::from_secs(180))).await.unwrap();
    for i in [&id, &copy] {
        assert!(!domain_exists(&format!("nimbus-{i}")), "the domain of {i} is gone");
        assert!(!agent.state_dir.join("instances").join(i).exists(), "the files of {i} are gone");
    }
    let leftovers: Vec<String> = std::fs::read_dir(agent.state_dir.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "no half-made file in the cache: {leftovers:?}");
}
