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

    /// The status checks hosts last wrote for `ids` (those found).
    pub async fn stored_status(&self, ids: &[String]) -> HashMap<String, StatusRecord> {
        let reads = ids.iter().map(|id| async move {
            self.observation(&status_key(id), |r: &StatusRecord| r.at).await.filter(|r| r.instance_id == *id).map(|r| (id.clone(), r))
        });
        futures::future::join_all(reads).await.into_iter().flatten().collect()
    }
}
