//! The HTTP side of a node's listener (`tcp` sends it the connections
//! that do not start with the framed protocol's magic): JSON bodies.
//!
//! * `POST /v1/json/get|put|delete`  the JSON API of operators' tools (`json`)
//! * `GET  /healthz`, `GET /readyz`  probes
//! * `GET  /metrics`       Prometheus text
//! * `GET  /admin`         JSON [`AdminView`]
//! * `POST /admin/leave`   leave the ring, handing all data over; JSON
//!   `Result<(keys, hints), StoreError>`
//! * `POST /admin/remove`  body: a member id; declare that (failed) member
//!   `Left` on its behalf; JSON `Result<(), StoreError>`
//! * `POST /admin/anti-entropy`  one full anti-entropy round; its report
//!
//! With the feature `test-support`, also the bincode routes of the HTTP
//! clients and transport (`clients::routes`).

use crate::admin::AdminView;
use crate::error::{StoreError, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use crate::node::Node;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Largest client request body.
pub(crate) const CLIENT_BODY_LIMIT: usize = MAX_VALUE_BYTES + MAX_KEY_BYTES + crate::error::MAX_CONTEXT_BYTES + 1024;

/// Build the router for a node.
pub fn router(node: Arc<Node>) -> Router {
    let client = Router::new()
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
    #[cfg(feature = "test-support")]
    let client = crate::clients::routes().merge(client);
    client.with_state(node)
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
