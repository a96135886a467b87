//! A launch (RunInstances), from request to reservation, split by job:
//! [`validation`] checks what needs no database (counts, user-data, client
//! token, zone) and that the image's disk fits the type's; [`idempotency`]
//! answers a retry with its client token before anything the launch named is
//! looked up again (the request's digest, the reservation it made);
//! [`network`] resolves the launch's interfaces before its transaction and
//! creates them in it; [`placement`] is the one transaction: reservation,
//! limits, plan and claim of capacity (`scheduler`), instances, interfaces,
//! tags, the account's usage. A launch that lost a race for capacity or
//! quota plans again, at most [`MAX_PLACEMENT_ATTEMPTS`] times.
//!
//! A launch uses the layers below it (network, tags, scheduler, accounts,
//! images, key pairs, the catalog, instances' reservations); nothing below
//! uses it.

mod idempotency;
pub(crate) mod network;
mod placement;
mod validation;

pub use validation::{fits_disk, validate_run};

use validation::LaunchSpec;

use crate::error::{Result, ServiceError};
use crate::service::scheduler::Need;
use crate::service::{Caller, Service};
use idempotency::RequestKey;
use nimbus_proto::api::{Reservation, RunInstancesRequest};

/// How often a launch re-plans after losing a race for capacity.
const MAX_PLACEMENT_ATTEMPTS: u32 = 16;

impl Service {
    /// Everything a launch checks before it places anything (for DryRun).
    pub async fn check_run_instances(&self, caller: &Caller, req: &RunInstancesRequest) -> Result<()> {
        validate_run(req, self.config.max_count)?;
        let image = self.launch_image(caller, req.image_id.as_deref()).await?;
        let itype = self.instance_type(&req.instance_type).await?;
        fits_disk(&image, itype.disk_gib)?;
        if let Some(k) = &req.key_name {
            self.key_pair_public_key(caller, k).await?;
        }
        self.resolve_launch_network(caller, req).await?;
        Ok(())
    }

    pub async fn run_instances(&self, caller: &Caller, req: RunInstancesRequest) -> Result<Reservation> {
        let (user_data, zone) = validate_run(&req, self.config.max_count)?;
        let mut tags: Vec<(String, String)> = req.tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect();
        crate::service::tags::validate_tags(&tags)?;
        tags.sort();
        let metadata = match &req.metadata_options {
            Some(o) => crate::service::metadata_options::Options::default().apply(o)?,
            None => Default::default(),
        };
        // A retry is answered before anything it named is looked up again.
        let image_named = match &req.image_id {
            Some(id) => id.clone(),
            None => self.default_image_id().await?.unwrap_or_default(),
        };
        let network_key = network::request_key(&req);
        let digest = RequestKey {
            image_id: &image_named,
            instance_type: &req.instance_type,
            zone: zone.as_deref(),
            network_key: &network_key,
            min: req.min_count,
            max: req.max_count,
            metadata: &metadata,
            key_name: req.key_name.as_deref(),
            tags: &tags,
            user_data: user_data.as_deref(),
        }
        .digest();
        if let Some(token) = req.client_token.as_deref() {
            if let Some(reservation) = self.launched_with_token(caller, token, &digest).await? {
                return Ok(reservation);
            }
        }

        let image = self.launch_image(caller, req.image_id.as_deref()).await?;
        let itype = self.instance_type(&req.instance_type).await?;
        fits_disk(&image, itype.disk_gib)?;
        let public_key = match &req.key_name {
            Some(k) => Some(self.key_pair_public_key(caller, k).await?),
            None => None,
        };
        let network = self.resolve_launch_network(caller, &req).await?;
        let spec = LaunchSpec {
            image_id: image.image_id,
            instance_type: itype.name,
            need: Need { vcpus: itype.vcpus.into(), memory_mib: itype.memory_mib as i64, disk_gib: itype.disk_gib as i64 },
            min: req.min_count,
            max: req.max_count,
            zone,
            user_data,
            key_name: req.key_name.clone(),
            public_key,
            tags,
            metadata,
        };
        for attempt in 1..=MAX_PLACEMENT_ATTEMPTS {
            match self.try_launch(caller, &spec, &network, &digest, req.client_token.as_deref()).await {
                Ok(Some(reservation)) => return Ok(reservation),
                Ok(None) => {
                    crate::service::count_placement_retry();
                    tracing::debug!(attempt, "lost a race for capacity or quota; planning again")
                }
                Err(ServiceError::Database(e)) if crate::db::is_retryable(&e) => {
                    crate::service::count_placement_retry();
                    tracing::debug!(attempt, error = %e, "retrying launch transaction")
                }
                // Two random MACs met (40 random bits): draw again.
                Err(ServiceError::Database(e)) if crate::db::Constraint::InterfaceMac.violated_by(&e) => {
                    tracing::warn!(attempt, "MAC address collision; retrying launch transaction")
                }
                Err(e) => return Err(e),
            }
        }
        Err(ServiceError::InsufficientInstanceCapacity("capacity is contended by concurrent launches; try again".into()))
    }
}
