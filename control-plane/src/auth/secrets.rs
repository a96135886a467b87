//! Access keys for accounts, and sealed storage of their secrets.
//!
//! An access key is an id shaped like AWS's (`AKIA` + 16 upper-case base32
//! characters) and a 40-character secret from the base64 alphabet. SigV4 is
//! a shared-secret scheme: the server needs the secret itself to recompute
//! the HMAC, so it cannot keep only a hash. Instead the secret is sealed with
//! AES-256-GCM under a server master key (32 bytes, hex in configuration):
//! a fresh random 96-bit nonce per seal, and the access key id as associated
//! data, so a sealed secret copied onto another key's row does not open.
//!
//! Sealed layout: `version (1 byte) || nonce (12 bytes) || ciphertext+tag`.
//! The version byte leaves room for master-key rotation.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

/// Length of an access key id: `AKIA` + 16.
pub const ACCESS_KEY_ID_LEN: usize = 20;
/// Length of a secret access key.
pub const SECRET_LEN: usize = 40;
const SEAL_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Why a master key or a sealed secret is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    #[error("the master key must be 64 hex digits (32 bytes)")]
    BadMasterKey,
    #[error("sealed secret is truncated or of an unknown version")]
    BadFormat,
    /// Wrong master key, wrong access key id, or tampered data.
    #[error("sealed secret does not open (wrong key, wrong access key id, or tampered)")]
    OpenFailed,
    #[error("sealing failed")]
    SealFailed,
    #[error("opened secret is not UTF-8")]
    NotUtf8,
}

/// The server's 256-bit master key. Its `Debug` does not show the key.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(hex_key: &str) -> Result<Self, SecretsError> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(hex_key.trim(), &mut key).map_err(|_| SecretsError::BadMasterKey)?;
        Ok(Self(key))
    }

    /// A fresh random key (for tests and first-time setup).
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        Self(key)
    }

    /// The key as 64 hex digits, for writing a generated key to configuration.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0.into())
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A new access key id: `AKIA` + 16 random base32 characters.
pub fn generate_access_key_id() -> String {
    let mut bytes = [0u8; ACCESS_KEY_ID_LEN - 4];
    OsRng.fill_bytes(&mut bytes);
    let mut id = String::with_capacity(ACCESS_KEY_ID_LEN);
    id.push_str("AKIA");
    // 256 is a multiple of 32: masking keeps the draw uniform.
    id.extend(bytes.iter().map(|b| char::from(BASE32[usize::from(b & 31)])));
    id
}

/// A new secret access key: 40 random characters of the base64 alphabet
/// (240 bits), like AWS's.
pub fn generate_secret_access_key() -> String {
    let mut bytes = [0u8; SECRET_LEN];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| char::from(BASE64[usize::from(b & 63)])).collect()
}

/// Whether `id` is shaped like an access key id this module generates.
pub fn is_valid_access_key_id(id: &str) -> bool {
    id.len() == ACCESS_KEY_ID_LEN && id.starts_with("AKIA") && id.bytes().skip(4).all(|b| BASE32.contains(&b))
}

/// Seals `secret` under `master`, bound to `access_key_id`.
pub fn seal(master: &MasterKey, access_key_id: &str, secret: &str) -> Result<Vec<u8>, SecretsError> {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let ciphertext = master
        .cipher()
        .encrypt(&nonce, Payload { msg: secret.as_bytes(), aad: access_key_id.as_bytes() })
        .map_err(|_| SecretsError::SealFailed)?;
    let mut sealed = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    sealed.push(SEAL_VERSION);
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&ciphertext);
    Ok(sealed)
}

/// Opens what [`seal`] made for the same master key and access key id.
pub fn open(master: &MasterKey, access_key_id: &str, sealed: &[u8]) -> Result<String, SecretsError> {
    let (&version, rest) = sealed.split_first().ok_or(SecretsError::BadFormat)?;
    if version != SEAL_VERSION || rest.len() < NONCE_LEN + TAG_LEN {
        return Err(SecretsError::BadFormat);
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let plaintext = master
        .cipher()
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: access_key_id.as_bytes() })
        .map_err(|_| SecretsError::OpenFailed)?;
    String::from_utf8(plaintext).map_err(|_| SecretsError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AKID: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    #[test]
    fn generated_ids_and_secrets_have_aws_shape() {
        for _ in 0..100 {
            let id = generate_access_key_id();
            assert!(is_valid_access_key_id(&id), "{id}");
            let secret = generate_secret_access_key();
            assert_eq!(secret.len(), SECRET_LEN);
            assert!(secret.bytes().all(|b| BASE64.contains(&b)));
        }
        assert_ne!(generate_access_key_id(), generate_access_key_id());
        assert_ne!(generate_secret_access_key(), generate_secret_access_key());
        assert!(is_valid_access_key_id(AKID));
        assert!(!is_valid_access_key_id("AKIAIOSFODNN7EXAMPL"));
        assert!(!is_valid_access_key_id("ASIAIOSFODNN7EXAMPLE"));
        assert!(!is_valid_access_key_id("AKIAIOSFODNN7EXAMPL1"));
    }

    #[test]
    fn round_trip() {
        let master = MasterKey::generate();
        let sealed = seal(&master, AKID, SECRET).expect("seal");
        assert_eq!(sealed.len(), 1 + NONCE_LEN + SECRET.len() + TAG_LEN);
        assert!(!sealed.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()));
        assert_eq!(open(&master, AKID, &sealed).as_deref(), Ok(SECRET));
        // A fresh nonce each time.
        assert_ne!(seal(&master, AKID, SECRET).expect("seal"), sealed);
    }

    #[test]
    fn master_key_from_hex() {
        let master = MasterKey::generate();
        let again = MasterKey::from_hex(&format!(" {}\n", master.to_hex())).expect("hex");
        let sealed = seal(&master, AKID, SECRET).expect("seal");
        assert_eq!(open(&again, AKID, &sealed).as_deref(), Ok(SECRET));
        assert_eq!(MasterKey::from_hex("00").err(), Some(SecretsError::BadMasterKey));
        assert_eq!(MasterKey::from_hex(&"zz".repeat(32)).err(), Some(SecretsError::BadMasterKey));
        assert_eq!(MasterKey::from_hex(&"00".repeat(33)).err(), Some(SecretsError::BadMasterKey));
        assert_eq!(format!("{master:?}"), "MasterKey(<redacted>)");
    }

    #[test]
    fn wrong_master_key_fails() {
        let sealed = seal(&MasterKey::generate(), AKID, SECRET).expect("seal");
        assert_eq!(open(&MasterKey::generate(), AKID, &sealed), Err(SecretsError::OpenFailed));
    }

    #[test]
    fn tampered_sealed_secret_fails() {
        let master = MasterKey::generate();
        let sealed = seal(&master, AKID, SECRET).expect("seal");
        for i in 1..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(open(&master, AKID, &bad), Err(SecretsError::OpenFailed), "byte {i}");
        }
        let mut bad = sealed.clone();
        bad[0] = 2;
        assert_eq!(open(&master, AKID, &bad), Err(SecretsError::BadFormat));
        assert_eq!(open(&master, AKID, &sealed[..sealed.len() - 1]), Err(SecretsError::OpenFailed));
        assert_eq!(open(&master, AKID, &sealed[..1 + NONCE_LEN + TAG_LEN - 1]), Err(SecretsError::BadFormat));
        assert_eq!(open(&master, AKID, &[]), Err(SecretsError::BadFormat));
    }

    #[test]
    fn swapped_access_key_id_fails() {
        let master = MasterKey::generate();
        let sealed = seal(&master, AKID, SECRET).expect("seal");
        let other = generate_access_key_id();
        assert_eq!(open(&master, &other, &sealed), Err(SecretsError::OpenFailed));
        assert_eq!(open(&master, "", &sealed), Err(SecretsError::OpenFailed));
    }
}
