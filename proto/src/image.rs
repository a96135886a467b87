//! The manifest an image recipe writes next to the files it builds
//! (`images/build-tiny.sh`, `images/build-debian.sh` → `manifest.json`),
//! and what a root disk must be ([`DiskInfo`]).

use crate::api::{BootStyle, ImageFile, RegisterImageRequest};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Whether `s` is a SHA-256 as Nimbus writes them: 64 lower-case hex digits
/// (image files are named by it in caches and the image store).
pub fn is_sha256_hex(s: &str) -> bool {
    crate::is_lower_hex(s, 64)
}

/// What `qemu-img info -f qcow2 --output=json` says of a root disk, as far
/// as Nimbus checks it. A root disk must be a standalone qcow2: one that
/// names a backing file or an external data file would have QEMU, or
/// `qemu-img convert` (run as root for CreateImage), open a file of the
/// host by the name the image's author chose (e.g. `/etc/shadow`) and hand
/// its bytes to the guest or into a new image. Every place a disk enters
/// refuses one that is not standalone: registration (when the control plane
/// can read the file), a host's cache, the image store's uploads.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct DiskInfo {
    pub format: String,
    #[serde(rename = "backing-filename")]
    pub backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    pub full_backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    pub format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct FormatSpecific {
    pub data: Option<FormatData>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct FormatData {
    #[serde(rename = "data-file")]
    pub data_file: Option<String>,
}

impl DiskInfo {
    /// Why this disk may not be a root disk, if it may not.
    pub fn refusal(&self) -> Option<String> {
        if self.format != "qcow2" {
            return Some(format!("it is {}, not qcow2", self.format));
        }
        if let Some(b) = self.backing_filename.as_ref().or(self.full_backing_filename.as_ref()) {
            return Some(format!("it names a backing file ({b}); an image must be standalone"));
        }
        if let Some(d) = self.format_specific.as_ref().and_then(|f| f.data.as_ref()).and_then(|d| d.data_file.as_ref()) {
            return Some(format!("it names an external data file ({d}); an image must be standalone"));
        }
        None
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ImageManifest {
    pub name: String,
    /// `disk`: the image boots its own boot loader (no kernel); absent or
    /// `kernel`: direct kernel boot.
    #[serde(default)]
    pub boot: Option<BootStyle>,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    pub root_disk: String,
    /// Bytes (build-debian.sh writes a number; other forms are ignored).
    #[serde(default)]
    pub root_disk_virtual_size: Option<serde_json::Value>,
    #[serde(default)]
    pub cmdline: String,
    /// File name → lower-case hex SHA-256.
    pub sha256: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest lists {0} but gives no sha256 for it")]
    MissingDigest(String),
    #[error("manifest of a direct-kernel-boot image names no kernel")]
    MissingKernel,
    #[error("manifest of a disk-booted image names a kernel or initrd")]
    KernelOnDiskBoot,
}

impl ImageManifest {
    pub fn boot_style(&self) -> BootStyle {
        self.boot.unwrap_or(BootStyle::Kernel)
    }

    /// The registration of the image whose files lie under `source_url`.
    pub fn register_request(&self, source_url: String, name: Option<String>, default: bool) -> Result<RegisterImageRequest, ManifestError> {
        let file = |n: &str| -> Result<ImageFile, ManifestError> {
            let sha256 = self.sha256.get(n).cloned().ok_or_else(|| ManifestError::MissingDigest(n.to_string()))?;
            Ok(ImageFile { name: n.to_string(), sha256 })
        };
        let boot = self.boot_style();
        let kernel = self.kernel.as_deref().filter(|k| !k.is_empty());
        let initrd = self.initrd.as_deref().filter(|i| !i.is_empty());
        match boot {
            BootStyle::Kernel if kernel.is_none() => return Err(ManifestError::MissingKernel),
            BootStyle::Disk if kernel.is_some() || initrd.is_some() => return Err(ManifestError::KernelOnDiskBoot),
            _ => {}
        }
        Ok(RegisterImageRequest {
            name: name.unwrap_or_else(|| self.name.clone()),
            description: Some(format!("built by the {} recipe", self.name)),
            source_url: Some(source_url),
            boot: Some(boot),
            kernel: kernel.map(file).transpose()?,
            initrd: initrd.map(file).transpose()?,
            root_disk: Some(file(&self.root_disk)?),
            root_disk_size: self.root_disk_virtual_size.as_ref().and_then(serde_json::Value::as_u64),
            cmdline: self.cmdline.clone(),
            default,
            ..Default::default()
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
                "root_disk_virtual_size":"64M",
                "cmdline":"console=ttyS0","sha256":{"vmlinuz":"aa","initrd.img":"bb","rootfs.qcow2":"cc"},"extra":1}"#,
        )
        .unwrap();
        let r = m.register_request("file:///x".into(), None, true).unwrap();
        assert_eq!(r.name, "nimbus-tiny");
        assert_eq!(r.boot, Some(BootStyle::Kernel));
        assert_eq!(r.kernel, Some(ImageFile { name: "vmlinuz".into(), sha256: "aa".into() }));
        assert_eq!(r.initrd.unwrap().sha256, "bb");
        assert_eq!(r.root_disk.unwrap().sha256, "cc");
        assert_eq!(r.root_disk_size, None, "a size that is not a number of bytes is ignored");
        assert!(r.default);
        let mut m2 = m.clone();
        m2.sha256.remove("rootfs.qcow2");
        assert_eq!(m2.register_request("file:///x".into(), None, false), Err(ManifestError::MissingDigest("rootfs.qcow2".into())));
        let mut m3 = m.clone();
        m3.kernel = None;
        assert_eq!(m3.register_request("file:///x".into(), None, false), Err(ManifestError::MissingKernel));
    }

    /// `qemu-img info`'s answers (7.2) for a standalone disk, one with a
    /// backing file and one with an external data file.
    #[test]
    fn only_a_standalone_qcow2_may_be_a_root_disk() {
        let info = |json: &str| serde_json::from_str::<DiskInfo>(json).unwrap().refusal();
        let plain = r#"{"virtual-size":1048576,"filename":"d.qcow2","cluster-size":65536,"format":"qcow2","actual-size":200704,
            "format-specific":{"type":"qcow2","data":{"compat":"1.1","compression-type":"zlib","lazy-refcounts":false,
            "refcount-bits":16,"corrupt":false,"extended-l2":false}},"dirty-flag":false}"#;
        assert_eq!(info(plain), None);
        let backed = r#"{"backing-filename-format":"raw","virtual-size":1048576,"filename":"evil.qcow2","format":"qcow2",
            "format-specific":{"type":"qcow2","data":{"compat":"1.1"}},"full-backing-filename":"/tmp/q/secret.raw",
            "backing-filename":"/tmp/q/secret.raw","dirty-flag":false}"#;
        assert!(info(backed).unwrap().contains("backing file (/tmp/q/secret.raw)"));
        let data = r#"{"virtual-size":1048576,"filename":"evil2.qcow2","format":"qcow2","format-specific":{"type":"qcow2",
            "data":{"compat":"1.1","data-file":"/tmp/q/secret.raw","data-file-raw":true}},"dirty-flag":false}"#;
        assert!(info(data).unwrap().contains("external data file (/tmp/q/secret.raw)"));
        assert!(info(r#"{"format":"raw"}"#).unwrap().contains("not qcow2"));
    }

    /// The Debian recipe's manifest (boot: disk, no kernel).
    #[test]
    fn disk_boot_manifest_becomes_a_registration() {
        let m: ImageManifest = serde_json::from_str(
            r#"{"name":"debian-12-nimbus","boot":"disk","root_disk":"disk.qcow2","root_disk_format":"qcow2",
                "root_disk_virtual_size":2147483648,"kernel_cmdline":"root=UUID=x ro",
                "sha256":{"disk.qcow2":"dd","packages.txt":"ee"}}"#,
        )
        .unwrap();
        let r = m.register_request("file:///img".into(), None, false).unwrap();
        assert_eq!(r.boot, Some(BootStyle::Disk));
        assert_eq!((r.kernel, r.initrd, r.cmdline.as_str()), (None, None, ""));
        assert_eq!(r.root_disk, Some(ImageFile { name: "disk.qcow2".into(), sha256: "dd".into() }));
        assert_eq!(r.root_disk_size, Some(2 << 30));
        let mut bad = m.clone();
        bad.kernel = Some("vmlinuz".into());
        assert_eq!(bad.register_request("file:///img".into(), None, false), Err(ManifestError::KernelOnDiskBoot));
    }
}
