//! The host side of the control plane, driven through `/v1/agent/*` the way
//! an agent drives it: registration, reports (each host's touch only its
//! own instances), and what the operator then sees in `GET /v1/hosts`; and
//! agents sharing one libvirt, each touching only its own domains.

use nimbus_host_agent::reconcile::AgentEvent;
use nimbus_tests::{define_test_domain, instance_ids, test_domain_state, Cloud};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Registers a host named `name` in zone az1 with the join token; returns its bearer credential and id.
async fn register(cloud: &Cloud, name: &str) -> (String, String) {
    register_in(cloud, name, "az1").await
}

async fn register_in(cloud: &Cloud, name: &str, zone: &str) -> (String, String) {
    let reg = json!({"name": name, "availability_zone": zone, "hypervisor": "test", "vcpus": 4, "memory_mib": 4096, "disk_gib": 40});
    let (status, cred) = cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/register", Some(reg)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{cred}");
    let id = cred["host_id"].as_str().unwrap().to_string();
    (format!("{id}.{}", cred["secret"].as_str().unwrap()), id)
}

async fn report(cloud: &Cloud, bearer: &str, body: Value) -> (StatusCode, Value) {
    cloud.call_as(Some(bearer), Method::POST, "/v1/agent/report", Some(body)).await.unwrap()
}

async fn host(cloud: &Cloud, id: &str) -> Value {
    let hosts = cloud.get("/v1/hosts").await.unwrap();
    hosts["hosts"].as_array().unwrap().iter().find(|h| h["host_id"] == id).cloned().unwrap()
}

/// An agent's problems (a slow guest start and its likely cause) show in the
/// host listing until a report without them; bad problem lists are refused
/// and change nothing.
#[tokio::test]
async fn hosts_show_the_problems_their_agents_report() {
    let cloud = Cloud::start().await.unwrap();
    let (bearer, id) = register(&cloud, "sick").await;
    let h = host(&cloud, &id).await;
    assert_eq!((h["health"].as_str(), h["problems"].as_array().map(Vec::len)), (Some("ok"), Some(0)));

    let problem = "starting a guest took 52.0 s (a healthy host takes under 10 s); likely cause: /dev/kvm is not root:kvm 0660";
    let (status, body) = report(&cloud, &bearer, json!({"observations": [], "problems": [problem]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let h = host(&cloud, &id).await;
    assert_eq!(h["health"], "degraded");
    assert_eq!(h["problems"], json!([problem]));

    for bad in [json!(vec!["x"; 9]), json!(["x".repeat(1025)]), json!(["nul \u{0} inside"])] {
        let (status, body) = report(&cloud, &bearer, json!({"observations": [], "problems": bad})).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("InvalidParameterValue")), "{body}");
    }
    assert_eq!(host(&cloud, &id).await["problems"], json!([problem]), "a refused report changes nothing");

    let (status, _) = report(&cloud, &bearer, json!({"observations": []})).await;
    assert_eq!(status, StatusCode::OK);
    let h = host(&cloud, &id).await;
    assert_eq!((h["health"].as_str(), h["problems"].clone()), (Some("ok"), json!([])), "healed");
}

/// (state, capacity held, console, reboots done) of an instance, and its host's used vCPUs.
async fn instance_row(cloud: &Cloud, id: &str) -> (String, bool, Option<Vec<u8>>, i64, i32) {
    sqlx::query_as(
        "SELECT i.state, i.capacity_held, i.console_output, i.reboots_done, h.used_vcpus \
         FROM instances i JOIN hosts h ON h.id = i.host_id WHERE i.id = $1",
    )
    .bind(id)
    .fetch_one(cloud.db())
    .await
    .unwrap()
}

fn observation(id: &str, state: &str) -> Value {
    json!({"instance_id": id, "state": state})
}

/// A host's report speaks only for its own instances: host B's running,
/// failed, console, reboots or absent for host A's instance change nothing;
/// and A's own `absent` releases capacity only once the instance is to be
/// terminated (an absent guest that should run is restarted, not freed).
#[tokio::test]
async fn a_report_touches_only_the_reporting_hosts_instances() {
    let cloud = Cloud::start().await.unwrap();
    let (a, a_id) = register_in(&cloud, "host-a", "az1").await;
    let (b, _) = register_in(&cloud, "host-b", "az2").await;
    cloud.register_test_image().await.unwrap();
    let r = cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "availability_zone": "az1"})).await.unwrap();
    let id = instance_ids(&r).remove(0);
    assert_eq!(cloud.host_of(&id).await.unwrap(), a_id);
    let ok = |(status, body): (StatusCode, Value)| assert_eq!(status, StatusCode::OK, "{body}");

    // B speaks for A's pending instance: nothing changes.
    let before = cloud.everything().await.unwrap();
    use base64::Engine;
    let console = base64::engine::general_purpose::STANDARD.encode("not yours");
    for obs in [
        observation(&id, "running"),
        observation(&id, "failed"),
        observation(&id, "absent"),
        json!({"instance_id": id, "state": "running", "console": console, "reboots": 5}),
    ] {
        ok(report(&cloud, &b, json!({"observations": [obs]})).await);
        assert_eq!(cloud.everything().await.unwrap(), before, "B's {obs} changed nothing");
        assert_eq!(instance_row(&cloud, &id).await, ("pending".into(), true, None, 0, 2));
    }
    // A says its guest is absent while it should run (pending, then running)
    // or be kept (stopping, stopped): the capacity stays held, the state too.
    let absent = |expected: &'static str| {
        let (cloud, a, id) = (&cloud, a.clone(), id.clone());
        async move {
            let (status, body) = report(cloud, &a, json!({"observations": [observation(&id, "absent")]})).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(instance_row(cloud, &id).await, (expected.into(), true, None, 0, 2), "absent while {expected}");
        }
    };
    absent("pending").await;
    ok(report(&cloud, &a, json!({"observations": [observation(&id, "running")]})).await);
    assert_eq!(instance_row(&cloud, &id).await, ("running".into(), true, None, 0, 2));
    absent("running").await;
    cloud.post("/v1/instances/stop", json!({"instance_ids": [id]})).await.unwrap();
    absent("stopping").await;
    ok(report(&cloud, &a, json!({"observations": [observation(&id, "stopped")]})).await);
    absent("stopped").await;

    // Terminated: B's absent releases nothing; A's does.
    cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await.unwrap();
    let before = cloud.everything().await.unwrap();
    ok(report(&cloud, &b, json!({"observations": [observation(&id, "absent")]})).await);
    assert_eq!(cloud.everything().await.unwrap(), before, "B's absent changed nothing");
    assert_eq!(instance_row(&cloud, &id).await, ("shutting-down".into(), true, None, 0, 2));
    ok(report(&cloud, &a, json!({"observations": [observation(&id, "absent")]})).await);
    assert_eq!(instance_row(&cloud, &id).await, ("terminated".into(), false, None, 0, 0));
}

/// Agents that share one libvirt (the test driver is shared by every agent
/// of this process) touch only the domains their host owns: full passes of
/// agent A leave B's running guest, and a domain of a host that no agent
/// here runs, alone, even when A's state directory holds stale files named
/// for them (A removes its own files, not the domains).
#[tokio::test]
async fn an_agent_never_touches_another_hosts_domains() {
    let cloud = Cloud::start().await.unwrap();
    let mut a = cloud.add_agent("a", "az1", 8, 8192, 100).await.unwrap();
    let b = cloud.add_agent("b", "az2", 8, 8192, 100).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let on_a = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "availability_zone": "az1"})).await.unwrap());
    let on_b = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "availability_zone": "az2"})).await.unwrap());
    cloud.wait_for_state(&[on_a[0].clone(), on_b[0].clone()], "running", T).await.unwrap();
    let foreign = "i-00000000000000bee";
    define_test_domain("h-00000000000000bee", foreign, &cloud.dir.path().join("foreign")).await.unwrap();
    let stale = a.state_dir.join("instances");
    for id in [on_b[0].as_str(), foreign] {
        std::fs::create_dir_all(stale.join(id)).unwrap();
    }

    while a.events.try_recv().is_ok() {}
    a.passes(2).await.unwrap();
    b.passes(1).await.unwrap();
    assert_eq!(test_domain_state(&on_b[0]).await, Some(true), "B's guest runs");
    assert_eq!(test_domain_state(foreign).await, Some(false), "the foreign domain is still defined");
    assert_eq!(test_domain_state(&on_a[0]).await, Some(true));
    assert!(!stale.join(&on_b[0]).exists() && !stale.join(foreign).exists(), "A removed its own stale files");
    while let Ok(e) = a.events.try_recv() {
        if let AgentEvent::Started { instance_id, .. }
        | AgentEvent::Stopped { instance_id, .. }
        | AgentEvent::Rebooted { instance_id, .. } = &e
        {
            panic!("A acted on {instance_id}: {e:?}");
        }
    }
    cloud.wait_for_state(&on_b, "running", T).await.unwrap();
    // A restarted agent's first pass, too.
    cloud.start_agent(&mut a).await.unwrap();
    a.passes(2).await.unwrap();
    assert_eq!(test_domain_state(&on_b[0]).await, Some(true));
    assert_eq!(test_domain_state(foreign).await, Some(false));
}
