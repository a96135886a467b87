//! The EC2 actions Nimbus answers, parsed once from `Action=`, and the one
//! rule for `DryRun=true`.
//!
//! Every action is a row of the table below: its name (the enum variant,
//! which is also its wire name), the module that serves it, and what a
//! DryRun checks before it answers `DryRunOperation`:
//! - `Nothing`: reads and creations that name no existing resource; the
//!   caller being authenticated is all EC2 checks.
//! - `Launch`: RunInstances checks the whole launch as it would run it
//!   (image, key pair, network, quotas), without placing anything.
//! - `Targets(params)`: each resource named by one of these parameters
//!   (single, or listed `Name.N`) must exist and be the caller's, as the
//!   action itself would require; another account's resource answers as a
//!   missing one.
//!
//! The action's handler decodes its parameters first (so a DryRun with a bad
//! parameter gets that parameter's error) and then calls
//! [`DryRun::check`] or [`DryRun::check_launch`] before doing anything.

use super::params::Params;
use crate::error::ServiceError;
use crate::service::{Caller, Service};
use nimbus_proto::api::RunInstancesRequest;
use std::str::FromStr;

/// Which module of the EC2 door serves an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// `mod.rs`: instances, tags, key pairs, images, account and zones.
    Compute,
    /// `vpc.rs`: VPCs, subnets, groups, addresses, interfaces, instance attributes and status.
    Vpc,
}

/// What a DryRun of an action checks (module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DryRunRule {
    Nothing,
    Launch,
    Targets(&'static [&'static str]),
}

macro_rules! actions {
    ($($name:ident: $door:ident, $rule:expr;)*) => {
        /// An EC2 action Nimbus answers (its wire name is the variant's).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Action { $($name),* }

        impl Action {
            /// Every action, in the table's order.
            pub const ALL: &'static [Action] = &[$(Action::$name),*];

            /// The action's wire name (`Action=`).
            pub fn name(self) -> &'static str {
                match self { $(Action::$name => stringify!($name)),* }
            }

            /// The module that serves it.
            pub fn door(self) -> Door {
                match self { $(Action::$name => Door::$door),* }
            }

            /// What its DryRun checks.
            pub fn dry_run_rule(self) -> DryRunRule {
                use DryRunRule::*;
                match self { $(Action::$name => $rule),* }
            }
        }
    };
}

actions! {
    RunInstances: Compute, Launch;
    DescribeInstances: Compute, Nothing;
    TerminateInstances: Compute, Targets(&["InstanceId"]);
    StopInstances: Compute, Targets(&["InstanceId"]);
    StartInstances: Compute, Targets(&["InstanceId"]);
    RebootInstances: Compute, Targets(&["InstanceId"]);
    ModifyInstanceMetadataOptions: Compute, Targets(&["InstanceId"]);
    GetConsoleOutput: Compute, Targets(&["InstanceId"]);
    CreateTags: Compute, Targets(&["ResourceId"]);
    DeleteTags: Compute, Targets(&["ResourceId"]);
    DescribeTags: Compute, Nothing;
    CreateKeyPair: Compute, Nothing;
    ImportKeyPair: Compute, Nothing;
    DescribeKeyPairs: Compute, Nothing;
    // EC2 answers a deletion of a missing key pair with success: nothing to check.
    DeleteKeyPair: Compute, Nothing;
    DescribeImages: Compute, Nothing;
    CreateImage: Compute, Targets(&["InstanceId"]);
    DeregisterImage: Compute, Targets(&["ImageId"]);
    DescribeInstanceTypes: Compute, Nothing;
    DescribeAccountAttributes: Compute, Nothing;
    DescribeAvailabilityZones: Compute, Nothing;
    CreateVpc: Vpc, Nothing;
    DeleteVpc: Vpc, Targets(&["VpcId"]);
    DescribeVpcs: Vpc, Nothing;
    CreateSubnet: Vpc, Targets(&["VpcId"]);
    DeleteSubnet: Vpc, Targets(&["SubnetId"]);
    DescribeSubnets: Vpc, Nothing;
    ModifySubnetAttribute: Vpc, Targets(&["SubnetId"]);
    CreateSecurityGroup: Vpc, Targets(&["VpcId"]);
    DeleteSecurityGroup: Vpc, Targets(&["GroupId"]);
    DescribeSecurityGroups: Vpc, Nothing;
    AuthorizeSecurityGroupIngress: Vpc, Targets(&["GroupId"]);
    AuthorizeSecurityGroupEgress: Vpc, Targets(&["GroupId"]);
    RevokeSecurityGroupIngress: Vpc, Targets(&["GroupId"]);
    RevokeSecurityGroupEgress: Vpc, Targets(&["GroupId"]);
    DescribeSecurityGroupRules: Vpc, Nothing;
    AllocateAddress: Vpc, Nothing;
    AssociateAddress: Vpc, Targets(&["AllocationId", "InstanceId", "NetworkInterfaceId"]);
    DisassociateAddress: Vpc, Nothing;
    ReleaseAddress: Vpc, Targets(&["AllocationId"]);
    DescribeAddresses: Vpc, Nothing;
    DescribeNetworkInterfaces: Vpc, Nothing;
    DeleteNetworkInterface: Vpc, Targets(&["NetworkInterfaceId"]);
    DescribeInstanceStatus: Vpc, Nothing;
    DescribeInstanceAttribute: Vpc, Targets(&["InstanceId"]);
    ModifyInstanceAttribute: Vpc, Targets(&["InstanceId", "GroupId"]);
}

impl FromStr for Action {
    type Err = ServiceError;

    fn from_str(name: &str) -> Result<Action, ServiceError> {
        Action::ALL.iter().copied().find(|a| a.name() == name).ok_or_else(|| ServiceError::InvalidAction(name.to_string()))
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The DryRun decision of one request: built once per request, used by
/// the action's handler after it decoded its parameters.
pub struct DryRun<'a> {
    pub on: bool,
    pub action: Action,
    pub service: &'a Service,
    pub caller: &'a Caller,
    pub params: &'a Params,
}

impl DryRun<'_> {
    /// For any action but RunInstances: when this is a DryRun, checks what
    /// the action's rule names and answers `DryRunOperation` (an `Err`, as
    /// EC2 does); otherwise lets the action run.
    pub async fn check(&self) -> Result<(), ServiceError> {
        if !self.on {
            return Ok(());
        }
        match self.action.dry_run_rule() {
            DryRunRule::Nothing => {}
            DryRunRule::Targets(names) => {
                let mut ids = Vec::new();
                for name in names {
                    ids.extend(self.params.get(name).map(str::to_string));
                    ids.extend(self.params.list(name)?);
                }
                if !ids.is_empty() {
                    self.service.check_resources(self.caller, &ids).await?;
                }
            }
            DryRunRule::Launch => {
                return Err(ServiceError::Internal(format!("{} checks its DryRun with check_launch", self.action.name())))
            }
        }
        Err(ServiceError::DryRunOperation)
    }

    /// RunInstances: when this is a DryRun, checks the launch as it would
    /// run and answers `DryRunOperation`.
    pub async fn check_launch(&self, req: &RunInstancesRequest) -> Result<(), ServiceError> {
        if !self.on {
            return Ok(());
        }
        self.service.check_run_instances(self.caller, req).await?;
        Err(ServiceError::DryRunOperation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_parses_from_its_name_and_nothing_else_does() {
        for a in Action::ALL {
            assert_eq!(a.name().parse::<Action>().ok(), Some(*a));
        }
        assert_eq!(Action::ALL.len(), std::collections::HashSet::<_>::from_iter(Action::ALL).len());
        for bad in ["", "runinstances", "RunInstances ", "DescribeVolumes"] {
            assert!(matches!(bad.parse::<Action>(), Err(ServiceError::InvalidAction(_))), "{bad:?}");
        }
    }

    #[test]
    fn only_run_instances_checks_a_launch() {
        for a in Action::ALL {
            assert_eq!(a.dry_run_rule() == DryRunRule::Launch, *a == Action::RunInstances, "{a:?}");
        }
    }
}
