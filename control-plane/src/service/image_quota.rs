//! Per-account image limits: how many images an account may hold (pending
//! or available) and how many bytes their disks may take in the image
//! store, so that one account cannot fill the control plane's disk with
//! CreateImage. The operator sets them per account (`max_images`,
//! `max_image_bytes` in `accounts`, NULL: the defaults
//! `--default-max-images`, `--default-max-image-bytes`).
//!
//! The count is checked by CreateImage, the bytes by the upload of the made
//! disk (and by CreateImage, which refuses once they are used up). Both
//! count in a query under the account's row lock (`FOR NO KEY UPDATE`,
//! first in the lock order), so concurrent CreateImage calls or uploads of
//! one account count each other; they are rare, so the lock costs nothing.
//! Images registered by the operator for an account count too (they are
//! its images), but registration is not refused: it is the operator's call.

use super::Service;
use crate::error::{Result, ServiceError};

pub use nimbus_proto::api::ImageQuota;

/// The rules of an [`ImageQuota`].
pub trait ImageQuotaCheck {
    /// Whether one more image may be made: `ResourceLimitExceeded` (EC2's
    /// answer to an AMI quota) when the count or the bytes are used up.
    fn check_new_image(&self) -> Result<()>;

    /// The bytes a new image's disk may still take.
    fn bytes_left(&self) -> u64;
}

impl ImageQuotaCheck for ImageQuota {
    fn check_new_image(&self) -> Result<()> {
        if self.images >= self.max_images {
            return Err(ServiceError::ResourceLimitExceeded(format!(
                "You have reached your quota of {} for the number of images allowed; deregister unused images or ask for a higher limit",
                self.max_images
            )));
        }
        if self.image_bytes >= self.max_image_bytes {
            return Err(ServiceError::ResourceLimitExceeded(format!(
                "Your images use {} of the {} bytes of image storage allowed; deregister unused images or ask for a higher limit",
                self.image_bytes, self.max_image_bytes
            )));
        }
        Ok(())
    }

    fn bytes_left(&self) -> u64 {
        self.max_image_bytes.saturating_sub(self.image_bytes)
    }
}

impl Service {
    /// The account's image limits and usage; with `lock`, in a transaction,
    /// the account's row is locked first (see the module's doc). `except`:
    /// an image not to count (the one whose upload is being checked).
    pub(crate) async fn image_quota(
        &self,
        conn: &mut sqlx::PgConnection,
        account_id: &str,
        lock: bool,
        except: Option<&str>,
    ) -> Result<ImageQuota> {
        let row: Option<(Option<i32>, Option<i64>)> = sqlx::query_as(&format!(
            "SELECT max_images, max_image_bytes FROM accounts WHERE id = $1{}",
            if lock { " FOR NO KEY UPDATE" } else { "" }
        ))
        .bind(account_id)
        .fetch_optional(&mut *conn)
        .await?;
        let (max_images, max_bytes) = row.ok_or_else(|| ServiceError::AccountNotFound(account_id.to_string()))?;
        let (images, bytes): (i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(stored_bytes), 0)::bigint FROM images \
             WHERE account_id = $1 AND state IN ('pending', 'available') AND ($2::text IS NULL OR id <> $2)",
        )
        .bind(account_id)
        .bind(except)
        .fetch_one(&mut *conn)
        .await?;
        Ok(ImageQuota {
            max_images: max_images.map_or(self.config.default_max_images, |n| n.max(0) as u32),
            max_image_bytes: max_bytes.map_or(self.config.default_max_image_bytes, |n| n.max(0) as u64),
            images: images.clamp(0, i64::from(u32::MAX)) as u32,
            image_bytes: bytes.max(0) as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_image_needs_a_free_slot_and_bytes_left() {
        let q = ImageQuota { max_images: 2, max_image_bytes: 100, images: 1, image_bytes: 40 };
        assert!(q.check_new_image().is_ok());
        assert_eq!(q.bytes_left(), 60);
        let full = ImageQuota { images: 2, ..q };
        assert_eq!(full.check_new_image().unwrap_err().code(), "ResourceLimitExceeded");
        let no_bytes = ImageQuota { image_bytes: 100, ..q };
        assert_eq!(no_bytes.check_new_image().unwrap_err().code(), "ResourceLimitExceeded");
        assert_eq!(ImageQuota { image_bytes: 500, ..q }.bytes_left(), 0);
    }
}
