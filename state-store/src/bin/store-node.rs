//! Standalone state-store node.
//!
//! `store-node --listen 127.0.0.1:7001 --data-dir /var/lib/nimbus/store --seeds 127.0.0.1:7002,127.0.0.1:7003`
//! The listen address is also the node's id. SIGTERM or ctrl-c stops the
//! node (it keeps its partitions, as after a crash); with `--leave-on-exit`
//! it first leaves the ring and hands its data over.

use clap::Parser;
use nimbus_state_store::{Fsync, http, tcp, Config, HttpTransport, Node, TcpTransport};
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

    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let (node, server) = match args.transport.as_str() {
        "http" => {
            let node = Node::start(cfg, Arc::new(HttpTransport::new())).await?;
            (node.clone(), http::serve(node, listener))
        }
        "tcp" => {
            let node = Node::start(cfg, Arc::new(TcpTransport::new())).await?;
            (node.clone(), tcp::serve(node, listener))
        }
        other => return Err(format!("unknown transport {other}").into()),
    };
    node.join().await;
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
