//! REST bodies of accounts, their limits and usage, key pairs and tags.

use serde::{Deserialize, Serialize};

/// A new account's credentials (`POST /v1/admin/accounts`); the secret is
/// shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NewAccount {
    pub account_id: String,
    pub name: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// `POST /v1/admin/accounts`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateAccountRequest {
    pub name: String,
}

/// What an account may hold at once: counted over its instances that hold
/// capacity (pending, running, stopping, stopped, shutting-down until the
/// host confirms), so a stopped instance's start always fits.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    pub max_instances: u32,
    pub max_vcpus: u32,
    /// Elastic IPs the account may hold (shown as `AccountView::max_elastic_ips`).
    #[serde(skip)]
    pub max_elastic_ips: u32,
}

/// What an account's instances hold of its [`Limits`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub instances: u32,
    pub vcpus: u32,
}

/// An account's image limits and what its images hold (in
/// `AccountView::image_quota`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageQuota {
    pub max_images: u32,
    pub max_image_bytes: u64,
    /// Its images that are pending or available.
    pub images: u32,
    /// What their disks take in the image store.
    pub image_bytes: u64,
}

/// `GET /v1/account` (and what DescribeAccountAttributes shows).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountView {
    pub account_id: String,
    pub name: String,
    pub limits: Limits,
    pub usage: Usage,
    /// Elastic IPs the account may hold.
    pub max_elastic_ips: u32,
    /// Its image limits and what its images hold.
    pub image_quota: ImageQuota,
}

/// An operator's change of an account's limits
/// (`PUT /v1/admin/accounts/{id}/limits`); `None` means the default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_elastic_ips: Option<u32>,
    /// Images it may hold (pending or available).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_images: Option<u32>,
    /// Bytes its images may take in the image store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_image_bytes: Option<u64>,
}

/// An SSH key pair (`GET /v1/key-pairs`, `POST /v1/key-pairs/import`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyPair {
    pub key_pair_id: String,
    pub key_name: String,
    /// OpenSSH SHA-256 fingerprint (`SHA256:…`).
    pub key_fingerprint: String,
    pub key_type: String,
    pub public_key: String,
    pub create_time: chrono::DateTime<chrono::Utc>,
}

/// `POST /v1/key-pairs`'s answer: the only time the private key is seen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NewKeyPair {
    #[serde(flatten)]
    pub key_pair: KeyPair,
    pub key_material: String,
}

/// `POST /v1/key-pairs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyPairRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<String>,
}

/// `POST /v1/key-pairs/import`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportKeyPairRequest {
    pub name: String,
    pub public_key: String,
}

/// `GET /v1/key-pairs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyPairList {
    pub key_pairs: Vec<KeyPair>,
}

/// One tag of one resource (`GET /v1/tags`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tag {
    pub resource_id: String,
    pub resource_type: String,
    pub key: String,
    pub value: String,
}

/// `GET /v1/tags`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagList {
    pub tags: Vec<Tag>,
}
