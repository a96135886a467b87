//! Network API: typed client over HTTP, admin view, bad input, and
//! durability of acknowledged writes across SIGKILL of a node process.
//! The first test runs the nodes with the HTTP node-to-node transport and
//! an fsync before every acknowledgement (`--fsync always`, group commit
//! on a writer thread), the second with the framed TCP transport and the
//! default periodic fsync (writes committed on the caller's thread).

mod support;
use nimbus_state_store::clients::PutRequest;
use nimbus_state_store::codec;
use nimbus_state_store::{Context, HttpClient, KvClient, StoreError, TcpClient};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, Proc};

fn spawn_node(addr: &str, dir: &std::path::Path, seeds: &[String], n: usize, transport: &str) -> Proc {
    let fsync = if transport == "http" { "always" } else { "100ms" };
    let child = Command::new(env!("CARGO_BIN_EXE_store-node"))
        .args(["--insecure-plaintext", "--transport", transport, "--fsync", fsync, "--listen", addr, "--data-dir"])
        .arg(dir)
        .args(["--seeds", &seeds.join(","), "--n", &n.to_string(), "--r", &n.min(2).to_string(), "--w", &n.min(2).to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn store-node");
    Proc(child)
}

async fn wait_ready(c: &HttpClient, members: usize) {
    let start = Instant::now();
    loop {
        if let Ok(v) = c.admin().await {
            if v.members.iter().filter(|m| m.alive).count() >= members {
                return;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "node not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_cluster_api_bad_input_and_sigkill_durability() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut procs: Vec<Option<Proc>> =
        addrs.iter().enumerate().map(|(i, a)| Some(spawn_node(a, &dir.path().join(format!("n{i}")), &addrs, 3, "http"))).collect();
    let clients: Vec<HttpClient> = addrs.iter().map(|a| HttpClient::new(a)).collect();
    for c in &clients {
        wait_ready(c, 3).await;
    }

    // typed API round trip, siblings and contexts over the network
    let c0 = &clients[0];
    c0.put(b"i-1", b"pending".to_vec(), &Context::empty()).await.expect("put");
    clients[1].put(b"i-1", b"running".to_vec(), &Context::empty()).await.expect("concurrent put");
    let r = clients[2].get(b"i-1").await.expect("get");
    let mut vals = r.values.clone();
    vals.sort();
    assert_eq!(vals, vec![b"pending".to_vec(), b"running".to_vec()], "blind writes are siblings");
    c0.put(b"i-1", b"stopped".to_vec(), &r.context).await.expect("put with context");
    assert_eq!(clients[1].get(b"i-1").await.expect("get").values, vec![b"stopped".to_vec()]);

    // the context returned by put lets a writer overwrite its own write
    let ctx = c0.put(b"i-2", b"a".to_vec(), &Context::empty()).await.expect("put");
    clients[1].put(b"i-2", b"b".to_vec(), &ctx).await.expect("overwrite");
    assert_eq!(clients[2].get(b"i-2").await.expect("get").values, vec![b"b".to_vec()]);

    // bad input is a typed error
    let big_key = vec![b'k'; 2000];
    assert!(matches!(c0.get(&big_key).await, Err(StoreError::KeyTooLarge { .. })));
    assert!(matches!(c0.get(b"").await, Err(StoreError::EmptyKey)));
    let big_val = vec![0u8; nimbus_state_store::error::MAX_VALUE_BYTES + 1];
    assert!(matches!(c0.put(b"k", big_val, &Context::empty()).await, Err(StoreError::ValueTooLarge { .. })));
    assert!(matches!(c0.put_raw_context(b"k", Some(b"v".to_vec()), "!!not-base64!!").await, Err(StoreError::BadContext(_))));
    assert!(matches!(c0.put_raw_context(b"k", Some(b"v".to_vec()), "AAAA").await, Err(StoreError::BadContext(_))));
    // the node checks too: raw requests that skip the client's checks
    let raw_put = |key: Vec<u8>, value: Vec<u8>| {
        let body = codec::encode(&PutRequest { key, value: Some(value), context: String::new() });
        let url = format!("http://{}/v1/put", addrs[0]);
        async move {
            let resp = reqwest::Client::new().post(url).body(body).send().await.expect("post");
            assert!(resp.status().is_success(), "a typed error in the body, not {}", resp.status());
            let b = resp.bytes().await.expect("body");
            codec::decode::<Result<String, StoreError>>(&b, 1 << 20).expect("decode")
        }
    };
    assert!(matches!(raw_put(big_key.clone(), b"v".to_vec()).await, Err(StoreError::KeyTooLarge { .. })));
    assert!(matches!(raw_put(Vec::new(), b"v".to_vec()).await, Err(StoreError::EmptyKey)));
    let too_big = vec![0u8; nimbus_state_store::error::MAX_VALUE_BYTES + 1];
    assert!(matches!(raw_put(b"k".to_vec(), too_big).await, Err(StoreError::ValueTooLarge { .. })));
    for c in &clients {
        let r = c.get(b"k").await.expect("get");
        assert!(r.values.is_empty(), "refused writes left nothing behind");
    }

    // acknowledged writes survive SIGKILL of every node
    for i in 0..300 {
        clients[i % 3].put(format!("d-{i}").as_bytes(), format!("v{i}").into_bytes(), &Context::empty()).await.expect("put");
    }
    let view = c0.admin().await.expect("admin");
    assert_eq!(view.ring_tokens.values().sum::<usize>(), 256);
    assert_eq!(view.preference_lists.len(), 256);
    assert!(view.preference_lists.iter().all(|pl| pl.len() == 3));
    assert_eq!(view.members.iter().filter(|m| m.alive).count(), 3);
    for p in procs.iter_mut() {
        if let Some(mut p) = p.take() {
            p.0.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
            let _ = p.0.wait();
        }
    }
    for (i, a) in addrs.iter().enumerate() {
        procs[i] = Some(spawn_node(a, &dir.path().join(format!("n{i}")), &addrs, 3, "http"));
    }
    for c in &clients {
        wait_ready(c, 3).await;
    }
    for i in 0..300 {
        let r = clients[(i + 1) % 3].get(format!("d-{i}").as_bytes()).await.expect("get after restart");
        assert_eq!(r.values, vec![format!("v{i}").into_bytes()], "key d-{i}");
    }
    // explicit leave over the admin API: the other two keep every key
    let (handed, _) = clients[2].leave().await.expect("leave");
    assert!(handed > 0);
    for i in 0..300 {
        let r = clients[i % 2].get(format!("d-{i}").as_bytes()).await.expect("get after leave");
        assert_eq!(r.values, vec![format!("v{i}").into_bytes()], "key d-{i} after leave");
    }
    drop(procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_concurrent_writes_loses_no_acknowledged_write() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let spawn = |i: usize| spawn_node(&addrs[i], &dir.path().join(format!("n{i}")), &addrs, 3, "tcp");
    let procs: Arc<Mutex<Vec<Option<Proc>>>> = Arc::new(Mutex::new((0..3).map(|i| Some(spawn(i))).collect()));
    let clients: Vec<HttpClient> = addrs.iter().map(|a| HttpClient::new(a)).collect();
    for c in &clients {
        wait_ready(c, 3).await;
    }
    let acked = Arc::new(Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..8usize {
        // writers talk to nodes 0 and 2; node 1 is the one being killed
        let client = clients[if w % 2 == 0 { 0 } else { 2 }].clone();
        let (acked, done) = (acked.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..200 {
                let key = format!("w{w}-{i}");
                let val = format!("{key}-v").into_bytes();
                if client.put(key.as_bytes(), val.clone(), &Context::empty()).await.is_ok() {
                    acked.lock().expect("acked").push((key, val));
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // SIGKILL node 1 mid-stream, restart it on the same store later
    while done.load(Ordering::SeqCst) < 400 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(mut p) = procs.lock().expect("procs")[1].take() {
        p.0.kill().expect("SIGKILL");
        let _ = p.0.wait();
    }
    while done.load(Ordering::SeqCst) < 1000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    procs.lock().expect("procs")[1] = Some(spawn(1));
    for w in writers {
        w.await.expect("writer");
    }
    // now SIGKILL everything and restart: every acknowledged write is there
    for p in procs.lock().expect("procs").iter_mut() {
        if let Some(mut p) = p.take() {
            p.0.kill().expect("SIGKILL");
            let _ = p.0.wait();
        }
    }
    for i in 0..3 {
        procs.lock().expect("procs")[i] = Some(spawn(i));
    }
    for c in &clients {
        wait_ready(c, 3).await;
    }
    let acked = acked.lock().expect("acked").clone();
    // read back through both network clients: HTTP and the framed protocol
    let tcp_clients: Vec<TcpClient> = addrs.iter().map(|a| TcpClient::new(a, Duration::from_secs(5))).collect();
    assert!(matches!(tcp_clients[0].get(&[b'k'; 2000]).await, Err(StoreError::KeyTooLarge { .. })));
    let mut missing = 0;
    for (i, (k, v)) in acked.iter().enumerate() {
        let r = if i % 2 == 0 {
            clients[i % 3].get(k.as_bytes()).await.expect("get")
        } else {
            tcp_clients[i % 3].get(k.as_bytes()).await.expect("get over tcp")
        };
        if !r.values.contains(v) {
            missing += 1;
        }
    }
    println!("sigkill: acknowledged={} missing={missing}", acked.len());
    assert!(acked.len() > 1000, "most writes acknowledged: {}", acked.len());
    assert_eq!(missing, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_client_requests_to_a_silent_node_end_with_the_timeout() {
    // a "node" that accepts connections and never answers
    let (addr, silent) = support::silent_server().await;
    let client = HttpClient::with_timeout(&addr, Duration::from_millis(300));
    let bound = Duration::from_secs(5);
    let empty = Context::empty();
    let put = tokio::time::timeout(bound, client.put(b"k", b"v".to_vec(), &empty));
    let err = put.await.expect("the client's timeout ends the put").expect_err("no answer");
    assert!(matches!(err, StoreError::OutcomeUnknown(_)), "a write that may have been sent: {err:?}");
    let get = tokio::time::timeout(bound, client.get(b"k")).await.expect("the client's timeout ends the get");
    assert!(get.is_err());
    silent.abort();
}
