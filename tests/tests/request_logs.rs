//! Request spans in the control plane's log: each line of a request names
//! that request alone, however many requests run at once.
//!
//! Its own test binary: it installs the process's tracing subscriber (a
//! buffer it reads back) before the cloud starts.

use nimbus_tests::{instance_ids, Cloud};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// 32 launches and 32 describes at once on one thread (the current-thread
/// runtime interleaves every request there): with a span entered across an
/// await, a request's span was created inside another's and its lines named
/// both (the 17-KB lines of issue 23). Now every line names exactly one
/// request id, each launch's "instances launched" line names its own, and
/// the response's `x-request-id` is the one its lines carry.
#[tokio::test]
async fn every_log_line_names_exactly_one_request() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt().with_env_filter("nimbus_control_plane=debug").with_ansi(false).with_writer(move || writer.clone()).init();
    let cloud = Cloud::start().await.unwrap();
    let _agent = cloud.add_agent("a", "az1", 256, 1 << 20, 10_000).await.unwrap();
    cloud.register_test_image().await.unwrap();

    let launches = (0..32).map(|_| async {
        let resp = cloud
            .http
            .post(format!("{}/v1/instances", cloud.url))
            .bearer_auth(&cloud.user_token)
            .json(&json!({"instance_type": "t3.nano"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let body: serde_json::Value = resp.json().await.unwrap();
        (id, instance_ids(&body))
    });
    let describes = (0..32).map(|_| async { cloud.call(Method::GET, "/v1/instances", None).await.unwrap().0 });
    let (launched, described) = tokio::join!(futures::future::join_all(launches), futures::future::join_all(describes));
    assert!(described.iter().all(|s| *s == StatusCode::OK));

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let with_ids: Vec<&str> = text.lines().filter(|l| l.contains("request_id=")).collect();
    for line in &with_ids {
        assert_eq!(line.matches("request_id=").count(), 1, "a line names several requests: {line}");
    }
    for (request_id, instances) in &launched {
        let line = with_ids
            .iter()
            .find(|l| l.contains("instances launched") && l.contains(&format!("request_id={request_id}")))
            .unwrap_or_else(|| panic!("no 'instances launched' line for request {request_id} ({instances:?}) in:\n{text}"));
        assert!(line.contains("path=/v1/instances"), "{line}");
    }
}
