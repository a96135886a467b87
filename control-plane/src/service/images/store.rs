//! The disks of made images in the control plane's image store: an
//! agent's upload of the disk it made (only the image's source host, only
//! while the image is pending; streamed, checked against its digest and the
//! account's quota, then the image is `available`), the image problems
//! agents report, agents' downloads, and the removal of a stored disk no
//! image needs any more (at deregistration, when the last instance of a
//! deregistered image ends, and in the sweep at start).

use super::{over_quota, ImageRow, IMAGE_COLUMNS};
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::image_store::is_digest;
use crate::service::image_quota::ImageQuotaCheck;
use crate::service::Service;
use nimbus_proto::api::Image;

impl Service {
    /// Removes a stored disk no image needs any more: none that is not
    /// deregistered, and none an instance holding capacity runs.
    pub(super) async fn drop_stored_if_unused(&self, digest: &str) -> Result<()> {
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
