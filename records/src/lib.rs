//! What Nimbus keeps in the state store, made trustworthy end to end.
//!
//! The state store replicates every key to N nodes, and every host runs a
//! node: a node (or a compromised host holding a node certificate) can read
//! and write any replica it holds. So nothing a reader relies on is trusted
//! because of where it was read; it is trusted because of who made it:
//!
//! - `instance/<id>` holds a [`SealedDocument`]: the instance's
//!   [`InstanceDocument`] encrypted for the one host it runs on (ECDH P-256
//!   with an ephemeral key, HKDF-SHA-256, AES-256-GCM: only that host's
//!   private key opens it, so replicas on other hosts hold ciphertext), with
//!   its instance id, host id and version in the clear, all signed by the
//!   control plane's document key (ECDSA P-256). A host serves a document
//!   only if the signature holds, it names the instance and this host, and
//!   it opens with this host's key; a forged or replayed-for-another-host
//!   document is ignored, whatever version it claims.
//! - `console/<id>` and `status/<id>` hold a [`SignedRecord`]: the payload,
//!   the host that wrote it, and that host's signature (its own P-256 key,
//!   the one its certificate certifies). The control plane takes a record
//!   only from the host the instance is assigned to.
//!
//! Every signature covers a domain tag, the store key and every field, so a
//! signed value cannot be moved to another key, instance, host or version.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use nimbus_proto::metadata::{document_key, InstanceDocument};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use p256::{PublicKey, SecretKey};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("not a record of this format: {0}")]
    Format(String),
    #[error("the signature does not hold")]
    Signature,
    #[error("signed by an unknown key {0:?}")]
    UnknownSigner(String),
    #[error("the record is for {what} {found:?}, not {expected:?}")]
    Mismatch { what: &'static str, found: String, expected: String },
    #[error("the document does not open with this host's key")]
    Sealed,
    #[error("key: {0}")]
    Key(String),
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn unb64(what: &str, s: &str) -> Result<Vec<u8>, RecordError> {
    B64.decode(s).map_err(|e| RecordError::Format(format!("{what}: {e}")))
}

/// The message a signature covers: a domain tag, then each field with its
/// length (no two field lists encode the same).
fn message(tag: &str, fields: &[&[u8]]) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + fields.iter().map(|f| f.len() + 8).sum::<usize>());
    m.extend_from_slice(tag.as_bytes());
    m.push(0);
    for f in fields {
        m.extend_from_slice(&(f.len() as u64).to_be_bytes());
        m.extend_from_slice(f);
    }
    m
}

/// A P-256 key pair: the control plane's document key, or a host's key
/// (the one its TLS certificate certifies).
#[derive(Clone)]
pub struct KeyPair(SecretKey);

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("public", &self.key_id()).finish_non_exhaustive()
    }
}

impl KeyPair {
    pub fn generate() -> KeyPair {
        KeyPair(SecretKey::random(&mut OsRng))
    }

    /// From a PKCS#8 PEM (what `rcgen` writes for a host's key).
    pub fn from_pem(pem: &str) -> Result<KeyPair, RecordError> {
        SecretKey::from_pkcs8_pem(pem).map(KeyPair).map_err(|e| RecordError::Key(e.to_string()))
    }

    /// PKCS#8 DER (to keep the key sealed at rest).
    pub fn to_der(&self) -> Result<Vec<u8>, RecordError> {
        self.0.to_pkcs8_der().map(|d| d.as_bytes().to_vec()).map_err(|e| RecordError::Key(e.to_string()))
    }

    pub fn from_der(der: &[u8]) -> Result<KeyPair, RecordError> {
        SecretKey::from_pkcs8_der(der).map(KeyPair).map_err(|e| RecordError::Key(e.to_string()))
    }

    /// The public key, an uncompressed SEC1 point (65 bytes).
    pub fn public(&self) -> Vec<u8> {
        self.0.public_key().to_encoded_point(false).as_bytes().to_vec()
    }

    /// A short name of the public key: the first 16 hex digits of its SHA-256.
    pub fn key_id(&self) -> String {
        key_id(&self.public())
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let sig: Signature = SigningKey::from(&self.0).sign(msg);
        sig.to_der().as_bytes().to_vec()
    }
}

/// The name of a public key (see [`KeyPair::key_id`]).
pub fn key_id(public: &[u8]) -> String {
    Sha256::digest(public).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn public_key(point: &[u8]) -> Result<PublicKey, RecordError> {
    PublicKey::from_sec1_bytes(point).map_err(|e| RecordError::Key(format!("public key: {e}")))
}

fn verify(point: &[u8], msg: &[u8], signature_der: &[u8]) -> Result<(), RecordError> {
    let key = VerifyingKey::from(public_key(point)?);
    let sig = Signature::from_der(signature_der).map_err(|_| RecordError::Signature)?;
    key.verify(msg, &sig).map_err(|_| RecordError::Signature)
}

/// The control plane's document keys a reader trusts, by key id (several
/// while a key is being replaced).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKeys(pub std::collections::BTreeMap<String, String>);

impl TrustedKeys {
    /// From public keys (uncompressed points).
    pub fn from_points<'a>(points: impl IntoIterator<Item = &'a [u8]>) -> TrustedKeys {
        TrustedKeys(points.into_iter().map(|p| (key_id(p), b64(p))).collect())
    }

    fn get(&self, id: &str) -> Result<Vec<u8>, RecordError> {
        let k = self.0.get(id).ok_or_else(|| RecordError::UnknownSigner(id.to_string()))?;
        unb64("signer key", k)
    }
}

const DOCUMENT_TAG: &str = "nimbus-document-v1";
const RECORD_TAG: &str = "nimbus-host-record-v1";

/// `instance/<id>` as stored: see the crate doc.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SealedDocument {
    pub instance_id: String,
    /// The host the document is sealed for (the instance's host).
    pub host_id: String,
    pub version: u64,
    /// The sender's ephemeral public key (uncompressed point), base64.
    pub ephemeral: String,
    pub nonce: String,
    /// The document's JSON, AES-256-GCM, base64.
    pub ciphertext: String,
    /// The control plane's document key that signed it.
    pub signer: String,
    /// ECDSA P-256 (SHA-256, DER), base64.
    pub signature: String,
}

fn document_key_material(shared: &p256::ecdh::SharedSecret, ephemeral: &[u8], recipient: &[u8]) -> [u8; 32] {
    let mut salt = ephemeral.to_vec();
    salt.extend_from_slice(recipient);
    let hk = shared.extract::<Sha256>(Some(&salt));
    let mut okm = [0u8; 32];
    // 32 bytes is always a valid HKDF-SHA-256 output length.
    let _ = hk.expand(DOCUMENT_TAG.as_bytes(), &mut okm);
    okm
}

fn aad(instance_id: &str, host_id: &str, version: u64) -> Vec<u8> {
    message(DOCUMENT_TAG, &[document_key(instance_id).as_bytes(), host_id.as_bytes(), &version.to_be_bytes()])
}

impl SealedDocument {
    /// Seals `doc` for the host `host_id` whose public key is `recipient`,
    /// signed with the control plane's document key `signer`.
    pub fn seal(doc: &InstanceDocument, host_id: &str, recipient: &[u8], signer: &KeyPair) -> Result<SealedDocument, RecordError> {
        let recipient_key = public_key(recipient)?;
        let ephemeral = p256::ecdh::EphemeralSecret::random(&mut OsRng);
        let ephemeral_point = ephemeral.public_key().to_encoded_point(false).as_bytes().to_vec();
        let shared = ephemeral.diffie_hellman(&recipient_key);
        let key = document_key_material(&shared, &ephemeral_point, recipient);
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let plaintext = serde_json::to_vec(doc).map_err(|e| RecordError::Format(e.to_string()))?;
        let cipher = Aes256Gcm::new_from_slice(&key).map_err(|e| RecordError::Key(e.to_string()))?;
        let ciphertext = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: &plaintext, aad: &aad(&doc.instance_id, host_id, doc.version) })
            .map_err(|_| RecordError::Sealed)?;
        let mut sealed = SealedDocument {
            instance_id: doc.instance_id.clone(),
            host_id: host_id.to_string(),
            version: doc.version,
            ephemeral: b64(&ephemeral_point),
            nonce: b64(&nonce),
            ciphertext: b64(&ciphertext),
            signer: signer.key_id(),
            signature: String::new(),
        };
        sealed.signature = b64(&signer.sign(&sealed.signed_message()));
        Ok(sealed)
    }

    fn signed_message(&self) -> Vec<u8> {
        message(
            DOCUMENT_TAG,
            &[
                document_key(&self.instance_id).as_bytes(),
                self.host_id.as_bytes(),
                &self.version.to_be_bytes(),
                self.ephemeral.as_bytes(),
                self.nonce.as_bytes(),
                self.ciphertext.as_bytes(),
                self.signer.as_bytes(),
            ],
        )
    }

    /// Whether a trusted control-plane key signed exactly this.
    pub fn verify(&self, keys: &TrustedKeys) -> Result<(), RecordError> {
        let point = keys.get(&self.signer)?;
        verify(&point, &self.signed_message(), &unb64("signature", &self.signature)?)
    }

    /// Verifies, checks that it is `instance_id`'s and sealed for
    /// `host_id`, and opens it with that host's key.
    pub fn open(&self, keys: &TrustedKeys, instance_id: &str, host_id: &str, host_key: &KeyPair) -> Result<InstanceDocument, RecordError> {
        self.verify(keys)?;
        if self.instance_id != instance_id {
            return Err(RecordError::Mismatch { what: "instance", found: self.instance_id.clone(), expected: instance_id.to_string() });
        }
        if self.host_id != host_id {
            return Err(RecordError::Mismatch { what: "host", found: self.host_id.clone(), expected: host_id.to_string() });
        }
        let ephemeral = unb64("ephemeral key", &self.ephemeral)?;
        let shared = p256::ecdh::diffie_hellman(host_key.0.to_nonzero_scalar(), public_key(&ephemeral)?.as_affine());
        let key = document_key_material(&shared, &ephemeral, &host_key.public());
        let nonce = unb64("nonce", &self.nonce)?;
        if nonce.len() != 12 {
            return Err(RecordError::Format("nonce: not 12 bytes".into()));
        }
        let cipher = Aes256Gcm::new_from_slice(&key).map_err(|e| RecordError::Key(e.to_string()))?;
        let plaintext = cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload { msg: &unb64("ciphertext", &self.ciphertext)?, aad: &aad(&self.instance_id, &self.host_id, self.version) },
            )
            .map_err(|_| RecordError::Sealed)?;
        let doc: InstanceDocument = serde_json::from_slice(&plaintext).map_err(|e| RecordError::Format(e.to_string()))?;
        if doc.instance_id != self.instance_id || doc.version != self.version {
            return Err(RecordError::Mismatch { what: "document", found: doc.instance_id, expected: self.instance_id.clone() });
        }
        Ok(doc)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(raw: &[u8]) -> Result<SealedDocument, RecordError> {
        serde_json::from_slice(raw).map_err(|e| RecordError::Format(e.to_string()))
    }
}

/// Of a key's siblings, the validly signed document of `instance_id` with
/// the highest version (on a tie, the greatest encoding, so every reader
/// picks the same one); siblings that do not verify count as absent, so a
/// forged version can neither be served nor hold back a genuine one.
pub fn newest_sealed(siblings: &[Vec<u8>], keys: &TrustedKeys, instance_id: &str) -> Option<SealedDocument> {
    siblings
        .iter()
        .filter_map(|raw| {
            let d = SealedDocument::decode(raw).ok()?;
            (d.instance_id == instance_id && d.verify(keys).is_ok()).then_some((d.version, raw, d))
        })
        .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
        .map(|(_, _, d)| d)
}

/// A record a host wrote (`console/<id>`, `status/<id>`), signed by it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignedRecord {
    pub host_id: String,
    /// The record's JSON, base64.
    pub payload: String,
    /// ECDSA P-256 (SHA-256, DER) by the host's key, base64.
    pub signature: String,
}

impl SignedRecord {
    /// Signs `payload` for the store key `key` as host `host_id`.
    pub fn sign(key: &str, host_id: &str, payload: &[u8], host_key: &KeyPair) -> SignedRecord {
        let payload = b64(payload);
        let signature = b64(&host_key.sign(&message(RECORD_TAG, &[key.as_bytes(), host_id.as_bytes(), payload.as_bytes()])));
        SignedRecord { host_id: host_id.to_string(), payload, signature }
    }

    /// The payload, if `host_id` (whose public key is `host_public`) signed
    /// it for `key`.
    pub fn open(&self, key: &str, host_id: &str, host_public: &[u8]) -> Result<Vec<u8>, RecordError> {
        if self.host_id != host_id {
            return Err(RecordError::Mismatch { what: "host", found: self.host_id.clone(), expected: host_id.to_string() });
        }
        let msg = message(RECORD_TAG, &[key.as_bytes(), self.host_id.as_bytes(), self.payload.as_bytes()]);
        verify(host_public, &msg, &unb64("signature", &self.signature)?)?;
        unb64("payload", &self.payload)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(raw: &[u8]) -> Result<SignedRecord, RecordError> {
        serde_json::from_slice(raw).map_err(|e| RecordError::Format(e.to_string()))
    }
}

const CLUSTER_TAG: &str = "nimbus-cluster-record-v1";

/// A cluster-wide record the control plane publishes (the revocation
/// list), signed by its document key; readers take the newest version
/// that verifies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterRecord {
    pub version: u64,
    /// The record's JSON, base64.
    pub payload: String,
    pub signer: String,
    pub signature: String,
}

impl ClusterRecord {
    pub fn sign(key: &str, version: u64, payload: &[u8], signer: &KeyPair) -> ClusterRecord {
        let payload = b64(payload);
        let signer_id = signer.key_id();
        let msg = message(CLUSTER_TAG, &[key.as_bytes(), &version.to_be_bytes(), payload.as_bytes(), signer_id.as_bytes()]);
        ClusterRecord { version, payload, signature: b64(&signer.sign(&msg)), signer: signer_id }
    }

    /// The payload, if a trusted control-plane key signed it for `key`.
    pub fn open(&self, key: &str, keys: &TrustedKeys) -> Result<Vec<u8>, RecordError> {
        let msg = message(CLUSTER_TAG, &[key.as_bytes(), &self.version.to_be_bytes(), self.payload.as_bytes(), self.signer.as_bytes()]);
        verify(&keys.get(&self.signer)?, &msg, &unb64("signature", &self.signature)?)?;
        unb64("payload", &self.payload)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Of a key's siblings, the newest that verifies, opened.
    pub fn newest(siblings: &[Vec<u8>], key: &str, keys: &TrustedKeys) -> Option<(u64, Vec<u8>)> {
        siblings
            .iter()
            .filter_map(|raw| {
                let r: ClusterRecord = serde_json::from_slice(raw).ok()?;
                let payload = r.open(key, keys).ok()?;
                Some((r.version, payload))
            })
            .max_by(|a, b| a.cmp(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(cp: &KeyPair) -> TrustedKeys {
        TrustedKeys::from_points([cp.public().as_slice()])
    }

    #[test]
    fn a_sealed_document_opens_only_for_its_host_and_instance() {
        let (cp, host, other) = (KeyPair::generate(), KeyPair::generate(), KeyPair::generate());
        let mut doc = InstanceDocument::example("i-0123456789abcdef0", 7, "web");
        doc.user_data = Some("c2VjcmV0".into());
        let sealed = SealedDocument::seal(&doc, "h-1", &host.public(), &cp).unwrap();
        assert!(!String::from_utf8_lossy(&sealed.encode()).contains("c2VjcmV0"), "user-data in the clear");
        assert_eq!(sealed.open(&keys(&cp), "i-0123456789abcdef0", "h-1", &host).unwrap(), doc);
        assert_eq!(sealed.open(&keys(&cp), "i-0123456789abcdef0", "h-1", &other).unwrap_err(), RecordError::Sealed);
        assert!(matches!(sealed.open(&keys(&cp), "i-0123456789abcdef1", "h-1", &host), Err(RecordError::Mismatch { .. })));
        assert!(matches!(sealed.open(&keys(&cp), "i-0123456789abcdef0", "h-2", &host), Err(RecordError::Mismatch { .. })));
        // Another key's signature is not the control plane's.
        assert!(matches!(sealed.open(&keys(&other), "i-0123456789abcdef0", "h-1", &host), Err(RecordError::UnknownSigner(_))));
    }

    #[test]
    fn a_changed_field_breaks_the_signature_and_forgeries_are_not_newest() {
        let (cp, host, attacker) = (KeyPair::generate(), KeyPair::generate(), KeyPair::generate());
        let doc = InstanceDocument::example("i-0123456789abcdef0", 7, "web");
        let genuine = SealedDocument::seal(&doc, "h-1", &host.public(), &cp).unwrap();
        let mut bumped = genuine.clone();
        bumped.version = 1007;
        assert_eq!(bumped.verify(&keys(&cp)), Err(RecordError::Signature));
        // Sealed and signed by someone else under the control plane's key id.
        let mut forged =
            SealedDocument::seal(&InstanceDocument::example("i-0123456789abcdef0", 1000, "evil"), "h-1", &host.public(), &attacker)
                .unwrap();
        forged.signer = cp.key_id();
        assert_eq!(forged.verify(&keys(&cp)), Err(RecordError::Signature));
        let newest =
            newest_sealed(&[forged.encode(), bumped.encode(), genuine.encode(), b"junk".to_vec()], &keys(&cp), "i-0123456789abcdef0");
        assert_eq!(newest, Some(genuine));
    }

    /// Of genuine siblings the newest version wins in any order, garbage
    /// is skipped, and a tie picks the same one whatever the order.
    #[test]
    fn the_newest_version_wins_whatever_the_order() {
        let (cp, host) = (KeyPair::generate(), KeyPair::generate());
        let seal = |v: u64, tag: &str| {
            SealedDocument::seal(&InstanceDocument::example("i-0123456789abcdef0", v, tag), "h-1", &host.public(), &cp).unwrap().encode()
        };
        let (v1, v2, v3) = (seal(1, "a"), seal(2, "b"), seal(3, "c"));
        let newest = |s: &[Vec<u8>]| newest_sealed(s, &keys(&cp), "i-0123456789abcdef0").map(|d| d.version);
        for order in [vec![v1.clone(), v2.clone(), v3.clone()], vec![v3.clone(), v1.clone(), v2.clone()], vec![v2.clone(), v3.clone()]] {
            assert_eq!(newest(&order), Some(3));
        }
        assert_eq!(newest(&[b"{".to_vec(), v1.clone()]), Some(1));
        assert_eq!(newest(&[b"{".to_vec()]), None);
        let (x, y) = (seal(5, "x"), seal(5, "y"));
        let pick = |s: &[Vec<u8>]| newest_sealed(s, &keys(&cp), "i-0123456789abcdef0").map(|d| d.encode());
        assert_eq!(pick(&[x.clone(), y.clone()]), pick(&[y, x]));
    }

    #[test]
    fn host_records_are_bound_to_their_key_and_host() {
        let (host, other) = (KeyPair::generate(), KeyPair::generate());
        let r = SignedRecord::sign("console/i-1", "h-1", b"tail", &host);
        assert_eq!(r.open("console/i-1", "h-1", &host.public()).unwrap(), b"tail");
        assert_eq!(r.open("console/i-2", "h-1", &host.public()), Err(RecordError::Signature));
        assert!(matches!(r.open("console/i-1", "h-2", &host.public()), Err(RecordError::Mismatch { .. })));
        assert_eq!(r.open("console/i-1", "h-1", &other.public()), Err(RecordError::Signature));
    }

    #[test]
    fn cluster_records_verify_and_the_newest_valid_wins() {
        let (cp, other) = (KeyPair::generate(), KeyPair::generate());
        let old = ClusterRecord::sign("cluster/revoked", 1, b"[]", &cp);
        let new = ClusterRecord::sign("cluster/revoked", 2, b"[\"ab\"]", &cp);
        let mut forged = ClusterRecord::sign("cluster/revoked", 9, b"[]", &other);
        forged.signer = cp.key_id();
        let got = ClusterRecord::newest(&[old.encode(), forged.encode(), new.encode()], "cluster/revoked", &keys(&cp));
        assert_eq!(got, Some((2, b"[\"ab\"]".to_vec())));
        assert!(new.open("cluster/other", &keys(&cp)).is_err(), "bound to its key");
    }

    #[test]
    fn keys_round_trip_through_pkcs8() {
        let k = KeyPair::generate();
        assert_eq!(KeyPair::from_der(&k.to_der().unwrap()).unwrap().public(), k.public());
    }
}
