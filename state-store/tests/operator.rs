//! The operator's surface of a TLS cluster of `store-node` processes: the
//! JSON endpoints (text and base64 values, contexts, siblings, typed 4xx
//! errors that write nothing), the `store-node get|put|delete|anti-entropy`
//! commands, and the health, readiness and metrics endpoints.

mod support;
use nimbus_state_store::json::{JsonGetRequest, JsonPutRequest, JsonValue};
use nimbus_state_store::{JsonClient, TcpClient};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use support::{eventually, free_addr, spawn_tls_node, Pki, Proc};

const T: Duration = Duration::from_secs(10);

fn text(v: &str) -> JsonValue {
    JsonValue::Text { value: v.to_string() }
}

fn get_req(key: &str) -> JsonGetRequest {
    JsonGetRequest { key: Some(key.into()), key_base64: None }
}

fn put_req(key: &str, value: &str, context: Option<String>) -> JsonPutRequest {
    JsonPutRequest { key: Some(key.into()), value: Some(value.into()), context, ..Default::default() }
}

/// Run `store-node <args>` (an operator command) with `stdin`.
fn cli(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-node"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn store-node");
    if let Some(mut i) = child.stdin.take() {
        std::io::Write::write_all(&mut i, stdin).expect("stdin");
    }
    child.wait_with_output().expect("output")
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "command failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

struct Cluster {
    dir: tempfile::TempDir,
    pki: Pki,
    addrs: Vec<String>,
    procs: Vec<Proc>,
}

async fn tls_cluster(n: usize) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&dir.path().join("pki"));
    let addrs: Vec<String> = (0..n).map(|_| free_addr()).collect();
    let procs = (0..n).map(|i| spawn_tls_node(&pki, &addrs[i], &dir.path().join(format!("n{i}")), &addrs, &[])).collect();
    let anon = reqwest::Client::builder().danger_accept_invalid_certs(true).build().expect("client");
    for a in &addrs {
        eventually("the node is ready", Duration::from_secs(30), || async {
            anon.get(format!("https://{a}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }
    Cluster { dir, pki, addrs, procs }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_endpoints_round_trip_and_refuse_bad_input() {
    let c = tls_cluster(3).await;
    let tls = c.pki.client();
    let j: Vec<JsonClient> = c.addrs.iter().map(|a| JsonClient::new(a, Some(&tls), T)).collect();

    // text values, contexts and siblings
    let w = j[0].put(&put_req("i-1", "pending", None)).await.expect("put");
    assert!(!w.context.is_empty());
    j[1].put(&put_req("i-1", "running", None)).await.expect("concurrent blind put");
    let r = j[2].get(&get_req("i-1")).await.expect("get");
    let mut vals = r.values.clone();
    vals.sort_by_key(|v| format!("{v:?}"));
    assert_eq!(vals, vec![text("pending"), text("running")], "blind writes are siblings");
    j[0].put(&put_req("i-1", "stopped", Some(r.context))).await.expect("put with the read context");
    let r = j[1].get(&get_req("i-1")).await.expect("get");
    assert_eq!(r.values, vec![text("stopped")]);
    // a delete with the read context leaves a tombstone only
    j[2].delete(&nimbus_state_store::json::JsonDeleteRequest { key: Some("i-1".into()), key_base64: None, context: Some(r.context) })
        .await
        .expect("delete");
    let r = j[0].get(&get_req("i-1")).await.expect("get");
    assert!(r.values.is_empty() && r.deleted, "{r:?}");

    // binary keys and values go as base64; a UTF-8 value reads as text
    let bin = JsonPutRequest { key_base64: Some("AAEC/w==".into()), value_base64: Some("/wCA".into()), ..Default::default() };
    j[0].put(&bin).await.expect("binary put");
    let r = j[1].get(&JsonGetRequest { key: None, key_base64: Some("AAEC/w==".into()) }).await.expect("get");
    assert_eq!(r.values, vec![JsonValue::Base64 { value_base64: "/wCA".into() }]);
    // the bincode API sees the same bytes
    let tcp = TcpClient::with_tls(&c.addrs[2], T, tls.clone());
    use nimbus_state_store::KvClient;
    assert_eq!(tcp.get(&[0, 1, 2, 255]).await.expect("get").values, vec![vec![0xff, 0, 0x80]]);

    // bad input: a typed 4xx, and nothing written
    let raw = reqwest::Client::builder().use_preconfigured_tls((*tls.client_config()).clone()).build().expect("client");
    let big_key = "k".repeat(2000);
    let big_value = "v".repeat(nimbus_state_store::error::MAX_VALUE_BYTES + 1);
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "MalformedRequest"),
        (r#"{"key":"bad","value":"v","extra":1}"#.into(), "MalformedRequest"),
        (r#"{"key":"bad","key_base64":"YmFk","value":"v"}"#.into(), "MalformedRequest"),
        (r#"{"value":"v"}"#.into(), "MalformedRequest"),
        (r#"{"key":"bad"}"#.into(), "MalformedRequest"),
        (r#"{"key":"bad","value_base64":"!!!"}"#.into(), "MalformedRequest"),
        (r#"{"key":"","value":"v"}"#.into(), "EmptyKey"),
        (format!(r#"{{"key":"{big_key}","value":"v"}}"#), "KeyTooLarge"),
        (format!(r#"{{"key":"bad","value":"{big_value}"}}"#), "ValueTooLarge"),
        (r#"{"key":"bad","value":"v","context":"!!not-base64!!"}"#.into(), "BadContext"),
        (r#"{"key":"bad","value":"v","context":"AAAA"}"#.into(), "BadContext"),
    ];
    for (body, code) in &cases {
        let resp = raw.post(format!("https://{}/v1/json/put", c.addrs[0])).body(body.clone()).send().await.expect("post");
        assert_eq!(resp.status(), 400, "{code}: {}", &body[..body.len().min(80)]);
        let e: nimbus_state_store::http::ErrorBody = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("error body");
        assert_eq!(e.code, *code, "{}", e.message);
    }
    let resp = raw.post(format!("https://{}/v1/json/get", c.addrs[0])).body(r#"{"key":""}"#).send().await.expect("post");
    assert_eq!(resp.status(), 400);
    for jc in &j {
        let r = jc.get(&get_req("bad")).await.expect("get");
        assert!(r.values.is_empty() && !r.deleted, "a refused write left {r:?}");
    }
    drop(c.procs);
    drop(c.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_node_commands_probes_and_metrics() {
    let c = tls_cluster(3).await;
    c.pki.issue("cli", &["nimbus-cli"]);
    let flags = c.pki.flags("cli");
    let tls: Vec<&str> = flags.iter().map(String::as_str).collect();
    let on = |node: &str, cmd: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![cmd[0].to_string(), "--node".into(), node.to_string()];
        v.extend(tls.iter().map(|s| s.to_string()));
        v.extend(cmd[1..].iter().map(|s| s.to_string()));
        v
    };
    let run = |node: &str, cmd: &[&str], stdin: &[u8]| {
        let args = on(node, cmd);
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>(), stdin)
    };
    let (a0, a1, a2) = (c.addrs[0].as_str(), c.addrs[1].as_str(), c.addrs[2].as_str());

    let put = json_of(&run(a0, &["put", "cli-key", "hello"], b""));
    assert!(put["context"].as_str().is_some_and(|s| !s.is_empty()), "{put}");
    let got = json_of(&run(a1, &["get", "cli-key"], b""));
    assert_eq!(got["values"], serde_json::json!([{"value": "hello"}]));
    // without --context, put reads first and supersedes what it saw
    json_of(&run(a2, &["put", "cli-key", "world"], b""));
    assert_eq!(json_of(&run(a0, &["get", "cli-key"], b""))["values"], serde_json::json!([{"value": "world"}]));
    // --blind makes a sibling
    json_of(&run(a1, &["put", "--blind", "cli-key", "other"], b""));
    let got = json_of(&run(a2, &["get", "cli-key"], b""));
    assert_eq!(got["values"].as_array().map(Vec::len), Some(2), "{got}");
    // --context supersedes exactly what it names
    let ctx = got["context"].as_str().expect("context").to_string();
    json_of(&run(a0, &["put", "--context", &ctx, "cli-key", "merged"], b""));
    assert_eq!(json_of(&run(a1, &["get", "cli-key"], b""))["values"], serde_json::json!([{"value": "merged"}]));
    // delete reads first too
    json_of(&run(a2, &["delete", "cli-key"], b""));
    let got = json_of(&run(a0, &["get", "cli-key"], b""));
    assert_eq!((got["values"].clone(), got["deleted"].clone()), (serde_json::json!([]), serde_json::json!(true)));
    // binary values from standard input, binary keys as base64
    json_of(&run(a0, &["put", "--key-base64", "AP8=", "--value-file", "-"], &[0, 159, 146, 150]));
    let got = json_of(&run(a1, &["get", "--key-base64", "AP8="], b""));
    assert_eq!(got["values"], serde_json::json!([{"value_base64": "AJ+Slg=="}]));
    // anti-entropy on demand
    let report = json_of(&run(a2, &["anti-entropy"], b""));
    assert!(report["round"].as_u64().is_some_and(|r| r >= 1) && report["partitions"] == 256, "{report}");

    // errors: exit status 1 and the typed error on stderr, nothing written
    let out = run(a0, &["put", "--blind", "", "v"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("EmptyKey"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(a0, &["put", "--context", "!!", "ctx-key", "v"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BadContext"));
    let got = json_of(&run(a1, &["get", "ctx-key"], b""));
    assert_eq!(got["values"], serde_json::json!([]), "a refused put wrote nothing");
    let out = cli(&["get", "--node", a0, "k"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS is required"));
    let out = cli(&["get", "--node", a0, "--insecure-plaintext", "k"], b"");
    assert_eq!(out.status.code(), Some(1), "a plaintext command is refused by a TLS node");

    // probes need no certificate; metrics do, and count what was done
    let anon = reqwest::Client::builder().danger_accept_invalid_certs(true).build().expect("client");
    let get = |path: &str| anon.get(format!("https://{a0}{path}")).send();
    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);
    assert_eq!(get("/readyz").await.expect("readyz").status(), 200);
    assert_eq!(get("/metrics").await.expect("metrics").status(), 401);
    let tls = c.pki.client();
    let authed = reqwest::Client::builder().use_preconfigured_tls((*tls.client_config()).clone()).build().expect("client");
    let page = authed.get(format!("https://{a0}/metrics")).send().await.expect("metrics").text().await.expect("text");
    let sample = |series: &str| -> f64 {
        page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or_else(|| panic!("{series}"))
    };
    // on node 0: puts of hello, merged and the binary key, and the refused
    // put of ""; the reads of put and delete without --context
    assert_eq!(sample(r#"nimbus_store_requests_total{op="put",result="ok"}"#), 3.0);
    assert_eq!(sample(r#"nimbus_store_requests_total{op="put",result="error"}"#), 1.0);
    assert!(sample(r#"nimbus_store_request_duration_seconds_count{op="get"}"#) >= 3.0);
    assert_eq!(sample(r#"nimbus_store_members{status="joined",alive="true"}"#), 3.0);
    assert_eq!(sample("nimbus_store_partitions_owned"), 256.0);
    assert!(sample("nimbus_store_unauthenticated_requests_total") >= 2.0);
    assert!(page.contains("# TYPE nimbus_store_request_duration_seconds histogram"));

    // readiness: with two of three nodes gone, no quorum
    let mut procs = c.procs;
    procs.truncate(1);
    eventually("node 0 is not ready without a quorum", Duration::from_secs(20), || async {
        match get("/readyz").await {
            Ok(r) if r.status() == 503 => r.text().await.is_ok_and(|t| t.contains("NotReady") && t.contains("alive")),
            _ => false,
        }
    })
    .await;
    assert_eq!(get("/healthz").await.expect("healthz").status(), 200, "still up");
    drop(procs);
    drop(c.dir);
}
