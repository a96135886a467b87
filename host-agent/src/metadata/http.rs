//! The metadata service's HTTP/1 framing: request heads parsed with
//! `httparse`, bodies dropped, the request handed to an instance's axum
//! `Router` ([`super::routes`]) and the answer written back.
//!
//! A guest must not be able to hurt the agent, which every guest on the
//! host depends on: request heads are bounded ([`MAX_HEAD`]), a body is
//! read and dropped chunk by chunk and only up to [`MAX_BODY`] (more closes
//! the connection), and nothing a guest sends is buffered beyond one head;
//! a request must be done, and a connection may idle, only as long as
//! [`Timeouts`] allow (see [`super::limits`]).
//!
//! QEMU's guestfwd carries all of a guest's connections, one after another,
//! over a single connection to this server. So the server never closes a
//! connection because a request said `Connection: close` (busybox wget
//! does), and always sends `Content-Length`, so the guest knows where each
//! answer ends. Nor does it close that connection for being idle: QEMU
//! would reconnect only a second later, and a request sent meanwhile would
//! be lost (only root and QEMU's group reach the socket, one connection per
//! guest).

use super::routes::versioned;
use super::tokens::{HopLimit, TTL_HEADER};
use axum::http::StatusCode;
use axum::Router;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head accepted; metadata requests are tiny.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body read (and dropped: the service takes no bodies).
pub const MAX_BODY: usize = 4 * 1024;

/// What the service needs of a connection besides reading and writing.
pub(super) trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The IP TTL of what the connection sends (`None`: no IP, a unix socket).
    fn ip_ttl(&self) -> Option<u32> {
        None
    }
    fn set_ip_ttl(&self, _ttl: u32) {}
}

impl Connection for tokio::net::UnixStream {}

impl Connection for tokio::net::TcpStream {
    fn ip_ttl(&self) -> Option<u32> {
        self.ttl().ok()
    }
    fn set_ip_ttl(&self, ttl: u32) {
        if let Err(e) = self.set_ttl(ttl) {
            tracing::warn!(error = %e, ttl, "cannot set the TTL of a metadata connection");
        }
    }
}

/// What a request head says, or why it is refused.
enum Head {
    Request {
        method: String,
        path: String,
        headers: Vec<(String, Vec<u8>)>,
        head_len: usize,
        body_len: usize,
    },
    /// Answer this status and close the connection.
    Refuse(StatusCode),
}

fn parse_head(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let mut body_len = 0;
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Some(Head::Refuse(StatusCode::LENGTH_REQUIRED));
                }
                if h.name.eq_ignore_ascii_case("content-length") {
                    match std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<usize>().ok()) {
                        Some(len) if len <= MAX_BODY => body_len = len,
                        Some(_) => return Some(Head::Refuse(StatusCode::PAYLOAD_TOO_LARGE)),
                        None => return Some(Head::Refuse(StatusCode::BAD_REQUEST)),
                    }
                }
            }
            let (method, path) = (req.method.unwrap_or("GET").to_string(), req.path.unwrap_or("/").to_string());
            let headers = req.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
            Some(Head::Request { method, path, headers, head_len: n, body_len })
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => None,
        Ok(httparse::Status::Partial) => Some(Head::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)),
        Err(_) => Some(Head::Refuse(StatusCode::BAD_REQUEST)),
    }
}

async fn write_status<S: AsyncWrite + Unpin>(conn: &mut S, status: StatusCode, timeout: Duration) {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let _ = tokio::time::timeout(timeout, conn.write_all(head.as_bytes())).await;
}

/// How long a connection may take (see [`super::ConnectionLimits`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub(super) request: Duration,
    /// Between requests; `None`: no limit (the unix socket).
    pub(super) idle: Option<Duration>,
}

/// Reads into `chunk` before `deadline` (if any); `None` when the peer
/// closed, failed or ran out of time.
async fn read_before<S: AsyncRead + Unpin>(conn: &mut S, chunk: &mut [u8], deadline: Option<tokio::time::Instant>) -> Option<usize> {
    let read = match deadline {
        Some(d) => tokio::time::timeout_at(d, conn.read(chunk)).await.ok()?,
        None => conn.read(chunk).await,
    };
    match read {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

/// Answers requests on one connection until the peer closes it, sends
/// something the service refuses (then after answering the refusal), takes
/// longer than `timeouts.request` over a request, or idles longer than
/// `timeouts.idle` between requests.
pub(super) async fn serve_connection<S: Connection>(mut conn: S, app: Router, timeouts: Timeouts) {
    use tower::ServiceExt;
    // Holds at most one head (MAX_HEAD) plus what one read brought after it.
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // The system's TTL, restored after a token response went out with the hop limit.
    let default_ttl = conn.ip_ttl();
    let mut ttl_lowered = false;
    loop {
        // The request's clock starts with its first byte (already here when pipelined).
        let now = tokio::time::Instant::now();
        let mut deadline = (!buf.is_empty()).then(|| now + timeouts.request);
        let idle_until = timeouts.idle.map(|i| now + i);
        // Read until one whole request head is buffered.
        let (method, path, headers, head_len, body_len) = loop {
            match parse_head(&buf) {
                Some(Head::Request { method, path, headers, head_len, body_len }) => break (method, path, headers, head_len, body_len),
                Some(Head::Refuse(status)) => return write_status(&mut conn, status, timeouts.request).await,
                None => {}
            }
            let Some(n) = read_before(&mut conn, &mut chunk, deadline.or(idle_until)).await else { return };
            buf.extend_from_slice(&chunk[..n]);
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + timeouts.request);
        };
        let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + timeouts.request);
        // Drop the body (at most MAX_BODY): what was buffered, then the rest as it comes.
        let buffered = buf.len().min(head_len + body_len);
        buf.drain(..buffered);
        let mut rest = head_len + body_len - buffered;
        while rest > 0 {
            let want = rest.min(chunk.len());
            let Some(n) = read_before(&mut conn, &mut chunk[..want], Some(deadline)).await else { return };
            rest -= n;
        }

        let mut request =
            axum::http::Request::builder().method(if method == "HEAD" { "GET" } else { method.as_str() }).uri(versioned(&path));
        for (name, value) in &headers {
            request = request.header(name.as_str(), value.as_slice());
        }
        let (status, ttl, hop_limit, body) = match request.body(axum::body::Body::empty()) {
            Ok(req) => match app.clone().oneshot(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let ttl = resp.headers().get(TTL_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
                    let hop_limit = resp.extensions().get::<HopLimit>().map(|h| h.0);
                    (status, ttl, hop_limit, axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap_or_default())
                }
                Err(never) => match never {},
            },
            Err(_) => (StatusCode::BAD_REQUEST, None, None, Default::default()),
        };
        // A token leaves with the instance's hop limit as its TTL; later
        // answers with the system's again.
        match (hop_limit, default_ttl) {
            (Some(h), Some(_)) => {
                conn.set_ip_ttl(u32::from(h));
                ttl_lowered = true;
            }
            (None, Some(d)) if ttl_lowered => {
                conn.set_ip_ttl(d);
                ttl_lowered = false;
            }
            _ => {}
        }
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\n{}Content-Length: {}\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            ttl.map(|t| format!("X-aws-ec2-metadata-token-ttl-seconds: {t}\r\n")).unwrap_or_default(),
            if method == "HEAD" { 0 } else { body.len() }
        );
        // The answer must be taken in time too (a guest that never reads holds nothing).
        let write = async {
            conn.write_all(head.as_bytes()).await?;
            if method != "HEAD" {
                conn.write_all(&body).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        if !matches!(tokio::time::timeout(timeouts.request, write).await, Ok(Ok(()))) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{sample_metadata, Fixture};
    use super::*;

    /// guestfwd sends every guest connection down one host connection: the
    /// server must answer request after request on it, `Connection: close` or
    /// not, and a small body on the way is skipped.
    #[tokio::test]
    async fn one_connection_carries_many_requests() {
        let f = Fixture::new();
        let socket = f.serve(&sample_metadata("i-000000000000000cc"), None).await;
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let req = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n";
        let with_body = "POST /latest/meta-data/instance-id HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        conn.write_all(format!("{req}{with_body}{req}").as_bytes()).await.unwrap();
        let expected = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n\r\ni-000000000000000cc";
        let mut got = vec![0u8; expected.len()];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), expected);
        let mut got = vec![0u8; 12];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 405", "POST is not a method of the metadata service");
        conn.write_all(b"GET /nope HTTP/1.1\r\n\r\n").await.unwrap();
        let mut all = Vec::new();
        let mut chunk = [0u8; 512];
        while !String::from_utf8_lossy(&all).contains("HTTP/1.1 404") {
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&all));
            all.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(String::from_utf8_lossy(&all).matches("i-000000000000000cc").count(), 1, "{}", String::from_utf8_lossy(&all));
    }

    /// The attack of the security review: a guest sends a huge body. The
    /// server must not read (let alone buffer) it: it answers 413 and closes
    /// the connection at once, having read no more than the head.
    #[tokio::test]
    async fn a_huge_body_is_refused_unread_and_the_connection_closed() {
        let f = Fixture::new();
        let socket = f.serve(&sample_metadata("i-000000000000000ff"), None).await;
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        conn.write_all(b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 268435456\r\n\r\n").await.unwrap();
        let mut resp = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(30), conn.read_to_end(&mut resp)).await;
        assert!(read.is_ok(), "the server kept the connection open, waiting for 256 MiB");
        assert!(resp.starts_with(b"HTTP/1.1 413"), "{}", String::from_utf8_lossy(&resp));
        // Sending the body now fails or goes nowhere: the server closed its side.
        let mut sent = 0usize;
        let chunk = vec![0u8; 64 * 1024];
        while sent < 64 << 20 {
            match conn.write(&chunk).await {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        assert!(sent < 64 << 20, "64 MiB went into a connection the server should have closed");
        // Chunked bodies have no length to check: refused as well.
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        conn.write_all(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
        let mut resp = Vec::new();
        conn.read_to_end(&mut resp).await.unwrap();
        assert!(resp.starts_with(b"HTTP/1.1 411"), "{}", String::from_utf8_lossy(&resp));
        // A head that never ends is cut off at MAX_HEAD.
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let endless = format!("GET / HTTP/1.1\r\nX-Pad: {}", "a".repeat(MAX_HEAD + 1));
        conn.write_all(endless.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        // The server closes with bytes of ours unread: the answer comes, then a reset.
        let _ = conn.read_to_end(&mut resp).await;
        assert!(resp.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&resp));
    }
}
