//! IMDSv2 session tokens, as EC2 issues and checks them: `PUT
//! /latest/api/token` makes one living its TTL (1 to 21600 s, from
//! [`TTL_HEADER`]), never through a proxy; a request sends it back in
//! [`TOKEN_HEADER`]. A token, when sent, must be live; without one, IMDSv1
//! is answered only while the instance's tokens are optional.
//!
//! The token response leaves with the instance's hop limit as its IP TTL
//! (EC2's `HttpPutResponseHopLimit`, default 1: [`HopLimit`], applied by
//! [`super::http`]), so a token does not reach a container or host routed
//! behind the guest; other answers keep the system's TTL. (Only on the VPC
//! listener: a unix socket carries no IP.)

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use nimbus_proto::agent::MetadataOptions;
use std::collections::HashMap;
use std::sync::Mutex;

/// Most live tokens an instance may hold (each `PUT` makes one; the oldest go first).
const MAX_TOKENS: usize = 1024;
/// EC2's bounds of a token's life, seconds.
const TOKEN_TTL: std::ops::RangeInclusive<u64> = 1..=21600;
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// The IP TTL a response must leave with (the token response's hop limit).
#[derive(Debug, Clone, Copy)]
pub(super) struct HopLimit(pub(super) u8);

/// Why a request is refused: the status and body to answer.
pub(super) type Refusal = (StatusCode, &'static str);

const UNAUTHORIZED: Refusal = (StatusCode::UNAUTHORIZED, "Unauthorized\n");

/// IMDSv2 session tokens of one instance: token → expiry.
#[derive(Default)]
pub(super) struct Tokens {
    live: Mutex<HashMap<String, tokio::time::Instant>>,
}

impl Tokens {
    /// Whether a request other than a `PUT` passes as far as tokens go: a
    /// token, when sent, must be live (401 otherwise, in either mode);
    /// without one, IMDSv1 only when tokens are optional.
    pub(super) fn check(&self, options: &MetadataOptions, headers: &HeaderMap) -> Result<(), Refusal> {
        match headers.get(TOKEN_HEADER) {
            Some(t) => {
                let live = {
                    let mut tokens = self.live.lock().unwrap_or_else(|p| p.into_inner());
                    let now = tokio::time::Instant::now();
                    tokens.retain(|_, expiry| *expiry > now);
                    t.to_str().ok().is_some_and(|t| tokens.contains_key(t))
                };
                if !live {
                    return Err(UNAUTHORIZED);
                }
            }
            None if options.tokens_required => return Err(UNAUTHORIZED),
            None => {}
        }
        Ok(())
    }

    /// A new session token living TTL seconds (1 to 21600, from
    /// `X-aws-ec2-metadata-token-ttl-seconds`), and that TTL. Refused when
    /// the request went through a proxy (`X-Forwarded-For`), as EC2 refuses it.
    pub(super) fn issue(&self, headers: &HeaderMap) -> Result<(String, u64), Refusal> {
        if headers.contains_key("x-forwarded-for") {
            return Err((StatusCode::FORBIDDEN, "Forbidden\n"));
        }
        let ttl = headers.get(TTL_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        let Some(ttl) = ttl.filter(|t| TOKEN_TTL.contains(t)) else {
            return Err((StatusCode::BAD_REQUEST, "Bad Request\n"));
        };
        let token = {
            use rand::RngCore;
            let mut b = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut b);
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        };
        {
            let mut tokens = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            tokens.retain(|_, expiry| *expiry > now);
            if tokens.len() >= MAX_TOKENS {
                if let Some(oldest) = tokens.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone()) {
                    tokens.remove(&oldest);
                }
            }
            tokens.insert(token.clone(), now + std::time::Duration::from_secs(ttl));
        }
        Ok((token, ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{call, sample_metadata, Fixture, HOUR};
    use super::*;
    use crate::metadata::ConnectionLimits;
    use nimbus_proto::agent::MetadataOptions;
    use nimbus_proto::network::Nic;
    use std::net::Ipv4Addr;
    use std::path::PathBuf;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn serve(options: MetadataOptions, tags: Vec<(String, String)>) -> (Fixture, PathBuf) {
        let f = Fixture::new();
        let mut m = sample_metadata("i-0000000000000000a");
        m.options = options;
        m.tags = tags;
        let socket = f.serve(&m, None).await;
        (f, socket)
    }

    /// IMDSv2 as EC2 answers it: a token from `PUT /latest/api/token` (TTL
    /// 1 to 21600 s, never through a proxy), sent back in a header; a bad or
    /// expired token is 401 in either mode; without one, IMDSv1 only while
    /// tokens are optional.
    #[tokio::test(start_paused = true)]
    async fn tokens_are_issued_checked_and_expire() {
        let (_f, socket) = serve(MetadataOptions::default(), vec![]).await;
        let path = "/latest/meta-data/instance-id";
        assert_eq!(call(&socket, "GET", path, &[]).await, (200, "i-0000000000000000a".into()), "IMDSv1 while tokens are optional");
        for bad in [vec![], vec![(TTL_HEADER, "0")], vec![(TTL_HEADER, "21601")], vec![(TTL_HEADER, "ten")]] {
            assert_eq!(call(&socket, "PUT", "/latest/api/token", &bad).await.0, 400, "{bad:?}");
        }
        assert_eq!(call(&socket, "PUT", "/latest/api/token", &[(TTL_HEADER, "60"), ("X-Forwarded-For", "10.0.0.1")]).await.0, 403);
        assert_eq!(call(&socket, "POST", "/latest/api/token", &[(TTL_HEADER, "60")]).await.0, 405);
        let (status, token) = call(&socket, "PUT", "/latest/api/token", &[(TTL_HEADER, "2")]).await;
        assert_eq!(status, 200);
        assert!(token.len() >= 40, "{token}");
        assert_eq!(call(&socket, "GET", path, &[(TOKEN_HEADER, &token)]).await.0, 200);
        assert_eq!(call(&socket, "GET", path, &[(TOKEN_HEADER, "made-up")]).await.0, 401, "a bad token is refused even in optional mode");
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        assert_eq!(call(&socket, "GET", path, &[(TOKEN_HEADER, &token)]).await.0, 401, "expired");
        // The TTL comes back in a header.
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        conn.write_all(b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = conn.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).contains("X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    #[tokio::test]
    async fn required_tokens_disabled_endpoint_and_tags() {
        let required = MetadataOptions { tokens_required: true, ..Default::default() };
        let (_f, socket) = serve(required, vec![("Name".into(), "web".into())]).await;
        assert_eq!(call(&socket, "GET", "/latest/meta-data/instance-id", &[]).await.0, 401);
        let (_, token) = call(&socket, "PUT", "/latest/api/token", &[(TTL_HEADER, "60")]).await;
        assert_eq!(call(&socket, "GET", "/latest/meta-data/instance-id", &[(TOKEN_HEADER, &token)]).await.0, 200);
        assert_eq!(
            call(&socket, "GET", "/latest/meta-data/tags/instance", &[(TOKEN_HEADER, &token)]).await.0,
            404,
            "tags are off by default"
        );

        let off = MetadataOptions { endpoint_enabled: false, ..Default::default() };
        let (_f2, socket) = serve(off, vec![]).await;
        assert_eq!(call(&socket, "GET", "/latest/meta-data/instance-id", &[]).await.0, 403);
        assert_eq!(call(&socket, "PUT", "/latest/api/token", &[(TTL_HEADER, "60")]).await.0, 403);

        let tags = MetadataOptions { tags_enabled: true, ..Default::default() };
        let (_f3, socket) = serve(tags, vec![("Name".into(), "web".into()), ("env".into(), "prod".into())]).await;
        assert!(call(&socket, "GET", "/latest/meta-data/", &[]).await.1.lines().any(|l| l == "tags/"));
        assert_eq!(call(&socket, "GET", "/latest/meta-data/tags/instance", &[]).await, (200, "Name\nenv".into()));
        assert_eq!(call(&socket, "GET", "/latest/meta-data/tags/instance/env", &[]).await, (200, "prod".into()));
        assert_eq!(call(&socket, "GET", "/latest/meta-data/tags/instance/nope", &[]).await.0, 404);
    }

    /// The server's packets to `client` with a payload, as (TTL, payload),
    /// read from a raw socket in the namespace.
    fn packets_from_metadata(raw: &socket2::Socket, client_port: u16) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 65536];
        while let Ok(n) = raw.recv(&mut buf) {
            // SAFETY: recv initialised the first n bytes.
            let p: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if p.len() < ihl + 20 || p[9] != 6 || p[12..16] != crate::network::METADATA_IP.octets() {
                continue;
            }
            let tcp = &p[ihl..];
            let (sport, dport) = (u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]));
            let data = usize::from(tcp[12] >> 4) * 4;
            if sport == 80 && dport == client_port && tcp.len() > data {
                out.push((p[8], tcp[data..].to_vec()));
            }
        }
        out
    }

    async fn ip(args: &[&str]) {
        let out = tokio::process::Command::new("ip").args(args).output().await.unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Reads one answer (head and Content-Length body) from `conn`.
    async fn answer(conn: &mut tokio::net::TcpStream) -> String {
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|v| v.parse().ok()).unwrap();
                if body.len() >= len {
                    return text;
                }
            }
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    }

    /// Finding 10: `http_put_response_hop_limit` was shown but the token
    /// response left with TTL 64, so a token reached any host or container
    /// routed behind the guest. Now its TTL is the instance's hop limit (as
    /// EC2's), other answers keep the system's; and (finding 5) a VPC
    /// connection that sends nothing is closed after the idle timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_responses_leave_with_the_hop_limit_as_ttl() {
        let ns = crate::network::testing::ScratchNs::new("imds").await;
        let guest_ip = Ipv4Addr::new(10, 9, 0, 5);
        ip(&["-n", &ns.name, "addr", "add", &format!("{}/32", crate::network::METADATA_IP), "dev", "lo"]).await;
        ip(&["-n", &ns.name, "addr", "add", &format!("{guest_ip}/32"), "dev", "lo"]).await;
        let s = Fixture::with_limits(ConnectionLimits {
            request_timeout: HOUR,
            idle_timeout: Duration::from_secs(1),
            per_instance: 8,
            total: 24,
        });
        let nic = Nic {
            eni_id: "eni-0123456789abcdef0".into(),
            device_index: 0,
            mac: "02:00:00:00:00:05".into(),
            private_ip: guest_ip,
            subnet: nimbus_proto::network::Cidr::parse("10.9.0.0/24").unwrap(),
            gateway: Ipv4Addr::new(10, 9, 0, 1),
            vpc_id: "vpc-0123456789abcdef0".into(),
            vni: 7,
            public_ip: None,
            group_ids: vec!["sg-0123456789abcdef0".into()],
        };
        let mut m = sample_metadata("i-00000000000000e01");
        s.servers.publish(&m, None, std::slice::from_ref(&nic));
        s.servers.ensure_vpc(7, &ns.name).await.unwrap();
        let raw = crate::network::testing::in_netns(&ns.name, || -> std::io::Result<socket2::Socket> {
            let r = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::from(nix::libc::SOCK_RAW), Some(socket2::Protocol::TCP))?;
            r.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok(r)
        })
        .unwrap()
        .unwrap();
        let connect = |ns: String| async move {
            let sock = crate::network::testing::in_netns(&ns, move || -> std::io::Result<std::net::TcpStream> {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.bind(&std::net::SocketAddr::from((guest_ip, 0)).into())?;
                s.set_nonblocking(true)?;
                Ok(s.into())
            })
            .unwrap()
            .unwrap();
            tokio::net::TcpSocket::from_std_stream(sock).connect((crate::network::METADATA_IP, 80).into()).await.unwrap()
        };

        for hop_limit in [1u8, 3] {
            m.options.hop_limit = hop_limit;
            m.version += 1;
            s.servers.publish(&m, None, std::slice::from_ref(&nic));
            let mut conn = connect(ns.name.clone()).await;
            let port = conn.local_addr().unwrap().port();
            conn.write_all(b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n").await.unwrap();
            let token = answer(&mut conn).await;
            assert!(token.starts_with("HTTP/1.1 200"), "{token}");
            conn.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n").await.unwrap();
            let id = answer(&mut conn).await;
            assert!(id.ends_with("i-00000000000000e01"), "{id}");
            let raw = raw.try_clone().unwrap();
            let packets = tokio::task::spawn_blocking(move || packets_from_metadata(&raw, port)).await.unwrap();
            let ttl_of = |text: &str| packets.iter().find(|(_, p)| String::from_utf8_lossy(p).contains(text)).map(|(t, _)| *t);
            let token_body = token.split_once("\r\n\r\n").unwrap().1;
            assert_eq!(ttl_of(token_body), Some(hop_limit), "the token response's TTL: {packets:?}");
            assert_eq!(ttl_of("i-00000000000000e01"), Some(64), "other answers keep the system's TTL: {packets:?}");
        }

        // A connection that sends nothing is closed once idle for the idle timeout.
        let mut idle = connect(ns.name.clone()).await;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(30), idle.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "an idle connection stayed open: {read:?}");
        assert_eq!(s.servers.connection_count("i-00000000000000e01"), 0);
    }
}
