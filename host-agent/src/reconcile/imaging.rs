//! CreateImage on this host: an image of an instance's disk, made once per
//! image in a task of its own. Unless `no_reboot`, the guest is shut down
//! cleanly under its stop guard first (a stop already under way is waited
//! for) and brought back after to what its latest assignment wants; the
//! overlay and its pinned backing chain are flattened into one qcow2
//! ([`crate::disks::flatten`]), hashed and uploaded to the control plane's
//! image store, and the file joins this host's cache. Any failure is an
//! image problem for the next report (the image fails).

use super::{AgentEvent, Outcome, Reconciler};
use crate::disks::GuestFiles;
use crate::domain;
use nimbus_proto::agent::{Assignment, DesiredState, ImageTask};
use std::time::{Duration, Instant};

impl Reconciler {
    /// Makes an image of the instance's disk (CreateImage) in its own task,
    /// once per image at a time: a clean shutdown first unless `no_reboot`
    /// (and a start after), `qemu-img convert` of the overlay and its
    /// backing chain into one qcow2, its digest, the upload to the image
    /// store; the file then joins this host's cache. Failures become image
    /// problems (the image fails).
    pub(super) fn make_image(&self, a: &Assignment, task: &ImageTask) {
        if !self.instances.begin_image(&a.instance_id, &task.image_id) {
            return;
        }
        let (this, a, task) = (self.clone(), a.clone(), task.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            match this.try_make_image(&a, &task).await {
                Ok(sha256) => tracing::info!(image_id = %task.image_id, instance_id = %a.instance_id, %sha256,
                    secs = started.elapsed().as_secs_f64(), "image made and uploaded"),
                Err(e) => {
                    tracing::warn!(image_id = %task.image_id, instance_id = %a.instance_id, error = %e, "cannot make image");
                    this.image_problem(&task.image_id, e);
                }
            }
            // The id stays in the instance's slot: an assignment read before
            // the image became available (or failed) must not make it a second time.
        });
    }

    async fn try_make_image(&self, a: &Assignment, task: &ImageTask) -> Result<String, String> {
        let files = GuestFiles::new(&self.instances_dir, &a.instance_id);
        let name = domain::domain_name(&a.instance_id);
        let id = &a.instance_id;
        // Unless NoReboot, the copy is made of a stopped guest under the
        // stop guard, which keeps passes (and another image of the same
        // instance) from starting it meanwhile: a stop already under way
        // (a StopInstances that came first) is waited for, a running guest
        // is shut down cleanly.
        let waited_for = Instant::now();
        let guard = loop {
            if task.no_reboot {
                break None;
            }
            if let Some(guard) = self.instances.begin_stop(id) {
                break Some(guard);
            }
            if waited_for.elapsed() > self.stop_timeout * 2 + Duration::from_secs(10) {
                return Err("the instance's stop under way did not end".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = self.events.send(AgentEvent::Imaging { instance_id: id.clone(), image_id: task.image_id.clone() });
        let running = self.libvirt.domain_status(&self.host_id, id).await.map_err(|e| e.to_string())?.is_some_and(|d| d.running);
        if guard.is_some() && running {
            let how = self.stop_guest(id, &name).await.map_err(|e| format!("cannot stop the instance: {e}"))?;
            tracing::info!(instance_id = %id, ?how, "guest stopped to make an image");
        }
        let out = self.images.dir().join(format!(".make-{}.qcow2", task.image_id));
        let base = self.images.dir().join(&a.image.root_disk.sha256);
        let converted = crate::disks::flatten(&files.root_disk(), &base, &out).await;
        if let Some(guard) = guard {
            self.after_imaging(a, &name).await;
            drop(guard);
        }
        let result = async {
            converted.map_err(|e| format!("cannot copy the disk: {e}"))?;
            let sha256 = crate::disks::sha256_file(&out).await.map_err(|e| format!("cannot read the copied disk: {e}"))?;
            self.images
                .upload(&task.image_id, &out, &sha256, a.disk_gib << 30)
                .await
                .map_err(|e| format!("cannot upload the image: {e}"))?;
            if let Err(e) = self.images.adopt(&out, &sha256).await {
                tracing::warn!(image_id = %task.image_id, error = %e, "cannot keep the image in this host's cache");
            }
            Ok(sha256)
        }
        .await;
        let _ = tokio::fs::remove_file(&out).await;
        result
    }

    /// Brings a guest whose disk CreateImage copied under the stop guard to
    /// what is wanted of it now (not when the task began): started (with
    /// its VPC interfaces) if wanted running; else left stopped and
    /// reported so (a stop's own pass could only answer "stopping"). A stop
    /// that came while it was being started stops it again; a termination
    /// is left to the pass that removes it.
    async fn after_imaging(&self, a: &Assignment, name: &str) {
        let id = &a.instance_id;
        let latest = self.instances.assigned(id);
        let Some(latest) = latest else { return };
        let mut running = false;
        if latest.desired == DesiredState::Running {
            match self.start_guest(name, self.vpc_nics(&latest.nics), None).await {
                Ok(()) => {
                    running = true;
                    let _ = self.events.send(AgentEvent::Started { instance_id: id.clone(), at: Instant::now() });
                }
                Err(e) => {
                    tracing::warn!(instance_id = %id, error = %e, "cannot start the instance again after imaging; the next pass does")
                }
            }
        }
        if running && self.desired_now(id) == Some(DesiredState::Stopped) {
            match self.stop_guest(id, name).await {
                Ok(_) => running = false,
                Err(e) => tracing::warn!(instance_id = %id, error = %e, "cannot stop the instance after imaging; the next pass does"),
            }
        }
        if !running && self.desired_now(id) == Some(DesiredState::Stopped) {
            let stopped = Assignment { desired: DesiredState::Stopped, ..a.clone() };
            let _ = self.late.send(self.observe(&stopped, Outcome::Stopped).await);
        }
    }
}
