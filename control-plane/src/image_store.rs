//! The control plane's image store: the root disks of the images CreateImage
//! makes, one file per digest (`<dir>/<sha256>`), which every host fetches
//! into its own cache (`GET /v1/agent/images/{sha256}`).
//!
//! A file appears under its name only once its content matched the digest
//! the uploading agent announced: bodies are streamed to a temporary file
//! (never buffered), hashed on the way, synced and renamed into place. Files
//! no image refers to any more are removed by [`ImageStore::remove`] (at
//! deregistration) and by the sweep at start-up (which also removes the
//! temporary files of uploads a crash cut short).
//!
//! Only a standalone qcow2 is published ([`check_standalone`], which
//! registrations of files the control plane can read go through too): a
//! disk naming a backing or external data file would have the hosts that
//! boot it open a file of theirs by the name its author chose.
//!
//! Stored disks are tenants' data (private images): the directory is the
//! control plane's alone (0700) and every file in it 0600, whatever the
//! umask; [`ImageStore::close_to_others`] closes a store an older version
//! left open, at start-up.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the upload was cut short: {0}")]
    Body(String),
    #[error("the upload is larger than the {0} bytes an image may have")]
    TooLarge(u64),
    #[error("the upload's SHA-256 is {actual}, not the {announced} announced")]
    DigestMismatch { announced: String, actual: String },
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    max_bytes: u64,
    /// Held while a file is published and recorded, and while a file's use
    /// is checked and it is removed: a removal never races a publication.
    gc: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// Whether `s` is 64 lower-case hex digits (a file name in the store).
pub use nimbus_proto::image::is_sha256_hex as is_digest;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.display().to_string(), source }
}

/// An upload written and verified, not yet visible: [`Staged::publish`]
/// renames it into place; dropped unpublished, it is removed.
#[derive(Debug)]
pub struct Staged {
    tmp: Option<PathBuf>,
    target: PathBuf,
    pub size: u64,
}

impl Staged {
    /// Where the upload waits to be published.
    pub fn path(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(&self.target)
    }

    pub async fn publish(mut self) -> Result<u64, StoreError> {
        if let Some(tmp) = self.tmp.take() {
            if let Err(e) = tokio::fs::rename(&tmp, &self.target).await {
                let _ = std::fs::remove_file(&tmp);
                return Err(io(&self.target)(e));
            }
            // The rename is durable before the image is said to be available.
            if let Some(dir) = self.target.parent() {
                let dir = dir.to_path_buf();
                tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|d| d.sync_all()))
                    .await
                    .map_err(|e| StoreError::Io { path: self.target.display().to_string(), source: std::io::Error::other(e) })?
                    .map_err(io(&self.target))?;
            }
        }
        Ok(self.size)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Removes a temporary file unless disarmed (an upload that failed midway).
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Why `disk` may not be a root disk (`Some`), after `qemu-img info -f
/// qcow2` (which opens no file the disk names; see
/// [`nimbus_proto::image::DiskInfo`]).
pub async fn check_standalone(disk: &Path) -> Result<Option<String>, StoreError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "-U", "-f", "qcow2", "--output=json"])
        .arg(disk)
        .output()
        .await
        .map_err(io(disk))?;
    if !out.status.success() {
        tracing::info!(disk = %disk.display(), stderr = %String::from_utf8_lossy(&out.stderr).trim(), "not a qcow2 image");
        return Ok(Some("it is not a qcow2 image".into()));
    }
    let info: nimbus_proto::image::DiskInfo = serde_json::from_slice(&out.stdout)
        .map_err(|e| StoreError::Io { path: disk.display().to_string(), source: std::io::Error::other(format!("qemu-img info: {e}")) })?;
    Ok(info.refusal())
}

impl ImageStore {
    pub fn new(dir: PathBuf, max_bytes: u64) -> ImageStore {
        ImageStore { dir, max_bytes, gc: Default::default() }
    }

    /// Creates the directory (0700, whatever the umask).
    async fn private_dir(&self) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir))
            .await
            .map_err(|e| StoreError::Io { path: self.dir.display().to_string(), source: std::io::Error::other(e) })?
            .map_err(io(&self.dir))
    }

    /// Makes the store the control plane's alone: the directory 0700 and
    /// every file in it 0600 (a store made by an older version, or by hand,
    /// was left readable by every local user).
    pub async fn close_to_others(&self) -> Result<(), StoreError> {
        self.private_dir().await?;
        tokio::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).await.map_err(io(&self.dir))?;
        let mut dir = tokio::fs::read_dir(&self.dir).await.map_err(io(&self.dir))?;
        while let Some(entry) = dir.next_entry().await.map_err(io(&self.dir))? {
            let path = entry.path();
            if entry.file_type().await.map_err(io(&path))?.is_file() {
                tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).await.map_err(io(&path))?;
            }
        }
        Ok(())
    }

    /// See the `gc` field.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.gc.lock().await
    }

    /// The path of a stored file (the digest must be valid).
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Streams `body` to a temporary file of the store, checking that it
    /// is at most the largest image and that its digest is `announced`.
    /// On any error nothing is left behind.
    pub async fn stage<S, E>(&self, announced: &str, body: S) -> Result<Staged, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        self.stage_at_most(announced, body, self.max_bytes).await
    }

    /// [`ImageStore::stage`] of at most `limit` bytes (and at most the
    /// largest image): more is `TooLarge(limit)`.
    pub async fn stage_at_most<S, E>(&self, announced: &str, body: S, limit: u64) -> Result<Staged, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let limit = limit.min(self.max_bytes);
        self.private_dir().await?;
        let tmp = self.dir.join(format!(".{announced}.{}.part", uuid::Uuid::new_v4().simple()));
        let mut guard = TempGuard(Some(tmp.clone()));
        let mut out = tokio::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).await.map_err(io(&tmp))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(StoreError::TooLarge(limit));
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io(&tmp))?;
        }
        out.sync_all().await.map_err(io(&tmp))?;
        drop(out);
        let actual = hex::encode(hasher.finalize());
        if actual != announced {
            return Err(StoreError::DigestMismatch { announced: announced.to_string(), actual });
        }
        guard.0 = None;
        Ok(Staged { tmp: Some(tmp), target: self.path(announced), size })
    }

    /// Stores `body` as the file of digest `announced` ([`Self::stage`],
    /// then published); returns its size.
    pub async fn put<S, E>(&self, announced: &str, body: S) -> Result<u64, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        self.stage(announced, body).await?.publish().await
    }

    /// Opens a stored file for reading; `None` when the store lacks it.
    pub async fn open(&self, sha256: &str) -> Result<Option<(tokio::fs::File, u64)>, StoreError> {
        let path = self.path(sha256);
        match tokio::fs::File::open(&path).await {
            Ok(f) => {
                let len = f.metadata().await.map_err(io(&path))?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Removes a stored file (idempotent).
    pub async fn remove(&self, sha256: &str) -> Result<(), StoreError> {
        let path = self.path(sha256);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }

    /// The digests of the stored files; with `clean`, every temporary
    /// file goes too (only when no upload runs: at start-up).
    pub async fn list(&self, clean: bool) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut dir = match tokio::fs::read_dir(&self.dir).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        while let Some(entry) = dir.next_entry().await.map_err(io(&self.dir))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_digest(&name) {
                out.push(name);
            } else if clean && name.starts_with('.') && name.ends_with(".part") {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        futures::stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn stores_by_digest_only_what_matches() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("store"), 16);
        let digest = hex::encode(Sha256::digest(b"hello world"));
        assert_eq!(store.put(&digest, chunks(&[b"hello ", b"world"])).await.unwrap(), 11);
        assert_eq!(std::fs::read(store.path(&digest)).unwrap(), b"hello world");
        let (_, len) = store.open(&digest).await.unwrap().unwrap();
        assert_eq!(len, 11);

        let other = hex::encode(Sha256::digest(b"other"));
        match store.put(&other, chunks(&[b"not other"])).await {
            Err(StoreError::DigestMismatch { .. }) => {}
            r => panic!("{r:?}"),
        }
        match store.put(&other, chunks(&[b"0123456789", b"0123456789"])).await {
            Err(StoreError::TooLarge(16)) => {}
            r => panic!("{r:?}"),
        }
        let failing = futures::stream::iter(vec![Ok(Bytes::from_static(b"x")), Err(std::io::Error::other("reset"))]);
        assert!(matches!(store.put(&other, failing).await, Err(StoreError::Body(_))));
        // Nothing half-made is left: only the one good file.
        assert_eq!(store.list(true).await.unwrap(), vec![digest.clone()]);
        assert_eq!(std::fs::read_dir(dir.path().join("store")).unwrap().count(), 1);
        assert!(store.open(&other).await.unwrap().is_none());
        store.remove(&digest).await.unwrap();
        store.remove(&digest).await.unwrap();
        assert!(store.list(true).await.unwrap().is_empty());
        // A staged upload dropped before it is published leaves nothing.
        let staged = store.stage(&digest, chunks(&[b"hello world"])).await.unwrap();
        drop(staged);
        assert_eq!(std::fs::read_dir(dir.path().join("store")).unwrap().count(), 0);
    }

    /// Issue 18, finding 7: private images were 0644 in a 0755 directory.
    #[tokio::test]
    async fn stored_disks_are_the_control_planes_alone() {
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("store"), 1 << 20);
        let digest = hex::encode(Sha256::digest(b"a private disk"));
        store.put(&digest, chunks(&[b"a private disk"])).await.unwrap();
        assert_eq!((mode(&dir.path().join("store")), mode(&store.path(&digest))), (0o700, 0o600));
        // A store an older version left open is closed at start-up.
        std::fs::set_permissions(dir.path().join("store"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(store.path(&digest), std::fs::Permissions::from_mode(0o644)).unwrap();
        store.close_to_others().await.unwrap();
        assert_eq!((mode(&dir.path().join("store")), mode(&store.path(&digest))), (0o700, 0o600));
    }
}
