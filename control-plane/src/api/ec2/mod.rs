//! The EC2 Query API front door: `POST /` (form body) and `GET /` (query
//! string), authenticated by AWS Signature Version 4, answering EC2's XML.
//! Like the REST handlers, it only decodes, calls the service layer and
//! encodes; error codes and statuses come from `ServiceError`.

pub mod action;
pub mod params;
pub mod vpc;
pub mod xml;

use crate::auth::sigv4::{ParsedAuth, RequestView, VerifyOptions};
use crate::error::{ErrorKind, ServiceError};
use crate::service::instances::{InstanceFilter, TagFilter};
use crate::service::{Caller, Service};
use action::{Action, Door, DryRun};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use nimbus_proto::api::RunInstancesRequest;
use nimbus_proto::InstanceState;
use params::Params;
use xml::{Envelope, XMLNS};

pub const API_VERSION: &str = "2016-11-15";
/// Largest request body accepted (user-data is at most 16 KiB decoded).
const MAX_BODY: usize = 256 * 1024;

pub fn routes() -> Router<Service> {
    Router::new().route("/", get(handle).post(handle))
}

fn xml_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/xml;charset=UTF-8")], body).into_response()
}

/// The EC2 door's status of an error's kind: as REST's, except that lack
/// of capacity is a 500 (as EC2 answers InsufficientInstanceCapacity) and a
/// conflict is a 400 (EC2 answers every client error with 400).
pub fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Capacity => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Conflict => StatusCode::BAD_REQUEST,
        other => super::status(other),
    }
}

/// The EC2 wire form of an error.
fn error_response(e: ServiceError) -> Response {
    let status = status(e.kind());
    if e.kind() == ErrorKind::Internal {
        tracing::error!(error = %e.report(), "EC2 request failed");
    }
    let body = xml::ErrorResponse {
        errors: xml::Errors { error: xml::XmlError { code: e.code().to_string(), message: e.public_message() } },
        request_id: super::request_id(),
    };
    match xml::to_xml("Response", &body) {
        Ok(x) => xml_response(status, x),
        Err(_) => status.into_response(),
    }
}

async fn handle(State(s): State<Service>, req: Request) -> Response {
    match serve(&s, req).await {
        Ok(body) => xml_response(StatusCode::OK, body),
        Err(e) => error_response(e),
    }
}

async fn serve(s: &Service, req: Request) -> Result<String, ServiceError> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ServiceError::MalformedRequest(format!("the body is unreadable or larger than {MAX_BODY} bytes")))?;
    let caller = authenticate(s, &parts, &body).await?;
    let mut params = Params::parse(parts.uri.query().unwrap_or("").as_bytes())?;
    if !body.is_empty() {
        params.merge(Params::parse(&body)?)?;
    }
    let action: Action = params.required("Action")?.parse()?;
    match params.get("Version") {
        Some(API_VERSION) => {}
        Some(v) => return Err(ServiceError::InvalidParameterValue(format!("Version {v} is not supported; use {API_VERSION}"))),
        None => return Err(ServiceError::MissingParameter("Version".into())),
    }
    let dry = DryRun { on: params.bool("DryRun")?, action, service: s, caller: &caller, params: &params };
    if action.door() == Door::Vpc {
        return vpc::serve(s, &caller, action, &params, &dry).await;
    }
    let rid = super::request_id();
    macro_rules! reply {
        ($root:expr, $body:expr) => {
            xml::to_xml($root, &Envelope { xmlns: XMLNS, request_id: rid, body: $body })
                .map_err(|e| ServiceError::internal("encoding the XML answer", e))
        };
    }
    match action {
        Action::RunInstances => {
            let req = run_request(&params)?;
            dry.check_launch(&req).await?;
            let r = s.run_instances(&caller, req).await?;
            reply!("RunInstancesResponse", xml::run_instances(&r, &s.config.region))
        }
        Action::DescribeInstances => {
            let filter = instance_filter(&params)?;
            dry.check().await?;
            let list = s.describe_instances(&caller, filter).await?;
            reply!(
                "DescribeInstancesResponse",
                xml::describe_instances(&list.instances, &caller.account_id, list.next_token, &s.config.region)
            )
        }
        Action::TerminateInstances | Action::StopInstances | Action::StartInstances => {
            let ids = params.list("InstanceId")?;
            dry.check().await?;
            let changes = match action {
                Action::StopInstances => s.stop_instances(&caller, &ids).await?,
                Action::StartInstances => s.start_instances(&caller, &ids).await?,
                _ => s.terminate_instances(&caller, &ids).await?,
            };
            reply!(&format!("{action}Response"), xml::InstanceStateChanges { instances_set: xml::state_changes(&changes) })
        }
        Action::RebootInstances => {
            let ids = params.list("InstanceId")?;
            dry.check().await?;
            s.reboot_instances(&caller, &ids).await?;
            reply!("RebootInstancesResponse", xml::Return { value: true })
        }
        Action::ModifyInstanceMetadataOptions => {
            let id = params.required("InstanceId")?.to_string();
            let req = metadata_options(&params, "")?.unwrap_or_default();
            dry.check().await?;
            let r = s.modify_instance_metadata_options(&caller, &id, &req).await?;
            reply!(
                "ModifyInstanceMetadataOptionsResponse",
                xml::ModifyMetadataOptions { instance_id: r.instance_id, instance_metadata_options: (&r.instance_metadata_options).into() }
            )
        }
        Action::GetConsoleOutput => {
            let id = params.required("InstanceId")?;
            dry.check().await?;
            use base64::Engine;
            let out = s.console_output(&caller, id).await?;
            reply!(
                "GetConsoleOutputResponse",
                xml::ConsoleOutput {
                    instance_id: out.instance_id,
                    timestamp: xml::timestamp(&out.timestamp.unwrap_or_else(chrono::Utc::now)),
                    output: base64::engine::general_purpose::STANDARD.encode(&out.output),
                }
            )
        }
        Action::CreateTags | Action::DeleteTags => {
            let resources = params.list("ResourceId")?;
            let tags = params.structs("Tag")?;
            dry.check().await?;
            if action == Action::CreateTags {
                let tags: Vec<(String, String)> = tags
                    .iter()
                    .map(|t| Ok((t.required("Key")?.to_string(), t.get("Value").unwrap_or("").to_string())))
                    .collect::<Result<_, ServiceError>>()?;
                if tags.is_empty() {
                    return Err(ServiceError::MissingParameter("Tag".into()));
                }
                s.create_tags(&caller, &resources, &tags).await?;
            } else {
                let tags: Vec<(String, Option<String>)> = tags
                    .iter()
                    .map(|t| Ok((t.required("Key")?.to_string(), t.get("Value").map(str::to_string))))
                    .collect::<Result<_, ServiceError>>()?;
                s.delete_tags(&caller, &resources, &tags).await?;
            }
            reply!(&format!("{}Response", action.name()), xml::Return { value: true })
        }
        Action::DescribeTags => {
            dry.check().await?;
            let (mut resources, mut keys, mut values, mut types) = (vec![], vec![], vec![], vec![]);
            for f in params.structs("Filter")? {
                let vals = f.list("Value")?;
                match f.required("Name")? {
                    "resource-id" => resources.extend(vals),
                    "key" => keys.extend(vals),
                    "value" => values.extend(vals),
                    "resource-type" => types.extend(vals),
                    other => return Err(ServiceError::InvalidParameterValue(format!("The filter '{other}' is invalid"))),
                }
            }
            let tags = s.describe_tags_of_types(&caller, &resources, &keys, &values, &types).await?;
            let items = tags
                .into_iter()
                .map(|t| xml::XmlResourceTag { resource_id: t.resource_id, resource_type: t.resource_type, key: t.key, value: t.value })
                .collect::<Vec<_>>();
            reply!("DescribeTagsResponse", xml::DescribeTags { tag_set: items.into() })
        }
        Action::CreateKeyPair => {
            let name = params.required("KeyName")?.to_string();
            dry.check().await?;
            let k = s.create_key_pair(&caller, &name, params.get("KeyType")).await?;
            reply!(
                "CreateKeyPairResponse",
                xml::CreateKeyPair {
                    key_pair_id: k.key_pair.key_pair_id,
                    key_name: k.key_pair.key_name,
                    key_fingerprint: k.key_pair.key_fingerprint,
                    key_material: k.key_material,
                }
            )
        }
        Action::ImportKeyPair => {
            let name = params.required("KeyName")?.to_string();
            use base64::Engine;
            // PublicKeyMaterial is a blob: base64 on the wire.
            let raw = base64::engine::general_purpose::STANDARD
                .decode(params.required("PublicKeyMaterial")?)
                .map_err(|_| ServiceError::InvalidParameterValue("PublicKeyMaterial must be base64".into()))?;
            let text = String::from_utf8(raw)
                .map_err(|_| ServiceError::InvalidKeyFormat("Key is not in valid OpenSSH public key format".into()))?;
            dry.check().await?;
            let k = s.import_key_pair(&caller, &name, &text).await?;
            reply!("ImportKeyPairResponse", xml::XmlKeyPair::from(&k))
        }
        Action::DescribeKeyPairs => {
            dry.check().await?;
            let keys = s.describe_key_pairs(&caller, &params.list("KeyName")?).await?;
            reply!(
                "DescribeKeyPairsResponse",
                xml::DescribeKeyPairs { key_set: keys.iter().map(xml::XmlKeyPair::from).collect::<Vec<_>>().into() }
            )
        }
        Action::DeleteKeyPair => {
            let name = params.required("KeyName")?.to_string();
            dry.check().await?;
            s.delete_key_pair(&caller, &name).await?;
            reply!("DeleteKeyPairResponse", xml::Return { value: true })
        }
        Action::DescribeImages => {
            dry.check().await?;
            let mut query = crate::service::images::ImageQuery {
                image_ids: params.list("ImageId")?,
                owners: params.list("Owner")?,
                executable_by: params.list("ExecutableBy")?,
                filters: Vec::new(),
            };
            for f in params.structs("Filter")? {
                query.filters.push((f.required("Name")?.to_string(), f.list("Value")?));
            }
            let images = s.describe_images(&caller, &query).await?;
            reply!("DescribeImagesResponse", xml::describe_images(&images))
        }
        Action::CreateImage => {
            let instance_id = params.required("InstanceId")?.to_string();
            let mut tags = Vec::new();
            for spec in params.structs("TagSpecification")? {
                match spec.required("ResourceType")? {
                    "image" => {}
                    other => {
                        return Err(ServiceError::InvalidParameterValue(format!(
                            "'{other}' is not a valid taggable resource type for this operation (image)"
                        )))
                    }
                }
                for t in spec.structs("Tag")? {
                    tags.push(nimbus_proto::api::ResourceTag {
                        key: t.required("Key")?.to_string(),
                        value: t.get("Value").unwrap_or("").to_string(),
                    });
                }
            }
            let req = nimbus_proto::api::CreateImageRequest {
                name: params.required("Name")?.to_string(),
                description: params.get("Description").map(str::to_string),
                no_reboot: params.bool("NoReboot")?,
                tags,
            };
            dry.check().await?;
            let image = s.create_image(&caller, &instance_id, &req).await?;
            reply!("CreateImageResponse", xml::CreateImage { image_id: image.image_id })
        }
        Action::DeregisterImage => {
            let image_id = params.required("ImageId")?.to_string();
            dry.check().await?;
            s.deregister_image(&caller, &image_id).await?;
            reply!("DeregisterImageResponse", xml::Return { value: true })
        }
        Action::DescribeInstanceTypes => {
            dry.check().await?;
            let types = s.describe_instance_types(&params.list("InstanceType")?).await?;
            reply!("DescribeInstanceTypesResponse", xml::describe_instance_types(&types))
        }
        Action::DescribeAccountAttributes => {
            dry.check().await?;
            let a = s.describe_account(&caller).await?;
            let default_vpc = s.ensure_default_network(&caller.account_id).await?;
            let all = xml::account_attributes(&a, &default_vpc);
            let wanted = params.list("AttributeName")?;
            if let Some(unknown) = wanted.iter().find(|w| !all.iter().any(|(name, _)| name == *w)) {
                return Err(ServiceError::InvalidParameterValue(format!("The attribute name '{unknown}' is not supported")));
            }
            let items = all
                .into_iter()
                .filter(|(name, _)| wanted.is_empty() || wanted.iter().any(|w| w == name))
                .map(|(name, values)| xml::XmlAccountAttribute {
                    attribute_name: name.to_string(),
                    attribute_value_set: values
                        .into_iter()
                        .map(|v| xml::XmlAttributeValue { attribute_value: v })
                        .collect::<Vec<_>>()
                        .into(),
                })
                .collect::<Vec<_>>();
            reply!("DescribeAccountAttributesResponse", xml::DescribeAccountAttributes { account_attribute_set: items.into() })
        }
        Action::DescribeAvailabilityZones => {
            dry.check().await?;
            let zones = s.describe_availability_zones().await?;
            let region = s.config.region.clone();
            let items = zones
                .into_iter()
                .map(|z| xml::XmlZone {
                    zone_id: z.clone(),
                    zone_name: z,
                    zone_state: "available",
                    region_name: region.clone(),
                    zone_type: "availability-zone",
                })
                .collect::<Vec<_>>();
            reply!("DescribeAvailabilityZonesResponse", xml::DescribeAvailabilityZones { availability_zone_info: items.into() })
        }
        other => Err(ServiceError::Internal(format!("{} is not served by this module", other.name()))),
    }
}

/// Verifies the request's SigV4 signature against the access key's secret.
async fn authenticate(s: &Service, parts: &axum::http::request::Parts, body: &[u8]) -> Result<Caller, ServiceError> {
    let view = RequestView {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        body,
    };
    if parts.headers.contains_key("x-amz-security-token") {
        return Err(ServiceError::AuthFailure("temporary credentials (session tokens) are not supported".into()));
    }
    let auth = ParsedAuth::parse(&view)?;
    let now = chrono::Utc::now();
    let options = VerifyOptions::default();
    auth.check_time(now, &options)?;
    // A signature for another service or region is not one for us.
    if auth.service() != "ec2" {
        return Err(ServiceError::AuthFailure("Credential should be scoped to correct service: 'ec2'.".into()));
    }
    if auth.region() != s.config.region {
        return Err(ServiceError::AuthFailure(format!("Credential should be scoped to a valid region, not '{}'.", auth.region())));
    }
    let (caller, secret) = s.access_key(auth.access_key_id()).await?.ok_or(crate::auth::sigv4::SigV4Error::UnknownAccessKey)?;
    auth.verify(&view, now, &options, secret.as_bytes())?;
    Ok(caller)
}

fn count(params: &Params, name: &str) -> Result<u32, ServiceError> {
    let n = params.int(name)?.ok_or_else(|| ServiceError::MissingParameter(name.to_string()))?;
    u32::try_from(n).map_err(|_| ServiceError::InvalidParameterValue(format!("{name} must be between 1 and the account's limit")))
}

/// EC2's metadata options under `prefix` (`MetadataOptions.` of
/// RunInstances; none for ModifyInstanceMetadataOptions); `None` when none is given.
pub(crate) fn metadata_options(p: &Params, prefix: &str) -> Result<Option<nimbus_proto::api::MetadataOptionsRequest>, ServiceError> {
    let get = |name: &str| p.get(&format!("{prefix}{name}")).map(str::to_string);
    let hop = match p.int(&format!("{prefix}HttpPutResponseHopLimit"))? {
        Some(h) => Some(
            u32::try_from(h).map_err(|_| ServiceError::InvalidParameterValue("HttpPutResponseHopLimit must be between 1 and 64".into()))?,
        ),
        None => None,
    };
    let o = nimbus_proto::api::MetadataOptionsRequest {
        http_tokens: get("HttpTokens"),
        http_endpoint: get("HttpEndpoint"),
        instance_metadata_tags: get("InstanceMetadataTags"),
        http_put_response_hop_limit: hop,
        http_protocol_ipv6: get("HttpProtocolIpv6"),
    };
    Ok((o != Default::default()).then_some(o))
}

fn optional_bool(p: &Params, name: &str) -> Result<Option<bool>, ServiceError> {
    p.get(name).map(|_| p.bool(name)).transpose()
}

fn run_request(params: &Params) -> Result<RunInstancesRequest, ServiceError> {
    for unsupported in ["LaunchTemplate.LaunchTemplateId", "LaunchTemplate.LaunchTemplateName"] {
        if params.get(unsupported).is_some() {
            return Err(ServiceError::InvalidParameterValue(format!("{unsupported} is not supported by this Nimbus version")));
        }
    }
    let mut tags = Vec::new();
    let mut network_interface_tags = Vec::new();
    for spec in params.structs("TagSpecification")? {
        let into = match spec.get("ResourceType") {
            Some("instance") => &mut tags,
            Some("network-interface") => &mut network_interface_tags,
            // Nimbus has no volumes yet: accepted, nothing to tag.
            Some("volume") => continue,
            Some(other) => {
                return Err(ServiceError::InvalidParameterValue(format!(
                    "TagSpecification ResourceType {other:?} is not supported; use instance, volume or network-interface"
                )))
            }
            None => return Err(ServiceError::MissingParameter("TagSpecification.N.ResourceType".into())),
        };
        for t in spec.structs("Tag")? {
            into.push(nimbus_proto::api::ResourceTag {
                key: t.required("Key")?.to_string(),
                value: t.get("Value").unwrap_or("").to_string(),
            });
        }
    }
    let mut network_interfaces = Vec::new();
    for n in params.structs("NetworkInterface")? {
        if n.get("NetworkInterfaceId").is_some() {
            return Err(ServiceError::InvalidParameterValue(
                "Attaching an existing network interface at launch is not supported by Nimbus".into(),
            ));
        }
        let device_index = n.int("DeviceIndex")?.ok_or_else(|| ServiceError::MissingParameter("NetworkInterface.N.DeviceIndex".into()))?;
        network_interfaces.push(nimbus_proto::api::NetworkInterfaceSpec {
            device_index: u32::try_from(device_index)
                .map_err(|_| ServiceError::InvalidParameterValue("DeviceIndex must be 0 to 7".into()))?,
            subnet_id: n.get("SubnetId").map(str::to_string),
            security_group_ids: n.list("SecurityGroupId")?,
            associate_public_ip_address: optional_bool(&n, "AssociatePublicIpAddress")?,
            delete_on_termination: optional_bool(&n, "DeleteOnTermination")?,
            private_ip_address: n.get("PrivateIpAddress").map(str::to_string),
        });
    }
    Ok(RunInstancesRequest {
        subnet_id: params.get("SubnetId").map(str::to_string),
        security_group_ids: params.list("SecurityGroupId")?,
        security_group_names: params.list("SecurityGroup")?,
        private_ip_address: params.get("PrivateIpAddress").map(str::to_string),
        associate_public_ip_address: None,
        network_interfaces,
        network_interface_tags,
        metadata_options: metadata_options(params, "MetadataOptions.")?,
        key_name: params.get("KeyName").map(str::to_string),
        tags,
        image_id: Some(params.required("ImageId")?.to_string()),
        instance_type: params.get("InstanceType").unwrap_or("t3.micro").to_string(),
        min_count: count(params, "MinCount")?,
        max_count: count(params, "MaxCount")?,
        availability_zone: params.get("Placement.AvailabilityZone").map(str::to_string),
        user_data: params.get("UserData").map(str::to_string),
        client_token: params.get("ClientToken").map(str::to_string),
    })
}

fn instance_filter(params: &Params) -> Result<InstanceFilter, ServiceError> {
    let mut f = InstanceFilter { instance_ids: params.list("InstanceId")?, ..Default::default() };
    for filter in params.structs("Filter")? {
        let name = filter.required("Name")?.to_string();
        let values = filter.list("Value")?;
        match name.as_str() {
            "instance-state-name" => {
                for v in values {
                    f.states.push(v.parse::<InstanceState>().map_err(|e| ServiceError::InvalidParameterValue(e.to_string()))?);
                }
            }
            "instance-id" => f.instance_ids.extend(values),
            "instance-type" => f.instance_types.extend(values),
            "availability-zone" => f.availability_zones.extend(values),
            "image-id" => f.image_ids.extend(values),
            "tag-key" => f.tags.push(TagFilter::Key(values)),
            tag if tag.starts_with("tag:") => f.tags.push(TagFilter::Value { key: tag["tag:".len()..].to_string(), values }),
            // The service knows the network filters (and refuses unknown names).
            _ => f.network.push((name, values)),
        }
    }
    f.max_results = max_results(params)?;
    f.next_token = params.get("NextToken").map(str::to_string);
    Ok(f)
}

/// `MaxResults` of the instance listings, as EC2 takes it: 5 to 1000, and
/// not with a list of instance ids.
pub(crate) fn max_results(params: &Params) -> Result<Option<u32>, ServiceError> {
    let Some(n) = params.int("MaxResults")? else { return Ok(None) };
    if params.get("InstanceId.1").is_some() {
        return Err(ServiceError::InvalidParameterCombination(
            "The parameter instancesSet cannot be used with the parameter maxResults".into(),
        ));
    }
    match u32::try_from(n) {
        Ok(n) if (5..=1000).contains(&n) => Ok(Some(n)),
        _ => Err(ServiceError::InvalidParameterValue("MaxResults must be between 5 and 1000".into())),
    }
}
