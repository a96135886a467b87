//! Host agents running in the test process.

use crate::*;
use anyhow::Context;
use nimbus_host_agent::reconcile::AgentEvent;
use nimbus_host_agent::{AgentConfig, HypervisorChoice};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{broadcast, oneshot};

/// One host agent running in this process.
///
/// Dropping the handle of an agent on a real hypervisor (a test that ended,
/// passed or failed) stops the agent and then destroys every domain it owns,
/// so no guest outlives its test. Stopping first matters: a running agent
/// would define a guest again after it was destroyed. Use a multi-threaded
/// runtime for such tests (the drop waits for the agent to stop).
pub struct AgentHandle {
    pub name: String,
    /// Known once the agent registered.
    pub host_id: Option<String>,
    pub state_dir: PathBuf,
    pub events: broadcast::Receiver<AgentEvent>,
    pub(crate) config: AgentConfig,
    pub(crate) shutdown: Option<oneshot::Sender<()>>,
    pub(crate) task: Option<tokio::task::JoinHandle<()>>,
}

impl AgentHandle {
    /// Where the agent's state-store node listens (its node id), if it runs one.
    pub fn store_address(&self) -> Option<std::net::SocketAddr> {
        self.config.store_listen
    }

    /// The unix socket of an instance's metadata server on this agent.
    pub fn metadata_socket(&self, instance_id: &str) -> PathBuf {
        nimbus_host_agent::metadata::socket_path(&self.config.run_dir, instance_id)
    }

    /// Waits for `n` full convergence passes (each a resync of every
    /// assignment, reported to the control plane) that complete after this
    /// call. The first may have begun before it: await two to be sure that
    /// a whole pass saw the present state. Fails if they do not come within
    /// `n` times (poll interval + 30 s), scaled.
    pub async fn passes(&self, n: usize) -> anyhow::Result<()> {
        let mut events = self.events.resubscribe();
        let per_pass = Duration::from_millis(self.config.poll_ms) + Duration::from_secs(30);
        let timeout = scaled(per_pass * n as u32);
        let mut seen = 0;
        await_event(&mut events, timeout, |e| {
            if matches!(e, AgentEvent::PassCompleted { full: true, reported: true, .. }) {
                seen += 1;
            }
            (seen >= n).then_some(())
        })
        .await
        .with_context(|| format!("agent {}: {seen} of {n} full passes", self.name))
    }

    /// Stops the agent as a crash would, leaving its guests and files behind.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.remove_guests();
        let _ = std::fs::remove_dir_all(&self.config.run_dir);
    }
}

impl AgentHandle {
    /// See the type's documentation.
    fn remove_guests(&mut self) {
        let uri = match (self.config.hypervisor, &self.config.libvirt_uri) {
            (HypervisorChoice::Test, _) => None,
            (_, Some(uri)) => Some(uri.clone()),
            (HypervisorChoice::Xen, None) => Some("xen:///system".to_string()),
            (_, None) => Some("qemu:///system".to_string()),
        };
        let (Some(uri), Some(host_id)) = (uri, self.host_id.clone()) else {
            if let Some(task) = &self.task {
                task.abort();
            }
            return;
        };
        let name = self.name.clone();
        let cleanup = async {
            self.stop().await;
            let lv = nimbus_host_agent::libvirt::Libvirt::open(&uri).await?;
            for d in lv.owned_domains(&host_id).await? {
                lv.destroy(&d.name).await?;
            }
            Ok::<_, nimbus_host_agent::libvirt::LibvirtError>(())
        };
        let result = match tokio::runtime::Handle::try_current() {
            Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| rt.block_on(cleanup))
            }
            _ => {
                drop(cleanup);
                eprintln!("agent {name}: not on a multi-threaded runtime, cannot stop it to remove its guests");
                if let Some(task) = &self.task {
                    task.abort();
                }
                return;
            }
        };
        if let Err(e) = result {
            eprintln!("agent {name}: cannot remove its guests: {e}");
        }
    }
}
