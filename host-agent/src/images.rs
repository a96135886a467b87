//! The per-host cache of base image files, verified by SHA-256.
//!
//! Files are stored by digest (`<cache>/<sha256>`), so two images sharing a
//! kernel share one file, and a file is only ever visible under its name once
//! its content has been checked: downloads go to a temporary name and are
//! renamed into place. Cached files are read-only; guests write only to their
//! own overlays.

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
}

#[derive(Clone)]
pub struct ImageCache {
    dir: PathBuf,
    http: reqwest::Client,
    /// Cached files are QEMU's group's to read, no one else's (see [`crate::access`]).
    qemu: crate::access::QemuUser,
    /// One lock per digest: guests launched together fetch a file once.
    fetching: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl ImageCache {
    pub fn new(dir: PathBuf, http: reqwest::Client, qemu: crate::access::QemuUser) -> ImageCache {
        ImageCache { dir, http, qemu, fetching: Arc::default() }
    }

    /// The local path of `file`, fetching and verifying it first if needed.
    pub async fn ensure(&self, source_url: &str, file: &ImageFile) -> Result<PathBuf, ImageError> {
        let io = |source| ImageError::Io { name: file.name.clone(), source };
        let target = self.dir.join(&file.sha256);
        if tokio::fs::try_exists(&target).await.map_err(io)? {
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
        let result = self.fetch(source_url, file, &tmp).await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        self.qemu.readable(&tmp).await.map_err(io)?;
        tokio::fs::rename(&tmp, &target).await.map_err(io)?;
        tracing::info!(file = %file.name, sha256 = %file.sha256, "image file cached");
        Ok(target)
    }

    async fn fetch(&self, source_url: &str, file: &ImageFile, tmp: &Path) -> Result<(), ImageError> {
        let io = |source| ImageError::Io { name: file.name.clone(), source };
        let base = source_url.trim_end_matches('/');
        let mut hasher = Sha256::new();
        if let Some(dir) = base.strip_prefix("file://") {
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
            let mut resp = self.http.get(format!("{base}/{}", file.name)).send().await.and_then(|r| r.error_for_status()).map_err(http)?;
            let mut out = tokio::fs::File::create(tmp).await.map_err(io)?;
            while let Some(chunk) = resp.chunk().await.map_err(http)? {
                hasher.update(&chunk);
                out.write_all(&chunk).await.map_err(io)?;
            }
            out.sync_all().await.map_err(io)?;
        } else {
            return Err(ImageError::UnsupportedSource { name: file.name.clone(), url: source_url.to_string() });
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
        let url = format!("file://{}", src.display());
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
        let url = format!("file://{}", src.display());
        let results = futures::future::join_all((0..16).map(|_| cache.ensure(&url, &file))).await;
        for r in results {
            assert_eq!(std::fs::read(r.unwrap()).unwrap().len(), body.len());
        }
    }
}
