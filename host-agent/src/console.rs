//! The tail of each guest's serial console log, shipped to the control plane
//! in reports, and only when it changed since the last delivered report.
//!
//! What was delivered is remembered in memory only (a restarted agent sends
//! each tail once more, which is harmless). The file's length and mtime spare
//! re-reading a console that did not move.

use base64::Engine;
use nimbus_proto::agent::{Observation, CONSOLE_TAIL_BYTES};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Most base64 console text one report carries: the control plane takes
/// JSON bodies up to 2 MiB, and a restarted agent has every tail to send.
/// Tails left out stay undelivered and go with a later report.
pub const REPORT_BUDGET: usize = 1 << 20;

/// Drops the console tails beyond `budget` bytes from a report; returns how many.
pub fn fit_budget(observations: &mut [Observation], budget: usize) -> usize {
    let (mut used, mut deferred) = (0, 0);
    for o in observations.iter_mut() {
        let Some(c) = &o.console else { continue };
        if used + c.len() > budget {
            o.console = None;
            deferred += 1;
        } else {
            used += c.len();
        }
    }
    deferred
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    /// SHA-256 of the base64 text sent.
    digest: [u8; 32],
}

#[derive(Default)]
struct Inner {
    delivered: HashMap<String, Stamp>,
    /// Computed by a pass, not yet known to have reached the control plane.
    pending: HashMap<String, Stamp>,
}

#[derive(Clone, Default)]
pub struct ConsoleTracker {
    inner: Arc<Mutex<Inner>>,
}

fn digest(b64: &str) -> [u8; 32] {
    Sha256::digest(b64.as_bytes()).into()
}

impl ConsoleTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last [`CONSOLE_TAIL_BYTES`] of the console log at `path`, base64,
    /// unless the file is missing or empty or its tail was already delivered.
    pub async fn tail_if_changed(&self, instance_id: &str, path: &Path) -> Option<String> {
        let meta = tokio::fs::metadata(path).await.ok()?;
        let (len, modified) = (meta.len(), meta.modified().ok());
        if len == 0 {
            return None;
        }
        if let Some(s) = self.lock().delivered.get(instance_id) {
            if s.len == len && s.modified.is_some() && s.modified == modified {
                return None;
            }
        }
        let tail = match read_tail(path, len).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(%instance_id, error = %e, "cannot read the console log");
                return None;
            }
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(&tail);
        let stamp = Stamp { len, modified, digest: digest(&b64) };
        let mut inner = self.lock();
        if let Some(s) = inner.delivered.get_mut(instance_id) {
            if s.digest == stamp.digest {
                *s = stamp;
                return None;
            }
        }
        inner.pending.insert(instance_id.to_string(), stamp);
        Some(b64)
    }

    /// Records the console tails that a delivered report carried.
    pub fn delivered(&self, observations: &[Observation]) {
        let mut inner = self.lock();
        for o in observations {
            let Some(b64) = &o.console else { continue };
            let d = digest(b64);
            let stamp = match inner.pending.remove(&o.instance_id) {
                Some(p) if p.digest == d => p,
                // A newer pass computed another tail meanwhile: keep it pending,
                // and re-read the file next time.
                Some(p) => {
                    inner.pending.insert(o.instance_id.clone(), p);
                    Stamp { len: 0, modified: None, digest: d }
                }
                None => Stamp { len: 0, modified: None, digest: d },
            };
            inner.delivered.insert(o.instance_id.clone(), stamp);
        }
    }

    /// Drops what is known of a removed guest.
    pub fn forget(&self, instance_id: &str) {
        let mut inner = self.lock();
        inner.delivered.remove(instance_id);
        inner.pending.remove(instance_id);
    }
}

/// The last `CONSOLE_TAIL_BYTES` of a file `len` bytes long (or what it holds now).
async fn read_tail(path: &Path, len: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(path).await?;
    let start = len.saturating_sub(CONSOLE_TAIL_BYTES as u64);
    f.seek(std::io::SeekFrom::Start(start)).await?;
    let mut buf = Vec::with_capacity(CONSOLE_TAIL_BYTES);
    f.take(CONSOLE_TAIL_BYTES as u64).read_to_end(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_proto::ObservedState;

    fn obs(id: &str, console: Option<String>) -> Observation {
        Observation { instance_id: id.into(), state: ObservedState::Running, message: None, reboots: None, console, ssh_endpoint: None }
    }

    #[test]
    fn a_report_carries_at_most_the_budget() {
        let mut report: Vec<Observation> = (0..5).map(|i| obs(&format!("i-{i}"), Some("x".repeat(400)))).collect();
        report[2].console = None;
        assert_eq!(fit_budget(&mut report, 1000), 2);
        let sent: Vec<bool> = report.iter().map(|o| o.console.is_some()).collect();
        assert_eq!(sent, vec![true, true, false, false, false]);
    }

    #[tokio::test]
    async fn sends_a_tail_once_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let t = ConsoleTracker::default();
        assert_eq!(t.tail_if_changed("i-1", &log).await, None, "no file, nothing to send");
        std::fs::write(&log, "").unwrap();
        assert_eq!(t.tail_if_changed("i-1", &log).await, None, "empty file, nothing to send");

        std::fs::write(&log, "hello\n").unwrap();
        let first = t.tail_if_changed("i-1", &log).await.expect("new output");
        assert_eq!(first, base64::engine::general_purpose::STANDARD.encode("hello\n"));
        // Not delivered (the report failed): sent again.
        assert_eq!(t.tail_if_changed("i-1", &log).await.as_ref(), Some(&first));
        t.delivered(&[obs("i-1", Some(first.clone()))]);
        assert_eq!(t.tail_if_changed("i-1", &log).await, None, "unchanged since delivered");

        // Longer than the tail: only the last CONSOLE_TAIL_BYTES go.
        let mut big = vec![b'a'; CONSOLE_TAIL_BYTES];
        big.extend_from_slice(b"END");
        std::fs::write(&log, &big).unwrap();
        let tail = t.tail_if_changed("i-1", &log).await.expect("changed");
        let raw = base64::engine::general_purpose::STANDARD.decode(tail).unwrap();
        assert_eq!(raw.len(), CONSOLE_TAIL_BYTES);
        assert!(raw.ends_with(b"aEND"));

        t.forget("i-1");
        std::fs::write(&log, "hello\n").unwrap();
        assert!(t.tail_if_changed("i-1", &log).await.is_some(), "forgotten: sent again");
    }
}
