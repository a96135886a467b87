//! Instance metadata in the state store (issue 11): the control plane's CA
//! certifies each host's key at registration, the hosts' embedded store
//! nodes and the control plane's form one ring by gossip over mutual TLS,
//! and nothing without a certificate of that CA gets in.

use nimbus_control_plane::service::outbox::Published;
use nimbus_host_agent::HypervisorChoice;
use nimbus_proto::metadata::{document_key, InstanceDocument};
use nimbus_state_store::tls::dev::DevCa;
use nimbus_state_store::{KvClient, TcpClient};
use nimbus_tests::{ed25519_public_key, free_local_addr, instance_ids, xml_values, AgentHandle, Cloud, CloudOptions};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// A test-driver agent running a store node on a free loopback port.
async fn store_agent(cloud: &Cloud, name: &str) -> AgentHandle {
    let addr = free_local_addr().expect("port");
    cloud.add_agent_configured(name, "az1", (4, 4096, 40), HypervisorChoice::Test, |c| c.store_listen = Some(addr)).await.expect("agent")
}

/// Waits until the control plane's node sees `n` live members.
async fn ring_of(cloud: &Cloud, n: usize) {
    let node = cloud.service.store.node.clone();
    cloud
        .wait_until(T, || {
            let node = node.clone();
            async move { Ok(node.membership().view().iter().filter(|m| m.alive).count() >= n) }
        })
        .await
        .expect("ring formed");
}

/// A cloud with the test image and a store ring of three: the control
/// plane's node and those of two test-driver agents.
/// Returns the image's id too.
async fn ring_cloud(opts: CloudOptions) -> (Cloud, String, AgentHandle, AgentHandle) {
    let cloud = Cloud::start_with(opts).await.unwrap();
    let img = cloud.register_test_image().await.unwrap().image_id;
    let a = store_agent(&cloud, "a").await;
    let b = store_agent(&cloud, "b").await;
    ring_of(&cloud, 3).await;
    (cloud, img, a, b)
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_join_one_ring_over_tls_and_strangers_are_refused() {
    let cloud = Cloud::start().await.unwrap();
    let a = store_agent(&cloud, "a").await;
    let b = store_agent(&cloud, "b").await;
    ring_of(&cloud, 3).await;
    // Every host's node holds a certificate of the CA naming its address:
    // the control plane's identity reaches it, writes and reads back.
    let (addr_a, addr_b) = (a.store_address().unwrap().to_string(), b.store_address().unwrap().to_string());
    let trusted = TcpClient::with_tls(&addr_a, T, cloud.service.store.tls.clone());
    trusted.put(b"probe/1", b"one".to_vec(), &Default::default()).await.expect("a certified client writes");
    let via_b = TcpClient::with_tls(&addr_b, T, cloud.service.store.tls.clone());
    assert_eq!(via_b.get(b"probe/1").await.expect("read").values, vec![b"one".to_vec()], "one ring: b reads what a took");
    // A client with a certificate of another CA, or none, is refused.
    let stranger = DevCa::new("stranger").unwrap().tls_config(&["127.0.0.1"]).unwrap();
    let foreign = TcpClient::with_tls(&addr_a, Duration::from_secs(5), stranger.clone());
    assert!(foreign.get(b"probe/1").await.is_err(), "a certificate of another CA is refused");
    let plain = TcpClient::new(&addr_a, Duration::from_secs(5));
    assert!(plain.get(b"probe/1").await.is_err(), "a plaintext client is refused");
    // A node with a foreign certificate that seeds itself with the ring
    // never becomes a member of it.
    let dir = tempfile::tempdir().unwrap();
    let rogue_addr = free_local_addr().unwrap().to_string();
    let mut cfg = nimbus_state_store::Config::new(rogue_addr.clone(), dir.path());
    cfg.seeds = vec![cloud.service.store.address.clone(), addr_a.clone()];
    let rogue = nimbus_state_store::Node::start(cfg, std::sync::Arc::new(nimbus_state_store::TcpTransport::with_tls(stranger.clone())))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind(&rogue_addr).await.unwrap();
    let server = nimbus_state_store::tcp::serve_tls(rogue.clone(), listener, stranger);
    let _ = rogue.join().await;
    for _ in 0..3 {
        rogue.gossip_round().await;
        cloud.service.store.node.gossip_round().await;
    }
    let members: Vec<String> = cloud.service.store.node.membership().view().into_iter().map(|m| m.id).collect();
    assert!(!members.contains(&rogue_addr), "the rogue node is not a member: {members:?}");
    assert!(members.contains(&addr_a) && members.contains(&addr_b));
    rogue.shutdown();
    server.abort();
}

/// `POST /v1/agent/certificate` needs the host's credential and a P-256 key.
#[tokio::test]
async fn certificates_need_the_host_credential_and_a_good_key() {
    let cloud = Cloud::start().await.unwrap();
    let reg = json!({"name": "h1", "availability_zone": "az1", "hypervisor": "test", "vcpus": 4, "memory_mib": 4096, "disk_gib": 40});
    let (status, cred) = cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/register", Some(reg)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let bearer = format!("{}.{}", cred["host_id"].as_str().unwrap(), cred["secret"].as_str().unwrap());
    let key = rcgen::KeyPair::generate().unwrap();
    use base64::Engine;
    let public_key = base64::engine::general_purpose::STANDARD.encode(key.public_key_raw());
    let body = json!({"public_key": public_key, "store_address": "127.1.2.3:7999"});
    let (status, _) = cloud.call_as(None, Method::POST, "/v1/agent/certificate", Some(body.clone())).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) =
        cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/certificate", Some(body.clone())).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the join token is not a host credential");
    let (status, err) =
        cloud.call_as(Some(&bearer), Method::POST, "/v1/agent/certificate", Some(json!({"public_key": "AAAA"}))).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (status, err) = cloud
        .call_as(Some(&bearer), Method::POST, "/v1/agent/certificate", Some(json!({"public_key": public_key, "store_address": "x:1"})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (status, grant) = cloud.call_as(Some(&bearer), Method::POST, "/v1/agent/certificate", Some(body)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{grant}");
    assert_eq!(grant["store_seeds"][0], cloud.service.store.address.as_str());
    let tls = nimbus_state_store::TlsConfig::from_pem(
        grant["ca_pem"].as_str().unwrap().as_bytes(),
        grant["certificate_pem"].as_str().unwrap().as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .expect("the certificate matches the key and chains to the CA");
    tls.check_node("127.1.2.3:7999").expect("names the store address");
    // Another host cannot claim that address, nor the control plane's: a
    // certificate names the IP, not the port (issue 18, finding 4: asking
    // for the victim's IP with another port got a certificate for it).
    let reg = json!({"name": "h2", "availability_zone": "az1", "hypervisor": "test", "vcpus": 4, "memory_mib": 4096, "disk_gib": 40});
    let (_, cred2) = cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/register", Some(reg)).await.unwrap();
    let bearer2 = format!("{}.{}", cred2["host_id"].as_str().unwrap(), cred2["secret"].as_str().unwrap());
    let cp_ip = cloud.service.store.address.rsplit_once(':').unwrap().0.to_string();
    for taken in ["127.1.2.3:7999".to_string(), "127.1.2.3:7998".to_string(), cloud.service.store.address.clone(), format!("{cp_ip}:1")] {
        let body = json!({"public_key": public_key, "store_address": taken});
        let (status, err) = cloud.call_as(Some(&bearer2), Method::POST, "/v1/agent/certificate", Some(body)).await.unwrap();
        assert_eq!(status, StatusCode::CONFLICT, "{err}");
    }
}

/// The document of `id` as the store has it, opened with its host's key
/// (see [`Cloud::stored_document`]).
async fn stored(cloud: &Cloud, id: &str) -> (Option<InstanceDocument>, usize) {
    cloud.stored_document(id).await.expect("store read")
}

/// The outbox: each change commits with its outbox row; the relay's steps
/// cut short (a crash) lose nothing and apply nothing twice; replayed,
/// duplicated and reordered deliveries leave the newest version; a store
/// that is down keeps the backlog, which drains once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn the_outbox_survives_relay_crashes_replays_and_a_store_outage() {
    let (cloud, _, mut a, mut b) = ring_cloud(CloudOptions { outbox_relay: false, ..Default::default() }).await;
    let r = cloud
        .post("/v1/instances", json!({"instance_type": "t3.nano", "user_data": "aGVsbG8=", "tags": [{"key": "Name", "value": "one"}]}))
        .await
        .unwrap();
    let id = instance_ids(&r)[0].clone();
    // Running first: the agent's report is a change of its own.
    cloud.wait_for_state(std::slice::from_ref(&id), "running", T).await.unwrap();
    let relay = cloud.service.relay();
    let backlog = relay.backlog().await.unwrap();
    assert!(backlog >= 1, "the launch committed its outbox rows");
    assert_eq!(stored(&cloud, &id).await.0, None, "nothing is published before the relay runs");

    // Crash after the write, before the acknowledgement.
    let pending = relay.pending().await.unwrap();
    assert_eq!(pending.len(), 1);
    let r1 = relay.render(&id).await.unwrap().expect("rendered");
    let v1 = r1.doc.clone();
    assert_eq!(v1.tags, vec![("Name".to_string(), "one".to_string())]);
    assert_eq!(v1.user_data.as_deref(), Some("aGVsbG8="));
    assert_eq!(relay.publish(&r1).await.unwrap(), Published::Written);
    assert_eq!(relay.backlog().await.unwrap(), backlog, "rows stay until acknowledged");
    // A new relay (the restarted control plane) finds it published: only acknowledges.
    let relay = cloud.service.relay();
    assert_eq!(relay.pass().await.unwrap(), 1);
    assert_eq!(relay.backlog().await.unwrap(), 0);
    assert_eq!(stored(&cloud, &id).await, (Some(v1.clone()), 1));

    // A change: a newer version. Crash after rendering, before writing.
    cloud.post("/v1/tags", json!({"resource_ids": [id], "tags": [{"key": "Name", "value": "two"}]})).await.unwrap();
    let r2 = relay.render(&id).await.unwrap().expect("rendered");
    let v2 = r2.doc.clone();
    assert!(v2.version > v1.version, "{} > {}", v2.version, v1.version);
    assert_eq!(v2.tags, vec![("Name".to_string(), "two".to_string())]);
    // Reordered and duplicated deliveries: the newest stays.
    assert_eq!(relay.publish(&r2).await.unwrap(), Published::Written);
    assert_eq!(relay.publish(&r1).await.unwrap(), Published::AlreadyCurrent, "an older replay is ignored");
    assert_eq!(relay.publish(&r2).await.unwrap(), Published::AlreadyCurrent, "a duplicate is ignored");
    assert_eq!(stored(&cloud, &id).await, (Some(v2.clone()), 1));
    // Concurrent writers (blind writes) leave siblings: readers resolve them
    // by version, and the next publish writes the newest over all of them.
    let client = cloud.service.store.client();
    let key = document_key(&id);
    let sealed_v1 =
        nimbus_records::SealedDocument::seal(&v1, &r1.host_id, r1.recipient.as_deref().unwrap(), &cloud.service.store.doc_key).unwrap();
    client.put(key.as_bytes(), sealed_v1.encode(), &Default::default()).await.unwrap();
    let (newest, siblings) = stored(&cloud, &id).await;
    assert_eq!((newest.map(|d| d.version), siblings), (Some(v2.version), 2));
    assert_eq!(relay.publish(&r1).await.unwrap(), Published::Written);
    assert_eq!(stored(&cloud, &id).await, (Some(v2.clone()), 1), "resolved to the newest");
    assert_eq!(relay.pass().await.unwrap(), 1);
    assert_eq!(relay.backlog().await.unwrap(), 0);

    // The store goes down (both hosts' nodes: no write quorum): changes
    // wait in the outbox, in order.
    a.stop().await;
    b.stop().await;
    cloud.post("/v1/instances/stop", json!({"instance_ids": [id]})).await.unwrap();
    cloud.post("/v1/tags", json!({"resource_ids": [id], "tags": [{"key": "Name", "value": "three"}]})).await.unwrap();
    assert!(relay.pass().await.is_err(), "no quorum");
    assert!(relay.pass().await.is_err(), "still none");
    assert!(relay.backlog().await.unwrap() >= 2);
    let local = cloud.service.store.node.storage().get(document_key(&id).as_bytes()).unwrap().map(|r| r.values()).unwrap_or_default();
    let trusted = cloud.service.store.trusted_keys();
    assert_eq!(
        nimbus_records::newest_sealed(&local, &trusted, &id).map(|d| d.version),
        Some(v2.version),
        "the control plane's replica holds v2 still"
    );
    // Back: the backlog drains, and the store shows the last change.
    cloud.start_agent(&mut a).await.unwrap();
    cloud.start_agent(&mut b).await.unwrap();
    ring_of(&cloud, 3).await;
    cloud
        .wait_until(T, || {
            let relay = relay.clone();
            async move { Ok(relay.pass().await.is_ok() && relay.backlog().await? == 0) }
        })
        .await
        .unwrap();
    let v3 = stored(&cloud, &id).await.0.expect("published");
    assert!(v3.version > v2.version);
    assert_eq!(v3.tags, vec![("Name".to_string(), "three".to_string())]);
    assert_eq!(v3.state, "stopping");
}

/// With the relay running, a change reaches the store on its own, promptly.
#[tokio::test(flavor = "multi_thread")]
async fn the_relay_publishes_changes_on_its_own() {
    let (cloud, _, _a, _b) = ring_cloud(CloudOptions::default()).await;
    let id =
        instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "user_data": "aGVsbG8="})).await.unwrap())[0].clone();
    cloud
        .wait_until(T, || async { Ok(stored(&cloud, &id).await.0.is_some_and(|d| d.state == "running")) })
        .await
        .expect("the running document is published");
    assert_eq!(stored(&cloud, &id).await.0.and_then(|d| d.user_data).as_deref(), Some("aGVsbG8="));
    cloud.post("/v1/tags", json!({"resource_ids": [id], "tags": [{"key": "k", "value": "v"}]})).await.unwrap();
    cloud
        .wait_until(T, || async { Ok(stored(&cloud, &id).await.0.is_some_and(|d| d.tags == vec![("k".into(), "v".into())])) })
        .await
        .expect("the tag is published");
    // A stopped instance's new type is in its identity document.
    cloud.post("/v1/instances/stop", json!({"instance_ids": [id]})).await.unwrap();
    cloud.wait_for_state(std::slice::from_ref(&id), "stopped", T).await.unwrap();
    cloud.post(&format!("/v1/instances/{id}/attributes"), json!({"instance_type": "t3.micro"})).await.unwrap();
    cloud
        .wait_until(T, || async { Ok(stored(&cloud, &id).await.0.is_some_and(|d| d.instance_type == "t3.micro")) })
        .await
        .expect("the new instance type is published");
    // Terminated: the document says so and keeps no user-data.
    cloud.post("/v1/instances/terminate", json!({"instance_ids": [id]})).await.unwrap();
    cloud
        .wait_until(T, || async { Ok(stored(&cloud, &id).await.0.is_some_and(|d| d.state == "terminated")) })
        .await
        .expect("the terminated document is published");
    let doc = stored(&cloud, &id).await.0.unwrap();
    assert_eq!((doc.user_data, doc.public_keys.len()), (None, 0), "a terminated instance's document keeps no secrets");
    assert_eq!(cloud.service.relay().backlog().await.unwrap(), 0);
}

/// One GET of a guest's metadata, as the guest makes it.
async fn imds(agent: &AgentHandle, id: &str, path: &str) -> (u16, String) {
    match nimbus_host_agent::metadata::request(&agent.metadata_socket(id), "GET", path, &[]).await {
        Ok((status, body)) => (status, String::from_utf8_lossy(&body).into_owned()),
        Err(e) => (0, e.to_string()),
    }
}

/// Waits until the guest's `path` answers `want`.
async fn await_imds(cloud: &Cloud, agent: &AgentHandle, id: &str, path: &str, want: &str) {
    let last = std::sync::Mutex::new(String::new());
    let found = cloud
        .wait_until(T, || async {
            let (status, body) = imds(agent, id, path).await;
            *last.lock().unwrap() = format!("{status} {body}");
            Ok(status == 200 && body == want)
        })
        .await;
    assert!(found.is_ok(), "{id} {path}: wanted {want:?}, last answer {:?}", last.lock().unwrap());
}

/// The metadata service answers from the host's replica of the store: the
/// full identity document (region, pending time: what only the store's
/// document has), each guest its own; changes reach guests in bounded
/// time; with the control plane and its database down, and then one more
/// store node down, guests still read identity, user-data and keys (also
/// after their agent restarted, from the store alone); after
/// recovery, changes made before and after arrive, and a node that was
/// down catches up.
#[tokio::test(flavor = "multi_thread")]
async fn metadata_is_served_from_the_store_through_an_outage() {
    let mut cloud = Cloud::start().await.unwrap();
    cloud.register_test_image().await.unwrap();
    let key = ed25519_public_key("me@example");
    cloud.post("/v1/key-pairs/import", json!({"name": "k", "public_key": key})).await.unwrap();
    let mut a = store_agent(&cloud, "a").await;
    let mut b = store_agent(&cloud, "b").await;
    ring_of(&cloud, 3).await;
    // Spread: one instance on each host.
    let r = cloud
        .post(
            "/v1/instances",
            json!({"instance_type": "t3.nano", "min_count": 2, "max_count": 2, "key_name": "k", "user_data": "aGVsbG8="}),
        )
        .await
        .unwrap();
    let ids = instance_ids(&r);
    cloud.wait_for_state(&ids, "running", T).await.unwrap();
    let mut on = std::collections::HashMap::new();
    for id in &ids {
        let host = cloud.host_of(id).await.unwrap();
        on.insert(id.clone(), if a.host_id.as_deref() == Some(&host) { "a" } else { "b" });
    }
    let agent_of = |id: &str| if on[id] == "a" { &a } else { &b };
    let (ia, ib) = (ids.iter().find(|i| on[*i] == "a").unwrap().clone(), ids.iter().find(|i| on[*i] == "b").unwrap().clone());
    for id in &ids {
        // The store's document reached the guest: the identity has its region.
        let agent = agent_of(id);
        cloud
            .wait_until(T, || async {
                let (status, body) = imds(agent, id, "/latest/dynamic/instance-identity/document").await;
                let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                Ok(status == 200 && doc["region"] == "nimbus-1" && doc["instanceId"] == id.as_str() && doc["pendingTime"].is_string())
            })
            .await
            .expect("the store's identity document is served");
        assert_eq!(imds(agent, id, "/latest/meta-data/instance-id").await, (200, id.clone()), "each guest sees itself only");
    }
    // Tags in metadata (ModifyInstanceMetadataOptions, REST form).
    for id in &ids {
        let r = cloud.post(&format!("/v1/instances/{id}/metadata-options"), json!({"instance_metadata_tags": "enabled"})).await.unwrap();
        assert_eq!(r["instance_metadata_options"]["instance_metadata_tags"], "enabled");
    }
    cloud.post("/v1/tags", json!({"resource_ids": ids, "tags": [{"key": "phase", "value": "before"}]})).await.unwrap();
    for id in &ids {
        await_imds(&cloud, agent_of(id), id, "/latest/meta-data/tags/instance/phase", "before").await;
    }

    // The control plane and PostgreSQL go down: every guest still reads
    // its identity, user-data and keys.
    cloud.outage().await.unwrap();
    assert!(cloud.get("/v1/instances").await.is_err(), "the API is down");
    for id in &ids {
        let agent = agent_of(id);
        assert_eq!(imds(agent, id, "/latest/meta-data/instance-id").await, (200, id.clone()));
        assert_eq!(imds(agent, id, "/latest/user-data").await, (200, "hello".to_string()));
        assert_eq!(imds(agent, id, "/latest/meta-data/public-keys/0/openssh-key").await, (200, key.clone()));
        assert_eq!(imds(agent, id, "/latest/meta-data/tags/instance/phase").await, (200, "before".to_string()));
    }
    // One more store node down (host b's agent, and its node with it):
    // host a's guest is still served, from a's replica.
    b.stop().await;
    assert_eq!(imds(&a, &ia, "/latest/meta-data/instance-id").await, (200, ia.clone()));
    assert_eq!(imds(&a, &ia, "/latest/meta-data/public-keys/0/openssh-key").await, (200, key.clone()));
    // Host a's agent restarts meanwhile: no assignment can be had, and its
    // guest is served from a's replica of the store.
    a.stop().await;
    assert_eq!(imds(&a, &ia, "/latest/meta-data/instance-id").await.0, 0, "the agent is down");
    cloud.start_agent(&mut a).await.unwrap();
    await_imds(&cloud, &a, &ia, "/latest/meta-data/instance-id", &ia).await;
    assert_eq!(imds(&a, &ia, "/latest/user-data").await, (200, "hello".to_string()));
    assert_eq!(imds(&a, &ia, "/latest/meta-data/public-keys/0/openssh-key").await, (200, key.clone()));
    assert_eq!(imds(&a, &ia, "/latest/meta-data/tags/instance/phase").await, (200, "before".to_string()));

    // Recovery: the control plane is back; a change made while b is still
    // down reaches a's guest; b comes back and catches up with it.
    cloud.recover().await.unwrap();
    cloud.post("/v1/tags", json!({"resource_ids": ids, "tags": [{"key": "phase", "value": "after"}]})).await.unwrap();
    await_imds(&cloud, &a, &ia, "/latest/meta-data/tags/instance/phase", "after").await;
    cloud.start_agent(&mut b).await.unwrap();
    await_imds(&cloud, &b, &ib, "/latest/meta-data/tags/instance/phase", "after").await;
    assert_eq!(imds(&b, &ib, "/latest/meta-data/instance-id").await, (200, ib.clone()));
    assert_eq!(cloud.service.relay().backlog().await.unwrap(), 0);
}

/// A cloud with the test image, two hosts running store nodes (a ring of
/// three with the control plane's), and an EC2 account.
async fn ec2_ring() -> (Cloud, String, AgentHandle, AgentHandle, nimbus_tests::Ec2Keys) {
    let (cloud, img, a, b) = ring_cloud(CloudOptions::default()).await;
    let alice = cloud.ec2_account("alice").await.unwrap();
    (cloud, img, a, b, alice)
}

/// Waits until DescribeInstances (EC2 front door) shows `id` running.
async fn ec2_running(cloud: &Cloud, keys: &nimbus_tests::Ec2Keys, id: &str) {
    cloud
        .wait_until(T, || async {
            let (_, xml) = cloud.ec2(keys, &format!("Action=DescribeInstances&InstanceId.1={id}")).await?;
            Ok(xml.contains("<name>running</name>"))
        })
        .await
        .unwrap();
}

/// Console tails and status checks go from the host to the store, and
/// GetConsoleOutput and DescribeInstanceStatus read them there.
#[tokio::test(flavor = "multi_thread")]
async fn console_output_and_status_checks_come_from_the_store() {
    use nimbus_proto::metadata::{console_key, status_key, Check, StatusRecord};
    let (cloud, img, a, b, alice) = ec2_ring().await;
    let (status, xml) =
        cloud.ec2(&alice, &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1")).await.unwrap();
    assert_eq!(status, 200, "{xml}");
    let id = xml_values(&xml, "instanceId")[0].to_string();
    ec2_running(&cloud, &alice, &id).await;
    // The test driver runs no guest: write its console as a guest would.
    let host = cloud.host_of(&id).await.unwrap();
    let dir = if a.host_id.as_deref() == Some(&host) { a.state_dir.clone() } else { b.state_dir.clone() };
    std::fs::write(dir.join("instances").join(&id).join("console.log"), b"NIMBUS-BOOT hello from the console\n").unwrap();
    let client = cloud.service.store.client();
    let ckey = console_key(&id);
    cloud
        .wait_until(T, || async { Ok(client.get(ckey.as_bytes()).await?.values.len() == 1) })
        .await
        .expect("the host wrote the console tail to the store");
    // Only the store has it: the report no longer carried it.
    let (pg,): (Option<Vec<u8>>,) =
        sqlx::query_as("SELECT console_output FROM instances WHERE id = $1").bind(&id).fetch_one(cloud.db()).await.unwrap();
    assert_eq!(pg, None);
    let (_, xml) = cloud.ec2(&alice, &format!("Action=GetConsoleOutput&InstanceId={id}")).await.unwrap();
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD
        .decode(xml_values(&xml, "output").first().copied().unwrap_or_default())
        .unwrap_or_default();
    assert_eq!(String::from_utf8_lossy(&text), "NIMBUS-BOOT hello from the console\n", "{xml}");
    // The newer tail wins, wherever it is: one reported to the control plane
    // later (as a host does while the store refuses it; written here in SQL
    // as the report's handler writes it), then a newer one in the store.
    let console = || async {
        let (_, xml) = cloud.ec2(&alice, &format!("Action=GetConsoleOutput&InstanceId={id}")).await?;
        let out = base64::engine::general_purpose::STANDARD.decode(xml_values(&xml, "output").first().copied().unwrap_or_default())?;
        anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
    };
    sqlx::query("UPDATE instances SET console_output = $2, console_updated_at = now() WHERE id = $1")
        .bind(&id)
        .bind(b"reported later\n".as_slice())
        .execute(cloud.db())
        .await
        .unwrap();
    assert_eq!(console().await.unwrap(), "reported later\n");
    std::fs::write(dir.join("instances").join(&id).join("console.log"), b"NIMBUS-BOOT newer still\n").unwrap();
    cloud.wait_until(T, || async { Ok(console().await? == "NIMBUS-BOOT newer still\n") }).await.expect("the store's newer tail");
    // Status checks: the host wrote both as passed (domain running, guest showed life).
    // Records are signed by the host that wrote them.
    let (other_dir, host_key) = {
        let other = if a.host_id.as_deref() == Some(&host) { &b } else { &a };
        let key =
            |d: &std::path::Path| nimbus_records::KeyPair::from_pem(&std::fs::read_to_string(d.join("tls/key.pem")).unwrap()).unwrap();
        (key(&other.state_dir), key(&dir))
    };
    let skey = status_key(&id);
    let open = |raw: &Vec<u8>| -> Option<StatusRecord> {
        let payload = nimbus_records::SignedRecord::decode(raw).ok()?.open(&skey, &host, &host_key.public()).ok()?;
        serde_json::from_slice(&payload).ok()
    };
    cloud
        .wait_until(T, || async {
            let got = client.get(skey.as_bytes()).await?;
            Ok(got.values.first().and_then(open).is_some_and(|r| r.instance == Check::Passed && r.system == Check::Passed))
        })
        .await
        .expect("status checks in the store, signed by the instance's host");
    let (_, xml) = cloud.ec2(&alice, "Action=DescribeInstanceStatus").await.unwrap();
    assert!(xml.contains("<instanceStatus><status>ok</status>"), "{xml}");
    // A record another host signed (a compromised node holding a replica)
    // is not the instance's: DescribeInstanceStatus ignores it.
    let bad = StatusRecord { instance_id: id.clone(), system: Check::Passed, instance: Check::Failed, at: chrono::Utc::now() };
    let forged = nimbus_records::SignedRecord::sign(&skey, &host, &serde_json::to_vec(&bad).unwrap(), &other_dir);
    let got = client.get(skey.as_bytes()).await.unwrap();
    client.put(skey.as_bytes(), forged.encode(), &got.context).await.unwrap();
    let (_, xml) = cloud.ec2(&alice, "Action=DescribeInstanceStatus").await.unwrap();
    assert!(!xml.contains("<status>impaired</status>"), "a forged record counted: {xml}");
    // What the store says is what DescribeInstanceStatus shows: a failed
    // check the host itself signed is impaired.
    let genuine = nimbus_records::SignedRecord::sign(&skey, &host, &serde_json::to_vec(&bad).unwrap(), &host_key);
    let got = client.get(skey.as_bytes()).await.unwrap();
    client.put(skey.as_bytes(), genuine.encode(), &got.context).await.unwrap();
    let (_, xml) = cloud.ec2(&alice, "Action=DescribeInstanceStatus").await.unwrap();
    assert!(xml.contains("<systemStatus><status>ok</status>"), "{xml}");
    assert!(
        xml.contains("<instanceStatus><status>impaired</status><details><item><name>reachability</name><status>failed</status>"),
        "{xml}"
    );
    // The store unreadable (both hosts' nodes down, no read quorum): nothing
    // is known, and DescribeInstanceStatus says so rather than "ok".
    let (mut a, mut b) = (a, b);
    a.stop().await;
    b.stop().await;
    let (_, xml) = cloud.ec2(&alice, "Action=DescribeInstanceStatus").await.unwrap();
    assert!(xml.contains("<systemStatus><status>insufficient-data</status>"), "{xml}");
    assert!(
        xml.contains(
            "<instanceStatus><status>insufficient-data</status><details><item><name>reachability</name><status>insufficient-data</status>"
        ),
        "{xml}"
    );
}

/// MetadataOptions at launch and ModifyInstanceMetadataOptions through the
/// EC2 front door: shown by DescribeInstances, enforced by the metadata
/// service within a bounded time of the call; bad values refused.
#[tokio::test(flavor = "multi_thread")]
async fn metadata_options_at_launch_and_modified() {
    let (cloud, img, a, b, alice) = ec2_ring().await;
    let (status, xml) = cloud
        .ec2(
            &alice,
            &format!("Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1&MetadataOptions.HttpTokens=sometimes"),
        )
        .await
        .unwrap();
    assert_eq!((status, nimbus_tests::xml_error_code(&xml)), (400, "InvalidParameterValue"), "{xml}");
    let (status, xml) = cloud
        .ec2(
            &alice,
            &format!(
                "Action=RunInstances&ImageId={img}&InstanceType=t3.nano&MinCount=1&MaxCount=1&MetadataOptions.HttpTokens=required\
                 &MetadataOptions.InstanceMetadataTags=enabled&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=Name\
                 &TagSpecification.1.Tag.1.Value=web"
            ),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{xml}");
    let id = xml_values(&xml, "instanceId")[0].to_string();
    assert_eq!(xml_values(&xml, "httpTokens"), vec!["required"]);
    assert_eq!(xml_values(&xml, "instanceMetadataTags"), vec!["enabled"]);
    ec2_running(&cloud, &alice, &id).await;
    let host = cloud.host_of(&id).await.unwrap();
    let agent = if a.host_id.as_deref() == Some(&host) { &a } else { &b };
    let socket = agent.metadata_socket(&id);
    // Tokens required: a GET without one is refused; with one, tags are served.
    cloud
        .wait_until(T, || async {
            let (status, _) = nimbus_host_agent::metadata::request(&socket, "GET", "/latest/meta-data/instance-id", &[]).await?;
            Ok(status == 401)
        })
        .await
        .expect("tokens required");
    let (status, token) =
        nimbus_host_agent::metadata::request(&socket, "PUT", "/latest/api/token", &[("X-aws-ec2-metadata-token-ttl-seconds", "60")])
            .await
            .unwrap();
    assert_eq!(status, 200);
    let token = String::from_utf8(token).unwrap();
    let with_token = [("X-aws-ec2-metadata-token", token.as_str())];
    cloud
        .wait_until(T, || async {
            let (status, body) =
                nimbus_host_agent::metadata::request(&socket, "GET", "/latest/meta-data/tags/instance/Name", &with_token).await?;
            Ok(status == 200 && body == b"web")
        })
        .await
        .expect("tags served");
    // Modify: endpoint off. The change reaches the service.
    let (status, xml) =
        cloud.ec2(&alice, &format!("Action=ModifyInstanceMetadataOptions&InstanceId={id}&HttpEndpoint=disabled")).await.unwrap();
    assert_eq!(status, 200, "{xml}");
    assert_eq!(xml_values(&xml, "httpEndpoint"), vec!["disabled"]);
    assert_eq!(xml_values(&xml, "state"), vec!["pending"]);
    let started = std::time::Instant::now();
    cloud
        .wait_until(T, || async {
            let (status, _) = nimbus_host_agent::metadata::request(&socket, "GET", "/latest/meta-data/instance-id", &with_token).await?;
            Ok(status == 403)
        })
        .await
        .expect("endpoint disabled");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let (_, xml) = cloud.ec2(&alice, &format!("Action=DescribeInstances&InstanceId.1={id}")).await.unwrap();
    assert_eq!(xml_values(&xml, "httpEndpoint"), vec!["disabled"]);
    assert_eq!(xml_values(&xml, "httpTokens"), vec!["required"], "what was not named stays");
    let (status, xml) =
        cloud.ec2(&alice, &format!("Action=ModifyInstanceMetadataOptions&InstanceId={id}&HttpPutResponseHopLimit=65")).await.unwrap();
    assert_eq!((status, nimbus_tests::xml_error_code(&xml)), (400, "InvalidParameterValue"), "{xml}");
    let (status, xml) =
        cloud.ec2(&alice, "Action=ModifyInstanceMetadataOptions&InstanceId=i-0123456789abcdef0&HttpEndpoint=enabled").await.unwrap();
    assert_eq!((status, nimbus_tests::xml_error_code(&xml)), (400, "InvalidInstanceID.NotFound"), "{xml}");
}

/// A tag call bumps each instance's document once, whatever the number of
/// tags (one outbox row per instance, not per tag row), for creating,
/// changing (also both at once) and deleting tags; concurrent tag calls naming the same
/// instances in different orders all succeed (instances are locked in id
/// order first: no deadlock answered as an internal error).
#[tokio::test(flavor = "multi_thread")]
async fn tag_calls_bump_each_document_once_and_never_deadlock() {
    let cloud = Cloud::start_with(CloudOptions { outbox_relay: false, ..Default::default() }).await.unwrap();
    let _a = cloud.add_agent("a", "az1", 64, 65536, 1000).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let ids =
        instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "min_count": 8, "max_count": 8})).await.unwrap());
    cloud.wait_for_state(&ids, "running", T).await.unwrap();
    let versions = || async {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT id, doc_version FROM instances WHERE id = ANY($1)").bind(&ids).fetch_all(cloud.db()).await.unwrap();
        let (outbox,): (i64,) = sqlx::query_as("SELECT count(*) FROM metadata_outbox WHERE instance_id = ANY($1)")
            .bind(&ids)
            .fetch_one(cloud.db())
            .await
            .unwrap();
        (rows.into_iter().collect::<std::collections::HashMap<_, _>>(), outbox)
    };
    let forty = |value: &str| (0..40).map(|i| json!({"key": format!("k{i}"), "value": value})).collect::<Vec<_>>();
    let mut mixed = forty("c");
    mixed.push(json!({"key": "k40", "value": "new"}));
    for (path, body) in [
        ("/v1/tags", json!({"resource_ids": ids, "tags": forty("a")})),
        ("/v1/tags", json!({"resource_ids": ids, "tags": forty("b")})),
        // Changes and an addition: the upsert fires both statement triggers.
        ("/v1/tags", json!({"resource_ids": ids, "tags": mixed})),
        ("/v1/tags/delete", json!({"resource_ids": ids, "tags": []})),
    ] {
        let (before, outbox_before) = versions().await;
        cloud.post(path, body).await.unwrap();
        let (after, outbox_after) = versions().await;
        for id in &ids {
            assert_eq!(after[id], before[id] + 1, "{path}: {id} bumped once");
        }
        assert_eq!(outbox_after - outbox_before, ids.len() as i64, "{path}: one outbox row per instance");
    }

    let calls = (0..16).map(|n| {
        let mut order = ids.clone();
        order.rotate_left(n % ids.len());
        if n % 2 == 1 {
            order.reverse();
        }
        let (path, tags) =
            if n % 3 == 2 { ("/v1/tags/delete", json!([{"key": "k1"}])) } else { ("/v1/tags", json!(forty(&n.to_string()))) };
        let cloud = &cloud;
        async move { cloud.call(Method::POST, path, Some(json!({"resource_ids": order, "tags": tags}))).await.unwrap() }
    });
    for (status, body) in futures::future::join_all(calls).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

/// Terminated instances are forgotten after the retention: their document,
/// console tail and status record leave the store, then their rows (their
/// tags, and their reservation with its client token). Not before: while
/// the instance is within the retention, while a change of its document
/// waits in the outbox, while another instance of its reservation is not
/// past the retention too. Tags on an instance terminated over an hour ago
/// are refused. A live instance keeps everything; a second pass finds
/// nothing. (Time passing is simulated: `state_changed_at` set back.)
#[tokio::test(flavor = "multi_thread")]
async fn terminated_instances_are_forgotten_after_the_retention() {
    use nimbus_proto::metadata::{console_key, status_key};
    let (cloud, _, a, b) = ring_cloud(CloudOptions { outbox_relay: false, ..Default::default() }).await;
    let relay = cloud.service.relay();
    let drain = || async {
        cloud.wait_until(T, || async { Ok(relay.pass().await.is_ok() && relay.backlog().await? == 0) }).await.expect("the outbox drained");
    };
    let pair = instance_ids(
        &cloud
            .post(
                "/v1/instances",
                json!({"instance_type": "t3.nano", "client_token": "pair", "min_count": 2, "max_count": 2,
                "tags": [{"key": "k", "value": "v"}]}),
            )
            .await
            .unwrap(),
    );
    let kept =
        instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano", "client_token": "kept"})).await.unwrap()).remove(0);
    let all: Vec<String> = pair.iter().cloned().chain([kept.clone()]).collect();
    cloud.wait_for_state(&all, "running", T).await.unwrap();
    // Every kind of record the store keeps of an instance.
    for id in &all {
        let host = cloud.host_of(id).await.unwrap();
        let dir = if a.host_id.as_deref() == Some(&host) { &a.state_dir } else { &b.state_dir };
        std::fs::write(dir.join("instances").join(id).join("console.log"), b"NIMBUS-BOOT\n").unwrap();
    }
    drain().await;
    let client = cloud.service.store.client();
    let held = |id: String| {
        let client = &client;
        async move {
            let mut n = 0;
            for key in [document_key(&id), console_key(&id), status_key(&id)] {
                n += usize::from(!client.get(key.as_bytes()).await?.values.is_empty());
            }
            anyhow::Ok(n)
        }
    };
    for id in &all {
        cloud.wait_until(T, || async { Ok(held(id.clone()).await? == 3) }).await.expect("all records stored");
    }
    let db = cloud.db().clone();
    let rows = |id: String| {
        let db = db.clone();
        async move {
            let (i, t): (i64, i64) =
                sqlx::query_as("SELECT (SELECT count(*) FROM instances WHERE id = $1), (SELECT count(*) FROM tags WHERE resource_id = $1)")
                    .bind(&id)
                    .fetch_one(&db)
                    .await
                    .unwrap();
            (i, t)
        }
    };
    let hours_ago = |ids: Vec<String>, h: i32| {
        let db = db.clone();
        async move {
            sqlx::query("UPDATE instances SET state_changed_at = now() - make_interval(hours => $2) WHERE id = ANY($1)")
                .bind(&ids)
                .bind(h)
                .execute(&db)
                .await
                .unwrap();
        }
    };
    let purge = |secs: u64| cloud.service.purge_terminated(Duration::from_secs(secs));

    // One of the pair ends, long ago: its sibling still runs.
    cloud.post("/v1/instances/terminate", json!({"instance_ids": [pair[0]]})).await.unwrap();
    cloud.wait_for_state(&pair[..1], "terminated", T).await.unwrap();
    drain().await;
    hours_ago(pair[..1].to_vec(), 2).await;
    assert_eq!(purge(3600).await.unwrap(), 0, "its reservation's other instance is not past the retention");
    // Both end; a change of one waits in the outbox (the relay is not running).
    cloud.post("/v1/instances/terminate", json!({"instance_ids": [pair[1]]})).await.unwrap();
    cloud.wait_for_state(&pair[1..], "terminated", T).await.unwrap();
    hours_ago(pair.clone(), 2).await;
    assert_eq!(purge(3600).await.unwrap(), 0, "a document waits in the outbox");
    assert_eq!(held(pair[1].clone()).await.unwrap(), 3);
    drain().await;
    assert_eq!(purge(3 * 3600).await.unwrap(), 0, "within the retention");
    let (status, body) = cloud
        .call(Method::POST, "/v1/tags", Some(json!({"resource_ids": [pair[0]], "tags": [{"key": "late", "value": "x"}]})))
        .await
        .unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("InvalidInstanceID.NotFound")), "{body}");

    assert_eq!(purge(3600).await.unwrap(), 2, "past it");
    for id in &pair {
        assert_eq!(held(id.clone()).await.unwrap(), 0, "nothing of {id} in the store");
        assert_eq!(rows(id.clone()).await, (0, 0), "nor in PostgreSQL");
    }
    let (tokens,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM reservations WHERE client_token = 'pair'").fetch_one(cloud.db()).await.unwrap();
    assert_eq!(tokens, 0, "their reservation and client token went with them");
    assert_eq!(held(kept.clone()).await.unwrap(), 3, "a live instance keeps its records");
    assert_eq!(rows(kept.clone()).await, (1, 0));
    assert_eq!(purge(3600).await.unwrap(), 0, "a second pass finds nothing");
    // The client token is free again: a new launch.
    let again = instance_ids(
        &cloud
            .post("/v1/instances", json!({"instance_type": "t3.nano", "client_token": "pair", "min_count": 2, "max_count": 2}))
            .await
            .unwrap(),
    );
    assert!(again.iter().all(|id| !pair.contains(id)), "{again:?}");
}

/// Issue 18, finding 3: a host's certificate (here b's: any host, or a
/// store-only one) is a node's, not the control plane's. With it one could
/// read any instance's document with its user-data through the client API,
/// write a document with a forged version (+1000), SSH key and user-data
/// that the guest's metadata service then served and that froze every
/// later change, and use the admin routes; and a reset host's certificate
/// kept working for a year. Now: the client API and the admin routes
/// refuse a node's certificate; replicas hold documents sealed for their
/// host (no user-data in the clear); a forged document is never served and
/// holds nothing back; a reset host's certificate is refused by every node
/// within the revocation bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_hosts_certificate_cannot_read_forge_or_administer_and_dies_with_its_reset() {
    use nimbus_state_store::rpc::{Request, Transport};
    use nimbus_state_store::{TcpTransport, TlsConfig};
    let (cloud, _, a, mut b) = ring_cloud(CloudOptions::default()).await;
    // One instance on each host; the one on a is the victim.
    let r = cloud
        .post("/v1/instances", json!({"instance_type": "t3.nano", "min_count": 2, "max_count": 2, "user_data": "c2VjcmV0LXVzZXItZGF0YQ=="}))
        .await
        .unwrap();
    let ids = instance_ids(&r);
    cloud.wait_for_state(&ids, "running", T).await.unwrap();
    let mut victim = None;
    for id in &ids {
        if cloud.host_of(id).await.unwrap() == *a.host_id.as_ref().unwrap() {
            victim = Some(id.clone());
        }
    }
    let id = victim.expect("an instance on a");
    cloud
        .wait_until(T, || async { Ok(imds(&a, &id, "/latest/dynamic/instance-identity/document").await.1.contains("nimbus-1")) })
        .await
        .expect("a serves the store's document");
    assert_eq!(imds(&a, &id, "/latest/user-data").await, (200, "secret-user-data".into()));
    let key = document_key(&id);

    // b's identity, as a compromised b would use it.
    let tls_dir = b.state_dir.join("tls");
    let b_tls = TlsConfig::from_files(&tls_dir.join("ca.pem"), &tls_dir.join("cert.pem"), &tls_dir.join("key.pem")).unwrap();
    let cp_node = cloud.service.store.address.clone();
    let a_node = a.store_address().unwrap().to_string();
    let b_node = b.store_address().unwrap().to_string();

    // The client API (quorum reads of any key) refuses it, on every node.
    for node in [&cp_node, &a_node] {
        let got = TcpClient::with_tls(node, T, b_tls.clone()).get(key.as_bytes()).await;
        assert!(got.is_err(), "{node} answered a host's client read ({} values)", got.map(|g| g.values.len()).unwrap_or(0));
    }
    // And so do the admin routes.
    let http = reqwest::Client::builder().use_preconfigured_tls((*b_tls.client_config()).clone()).build().unwrap();
    let resp = http.post(format!("https://{cp_node}/admin/remove")).body(r#"{"node":"x"}"#).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "admin routes need the control plane");
    // The control plane's own identity still has them.
    let trusted =
        TcpClient::with_tls(&cp_node, T, cloud.service.store.tls.clone()).get(key.as_bytes()).await.expect("the control plane reads");
    // Every replica (this is a ring of three: each node holds one) has the
    // document sealed: no user-data in the clear.
    let raw: Vec<u8> = trusted.values.concat();
    let local = cloud.service.store.node.storage().get(key.as_bytes()).unwrap().map(|r| r.values().concat()).unwrap_or_default();
    for bytes in [&raw, &local] {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !bytes.is_empty() && !text.contains("c2VjcmV0LXVzZXItZGF0YQ") && !text.contains("secret-user-data"),
            "user-data in a replica: {text}"
        );
    }

    // Forged documents written through replication (a node's right): a
    // plain one with version + 1000 and one sealed for a but signed by b.
    let genuine = cloud.stored_document(&id).await.unwrap().0.expect("published");
    let mut forged = genuine.clone();
    forged.version += 1000;
    forged.user_data = Some("Zm9yZ2Vk".into());
    forged.public_keys = vec![("evil".into(), "ssh-ed25519 AAAA evil".into())];
    let a_key = nimbus_records::KeyPair::from_pem(&std::fs::read_to_string(a.state_dir.join("tls/key.pem")).unwrap()).unwrap();
    let b_key = nimbus_records::KeyPair::from_pem(&std::fs::read_to_string(tls_dir.join("key.pem")).unwrap()).unwrap();
    let mut sealed = nimbus_records::SealedDocument::seal(&forged, a.host_id.as_ref().unwrap(), &a_key.public(), &b_key).unwrap();
    sealed.signer = cloud.service.store.doc_key.key_id();
    let transport = TcpTransport::with_tls(b_tls.clone());
    for value in [serde_json::to_vec(&forged).unwrap(), sealed.encode()] {
        let req = Request::Coordinate { key: key.as_bytes().to_vec(), value: Some(value), context: Default::default() };
        let resp = transport.call(&b_node, &cp_node, req).await;
        assert!(resp.is_ok(), "replication is a node's right: {resp:?}");
    }
    let got = cloud.service.store.client().get(key.as_bytes()).await.unwrap();
    assert!(got.values.len() >= 2, "the forgeries are stored as siblings: {}", got.values.len());
    // Never served, and nothing held back: a later genuine change (tokens
    // required) reaches the guest although the forgery claims a far newer
    // version.
    a.passes(2).await.unwrap();
    assert_eq!(imds(&a, &id, "/latest/user-data").await, (200, "secret-user-data".into()));
    let (status, keys) = imds(&a, &id, "/latest/meta-data/public-keys/").await;
    assert!(!keys.contains("evil"), "{status} {keys}");
    cloud.post(&format!("/v1/instances/{id}/metadata-options"), json!({"http_tokens": "required"})).await.unwrap();
    cloud
        .wait_until(T, || async { Ok(imds(&a, &id, "/latest/meta-data/instance-id").await.0 == 401) })
        .await
        .expect("the genuine change is served despite the forged version");
    let stored = cloud.stored_document(&id).await.unwrap().0.unwrap();
    assert!(stored.options.tokens_required && stored.user_data.as_deref() == Some("c2VjcmV0LXVzZXItZGF0YQ=="), "{stored:?}");

    // The operator resets b (a machine to reinstall): its certificate is
    // refused by every node within the revocation bound, and a connection
    // it holds open is closed.
    b.stop().await;
    let open = TcpClient::with_tls(&a_node, T, b_tls.clone());
    let probe = Request::GcProbe { key: key.as_bytes().to_vec() };
    assert!(transport.call(&b_node, &a_node, probe.clone()).await.is_ok(), "b's certificate works before the reset");
    let started = std::time::Instant::now();
    let (status, body) = cloud
        .call_as(
            Some(&cloud.admin_token.clone()),
            Method::POST,
            &format!("/v1/hosts/{}/reset-credential", b.host_id.as_ref().unwrap()),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    for node in [&cp_node, &a_node] {
        cloud
            .wait_until(Duration::from_secs(60), || async { Ok(transport.call(&b_node, node, probe.clone()).await.is_err()) })
            .await
            .unwrap_or_else(|_| panic!("{node} still takes b's revoked certificate"));
    }
    println!("a reset host's certificate refused by every node after {:?}", started.elapsed());
    assert!(open.get(key.as_bytes()).await.is_err());
    // Fresh handshakes too.
    let fresh = TcpTransport::with_tls(b_tls);
    assert!(fresh.call(&b_node, &a_node, probe).await.is_err());
}
