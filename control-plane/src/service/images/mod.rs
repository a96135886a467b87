//! Images: registration, visibility, description with EC2's filters,
//! CreateImage (an instance's disk made into a new image) and
//! DeregisterImage.
//!
//! An image is a set of files, each pinned by its SHA-256: a root disk
//! (qcow2, the backing file of every instance's overlay) and, for direct
//! kernel boot, a kernel and an initrd. A registered image's files lie below
//! a `file://` or `http(s)://` source; an image CreateImage made has its root
//! disk in the control plane's image store. Agents fetch and verify every
//! file into their cache.
//!
//! Visibility: a public image is every account's to see and launch; a
//! private one only its owner's. Another account's private image, or a
//! deregistered one, answers exactly as a missing one.
//!
//! CreateImage records the image `pending` with its source instance and
//! host, and bumps the instance (its assignment then carries the request,
//! see `nimbus_proto::agent::ImageTask`). The instance's agent flattens the
//! disk and uploads it ([`Service::upload_image`]), which makes the image
//! `available`; or reports why it could not (`failed`). A pending image
//! whose instance is terminated first fails (in the report transaction that
//! confirms the termination).
//!
//! By job: this file the rows, registration, validation, DescribeImages and
//! the image of a launch; [`create`] CreateImage and DeregisterImage;
//! [`store`] the made images' disks in the image store (uploads, downloads,
//! removal).

mod create;
mod store;

use super::{Caller, Service, ADMIN_ACCOUNT};
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::image_store::is_digest;
use nimbus_proto::api::{BootStyle, Image, ImageFile, RegisterImageRequest, ResourceTag};

#[derive(sqlx::FromRow)]
pub(crate) struct ImageRow {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub description: Option<String>,
    pub source_url: Option<String>,
    pub boot: String,
    pub kernel: Option<String>,
    pub kernel_sha256: Option<String>,
    pub initrd: Option<String>,
    pub initrd_sha256: Option<String>,
    pub root_disk: String,
    pub root_disk_sha256: Option<String>,
    pub root_disk_size: Option<i64>,
    pub cmdline: String,
    pub is_default: bool,
    pub is_public: bool,
    pub state: String,
    pub state_reason: Option<String>,
    pub source_instance_id: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

pub(crate) const IMAGE_COLUMNS: &str = "id, account_id, name, description, source_url, boot, kernel, kernel_sha256, initrd, \
     initrd_sha256, root_disk, root_disk_sha256, root_disk_size, cmdline, is_default, is_public, state, state_reason, \
     source_instance_id, created_at";

/// An optional image file stored as two nullable columns.
pub(crate) fn optional_file(name: Option<String>, sha256: Option<String>) -> Option<ImageFile> {
    match (name, sha256) {
        (Some(name), Some(sha256)) => Some(ImageFile { name, sha256 }),
        _ => None,
    }
}

pub(crate) fn parse_boot(s: &str) -> Result<BootStyle> {
    s.parse().map_err(|e| ServiceError::Internal(format!("bad boot style in database: {e}")))
}

impl ImageRow {
    fn into_api(self, operator: bool) -> Result<Image> {
        Ok(Image {
            image_id: self.id,
            name: self.name,
            description: self.description,
            owner_id: self.account_id,
            source_url: self.source_url.filter(|_| operator),
            boot: parse_boot(&self.boot)?,
            kernel: optional_file(self.kernel, self.kernel_sha256),
            initrd: optional_file(self.initrd, self.initrd_sha256),
            root_disk: self.root_disk_sha256.map(|sha256| ImageFile { name: self.root_disk, sha256 }),
            root_disk_size: self.root_disk_size.map(|s| s as u64),
            cmdline: self.cmdline,
            default: self.is_default,
            public: self.is_public,
            state: self.state,
            state_reason: self.state_reason,
            source_instance_id: self.source_instance_id,
            creation_date: self.created_at,
            tags: Vec::new(),
        })
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
    if !is_digest(&f.sha256) {
        return Err(ServiceError::InvalidParameterValue(format!("{what}.sha256 must be 64 lower-case hex digits")));
    }
    Ok(())
}

/// EC2's rule for image names: 3 to 128 letters, digits and `()[] ./-'@_`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = (3..=128).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"()[]. /'@_-".contains(&b));
    if !ok {
        return Err(ServiceError::ImageNameMalformed(format!(
            "Invalid image name {name:?}: 3 to 128 characters, letters, digits, spaces and ()[]./'@_-"
        )));
    }
    Ok(())
}

fn validate_description(d: &Option<String>) -> Result<()> {
    if d.as_ref().is_some_and(|d| d.len() > 255 || d.chars().any(char::is_control)) {
        return Err(ServiceError::InvalidParameterValue("description is limited to 255 printable characters".into()));
    }
    Ok(())
}

fn validate_url(what: &str, url: &str) -> Result<()> {
    let scheme_ok = ["file:///", "http://", "https://"].iter().any(|s| url.starts_with(s));
    if !scheme_ok || url.len() > 2048 || url.contains("..") || url.contains(['?', '#']) || url.chars().any(|c| c.is_control() || c == ' ') {
        return Err(ServiceError::InvalidParameterValue(format!(
            "{what} must be a file:///, http:// or https:// URL without query, fragment or '..'"
        )));
    }
    Ok(())
}

/// A registration, checked and in one shape whatever its form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    pub name: String,
    pub description: Option<String>,
    pub boot: BootStyle,
    pub source_url: String,
    pub kernel: Option<ImageFile>,
    pub initrd: Option<ImageFile>,
    pub root_disk: ImageFile,
    pub root_disk_size: Option<i64>,
    pub cmdline: String,
    pub default: bool,
    pub public: bool,
    pub owner_id: String,
}

/// Checks a registration and brings its two forms (files below a
/// directory, or one qcow2 at a URL) to one.
pub fn validate_register(req: &RegisterImageRequest) -> Result<NewImage> {
    let (source_url, root_disk) = match (&req.source_url, &req.root_disk, &req.disk_url, &req.sha256) {
        (Some(source), Some(root), None, None) => {
            validate_url("source_url", source)?;
            (source.trim_end_matches('/').to_string(), root.clone())
        }
        (None, None, Some(url), Some(sha256)) => {
            validate_url("disk_url", url)?;
            let (dir, file) = url.rsplit_once('/').unwrap_or_default();
            let dir = if dir == "file://" { "file:///".to_string() } else { dir.to_string() };
            (dir, ImageFile { name: file.to_string(), sha256: sha256.clone() })
        }
        (None, None, Some(_), None) => return Err(ServiceError::MissingParameter("sha256 (of the file at disk_url)".into())),
        (None, None, None, _) => return Err(ServiceError::MissingParameter("source_url and root_disk, or disk_url and sha256".into())),
        _ => {
            return Err(ServiceError::InvalidParameterCombination(
                "give either source_url with root_disk (and kernel), or disk_url with sha256".into(),
            ))
        }
    };
    validate_file("root_disk", &root_disk)?;
    if let Some(kernel) = &req.kernel {
        validate_file("kernel", kernel)?;
    }
    if let Some(initrd) = &req.initrd {
        validate_file("initrd", initrd)?;
    }
    let boot = req.boot.unwrap_or(if req.kernel.is_some() { BootStyle::Kernel } else { BootStyle::Disk });
    match boot {
        BootStyle::Kernel if req.kernel.is_none() => {
            return Err(ServiceError::MissingParameter("kernel (of a direct-kernel-boot image)".into()))
        }
        BootStyle::Disk if req.kernel.is_some() || req.initrd.is_some() || !req.cmdline.is_empty() => {
            return Err(ServiceError::InvalidParameterCombination(
                "a disk-booted image boots its own boot loader: no kernel, initrd or cmdline".into(),
            ))
        }
        _ => {}
    }
    if req.cmdline.len() > 1024 || req.cmdline.chars().any(|c| c.is_control()) {
        return Err(ServiceError::InvalidParameterValue("cmdline must be at most 1024 printable characters".into()));
    }
    let root_disk_size = match req.root_disk_size {
        Some(s) if s == 0 || s > i64::MAX as u64 => return Err(ServiceError::InvalidParameterValue("root_disk_size out of range".into())),
        s => s.map(|s| s as i64),
    };
    validate_description(&req.description)?;
    validate_name(&req.name)?;
    let owner_id = req.owner_id.clone().unwrap_or_else(|| ADMIN_ACCOUNT.to_string());
    if owner_id.len() != 12 || !owner_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ServiceError::InvalidParameterValue(format!("owner_id {owner_id:?} is not an account id (12 digits)")));
    }
    let public = req.public.unwrap_or(owner_id == ADMIN_ACCOUNT);
    if req.default && !public {
        return Err(ServiceError::InvalidParameterCombination("the default image must be public".into()));
    }
    Ok(NewImage {
        name: req.name.clone(),
        description: req.description.clone(),
        boot,
        source_url,
        kernel: req.kernel.clone(),
        initrd: req.initrd.clone(),
        root_disk,
        root_disk_size,
        cmdline: req.cmdline.clone(),
        default: req.default,
        public,
        owner_id,
    })
}

/// DescribeImages' selection. Every present part must match.
#[derive(Debug, Clone, Default)]
pub struct ImageQuery {
    /// `ImageId.N`: each must exist and be visible.
    pub image_ids: Vec<String>,
    /// `Owner.N`: `self`, `amazon` (the operator's images), or account ids.
    pub owners: Vec<String>,
    /// `ExecutableBy.N`: `self`, `all` (public images) or account ids: an
    /// image is executable by an account when it is public or the account's.
    pub executable_by: Vec<String>,
    /// `Filter.N`: `name` (`*` and `?` wildcards), `state`, `image-id`,
    /// `owner-id`, `is-public`, `description`, `tag:KEY`, `tag-key`, and
    /// the constant `architecture` (x86_64), `image-type` (machine),
    /// `root-device-type` (ebs), `virtualization-type` (hvm),
    /// `hypervisor` (kvm).
    pub filters: Vec<(String, Vec<String>)>,
}

/// An EC2 filter value with `*` and `?` as a `LIKE` pattern (`\` escapes).
fn like_pattern(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() + 4);
    let mut chars = glob.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' => {
                out.push('\\');
                out.push(c);
            }
            '\\' => match chars.next() {
                Some(n @ ('*' | '?')) => out.push(n),
                Some(n) => {
                    out.push_str("\\\\");
                    if n == '%' || n == '_' || n == '\\' {
                        out.push('\\');
                    }
                    out.push(n);
                }
                None => out.push_str("\\\\"),
            },
            c => out.push(c),
        }
    }
    out
}

/// An account id named in a query: `self` is the caller's.
fn account_ref(caller: &Caller, v: &str) -> Result<String> {
    match v {
        "self" => Ok(caller.account_id.clone()),
        // The operator's images are this cloud's own, as Amazon's are EC2's.
        "amazon" => Ok(ADMIN_ACCOUNT.to_string()),
        id if id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit()) => Ok(id.to_string()),
        other => Err(ServiceError::InvalidParameterValue(format!("{other:?} is not self, amazon or an account id"))),
    }
}

/// The filters DescribeImages answers by constant (every image has these).
const CONSTANT_FILTERS: &[(&str, &str)] = &[
    ("architecture", "x86_64"),
    ("image-type", "machine"),
    ("root-device-type", "ebs"),
    ("virtualization-type", "hvm"),
    ("hypervisor", "kvm"),
];

/// The images a caller sees ($1: operator, $2: account): not deregistered, and public, its own, or any for the operator.
const VISIBLE: &str = "state <> 'deregistered' AND ($1 OR is_public OR account_id = $2)";

/// An account's image names are unique among its images that are not
/// deregistered (`images_account_name`).
fn name_taken(e: sqlx::Error, name: &str) -> ServiceError {
    if crate::db::Constraint::ImageNamePerAccount.violated_by(&e) {
        ServiceError::ImageAlreadyExists(name.to_string())
    } else {
        e.into()
    }
}

/// An upload that does not fit what the account's images may take.
fn over_quota(account_id: &str, left: u64) -> ServiceError {
    ServiceError::ResourceLimitExceeded(format!(
        "the disk is larger than the {left} bytes of image storage account {account_id} has left; deregister unused images or ask for a higher limit"
    ))
}

impl Service {
    /// Registers an image (operator): its files are fetched by the hosts
    /// that launch it, which verify every digest.
    pub async fn register_image(&self, caller: &Caller, req: RegisterImageRequest) -> Result<Image> {
        if !caller.admin {
            return Err(ServiceError::Unauthorized("You are not authorized to perform this operation (operator only)".into()));
        }
        let new = validate_register(&req)?;
        self.check_registered_disk(&new).await?;
        let mut tx = self.db.begin().await?;
        let owner: Option<(String,)> =
            sqlx::query_as("SELECT id FROM accounts WHERE id = $1").bind(&new.owner_id).fetch_optional(&mut *tx).await?;
        if owner.is_none() {
            return Err(ServiceError::AccountNotFound(new.owner_id.clone()));
        }
        if new.default {
            sqlx::query("UPDATE images SET is_default = false WHERE is_default").execute(&mut *tx).await?;
        }
        let row = sqlx::query_as::<_, ImageRow>(&format!(
            "INSERT INTO images (id, account_id, name, description, source_url, boot, kernel, kernel_sha256, initrd, \
             initrd_sha256, root_disk, root_disk_sha256, root_disk_size, cmdline, is_default, is_public) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16) RETURNING {IMAGE_COLUMNS}"
        ))
        .bind(ids::new_id(ids::IMAGE))
        .bind(&new.owner_id)
        .bind(&new.name)
        .bind(&new.description)
        .bind(&new.source_url)
        .bind(new.boot.as_str())
        .bind(new.kernel.as_ref().map(|f| &f.name))
        .bind(new.kernel.as_ref().map(|f| &f.sha256))
        .bind(new.initrd.as_ref().map(|f| &f.name))
        .bind(new.initrd.as_ref().map(|f| &f.sha256))
        .bind(&new.root_disk.name)
        .bind(&new.root_disk.sha256)
        .bind(new.root_disk_size)
        .bind(&new.cmdline)
        .bind(new.default)
        .bind(new.public)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| name_taken(e, &req.name))?;
        tx.commit().await?;
        tracing::info!(image_id = %row.id, name = %row.name, boot = %row.boot, owner = %row.account_id, "image registered");
        row.into_api(true)
    }

    /// Refuses a registration whose root disk names a backing or external
    /// data file, when the control plane can read the disk (a `file://`
    /// source on a filesystem it shares with the hosts, as in the
    /// all-in-one). Other disks are checked by each host before its cache
    /// takes them (which fails the image), and no disk's digest is checked
    /// here: that is the hosts' job too.
    async fn check_registered_disk(&self, new: &NewImage) -> Result<()> {
        let Some(dir) = new.source_url.strip_prefix("file://") else { return Ok(()) };
        let disk = std::path::Path::new(dir).join(&new.root_disk.name);
        if !tokio::fs::metadata(&disk).await.is_ok_and(|m| m.is_file()) {
            tracing::debug!(disk = %disk.display(), "the root disk is not here to check; the hosts check it");
            return Ok(());
        }
        match crate::image_store::check_standalone(&disk).await? {
            Some(why) => Err(ServiceError::ImageNotStandalone(format!("{}: {why}", new.root_disk.name))),
            None => Ok(()),
        }
    }

    /// The images `caller` may see that `query` selects, oldest first,
    /// each with the caller's tags (and its source for the operator only).
    pub async fn describe_images(&self, caller: &Caller, query: &ImageQuery) -> Result<Vec<Image>> {
        for id in &query.image_ids {
            if !ids::is_valid(ids::IMAGE, id) {
                return Err(ServiceError::ImageIdMalformed(id.clone()));
            }
        }
        let opt = |v: Vec<String>| if v.is_empty() { None } else { Some(v) };
        let owners = opt(query.owners.iter().map(|o| account_ref(caller, o)).collect::<Result<_>>()?);
        let executable = if query.executable_by.is_empty() {
            None
        } else {
            Some(query.executable_by.iter().filter(|e| *e != "all").map(|e| account_ref(caller, e)).collect::<Result<Vec<_>>>()?)
        };
        let (mut names, mut states, mut ids, mut owner_ids, mut descriptions) = (vec![], vec![], query.image_ids.clone(), vec![], vec![]);
        let mut public: Option<bool> = None;
        let mut tags: Vec<(String, Option<Vec<String>>)> = Vec::new();
        for (name, values) in &query.filters {
            match name.as_str() {
                "name" => names.extend(values.iter().map(|v| like_pattern(v))),
                "description" => descriptions.extend(values.iter().map(|v| like_pattern(v))),
                "state" => states.extend(values.iter().cloned()),
                "image-id" => ids.extend(values.iter().cloned()),
                "owner-id" => owner_ids.extend(values.iter().cloned()),
                "is-public" => {
                    let wanted: Vec<bool> = values
                        .iter()
                        .map(|v| {
                            v.parse::<bool>()
                                .map_err(|_| ServiceError::InvalidParameterValue(format!("is-public must be true or false, not {v:?}")))
                        })
                        .collect::<Result<_>>()?;
                    // Both values: no constraint.
                    public = if wanted.iter().all(|w| *w == wanted[0]) { wanted.first().copied() } else { None };
                }
                "tag-key" => tags.extend(values.iter().map(|k| (k.clone(), None))),
                t if t.starts_with("tag:") => tags.push((t["tag:".len()..].to_string(), Some(values.clone()))),
                c if CONSTANT_FILTERS.iter().any(|(n, _)| *n == c) => {
                    let value = CONSTANT_FILTERS.iter().find(|(n, _)| *n == c).map(|(_, v)| *v).unwrap_or_default();
                    if !values.iter().any(|v| v == value) {
                        return Ok(Vec::new());
                    }
                }
                other => return Err(ServiceError::InvalidParameterValue(format!("The filter '{other}' is invalid"))),
            }
        }
        let rows = sqlx::query_as::<_, ImageRow>(&format!(
            "SELECT {IMAGE_COLUMNS} FROM images WHERE {VISIBLE} \
               AND ($3::text[] IS NULL OR id = ANY($3)) \
               AND ($4::text[] IS NULL OR account_id = ANY($4)) \
               AND ($5::text[] IS NULL OR name LIKE ANY($5)) \
               AND ($6::text[] IS NULL OR state = ANY($6)) \
               AND ($7::boolean IS NULL OR is_public = $7) \
               AND ($8::text[] IS NULL OR is_public OR account_id = ANY($8)) \
               AND ($9::text[] IS NULL OR account_id = ANY($9)) \
               AND ($10::text[] IS NULL OR description LIKE ANY($10)) \
               AND NOT EXISTS (SELECT 1 FROM jsonb_to_recordset($11::jsonb) AS f(k text, v text[]) WHERE NOT EXISTS \
                   (SELECT 1 FROM tags t WHERE t.account_id = $2 AND t.resource_id = images.id \
                      AND t.key = f.k AND (f.v IS NULL OR t.value = ANY(f.v)))) \
             ORDER BY created_at, id"
        ))
        .bind(caller.admin)
        .bind(&caller.account_id)
        .bind(opt(ids))
        .bind(owners)
        .bind(opt(names))
        .bind(opt(states))
        .bind(public)
        .bind(executable)
        .bind(opt(owner_ids))
        .bind(opt(descriptions))
        .bind(serde_json::Value::Array(tags.iter().map(|(k, v)| serde_json::json!({"k": k, "v": v})).collect()))
        .fetch_all(&self.db)
        .await?;
        if !query.image_ids.is_empty() {
            // Naming an image the caller cannot see is an error, as in EC2
            // (whatever the filters then leave).
            let (seen,): (Vec<String>,) =
                sqlx::query_as(&format!("SELECT coalesce(array_agg(id), '{{}}') FROM images WHERE {VISIBLE} AND id = ANY($3)"))
                    .bind(caller.admin)
                    .bind(&caller.account_id)
                    .bind(&query.image_ids)
                    .fetch_one(&self.db)
                    .await?;
            if let Some(missing) = query.image_ids.iter().find(|id| !seen.contains(id)) {
                return Err(ServiceError::ImageNotFound(missing.clone()));
            }
        }
        let image_ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let mut tags = self.tags_of(caller, &image_ids).await?;
        rows.into_iter()
            .map(|r| {
                let t = tags.remove(&r.id).unwrap_or_default();
                let mut i = r.into_api(caller.admin)?;
                i.tags = t.into_iter().map(|(key, value)| ResourceTag { key, value }).collect();
                Ok(i)
            })
            .collect()
    }

    /// One image the caller may see.
    pub async fn describe_image(&self, caller: &Caller, id: &str) -> Result<Image> {
        let mut list = self.describe_images(caller, &ImageQuery { image_ids: vec![id.to_string()], ..Default::default() }).await?;
        list.pop().ok_or_else(|| ServiceError::ImageNotFound(id.to_string()))
    }

    /// The id of the default image, whatever its state.
    pub(crate) async fn default_image_id(&self) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as("SELECT id FROM images WHERE is_default").fetch_optional(&self.db).await?;
        Ok(row.map(|r| r.0))
    }

    /// The image a launch boots: the one named (visible to the caller and
    /// available), or the default image when `id` is `None`.
    pub async fn launch_image(&self, caller: &Caller, id: Option<&str>) -> Result<Image> {
        let row = match id {
            Some(id) => {
                if !ids::is_valid(ids::IMAGE, id) {
                    return Err(ServiceError::ImageIdMalformed(id.to_string()));
                }
                sqlx::query_as::<_, ImageRow>(&format!("SELECT {IMAGE_COLUMNS} FROM images WHERE {VISIBLE} AND id = $3"))
                    .bind(caller.admin)
                    .bind(&caller.account_id)
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
        if row.state != "available" {
            let why = match (&row.state[..], &row.state_reason) {
                (_, Some(reason)) => format!("it is {} ({reason})", row.state),
                (state, None) => format!("it is {state}"),
            };
            return Err(ServiceError::ImageUnavailable(row.id, why));
        }
        row.into_api(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        c.to_string().repeat(64)
    }

    #[test]
    fn a_qcow2_url_is_a_disk_booted_image_below_its_directory() {
        let req = RegisterImageRequest {
            name: "debian-12".into(),
            disk_url: Some("https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2".into()),
            sha256: Some(digest('a')),
            ..Default::default()
        };
        let n = validate_register(&req).unwrap();
        assert_eq!(n.source_url, "https://cloud.debian.org/images/cloud/bookworm/latest");
        assert_eq!(n.root_disk, ImageFile { name: "debian-12-genericcloud-amd64.qcow2".into(), sha256: digest('a') });
        assert_eq!((n.boot, n.public, n.owner_id.as_str()), (BootStyle::Disk, true, ADMIN_ACCOUNT));
        let local = RegisterImageRequest { disk_url: Some("file:///disk.qcow2".into()), ..req.clone() };
        assert_eq!(validate_register(&local).unwrap().source_url, "file:///");
        let private = RegisterImageRequest { owner_id: Some("123456789012".into()), ..req.clone() };
        assert!(!validate_register(&private).unwrap().public, "an account's image is private unless asked");

        let code = |r: &RegisterImageRequest| validate_register(r).unwrap_err().code();
        assert_eq!(code(&RegisterImageRequest { sha256: None, ..req.clone() }), "MissingParameter");
        assert_eq!(code(&RegisterImageRequest { sha256: Some("AB".repeat(32)), ..req.clone() }), "InvalidParameterValue");
        assert_eq!(code(&RegisterImageRequest { disk_url: Some("ftp://x/d.qcow2".into()), ..req.clone() }), "InvalidParameterValue");
        assert_eq!(code(&RegisterImageRequest { disk_url: Some("http://x/d.qcow2?a=b".into()), ..req.clone() }), "InvalidParameterValue");
        assert_eq!(code(&RegisterImageRequest { disk_url: Some("http://x/".into()), ..req.clone() }), "InvalidParameterValue");
        assert_eq!(code(&RegisterImageRequest { source_url: Some("file:///x".into()), ..req.clone() }), "InvalidParameterCombination");
        assert_eq!(code(&RegisterImageRequest { cmdline: "quiet".into(), ..req.clone() }), "InvalidParameterCombination");
        assert_eq!(code(&RegisterImageRequest { name: "ab".into(), ..req.clone() }), "InvalidAMIName.Malformed");
        assert_eq!(code(&RegisterImageRequest { owner_id: Some("bob".into()), ..req.clone() }), "InvalidParameterValue");
        assert_eq!(code(&RegisterImageRequest { default: true, public: Some(false), ..req.clone() }), "InvalidParameterCombination");
        assert_eq!(code(&RegisterImageRequest { boot: Some(BootStyle::Kernel), ..req.clone() }), "MissingParameter");
    }

    #[test]
    fn filter_wildcards_become_like_patterns() {
        assert_eq!(like_pattern("debian-*"), "debian-%");
        assert_eq!(like_pattern("a?c"), "a_c");
        assert_eq!(like_pattern("100%_x"), "100\\%\\_x");
        assert_eq!(like_pattern("lit\\*star"), "lit*star");
        assert_eq!(like_pattern("back\\slash"), "back\\\\slash");
    }
}
