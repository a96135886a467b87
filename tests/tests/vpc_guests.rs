//! VPC networking end to end with real guests (QEMU/TCG here): a control
//! plane with a public pool, two simulated hosts (network namespaces on an
//! underlay, see `nimbus_host_agent::network::testing`) each with an agent
//! running the VPC data plane, and an "outside" namespace playing the
//! internet. Every check goes through the guests themselves: the test logs
//! into them with SSH (the tiny image's dropbear, the launch key pair) at
//! their public addresses and runs `wget` there.

use nimbus_host_agent::network::testing::Topology;
use nimbus_host_agent::HypervisorChoice;
use nimbus_tests::{instance_ids, scaled, Cloud, CloudOptions};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Runs `cmd` on the guest at `ip` over SSH from the outside namespace:
/// its stdout, or why not.
async fn ssh(outside: &str, key: &Path, ip: &str, cmd: &str) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("ip")
            .args(["netns", "exec", outside, "ssh", "-i"])
            .arg(key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "LogLevel=ERROR",
                &format!("root@{ip}"),
                cmd,
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "ssh did not finish within 60 s".to_string())?
    .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Waits until `ssh` to the guest works (it has booted and started dropbear).
async fn wait_ssh(outside: &str, key: &Path, ip: &str) -> String {
    let deadline = Instant::now() + scaled(Duration::from_secs(240));
    loop {
        match ssh(outside, key, ip, "cat /etc/hostname 2>/dev/null || hostname").await {
            Ok(out) => return out,
            Err(e) if Instant::now() > deadline => panic!("no SSH to {ip}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

/// `wget` of `url` from the guest at `via`: its body, or `None` when it got
/// no answer within 5 s.
async fn fetch(outside: &str, key: &Path, via: &str, url: &str) -> Option<String> {
    ssh(outside, key, via, &format!("timeout 5 wget -q -O - {url} || echo FETCH-FAILED")).await.ok().filter(|o| !o.contains("FETCH-FAILED"))
}

/// Polls `fetch` until its answer is `want`'s (Some or None), within 30 s.
async fn eventually(outside: &str, key: &Path, via: &str, url: &str, want: Option<&str>) -> Option<String> {
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    loop {
        let got = fetch(outside, key, via, url).await;
        if got.as_deref() == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn group(cloud: &Cloud, token: &str, name: &str) -> String {
    let (s, g) = cloud
        .call_as(Some(token), Method::POST, "/v1/security-groups", Some(json!({"group_name": name, "description": name})))
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK, "{g}");
    g["group_id"].as_str().unwrap().to_string()
}

async fn allow(cloud: &Cloud, token: &str, group: &str, port: i32, from: Value, revoke: bool) {
    let mut rule = json!({"protocol": "tcp", "from_port": port, "to_port": port});
    for (k, v) in from.as_object().unwrap() {
        rule[k] = v.clone();
    }
    let path = format!("/v1/security-groups/{group}/ingress{}", if revoke { "/revoke" } else { "" });
    let (s, b) = cloud.call_as(Some(token), Method::POST, &path, Some(json!({"rules": [rule]}))).await.unwrap();
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// A key pair of the account: its name, and its private key in a 0600 file.
async fn key_pair(cloud: &Cloud, token: &str, name: &str, dir: &Path) -> PathBuf {
    let (s, k) = cloud.call_as(Some(token), Method::POST, "/v1/key-pairs", Some(json!({"name": name}))).await.unwrap();
    assert_eq!(s, StatusCode::OK, "{k}");
    let path = dir.join(name);
    std::fs::write(&path, k["key_material"].as_str().unwrap()).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

async fn launch(cloud: &Cloud, token: &str, body: Value) -> String {
    let (s, r) = cloud.call_as(Some(token), Method::POST, "/v1/instances", Some(body)).await.unwrap();
    assert_eq!(s, StatusCode::OK, "{r}");
    instance_ids(&r).remove(0)
}

async fn instance(cloud: &Cloud, token: &str, id: &str) -> Value {
    cloud.call_as(Some(token), Method::GET, &format!("/v1/instances/{id}"), None).await.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_in_a_vpc_talk_as_their_groups_allow_and_outsiders_reach_them_over_ssh() {
    let image_dir =
        PathBuf::from(std::env::var("NIMBUS_IMAGE_DIR").expect("NIMBUS_IMAGE_DIR must name the tiny image: run scripts/test.sh"));
    let topo = Topology::new(2).await;
    let cloud =
        Cloud::start_with(CloudOptions { public_pool: Some(nimbus_host_agent::network::testing::PUBLIC_POOL), ..Default::default() })
            .await
            .unwrap();
    let _h0 = cloud.add_vpc_agent("h0", "az1", (4, 4096, 50), HypervisorChoice::Auto, &topo.hosts[0]).await.unwrap();
    let _h1 = cloud.add_vpc_agent("h1", "az2", (4, 4096, 50), HypervisorChoice::Auto, &topo.hosts[1]).await.unwrap();
    cloud.register_image_dir(&image_dir, true).await.unwrap();
    let keys = nimbus_tests::TempDir::new("keys");
    let out = topo.outside.name.clone();
    let me = cloud.user_token.clone();
    let other = cloud.create_account("other").await.unwrap();

    // Groups: SSH from the outside; "server" takes 8080 from "client".
    let outside_net = json!({"cidrs": [nimbus_host_agent::network::testing::INTERNET]});
    let (ssh_g, client, server) = (group(&cloud, &me, "ssh").await, group(&cloud, &me, "client").await, group(&cloud, &me, "server").await);
    allow(&cloud, &me, &ssh_g, 22, outside_net.clone(), false).await;
    allow(&cloud, &me, &server, 8080, json!({"group_ids": [client]}), false).await;
    let key = key_pair(&cloud, &me, "mine", keys.path()).await;
    let serve = "#!/bin/sh\nmkdir -p /www && echo hello-from-server >/www/index.html\nhttpd -p 8080 -h /www\nhttpd -p 9090 -h /www\n";
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let b = launch(
        &cloud,
        &me,
        json!({"instance_type": "t3.nano", "availability_zone": "az2", "key_name": "mine",
        "security_group_ids": [ssh_g, server], "user_data": b64(serve)}),
    )
    .await;
    let a = launch(
        &cloud,
        &me,
        json!({"instance_type": "t3.nano", "availability_zone": "az1", "key_name": "mine",
        "security_group_ids": [ssh_g, client]}),
    )
    .await;
    // Another account, its own default VPC (the same 172.31.0.0/16), its own SSH group.
    let other_ssh = group(&cloud, &other, "ssh").await;
    allow(&cloud, &other, &other_ssh, 22, outside_net.clone(), false).await;
    let other_key = key_pair(&cloud, &other, "theirs", keys.path()).await;
    let c = launch(
        &cloud,
        &other,
        json!({"instance_type": "t3.nano", "availability_zone": "az1", "key_name": "theirs",
        "security_group_ids": [other_ssh]}),
    )
    .await;
    cloud.wait_for_state(&[a.clone(), b.clone()], "running", scaled(Duration::from_secs(120))).await.unwrap();
    let (ia, ib, ic) = (instance(&cloud, &me, &a).await, instance(&cloud, &me, &b).await, instance(&cloud, &other, &c).await);
    let ip = |i: &Value, k: &str| i[k].as_str().unwrap_or_else(|| panic!("{k} missing: {i}")).to_string();
    let (pub_a, pub_b, pub_c) = (ip(&ia, "public_ip_address"), ip(&ib, "public_ip_address"), ip(&ic, "public_ip_address"));
    let (priv_a, priv_b) = (ip(&ia, "private_ip_address"), ip(&ib, "private_ip_address"));

    // SSH in at the public addresses; each guest's metadata is its own.
    wait_ssh(&out, &key, &pub_a).await;
    wait_ssh(&out, &key, &pub_b).await;
    wait_ssh(&out, &other_key, &pub_c).await;
    for (pubip, id, privip) in [(&pub_a, &a, &priv_a), (&pub_b, &b, &priv_b)] {
        let md = ssh(&out, &key, pubip, "wget -q -O - http://169.254.169.254/latest/meta-data/instance-id; echo; wget -q -O - http://169.254.169.254/latest/meta-data/local-ipv4").await.unwrap();
        assert_eq!(md, format!("{id}\n{privip}"), "the metadata service answers each guest its own identity");
    }
    assert_eq!(ssh(&out, &key, &pub_a, "echo $((6 * 7))").await.unwrap(), "42", "a command runs and its output comes back");
    assert!(ssh(&out, &other_key, &pub_a, "true").await.is_err(), "another key does not open A");

    // A client reaches the server on 8080 (different hosts, different subnets), not on 9090.
    let url = |port: u16| format!("http://{priv_b}:{port}/");
    assert_eq!(eventually(&out, &key, &pub_a, &url(8080), Some("hello-from-server")).await.as_deref(), Some("hello-from-server"));
    assert_eq!(fetch(&out, &key, &pub_a, &url(9090)).await, None, "9090 is not allowed");
    // A rule added takes effect for new connections; revoked, it stops them.
    allow(&cloud, &me, &server, 9090, json!({"group_ids": [client]}), false).await;
    assert_eq!(eventually(&out, &key, &pub_a, &url(9090), Some("hello-from-server")).await.as_deref(), Some("hello-from-server"));
    allow(&cloud, &me, &server, 9090, json!({"group_ids": [client]}), true).await;
    assert_eq!(eventually(&out, &key, &pub_a, &url(9090), None).await, None, "revoked");
    // Another account's instance reaches nothing of ours, whatever address it tries.
    assert_eq!(fetch(&out, &other_key, &pub_c, &url(8080)).await, None, "another VPC cannot reach B");
    // A guest that sends from an address not its own is dropped.
    let spoof = "ip addr add 172.31.0.250/32 dev eth0 || echo ADDR-FAILED; ip route add {B}/32 via {GW} dev eth0 src 172.31.0.250 2>&1 || echo ROUTE-FAILED; \
                 ip route get {B}; timeout 5 wget -q -O - http://{B}:8080/ || echo FETCH-FAILED; ip route del {B}/32; ip addr del 172.31.0.250/32 dev eth0";
    let gw = ssh(&out, &key, &pub_a, "ip route | awk '/^default/ {print $3}'").await.unwrap();
    let spoofed = ssh(&out, &key, &pub_a, &spoof.replace("{B}", &priv_b).replace("{GW}", &gw)).await.unwrap();
    assert!(spoofed.contains("src 172.31.0.250") && spoofed.ends_with("FETCH-FAILED"), "spoofed traffic is dropped: {spoofed}");
    assert_eq!(fetch(&out, &key, &pub_a, &url(8080)).await.as_deref(), Some("hello-from-server"), "its own address still works");
    // The outside reaches B's public address on 22 only while the group allows it.
    allow(&cloud, &me, &ssh_g, 22, outside_net, true).await;
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    while ssh(&out, &key, &pub_b, "true").await.is_ok() {
        assert!(Instant::now() < deadline, "SSH still open after the rule was revoked");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
