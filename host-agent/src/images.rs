//! The per-host cache of base image files, verified by SHA-256.
//!
//! Files are stored by digest (`<cache>/<sha256>`), so two images sharing a
//! kernel share one file, and a file is only ever visible under its name once
//! its content has been checked: downloads go to a temporary name and are
//! renamed into place. Cached files are read-only; guests write only to their
//! own overlays.
//!
//! A file comes from below an image's source URL (`file://`, `http(s)://`)
//! or, for the images CreateImage made, from the control plane's image
//! store (`GET /v1/agent/images/{sha256}` with the host's credential).
//! Every use refreshes a file's modification time; [`ImageCache::sweep`]
//! removes the files no assignment uses that were last used longer ago
//! than the agent's `--image-cache-ttl-secs`.
//!
//! A root disk must be a standalone qcow2 ([`ImageCache::ensure_disk`],
//! [`crate::disks::check_standalone`]): one naming a backing or external
//! data file never enters the cache, and one already there (cached by an
//! older agent) is checked once per run before use and removed if bad.

use nimbus_proto::api::ImageFile;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image file {name}: checksum mismatch (expected {expected}, got {actual})")]
    Checksum { name: String, expected: String, actual: String },
    #[error("image file {name}: unsupported source URL {url}")]
    UnsupportedSource { name: String, url: String },
    #[error("image file {name}: {source}")]
    Io { name: String, source: std::io::Error },
    #[error("image file {name}: download failed: {source}")]
    Http { name: String, source: reqwest::Error },
    #[error("image file {name}: {source}")]
    NotStandalone { name: String, source: crate::disks::DiskError },
}

/// Where an image's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Below this directory URL.
    Url(String),
    /// The control plane's image store.
    Store,
}

/// How to reach the image store: the control plane's URL, the host's
/// bearer, and the control plane's client (trusting its CA and presenting
/// this host's certificate once it has one). Registered sources are
/// fetched with the cache's own client, which trusts the usual roots.
#[derive(Debug, Clone)]
pub struct StoreAccess {
    pub base: String,
    pub bearer: String,
    pub client: reqwest::Client,
}

#[derive(Clone)]
pub struct ImageCache {
    dir: PathBuf,
    http: reqwest::Client,
    /// Set once the agent holds its credential.
    pub store: Arc<std::sync::RwLock<Option<StoreAccess>>>,
    /// Cached files are QEMU's group's to read, no one else's (see [`crate::access`]).
    qemu: crate::access::QemuUser,
    /// One lock per digest: guests launched together fetch a file once.
    fetching: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// Cached root disks found standalone during this run.
    vetted: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl ImageCache {
    pub fn new(dir: PathBuf, http: reqwest::Client, qemu: crate::access::QemuUser) -> ImageCache {
        ImageCache { dir, http, qemu, fetching: Arc::default(), store: Arc::default(), vetted: Arc::default() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Marks a cached file used now (the sweep keeps recently used files).
    async fn touch(path: &Path) {
        let path = path.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || {
            std::fs::File::options().write(true).open(&path)?.set_modified(std::time::SystemTime::now())
        })
        .await;
    }

    /// Takes a file this host made (CreateImage) into the cache under its
    /// digest, so that this host never fetches it back.
    pub async fn adopt(&self, file: &Path, sha256: &str) -> std::io::Result<PathBuf> {
        self.qemu.private_dir(&self.dir).await?;
        let target = self.dir.join(sha256);
        self.qemu.readable(file).await?;
        tokio::fs::rename(file, &target).await?;
        Ok(target)
    }

    /// Uploads the disk of an image this host made to the control plane's
    /// image store (`PUT /v1/agent/images/{image_id}`), streamed.
    pub async fn upload(&self, image_id: &str, file: &Path, sha256: &str, virtual_size: u64) -> Result<(), String> {
        let access = self.store.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or("no credential yet")?;
        let f = tokio::fs::File::open(file).await.map_err(|e| e.to_string())?;
        let len = f.metadata().await.map_err(|e| e.to_string())?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20));
        let resp = access
            .client
            .put(format!("{}/v1/agent/images/{image_id}", access.base.trim_end_matches('/')))
            .bearer_auth(&access.bearer)
            .header(nimbus_proto::agent::UPLOAD_SHA256_HEADER, sha256)
            .header(nimbus_proto::agent::UPLOAD_VIRTUAL_SIZE_HEADER, virtual_size.to_string())
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status();
        let body: Option<nimbus_proto::api::ErrorBody> = resp.json().await.ok();
        Err(body.map(|b| format!("{}: {}", b.code, b.message)).unwrap_or_else(|| status.to_string()))
    }

    /// Whether a fetch of this digest is under way.
    fn busy(&self, sha256: &str) -> bool {
        let map = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        map.get(sha256).is_some_and(|l| l.try_lock().is_err())
    }

    /// Removes the cached files (by digest) not in `in_use` whose last use
    /// is older than `ttl`; returns the digests removed.
    /// Returns the digests removed (leftovers of interrupted work go too,
    /// by the same age rule, and are not listed).
    pub async fn sweep(&self, in_use: &std::collections::HashSet<String>, ttl: std::time::Duration) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(mut dir) = tokio::fs::read_dir(&self.dir).await else { return removed };
        let now = std::time::SystemTime::now();
        while let Ok(Some(entry)) = dir.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Leftovers of a fetch or an image make that a crash cut short
            // (a running one writes its file all the time, so it is never this old).
            let leftover = name.starts_with('.') && (name.ends_with(".part") || name.starts_with(".make-"));
            let is_digest = nimbus_proto::image::is_sha256_hex(&name);
            if !(is_digest || leftover) || in_use.contains(&name) || self.busy(&name) {
                continue;
            }
            let Ok(modified) = entry.metadata().await.and_then(|m| m.modified()) else { continue };
            if now.duration_since(modified).unwrap_or_default() >= ttl && tokio::fs::remove_file(entry.path()).await.is_ok() {
                if leftover {
                    tracing::info!(file = %name, "leftover of an interrupted fetch or image removed from the cache");
                } else {
                    tracing::info!(sha256 = %name, "unused image file removed from the cache");
                    removed.push(name);
                }
            }
        }
        removed
    }

    /// The local path of `file` (a kernel or an initrd), fetching and
    /// verifying it first if needed.
    pub async fn ensure(&self, source: &Source, file: &ImageFile) -> Result<PathBuf, ImageError> {
        self.ensure_file(source, file, false).await
    }

    /// [`ImageCache::ensure`] for a root disk, which must also be a
    /// standalone qcow2 (checked before it enters the cache, and once per
    /// run for one already there, which is removed if it is not).
    pub async fn ensure_disk(&self, source: &Source, file: &ImageFile) -> Result<PathBuf, ImageError> {
        let path = self.ensure_file(source, file, true).await?;
        if self.vetted.lock().unwrap_or_else(|p| p.into_inner()).contains(&file.sha256) {
            return Ok(path);
        }
        match crate::disks::check_standalone(&path).await {
            Ok(()) => {}
            Err(source @ crate::disks::DiskError::NotStandalone { .. }) => {
                let _ = tokio::fs::remove_file(&path).await;
                tracing::warn!(file = %file.name, sha256 = %file.sha256, error = %source, "a cached root disk is not standalone: removed");
                return Err(ImageError::NotStandalone { name: file.name.clone(), source });
            }
            // The check could not run (qemu-img missing?): this host's problem, not the image's.
            Err(e) => return Err(ImageError::Io { name: file.name.clone(), source: std::io::Error::other(e.to_string()) }),
        }
        self.vetted.lock().unwrap_or_else(|p| p.into_inner()).insert(file.sha256.clone());
        Ok(path)
    }

    async fn ensure_file(&self, source: &Source, file: &ImageFile, disk: bool) -> Result<PathBuf, ImageError> {
        let io = |source| ImageError::Io { name: file.name.clone(), source };
        let target = self.dir.join(&file.sha256);
        if tokio::fs::try_exists(&target).await.map_err(io)? {
            Self::touch(&target).await;
            return Ok(target);
        }
        let lock = {
            let mut map = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(file.sha256.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if tokio::fs::try_exists(&target).await.map_err(io)? {
            return Ok(target);
        }
        self.qemu.private_dir(&self.dir).await.map_err(io)?;
        let tmp = self.dir.join(format!(".{}.{}.part", file.sha256, std::process::id()));
        let mut result = self.fetch(source, file, &tmp).await;
        if let (Ok(()), true) = (&result, disk) {
            // Before it has a name in the cache: nothing opens what it names.
            result = match crate::disks::check_standalone(&tmp).await {
                Ok(()) => {
                    self.vetted.lock().unwrap_or_else(|p| p.into_inner()).insert(file.sha256.clone());
                    Ok(())
                }
                Err(source @ crate::disks::DiskError::NotStandalone { .. }) => {
                    Err(ImageError::NotStandalone { name: file.name.clone(), source })
                }
                Err(e) => Err(ImageError::Io { name: file.name.clone(), source: std::io::Error::other(e.to_string()) }),
            };
        }
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        self.qemu.readable(&tmp).await.map_err(io)?;
        tokio::fs::rename(&tmp, &target).await.map_err(io)?;
        tracing::info!(file = %file.name, sha256 = %file.sha256, "image file cached");
        Ok(target)
    }

    async fn fetch(&self, source: &Source, file: &ImageFile, tmp: &Path) -> Result<(), ImageError> {
        let io = |source| ImageError::Io { name: file.name.clone(), source };
        let (base, bearer, client) = match source {
            Source::Url(url) => (url.trim_end_matches('/').to_string(), None, self.http.clone()),
            Source::Store => {
                let access = self.store.read().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(access) = access else {
                    return Err(ImageError::UnsupportedSource {
                        name: file.name.clone(),
                        url: "the image store (no credential yet)".into(),
                    });
                };
                (format!("{}/v1/agent/images", access.base.trim_end_matches('/')), Some(access.bearer), access.client)
            }
        };
        let base = base.as_str();
        let remote_name = if bearer.is_some() { file.sha256.as_str() } else { file.name.as_str() };
        let mut hasher = Sha256::new();
        if let (Some(dir), None) = (base.strip_prefix("file://"), &bearer) {
            let src = Path::new(dir).join(&file.name);
            let mut input = tokio::fs::File::open(&src).await.map_err(io)?;
            let mut out = tokio::fs::File::create(tmp).await.map_err(io)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut input, &mut buf).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).await.map_err(io)?;
            }
            out.sync_all().await.map_err(io)?;
        } else if base.starts_with("http://") || base.starts_with("https://") {
            let http = |source| ImageError::Http { name: file.name.clone(), source };
            let mut req = client.get(format!("{base}/{remote_name}"));
            if let Some(b) = &bearer {
                req = req.bearer_auth(b);
            }
            let mut resp = req.send().await.and_then(|r| r.error_for_status()).map_err(http)?;
            let mut out = tokio::fs::File::create(tmp).await.map_err(io)?;
            while let Some(chunk) = resp.chunk().await.map_err(http)? {
                hasher.update(&chunk);
                out.write_all(&chunk).await.map_err(io)?;
            }
            out.sync_all().await.map_err(io)?;
        } else {
            return Err(ImageError::UnsupportedSource { name: file.name.clone(), url: base.to_string() });
        }
        let actual = hex::encode(hasher.finalize());
        if actual != file.sha256 {
            return Err(ImageError::Checksum { name: file.name.clone(), expected: file.sha256.clone(), actual });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: crate::access::QemuUser = crate::access::QemuUser { uid: 4242, gid: 4343 };

    #[tokio::test]
    async fn verifies_and_caches_by_digest() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("kernel"), b"kernel bytes").unwrap();
        let good = ImageFile { name: "kernel".into(), sha256: hex::encode(Sha256::digest(b"kernel bytes")) };
        let cache = ImageCache::new(dir.join("cache"), reqwest::Client::new(), QEMU);
        let url = Source::Url(format!("file://{}", src.display()));
        let path = cache.ensure(&url, &good).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"kernel bytes");
        assert!(path.ends_with(&good.sha256));
        // QEMU's group reads a cached file and cannot write it; no one else reads it.
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 4343, 0o640));
        let m = std::fs::metadata(dir.join("cache")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 4343, 0o710));

        let bad = ImageFile { name: "kernel".into(), sha256: "0".repeat(64) };
        match cache.ensure(&url, &bad).await {
            Err(ImageError::Checksum { .. }) => {}
            other => panic!("expected a checksum error, got {other:?}"),
        }
        assert!(!dir.join("cache").join("0".repeat(64)).exists(), "a bad file must not enter the cache");

        // The sweep keeps files in use and recently used ones, and removes the rest.
        let in_use: std::collections::HashSet<String> = [good.sha256.clone()].into();
        let leftover = cache.dir().join(".make-ami-0123456789abcdef0.qcow2");
        std::fs::write(&leftover, b"half an image").unwrap();
        assert!(cache.sweep(&in_use, std::time::Duration::ZERO).await.is_empty());
        assert!(!leftover.exists(), "an old leftover goes");
        std::fs::write(&leftover, b"half an image").unwrap();
        assert!(cache.sweep(&Default::default(), std::time::Duration::from_secs(3600)).await.is_empty());
        assert!(leftover.exists(), "a recent one stays (its make may be running)");
        assert_eq!(cache.sweep(&Default::default(), std::time::Duration::ZERO).await, vec![good.sha256.clone()]);
        assert!(!path.exists());
        // Fetched again when needed.
        assert_eq!(std::fs::read(cache.ensure(&url, &good).await.unwrap()).unwrap(), b"kernel bytes");
    }

    /// Issue 18, finding 6: a root disk naming a backing file (here a host
    /// file, `secret.raw`) never enters the cache, nor stays there if an
    /// older agent cached it; a standalone one does.
    #[tokio::test]
    async fn a_root_disk_naming_a_backing_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, cache_dir) = (tmp.path().join("src"), tmp.path().join("cache"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(tmp.path().join("secret.raw"), b"HOST-SECRET").unwrap();
        let qemu_img = |args: &[&str]| assert!(std::process::Command::new("qemu-img").args(args).status().unwrap().success());
        let (evil, good) = (src.join("evil.qcow2"), src.join("good.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            tmp.path().join("secret.raw").to_str().unwrap(),
            "-F",
            "raw",
            evil.to_str().unwrap(),
            "1M",
        ]);
        qemu_img(&["create", "-q", "-f", "qcow2", good.to_str().unwrap(), "1M"]);
        let file = |p: &Path| ImageFile {
            name: p.file_name().unwrap().to_string_lossy().into(),
            sha256: hex::encode(Sha256::digest(std::fs::read(p).unwrap())),
        };
        let cache = ImageCache::new(cache_dir.clone(), reqwest::Client::new(), QEMU);
        let url = Source::Url(format!("file://{}", src.display()));
        match cache.ensure_disk(&url, &file(&evil)).await {
            Err(ImageError::NotStandalone { name, .. }) => assert_eq!(name, "evil.qcow2"),
            other => panic!("not refused: {other:?}"),
        }
        assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 0, "nothing of it in the cache");
        cache.ensure_disk(&url, &file(&good)).await.unwrap();
        // Cached before the check existed: refused at its next use, and removed.
        let old = cache_dir.join(file(&evil).sha256);
        std::fs::copy(&evil, &old).unwrap();
        assert!(matches!(cache.ensure_disk(&url, &file(&evil)).await, Err(ImageError::NotStandalone { .. })));
        assert!(!old.exists());
    }

    #[tokio::test]
    async fn concurrent_fetches_of_one_file_all_succeed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let body = vec![7u8; 3 << 20];
        std::fs::write(src.join("disk"), &body).unwrap();
        let file = ImageFile { name: "disk".into(), sha256: hex::encode(Sha256::digest(&body)) };
        let cache = ImageCache::new(dir.join("cache"), reqwest::Client::new(), QEMU);
        let url = Source::Url(format!("file://{}", src.display()));
        let results = futures::future::join_all((0..16).map(|_| cache.ensure(&url, &file))).await;
        for r in results {
            assert_eq!(std::fs::read(r.unwrap()).unwrap().len(), body.len());
        }
    }
}
