//! Key pairs, tags, images, instance types, zones and account attributes.

use super::*;
use nimbus_proto::api::{Image, InstanceType};
use serde::Serialize;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlKeyPair {
    pub key_pair_id: String,
    pub key_name: String,
    pub key_fingerprint: String,
    pub key_type: String,
    pub create_time: String,
}

impl From<&crate::service::keypairs::KeyPair> for XmlKeyPair {
    fn from(k: &crate::service::keypairs::KeyPair) -> Self {
        XmlKeyPair {
            key_pair_id: k.key_pair_id.clone(),
            key_name: k.key_name.clone(),
            key_fingerprint: k.key_fingerprint.clone(),
            key_type: k.key_type.clone(),
            create_time: timestamp(&k.create_time),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeyPair {
    pub key_pair_id: String,
    pub key_name: String,
    pub key_fingerprint: String,
    pub key_material: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeKeyPairs {
    pub key_set: Items<XmlKeyPair>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlResourceTag {
    pub resource_id: String,
    pub resource_type: String,
    pub key: String,
    pub value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeTags {
    pub tag_set: Items<XmlResourceTag>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlImage {
    pub image_id: String,
    pub image_location: String,
    pub image_state: String,
    pub image_owner_id: String,
    pub creation_date: String,
    pub is_public: bool,
    pub architecture: &'static str,
    pub image_type: &'static str,
    pub name: String,
    pub description: String,
    pub root_device_type: &'static str,
    pub root_device_name: &'static str,
    pub virtualization_type: &'static str,
    pub hypervisor: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<StateReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_set: Option<Items<XmlTag>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateImage {
    pub image_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeImages {
    pub images_set: Items<XmlImage>,
}

pub fn describe_images(images: &[Image]) -> DescribeImages {
    DescribeImages {
        images_set: images
            .iter()
            .map(|i| XmlImage {
                image_id: i.image_id.clone(),
                // EC2's form, `<owner>/<name>`: never a host path or an internal URL.
                image_location: format!("{}/{}", i.owner_id, i.name),
                image_state: i.state.clone(),
                image_owner_id: i.owner_id.clone(),
                creation_date: timestamp(&i.creation_date),
                is_public: i.public,
                architecture: "x86_64",
                image_type: "machine",
                name: i.name.clone(),
                description: i.description.clone().unwrap_or_default(),
                root_device_type: "ebs",
                root_device_name: "/dev/vda",
                virtualization_type: "hvm",
                hypervisor: "kvm",
                state_reason: i.state_reason.as_ref().map(|m| StateReason { code: "Client.ImageFailed".to_string(), message: m.clone() }),
                tag_set: tag_set(&i.tags),
            })
            .collect::<Vec<_>>()
            .into(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VCpuInfo {
    pub default_v_cpus: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryInfo {
    pub size_in_mi_b: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlInstanceType {
    pub instance_type: String,
    pub current_generation: bool,
    pub v_cpu_info: VCpuInfo,
    pub memory_info: MemoryInfo,
    pub instance_storage_supported: bool,
    pub hypervisor: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeInstanceTypes {
    pub instance_type_set: Items<XmlInstanceType>,
}

pub fn describe_instance_types(types: &[InstanceType]) -> DescribeInstanceTypes {
    DescribeInstanceTypes {
        instance_type_set: types
            .iter()
            .map(|t| XmlInstanceType {
                instance_type: t.name.clone(),
                current_generation: true,
                v_cpu_info: VCpuInfo { default_v_cpus: t.vcpus },
                memory_info: MemoryInfo { size_in_mi_b: t.memory_mib },
                instance_storage_supported: false,
                hypervisor: "kvm",
            })
            .collect::<Vec<_>>()
            .into(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlZone {
    pub zone_name: String,
    pub zone_state: &'static str,
    pub region_name: String,
    pub zone_id: String,
    pub zone_type: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeAvailabilityZones {
    pub availability_zone_info: Items<XmlZone>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlAttributeValue {
    pub attribute_value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlAccountAttribute {
    pub attribute_name: String,
    pub attribute_value_set: Items<XmlAttributeValue>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeAccountAttributes {
    pub account_attribute_set: Items<XmlAccountAttribute>,
}

/// The account attributes EC2 clients ask for, with Nimbus's values:
/// `max-instances`, `max-vcpus`, the Elastic IP limits and the image
/// limits (`max-images`, `max-image-bytes`, Nimbus's own) are the
/// account's limits, `default-vpc` its default VPC.
pub fn account_attributes(a: &crate::service::accounts::AccountView, default_vpc: &str) -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("supported-platforms", vec!["VPC".to_string()]),
        ("default-vpc", vec![default_vpc.to_string()]),
        ("max-instances", vec![a.limits.max_instances.to_string()]),
        ("max-vcpus", vec![a.limits.max_vcpus.to_string()]),
        ("vpc-max-security-groups-per-interface", vec![crate::service::network::MAX_GROUPS_PER_INTERFACE.to_string()]),
        ("max-elastic-ips", vec![a.limits.max_elastic_ips.to_string()]),
        ("vpc-max-elastic-ips", vec![a.limits.max_elastic_ips.to_string()]),
        ("max-images", vec![a.image_quota.max_images.to_string()]),
        ("max-image-bytes", vec![a.image_quota.max_image_bytes.to_string()]),
    ]
}
