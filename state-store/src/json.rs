//! JSON form of get, put and delete, for operators' tools and shells
//! (`store-node get|put|delete`, through `clients::JsonClient`). The
//! framed protocol stays the fast path for programs.
//!
//! * `POST /v1/json/get`    `{"key"}` → `{"values": [...], "deleted", "context"}`
//! * `POST /v1/json/put`    `{"key", "value", "context"}` → `{"context"}`
//! * `POST /v1/json/delete` `{"key", "context"}` → `{"context"}`
//!
//! Keys and values are UTF-8 strings (`key`, `value`) or base64
//! (`key_base64`, `value_base64`): exactly one of each pair. A read
//! answers each value as `{"value": text}` when it is UTF-8, else
//! `{"value_base64": ...}`. `context` is the opaque string a get returns
//! (absent or empty: a blind write, concurrent with what is stored).
//! Errors are `{"code", "message"}` with a 4xx status for bad input (and
//! then nothing is written) and 5xx when the store could not serve.

use crate::api::Context;
use crate::error::StoreError;
use crate::http::error_response;
use crate::node::Node;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonGetRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonPutRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonDeleteRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

/// One sibling: text when it is UTF-8, else base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JsonValue {
    Text { value: String },
    Base64 { value_base64: String },
}

impl JsonValue {
    pub fn from_bytes(b: Vec<u8>) -> JsonValue {
        match String::from_utf8(b) {
            Ok(value) => JsonValue::Text { value },
            Err(e) => JsonValue::Base64 { value_base64: B64.encode(e.into_bytes()) },
        }
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        match self {
            JsonValue::Text { value } => Ok(value.clone().into_bytes()),
            JsonValue::Base64 { value_base64 } => B64.decode(value_base64).map_err(|e| e.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonGetResponse {
    /// Live siblings; empty when the key is absent or deleted.
    pub values: Vec<JsonValue>,
    /// A delete survives among the versions read.
    pub deleted: bool,
    /// Pass back to put or delete to supersede everything read.
    pub context: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonWriteResponse {
    /// The context of the new version.
    pub context: String,
}

/// A refused or failed request: HTTP status and the typed error.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn malformed(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, code: "MalformedRequest", message: message.into() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError { status: e.http_status(), code: e.code(), message: e.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, error = %self.message, "JSON request failed");
        }
        error_response(self.status, self.code, &self.message)
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::malformed(format!("invalid JSON body: {e}")))
}

/// Exactly one of the text and base64 forms of a field.
fn one_of(name: &str, text: Option<String>, b64: Option<String>) -> Result<Vec<u8>, ApiError> {
    match (text, b64) {
        (Some(t), None) => Ok(t.into_bytes()),
        (None, Some(b)) => B64.decode(b).map_err(|e| ApiError::malformed(format!("{name}_base64 is not base64: {e}"))),
        (Some(_), Some(_)) => Err(ApiError::malformed(format!("give either {name} or {name}_base64, not both"))),
        (None, None) => Err(ApiError::malformed(format!("{name} (or {name}_base64) is required"))),
    }
}

fn context(c: Option<String>) -> Result<Context, ApiError> {
    Ok(Context::decode(c.as_deref().unwrap_or(""))?)
}

pub(crate) async fn json_get(State(node): State<Arc<Node>>, body: Bytes) -> Result<Json<JsonGetResponse>, ApiError> {
    let req: JsonGetRequest = parse(&body)?;
    let key = one_of("key", req.key, req.key_base64)?;
    let r = node.get(&key).await?;
    Ok(Json(JsonGetResponse {
        values: r.values.into_iter().map(JsonValue::from_bytes).collect(),
        deleted: r.deleted,
        context: r.context.encode(),
    }))
}

pub(crate) async fn json_put(State(node): State<Arc<Node>>, body: Bytes) -> Result<Json<JsonWriteResponse>, ApiError> {
    let req: JsonPutRequest = parse(&body)?;
    let key = one_of("key", req.key, req.key_base64)?;
    let value = one_of("value", req.value, req.value_base64)?;
    let ctx = context(req.context)?;
    let written = node.put(&key, Some(value), &ctx).await?;
    Ok(Json(JsonWriteResponse { context: written.encode() }))
}

pub(crate) async fn json_delete(State(node): State<Arc<Node>>, body: Bytes) -> Result<Json<JsonWriteResponse>, ApiError> {
    let req: JsonDeleteRequest = parse(&body)?;
    let key = one_of("key", req.key, req.key_base64)?;
    let ctx = context(req.context)?;
    let written = node.put(&key, None, &ctx).await?;
    Ok(Json(JsonWriteResponse { context: written.encode() }))
}
