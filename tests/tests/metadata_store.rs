//! Instance metadata in the state store (issue 11): the control plane's CA
//! certifies each host's key at registration, the hosts' embedded store
//! nodes and the control plane's form one ring by gossip over mutual TLS,
//! and nothing without a certificate of that CA gets in.

use nimbus_host_agent::HypervisorChoice;
use nimbus_state_store::tls::dev::DevCa;
use nimbus_state_store::{KvClient, TcpClient};
use nimbus_tests::{free_local_addr, AgentHandle, Cloud};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// A test-driver agent running a store node on a free loopback port.
async fn store_agent(cloud: &Cloud, name: &str) -> AgentHandle {
    let addr = free_local_addr().expect("port");
    cloud
        .add_agent_configured(name, "az1", (4, 4096, 40), HypervisorChoice::Test, |c| c.store_listen = Some(addr))
        .await
        .expect("agent")
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
    let body = json!({"public_key": public_key, "store_address": "127.0.0.1:7999"});
    let (status, _) = cloud.call_as(None, Method::POST, "/v1/agent/certificate", Some(body.clone())).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/certificate", Some(body.clone())).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the join token is not a host credential");
    let (status, err) = cloud
        .call_as(Some(&bearer), Method::POST, "/v1/agent/certificate", Some(json!({"public_key": "AAAA"})))
        .await
        .unwrap();
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
    tls.check_node("127.0.0.1:7999").expect("names the store address");
}
