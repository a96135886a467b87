//! VPCs, subnets, security groups and their rules, addresses.

use super::*;
use nimbus_proto::api::{Address, SecurityGroup, SecurityGroupRule, Subnet, Vpc};
use serde::Serialize;

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
