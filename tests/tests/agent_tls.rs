//! The agent protocol over mutual TLS (`--agent-listen`): agents register
//! and get their certificate over server-authenticated TLS, then fetch
//! assignments and report only with the certificate they were issued; the
//! plaintext listener refuses the agent protocol.

use nimbus_proto::agent::HostCredential;
use nimbus_tests::{instance_ids, Cloud, CloudOptions};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn client(cloud: &Cloud, identity: Option<String>) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&cloud.ca_file).unwrap()).unwrap();
    let mut b = reqwest::Client::builder().add_root_certificate(ca).tls_built_in_root_certs(false);
    if let Some(id) = identity {
        b = b.identity(reqwest::Identity::from_pem(id.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

async fn assignments(cloud: &Cloud, http: &reqwest::Client, bearer: &str) -> Result<StatusCode, reqwest::Error> {
    let url = format!("{}/v1/agent/assignments?after=0&wait_ms=0", cloud.agent_url());
    Ok(http.get(url).bearer_auth(bearer).send().await?.status())
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_use_mutual_tls_and_plaintext_is_refused() {
    let cloud = Cloud::start_with(CloudOptions { agent_tls: true, ..Default::default() }).await.unwrap();
    cloud.register_test_image().await.unwrap();
    assert!(cloud.agent_url().starts_with("https://"));
    // The whole path over mutual TLS: registration, certificate, assignments, reports.
    let a = cloud.add_agent("a", "az1", 4, 4096, 40).await.unwrap();
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap())[0].clone();
    cloud.wait_for_state(std::slice::from_ref(&id), "running", T).await.unwrap();

    let cred: HostCredential = serde_json::from_slice(&std::fs::read(a.state_dir.join("credential.json")).unwrap()).unwrap();
    let bearer = cred.bearer();
    // The plaintext listener takes no agent call, not even a registration.
    let (status, body) = cloud.call_as(Some(&bearer), Method::GET, "/v1/agent/assignments?after=0&wait_ms=0", None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let reg = json!({"name": "h2", "availability_zone": "az1", "hypervisor": "test", "vcpus": 1, "memory_mib": 512, "disk_gib": 1});
    let (status, _) = cloud.call_as(Some(&cloud.join_token.clone()), Method::POST, "/v1/agent/register", Some(reg.clone())).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Over TLS without a client certificate: the credential alone fetches nothing.
    let anon = client(&cloud, None);
    use base64::Engine;
    assert_eq!(assignments(&cloud, &anon, &bearer).await.unwrap(), StatusCode::UNAUTHORIZED);
    // Nor does it reach the image store (tenants' disks).
    let digest = "0".repeat(64);
    let r = anon.get(format!("{}/v1/agent/images/{digest}", cloud.agent_url())).bearer_auth(&bearer).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "image download with the credential alone");
    let r = anon
        .put(format!("{}/v1/agent/images/ami-0123456789abcdef0", cloud.agent_url()))
        .bearer_auth(&bearer)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "image upload with the credential alone");
    // With the host's own certificate: answered.
    let tls = a.state_dir.join("tls");
    let own =
        format!("{}{}", std::fs::read_to_string(tls.join("cert.pem")).unwrap(), std::fs::read_to_string(tls.join("key.pem")).unwrap());
    assert_eq!(assignments(&cloud, &client(&cloud, Some(own.clone())), &bearer).await.unwrap(), StatusCode::OK);
    // A certificate for the credential alone, once the host holds one: refused
    // (a thief's key is not certified); renewing with the current one: issued.
    let thief = rcgen::KeyPair::generate().unwrap();
    let thief_req = json!({"public_key": base64::engine::general_purpose::STANDARD.encode(thief.public_key_raw())});
    let r = anon.post(format!("{}/v1/agent/certificate", cloud.agent_url())).bearer_auth(&bearer).json(&thief_req).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "a certificate for the credential alone");
    assert_eq!(
        assignments(&cloud, &client(&cloud, Some(own.clone())), &bearer).await.unwrap(),
        StatusCode::OK,
        "the real host is not displaced"
    );
    // The agent restarts: it renews presenting its saved certificate, and works on.
    let mut a = a;
    cloud.start_agent(&mut a).await.unwrap();
    let second = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap());
    cloud.wait_for_state(&second, "running", T).await.expect("the restarted agent renewed its certificate");
    // Another host's certificate (of the same CA) with this host's credential: refused.
    let r = anon.post(format!("{}/v1/agent/register", cloud.agent_url())).bearer_auth(&cloud.join_token).json(&reg).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let other: HostCredential = r.json().await.unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let req = json!({"public_key": base64::engine::general_purpose::STANDARD.encode(key.public_key_raw())});
    let r = anon.post(format!("{}/v1/agent/certificate", cloud.agent_url())).bearer_auth(other.bearer()).json(&req).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let grant: serde_json::Value = r.json().await.unwrap();
    let theirs = format!("{}{}", grant["certificate_pem"].as_str().unwrap(), key.serialize_pem());
    let theirs = client(&cloud, Some(theirs));
    assert_eq!(assignments(&cloud, &theirs, &bearer).await.unwrap(), StatusCode::UNAUTHORIZED);
    assert_eq!(assignments(&cloud, &theirs, &other.bearer()).await.unwrap(), StatusCode::OK, "its own host's calls pass");
    // A certificate of another CA: the handshake fails.
    let stranger = nimbus_state_store::tls::dev::DevCa::new("stranger").unwrap().issue(&["127.0.0.1"]).unwrap();
    let foreign = client(&cloud, Some(format!("{}{}", stranger.cert_pem, stranger.key_pem)));
    assert!(assignments(&cloud, &foreign, &bearer).await.is_err());
}

/// A running agent renews its certificate every `--cert-renew-secs`
/// (here 2 s): the control plane records each new one and accepts only it,
/// and the agent goes on fetching assignments and reporting with it; its
/// store node presents a renewed one to new connections.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_agent_renews_its_certificate() {
    use sha2::{Digest, Sha256};
    let cloud = Cloud::start_with(CloudOptions { agent_tls: true, ..Default::default() }).await.unwrap();
    cloud.register_test_image().await.unwrap();
    let listen = nimbus_tests::free_local_addr().unwrap();
    let a = cloud
        .add_agent_configured("a", "az1", (4, 4096, 40), nimbus_host_agent::HypervisorChoice::Test, |c| {
            c.store_listen = Some(listen);
            c.cert_renew_secs = 2;
        })
        .await
        .unwrap();
    let host = a.host_id.clone().expect("registered");
    let recorded = || async {
        let (d,): (Option<Vec<u8>>,) =
            sqlx::query_as("SELECT tls_cert_sha256 FROM hosts WHERE id = $1").bind(&host).fetch_one(cloud.db()).await?;
        anyhow::Ok(d.unwrap_or_default())
    };
    let first = recorded().await.unwrap();
    let seen = std::sync::Mutex::new(std::collections::HashSet::from([first.clone()]));
    cloud
        .wait_until(T, || async {
            let d = recorded().await?;
            let mut seen = seen.lock().unwrap();
            seen.insert(d);
            Ok(seen.len() >= 3)
        })
        .await
        .expect("two renewals recorded");
    // The agent works on with whichever certificate is its latest.
    let id = instance_ids(&cloud.post("/v1/instances", json!({"instance_type": "t3.nano"})).await.unwrap()).remove(0);
    cloud.wait_for_state(std::slice::from_ref(&id), "running", T).await.expect("assignments and reports after renewals");
    // Its store node presents a renewed certificate (any of the CA's may connect).
    let tls = a.state_dir.join("tls");
    let client = nimbus_state_store::TlsConfig::from_files(&tls.join("ca.pem"), &tls.join("cert.pem"), &tls.join("key.pem")).unwrap();
    let tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
    let name = nimbus_state_store::tls::server_name(&listen.to_string()).unwrap();
    let conn = client.connector().connect(name, tcp).await.unwrap();
    let presented = Sha256::digest(conn.get_ref().1.peer_certificates().unwrap()[0].as_ref()).to_vec();
    assert_ne!(presented, first, "the store node presents a renewed certificate");
    let recorded_since = recorded().await.unwrap();
    assert!(seen.lock().unwrap().contains(&presented) || presented == recorded_since, "one the control plane issued");
}

/// The certificate a host renews with stays valid until its next renewal
/// (a renewal whose answer the host never took into use does not lock it
/// out); two renewals old, it is refused, also for renewing.
#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_keeps_the_presented_certificate_valid_until_the_next() {
    use base64::Engine;
    let cloud = Cloud::start_with(CloudOptions { agent_tls: true, ..Default::default() }).await.unwrap();
    let anon = client(&cloud, None);
    let reg = json!({"name": "h", "availability_zone": "az1", "hypervisor": "test", "vcpus": 1, "memory_mib": 512, "disk_gib": 1});
    let r = anon.post(format!("{}/v1/agent/register", cloud.agent_url())).bearer_auth(&cloud.join_token).json(&reg).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bearer = r.json::<HostCredential>().await.unwrap().bearer();
    let key = rcgen::KeyPair::generate().unwrap();
    let req = json!({"public_key": base64::engine::general_purpose::STANDARD.encode(key.public_key_raw())});
    let renew = |with: reqwest::Client| {
        let (url, bearer, req) = (format!("{}/v1/agent/certificate", cloud.agent_url()), bearer.clone(), req.clone());
        async move {
            let r = with.post(url).bearer_auth(bearer).json(&req).send().await.unwrap();
            (r.status(), r.json::<serde_json::Value>().await.unwrap()["certificate_pem"].as_str().map(str::to_string))
        }
    };
    let holding = |pem: &str| client(&cloud, Some(format!("{pem}{}", key.serialize_pem())));
    let (status, first) = renew(anon.clone()).await;
    assert_eq!(status, StatusCode::OK, "the first certificate, for the credential");
    let first = holding(&first.unwrap());
    let (status, second) = renew(first.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let second = holding(&second.unwrap());
    assert_eq!(assignments(&cloud, &second, &bearer).await.unwrap(), StatusCode::OK, "the new certificate");
    assert_eq!(assignments(&cloud, &first, &bearer).await.unwrap(), StatusCode::OK, "and the one it renewed with");
    let (status, third) = renew(second.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let third = holding(&third.unwrap());
    assert_eq!(assignments(&cloud, &third, &bearer).await.unwrap(), StatusCode::OK);
    assert_eq!(assignments(&cloud, &second, &bearer).await.unwrap(), StatusCode::OK);
    assert_eq!(assignments(&cloud, &first, &bearer).await.unwrap(), StatusCode::UNAUTHORIZED, "two renewals old");
    assert_eq!(renew(first).await.0, StatusCode::UNAUTHORIZED, "nor does it renew");
    assert_eq!(renew(anon).await.0, StatusCode::UNAUTHORIZED, "nor does the credential alone");
}

/// Issue 18, finding 4: agents trusted any certificate of the cluster CA
/// naming the address they dialled, and a host could get one for another
/// node's or the control plane's IP. Now a host's certificate names only
/// its own node's IP (no other node's, not the control plane's: see
/// `metadata_store.rs`), and agents accept as the control plane only a
/// certificate carrying its name, which no host certificate has: a host
/// that answers at the control plane's address with its own certificate
/// (a compromised host with a network position) is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_hosts_certificate_cannot_pass_for_the_control_plane() {
    let cloud = Cloud::start_with(CloudOptions { agent_tls: true, ..Default::default() }).await.unwrap();
    let listen = nimbus_tests::free_local_addr().unwrap();
    let a = cloud
        .add_agent_configured("a", "az1", (4, 4096, 40), nimbus_host_agent::HypervisorChoice::Test, |c| c.store_listen = Some(listen))
        .await
        .unwrap();
    // A rogue HTTPS server at a's address, presenting a's certificate.
    let tls = a.state_dir.join("tls");
    cloud
        .wait_until(T, || async { Ok(tls.join("ca.pem").exists() && tls.join("document-keys.json").exists()) })
        .await
        .expect("a is certified");
    let rogue_tls = nimbus_state_store::TlsConfig::from_files(&tls.join("ca.pem"), &tls.join("cert.pem"), &tls.join("key.pem")).unwrap();
    let rogue = tokio::net::TcpListener::bind((listen.ip(), 0)).await.unwrap();
    let rogue_addr = rogue.local_addr().unwrap();
    let acceptor = rogue_tls.acceptor();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((tcp, _)) = rogue.accept().await {
            if let Ok(mut s) = acceptor.accept(tcp).await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
            }
        }
    });
    let url = format!("https://{rogue_addr}/v1/agent/assignments?after=0&wait_ms=0");
    // A client that checks only the CA and the dialled address (what agents
    // did) takes the rogue for the control plane.
    assert!(client(&cloud, None).get(&url).send().await.is_ok(), "the attack: the CA and the address match");
    // The agent's client refuses it, and still reaches the real one, by
    // whatever address (here one its certificate does not name).
    let ca = std::fs::read(&cloud.ca_file).unwrap();
    let agents =
        reqwest::Client::builder().use_preconfigured_tls(nimbus_host_agent::control_plane_tls(&ca, None).unwrap()).build().unwrap();
    let refused = agents.get(&url).send().await;
    assert!(refused.is_err(), "a host's certificate passed for the control plane: {refused:?}");
    let real = cloud.agent_url().replace("127.0.0.1", "localhost");
    let resp = agents.get(format!("{real}/healthz")).send().await.expect("the control plane's certificate carries its name");
    assert!(resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND, "{}", resp.status());
    server.abort();
}
