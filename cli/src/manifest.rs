//! `register-image --manifest`: reads the image recipe's `manifest.json`
//! (written by `images/build-tiny.sh`, format defined by
//! [`nimbus_proto::image::ImageManifest`]) and turns it into a
//! [`RegisterImageRequest`] with the command line's overrides.

use crate::error::CliError;
use nimbus_proto::api::{ImageFile, RegisterImageRequest};
use nimbus_proto::image::ImageManifest;
use std::path::Path;

/// What the command line adds to the manifest.
#[derive(Debug, Clone, Default)]
pub struct RegisterOptions {
    pub name: Option<String>,
    /// Replaces the description the manifest implies.
    pub description: Option<String>,
    /// Overrides `file://<manifest dir>`, e.g. an `http://` mirror of the files.
    pub source_url: Option<String>,
    pub default: bool,
}

/// Parses `manifest.json`; keys the registration does not need are ignored.
pub fn parse(text: &str) -> Result<ImageManifest, CliError> {
    let mut m: ImageManifest = serde_json::from_str(text).map_err(|e| CliError::Usage(format!("invalid manifest: {e}")))?;
    // `"initrd": ""` means no initrd.
    m.initrd = m.initrd.filter(|s| !s.is_empty());
    Ok(m)
}

/// Digests must be 64 hex digits; sent lower-case, as the API wants them.
fn check_digest(f: &mut ImageFile) -> Result<(), CliError> {
    if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CliError::Usage(format!("invalid manifest: sha256 of {:?} is not 64 hex digits", f.name)));
    }
    f.sha256.make_ascii_lowercase();
    Ok(())
}

/// The registration of `manifest`'s files, found below `source_url`.
pub fn to_request(manifest: &ImageManifest, source_url: String, opts: &RegisterOptions) -> Result<RegisterImageRequest, CliError> {
    let mut req = manifest
        .register_request(source_url, opts.name.clone(), opts.default)
        .map_err(|e| CliError::Usage(format!("invalid manifest: {e}")))?;
    if let Some(d) = &opts.description {
        req.description = Some(d.clone());
    }
    for f in [&mut req.kernel, &mut req.initrd, &mut req.root_disk].into_iter().flatten() {
        check_digest(f)?;
    }
    Ok(req)
}

/// `file://<absolute directory of the manifest>`.
pub fn file_source_url(manifest_path: &Path) -> Result<String, CliError> {
    let abs = std::fs::canonicalize(manifest_path)
        .map_err(|e| CliError::Usage(format!("cannot read manifest {}: {e}", manifest_path.display())))?;
    let dir = abs.parent().ok_or_else(|| CliError::Usage(format!("manifest {} has no directory", abs.display())))?;
    let dir = dir.to_str().ok_or_else(|| CliError::Usage(format!("manifest directory {} is not UTF-8", dir.display())))?;
    Ok(format!("file://{dir}"))
}

/// `file://<absolute path>` of a disk (which must be at that path on every host).
pub fn file_url(path: &Path) -> Result<String, CliError> {
    let abs = std::fs::canonicalize(path).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let abs = abs.to_str().ok_or_else(|| CliError::Usage(format!("{} is not UTF-8", abs.display())))?;
    Ok(format!("file://{abs}"))
}

/// Reads the manifest at `path` and builds its registration.
pub fn load_request(path: &Path, opts: &RegisterOptions) -> Result<RegisterImageRequest, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("cannot read manifest {}: {e}", path.display())))?;
    let manifest = parse(&text)?;
    let source_url = match &opts.source_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => file_source_url(path)?,
    };
    to_request(&manifest, source_url, opts)
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
                description: Some("built by the nimbus-tiny recipe".into()),
                source_url: Some(format!("file://{}", abs.display())),
                boot: Some(nimbus_proto::api::BootStyle::Kernel),
                kernel: Some(ImageFile { name: "vmlinuz".into(), sha256: SHA_K.into() }),
                initrd: Some(ImageFile { name: "initrd.img".into(), sha256: SHA_I.into() }),
                root_disk: Some(ImageFile { name: "rootfs.qcow2".into(), sha256: SHA_R.into() }),
                cmdline: "console=ttyS0 quiet".into(),
                default: true,
                ..Default::default()
            }
        );
        // The request must pass the server's deny_unknown_fields.
        let v = serde_json::to_value(&req).unwrap();
        let back: RegisterImageRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn name_description_and_source_overrides() {
        let m = parse(&sample()).unwrap();
        let opts = RegisterOptions { name: Some("tiny-2".into()), description: Some("d".into()), ..Default::default() };
        let req = to_request(&m, "http://mirror/tiny".into(), &opts).unwrap();
        assert_eq!(req.name, "tiny-2");
        assert_eq!(req.description.as_deref(), Some("d"));
        assert_eq!(req.source_url.as_deref(), Some("http://mirror/tiny"));
        assert!(!req.default);
    }

    #[test]
    fn missing_or_malformed_digest_or_field_is_a_usage_error() {
        let mut m = parse(&sample()).unwrap();
        m.sha256.remove("rootfs.qcow2");
        let e = to_request(&m, "file:///x".into(), &RegisterOptions::default()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("rootfs.qcow2"), "{e}");
        m.sha256.insert("rootfs.qcow2".into(), "abc".into());
        let e = to_request(&m, "file:///x".into(), &RegisterOptions::default()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        let e = parse(r#"{"name":"x"}"#).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = load_request(Path::new("/nonexistent/manifest.json"), &RegisterOptions::default()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn upper_case_digests_are_sent_lower_case() {
        let mut m = parse(&sample()).unwrap();
        m.sha256.insert("vmlinuz".into(), SHA_K.to_ascii_uppercase());
        let req = to_request(&m, "file:///x".into(), &RegisterOptions::default()).unwrap();
        assert_eq!(req.kernel.unwrap().sha256, SHA_K);
    }

    #[test]
    fn initrd_is_optional() {
        let text = format!(r#"{{"name":"n","kernel":"k","root_disk":"r","sha256":{{"k":"{SHA_K}","r":"{SHA_R}"}}}}"#);
        let req = to_request(&parse(&text).unwrap(), "file:///d".into(), &RegisterOptions::default()).unwrap();
        assert_eq!(req.initrd, None);
        assert_eq!(req.cmdline, "");
        let text = format!(r#"{{"name":"n","kernel":"k","initrd":"","root_disk":"r","sha256":{{"k":"{SHA_K}","r":"{SHA_R}"}}}}"#);
        let req = to_request(&parse(&text).unwrap(), "file:///d".into(), &RegisterOptions::default()).unwrap();
        assert_eq!(req.initrd, None);
    }
}
