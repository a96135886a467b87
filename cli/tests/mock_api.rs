//! The `nimbus` binary against a scripted in-process HTTP server: request
//! encoding, pagination, `--wait`, output and exit codes. (Tests against a real
//! control plane live in the workspace's `tests` crate.)

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
struct Req {
    method: String,
    target: String,
    auth: Option<String>,
    body: String,
}

type Log = Arc<Mutex<Vec<Req>>>;

/// Serves `handler` on a loopback port until the test process exits.
fn serve(mut handler: impl FnMut(&Req) -> (u16, String) + Send + 'static) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let log: Log = Arc::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() || line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_string();
            let target = parts.next().unwrap_or_default().to_string();
            let (mut len, mut auth) = (0usize, None);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or((&h, ""));
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "authorization" => auth = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let req = Req { method, target, auth, body: String::from_utf8_lossy(&body).into_owned() };
            log2.lock().unwrap().push(req.clone());
            let (status, resp) = handler(&req);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{resp}",
                resp.len()
            );
        }
    });
    (endpoint, log)
}

fn nimbus(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(["--endpoint", endpoint, "--token", "tok"])
        .args(args)
        .env_remove("NIMBUS_ENDPOINT")
        .env_remove("NIMBUS_TOKEN")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(state: &str) -> u16 {
    match state {
        "pending" => 0,
        "running" => 16,
        "shutting-down" => 32,
        "terminated" => 48,
        _ => 80,
    }
}

fn inst(id: &str, state: &str) -> Value {
    json!({
        "instance_id": id, "reservation_id": "r-0123456789abcdef0", "image_id": "ami-0123456789abcdef0",
        "instance_type": "t3.micro", "state": {"code": code(state), "name": state}, "availability_zone": "az-1",
        "host_id": "h-1", "launch_time": "2026-11-25T15:00:00Z", "ami_launch_index": 0
    })
}

const A: &str = "i-0000000000000000a";
const B: &str = "i-0000000000000000b";

#[test]
fn describe_instances_follows_pages_and_sends_filters_and_token() {
    let (ep, log) = serve(|r| {
        if r.target.contains("next_token=t2") {
            (200, json!({"instances": [inst(B, "pending")]}).to_string())
        } else {
            (200, json!({"instances": [inst(A, "running")], "next_token": "t2"}).to_string())
        }
    });
    let o = nimbus(&ep, &["describe-instances", "--state", "running,pending", "--availability-zone", "az-1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(A) && out.contains(B), "{out}");
    assert!(!out.contains("NEXT TOKEN"));
    let reqs = log.lock().unwrap().clone();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].target, "/v1/instances?state=running%2Cpending&availability_zone=az-1");
    assert_eq!(reqs[1].target, "/v1/instances?state=running%2Cpending&availability_zone=az-1&next_token=t2");
    assert_eq!(reqs[0].auth.as_deref(), Some("Bearer tok"));

    // JSON: every page's instances in one body.
    let o = nimbus(&ep, &["describe-instances", "-o", "json"]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["instances"].as_array().unwrap().len(), 2);

    // --max-results: one page, and the token of the next.
    let o = nimbus(&ep, &["describe-instances", "--max-results", "1"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("NEXT TOKEN: t2"), "{}", stdout(&o));
    assert!(!stdout(&o).contains(B));
    assert!(log.lock().unwrap().last().unwrap().target.ends_with("?max_results=1"));
}

#[test]
fn run_instances_wait_until_running() {
    let polls = Arc::new(Mutex::new(0));
    let p = polls.clone();
    let (ep, log) = serve(move |r| match r.method.as_str() {
        "POST" => (
            200,
            json!({"reservation_id": "r-0123456789abcdef0", "owner_id": "000000000001",
                   "instances": [inst(A, "pending"), inst(B, "pending")]})
            .to_string(),
        ),
        _ => {
            let mut n = p.lock().unwrap();
            *n += 1;
            let st = if *n == 1 { "pending" } else { "running" };
            (200, json!({"instances": [inst(A, "running"), inst(B, st)]}).to_string())
        }
    });
    let o = nimbus(
        &ep,
        &["run-instances", "--instance-type", "t3.micro", "--min-count", "1", "--max-count", "2", "--user-data", "hello",
          "--client-token", "c1", "--wait", "--timeout", "30", "-o", "json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["reservation_id"], "r-0123456789abcdef0");
    assert_eq!(v["instances"][1]["state"]["name"], "running");
    let reqs = log.lock().unwrap().clone();
    let sent: Value = serde_json::from_str(&reqs[0].body).unwrap();
    assert_eq!(
        sent,
        json!({"image_id": null, "instance_type": "t3.micro", "min_count": 1, "max_count": 2,
               "availability_zone": null, "user_data": "aGVsbG8=", "client_token": "c1"})
    );
    assert_eq!(reqs[1].target, format!("/v1/instances?instance_id={A}%2C{B}"));
    assert_eq!(*polls.lock().unwrap(), 2);
}

#[test]
fn run_instances_wait_fails_with_state_reason() {
    let (ep, _log) = serve(|r| match r.method.as_str() {
        "POST" => (200, json!({"reservation_id": "r-1", "owner_id": "o", "instances": [inst(A, "pending")]}).to_string()),
        _ => {
            let mut i = inst(A, "shutting-down");
            i["state_reason"] = json!("Server.InternalError: image fetch failed");
            (200, json!({"instances": [i]}).to_string())
        }
    });
    let o = nimbus(&ep, &["run-instances", "--instance-type", "t3.micro", "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Server.InternalError: image fetch failed"), "{}", stderr(&o));
}

#[test]
fn terminate_wait_reports_terminated() {
    let (ep, log) = serve(|r| match r.method.as_str() {
        "POST" => (
            200,
            json!({"terminating_instances": [{"instance_id": A, "previous_state": {"code": 16, "name": "running"},
                                              "current_state": {"code": 32, "name": "shutting-down"}}]})
            .to_string(),
        ),
        _ => (200, json!({"instances": [inst(A, "terminated")]}).to_string()),
    });
    let o = nimbus(&ep, &["terminate-instances", A, "--wait"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o).lines().nth(1).unwrap().to_string();
    assert!(line.contains("running") && line.contains("terminated"), "{line}");
    let reqs = log.lock().unwrap().clone();
    assert_eq!(reqs[0].target, "/v1/instances/terminate");
    assert_eq!(serde_json::from_str::<Value>(&reqs[0].body).unwrap(), json!({"instance_ids": [A]}));
}

#[test]
fn api_errors_and_bad_responses_exit_1_with_a_clear_line() {
    let (ep, _log) = serve(|r| {
        if r.target.starts_with("/v1/hosts") {
            (401, json!({"code": "AuthFailure", "message": "invalid token", "request_id": "req-7"}).to_string())
        } else {
            (200, "surprise".to_string())
        }
    });
    let o = nimbus(&ep, &["describe-hosts"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim_end(), "error: AuthFailure: invalid token (request id req-7)");
    let o = nimbus(&ep, &["describe-images"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("error: unexpected response from"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn register_image_posts_manifest_with_file_url() {
    let (ep, log) = serve(|r| {
        let req: Value = serde_json::from_str(&r.body).unwrap();
        let image = json!({
            "image_id": "ami-0123456789abcdef0", "name": req["name"], "description": null, "owner_id": "o",
            "source_url": req["source_url"], "kernel": req["kernel"], "initrd": req["initrd"],
            "root_disk": req["root_disk"], "cmdline": req["cmdline"], "default": req["default"],
            "state": "available", "creation_date": "2026-11-25T15:00:00Z"
        });
        (200, image.to_string())
    });
    let dir = tempfile::tempdir().unwrap();
    let sha = "a".repeat(64);
    let manifest = json!({"name": "nimbus-tiny", "kernel": "vmlinuz", "initrd": "initrd.img", "root_disk": "rootfs.qcow2",
                          "cmdline": "console=ttyS0", "sha256": {"vmlinuz": sha, "initrd.img": sha, "rootfs.qcow2": sha},
                          "recipe_version": 1});
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest.to_string()).unwrap();
    let o = nimbus(&ep, &["register-image", "--manifest", path.to_str().unwrap(), "--default"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("ami-0123456789abcdef0"));
    let sent: Value = serde_json::from_str(&log.lock().unwrap()[0].body).unwrap();
    let abs = std::fs::canonicalize(dir.path()).unwrap();
    assert_eq!(sent["source_url"], format!("file://{}", abs.display()));
    assert_eq!(sent["default"], true);
    assert_eq!(sent["root_disk"], json!({"name": "rootfs.qcow2", "sha256": sha}));
}

#[test]
fn usage_and_connection_errors() {
    let o = Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(["describe-hosts"])
        .env_remove("NIMBUS_TOKEN")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("NIMBUS_TOKEN"));
    // A port nothing listens on: bind, note, drop.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ep = format!("http://127.0.0.1:{port}");
    let o = nimbus(&ep, &["describe-hosts"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains(&ep), "{}", stderr(&o));
}
