//! The agent's one libvirt connection, and hypervisor detection.
//!
//! libvirt calls block, so each runs on tokio's blocking pool.

use crate::domain::{self, Hypervisor, Ownership};
use std::sync::Arc;
use virt::connect::Connect;
use virt::domain::DomainState;

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("libvirt: {0}")]
    Virt(#[from] virt::error::Error),
    #[error("libvirt call did not complete: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What the agent sees of one of its domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainStatus {
    pub name: String,
    pub owner: Ownership,
    /// Running, blocked or paused.
    pub running: bool,
}

#[derive(Clone)]
pub struct Libvirt {
    conn: Arc<Connect>,
    pub uri: String,
    /// How long the last domain start took (see [`crate::health`]).
    pub starts: crate::health::StartTimes,
}

impl Libvirt {
    pub async fn open(uri: &str) -> Result<Libvirt, LibvirtError> {
        let u = uri.to_string();
        let conn = tokio::task::spawn_blocking(move || {
            virt::error::clear_error_callback();
            Connect::open(Some(&u))
        })
        .await??;
        Ok(Libvirt { conn: Arc::new(conn), uri: uri.to_string(), starts: Default::default() })
    }

    pub(crate) async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
    ) -> Result<T, LibvirtError> {
        let conn = self.conn.clone();
        Ok(tokio::task::spawn_blocking(move || f(&conn)).await??)
    }

    /// (logical CPUs, memory in MiB) of the machine libvirt runs guests on.
    pub async fn node_resources(&self) -> Result<(u32, u64), LibvirtError> {
        self.call(|c| c.node_info().map(|n| (n.cpus, n.memory / 1024))).await
    }

    /// Whether libvirt offers `virttype` (e.g. "kvm") for x86_64 guests.
    pub async fn supports(&self, virttype: &'static str) -> bool {
        self.call(move |c| c.domain_capabilities(None, Some("x86_64"), None, Some(virttype), 0)).await.is_ok()
    }

    /// Every domain, running or defined, that carries this host's nimbus metadata.
    pub async fn owned_domains(&self, host_id: &str) -> Result<Vec<DomainStatus>, LibvirtError> {
        let host_id = host_id.to_string();
        self.call(move |c| {
            let mut out = Vec::new();
            for dom in c.list_all_domains(0)? {
                let Ok(name) = dom.name() else { continue };
                if !name.starts_with(domain::NAME_PREFIX) {
                    continue;
                }
                // A domain can vanish between the listing and these calls.
                let (Ok(xml), Ok((state, _))) = (dom.xml_desc(0), dom.state()) else { continue };
                let Some(owner) = domain::ownership(&xml) else { continue };
                if owner.host_id != host_id {
                    continue;
                }
                out.push(DomainStatus { name, owner, running: is_running(state) });
            }
            Ok(out)
        })
        .await
    }

    /// The status of one instance's domain, if it exists and is this host's.
    pub async fn domain_status(&self, host_id: &str, instance_id: &str) -> Result<Option<DomainStatus>, LibvirtError> {
        let (host_id, name) = (host_id.to_string(), domain::domain_name(instance_id));
        self.call(move |c| {
            let dom = match c.lookup_domain_by_name(&name) {
                Ok(d) => d,
                Err(e) if no_domain(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            let xml = dom.xml_desc(0)?;
            let (state, _) = dom.state()?;
            Ok(domain::ownership(&xml).filter(|o| o.host_id == host_id).map(|owner| DomainStatus {
                name,
                owner,
                running: is_running(state),
            }))
        })
        .await
    }

    /// Defines the domain persistently and starts it.
    pub async fn define_and_start(&self, xml: String) -> Result<(), LibvirtError> {
        let starts = self.starts.clone();
        self.call(move |c| {
            let dom = c.define_domain_xml(&xml)?;
            create_timed(&dom, &starts)
        })
        .await
    }

    pub async fn start(&self, name: &str) -> Result<(), LibvirtError> {
        let (name, starts) = (name.to_string(), self.starts.clone());
        self.call(move |c| {
            let dom = c.lookup_domain_by_name(&name)?;
            if dom.is_active()? {
                return Ok(());
            }
            create_timed(&dom, &starts)
        })
        .await
    }

    /// Whether the domain is active: `None` when it does not exist.
    pub async fn is_active(&self, name: &str) -> Result<Option<bool>, LibvirtError> {
        let name = name.to_string();
        self.call(move |c| match c.lookup_domain_by_name(&name) {
            Ok(dom) => dom.is_active().map(Some),
            Err(e) if no_domain(&e) => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    /// Asks the guest to shut down (ACPI power button on QEMU). Returns
    /// whether the domain was active, i.e. whether there is a shutdown to wait for.
    pub async fn shutdown(&self, name: &str) -> Result<bool, LibvirtError> {
        self.on_active(name, |dom| dom.shutdown()).await
    }

    /// Powers the domain off at once (`destroy`), keeping its definition.
    pub async fn power_off(&self, name: &str) -> Result<bool, LibvirtError> {
        self.on_active(name, |dom| dom.destroy().map(|_| ())).await
    }

    /// Asks the guest to reboot (ACPI on QEMU). Returns whether the domain was active.
    pub async fn reboot(&self, name: &str) -> Result<bool, LibvirtError> {
        self.on_active(name, |dom| dom.reboot(0)).await
    }

    /// Runs `f` on the domain if it exists and is active; `Ok(false)` otherwise.
    /// An error from `f` while the domain went inactive meanwhile is no error.
    async fn on_active(
        &self,
        name: &str,
        f: impl FnOnce(&virt::domain::Domain) -> Result<(), virt::error::Error> + Send + 'static,
    ) -> Result<bool, LibvirtError> {
        let name = name.to_string();
        self.call(move |c| {
            let dom = match c.lookup_domain_by_name(&name) {
                Ok(d) => d,
                Err(e) if no_domain(&e) => return Ok(false),
                Err(e) => return Err(e),
            };
            if !dom.is_active()? {
                return Ok(false);
            }
            match f(&dom) {
                Ok(()) => Ok(true),
                Err(e) if !dom.is_active().unwrap_or(true) => {
                    tracing::debug!(domain = %name, error = %e, "domain went inactive during the call");
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Stops (hard) and undefines the domain, whoever owns it. Idempotent:
    /// a missing domain is fine. The agent uses [`Libvirt::destroy_owned`].
    pub async fn destroy(&self, name: &str) -> Result<(), LibvirtError> {
        let name = name.to_string();
        self.call(move |c| {
            let dom = match c.lookup_domain_by_name(&name) {
                Ok(d) => d,
                Err(e) if no_domain(&e) => return Ok(()),
                Err(e) => return Err(e),
            };
            destroy_and_undefine(&dom)
        })
        .await
    }

    /// [`Libvirt::destroy`], only if the domain is this host's (its nimbus
    /// metadata names `host_id`): a domain of the same name that another
    /// host owns, or nobody, is left alone (`Ok(false)`).
    pub async fn destroy_owned(&self, host_id: &str, name: &str) -> Result<bool, LibvirtError> {
        let (host_id, name) = (host_id.to_string(), name.to_string());
        self.call(move |c| {
            let dom = match c.lookup_domain_by_name(&name) {
                Ok(d) => d,
                Err(e) if no_domain(&e) => return Ok(true),
                Err(e) => return Err(e),
            };
            if domain::ownership(&dom.xml_desc(0)?).is_none_or(|o| o.host_id != host_id) {
                return Ok(false);
            }
            destroy_and_undefine(&dom).map(|()| true)
        })
        .await
    }
}

fn destroy_and_undefine(dom: &virt::domain::Domain) -> Result<(), virt::error::Error> {
    if dom.is_active()? {
        if let Err(e) = dom.destroy() {
            if dom.is_active()? {
                return Err(e);
            }
        }
    }
    match dom.undefine() {
        Err(e) if !no_domain(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Starts a defined domain, recording how long libvirt took.
fn create_timed(dom: &virt::domain::Domain, starts: &crate::health::StartTimes) -> Result<(), virt::error::Error> {
    let t0 = std::time::Instant::now();
    dom.create()?;
    starts.record(&dom.name().unwrap_or_default(), t0.elapsed());
    Ok(())
}

fn is_running(state: virt::domain::DomainStateEnum) -> bool {
    state.is_known_and(|s| matches!(s, DomainState::Running | DomainState::Blocked | DomainState::Paused))
}

fn no_domain(e: &virt::error::Error) -> bool {
    e.code().is_known_and(|c| c == virt::error::ErrorNumber::NoDomain)
}

/// How the hypervisor was chosen, for the logs.
pub struct Detected {
    pub hypervisor: Hypervisor,
    pub uri: String,
    pub reason: String,
}

/// Picks KVM where it really runs guests, QEMU/TCG otherwise.
///
/// `/dev/kvm` alone is not enough: under a PVM-based nested KVM (module
/// `kvm_pvm`) stock guest kernels hang at boot. KVM is chosen only when the
/// hardware modules (`kvm_intel`/`kvm_amd`) are loaded and libvirt offers the
/// `kvm` domain type.
pub async fn detect() -> Result<Detected, LibvirtError> {
    let uri = "qemu:///system".to_string();
    let module = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    let hardware_kvm = std::path::Path::new("/dev/kvm").exists() && (module("kvm_intel") || module("kvm_amd"));
    let lv = Libvirt::open(&uri).await?;
    let (hypervisor, reason) = if hardware_kvm && lv.supports("kvm").await {
        (Hypervisor::Kvm, "hardware KVM (kvm_intel/kvm_amd) is available".to_string())
    } else if module("kvm_pvm") {
        (Hypervisor::Qemu, "/dev/kvm is a PVM nested KVM (kvm_pvm), which does not boot stock kernels: using TCG".to_string())
    } else if hardware_kvm {
        (Hypervisor::Qemu, "libvirt does not offer the kvm domain type: using TCG".to_string())
    } else {
        (Hypervisor::Qemu, "no usable /dev/kvm: using TCG".to_string())
    };
    Ok(Detected { hypervisor, uri, reason })
}
