//! Mutual TLS for node-to-node and client traffic (rustls, ring provider).
//!
//! Every node and every client holds a certificate issued by the cluster's
//! CA (in Nimbus: the control plane's, issued at host registration) and the
//! CA certificate itself. A [`TlsConfig`] is built once from the three PEMs
//! (files or bytes) and gives the server side (client certificate checked
//! against the CA) and the client side (server certificate checked against
//! the CA and the node's name; this side's certificate presented).
//!
//! Naming: a node's id is its listen address `host:port`, and a client
//! checks the server certificate against the *host* part: an IP address
//! must be an IP SAN of the certificate, a name a DNS SAN.
//!
//! Authority ([`Authority`]): with an administrator name configured
//! ([`TlsConfig::with_admin_name`]; Nimbus: the control plane's), a peer
//! whose certificate is valid for that name is an administrator (the client
//! API, `/admin/*`, everything); any other certified peer is a node
//! (replication between nodes only). Without one, every certified peer is
//! an administrator (a cluster with no roles: benchmarks, tests).
//!
//! Revocation: the certificates whose SHA-256 is in the revoked set
//! ([`TlsConfig::set_revoked`]) are refused in every later handshake, as
//! client and as server, and the connections already open with them are
//! closed ([`TlsConfig::revocations`] tells the connections).
//!
//! [`dev`] makes a throwaway CA and certificates in-process (store-bench
//! `--tls`, tests).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Errors building a TLS configuration.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: &'static str },
    #[error("{what}: malformed PEM: {msg}")]
    Pem { what: &'static str, msg: String },
    #[error("no private key found in the key PEM: {0}")]
    NoKey(String),
    #[error("CA certificate rejected: {0}")]
    BadCa(String),
    #[error("certificate and key rejected: {0}")]
    BadCertificate(String),
    #[error("invalid server name {0:?}: a node id is host:port, with an IP address or DNS name as host")]
    ServerName(String),
    #[error("certificate generation: {0}")]
    Generate(String),
    #[error("this node's certificate is not valid for {node}: {reason}")]
    NotForNode { node: String, reason: String },
}

/// Mutual-TLS settings of a node or client: the CA that signs every
/// certificate of the cluster, and this process's certificate (chain) and
/// private key. Cheap to clone; clones share the identity, which
/// [`TlsConfig::replace_identity`] swaps for every later handshake of the
/// server and client sides alike (a renewed certificate; connections
/// already open keep theirs).
#[derive(Clone)]
pub struct TlsConfig {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    roots: Arc<RootCertStore>,
    identity: Arc<Identity>,
    policy: Arc<Policy>,
}

/// What a certified peer may ask of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// Everything: the client API, administration, replication.
    Admin,
    /// Replication between nodes only.
    Node,
}

/// The SHA-256 of a certificate (its DER).
pub type CertDigest = [u8; 32];

/// The certificate's SHA-256.
pub fn cert_digest(cert: &[u8]) -> CertDigest {
    use sha2::Digest;
    sha2::Sha256::digest(cert).into()
}

/// Who is an administrator, and which certificates are revoked; shared by
/// every clone and by the verifiers of both sides.
#[derive(Debug)]
struct Policy {
    admin_name: std::sync::RwLock<Option<ServerName<'static>>>,
    revoked: std::sync::RwLock<Arc<std::collections::HashSet<CertDigest>>>,
    /// Bumped on every change of the revoked set.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Policy {
    fn is_revoked(&self, cert: &CertificateDer<'_>) -> bool {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(&cert_digest(cert))
    }
}

/// The server side's client-certificate check: the CA's, then revocation.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    policy: Arc<Policy>,
}

impl rustls::server::danger::ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if self.policy.is_revoked(end_entity) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        self.inner.verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client side's server-certificate check: the CA's and the name's,
/// then revocation.
#[derive(Debug)]
struct ServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    policy: Arc<Policy>,
}

impl rustls::client::danger::ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self.policy.is_revoked(end_entity) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::client::danger::ServerCertVerifier::verify_tls12_signature(self.inner.as_ref(), message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::client::danger::ServerCertVerifier::verify_tls13_signature(self.inner.as_ref(), message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::client::danger::ServerCertVerifier::supported_verify_schemes(self.inner.as_ref())
    }
}

/// This process's certificate and key, presented by both sides.
#[derive(Debug)]
struct Identity(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl Identity {
    fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl rustls::server::ResolvesServerCert for Identity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for Identity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A certificate chain (leaf first) and its private key, checked to match.
fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let chain = certs("certificate", cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::NoKey(e.to_string()))?;
    let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    Ok(Arc::new(certified))
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig { .. }")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::Pem { what, msg: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

impl TlsConfig {
    /// Build from PEM bytes: the CA certificate(s), this process's
    /// certificate chain (leaf first) and its private key (PKCS#8, PKCS#1
    /// or SEC1).
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsConfig, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in certs("CA certificate", ca_pem)? {
            roots.add(ca).map_err(|e| TlsError::BadCa(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let identity = Arc::new(Identity(std::sync::RwLock::new(certified_key(cert_pem, key_pem)?)));
        let policy = Arc::new(Policy {
            admin_name: std::sync::RwLock::new(None),
            revoked: Default::default(),
            changes: tokio::sync::watch::channel(0).0,
        });
        let p = provider();
        // A connection without a client certificate is accepted by the TLS
        // layer so that health and readiness probes work; every other
        // request is refused per request (see `tcp::serve_tls`). A
        // certificate that is presented must chain to the CA and not be revoked.
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::BadCa(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?
            .with_client_cert_verifier(Arc::new(ClientVerifier { inner, policy: policy.clone() }))
            .with_cert_resolver(identity.clone());
        // No session resumption: a resumed session brings back the client
        // certificate of its first handshake without checking it again, so
        // a revoked certificate would still get in. (Connections between
        // nodes are few and long-lived; a full handshake each costs little.)
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), p.clone())
            .build()
            .map_err(|e| TlsError::BadCa(e.to_string()))?;
        let client = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier { inner, policy: policy.clone() }))
            .with_client_cert_resolver(identity.clone());
        Ok(TlsConfig { server: Arc::new(server), client: Arc::new(client), roots, identity, policy })
    }

    /// A peer whose certificate is valid for the DNS name `name` is an
    /// administrator from now on; every other certified peer a node (see
    /// the module doc). Shared by every clone.
    pub fn with_admin_name(self, name: &str) -> Result<TlsConfig, TlsError> {
        let name = ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))?;
        *self.policy.admin_name.write().unwrap_or_else(|p| p.into_inner()) = Some(name);
        Ok(self)
    }

    /// What the peer presenting `cert` (already verified) may do.
    pub fn authority(&self, cert: &CertificateDer<'_>) -> Authority {
        let admin = self.policy.admin_name.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(name) = admin else { return Authority::Admin };
        match webpki::EndEntityCert::try_from(cert) {
            Ok(ee) if ee.verify_is_valid_for_subject_name(&name).is_ok() => Authority::Admin,
            _ => Authority::Node,
        }
    }

    /// Replaces the set of revoked certificates (their SHA-256), for every
    /// clone: later handshakes with them fail, and connections open with
    /// them are told to close ([`TlsConfig::revocations`]).
    pub fn set_revoked(&self, revoked: impl IntoIterator<Item = CertDigest>) {
        let new: std::collections::HashSet<CertDigest> = revoked.into_iter().collect();
        let mut cur = self.policy.revoked.write().unwrap_or_else(|p| p.into_inner());
        if **cur != new {
            *cur = Arc::new(new);
            drop(cur);
            self.policy.changes.send_modify(|n| *n += 1);
        }
    }

    /// Whether the certificate with this digest is revoked.
    pub fn is_revoked(&self, digest: &CertDigest) -> bool {
        self.policy.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(digest)
    }

    /// Changes whenever the revoked set changes.
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.policy.changes.subscribe()
    }

    /// Presents `cert_pem` and `key_pem` from now on, in every clone of
    /// this configuration (a renewed certificate of the same CA).
    pub fn replace_identity(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        let new = certified_key(cert_pem, key_pem)?;
        *self.identity.0.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    /// Check that this certificate is what peers will accept from node
    /// `node` (`host:port`): it chains to the CA, is valid now and names
    /// the host. `store-node` runs it at start, so a wrong certificate
    /// fails there rather than in every peer's handshake.
    pub fn check_node(&self, node: &str) -> Result<(), TlsError> {
        use rustls::client::danger::ServerCertVerifier;
        let not_for = |reason: String| TlsError::NotForNode { node: node.to_string(), reason };
        let name = server_name(node)?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| not_for(e.to_string()))?;
        let current = self.identity.current();
        let (leaf, rest) = current.cert.split_first().ok_or(TlsError::NoCertificate { what: "certificate" })?;
        verifier
            .verify_server_cert(leaf, rest, &name, &[], rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| not_for(e.to_string()))
    }

    /// Build from PEM files (as `store-node --tls-ca --tls-cert --tls-key`).
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<TlsConfig, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.to_path_buf(), source });
        TlsConfig::from_pem(&read(ca)?, &read(cert)?, &read(key)?)
    }

    /// Server side: requires nothing of the TLS handshake beyond a valid
    /// chain for a certificate that is presented.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// Client side: presents this certificate, verifies the server's.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client.clone())
    }
}

/// The name a node's certificate must carry: the host part of its id
/// (`host:port`, `[v6]:port`), as an IP address or DNS name.
pub fn server_name(node: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match node.rsplit_once(':') {
        Some((h, port)) if !h.is_empty() && port.parse::<u16>().is_ok() => h,
        _ => return Err(TlsError::ServerName(node.to_string())),
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(node.to_string()))
}

/// A throwaway CA made in-process (benchmarks, tests, local clusters).
/// Production certificates come from the control plane's CA.
#[cfg(feature = "test-support")]
pub mod dev {
    use super::{TlsConfig, TlsError};
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

    fn gen<E: std::fmt::Display>(e: E) -> TlsError {
        TlsError::Generate(e.to_string())
    }

    /// A certificate and its key, as PEM.
    #[derive(Debug, Clone)]
    pub struct Issued {
        pub cert_pem: String,
        pub key_pem: String,
    }

    pub struct DevCa {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    impl DevCa {
        /// A new CA named `name` (ECDSA P-256).
        pub fn new(name: &str) -> Result<DevCa, TlsError> {
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            let key = KeyPair::generate().map_err(gen)?;
            let cert = params.self_signed(&key).map_err(gen)?;
            Ok(DevCa { cert, key })
        }

        pub fn ca_pem(&self) -> String {
            self.cert.pem()
        }

        /// A certificate for `names` (IP addresses become IP SANs, other
        /// names DNS SANs), usable as server and as client certificate.
        pub fn issue(&self, names: &[&str]) -> Result<Issued, TlsError> {
            let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map_err(gen)?;
            params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("nimbus-store-client"));
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate().map_err(gen)?;
            let cert = params.signed_by(&key, &self.cert, &self.key).map_err(gen)?;
            Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
        }

        /// A [`TlsConfig`] with a fresh certificate for `names`.
        pub fn tls_config(&self, names: &[&str]) -> Result<TlsConfig, TlsError> {
            let i = self.issue(names)?;
            TlsConfig::from_pem(self.ca_pem().as_bytes(), i.cert_pem.as_bytes(), i.key_pem.as_bytes())
        }
    }

    /// A self-signed certificate for `names` (signed by no CA).
    pub fn self_signed(names: &[&str]) -> Result<Issued, TlsError> {
        let key = KeyPair::generate().map_err(gen)?;
        let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map_err(gen)?;
        let cert = params.self_signed(&key).map_err(gen)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_the_host_part_of_node_ids() {
        assert_eq!(server_name("127.0.0.1:7001").ok(), Some(ServerName::try_from("127.0.0.1").expect("ip")));
        assert_eq!(server_name("[::1]:7001").ok(), Some(ServerName::try_from("::1").expect("ip6")));
        assert_eq!(server_name("store-1.nimbus:7001").ok(), Some(ServerName::try_from("store-1.nimbus").expect("dns")));
        assert!(server_name("no-port").is_err());
        assert!(server_name(":7001").is_err());
        assert!(server_name("host:notaport").is_err());
    }

    #[test]
    fn configs_build_from_generated_pems_and_bad_pems_are_typed_errors() {
        let ca = dev::DevCa::new("test ca").expect("ca");
        let i = ca.issue(&["127.0.0.1"]).expect("issue");
        assert!(TlsConfig::from_pem(ca.ca_pem().as_bytes(), i.cert_pem.as_bytes(), i.key_pem.as_bytes()).is_ok());
        let no_cert = TlsConfig::from_pem(ca.ca_pem().as_bytes(), b"", i.key_pem.as_bytes());
        assert!(matches!(no_cert, Err(TlsError::NoCertificate { .. })), "{no_cert:?}");
        let no_key = TlsConfig::from_pem(ca.ca_pem().as_bytes(), i.cert_pem.as_bytes(), i.cert_pem.as_bytes());
        assert!(matches!(no_key, Err(TlsError::NoKey(_))), "{no_key:?}");
        let other = dev::DevCa::new("other").expect("ca").issue(&["127.0.0.1"]).expect("issue");
        // a key that does not match the certificate
        let mismatch = TlsConfig::from_pem(ca.ca_pem().as_bytes(), i.cert_pem.as_bytes(), other.key_pem.as_bytes());
        assert!(matches!(mismatch, Err(TlsError::BadCertificate(_))), "{mismatch:?}");
        let missing = TlsConfig::from_files(Path::new("/nonexistent/ca.pem"), Path::new("/x"), Path::new("/y"));
        assert!(matches!(missing, Err(TlsError::Read { .. })), "{missing:?}");
    }

    /// The leaf certificates of a new connection: what `server` presents to
    /// `client`, and what `client` presents to `server`.
    async fn presented(server: &TlsConfig, client: &TlsConfig) -> (Vec<u8>, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = server.acceptor();
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let tls = acceptor.accept(tcp).await.expect("the server accepts the client's certificate");
            tls.get_ref().1.peer_certificates().expect("a client certificate")[0].to_vec()
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = server_name(&addr.to_string()).expect("name");
        let tls = client.connector().connect(name, tcp).await.expect("handshake");
        let leaf = tls.get_ref().1.peer_certificates().expect("a server certificate")[0].to_vec();
        (leaf, accepted.await.expect("server task"))
    }

    fn der(pem: &str) -> Vec<u8> {
        certs("certificate", pem.as_bytes()).expect("pem")[0].to_vec()
    }

    /// A renewed certificate: every later handshake of every clone presents
    /// it, as server and as client; a key that does not match is refused
    /// and changes nothing.
    #[tokio::test]
    async fn a_replaced_identity_is_presented_by_later_handshakes() {
        let ca = dev::DevCa::new("test ca").expect("ca");
        let (first, second) = (ca.issue(&["127.0.0.1"]).expect("issue"), ca.issue(&["127.0.0.1"]).expect("issue"));
        let node = TlsConfig::from_pem(ca.ca_pem().as_bytes(), first.cert_pem.as_bytes(), first.key_pem.as_bytes()).expect("tls");
        let peer = ca.tls_config(&["127.0.0.1"]).expect("tls");
        assert_eq!(presented(&node, &peer).await.0, der(&first.cert_pem));
        assert_eq!(presented(&peer, &node).await.1, der(&first.cert_pem));
        let clone = node.clone();
        clone.replace_identity(second.cert_pem.as_bytes(), second.key_pem.as_bytes()).expect("replaced");
        assert_eq!(presented(&node, &peer).await.0, der(&second.cert_pem), "as server");
        assert_eq!(presented(&peer, &node).await.1, der(&second.cert_pem), "as client");
        let bad = node.replace_identity(first.cert_pem.as_bytes(), second.key_pem.as_bytes());
        assert!(matches!(bad, Err(TlsError::BadCertificate(_))), "{bad:?}");
        assert_eq!(presented(&node, &peer).await.0, der(&second.cert_pem), "unchanged");
        node.check_node("127.0.0.1:7000").expect("the current certificate names the node");
    }

    /// With an administrator name, only a certificate valid for it is an
    /// administrator; without one, every certified peer is.
    #[test]
    fn authority_follows_the_administrator_name() {
        let ca = dev::DevCa::new("test ca").expect("ca");
        let admin = ca.issue(&["127.0.0.1", "admin.example"]).expect("issue");
        let node = ca.issue(&["127.0.0.2"]).expect("issue");
        let plain = ca.tls_config(&["127.0.0.3"]).expect("cfg");
        let cfg = ca.tls_config(&["127.0.0.3"]).expect("cfg").with_admin_name("admin.example").expect("name");
        let (admin, node) = (CertificateDer::from(der(&admin.cert_pem)), CertificateDer::from(der(&node.cert_pem)));
        assert_eq!(cfg.authority(&admin), Authority::Admin);
        assert_eq!(cfg.authority(&node), Authority::Node);
        assert_eq!(plain.authority(&node), Authority::Admin);
        // Revocation is shared by clones, and announced.
        let changes = cfg.revocations();
        let clone = cfg.clone();
        clone.set_revoked([cert_digest(&node)]);
        assert!(cfg.is_revoked(&cert_digest(&node)) && !cfg.is_revoked(&cert_digest(&admin)));
        assert!(changes.has_changed().unwrap());
    }

    #[test]
    fn a_node_certificate_is_checked_against_its_id() {
        let ca = dev::DevCa::new("test ca").expect("ca");
        let cfg = ca.tls_config(&["127.0.0.1", "store-1.nimbus"]).expect("cfg");
        assert!(cfg.check_node("127.0.0.1:7001").is_ok());
        assert!(cfg.check_node("store-1.nimbus:7001").is_ok());
        assert!(matches!(cfg.check_node("127.0.0.2:7001"), Err(TlsError::NotForNode { .. })));
        assert!(matches!(cfg.check_node("store-2.nimbus:7001"), Err(TlsError::NotForNode { .. })));
        // a certificate of another CA than the one configured
        let other = dev::DevCa::new("other").expect("ca").issue(&["127.0.0.1"]).expect("issue");
        let mixed = TlsConfig::from_pem(ca.ca_pem().as_bytes(), other.cert_pem.as_bytes(), other.key_pem.as_bytes()).expect("cfg");
        assert!(matches!(mixed.check_node("127.0.0.1:7001"), Err(TlsError::NotForNode { .. })));
    }
}
