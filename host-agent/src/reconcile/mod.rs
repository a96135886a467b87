//! Convergence: make libvirt match the control plane's assignments.
//!
//! Level-triggered: each pass starts from what libvirt and the disk actually
//! hold, never from what the agent remembers, so a pass after a crash or a
//! restart adopts what exists and repairs the rest. Every step is idempotent.
//!
//! Desired `running` starts a defined-but-off domain; `stopped` shuts a
//! running one down in the background (see [`crate::power`]), keeping its
//! definition and files; owed reboots are carried out on running guests.
//! Each observation carries the reboots done and any new console output.
//!
//! What the agent keeps of each instance between passes (its assignment,
//! failed attempts, stop guard, images being made, console) has one owner,
//! its slot (`slots.rs`); `imaging.rs` is CreateImage's side on this host.

mod imaging;
mod slots;

use crate::disks::GuestFiles;
use crate::domain::{self, GuestNic, GuestSpec, Hypervisor};
use crate::images::ImageCache;
use crate::libvirt::{DomainStatus, Libvirt};
use crate::metadata::MetadataServers;
use crate::network::DataPlane;
use crate::power;
use nimbus_proto::agent::{Assignment, DesiredState, ImageProblem, Observation};
use nimbus_proto::api::BootStyle;
use nimbus_proto::network::{HostNetwork, Nic};
use nimbus_proto::ObservedState;
use slots::Instances;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, Semaphore};

/// Guests converged at once (image fetches, disk tools and libvirt calls).
const PARALLEL: usize = 8;

/// How long a pass waits for a stop it began before reporting it in
/// progress; the stop then reports on its own when done.
const INLINE_STOP_WAIT: Duration = Duration::from_secs(2);

/// Something the agent did, for tests and benchmarks that measure it.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    Started {
        instance_id: String,
        at: Instant,
    },
    Removed {
        instance_id: String,
        at: Instant,
    },
    /// The guest was shut down (its domain stays defined).
    Stopped {
        instance_id: String,
        at: Instant,
        forced: bool,
    },
    /// A reboot was requested of the running guest.
    Rebooted {
        instance_id: String,
        at: Instant,
    },
    /// Making an image of the instance's disk began (CreateImage).
    Imaging {
        instance_id: String,
        image_id: String,
    },
    /// A convergence pass ended and its report was sent: `full`, a resync of
    /// every assignment (a poll that timed out, or the first); otherwise the
    /// changes a wake-up brought. `generation`: the host generation it
    /// converged to; `reported`: whether the control plane took the report.
    /// Tests await these to show that passes ran and changed nothing.
    PassCompleted {
        full: bool,
        generation: i64,
        reported: bool,
    },
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
    #[error(transparent)]
    Counter(#[from] power::CounterError),
    #[error(transparent)]
    Network(#[from] crate::network::NetError),
    #[error("the image {0} names no source for its files")]
    NoSource(String),
}

impl ConvergeError {
    /// What the instance's owner may read of this error (its state reason):
    /// no host paths, URLs or digests. The whole error goes to the agent's log.
    pub fn public_message(&self) -> String {
        use crate::images::ImageError;
        match self {
            ConvergeError::Image(ImageError::Checksum { name, .. }) => format!("image file {name}: checksum mismatch"),
            ConvergeError::Image(ImageError::UnsupportedSource { name, .. }) => format!("image file {name}: unsupported source"),
            ConvergeError::Image(ImageError::Io { name, .. }) => format!("image file {name}: cannot be read"),
            ConvergeError::Image(ImageError::Http { name, .. }) => format!("image file {name}: download failed"),
            ConvergeError::Image(ImageError::NotStandalone { name, .. }) => format!("image file {name}: {NOT_STANDALONE}"),
            ConvergeError::Disk(_) => "the host could not prepare the instance's disks".into(),
            ConvergeError::Libvirt(_) | ConvergeError::Xml(_) => "the hypervisor could not start the instance".into(),
            ConvergeError::Metadata(_) => "the host could not serve the instance's metadata".into(),
            ConvergeError::Counter(_) => "the host could not record the instance's reboots".into(),
            ConvergeError::Network(_) => "the host could not plumb the instance's network interfaces".into(),
            ConvergeError::NoSource(image) => format!("the image {image} has no source for its files"),
        }
    }
}

/// Where one pass left an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Running; `started`: by this pass (a fresh boot needs no pending reboot).
    Running {
        started: bool,
    },
    /// A stop is under way (begun by this pass or an earlier one).
    Stopping,
    /// The stop failed; the guest presumably still runs. A later pass retries.
    StopFailed(String),
    Stopped,
    Absent,
}

/// What a reconciler works with: this host's hypervisor, caches,
/// directories, services and policies (see [`Reconciler::new`]).
pub struct Setup {
    pub libvirt: Libvirt,
    pub hypervisor: Hypervisor,
    pub images: ImageCache,
    /// Where each guest's files live (`<dir>/<instance id>/`).
    pub instances_dir: PathBuf,
    pub metadata: MetadataServers,
    /// Who QEMU runs guests as (owner of their overlays; see [`crate::access`]).
    pub qemu: crate::access::QemuUser,
    /// The VPC data plane; `None`: QEMU user-mode networking.
    pub network: Option<DataPlane>,
    /// How long a guest gets to shut down on ACPI before it is powered off.
    pub stop_timeout: Duration,
    /// Cached image files unused this long are removed (full passes).
    pub image_cache_ttl: Duration,
}

/// Converges this host's guests to their assignments. Cheap to clone: a
/// clone is what a task that outlives its pass (a stop, CreateImage)
/// holds, and every clone shares the instances' state, the image problems
/// and the channels.
#[derive(Clone)]
pub struct Reconciler {
    libvirt: Libvirt,
    hypervisor: Hypervisor,
    /// Set once registered (see [`Reconciler::set_host_id`]).
    host_id: String,
    images: ImageCache,
    instances_dir: PathBuf,
    metadata: MetadataServers,
    qemu: crate::access::QemuUser,
    network: Option<DataPlane>,
    stop_timeout: Duration,
    image_cache_ttl: Duration,
    // Shared by every clone:
    /// Each instance's state, one slot per instance (see [`slots`]).
    instances: Instances,
    /// Image problems for the next report (see [`ImageProblem`]).
    image_problems: Arc<std::sync::Mutex<Vec<ImageProblem>>>,
    events: broadcast::Sender<AgentEvent>,
    /// Observations made after their pass reported (a stop that took a while).
    late: mpsc::UnboundedSender<Observation>,
}

/// Why a root disk was refused, as its owner may read it (the details,
/// host paths among them, stay in the agent's log).
const NOT_STANDALONE: &str = "refused: not a standalone qcow2 (it names a backing or external data file, or is another format)";

/// Attempts before a guest that cannot be converged is reported `Failed`
/// (which terminates it): one libvirt hiccup must not cost an instance, a
/// corrupt image must not keep it pending forever.
pub const FAILED_AFTER: u32 = 3;

impl Reconciler {
    /// A reconciler of `setup`'s host (whose id comes with
    /// [`Reconciler::set_host_id`]), and the receiver of the observations
    /// it makes after their pass reported.
    pub fn new(setup: Setup) -> (Reconciler, mpsc::UnboundedReceiver<Observation>) {
        let Setup { libvirt, hypervisor, images, instances_dir, metadata, qemu, network, stop_timeout, image_cache_ttl } = setup;
        let (events, _) = broadcast::channel(4096);
        let (late, late_rx) = mpsc::unbounded_channel();
        let reconciler = Reconciler {
            libvirt,
            hypervisor,
            host_id: String::new(),
            images,
            instances_dir,
            metadata,
            qemu,
            network,
            stop_timeout,
            image_cache_ttl,
            instances: Instances::default(),
            image_problems: Arc::default(),
            events,
            late,
        };
        (reconciler, late_rx)
    }

    /// The id this host registered as (again: a lost credential).
    pub fn set_host_id(&mut self, host_id: &str) {
        self.host_id = host_id.to_string();
    }

    pub fn hypervisor(&self) -> Hypervisor {
        self.hypervisor
    }

    pub fn libvirt(&self) -> &Libvirt {
        &self.libvirt
    }

    pub fn images(&self) -> &ImageCache {
        &self.images
    }

    pub fn metadata(&self) -> &MetadataServers {
        &self.metadata
    }

    /// The VPC data plane; `None`: QEMU user-mode networking.
    pub fn network(&self) -> Option<&DataPlane> {
        self.network.as_ref()
    }

    /// Events of the agent's work, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// Tells the subscribers of [`Reconciler::subscribe`].
    pub fn announce(&self, event: AgentEvent) {
        let _ = self.events.send(event);
    }

    /// Records the console tails a delivered report carried.
    pub fn console_delivered(&self, observations: &[Observation]) {
        self.instances.console_delivered(observations);
    }

    /// Takes the image problems queued for the next report (by `image_problem`).
    pub fn take_image_problems(&self) -> Vec<ImageProblem> {
        std::mem::take(&mut *self.image_problems.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A full pass over every assignment, starting from everything libvirt
    /// and the disk hold; returns what it observed. Domains and files of this
    /// host that no assignment names are removed.
    pub async fn converge(&self, assignments: &[Assignment], network: &HostNetwork) -> Vec<Observation> {
        self.instances.assign_all(assignments);
        self.converge_network(network, true).await;
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
        // Every file an assigned instance boots stays cached (its overlay
        // needs its base); the others go once unused for the TTL.
        let in_use: HashSet<String> = assignments
            .iter()
            .flat_map(|a| [Some(&a.image.root_disk), a.image.kernel.as_ref(), a.image.initrd.as_ref()])
            .flatten()
            .map(|f| f.sha256.clone())
            .collect();
        self.images.sweep(&in_use, self.image_cache_ttl).await;
        observations
    }

    /// A pass over the assignments whose desired state changed (a delta from
    /// the control plane). Cheap when one instance changes among thousands;
    /// the periodic full [`Reconciler::converge`] catches anything missed.
    pub async fn converge_changes(&self, changes: &[Assignment], network: &HostNetwork) -> Vec<Observation> {
        self.instances.assign_changes(changes);
        self.converge_network(network, false).await;
        self.run_all(changes.iter().map(|a| (a.clone(), None)).collect()).await
    }

    /// Makes the host's VPC network match (before guests start on it), and
    /// serves metadata on each VPC present. Failures are logged: the next
    /// pass tries again, and guests that need the network retry with it.
    async fn converge_network(&self, network: &HostNetwork, full: bool) {
        let Some(dp) = &self.network else { return };
        let nics = self.instances.assigned_nics();
        if let Err(e) = dp.reconcile(network, &nics, full).await {
            tracing::warn!(error = %e, "cannot converge the VPC network");
            return;
        }
        let present: HashSet<u32> = network.vpcs.iter().map(|v| v.vni).collect();
        for vni in &present {
            if let Err(e) = self.metadata.ensure_vpc(*vni, &dp.vpc_ns_name(*vni)).await {
                tracing::warn!(vni, error = %e, "cannot serve metadata on the VPC's network");
            }
        }
        for vni in self.metadata.vpc_listeners() {
            if !present.contains(&vni) {
                self.metadata.stop_vpc(vni);
            }
        }
    }

    /// The interfaces of `nics` the data plane plumbs (none in user-mode networking).
    fn vpc_nics<'a>(&self, nics: &'a [Nic]) -> &'a [Nic] {
        if self.network.is_some() {
            nics
        } else {
            &[]
        }
    }

    /// Shuts the guest down (ACPI, then forced after the stop timeout) and
    /// announces it (`AgentEvent::Stopped`).
    async fn stop_guest(&self, instance_id: &str, name: &str) -> Result<power::Stopped, crate::libvirt::LibvirtError> {
        let how = power::stop_domain(&self.libvirt, name, self.stop_timeout).await?;
        let forced = how == power::Stopped::Forced;
        let _ = self.events.send(AgentEvent::Stopped { instance_id: instance_id.to_string(), at: Instant::now(), forced });
        Ok(how)
    }

    /// No assignment could be had since this agent started (the control
    /// plane is unreachable): serves the metadata of the guests running
    /// here from the state store's documents, so that a guest keeps its
    /// metadata across an agent restart during a control-plane outage. The
    /// first assignments take over. Returns how many guests are served so.
    pub async fn serve_from_store(&self) -> usize {
        let domains = match self.libvirt.owned_domains(&self.host_id).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list this host's domains");
                return 0;
            }
        };
        let mut served = 0;
        for d in domains.into_iter().filter(|d| d.running) {
            let Some(doc) = self.metadata.document(&d.owner.instance_id).await else { continue };
            let namespace_of = |vni: u32| self.network.as_ref().map(|dp| dp.vpc_ns_name(vni));
            match self.metadata.ensure_document(doc, namespace_of).await {
                Ok(()) => served += 1,
                Err(e) => tracing::warn!(instance_id = %d.owner.instance_id, error = %e, "cannot serve metadata from the store"),
            }
        }
        served
    }

    /// Serves the instance's metadata: on its VPC network, or on its unix
    /// socket for user-mode networking. The socket's path either way (the
    /// domain of a VPC guest does not use it).
    async fn serve_metadata(&self, a: &Assignment) -> Result<PathBuf, ConvergeError> {
        let nics = self.vpc_nics(&a.nics);
        if nics.is_empty() {
            self.metadata.ensure(&a.metadata, a.user_data.as_deref()).await.map_err(ConvergeError::Metadata)
        } else {
            self.metadata.publish(&a.metadata, a.user_data.as_deref(), nics);
            Ok(self.metadata.socket(&a.instance_id))
        }
    }

    /// Starts a guest (defining it first when `define` has its XML), its
    /// VPC interfaces made first (see [`crate::network`]).
    async fn start_guest(&self, name: &str, nics: &[Nic], define: Option<String>) -> Result<(), ConvergeError> {
        if let (Some(dp), false) = (&self.network, nics.is_empty()) {
            dp.prepare(nics).await?;
        }
        match define {
            Some(xml) => self.libvirt.define_and_start(xml).await?,
            None => self.libvirt.start(name).await?,
        }
        Ok(())
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
                        // One libvirt hiccup must not cost the instance: counted like any failure.
                        Err(e) => return this.failed_attempt(&a.instance_id, e.into()),
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
        // A stop under way owns the guest until it ends: no second stop, no restart.
        if a.desired != DesiredState::Terminated && self.instances.stopping(&a.instance_id) {
            return self.observe(a, Outcome::Stopping).await;
        }
        let result = match a.desired {
            DesiredState::Running => self.ensure_running(a, existing).await,
            DesiredState::Stopped => self.ensure_stopped(a, existing).await,
            DesiredState::Terminated => self.ensure_gone(&a.instance_id).await.map(|_| Outcome::Absent),
        };
        match result {
            Ok(outcome) => {
                self.instances.clear_failures(&a.instance_id);
                if matches!(outcome, Outcome::Running { .. } | Outcome::Stopped) {
                    for task in &a.create_images {
                        self.make_image(a, task);
                    }
                }
                self.observe(a, outcome).await
            }
            Err(e) => {
                match &e {
                    // The registration is wrong (the file is not the one it names).
                    ConvergeError::Image(crate::images::ImageError::Checksum { name, .. }) => {
                        self.image_problem(&a.image.image_id, format!("image file {name}: its SHA-256 differs from the one registered"))
                    }
                    // So is the image itself, wherever it is fetched.
                    ConvergeError::Image(crate::images::ImageError::NotStandalone { name, .. }) => {
                        self.image_problem(&a.image.image_id, format!("image file {name}: {NOT_STANDALONE}"))
                    }
                    _ => {}
                }
                self.failed_attempt(&a.instance_id, e)
            }
        }
    }

    /// The instance's desired state as last assigned (`None`: terminated
    /// or never assigned here).
    fn desired_now(&self, instance_id: &str) -> Option<DesiredState> {
        self.instances.assigned(instance_id).map(|a| a.desired)
    }

    /// Queues a problem for the next report: one per image, at most
    /// [`nimbus_proto::agent::MAX_IMAGE_PROBLEMS`] (what a report may carry).
    pub(crate) fn image_problem(&self, image_id: &str, message: String) {
        let mut p = self.image_problems.lock().unwrap_or_else(|p| p.into_inner());
        if !p.iter().any(|x| x.image_id == image_id) && p.len() < nimbus_proto::agent::MAX_IMAGE_PROBLEMS {
            p.push(ImageProblem { image_id: image_id.to_string(), message });
        }
    }

    /// Counts a failed attempt at an instance: `Building` (retried next
    /// pass) until [`FAILED_AFTER`] attempts, then `Failed`. The error goes
    /// to the log; the observation carries only its public message.
    fn failed_attempt(&self, instance_id: &str, e: ConvergeError) -> Observation {
        let attempts = self.instances.count_failure(instance_id);
        tracing::warn!(%instance_id, attempts, error = %e, "cannot converge instance");
        let (state, message) = if attempts >= FAILED_AFTER {
            (ObservedState::Failed, format!("{} (after {attempts} attempts)", e.public_message()))
        } else {
            (ObservedState::Building, e.public_message())
        };
        Observation {
            instance_id: instance_id.to_string(),
            state,
            message: Some(message),
            reboots: None,
            console: None,
            ssh_endpoint: None,
        }
    }

    /// The observation of an instance after a pass: its state, the reboots
    /// carried out (rebooting the guest first if one is owed) and any new
    /// console output.
    async fn observe(&self, a: &Assignment, outcome: Outcome) -> Observation {
        let id = &a.instance_id;
        let (state, mut message) = match &outcome {
            Outcome::Running { .. } => (ObservedState::Running, None),
            Outcome::Stopping => (ObservedState::Running, Some("stop in progress".to_string())),
            Outcome::StopFailed(why) => (ObservedState::Running, Some(format!("stop failed: {why}"))),
            Outcome::Stopped => (ObservedState::Stopped, None),
            Outcome::Absent => {
                self.instances.forget_console(id);
                return Observation {
                    instance_id: id.clone(),
                    state: ObservedState::Absent,
                    message: None,
                    reboots: None,
                    console: None,
                    ssh_endpoint: None,
                };
            }
        };
        let files = GuestFiles::new(&self.instances_dir, id);
        let reboots = match self.carry_out_reboots(a, &files, &outcome).await {
            Ok(n) => Some(n),
            Err(e) => {
                // Not a failure of the instance: the guest is as `state` says; retried next pass.
                tracing::warn!(instance_id = %id, error = %e, "cannot reboot");
                message = Some(format!("reboot: {e}"));
                None
            }
        };
        let console = self.instances.console_tail(id, &files.console_log()).await;
        let ssh_endpoint = files.ssh_port().await.map(|p| format!("127.0.0.1:{p}"));
        Observation { instance_id: id.clone(), state, message, reboots, console, ssh_endpoint }
    }

    /// Brings the reboots carried out up to those asked for: one reboot of a
    /// guest that was already running covers every request still owed; a
    /// guest that is off or was just booted owes none. Returns the count done.
    async fn carry_out_reboots(&self, a: &Assignment, files: &GuestFiles, outcome: &Outcome) -> Result<i64, ConvergeError> {
        let done = power::reboots_done(&files.dir).await?;
        if a.reboots <= done {
            return Ok(done);
        }
        match outcome {
            Outcome::Running { started: false } => {
                if self.libvirt.reboot(&domain::domain_name(&a.instance_id)).await? {
                    tracing::info!(instance_id = %a.instance_id, requested = a.reboots, done, "guest rebooted");
                    let _ = self.events.send(AgentEvent::Rebooted { instance_id: a.instance_id.clone(), at: Instant::now() });
                }
            }
            Outcome::Running { started: true } | Outcome::Stopped => {}
            Outcome::Stopping | Outcome::StopFailed(_) | Outcome::Absent => return Ok(done),
        }
        power::record_reboots(&files.dir, a.reboots).await?;
        Ok(a.reboots)
    }

    async fn ensure_running(&self, a: &Assignment, existing: Option<DomainStatus>) -> Result<Outcome, ConvergeError> {
        let nics = self.vpc_nics(&a.nics);
        if let Some(d) = existing {
            // Adopt: make sure its metadata server listens where the guest expects it.
            self.serve_metadata(a).await?;
            let started = !d.running;
            if started {
                self.start_guest(&d.name, nics, None).await?;
                tracing::info!(instance_id = %a.instance_id, "restarted a stopped domain");
                let _ = self.events.send(AgentEvent::Started { instance_id: a.instance_id.clone(), at: Instant::now() });
            }
            return Ok(Outcome::Running { started });
        }
        let files = GuestFiles::new(&self.instances_dir, &a.instance_id);
        let img = &a.image;
        let url = || img.source_url.clone().map(crate::images::Source::Url).ok_or_else(|| ConvergeError::NoSource(img.image_id.clone()));
        let (kernel, initrd) = match (img.boot, &img.kernel) {
            (BootStyle::Kernel, Some(k)) => {
                let kernel = self.images.ensure(&url()?, k).await?;
                let initrd = match &img.initrd {
                    Some(f) => Some(self.images.ensure(&url()?, f).await?),
                    None => None,
                };
                (Some(kernel), initrd)
            }
            _ => (None, None),
        };
        let disk_source = if img.root_disk_in_store { crate::images::Source::Store } else { url()? };
        let base = self.images.ensure_disk(&disk_source, &img.root_disk).await?;
        let network_config = match (&self.network, nics.is_empty()) {
            (Some(dp), false) => Some(crate::network::guest_network_config(nics, dp.mtu())),
            _ => None,
        };
        files.prepare(&base, a.disk_gib, &a.metadata, a.user_data.as_deref(), &self.qemu, network_config.as_deref()).await?;
        // User-mode networking: a loopback port forwarded to the guest's SSH.
        // (Not on the test driver: no guest runs there to listen.)
        let ssh_port = if nics.is_empty() && matches!(self.hypervisor, Hypervisor::Kvm | Hypervisor::Qemu) {
            Some(files.ensure_ssh_port().await?)
        } else {
            None
        };
        let metadata_socket = self.serve_metadata(a).await?;
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
            metadata_socket,
            ssh_port,
            qemu: self.qemu,
            nics: nics.iter().map(|n| GuestNic { mac: n.mac.clone(), link: crate::network::guest_link(&n.eni_id) }).collect(),
        };
        if let Err(e) = self.start_guest(&domain::domain_name(&a.instance_id), nics, Some(domain::render(&spec)?)).await {
            // The port picked may have been taken meanwhile: the next attempt
            // picks another and defines the domain afresh.
            if ssh_port.is_some() {
                files.forget_ssh_port().await;
                let _ = self.libvirt.destroy_owned(&self.host_id, &domain::domain_name(&a.instance_id)).await;
            }
            return Err(e);
        }
        tracing::info!(instance_id = %a.instance_id, "guest started");
        let _ = self.events.send(AgentEvent::Started { instance_id: a.instance_id.clone(), at: Instant::now() });
        Ok(Outcome::Running { started: true })
    }

    /// Stops a running guest (ACPI, then forced after `stop_timeout`),
    /// keeping its definition and files. The stop runs in its own task; the
    /// pass waits for it a little, after which the task reports on its own.
    async fn ensure_stopped(&self, a: &Assignment, existing: Option<DomainStatus>) -> Result<Outcome, ConvergeError> {
        // No domain: nothing runs; any files are kept, and a start builds the domain.
        let Some(d) = existing else { return Ok(Outcome::Stopped) };
        // Keep serving the guest's metadata socket for its next start.
        if let Err(e) = self.metadata.ensure(&a.metadata, a.user_data.as_deref()).await {
            tracing::warn!(instance_id = %a.instance_id, error = %e, "cannot serve metadata");
        }
        if !d.running {
            return Ok(Outcome::Stopped);
        }
        let Some(guard) = self.instances.begin_stop(&a.instance_id) else { return Ok(Outcome::Stopping) };
        let (this, name, id) = (self.clone(), d.name.clone(), a.instance_id.clone());
        let mut task = tokio::spawn(async move {
            let _guard = guard;
            tracing::info!(instance_id = %id, timeout_secs = this.stop_timeout.as_secs(), "stopping guest");
            let r = this.stop_guest(&id, &name).await;
            match &r {
                Ok(how) => {
                    tracing::info!(instance_id = %id, ?how, "guest stopped");
                    // Its service stays for the next start; what it had open goes.
                    this.metadata.close_connections(&id);
                }
                Err(e) => tracing::warn!(instance_id = %id, error = %e, "cannot stop guest"),
            }
            r
        });
        let outcome = |joined: Result<Result<power::Stopped, crate::libvirt::LibvirtError>, tokio::task::JoinError>| match joined {
            Ok(Ok(_)) => Outcome::Stopped,
            Ok(Err(e)) => Outcome::StopFailed(e.to_string()),
            Err(e) => Outcome::StopFailed(e.to_string()),
        };
        match tokio::time::timeout(INLINE_STOP_WAIT, &mut task).await {
            Ok(joined) => Ok(outcome(joined)),
            Err(_) => {
                let (this, a) = (self.clone(), a.clone());
                tokio::spawn(async move {
                    let obs = this.observe(&a, outcome(task.await)).await;
                    let _ = this.late.send(obs);
                });
                Ok(Outcome::Stopping)
            }
        }
    }

    /// Destroys the domain (if this host's: a domain of that name another
    /// host owns is never touched), stops the metadata server, removes the files.
    async fn ensure_gone(&self, instance_id: &str) -> Result<ObservedState, ConvergeError> {
        if !self.libvirt.destroy_owned(&self.host_id, &domain::domain_name(instance_id)).await? {
            tracing::warn!(%instance_id, "a domain of this name belongs to another host; left alone");
        }
        self.metadata.stop(instance_id);
        if let Some(dp) = &self.network {
            let gone = self.instances.unassign(instance_id);
            dp.remove(&gone.map(|a| a.nics).unwrap_or_default()).await;
        }
        self.instances.forget_console(instance_id);
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
        self.metadata.sweep(wanted).await;
        for id in orphans {
            tracing::warn!(instance_id = %id, "removing a guest the control plane no longer assigns here");
            if let Err(e) = self.ensure_gone(&id).await {
                tracing::warn!(instance_id = %id, error = %e, "cannot remove orphan");
            }
        }
    }
}
