//! Per-guest files: the qcow2 overlay over the cached base disk, the NoCloud
//! seed ISO, and the directory that holds them with the console log.
//!
//! Each guest owns `<state>/instances/<instance-id>/`; nothing writable is
//! shared between guests. The base image is only ever a read-only backing file.

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
    ) -> Result<(), DiskError> {
        tokio::fs::create_dir_all(&self.dir).await.map_err(io(format!("create {}", self.dir.display())))?;
        let root = self.root_disk();
        if !tokio::fs::try_exists(&root).await.map_err(io("stat overlay"))? {
            let tmp = self.dir.join("root.qcow2.part");
            run(
                "qemu-img",
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(base)
                    .arg(&tmp)
                    .arg(format!("{disk_gib}G")),
            )
            .await?;
            tokio::fs::rename(&tmp, &root).await.map_err(io("rename overlay"))?;
        }
        if !tokio::fs::try_exists(self.seed_iso()).await.map_err(io("stat seed"))? {
            self.write_seed(meta, user_data_b64).await?;
        }
        Ok(())
    }

    /// A NoCloud seed (ISO 9660, volume id `cidata`) with `meta-data` and `user-data`.
    async fn write_seed(&self, meta: &InstanceMetadata, user_data_b64: Option<&str>) -> Result<(), DiskError> {
        let staging = self.dir.join("seed.d");
        tokio::fs::create_dir_all(&staging).await.map_err(io("create seed dir"))?;
        let user_data = match user_data_b64 {
            Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| DiskError::UserData)?,
            None => Vec::new(),
        };
        // Instance ids are validated as i-[0-9a-f]+ by the control plane, so this YAML needs no quoting.
        let meta_data = format!("instance-id: {}\nlocal-hostname: {}\n", meta.instance_id, meta.instance_id);
        tokio::fs::write(staging.join("meta-data"), meta_data).await.map_err(io("write meta-data"))?;
        tokio::fs::write(staging.join("user-data"), user_data).await.map_err(io("write user-data"))?;
        let tmp = self.dir.join("seed.iso.part");
        run(
            "genisoimage",
            Command::new("genisoimage")
                .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
                .arg(&tmp)
                .arg(staging.join("meta-data"))
                .arg(staging.join("user-data")),
        )
        .await?;
        tokio::fs::rename(&tmp, self.seed_iso()).await.map_err(io("rename seed"))?;
        tokio::fs::remove_dir_all(&staging).await.map_err(io("remove seed dir"))?;
        Ok(())
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

async fn run(tool: &'static str, cmd: &mut Command) -> Result<(), DiskError> {
    let out = cmd.output().await.map_err(io(format!("run {tool}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DiskError::Tool { tool, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}
