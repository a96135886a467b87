//! The manifest an image recipe writes next to the files it builds
//! (`images/build-tiny.sh` → `manifest.json`).

use crate::api::{ImageFile, RegisterImageRequest};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ImageManifest {
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("manifest lists {0} but gives no sha256 for it")]
pub struct MissingDigest(pub String);

impl ImageManifest {
    /// The registration of the image whose files lie under `source_url`.
    pub fn register_request(&self, source_url: String, name: Option<String>, default: bool) -> Result<RegisterImageRequest, MissingDigest> {
        let file = |n: &str| -> Result<ImageFile, MissingDigest> {
            let sha256 = self.sha256.get(n).cloned().ok_or_else(|| MissingDigest(n.to_string()))?;
            Ok(ImageFile { name: n.to_string(), sha256 })
        };
        Ok(RegisterImageRequest {
            name: name.unwrap_or_else(|| self.name.clone()),
            description: Some(format!("built by the {} recipe", self.name)),
            source_url,
            kernel: file(&self.kernel)?,
            initrd: self.initrd.as_deref().map(file).transpose()?,
            root_disk: file(&self.root_disk)?,
            cmdline: self.cmdline.clone(),
            default,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_becomes_a_registration() {
        let m: ImageManifest = serde_json::from_str(
            r#"{"name":"nimbus-tiny","kernel":"vmlinuz","initrd":"initrd.img","root_disk":"rootfs.qcow2",
                "cmdline":"console=ttyS0","sha256":{"vmlinuz":"aa","initrd.img":"bb","rootfs.qcow2":"cc"},"extra":1}"#,
        )
        .unwrap();
        let r = m.register_request("file:///x".into(), None, true).unwrap();
        assert_eq!(r.name, "nimbus-tiny");
        assert_eq!(r.kernel, ImageFile { name: "vmlinuz".into(), sha256: "aa".into() });
        assert_eq!(r.initrd.unwrap().sha256, "bb");
        assert_eq!(r.root_disk.sha256, "cc");
        assert!(r.default);
        let mut m2 = m.clone();
        m2.sha256.remove("rootfs.qcow2");
        assert_eq!(m2.register_request("file:///x".into(), None, false), Err(MissingDigest("rootfs.qcow2".into())));
    }
}
