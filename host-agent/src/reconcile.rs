//! Convergence: make libvirt match the control plane's assignments.
//!
//! Level-triggered: each pass starts from what libvirt and the disk actually
//! hold, never from what the agent remembers, so a pass after a crash or a
//! restart adopts what exists and repairs the rest. Every step is idempotent.

use crate::disks::GuestFiles;
use crate::domain::{self, GuestSpec, Hypervisor};
use crate::images::ImageCache;
use crate::libvirt::{DomainStatus, Libvirt};
use crate::metadata::MetadataServers;
use nimbus_proto::agent::{Assignment, DesiredState, Observation};
use nimbus_proto::ObservedState;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{broadcast, Semaphore};

/// Guests converged at once (image fetches, disk tools and libvirt calls).
const PARALLEL: usize = 8;

/// Something the agent did, for tests and benchmarks that measure it.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    Started { instance_id: String, at: Instant },
    Removed { instance_id: String, at: Instant },
}

#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    #[error(transparent)]
    Disk(#[from] crate::disks::DiskError),
    #[error(transparent)]
    Libvirt(#[from] crate::libvirt::LibvirtError),
    #[error("domain XML: {0}")]
    Xml(#[from] quick_xml::SeError),
    #[error("metadata server: {0}")]
    Metadata(std::io::Error),
}

#[derive(Clone)]
pub struct Reconciler {
    pub libvirt: Libvirt,
    pub hypervisor: Hypervisor,
    pub host_id: String,
    pub images: ImageCache,
    pub instances_dir: PathBuf,
    pub metadata: MetadataServers,
    pub events: broadcast::Sender<AgentEvent>,
}

impl Reconciler {
    /// A full pass over every assignment, starting from everything libvirt
    /// and the disk hold; returns what it observed. Domains and files of this
    /// host that no assignment names are removed.
    pub async fn converge(&self, assignments: &[Assignment]) -> Vec<Observation> {
        let domains: HashMap<String, DomainStatus> = match self.libvirt.owned_domains(&self.host_id).await {
            Ok(list) => list.into_iter().map(|d| (d.owner.instance_id.clone(), d)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list domains; skipping this pass");
                return Vec::new();
            }
        };
        let work = assignments.iter().map(|a| (a.clone(), Some(domains.get(&a.instance_id).cloned()))).collect();
        let observations = self.run_all(work).await;
        let wanted: HashSet<&str> = assignments.iter().map(|a| a.instance_id.as_str()).collect();
        self.remove_orphans(&domains, &wanted).await;
        observations
    }

    /// A pass over the assignments whose desired state changed (a delta from
    /// the control plane). Cheap when one instance changes among thousands;
    /// the periodic full [`Reconciler::converge`] catches anything missed.
    pub async fn converge_changes(&self, changes: &[Assignment]) -> Vec<Observation> {
        self.run_all(changes.iter().map(|a| (a.clone(), None)).collect()).await
    }

    /// Converges each assignment in parallel. `Some(status)`: the domain
    /// listing is already known; `None`: look the domain up.
    async fn run_all(&self, work: Vec<(Assignment, Option<Option<DomainStatus>>)>) -> Vec<Observation> {
        let limit = Arc::new(Semaphore::new(PARALLEL));
        let mut tasks = tokio::task::JoinSet::new();
        for (a, known) in work {
            let this = self.clone();
            let limit = limit.clone();
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let existing = match known {
                    Some(existing) => existing,
                    None => match this.libvirt.domain_status(&this.host_id, &a.instance_id).await {
                        Ok(existing) => existing,
                        Err(e) => {
                            return Observation { instance_id: a.instance_id.clone(), state: ObservedState::Failed, message: Some(e.to_string()), reboots: None, console: None }
                        }
                    },
                };
                this.converge_one(&a, existing).await
            });
        }
        let mut observations = Vec::new();
        while let Some(res) = tasks.join_next().await {
            match res {
                Ok(obs) => observations.push(obs),
                Err(e) => tracing::error!(error = %e, "converge task failed"),
            }
        }
        observations
    }

    async fn converge_one(&self, a: &Assignment, existing: Option<DomainStatus>) -> Observation {
        let id = a.instance_id.clone();
        let result = match a.desired {
            DesiredState::Running => self.ensure_running(a, existing).await,
            DesiredState::Stopped => self.ensure_stopped(existing).await,
            DesiredState::Terminated => self.ensure_gone(&id).await,
        };
        match result {
            Ok(state) => Observation { instance_id: id, state, message: None, reboots: None, console: None },
            Err(e) => {
                tracing::warn!(instance_id = %id, error = %e, "cannot converge instance");
                Observation { instance_id: id, state: ObservedState::Failed, message: Some(e.to_string()), reboots: None, console: None }
            }
        }
    }

    async fn ensure_running(&self, a: &Assignment, existing: Option<DomainStatus>) -> Result<ObservedState, ConvergeError> {
        if let Some(d) = existing {
            // Adopt: make sure its metadata server listens where the guest expects it.
            self.metadata.ensure(&a.metadata, a.user_data.as_deref(), Some(d.owner.metadata_port)).await.map_err(ConvergeError::Metadata)?;
            if !d.running {
                self.libvirt.start(&d.name).await?;
                tracing::info!(instance_id = %a.instance_id, "restarted a stopped domain");
                let _ = self.events.send(AgentEvent::Started { instance_id: a.instance_id.clone(), at: Instant::now() });
            }
            return Ok(ObservedState::Running);
        }
        let files = GuestFiles::new(&self.instances_dir, &a.instance_id);
        let img = &a.image;
        let kernel = self.images.ensure(&img.source_url, &img.kernel).await?;
        let initrd = match &img.initrd {
            Some(f) => Some(self.images.ensure(&img.source_url, f).await?),
            None => None,
        };
        let base = self.images.ensure(&img.source_url, &img.root_disk).await?;
        files.prepare(&base, a.disk_gib, &a.metadata, a.user_data.as_deref()).await?;
        let port = self.metadata.ensure(&a.metadata, a.user_data.as_deref(), None).await.map_err(ConvergeError::Metadata)?;
        let spec = GuestSpec {
            hypervisor: self.hypervisor,
            host_id: self.host_id.clone(),
            instance_id: a.instance_id.clone(),
            vcpus: a.vcpus,
            memory_mib: a.memory_mib,
            kernel,
            initrd,
            cmdline: img.cmdline.clone(),
            root_disk: files.root_disk(),
            base_disk: base,
            seed_iso: files.seed_iso(),
            console_log: files.console_log(),
            metadata_port: port,
        };
        self.libvirt.define_and_start(domain::render(&spec)?).await?;
        tracing::info!(instance_id = %a.instance_id, metadata_port = port, "guest started");
        let _ = self.events.send(AgentEvent::Started { instance_id: a.instance_id.clone(), at: Instant::now() });
        Ok(ObservedState::Running)
    }

    async fn ensure_stopped(&self, existing: Option<DomainStatus>) -> Result<ObservedState, ConvergeError> {
        // Stop/start arrive with the EC2 front door; a hard stop keeps disks and definition.
        match existing {
            Some(d) if d.running => Err(ConvergeError::Metadata(std::io::Error::other(format!(
                "stopping {} is not supported by this agent version",
                d.name
            )))),
            Some(_) => Ok(ObservedState::Stopped),
            None => Ok(ObservedState::Absent),
        }
    }

    /// Destroys the domain, stops the metadata server, removes the files.
    async fn ensure_gone(&self, instance_id: &str) -> Result<ObservedState, ConvergeError> {
        self.libvirt.destroy(&domain::domain_name(instance_id)).await?;
        self.metadata.stop(instance_id);
        let files = GuestFiles::new(&self.instances_dir, instance_id);
        let had_files = files.exists().await;
        files.remove().await?;
        if had_files {
            tracing::info!(%instance_id, "guest removed");
        }
        let _ = self.events.send(AgentEvent::Removed { instance_id: instance_id.to_string(), at: Instant::now() });
        Ok(ObservedState::Absent)
    }

    /// Removes this host's domains and guest directories that no assignment names.
    async fn remove_orphans(&self, domains: &HashMap<String, DomainStatus>, wanted: &HashSet<&str>) {
        let mut orphans: HashSet<String> = domains.keys().filter(|id| !wanted.contains(id.as_str())).cloned().collect();
        if let Ok(mut dir) = tokio::fs::read_dir(&self.instances_dir).await {
            while let Ok(Some(entry)) = dir.next_entry().await {
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_dir = entry.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
                if is_dir && name.starts_with("i-") && !wanted.contains(name.as_str()) {
                    orphans.insert(name);
                }
            }
        }
        for id in orphans {
            tracing::warn!(instance_id = %id, "removing a guest the control plane no longer assigns here");
            if let Err(e) = self.ensure_gone(&id).await {
                tracing::warn!(instance_id = %id, error = %e, "cannot remove orphan");
            }
        }
    }
}
