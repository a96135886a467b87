//! `/v1/agent/*`: the host-agent protocol (see `nimbus_proto::agent`).

use super::{has_token, ApiJson, ApiQuery};
use crate::error::{Result, ServiceError};
use crate::service::Service;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::{Json, Router};
use nimbus_proto::agent::{Assignments, HostCredential, RegisterHost, Report};
use serde::Deserialize;
use std::time::Duration;

/// A host authenticated by its own credential.
pub struct HostAuth(pub String);

impl FromRequestParts<Service> for HostAuth {
    type Rejection = ServiceError;
    async fn from_request_parts(parts: &mut Parts, service: &Service) -> Result<Self> {
        let token = super::bearer(&parts.headers).ok_or_else(|| ServiceError::AuthFailure("missing host credential".into()))?;
        service.authenticate_host(token).await.map(HostAuth)
    }
}

pub fn routes() -> Router<Service> {
    Router::new()
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/assignments", get(assignments))
        .route("/v1/agent/report", post(report))
        // Reports carry console tails (64 KiB per guest): allow many guests.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
}

async fn register(State(s): State<Service>, headers: axum::http::HeaderMap, ApiJson(req): ApiJson<RegisterHost>) -> Result<Json<HostCredential>> {
    if !has_token(&headers, &s.config.join_token) {
        return Err(ServiceError::AuthFailure("registration needs the join token".into()));
    }
    Ok(Json(s.register_host(req).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignmentsQuery {
    #[serde(default)]
    after: i64,
    #[serde(default)]
    wait_ms: u64,
}

async fn assignments(State(s): State<Service>, HostAuth(host): HostAuth, ApiQuery(q): ApiQuery<AssignmentsQuery>) -> Result<Json<Assignments>> {
    Ok(Json(s.assignments(&host, q.after, Duration::from_millis(q.wait_ms)).await?))
}

async fn report(State(s): State<Service>, HostAuth(host): HostAuth, ApiJson(r): ApiJson<Report>) -> Result<Json<serde_json::Value>> {
    s.report(&host, &r).await?;
    Ok(Json(serde_json::json!({})))
}
