//! Which instances the API still shows: every one but those terminated
//! over an hour ago ([`TERMINATED_VISIBLE_FOR`]), as EC2's
//! DescribeInstances. The one home of that rule: each query that finds an
//! instance for a caller (DescribeInstances, state changes, console output,
//! ModifyInstanceAttribute, tags, CreateImage) selects with
//! [`instance_visible`], so an instance past it answers as a missing one
//! (InvalidInstanceID.NotFound) everywhere at once.

/// Terminated instances stay visible this long, then disappear (as in EC2).
pub const TERMINATED_VISIBLE_FOR: &str = "1 hour";

/// The SQL condition on a row of `instances` (its columns unqualified) that
/// the API still shows.
pub(crate) fn instance_visible() -> &'static str {
    "(state <> 'terminated' OR state_changed_at > now() - interval '1 hour')"
}
