//! A client of the metadata service that asks as a guest does, over an
//! instance's unix socket: for tests and benchmarks, and for an operator
//! looking at what a guest is served.

use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request to a guest's metadata socket, made as the guest makes it
/// (for tests, and for an operator looking at what a guest is served):
/// `(status, body)`. A new connection per call.
pub async fn request(socket: &Path, method: &str, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut conn = tokio::net::UnixStream::connect(socket).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).await?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut hdrs);
        if let httparse::Status::Complete(n) = resp.parse(&buf).map_err(|_| bad("bad response head"))? {
            let status = resp.code.ok_or_else(|| bad("no status"))?;
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                .ok_or_else(|| bad("no Content-Length"))?;
            let body_len = if method == "HEAD" { 0 } else { len };
            while buf.len() < n + body_len {
                let got = conn.read(&mut chunk).await?;
                if got == 0 {
                    return Err(bad("connection closed mid-body"));
                }
                buf.extend_from_slice(&chunk[..got]);
            }
            return Ok((status, buf[n..n + body_len].to_vec()));
        }
        let got = conn.read(&mut chunk).await?;
        if got == 0 {
            return Err(bad("connection closed before a response"));
        }
        buf.extend_from_slice(&chunk[..got]);
    }
}
