//! The one error type of the CLI and its exit codes.

use nimbus_proto::api::ErrorBody;

/// Exit code of an error the API returned (or a wait that failed).
pub const EXIT_API: i32 = 1;
/// Exit code of a usage error (bad flags, missing token, unreadable file).
pub const EXIT_USAGE: i32 = 2;
/// Exit code when the API could not be reached.
pub const EXIT_CONNECT: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API answered with its JSON error body.
    #[error("{}: {} (request id {})", .body.code, .body.message, .body.request_id)]
    Api { status: u16, body: ErrorBody },
    /// The API answered something that is not what the contract promises.
    #[error("unexpected response from {url} (HTTP {status}): {detail}")]
    BadResponse { url: String, status: u16, detail: String },
    /// The endpoint could not be reached (refused, DNS, TLS, timeout).
    #[error("cannot reach the Nimbus API at {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String },
    /// The command line or a local input file is wrong.
    #[error("{0}")]
    Usage(String),
    /// An instance ended in a state the wait cannot succeed from.
    #[error("{0}")]
    WaitFailed(String),
    /// `--wait` ran out of time.
    #[error("timed out after {secs}s waiting for {what}")]
    WaitTimeout { secs: u64, what: String },
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Api { .. } | CliError::BadResponse { .. } | CliError::WaitFailed(_) | CliError::WaitTimeout { .. } => EXIT_API,
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Connect { .. } => EXIT_CONNECT,
        }
    }

    /// Whether a poll that hit this error may simply try again later.
    pub fn is_transient(&self) -> bool {
        match self {
            CliError::Connect { .. } => true,
            CliError::Api { status, .. } | CliError::BadResponse { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// The API's error code, if this is an API error.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            CliError::Api { body, .. } => Some(&body.code),
            _ => None,
        }
    }
}

/// The line printed on stderr for an error.
pub fn render(e: &CliError) -> String {
    format!("error: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_line_names_code_message_and_request_id() {
        let e = CliError::Api {
            status: 400,
            body: ErrorBody {
                code: "InvalidInstanceID.NotFound".into(),
                message: "The instance ID 'i-0123456789abcdef0' does not exist".into(),
                request_id: "req-42".into(),
            },
        };
        assert_eq!(
            render(&e),
            "error: InvalidInstanceID.NotFound: The instance ID 'i-0123456789abcdef0' does not exist (request id req-42)"
        );
        assert_eq!(e.exit_code(), 1);
        assert!(!e.is_transient());
    }

    #[test]
    fn exit_codes_by_kind() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        let c = CliError::Connect { endpoint: "http://127.0.0.1:8787".into(), detail: "connection refused".into() };
        assert_eq!(c.exit_code(), 3);
        assert!(c.is_transient());
        assert_eq!(render(&c), "error: cannot reach the Nimbus API at http://127.0.0.1:8787: connection refused");
        let b = CliError::BadResponse { url: "u".into(), status: 502, detail: "d".into() };
        assert_eq!(b.exit_code(), 1);
        assert!(b.is_transient());
        assert_eq!(CliError::WaitTimeout { secs: 5, what: "x".into() }.exit_code(), 1);
    }
}
