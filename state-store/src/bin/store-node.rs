//! Standalone state-store node.
//!
//! `store-node --listen 127.0.0.1:7001 --data-dir /var/lib/nimbus/store --seeds 127.0.0.1:7002,127.0.0.1:7003`
//! The listen address is also the node's id. SIGTERM or ctrl-c stops the
//! node (it keeps its partitions, as after a crash); with `--leave-on-exit`
//! it first leaves the ring and hands its data over.

use clap::Parser;
use nimbus_state_store::{tcp, Config, Fsync, HttpTransport, Node, TcpTransport, TlsConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// jemalloc: the store allocates per message; under store-bench glibc
/// malloc cost ~14% of the CPU and mimalloc stalled every thread for
/// milliseconds at a time (fresh huge pages), jemalloc neither.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(about = "Nimbus Dynamo-style state-store node")]
struct Args {
    /// host:port to listen on; also this node's id
    #[arg(long)]
    listen: String,
    #[arg(long)]
    data_dir: PathBuf,
    /// comma-separated seed node addresses
    #[arg(long, value_delimiter = ',', default_value = "")]
    seeds: Vec<String>,
    #[arg(long, default_value_t = 3)]
    n: usize,
    #[arg(long, default_value_t = 2)]
    r: usize,
    #[arg(long, default_value_t = 2)]
    w: usize,
    #[arg(long, default_value_t = 256)]
    partitions: u32,
    /// per-request timeout in milliseconds
    #[arg(long, default_value_t = 500)]
    request_timeout_ms: u64,
    /// anti-entropy period in milliseconds
    #[arg(long, default_value_t = 10_000)]
    anti_entropy_ms: u64,
    /// hand partitions over to the other nodes before exiting on SIGTERM
    #[arg(long)]
    leave_on_exit: bool,
    /// node-to-node transport: `tcp` (framed binary, same port as HTTP) or
    /// `http` (`POST /internal/rpc`); all nodes of a cluster must agree
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// `always` (fdatasync before acknowledging) or a periodic fdatasync
    /// interval such as `100ms`
    #[arg(long, default_value = "100ms")]
    fsync: Fsync,
    /// size at which the data memtable is flushed, MiB (used when the
    /// store is created)
    #[arg(long, default_value_t = nimbus_state_store::storage::DEFAULT_MEMTABLE_BYTES >> 20)]
    memtable_mib: u64,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Mutual TLS, or an explicit choice of plaintext.
#[derive(clap::Args, Debug, Clone)]
struct TlsArgs {
    /// PEM file of the CA that signs every node's and client's certificate
    #[arg(long, requires_all = ["tls_cert", "tls_key"], conflicts_with = "insecure_plaintext")]
    tls_ca: Option<PathBuf>,
    /// PEM file of this process's certificate (chain); a node's must name
    /// the host part of its --listen address (IP or DNS SAN)
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// PEM file of this process's private key
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// run without TLS: anyone who reaches the port can read and write
    /// (local development and tests only)
    #[arg(long)]
    insecure_plaintext: bool,
}

impl TlsArgs {
    /// `Some` with TLS, `None` for an explicit --insecure-plaintext.
    fn load(&self) -> Result<Option<TlsConfig>, Box<dyn std::error::Error>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsConfig::from_files(ca, cert, key)?)),
            _ if self.insecure_plaintext => Ok(None),
            _ => Err("TLS is required: give --tls-ca, --tls-cert and --tls-key (or --insecure-plaintext for local development)".into()),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let mut cfg = Config::new(args.listen.clone(), args.data_dir);
    cfg.fsync = args.fsync;
    cfg.memtable_bytes = args.memtable_mib.saturating_mul(1 << 20);
    cfg.seeds = args.seeds.into_iter().filter(|s| !s.is_empty()).collect();
    cfg.n = args.n;
    cfg.r = args.r;
    cfg.w = args.w;
    cfg.partitions = args.partitions;
    cfg.request_timeout = Duration::from_millis(args.request_timeout_ms);
    cfg.anti_entropy_interval = Duration::from_millis(args.anti_entropy_ms);

    let tls = args.tls.load()?;
    let transport: Arc<dyn nimbus_state_store::rpc::Transport> = match (args.transport.as_str(), &tls) {
        ("http", None) => Arc::new(HttpTransport::new()),
        ("http", Some(t)) => Arc::new(HttpTransport::with_tls(t)),
        ("tcp", None) => Arc::new(TcpTransport::new()),
        ("tcp", Some(t)) => Arc::new(TcpTransport::with_tls(t.clone())),
        (other, _) => return Err(format!("unknown transport {other}").into()),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let node = Node::start(cfg, transport).await?;
    let server = match tls {
        Some(t) => tcp::serve_tls(node.clone(), listener, t),
        None => {
            tracing::warn!("serving in plaintext (--insecure-plaintext): anyone who reaches the port can read and write");
            tcp::serve(node.clone(), listener)
        }
    };
    if let Err(e) = node.join().await {
        node.shutdown();
        server.abort();
        return Err(format!("join refused: {e}").into());
    }
    println!("store-node listening on {}", args.listen);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if args.leave_on_exit {
        match node.leave().await {
            Ok(r) => tracing::info!(keys = r.keys_handed_off, hints = r.hints_handed_off, "left the cluster"),
            Err(e) => tracing::error!(error = %e, "leave failed"),
        }
    }
    node.shutdown();
    server.abort();
    Ok(())
}
