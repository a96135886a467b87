//! Instances, their state changes, console output and status checks.

use super::*;
use nimbus_proto::api::{GroupRef, Instance, NetworkInterface, Reservation, StateChange, StateView};
use serde::Serialize;

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
#[serde(rename_all = "camelCase")]
pub struct ConsoleOutput {
    pub instance_id: String,
    pub timestamp: String,
    pub output: String,
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
