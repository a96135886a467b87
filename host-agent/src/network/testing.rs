//! Test topologies made of real kernel networking: network namespaces that
//! play hosts, an underlay switch between them, the outside world, and
//! guests. Everything is removed on drop, also when a test fails.
//!
//! ```text
//!   outside: the internet (203.0.113.2, a public address; its router on
//!      │      the underlay is 10.99.0.2, the hosts' default route; it
//!      │      routes the public pool onto the underlay)
//!   underlay switch ── host 0 (10.99.0.11, "uplink") ── VPC namespaces …
//!                   └─ host 1 (10.99.0.12) …
//! ```
//!
//! Used by the host agent's own tests and by the integration tests.

use super::cmd::Ns;
use super::VpcConfig;
use nimbus_proto::network::{Cidr, Nic, RemoteNic, SubnetOnHost, VpcOnHost};
use std::net::Ipv4Addr;
use std::time::Duration;

/// The public pool the outside namespace routes onto the underlay.
pub const PUBLIC_POOL: &str = "198.51.100.0/24";
/// The outside's address: a host on the internet (TEST-NET-3).
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The internet as the outside announces it.
pub const INTERNET: &str = "203.0.113.0/24";
/// The outside's address on the underlay: the hosts' default router.
pub const OUTSIDE_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// Every simulated host's (and the outside's) interface on the underlay.
pub const UPLINK: &str = "uplink";

fn random_tag() -> String {
    use rand::Rng;
    format!("{:06x}", rand::thread_rng().gen::<u32>() & 0xff_ffff)
}

async fn sh(args: &[&str]) {
    let out = tokio::process::Command::new(args[0]).args(&args[1..]).output().await;
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("{args:?}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!("{args:?}: {e}"),
    }
}

/// A network namespace with a random name, removed on drop.
pub struct ScratchNs {
    pub name: String,
}

impl ScratchNs {
    pub async fn new(tag: &str) -> ScratchNs {
        let name = format!("nt-{tag}-{}", random_tag());
        sh(&["ip", "netns", "add", &name]).await;
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]).await;
        ScratchNs { name }
    }

    pub fn ns(&self) -> Ns {
        Ns::named(&self.name)
    }
}

impl Drop for ScratchNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// One simulated host: its namespace and uplink on the underlay.
pub struct SimHost {
    pub ns: ScratchNs,
    pub underlay_ip: Ipv4Addr,
    /// Prefix of this host's VPC namespaces.
    pub prefix: String,
}

impl SimHost {
    pub fn vpc_config(&self) -> VpcConfig {
        VpcConfig {
            underlay_ip: self.underlay_ip,
            host_ns: self.ns.ns(),
            uplink: Some(UPLINK.into()),
            prefix: self.prefix.clone(),
            underlay_mtu: 1500,
            guest_deny: Vec::new(),
            outside_allow: Vec::new(),
        }
    }
}

pub struct Topology {
    pub underlay: ScratchNs,
    pub outside: ScratchNs,
    pub hosts: Vec<SimHost>,
}

impl Topology {
    pub async fn new(hosts: usize) -> Topology {
        let tag = random_tag();
        let underlay = ScratchNs::new(&format!("{tag}u")).await;
        sh(&["ip", "-n", &underlay.name, "link", "add", "sw", "type", "bridge"]).await;
        sh(&["ip", "-n", &underlay.name, "link", "set", "sw", "up"]).await;
        let outside = ScratchNs::new(&format!("{tag}o")).await;
        let plug = |ns: String, port: String, ip: Ipv4Addr| {
            let u = underlay.name.clone();
            async move {
                sh(&["ip", "link", "add", "name", UPLINK, "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &u]).await;
                sh(&["ip", "-n", &u, "link", "set", &port, "master", "sw", "up"]).await;
                sh(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", UPLINK]).await;
                sh(&["ip", "-n", &ns, "link", "set", UPLINK, "up"]).await;
            }
        };
        plug(outside.name.clone(), "p-out".into(), OUTSIDE_ROUTER).await;
        sh(&["ip", "-n", &outside.name, "addr", "add", &format!("{OUTSIDE_IP}/32"), "dev", "lo"]).await;
        sh(&["ip", "-n", &outside.name, "route", "add", PUBLIC_POOL, "dev", UPLINK, "src", &OUTSIDE_IP.to_string()]).await;
        let mut sims = Vec::new();
        for i in 0..hosts {
            let ns = ScratchNs::new(&format!("{tag}h{i}")).await;
            let ip = Ipv4Addr::new(10, 99, 0, 11 + i as u8);
            plug(ns.name.clone(), format!("p-h{i}"), ip).await;
            sh(&["ip", "-n", &ns.name, "route", "add", "default", "via", &OUTSIDE_ROUTER.to_string()]).await;
            sims.push(SimHost { ns, underlay_ip: ip, prefix: format!("nv{tag}{i}") });
        }
        Topology { underlay, outside, hosts: sims }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The VPC namespaces the data planes made.
        if let Ok(out) = std::process::Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if self.hosts.iter().any(|h| name.starts_with(&format!("{}-v", h.prefix))) {
                    let _ = std::process::Command::new("ip").args(["netns", "del", name]).status();
                }
            }
        }
    }
}

/// A stand-in guest: a namespace whose `eth0` is the guest end of the
/// interface's veth pair (what a real guest's macvtap sits on), taken there
/// after [`super::DataPlane::prepare`] made the pair.
pub struct FakeGuest {
    pub ns: ScratchNs,
    pub ip: Ipv4Addr,
}

impl FakeGuest {
    pub async fn new(nic: &nimbus_proto::network::Nic, mtu: u32) -> FakeGuest {
        let ns = ScratchNs::new("g").await;
        let link = super::guest_link(&nic.eni_id);
        let n = &ns.name;
        sh(&["ip", "link", "set", &link, "netns", n]).await;
        sh(&["ip", "-n", n, "link", "set", &link, "name", "eth0", "address", &nic.mac]).await;
        sh(&["ip", "-n", n, "addr", "add", &format!("{}/{}", nic.private_ip, nic.subnet.prefix), "dev", "eth0"]).await;
        sh(&["ip", "-n", n, "link", "set", "eth0", "mtu", &mtu.to_string(), "up"]).await;
        sh(&["ip", "-n", n, "route", "add", "default", "via", &nic.gateway.to_string()]).await;
        FakeGuest { ns, ip: nic.private_ip }
    }
}

/// Runs `f` on a thread that has entered namespace `name` (sockets made
/// there stay there).
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || -> std::io::Result<T> {
        let file = std::fs::File::open(&path)?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        Ok(f())
    })
    .join()
    .map_err(|_| std::io::Error::other("thread panicked"))?
}

/// A TCP server in namespace `ns` on `port` that answers every connection
/// with `hello <peer address>` and closes it. Stops when dropped.
pub struct Echo(tokio::task::JoinHandle<()>);

impl Echo {
    pub async fn start(ns: &str, port: u16) -> Echo {
        let listener = in_netns(ns, move || std::net::TcpListener::bind(("0.0.0.0", port))).unwrap().unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        Echo(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut c, peer)) = listener.accept().await {
                let _ = c.write_all(format!("hello {}\n", peer.ip()).as_bytes()).await;
            }
        }))
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects from namespace `ns` (from `source` if given) to `to`; the
/// server's first line, or why not within `timeout`.
pub async fn connect(ns: &str, source: Option<Ipv4Addr>, to: std::net::SocketAddr, timeout: Duration) -> Result<String, String> {
    let sock = in_netns(ns, move || -> std::io::Result<socket2::Socket> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        if let Some(src) = source {
            s.bind(&std::net::SocketAddr::from((src, 0)).into())?;
        }
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let std_stream: std::net::TcpStream = sock.into();
    let attempt = async move {
        let stream = tokio::net::TcpSocket::from_std_stream(std_stream).connect(to).await.map_err(|e| e.to_string())?;
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        tokio::io::BufReader::new(stream).read_line(&mut line).await.map_err(|e| e.to_string())?;
        Ok(line.trim().to_string())
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| format!("no answer within {timeout:?}"))?
}

fn cidr(s: &str) -> Cidr {
    Cidr::parse(s).expect("a test CIDR")
}

/// The `n`-th interface of the test VPC with VNI `vni` (`vpc-<vni>`), in
/// `subnet` (its gateway the subnet's first address), in `groups`, with
/// `public` as its public address; its ENI id and MAC follow from `n` and
/// `vni`, so interfaces of different VPCs may share an address, never a MAC.
pub fn nic(n: u8, vni: u32, ip: Ipv4Addr, subnet: &str, groups: &[&str], public: Option<Ipv4Addr>) -> Nic {
    let subnet = cidr(subnet);
    Nic {
        eni_id: format!("eni-0000000000000{vni:02x}{n:02x}"),
        device_index: 0,
        mac: format!("02:00:00:{:02x}:00:{n:02x}", vni & 0xff),
        private_ip: ip,
        gateway: subnet.nth(1).expect("a subnet with a first address"),
        subnet,
        vpc_id: format!("vpc-{vni}"),
        vni,
        public_ip: public,
        group_ids: groups.iter().map(|g| g.to_string()).collect(),
    }
}

/// The test VPC with VNI `vni` (172.31.0.0/16) as a host sees it: its
/// `subnets` (id, CIDR; gateways their first addresses), and `remote`, the
/// interfaces on the other host `peer`.
pub fn vpc(vni: u32, peer: Option<Ipv4Addr>, subnets: &[(&str, &str)], remote: &[&Nic]) -> VpcOnHost {
    VpcOnHost {
        vpc_id: format!("vpc-{vni}"),
        vni,
        cidr: cidr("172.31.0.0/16"),
        subnets: subnets
            .iter()
            .map(|(id, c)| {
                let c = cidr(c);
                SubnetOnHost { subnet_id: id.to_string(), cidr: c, gateway: c.nth(1).expect("a subnet with a first address") }
            })
            .collect(),
        peers: peer.into_iter().collect(),
        remote_nics: remote
            .iter()
            .map(|n| RemoteNic { ip: n.private_ip, mac: n.mac.clone(), host: peer.unwrap_or(Ipv4Addr::UNSPECIFIED) })
            .collect(),
    }
}
