//! Block volumes on Ceph RBD (issue 20): typed operations on the images of one
//! pool, run through the `rbd` tool (`--format json` where it has one) as a
//! client with its own key (`--id`, `--keyring`, `--conf`), never a key on a
//! command line. Every command runs under a timeout and is killed past it.
//!
//! The project's own cluster is `scripts/ceph.sh` (`eval "$(scripts/ceph.sh env)"`
//! gives the variables [`Cluster::from_env`] reads); an operator's cluster is
//! the same four things: a ceph.conf naming the monitors, a client name, its
//! keyring and a pool (docs/ceph.md).
//!
//! Names are RBD image and snapshot names, checked here (`[A-Za-z0-9._-]`, at
//! most 96 bytes) so that no name can reach into another pool or snapshot.

mod error;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use tokio::process::Command;

pub use error::{Error, Result};

/// Where the volumes live and who the crate is to Ceph.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// A ceph.conf naming the monitors (`mon_host`).
    pub conf: PathBuf,
    /// The client's id: `nimbus` for `client.nimbus`.
    pub client_id: String,
    /// The keyring file holding that client's key (0600).
    pub keyring: PathBuf,
    /// The pool of the images.
    pub pool: String,
    /// The bound on a metadata operation (create, snapshot, clone, ...).
    pub timeout: Duration,
    /// The bound on an operation that copies data (import, flatten).
    pub long_timeout: Duration,
}

/// What `rbd info` says of an image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub id: String,
    /// Bytes.
    pub size: u64,
    pub object_size: u64,
    pub snapshot_count: u64,
    #[serde(default)]
    pub features: Vec<String>,
    /// For a clone: the snapshot it was made from (gone once flattened).
    #[serde(default)]
    pub parent: Option<Parent>,
}

/// The snapshot a clone reads its unwritten blocks from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Parent {
    pub pool: String,
    pub image: String,
    pub snapshot: String,
    pub overlap: u64,
}

/// What `rbd snap ls` says of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    /// The image's size when the snapshot was taken, bytes.
    pub size: u64,
    pub protected: bool,
}

/// A clone of a snapshot (it may live in another pool).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Child {
    pub pool: String,
    pub image: String,
}

/// A client that has an image open (a QEMU, an `rbd watch`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Watcher {
    pub address: String,
}

#[derive(Deserialize)]
struct RawSnap {
    id: u64,
    name: String,
    size: u64,
    // "true" / "false" in pacific's JSON.
    protected: serde_json::Value,
}

#[derive(Deserialize)]
struct RawStatus {
    #[serde(default)]
    watchers: Vec<Watcher>,
}

impl Cluster {
    /// A cluster with the default timeouts (30 s, 30 min).
    pub fn new(conf: impl Into<PathBuf>, client_id: impl Into<String>, keyring: impl Into<PathBuf>, pool: impl Into<String>) -> Cluster {
        Cluster {
            conf: conf.into(),
            client_id: client_id.into(),
            keyring: keyring.into(),
            pool: pool.into(),
            timeout: Duration::from_secs(30),
            long_timeout: Duration::from_secs(1800),
        }
    }

    /// The cluster `scripts/ceph.sh env` describes: `NIMBUS_CEPH_CONF`,
    /// `NIMBUS_CEPH_CLIENT` (default nimbus), `NIMBUS_CEPH_KEYRING`,
    /// `NIMBUS_CEPH_POOL` (default nimbus-volumes); None without a conf.
    pub fn from_env() -> Option<Cluster> {
        Cluster::from_env_prefix("NIMBUS_CEPH")
    }

    /// Like [`Cluster::from_env`] with another prefix (`NIMBUS_CEPH3` for the
    /// three-OSD test cluster: `NIMBUS_CEPH3_CONF`, ...).
    pub fn from_env_prefix(prefix: &str) -> Option<Cluster> {
        let var = |name: &str| std::env::var(format!("{prefix}_{name}")).ok().filter(|v| !v.is_empty());
        let conf = PathBuf::from(var("CONF")?);
        let client = var("CLIENT").unwrap_or_else(|| "nimbus".into());
        let keyring = var("KEYRING").map(PathBuf::from).unwrap_or_else(|| conf.with_file_name(format!("client.{client}.keyring")));
        let pool = var("POOL").unwrap_or_else(|| "nimbus-volumes".into());
        Some(Cluster::new(conf, client, keyring, pool))
    }

    /// Creates an image of `size` bytes (thin: no block is written).
    pub async fn create(&self, name: &str, size: u64) -> Result<()> {
        let spec = self.spec(name)?;
        self.rbd(&spec, &["create", "--size", &format!("{size}B"), &spec], self.timeout).await.map(drop)
    }

    /// The image's size, features and parent.
    pub async fn info(&self, name: &str) -> Result<ImageInfo> {
        let spec = self.spec(name)?;
        let out = self.rbd(&spec, &["info", "--format", "json", &spec], self.timeout).await?;
        parse("rbd info", &out)
    }

    /// Grows the image to `size` bytes; the same size is a no-op, a smaller one refused.
    pub async fn resize(&self, name: &str, size: u64) -> Result<()> {
        let spec = self.spec(name)?;
        let now = self.info(name).await?.size;
        if size < now {
            return Err(Error::Invalid(format!("{spec} is {now} bytes: shrinking to {size} is not offered")));
        }
        if size == now {
            return Ok(());
        }
        self.rbd(&spec, &["resize", "--no-progress", "--size", &format!("{size}B"), &spec], self.timeout).await.map(drop)
    }

    /// Removes the image; one that is already gone is fine.
    pub async fn remove(&self, name: &str) -> Result<()> {
        let spec = self.spec(name)?;
        match self.rbd(&spec, &["rm", "--no-progress", &spec], self.long_timeout).await {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The names of the pool's images.
    pub async fn list(&self) -> Result<Vec<String>> {
        let out = self.rbd(&self.pool, &["ls", "--format", "json", &self.pool], self.timeout).await?;
        parse("rbd ls", &out)
    }

    /// The clients that have the image open.
    pub async fn watchers(&self, name: &str) -> Result<Vec<Watcher>> {
        let spec = self.spec(name)?;
        let out = self.rbd(&spec, &["status", "--format", "json", &spec], self.timeout).await?;
        Ok(parse::<RawStatus>("rbd status", &out)?.watchers)
    }

    /// Takes a (crash-consistent) snapshot of the image.
    pub async fn snap_create(&self, name: &str, snap: &str) -> Result<()> {
        let spec = self.snap_spec(name, snap)?;
        self.rbd(&spec, &["snap", "create", "--no-progress", &spec], self.timeout).await.map(drop)
    }

    /// Removes a snapshot: HasChildren while clones read from it, Protected while protected.
    pub async fn snap_remove(&self, name: &str, snap: &str) -> Result<()> {
        let spec = self.snap_spec(name, snap)?;
        // With clone format 2 Ceph would remove a snapshot that has clones (moving
        // it to its trash): refuse here, as format 1 does, so callers flatten first.
        if !self.children(name, snap).await?.is_empty() {
            return Err(Error::HasChildren { what: spec });
        }
        self.rbd(&spec, &["snap", "rm", "--no-progress", &spec], self.timeout).await.map(drop)
    }

    /// Protects a snapshot (a clone's parent must be); protecting twice is fine.
    pub async fn snap_protect(&self, name: &str, snap: &str) -> Result<()> {
        let spec = self.snap_spec(name, snap)?;
        match self.rbd(&spec, &["snap", "protect", &spec], self.timeout).await {
            // Ceph answers EBUSY "snap is already protected".
            Err(Error::Protected { .. }) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Unprotects a snapshot (HasChildren while clone format 1 clones read from it);
    /// unprotecting twice is fine.
    pub async fn snap_unprotect(&self, name: &str, snap: &str) -> Result<()> {
        let spec = self.snap_spec(name, snap)?;
        match self.rbd(&spec, &["snap", "unprotect", &spec], self.timeout).await {
            Err(Error::Other { stderr, .. }) if stderr.contains("already unprotected") => Ok(()),
            r => r.map(drop),
        }
    }

    /// The image's snapshots, oldest first.
    pub async fn snap_list(&self, name: &str) -> Result<Vec<SnapInfo>> {
        let spec = self.spec(name)?;
        let out = self.rbd(&spec, &["snap", "ls", "--format", "json", &spec], self.timeout).await?;
        let raw: Vec<RawSnap> = parse("rbd snap ls", &out)?;
        Ok(raw
            .into_iter()
            .map(|s| {
                let protected = s.protected == serde_json::Value::Bool(true) || s.protected == "true";
                SnapInfo { id: s.id, name: s.name, size: s.size, protected }
            })
            .collect())
    }

    /// Makes `dest` a copy-on-write clone of a protected snapshot, in the same pool.
    pub async fn clone(&self, name: &str, snap: &str, dest: &str) -> Result<()> {
        let parent = self.snap_spec(name, snap)?;
        let child = self.spec(dest)?;
        // EEXIST is about the clone, ENOENT about the parent.
        match self.rbd(&child, &["clone", &parent, &child], self.timeout).await {
            Err(Error::NotFound { .. }) => Err(Error::NotFound { what: parent }),
            r => r.map(drop),
        }
    }

    /// Copies the parent's blocks into a clone, which then no longer needs its parent.
    pub async fn flatten(&self, name: &str) -> Result<()> {
        let spec = self.spec(name)?;
        match self.rbd(&spec, &["flatten", "--no-progress", &spec], self.long_timeout).await {
            // Not a clone (or flattened already): nothing to do.
            Err(Error::Other { code: Some(22), .. }) => Ok(()),
            r => r.map(drop),
        }
    }

    /// The clones made from a snapshot.
    pub async fn children(&self, name: &str, snap: &str) -> Result<Vec<Child>> {
        let spec = self.snap_spec(name, snap)?;
        let out = self.rbd(&spec, &["children", "--format", "json", &spec], self.timeout).await?;
        parse("rbd children", &out)
    }

    /// Creates an image from a raw file (its holes stay unallocated).
    pub async fn import(&self, file: &Path, name: &str) -> Result<()> {
        let spec = self.spec(name)?;
        let file = file.to_str().ok_or_else(|| Error::Invalid(format!("{} is not UTF-8", file.display())))?;
        self.rbd(&spec, &["import", "--no-progress", "--image-format", "2", file, &spec], self.long_timeout).await.map(drop)
    }

    /// Writes the image's bytes (a snapshot's with `Some(snap)`) to a new file.
    pub async fn export(&self, name: &str, snap: Option<&str>, file: &Path) -> Result<()> {
        let spec = match snap {
            Some(snap) => self.snap_spec(name, snap)?,
            None => self.spec(name)?,
        };
        let file = file.to_str().ok_or_else(|| Error::Invalid(format!("{} is not UTF-8", file.display())))?;
        self.rbd(&spec, &["export", "--no-progress", &spec, file], self.long_timeout).await.map(drop)
    }

    /// The client's key as Ceph writes it (base64), read from its keyring.
    pub fn key_base64(&self) -> Result<String> {
        let io = |source| Error::Io { context: format!("reading keyring {}", self.keyring.display()), source };
        let text = std::fs::read_to_string(&self.keyring).map_err(io)?;
        keyring_key(&text, &format!("client.{}", self.client_id))
            .ok_or_else(|| Error::Invalid(format!("no key for client.{} in {}", self.client_id, self.keyring.display())))
    }

    /// The key's bytes: the value of a libvirt secret of usage type `ceph` must be
    /// these raw bytes, set through the API (libvirt base64-encodes them for QEMU).
    pub fn key_bytes(&self) -> Result<Vec<u8>> {
        let b64 = self.key_base64()?;
        base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()).map_err(|e| Error::Invalid(format!("the key is not base64: {e}")))
    }

    fn spec(&self, name: &str) -> Result<String> {
        check_name(name)?;
        Ok(format!("{}/{}", self.pool, name))
    }

    fn snap_spec(&self, name: &str, snap: &str) -> Result<String> {
        check_name(snap)?;
        Ok(format!("{}@{}", self.spec(name)?, snap))
    }

    /// Runs `rbd <args>` as the client, bounded by `timeout`; its stdout, or the
    /// classified error about `what`.
    async fn rbd(&self, what: &str, args: &[&str], timeout: Duration) -> Result<Vec<u8>> {
        let command = format!("rbd {}", args.join(" "));
        let child = Command::new("rbd")
            .arg("--conf")
            .arg(&self.conf)
            .arg("--id")
            .arg(&self.client_id)
            .arg("--keyring")
            .arg(&self.keyring)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::Io { context: format!("starting `{command}`"), source })?;
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(out) => out.map_err(|source| Error::Io { context: format!("running `{command}`"), source })?,
            // Dropping the future kills the child (kill_on_drop).
            Err(_) => return Err(Error::Timeout { command, timeout }),
        };
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(error::classify(&command, what, out.status.code(), &String::from_utf8_lossy(&out.stderr)))
    }
}

fn parse<T: for<'de> Deserialize<'de>>(command: &str, out: &[u8]) -> Result<T> {
    serde_json::from_slice(out).map_err(|e| Error::Parse { command: command.into(), message: e.to_string() })
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 96
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("bad RBD name {name:?} (use [A-Za-z0-9._-], at most 96 bytes)")))
    }
}

/// The `key = ...` of section `[entity]` of a keyring file.
fn keyring_key(text: &str, entity: &str) -> Option<String> {
    let mut in_section = false;
    for line in text.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = section.trim() == entity;
        } else if in_section {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == "key" {
                    return Some(v.trim().to_string());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("vol-0123abcd").is_ok());
        assert!(check_name("img.snap_1").is_ok());
        for bad in ["", "a/b", "a@b", ".hidden", "a b", &"x".repeat(97)] {
            assert!(matches!(check_name(bad), Err(Error::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn keyring() {
        let text = "[client.admin]\n\tkey = AAAA\n[client.nimbus]\n\tkey = QUJD==\n\tcaps mon = \"profile rbd\"\n";
        assert_eq!(keyring_key(text, "client.nimbus").as_deref(), Some("QUJD=="));
        assert_eq!(keyring_key(text, "client.admin").as_deref(), Some("AAAA"));
        assert_eq!(keyring_key(text, "client.other"), None);
    }
}
