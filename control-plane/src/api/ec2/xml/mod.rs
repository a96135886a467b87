//! EC2 Query responses, serialized with serde + quick-xml.
//!
//! Shapes follow EC2's 2016-11-15 API as botocore parses it: a root
//! `<ActionResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">` with a
//! `<requestId>`, lower-camel element names, lists as wrappers of `<item>`,
//! timestamps in ISO 8601 with milliseconds and `Z`.

//!
//! `mod.rs` holds the envelope, lists, errors and helpers every answer
//! uses; the answers are by resource: `instances.rs` (instances, their
//! state changes, console and status), `catalog.rs` (key pairs, tags,
//! images, instance types, zones, account attributes), `vpc.rs` (VPCs,
//! subnets, security groups and rules, addresses).

mod catalog;
mod instances;
mod vpc;

pub use catalog::*;
pub use instances::*;
pub use vpc::*;

use chrono::{DateTime, SecondsFormat, Utc};
use nimbus_proto::api::ResourceTag;
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
pub struct Return {
    #[serde(rename = "return")]
    pub value: bool,
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

#[derive(Serialize)]
pub struct XmlTag {
    pub key: String,
    pub value: String,
}

pub(crate) fn tag_set(tags: &[ResourceTag]) -> Option<Items<XmlTag>> {
    (!tags.is_empty()).then(|| tags.iter().map(|t| XmlTag { key: t.key.clone(), value: t.value.clone() }).collect::<Vec<_>>().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_proto::api::{GroupRef, Instance};
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
