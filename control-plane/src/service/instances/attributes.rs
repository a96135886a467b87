//! Instance attributes: DescribeInstanceAttribute (EC2's attribute names,
//! most of them constant in Nimbus) and ModifyInstanceAttribute (a stopped
//! instance's type, its host's capacity and the account's vCPUs claimed
//! for the difference or the change refused; the groups of its primary
//! interface, see `network`).

use super::rows::parse_state;
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::visibility::instance_visible;
use crate::service::{Caller, Service};
use base64::Engine;
use nimbus_proto::InstanceState;

/// The value of one instance attribute (DescribeInstanceAttribute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeValue {
    Text(String),
    Bool(bool),
    /// No value (an empty element).
    Empty,
    Groups(Vec<nimbus_proto::api::GroupRef>),
}

impl Service {
    /// One attribute of an instance, by EC2's name: `instanceType`,
    /// `userData`, `groupSet`, `disableApiTermination`, `disableApiStop`,
    /// `instanceInitiatedShutdownBehavior`, `rootDeviceName`,
    /// `sourceDestCheck`, `ebsOptimized`, `enaSupport`, `kernel`, `ramdisk`,
    /// `blockDeviceMapping`, `productCodes`.
    pub async fn describe_instance_attribute(&self, caller: &Caller, instance_id: &str, attribute: &str) -> Result<AttributeValue> {
        let i = self.describe_instance(caller, instance_id).await?;
        Ok(match attribute {
            "instanceType" => AttributeValue::Text(i.instance_type),
            "userData" => {
                let (data,): (Option<Vec<u8>>,) = sqlx::query_as("SELECT user_data FROM instances WHERE id = $1 AND account_id = $2")
                    .bind(instance_id)
                    .bind(&caller.account_id)
                    .fetch_one(&self.db)
                    .await?;
                match data {
                    Some(d) => AttributeValue::Text(base64::engine::general_purpose::STANDARD.encode(d)),
                    None => AttributeValue::Empty,
                }
            }
            "groupSet" => AttributeValue::Groups(i.security_groups),
            "disableApiTermination" | "disableApiStop" | "ebsOptimized" | "enaSupport" => AttributeValue::Bool(false),
            "sourceDestCheck" => AttributeValue::Bool(true),
            "instanceInitiatedShutdownBehavior" => AttributeValue::Text("stop".into()),
            "rootDeviceName" => AttributeValue::Text("/dev/vda".into()),
            "kernel" | "ramdisk" | "blockDeviceMapping" | "productCodes" => AttributeValue::Empty,
            other => {
                return Err(ServiceError::InvalidParameterValue(format!(
                    "Value ({other}) for parameter attribute is invalid. Unknown attribute."
                )))
            }
        })
    }

    /// Changes a stopped instance's type (its host keeps room for it: the
    /// difference is claimed on the host atomically, or the change is
    /// refused) and/or its primary interface's security groups.
    pub async fn modify_instance(&self, caller: &Caller, instance_id: &str, req: &nimbus_proto::api::ModifyInstanceRequest) -> Result<()> {
        if !ids::is_valid(ids::INSTANCE, instance_id) {
            return Err(ServiceError::InstanceIdMalformed(instance_id.to_string()));
        }
        if req.instance_type.is_none() && req.security_group_ids.is_none() {
            return Err(ServiceError::MissingParameter("an attribute to modify".into()));
        }
        let itype = match &req.instance_type {
            Some(t) => Some(self.instance_type(t).await?),
            None => None,
        };
        let itype = &itype;
        crate::service::retrying(|| async move {
            let mut tx = self.db.begin().await?;
            let (_, limits, usage) = self.limits_and_usage(&mut tx, &caller.account_id).await?;
            let over_limit = || {
                ServiceError::VcpuLimitExceeded(format!(
                    "You have requested more vCPU capacity than your current vCPU limit of {} allows ({} in use)",
                    limits.max_vcpus, usage.vcpus
                ))
            };
            type Row = (String, String, i32, i64, i64, String);
            let row: Option<Row> = sqlx::query_as(&format!(
                "SELECT state, instance_type, vcpus, memory_mib, disk_gib, host_id FROM instances \
                 WHERE id = $1 AND account_id = $2 AND {visible} FOR UPDATE",
                visible = instance_visible()
            ))
            .bind(instance_id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
            let (state, old_type, vcpus, memory, disk, host) = row.ok_or_else(|| ServiceError::InstanceNotFound(instance_id.to_string()))?;
            let state = parse_state(&state)?;
            if matches!(state, InstanceState::Terminated | InstanceState::ShuttingDown) {
                return Err(ServiceError::IncorrectInstanceState(format!("The instance '{instance_id}' is not in a state from which it can be modified")));
            }
            // Groups before the host's capacity: lock order (groups, then hosts).
            if let Some(groups) = &req.security_group_ids {
                self.set_instance_groups(&mut tx, caller, instance_id, groups).await?;
            }
            if let Some(t) = itype.as_ref().filter(|t| t.name != old_type) {
                if state != InstanceState::Stopped {
                    return Err(ServiceError::IncorrectInstanceState(format!("The instance '{instance_id}' is not in the 'stopped' state.")));
                }
                let delta = (i64::from(t.vcpus) - i64::from(vcpus), t.memory_mib as i64 - memory, t.disk_gib as i64 - disk);
                if delta.0 > 0 && i64::from(usage.vcpus) + delta.0 > i64::from(limits.max_vcpus) {
                    return Err(over_limit());
                }
                let claimed: Option<(i64,)> = sqlx::query_as(
                    "UPDATE hosts SET used_vcpus = used_vcpus + $2, used_memory_mib = used_memory_mib + $3, \
                            used_disk_gib = used_disk_gib + $4, generation = generation + 1 \
                     WHERE id = $1 AND used_vcpus + $2 <= total_vcpus AND used_memory_mib + $3 <= total_memory_mib \
                           AND used_disk_gib + $4 <= total_disk_gib RETURNING generation",
                )
                .bind(&host)
                .bind(delta.0 as i32)
                .bind(delta.1)
                .bind(delta.2)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((generation,)) = claimed else {
                    return Err(ServiceError::InsufficientInstanceCapacity(format!(
                        "There is not enough capacity on the instance's host for type {}; the instance keeps type {old_type}",
                        t.name
                    )));
                };
                sqlx::query(
                    "UPDATE instances SET instance_type = $2, vcpus = $3, memory_mib = $4, disk_gib = $5, changed_generation = $6 WHERE id = $1",
                )
                .bind(instance_id)
                .bind(&t.name)
                .bind(t.vcpus as i32)
                .bind(t.memory_mib as i64)
                .bind(t.disk_gib as i64)
                .bind(generation)
                .execute(&mut *tx)
                .await?;
                sqlx::query("SELECT pg_notify($1, $2)").bind(crate::notify::CHANNEL).bind(&host).execute(&mut *tx).await?;
                // The account's vCPUs, checked again as the transaction commits.
                crate::service::accounts::claim_usage(&mut tx, &caller.account_id, Some(limits), 0, delta.0).await?;
            }
            match tx.commit().await.map_err(ServiceError::from) {
                Err(e) if crate::service::accounts::is_over_limit(&e) => return Err(over_limit()),
                other => other?,
            }
            Ok::<_, ServiceError>(())
        })
        .await
    }
}
