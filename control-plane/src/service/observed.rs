//! What hosts observe of their guests, read from the state store: console
//! tails (`GetConsoleOutput`) and status checks (`DescribeInstanceStatus`).
//! Hosts write them (`host-agent/src/store.rs`); PostgreSQL is not involved
//! beyond the caller's right to see the instance.

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

impl Service {
    /// The record under `key`; of siblings (never written so, but possible
    /// after a host moved) the one `newest` picks. `None` when absent, or
    /// when the store cannot answer in time (logged).
    async fn observation<T: serde::de::DeserializeOwned>(&self, key: &str, newest: impl Fn(&T) -> chrono::DateTime<chrono::Utc>) -> Option<T> {
        let client = self.store.client();
        let got = match tokio::time::timeout(READ_TIMEOUT, client.get(key.as_bytes())).await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                tracing::warn!(%key, error = %e, "cannot read an observation from the store");
                return None;
            }
            Err(_) => {
                tracing::warn!(%key, "reading an observation from the store timed out");
                return None;
            }
        };
        got.values.iter().filter_map(|v| serde_json::from_slice::<T>(v).ok()).max_by_key(|r| newest(r))
    }

    /// The console tail the instance's host last wrote.
    pub(crate) async fn stored_console(&self, instance_id: &str) -> Option<ConsoleRecord> {
        self.observation(&console_key(instance_id), |r: &ConsoleRecord| r.at).await.filter(|r| r.instance_id == instance_id)
    }

    /// The status checks hosts last wrote for `ids` (those found): at most
    /// [`READS_AT_ONCE`] reads in flight, all within [`READ_TIMEOUT`]
    /// altogether; what has not come by then is left out (logged), so a
    /// slow or unreachable store delays a DescribeInstanceStatus of a
    /// thousand instances by a second, not by a thousand.
    pub(crate) async fn stored_status(&self, ids: &[String]) -> HashMap<String, StatusRecord> {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        let read = |id: String| async move {
            let record = self.observation(&status_key(&id), |r: &StatusRecord| r.at).await;
            record.filter(|r| r.instance_id == id).map(|r| (id, r))
        };
        let mut reads = futures::stream::iter(ids.to_vec()).map(read).buffer_unordered(READS_AT_ONCE);
        let mut found = HashMap::new();
        loop {
            match tokio::time::timeout_at(deadline, reads.next()).await {
                Ok(Some(Some((id, record)))) => {
                    found.insert(id, record);
                }
                Ok(Some(None)) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(wanted = ids.len(), found = found.len(), "status reads from the store ran out of time; answering without the rest");
                    break;
                }
            }
        }
        found
    }
}
