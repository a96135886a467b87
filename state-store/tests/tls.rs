//! Mutual TLS between real `store-node` processes on loopback, with
//! certificates made in the test: a TLS cluster serves and repairs end to
//! end; peers and clients without a valid certificate are refused and
//! write nothing; a client refuses a node whose certificate does not name it.

mod support;
use nimbus_state_store::rpc::{Request, Transport};
use nimbus_state_store::tls::dev::{self, DevCa};
use nimbus_state_store::{Context, HttpClient, KvClient, RpcError, StoreError, TcpClient, TcpTransport, TlsConfig};
use std::sync::Arc;
use std::time::Duration;
use support::{eventually, exit_of, free_addr, spawn_tls_node, tls_node_command, Pki, Proc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

/// Whether every node in `clients` sees `alive` members alive.
async fn all_see(clients: &[HttpClient], alive: usize) -> bool {
    for c in clients {
        match c.admin().await {
            Ok(v) if v.members.iter().filter(|m| m.alive).count() >= alive => {}
            _ => return false,
        }
    }
    true
}

/// A TLS client configuration that trusts `ca_pem` and presents no
/// certificate.
fn no_cert_config(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("add root");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A reqwest client that trusts `ca_pem` and presents no certificate.
fn no_cert_https(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder().use_preconfigured_tls(no_cert_config(ca_pem)).build().expect("client")
}
use rustls_pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_serves_and_hands_off_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&dir.path().join("pki"));
    let addrs: Vec<String> = (0..4).map(|_| free_addr()).collect();
    let spawn = |i: usize| spawn_tls_node(&pki, &addrs[i], &dir.path().join(format!("n{i}")), &addrs, &[]);
    let mut procs: Vec<Option<Proc>> = (0..4).map(|i| Some(spawn(i))).collect();
    let tls = pki.client();
    let admins: Vec<HttpClient> = addrs.iter().map(|a| HttpClient::with_tls(a, T, &tls)).collect();
    eventually("all four nodes see each other", Duration::from_secs(30), || all_see(&admins, 4)).await;

    // a node started with other ring parameters is refused at its join,
    // and store-node exits saying why
    let mut cmd = tls_node_command(&pki, &free_addr(), &dir.path().join("bad"), &addrs[..1], &["--partitions", "64"]);
    let mut bad = Proc(cmd.stderr(std::process::Stdio::piped()).spawn().expect("spawn"));
    let (status, stderr) = exit_of(&mut bad, Duration::from_secs(30)).await;
    assert!(!status.success(), "a refused node exits with an error");
    assert!(stderr.contains("ring parameters disagree") && stderr.contains("partitions=64"), "{stderr}");
    for a in &admins {
        assert_eq!(a.admin().await.expect("admin").ring_tokens.len(), 4, "the ring kept its four nodes");
    }

    // a write over the framed protocol on one node reads back over HTTP
    // on another
    let tcp0 = TcpClient::with_tls(&addrs[0], T, tls.clone());
    tcp0.put(b"instance/i-1", b"running".to_vec(), &Context::empty()).await.expect("put over TLS");
    let got = admins[1].get(b"instance/i-1").await.expect("get over TLS");
    assert_eq!(got.values, vec![b"running".to_vec()]);

    // hinted handoff over TLS: n3 is down while keys are written, a
    // stand-in keeps its copies and hands them over when n3 is back
    if let Some(mut p) = procs[3].take() {
        p.0.kill().expect("SIGKILL");
        let _ = p.0.wait();
    }
    let keys: Vec<String> = (0..40).map(|i| format!("h-{i}")).collect();
    for k in &keys {
        tcp0.put(k.as_bytes(), k.clone().into_bytes(), &Context::empty()).await.expect("sloppy put");
    }
    let view = admins[0].admin().await.expect("admin");
    let n3_keys = keys
        .iter()
        .filter(|k| {
            let p = nimbus_state_store::ring::partition_of(k.as_bytes(), view.partitions);
            view.preference_lists[p as usize].contains(&addrs[3])
        })
        .count();
    assert!(n3_keys > 0);
    let held = || async {
        let mut sum = 0;
        for a in &admins[..3] {
            sum += a.admin().await.map(|v| v.hints_by_owner.get(&addrs[3]).copied().unwrap_or(0)).unwrap_or(0);
        }
        sum
    };
    eventually("stand-ins hold a hint for every key of n3", T, || async { held().await as usize == n3_keys }).await;
    procs[3] = Some(spawn(3));
    eventually("n3 holds its keys once the hints are delivered", Duration::from_secs(30), || async {
        held().await == 0 && admins[3].admin().await.is_ok_and(|v| v.stored_keys as usize >= n3_keys)
    })
    .await;
    for k in &keys {
        let r = admins[3].get(k.as_bytes()).await.expect("get through n3");
        assert_eq!(r.values, vec![k.clone().into_bytes()]);
    }

    // anti-entropy over TLS, on demand: n3 loses its disk and comes back
    // with the periodic rounds an hour apart; one round run now restores
    // every key it replicates
    if let Some(mut p) = procs[3].take() {
        p.0.kill().expect("SIGKILL");
        let _ = p.0.wait();
    }
    std::fs::remove_dir_all(dir.path().join("n3")).expect("wipe n3");
    procs[3] = Some(spawn_tls_node(&pki, &addrs[3], &dir.path().join("n3"), &addrs, &["--anti-entropy-ms", "3600000"]));
    eventually("n3 is back and sees the others", Duration::from_secs(30), || all_see(&admins[3..], 4)).await;
    assert_eq!(admins[3].admin().await.expect("admin").stored_keys, 0, "n3 starts empty");
    let report = admins[3].anti_entropy().await.expect("anti-entropy round");
    assert!(report.round >= 1 && report.failed_exchanges == 0, "{report:?}");
    let expected = n3_keys
        + usize::from(view.preference_lists[nimbus_state_store::ring::partition_of(b"instance/i-1", 256) as usize].contains(&addrs[3]));
    assert_eq!(report.keys_repaired, expected, "{report:?}");
    assert_eq!(admins[3].admin().await.expect("admin").stored_keys as usize, expected);
    drop(procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_and_clients_without_a_valid_certificate_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&dir.path().join("pki"));
    let addr = free_addr();
    let _node = spawn_tls_node(&pki, &addr, &dir.path().join("n0"), &[], &["--n", "1", "--r", "1", "--w", "1"]);
    let good = HttpClient::with_tls(&addr, T, &pki.client());
    eventually("the node answers", Duration::from_secs(30), || async { good.admin().await.is_ok() }).await;
    let ca_pem = pki.ca.ca_pem();

    // certificates that do not chain to the cluster CA, held by clients
    // that trust the cluster CA (so only the server's check refuses them)
    let self_signed = dev::self_signed(&["nimbus-test-client"]).expect("self-signed");
    let other_ca = DevCa::new("another CA").expect("CA").issue(&["nimbus-test-client"]).expect("issue");
    let bad: Vec<(&str, TlsConfig)> = [("self-signed", &self_signed), ("other CA", &other_ca)]
        .into_iter()
        .map(|(what, i)| (what, TlsConfig::from_pem(ca_pem.as_bytes(), i.cert_pem.as_bytes(), i.key_pem.as_bytes()).expect("cfg")))
        .collect();
    for (what, cfg) in &bad {
        let key = format!("bad-{what}");
        // as a client, over both protocols
        let r = TcpClient::with_tls(&addr, T, cfg.clone()).put(key.as_bytes(), b"v".to_vec(), &Context::empty()).await;
        assert!(matches!(r, Err(StoreError::Tls(_))), "{what} over the framed protocol: {r:?}");
        // (Over HTTP the refusal may also close the connection as the
        // request is handed to it, before any of it is sent.)
        let r = HttpClient::with_tls(&addr, T, cfg).put(key.as_bytes(), b"v".to_vec(), &Context::empty()).await;
        let refused = match &r {
            Err(StoreError::Tls(_)) => true,
            Err(StoreError::Transport(m)) => m.starts_with(nimbus_state_store::clients::NEVER_SENT),
            _ => false,
        };
        assert!(refused, "{what} over HTTP: {r:?}");
        assert!(good.get(key.as_bytes()).await.expect("get").values.is_empty(), "{what}: nothing was written");
        // as a peer: a replica write, as a node would send it
        let record = nimbus_state_store::clock::Record::default();
        let peer = TcpTransport::with_tls(cfg.clone());
        let r = peer.call(&"127.0.0.1:1".to_string(), &addr, Request::Put { key: key.clone().into_bytes(), record }).await;
        assert!(matches!(r, Err(RpcError::Tls { .. })), "{what} as a peer: {r:?}");
    }

    // no TLS at all
    let r = TcpClient::new(&addr, T).put(b"plain", b"v".to_vec(), &Context::empty()).await;
    assert!(matches!(&r, Err(StoreError::Tls(m)) if m.contains("requires TLS")), "plaintext framed client: {r:?}");
    let r = HttpClient::with_timeout(&addr, T).put(b"plain", b"v".to_vec(), &Context::empty()).await;
    assert!(r.is_err(), "plaintext HTTP client: {r:?}");

    // TLS without a client certificate: probes only
    let anon = no_cert_https(&ca_pem);
    let url = |p: &str| format!("https://{addr}{p}");
    assert_eq!(anon.get(url("/healthz")).send().await.expect("healthz").status(), 200);
    assert_eq!(anon.get(url("/readyz")).send().await.expect("readyz").status(), 200);
    let body = nimbus_state_store::codec::encode(&nimbus_state_store::clients::PutRequest {
        key: b"anon".to_vec(),
        value: Some(b"v".to_vec()),
        context: String::new(),
    });
    for (method, path) in [
        ("POST", "/v1/put"),
        ("POST", "/v1/get"),
        ("GET", "/admin"),
        ("GET", "/metrics"),
        ("POST", "/internal/rpc"),
        ("POST", "/admin/leave"),
    ] {
        let req = anon.request(method.parse().expect("method"), url(path)).body(body.clone());
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status(), 401, "{method} {path} without a certificate");
        let err: nimbus_state_store::http::ErrorBody =
            serde_json::from_slice(&resp.bytes().await.expect("body")).expect("typed error body");
        assert_eq!(err.code, "Unauthenticated");
    }
    // and the framed protocol without a certificate is refused at the magic
    {
        let cfg = no_cert_config(&ca_pem);
        let tcp = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        let name = nimbus_state_store::tls::server_name(&addr).expect("name");
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.expect("handshake");
        s.write_all(b"NMB1").await.expect("magic");
        s.flush().await.expect("flush");
        let mut answer = [0u8; 4];
        s.read_exact(&mut answer).await.expect("answer");
        assert_eq!(&answer, b"NMB0", "refused");
    }

    // nothing of all that was written
    for k in ["bad-self-signed", "bad-other CA", "plain", "anon"] {
        let r = good.get(k.as_bytes()).await.expect("get");
        assert!(r.values.is_empty() && !r.deleted, "{k} was written");
    }
    assert_eq!(good.admin().await.expect("admin").stored_keys, 0);
    // a valid client still works
    good.put(b"ok", b"v".to_vec(), &Context::empty()).await.expect("good put");
    assert_eq!(good.get(b"ok").await.expect("get").values, vec![b"v".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_refuse_a_node_whose_certificate_is_not_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&dir.path().join("pki"));
    // a node whose certificate names another address: store-node refuses
    // to start with it...
    let addr = free_addr();
    let wrong = pki.ca.issue(&["127.0.0.2", "store.example"]).expect("issue");
    let name = format!("node-{}", addr.replace([':', '.'], "-"));
    pki.write(&name, &wrong);
    let mut cmd = tls_node_command(&pki, &addr, &dir.path().join("n0"), &[], &["--n", "1"]);
    let mut refused = Proc(cmd.stderr(std::process::Stdio::piped()).spawn().expect("spawn"));
    let (status, stderr) = exit_of(&mut refused, Duration::from_secs(30)).await;
    assert!(!status.success() && stderr.contains("not valid for"), "{stderr}");
    // ...and a library node serving with it is refused by its clients
    let wrong_tls = TlsConfig::from_pem(pki.ca.ca_pem().as_bytes(), wrong.cert_pem.as_bytes(), wrong.key_pem.as_bytes()).expect("cfg");
    let mut cfg = nimbus_state_store::Config::new(addr.clone(), dir.path().join("n0"));
    (cfg.n, cfg.r, cfg.w) = (1, 1, 1);
    let node = nimbus_state_store::Node::start(cfg, Arc::new(TcpTransport::with_tls(wrong_tls.clone()))).await.expect("start");
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    let server = nimbus_state_store::tcp::serve_tls(node.clone(), listener, wrong_tls);
    // a node of another CA on a second port
    let other = Pki::new(&dir.path().join("other"));
    let addr2 = free_addr();
    let _node2 = spawn_tls_node(&other, &addr2, &dir.path().join("n1"), &[], &["--n", "1", "--r", "1", "--w", "1"]);
    let tls = pki.client();
    for (a, what) in [(&addr, "wrong name"), (&addr2, "other CA")] {
        let client = TcpClient::with_tls(a, T, tls.clone());
        let start = std::time::Instant::now();
        let r = loop {
            // refused connections until the node listens
            match client.get(b"k").await {
                Err(StoreError::Transport(_)) if start.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(25)).await
                }
                r => break r,
            }
        };
        assert!(matches!(r, Err(StoreError::Tls(_))), "{what}: {r:?}");
    }
    // the same node is fine for a client that checks what it is given
    let ok = TcpClient::with_tls(&addr2, T, other.client());
    assert!(ok.get(b"k").await.is_ok());
    server.abort();
    node.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_the_magic_is_unreachable_not_lost() {
    // accepts connections and never answers: nothing was sent, so the
    // coordinator may try another node (a lost request would not be)
    let (addr, silent) = support::silent_server().await;
    let record = nimbus_state_store::clock::Record::default();
    let (transport, me) = (TcpTransport::new(), "me:1".to_string());
    let call = transport.call(&me, &addr, Request::Put { key: b"k".to_vec(), record });
    let r = tokio::time::timeout(Duration::from_secs(20), call).await.expect("bounded by the handshake timeout");
    assert!(matches!(r, Err(RpcError::Unreachable(_))), "{r:?}");
    silent.abort();
}
