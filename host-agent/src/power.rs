//! Power operations on existing guests: stop (graceful, then forced) and
//! reboot, with the bookkeeping that makes them safe to repeat.
//!
//! - A stop runs in the background: ACPI shutdown, wait (bounded), then a
//!   hard power-off. The domain stays defined and its files stay. The
//!   instance's stop guard (its slot's, see `crate::reconcile`) keeps a
//!   second pass from starting it again (or from restarting the guest while
//!   it goes down).
//! - Reboots are counted: the control plane sends how many were ever asked
//!   for; the agent keeps how many it carried out in `<instance dir>/reboots`
//!   (written atomically), so a restarted agent does not reboot again.

use crate::libvirt::{Libvirt, LibvirtError};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

/// How often the state of a guest going down is polled.
const POLL: Duration = Duration::from_millis(200);
/// A guest may miss one ACPI press (e.g. still booting): press again this often.
const REPRESS: Duration = Duration::from_secs(5);

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The domain was not running (or not there) to begin with.
    AlreadyOff,
    /// The guest shut down after the ACPI request.
    Graceful,
    /// The guest did not shut down in time and was powered off.
    Forced,
}

/// Shuts the domain down gracefully, waiting up to `timeout`, then powers it off.
pub async fn stop_domain(lv: &Libvirt, name: &str, timeout: Duration) -> Result<Stopped, LibvirtError> {
    if !lv.shutdown(name).await? {
        return Ok(Stopped::AlreadyOff);
    }
    let start = Instant::now();
    let mut pressed = start;
    while start.elapsed() < timeout {
        tokio::time::sleep(POLL).await;
        if lv.is_active(name).await? != Some(true) {
            return Ok(Stopped::Graceful);
        }
        if pressed.elapsed() >= REPRESS {
            lv.shutdown(name).await?;
            pressed = Instant::now();
        }
    }
    lv.power_off(name).await?;
    Ok(Stopped::Forced)
}

#[derive(Debug, thiserror::Error)]
#[error("reboot counter {path}: {source}")]
pub struct CounterError {
    path: String,
    source: std::io::Error,
}

const COUNTER: &str = "reboots";

/// The reboots carried out for the guest whose files are in `dir` (0 if never).
pub async fn reboots_done(dir: &Path) -> Result<i64, CounterError> {
    let path = dir.join(COUNTER);
    let err = |source| CounterError { path: path.display().to_string(), source };
    match tokio::fs::read_to_string(&path).await {
        Ok(text) => text.trim().parse().map_err(|_| err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a number"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(err(e)),
    }
}

/// Records `n` reboots carried out: written to a temporary file, synced, renamed.
pub async fn record_reboots(dir: &Path, n: i64) -> Result<(), CounterError> {
    let path = dir.join(COUNTER);
    let tmp = dir.join("reboots.part");
    let err = |source| CounterError { path: path.display().to_string(), source };
    tokio::fs::create_dir_all(dir).await.map_err(err)?;
    {
        use tokio::io::AsyncWriteExt;
        let mut f = tokio::fs::File::create(&tmp).await.map_err(err)?;
        f.write_all(format!("{n}\n").as_bytes()).await.map_err(err)?;
        f.sync_all().await.map_err(err)?;
    }
    tokio::fs::rename(&tmp, &path).await.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_reboot_counter_persists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("i-1");
        assert_eq!(reboots_done(&dir).await.unwrap(), 0);
        record_reboots(&dir, 3).await.unwrap();
        assert_eq!(reboots_done(&dir).await.unwrap(), 3);
        record_reboots(&dir, 4).await.unwrap();
        assert_eq!(reboots_done(&dir).await.unwrap(), 4);
        assert!(!dir.join("reboots.part").exists());
        std::fs::write(dir.join(COUNTER), "junk").unwrap();
        assert!(reboots_done(&dir).await.is_err());
    }

    /// On the test driver a shutdown takes effect at once; the domain stays defined.
    #[tokio::test]
    async fn stop_keeps_the_domain_defined() {
        let lv = Libvirt::open("test:///default").await.unwrap();
        let xml = "<domain type='test'><name>nimbus-power-unit</name><memory>65536</memory>\
                   <os><type>hvm</type></os></domain>";
        let (name, x) = ("nimbus-power-unit".to_string(), xml.to_string());
        lv.call(move |c| c.define_domain_xml(&x).and_then(|d| d.create().map(|_| ()))).await.unwrap();
        assert_eq!(stop_domain(&lv, &name, Duration::from_secs(5)).await.unwrap(), Stopped::Graceful);
        assert_eq!(lv.is_active(&name).await.unwrap(), Some(false));
        assert_eq!(stop_domain(&lv, &name, Duration::from_secs(5)).await.unwrap(), Stopped::AlreadyOff);
        assert!(lv.start(&name).await.is_ok());
        assert!(lv.reboot(&name).await.unwrap());
        assert!(lv.power_off(&name).await.unwrap());
        assert_eq!(lv.is_active(&name).await.unwrap(), Some(false));
        lv.destroy(&name).await.unwrap();
        assert_eq!(lv.is_active(&name).await.unwrap(), None);
    }
}
