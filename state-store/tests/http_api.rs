//! Network API: typed client over HTTP, admin view, bad input, and
//! durability of acknowledged writes across SIGKILL of a node process.

use nimbus_state_store::{Context, HttpClient, KvClient, StoreError};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_node(addr: &str, dir: &std::path::Path, seeds: &[String], n: usize) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_store-node"))
        .args(["--listen", addr, "--data-dir"])
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
        addrs.iter().enumerate().map(|(i, a)| Some(spawn_node(a, &dir.path().join(format!("n{i}")), &addrs, 3))).collect();
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

    // acknowledged writes survive SIGKILL of every node
    for i in 0..300 {
        clients[i % 3].put(format!("d-{i}").as_bytes(), format!("v{i}").into_bytes(), &Context::empty()).await.expect("put");
    }
    let view = c0.admin().await.expect("admin");
    assert_eq!(view.ring_tokens.values().sum::<usize>(), 256);
    for p in procs.iter_mut() {
        if let Some(mut p) = p.take() {
            p.0.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
            let _ = p.0.wait();
        }
    }
    for (i, a) in addrs.iter().enumerate() {
        procs[i] = Some(spawn_node(a, &dir.path().join(format!("n{i}")), &addrs, 3));
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
