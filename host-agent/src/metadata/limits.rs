//! Bounds on the metadata service's connections, so that no guest can hold
//! the agent's file descriptors: a request (head, body, and taking its
//! answer) must be done within [`ConnectionLimits::request_timeout`] of its
//! first byte, a VPC connection idle between requests for
//! [`ConnectionLimits::idle_timeout`] is closed (both kept by
//! [`super::http`]), an instance holds at most
//! [`ConnectionLimits::per_instance`] connections (a new one closes its
//! oldest) and all instances together at most [`ConnectionLimits::total`]
//! (a new one closes the oldest connection of the instance holding the
//! most), so one guest's flood costs other guests nothing; every
//! connection of an instance closes when its service stops
//! ([`super::MetadataServers::stop`], at termination) or its guest stops
//! ([`super::MetadataServers::close_connections`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bounds on the metadata service's connections (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A request's head and body must have arrived, and its answer been
    /// taken, within this of the request's first byte.
    pub request_timeout: Duration,
    /// A VPC connection idle this long between requests (or before the
    /// first) is closed. Not the unix socket's (QEMU's one stream per guest).
    pub idle_timeout: Duration,
    /// Connections one instance may hold; a new one closes its oldest.
    pub per_instance: usize,
    /// Connections of all instances; a new one closes the oldest of the
    /// instance holding the most.
    pub total: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { request_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(60), per_instance: 16, total: 256 }
    }
}

impl ConnectionLimits {
    /// The defaults, with the total cut to a quarter of the process's file
    /// descriptor limit (at least 64), so guests cannot use up what the
    /// agent needs for libvirt, the store and the control plane.
    pub fn for_this_process() -> ConnectionLimits {
        let d = ConnectionLimits::default();
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(soft, _)| soft).unwrap_or(1024);
        let total = usize::try_from(soft / 4).unwrap_or(usize::MAX).clamp(64, 1024);
        ConnectionLimits { total, per_instance: d.per_instance.min(total), ..d }
    }
}

/// The live connections of every instance: what the caps count, and how an
/// instance's connections are closed (dropping a sender ends its task).
pub(super) struct Connections {
    pub(super) limits: ConnectionLimits,
    inner: Mutex<ConnectionTable>,
}

#[derive(Default)]
struct ConnectionTable {
    next: u64,
    total: usize,
    /// Per instance, by age (ids only grow): the close signal of each connection.
    by_instance: HashMap<String, std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>>,
}

impl ConnectionTable {
    /// Closes the oldest connection of `instance_id`.
    fn close_oldest(&mut self, instance_id: &str) {
        if let Some(conns) = self.by_instance.get_mut(instance_id) {
            if conns.pop_first().is_some() {
                self.total -= 1;
            }
            if conns.is_empty() {
                self.by_instance.remove(instance_id);
            }
        }
    }
}

impl Connections {
    pub(super) fn new(limits: ConnectionLimits) -> Connections {
        Connections { limits, inner: Mutex::default() }
    }

    /// Admits a new connection of `instance_id`, closing what the caps
    /// require first: its place (released when dropped) and its close
    /// signal; `None` once the instance's service stopped.
    pub(super) fn admit(
        self: &Arc<Self>,
        instance_id: &str,
        stopped: &AtomicBool,
    ) -> Option<(Admitted, tokio::sync::oneshot::Receiver<()>)> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if stopped.load(Ordering::SeqCst) {
            return None;
        }
        while t.by_instance.get(instance_id).is_some_and(|c| c.len() >= self.limits.per_instance.max(1)) {
            t.close_oldest(instance_id);
            tracing::debug!(%instance_id, "metadata connection closed: the instance's cap");
        }
        while t.total >= self.limits.total.max(1) {
            let Some(heaviest) = t.by_instance.iter().max_by_key(|(_, c)| c.len()).map(|(id, _)| id.clone()) else { break };
            t.close_oldest(&heaviest);
            tracing::debug!(instance_id = %heaviest, "metadata connection closed: the host's cap");
        }
        let id = t.next;
        t.next += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        t.by_instance.entry(instance_id.to_string()).or_default().insert(id, tx);
        t.total += 1;
        Some((Admitted { connections: self.clone(), instance_id: instance_id.to_string(), id }, rx))
    }

    /// Forgets a connection that ended.
    fn release(&self, instance_id: &str, id: u64) {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conns) = t.by_instance.get_mut(instance_id) {
            if conns.remove(&id).is_some() {
                if conns.is_empty() {
                    t.by_instance.remove(instance_id);
                }
                t.total -= 1;
            }
        }
    }

    /// Closes every connection of `instance_id`; how many there were.
    pub(super) fn close_instance(&self, instance_id: &str) -> usize {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.by_instance.remove(instance_id).map_or(0, |c| c.len());
        t.total -= n;
        n
    }

    pub(super) fn close_all(&self) {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.by_instance.clear();
        t.total = 0;
    }

    pub(super) fn count(&self, instance_id: &str) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).by_instance.get(instance_id).map_or(0, |c| c.len())
    }
}

/// Releases a connection's place in [`Connections`] when its task ends.
pub(super) struct Admitted {
    connections: Arc<Connections>,
    instance_id: String,
    id: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.connections.release(&self.instance_id, self.id);
    }
}

/// The attacks of issue 18 on the metadata service: a guest holding
/// half-sent requests (finding 5).
#[cfg(test)]
mod tests {
    use super::super::testing::{eventually, sample_metadata, Fixture, HOUR};
    use super::*;
    use crate::metadata::request;
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The connections the server holds on the listener at `socket`
    /// (accepted ones, and those waiting to be: the kernel gives them the
    /// listener's path in /proc/net/unix; clients' sockets have none).
    fn server_side(socket: &Path) -> usize {
        let path = socket.to_string_lossy();
        let table = std::fs::read_to_string("/proc/net/unix").unwrap();
        table.lines().filter(|l| l.split_whitespace().nth(7) == Some(&path)).filter(|l| l.split_whitespace().nth(5) == Some("03")).count()
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// Clients that sent half a request and wait; each drops its socket
    /// once the server closed the connection. Aborted on drop.
    struct HalfSent {
        closed: Arc<AtomicUsize>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl HalfSent {
        async fn open(socket: &Path, n: usize) -> HalfSent {
            let closed = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..n {
                let mut conn = tokio::net::UnixStream::connect(socket).await.unwrap();
                conn.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Slow: ").await.unwrap();
                let closed = closed.clone();
                tasks.push(tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                    closed.fetch_add(1, Ordering::SeqCst);
                }));
            }
            HalfSent { closed, tasks }
        }

        fn closed(&self) -> usize {
            self.closed.load(Ordering::SeqCst)
        }
    }

    impl Drop for HalfSent {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    /// Finding 5: a guest held 1,000 half-sent requests and the agent's
    /// descriptors went from 23 to 1,023. Now an instance holds at most its
    /// cap (a new connection closes its oldest), all guests together at most
    /// the host's (a new one closes the oldest of the guest holding the
    /// most), and another guest's metadata answers all along.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_half_sent_requests_is_capped_per_guest_and_per_host() {
        let limits = ConnectionLimits { request_timeout: HOUR, idle_timeout: HOUR, per_instance: 8, total: 24 };
        let s = Fixture::with_limits(limits);
        let ids = ["i-00000000000000a01", "i-00000000000000a02", "i-00000000000000a03", "i-00000000000000b01"];
        let mut sockets = Vec::new();
        for id in ids {
            sockets.push(s.servers.ensure(&sample_metadata(id), None).await.unwrap());
        }
        let (attackers, victim) = (&sockets[..3], &sockets[3]);
        let before = open_fds();
        let mut floods = Vec::new();
        for socket in attackers {
            let flood = HalfSent::open(socket, 150).await;
            // Every connection the server did not keep is closed (and its client with it).
            assert!(
                eventually(Duration::from_secs(60), || flood.closed() >= 150 - limits.per_instance
                    && server_side(socket) <= limits.per_instance)
                .await,
                "the guest keeps {} connections open on the server ({} closed)",
                server_side(socket),
                flood.closed()
            );
            floods.push(flood);
        }
        let held: usize = attackers.iter().map(|s| server_side(s)).sum();
        assert!(held <= limits.total, "{held} connections held for the attackers");
        // The descriptors of this process: the clients still open, the
        // server's side of them, and some slack for the tests running beside.
        let fds = open_fds();
        assert!(fds <= before + 2 * limits.total + 32, "descriptors went from {before} to {fds}");
        for (i, id) in ids[..3].iter().enumerate() {
            assert!(s.servers.connection_count(id) <= limits.per_instance, "{id}: {}", s.servers.connection_count(id));
            assert_eq!(s.servers.connection_count(id), server_side(&attackers[i]));
        }
        // The host is full of the attackers' connections, yet the other guest is answered.
        for _ in 0..3 {
            let (status, body) = request(victim, "GET", "/latest/meta-data/instance-id", &[]).await.unwrap();
            assert_eq!((status, body.as_slice()), (200, ids[3].as_bytes()));
        }
        let total: usize = sockets.iter().map(|s| server_side(s)).sum();
        assert!(total <= limits.total, "{total} connections in all");
    }

    /// Finding 5: half-sent requests stayed open forever. Now a request must
    /// be done within the request timeout of its first byte (sending a byte
    /// now and then does not extend it), and a VPC connection idle for the
    /// idle timeout closes (see `token_responses_leave_with_the_hop_limit`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_sent_requests_are_closed_after_the_request_timeout() {
        let limits = ConnectionLimits { request_timeout: Duration::from_millis(1500), idle_timeout: HOUR, per_instance: 8, total: 24 };
        let s = Fixture::with_limits(limits);
        let id = "i-00000000000000c01";
        let socket = s.servers.ensure(&sample_metadata(id), None).await.unwrap();
        let started = tokio::time::Instant::now();
        let flood = HalfSent::open(&socket, 6).await;
        // A trickle: a byte of the head every 200 ms.
        let mut trickle = tokio::net::UnixStream::connect(&socket).await.unwrap();
        trickle.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let cut = tokio::spawn(async move {
            for _ in 0..600 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if trickle.write_all(b"X").await.is_err() {
                    return true;
                }
            }
            false
        });
        assert!(eventually(Duration::from_secs(30), || flood.closed() == 6).await, "{} of 6 half-sent requests closed", flood.closed());
        assert!(started.elapsed() >= Duration::from_millis(1400), "closed before the timeout: {:?}", started.elapsed());
        assert!(tokio::time::timeout(Duration::from_secs(30), cut).await.unwrap().unwrap(), "a trickled head kept its connection");
        assert!(eventually(Duration::from_secs(10), || server_side(&socket) == 0 && s.servers.connection_count(id) == 0).await);
        // Whole requests are answered as ever, also one after another on one connection.
        let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let expected = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n\r\n{id}");
        for _ in 0..2 {
            conn.write_all(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n").await.unwrap();
            let mut got = vec![0u8; expected.len()];
            tokio::time::timeout(Duration::from_secs(30), conn.read_exact(&mut got)).await.unwrap().unwrap();
            assert_eq!(String::from_utf8_lossy(&got), expected);
        }
    }

    /// Finding 5: the connections of a terminated guest stayed open for
    /// good. Now stopping an instance's service (termination), or its guest
    /// (a stop), closes every connection it has.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instances_connections_close_when_it_stops_or_terminates() {
        let s = Fixture::with_limits(ConnectionLimits { request_timeout: HOUR, idle_timeout: HOUR, per_instance: 8, total: 24 });
        let (gone, stopped, other) = ("i-00000000000000d01", "i-00000000000000d02", "i-00000000000000d03");
        let mut sockets = Vec::new();
        for id in [gone, stopped, other] {
            sockets.push(s.servers.ensure(&sample_metadata(id), None).await.unwrap());
        }
        let floods = [HalfSent::open(&sockets[0], 5).await, HalfSent::open(&sockets[1], 5).await, HalfSent::open(&sockets[2], 5).await];
        assert!(eventually(Duration::from_secs(30), || sockets.iter().all(|s| server_side(s) == 5)).await);
        s.servers.stop(gone);
        assert!(eventually(Duration::from_secs(10), || floods[0].closed() == 5).await, "{} of 5 closed at termination", floods[0].closed());
        assert!(eventually(Duration::from_secs(10), || server_side(&sockets[0]) == 0).await);
        assert_eq!(s.servers.connection_count(gone), 0);
        assert_eq!(s.servers.close_connections(stopped), 5);
        assert!(eventually(Duration::from_secs(10), || floods[1].closed() == 5).await, "{} of 5 closed at the stop", floods[1].closed());
        // The stopped instance is still served (for its next start); the other is untouched.
        assert_eq!(request(&sockets[1], "GET", "/latest/meta-data/instance-id", &[]).await.unwrap().0, 200);
        assert_eq!((floods[2].closed(), s.servers.connection_count(other)), (0, 5));
    }
}
