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
//! it. Such an instance is left for a later pass.

use super::Service;
use nimbus_proto::metadata::{console_key, document_key, status_key};
use nimbus_state_store::{KvClient, StoreError};
use std::time::Duration;

/// Instances purged per transaction.
const BATCH: i64 = 256;
/// How often the background task looks for instances to purge.
const EVERY: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("retention: {0}")]
    Database(#[from] sqlx::Error),
    #[error("retention: state store: {0}")]
    Store(#[from] StoreError),
}

impl Service {
    /// Forgets the instances terminated more than `older_than` ago; returns
    /// how many. Stops at the first store error (the rest wait for the next
    /// pass).
    pub async fn purge_terminated(&self, older_than: Duration) -> Result<usize, PurgeError> {
        let mut purged = 0;
        loop {
            let (n, more) = self.purge_batch(older_than).await?;
            purged += n;
            if !more {
                return Ok(purged);
            }
        }
    }

    /// One batch; `more`: a full batch was found (there may be others).
    async fn purge_batch(&self, older_than: Duration) -> Result<(usize, bool), PurgeError> {
        let candidates: Vec<(String, i64)> = sqlx::query_as(
            "SELECT i.id, i.doc_version FROM instances i \
             WHERE i.state = 'terminated' AND NOT i.capacity_held \
               AND i.state_changed_at < now() - make_interval(secs => $1) \
               AND NOT EXISTS (SELECT 1 FROM metadata_outbox o WHERE o.instance_id = i.id) \
               AND NOT EXISTS (SELECT 1 FROM network_interfaces n WHERE n.instance_id = i.id) \
             ORDER BY i.id LIMIT $2",
        )
        .bind(older_than.as_secs_f64())
        .bind(BATCH)
        .fetch_all(&self.db)
        .await?;
        if candidates.is_empty() {
            return Ok((0, false));
        }
        let client = self.store.client();
        for (id, _) in &candidates {
            for key in [document_key(id), console_key(id), status_key(id)] {
                let got = client.get(key.as_bytes()).await?;
                if !got.values.is_empty() {
                    client.delete(key.as_bytes(), &got.context).await?;
                }
            }
        }
        let (ids, versions): (Vec<String>, Vec<i64>) = candidates.iter().cloned().unzip();
        let mut tx = self.db.begin().await?;
        sqlx::query("SELECT 1 FROM instances WHERE id = ANY($1) ORDER BY id FOR UPDATE").bind(&ids).execute(&mut *tx).await?;
        let gone: Vec<(String, String)> = sqlx::query_as(
            "DELETE FROM instances i USING unnest($1::text[], $2::bigint[]) AS p(id, version) \
             WHERE i.id = p.id AND i.doc_version = p.version AND i.state = 'terminated' \
               AND NOT EXISTS (SELECT 1 FROM metadata_outbox o WHERE o.instance_id = i.id) \
             RETURNING i.id, i.reservation_id",
        )
        .bind(&ids)
        .bind(&versions)
        .fetch_all(&mut *tx)
        .await?;
        let (gone_ids, reservations): (Vec<String>, Vec<String>) = gone.into_iter().unzip();
        sqlx::query("DELETE FROM tags WHERE resource_id = ANY($1)").bind(&gone_ids).execute(&mut *tx).await?;
        sqlx::query(
            "DELETE FROM reservations r WHERE r.id = ANY($1) AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.reservation_id = r.id)",
        )
        .bind(&reservations)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if !gone_ids.is_empty() {
            tracing::info!(purged = gone_ids.len(), "terminated instances forgotten");
        }
        Ok((gone_ids.len(), candidates.len() as i64 == BATCH))
    }

    /// Runs [`Service::purge_terminated`] every ten minutes with the
    /// configured retention, for as long as the process lives.
    pub fn start_retention(&self) {
        let (service, retention) = (self.clone(), Duration::from_secs(self.config.terminated_retention_secs));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(EVERY).await;
                if let Err(e) = service.purge_terminated(retention).await {
                    tracing::warn!(error = %e, "cannot purge terminated instances; next time");
                }
            }
        });
    }
}
