//! What an RBD operation can fail with, decided from the tool's exit code
//! (the `rbd` tool exits with the errno of the failure) and its stderr.

use std::time::Duration;

/// An RBD operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image or snapshot does not exist (ENOENT).
    #[error("{what} not found")]
    NotFound { what: String },
    /// An image or snapshot of that name exists already (EEXIST).
    #[error("{what} exists already")]
    Exists { what: String },
    /// The image is open somewhere (a QEMU, an `rbd watch`): it cannot be removed.
    #[error("{what} is in use (it has watchers)")]
    HasWatchers { what: String },
    /// The snapshot has clones: flatten or remove them first.
    #[error("{what} has clones")]
    HasChildren { what: String },
    /// The snapshot is protected: unprotect it first.
    #[error("{what} is protected")]
    Protected { what: String },
    /// The image has snapshots: remove them first.
    #[error("{what} has snapshots")]
    HasSnapshots { what: String },
    /// Another EBUSY (a lock held by another client, an operation in progress).
    #[error("{what} is busy: {stderr}")]
    Busy { what: String, stderr: String },
    /// A request this crate refuses before asking Ceph (a bad name, shrinking).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The command did not finish in time (it was killed).
    #[error("`{command}` did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    /// The command could not be started, or the keyring not read.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The command's JSON answer was not what this crate expects.
    #[error("unexpected answer from `{command}`: {message}")]
    Parse { command: String, message: String },
    /// Any other failure, with the exit code and what the tool said.
    #[error("`{command}` failed (exit {code:?}): {stderr}")]
    Other { command: String, code: Option<i32>, stderr: String },
}

pub type Result<T> = std::result::Result<T, Error>;

const ENOENT: i32 = 2;
const EBUSY: i32 = 16;
const EEXIST: i32 = 17;
const ENOTEMPTY: i32 = 39;

/// The error of a failed command, `what` naming the object it was about
/// (`pool/image` or `pool/image@snap`).
pub(crate) fn classify(command: &str, what: &str, code: Option<i32>, stderr: &str) -> Error {
    let what = what.to_string();
    let said = |s: &str| stderr.contains(s);
    // A missing pool is a configuration problem, not a missing image.
    if said("error opening pool") {
        return other(command, code, stderr);
    }
    match code {
        Some(ENOENT) => Error::NotFound { what },
        Some(EEXIST) => Error::Exists { what },
        Some(ENOTEMPTY) if said("snapshots") => Error::HasSnapshots { what },
        Some(EBUSY) if said("watchers") => Error::HasWatchers { what },
        Some(EBUSY) if said("child") => Error::HasChildren { what },
        Some(EBUSY) if said("protected") => Error::Protected { what },
        Some(EBUSY) => Error::Busy { what, stderr: trim(stderr) },
        _ => other(command, code, stderr),
    }
}

fn other(command: &str, code: Option<i32>, stderr: &str) -> Error {
    Error::Other { command: command.to_string(), code, stderr: trim(stderr) }
}

/// The tool's lines that say something: not librbd's timestamped debug lines
/// when the `rbd:` line says it better, and no progress meters.
fn trim(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let own: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("rbd:") || l.starts_with("Error")).collect();
    if own.is_empty() {
        lines.join("; ")
    } else {
        own.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_messages() {
        let e = classify("rbd info", "p/x", Some(2), "rbd: error opening image x: (2) No such file or directory\n");
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
        let e = classify("rbd create", "p/x", Some(17), "rbd: create error: (17) File exists\n");
        assert!(matches!(e, Error::Exists { .. }), "{e}");
        let e = classify("rbd rm", "p/x", Some(16), "2026 -1 librbd: image has watchers\nrbd: error: image still has watchers\n");
        assert!(matches!(e, Error::HasWatchers { .. }), "{e}");
        let e = classify("rbd snap rm", "p/x@s", Some(16), "rbd: snapshot 's' is protected from removal.\n");
        assert!(matches!(e, Error::Protected { .. }), "{e}");
        let e = classify("rbd snap unprotect", "p/x@s", Some(16), "rbd: unprotecting snap failed: 1 child(ren) [..] in pool 'p'\n");
        assert!(matches!(e, Error::HasChildren { .. }), "{e}");
        let e = classify("rbd rm", "p/x", Some(39), "rbd: image has snapshots - these must be deleted\n");
        assert!(matches!(e, Error::HasSnapshots { .. }), "{e}");
        let e = classify("rbd ls", "p", Some(2), "rbd: error opening pool 'p': (2) No such file or directory\n");
        assert!(matches!(e, Error::Other { .. }), "{e}");
        let e = classify("rbd rm", "p/x", Some(1), "2026 -1 librbd: noise\nrbd: something else\n");
        assert_eq!(e.to_string(), "`rbd rm` failed (exit Some(1)): rbd: something else");
    }
}
