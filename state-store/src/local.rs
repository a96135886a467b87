//! Loopback addresses for local clusters (tests, `store-bench`).

use std::sync::atomic::{AtomicU32, Ordering};

/// Where the kernel's ephemeral ports begin when it does not say.
const EPHEMERAL_START: u32 = 32768;
/// The lowest port handed out.
const FIRST: u32 = 10_000;

/// A port on 127.0.0.1 that nothing listens on now, for a node about to
/// be started there. Below the kernel's ephemeral range: port 0's answer
/// is an ephemeral port, which any outgoing connection of the machine may
/// take before the node binds it (seen on busy CI runs as "address already
/// in use"). Ports are tried from a point that depends on the process, in
/// turn, so that concurrent tests and test processes rarely meet.
pub fn free_port() -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let last = ephemeral_start().saturating_sub(1).max(FIRST + 1);
    let span = last - FIRST;
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if let Ok(port) = u16::try_from(port) {
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> std::io::Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(EPHEMERAL_START)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| super::free_port().expect("port")).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        assert!(ports.iter().all(|p| u32::from(*p) < super::ephemeral_start() && u32::from(*p) >= super::FIRST), "{ports:?}");
    }
}
