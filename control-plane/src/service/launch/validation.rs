//! What a launch checks before it needs the database: counts
//! (1 <= min <= max <= the operator's `--max-count`), the instance type
//! named, user-data (base64, at most 16 KiB decoded), the client token
//! (1 to 64 ASCII characters), the zone; and that the image's root disk
//! fits the instance type's disk.

use crate::error::{Result, ServiceError};
use crate::service::scheduler::Need;
use base64::Engine;
use nimbus_proto::api::{RunInstancesRequest, MAX_USER_DATA_BYTES};

/// The root disk of an instance has its type's size: an image with a
/// larger disk does not fit (EC2 answers InvalidBlockDeviceMapping).
pub fn fits_disk(image: &nimbus_proto::api::Image, disk_gib: u64) -> Result<()> {
    match image.root_disk_size {
        Some(size) if size > disk_gib << 30 => Err(ServiceError::InvalidBlockDeviceMapping(format!(
            "Volume of size {disk_gib} GiB is smaller than the image {}'s disk of {} GiB: choose an instance type with a larger disk",
            image.image_id,
            size.div_ceil(1 << 30)
        ))),
        _ => Ok(()),
    }
}

/// Checks everything about a launch that does not need the database.
pub fn validate_run(req: &RunInstancesRequest, max_count: u32) -> Result<(Option<Vec<u8>>, Option<String>)> {
    if req.min_count < 1 {
        return Err(ServiceError::InvalidParameterValue("min_count must be at least 1".into()));
    }
    if req.max_count < req.min_count {
        return Err(ServiceError::InvalidParameterValue("max_count must not be less than min_count".into()));
    }
    if req.max_count > max_count {
        return Err(ServiceError::InvalidParameterValue(format!("max_count must be at most {max_count}")));
    }
    if req.instance_type.is_empty() {
        return Err(ServiceError::MissingParameter("instance_type".into()));
    }
    let user_data = match &req.user_data {
        None => None,
        Some(b64) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| ServiceError::InvalidParameterValue("user_data must be base64".into()))?;
            if raw.len() > MAX_USER_DATA_BYTES {
                return Err(ServiceError::InvalidParameterValue(format!(
                    "user_data is {} bytes once decoded; the limit is {MAX_USER_DATA_BYTES}",
                    raw.len()
                )));
            }
            Some(raw)
        }
    };
    if let Some(token) = &req.client_token {
        if token.is_empty() || token.len() > 64 || !token.is_ascii() {
            return Err(ServiceError::InvalidParameterValue("client_token must be 1 to 64 ASCII characters".into()));
        }
    }
    let zone = match &req.availability_zone {
        Some(z) if z.is_empty() || z.len() > 64 => {
            return Err(ServiceError::InvalidParameterValue("availability_zone must be 1 to 64 characters".into()))
        }
        other => other.clone(),
    };
    Ok((user_data, zone))
}

/// A validated launch.
#[derive(Debug)]
pub(super) struct LaunchSpec {
    pub(super) image_id: String,
    pub(super) instance_type: String,
    pub(super) need: Need,
    pub(super) min: u32,
    pub(super) max: u32,
    pub(super) zone: Option<String>,
    pub(super) user_data: Option<Vec<u8>>,
    pub(super) key_name: Option<String>,
    pub(super) public_key: Option<String>,
    pub(super) tags: Vec<(String, String)>,
    pub(super) metadata: crate::service::metadata_options::Options,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> RunInstancesRequest {
        RunInstancesRequest::of_type("t3.nano")
    }

    #[test]
    fn counts_are_checked() {
        let mut r = req();
        r.min_count = 0;
        assert!(matches!(validate_run(&r, 100), Err(ServiceError::InvalidParameterValue(_))));
        let mut r = req();
        r.min_count = 3;
        r.max_count = 2;
        assert!(matches!(validate_run(&r, 100), Err(ServiceError::InvalidParameterValue(_))));
        let mut r = req();
        r.max_count = 101;
        assert!(matches!(validate_run(&r, 100), Err(ServiceError::InvalidParameterValue(_))));
        r.max_count = 100;
        assert!(validate_run(&r, 100).is_ok());
    }

    #[test]
    fn user_data_is_base64_and_bounded() {
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![b'x'; n]);
        let mut r = req();
        r.user_data = Some(b64(MAX_USER_DATA_BYTES));
        assert_eq!(validate_run(&r, 100).unwrap().0.unwrap().len(), MAX_USER_DATA_BYTES);
        r.user_data = Some(b64(MAX_USER_DATA_BYTES + 1));
        assert!(matches!(validate_run(&r, 100), Err(ServiceError::InvalidParameterValue(_))));
        r.user_data = Some("not base64!".into());
        assert!(matches!(validate_run(&r, 100), Err(ServiceError::InvalidParameterValue(_))));
    }
}
