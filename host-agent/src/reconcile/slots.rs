//! What the agent keeps of each instance on this host, in one place: a
//! slot per instance, every slot under one lock ([`Instances`]). None of it
//! is the truth about a guest (libvirt and the disk are, and every pass
//! starts from them); it is what passes, and the tasks that outlive them (a
//! stop, CreateImage), must agree on:
//!
//! - the instance as last assigned (a delta names only what changed): the
//!   data plane needs every VPC interface of the host, and a task that
//!   outlives its pass the latest desired state;
//! - its consecutive failed attempts (see [`super::FAILED_AFTER`]);
//! - the stop guard ([`StopGuard`]): a stop, or CreateImage's copy of a
//!   stopped guest, owns the guest until its guard drops; meanwhile no pass
//!   stops it a second time or starts it again;
//! - the images being made of it (CreateImage), each once;
//! - what was sent of its console ([`ConsoleState`]).
//!
//! The lock is a std mutex held only while a slot is read or changed, never
//! across an `.await`. A slot left with nothing in it is dropped.

use crate::console::{self, ConsoleState};
use nimbus_proto::agent::{Assignment, DesiredState, Observation};
use nimbus_proto::network::Nic;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the agent last heard of an instance on this host.
#[derive(Debug, Clone)]
pub(super) struct Assigned {
    pub(super) desired: DesiredState,
    pub(super) nics: Vec<Nic>,
}

impl Assigned {
    fn of(a: &Assignment) -> Self {
        Assigned { desired: a.desired, nics: a.nics.clone() }
    }
}

/// One instance's state (see the module's doc).
#[derive(Default)]
struct Slot {
    /// `None`: terminated, or not in the last full list.
    assigned: Option<Assigned>,
    failures: u32,
    stopping: bool,
    /// The images this agent made or is making of the instance, by image id.
    /// An id stays: an assignment read before the image became available
    /// (or failed) must not make it a second time.
    making: HashSet<String>,
    console: ConsoleState,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.assigned.is_none() && self.failures == 0 && !self.stopping && self.making.is_empty() && self.console.is_empty()
    }
}

/// Every instance's slot, shared by the reconciler's clones (passes and
/// the tasks that outlive them) and the agent's reports.
#[derive(Clone, Default)]
pub(super) struct Instances {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

impl Instances {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the slot of `id` (made if missing), which is dropped
    /// after if `f` left it empty.
    fn with<R>(&self, id: &str, f: impl FnOnce(&mut Slot) -> R) -> R {
        let mut slots = self.lock();
        let slot = match slots.get_mut(id) {
            Some(slot) => slot,
            None => slots.entry(id.to_string()).or_default(),
        };
        let r = f(slot);
        if slot.is_empty() {
            slots.remove(id);
        }
        r
    }

    /// Reads the slot of `id`, if it has one.
    fn get<R>(&self, id: &str, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        self.lock().get(id).map(f)
    }

    /// A full list of the host's instances: each one's assignment replaced,
    /// those not in it (or terminated) no longer assigned.
    pub(super) fn assign_all(&self, assignments: &[Assignment]) {
        let mut slots = self.lock();
        for slot in slots.values_mut() {
            slot.assigned = None;
        }
        for a in assignments.iter().filter(|a| a.desired != DesiredState::Terminated) {
            slots.entry(a.instance_id.clone()).or_default().assigned = Some(Assigned::of(a));
        }
        slots.retain(|_, slot| !slot.is_empty());
    }

    /// The changes a wake-up brought: a terminated instance is no longer assigned.
    pub(super) fn assign_changes(&self, changes: &[Assignment]) {
        for a in changes {
            self.with(&a.instance_id, |slot| {
                slot.assigned = match a.desired {
                    DesiredState::Terminated => None,
                    _ => Some(Assigned::of(a)),
                }
            });
        }
    }

    /// Forgets the instance's assignment; what it was.
    pub(super) fn unassign(&self, id: &str) -> Option<Assigned> {
        self.with(id, |slot| slot.assigned.take())
    }

    /// The instance as last assigned (`None`: terminated or never assigned here).
    pub(super) fn assigned(&self, id: &str) -> Option<Assigned> {
        self.get(id, |slot| slot.assigned.clone()).flatten()
    }

    /// The VPC interfaces of every assigned instance.
    pub(super) fn assigned_nics(&self) -> Vec<Nic> {
        self.lock().values().filter_map(|slot| slot.assigned.as_ref()).flat_map(|a| a.nics.iter().cloned()).collect()
    }

    /// Counts a failed attempt at the instance; the attempts so far.
    pub(super) fn count_failure(&self, id: &str) -> u32 {
        self.with(id, |slot| {
            slot.failures += 1;
            slot.failures
        })
    }

    /// The instance converged: its failures are forgotten.
    pub(super) fn clear_failures(&self, id: &str) {
        self.with(id, |slot| slot.failures = 0);
    }

    /// Takes the instance's stop guard; `None` if a stop (or CreateImage's
    /// copy) holds it already. The guard is released when dropped.
    pub(super) fn begin_stop(&self, id: &str) -> Option<StopGuard> {
        let began = self.with(id, |slot| !std::mem::replace(&mut slot.stopping, true));
        began.then(|| StopGuard { instances: self.clone(), id: id.to_string() })
    }

    /// Whether the instance's stop guard is held.
    pub(super) fn stopping(&self, id: &str) -> bool {
        self.get(id, |slot| slot.stopping).unwrap_or(false)
    }

    /// Marks `image_id` as made of the instance: `false` if it already was
    /// (made, or being made).
    pub(super) fn begin_image(&self, id: &str, image_id: &str) -> bool {
        self.with(id, |slot| slot.making.insert(image_id.to_string()))
    }

    /// The instance's console tail (base64) if it changed since the last
    /// delivered report (see [`crate::console`]).
    pub(super) async fn console_tail(&self, id: &str, log: &Path) -> Option<String> {
        let unchanged = |len, modified| self.get(id, |slot| slot.console.unchanged(len, modified)).unwrap_or(false);
        let tail = console::read_if_changed(id, log, unchanged).await?;
        self.with(id, |slot| slot.console.offer(tail))
    }

    /// Records the console tails a delivered report carried.
    pub(super) fn console_delivered(&self, observations: &[Observation]) {
        for o in observations {
            let Some(b64) = &o.console else { continue };
            self.with(&o.instance_id, |slot| slot.console.delivered(b64));
        }
    }

    /// Drops what was sent of a removed guest's console.
    pub(super) fn forget_console(&self, id: &str) {
        self.with(id, |slot| slot.console = ConsoleState::default());
    }
}

/// Holds an instance's stop guard; releases it when dropped (also on panic
/// or abort of the task holding it).
pub(super) struct StopGuard {
    instances: Instances,
    id: String,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.instances.with(&self.id, |slot| slot.stopping = false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use nimbus_proto::agent::CONSOLE_TAIL_BYTES;
    use nimbus_proto::ObservedState;

    fn obs(id: &str, console: Option<String>) -> Observation {
        Observation { instance_id: id.into(), state: ObservedState::Running, message: None, reboots: None, console, ssh_endpoint: None }
    }

    #[test]
    fn a_stop_cannot_begin_twice() {
        let p = Instances::default();
        let g = p.begin_stop("i-1").expect("first");
        assert!(p.begin_stop("i-1").is_none());
        assert!(p.stopping("i-1"));
        assert!(p.begin_stop("i-2").is_some());
        drop(g);
        assert!(!p.stopping("i-1"));
        assert!(p.begin_stop("i-1").is_some());
    }

    /// Each part of a slot lives and goes on its own; a slot with nothing
    /// left in it goes.
    #[test]
    fn a_slot_keeps_each_part_until_it_is_empty() {
        let p = Instances::default();
        let guard = p.begin_stop("i-1").unwrap();
        assert_eq!(p.count_failure("i-1"), 1);
        assert_eq!(p.count_failure("i-1"), 2);
        assert!(p.begin_image("i-1", "ami-1"));
        assert!(!p.begin_image("i-1", "ami-1"), "an image is made once");
        p.clear_failures("i-1");
        assert_eq!(p.count_failure("i-1"), 1, "counted afresh");
        drop(guard);
        p.clear_failures("i-1");
        assert_eq!(p.lock().len(), 1, "the image made keeps the slot");
        assert!(!p.begin_image("i-1", "ami-1"));
        assert!(p.begin_stop("i-2").is_some());
        assert_eq!(p.lock().len(), 1, "a released guard leaves nothing");
    }

    fn assignment(id: &str, desired: DesiredState) -> Assignment {
        use nimbus_proto::agent::ImageSpec;
        use nimbus_proto::api::ImageFile;
        let root_disk = ImageFile { name: "disk.qcow2".into(), sha256: "00".repeat(32) };
        let image = ImageSpec {
            image_id: "ami-0123456789abcdef0".into(),
            boot: Default::default(),
            source_url: None,
            root_disk_in_store: false,
            kernel: None,
            initrd: None,
            root_disk,
            cmdline: String::new(),
        };
        Assignment {
            instance_id: id.into(),
            desired,
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 1,
            image,
            user_data: None,
            metadata: crate::metadata::sample_metadata(id),
            reboots: 0,
            nics: Vec::new(),
            create_images: Vec::new(),
        }
    }

    #[test]
    fn a_full_list_replaces_what_was_assigned_and_a_delta_changes_it() {
        let p = Instances::default();
        let a = assignment;
        p.assign_all(&[a("i-1", DesiredState::Running), a("i-2", DesiredState::Stopped), a("i-3", DesiredState::Terminated)]);
        assert_eq!(p.assigned("i-2").map(|a| a.desired), Some(DesiredState::Stopped));
        assert!(p.assigned("i-3").is_none(), "terminated: not assigned");
        p.assign_changes(&[a("i-2", DesiredState::Running), a("i-1", DesiredState::Terminated), a("i-4", DesiredState::Running)]);
        assert_eq!(p.assigned("i-2").map(|a| a.desired), Some(DesiredState::Running));
        assert!(p.assigned("i-1").is_none());
        assert!(p.assigned("i-4").is_some());
        assert_eq!(p.count_failure("i-4"), 1);
        p.assign_all(&[a("i-2", DesiredState::Running)]);
        assert!(p.assigned("i-4").is_none(), "not in the full list");
        assert_eq!(p.count_failure("i-4"), 2, "its failures stay");
        assert!(p.unassign("i-2").is_some() && p.assigned("i-2").is_none());
    }

    #[tokio::test]
    async fn sends_a_tail_once_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let t = Instances::default();
        assert_eq!(t.console_tail("i-1", &log).await, None, "no file, nothing to send");
        std::fs::write(&log, "").unwrap();
        assert_eq!(t.console_tail("i-1", &log).await, None, "empty file, nothing to send");

        std::fs::write(&log, "hello\n").unwrap();
        let first = t.console_tail("i-1", &log).await.expect("new output");
        assert_eq!(first, base64::engine::general_purpose::STANDARD.encode("hello\n"));
        // Not delivered (the report failed): sent again.
        assert_eq!(t.console_tail("i-1", &log).await.as_ref(), Some(&first));
        t.console_delivered(&[obs("i-1", Some(first.clone()))]);
        assert_eq!(t.console_tail("i-1", &log).await, None, "unchanged since delivered");

        // Longer than the tail: only the last CONSOLE_TAIL_BYTES go.
        let mut big = vec![b'a'; CONSOLE_TAIL_BYTES];
        big.extend_from_slice(b"END");
        std::fs::write(&log, &big).unwrap();
        let tail = t.console_tail("i-1", &log).await.expect("changed");
        let raw = base64::engine::general_purpose::STANDARD.decode(tail).unwrap();
        assert_eq!(raw.len(), CONSOLE_TAIL_BYTES);
        assert!(raw.ends_with(b"aEND"));

        t.forget_console("i-1");
        std::fs::write(&log, "hello\n").unwrap();
        assert!(t.console_tail("i-1", &log).await.is_some(), "forgotten: sent again");
    }
}
