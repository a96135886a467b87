//! The image recipe's `manifest.json` (written by `images/build-tiny.sh`) and
//! its conversion into a [`RegisterImageRequest`].

use crate::error::CliError;
use nimbus_proto::api::{ImageFile, RegisterImageRequest};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The keys of `manifest.json` the registration needs; the others
/// (`root_disk_format`, `kernel_version`, `modules`, `recipe_*`, ...) are ignored.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub kernel: String,
    #[serde(default)]
    pub initrd: Option<String>,
    pub root_disk: String,
    #[serde(default)]
    pub cmdline: String,
    /// File name → lower-case hex SHA-256.
    pub sha256: BTreeMap<String, String>,
}

/// What the command line adds to the manifest.
#[derive(Debug, Clone, Default)]
pub struct RegisterOptions {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Overrides `file://<manifest dir>`, e.g. an `http://` mirror of the files.
    pub source_url: Option<String>,
    pub default: bool,
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Self, CliError> {
        serde_json::from_str(text).map_err(|e| CliError::Usage(format!("invalid manifest: {e}")))
    }

    fn file(&self, name: &str) -> Result<ImageFile, CliError> {
        let sha = self
            .sha256
            .get(name)
            .ok_or_else(|| CliError::Usage(format!("invalid manifest: no sha256 for {name:?}")))?;
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CliError::Usage(format!("invalid manifest: sha256 of {name:?} is not 64 hex digits")));
        }
        Ok(ImageFile { name: name.to_string(), sha256: sha.to_ascii_lowercase() })
    }

    /// The registration of this manifest's files, found below `source_url`.
    pub fn to_request(&self, source_url: String, opts: &RegisterOptions) -> Result<RegisterImageRequest, CliError> {
        Ok(RegisterImageRequest {
            name: opts.name.clone().unwrap_or_else(|| self.name.clone()),
            description: opts.description.clone(),
            source_url,
            kernel: self.file(&self.kernel)?,
            initrd: self.initrd.as_deref().filter(|s| !s.is_empty()).map(|f| self.file(f)).transpose()?,
            root_disk: self.file(&self.root_disk)?,
            cmdline: self.cmdline.clone(),
            default: opts.default,
        })
    }
}

/// `file://<absolute directory of the manifest>`.
pub fn file_source_url(manifest_path: &Path) -> Result<String, CliError> {
    let abs = std::fs::canonicalize(manifest_path)
        .map_err(|e| CliError::Usage(format!("cannot read manifest {}: {e}", manifest_path.display())))?;
    let dir = abs.parent().ok_or_else(|| CliError::Usage(format!("manifest {} has no directory", abs.display())))?;
    let dir = dir
        .to_str()
        .ok_or_else(|| CliError::Usage(format!("manifest directory {} is not UTF-8", dir.display())))?;
    Ok(format!("file://{dir}"))
}

/// Reads the manifest at `path` and builds its registration.
pub fn load_request(path: &Path, opts: &RegisterOptions) -> Result<RegisterImageRequest, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("cannot read manifest {}: {e}", path.display())))?;
    let manifest = Manifest::parse(&text)?;
    let source_url = match &opts.source_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => file_source_url(path)?,
    };
    manifest.to_request(source_url, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_K: &str = "51349501a3d1ff83836437d2b365fd2d57f2feb8642d315e5181dec23d4c3275";
    const SHA_I: &str = "44c164a8baab94e79754b5aecb49959f516f2db73d4ff8cfb023954b13ce479b";
    const SHA_R: &str = "88edccf24fad45afef8569c5263313e705c7a287d17381bd343fc46ef722161f";

    fn sample() -> String {
        // As images/build-tiny.sh writes it.
        format!(
            r#"{{
  "name": "nimbus-tiny",
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "root_disk": "rootfs.qcow2",
  "root_disk_format": "qcow2",
  "root_disk_virtual_size": "64M",
  "cmdline": "console=ttyS0 quiet",
  "sha256": {{ "vmlinuz": "{SHA_K}", "initrd.img": "{SHA_I}", "rootfs.qcow2": "{SHA_R}" }},
  "kernel_version": "6.1.0-56-cloud-amd64",
  "modules": ["virtio_blk"],
  "recipe_version": 1,
  "recipe_sha256": "00"
}}"#
        )
    }

    #[test]
    fn manifest_becomes_register_request_with_file_url_of_its_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        std::fs::write(&path, sample()).unwrap();
        let req = load_request(&path, &RegisterOptions { default: true, ..Default::default() }).unwrap();
        let abs = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            req,
            RegisterImageRequest {
                name: "nimbus-tiny".into(),
                description: None,
                source_url: format!("file://{}", abs.display()),
                kernel: ImageFile { name: "vmlinuz".into(), sha256: SHA_K.into() },
                initrd: Some(ImageFile { name: "initrd.img".into(), sha256: SHA_I.into() }),
                root_disk: ImageFile { name: "rootfs.qcow2".into(), sha256: SHA_R.into() },
                cmdline: "console=ttyS0 quiet".into(),
                default: true,
            }
        );
        // The request must pass the server's deny_unknown_fields.
        let v = serde_json::to_value(&req).unwrap();
        let back: RegisterImageRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn name_and_source_overrides() {
        let m = Manifest::parse(&sample()).unwrap();
        let opts = RegisterOptions { name: Some("tiny-2".into()), description: Some("d".into()), ..Default::default() };
        let req = m.to_request("http://mirror/tiny".into(), &opts).unwrap();
        assert_eq!(req.name, "tiny-2");
        assert_eq!(req.description.as_deref(), Some("d"));
        assert_eq!(req.source_url, "http://mirror/tiny");
        assert!(!req.default);
    }

    #[test]
    fn missing_digest_or_field_is_a_usage_error() {
        let mut m = Manifest::parse(&sample()).unwrap();
        m.sha256.remove("rootfs.qcow2");
        let e = m.to_request("file:///x".into(), &RegisterOptions::default()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("rootfs.qcow2"), "{e}");
        let e = Manifest::parse(r#"{"name":"x"}"#).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = load_request(Path::new("/nonexistent/manifest.json"), &RegisterOptions::default()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn initrd_is_optional() {
        let text = format!(r#"{{"name":"n","kernel":"k","root_disk":"r","sha256":{{"k":"{SHA_K}","r":"{SHA_R}"}}}}"#);
        let req = Manifest::parse(&text).unwrap().to_request("file:///d".into(), &RegisterOptions::default()).unwrap();
        assert_eq!(req.initrd, None);
        assert_eq!(req.cmdline, "");
    }
}
