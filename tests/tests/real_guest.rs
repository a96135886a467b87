//! End to end with a real guest: API call → Postgres scheduler → agent →
//! libvirt (KVM where it works, QEMU/TCG here) → the guest's own console
//! prints its instance id, read from its seed disk and from the metadata
//! service, and the SHA-256 of the user-data it read from each. Then
//! terminate: the domain and its files are gone. Bounds are scaled by
//! NIMBUS_TEST_TIME_SCALE.
//!
//! The agent's handle destroys the guest when the test ends, passed or
//! failed (see `AgentHandle`).
//!
//! Needs the tiny image (`images/build-tiny.sh`) in `NIMBUS_IMAGE_DIR` and a
//! running libvirtd; `scripts/test.sh` provides both.

use nimbus_host_agent::HypervisorChoice;
use nimbus_tests::{domain_exists, instance_ids, scaled, Cloud};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guest_boots_and_prints_its_own_instance_id() {
    let image_dir =
        PathBuf::from(std::env::var("NIMBUS_IMAGE_DIR").expect("NIMBUS_IMAGE_DIR must name the built tiny image: run scripts/test.sh"));
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent_with("real", "az1", 4, 4096, 50, HypervisorChoice::Auto).await.unwrap();
    let hosts = cloud.get("/v1/hosts").await.unwrap();
    let hypervisor = hosts["hosts"][0]["hypervisor"].as_str().unwrap().to_string();
    assert!(hypervisor == "kvm" || hypervisor == "qemu", "auto must pick a real hypervisor, got {hypervisor}");
    cloud.register_image_dir(&image_dir, true).await.unwrap();

    // User-data with a NUL, a non-UTF-8 byte and no final newline: the guest must get these bytes.
    let user_data: Vec<u8> = b"#!/bin/sh\necho hi \x00\xff\x01 from nimbus".to_vec();
    let digest = hex::encode(Sha256::digest(&user_data));
    let started = Instant::now();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&user_data);
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "user_data": b64})).await.unwrap();
    let id = instance_ids(&r).remove(0);
    let domain = format!("nimbus-{id}");
    cloud.wait_for_state(std::slice::from_ref(&id), "running", scaled(Duration::from_secs(120))).await.unwrap();

    let console = agent.state_dir.join("instances").join(&id).join("console.log");
    let mut text = String::new();
    let deadline = Instant::now() + scaled(Duration::from_secs(180));
    while Instant::now() < deadline {
        text = nimbus_tests::read_console(&console);
        if text.contains("NIMBUS-READY") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{hypervisor} guest {id}: console READY {:.1} s after the API call", started.elapsed().as_secs_f64());
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("NIMBUS-")).collect();
    println!("{}", lines.join("\n"));
    assert!(text.contains("NIMBUS-READY"), "the guest never got ready; console:\n{text}");
    assert!(lines.contains(&format!("NIMBUS-BOOT instance-id={id}").as_str()), "seed disk: {lines:?}");
    assert!(lines.contains(&"NIMBUS-ROOT ok"), "root overlay: {lines:?}");
    assert!(lines.contains(&format!("NIMBUS-METADATA instance-id={id}").as_str()), "metadata service: {lines:?}");
    assert!(lines.contains(&format!("NIMBUS-USERDATA seed sha256={digest}").as_str()), "user-data on the seed: {lines:?}");
    assert!(
        lines.contains(&format!("NIMBUS-USERDATA metadata sha256={digest}").as_str()),
        "user-data from the metadata service: {lines:?}"
    );

    cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await.unwrap();
    cloud.wait_for_state(std::slice::from_ref(&id), "terminated", scaled(Duration::from_secs(120))).await.unwrap();
    assert!(!domain_exists(&domain), "the domain is gone");
    assert!(!agent.state_dir.join("instances").join(&id).exists(), "the guest's files are gone");
}
