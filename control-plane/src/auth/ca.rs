//! The control plane's certificate authority (ECDSA P-256, `rcgen`).
//!
//! One CA per cluster, made by the first control plane that starts and kept
//! in PostgreSQL (`cluster_ca`): its certificate in the clear, its private
//! key sealed under the master key with AES-256-GCM (as access-key secrets
//! are, [`super::secrets`]), bound to the CA's name as associated data. The
//! key is opened in memory only, never logged, never written elsewhere.
//!
//! It certifies:
//! - each host's own key pair, at every agent start (`POST /v1/agent/certificate`):
//!   the host sends only its public key, so the host's private key never
//!   leaves the host. The certificate names the host id (common name) and
//!   the address of the host's store node (IP SAN); it serves both that node
//!   and the agent's side of mutual TLS with the control plane;
//! - the control plane's own key, made afresh at every start (never
//!   stored), for its store node and its TLS listener for agents; its
//!   certificate alone carries the DNS name
//!   [`nimbus_proto::agent::CONTROL_PLANE_NAME`] (host certificates carry
//!   one IP address and no name), which agents check and store nodes take
//!   as an administrator's.
//!
//! rcgen cannot read a certificate back without `x509-parser`; it does not
//! need to: signing needs only the CA's name, key usages and key, so a
//! restarted control plane rebuilds the issuer from the stored name and
//! key, and what it signs chains to the stored certificate (a unit test
//! checks it with rustls).

use super::secrets::{self, MasterKey};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
    SignatureAlgorithm,
};
use std::time::Duration;

/// How long a host's certificate is valid; agents ask for a new one at
/// every start.
pub const HOST_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The CA's own validity.
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Clock skew tolerated between machines (certificates start this early).
const SKEW: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate: {0}")]
    Generate(String),
    #[error("the CA's key does not open: {0}")]
    Sealed(#[from] secrets::SecretsError),
    #[error("the public key must be an uncompressed ECDSA P-256 point (65 bytes, base64)")]
    BadPublicKey,
    #[error("{0:?} is not an IP address")]
    BadAddress(String),
}

fn gen<E: std::fmt::Display>(e: E) -> CaError {
    CaError::Generate(e.to_string())
}

/// A host's public key as its agent sends it: an uncompressed P-256 point.
struct P256Point(Vec<u8>);

impl PublicKeyData for P256Point {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Parses a host's public key (base64 of the 65-byte uncompressed point).
pub fn parse_public_key(b64: &str) -> Result<Vec<u8>, CaError> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|_| CaError::BadPublicKey)?;
    if raw.len() != 65 || raw[0] != 4 {
        return Err(CaError::BadPublicKey);
    }
    Ok(raw)
}

/// A certificate and its private key (PEM), issued to the control plane itself.
pub struct OwnCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for OwnCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnCertificate { key: <redacted> }")
    }
}

pub struct Ca {
    common_name: String,
    cert_pem: String,
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ca {{ name: {:?}, key: <redacted> }}", self.common_name)
    }
}

fn ca_params(common_name: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn random_serial() -> SerialNumber {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

fn at(offset: chrono::Duration) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp((chrono::Utc::now() + offset).timestamp()).map_err(gen)
}

/// The associated data of the sealed CA key.
fn aad(common_name: &str) -> String {
    format!("nimbus-ca:{common_name}")
}

impl Ca {
    /// A new CA (a random name, so two clusters' CAs never share one).
    pub fn generate() -> Result<Ca, CaError> {
        use rand::Rng;
        let common_name = format!("Nimbus CA {:016x}", rand::thread_rng().gen::<u64>());
        let key = KeyPair::generate().map_err(gen)?;
        let mut params = ca_params(&common_name)?;
        params.not_before = at(-chrono::Duration::from_std(SKEW).map_err(gen)?)?;
        params.not_after = at(chrono::Duration::from_std(CA_LIFETIME).map_err(gen)?)?;
        params.serial_number = Some(random_serial());
        let issuer = params.self_signed(&key).map_err(gen)?;
        Ok(Ca { common_name, cert_pem: issuer.pem(), issuer, key })
    }

    /// The CA as stored: (name, certificate PEM, key sealed under `master`).
    pub fn sealed(&self, master: &MasterKey) -> Result<(String, String, Vec<u8>), CaError> {
        let key_pem = self.key.serialize_pem();
        let sealed = secrets::seal(master, &aad(&self.common_name), &key_pem)?;
        Ok((self.common_name.clone(), self.cert_pem.clone(), sealed))
    }

    /// The CA from its stored form.
    pub fn open(master: &MasterKey, common_name: &str, cert_pem: &str, key_sealed: &[u8]) -> Result<Ca, CaError> {
        let key_pem = secrets::open(master, &aad(common_name), key_sealed)?;
        let key = KeyPair::from_pem(&key_pem).map_err(gen)?;
        // Signing needs the issuer's name, key usages and key: rebuilt, not parsed.
        let issuer = ca_params(common_name)?.self_signed(&key).map_err(gen)?;
        Ok(Ca { common_name: common_name.to_string(), cert_pem: cert_pem.to_string(), issuer, key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for a host's key: common name the host id, SAN the
    /// address of its store node (if any); valid for TLS server and client.
    /// Returns (PEM, DER, not after).
    pub fn issue_host(
        &self,
        host_id: &str,
        public_key: &[u8],
        store_ip: Option<std::net::IpAddr>,
    ) -> Result<(String, Vec<u8>, chrono::DateTime<chrono::Utc>), CaError> {
        let sans: Vec<String> = store_ip.map(|ip| ip.to_string()).into_iter().collect();
        let mut params = CertificateParams::new(sans).map_err(gen)?;
        params.distinguished_name.push(DnType::CommonName, host_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let not_after = chrono::Utc::now() + chrono::Duration::from_std(HOST_CERT_LIFETIME).map_err(gen)?;
        params.not_before = at(-chrono::Duration::from_std(SKEW).map_err(gen)?)?;
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after.timestamp()).map_err(gen)?;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&P256Point(public_key.to_vec()), &self.issuer, &self.key).map_err(gen)?;
        Ok((cert.pem(), cert.der().to_vec(), not_after))
    }

    /// A certificate and a fresh key for the control plane itself, naming
    /// `names` (IP addresses become IP SANs, others DNS SANs).
    /// The certificate also names [`nimbus_proto::agent::CONTROL_PLANE_NAME`],
    /// which no host certificate carries: agents accept a control plane,
    /// and store nodes an administrator, only with it.
    pub fn issue_own(&self, names: &[String]) -> Result<OwnCertificate, CaError> {
        let mut names = names.to_vec();
        names.push(nimbus_proto::agent::CONTROL_PLANE_NAME.to_string());
        let mut params = CertificateParams::new(names).map_err(gen)?;
        params.distinguished_name.push(DnType::CommonName, "nimbus-control-plane");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = at(-chrono::Duration::from_std(SKEW).map_err(gen)?)?;
        params.not_after = at(chrono::Duration::from_std(HOST_CERT_LIFETIME).map_err(gen)?)?;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate().map_err(gen)?;
        let cert = params.signed_by(&key, &self.issuer, &self.key).map_err(gen)?;
        Ok(OwnCertificate { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// The IP address of a store node id (`ip:port`), which its certificate names.
pub fn store_address_ip(address: &str) -> Result<std::net::IpAddr, CaError> {
    address.parse::<std::net::SocketAddr>().map(|a| a.ip()).map_err(|_| CaError::BadAddress(address.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_state_store::TlsConfig;

    fn host_key() -> (KeyPair, String) {
        use base64::Engine;
        let key = KeyPair::generate().expect("key");
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.public_key_raw());
        (key, b64)
    }

    /// What a restarted control plane signs (issuer rebuilt from the sealed
    /// key) chains to the certificate every host already trusts.
    #[test]
    fn a_reopened_ca_issues_certificates_that_chain_to_the_stored_one() {
        let master = MasterKey::generate();
        let (name, cert_pem, sealed) = Ca::generate().expect("ca").sealed(&master).expect("seal");
        assert!(!String::from_utf8_lossy(&sealed).contains("PRIVATE KEY"), "the key is sealed");
        let ca = Ca::open(&master, &name, &cert_pem, &sealed).expect("open");
        let (key, b64) = host_key();
        let raw = parse_public_key(&b64).expect("key");
        let ip: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
        let (pem, der, not_after) = ca.issue_host("h-0123456789abcdef0", &raw, Some(ip)).expect("issue");
        assert!(!der.is_empty() && not_after > chrono::Utc::now() + chrono::Duration::days(300));
        let tls = TlsConfig::from_pem(cert_pem.as_bytes(), pem.as_bytes(), key.serialize_pem().as_bytes()).expect("tls");
        tls.check_node("127.0.0.1:7400").expect("the host's certificate chains to the stored CA and names its address");
        assert!(tls.check_node("127.0.0.2:7400").is_err(), "and no other address");
        // The control plane's own certificate too.
        let own = ca.issue_own(&["127.0.0.1".into(), "cp.example".into()]).expect("own");
        let tls = TlsConfig::from_pem(cert_pem.as_bytes(), own.cert_pem.as_bytes(), own.key_pem.as_bytes()).expect("tls");
        tls.check_node("cp.example:8443").expect("names the DNS name");
        assert_eq!(format!("{own:?}"), "OwnCertificate { key: <redacted> }");
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn the_sealed_key_needs_the_master_key_and_the_name() {
        let master = MasterKey::generate();
        let (name, cert, sealed) = Ca::generate().expect("ca").sealed(&master).expect("seal");
        assert!(matches!(Ca::open(&MasterKey::generate(), &name, &cert, &sealed), Err(CaError::Sealed(_))));
        assert!(matches!(Ca::open(&master, "Nimbus CA other", &cert, &sealed), Err(CaError::Sealed(_))));
    }

    #[test]
    fn public_keys_are_checked() {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        assert!(parse_public_key("not base64!").is_err());
        assert!(parse_public_key(&b64(&[4u8; 64])).is_err());
        assert!(parse_public_key(&b64(&[3u8; 65])).is_err());
        assert!(parse_public_key(&b64(&[4u8; 65])).is_ok());
        assert!(store_address_ip("10.0.0.5:7400").is_ok());
        assert!(store_address_ip("host.example:7400").is_err());
    }
}
