//! The host's health as its agent sees it: sent with every report and shown
//! by `describe-hosts`, so an operator learns that a host is in trouble from
//! the API, not from guests that take a minute to start.
//!
//! One check today: how long libvirt took to start the last guest. A healthy
//! libvirt starts a domain in well under a second (the guest then boots on
//! its own time); tens of seconds mean something is wrong with the host. The
//! usual cause on machines without udev: `/dev/kvm` stays `root:root 0600`,
//! so libvirt's capability check finds that the QEMU user cannot open the
//! device it probed as root, throws its cache away and probes QEMU again,
//! about a dozen times per start (~50 s). The report names that cause when
//! the device's permissions show it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Starting a domain slower than this is a problem worth reporting.
pub const SLOW_START: Duration = Duration::from_secs(10);

/// How long the last domain start took (shared by the agent's one libvirt connection).
#[derive(Clone, Default)]
pub struct StartTimes(Arc<Mutex<Option<Duration>>>);

impl StartTimes {
    pub fn record(&self, domain: &str, took: Duration) {
        if took >= SLOW_START {
            let cause = kvm_device(Path::new("/dev/kvm")).cause().unwrap_or(UNKNOWN_CAUSE);
            tracing::warn!(%domain, secs = took.as_secs_f64(), %cause, "starting a domain took far longer than it should");
        }
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(took);
    }

    pub fn last(&self) -> Option<Duration> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What `/dev/kvm`'s ownership says about libvirt's QEMU user's access to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmDevice {
    Absent,
    /// Group `kvm`, readable and writable by the group (Debian's udev rule).
    GroupKvm,
    /// Anything else: the QEMU user (group `kvm`) cannot open it.
    Other {
        gid: u32,
        mode: u32,
    },
}

const UNKNOWN_CAUSE: &str = "libvirtd may be re-probing QEMU's capabilities on every start (see its debug log) or the host is overloaded";

impl KvmDevice {
    /// The likely cause of slow starts that this device's permissions show.
    pub fn cause(&self) -> Option<&'static str> {
        match self {
            KvmDevice::Other { .. } => Some(
                "/dev/kvm is not root:kvm 0660, so libvirt re-probes QEMU on every start \
                 (the QEMU user cannot open the device it probed); fix: chgrp kvm /dev/kvm && chmod 0660 /dev/kvm \
                 (scripts/install-deps.sh does this)",
            ),
            KvmDevice::Absent | KvmDevice::GroupKvm => None,
        }
    }
}

/// Reads `/dev/kvm`'s (or `path`'s) group and mode.
pub fn kvm_device(path: &Path) -> KvmDevice {
    let Ok(meta) = std::fs::metadata(path) else { return KvmDevice::Absent };
    let kvm_gid = nix::unistd::Group::from_name("kvm").ok().flatten().map(|g| g.gid.as_raw());
    let mode = meta.mode() & 0o777;
    if Some(meta.gid()) == kvm_gid && mode & 0o060 == 0o060 {
        KvmDevice::GroupKvm
    } else {
        KvmDevice::Other { gid: meta.gid(), mode }
    }
}

/// The problems to report: a slow last start, with its likely cause.
pub fn problems(last_start: Option<Duration>, kvm: &KvmDevice) -> Vec<String> {
    match last_start {
        Some(took) if took >= SLOW_START => vec![format!(
            "starting a guest took {:.1} s (a healthy host takes under {} s); likely cause: {}",
            took.as_secs_f64(),
            SLOW_START.as_secs(),
            kvm.cause().unwrap_or(UNKNOWN_CAUSE)
        )],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_start_is_a_problem_that_names_the_kvm_permissions_when_they_are_the_cause() {
        let wrong = KvmDevice::Other { gid: 0, mode: 0o600 };
        assert_eq!(problems(Some(Duration::from_millis(500)), &wrong), Vec::<String>::new(), "fast starts are fine");
        assert_eq!(problems(None, &wrong), Vec::<String>::new(), "no start yet, nothing to say");
        let p = problems(Some(Duration::from_secs(52)), &wrong);
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("starting a guest took 52.0 s"), "{}", p[0]);
        assert!(p[0].contains("chgrp kvm /dev/kvm"), "{}", p[0]);
        let p = problems(Some(Duration::from_secs(30)), &KvmDevice::GroupKvm);
        assert!(p[0].contains("re-probing QEMU") && !p[0].contains("chgrp"), "{}", p[0]);
    }

    #[test]
    fn kvm_device_reads_group_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(kvm_device(&dir.path().join("missing")), KvmDevice::Absent);
        let f = dir.path().join("kvm");
        std::fs::write(&f, b"").unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let uid_gid = std::fs::metadata(&f).unwrap().gid();
        match kvm_device(&f) {
            KvmDevice::Other { gid, mode } => assert_eq!((gid, mode), (uid_gid, 0o600)),
            other => panic!("a 0600 file is not usable by group kvm: {other:?}"),
        }
        if let Some(kvm) = nix::unistd::Group::from_name("kvm").unwrap() {
            nix::unistd::chown(&f, None, Some(kvm.gid)).unwrap();
            std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o660)).unwrap();
            assert_eq!(kvm_device(&f), KvmDevice::GroupKvm);
        }
    }
}
