//! Images: registration and lookup. An image is a set of files (kernel,
//! optional initrd, qcow2 root disk) under a source URL, each pinned by its
//! SHA-256; agents fetch and verify them into their cache.

use super::{Caller, Service};
use crate::error::{Result, ServiceError};
use crate::ids;
use nimbus_proto::api::{Image, ImageFile, RegisterImageRequest};

#[derive(sqlx::FromRow)]
pub(crate) struct ImageRow {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub description: Option<String>,
    pub source_url: String,
    pub kernel: String,
    pub kernel_sha256: String,
    pub initrd: Option<String>,
    pub initrd_sha256: Option<String>,
    pub root_disk: String,
    pub root_disk_sha256: String,
    pub cmdline: String,
    pub is_default: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

pub(crate) const IMAGE_COLUMNS: &str = "id, account_id, name, description, source_url, kernel, kernel_sha256, initrd, \
     initrd_sha256, root_disk, root_disk_sha256, cmdline, is_default, created_at";

/// An optional image file stored as two nullable columns.
pub(crate) fn optional_file(name: Option<String>, sha256: Option<String>) -> Option<ImageFile> {
    match (name, sha256) {
        (Some(name), Some(sha256)) => Some(ImageFile { name, sha256 }),
        _ => None,
    }
}

impl From<ImageRow> for Image {
    fn from(r: ImageRow) -> Self {
        Image {
            image_id: r.id,
            name: r.name,
            description: r.description,
            owner_id: r.account_id,
            source_url: Some(r.source_url),
            kernel: ImageFile { name: r.kernel, sha256: r.kernel_sha256 },
            initrd: optional_file(r.initrd, r.initrd_sha256),
            root_disk: ImageFile { name: r.root_disk, sha256: r.root_disk_sha256 },
            cmdline: r.cmdline,
            default: r.is_default,
            state: "available".to_string(),
            creation_date: r.created_at,
        }
    }
}

fn validate_file(what: &str, f: &ImageFile) -> Result<()> {
    let name_ok = !f.name.is_empty()
        && f.name.len() <= 255
        && f.name != "."
        && f.name != ".."
        && f.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if !name_ok {
        return Err(ServiceError::InvalidParameterValue(format!(
            "{what}.name {:?} must be a plain file name (letters, digits, '.', '_', '-', '+')",
            f.name
        )));
    }
    if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(ServiceError::InvalidParameterValue(format!("{what}.sha256 must be 64 lower-case hex digits")));
    }
    Ok(())
}

pub fn validate_register(req: &RegisterImageRequest) -> Result<()> {
    if req.name.is_empty() || req.name.len() > 128 || !req.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"()[]. /'@_-".contains(&b)) {
        return Err(ServiceError::InvalidParameterValue(
            "name must be 1 to 128 characters: letters, digits, spaces and ()[]./'@_-".into(),
        ));
    }
    if req.description.as_ref().is_some_and(|d| d.len() > 255) {
        return Err(ServiceError::InvalidParameterValue("description is limited to 255 characters".into()));
    }
    let scheme_ok = ["file:///", "http://", "https://"].iter().any(|s| req.source_url.starts_with(s));
    if !scheme_ok || req.source_url.len() > 2048 || req.source_url.contains("..") {
        return Err(ServiceError::InvalidParameterValue(
            "source_url must be a file:///, http:// or https:// URL of the directory holding the image files".into(),
        ));
    }
    validate_file("kernel", &req.kernel)?;
    if let Some(initrd) = &req.initrd {
        validate_file("initrd", initrd)?;
    }
    validate_file("root_disk", &req.root_disk)?;
    if req.cmdline.len() > 1024 || req.cmdline.chars().any(|c| c.is_control()) {
        return Err(ServiceError::InvalidParameterValue("cmdline must be at most 1024 printable characters".into()));
    }
    Ok(())
}

impl Service {
    pub async fn register_image(&self, caller: &Caller, req: RegisterImageRequest) -> Result<Image> {
        validate_register(&req)?;
        let mut tx = self.db.begin().await?;
        if req.default {
            sqlx::query("UPDATE images SET is_default = false WHERE is_default").execute(&mut *tx).await?;
        }
        let row = sqlx::query_as::<_, ImageRow>(&format!(
            "INSERT INTO images (id, account_id, name, description, source_url, kernel, kernel_sha256, initrd, \
             initrd_sha256, root_disk, root_disk_sha256, cmdline, is_default) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13) RETURNING {IMAGE_COLUMNS}"
        ))
        .bind(ids::new_id(ids::IMAGE))
        .bind(&caller.account_id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(&req.source_url)
        .bind(&req.kernel.name)
        .bind(&req.kernel.sha256)
        .bind(req.initrd.as_ref().map(|f| &f.name))
        .bind(req.initrd.as_ref().map(|f| &f.sha256))
        .bind(&req.root_disk.name)
        .bind(&req.root_disk.sha256)
        .bind(&req.cmdline)
        .bind(req.default)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            if crate::db::is_unique_violation(&e, "images_account_id_name_key") {
                ServiceError::ImageAlreadyExists(req.name.clone())
            } else {
                e.into()
            }
        })?;
        tx.commit().await?;
        tracing::info!(image_id = %row.id, name = %row.name, "image registered");
        Ok(row.into())
    }

    /// All images, or the named ones (each must exist).
    /// The images `caller` may see (all of them today: images are the
    /// operator's and public), each with its source for the operator only.
    pub async fn describe_images(&self, caller: &Caller, ids: &[String]) -> Result<Vec<Image>> {
        let rows = sqlx::query_as::<_, ImageRow>(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY created_at, id"))
            .fetch_all(&self.db)
            .await?;
        let mut images: Vec<Image> = rows.into_iter().map(Into::into).collect();
        if let Some(missing) = ids.iter().find(|id| !images.iter().any(|i| &i.image_id == *id)) {
            return Err(if ids::is_valid(ids::IMAGE, missing) {
                ServiceError::ImageNotFound(missing.clone())
            } else {
                ServiceError::ImageIdMalformed(missing.clone())
            });
        }
        if !ids.is_empty() {
            images.retain(|i| ids.contains(&i.image_id));
        }
        if !caller.admin {
            for i in &mut images {
                i.source_url = None;
            }
        }
        Ok(images)
    }

    /// The image named by `id`, or the default image when `id` is `None`.
    pub async fn image(&self, id: Option<&str>) -> Result<Image> {
        let row = match id {
            Some(id) => {
                if !ids::is_valid(ids::IMAGE, id) {
                    return Err(ServiceError::ImageIdMalformed(id.to_string()));
                }
                sqlx::query_as::<_, ImageRow>(&format!("SELECT {IMAGE_COLUMNS} FROM images WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.db)
                    .await?
                    .ok_or_else(|| ServiceError::ImageNotFound(id.to_string()))?
            }
            None => sqlx::query_as::<_, ImageRow>(&format!("SELECT {IMAGE_COLUMNS} FROM images WHERE is_default"))
                .fetch_optional(&self.db)
                .await?
                .ok_or_else(|| ServiceError::MissingParameter("image_id (no default image is registered)".into()))?,
        };
        Ok(row.into())
    }
}
