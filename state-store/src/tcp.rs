//! Framed binary transport for node-to-node calls over TCP.
//!
//! A connection opens with the 4-byte magic `NMB1`; after that both sides
//! exchange frames `u32 length ‖ u64 request id ‖ bincode payload`.
//! Requests are multiplexed on one connection per peer, answered out of
//! order, and each side coalesces queued frames into one write. The node's
//! listener serves both this protocol and HTTP on the same port: it peeks at
//! the first bytes of each connection (see [`serve`]).

use crate::clock::NodeId;
use crate::api::{Context, GetResult, KvClient};
use crate::error::{check_key, check_value, RpcError, StoreError};
use crate::node::Node;
use crate::rpc::{Request, Response, Transport};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

const MAGIC: &[u8; 4] = b"NMB1";
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

/// Client side: one multiplexed connection per peer, reconnected on error.
#[derive(Default)]
pub struct TcpTransport {
    conns: Mutex<HashMap<NodeId, Arc<Conn>>>,
}

impl TcpTransport {
    pub fn new() -> TcpTransport {
        TcpTransport::default()
    }

    async fn conn(&self, to: &NodeId) -> Result<Arc<Conn>, RpcError> {
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
        let (rd, mut wr) = stream.into_split();
        let mut rd = tokio::io::BufReader::with_capacity(READ_BUF, rd);
        wr.write_all(MAGIC).await.map_err(|_| RpcError::Unreachable(to.clone()))?;
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
        let conn = Arc::new(Conn { tx, pending, next: AtomicU64::new(1), dead });
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(to.clone(), conn.clone());
        Ok(conn)
    }
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
            Ok(bytes) => crate::http::decode(&bytes, MAX_FRAME).map_err(RpcError::Codec),
            // the connection died after the request was queued for it
            Err(_) => {
                self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(to);
                Err(RpcError::Lost(to.clone()))
            }
        }
    }
}

/// Network client of the store over the framed protocol (faster than
/// [`crate::HttpClient`]; same typed API).
pub struct TcpClient {
    addr: NodeId,
    transport: TcpTransport,
    timeout: std::time::Duration,
}

impl TcpClient {
    /// `addr` is a node's `host:port`; `timeout` bounds each operation.
    pub fn new(addr: &str, timeout: std::time::Duration) -> TcpClient {
        TcpClient { addr: addr.to_string(), transport: TcpTransport::new(), timeout }
    }

    async fn call(&self, req: Request) -> Result<Response, StoreError> {
        match tokio::time::timeout(self.timeout, self.transport.call(&String::new(), &self.addr, req)).await {
            Ok(Ok(Response::Failed(e))) => Err(e),
            Ok(Ok(Response::Error(e))) => Err(StoreError::Transport(e)),
            Ok(Ok(r)) => Ok(r),
            // sent, but no reply: a write may have been applied
            Ok(Err(RpcError::Lost(_) | RpcError::Timeout(_) | RpcError::Codec(_))) | Err(_) => {
                Err(StoreError::OutcomeUnknown(self.addr.clone()))
            }
            Ok(Err(e)) => Err(StoreError::Transport(e.to_string())),
        }
    }

    async fn write(&self, key: &[u8], value: Option<Vec<u8>>, context: &Context) -> Result<Context, StoreError> {
        check_key(key)?;
        if let Some(v) = &value {
            check_value(v)?;
        }
        match self.call(Request::ClientPut { key: key.to_vec(), value, context: context.0.clone() }).await? {
            Response::Written(vv) => Ok(Context(vv)),
            _ => Err(StoreError::Transport("unexpected response".into())),
        }
    }
}

#[async_trait]
impl KvClient for TcpClient {
    async fn get(&self, key: &[u8]) -> Result<GetResult, StoreError> {
        check_key(key)?;
        match self.call(Request::ClientGet { key: key.to_vec() }).await? {
            Response::Got(r) => Ok(r),
            _ => Err(StoreError::Transport("unexpected response".into())),
        }
    }

    async fn put(&self, key: &[u8], value: Vec<u8>, context: &Context) -> Result<Context, StoreError> {
        self.write(key, Some(value), context).await
    }

    async fn delete(&self, key: &[u8], context: &Context) -> Result<Context, StoreError> {
        self.write(key, None, context).await
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
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
}

/// Serve one framed-RPC connection (magic already consumed).
async fn serve_rpc(node: Arc<Node>, stream: TcpStream) {
    let (rd, wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUF, rd);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(write_loop(wr, rx));
    while let Ok((id, payload)) = read_frame(&mut rd).await {
        let req = match crate::http::decode::<Request>(&payload, MAX_FRAME) {
            Ok(req) => req,
            Err(e) => {
                let resp = Response::Error(format!("bad request: {e}"));
                let _ = tx.send((id, bincode::serialize(&resp).unwrap_or_default()));
                continue;
            }
        };
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

/// Serve `node` on `listener`: framed RPC for connections that start with
/// the magic, HTTP (the client API, admin and `/internal/rpc`) otherwise.
pub fn serve(node: Arc<Node>, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    let router = crate::http::router(node.clone());
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // e.g. out of file descriptors: back off instead of spinning
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (node, router) = (node.clone(), router.clone());
            tokio::spawn(async move {
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
                        serve_rpc(node, stream).await;
                    }
                } else {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let mut r = router.clone();
                        async move { tower_service::Service::call(&mut r, req).await }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                        tracing::debug!(error = %e, "http connection ended");
                    }
                }
            });
        }
    })
}
