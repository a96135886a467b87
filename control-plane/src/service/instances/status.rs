//! What is observed of instances: DescribeInstanceStatus (EC2's status
//! checks: for a running instance, what its host last wrote to the state
//! store, `ok` without a record, `insufficient-data` when the store could
//! not be read, `initializing` while pending) and GetConsoleOutput (the
//! newer of the tail in the state store and the one a host reported).

use super::describe::InstanceFilter;
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::observed::Observed;
use crate::service::visibility::instance_visible;
use crate::service::{Caller, Service};
use base64::Engine;
use nimbus_proto::api::Instance;
use nimbus_proto::InstanceState;

impl Service {
    /// DescribeInstanceStatus: the instances the filter selects, each with
    /// its status checks (for running ones, what their hosts last wrote to
    /// the state store; see [`status_checks`]).
    pub async fn describe_instance_status(&self, caller: &Caller, filter: InstanceFilter) -> Result<InstanceStatusList> {
        let list = self.describe_instances(caller, filter).await?;
        let running: Vec<String> =
            list.instances.iter().filter(|i| i.state.name == InstanceState::Running).map(|i| i.instance_id.clone()).collect();
        let observed = self.stored_status(&running).await;
        let statuses = list
            .instances
            .into_iter()
            .map(|instance| {
                let checks = status_checks(instance.state.name, observed.get(&instance.instance_id).unwrap_or(&Observed::Unread));
                InstanceStatus { instance, checks }
            })
            .collect();
        Ok(InstanceStatusList { statuses, next_token: list.next_token })
    }

    /// The tail of the guest's serial console as its host last wrote it to
    /// the state store (or, from a host without a store node, reported it).
    pub async fn console_output(&self, caller: &Caller, instance_id: &str) -> Result<ConsoleOutput> {
        if !ids::is_valid(ids::INSTANCE, instance_id) {
            return Err(ServiceError::InstanceIdMalformed(instance_id.to_string()));
        }
        type Row = (Option<Vec<u8>>, Option<chrono::DateTime<chrono::Utc>>);
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT console_output, console_updated_at FROM instances WHERE account_id = $1 AND id = $2 AND {visible}",
            visible = instance_visible()
        ))
        .bind(&caller.account_id)
        .bind(instance_id)
        .fetch_optional(&self.db)
        .await?;
        let (output, at) = row.ok_or_else(|| ServiceError::InstanceNotFound(instance_id.to_string()))?;
        // The newer of the two: a host writes its tails to the store, or,
        // without a store node (or while the store refused), reports them.
        if let Some(rec) = self.stored_console(instance_id).await {
            if let Ok(stored) = base64::engine::general_purpose::STANDARD.decode(&rec.output) {
                if at.is_none_or(|reported| rec.at >= reported) {
                    return Ok(ConsoleOutput { instance_id: instance_id.to_string(), output: stored, timestamp: Some(rec.at) });
                }
            }
        }
        Ok(ConsoleOutput { instance_id: instance_id.to_string(), output: output.unwrap_or_default(), timestamp: at })
    }
}

/// An instance and its status checks (DescribeInstanceStatus).
#[derive(Debug, Clone)]
pub struct InstanceStatus {
    pub instance: Instance,
    /// (system, instance) checks as (status, reachability detail).
    pub checks: [(&'static str, &'static str); 2],
}

#[derive(Debug, Clone)]
pub struct InstanceStatusList {
    pub statuses: Vec<InstanceStatus>,
    pub next_token: Option<String>,
}

/// EC2's status checks of an instance in `state` (DescribeInstanceStatus):
/// (system, instance) as (status, reachability detail). For a running
/// instance, what its host wrote to the state store; without a record (a
/// host that runs no store node), `ok` as the host reported it running;
/// when the store could not be read, `insufficient-data`; `initializing`
/// while pending.
pub fn status_checks(state: InstanceState, observed: &Observed<nimbus_proto::metadata::StatusRecord>) -> [(&'static str, &'static str); 2] {
    use nimbus_proto::metadata::Check;
    let of = |c: Check| match c {
        Check::Passed => ("ok", "passed"),
        Check::Failed => ("impaired", "failed"),
        Check::Initializing => ("initializing", "initializing"),
    };
    match (state, observed) {
        (InstanceState::Running, Observed::Found(r)) => [of(r.system), of(r.instance)],
        (InstanceState::Running, Observed::Absent) => [("ok", "passed"); 2],
        (InstanceState::Running, Observed::Unread) => [("insufficient-data", "insufficient-data"); 2],
        (InstanceState::Pending, _) => [("initializing", "initializing"); 2],
        _ => [("not-applicable", "not-applicable"); 2],
    }
}

/// See [`Service::console_output`].
#[derive(Debug, Clone)]
pub struct ConsoleOutput {
    pub instance_id: String,
    pub output: Vec<u8>,
    pub timestamp: Option<chrono::DateTime<chrono::Utc>>,
}
