//! Who may read what on an agent host.
//!
//! Guests' files hold tenants' data (disks, user-data in the seed, the
//! metadata service), so nothing under the agent's state directory is open
//! to local users. QEMU runs every guest as one unprivileged user (Debian:
//! `libvirt-qemu`, primary group `kvm`). libvirt is told not to relabel
//! anything (a domain-level static DAC label with `relabel='no'`, see
//! [`crate::domain`]): the agent gives each file the owner it needs, so a
//! shared file (a cached image, a kernel) is never handed to one guest's
//! QEMU, which could then write what other guests boot from.
//!
//! | path | owner | mode | why |
//! |---|---|---|---|
//! | state dir, `images/`, `instances/`, `instances/<id>/` | root:qemu group | 0710 | QEMU passes through; no one else enters; only root lists |
//! | `store/` (the embedded state-store node: every served instance's document, user-data included) | root:root | 0700 | the agent's own; QEMU passes through the state dir but not into it (files inside follow the umask, so the directory is what closes them) |
//! | `credential.json`, `credential.pending` (a secret made before registering), `tls/key.pem`, reboot counters | root:root | 0600 | the agent's own |
//! | `images/<sha256>` | root:qemu group | 0640 | QEMU reads a base disk or kernel, cannot write it |
//! | `instances/<id>/root.qcow2` | qemu user:qemu group | 0600 | the guest's own disk, written by its QEMU |
//! | `instances/<id>/seed.iso` | root:qemu group | 0640 | read by QEMU (holds the user-data) |
//! | run dir (`--run-dir`) | root:qemu group | 0710 | QEMU passes through to the sockets |
//! | `<run dir>/<id>.sock` (the guest's metadata server) | root:qemu group | 0660 | QEMU connects to it (guestfwd) |
//! | `instances/<id>/console.log` | root:root | 0600 | written by virtlogd |
//!
//! Every guest's QEMU runs as the same user, as with libvirt's own DAC
//! labelling; separating guests from each other on the host is the job of a
//! MAC driver (SELinux/AppArmor sVirt), not of file modes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("the QEMU user {0} does not exist on this host (is libvirt installed?)")]
    NoSuchUser(String),
    #[error("looking up user {name}: {source}")]
    Lookup { name: String, source: nix::Error },
}

/// The user and group QEMU runs guests as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuUser {
    pub uid: u32,
    pub gid: u32,
}

impl QemuUser {
    /// The user `name` and its primary group.
    pub fn lookup(name: &str) -> Result<QemuUser, AccessError> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(QemuUser { uid: u.uid.as_raw(), gid: u.gid.as_raw() }),
            Ok(None) => Err(AccessError::NoSuchUser(name.to_string())),
            Err(source) => Err(AccessError::Lookup { name: name.to_string(), source }),
        }
    }

    /// root itself: for hypervisors where no QEMU user touches the files
    /// (Xen's PV guests are read by the root toolstack).
    pub fn root() -> QemuUser {
        QemuUser { uid: 0, gid: 0 }
    }

    /// libvirt's DAC label for a domain run as this user (`+uid:+gid`).
    pub fn dac_label(&self) -> String {
        format!("+{}:+{}", self.uid, self.gid)
    }

    /// Creates `dir` (and missing parents) and closes it: root:qemu group 0710.
    pub async fn private_dir(&self, dir: &Path) -> std::io::Result<()> {
        tokio::fs::create_dir_all(dir).await?;
        set(dir, 0, self.gid, 0o710).await
    }

    /// A file QEMU reads and must not write: root:qemu group 0640.
    pub async fn readable(&self, file: &Path) -> std::io::Result<()> {
        set(file, 0, self.gid, 0o640).await
    }

    /// A file the guest's QEMU writes: qemu user:qemu group 0600.
    pub async fn writable(&self, file: &Path) -> std::io::Result<()> {
        set(file, self.uid, self.gid, 0o600).await
    }

    /// A socket QEMU connects to: root:qemu group 0660.
    pub async fn connectable(&self, socket: &Path) -> std::io::Result<()> {
        set(socket, 0, self.gid, 0o660).await
    }
}

/// A file for the agent alone: root:root 0600.
pub async fn agent_only(file: &Path) -> std::io::Result<()> {
    set(file, 0, 0, 0o600).await
}

async fn set(path: &Path, uid: u32, gid: u32, mode: u32) -> std::io::Result<()> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::os::unix::fs::chown(&p, Some(uid), Some(gid))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn owner_mode(p: &Path) -> (u32, u32, u32) {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    }

    #[tokio::test]
    async fn each_kind_of_file_gets_its_owner_and_mode() {
        let q = QemuUser { uid: 64055, gid: 107 };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        q.private_dir(&dir).await.unwrap();
        assert_eq!(owner_mode(&dir), (0, 107, 0o710));
        let f = dir.join("f");
        std::fs::write(&f, b"x").unwrap();
        q.readable(&f).await.unwrap();
        assert_eq!(owner_mode(&f), (0, 107, 0o640));
        q.writable(&f).await.unwrap();
        assert_eq!(owner_mode(&f), (64055, 107, 0o600));
        q.connectable(&f).await.unwrap();
        assert_eq!(owner_mode(&f), (0, 107, 0o660));
        agent_only(&f).await.unwrap();
        assert_eq!(owner_mode(&f), (0, 0, 0o600));
        assert_eq!(q.dac_label(), "+64055:+107");
    }

    #[test]
    fn a_missing_user_is_a_clear_error() {
        let e = QemuUser::lookup("nimbus-no-such-user").unwrap_err();
        assert_eq!(e.to_string(), "the QEMU user nimbus-no-such-user does not exist on this host (is libvirt installed?)");
        assert_eq!(QemuUser::lookup("root").unwrap(), QemuUser::root());
    }
}
