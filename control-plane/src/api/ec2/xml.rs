//! EC2 Query responses, serialized with serde + quick-xml.
//!
//! Shapes follow EC2's 2016-11-15 API as botocore parses it: a root
//! `<ActionResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">` with a
//! `<requestId>`, lower-camel element names, lists as wrappers of `<item>`,
//! timestamps in ISO 8601 with milliseconds and `Z`.

use chrono::{DateTime, SecondsFormat, Utc};
use nimbus_proto::api::{Image, Instance, InstanceType, Reservation, StateChange, StateView};
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
}

#[derive(Serialize)]
pub struct XmlTag {
    pub key: String,
    pub value: String,
}

impl From<&Instance> for XmlInstance {
    fn from(i: &Instance) -> Self {
        XmlInstance {
            instance_id: i.instance_id.clone(),
            image_id: i.image_id.clone(),
            instance_state: (&i.state).into(),
            private_dns_name: String::new(),
            dns_name: String::new(),
            reason: i.state_reason.clone().unwrap_or_default(),
            ami_launch_index: i.ami_launch_index,
            instance_type: i.instance_type.clone(),
            launch_time: timestamp(&i.launch_time),
            placement: Placement { availability_zone: i.availability_zone.clone(), tenancy: "default" },
            monitoring: Monitoring { state: "disabled" },
            state_reason: i.state_reason.as_ref().map(|m| StateReason {
                code: m.split(':').next().unwrap_or("Server.InternalError").to_string(),
                message: m.clone(),
            }),
            architecture: "x86_64",
            root_device_type: "ebs",
            root_device_name: "/dev/vda",
            virtualization_type: "hvm",
            hypervisor: "kvm",
            key_name: i.key_name.clone(),
            tag_set: (!i.tags.is_empty())
                .then(|| i.tags.iter().map(|t| XmlTag { key: t.key.clone(), value: t.value.clone() }).collect::<Vec<_>>().into()),
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
    pub fn new(reservation_id: String, owner_id: String, instances: &[&Instance]) -> Self {
        XmlReservation {
            reservation_id,
            owner_id,
            group_set: Empty {},
            instances_set: instances.iter().map(|i| XmlInstance::from(*i)).collect::<Vec<_>>().into(),
        }
    }
}

/// `RunInstancesResponse` is a reservation at the top level.
pub fn run_instances(r: &Reservation) -> XmlReservation {
    XmlReservation::new(r.reservation_id.clone(), r.owner_id.clone(), &r.instances.iter().collect::<Vec<_>>())
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
pub fn describe_instances(instances: &[Instance], owner_id: &str, next_token: Option<String>) -> DescribeInstances {
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
        .map(|r| XmlReservation::new(r.to_string(), owner_id.to_string(), groups.get(r).map(Vec::as_slice).unwrap_or_default()))
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
                is_public: true,
                architecture: "x86_64",
                image_type: "machine",
                name: i.name.clone(),
                description: i.description.clone().unwrap_or_default(),
                root_device_type: "ebs",
                root_device_name: "/dev/vda",
                virtualization_type: "hvm",
                hypervisor: "kvm",
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
/// `max-instances` and `max-vcpus` are the account's limits.
pub fn account_attributes(a: &crate::service::accounts::AccountView) -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("supported-platforms", vec!["VPC".to_string()]),
        ("default-vpc", vec!["none".to_string()]),
        ("max-instances", vec![a.limits.max_instances.to_string()]),
        ("max-vcpus", vec![a.limits.max_vcpus.to_string()]),
        ("vpc-max-security-groups-per-interface", vec!["5".to_string()]),
        ("max-elastic-ips", vec!["0".to_string()]),
        ("vpc-max-elastic-ips", vec!["0".to_string()]),
    ]
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
        }
    }

    #[test]
    fn describe_instances_groups_by_reservation() {
        let list = vec![instance("i-1", "r-a"), instance("i-2", "r-b"), instance("i-3", "r-a")];
        let body = describe_instances(&list, "000000000000", Some("tok".into()));
        let xml = to_xml("DescribeInstancesResponse", &Envelope { xmlns: XMLNS, request_id: "req-1".into(), body }).unwrap();
        assert!(xml.contains("<DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>req-1</requestId><reservationSet><item><reservationId>r-a</reservationId>"), "{xml}");
        assert_eq!(xml.matches("<reservationId>").count(), 2);
        assert!(xml.contains("<instanceState><code>16</code><name>running</name></instanceState>"));
        assert!(xml.contains("<launchTime>2026-11-25T16:00:00.500Z</launchTime>"));
        assert!(xml.contains("<groupSet/>"));
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
            errors: Errors { error: XmlError { code: "InvalidInstanceID.NotFound".into(), message: "The instance ID 'i-1' does not exist".into() } },
            request_id: "req-2".into(),
        };
        let xml = to_xml("Response", &e).unwrap();
        assert!(xml.ends_with("<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID 'i-1' does not exist</Message></Error></Errors><RequestID>req-2</RequestID></Response>"), "{xml}");
    }
}
