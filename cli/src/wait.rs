//! `--wait`: poll the instances until they reach a state, with a spinner.

use crate::client::{Client, InstanceQuery, Response};
use crate::error::CliError;
use indicatif::{ProgressBar, ProgressStyle};
use nimbus_proto::api::{Instance, InstanceList};
use nimbus_proto::InstanceState;
use serde_json::Value;
use std::time::{Duration, Instant};

pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    Running,
    Terminated,
}

impl Goal {
    fn state(self) -> InstanceState {
        match self {
            Goal::Running => InstanceState::Running,
            Goal::Terminated => InstanceState::Terminated,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every instance is in the goal state.
    Done,
    /// Not yet; the summary counts instances by state.
    Waiting(String),
    /// Some instance can no longer reach the goal.
    Failed(String),
}

/// "2 running, 1 pending" (in lifecycle order; `gone` counts missing instances).
pub fn summary(ids: &[String], instances: &[Instance]) -> String {
    let mut parts = Vec::new();
    for st in InstanceState::ALL {
        let n = ids.iter().filter(|id| find(instances, id).is_some_and(|i| i.state.name == st)).count();
        if n > 0 {
            parts.push(format!("{n} {st}"));
        }
    }
    let gone = ids.iter().filter(|id| find(instances, id).is_none()).count();
    if gone > 0 {
        parts.push(format!("{gone} gone"));
    }
    parts.join(", ")
}

fn find<'a>(instances: &'a [Instance], id: &str) -> Option<&'a Instance> {
    instances.iter().find(|i| i.instance_id == id)
}

/// Where the instances `ids` stand with respect to `goal`. For `Running`, an
/// instance that is shutting down, terminated or stopped has failed; for
/// `Terminated`, an instance no longer listed counts as terminated.
pub fn assess(goal: Goal, ids: &[String], instances: &[Instance]) -> Verdict {
    for id in ids {
        match (goal, find(instances, id)) {
            (Goal::Running, None) => return Verdict::Failed(format!("instance {id} is no longer listed")),
            (Goal::Running, Some(i)) if !matches!(i.state.name, InstanceState::Pending | InstanceState::Running) => {
                let reason = i.state_reason.as_deref().unwrap_or("no reason given");
                return Verdict::Failed(format!("instance {id} is {} instead of running: {reason}", i.state.name));
            }
            _ => {}
        }
    }
    let done = ids.iter().all(|id| match find(instances, id) {
        Some(i) => i.state.name == goal.state(),
        None => goal == Goal::Terminated,
    });
    if done {
        Verdict::Done
    } else {
        Verdict::Waiting(summary(ids, instances))
    }
}

/// The current descriptions of `ids`. For a termination wait, an instance the
/// API no longer knows is reported missing rather than as an error.
async fn poll(client: &Client, ids: &[String], goal: Goal) -> Result<Response<InstanceList>, CliError> {
    let q = InstanceQuery::ids(ids);
    match client.describe_instances_all(&q).await {
        Err(e) if goal == Goal::Terminated && e.api_code() == Some("InvalidInstanceID.NotFound") => {
            let (mut instances, mut raws) = (Vec::new(), Vec::new());
            for id in ids {
                match client.describe_instance(id).await {
                    Ok(r) => {
                        instances.push(r.body);
                        raws.push(r.raw);
                    }
                    Err(e) if e.api_code() == Some("InvalidInstanceID.NotFound") => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(Response { body: InstanceList { instances, next_token: None }, raw: serde_json::json!({ "instances": raws }) })
        }
        r => r,
    }
}

fn spinner() -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Polls until every instance of `ids` reaches `goal`; returns the last
/// descriptions. Transient failures (connection, 5xx) are retried until the
/// timeout; other API errors end the wait.
pub async fn wait_for(client: &Client, ids: &[String], goal: Goal, timeout: Duration) -> Result<Response<InstanceList>, CliError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let what = format!("{} instance(s) to be {}", ids.len(), goal.state());
    let pb = spinner();
    pb.set_message(format!("waiting for {what}"));
    let mut last = String::from("no answer yet");
    let result = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, poll(client, ids, goal)).await {
            Err(_elapsed) => {}
            Ok(Ok(resp)) => match assess(goal, ids, &resp.body.instances) {
                Verdict::Done => break Ok(resp),
                Verdict::Failed(msg) => break Err(CliError::WaitFailed(msg)),
                Verdict::Waiting(s) => last = s,
            },
            Ok(Err(e)) if e.is_transient() => last = format!("retrying: {e}"),
            Ok(Err(e)) => break Err(e),
        }
        pb.set_message(format!("waiting for {what}: {last}"));
        let now = Instant::now();
        if now >= deadline {
            break Err(CliError::WaitTimeout { secs: timeout.as_secs(), what: format!("{what} (last: {last})") });
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    };
    pb.finish_and_clear();
    result
}

/// The raw description of `id` in a poll result, if listed.
pub fn raw_instance<'a>(raw: &'a Value, id: &str) -> Option<&'a Value> {
    raw.get("instances")?.as_array()?.iter().find(|v| v.get("instance_id").and_then(Value::as_str) == Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::tests::sample_instance;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn running_goal() {
        let ids = ids(&["i-1", "i-2"]);
        let a = sample_instance("i-1", InstanceState::Running);
        let b = sample_instance("i-2", InstanceState::Pending);
        assert_eq!(assess(Goal::Running, &ids, &[a.clone(), b.clone()]), Verdict::Waiting("1 pending, 1 running".into()));
        let b_up = sample_instance("i-2", InstanceState::Running);
        assert_eq!(assess(Goal::Running, &ids, &[a.clone(), b_up]), Verdict::Done);
        let mut b_dead = sample_instance("i-2", InstanceState::ShuttingDown);
        b_dead.state_reason = Some("Server.InternalError: qemu died".into());
        let Verdict::Failed(msg) = assess(Goal::Running, &ids, &[a.clone(), b_dead]) else { panic!() };
        assert_eq!(msg, "instance i-2 is shutting-down instead of running: Server.InternalError: qemu died");
        assert!(matches!(assess(Goal::Running, &ids, &[a]), Verdict::Failed(_)));
    }

    #[test]
    fn terminated_goal_counts_missing_as_gone() {
        let ids = ids(&["i-1", "i-2"]);
        let a = sample_instance("i-1", InstanceState::Terminated);
        let b = sample_instance("i-2", InstanceState::ShuttingDown);
        assert_eq!(assess(Goal::Terminated, &ids, &[a.clone(), b]), Verdict::Waiting("1 shutting-down, 1 terminated".into()));
        assert_eq!(assess(Goal::Terminated, &ids, std::slice::from_ref(&a)), Verdict::Done);
        assert_eq!(summary(&ids, &[a]), "1 terminated, 1 gone");
    }

    #[test]
    fn raw_instance_lookup() {
        let raw = serde_json::json!({"instances": [{"instance_id": "i-1", "x": 1}]});
        assert_eq!(raw_instance(&raw, "i-1").unwrap()["x"], 1);
        assert!(raw_instance(&raw, "i-2").is_none());
    }
}
