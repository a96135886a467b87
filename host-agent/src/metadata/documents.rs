//! Where the metadata service's documents come from: the host's state-store
//! node (its own replica, or a quorum read), and what makes a stored
//! document one to serve: signed by the control plane for the instance it
//! names, sealed for this host and opened with its key; a forged one counts
//! as absent.

use nimbus_proto::metadata::{document_key, InstanceDocument};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How long a quorum read of a document may take (when the local replica
/// has none: this host holds no replica of it, or has not received it yet).
const QUORUM_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Where a host's documents come from and what makes them trustworthy:
/// its store node, its id and key (documents are sealed for it), and the
/// control plane's document keys (documents are signed with one).
#[derive(Clone)]
pub struct DocumentSource {
    pub node: Arc<nimbus_state_store::Node>,
    pub host_id: String,
    pub key: nimbus_records::KeyPair,
    pub trusted: nimbus_records::TrustedKeys,
    /// Per instance, the digest of the siblings last opened and what they
    /// gave: the refresh reads every document ten times a second, and
    /// checks a signature and decrypts only when the stored value changed.
    opened: Arc<Mutex<HashMap<String, Opened>>>,
}

/// The SHA-256 of an instance's stored siblings, and the document they gave.
type Opened = ([u8; 32], Option<InstanceDocument>);

impl DocumentSource {
    pub fn new(
        node: Arc<nimbus_state_store::Node>,
        host_id: String,
        key: nimbus_records::KeyPair,
        trusted: nimbus_records::TrustedKeys,
    ) -> Self {
        DocumentSource { node, host_id, key, trusted, opened: Arc::default() }
    }

    /// The document of `id`: the host's replica when it has one at least
    /// `at_least` new, else a quorum read.
    pub(super) async fn read(&self, id: &str, at_least: u64) -> Option<InstanceDocument> {
        match self.local(id) {
            Some(d) if d.version >= at_least => Some(d),
            _ => self.quorum(id).await,
        }
    }

    /// The host's replica's copy of `id`'s document, if it holds one.
    pub(super) fn local(&self, id: &str) -> Option<InstanceDocument> {
        match self.node.storage().get(document_key(id).as_bytes()) {
            Ok(r) => self.open(id, &r.map(|r| r.values()).unwrap_or_default()),
            Err(e) => {
                tracing::warn!(instance_id = %id, error = %e, "cannot read the local replica");
                None
            }
        }
    }

    /// Forgets what was opened for instances no longer served.
    pub(super) fn keep_only<'a>(&self, served: impl Iterator<Item = &'a str>) {
        let served: std::collections::HashSet<&str> = served.collect();
        self.opened.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| served.contains(id.as_str()));
    }

    /// `id`'s document by a quorum read (bounded by [`QUORUM_READ_TIMEOUT`]).
    pub(super) async fn quorum(&self, id: &str) -> Option<InstanceDocument> {
        use nimbus_state_store::KvClient;
        let client = nimbus_state_store::LocalClient(self.node.clone());
        match tokio::time::timeout(QUORUM_READ_TIMEOUT, client.get(document_key(id).as_bytes())).await {
            Ok(Ok(got)) => self.open(id, &got.values),
            Ok(Err(e)) => {
                tracing::debug!(instance_id = %id, error = %e, "quorum read of a document failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Of the stored siblings, the newest the control plane signed for
    /// `id`, opened with this host's key: a forged one (any version) counts
    /// as absent, one sealed for another host is not served.
    fn open(&self, id: &str, siblings: &[Vec<u8>]) -> Option<InstanceDocument> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for s in siblings {
            h.update((s.len() as u64).to_be_bytes());
            h.update(s);
        }
        let digest: [u8; 32] = h.finalize().into();
        if let Some((seen, doc)) = self.opened.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            if *seen == digest {
                return doc.clone();
            }
        }
        let doc = nimbus_records::newest_sealed(siblings, &self.trusted, id).and_then(|sealed| {
            match sealed.open(&self.trusted, id, &self.host_id, &self.key) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::debug!(instance_id = %id, error = %e, "a stored document is not for this host; not served");
                    None
                }
            }
        });
        self.opened.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), (digest, doc.clone()));
        doc
    }
}
