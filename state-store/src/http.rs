//! HTTP interface (axum server, reqwest clients). Bodies are bincode
//! (`codec`), except the admin view which is JSON.
//!
//! * `POST /internal/rpc`  node-to-node [`Request`] → [`Response`]
//! * `POST /v1/get`        [`GetRequest`] → `Result<GetResult, StoreError>`
//! * `POST /v1/put`        [`PutRequest`] → `Result<String, StoreError>`: the
//!   encoded context of the new version (a `None` value deletes)
//! * `GET  /admin`         JSON [`AdminView`]
//! * `POST /admin/leave`   leave the ring, handing all data over; JSON
//!   `Result<(keys, hints), StoreError>`
//! * `POST /admin/remove`  body: a member id; declare that (failed) member
//!   `Left` on its behalf; JSON `Result<(), StoreError>`

use crate::admin::AdminView;
use crate::api::{Context, GetResult, KvClient};
use crate::clock::NodeId;
use crate::codec::{decode, encode};
use crate::error::{check_key, check_value, RpcError, StoreError, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use crate::node::Node;
use crate::rpc::{Request, Response, Transport};
use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Largest client request body.
const CLIENT_BODY_LIMIT: usize = MAX_VALUE_BYTES + MAX_KEY_BYTES + crate::error::MAX_CONTEXT_BYTES + 1024;
/// Largest node-to-node body (anti-entropy batches).
const RPC_BODY_LIMIT: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// `Context::encode()` of the context read, or empty.
    pub context: String,
}

/// Build the router for a node.
pub fn router(node: Arc<Node>) -> Router {
    let internal = Router::new().route("/internal/rpc", post(rpc)).layer(DefaultBodyLimit::max(RPC_BODY_LIMIT));
    let client = Router::new()
        .route("/v1/get", post(kv_get))
        .route("/v1/put", post(kv_put))
        .route("/v1/json/get", post(crate::json::json_get))
        .route("/v1/json/put", post(crate::json::json_put))
        .route("/v1/json/delete", post(crate::json::json_delete))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin", get(admin))
        .route("/admin/leave", post(admin_leave))
        .route("/admin/remove", post(admin_remove))
        .route("/admin/anti-entropy", post(admin_anti_entropy))
        .layer(DefaultBodyLimit::max(CLIENT_BODY_LIMIT));
    internal.merge(client).with_state(node)
}

/// JSON error body of the operator endpoints: `{"code", "message"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// A JSON error response.
pub fn error_response(status: axum::http::StatusCode, code: &str, message: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    (status, Json(ErrorBody { code: code.to_string(), message: message.to_string() })).into_response()
}

/// A request error with its causes (the TLS one when there is one).
pub(crate) fn describe(e: &reqwest::Error) -> String {
    if let Some(t) = tls_cause(e) {
        return format!("TLS: {t}");
    }
    let mut msg = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cur = c.source();
    }
    msg
}

/// A rustls error in `e`'s chain of causes (a refused certificate, an
/// alert from the peer), as text.
fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(t.to_string());
            }
        }
        cur = err.source();
    }
    None
}

/// How [`HttpClient`] words a request given up before it was sent.
pub const NEVER_SENT: &str = "the connection closed before the request was sent";

/// Whether the request was given up before any of it was written (hyper's
/// "canceled": the connection closed before the request could be sent).
fn never_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled) {
            return true;
        }
        cur = err.source();
    }
    false
}

async fn rpc(State(node): State<Arc<Node>>, body: Bytes) -> Vec<u8> {
    let resp = match decode::<Request>(&body, RPC_BODY_LIMIT) {
        Ok(req) => node.handle_local(req).await,
        Err(e) => Response::Error(format!("bad request: {e}")),
    };
    encode(&resp)
}

async fn kv_get(State(node): State<Arc<Node>>, body: Bytes) -> Vec<u8> {
    let res: Result<GetResult, StoreError> = match decode::<GetRequest>(&body, CLIENT_BODY_LIMIT) {
        Ok(r) => node.get(&r.key).await,
        Err(e) => Err(StoreError::Transport(format!("malformed request: {e}"))),
    };
    encode(&res)
}

async fn kv_put(State(node): State<Arc<Node>>, body: Bytes) -> Vec<u8> {
    let res: Result<String, StoreError> = match decode::<PutRequest>(&body, CLIENT_BODY_LIMIT) {
        Ok(r) => match Context::decode(&r.context) {
            Ok(ctx) => node.put(&r.key, r.value, &ctx).await.map(|c| c.encode()),
            Err(e) => Err(e),
        },
        Err(e) => Err(StoreError::Transport(format!("malformed request: {e}"))),
    };
    encode(&res)
}

/// The process is up and serving (the control plane's form: plain 200).
async fn healthz() -> &'static str {
    "ok"
}

/// Joined the ring and able to serve quorum operations: 200, else 503 with
/// the reason (`{"code": "NotReady", "message"}`).
async fn readyz(State(node): State<Arc<Node>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match node.readiness() {
        Ok(()) => "ready".into_response(),
        Err(e) => error_response(axum::http::StatusCode::SERVICE_UNAVAILABLE, "NotReady", &e.to_string()),
    }
}

/// Prometheus text exposition format 0.0.4.
async fn metrics(State(node): State<Arc<Node>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], node.render_metrics()).into_response()
}

async fn admin(State(node): State<Arc<Node>>) -> Json<AdminView> {
    Json(node.admin_view())
}

/// Remove a failed member (body: its id as plain text).
async fn admin_remove(State(node): State<Arc<Node>>, body: String) -> Json<Result<(), StoreError>> {
    Json(node.remove_member(body.trim()).await)
}

/// Run one full anti-entropy round now; answers its report when it ends.
async fn admin_anti_entropy(State(node): State<Arc<Node>>) -> Json<crate::anti_entropy::AntiEntropyReport> {
    Json(node.run_anti_entropy().await)
}

/// Leave the cluster, handing every key over; answers when done.
async fn admin_leave(State(node): State<Arc<Node>>) -> Json<Result<(usize, usize), StoreError>> {
    Json(node.leave().await.map(|r| (r.keys_handed_off, r.hints_handed_off)))
}

/// Node-to-node transport over HTTP; node ids are `host:port`.
#[derive(Clone)]
pub struct HttpTransport {
    http: reqwest::Client,
    scheme: &'static str,
}

/// A reqwest client builder with this process's certificate and the CA.
pub(crate) fn client_builder(tls: Option<&crate::tls::TlsConfig>) -> (reqwest::ClientBuilder, &'static str) {
    let b = reqwest::Client::builder().pool_max_idle_per_host(256).tcp_nodelay(true).http1_only();
    match tls {
        None => (b, "http"),
        Some(t) => (b.use_preconfigured_tls((*t.client_config()).clone()).https_only(true), "https"),
    }
}

impl HttpTransport {
    /// Plaintext: for local development and tests only.
    pub fn new() -> HttpTransport {
        HttpTransport::build(None)
    }

    /// Mutual TLS (`https://`), as [`crate::TcpTransport::with_tls`].
    pub fn with_tls(tls: &crate::tls::TlsConfig) -> HttpTransport {
        HttpTransport::build(Some(tls))
    }

    fn build(tls: Option<&crate::tls::TlsConfig>) -> HttpTransport {
        let (b, scheme) = client_builder(tls);
        let http = b.connect_timeout(Duration::from_secs(1)).build().unwrap_or_default();
        HttpTransport { http, scheme }
    }
}

impl Default for HttpTransport {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn call(&self, _from: &NodeId, to: &NodeId, req: Request) -> Result<Response, RpcError> {
        let resp = self.http.post(format!("{}://{to}/internal/rpc", self.scheme)).body(encode(&req)).send().await.map_err(|e| {
            if let Some(reason) = tls_cause(&e) {
                RpcError::Tls { node: to.clone(), reason }
            } else if e.is_timeout() {
                RpcError::Timeout(to.clone())
            } else if e.is_connect() {
                RpcError::Unreachable(to.clone())
            } else {
                // the request may have been sent
                RpcError::Lost(to.clone())
            }
        })?;
        if !resp.status().is_success() {
            return Err(RpcError::Remote { node: to.clone(), msg: resp.status().to_string() });
        }
        let body = resp.bytes().await.map_err(|_| RpcError::Lost(to.clone()))?;
        decode(&body, RPC_BODY_LIMIT).map_err(RpcError::Codec)
    }
}

/// Network client of the store, talking to any node.
#[derive(Clone)]
pub struct HttpClient {
    base: String,
    http: reqwest::Client,
}

/// How long an [`HttpClient`] waits for a get or put by default.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`HttpClient::leave`] waits: the node hands every key over first.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(3600);

impl HttpClient {
    /// `addr` is a node's `host:port`; each request is bounded by
    /// [`DEFAULT_CLIENT_TIMEOUT`].
    pub fn new(addr: &str) -> HttpClient {
        HttpClient::with_timeout(addr, DEFAULT_CLIENT_TIMEOUT)
    }

    /// As [`HttpClient::new`], with `timeout` bounding each get, put and
    /// admin request. A write that times out fails with
    /// [`StoreError::OutcomeUnknown`]: it may have been applied.
    pub fn with_timeout(addr: &str, timeout: Duration) -> HttpClient {
        HttpClient::build(addr, timeout, None)
    }

    /// Mutual TLS (`https://`): presents `tls`'s certificate, checks the
    /// node's against the CA and the host part of `addr`.
    pub fn with_tls(addr: &str, timeout: Duration, tls: &crate::tls::TlsConfig) -> HttpClient {
        HttpClient::build(addr, timeout, Some(tls))
    }

    fn build(addr: &str, timeout: Duration, tls: Option<&crate::tls::TlsConfig>) -> HttpClient {
        let (b, scheme) = client_builder(tls);
        let http = b.timeout(timeout).build().unwrap_or_default();
        HttpClient { base: format!("{scheme}://{addr}"), http }
    }

    async fn post<T: serde::de::DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> Result<T, StoreError> {
        let resp = self.http.post(format!("{}{path}", self.base)).body(body).send().await.map_err(|e| self.failed(e))?;
        if !resp.status().is_success() {
            return Err(StoreError::Transport(format!("http status {}", resp.status())));
        }
        let b = resp.bytes().await.map_err(|e| self.failed(e))?;
        decode(&b, CLIENT_BODY_LIMIT * 64).map_err(StoreError::Transport)
    }

    /// A request that failed: refused connections, and requests given up
    /// before any of them was sent, are transport errors; after the
    /// request may have been sent, the outcome is unknown.
    fn failed(&self, e: reqwest::Error) -> StoreError {
        if let Some(reason) = tls_cause(&e) {
            // the TLS session was refused: no request reached the node
            StoreError::Tls(reason)
        } else if e.is_connect() {
            StoreError::Transport(e.to_string())
        } else if never_sent(&e) {
            // The connection closed as it was handed the request: in TLS 1.3
            // the client's handshake ends before the node has checked the
            // client's certificate, so a refusal can arrive this way.
            StoreError::Transport(format!("{NEVER_SENT}: {e}"))
        } else {
            StoreError::OutcomeUnknown(self.base.clone())
        }
    }

    pub async fn admin(&self) -> Result<AdminView, StoreError> {
        let resp = self.http.get(format!("{}/admin", self.base)).send().await.map_err(|e| self.failed(e))?;
        let b = resp.bytes().await.map_err(|e| StoreError::Transport(e.to_string()))?;
        serde_json::from_slice(&b).map_err(|e| StoreError::Transport(e.to_string()))
    }

    /// Run one full anti-entropy round on the node now (waiting for one in
    /// progress first); returns its report. Bounded by the leave timeout:
    /// a round over a large store can take long.
    pub async fn anti_entropy(&self) -> Result<crate::anti_entropy::AntiEntropyReport, StoreError> {
        self.admin_post("/admin/anti-entropy").await
    }

    /// Ask the node to leave the ring; returns (keys, hints) handed over.
    pub async fn leave(&self) -> Result<(usize, usize), StoreError> {
        let res: Result<(usize, usize), StoreError> = self.admin_post("/admin/leave").await?;
        res
    }

    /// POST an admin action that may take long; its JSON answer.
    async fn admin_post<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, StoreError> {
        let resp = self.http.post(format!("{}{path}", self.base)).timeout(LEAVE_TIMEOUT).send().await.map_err(|e| self.failed(e))?;
        if !resp.status().is_success() {
            return Err(StoreError::Transport(format!("http status {}", resp.status())));
        }
        let b = resp.bytes().await.map_err(|e| StoreError::Transport(e.to_string()))?;
        serde_json::from_slice(&b).map_err(|e| StoreError::Transport(e.to_string()))
    }

    /// Put with an already-encoded context string (e.g. from another
    /// process); a malformed string yields `StoreError::BadContext`.
    pub async fn put_raw_context(&self, key: &[u8], value: Option<Vec<u8>>, context: &str) -> Result<Context, StoreError> {
        check_key(key)?;
        if let Some(v) = &value {
            check_value(v)?;
        }
        let res: Result<String, StoreError> =
            self.post("/v1/put", encode(&PutRequest { key: key.to_vec(), value, context: context.to_string() })).await?;
        Context::decode(&res?)
    }
}

#[async_trait]
impl KvClient for HttpClient {
    async fn get(&self, key: &[u8]) -> Result<GetResult, StoreError> {
        check_key(key)?;
        let res: Result<GetResult, StoreError> = self.post("/v1/get", encode(&GetRequest { key: key.to_vec() })).await?;
        res
    }

    async fn put(&self, key: &[u8], value: Vec<u8>, context: &Context) -> Result<Context, StoreError> {
        self.put_raw_context(key, Some(value), &context.encode()).await
    }

    async fn delete(&self, key: &[u8], context: &Context) -> Result<Context, StoreError> {
        self.put_raw_context(key, None, &context.encode()).await
    }
}
