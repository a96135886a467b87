//! The baseline of the launch benchmarks (`bench-launch`, `bench-debian`):
//! an instance's own domain started straight under libvirt (`virsh
//! create`), with fresh files, so that what the API path adds can be told
//! from what libvirt and the guest take anyway.

use crate::{AgentHandle, Cloud};
use anyhow::{bail, Context};
use nimbus_host_agent::access::QemuUser;
use nimbus_host_agent::disks::GuestFiles;
use nimbus_proto::agent::InstanceMetadata;
use nimbus_proto::api::Image;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `virsh -c qemu:///system ARGS`, its standard output.
pub fn virsh(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("virsh").arg("-c").arg("qemu:///system").args(args).output()?;
    if !out.status.success() {
        bail!("virsh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A copy of an instance's domain, ready to start under libvirt alone.
pub struct Baseline {
    /// Its files (overlay, seed, console log), under `<cloud dir>/baseline`.
    pub files: GuestFiles,
    /// Its domain's name, `bench-<instance id>`.
    pub name: String,
    xml_path: PathBuf,
}

impl Baseline {
    /// The domain of `agent`'s instance `id` (`xml`, as `virsh dumpxml`
    /// gave it while it was defined), renamed, with fresh files moved out of the agent's directory,
    /// another host's id (so the agent does not remove it as an orphan of
    /// its own), no UUID and a free SSH port (the instance's domain may
    /// still be defined), and an overlay of `image` of 8 GiB.
    pub async fn prepare(cloud: &Cloud, agent: &AgentHandle, image: &Image, id: &str, xml: &str) -> anyhow::Result<Baseline> {
        let instances_dir = agent.state_dir.join("instances");
        let baseline_dir = cloud.dir.path().join("baseline");
        let files = GuestFiles::new(&baseline_dir, id);
        let host_id = agent.host_id.clone().context("the agent has registered")?;
        let name = format!("bench-{id}");
        let mut xml = xml
            .replace(&instances_dir.to_string_lossy().to_string(), &baseline_dir.to_string_lossy())
            .replace(&format!("<name>nimbus-{id}</name>"), &format!("<name>{name}</name>"))
            .replace(&host_id, "h-00000000000000000");
        if let Some(p) = GuestFiles::new(&instances_dir, id).ssh_port().await {
            let free = std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
            xml = xml.replace(&format!("hostfwd=tcp:127.0.0.1:{p}-:22"), &format!("hostfwd=tcp:127.0.0.1:{free}-:22"));
        }
        let xml = xml.lines().filter(|l| !l.contains("<uuid>")).collect::<Vec<_>>().join("\n");
        let base = agent.state_dir.join("images").join(&image.root_disk.as_ref().context("the image has a root disk")?.sha256);
        let meta = InstanceMetadata {
            version: 0,
            instance_id: id.to_string(),
            reservation_id: String::new(),
            instance_type: "t3.nano".into(),
            image_id: image.image_id.clone(),
            availability_zone: "az1".into(),
            ami_launch_index: 0,
            owner_id: String::new(),
            public_keys: Vec::new(),
            options: Default::default(),
            tags: Vec::new(),
        };
        files.prepare(&base, 8, &meta, None, &QemuUser::lookup("libvirt-qemu")?, None).await?;
        let xml_path = cloud.dir.path().join(format!("{id}.xml"));
        std::fs::write(&xml_path, &xml)?;
        Ok(Baseline { files, name, xml_path })
    }

    /// `virsh create`: when it began, and how long it took.
    pub fn create(&self) -> anyhow::Result<(Instant, Duration)> {
        let t0 = Instant::now();
        virsh(&["create", &self.xml_path.to_string_lossy()])?;
        Ok((t0, t0.elapsed()))
    }

    /// Destroys the domain and removes its files.
    pub async fn remove(self) -> anyhow::Result<()> {
        let _ = virsh(&["destroy", &self.name]);
        self.files.remove().await?;
        std::fs::remove_file(&self.xml_path)?;
        Ok(())
    }
}
