//! What hosts observe of their guests, read from the state store: console
//! tails (`GetConsoleOutput`, which also weighs the tail a host reported to
//! PostgreSQL when it could not write the store) and status checks
//! (`DescribeInstanceStatus`). Hosts write them (`host-agent/src/store.rs`),
//! each signed by the host ([`nimbus_records::SignedRecord`]): a record
//! counts only if the instance's host (as PostgreSQL has it) signed it for
//! its key. Another host's node holding a replica (or a compromised one
//! writing there) cannot make up an instance's console or status.

use super::Service;
use nimbus_proto::metadata::{console_key, status_key, ConsoleRecord, StatusRecord};
use nimbus_records::SignedRecord;
use nimbus_state_store::KvClient;
use std::collections::HashMap;
use std::time::Duration;

/// How long a read of an observation may take before the answer goes
/// without it.
const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Status reads in flight at once for one DescribeInstanceStatus.
const READS_AT_ONCE: usize = 16;

/// How long one DescribeInstanceStatus waits for its status reads.
const STATUS_BUDGET: Duration = Duration::from_secs(3);

/// What a read of one observation found.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed<T> {
    Found(T),
    /// The store has none (a host without a store node writes none).
    Absent,
    /// The store did not answer (in time): nothing is known.
    Unread,
}

/// Who may write an instance's observations: its host's id and public key.
type Writer = (String, Vec<u8>);

impl Service {
    /// The host (id and public key) of each of `ids` that has a key.
    async fn writers(&self, ids: &[String]) -> HashMap<String, Writer> {
        let rows = sqlx::query!(
            r#"SELECT i.id AS instance_id, h.id AS host_id, h.public_key AS "public_key!" FROM instances i JOIN hosts h ON h.id = i.host_id WHERE i.id = ANY($1) AND h.public_key IS NOT NULL"#,
            ids
        )
        .fetch_all(&self.db)
        .await;
        match rows {
            Ok(rows) => rows.into_iter().map(|r| (r.instance_id, (r.host_id, r.public_key))).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the hosts of instances");
                HashMap::new()
            }
        }
    }

    /// The record under `key`, signed by `writer` (the instance's host); of
    /// siblings (possible after a host moved) the one `newest` picks; only
    /// a record about `instance_id` counts. `Unread` when the store cannot
    /// answer in time (logged); `Absent` when nothing there is the host's.
    async fn observation<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        instance_id: &str,
        writer: Option<&Writer>,
        about: impl Fn(&T) -> (&str, chrono::DateTime<chrono::Utc>),
    ) -> Observed<T> {
        let Some((host_id, public)) = writer else { return Observed::Absent };
        let client = self.store.client();
        let got = match tokio::time::timeout(READ_TIMEOUT, client.get(key.as_bytes())).await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                tracing::warn!(%key, error = %e, "cannot read an observation from the store");
                return Observed::Unread;
            }
            Err(_) => {
                tracing::warn!(%key, "reading an observation from the store timed out");
                return Observed::Unread;
            }
        };
        let genuine = |v: &Vec<u8>| -> Option<T> {
            let payload = SignedRecord::decode(v).ok()?.open(key, host_id, public).ok()?;
            serde_json::from_slice::<T>(&payload).ok()
        };
        let newest = got.values.iter().filter_map(genuine).max_by_key(|r| about(r).1);
        match newest {
            Some(r) if about(&r).0 == instance_id => Observed::Found(r),
            None if !got.values.is_empty() => {
                tracing::warn!(%key, %host_id, "no observation in the store is signed by the instance's host");
                Observed::Absent
            }
            _ => Observed::Absent,
        }
    }

    /// The console tail the instance's host last wrote.
    pub(crate) async fn stored_console(&self, instance_id: &str) -> Option<ConsoleRecord> {
        let writers = self.writers(&[instance_id.to_string()]).await;
        let writer = writers.get(instance_id);
        match self.observation(&console_key(instance_id), instance_id, writer, |r: &ConsoleRecord| (&r.instance_id, r.at)).await {
            Observed::Found(r) => Some(r),
            Observed::Absent | Observed::Unread => None,
        }
    }

    /// The status checks hosts last wrote for `ids`, each id once: at most
    /// [`READS_AT_ONCE`] reads in flight, all within [`STATUS_BUDGET`]
    /// altogether; what has not come by then is `Unread` (logged), so a
    /// slow or unreachable store delays a DescribeInstanceStatus of a
    /// thousand instances by seconds, not by minutes.
    pub(crate) async fn stored_status(&self, ids: &[String]) -> HashMap<String, Observed<StatusRecord>> {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + STATUS_BUDGET;
        let writers = self.writers(ids).await;
        let writers = &writers;
        let read = |id: String| async move {
            let record = self.observation(&status_key(&id), &id, writers.get(&id), |r: &StatusRecord| (&r.instance_id, r.at)).await;
            (id, record)
        };
        let mut reads = futures::stream::iter(ids.to_vec()).map(read).buffer_unordered(READS_AT_ONCE);
        let mut read = HashMap::new();
        loop {
            match tokio::time::timeout_at(deadline, reads.next()).await {
                Ok(Some((id, record))) => {
                    read.insert(id, record);
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        wanted = ids.len(),
                        read = read.len(),
                        "status reads from the store ran out of time; the rest are unread"
                    );
                    break;
                }
            }
        }
        for id in ids {
            read.entry(id.clone()).or_insert(Observed::Unread);
        }
        read
    }
}
