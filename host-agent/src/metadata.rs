//! The instance metadata service (`http://169.254.169.254/`).
//!
//! Each guest gets its own HTTP server on a loopback port; QEMU's user-mode
//! network forwards the guest's connections to 169.254.169.254:80 to that
//! port (guestfwd). The port alone identifies the guest: nothing the guest
//! sends is trusted to say who it is, and a guest can reach only its own
//! server. The port is recorded in the domain's metadata so that a restarted
//! agent listens on it again.
//!
//! QEMU's guestfwd carries all of a guest's connections, one after another,
//! over a single connection to this server. So the server never closes a
//! connection because a request said `Connection: close` (busybox wget does),
//! and always sends `Content-Length`, so the guest knows where each answer
//! ends. Requests are parsed with `httparse` and routed through an axum
//! `Router`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use nimbus_proto::agent::InstanceMetadata;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
struct Content {
    meta: InstanceMetadata,
    user_data: Option<Vec<u8>>,
}

struct Server {
    port: u16,
    content: Arc<RwLock<Content>>,
    task: JoinHandle<()>,
}

#[derive(Default, Clone)]
pub struct MetadataServers {
    servers: Arc<Mutex<HashMap<String, Server>>>,
}

impl MetadataServers {
    /// Serves `meta` for its instance, on `port` when given (a restarted
    /// agent re-listening for an existing guest), otherwise on a free port.
    /// Returns the port.
    pub async fn ensure(&self, meta: &InstanceMetadata, user_data_b64: Option<&str>, port: Option<u16>) -> std::io::Result<u16> {
        let user_data = user_data_b64.and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
        let content = Content { meta: meta.clone(), user_data };
        {
            let servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = servers.get(&meta.instance_id) {
                if port.is_none_or(|p| p == s.port) && !s.task.is_finished() {
                    *s.content.write().unwrap_or_else(|p| p.into_inner()) = content;
                    return Ok(s.port);
                }
            }
        }
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port.unwrap_or(0)))).await?;
        let port = listener.local_addr()?.port();
        let content = Arc::new(RwLock::new(content));
        let app = Router::new()
            .route("/", get(|| async { "latest\n" }))
            .route("/latest", get(|| async { "dynamic\nmeta-data\nuser-data\n" }))
            .route("/latest/", get(|| async { "dynamic\nmeta-data\nuser-data\n" }))
            .route("/latest/meta-data", get(listing))
            .route("/latest/meta-data/", get(listing))
            .route("/latest/meta-data/{*key}", get(meta_data))
            .route("/latest/user-data", get(serve_user_data))
            .route("/latest/dynamic/instance-identity/document", get(identity))
            .with_state(content.clone());
        let instance_id = meta.instance_id.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        tokio::spawn(serve_connection(conn, app.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(%instance_id, error = %e, "metadata server cannot accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let old = self.servers.lock().unwrap_or_else(|p| p.into_inner()).insert(meta.instance_id.clone(), Server { port, content, task });
        if let Some(old) = old {
            old.task.abort();
        }
        Ok(port)
    }

    pub fn port(&self, instance_id: &str) -> Option<u16> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner()).get(instance_id).map(|s| s.port)
    }

    pub fn stop(&self, instance_id: &str) {
        if let Some(s) = self.servers.lock().unwrap_or_else(|p| p.into_inner()).remove(instance_id) {
            s.task.abort();
        }
    }

    pub fn stop_all(&self) {
        for (_, s) in self.servers.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            s.task.abort();
        }
    }
}

/// Largest request head accepted; metadata requests are tiny.
const MAX_HEAD: usize = 16 * 1024;

/// Answers requests on one connection until the peer closes it.
async fn serve_connection(mut conn: tokio::net::TcpStream, app: Router) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // Read until one whole request head is buffered.
        let (method, path, head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let body_len = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    break (req.method.unwrap_or("GET").to_string(), req.path.unwrap_or("/").to_string(), n, body_len);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                _ => {
                    let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
                    return;
                }
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        // Skip any request body (metadata is read-only).
        while buf.len() < head_len + body_len {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_len + body_len);

        let request = axum::http::Request::builder()
            .method(if method == "GET" || method == "HEAD" { axum::http::Method::GET } else { axum::http::Method::POST })
            .uri(if path.starts_with('/') { path } else { "/".to_string() })
            .body(axum::body::Body::empty());
        let (status, body) = match request {
            Ok(req) => match app.clone().oneshot(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    (status, axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap_or_default())
                }
                Err(never) => match never {},
            },
            Err(_) => (StatusCode::BAD_REQUEST, Default::default()),
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            if method == "HEAD" { 0 } else { body.len() }
        );
        if conn.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        if method != "HEAD" && conn.write_all(&body).await.is_err() {
            return;
        }
    }
}

type Shared = State<Arc<RwLock<Content>>>;

const KEYS: &[&str] = &[
    "ami-id",
    "ami-launch-index",
    "hostname",
    "instance-id",
    "instance-type",
    "local-hostname",
    "placement/availability-zone",
    "reservation-id",
];

async fn listing(State(c): Shared) -> String {
    let has_keys = !c.read().unwrap_or_else(|p| p.into_inner()).meta.public_keys.is_empty();
    let mut out = String::new();
    for k in KEYS {
        if let Some((dir, _)) = k.split_once('/') {
            let entry = format!("{dir}/\n");
            if !out.contains(&entry) {
                out.push_str(&entry);
            }
        } else {
            out.push_str(k);
            out.push('\n');
        }
    }
    if has_keys {
        out.push_str("public-keys/\n");
    }
    out
}

/// `public-keys/...` as EC2 serves it: `0=<name>` per key, then
/// `N/` → `openssh-key`, `N/openssh-key` → the key.
fn public_keys(keys: &[(String, String)], path: &str) -> Option<String> {
    if keys.is_empty() {
        return None;
    }
    if path.is_empty() {
        return Some(keys.iter().enumerate().map(|(i, (name, _))| format!("{i}={name}")).collect::<Vec<_>>().join("\n"));
    }
    let (index, rest) = path.split_once('/').unwrap_or((path, ""));
    // Digits only: "+1" or "01" would parse too.
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) || (index.len() > 1 && index.starts_with('0')) {
        return None;
    }
    let (_, key) = keys.get(index.parse::<usize>().ok()?)?;
    match rest {
        "" => Some("openssh-key".to_string()),
        "openssh-key" => Some(key.clone()),
        _ => None,
    }
}

async fn meta_data(State(c): Shared, Path(key): Path<String>) -> Response {
    let c = c.read().unwrap_or_else(|p| p.into_inner()).clone();
    let m = &c.meta;
    let value = match key.trim_end_matches('/') {
        "ami-id" => m.image_id.clone(),
        "ami-launch-index" => m.ami_launch_index.to_string(),
        "hostname" | "local-hostname" => m.instance_id.clone(),
        "instance-id" => m.instance_id.clone(),
        "instance-type" => m.instance_type.clone(),
        "placement" => "availability-zone".to_string(),
        "placement/availability-zone" => m.availability_zone.clone(),
        "reservation-id" => m.reservation_id.clone(),
        "public-keys" => match public_keys(&m.public_keys, "") {
            Some(v) => v,
            None => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
        },
        k if k.starts_with("public-keys/") => match public_keys(&m.public_keys, &k["public-keys/".len()..]) {
            Some(v) => v,
            None => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
        },
        _ => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
    };
    value.into_response()
}

async fn serve_user_data(State(c): Shared) -> Response {
    match c.read().unwrap_or_else(|p| p.into_inner()).user_data.clone() {
        Some(data) => data.into_response(),
        None => (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
    }
}

async fn identity(State(c): Shared) -> Response {
    let m = c.read().unwrap_or_else(|p| p.into_inner()).meta.clone();
    axum::Json(serde_json::json!({
        "instanceId": m.instance_id,
        "imageId": m.image_id,
        "instanceType": m.instance_type,
        "availabilityZone": m.availability_zone,
        "accountId": m.owner_id,
        "architecture": "x86_64",
    }))
    .into_response()
}

/// Metadata of a made-up instance, for tests.
#[cfg(test)]
pub(crate) fn sample_metadata(id: &str) -> InstanceMetadata {
    InstanceMetadata {
        instance_id: id.into(),
        reservation_id: "r-0123456789abcdef0".into(),
        instance_type: "t3.nano".into(),
        image_id: "ami-0123456789abcdef0".into(),
        availability_zone: "az1".into(),
        ami_launch_index: 0,
        owner_id: "000000000000".into(),
        public_keys: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str) -> InstanceMetadata {
        sample_metadata(id)
    }

    async fn get(port: u16, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    #[tokio::test]
    async fn each_guest_sees_only_its_own_metadata() {
        let servers = MetadataServers::default();
        let a = servers.ensure(&meta("i-000000000000000aa"), Some("aGVsbG8="), None).await.unwrap();
        let b = servers.ensure(&meta("i-000000000000000bb"), None, None).await.unwrap();
        assert_ne!(a, b);
        assert_eq!(get(a, "/latest/meta-data/instance-id").await, (200, "i-000000000000000aa".into()));
        assert_eq!(get(b, "/latest/meta-data/instance-id").await, (200, "i-000000000000000bb".into()));
        assert_eq!(get(a, "/latest/user-data").await, (200, "hello".into()));
        assert_eq!(get(b, "/latest/user-data").await.0, 404);
        assert_eq!(get(a, "/latest/meta-data/placement/availability-zone").await, (200, "az1".into()));
        assert_eq!(get(a, "/latest/meta-data/nope").await.0, 404);
        // Same instance again: same port.
        assert_eq!(servers.ensure(&meta("i-000000000000000aa"), None, None).await.unwrap(), a);
        servers.stop("i-000000000000000aa");
        servers.stop_all();
    }

    #[tokio::test]
    async fn public_keys_are_served_like_ec2() {
        let servers = MetadataServers::default();
        let none = servers.ensure(&meta("i-000000000000000dd"), None, None).await.unwrap();
        let listing = get(none, "/latest/meta-data/").await;
        assert_eq!(listing.0, 200);
        assert!(!listing.1.contains("public-keys"), "no keys, no listing entry: {}", listing.1);
        assert_eq!(get(none, "/latest/meta-data/public-keys/").await.0, 404);
        assert_eq!(get(none, "/latest/meta-data/public-keys/0/openssh-key").await.0, 404);

        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample user@example".to_string();
        let mut m = meta("i-000000000000000ee");
        m.public_keys = vec![("my-key".into(), key.clone())];
        let port = servers.ensure(&m, None, None).await.unwrap();
        let listing = get(port, "/latest/meta-data/").await.1;
        assert!(listing.lines().any(|l| l == "public-keys/"), "{listing}");
        assert_eq!(get(port, "/latest/meta-data/public-keys").await, (200, "0=my-key".into()));
        assert_eq!(get(port, "/latest/meta-data/public-keys/").await, (200, "0=my-key".into()));
        assert_eq!(get(port, "/latest/meta-data/public-keys/0").await, (200, "openssh-key".into()));
        assert_eq!(get(port, "/latest/meta-data/public-keys/0/").await, (200, "openssh-key".into()));
        assert_eq!(get(port, "/latest/meta-data/public-keys/0/openssh-key").await, (200, key.clone()));
        for missing in ["public-keys/1/", "public-keys/1/openssh-key", "public-keys/00/openssh-key", "public-keys/+0/", "public-keys/0/nope", "public-keys/my-key"] {
            assert_eq!(get(port, &format!("/latest/meta-data/{missing}")).await.0, 404, "{missing}");
        }
        // Keys can change (a later assignment): the same server answers the new ones.
        m.public_keys.push(("second".into(), "ssh-rsa AAAAB3 second".into()));
        assert_eq!(servers.ensure(&m, None, None).await.unwrap(), port);
        assert_eq!(get(port, "/latest/meta-data/public-keys/").await, (200, "0=my-key\n1=second".into()));
        assert_eq!(get(port, "/latest/meta-data/public-keys/1/openssh-key").await, (200, "ssh-rsa AAAAB3 second".into()));
        servers.stop_all();
    }

    /// guestfwd sends every guest connection down one host connection: the
    /// server must answer request after request on it, `Connection: close` or not.
    #[tokio::test]
    async fn one_connection_carries_many_requests() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let servers = MetadataServers::default();
        let port = servers.ensure(&meta("i-000000000000000cc"), None, None).await.unwrap();
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let req = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n";
        conn.write_all(format!("{req}{req}").as_bytes()).await.unwrap();
        let expected = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n\r\ni-000000000000000cc";
        let mut got = vec![0u8; expected.len() * 2];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), expected.repeat(2));
        conn.write_all(b"GET /nope HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = vec![0u8; 12];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 404");
        servers.stop_all();
    }
}
