//! The tail of each guest's serial console log, shipped to the control plane
//! in reports, and only when it changed since the last delivered report.
//!
//! What was delivered is remembered in memory only, in each instance's slot
//! ([`ConsoleState`]; a restarted agent sends each tail once more, which is
//! harmless). The file's length and mtime spare re-reading a console that
//! did not move.

use base64::Engine;
use nimbus_proto::agent::{Observation, CONSOLE_TAIL_BYTES};
use sha2::{Digest, Sha256};
use std::path::Path;
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

fn digest(b64: &str) -> [u8; 32] {
    Sha256::digest(b64.as_bytes()).into()
}

/// What was sent of one guest's console (kept in the instance's slot, see
/// `crate::reconcile`).
#[derive(Debug, Default)]
pub struct ConsoleState {
    delivered: Option<Stamp>,
    /// Computed by a pass, not yet known to have reached the control plane.
    pending: Option<Stamp>,
}

/// A tail read from a guest's console log, to be offered to its
/// [`ConsoleState`].
pub struct Tail {
    b64: String,
    stamp: Stamp,
}

impl ConsoleState {
    /// Whether nothing is known (a guest never seen, or forgotten).
    pub fn is_empty(&self) -> bool {
        self.delivered.is_none() && self.pending.is_none()
    }

    /// Whether a log of this length and mtime is the one whose tail was
    /// delivered (no need to read it again).
    pub fn unchanged(&self, len: u64, modified: Option<SystemTime>) -> bool {
        self.delivered.as_ref().is_some_and(|s| s.len == len && s.modified.is_some() && s.modified == modified)
    }

    /// The base64 tail to send, unless it is the one delivered (whose
    /// stamp is then brought up to the file's).
    pub fn offer(&mut self, tail: Tail) -> Option<String> {
        if let Some(s) = &mut self.delivered {
            if s.digest == tail.stamp.digest {
                *s = tail.stamp;
                return None;
            }
        }
        self.pending = Some(tail.stamp);
        Some(tail.b64)
    }

    /// Records that a delivered report carried the tail `b64`.
    pub fn delivered(&mut self, b64: &str) {
        let d = digest(b64);
        let stamp = match self.pending.take() {
            Some(p) if p.digest == d => p,
            // A newer pass computed another tail meanwhile: keep it pending,
            // and re-read the file next time.
            Some(p) => {
                self.pending = Some(p);
                Stamp { len: 0, modified: None, digest: d }
            }
            None => Stamp { len: 0, modified: None, digest: d },
        };
        self.delivered = Some(stamp);
    }
}

/// The last [`CONSOLE_TAIL_BYTES`] of the console log at `path`, unless
/// the file is missing or empty or `unchanged` says (from its length and
/// mtime) that its tail was already delivered.
pub async fn read_if_changed(instance_id: &str, path: &Path, unchanged: impl FnOnce(u64, Option<SystemTime>) -> bool) -> Option<Tail> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    let (len, modified) = (meta.len(), meta.modified().ok());
    if len == 0 || unchanged(len, modified) {
        return None;
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
    Some(Tail { b64, stamp })
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
}
