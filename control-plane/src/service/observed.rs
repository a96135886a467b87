//! What hosts observe of their guests, read from the state store: console
//! tails (`GetConsoleOutput`, which also weighs the tail a host reported to
//! PostgreSQL when it could not write the store) and status checks
//! (`DescribeInstanceStatus`). Hosts write them (`host-agent/src/store.rs`).

use super::Service;
use nimbus_proto::metadata::{console_key, status_key, ConsoleRecord, StatusRecord};
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

impl Service {
    /// The record under `key`; of siblings (never written so, but possible
    /// after a host moved) the one `newest` picks; only a record about
    /// `instance_id` counts. `Unread` when the store cannot answer in time
    /// (logged).
    async fn observation<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        instance_id: &str,
        about: impl Fn(&T) -> (&str, chrono::DateTime<chrono::Utc>),
    ) -> Observed<T> {
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
        let newest = got.values.iter().filter_map(|v| serde_json::from_slice::<T>(v).ok()).max_by_key(|r| about(r).1);
        match newest {
            Some(r) if about(&r).0 == instance_id => Observed::Found(r),
            // Values, none of them readable (written by a newer host?): unknown.
            None if !got.values.is_empty() => {
                tracing::warn!(%key, "an observation in the store cannot be read");
                Observed::Unread
            }
            _ => Observed::Absent,
        }
    }

    /// The console tail the instance's host last wrote.
    pub(crate) async fn stored_console(&self, instance_id: &str) -> Option<ConsoleRecord> {
        match self.observation(&console_key(instance_id), instance_id, |r: &ConsoleRecord| (&r.instance_id, r.at)).await {
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
        let read = |id: String| async move {
            let record = self.observation(&status_key(&id), &id, |r: &StatusRecord| (&r.instance_id, r.at)).await;
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
                    tracing::warn!(wanted = ids.len(), read = read.len(), "status reads from the store ran out of time; the rest are unread");
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
