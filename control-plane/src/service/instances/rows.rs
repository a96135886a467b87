//! An instance row as the API reads it, and its state as stored.

use crate::error::{Result, ServiceError};
use nimbus_proto::api::Instance;
use nimbus_proto::InstanceState;

#[derive(sqlx::FromRow)]
pub(crate) struct InstanceRow {
    pub id: String,
    pub seq: i64,
    pub reservation_id: String,
    pub ami_launch_index: i32,
    pub image_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub launch_time: chrono::DateTime<chrono::Utc>,
    pub key_name: Option<String>,
    pub ssh_endpoint: Option<String>,
    #[sqlx(flatten)]
    pub metadata: crate::service::metadata_options::Options,
}

pub(super) const INSTANCE_COLUMNS: &str = "id, seq, reservation_id, ami_launch_index, image_id, instance_type, \
     availability_zone, state, state_reason, launch_time, key_name, ssh_endpoint, \
     metadata_tokens_required, metadata_endpoint_enabled, metadata_tags_enabled, metadata_hop_limit";

pub(crate) fn parse_state(s: &str) -> Result<InstanceState> {
    s.parse().map_err(|e| ServiceError::Internal(format!("bad state in database: {e}")))
}

impl InstanceRow {
    pub(super) fn into_api(self) -> Result<Instance> {
        Ok(Instance {
            metadata_options: Some(self.metadata.to_api("applied")),
            state: parse_state(&self.state)?.into(),
            instance_id: self.id,
            reservation_id: self.reservation_id,
            image_id: self.image_id,
            instance_type: self.instance_type,
            availability_zone: self.availability_zone,
            launch_time: self.launch_time,
            ami_launch_index: self.ami_launch_index as u32,
            state_reason: self.state_reason,
            key_name: self.key_name,
            tags: Vec::new(),
            private_ip_address: None,
            private_dns_name: None,
            public_ip_address: None,
            vpc_id: None,
            subnet_id: None,
            security_groups: Vec::new(),
            network_interfaces: Vec::new(),
            // Only while the guest runs (a stopped guest's port is not listened on).
            ssh_endpoint: self.ssh_endpoint.filter(|_| self.state == "running"),
        })
    }
}
