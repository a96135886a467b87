//! EC2 Query responses, serialized with serde + quick-xml.
//!
//! Shapes follow EC2's 2016-11-15 API as botocore parses it: a root
//! `<ActionResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">` with a
//! `<requestId>`, lower-camel element names, lists as wrappers of `<item>`,
//! timestamps in ISO 8601 with milliseconds and `Z`.

use chrono::{DateTime, SecondsFormat, Utc};
use nimbus_proto::api::{
    Address, GroupRef, Image, Instance, InstanceType, NetworkInterface, Reservation, ResourceTag, SecurityGroup, SecurityGroupRule,
    StateChange, StateView, Subnet, Vpc,
};
use serde::Serialize;

pub const XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

pub fn timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Serializes `body` under a root element named `root`.
pub fn to_xml<T: Serialize>(root: &str, body: &T) -> Result<String, quick_xml::SeError> {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let ser = quick_xml::se::Serializer::with_root(&mut out, Some(root))?;
    body.serialize(ser)?;
    Ok(out)
}

/// `<x><item>…</item>…</x>`.
#[derive(Serialize)]
pub struct Items<T> {
    pub item: Vec<T>,
}

impl<T> From<Vec<T>> for Items<T> {
    fn from(item: Vec<T>) -> Self {
        Items { item }
    }
}

#[derive(Serialize)]
pub struct Empty {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<T> {
    #[serde(rename = "@xmlns")]
    pub xmlns: &'static str,
    pub request_id: String,
    #[serde(flatten)]
    pub body: T,
}

#[derive(Serialize)]
pub struct XmlState {
    pub code: u16,
    pub name: String,
}

impl From<&StateView> for XmlState {
    fn from(s: &StateView) -> Self {
        XmlState { code: s.code, name: s.name.as_str().to_string() }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    pub availability_zone: String,
    pub tenancy: &'static str,
}

#[derive(Serialize)]
pub struct StateReason {
    pub code: String,
    pub message: String,
}

#[derive(Serialize)]
pub struct Monitoring {
    pub state: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlInstance {
    pub instance_id: String,
    pub image_id: String,
    pub instance_state: XmlState,
    pub private_dns_name: String,
    pub dns_name: String,
    pub reason: String,
    pub ami_launch_index: u32,
    pub instance_type: String,
    pub launch_time: String,
    pub placement: Placement,
    pub monitoring: Monitoring,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<StateReason>,
    pub architecture: &'static str,
    pub root_device_type: &'static str,
    pub root_device_name: &'static str,
    pub virtualization_type: &'static str,
    pub hypervisor: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_set: Option<Items<XmlTag>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_ip_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    pub source_dest_check: bool,
    pub group_set: Items<XmlGroupRef>,
    pub network_interface_set: Items<XmlInterface>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_options: Option<XmlMetadataOptions>,
}

/// An instance's `metadataOptions` as EC2 shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlMetadataOptions {
    pub state: String,
    pub http_tokens: String,
    pub http_put_response_hop_limit: u32,
    pub http_endpoint: String,
    pub http_protocol_ipv6: String,
    pub instance_metadata_tags: String,
}

impl From<&nimbus_proto::api::InstanceMetadataOptions> for XmlMetadataOptions {
    fn from(o: &nimbus_proto::api::InstanceMetadataOptions) -> Self {
        XmlMetadataOptions {
            state: o.state.clone(),
            http_tokens: o.http_tokens.clone(),
            http_put_response_hop_limit: o.http_put_response_hop_limit,
            http_endpoint: o.http_endpoint.clone(),
            http_protocol_ipv6: o.http_protocol_ipv6.clone(),
            instance_metadata_tags: o.instance_metadata_tags.clone(),
        }
    }
}

/// ModifyInstanceMetadataOptions's answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModifyMetadataOptions {
    pub instance_id: String,
    pub instance_metadata_options: XmlMetadataOptions,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlGroupRef {
    pub group_id: String,
    pub group_name: String,
}

impl From<&GroupRef> for XmlGroupRef {
    fn from(g: &GroupRef) -> Self {
        XmlGroupRef { group_id: g.group_id.clone(), group_name: g.group_name.clone() }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlAttachment {
    pub attachment_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_owner_id: Option<String>,
    pub device_index: u32,
    pub network_card_index: u32,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach_time: Option<String>,
    pub delete_on_termination: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlAssociation {
    pub public_ip: String,
    pub public_dns_name: String,
    pub ip_owner_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlPrivateAddress {
    pub private_ip_address: String,
    pub private_dns_name: String,
    pub primary: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub association: Option<XmlAssociation>,
}

/// A network interface, in DescribeNetworkInterfaces and in an instance's
/// `networkInterfaceSet`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlInterface {
    pub network_interface_id: String,
    pub subnet_id: String,
    pub vpc_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    pub description: String,
    pub owner_id: String,
    pub requester_managed: bool,
    pub status: String,
    pub mac_address: String,
    pub private_ip_address: String,
    pub private_dns_name: String,
    pub source_dest_check: bool,
    pub group_set: Items<XmlGroupRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<XmlAttachment>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub association: Option<XmlAssociation>,
    pub private_ip_addresses_set: Items<XmlPrivateAddress>,
    pub interface_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_set: Option<Items<XmlTag>>,
}

pub fn public_dns_name(ip: &str, region: &str) -> String {
    format!("ec2-{}.{region}.compute.nimbus", ip.replace('.', "-"))
}

fn tag_set(tags: &[ResourceTag]) -> Option<Items<XmlTag>> {
    (!tags.is_empty()).then(|| tags.iter().map(|t| XmlTag { key: t.key.clone(), value: t.value.clone() }).collect::<Vec<_>>().into())
}

/// `standalone`: DescribeNetworkInterfaces (zone, instance id, tags);
/// otherwise an instance's own set.
pub fn interface(n: &NetworkInterface, region: &str, standalone: bool) -> XmlInterface {
    let association = || {
        n.association.as_ref().map(|a| XmlAssociation {
            public_dns_name: public_dns_name(&a.public_ip, region),
            public_ip: a.public_ip.clone(),
            ip_owner_id: if a.allocation_id.is_some() { n.owner_id.clone() } else { "amazon".into() },
            allocation_id: a.allocation_id.clone(),
            association_id: a.association_id.clone(),
        })
    };
    XmlInterface {
        network_interface_id: n.network_interface_id.clone(),
        subnet_id: n.subnet_id.clone(),
        vpc_id: n.vpc_id.clone(),
        availability_zone: standalone.then(|| n.availability_zone.clone()),
        description: String::new(),
        owner_id: n.owner_id.clone(),
        requester_managed: false,
        status: n.status.clone(),
        mac_address: n.mac_address.clone(),
        private_ip_address: n.private_ip_address.clone(),
        private_dns_name: n.private_dns_name.clone(),
        source_dest_check: true,
        group_set: n.groups.iter().map(XmlGroupRef::from).collect::<Vec<_>>().into(),
        attachment: n.attachment.as_ref().map(|a| XmlAttachment {
            attachment_id: a.attachment_id.clone(),
            instance_id: standalone.then(|| a.instance_id.clone()),
            instance_owner_id: standalone.then(|| n.owner_id.clone()),
            device_index: a.device_index,
            network_card_index: 0,
            status: a.status.clone(),
            attach_time: a.attach_time.as_ref().map(timestamp),
            delete_on_termination: a.delete_on_termination,
        }),
        association: association(),
        private_ip_addresses_set: vec![XmlPrivateAddress {
            private_ip_address: n.private_ip_address.clone(),
            private_dns_name: n.private_dns_name.clone(),
            primary: true,
            association: association(),
        }]
        .into(),
        interface_type: "interface",
        tag_set: if standalone { tag_set(&n.tags) } else { None },
    }
}

#[derive(Serialize)]
pub struct XmlTag {
    pub key: String,
    pub value: String,
}

impl XmlInstance {
    pub fn new(i: &Instance, region: &str) -> Self {
        XmlInstance {
            instance_id: i.instance_id.clone(),
            image_id: i.image_id.clone(),
            instance_state: (&i.state).into(),
            private_dns_name: i.private_dns_name.clone().unwrap_or_default(),
            dns_name: i.public_ip_address.as_deref().map(|ip| public_dns_name(ip, region)).unwrap_or_default(),
            reason: i.state_reason.clone().unwrap_or_default(),
            ami_launch_index: i.ami_launch_index,
            instance_type: i.instance_type.clone(),
            launch_time: timestamp(&i.launch_time),
            placement: Placement { availability_zone: i.availability_zone.clone(), tenancy: "default" },
            monitoring: Monitoring { state: "disabled" },
            state_reason: i
                .state_reason
                .as_ref()
                .map(|m| StateReason { code: m.split(':').next().unwrap_or("Server.InternalError").to_string(), message: m.clone() }),
            architecture: "x86_64",
            root_device_type: "ebs",
            root_device_name: "/dev/vda",
            virtualization_type: "hvm",
            hypervisor: "kvm",
            key_name: i.key_name.clone(),
            tag_set: tag_set(&i.tags),
            private_ip_address: i.private_ip_address.clone(),
            ip_address: i.public_ip_address.clone(),
            vpc_id: i.vpc_id.clone(),
            subnet_id: i.subnet_id.clone(),
            source_dest_check: true,
            group_set: i.security_groups.iter().map(XmlGroupRef::from).collect::<Vec<_>>().into(),
            network_interface_set: i.network_interfaces.iter().map(|n| interface(n, region, false)).collect::<Vec<_>>().into(),
            metadata_options: i.metadata_options.as_ref().map(XmlMetadataOptions::from),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlReservation {
    pub reservation_id: String,
    pub owner_id: String,
    pub group_set: Empty,
    pub instances_set: Items<XmlInstance>,
}

impl XmlReservation {
    pub fn new(reservation_id: String, owner_id: String, instances: &[&Instance], region: &str) -> Self {
        XmlReservation {
            reservation_id,
            owner_id,
            group_set: Empty {},
            instances_set: instances.iter().map(|i| XmlInstance::new(i, region)).collect::<Vec<_>>().into(),
        }
    }
}

/// `RunInstancesResponse` is a reservation at the top level.
pub fn run_instances(r: &Reservation, region: &str) -> XmlReservation {
    XmlReservation::new(r.reservation_id.clone(), r.owner_id.clone(), &r.instances.iter().collect::<Vec<_>>(), region)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeInstances {
    pub reservation_set: Items<XmlReservation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// Groups instances by reservation, keeping the order in which each
/// reservation first appears.
pub fn describe_instances(instances: &[Instance], owner_id: &str, next_token: Option<String>, region: &str) -> DescribeInstances {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: std::collections::HashMap<&str, Vec<&Instance>> = std::collections::HashMap::new();
    for i in instances {
        let key = i.reservation_id.as_str();
        if !groups.contains_key(key) {
            order.push(key);
        }
        groups.entry(key).or_default().push(i);
    }
    let reservations = order
        .into_iter()
        .map(|r| XmlReservation::new(r.to_string(), owner_id.to_string(), groups.get(r).map(Vec::as_slice).unwrap_or_default(), region))
        .collect::<Vec<_>>();
    DescribeInstances { reservation_set: reservations.into(), next_token }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlStateChange {
    pub instance_id: String,
    pub current_state: XmlState,
    pub previous_state: XmlState,
}

/// Terminate, stop and start all answer `<instancesSet>` (botocore maps it
/// to TerminatingInstances, StoppingInstances, StartingInstances).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStateChanges {
    pub instances_set: Items<XmlStateChange>,
}

pub fn state_changes(changes: &[StateChange]) -> Items<XmlStateChange> {
    Items {
        item: changes
            .iter()
            .map(|c| XmlStateChange {
                instance_id: c.instance_id.clone(),
                current_state: (&c.current_state).into(),
                previous_state: (&c.previous_state).into(),
            })
            .collect::<Vec<_>>(),
    }
}

#[derive(Serialize)]
pub struct Return {
    #[serde(rename = "return")]
    pub value: bool,
}

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
pub struct ConsoleOutput {
    pub instance_id: String,
    pub timestamp: String,
    pub output: String,
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlCidrAssociation {
    pub cidr_block: String,
    pub association_id: String,
    pub cidr_block_state: XmlStateCode,
}

#[derive(Serialize)]
pub struct XmlStateCode {
    pub state: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlVpc {
    pub vpc_id: String,
    pub owner_id: String,
    pub state: String,
    pub cidr_block: String,
    pub cidr_block_association_set: Items<XmlCidrAssociation>,
    pub dhcp_options_id: &'static str,
    pub instance_tenancy: &'static str,
    pub is_default: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_set: Option<Items<XmlTag>>,
}

pub fn vpc(v: &Vpc) -> XmlVpc {
    XmlVpc {
        vpc_id: v.vpc_id.clone(),
        owner_id: v.owner_id.clone(),
        state: v.state.clone(),
        cidr_block: v.cidr_block.clone(),
        cidr_block_association_set: vec![XmlCidrAssociation {
            cidr_block: v.cidr_block.clone(),
            association_id: format!("vpc-cidr-assoc-{}", v.vpc_id.trim_start_matches("vpc-")),
            cidr_block_state: XmlStateCode { state: "associated" },
        }]
        .into(),
        dhcp_options_id: "default",
        instance_tenancy: "default",
        is_default: v.is_default,
        tag_set: tag_set(&v.tags),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlSubnet {
    pub subnet_id: String,
    pub state: String,
    pub vpc_id: String,
    pub owner_id: String,
    pub cidr_block: String,
    pub available_ip_address_count: u64,
    pub availability_zone: String,
    pub availability_zone_id: String,
    pub default_for_az: bool,
    pub map_public_ip_on_launch: bool,
    pub assign_ipv6_address_on_creation: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_set: Option<Items<XmlTag>>,
}

pub fn subnet(s: &Subnet) -> XmlSubnet {
    XmlSubnet {
        subnet_id: s.subnet_id.clone(),
        state: s.state.clone(),
        vpc_id: s.vpc_id.clone(),
        owner_id: s.owner_id.clone(),
        cidr_block: s.cidr_block.clone(),
        available_ip_address_count: s.available_ip_address_count,
        availability_zone: s.availability_zone.clone(),
        availability_zone_id: s.availability_zone.clone(),
        default_for_az: s.default_for_az,
        map_public_ip_on_launch: s.map_public_ip_on_launch,
        assign_ipv6_address_on_creation: false,
        tag_set: tag_set(&s.tags),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlUserIdGroupPair {
    pub user_id: String,
    pub group_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlIpRange {
    pub cidr_ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlIpPermission {
    pub ip_protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_port: Option<i32>,
    pub groups: Items<XmlUserIdGroupPair>,
    pub ip_ranges: Items<XmlIpRange>,
    pub ipv6_ranges: Empty,
    pub prefix_list_ids: Empty,
}

/// EC2 answers rules grouped by (protocol, ports), each with its CIDRs and groups.
fn permissions(rules: &[SecurityGroupRule], owner: &str) -> Items<XmlIpPermission> {
    let mut out: Vec<XmlIpPermission> = Vec::new();
    for r in rules {
        let ports = (r.protocol != "-1").then_some((r.from_port, r.to_port));
        let found =
            out.iter().position(|p| p.ip_protocol == r.protocol && p.from_port == ports.map(|p| p.0) && p.to_port == ports.map(|p| p.1));
        let i = match found {
            Some(i) => i,
            None => {
                out.push(XmlIpPermission {
                    ip_protocol: r.protocol.clone(),
                    from_port: ports.map(|p| p.0),
                    to_port: ports.map(|p| p.1),
                    groups: Vec::new().into(),
                    ip_ranges: Vec::new().into(),
                    ipv6_ranges: Empty {},
                    prefix_list_ids: Empty {},
                });
                out.len() - 1
            }
        };
        if let Some(c) = &r.cidr {
            out[i].ip_ranges.item.push(XmlIpRange { cidr_ip: c.clone(), description: r.description.clone() });
        }
        if let Some(g) = &r.referenced_group_id {
            out[i].groups.item.push(XmlUserIdGroupPair { user_id: owner.to_string(), group_id: g.clone() });
        }
    }
    out.into()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlSecurityGroup {
    pub owner_id: String,
    pub group_id: String,
    pub group_name: String,
    pub group_description: String,
    pub vpc_id: String,
    pub ip_permissions: Items<XmlIpPermission>,
    pub ip_permissions_egress: Items<XmlIpPermission>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_set: Option<Items<XmlTag>>,
}

pub fn security_group(g: &SecurityGroup) -> XmlSecurityGroup {
    XmlSecurityGroup {
        owner_id: g.owner_id.clone(),
        group_id: g.group_id.clone(),
        group_name: g.group_name.clone(),
        group_description: g.description.clone(),
        vpc_id: g.vpc_id.clone(),
        ip_permissions: permissions(&g.ingress, &g.owner_id),
        ip_permissions_egress: permissions(&g.egress, &g.owner_id),
        tag_set: tag_set(&g.tags),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlReferencedGroup {
    pub group_id: String,
    pub user_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlSecurityGroupRule {
    pub security_group_rule_id: String,
    pub group_id: String,
    pub group_owner_id: String,
    pub is_egress: bool,
    pub ip_protocol: String,
    pub from_port: i32,
    pub to_port: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr_ipv4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referenced_group_info: Option<XmlReferencedGroup>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

pub fn security_group_rule(r: &SecurityGroupRule, owner: &str) -> XmlSecurityGroupRule {
    XmlSecurityGroupRule {
        security_group_rule_id: r.rule_id.clone(),
        group_id: r.group_id.clone(),
        group_owner_id: owner.to_string(),
        is_egress: r.egress,
        ip_protocol: r.protocol.clone(),
        from_port: r.from_port,
        to_port: r.to_port,
        cidr_ipv4: r.cidr.clone(),
        referenced_group_info: r
            .referenced_group_id
            .as_ref()
            .map(|g| XmlReferencedGroup { group_id: g.clone(), user_id: owner.to_string() }),
        description: r.description.clone(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlAddress {
    pub public_ip: String,
    pub allocation_id: String,
    pub domain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_interface_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_interface_owner_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_ip_address: Option<String>,
    pub public_ipv4_pool: &'static str,
    pub network_border_group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_set: Option<Items<XmlTag>>,
}

pub fn address(a: &Address, region: &str) -> XmlAddress {
    XmlAddress {
        public_ip: a.public_ip.clone(),
        allocation_id: a.allocation_id.clone(),
        domain: a.domain.clone(),
        instance_id: a.instance_id.clone(),
        association_id: a.association_id.clone(),
        network_interface_id: a.network_interface_id.clone(),
        network_interface_owner_id: a.network_interface_id.as_ref().map(|_| a.owner_id.clone()),
        private_ip_address: a.private_ip_address.clone(),
        public_ipv4_pool: "nimbus",
        network_border_group: region.to_string(),
        tag_set: tag_set(&a.tags),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlStatusDetail {
    pub name: &'static str,
    pub status: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlStatus {
    pub status: &'static str,
    pub details: Items<XmlStatusDetail>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XmlInstanceStatus {
    pub instance_id: String,
    pub availability_zone: String,
    pub instance_state: XmlState,
    pub system_status: XmlStatus,
    pub instance_status: XmlStatus,
}

/// EC2's status checks for an instance (see `service::instances::status_checks`).
pub fn instance_status(s: &crate::service::instances::InstanceStatus) -> XmlInstanceStatus {
    let (i, [system, instance]) = (&s.instance, s.checks);
    let check = |(status, detail): (&'static str, &'static str)| XmlStatus {
        status,
        details: vec![XmlStatusDetail { name: "reachability", status: detail }].into(),
    };
    XmlInstanceStatus {
        instance_id: i.instance_id.clone(),
        availability_zone: i.availability_zone.clone(),
        instance_state: (&i.state).into(),
        system_status: check(system),
        instance_status: check(instance),
    }
}

#[derive(Serialize)]
pub struct XmlValue<T> {
    pub value: T,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct XmlError {
    pub code: String,
    pub message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Errors {
    pub error: XmlError,
}

/// `<Response><Errors><Error>…</Error></Errors><RequestID>…</RequestID></Response>`.
#[derive(Serialize)]
pub struct ErrorResponse {
    #[serde(rename = "Errors")]
    pub errors: Errors,
    #[serde(rename = "RequestID")]
    pub request_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_proto::InstanceState;

    fn instance(id: &str, r: &str) -> Instance {
        Instance {
            metadata_options: None,
            instance_id: id.into(),
            reservation_id: r.into(),
            image_id: "ami-0123456789abcdef0".into(),
            instance_type: "t3.nano".into(),
            state: InstanceState::Running.into(),
            availability_zone: "nimbus-1a".into(),
            launch_time: DateTime::parse_from_rfc3339("2026-11-25T16:00:00.5Z").unwrap().with_timezone(&Utc),
            ami_launch_index: 0,
            state_reason: None,
            key_name: None,
            tags: vec![nimbus_proto::api::ResourceTag { key: "Name".into(), value: "web <1>".into() }],
            private_ip_address: Some("172.31.0.4".into()),
            private_dns_name: Some("ip-172-31-0-4.nimbus-1.compute.internal".into()),
            public_ip_address: None,
            vpc_id: Some("vpc-1".into()),
            subnet_id: Some("subnet-1".into()),
            security_groups: vec![GroupRef { group_id: "sg-1".into(), group_name: "default".into() }],
            network_interfaces: vec![],
            ssh_endpoint: None,
        }
    }

    #[test]
    fn describe_instances_groups_by_reservation() {
        let list = vec![instance("i-1", "r-a"), instance("i-2", "r-b"), instance("i-3", "r-a")];
        let body = describe_instances(&list, "000000000000", Some("tok".into()), "nimbus-1");
        let xml = to_xml("DescribeInstancesResponse", &Envelope { xmlns: XMLNS, request_id: "req-1".into(), body }).unwrap();
        assert!(xml.contains("<DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>req-1</requestId><reservationSet><item><reservationId>r-a</reservationId>"), "{xml}");
        assert_eq!(xml.matches("<reservationId>").count(), 2);
        assert!(xml.contains("<instanceState><code>16</code><name>running</name></instanceState>"));
        assert!(xml.contains("<launchTime>2026-11-25T16:00:00.500Z</launchTime>"));
        assert!(xml.contains("<groupSet/>"));
        assert!(xml.contains("<privateIpAddress>172.31.0.4</privateIpAddress><vpcId>vpc-1</vpcId><subnetId>subnet-1</subnetId>"), "{xml}");
        assert!(xml.contains("<groupSet><item><groupId>sg-1</groupId><groupName>default</groupName></item></groupSet>"), "{xml}");
        assert!(xml.contains("<tagSet><item><key>Name</key><value>web &lt;1&gt;</value></item></tagSet>"), "{xml}");
        assert!(xml.ends_with("<nextToken>tok</nextToken></DescribeInstancesResponse>"), "{xml}");
        let a = xml.find("i-1").unwrap();
        let c = xml.find("i-3").unwrap();
        let b = xml.find("i-2").unwrap();
        assert!(a < c && c < b, "i-3 shares r-a's item");
    }

    #[test]
    fn errors_have_ec2s_shape() {
        let e = ErrorResponse {
            errors: Errors {
                error: XmlError { code: "InvalidInstanceID.NotFound".into(), message: "The instance ID 'i-1' does not exist".into() },
            },
            request_id: "req-2".into(),
        };
        let xml = to_xml("Response", &e).unwrap();
        assert!(xml.ends_with("<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID 'i-1' does not exist</Message></Error></Errors><RequestID>req-2</RequestID></Response>"), "{xml}");
    }
}
