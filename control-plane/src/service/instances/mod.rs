//! Instances: how a row becomes the API's `Instance` (with its tags and
//! interfaces) in [`rows`], DescribeInstances and reservations in
//! [`describe`]; and by job: [`state`] (terminate, stop, start, reboot), [`status`] (status
//! checks, console output), [`attributes`] (DescribeInstanceAttribute,
//! ModifyInstanceAttribute). A launch is `service::launch`. Which instances
//! the API still shows is `service::visibility`'s rule.

mod attributes;
mod describe;
mod rows;
mod state;
mod status;

pub use super::visibility::TERMINATED_VISIBLE_FOR;
pub use attributes::AttributeValue;
pub use describe::{InstanceFilter, TagFilter, DEFAULT_PAGE, MAX_PAGE};
pub(crate) use rows::parse_state;
pub use status::{status_checks, ConsoleOutput, InstanceStatus, InstanceStatusList};
