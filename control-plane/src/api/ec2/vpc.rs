//! The EC2 Query actions of VPC networking (VPCs, subnets, security groups,
//! addresses, network interfaces) and the instance attribute and status
//! calls launch tools make: decode, call the service, encode.

use super::action::{Action, DryRun};
use super::params::Params;
use super::xml::{self, Envelope, Items, XMLNS};
use crate::error::ServiceError;
use crate::service::instances::{AttributeValue, InstanceFilter};
use crate::service::network::{Filters, GroupSel};
use crate::service::{Caller, Service};
use nimbus_proto::api::{AssociateAddressRequest, IpPermission, ModifyInstanceRequest};
use nimbus_proto::InstanceState;
use serde::Serialize;

fn reply<T: Serialize>(root: &str, body: T) -> Result<String, ServiceError> {
    xml::to_xml(root, &Envelope { xmlns: XMLNS, request_id: super::super::request_id(), body })
        .map_err(|e| ServiceError::internal("encoding the XML answer", e))
}

/// `Filter.N.Name` / `Filter.N.Value.M`.
pub fn filters(params: &Params) -> Result<Filters, ServiceError> {
    params.structs("Filter")?.iter().map(|f| Ok((f.required("Name")?.to_string(), f.list("Value")?))).collect()
}

fn port(p: &Params, name: &str) -> Result<Option<i32>, ServiceError> {
    p.int(name)?
        .map(|n| i32::try_from(n).map_err(|_| ServiceError::InvalidParameterValue(format!("{name} {n} is out of range"))))
        .transpose()
}

/// Both forms of a rule request: `IpPermissions.N.*` and the old flat one
/// (`IpProtocol`, `FromPort`, `ToPort`, `CidrIp`, `SourceSecurityGroupName`).
fn ip_permissions(params: &Params) -> Result<Vec<IpPermission>, ServiceError> {
    let mut out = Vec::new();
    for p in params.structs("IpPermissions")? {
        if !p.structs("Ipv6Ranges")?.is_empty() || !p.structs("PrefixListIds")?.is_empty() {
            return Err(ServiceError::InvalidParameterValue("IPv6 ranges and prefix lists are not supported by Nimbus".into()));
        }
        let ranges = p.structs("IpRanges")?;
        let pairs = p.structs("UserIdGroupPairs")?.into_iter().chain(p.structs("Groups")?).collect::<Vec<_>>();
        let description = ranges.iter().chain(&pairs).find_map(|r| r.get("Description").map(str::to_string));
        out.push(IpPermission {
            protocol: p.required("IpProtocol")?.to_string(),
            from_port: port(&p, "FromPort")?,
            to_port: port(&p, "ToPort")?,
            cidrs: ranges.iter().map(|r| r.required("CidrIp").map(str::to_string)).collect::<Result<_, _>>()?,
            group_ids: pairs.iter().filter_map(|g| g.get("GroupId").map(str::to_string)).collect(),
            group_names: pairs
                .iter()
                .filter(|g| g.get("GroupId").is_none())
                .filter_map(|g| g.get("GroupName").map(str::to_string))
                .collect(),
            description,
        });
    }
    let flat = params.get("IpProtocol").is_some() || params.get("CidrIp").is_some() || params.get("SourceSecurityGroupName").is_some();
    if flat {
        out.push(IpPermission {
            protocol: params.get("IpProtocol").unwrap_or("-1").to_string(),
            from_port: port(params, "FromPort")?,
            to_port: port(params, "ToPort")?,
            cidrs: params.get("CidrIp").map(str::to_string).into_iter().collect(),
            group_ids: Vec::new(),
            group_names: params.get("SourceSecurityGroupName").map(str::to_string).into_iter().collect(),
            description: None,
        });
    }
    Ok(out)
}

fn group_sel(params: &Params) -> Result<GroupSel, ServiceError> {
    match (params.get("GroupId"), params.get("GroupName")) {
        (Some(id), _) => Ok(GroupSel::Id(id.to_string())),
        (None, Some(name)) => Ok(GroupSel::Name(name.to_string())),
        (None, None) => Err(ServiceError::MissingParameter("GroupId".into())),
    }
}

fn value_bool(params: &Params, name: &str) -> Result<Option<bool>, ServiceError> {
    match params.get(&format!("{name}.Value")).or_else(|| params.get(name)) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(v) => Err(ServiceError::InvalidParameterValue(format!("{name} must be true or false, not {v:?}"))),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VpcBody {
    vpc: xml::XmlVpc,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VpcSet {
    vpc_set: Items<xml::XmlVpc>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SubnetBody {
    subnet: xml::XmlSubnet,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SubnetSet {
    subnet_set: Items<xml::XmlSubnet>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreateGroup {
    #[serde(rename = "return")]
    ok: bool,
    group_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupInfo {
    security_group_info: Items<xml::XmlSecurityGroup>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RuleSet {
    #[serde(rename = "return", skip_serializing_if = "Option::is_none")]
    ok: Option<bool>,
    security_group_rule_set: Items<xml::XmlSecurityGroupRule>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Allocated {
    public_ip: String,
    domain: String,
    allocation_id: String,
    public_ipv4_pool: &'static str,
    network_border_group: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Associated {
    #[serde(rename = "return")]
    ok: bool,
    association_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AddressesSet {
    addresses_set: Items<xml::XmlAddress>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InterfaceSet {
    network_interface_set: Items<xml::XmlInterface>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusSet {
    instance_status_set: Items<xml::XmlInstanceStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
}

/// DescribeInstanceAttribute: the instance id and one element named after the attribute.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Attribute {
    instance_id: String,
    #[serde(flatten)]
    value: std::collections::BTreeMap<String, AttrXml>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum AttrXml {
    Text(xml::XmlValue<String>),
    Bool(xml::XmlValue<bool>),
    Empty(xml::Empty),
    Groups(Items<xml::XmlGroupRef>),
}

/// Serves one of this module's actions (`Door::Vpc`).
pub async fn serve(s: &Service, caller: &Caller, action: Action, params: &Params, dry: &DryRun<'_>) -> Result<String, ServiceError> {
    let region = s.config.region.as_str();
    let ok = || xml::Return { value: true };
    match action {
        Action::CreateVpc => {
            let cidr = params.required("CidrBlock")?.to_string();
            dry.check().await?;
            let v = s.create_vpc(caller, &cidr).await?;
            reply("CreateVpcResponse", VpcBody { vpc: xml::vpc(&v) })
        }
        Action::DeleteVpc => {
            let id = params.required("VpcId")?.to_string();
            dry.check().await?;
            s.delete_vpc(caller, &id).await?;
            reply("DeleteVpcResponse", ok())
        }
        Action::DescribeVpcs => {
            let (ids, f) = (params.list("VpcId")?, filters(params)?);
            dry.check().await?;
            let vpcs = s.describe_vpcs(caller, &ids, &f).await?;
            reply("DescribeVpcsResponse", VpcSet { vpc_set: vpcs.iter().map(xml::vpc).collect::<Vec<_>>().into() })
        }
        Action::CreateSubnet => {
            let (vpc, cidr) = (params.required("VpcId")?.to_string(), params.required("CidrBlock")?.to_string());
            dry.check().await?;
            let sub = s.create_subnet(caller, &vpc, &cidr, params.get("AvailabilityZone")).await?;
            reply("CreateSubnetResponse", SubnetBody { subnet: xml::subnet(&sub) })
        }
        Action::DeleteSubnet => {
            let id = params.required("SubnetId")?.to_string();
            dry.check().await?;
            s.delete_subnet(caller, &id).await?;
            reply("DeleteSubnetResponse", ok())
        }
        Action::DescribeSubnets => {
            let (ids, f) = (params.list("SubnetId")?, filters(params)?);
            dry.check().await?;
            let subnets = s.describe_subnets(caller, &ids, &f).await?;
            reply("DescribeSubnetsResponse", SubnetSet { subnet_set: subnets.iter().map(xml::subnet).collect::<Vec<_>>().into() })
        }
        Action::ModifySubnetAttribute => {
            let id = params.required("SubnetId")?.to_string();
            let map = value_bool(params, "MapPublicIpOnLaunch")?
                .ok_or_else(|| ServiceError::InvalidParameterValue("Nimbus supports the attribute MapPublicIpOnLaunch only".into()))?;
            dry.check().await?;
            s.modify_subnet_attribute(caller, &id, map).await?;
            reply("ModifySubnetAttributeResponse", ok())
        }
        Action::CreateSecurityGroup => {
            let name = params.required("GroupName")?.to_string();
            let description = params.required("GroupDescription")?.to_string();
            dry.check().await?;
            let g = s.create_security_group(caller, &name, &description, params.get("VpcId")).await?;
            if let Some(tags) = tag_specification(params, "security-group")? {
                s.create_tags(caller, std::slice::from_ref(&g.group_id), &tags).await?;
            }
            reply("CreateSecurityGroupResponse", CreateGroup { ok: true, group_id: g.group_id })
        }
        Action::DeleteSecurityGroup => {
            let sel = group_sel(params)?;
            dry.check().await?;
            s.delete_security_group(caller, &sel).await?;
            reply("DeleteSecurityGroupResponse", ok())
        }
        Action::DescribeSecurityGroups => {
            let (ids, names, f) = (params.list("GroupId")?, params.list("GroupName")?, filters(params)?);
            dry.check().await?;
            let groups = s.describe_security_groups(caller, &ids, &names, &f).await?;
            reply(
                "DescribeSecurityGroupsResponse",
                GroupInfo { security_group_info: groups.iter().map(xml::security_group).collect::<Vec<_>>().into() },
            )
        }
        Action::AuthorizeSecurityGroupIngress | Action::AuthorizeSecurityGroupEgress => {
            let (sel, perms) = (group_sel(params)?, ip_permissions(params)?);
            dry.check().await?;
            let rules = s.authorize_security_group(caller, &sel, action.name().ends_with("Egress"), &perms).await?;
            let set = rules.iter().map(|r| xml::security_group_rule(r, &caller.account_id)).collect::<Vec<_>>().into();
            reply(&format!("{}Response", action.name()), RuleSet { ok: Some(true), security_group_rule_set: set })
        }
        Action::RevokeSecurityGroupIngress | Action::RevokeSecurityGroupEgress => {
            let (sel, perms, ids) = (group_sel(params)?, ip_permissions(params)?, params.list("SecurityGroupRuleId")?);
            dry.check().await?;
            s.revoke_security_group(caller, &sel, action.name().ends_with("Egress"), &perms, &ids).await?;
            reply(&format!("{}Response", action.name()), ok())
        }
        Action::DescribeSecurityGroupRules => {
            let (ids, f) = (params.list("SecurityGroupRuleId")?, filters(params)?);
            dry.check().await?;
            let rules = s.describe_security_group_rules(caller, &ids, &f).await?;
            let set = rules.iter().map(|r| xml::security_group_rule(r, &caller.account_id)).collect::<Vec<_>>().into();
            reply("DescribeSecurityGroupRulesResponse", RuleSet { ok: None, security_group_rule_set: set })
        }
        Action::AllocateAddress => {
            if params.get("Domain").is_some_and(|d| d != "vpc") {
                return Err(ServiceError::InvalidParameterValue("Domain must be vpc".into()));
            }
            dry.check().await?;
            let a = s.allocate_address(caller).await?;
            if let Some(tags) = tag_specification(params, "elastic-ip")? {
                s.create_tags(caller, std::slice::from_ref(&a.allocation_id), &tags).await?;
            }
            reply(
                "AllocateAddressResponse",
                Allocated {
                    public_ip: a.public_ip,
                    domain: a.domain,
                    allocation_id: a.allocation_id,
                    public_ipv4_pool: "nimbus",
                    network_border_group: region.into(),
                },
            )
        }
        Action::AssociateAddress => {
            let target = AssociateAddressRequest {
                instance_id: params.get("InstanceId").map(str::to_string),
                network_interface_id: params.get("NetworkInterfaceId").map(str::to_string),
                private_ip_address: params.get("PrivateIpAddress").map(str::to_string),
                allow_reassociation: params.bool("AllowReassociation")?,
            };
            dry.check().await?;
            let id = s.associate_address(caller, params.get("AllocationId"), params.get("PublicIp"), &target).await?;
            reply("AssociateAddressResponse", Associated { ok: true, association_id: id })
        }
        Action::DisassociateAddress => {
            dry.check().await?;
            s.disassociate_address(caller, params.get("AssociationId"), None, params.get("PublicIp")).await?;
            reply("DisassociateAddressResponse", ok())
        }
        Action::ReleaseAddress => {
            dry.check().await?;
            s.release_address(caller, params.get("AllocationId"), params.get("PublicIp")).await?;
            reply("ReleaseAddressResponse", ok())
        }
        Action::DescribeAddresses => {
            let (ips, allocs, f) = (params.list("PublicIp")?, params.list("AllocationId")?, filters(params)?);
            dry.check().await?;
            let list = s.describe_addresses(caller, &ips, &allocs, &f).await?;
            reply(
                "DescribeAddressesResponse",
                AddressesSet { addresses_set: list.iter().map(|a| xml::address(a, region)).collect::<Vec<_>>().into() },
            )
        }
        Action::DescribeNetworkInterfaces => {
            let (ids, f) = (params.list("NetworkInterfaceId")?, filters(params)?);
            dry.check().await?;
            let list = s.describe_network_interfaces(caller, &ids, &f).await?;
            reply(
                "DescribeNetworkInterfacesResponse",
                InterfaceSet { network_interface_set: list.iter().map(|n| xml::interface(n, region, true)).collect::<Vec<_>>().into() },
            )
        }
        Action::DeleteNetworkInterface => {
            let id = params.required("NetworkInterfaceId")?.to_string();
            dry.check().await?;
            s.delete_network_interface(caller, &id).await?;
            reply("DeleteNetworkInterfaceResponse", ok())
        }
        Action::DescribeInstanceStatus => {
            let mut filter = InstanceFilter { instance_ids: params.list("InstanceId")?, ..Default::default() };
            for (name, values) in filters(params)? {
                match name.as_str() {
                    "instance-state-name" => {
                        for v in values {
                            filter.states.push(v.parse::<InstanceState>().map_err(|e| ServiceError::InvalidParameterValue(e.to_string()))?);
                        }
                    }
                    "availability-zone" => filter.availability_zones.extend(values),
                    "instance-id" => filter.instance_ids.extend(values),
                    other => return Err(ServiceError::InvalidParameterValue(format!("The filter '{other}' is invalid"))),
                }
            }
            if !params.bool("IncludeAllInstances")? && filter.states.is_empty() {
                filter.states.push(InstanceState::Running);
            }
            filter.max_results = super::max_results(params)?;
            filter.next_token = params.get("NextToken").map(str::to_string);
            dry.check().await?;
            let list = s.describe_instance_status(caller, filter).await?;
            let set: Vec<_> = list.statuses.iter().map(xml::instance_status).collect();
            reply("DescribeInstanceStatusResponse", StatusSet { instance_status_set: set.into(), next_token: list.next_token })
        }
        Action::DescribeInstanceAttribute => {
            let id = params.required("InstanceId")?.to_string();
            let name = params.required("Attribute")?.to_string();
            dry.check().await?;
            let value = match s.describe_instance_attribute(caller, &id, &name).await? {
                AttributeValue::Text(v) => AttrXml::Text(xml::XmlValue { value: v }),
                AttributeValue::Bool(v) => AttrXml::Bool(xml::XmlValue { value: v }),
                AttributeValue::Empty => AttrXml::Empty(xml::Empty {}),
                AttributeValue::Groups(g) => AttrXml::Groups(g.iter().map(xml::XmlGroupRef::from).collect::<Vec<_>>().into()),
            };
            reply("DescribeInstanceAttributeResponse", Attribute { instance_id: id, value: [(name, value)].into_iter().collect() })
        }
        Action::ModifyInstanceAttribute => {
            let id = params.required("InstanceId")?.to_string();
            let mut req = ModifyInstanceRequest::default();
            let groups = params.list("GroupId")?;
            if !groups.is_empty() {
                req.security_group_ids = Some(groups);
            }
            req.instance_type = params.get("InstanceType.Value").map(str::to_string);
            // The old form: Attribute=name&Value=v.
            match (params.get("Attribute"), params.get("Value")) {
                (Some("instanceType"), Some(v)) => req.instance_type = Some(v.to_string()),
                (Some("disableApiTermination" | "disableApiStop"), Some("false")) | (Some("sourceDestCheck"), Some("true")) => {}
                (Some("instanceInitiatedShutdownBehavior"), Some("stop")) => {}
                (Some(a), _) => {
                    return Err(ServiceError::UnsupportedOperation(format!("Nimbus cannot modify the attribute {a} to that value")))
                }
                (None, _) => {}
            }
            // Settings Nimbus has fixed: asking for what they are is fine.
            for (name, fixed) in [("DisableApiTermination", false), ("DisableApiStop", false), ("SourceDestCheck", true)] {
                if value_bool(params, name)?.is_some_and(|v| v != fixed) {
                    return Err(ServiceError::UnsupportedOperation(format!("Nimbus cannot change {name}")));
                }
            }
            if params.get("InstanceInitiatedShutdownBehavior.Value").is_some_and(|v| v != "stop") {
                return Err(ServiceError::UnsupportedOperation("Nimbus instances stop on shutdown".into()));
            }
            dry.check().await?;
            if req.instance_type.is_some() || req.security_group_ids.is_some() {
                s.modify_instance(caller, &id, &req).await?;
            } else {
                s.describe_instance(caller, &id).await?;
            }
            reply("ModifyInstanceAttributeResponse", ok())
        }
        other => Err(ServiceError::Internal(format!("{} is not served by this module", other.name()))),
    }
}

/// Tags of `TagSpecification.N` for `resource_type` (others refused).
fn tag_specification(params: &Params, resource_type: &str) -> Result<Option<Vec<(String, String)>>, ServiceError> {
    let mut out = Vec::new();
    for spec in params.structs("TagSpecification")? {
        match spec.get("ResourceType") {
            Some(t) if t == resource_type => {}
            other => {
                return Err(ServiceError::InvalidParameterValue(format!(
                    "TagSpecification ResourceType {other:?} is not valid here; use {resource_type}"
                )))
            }
        }
        for t in spec.structs("Tag")? {
            out.push((t.required("Key")?.to_string(), t.get("Value").unwrap_or("").to_string()));
        }
    }
    Ok((!out.is_empty()).then_some(out))
}
