//! The control plane's TLS listener (`--agent-listen`): the whole API, with
//! the server certificate the control plane's CA issued it, asking every
//! client for a certificate of that CA (optional at the handshake: an agent
//! registers and gets its certificate before it has one).
//!
//! Each connection's router carries the SHA-256 of the client's
//! certificate ([`ClientCertificate`]); `api/agent.rs` requires, for
//! assignments and reports, the very certificate the host was issued. With
//! `--agent-listen` set, the plaintext `--listen` refuses the agent
//! protocol, unless `--insecure-agent-plaintext` (local development).

use crate::service::Service;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::net::TcpListener;

/// A client that has not finished its TLS handshake by then is dropped, and
/// one that has not sent a request's head: a stalled connection holds
/// nothing for long.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The SHA-256 of the certificate the client presented on this TLS
/// connection (`None`: none). Absent from requests of the plaintext listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCertificate(pub Option<[u8; 32]>);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("TLS listener: {0}")]
    Pem(String),
    #[error("TLS listener: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS listener: client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn pem<E: std::fmt::Display>(e: E) -> TlsSetupError {
    TlsSetupError::Pem(e.to_string())
}

/// The listener's rustls configuration from the control plane's CA and own certificate.
pub fn server_config(service: &Service) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(service.store.ca.cert_pem().as_bytes()) {
        roots.add(cert.map_err(pem)?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).allow_unauthenticated().build()?;
    let (cert_pem, key_pem) = service.store.own_certificate();
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem)?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Serves the API over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    service: Service,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&service)?);
    let router = super::router(service);
    tokio::pin!(shutdown);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "TLS listener cannot accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        conns.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let digest = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| Sha256::digest(c.as_ref()).into());
            let app = router.layer(axum::Extension(ClientCertificate(digest)));
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                use tower::ServiceExt;
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "TLS connection ended");
            }
        });
    }
    Ok(())
}
