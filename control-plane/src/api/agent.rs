//! `/v1/agent/*`: the host-agent protocol (see `nimbus_proto::agent`).

use super::{has_token, refuse_oversized, ApiJson, ApiQuery};
use crate::error::{Result, ServiceError};
use crate::service::Service;
use axum::extract::DefaultBodyLimit;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::{Json, Router};
use nimbus_proto::agent::{Assignments, CertificateGrant, CertificateRequest, HostCredential, RegisterHost, Report};
use serde::Deserialize;
use std::time::Duration;

/// Largest registration body (a few hundred bytes in practice).
const MAX_REGISTER_BODY: usize = 16 * 1024;
/// Largest report: console tails of 64 KiB per guest, for many guests. Read
/// only once the host is authenticated (extractors of the request's parts,
/// like [`HostAuth`], run before the body is read).
const MAX_REPORT_BODY: usize = 64 * 1024 * 1024;

/// The channel a request came through: `Some(client certificate digest)`
/// from the TLS listener, `None` from the plaintext one, which takes the
/// agent protocol only without `--agent-listen` or with
/// `--insecure-agent-plaintext`.
fn channel(parts: &Parts, service: &Service) -> Result<Option<super::tls::ClientCertificate>> {
    match parts.extensions.get::<super::tls::ClientCertificate>() {
        Some(c) => Ok(Some(*c)),
        None if service.config.agent_listen.is_none() || service.config.insecure_agent_plaintext => Ok(None),
        None => Err(ServiceError::AuthFailure("the agent protocol is served over TLS only (--agent-listen)".into())),
    }
}

/// A host authenticated by its own credential (on the TLS listener, with
/// or without a certificate: the certificate route is how it gets one).
pub struct HostAuth(pub String);

impl FromRequestParts<Service> for HostAuth {
    type Rejection = ServiceError;
    async fn from_request_parts(parts: &mut Parts, service: &Service) -> Result<Self> {
        host_and_channel(parts, service).await.map(|(host, _)| HostAuth(host))
    }
}

/// The host whose credential the request carries, and what came through
/// the TLS listener (the digest of the client certificate, if any); `None`
/// for the plaintext listener.
async fn host_and_channel(parts: &Parts, service: &Service) -> Result<(String, Option<Option<[u8; 32]>>)> {
    let via = channel(parts, service)?;
    let token = super::bearer(&parts.headers).ok_or_else(|| ServiceError::AuthFailure("missing host credential".into()))?;
    let host = service.authenticate_host(token).await?;
    Ok((host, via.map(|super::tls::ClientCertificate(c)| c)))
}

/// Whether the presented certificate is one of those issued (constant time).
fn is_issued(presented: Option<[u8; 32]>, issued: &[Vec<u8>]) -> bool {
    presented.is_some_and(|p| issued.iter().any(|i| bool::from(subtle::ConstantTimeEq::ct_eq(p.as_slice(), i.as_slice()))))
}

/// A host authenticated by its credential and, on the TLS listener, by the
/// certificate it was issued (mutual TLS): a stolen credential alone does
/// not fetch a host's assignments or report for it.
pub struct CertifiedHost(pub String);

impl FromRequestParts<Service> for CertifiedHost {
    type Rejection = ServiceError;
    async fn from_request_parts(parts: &mut Parts, service: &Service) -> Result<Self> {
        let (host, via) = host_and_channel(parts, service).await?;
        if let Some(presented) = via {
            let issued = service.host_certificate_digests(&host, false).await?;
            if !is_issued(presented, &issued) {
                return Err(ServiceError::AuthFailure("this host's certificate is required (POST /v1/agent/certificate)".into()));
            }
        }
        Ok(CertifiedHost(host))
    }
}

/// A host asking for a certificate: its credential and, on the TLS
/// listener once the host holds an unexpired certificate, that certificate
/// (a renewal): a stolen credential alone gets no key of the thief's
/// certified. The operator's reset (`reset-host`) clears the certificate
/// with the credential. Carries the certificate presented, if any.
pub struct CertificateCaller(pub String, pub Option<[u8; 32]>);

impl FromRequestParts<Service> for CertificateCaller {
    type Rejection = ServiceError;
    async fn from_request_parts(parts: &mut Parts, service: &Service) -> Result<Self> {
        let (host, via) = host_and_channel(parts, service).await?;
        if let Some(presented) = via {
            let issued = service.host_certificate_digests(&host, true).await?;
            if !issued.is_empty() && !is_issued(presented, &issued) {
                return Err(ServiceError::AuthFailure(
                    "this host holds a certificate: renew it presenting that certificate (or have the operator reset the host)".into(),
                ));
            }
        }
        Ok(CertificateCaller(host, via.flatten()))
    }
}

/// A caller holding the join token (checked before any body is read).
pub struct JoinToken;

impl FromRequestParts<Service> for JoinToken {
    type Rejection = ServiceError;
    async fn from_request_parts(parts: &mut Parts, service: &Service) -> Result<Self> {
        channel(parts, service)?;
        if has_token(&parts.headers, &service.config.join_token) {
            Ok(JoinToken)
        } else {
            Err(ServiceError::AuthFailure("registration needs the join token".into()))
        }
    }
}

pub fn routes() -> Router<Service> {
    Router::new()
        .route(
            "/v1/agent/register",
            post(register).layer(DefaultBodyLimit::max(MAX_REGISTER_BODY)).layer(from_fn_with_state(MAX_REGISTER_BODY, refuse_oversized)),
        )
        .route(
            "/v1/agent/certificate",
            post(certificate)
                .layer(DefaultBodyLimit::max(MAX_REGISTER_BODY))
                .layer(from_fn_with_state(MAX_REGISTER_BODY, refuse_oversized)),
        )
        .route("/v1/agent/assignments", get(assignments))
        .route(
            "/v1/agent/report",
            post(report).layer(DefaultBodyLimit::max(MAX_REPORT_BODY)).layer(from_fn_with_state(MAX_REPORT_BODY, refuse_oversized)),
        )
        // The image store: bodies streamed, bounded by the store's own limit.
        .route("/v1/agent/images/{id}", get(download_image).put(upload_image).layer(DefaultBodyLimit::disable()))
}

/// An agent uploads the disk of an image it made (CreateImage), with its
/// certificate on the TLS listener as for assignments; the
/// digest and virtual size come in headers (see `nimbus_proto::agent`).
async fn upload_image(
    State(s): State<Service>,
    CertifiedHost(host): CertifiedHost,
    Path(image_id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Json<nimbus_proto::api::Image>> {
    let header = |name: &str| -> Result<String> {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| ServiceError::MissingParameter(format!("header {name}")))
    };
    let sha256 = header(nimbus_proto::agent::UPLOAD_SHA256_HEADER)?;
    let size: u64 = header(nimbus_proto::agent::UPLOAD_VIRTUAL_SIZE_HEADER)?
        .parse()
        .map_err(|_| ServiceError::InvalidParameterValue("the virtual size must be a number of bytes".into()))?;
    Ok(Json(s.upload_image(&host, &image_id, &sha256, size, body.into_data_stream()).await?))
}

/// A host fetches a disk of the image store (named by its SHA-256) that
/// one of its instances boots.
async fn download_image(
    State(s): State<Service>,
    CertifiedHost(host): CertifiedHost,
    Path(sha256): Path<String>,
) -> Result<axum::response::Response> {
    use axum::response::IntoResponse;
    let (file, len) = s.stored_image_for_host(&host, &sha256).await?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
    Ok((
        [(axum::http::header::CONTENT_LENGTH, len.to_string()), (axum::http::header::CONTENT_TYPE, "application/octet-stream".to_string())],
        body,
    )
        .into_response())
}

async fn register(State(s): State<Service>, _: JoinToken, ApiJson(req): ApiJson<RegisterHost>) -> Result<Json<HostCredential>> {
    Ok(Json(s.register_host(req).await?))
}

/// The host's key certified by the control plane's CA (see `service/certificates.rs`).
async fn certificate(
    State(s): State<Service>,
    CertificateCaller(host, presented): CertificateCaller,
    ApiJson(req): ApiJson<CertificateRequest>,
) -> Result<Json<CertificateGrant>> {
    Ok(Json(s.issue_host_certificate(&host, &req, presented).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignmentsQuery {
    #[serde(default)]
    after: i64,
    #[serde(default)]
    wait_ms: u64,
}

async fn assignments(
    State(s): State<Service>,
    CertifiedHost(host): CertifiedHost,
    ApiQuery(q): ApiQuery<AssignmentsQuery>,
) -> Result<Json<Assignments>> {
    Ok(Json(s.assignments(&host, q.after, Duration::from_millis(q.wait_ms)).await?))
}

async fn report(
    State(s): State<Service>,
    CertifiedHost(host): CertifiedHost,
    ApiJson(r): ApiJson<Report>,
) -> Result<Json<serde_json::Value>> {
    s.report(&host, &r).await?;
    Ok(Json(serde_json::json!({})))
}
