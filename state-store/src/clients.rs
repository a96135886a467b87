//! Network clients of a node, for tools and tests (feature
//! `test-support`); production uses none of them: the control plane and the
//! agents embed their nodes and use [`crate::LocalClient`] in process and
//! [`crate::TcpTransport`] between nodes.
//!
//! * [`TcpClient`]: the typed API over the framed protocol (`tcp`);
//! * [`HttpClient`]: the typed API over HTTP, bincode bodies, and the admin
//!   endpoints (`/admin`, leave, anti-entropy);
//! * [`JsonClient`]: the JSON API and anti-entropy, what `store-node get|
//!   put|delete|anti-entropy` use;
//! * [`HttpTransport`]: node-to-node calls over HTTP (`store-node
//!   --transport http`).
//!
//! The bincode routes the HTTP ones need, merged into the node's router
//! with this feature (`routes`):
//!
//! * `POST /internal/rpc`  node-to-node [`Request`] → [`Response`]
//! * `POST /v1/get`        [`GetRequest`] → `Result<GetResult, StoreError>`
//! * `POST /v1/put`        [`PutRequest`] → `Result<String, StoreError>`: the
//!   encoded context of the new version (a `None` value deletes)

use crate::admin::AdminView;
use crate::api::{Context, GetResult, KvClient};
use crate::clock::NodeId;
use crate::codec::{decode, encode};
use crate::error::{check_key, check_value, RpcError, StoreError};
use crate::http::{ErrorBody, CLIENT_BODY_LIMIT};
use crate::json::{JsonDeleteRequest, JsonGetRequest, JsonGetResponse, JsonPutRequest, JsonWriteResponse};
use crate::node::Node;
use crate::rpc::{Request, Response, Transport};
use crate::tcp::TcpTransport;
use crate::tls::TlsConfig;
use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

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

/// The bincode routes of [`HttpTransport`] and [`HttpClient`], with their
/// body limits.
pub(crate) fn routes() -> Router<Arc<Node>> {
    let internal = Router::new().route("/internal/rpc", post(rpc)).layer(DefaultBodyLimit::max(RPC_BODY_LIMIT));
    let client =
        Router::new().route("/v1/get", post(kv_get)).route("/v1/put", post(kv_put)).layer(DefaultBodyLimit::max(CLIENT_BODY_LIMIT));
    internal.merge(client)
}

/// A request error with its causes (the TLS one when there is one).
fn describe(e: &reqwest::Error) -> String {
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

/// Node-to-node transport over HTTP; node ids are `host:port`.
#[derive(Clone)]
pub struct HttpTransport {
    http: reqwest::Client,
    scheme: &'static str,
}

/// A reqwest client builder with this process's certificate and the CA.
fn client_builder(tls: Option<&TlsConfig>) -> (reqwest::ClientBuilder, &'static str) {
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

    /// Mutual TLS (`https://`), as [`TcpTransport::with_tls`].
    pub fn with_tls(tls: &TlsConfig) -> HttpTransport {
        HttpTransport::build(Some(tls))
    }

    fn build(tls: Option<&TlsConfig>) -> HttpTransport {
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
    pub fn with_tls(addr: &str, timeout: Duration, tls: &TlsConfig) -> HttpClient {
        HttpClient::build(addr, timeout, Some(tls))
    }

    fn build(addr: &str, timeout: Duration, tls: Option<&TlsConfig>) -> HttpClient {
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

/// Network client of the store over the framed protocol (faster than
/// [`HttpClient`]; same typed API).
pub struct TcpClient {
    addr: NodeId,
    transport: TcpTransport,
    timeout: std::time::Duration,
}

impl TcpClient {
    /// Plaintext (local development): `addr` is a node's `host:port`;
    /// `timeout` bounds each operation.
    pub fn new(addr: &str, timeout: std::time::Duration) -> TcpClient {
        TcpClient { addr: addr.to_string(), transport: TcpTransport::new(), timeout }
    }

    /// Mutual TLS: presents `tls`'s certificate and checks the node's.
    pub fn with_tls(addr: &str, timeout: std::time::Duration, tls: TlsConfig) -> TcpClient {
        TcpClient { addr: addr.to_string(), transport: TcpTransport::with_tls(tls), timeout }
    }

    async fn call(&self, req: Request) -> Result<Response, StoreError> {
        match tokio::time::timeout(self.timeout, self.transport.call(&String::new(), &self.addr, req)).await {
            Ok(Ok(Response::Failed(e))) => Err(e),
            Ok(Ok(Response::Error(e))) => Err(StoreError::Transport(e)),
            Ok(Ok(r)) => Ok(r),
            // sent, but no reply: a write may have been applied
            Ok(Err(RpcError::Lost(_) | RpcError::Timeout(_) | RpcError::Codec(_))) | Err(_) => {
                Err(StoreError::OutcomeUnknown(self.addr.clone()))
            }
            // nothing was sent
            Ok(Err(RpcError::Tls { node, reason })) => Err(StoreError::Tls(format!("{node}: {reason}"))),
            Ok(Err(e)) => Err(StoreError::Transport(e.to_string())),
        }
    }

    async fn write(&self, key: &[u8], value: Option<Vec<u8>>, context: &Context) -> Result<Context, StoreError> {
        check_key(key)?;
        if let Some(v) = &value {
            check_value(v)?;
        }
        match self.call(Request::ClientPut { key: key.to_vec(), value, context: context.0.clone() }).await? {
            Response::Written(vv) => Ok(Context(vv)),
            _ => Err(StoreError::Transport("unexpected response".into())),
        }
    }
}

#[async_trait]
impl KvClient for TcpClient {
    async fn get(&self, key: &[u8]) -> Result<GetResult, StoreError> {
        check_key(key)?;
        match self.call(Request::ClientGet { key: key.to_vec() }).await? {
            Response::Got(r) => Ok(r),
            _ => Err(StoreError::Transport("unexpected response".into())),
        }
    }

    async fn put(&self, key: &[u8], value: Vec<u8>, context: &Context) -> Result<Context, StoreError> {
        self.write(key, Some(value), context).await
    }

    async fn delete(&self, key: &[u8], context: &Context) -> Result<Context, StoreError> {
        self.write(key, None, context).await
    }
}

/// Errors of [`JsonClient`].
#[derive(Debug, thiserror::Error)]
pub enum JsonClientError {
    /// The node answered with an error (`code` is the typed error's name).
    #[error("{code} (HTTP {status}): {message}")]
    Api { status: u16, code: String, message: String },
    /// No answer, or one that is not the API's.
    #[error("request to {node} failed: {message}")]
    Transport { node: String, message: String },
}

/// Client of the JSON and admin endpoints (what `store-node get|put|delete
/// |anti-entropy` use): plaintext or mutual TLS.
pub struct JsonClient {
    node: String,
    base: String,
    http: reqwest::Client,
}

impl JsonClient {
    /// `tls`: `None` for a node run with `--insecure-plaintext`.
    pub fn new(node: &str, tls: Option<&TlsConfig>, timeout: Duration) -> JsonClient {
        let (b, scheme) = client_builder(tls);
        JsonClient { node: node.to_string(), base: format!("{scheme}://{node}"), http: b.timeout(timeout).build().unwrap_or_default() }
    }

    async fn post<B: Serialize, T: serde::de::DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, JsonClientError> {
        let transport = |message: String| JsonClientError::Transport { node: self.node.clone(), message };
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(body).map_err(|e| transport(e.to_string()))?)
            .send()
            .await
            .map_err(|e| transport(describe(&e)))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| transport(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| transport(format!("unexpected answer: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => Err(JsonClientError::Api { status: status.as_u16(), code: e.code, message: e.message }),
            Err(_) => Err(transport(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)))),
        }
    }

    pub async fn get(&self, req: &JsonGetRequest) -> Result<JsonGetResponse, JsonClientError> {
        self.post("/v1/json/get", req).await
    }

    pub async fn put(&self, req: &JsonPutRequest) -> Result<JsonWriteResponse, JsonClientError> {
        self.post("/v1/json/put", req).await
    }

    pub async fn delete(&self, req: &JsonDeleteRequest) -> Result<JsonWriteResponse, JsonClientError> {
        self.post("/v1/json/delete", req).await
    }

    /// `POST /admin/anti-entropy`: one full round now.
    pub async fn anti_entropy(&self) -> Result<crate::anti_entropy::AntiEntropyReport, JsonClientError> {
        self.post("/admin/anti-entropy", &()).await
    }
}
