//! CreateImage and DeregisterImage. CreateImage records the image
//! `pending` with its source instance (running or stopped) and host, under
//! the account's image quota (counted under its row lock), and bumps the
//! instance: its assignment carries the request to its agent, which
//! uploads the disk ([`super::store`]). DeregisterImage hides the image from
//! the API at once (no new launches, not described; instances running it
//! keep running); its stored disk goes once nothing needs it.

use super::{name_taken, validate_description, validate_name, ImageRow, IMAGE_COLUMNS, VISIBLE};
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::image_quota::ImageQuotaCheck;
use crate::service::{Caller, Service};
use nimbus_proto::api::{CreateImageRequest, Image, ResourceTag};

impl Service {
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
        crate::service::tags::validate_tags(&tags)?;
        tags.sort();
        crate::service::retrying(|| self.try_create_image(caller, instance_id, req, &tags)).await
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
            crate::service::visibility::instance_visible()
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
        crate::service::tags::insert_new_tags(&mut tx, &caller.account_id, std::slice::from_ref(&image_id), tags).await?;
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
}
