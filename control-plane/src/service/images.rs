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

use super::image_quota::ImageQuotaCheck;
use super::{Caller, Service, ADMIN_ACCOUNT};
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::image_store::is_digest;
use nimbus_proto::api::{BootStyle, CreateImageRequest, Image, ImageFile, RegisterImageRequest, ResourceTag};

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
    if crate::db::is_unique_violation(&e, "images_account_name") {
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

    /// CreateImage: records the image `pending` and asks the instance's
    /// agent to make it. The instance must be running or stopped; the
    /// name must be new among the account's images. All or nothing.
    pub async fn create_image(&self, caller: &Caller, instance_id: &str, req: &CreateImageRequest) -> Result<Image> {
        if !ids::is_valid(ids::INSTANCE, instance_id) {
            return Err(ServiceError::InstanceIdMalformed(instance_id.to_string()));
        }
        validate_name(&req.name)?;
        validate_description(&req.description)?;
        let mut tags: Vec<(String, String)> = req.tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect();
        super::tags::validate_tags(&tags)?;
        tags.sort();
        super::retrying(|| self.try_create_image(caller, instance_id, req, &tags)).await
    }

    async fn try_create_image(
        &self,
        caller: &Caller,
        instance_id: &str,
        req: &CreateImageRequest,
        tags: &[(String, String)],
    ) -> Result<Image> {
        let mut tx = self.db.begin().await?;
        // Lock order: the account (its image quota, counted under the lock,
        // so concurrent calls count each other), the instance, its host.
        self.image_quota(&mut tx, &caller.account_id, true, None).await?.check_new_image()?;
        type Row = (String, String, String, i64);
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT state, host_id, image_id, disk_gib FROM instances WHERE id = $1 AND account_id = $2 AND {} FOR UPDATE",
            super::instances::VISIBLE
        ))
        .bind(instance_id)
        .bind(&caller.account_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (state, host_id, source_image, disk_gib) = row.ok_or_else(|| ServiceError::InstanceNotFound(instance_id.to_string()))?;
        if state != "running" && state != "stopped" {
            return Err(ServiceError::IncorrectInstanceState(format!(
                "The instance '{instance_id}' is {state}: an image is made of a running or stopped instance"
            )));
        }
        let image_id = ids::new_id(ids::IMAGE);
        // The new image boots as its source did: a kernel-booted one keeps
        // the source's kernel, initrd and command line (and their source).
        let inserted = sqlx::query_as::<_, ImageRow>(&format!(
            "INSERT INTO images (id, account_id, name, description, source_url, boot, kernel, kernel_sha256, initrd, \
                 initrd_sha256, root_disk, root_disk_sha256, root_disk_size, root_disk_in_store, cmdline, is_public, state, \
                 source_instance_id, source_host_id, no_reboot) \
             SELECT $1, $2, $3, $4, CASE WHEN s.boot = 'kernel' THEN s.source_url END, s.boot, s.kernel, s.kernel_sha256, \
                 s.initrd, s.initrd_sha256, 'disk.qcow2', NULL, $5, true, s.cmdline, false, 'pending', $6, $7, $8 \
             FROM images s WHERE s.id = $9 RETURNING {IMAGE_COLUMNS}"
        ))
        .bind(&image_id)
        .bind(&caller.account_id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(disk_gib << 30)
        .bind(instance_id)
        .bind(&host_id)
        .bind(req.no_reboot)
        .bind(&source_image)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| name_taken(e, &req.name))?;
        super::tags::insert_new_tags(&mut tx, &caller.account_id, std::slice::from_ref(&image_id), tags).await?;
        // The request reaches the agent with the instance's assignment.
        sqlx::query(
            "WITH bumped AS (UPDATE hosts SET generation = generation + 1 WHERE id = $2 RETURNING generation) \
             UPDATE instances SET changed_generation = bumped.generation FROM bumped WHERE instances.id = $1",
        )
        .bind(instance_id)
        .bind(&host_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)").bind(crate::notify::CHANNEL).bind(&host_id).execute(&mut *tx).await?;
        tx.commit().await?;
        tracing::info!(%image_id, %instance_id, no_reboot = req.no_reboot, "image requested");
        let mut image = inserted.into_api(false)?;
        image.tags = tags.iter().map(|(key, value)| ResourceTag { key: key.clone(), value: value.clone() }).collect();
        Ok(image)
    }

    /// DeregisterImage: the image is gone for the API (no new launches,
    /// not described); instances running it keep running. The owner, or
    /// the operator, deregisters it.
    pub async fn deregister_image(&self, caller: &Caller, image_id: &str) -> Result<()> {
        if !ids::is_valid(ids::IMAGE, image_id) {
            return Err(ServiceError::ImageIdMalformed(image_id.to_string()));
        }
        let mut tx = self.db.begin().await?;
        let row: Option<(String, Option<String>, bool)> = sqlx::query_as(&format!(
            "SELECT account_id, root_disk_sha256, root_disk_in_store FROM images WHERE {VISIBLE} AND id = $3 FOR UPDATE"
        ))
        .bind(caller.admin)
        .bind(&caller.account_id)
        .bind(image_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (owner, digest, in_store) = row.ok_or_else(|| ServiceError::ImageNotFound(image_id.to_string()))?;
        if owner != caller.account_id && !caller.admin {
            return Err(ServiceError::Unauthorized(format!(
                "You are not authorized to deregister image '{image_id}': it is another account's"
            )));
        }
        sqlx::query("UPDATE images SET state = 'deregistered', is_default = false, state_changed_at = now() WHERE id = $1")
            .bind(image_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(%image_id, "image deregistered");
        if let (true, Some(digest)) = (in_store, digest) {
            if let Err(e) = self.drop_stored_if_unused(&digest).await {
                tracing::warn!(%image_id, error = %e, "cannot remove the image's file from the store; the next sweep does");
            }
        }
        Ok(())
    }

    /// Removes a stored disk no image needs any more: none that is not
    /// deregistered, and none an instance holding capacity runs.
    async fn drop_stored_if_unused(&self, digest: &str) -> Result<()> {
        let _store = self.image_store.lock().await;
        let (used,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM images m WHERE m.root_disk_sha256 = $1 AND m.root_disk_in_store \
                 AND (m.state <> 'deregistered' OR EXISTS (SELECT 1 FROM instances i WHERE i.image_id = m.id AND i.capacity_held)))",
        )
        .bind(digest)
        .fetch_one(&self.db)
        .await?;
        if !used {
            self.image_store.remove(digest).await?;
            tracing::info!(sha256 = %digest, "image file removed from the store");
        }
        Ok(())
    }

    /// After `terminated` ended: the stored disks of deregistered images
    /// they ran go once no instance needs them (errors are logged; the next
    /// start's sweep repeats it).
    pub(crate) async fn drop_stored_disks_of(&self, terminated: &[String]) {
        let digests: std::result::Result<Vec<(String,)>, sqlx::Error> = sqlx::query_as(
            "SELECT DISTINCT m.root_disk_sha256 FROM instances i JOIN images m ON m.id = i.image_id \
             WHERE i.id = ANY($1) AND m.root_disk_in_store AND m.state = 'deregistered' AND m.root_disk_sha256 IS NOT NULL",
        )
        .bind(terminated)
        .fetch_all(&self.db)
        .await;
        let digests = digests.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot look up the stored disks of terminated instances");
            Vec::new()
        });
        for (digest,) in digests {
            if let Err(e) = self.drop_stored_if_unused(&digest).await {
                tracing::warn!(sha256 = %digest, error = %e, "cannot remove an image file from the store; the next sweep does");
            }
        }
    }

    /// Removes from the store every file no image needs (see
    /// [`Service::drop_stored_if_unused`]), and with `at_start` the
    /// leftovers of uploads a crash cut short.
    pub async fn sweep_image_store(&self, at_start: bool) -> Result<()> {
        let files = self.image_store.list(at_start).await?;
        if at_start {
            // Images stored before their size was recorded (it counts in their account's quota).
            for digest in &files {
                let Some((_, size)) = self.image_store.open(digest).await? else { continue };
                sqlx::query(
                    "UPDATE images SET stored_bytes = $2 WHERE root_disk_sha256 = $1 AND root_disk_in_store AND stored_bytes IS NULL",
                )
                .bind(digest)
                .bind(size as i64)
                .execute(&self.db)
                .await?;
            }
        }
        for digest in files {
            self.drop_stored_if_unused(&digest).await?;
        }
        Ok(())
    }

    /// An agent's upload of the disk of an image it was asked to make
    /// (`PUT /v1/agent/images/{image_id}`): only the image's source host,
    /// only while the image is pending. The body is streamed into the store
    /// and must match `sha256`; then the image is `available`.
    pub async fn upload_image<S, E>(&self, host_id: &str, image_id: &str, sha256: &str, virtual_size: u64, body: S) -> Result<Image>
    where
        S: futures::Stream<Item = std::result::Result<bytes::Bytes, E>>,
        E: std::fmt::Display,
    {
        if !ids::is_valid(ids::IMAGE, image_id) {
            return Err(ServiceError::ImageIdMalformed(image_id.to_string()));
        }
        if !is_digest(sha256) {
            return Err(ServiceError::InvalidParameterValue("the upload's digest must be 64 lower-case hex digits".into()));
        }
        if virtual_size == 0 || virtual_size > i64::MAX as u64 {
            return Err(ServiceError::InvalidParameterValue("the disk's virtual size is out of range".into()));
        }
        let pending = |state: String| ServiceError::ImageNotPending(image_id.to_string(), state);
        let row: Option<(String, String)> = sqlx::query_as("SELECT state, account_id FROM images WHERE id = $1 AND source_host_id = $2")
            .bind(image_id)
            .bind(host_id)
            .fetch_optional(&self.db)
            .await?;
        let account_id = match row {
            None => return Err(ServiceError::ImageNotFound(image_id.to_string())),
            Some((state, _)) if state != "pending" => return Err(pending(state)),
            Some((_, account)) => account,
        };
        // Whatever the host sends again, this image is not one.
        let fail = |reason: String| async move {
            sqlx::query(
                "UPDATE images SET state = 'failed', state_reason = $3, state_changed_at = now() \
                 WHERE id = $1 AND source_host_id = $2 AND state = 'pending'",
            )
            .bind(image_id)
            .bind(host_id)
            .bind(&reason)
            .execute(&self.db)
            .await
        };
        // The account's image bytes: no more is written than it has left
        // (checked again below, under its lock, with the real size).
        let left = self.image_quota(&mut *self.db.acquire().await?, &account_id, false, Some(image_id)).await?.bytes_left();
        let staged = match self.image_store.stage_at_most(sha256, body, left).await {
            Err(crate::image_store::StoreError::TooLarge(n)) if n == left => {
                let e = over_quota(&account_id, left);
                fail(format!("the disk uploaded was refused: {e}")).await?;
                return Err(e);
            }
            other => other?,
        };
        if let Some(why) = crate::image_store::check_standalone(staged.path()).await? {
            fail(format!("the disk uploaded was refused: {why}")).await?;
            tracing::warn!(%image_id, %host_id, %why, "an upload that is not a standalone qcow2 refused; image failed");
            return Err(ServiceError::ImageNotStandalone(format!("uploaded for {image_id}: {why}")));
        }
        let updated = {
            // Published and recorded together: a sweep never sees the file unreferenced.
            let _store = self.image_store.lock().await;
            let mut tx = self.db.begin().await?;
            let quota = self.image_quota(&mut tx, &account_id, true, Some(image_id)).await?;
            if staged.size > quota.bytes_left() {
                drop(tx);
                let e = over_quota(&account_id, quota.bytes_left());
                fail(format!("the disk uploaded was refused: {e}")).await?;
                return Err(e);
            }
            let size = staged.publish().await?;
            let row = sqlx::query_as::<_, ImageRow>(&format!(
                "UPDATE images SET state = 'available', root_disk_sha256 = $3, root_disk_size = $4, stored_bytes = $5, state_changed_at = now() \
                 WHERE id = $1 AND source_host_id = $2 AND state = 'pending' RETURNING {IMAGE_COLUMNS}"
            ))
            .bind(image_id)
            .bind(host_id)
            .bind(sha256)
            .bind(virtual_size as i64)
            .bind(size as i64)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            row
        };
        match updated {
            Some(row) => {
                tracing::info!(%image_id, %sha256, "image available");
                row.into_api(false)
            }
            None => {
                // Deregistered (or failed) while the disk travelled.
                self.drop_stored_if_unused(sha256).await?;
                let (state,): (String,) =
                    sqlx::query_as("SELECT state FROM images WHERE id = $1").bind(image_id).fetch_one(&self.db).await?;
                Err(pending(state))
            }
        }
    }

    /// An agent's image problems: an image it could not make (CreateImage
    /// on this host), or a registered image whose file differs from its
    /// digest on a host that runs it (deterministic: the registration is
    /// wrong). Either becomes `failed` with the agent's reason; launches of
    /// it are then refused. A host's transient fetch failures are not image
    /// problems (they fail the instance, with the reason).
    pub(crate) async fn record_image_problems(&self, host_id: &str, problems: &[nimbus_proto::agent::ImageProblem]) -> Result<()> {
        if problems.len() > nimbus_proto::agent::MAX_IMAGE_PROBLEMS {
            return Err(ServiceError::InvalidParameterValue(format!(
                "a report carries at most {} image problems",
                nimbus_proto::agent::MAX_IMAGE_PROBLEMS
            )));
        }
        if problems.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = problems.iter().map(|p| p.image_id.as_str()).collect();
        let reasons: Vec<String> = problems.iter().map(|p| p.message.chars().filter(|c| !c.is_control()).take(512).collect()).collect();
        let failed: Vec<(String,)> = sqlx::query_as(
            "UPDATE images m SET state = 'failed', state_reason = p.reason, state_changed_at = now() \
             FROM unnest($2::text[], $3::text[]) AS p(id, reason) \
             WHERE m.id = p.id AND ((m.state = 'pending' AND m.source_host_id = $1) \
                OR (m.state = 'available' AND NOT m.is_default AND EXISTS \
                    (SELECT 1 FROM instances i WHERE i.image_id = m.id AND i.host_id = $1 AND i.capacity_held))) \
             RETURNING m.id",
        )
        .bind(host_id)
        .bind(&ids)
        .bind(&reasons)
        .fetch_all(&self.db)
        .await?;
        for (id,) in failed {
            tracing::warn!(image_id = %id, %host_id, "image failed");
        }
        Ok(())
    }

    /// A stored disk for a host (`GET /v1/agent/images/{sha256}`): only one
    /// an instance placed on the host boots.
    pub async fn stored_image_for_host(&self, host_id: &str, sha256: &str) -> Result<(tokio::fs::File, u64)> {
        if !is_digest(sha256) {
            return Err(ServiceError::InvalidParameterValue("an image file is named by its SHA-256 (64 lower-case hex digits)".into()));
        }
        let (wanted,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM instances i JOIN images m ON m.id = i.image_id \
             WHERE i.host_id = $1 AND i.capacity_held AND m.root_disk_in_store AND m.root_disk_sha256 = $2)",
        )
        .bind(host_id)
        .bind(sha256)
        .fetch_one(&self.db)
        .await?;
        let missing = || ServiceError::RouteNotFound(format!("image file {sha256}"));
        if !wanted {
            return Err(missing());
        }
        self.image_store.open(sha256).await?.ok_or_else(missing)
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
