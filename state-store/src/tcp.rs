//! Framed binary transport for node-to-node calls over TCP, plaintext or
//! mutual TLS.
//!
//! A connection opens (inside TLS when configured) with the 4-byte magic
//! `NMB1`; the server answers `NMB1` when it takes the connection, or
//! `NMB0 ‖ u32 length ‖ reason` and closes it (no client certificate,
//! plaintext on a TLS port). After that both sides exchange frames
//! `u32 length ‖ u64 request id ‖ bincode payload`.
//! Requests are multiplexed on one connection per peer, answered out of
//! order, and each side coalesces queued frames into one write. The node's
//! listener serves both this protocol and HTTP on the same port: it peeks at
//! the first bytes of each connection (see [`serve`]).

use crate::clock::NodeId;
use crate::error::RpcError;
use crate::node::Node;
use crate::rpc::{Request, Response, Transport};
use crate::tls::{cert_digest, server_name, Authority, CertDigest, TlsConfig};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

const MAGIC: &[u8; 4] = b"NMB1";
/// The server's answer to the magic when it refuses the connection.
const REFUSED: &[u8; 4] = b"NMB0";
/// Bound of a TLS handshake plus the magic exchange.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// TLS records start with this content type (handshake).
const TLS_HANDSHAKE_BYTE: u8 = 0x16;
/// Largest frame accepted (anti-entropy batches can be large).
const MAX_FRAME: usize = 256 * 1024 * 1024;
/// Coalesced writes are flushed at this size at the latest.
const MAX_WRITE: usize = 1024 * 1024;
/// Read buffer per connection: one `recv` takes in many frames under load
/// instead of three reads (length, id, payload) per frame.
const READ_BUF: usize = 64 * 1024;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>;

struct Conn {
    tx: mpsc::UnboundedSender<(u64, Vec<u8>)>,
    pending: Pending,
    next: AtomicU64,
    /// set by the reader when the connection ends
    dead: Arc<std::sync::atomic::AtomicBool>,
}

/// Client side: one multiplexed connection per peer, reconnected on error;
/// plaintext ([`TcpTransport::new`]) or mutual TLS ([`TcpTransport::with_tls`]).
#[derive(Default)]
pub struct TcpTransport {
    conns: Mutex<HashMap<NodeId, Arc<Conn>>>,
    tls: Option<TlsConfig>,
    /// Revocation changes: the cached connections are dropped (a server
    /// whose certificate was revoked must be reached through a new handshake).
    revocations: Option<Mutex<tokio::sync::watch::Receiver<u64>>>,
}

impl TcpTransport {
    /// Plaintext: for local development and tests only.
    pub fn new() -> TcpTransport {
        TcpTransport::default()
    }

    /// Mutual TLS: presents `tls`'s certificate and checks each node's
    /// certificate against the CA and the host part of its id.
    pub fn with_tls(tls: TlsConfig) -> TcpTransport {
        let revocations = Some(Mutex::new(tls.revocations()));
        TcpTransport { conns: Mutex::new(HashMap::new()), tls: Some(tls), revocations }
    }

    async fn conn(&self, to: &NodeId) -> Result<Arc<Conn>, RpcError> {
        if let Some(rx) = &self.revocations {
            let mut rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            if rx.has_changed().unwrap_or(false) {
                rx.borrow_and_update();
                self.conns.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
        }
        if let Some(c) = self.conns.lock().unwrap_or_else(|p| p.into_inner()).get(to) {
            if !c.tx.is_closed() && !c.dead.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        let stream = tokio::time::timeout(std::time::Duration::from_secs(1), TcpStream::connect(to.as_str()))
            .await
            .map_err(|_| RpcError::Timeout(to.clone()))?
            .map_err(|_| RpcError::Unreachable(to.clone()))?;
        let _ = stream.set_nodelay(true);
        let tls_failed = |reason: String| RpcError::Tls { node: to.clone(), reason };
        // nothing has been sent before the server took the connection: a
        // silent or failing server is unreachable, a refusing one a TLS error
        let conn = match &self.tls {
            None => {
                let (rd, wr) = stream.into_split();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, open(rd, wr)).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(OpenError::Refused(reason))) => return Err(tls_failed(reason)),
                    Ok(Err(OpenError::Io(_))) | Err(_) => return Err(RpcError::Unreachable(to.clone())),
                }
            }
            Some(tls) => {
                let name = server_name(to).map_err(|e| tls_failed(e.to_string()))?;
                let handshake = async {
                    let s = tls.connector().connect(name, stream).await.map_err(|e| OpenError::Io(io_reason(&e)))?;
                    let (rd, wr) = tokio::io::split(s);
                    open(rd, wr).await
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(OpenError::Refused(reason) | OpenError::Io(reason))) => return Err(tls_failed(reason)),
                    Err(_) => return Err(RpcError::Unreachable(to.clone())),
                }
            }
        };
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(to.clone(), conn.clone());
        Ok(conn)
    }
}

/// The reason an I/O error on a TLS stream carries (a rustls error, such
/// as an alert from the peer that refused our certificate, when there is one).
fn io_reason(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(t) => t.to_string(),
        None => e.to_string(),
    }
}

/// Why a connection could not be opened.
enum OpenError {
    /// the server answered the magic with a refusal
    Refused(String),
    /// the connection failed first (with TLS 1.3 the server checks our
    /// certificate after our side of the handshake completed: its alert
    /// arrives here)
    Io(String),
}

/// Send the magic, wait for the server's answer, and start the reader and
/// writer of a connection.
async fn open<R, W>(rd: R, mut wr: W) -> Result<Arc<Conn>, OpenError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let io = |e: std::io::Error| OpenError::Io(io_reason(&e));
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUF, rd);
    wr.write_all(MAGIC).await.map_err(io)?;
    wr.flush().await.map_err(io)?;
    let mut answer = [0u8; 4];
    rd.read_exact(&mut answer).await.map_err(io)?;
    if &answer == REFUSED {
        let len = rd.read_u32().await.map_err(io)? as usize;
        let mut reason = vec![0u8; len.min(4096)];
        rd.read_exact(&mut reason).await.map_err(io)?;
        return Err(OpenError::Refused(format!("refused by the server: {}", String::from_utf8_lossy(&reason))));
    }
    if &answer != MAGIC {
        return Err(OpenError::Io("the server does not speak the store's protocol".into()));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    tokio::spawn(write_loop(wr, rx));
    let p = pending.clone();
    let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = dead.clone();
    tokio::spawn(async move {
        while let Ok((id, payload)) = read_frame(&mut rd).await {
            if let Some(tx) = p.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                let _ = tx.send(payload);
            }
        }
        // connection gone (e.g. the peer restarted): new calls reconnect,
        // callers waiting on it see a closed channel
        d.store(true, Ordering::Release);
        p.lock().unwrap_or_else(|e| e.into_inner()).clear();
    });
    Ok(Arc::new(Conn { tx, pending, next: AtomicU64::new(1), dead }))
}

/// Removes a pending entry when the call is dropped (e.g. on timeout).
struct PendingGuard(Pending, u64);
impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

#[async_trait]
impl Transport for TcpTransport {
    async fn call(&self, _from: &NodeId, to: &NodeId, req: Request) -> Result<Response, RpcError> {
        let conn = self.conn(to).await?;
        let id = conn.next.fetch_add(1, Ordering::Relaxed);
        let (otx, orx) = oneshot::channel();
        conn.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, otx);
        let _guard = PendingGuard(conn.pending.clone(), id);
        if conn.dead.load(Ordering::Acquire) {
            // the reader may have cleared the pending map before our insert
            self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(to);
            return Err(RpcError::Unreachable(to.clone()));
        }
        let payload = bincode::serialize(&req).map_err(|e| RpcError::Codec(e.to_string()))?;
        if conn.tx.send((id, payload)).is_err() {
            self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(to);
            return Err(RpcError::Unreachable(to.clone()));
        }
        match orx.await {
            Ok(bytes) => crate::codec::decode(&bytes, MAX_FRAME).map_err(RpcError::Codec),
            // the connection died after the request was queued for it
            Err(_) => {
                self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(to);
                Err(RpcError::Lost(to.clone()))
            }
        }
    }
}

async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> std::io::Result<(u64, Vec<u8>)> {
    let len = rd.read_u32().await? as usize;
    if !(8..=MAX_FRAME).contains(&len) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad frame length"));
    }
    let id = rd.read_u64().await?;
    let mut buf = vec![0u8; len - 8];
    rd.read_exact(&mut buf).await?;
    Ok((id, buf))
}

/// Write queued frames, coalescing everything already queued into one
/// write call.
async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::UnboundedReceiver<(u64, Vec<u8>)>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        // Let the tasks that are ready run first: under load they queue
        // more frames, and one write carries them all (each write on
        // loopback costs about as much as the whole receive path).
        tokio::task::yield_now().await;
        let mut next = Some(first);
        while let Some((id, payload)) = next.take() {
            buf.extend_from_slice(&((payload.len() + 8) as u32).to_be_bytes());
            buf.extend_from_slice(&id.to_be_bytes());
            buf.extend_from_slice(&payload);
            if buf.len() < MAX_WRITE {
                next = rx.try_recv().ok();
            }
        }
        // flush: a TLS stream holds records back until flushed
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        buf.clear();
    }
}

/// Who is at the other end of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// A plaintext node (development), or TLS with a certificate that
    /// chains to the CA, with what it may do ([`Authority`]).
    Trusted(Authority),
    /// TLS without a client certificate: health and readiness only
    NoCertificate,
    /// plaintext on a port that requires TLS: refused
    Plaintext,
}

/// HTTP paths a node (not an administrator) may use: replication and probes.
const NODE_PATHS: &[&str] = &["/internal/rpc", "/healthz", "/readyz", "/metrics"];

impl Peer {
    /// Why a request from this peer is refused (`None`: it is served).
    /// `path`: the HTTP path; `None` for a framed connection.
    fn refusal(self, path: Option<&str>) -> Option<&'static str> {
        match self {
            Peer::Trusted(Authority::Admin) => None,
            Peer::Trusted(Authority::Node) if path.is_none_or(|p| NODE_PATHS.contains(&p)) => None,
            Peer::Trusted(Authority::Node) => Some("a node's certificate is for replication only"),
            Peer::NoCertificate if matches!(path, Some("/healthz" | "/readyz")) => None,
            Peer::NoCertificate => Some("a client certificate signed by the cluster CA is required"),
            Peer::Plaintext => Some("this node requires TLS"),
        }
    }

    /// Why a framed request from this peer is refused: a node may not use
    /// the client API (quorum reads and writes of any key).
    fn refuses_request(self, req: &Request) -> Option<&'static str> {
        match (self, req) {
            (Peer::Trusted(Authority::Node), Request::ClientGet { .. } | Request::ClientPut { .. }) => {
                Some("a node's certificate is for replication only")
            }
            _ => None,
        }
    }
}

/// Serve one framed-RPC connection (magic already consumed): answer the
/// magic, then serve frames; a refused peer gets the refusal and the
/// connection is closed.
async fn serve_rpc<R, W>(node: Arc<Node>, rd: R, mut wr: W, peer: Peer)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    if let Some(reason) = peer.refusal(None) {
        tracing::warn!(?peer, "framed connection refused: {reason}");
        node.metrics().unauthenticated.fetch_add(1, Ordering::Relaxed);
        let mut msg = REFUSED.to_vec();
        msg.extend_from_slice(&(reason.len() as u32).to_be_bytes());
        msg.extend_from_slice(reason.as_bytes());
        let _ = wr.write_all(&msg).await;
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
        return;
    }
    if wr.write_all(MAGIC).await.is_err() || wr.flush().await.is_err() {
        return;
    }
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUF, rd);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(write_loop(wr, rx));
    while let Ok((id, payload)) = read_frame(&mut rd).await {
        let req = match crate::codec::decode::<Request>(&payload, MAX_FRAME) {
            Ok(req) => req,
            Err(e) => {
                let resp = Response::Error(format!("bad request: {e}"));
                let _ = tx.send((id, bincode::serialize(&resp).unwrap_or_default()));
                continue;
            }
        };
        if let Some(reason) = peer.refuses_request(&req) {
            tracing::warn!(?peer, "framed request refused: {reason}");
            node.metrics().unauthenticated.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send((id, bincode::serialize(&Response::Error(reason.to_string())).unwrap_or_default()));
            continue;
        }
        // Single-key replica requests usually complete on their first poll
        // (a read, or a write when commits run inline): answer those here
        // and spawn a task only when one has to wait. Everything else
        // (client requests, which coordinate; batch and scan requests,
        // which are long) gets its own task at once, so it cannot hold up
        // the other requests on this connection. A pending first poll
        // leaves the reader's waker behind: one spurious wake-up.
        let quick = matches!(req, Request::Get { .. } | Request::Put { .. } | Request::Hinted { .. });
        let (node, tx) = (node.clone(), tx.clone());
        let mut answer = Box::pin(async move {
            let resp = node.handle_client(req).await;
            let _ = tx.send((id, bincode::serialize(&resp).unwrap_or_default()));
        });
        if !quick || futures::poll!(answer.as_mut()).is_pending() {
            tokio::spawn(answer);
        }
    }
}

/// Serve HTTP on `io`; requests `peer` may not make get their refusal
/// (401 without a client certificate, 400 plaintext on a TLS port).
async fn serve_http<I>(node: Arc<Node>, router: axum::Router, io: I, peer: Peer)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut r = router.clone();
        let refusal = peer.refusal(Some(req.uri().path()));
        if refusal.is_some() {
            node.metrics().unauthenticated.fetch_add(1, Ordering::Relaxed);
        }
        async move {
            match refusal {
                None => tower_service::Service::call(&mut r, req).await,
                Some(reason) => {
                    let status =
                        if peer == Peer::Plaintext { axum::http::StatusCode::BAD_REQUEST } else { axum::http::StatusCode::UNAUTHORIZED };
                    tracing::warn!(?peer, path = %req.uri().path(), "request refused: {reason}");
                    Ok(crate::http::error_response(status, "Unauthenticated", reason))
                }
            }
        }
    });
    let io = hyper_util::rt::TokioIo::new(io);
    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
        tracing::debug!(error = %e, "http connection ended");
    }
}

/// A stream whose first bytes were already read: they are replayed first.
struct Replay<S> {
    head: [u8; 4],
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.pos < self.head.len() {
            let n = (self.head.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.head[start..start + n]);
            self.pos += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A plaintext connection: framed RPC if it starts with the magic, HTTP
/// otherwise (peeked, so the stream is split without a lock).
async fn serve_plain(node: Arc<Node>, router: axum::Router, stream: TcpStream, peer: Peer) {
    let mut head = [0u8; 4];
    let is_rpc = loop {
        match stream.peek(&mut head).await {
            Ok(n) if n >= 4 => break &head == MAGIC,
            Ok(0) | Err(_) => return,
            Ok(n) if head[..n] != MAGIC[..n] => break false,
            Ok(_) => tokio::task::yield_now().await,
        }
    };
    if is_rpc {
        let mut stream = stream;
        let mut skip = [0u8; 4];
        if stream.read_exact(&mut skip).await.is_ok() {
            let (rd, wr) = stream.into_split();
            serve_rpc(node, rd, wr, peer).await;
        }
    } else {
        serve_http(node, router, stream, peer).await;
    }
}

/// A TLS connection after the handshake: the same choice of protocol.
async fn serve_secure<S>(node: Arc<Node>, router: axum::Router, mut stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut head = [0u8; 4];
    // every HTTP request is longer than 4 bytes; a client that sends
    // fewer and waits is dropped
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut head)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    if &head == MAGIC {
        let (rd, wr) = tokio::io::split(stream);
        serve_rpc(node, rd, wr, peer).await;
    } else {
        serve_http(node, router, Replay { head, pos: 0, inner: stream }, peer).await;
    }
}

/// Serve `node` on `listener` in plaintext (local development and tests):
/// framed RPC for connections that start with the magic, HTTP (the JSON
/// API, probes and admin: [`crate::http::router`]) otherwise.
pub fn serve(node: Arc<Node>, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    serve_with(node, listener, None)
}

/// Resolves once the certificate `digest` is revoked (see
/// [`TlsConfig::set_revoked`]); never if the set can no longer change.
async fn revoked(tls: &TlsConfig, digest: CertDigest) {
    let mut changes = tls.revocations();
    loop {
        if tls.is_revoked(&digest) {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Serve `node` on `listener` with mutual TLS. A connection must complete
/// a TLS handshake; a client certificate, when presented, must chain to
/// the CA. Without one only `GET /healthz` and `GET /readyz` are answered
/// (probes); every other HTTP request gets 401 and a framed connection is
/// refused. Plaintext connections get 400 (HTTP) or a refusal (framed).
/// Aborting the returned task closes the listener and every connection.
pub fn serve_tls(node: Arc<Node>, listener: tokio::net::TcpListener, tls: TlsConfig) -> tokio::task::JoinHandle<()> {
    serve_with(node, listener, Some(tls))
}

/// The client certificate of an accepted TLS connection.
fn stream_leaf(conn: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<rustls::pki_types::CertificateDer<'static>> {
    conn.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned())
}

/// Closes a connection whose TLS handshake was refused, after the alert
/// that says why: our side first, then what the client sent meanwhile (with
/// TLS 1.3 a client may already send its request) is read and dropped for a
/// moment. Dropping a socket with unread bytes makes the kernel answer with
/// a reset, which can destroy the alert before the client reads it: the
/// client would then see a broken connection, not a refusal.
async fn close_refused(stream: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSED_LINGER, async { while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {} }).await;
}

/// How long a refused connection is drained before it is dropped.
const REFUSED_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

fn serve_with(node: Arc<Node>, listener: tokio::net::TcpListener, tls: Option<TlsConfig>) -> tokio::task::JoinHandle<()> {
    let acceptor = tls.as_ref().map(TlsConfig::acceptor);
    let router = crate::http::router(node.clone());
    tokio::spawn(async move {
        // The connections' tasks live in this set: aborting the returned
        // handle drops it and so ends every connection too (an embedding
        // process can stop a node completely and open its store again).
        let mut conns = tokio::task::JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            let (stream, remote) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // e.g. out of file descriptors: back off instead of spinning
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (node, router, acceptor, tls) = (node.clone(), router.clone(), acceptor.clone(), tls.clone());
            conns.spawn(async move {
                let (Some(acceptor), Some(tls)) = (acceptor, tls) else {
                    return serve_plain(node, router, stream, Peer::Trusted(Authority::Admin)).await;
                };
                let mut first = [0u8; 1];
                match stream.peek(&mut first).await {
                    Ok(1) if first[0] == TLS_HANDSHAKE_BYTE => {}
                    Ok(1) => return serve_plain(node, router, stream, Peer::Plaintext).await,
                    _ => return,
                }
                let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream).into_fallible()).await {
                    Ok(Ok(s)) => s,
                    Ok(Err((e, mut stream))) => {
                        tracing::warn!(%remote, error = %io_reason(&e), "TLS handshake refused");
                        node.metrics().tls_refused.fetch_add(1, Ordering::Relaxed);
                        close_refused(&mut stream).await;
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let leaf = stream_leaf(&conn);
                let Some(leaf) = leaf else {
                    return serve_secure(node, router, conn, Peer::NoCertificate).await;
                };
                let peer = Peer::Trusted(tls.authority(&leaf));
                // A certificate revoked while its connection is open ends it.
                let digest = cert_digest(&leaf);
                tokio::select! {
                    _ = serve_secure(node, router, conn, peer) => {}
                    _ = revoked(&tls, digest) => tracing::warn!(%remote, "closed a connection whose certificate was revoked"),
                }
            });
        }
    })
}
