//! Stop, start, reboot and console output, through the real control plane
//! and an agent: on libvirt's test driver (agent logic), and with a real
//! TCG guest (ACPI shutdown and reboot as the tiny image answers them).
//!
//! Operations go through `POST /v1/instances/{stop,start,reboot}`. Where a
//! test shows that something does *not* happen, it awaits completed agent
//! passes (`AgentHandle::passes`), not a sleep.

use nimbus_host_agent::domain;
use nimbus_host_agent::reconcile::AgentEvent;
use nimbus_host_agent::HypervisorChoice;
use nimbus_tests::{ed25519_public_key, instance_ids, read_console, scaled, test_domain_state, AgentHandle, Cloud};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// Asks for `op` (stop, start, reboot) of one instance; the API must accept it.
async fn request(cloud: &Cloud, op: &str, id: &str) {
    let (status, body) = cloud.call(Method::POST, &format!("/v1/instances/{op}"), Some(json!({"instance_ids": [id]}))).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{op} {id}: {body}");
}

/// A race simulation, not an API call: a reboot asked while the instance
/// still ran, reaching the agent only after the guest stopped (the API
/// itself refuses to reboot a stopped instance: IncorrectInstanceState).
/// Made in SQL as the API's reboot makes it: the reboot counter, the host's
/// generation, and a notification.
async fn reboot_racing_a_stop(cloud: &Cloud, id: &str) {
    let (host,): (String,) = sqlx::query_as(
        "WITH h AS (UPDATE hosts SET generation = generation + 1 \
                    WHERE id = (SELECT host_id FROM instances WHERE id = $1) RETURNING id, generation) \
         UPDATE instances i SET reboots = i.reboots + 1, changed_generation = h.generation \
         FROM h WHERE i.id = $1 RETURNING h.id",
    )
    .bind(id)
    .fetch_one(cloud.db())
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('nimbus_host', $1)").bind(&host).execute(cloud.db()).await.unwrap();
}

/// (reboots asked for, reboots the agent reported carried out).
async fn reboots(cloud: &Cloud, id: &str) -> (i64, i64) {
    sqlx::query_as("SELECT reboots, reboots_done FROM instances WHERE id = $1").bind(id).fetch_one(cloud.db()).await.unwrap()
}

async fn console_output(cloud: &Cloud, id: &str) -> Option<Vec<u8>> {
    let (out,): (Option<Vec<u8>>,) =
        sqlx::query_as("SELECT console_output FROM instances WHERE id = $1").bind(id).fetch_one(cloud.db()).await.unwrap();
    out
}

/// Reboots the agent asked of `id`'s guest, among the events received so far.
fn reboot_events(agent: &mut AgentHandle, id: &str) -> usize {
    let mut n = 0;
    while let Ok(e) = agent.events.try_recv() {
        if matches!(e, AgentEvent::Rebooted { instance_id, .. } if instance_id == id) {
            n += 1;
        }
    }
    n
}

/// What the guest's metadata socket answers for `path`: (status, body).
async fn metadata(agent: &AgentHandle, id: &str, path: &str) -> (u16, String) {
    let (status, body) = nimbus_host_agent::metadata::request(&agent.metadata_socket(id), "GET", path, &[]).await.unwrap();
    (status, String::from_utf8(body).unwrap())
}

#[tokio::test]
async fn stop_start_and_reboot_on_the_test_driver() {
    let cloud = Cloud::start().await.unwrap();
    let mut agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let ids = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "max_count": 2})).await.unwrap());
    let (id, other) = (ids[0].clone(), ids[1].clone());
    cloud.wait_for_state(&ids, "running", T).await.unwrap();
    let used = cloud.vcpu_accounting().await.unwrap()[0].2;
    let dir = agent.state_dir.join("instances").join(&id);

    // Stop: the domain stays defined, shut off; the files stay; capacity stays held.
    request(&cloud, "stop", &id).await;
    cloud.wait_for_state(std::slice::from_ref(&id), "stopped", T).await.unwrap();
    assert_eq!(test_domain_state(&id).await, Some(false), "defined and shut off");
    assert!(dir.join("root.qcow2").exists() && dir.join("seed.iso").exists(), "the guest's files are kept");
    assert_eq!(test_domain_state(&other).await, Some(true), "the other guest is untouched");
    assert_eq!(cloud.vcpu_accounting().await.unwrap()[0].2, used, "a stopped instance keeps its capacity");

    // Full resyncs and an agent restart do not start it again.
    agent.passes(2).await.unwrap();
    assert_eq!(test_domain_state(&id).await, Some(false), "still shut off after resyncs");
    cloud.start_agent(&mut agent).await.unwrap();
    agent.passes(2).await.unwrap();
    assert_eq!(test_domain_state(&id).await, Some(false), "still shut off after a restart");
    assert_eq!(cloud.get(&format!("/v1/instances/{id}")).await.unwrap()["state"]["name"], "stopped");

    // A reboot that reaches the agent after the guest stopped is recorded,
    // not carried out.
    reboot_racing_a_stop(&cloud, &id).await;
    cloud.wait_until(T, || async { Ok(reboots(&cloud, &id).await == (1, 1)) }).await.expect("recorded while stopped");
    assert_eq!(test_domain_state(&id).await, Some(false));
    assert_eq!(reboot_events(&mut agent, &id), 0);

    // Start: the same domain runs again, its metadata server on its socket.
    request(&cloud, "start", &id).await;
    cloud.wait_for_state(std::slice::from_ref(&id), "running", T).await.unwrap();
    assert_eq!(test_domain_state(&id).await, Some(true));
    assert_eq!(metadata(&agent, &id, "/latest/meta-data/instance-id").await, (200, id.clone()));

    // Reboot: carried out once, counted, persisted.
    let before = reboots(&cloud, &id).await.0;
    reboot_events(&mut agent, &id);
    request(&cloud, "reboot", &id).await;
    cloud.wait_until(T, || async { Ok(reboots(&cloud, &id).await == (before + 1, before + 1)) }).await.expect("reboot reported");
    assert_eq!(reboot_events(&mut agent, &id), 1);
    assert_eq!(std::fs::read_to_string(dir.join("reboots")).unwrap().trim(), (before + 1).to_string());
    assert_eq!(test_domain_state(&id).await, Some(true));

    // Two requests while the agent is down: one reboot once it is back, and
    // a restart after that does not reboot again.
    agent.stop().await;
    request(&cloud, "reboot", &id).await;
    request(&cloud, "reboot", &id).await;
    cloud.start_agent(&mut agent).await.unwrap();
    cloud.wait_until(T, || async { Ok(reboots(&cloud, &id).await == (before + 3, before + 3)) }).await.expect("caught up");
    assert_eq!(reboot_events(&mut agent, &id), 1, "several requests collapse into one reboot");
    cloud.start_agent(&mut agent).await.unwrap();
    agent.passes(2).await.unwrap();
    assert_eq!(reboot_events(&mut agent, &id), 0, "a restarted agent does not reboot again");
    assert_eq!(reboots(&cloud, &id).await, (before + 3, before + 3));
    assert_eq!(std::fs::read_to_string(dir.join("reboots")).unwrap().trim(), (before + 3).to_string());
    assert_eq!(reboots(&cloud, &other).await, (0, 0));

    // Terminating a stopped instance removes it as usual.
    request(&cloud, "stop", &id).await;
    cloud.wait_for_state(std::slice::from_ref(&id), "stopped", T).await.unwrap();
    cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await.unwrap();
    cloud.wait_for_state(std::slice::from_ref(&id), "terminated", T).await.unwrap();
    assert_eq!(test_domain_state(&id).await, None);
    assert!(!dir.exists());
}

/// The test driver writes no console: a console log put where a QEMU guest's
/// would be is shipped, its last 64 KiB, and again only when it changes.
#[tokio::test]
async fn console_tails_reach_the_control_plane() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap()).remove(0);
    cloud.wait_for_state(std::slice::from_ref(&id), "running", T).await.unwrap();
    assert_eq!(console_output(&cloud, &id).await, None, "no console file, nothing sent");

    let log = agent.state_dir.join("instances").join(&id).join("console.log");
    std::fs::write(&log, "NIMBUS-READY\n").unwrap();
    cloud
        .wait_until(T, || async { Ok(console_output(&cloud, &id).await.as_deref() == Some(b"NIMBUS-READY\n".as_slice())) })
        .await
        .expect("console shipped");

    let mut big = b"NIMBUS-READY\n".to_vec();
    big.extend(vec![b'x'; 70 * 1024]);
    big.extend_from_slice(b"\nEND\n");
    std::fs::write(&log, &big).unwrap();
    let tail = big[big.len() - nimbus_proto::agent::CONSOLE_TAIL_BYTES..].to_vec();
    cloud
        .wait_until(T, || async { Ok(console_output(&cloud, &id).await.as_deref() == Some(tail.as_slice())) })
        .await
        .expect("the last 64 KiB shipped");
    // What the API answers (EC2's GetConsoleOutput): the same bytes, base64.
    let out = cloud.get(&format!("/v1/instances/{id}/console")).await.unwrap();
    {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD.decode(out["output"].as_str().unwrap()).unwrap();
        assert_eq!(raw, tail);
    }
    // Unchanged output is not sent again: the stored copy's time stays put.
    let at = |cloud: &Cloud| {
        let id = id.clone();
        let db = cloud.db().clone();
        async move {
            let (t,): (Option<String>,) =
                sqlx::query_as("SELECT console_updated_at::text FROM instances WHERE id = $1").bind(&id).fetch_one(&db).await.unwrap();
            t
        }
    };
    let first = at(&cloud).await;
    agent.passes(2).await.unwrap();
    assert_eq!(at(&cloud).await, first);
}

/// The key pair named at launch is served by the guest's metadata service,
/// as EC2's IMDS serves it; an instance launched without one has no
/// `public-keys/`.
#[tokio::test]
async fn the_metadata_service_serves_the_launch_key() {
    let cloud = Cloud::start().await.unwrap();
    let agent = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let kp = cloud.post("/v1/key-pairs/import", json!({"name": "my-key", "public_key": ed25519_public_key("me@example")})).await.unwrap();
    let with =
        instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "key_name": "my-key"})).await.unwrap()).remove(0);
    let without = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap()).remove(0);
    cloud.wait_for_state(&[with.clone(), without.clone()], "running", T).await.unwrap();
    let md = "/latest/meta-data";
    assert!(metadata(&agent, &with, &format!("{md}/")).await.1.lines().any(|l| l == "public-keys/"));
    assert_eq!(metadata(&agent, &with, &format!("{md}/public-keys/")).await, (200, "0=my-key".to_string()));
    assert_eq!(metadata(&agent, &with, &format!("{md}/public-keys/0/")).await, (200, "openssh-key".to_string()));
    let (status, key) = metadata(&agent, &with, &format!("{md}/public-keys/0/openssh-key")).await;
    assert_eq!(status, 200);
    assert_eq!(key.trim(), kp["public_key"].as_str().unwrap().trim());
    assert!(key.starts_with("ssh-ed25519 AAAA"), "{key}");
    assert!(!metadata(&agent, &without, &format!("{md}/")).await.1.contains("public-keys"));
    assert_eq!(metadata(&agent, &without, &format!("{md}/public-keys/")).await.0, 404);
}

fn virsh_domstate(name: &str) -> Option<String> {
    let out = std::process::Command::new("virsh").args(["-q", "-c", "qemu:///system", "domstate", name]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn count(text: &str, line: &str) -> usize {
    text.lines().filter(|l| *l == line).count()
}

/// Waits until the console holds `n` lines equal to `line`; returns the console.
async fn wait_for_lines(console: &std::path::Path, line: &str, n: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = read_console(console);
        if count(&text, line) >= n {
            return text;
        }
        assert!(Instant::now() < deadline, "no {n} x {line} within {timeout:?}; console:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real TCG guest. First a stop that the guest ignores (its first boot
/// drops its power-button handler): powered off after the stop timeout, once, although several
/// full passes of the agent ran while the stop was under way. Then ACPI stop
/// (the guest prints NIMBUS-POWEROFF), start (another boot), reboot
/// (another), and the console shipped to the control plane. Bounds are
/// scaled by NIMBUS_TEST_TIME_SCALE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guest_stops_starts_and_reboots() {
    let image_dir =
        PathBuf::from(std::env::var("NIMBUS_IMAGE_DIR").expect("NIMBUS_IMAGE_DIR must name the built tiny image: run scripts/test.sh"));
    let t0 = Instant::now();
    let cloud = Cloud::start().await.unwrap();
    let mut agent = cloud.add_agent_with("real-ops", "az1", 4, 4096, 50, HypervisorChoice::Auto).await.unwrap();
    // A stop of 10 s (the guest ignores every press, the agent's second one
    // 5 s in too) outlasts the 2 s a pass waits for it; full passes every
    // 300 ms then run while it is under way, several even on a loaded machine.
    cloud
        .restart_agent_with(&mut agent, |c| {
            c.stop_timeout_secs = 10;
            c.poll_ms = 300;
        })
        .await
        .unwrap();
    cloud.register_image_dir(&image_dir, true).await.unwrap();
    // On its first boot only, the guest drops its power-button handler, so
    // that the first stop is ignored whether its press comes before acpid
    // starts or after: how long the boot takes no longer decides the test.
    let first_boot_ignores_acpi =
        "#!/bin/sh\n[ \"$(wc -l </mnt/root/var/lib/nimbus/boots)\" -eq 1 ] && rm -f /etc/acpi/PWRF/00000080 && echo ignoring-acpi\n";
    let user_data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, first_boot_ignores_acpi);
    let launch = json!({"instance_type": "t3.nano", "user_data": user_data});
    let id = instance_ids(&cloud.post("/v1/instances", launch).await.unwrap()).remove(0);
    let name = domain::domain_name(&id);
    let one = std::slice::from_ref(&id);
    let console = agent.state_dir.join("instances").join(&id).join("console.log");
    let (running, ready_within) = (scaled(Duration::from_secs(120)), scaled(Duration::from_secs(180)));

    // A stop the guest ignores (its handler is gone): forced after 10 s.
    cloud.wait_for_state(one, "running", running).await.unwrap();
    wait_for_lines(&console, "ignoring-acpi", 1, ready_within).await;
    while agent.events.try_recv().is_ok() {}
    let t = Instant::now();
    request(&cloud, "stop", &id).await;
    cloud.wait_for_state(one, "stopped", running).await.unwrap();
    println!("stopped (forced) in {:.1} s", t.elapsed().as_secs_f64());
    agent.passes(2).await.unwrap();
    assert_eq!(virsh_domstate(&name).as_deref(), Some("shut off"));
    let (mut stops, mut passes_before_the_stop) = (Vec::new(), 0);
    while let Ok(e) = agent.events.try_recv() {
        match e {
            AgentEvent::Stopped { instance_id, forced, .. } => {
                assert_eq!(instance_id, id);
                stops.push(forced);
            }
            AgentEvent::PassCompleted { full: true, .. } if stops.is_empty() => passes_before_the_stop += 1,
            _ => {}
        }
    }
    assert_eq!(stops, vec![true], "one stop, forced (a guest that ignores ACPI is powered off once)");
    assert!(passes_before_the_stop >= 2, "full passes ran while the stop was under way: {passes_before_the_stop}");
    assert_eq!(count(&read_console(&console), "NIMBUS-POWEROFF"), 0);

    // Back to the default stop timeout and poll (and an agent restart on the way).
    cloud
        .restart_agent_with(&mut agent, |c| {
            c.stop_timeout_secs = 30;
            c.poll_ms = 2000;
        })
        .await
        .unwrap();
    // Counted before the start: the forced stop may have come before or
    // after the first boot printed its metadata line (it depends on speed).
    let meta = format!("NIMBUS-METADATA instance-id={id}");
    let before = read_console(&console);
    let (ready, metas) = (count(&before, "NIMBUS-READY"), count(&before, &meta));
    request(&cloud, "start", &id).await;
    cloud.wait_for_state(one, "running", running).await.unwrap();
    wait_for_lines(&console, "NIMBUS-READY", ready + 1, ready_within).await;
    println!("booted: {:.1} s", t0.elapsed().as_secs_f64());

    let t = Instant::now();
    request(&cloud, "stop", &id).await;
    cloud.wait_for_state(one, "stopped", running).await.unwrap();
    println!("stopped in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(virsh_domstate(&name).as_deref(), Some("shut off"), "defined and shut off");
    wait_for_lines(&console, "NIMBUS-POWEROFF", 1, scaled(Duration::from_secs(10))).await;

    let t = Instant::now();
    request(&cloud, "start", &id).await;
    cloud.wait_for_state(one, "running", running).await.unwrap();
    let text = wait_for_lines(&console, "NIMBUS-READY", ready + 2, ready_within).await;
    println!("started again in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(count(&text, &meta), metas + 2, "metadata served after each start:\n{text}");

    let t = Instant::now();
    request(&cloud, "reboot", &id).await;
    let text = wait_for_lines(&console, "NIMBUS-READY", ready + 3, ready_within).await;
    println!("rebooted in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(count(&text, &meta), metas + 3, "{text}");
    assert_eq!(count(&text, "NIMBUS-POWEROFF"), 2, "ACPI reboot goes through the guest's power-off");
    cloud.wait_until(running, || async { Ok(reboots(&cloud, &id).await == (1, 1)) }).await.expect("reboot reported");
    assert_eq!(cloud.get(&format!("/v1/instances/{id}")).await.unwrap()["state"]["name"], "running");
    cloud
        .wait_until(running, || async {
            let out = console_output(&cloud, &id).await.unwrap_or_default();
            Ok(count(&String::from_utf8_lossy(&out).replace('\r', ""), "NIMBUS-READY") == ready + 3)
        })
        .await
        .expect("the console reaches the control plane");

    cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await.unwrap();
    cloud.wait_for_state(one, "terminated", running).await.unwrap();
    assert_eq!(virsh_domstate(&name), None, "the domain is gone");
    println!("whole flow: {:.1} s", t0.elapsed().as_secs_f64());
}

/// CreateImage of a running real guest shuts it down cleanly, copies its
/// disk and starts it again — unless a StopInstances came meanwhile: then
/// the guest stays stopped (the agent asks what is wanted once the copy is
/// made, not what was wanted when the task began), and is reported stopped
/// at once. The guest's power button takes 8 s (user-data wraps its
/// handler), so the stop arrives while the image is being made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_create_image_leaves_the_guest_stopped() {
    let image_dir =
        PathBuf::from(std::env::var("NIMBUS_IMAGE_DIR").expect("NIMBUS_IMAGE_DIR must name the built tiny image: run scripts/test.sh"));
    let cloud = Cloud::start().await.unwrap();
    let mut agent = cloud.add_agent_with("real-image", "az1", 4, 4096, 50, HypervisorChoice::Auto).await.unwrap();
    cloud.register_image_dir(&image_dir, true).await.unwrap();
    let slow_button = "#!/bin/sh\nmv /etc/acpi/PWRF/00000080 /run/power-button\n\
        printf '#!/bin/sh\\nsleep 8\\nexec /run/power-button\\n' >/etc/acpi/PWRF/00000080\n\
        chmod 755 /etc/acpi/PWRF/00000080\necho slow-power-button\n";
    let user_data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, slow_button);
    let id =
        instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "user_data": user_data})).await.unwrap()).remove(0);
    let (name, one) = (domain::domain_name(&id), std::slice::from_ref(&id));
    let console = agent.state_dir.join("instances").join(&id).join("console.log");
    let (within, ready_within) = (scaled(Duration::from_secs(120)), scaled(Duration::from_secs(180)));
    cloud.wait_for_state(one, "running", within).await.unwrap();
    wait_for_lines(&console, "slow-power-button", 1, ready_within).await;

    while agent.events.try_recv().is_ok() {}
    let made = cloud.post(&format!("/v1/instances/{id}/image"), json!({"name": "made-during-a-stop"})).await.unwrap();
    let ami = made["image_id"].as_str().expect("an image id").to_string();
    nimbus_tests::await_event(&mut agent.events, within, |e| {
        matches!(e, AgentEvent::Imaging { instance_id, .. } if *instance_id == id).then_some(())
    })
    .await
    .unwrap();
    request(&cloud, "stop", &id).await;
    cloud
        .wait_until(within, || async {
            let image = cloud.get(&format!("/v1/images/{ami}")).await?;
            anyhow::ensure!(image["state"] != "failed", "image failed: {image}");
            Ok(image["state"] == "available")
        })
        .await
        .unwrap();
    cloud.wait_for_state(one, "stopped", within).await.unwrap();
    agent.passes(2).await.unwrap();
    assert_eq!(virsh_domstate(&name).as_deref(), Some("shut off"), "still stopped after two more passes");
    let (mut stops, mut starts) = (0, 0);
    while let Ok(e) = agent.events.try_recv() {
        match e {
            AgentEvent::Stopped { instance_id, .. } if instance_id == id => stops += 1,
            AgentEvent::Started { instance_id, .. } if instance_id == id => starts += 1,
            _ => {}
        }
    }
    assert_eq!((stops, starts), (1, 0), "shut down once for the image, never started again");
    assert_eq!(count(&read_console(&console), "NIMBUS-POWEROFF"), 1, "a clean shutdown");

    cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await.unwrap();
    cloud.wait_for_state(one, "terminated", within).await.unwrap();
    assert_eq!(virsh_domstate(&name), None, "the domain is gone");
}
