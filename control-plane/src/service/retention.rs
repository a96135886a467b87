//! Retention of terminated instances. DescribeInstances shows a terminated
//! instance for an hour (as EC2 does); `--terminated-retention-secs` after
//! it ended (a day unless configured) it is forgotten: its document,
//! console tail and status record in the state store first, then its rows
//! in PostgreSQL (the instance, its tags, and its reservation once no
//! instance is left in it; its client token with it).
//!
//! Store first, rows second: a crash between the two leaves the rows, so
//! the next pass deletes the keys again (a delete of a deleted key is
//! skipped). An instance is purged only if nothing waited in the outbox for
//! it when the pass began and its `doc_version` has not moved since (the
//! row lock orders this with any change): otherwise the relay might publish
//! its document again after the keys went, and nothing would ever remove
//! it. Such an instance is left for a later pass. Nothing changes an
//! instance's document an hour after it ended (tags on it are refused
//! then, as DescribeInstances no longer shows it), so with the retention
//! at least an hour no relay, of any control plane, still holds one to
//! publish. A reservation's instances go together, once all of them are
//! past the retention, so that a ClientToken retry never sees part of one.

use super::Service;
use nimbus_proto::metadata::{console_key, document_key, status_key};
use nimbus_state_store::{KvClient, StoreError};
use std::time::Duration;

/// Reservations purged per transaction (each with all its instances).
const BATCH: i64 = 64;
/// How often the background task looks for instances to purge (the first
/// time a minute after start).
const EVERY: Duration = Duration::from_secs(600);
const FIRST: Duration = Duration::from_secs(60);
/// The shortest retention `--terminated-retention-secs` accepts: the hour
/// DescribeInstances shows a terminated instance (and tags may change it).
pub const MIN_RETENTION_SECS: u64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("retention: {0}")]
    Database(#[from] sqlx::Error),
    #[error("retention: state store: {0}")]
    Store(#[from] StoreError),
}

impl Service {
    /// Forgets the instances terminated more than `older_than` ago; returns
    /// how many. An instance whose store keys cannot be deleted waits for
    /// the next pass (logged); a store that deletes nothing is an error.
    pub async fn purge_terminated(&self, older_than: Duration) -> Result<usize, PurgeError> {
        let mut purged = 0;
        loop {
            let (n, more) = self.purge_batch(older_than).await?;
            purged += n;
            // Nothing purged from a full batch: its instances wait (changed
            // or unreachable); the next pass tries again.
            if !more || n == 0 {
                return Ok(purged);
            }
        }
    }

    /// One batch of whole reservations; `more`: a full batch was found
    /// (there may be others).
    async fn purge_batch(&self, older_than: Duration) -> Result<(usize, bool), PurgeError> {
        // Whole reservations whose every instance may go: terminated past
        // the retention, nothing waiting in the outbox, no interface.
        let purgeable = |t: &str| {
            format!(
                "{t}.state = 'terminated' AND NOT {t}.capacity_held AND {t}.state_changed_at < now() - make_interval(secs => $1) \
                 AND NOT EXISTS (SELECT 1 FROM metadata_outbox o WHERE o.instance_id = {t}.id) \
                 AND NOT EXISTS (SELECT 1 FROM network_interfaces n WHERE n.instance_id = {t}.id)"
            )
        };
        // Runtime: the purgeable condition is spliced in twice (for i and j).
        let candidates: Vec<(String, i64, String)> = sqlx::query_as(&format!(
            "WITH r AS (SELECT DISTINCT i.reservation_id FROM instances i WHERE {} \
                 AND NOT EXISTS (SELECT 1 FROM instances j WHERE j.reservation_id = i.reservation_id AND NOT ({})) \
                 ORDER BY i.reservation_id LIMIT $2) \
             SELECT i.id, i.doc_version, i.reservation_id FROM instances i JOIN r USING (reservation_id) ORDER BY i.id",
            purgeable("i"),
            purgeable("j")
        ))
        .bind(older_than.as_secs_f64())
        .bind(BATCH)
        .fetch_all(&self.db)
        .await?;
        if candidates.is_empty() {
            return Ok((0, false));
        }
        let reservations: std::collections::HashSet<&str> = candidates.iter().map(|c| c.2.as_str()).collect();
        let full = reservations.len() as i64 == BATCH;
        // Store keys first; a reservation with an instance whose keys stay waits whole.
        let client = self.store.client();
        let (mut kept_back, mut failed) = (std::collections::HashSet::new(), None);
        for (id, _, reservation) in &candidates {
            if let Err(e) = forget_keys(&client, id).await {
                tracing::warn!(instance_id = %id, error = %e, "cannot delete a terminated instance's store keys; next pass");
                kept_back.insert(reservation.clone());
                failed = Some(e);
            }
        }
        if let (Some(e), true) = (failed, kept_back.len() == reservations.len()) {
            return Err(e.into());
        }
        let (ids, versions): (Vec<String>, Vec<i64>) =
            candidates.iter().filter(|c| !kept_back.contains(&c.2)).map(|c| (c.0.clone(), c.1)).unzip();
        let mut tx = self.db.begin().await?;
        // (A macro's SELECT is fetched, not executed: the rows are dropped.)
        sqlx::query!("SELECT 1 AS one FROM instances WHERE id = ANY($1) ORDER BY id FOR UPDATE", &ids).fetch_all(&mut *tx).await?;
        // A reservation one of whose instances changed since (its document
        // bumped: the relay may publish it again) waits whole too.
        let gone = sqlx::query!(
            "WITH p AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS p(id, version)), \
                  changed AS (SELECT i.reservation_id FROM instances i JOIN p ON p.id = i.id \
                      WHERE i.doc_version <> p.version OR i.state <> 'terminated' \
                         OR EXISTS (SELECT 1 FROM metadata_outbox o WHERE o.instance_id = i.id)) \
             DELETE FROM instances i USING p \
             WHERE i.id = p.id AND i.reservation_id NOT IN (SELECT reservation_id FROM changed) \
             RETURNING i.id, i.reservation_id",
            &ids,
            &versions
        )
        .fetch_all(&mut *tx)
        .await?;
        let (gone_ids, gone_reservations): (Vec<String>, Vec<String>) = gone.into_iter().map(|r| (r.id, r.reservation_id)).unzip();
        sqlx::query!("DELETE FROM tags WHERE resource_id = ANY($1)", &gone_ids).execute(&mut *tx).await?;
        sqlx::query!(
            "DELETE FROM reservations r WHERE r.id = ANY($1) AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.reservation_id = r.id)",
            &gone_reservations
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if !gone_ids.is_empty() {
            tracing::info!(purged = gone_ids.len(), "terminated instances forgotten");
        }
        Ok((gone_ids.len(), full))
    }

    /// Runs [`Service::purge_terminated`] every ten minutes with the
    /// configured retention (at least [`MIN_RETENTION_SECS`]), for as long
    /// as the process lives.
    pub fn start_retention(&self) {
        let retention = Duration::from_secs(self.config.terminated_retention_secs.max(MIN_RETENTION_SECS));
        let service = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(FIRST).await;
            loop {
                if let Err(e) = service.purge_terminated(retention).await {
                    tracing::warn!(error = %e, "cannot purge terminated instances; next time");
                }
                tokio::time::sleep(EVERY).await;
            }
        });
    }
}

/// Deletes an instance's document, console tail and status record.
async fn forget_keys(client: &impl KvClient, id: &str) -> Result<(), StoreError> {
    for key in [document_key(id), console_key(id), status_key(id)] {
        let got = client.get(key.as_bytes()).await?;
        if !got.values.is_empty() {
            client.delete(key.as_bytes(), &got.context).await?;
        }
    }
    Ok(())
}
