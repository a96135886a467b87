//! HTTP front doors over the service layer.
//!
//! - [`rest`]: the `/v1` REST/JSON API for users and the CLI.
//! - [`agent`]: `/v1/agent/*`, the host-agent protocol.
//!
//! This module holds what they share: request ids, the one mapping of
//! [`ServiceError`] to an HTTP response, authentication, and extractors that
//! turn malformed input into typed errors.

pub mod agent;
pub mod ec2;
pub mod rest;
pub mod tls;

use crate::error::{ErrorKind, ServiceError};
use crate::service::Service;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use nimbus_proto::api::ErrorBody;
use subtle::ConstantTimeEq;
use tracing::Instrument;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served (empty outside a request).
pub fn request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

/// Gives every request an id, visible in logs, in errors and in the
/// `x-request-id` response header.
async fn with_request_id(req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    // The span is attached to the request's future (entered only while it
    // is polled), never held entered across an await: otherwise requests
    // served on the same thread nest in each other's spans.
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req).instrument(span)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// The REST status of an error's kind. Client errors are 4xx; only a real
/// fault is 5xx (clients retry 5xx); lack of capacity and throttling are 503:
/// retrying later can succeed.
pub fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NoRoute => StatusCode::NOT_FOUND,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::DryRun => StatusCode::PRECONDITION_FAILED,
        ErrorKind::Capacity | ErrorKind::Throttled => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let status = status(self.kind());
        if self.kind() == ErrorKind::Internal {
            tracing::error!(error = %self.report(), "request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "request rejected");
        }
        let body = ErrorBody { code: self.code().to_string(), message: self.public_message(), request_id: request_id() };
        (status, Json(body)).into_response()
    }
}

/// JSON body whose rejections (bad content type, syntax, wrong fields) are
/// [`ServiceError::MalformedRequest`].
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ServiceError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => {
                Err(ServiceError::MalformedRequest("expected Content-Type: application/json".into()))
            }
            Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ServiceError::RequestTooLarge("the request body is larger than this call accepts".into()))
            }
            Err(e) => Err(ServiceError::MalformedRequest(format!("invalid JSON body: {}", e.body_text()))),
        }
    }
}

/// Query string with the same treatment as [`ApiJson`].
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ServiceError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ServiceError::InvalidParameterValue(format!("invalid query: {}", e.body_text())))
    }
}

/// Refuses, from its head alone, a request whose `Content-Length` is over
/// `limit` bytes (413 `RequestEntityTooLarge`, nothing read). Layered with
/// `DefaultBodyLimit::max(limit)`, which stops reading a body without a
/// length at the limit. Authentication extractors run before any body is
/// read, so an unauthenticated caller never gets a byte of it read.
pub(crate) async fn refuse_oversized(axum::extract::State(limit): axum::extract::State<usize>, req: Request, next: Next) -> Response {
    let announced = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return ServiceError::RequestTooLarge(format!("the request body is larger than the {limit} bytes this call accepts"))
            .into_response();
    }
    next.run(req).await
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Whether the request carries `token` as its bearer token (constant time).
pub(crate) fn has_token(headers: &HeaderMap, token: &str) -> bool {
    bearer(headers).is_some_and(|t| bool::from(t.as_bytes().ct_eq(token.as_bytes())))
}

async fn not_found(req: Request) -> ServiceError {
    ServiceError::RouteNotFound(format!("{} {}", req.method(), req.uri().path()))
}

async fn healthz() -> &'static str {
    "ok"
}

/// The whole HTTP surface of the control plane.
pub fn router(service: Service) -> Router {
    Router::new()
        .merge(rest::routes())
        .merge(agent::routes())
        .merge(ec2::routes())
        .route("/healthz", axum::routing::get(healthz))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(with_request_id))
        .with_state(service)
}
