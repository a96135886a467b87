//! Changes of instances' states asked by their owner: TerminateInstances,
//! StopInstances, StartInstances, RebootInstances. All or nothing (every
//! id must be a visible instance of the caller), idempotent (terminating a
//! terminating instance reports its state and changes nothing), in one
//! transaction that locks the instances (by id), then bumps their hosts
//! and notifies them; the agents carry the change out and report.

use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::visibility::instance_visible;
use crate::service::{Caller, Service};
use nimbus_proto::api::StateChange;
use nimbus_proto::InstanceState;
use std::collections::BTreeSet;

use super::describe::MAX_PAGE;
use super::rows::parse_state;

impl Service {
    /// Asks for the instances to go away. Idempotent: terminating a
    /// terminating or terminated instance reports its state and changes
    /// nothing. Either every id is known to the caller or nothing changes.
    pub async fn terminate_instances(&self, caller: &Caller, instance_ids: &[String]) -> Result<Vec<StateChange>> {
        self.change_instances(caller, instance_ids, Op::Terminate).await
    }

    /// Stops the guests (ACPI shutdown, then hard stop after a timeout); their
    /// disks stay, and so does their place on the host.
    pub async fn stop_instances(&self, caller: &Caller, instance_ids: &[String]) -> Result<Vec<StateChange>> {
        self.change_instances(caller, instance_ids, Op::Stop).await
    }

    pub async fn start_instances(&self, caller: &Caller, instance_ids: &[String]) -> Result<Vec<StateChange>> {
        self.change_instances(caller, instance_ids, Op::Start).await
    }

    /// Asks the agents to reboot the guests (once per call).
    pub async fn reboot_instances(&self, caller: &Caller, instance_ids: &[String]) -> Result<()> {
        self.change_instances(caller, instance_ids, Op::Reboot).await.map(|_| ())
    }

    async fn change_instances(&self, caller: &Caller, instance_ids: &[String], op: Op) -> Result<Vec<StateChange>> {
        if instance_ids.is_empty() {
            return Err(ServiceError::MissingParameter("instance_ids".into()));
        }
        if instance_ids.len() > MAX_PAGE as usize {
            return Err(ServiceError::InvalidParameterValue(format!("at most {MAX_PAGE} instance ids per call")));
        }
        for id in instance_ids {
            if !ids::is_valid(ids::INSTANCE, id) {
                return Err(ServiceError::InstanceIdMalformed(id.clone()));
            }
        }
        let unique: Vec<String> = instance_ids.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        crate::service::retrying(|| self.try_change(caller, &unique, op)).await
    }

    async fn try_change(&self, caller: &Caller, ids: &[String], op: Op) -> Result<Vec<StateChange>> {
        let mut tx = self.db.begin().await?;
        // Lock order everywhere: instances (by id), then hosts (by id).
        let rows: Vec<(String, String, String)> = sqlx::query_as(&format!(
            "SELECT id, state, host_id FROM instances WHERE account_id = $1 AND id = ANY($2) AND {visible} ORDER BY id FOR UPDATE",
            visible = instance_visible()
        ))
        .bind(&caller.account_id)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        if let Some(missing) = ids.iter().find(|id| !rows.iter().any(|r| &r.0 == *id)) {
            return Err(ServiceError::InstanceNotFound(missing.clone()));
        }
        let mut changes = Vec::with_capacity(rows.len());
        let mut changed: Vec<String> = Vec::new();
        let mut hosts: BTreeSet<String> = BTreeSet::new();
        for (id, state, host) in rows {
            let prev = parse_state(&state)?;
            let next = op.next(prev).map_err(|_| {
                ServiceError::IncorrectInstanceState(format!("The instance '{id}' is not in a state from which it can be {}", op.verb()))
            })?;
            let current = match next {
                Some(next) => {
                    changed.push(id.clone());
                    hosts.insert(host);
                    next
                }
                None => prev,
            };
            changes.push(StateChange { instance_id: id, previous_state: prev.into(), current_state: current.into() });
        }
        if !changed.is_empty() {
            let hosts: Vec<String> = hosts.into_iter().collect();
            let reboot = op == Op::Reboot;
            let (state, desired) = op.target();
            sqlx::query(
                "WITH h AS (SELECT id FROM hosts WHERE id = ANY($2) ORDER BY id FOR UPDATE), \
                      bumped AS (UPDATE hosts SET generation = generation + 1 FROM h WHERE hosts.id = h.id \
                                 RETURNING hosts.id, hosts.generation) \
                 UPDATE instances SET state = coalesce($3, state), desired_state = coalesce($4, desired_state), \
                        reboots = reboots + $5, state_reason = CASE WHEN $5 = 0 THEN NULL ELSE state_reason END, \
                        state_changed_at = CASE WHEN $5 = 0 THEN now() ELSE state_changed_at END, \
                        changed_generation = bumped.generation \
                 FROM bumped WHERE instances.host_id = bumped.id AND instances.id = ANY($1)",
            )
            .bind(&changed)
            .bind(&hosts)
            .bind(state.map(|s| s.as_str()))
            .bind(desired.map(|d| d.as_str()))
            .bind(i64::from(reboot))
            .execute(&mut *tx)
            .await?;
            sqlx::query("SELECT pg_notify($1, h) FROM unnest($2::text[]) AS h")
                .bind(crate::notify::CHANNEL)
                .bind(&hosts)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        // Answer in the order the caller asked.
        changes.sort_by_key(|c| ids.iter().position(|i| *i == c.instance_id));
        Ok(changes)
    }
}

/// A user's request to change instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Terminate,
    Stop,
    Start,
    Reboot,
}

impl Op {
    /// The state after the request; `Ok(None)`: no change; `Err`: not allowed.
    fn next(self, s: InstanceState) -> Result<Option<InstanceState>, nimbus_proto::state::NotAllowed> {
        match self {
            Op::Terminate => Ok(s.on_terminate()),
            Op::Stop => s.on_stop(),
            Op::Start => s.on_start(),
            // A reboot changes no state, but must reach the agent.
            Op::Reboot => match s {
                InstanceState::Running | InstanceState::Pending => Ok(Some(s)),
                _ => Err(nimbus_proto::state::NotAllowed(s)),
            },
        }
    }

    /// The state and desired state every changed instance gets (`None`: kept).
    fn target(self) -> (Option<InstanceState>, Option<nimbus_proto::Desired>) {
        use nimbus_proto::Desired;
        match self {
            Op::Terminate => (Some(InstanceState::ShuttingDown), Some(Desired::Terminated)),
            Op::Stop => (Some(InstanceState::Stopping), Some(Desired::Stopped)),
            Op::Start => (Some(InstanceState::Pending), Some(Desired::Running)),
            Op::Reboot => (None, None),
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Op::Terminate => "terminated",
            Op::Stop => "stopped",
            Op::Start => "started",
            Op::Reboot => "rebooted",
        }
    }
}
