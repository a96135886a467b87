//! Instance lifecycle states, with EC2's names and numeric codes.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The lifecycle state of an instance, as EC2 names and numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
}

impl InstanceState {
    pub const ALL: [InstanceState; 6] = [
        InstanceState::Pending,
        InstanceState::Running,
        InstanceState::ShuttingDown,
        InstanceState::Terminated,
        InstanceState::Stopping,
        InstanceState::Stopped,
    ];

    /// EC2's numeric state code (the low byte of `instanceState.code`).
    pub fn code(self) -> u16 {
        match self {
            InstanceState::Pending => 0,
            InstanceState::Running => 16,
            InstanceState::ShuttingDown => 32,
            InstanceState::Terminated => 48,
            InstanceState::Stopping => 64,
            InstanceState::Stopped => 80,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
        }
    }

    /// The state an instance moves to when a user asks to terminate it, or
    /// `None` when the request changes nothing (already terminating or gone).
    pub fn on_terminate(self) -> Option<InstanceState> {
        match self {
            InstanceState::Pending | InstanceState::Running | InstanceState::Stopping | InstanceState::Stopped => {
                Some(InstanceState::ShuttingDown)
            }
            InstanceState::ShuttingDown | InstanceState::Terminated => None,
        }
    }

    /// The state a stop request moves the instance to; `Err` when it cannot
    /// be stopped; `Ok(None)` when the request changes nothing.
    pub fn on_stop(self) -> Result<Option<InstanceState>, NotAllowed> {
        match self {
            InstanceState::Pending | InstanceState::Running => Ok(Some(InstanceState::Stopping)),
            InstanceState::Stopping | InstanceState::Stopped => Ok(None),
            InstanceState::ShuttingDown | InstanceState::Terminated => Err(NotAllowed(self)),
        }
    }

    /// The state a start request moves the instance to (see [`Self::on_stop`]).
    pub fn on_start(self) -> Result<Option<InstanceState>, NotAllowed> {
        match self {
            InstanceState::Stopped => Ok(Some(InstanceState::Pending)),
            InstanceState::Pending | InstanceState::Running => Ok(None),
            InstanceState::Stopping | InstanceState::ShuttingDown | InstanceState::Terminated => Err(NotAllowed(self)),
        }
    }

    /// The state that follows an agent's observation, or `None` when the
    /// observation does not move the instance. `desired` is what the user
    /// last asked for.
    pub fn on_observed(self, observed: ObservedState, desired: Desired) -> Option<InstanceState> {
        match (self, observed, desired) {
            (InstanceState::Pending, ObservedState::Running, Desired::Running) => Some(InstanceState::Running),
            (InstanceState::Stopping, ObservedState::Stopped, Desired::Stopped) => Some(InstanceState::Stopped),
            (InstanceState::ShuttingDown, ObservedState::Absent, Desired::Terminated) => Some(InstanceState::Terminated),
            _ => None,
        }
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request the instance's current state does not allow.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("not allowed while the instance is {0}")]
pub struct NotAllowed(pub InstanceState);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown instance state {0:?}; expected one of pending, running, shutting-down, terminated, stopping, stopped")]
pub struct UnknownState(pub String);

impl FromStr for InstanceState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InstanceState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// What the user last asked of an instance (its desired state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Desired {
    Running,
    Stopped,
    Terminated,
}

impl Desired {
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
            Desired::Terminated => "terminated",
        }
    }
}

impl FromStr for Desired {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "running" => Ok(Desired::Running),
            "stopped" => Ok(Desired::Stopped),
            "terminated" => Ok(Desired::Terminated),
            other => Err(UnknownState(other.to_string())),
        }
    }
}

/// What a host agent saw of one instance's guest on its hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObservedState {
    /// Disks or domain are being prepared; not running yet.
    Building,
    /// The domain is running.
    Running,
    /// The domain exists but is shut off.
    Stopped,
    /// No domain and no files remain on the host.
    Absent,
    /// The agent could not build or start the guest; see the report's message.
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_match_ec2() {
        let pairs: Vec<(u16, &str)> = InstanceState::ALL.iter().map(|s| (s.code(), s.as_str())).collect();
        assert_eq!(
            pairs,
            vec![(0, "pending"), (16, "running"), (32, "shutting-down"), (48, "terminated"), (64, "stopping"), (80, "stopped")]
        );
    }

    #[test]
    fn parse_round_trips_and_rejects_unknown() {
        for s in InstanceState::ALL {
            assert_eq!(s.as_str().parse::<InstanceState>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", s.as_str()));
        }
        assert!("Running".parse::<InstanceState>().is_err());
        assert!("".parse::<InstanceState>().is_err());
    }

    #[test]
    fn terminate_transitions() {
        use InstanceState::*;
        assert_eq!(Pending.on_terminate(), Some(ShuttingDown));
        assert_eq!(Running.on_terminate(), Some(ShuttingDown));
        assert_eq!(Stopped.on_terminate(), Some(ShuttingDown));
        assert_eq!(ShuttingDown.on_terminate(), None);
        assert_eq!(Terminated.on_terminate(), None);
    }

    #[test]
    fn observation_transitions() {
        use InstanceState::*;
        assert_eq!(Pending.on_observed(ObservedState::Running, Desired::Running), Some(Running));
        // A guest seen running after the user asked to terminate does not go back to running.
        assert_eq!(ShuttingDown.on_observed(ObservedState::Running, Desired::Terminated), None);
        assert_eq!(Pending.on_observed(ObservedState::Running, Desired::Terminated), None);
        // Only a confirmed absence terminates (and so releases capacity).
        assert_eq!(ShuttingDown.on_observed(ObservedState::Absent, Desired::Terminated), Some(Terminated));
        assert_eq!(ShuttingDown.on_observed(ObservedState::Stopped, Desired::Terminated), None);
        assert_eq!(Running.on_observed(ObservedState::Absent, Desired::Running), None);
        // Stop and start.
        assert_eq!(Stopping.on_observed(ObservedState::Stopped, Desired::Stopped), Some(Stopped));
        assert_eq!(Stopping.on_observed(ObservedState::Running, Desired::Stopped), None);
        assert_eq!(Pending.on_observed(ObservedState::Running, Desired::Running), Some(Running));
        // A stop that arrives after the guest was seen stopped for an older request does not start it.
        assert_eq!(Pending.on_observed(ObservedState::Stopped, Desired::Running), None);
    }

    #[test]
    fn stop_and_start_requests() {
        use InstanceState::*;
        assert_eq!(Running.on_stop(), Ok(Some(Stopping)));
        assert_eq!(Pending.on_stop(), Ok(Some(Stopping)));
        assert_eq!(Stopped.on_stop(), Ok(None));
        assert!(Terminated.on_stop().is_err());
        assert_eq!(Stopped.on_start(), Ok(Some(Pending)));
        assert_eq!(Running.on_start(), Ok(None));
        assert!(Stopping.on_start().is_err());
        assert!(ShuttingDown.on_start().is_err());
    }
}
