//! Standalone state-store node, and operator commands against a node.
//!
//! `store-node --listen 127.0.0.1:7001 --data-dir /var/lib/nimbus/store --seeds 127.0.0.1:7002,127.0.0.1:7003 --tls-ca ca.pem --tls-cert node.crt --tls-key node.key`
//! The listen address is also the node's id. SIGTERM or ctrl-c stops the
//! node (it keeps its partitions, as after a crash); with `--leave-on-exit`
//! it first leaves the ring and hands its data over.
//!
//! `store-node get|put|delete|anti-entropy --node ADDR ...` talk to a
//! running node through its JSON endpoints and print JSON.

use clap::{Parser, Subcommand};
use nimbus_state_store::json::{JsonDeleteRequest, JsonGetRequest, JsonPutRequest};
use nimbus_state_store::JsonClient;
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
#[command(about = "Nimbus Dynamo-style state-store node", args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// host:port to listen on; also this node's id
    #[arg(long, required = true)]
    listen: Option<String>,
    /// directory of this node's store (created if missing; the database
    /// lives in DATA_DIR/store)
    #[arg(long, required = true)]
    data_dir: Option<PathBuf>,
    /// comma-separated addresses (host:port) of nodes to join through;
    /// they are taken as ring members from the start
    #[arg(long, value_delimiter = ',', default_value = "")]
    seeds: Vec<String>,
    /// N: replicas of each key. Part of the ring: every node of a cluster
    /// must have the same (a node that differs is refused at its join)
    #[arg(long, default_value_t = 3)]
    n: usize,
    /// R: replies a read waits for (1..=N); this node's reads only
    #[arg(long, default_value_t = 2)]
    r: usize,
    /// W: acknowledgements a write waits for (1..=N); this node's writes only
    #[arg(long, default_value_t = 2)]
    w: usize,
    /// number of partitions of the hash ring, fixed for the life of the
    /// cluster; every node must have the same
    #[arg(long, default_value_t = 256)]
    partitions: u32,
    /// timeout of one node-to-node request, milliseconds (a forwarded
    /// write waits three times as long)
    #[arg(long, default_value_t = 500)]
    request_timeout_ms: u64,
    /// period of the anti-entropy rounds (Merkle exchange with every other
    /// replica of each partition), milliseconds
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

/// How an operator command reaches its node.
#[derive(clap::Args, Debug, Clone)]
struct Target {
    /// the node to ask, host:port
    #[arg(long)]
    node: String,
    /// give up after this many seconds
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    #[command(flatten)]
    tls: TlsArgs,
}

/// A key on the command line.
#[derive(clap::Args, Debug, Clone)]
struct KeyArg {
    /// the key (UTF-8; base64 with --key-base64)
    key: String,
    /// KEY is base64 (for binary keys)
    #[arg(long)]
    key_base64: bool,
}

impl KeyArg {
    fn split(&self) -> (Option<String>, Option<String>) {
        if self.key_base64 {
            (None, Some(self.key.clone()))
        } else {
            (Some(self.key.clone()), None)
        }
    }
}

/// Causal context of a write.
#[derive(clap::Args, Debug, Clone)]
struct ContextArg {
    /// supersede exactly the versions this context (from a get) describes;
    /// without it the command reads the key first and supersedes every
    /// version it sees
    #[arg(long, conflicts_with = "blind")]
    context: Option<String>,
    /// write with an empty context: the new version is a sibling of
    /// whatever is stored
    #[arg(long)]
    blind: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Read a key: prints {"values": [{"value"|"value_base64"}...], "deleted", "context"}
    Get {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Write a key: prints {"context"} of the new version
    Put {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        key: KeyArg,
        /// the value (UTF-8; base64 with --value-base64)
        #[arg(required_unless_present = "value_file", conflicts_with = "value_file")]
        value: Option<String>,
        /// VALUE is base64 (for binary values)
        #[arg(long)]
        value_base64: bool,
        /// read the value from this file ('-': standard input), bytes as they are
        #[arg(long)]
        value_file: Option<PathBuf>,
        #[command(flatten)]
        context: ContextArg,
    },
    /// Delete a key (writes a tombstone): prints {"context"}
    Delete {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        key: KeyArg,
        #[command(flatten)]
        context: ContextArg,
    },
    /// Run one full anti-entropy round on the node now; prints its report
    AntiEntropy {
        #[command(flatten)]
        target: Target,
    },
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
    // colour only when the log goes to a terminal (and NO_COLOR is unset)
    use std::io::IsTerminal;
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(ansi)
        .init();
    let args = parse_args();
    if let Some(cmd) = args.command {
        return match operate(cmd).await {
            Ok(json) => {
                println!("{json}");
                Ok(())
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        };
    }
    let (Some(listen), Some(data_dir)) = (args.listen, args.data_dir) else {
        return Err("--listen and --data-dir are required".into());
    };
    let mut cfg = Config::new(listen.clone(), data_dir);
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
    if let Some(t) = &tls {
        // peers check our certificate against our id: fail here if they would
        t.check_node(&listen)?;
    }
    let transport: Arc<dyn nimbus_state_store::rpc::Transport> = match (args.transport.as_str(), &tls) {
        ("http", None) => Arc::new(HttpTransport::new()),
        ("http", Some(t)) => Arc::new(HttpTransport::with_tls(t)),
        ("tcp", None) => Arc::new(TcpTransport::new()),
        ("tcp", Some(t)) => Arc::new(TcpTransport::with_tls(t.clone())),
        (other, _) => return Err(format!("unknown transport {other}").into()),
    };
    let listener = tokio::net::TcpListener::bind(&listen).await?;
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
    println!("store-node listening on {listen}");
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

/// The intervals a node runs with that have no flag (from `Config::new`).
fn fixed_intervals() -> String {
    let c = Config::new("", "");
    let ms = |d: Duration| d.as_millis();
    format!(
        "Fixed intervals (no flags):\n  \
         gossip: one push-pull exchange with a random peer every {} ms\n  \
         failure detection: a peer is down after {} ms without a newer heartbeat, or at once after a failed request until its next heartbeat\n  \
         hint delivery: every {} ms, to owners that are alive\n  \
         reads: one more replica is asked after {} ms without R replies; {:.0}% of reads ask every replica and repair them all\n  \
         tombstones: collected {} h after the delete, once every replica holds them, by a scan every {} min\n\n\
         Logs go to standard output, filtered by RUST_LOG (default info), coloured only on a terminal (NO_COLOR turns colour off).\n\
         Endpoints on the listen port: GET /healthz, GET /readyz (no client certificate needed), GET /metrics (Prometheus), POST /v1/json/get|put|delete, GET /admin, POST /admin/anti-entropy|leave|remove.",
        ms(c.gossip_interval),
        ms(c.fail_timeout),
        ms(c.hint_interval),
        ms(c.read_hedge),
        c.read_repair_chance * 100.0,
        c.tombstone_grace.as_secs() / 3600,
        c.gc_interval.as_secs() / 60,
    )
}

fn parse_args() -> Args {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Args::command().after_help(fixed_intervals()).get_matches();
    Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Run an operator command; its JSON answer.
async fn operate(cmd: Command) -> Result<String, Box<dyn std::error::Error>> {
    let client = |t: &Target| -> Result<JsonClient, Box<dyn std::error::Error>> {
        Ok(JsonClient::new(&t.node, t.tls.load()?.as_ref(), Duration::from_secs(t.timeout_secs)))
    };
    // the context to write with: given, empty, or that of a read now
    async fn context_of(c: &JsonClient, key: &KeyArg, ctx: &ContextArg) -> Result<Option<String>, Box<dyn std::error::Error>> {
        if ctx.blind {
            return Ok(None);
        }
        if let Some(given) = &ctx.context {
            return Ok(Some(given.clone()));
        }
        let (key, key_base64) = key.split();
        Ok(Some(c.get(&JsonGetRequest { key, key_base64 }).await?.context))
    }
    Ok(match cmd {
        Command::Get { target, key } => {
            let (key, key_base64) = key.split();
            serde_json::to_string_pretty(&client(&target)?.get(&JsonGetRequest { key, key_base64 }).await?)?
        }
        Command::Put { target, key: k, value, value_base64, value_file, context } => {
            let c = client(&target)?;
            let (text, b64) = match (value, value_file) {
                (Some(v), _) if value_base64 => (None, Some(v)),
                (Some(v), _) => (Some(v), None),
                (None, Some(path)) => {
                    let bytes = if path.as_os_str() == "-" {
                        let mut b = Vec::new();
                        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
                        b
                    } else {
                        std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
                    };
                    use base64::Engine as _;
                    (None, Some(base64::engine::general_purpose::STANDARD.encode(bytes)))
                }
                (None, None) => return Err("a VALUE or --value-file is required".into()),
            };
            let ctx = context_of(&c, &k, &context).await?;
            let (key, key_base64) = k.split();
            let req = JsonPutRequest { key, key_base64, value: text, value_base64: b64, context: ctx };
            serde_json::to_string_pretty(&c.put(&req).await?)?
        }
        Command::Delete { target, key: k, context } => {
            let c = client(&target)?;
            let ctx = context_of(&c, &k, &context).await?;
            let (key, key_base64) = k.split();
            serde_json::to_string_pretty(&c.delete(&JsonDeleteRequest { key, key_base64, context: ctx }).await?)?
        }
        Command::AntiEntropy { target } => serde_json::to_string_pretty(&client(&target)?.anti_entropy().await?)?,
    })
}
