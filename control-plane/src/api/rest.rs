//! `/v1`: the REST/JSON API. Handlers only decode, call the service, encode.

use super::{has_token, ApiJson, ApiQuery};
use crate::error::{Result, ServiceError};
use crate::service::instances::{InstanceFilter, TagFilter};
use crate::service::{Caller, Service};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::{Json, Router};
use nimbus_proto::api::*;
use nimbus_proto::InstanceState;
use serde::Deserialize;

/// An authenticated caller: an account (`Bearer <access key id>:<secret>`)
/// or the operator (`Bearer <admin token>`).
pub struct Authenticated(pub Caller);

impl FromRequestParts<Service> for Authenticated {
    type Rejection = ServiceError;
    async fn from_request_parts(parts: &mut Parts, service: &Service) -> Result<Self> {
        let Some(token) = super::bearer(&parts.headers) else {
            return Err(ServiceError::AuthFailure("missing Authorization: Bearer <access key id>:<secret> (or the admin token)".into()));
        };
        if has_token(&parts.headers, &service.config.admin_token) {
            return Ok(Authenticated(Caller::admin()));
        }
        service.authenticate_account(token).await.map(Authenticated)
    }
}

/// An account's call: the admin token is for operator calls only.
pub struct Tenant(pub Caller);

impl FromRequestParts<Service> for Tenant {
    type Rejection = ServiceError;
    async fn from_request_parts(parts: &mut Parts, service: &Service) -> Result<Self> {
        let Authenticated(caller) = Authenticated::from_request_parts(parts, service).await?;
        if caller.admin {
            return Err(ServiceError::Unauthorized(
                "The admin token is for operator calls; use an account's credentials (nimbus admin create-account)".into(),
            ));
        }
        Ok(Tenant(caller))
    }
}

/// The operator only: accounts get UnauthorizedOperation.
pub struct Operator(pub Caller);

impl FromRequestParts<Service> for Operator {
    type Rejection = ServiceError;
    async fn from_request_parts(parts: &mut Parts, service: &Service) -> Result<Self> {
        let Authenticated(caller) = Authenticated::from_request_parts(parts, service).await?;
        if !caller.admin {
            return Err(ServiceError::Unauthorized("You are not authorized to perform this operation (operator only)".into()));
        }
        Ok(Operator(caller))
    }
}

/// Largest body of a `/v1` call: a launch with 16 KiB of user-data (base64)
/// or tags on 1,000 resources fit with room to spare. Bodies are read only
/// after authentication (the [`Authenticated`] extractors run first).
const MAX_BODY: usize = 128 * 1024;

pub fn routes() -> Router<Service> {
    Router::new()
        .route("/v1/instances", post(run_instances).get(describe_instances))
        .route("/v1/instances/terminate", post(terminate_instances))
        .route("/v1/instances/stop", post(stop_instances))
        .route("/v1/instances/start", post(start_instances))
        .route("/v1/instances/reboot", post(reboot_instances))
        .route("/v1/instances/{id}/console", get(console_output))
        .route("/v1/tags", get(describe_tags).post(create_tags))
        .route("/v1/tags/delete", post(delete_tags))
        .route("/v1/key-pairs", get(describe_key_pairs).post(create_key_pair))
        .route("/v1/key-pairs/import", post(import_key_pair))
        .route("/v1/key-pairs/{name}", axum::routing::delete(delete_key_pair))
        .route("/v1/instances/{id}", get(describe_instance).delete(terminate_instance))
        .route("/v1/hosts", get(describe_hosts))
        .route("/v1/instance-types", get(describe_instance_types))
        .route("/v1/images", get(describe_images).post(register_image))
        .route("/v1/images/{id}", get(describe_image).delete(deregister_image))
        .route("/v1/instances/{id}/image", post(create_image))
        .route("/v1/admin/accounts", post(create_account))
        .route("/v1/hosts/{id}/reset-credential", post(reset_host_credential))
        .route("/v1/account", get(describe_account))
        .route("/v1/admin/accounts/{id}/limits", axum::routing::put(set_account_limits))
        .route("/v1/instances/{id}/attributes", post(modify_instance))
        .route("/v1/instances/{id}/metadata-options", post(modify_metadata_options))
        .route("/v1/vpcs", get(describe_vpcs).post(create_vpc))
        .route("/v1/vpcs/{id}", axum::routing::delete(delete_vpc))
        .route("/v1/subnets", get(describe_subnets).post(create_subnet))
        .route("/v1/subnets/{id}", axum::routing::delete(delete_subnet))
        .route("/v1/subnets/{id}/attributes", post(modify_subnet))
        .route("/v1/security-groups", get(describe_security_groups).post(create_security_group))
        .route("/v1/security-groups/{id}", axum::routing::delete(delete_security_group))
        .route("/v1/security-groups/{id}/{direction}", post(authorize))
        .route("/v1/security-groups/{id}/{direction}/revoke", post(revoke))
        .route("/v1/addresses", get(describe_addresses).post(allocate_address))
        .route("/v1/addresses/{id}", axum::routing::delete(release_address))
        .route("/v1/addresses/{id}/associate", post(associate_address))
        .route("/v1/addresses/{id}/disassociate", post(disassociate_address))
        .route("/v1/network-interfaces", get(describe_network_interfaces))
        .route("/v1/network-interfaces/{id}", axum::routing::delete(delete_network_interface))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(MAX_BODY, super::refuse_oversized))
}

async fn describe_account(State(s): State<Service>, Tenant(c): Tenant) -> Result<Json<AccountView>> {
    Ok(Json(s.describe_account(&c).await?))
}

async fn set_account_limits(
    State(s): State<Service>,
    Operator(_): Operator,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SetLimits>,
) -> Result<Json<AccountView>> {
    Ok(Json(s.set_account_limits(&id, &req).await?))
}

/// The operator resets a host's credential (id or name): see
/// `Service::reset_host_credential`.
async fn reset_host_credential(State(s): State<Service>, Operator(_): Operator, Path(host): Path<String>) -> Result<Json<HostReset>> {
    let host_id = s.reset_host_credential(&host).await?;
    Ok(Json(HostReset { host_id }))
}

async fn run_instances(
    State(s): State<Service>,
    Tenant(c): Tenant,
    ApiJson(req): ApiJson<RunInstancesRequest>,
) -> Result<Json<Reservation>> {
    Ok(Json(s.run_instances(&c, req).await?))
}

/// Query of `GET /v1/instances`; list filters are comma-separated.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    instance_id: Option<String>,
    state: Option<String>,
    availability_zone: Option<String>,
    instance_type: Option<String>,
    image_id: Option<String>,
    /// `tag=Key` (has the key) or `tag=Key=Value`.
    tag: Option<String>,
    vpc_id: Option<String>,
    subnet_id: Option<String>,
    private_ip_address: Option<String>,
    group_id: Option<String>,
    max_results: Option<u32>,
    next_token: Option<String>,
}

fn split(v: &Option<String>) -> Vec<String> {
    v.as_deref().map(|s| s.split(',').filter(|p| !p.is_empty()).map(str::to_string).collect()).unwrap_or_default()
}

async fn describe_instances(State(s): State<Service>, Tenant(c): Tenant, ApiQuery(q): ApiQuery<ListQuery>) -> Result<Json<InstanceList>> {
    let states = split(&q.state)
        .iter()
        .map(|st| st.parse::<InstanceState>().map_err(|e| ServiceError::InvalidParameterValue(e.to_string())))
        .collect::<Result<_>>()?;
    let filter = InstanceFilter {
        instance_ids: split(&q.instance_id),
        states,
        availability_zones: split(&q.availability_zone),
        instance_types: split(&q.instance_type),
        image_ids: split(&q.image_id),
        tags: q
            .tag
            .as_deref()
            .map(|t| match t.split_once('=') {
                Some((k, v)) => vec![TagFilter::Value { key: k.to_string(), values: vec![v.to_string()] }],
                None => vec![TagFilter::Key(vec![t.to_string()])],
            })
            .unwrap_or_default(),
        network: [
            ("vpc-id", &q.vpc_id),
            ("subnet-id", &q.subnet_id),
            ("private-ip-address", &q.private_ip_address),
            ("instance.group-id", &q.group_id),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, v)| (k.to_string(), split(v)))
        .collect(),
        max_results: q.max_results,
        next_token: q.next_token,
    };
    Ok(Json(s.describe_instances(&c, filter).await?))
}

async fn describe_instance(State(s): State<Service>, Tenant(c): Tenant, Path(id): Path<String>) -> Result<Json<Instance>> {
    Ok(Json(s.describe_instance(&c, &id).await?))
}

async fn terminate_instances(
    State(s): State<Service>,
    Tenant(c): Tenant,
    ApiJson(req): ApiJson<TerminateInstancesRequest>,
) -> Result<Json<TerminateInstancesResponse>> {
    Ok(Json(TerminateInstancesResponse { terminating_instances: s.terminate_instances(&c, &req.instance_ids).await? }))
}

async fn stop_instances(
    State(s): State<Service>,
    Tenant(c): Tenant,
    ApiJson(req): ApiJson<TerminateInstancesRequest>,
) -> Result<Json<StoppingInstances>> {
    Ok(Json(StoppingInstances { stopping_instances: s.stop_instances(&c, &req.instance_ids).await? }))
}

async fn start_instances(
    State(s): State<Service>,
    Tenant(c): Tenant,
    ApiJson(req): ApiJson<TerminateInstancesRequest>,
) -> Result<Json<StartingInstances>> {
    Ok(Json(StartingInstances { starting_instances: s.start_instances(&c, &req.instance_ids).await? }))
}

async fn reboot_instances(
    State(s): State<Service>,
    Tenant(c): Tenant,
    ApiJson(req): ApiJson<TerminateInstancesRequest>,
) -> Result<Json<Done>> {
    s.reboot_instances(&c, &req.instance_ids).await?;
    Ok(Json(Done {}))
}

/// ModifyInstanceMetadataOptions (see `service/metadata_options.rs`).
async fn modify_metadata_options(
    State(s): State<Service>,
    Tenant(c): Tenant,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<nimbus_proto::api::MetadataOptionsRequest>,
) -> Result<Json<nimbus_proto::api::ModifyMetadataOptionsResult>> {
    Ok(Json(s.modify_instance_metadata_options(&c, &id, &req).await?))
}

async fn console_output(State(s): State<Service>, Tenant(c): Tenant, Path(id): Path<String>) -> Result<Json<ConsoleOutput>> {
    use base64::Engine;
    let out = s.console_output(&c, &id).await?;
    Ok(Json(ConsoleOutput {
        instance_id: out.instance_id,
        output: base64::engine::general_purpose::STANDARD.encode(&out.output),
        timestamp: out.timestamp,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagsRequest {
    resource_ids: Vec<String>,
    #[serde(default)]
    tags: Vec<ResourceTag>,
}

async fn create_tags(State(s): State<Service>, Tenant(c): Tenant, ApiJson(req): ApiJson<TagsRequest>) -> Result<Json<Done>> {
    let tags: Vec<(String, String)> = req.tags.into_iter().map(|t| (t.key, t.value)).collect();
    s.create_tags(&c, &req.resource_ids, &tags).await?;
    Ok(Json(Done {}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteTagsRequest {
    resource_ids: Vec<String>,
    /// Keys, with a value to delete only that value.
    #[serde(default)]
    tags: Vec<DeleteTag>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteTag {
    key: String,
    value: Option<String>,
}

async fn delete_tags(State(s): State<Service>, Tenant(c): Tenant, ApiJson(req): ApiJson<DeleteTagsRequest>) -> Result<Json<Done>> {
    let tags: Vec<(String, Option<String>)> = req.tags.into_iter().map(|t| (t.key, t.value)).collect();
    s.delete_tags(&c, &req.resource_ids, &tags).await?;
    Ok(Json(Done {}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagsQuery {
    resource_id: Option<String>,
    key: Option<String>,
    value: Option<String>,
}

async fn describe_tags(State(s): State<Service>, Tenant(c): Tenant, ApiQuery(q): ApiQuery<TagsQuery>) -> Result<Json<TagList>> {
    let tags = s.describe_tags(&c, &split(&q.resource_id), &split(&q.key), &split(&q.value)).await?;
    Ok(Json(TagList { tags }))
}

async fn create_key_pair(
    State(s): State<Service>,
    Tenant(c): Tenant,
    ApiJson(req): ApiJson<CreateKeyPairRequest>,
) -> Result<Json<NewKeyPair>> {
    Ok(Json(s.create_key_pair(&c, &req.name, req.key_type.as_deref()).await?))
}

async fn import_key_pair(
    State(s): State<Service>,
    Tenant(c): Tenant,
    ApiJson(req): ApiJson<ImportKeyPairRequest>,
) -> Result<Json<KeyPair>> {
    Ok(Json(s.import_key_pair(&c, &req.name, &req.public_key).await?))
}

async fn describe_key_pairs(State(s): State<Service>, Tenant(c): Tenant) -> Result<Json<KeyPairList>> {
    Ok(Json(KeyPairList { key_pairs: s.describe_key_pairs(&c, &[]).await? }))
}

async fn delete_key_pair(State(s): State<Service>, Tenant(c): Tenant, Path(name): Path<String>) -> Result<Json<Done>> {
    s.delete_key_pair(&c, &name).await?;
    Ok(Json(Done {}))
}

async fn terminate_instance(State(s): State<Service>, Tenant(c): Tenant, Path(id): Path<String>) -> Result<Json<StateChange>> {
    let mut changes = s.terminate_instances(&c, std::slice::from_ref(&id)).await?;
    changes.pop().map(Json).ok_or(ServiceError::InstanceNotFound(id))
}

async fn describe_hosts(State(s): State<Service>, Operator(_): Operator) -> Result<Json<HostList>> {
    Ok(Json(HostList { hosts: s.describe_hosts().await? }))
}

async fn describe_instance_types(State(s): State<Service>, Authenticated(_): Authenticated) -> Result<Json<InstanceTypeList>> {
    Ok(Json(InstanceTypeList { instance_types: s.describe_instance_types(&[]).await? }))
}

/// Query of `GET /v1/images`: comma-separated lists, as DescribeImages'
/// `ImageId`, `Owner`, `ExecutableBy` and filters (`name` takes `*`/`?`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageListQuery {
    image_id: Option<String>,
    owner: Option<String>,
    executable_by: Option<String>,
    name: Option<String>,
    state: Option<String>,
    is_public: Option<String>,
}

async fn describe_images(
    State(s): State<Service>,
    Authenticated(c): Authenticated,
    ApiQuery(q): ApiQuery<ImageListQuery>,
) -> Result<Json<ImageList>> {
    let filters = [("name", &q.name), ("state", &q.state), ("is-public", &q.is_public)]
        .into_iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, v)| (k.to_string(), split(v)))
        .collect();
    let query = crate::service::images::ImageQuery {
        image_ids: split(&q.image_id),
        owners: split(&q.owner),
        executable_by: split(&q.executable_by),
        filters,
    };
    Ok(Json(ImageList { images: s.describe_images(&c, &query).await? }))
}

async fn describe_image(State(s): State<Service>, Authenticated(c): Authenticated, Path(id): Path<String>) -> Result<Json<Image>> {
    Ok(Json(s.describe_image(&c, &id).await?))
}

async fn deregister_image(State(s): State<Service>, Authenticated(c): Authenticated, Path(id): Path<String>) -> Result<Json<Done>> {
    s.deregister_image(&c, &id).await?;
    Ok(Json(Done {}))
}

async fn create_image(
    State(s): State<Service>,
    Tenant(c): Tenant,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CreateImageRequest>,
) -> Result<Json<Image>> {
    Ok(Json(s.create_image(&c, &id, &req).await?))
}

/// Creates an account and its access key (shown once).
async fn create_account(
    State(s): State<Service>,
    Operator(_): Operator,
    ApiJson(req): ApiJson<CreateAccountRequest>,
) -> Result<Json<NewAccount>> {
    Ok(Json(s.create_account(&req.name).await?))
}

async fn register_image(
    State(s): State<Service>,
    Operator(c): Operator,
    ApiJson(req): ApiJson<RegisterImageRequest>,
) -> Result<Json<Image>> {
    Ok(Json(s.register_image(&c, req).await?))
}

/// Filters of the network listings: `?name=v1,v2` for the names each
/// listing knows (its EC2 filter names, `-` spelled `_`).
#[derive(Debug, Deserialize, Default)]
#[serde(transparent)]
struct NetQuery(std::collections::BTreeMap<String, String>);

fn net_filters(q: &NetQuery, id_key: &str) -> (Vec<String>, crate::service::network::Filters) {
    let mut ids = Vec::new();
    let mut filters = Vec::new();
    for (k, v) in &q.0 {
        let values = split(&Some(v.clone()));
        if k == id_key {
            ids = values;
        } else {
            filters.push((k.replace('_', "-"), values));
        }
    }
    (ids, filters)
}

async fn describe_vpcs(State(s): State<Service>, Tenant(c): Tenant, ApiQuery(q): ApiQuery<NetQuery>) -> Result<Json<VpcList>> {
    let (ids, f) = net_filters(&q, "vpc_id");
    Ok(Json(VpcList { vpcs: s.describe_vpcs(&c, &ids, &f).await? }))
}

async fn create_vpc(State(s): State<Service>, Tenant(c): Tenant, ApiJson(req): ApiJson<CreateVpcRequest>) -> Result<Json<Vpc>> {
    Ok(Json(s.create_vpc(&c, &req.cidr_block).await?))
}

async fn delete_vpc(State(s): State<Service>, Tenant(c): Tenant, Path(id): Path<String>) -> Result<Json<Done>> {
    s.delete_vpc(&c, &id).await?;
    Ok(Json(Done {}))
}

async fn describe_subnets(State(s): State<Service>, Tenant(c): Tenant, ApiQuery(q): ApiQuery<NetQuery>) -> Result<Json<SubnetList>> {
    let (ids, f) = net_filters(&q, "subnet_id");
    Ok(Json(SubnetList { subnets: s.describe_subnets(&c, &ids, &f).await? }))
}

async fn create_subnet(State(s): State<Service>, Tenant(c): Tenant, ApiJson(req): ApiJson<CreateSubnetRequest>) -> Result<Json<Subnet>> {
    Ok(Json(s.create_subnet(&c, &req.vpc_id, &req.cidr_block, req.availability_zone.as_deref()).await?))
}

async fn delete_subnet(State(s): State<Service>, Tenant(c): Tenant, Path(id): Path<String>) -> Result<Json<Done>> {
    s.delete_subnet(&c, &id).await?;
    Ok(Json(Done {}))
}

async fn modify_subnet(
    State(s): State<Service>,
    Tenant(c): Tenant,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ModifySubnetRequest>,
) -> Result<Json<Done>> {
    s.modify_subnet_attribute(&c, &id, req.map_public_ip_on_launch).await?;
    Ok(Json(Done {}))
}

async fn describe_security_groups(
    State(s): State<Service>,
    Tenant(c): Tenant,
    ApiQuery(q): ApiQuery<NetQuery>,
) -> Result<Json<SecurityGroupList>> {
    let (ids, f) = net_filters(&q, "group_id");
    Ok(Json(SecurityGroupList { security_groups: s.describe_security_groups(&c, &ids, &[], &f).await? }))
}

async fn create_security_group(
    State(s): State<Service>,
    Tenant(c): Tenant,
    ApiJson(req): ApiJson<CreateSecurityGroupRequest>,
) -> Result<Json<SecurityGroup>> {
    Ok(Json(s.create_security_group(&c, &req.group_name, &req.description, req.vpc_id.as_deref()).await?))
}

async fn delete_security_group(State(s): State<Service>, Tenant(c): Tenant, Path(id): Path<String>) -> Result<Json<Done>> {
    s.delete_security_group(&c, &crate::service::network::GroupSel::Id(id)).await?;
    Ok(Json(Done {}))
}

fn egress(direction: &str) -> Result<bool> {
    match direction {
        "ingress" => Ok(false),
        "egress" => Ok(true),
        other => Err(ServiceError::RouteNotFound(format!("/v1/security-groups/{{id}}/{other}: use ingress or egress"))),
    }
}

async fn authorize(
    State(s): State<Service>,
    Tenant(c): Tenant,
    Path((id, direction)): Path<(String, String)>,
    ApiJson(req): ApiJson<RulesRequest>,
) -> Result<Json<RuleList>> {
    let rules = s.authorize_security_group(&c, &crate::service::network::GroupSel::Id(id), egress(&direction)?, &req.rules).await?;
    Ok(Json(RuleList { rules }))
}

async fn revoke(
    State(s): State<Service>,
    Tenant(c): Tenant,
    Path((id, direction)): Path<(String, String)>,
    ApiJson(req): ApiJson<RulesRequest>,
) -> Result<Json<Done>> {
    s.revoke_security_group(&c, &crate::service::network::GroupSel::Id(id), egress(&direction)?, &req.rules, &[]).await?;
    Ok(Json(Done {}))
}

async fn describe_addresses(State(s): State<Service>, Tenant(c): Tenant, ApiQuery(q): ApiQuery<NetQuery>) -> Result<Json<AddressList>> {
    let (ids, f) = net_filters(&q, "allocation_id");
    Ok(Json(AddressList { addresses: s.describe_addresses(&c, &[], &ids, &f).await? }))
}

async fn allocate_address(State(s): State<Service>, Tenant(c): Tenant) -> Result<Json<Address>> {
    Ok(Json(s.allocate_address(&c).await?))
}

async fn release_address(State(s): State<Service>, Tenant(c): Tenant, Path(id): Path<String>) -> Result<Json<Done>> {
    s.release_address(&c, Some(&id), None).await?;
    Ok(Json(Done {}))
}

async fn associate_address(
    State(s): State<Service>,
    Tenant(c): Tenant,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<AssociateAddressRequest>,
) -> Result<Json<Association>> {
    let association_id = s.associate_address(&c, Some(&id), None, &req).await?;
    Ok(Json(Association { association_id }))
}

async fn disassociate_address(State(s): State<Service>, Tenant(c): Tenant, Path(id): Path<String>) -> Result<Json<Done>> {
    s.disassociate_address(&c, None, Some(&id), None).await?;
    Ok(Json(Done {}))
}

async fn describe_network_interfaces(
    State(s): State<Service>,
    Tenant(c): Tenant,
    ApiQuery(q): ApiQuery<NetQuery>,
) -> Result<Json<NetworkInterfaceList>> {
    let (ids, f) = net_filters(&q, "network_interface_id");
    Ok(Json(NetworkInterfaceList { network_interfaces: s.describe_network_interfaces(&c, &ids, &f).await? }))
}

async fn delete_network_interface(State(s): State<Service>, Tenant(c): Tenant, Path(id): Path<String>) -> Result<Json<Done>> {
    s.delete_network_interface(&c, &id).await?;
    Ok(Json(Done {}))
}

async fn modify_instance(
    State(s): State<Service>,
    Tenant(c): Tenant,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ModifyInstanceRequest>,
) -> Result<Json<Instance>> {
    s.modify_instance(&c, &id, &req).await?;
    Ok(Json(s.describe_instance(&c, &id).await?))
}
