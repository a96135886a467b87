//! The launch transaction: the reservation (its client token's unique
//! index serialises retries), the account's limits against its usage (no
//! lock; the usage claim at commit checks them again), the image kept
//! launchable (`FOR SHARE`), the addresses of named subnets, the plan
//! (`scheduler::plan`) and the conditional claim of each host's capacity,
//! the instances, their interfaces ([`super::network`]), their tags, the
//! account's usage. `Ok(None)`: a concurrent launch took the capacity, the
//! addresses or the quota planned on; nothing was written, plan again.

use super::network::{LaunchNetwork, Placed};
use super::validation::LaunchSpec;
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::scheduler::{self, Claim};
use crate::service::{Caller, Service};
use nimbus_proto::api::Reservation;

impl Service {
    /// One launch transaction. `Ok(None)`: capacity was taken by a concurrent
    /// launch after we planned; nothing was written.
    pub(super) async fn try_launch(
        &self,
        caller: &Caller,
        spec: &LaunchSpec,
        net: &LaunchNetwork,
        digest: &[u8],
        client_token: Option<&str>,
    ) -> Result<Option<Reservation>> {
        let mut tx = self.db.begin().await?;
        let reservation_id = ids::new_id(ids::RESERVATION);
        // With a token, the unique (account, token) index serialises retries:
        // a concurrent retry waits here until the first commits, then finds it.
        let inserted = sqlx::query(
            "INSERT INTO reservations (id, account_id, client_token, request_sha256) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (account_id, client_token) DO NOTHING",
        )
        .bind(&reservation_id)
        .bind(&caller.account_id)
        .bind(client_token)
        .bind(digest)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            // A concurrent retry committed first.
            tx.rollback().await?;
            let token = client_token.unwrap_or_default();
            return match self.launched_with_token(caller, token, digest).await? {
                Some(reservation) => Ok(Some(reservation)),
                None => Err(ServiceError::Internal(format!("the reservation of client token {token} vanished"))),
            };
        }

        // The account's limits against its usage as last committed; the
        // claim at the end checks them again (a concurrent launch of the
        // account may commit meanwhile), without locking the account here.
        let (_, limits, usage) = self.limits_and_usage(&mut tx, &caller.account_id).await?;
        let mut allowed = match crate::service::accounts::fit_limits(limits, usage, spec.need.vcpus as u32, spec.min, spec.max) {
            Ok(n) => n,
            Err(e) => {
                tx.rollback().await?;
                return Err(e);
            }
        };
        // The image stays launchable until we commit: a DeregisterImage
        // (which locks the row FOR UPDATE) waits for this launch, and then
        // sees its instances; one that committed first makes this launch fail.
        let launchable: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM images WHERE id = $1 AND state = 'available' FOR SHARE")
            .bind(&spec.image_id)
            .fetch_optional(&mut *tx)
            .await?;
        if launchable.is_none() {
            tx.rollback().await?;
            return Err(ServiceError::ImageNotFound(spec.image_id.clone()));
        }
        // Named subnets: as many instances as they have free addresses for.
        let fitted = self.fit_addresses(&mut tx, net).await?;
        if let Some(fit) = fitted {
            if fit < spec.min {
                tx.rollback().await?;
                let subnet = net.nics.first().and_then(|n| n.subnet.as_ref()).map(|s| s.id.clone()).unwrap_or_default();
                return Err(ServiceError::InsufficientFreeAddressesInSubnet(format!(
                    "There are not enough free addresses in subnet '{subnet}' to satisfy the requested number of instances."
                )));
            }
            allowed = allowed.min(fit);
        }
        // A subnet fixes the zone.
        let zone = net.zone.as_deref().or(spec.zone.as_deref());
        let hosts = scheduler::schedulable_hosts(&mut tx, self.config.host_timeout()).await?;
        let placements = scheduler::plan(&hosts, spec.need, allowed, zone, self.config.placement, rand::random());
        if placements.len() < spec.min as usize {
            tx.rollback().await?;
            return Err(ServiceError::InsufficientInstanceCapacity(format!(
                "{} of the {} instance(s) of type {} fit{}",
                placements.len(),
                spec.min,
                spec.instance_type,
                zone.map(|z| format!(" in {z}")).unwrap_or_default()
            )));
        }
        // Only the placement hosts are bumped here; the other hosts whose
        // network the new interfaces change learn it from the network relay
        // after the commit (`attach_launch` records the change).
        let generations = match scheduler::claim(&mut tx, &placements, spec.need).await? {
            Claim::Claimed(g) => g,
            Claim::Raced => {
                tx.rollback().await?;
                return Ok(None);
            }
        };
        let changed: Vec<i64> = placements.iter().map(|h| generations.get(h).copied().unwrap_or(0)).collect();
        let zones: std::collections::HashMap<&str, &str> = hosts.iter().map(|h| (h.id.as_str(), h.availability_zone.as_str())).collect();
        let ids: Vec<String> = placements.iter().map(|_| ids::new_id(ids::INSTANCE)).collect();
        let indexes: Vec<i32> = (0..placements.len() as i32).collect();
        let placed_zones: Vec<String> = placements.iter().map(|h| zones.get(h.as_str()).copied().unwrap_or("").to_string()).collect();
        sqlx::query(
            "INSERT INTO instances (id, account_id, reservation_id, ami_launch_index, image_id, instance_type, \
                 vcpus, memory_mib, disk_gib, availability_zone, host_id, state, desired_state, user_data, changed_generation, \
                 key_name, public_key, metadata_tokens_required, metadata_endpoint_enabled, metadata_tags_enabled, metadata_hop_limit) \
             SELECT id, $2, $3, idx, $4, $5, $6, $7, $8, zone, host, 'pending', 'running', $9, gen, $14, $15, $16, $17, $18, $19 \
             FROM unnest($1::text[], $10::int[], $11::text[], $12::text[], $13::bigint[]) AS t(id, idx, zone, host, gen)",
        )
        .bind(&ids)
        .bind(&caller.account_id)
        .bind(&reservation_id)
        .bind(&spec.image_id)
        .bind(&spec.instance_type)
        .bind(spec.need.vcpus as i32)
        .bind(spec.need.memory_mib)
        .bind(spec.need.disk_gib)
        .bind(&spec.user_data)
        .bind(&indexes)
        .bind(&placed_zones)
        .bind(&placements)
        .bind(&changed)
        .bind(&spec.key_name)
        .bind(&spec.public_key)
        .bind(spec.metadata.metadata_tokens_required)
        .bind(spec.metadata.metadata_endpoint_enabled)
        .bind(spec.metadata.metadata_tags_enabled)
        .bind(spec.metadata.metadata_hop_limit)
        .execute(&mut *tx)
        .await?;
        let placed: Vec<Placed> = ids.iter().zip(&placed_zones).map(|(id, zone)| Placed { instance_id: id, zone }).collect();
        match self.attach_launch(&mut tx, caller, net, &placed).await {
            Ok(()) => {}
            // Named subnets had room when counted, and a concurrent launch
            // took some of it since: plan again with a new count.
            Err(ServiceError::InsufficientFreeAddressesInSubnet(_)) if fitted.is_some() => {
                tx.rollback().await?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        crate::service::tags::insert_new_tags(&mut tx, &caller.account_id, &ids, &spec.tags).await?;
        // The account's usage, checked against its limits as the transaction
        // commits: a concurrent launch of the account that committed since we
        // read the usage may have used the room; then plan again.
        let count = ids.len() as i64;
        crate::service::accounts::claim_usage(&mut tx, &caller.account_id, Some(limits), count, count * spec.need.vcpus).await?;
        match tx.commit().await.map_err(ServiceError::from) {
            Ok(()) => {}
            Err(e) if crate::service::accounts::is_over_limit(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        tracing::info!(%reservation_id, count = ids.len(), instance_type = %spec.instance_type, "instances launched");
        self.reservation(caller, &reservation_id).await.map(Some)
    }
}
