//! What one instance is served: its metadata, user-data and VPC
//! interfaces, made from its assignment or from the state store's document
//! (of two copies the newer wins, [`Content::supersedes`]), and the handle
//! its connections are answered through ([`Guest`]).

use super::tokens::Tokens;
use base64::Engine;
use nimbus_proto::agent::InstanceMetadata;
use nimbus_proto::metadata::InstanceDocument;
use nimbus_proto::network::Nic;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

#[derive(Debug, Clone)]
pub(super) struct Content {
    pub(super) meta: InstanceMetadata,
    pub(super) user_data: Option<Vec<u8>>,
    /// The instance's VPC interfaces (`local-ipv4`, `mac`, `network/…`).
    pub(super) nics: Vec<Nic>,
    /// The state store's document this content was made from (none: from
    /// the assignment). Of two copies of one version the store's wins: it
    /// has the tags, region and launch time the assignment lacks.
    pub(super) doc: Option<Box<InstanceDocument>>,
}

impl Content {
    /// What the assignment says (user-data in base64, as it carries it).
    pub(super) fn from_assignment(meta: &InstanceMetadata, user_data_b64: Option<&str>, nics: &[Nic]) -> Content {
        let user_data = user_data_b64.and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
        Content { meta: meta.clone(), user_data, nics: nics.to_vec(), doc: None }
    }

    pub(super) fn from_document(doc: InstanceDocument) -> Content {
        let meta = InstanceMetadata {
            version: doc.version,
            instance_id: doc.instance_id.clone(),
            reservation_id: doc.reservation_id.clone(),
            instance_type: doc.instance_type.clone(),
            image_id: doc.image_id.clone(),
            availability_zone: doc.availability_zone.clone(),
            ami_launch_index: doc.ami_launch_index,
            owner_id: doc.account_id.clone(),
            public_keys: doc.public_keys.clone(),
            options: doc.options,
            tags: doc.tags.clone(),
        };
        let user_data = doc.user_data.as_deref().and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
        Content { meta, user_data, nics: doc.nics.clone(), doc: Some(Box::new(doc)) }
    }

    /// Whether `self` should replace `current`: a newer version, or any
    /// copy of the same version over the assignment's (so the store's copy
    /// wins a tie, and is never replaced by an assignment of its version).
    pub(super) fn supersedes(&self, current: &Content) -> bool {
        self.meta.version > current.meta.version || (self.meta.version == current.meta.version && current.doc.is_none())
    }
}

pub(super) type Shared = Arc<RwLock<Content>>;

/// What one instance's requests are answered from.
#[derive(Clone)]
pub(super) struct Guest {
    pub(super) content: Shared,
    pub(super) tokens: Arc<Tokens>,
    /// Set when the instance's service stops: no connection is admitted after.
    pub(super) stopped: Arc<AtomicBool>,
}

impl Guest {
    pub(super) fn new(content: Content) -> Guest {
        Guest { content: Arc::new(RwLock::new(content)), tokens: Arc::default(), stopped: Arc::default() }
    }
}
