//! Per-guest files: the qcow2 overlay over the cached base disk (written with
//! the imago crate), the NoCloud
//! seed ISO, and the directory that holds them with the console log.
//!
//! Each guest owns `<state>/instances/<instance-id>/`; nothing writable is
//! shared between guests. The base image is only ever a read-only backing file.
//! Owners and modes follow [`crate::access`].

use crate::access::QemuUser;
use base64::Engine;
use nimbus_proto::agent::InstanceMetadata;
use std::path::{Path, PathBuf};
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{tool} failed: {stderr}")]
    Tool { tool: &'static str, stderr: String },
    #[error("user-data is not valid base64")]
    UserData,
    #[error("{path}: refused as a root disk: {why}")]
    NotStandalone { path: String, why: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DiskError {
    let what = what.into();
    move |source| DiskError::Io { what, source }
}

/// The files of one guest.
#[derive(Debug, Clone)]
pub struct GuestFiles {
    pub dir: PathBuf,
}

impl GuestFiles {
    pub fn new(instances_dir: &Path, instance_id: &str) -> GuestFiles {
        GuestFiles { dir: instances_dir.join(instance_id) }
    }
    pub fn root_disk(&self) -> PathBuf {
        self.dir.join("root.qcow2")
    }
    pub fn seed_iso(&self) -> PathBuf {
        self.dir.join("seed.iso")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Creates whatever is missing. An existing overlay is kept: it holds the
    /// guest's disk writes.
    pub async fn prepare(
        &self,
        base: &Path,
        disk_gib: u64,
        meta: &InstanceMetadata,
        user_data_b64: Option<&str>,
        qemu: &QemuUser,
        network_config: Option<&str>,
    ) -> Result<(), DiskError> {
        // QEMU passes through; no one else enters.
        qemu.private_dir(&self.dir).await.map_err(io(format!("create {}", self.dir.display())))?;
        // The two tools are independent: run them side by side.
        tokio::try_join!(self.make_overlay(base, disk_gib, qemu), async {
            if tokio::fs::try_exists(self.seed_iso()).await.map_err(io("stat seed"))? {
                return Ok(());
            }
            self.write_seed(meta, user_data_b64, qemu, network_config).await
        })?;
        Ok(())
    }

    /// Writes the qcow2 overlay with imago (no process to spawn: well under a
    /// millisecond, where `qemu-img create` takes about ten).
    async fn make_overlay(&self, base: &Path, disk_gib: u64, qemu: &QemuUser) -> Result<(), DiskError> {
        use imago::{FormatCreateBuilder, Storage};
        let root = self.root_disk();
        if tokio::fs::try_exists(&root).await.map_err(io("stat overlay"))? {
            return Ok(());
        }
        let tmp = self.dir.join("root.qcow2.part");
        let (part, base, size) = (tmp.clone(), base.to_string_lossy().into_owned(), disk_gib << 30);
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&part);
            let file = imago::file::File::create_open(imago::StorageCreateOptions::new().filename(&part))?;
            imago::qcow2::Qcow2::<imago::file::File>::create_builder(file).size(size).backing(base, "qcow2".to_string()).create()
        })
        .await
        .map_err(|e| DiskError::Io { what: "write overlay".into(), source: std::io::Error::other(e) })?
        .map_err(io("write overlay"))?;
        // The guest's QEMU writes it (libvirt is told not to relabel anything).
        qemu.writable(&tmp).await.map_err(io("chown overlay"))?;
        tokio::fs::rename(&tmp, &root).await.map_err(io("rename overlay"))?;
        Ok(())
    }

    /// A NoCloud seed (ISO 9660, volume id `cidata`) with `meta-data` and `user-data`.
    /// A NoCloud seed with `network-config` too when the guest has static
    /// VPC addresses (cloud-init's version 2 format).
    async fn write_seed(
        &self,
        meta: &InstanceMetadata,
        user_data_b64: Option<&str>,
        qemu: &QemuUser,
        network_config: Option<&str>,
    ) -> Result<(), DiskError> {
        let staging = self.dir.join("seed.d");
        tokio::fs::create_dir_all(&staging).await.map_err(io("create seed dir"))?;
        let user_data = match user_data_b64 {
            Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| DiskError::UserData)?,
            None => Vec::new(),
        };
        // Instance ids are validated as i-[0-9a-f]+ by the control plane, so this YAML needs no quoting.
        let mut meta_data = format!("instance-id: {}\nlocal-hostname: {}\n", meta.instance_id, meta.instance_id);
        // The launch key pair, for cloud-init's default user (NoCloud reads
        // `public-keys` from meta-data). JSON strings are YAML strings.
        if !meta.public_keys.is_empty() {
            meta_data.push_str("public-keys:\n");
            for (_, key) in &meta.public_keys {
                meta_data.push_str(&format!("  - {}\n", serde_json::Value::String(key.trim().to_string())));
            }
        }
        tokio::fs::write(staging.join("meta-data"), meta_data).await.map_err(io("write meta-data"))?;
        tokio::fs::write(staging.join("user-data"), user_data).await.map_err(io("write user-data"))?;
        let mut files = vec![staging.join("meta-data"), staging.join("user-data")];
        if let Some(nc) = network_config {
            tokio::fs::write(staging.join("network-config"), nc).await.map_err(io("write network-config"))?;
            files.push(staging.join("network-config"));
        }
        let tmp = self.dir.join("seed.iso.part");
        run(
            "genisoimage",
            Command::new("genisoimage").args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"]).arg(&tmp).args(&files),
        )
        .await?;
        // The seed holds the user-data: read by QEMU, by nobody else.
        qemu.readable(&tmp).await.map_err(io("chown seed"))?;
        tokio::fs::rename(&tmp, self.seed_iso()).await.map_err(io("rename seed"))?;
        tokio::fs::remove_dir_all(&staging).await.map_err(io("remove seed dir"))?;
        Ok(())
    }

    fn ssh_port_file(&self) -> PathBuf {
        self.dir.join("ssh_port")
    }

    /// The loopback port forwarded to the guest's port 22, if it has one.
    pub async fn ssh_port(&self) -> Option<u16> {
        tokio::fs::read_to_string(self.ssh_port_file()).await.ok()?.trim().parse().ok()
    }

    /// The guest's forwarded SSH port: the one it has, or a free loopback
    /// port picked now and kept in its directory (the guest keeps it across
    /// restarts of the agent and of the guest).
    pub async fn ensure_ssh_port(&self) -> Result<u16, DiskError> {
        if let Some(p) = self.ssh_port().await {
            return Ok(p);
        }
        // The kernel's choice of a free port; QEMU binds it when the guest starts.
        let port = std::net::TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).map_err(io("pick an SSH port"))?.port();
        let tmp = self.dir.join("ssh_port.part");
        tokio::fs::write(&tmp, port.to_string()).await.map_err(io("write ssh_port"))?;
        tokio::fs::rename(&tmp, self.ssh_port_file()).await.map_err(io("rename ssh_port"))?;
        Ok(port)
    }

    /// Drops the recorded SSH port (its guest could not start with it).
    pub async fn forget_ssh_port(&self) {
        let _ = tokio::fs::remove_file(self.ssh_port_file()).await;
    }

    /// Removes every file of the guest. Idempotent.
    pub async fn remove(&self) -> Result<(), DiskError> {
        match tokio::fs::remove_dir_all(&self.dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(format!("remove {}", self.dir.display()))(e)),
            _ => Ok(()),
        }
    }

    pub async fn exists(&self) -> bool {
        tokio::fs::try_exists(&self.dir).await.unwrap_or(true)
    }
}

/// Checks that `disk` may be a root disk: a standalone qcow2, naming no
/// backing or external data file (see [`nimbus_proto::image::DiskInfo`]).
/// `qemu-img info` opens neither (it reads only the header); `-f qcow2`:
/// nothing is probed.
pub async fn check_standalone(disk: &Path) -> Result<(), DiskError> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "-f", "qcow2", "--output=json"])
        .arg(disk)
        .output()
        .await
        .map_err(io("run qemu-img"))?;
    let refused = |why: String| DiskError::NotStandalone { path: disk.display().to_string(), why };
    if !out.status.success() {
        return Err(refused(format!("not a qcow2 image ({})", String::from_utf8_lossy(&out.stderr).trim())));
    }
    let info: nimbus_proto::image::DiskInfo =
        serde_json::from_slice(&out.stdout).map_err(|e| DiskError::Tool { tool: "qemu-img", stderr: format!("unreadable info: {e}") })?;
    match info.refusal() {
        Some(why) => Err(refused(why)),
        None => Ok(()),
    }
}

/// Flattens a guest's overlay over its cached `base` into one standalone
/// qcow2 at `out` (`qemu-img convert`; `-U`: the guest may run, for
/// CreateImage with NoReboot). The chain is pinned: the overlay's backing
/// is `base` whatever its header says, and `base` has none (`backing:
/// null`), so no file named inside an image is ever opened; `base` is
/// checked first ([`check_standalone`]: an external data file cannot be
/// pinned away), in case a bad one reached the cache.
pub async fn flatten(overlay: &Path, base: &Path, out: &Path) -> Result<(), DiskError> {
    check_standalone(base).await?;
    convert_pinned(overlay, base, out).await
}

/// The pinned `qemu-img convert` of [`flatten`].
async fn convert_pinned(overlay: &Path, base: &Path, out: &Path) -> Result<(), DiskError> {
    let _ = tokio::fs::remove_file(out).await;
    let file = |p: &Path| serde_json::json!({"driver": "file", "filename": p.to_string_lossy()});
    let chain = serde_json::json!({
        "driver": "qcow2",
        "file": file(overlay),
        "backing": {"driver": "qcow2", "file": file(base), "backing": null},
    });
    run("qemu-img", Command::new("qemu-img").args(["convert", "-U", "-O", "qcow2"]).arg(format!("json:{chain}")).arg(out)).await
}

/// The lower-case hex SHA-256 of a file.
pub async fn sha256_file(path: &Path) -> Result<String, DiskError> {
    use sha2::{Digest, Sha256};
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await.map_err(io(format!("open {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await.map_err(io(format!("read {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

async fn run(tool: &'static str, cmd: &mut Command) -> Result<(), DiskError> {
    let out = cmd.output().await.map_err(io(format!("run {tool}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DiskError::Tool { tool, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// qemu-img, the reference implementation, reads our overlay as a valid
    /// qcow2 of the right size backed by the base; the seed is a `cidata` ISO.
    #[tokio::test]
    async fn overlay_and_seed_are_what_qemu_and_cloud_init_expect() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let qemu = QemuUser { uid: 4242, gid: 4343 };
        let base = dir.join("base.qcow2");
        let out = std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&base).arg("16M").output().unwrap();
        assert!(out.status.success());
        let meta = crate::metadata::sample_metadata("i-0123456789abcdef0");
        let files = GuestFiles::new(&dir, "i-0123456789abcdef0");
        files.prepare(&base, 8, &meta, Some("aGVsbG8="), &qemu, Some("version: 2\n")).await.unwrap();

        let info = std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(files.root_disk()).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 8u64 << 30);
        assert_eq!(info["backing-filename"], base.to_string_lossy().as_ref());
        assert_eq!(info["backing-filename-format"], "qcow2");
        let check = std::process::Command::new("qemu-img").arg("check").arg(files.root_disk()).output().unwrap();
        assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));

        use std::os::unix::fs::MetadataExt;
        let owner_mode = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode() & 0o7777)
        };
        assert_eq!(owner_mode(&files.seed_iso()), (0, 4343, 0o640), "user-data: QEMU reads it, no one else");
        assert_eq!(owner_mode(&files.root_disk()), (4242, 4343, 0o600), "the guest's QEMU writes its overlay");
        assert_eq!(owner_mode(&files.dir), (0, 4343, 0o710), "QEMU passes through, no one else enters");
        let iso = std::fs::read(files.seed_iso()).unwrap();
        // ISO 9660 primary volume descriptor at 32 KiB: "CD001", volume id at offset 40.
        assert_eq!(&iso[0x8001..0x8006], b"CD001");
        assert_eq!(&iso[0x8028..0x802e], b"cidata");
        let text = String::from_utf8_lossy(&iso);
        assert!(text.contains("instance-id: i-0123456789abcdef0"));
        assert!(text.contains("hello"));
        assert!(text.contains("version: 2"), "the network-config is on the seed");

        // Preparing again keeps the existing overlay (it holds the guest's
        // writes): the same file, byte for byte, bytes a guest wrote included.
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(files.root_disk()).unwrap();
            f.write_all(b"written by the guest").unwrap();
        }
        let (inode, bytes) = (std::fs::metadata(files.root_disk()).unwrap().ino(), std::fs::read(files.root_disk()).unwrap());
        files.prepare(&base, 8, &meta, None, &qemu, None).await.unwrap();
        assert_eq!(std::fs::metadata(files.root_disk()).unwrap().ino(), inode);
        assert_eq!(std::fs::read(files.root_disk()).unwrap(), bytes);
        files.remove().await.unwrap();
        assert!(!files.exists().await);
        files.remove().await.unwrap();
    }

    fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img").args(args).output().unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn contains(file: &Path, needle: &[u8]) -> bool {
        std::fs::read(file).unwrap().windows(needle.len()).any(|w| w == needle)
    }

    /// Issue 18, finding 6: a base whose qcow2 header names a backing file
    /// (`secret.raw`) flattened into an image holding that host file. Now
    /// such a base is refused, and the flattening pins the chain, so that
    /// even a base that slipped into the cache opens nothing it names.
    #[tokio::test]
    async fn create_image_never_copies_a_file_a_base_names() {
        let tmp = tempfile::tempdir().unwrap();
        let p = |n: &str| tmp.path().join(n);
        let secret = b"HOST-SECRET-0123456789";
        std::fs::write(p("secret.raw"), secret).unwrap();
        qemu_img(&["resize", "-q", "-f", "raw", p("secret.raw").to_str().unwrap(), "1M"]);
        // The evil base, and an instance's overlay over it (as the agent makes it).
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", p("secret.raw").to_str().unwrap(), "-F", "raw", p("evil.qcow2").to_str().unwrap()]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p("evil.qcow2").to_str().unwrap(),
            "-F",
            "qcow2",
            p("overlay.qcow2").to_str().unwrap(),
        ]);
        match flatten(&p("overlay.qcow2"), &p("evil.qcow2"), &p("out.qcow2")).await {
            Err(DiskError::NotStandalone { why, .. }) => assert!(why.contains("backing file"), "{why}"),
            other => panic!("the evil base was not refused: {other:?}"),
        }
        assert!(!p("out.qcow2").exists() || !contains(&p("out.qcow2"), secret));
        // Had the check been passed, the pinned chain still opens nothing the base names.
        convert_pinned(&p("overlay.qcow2"), &p("evil.qcow2"), &p("out.qcow2")).await.unwrap();
        assert!(!contains(&p("out.qcow2"), secret), "the host file's bytes are in the image");
        // Nor what the overlay's own header names: only the base given is its backing.
        let good = p("good.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", good.to_str().unwrap(), "1M"]);
        convert_pinned(&p("overlay.qcow2"), &good, &p("out.qcow2")).await.unwrap();
        assert!(!contains(&p("out.qcow2"), secret));
        check_standalone(&p("out.qcow2")).await.unwrap();
        flatten(&p("overlay.qcow2"), &good, &p("out.qcow2")).await.unwrap();

        // An external data file is refused too.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw=on", p("data.raw").display()),
            p("data.qcow2").to_str().unwrap(),
            "1M",
        ]);
        match check_standalone(&p("data.qcow2")).await {
            Err(DiskError::NotStandalone { why, .. }) => assert!(why.contains("data file"), "{why}"),
            other => panic!("{other:?}"),
        }
        // And anything that is not a qcow2.
        assert!(matches!(check_standalone(&p("secret.raw")).await, Err(DiskError::NotStandalone { .. })));
    }
}
