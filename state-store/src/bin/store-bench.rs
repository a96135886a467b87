//! Load benchmark: 3 nodes on loopback (N=3, R=2, W=2, on-disk; fsync
//! policy `--fsync`, default as `store-node`), 64 concurrent clients over
//! the framed TCP protocol (`--client http` for HTTP), 50/50 get/put of 1 KiB
//! values for a fixed duration; then, if `redis-server` is on PATH, the
//! same load against one Redis (no persistence; `--redis-aof`: its
//! append-only file fsynced every second) and the throughput ratio.
//!
//! With `--tls` every connection (node to node, client to node) is mutual
//! TLS with certificates from a throwaway CA made in-process.
//!
//! `cargo run --release -p nimbus-state-store --bin store-bench -- --duration-secs 10 [--tls --redis-aof]`

use clap::Parser;
use hdrhistogram::Histogram;
use nimbus_state_store::tls::dev::DevCa;
use nimbus_state_store::{tcp, Config, Context, Fsync, HttpClient, HttpTransport, KvClient, Node, TcpClient, TcpTransport, TlsConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// jemalloc: the store allocates per message; under store-bench glibc
/// malloc cost ~14% of the CPU and mimalloc stalled every thread for
/// milliseconds at a time (fresh huge pages), jemalloc neither.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// measured duration per system, seconds
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// skip the Redis comparison
    #[arg(long)]
    no_redis: bool,
    /// node-to-node transport: `tcp` (framed binary) or `http`
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// client protocol: `tcp` (`TcpClient`, framed binary) or `http` (`HttpClient`)
    #[arg(long, default_value = "tcp")]
    client: String,
    /// the nodes' fsync policy: `always` (fdatasync before each ack) or a
    /// periodic interval such as `100ms` (the default, as `store-node`)
    #[arg(long, default_value = "100ms")]
    fsync: Fsync,
    /// size at which each node's data memtable is flushed, MiB (as
    /// `store-node --memtable-mib`)
    #[arg(long, default_value_t = nimbus_state_store::storage::DEFAULT_MEMTABLE_BYTES >> 20)]
    memtable_mib: u64,
    /// run Redis with its append-only file fsynced every second
    /// (`appendfsync everysec`, the Redis setting closest to the nodes'
    /// periodic fsync) instead of without persistence: a durable baseline
    #[arg(long)]
    redis_aof: bool,
    /// mutual TLS on every connection, with a throwaway CA and certificates
    /// made in-process
    #[arg(long)]
    tls: bool,
}

/// Operations of at least this many microseconds are counted per window.
const SLOW_US: u64 = 5_000;
/// Window of the slow-operation timeline, milliseconds.
const WINDOW_MS: u128 = 100;

struct Stats {
    get: Histogram<u64>,
    put: Histogram<u64>,
    errors: u64,
    /// per `WINDOW_MS` window (by start time): operations >= `SLOW_US`
    slow: Vec<u64>,
}

impl Stats {
    fn new() -> Stats {
        let h =
            || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
        Stats { get: h(), put: h(), errors: 0, slow: Vec::new() }
    }
    fn add(&mut self, o: &Stats) {
        let _ = self.get.add(&o.get);
        let _ = self.put.add(&o.put);
        self.errors += o.errors;
        if self.slow.len() < o.slow.len() {
            self.slow.resize(o.slow.len(), 0);
        }
        for (a, b) in self.slow.iter_mut().zip(&o.slow) {
            *a += b;
        }
    }

    fn record(&mut self, put: bool, started: Instant, since: Instant) {
        let us = started.elapsed().as_micros() as u64;
        let _ = if put { self.put.record(us) } else { self.get.record(us) };
        if us >= SLOW_US {
            let w = (started.duration_since(since).as_millis() / WINDOW_MS) as usize;
            if self.slow.len() <= w {
                self.slow.resize(w + 1, 0);
            }
            self.slow[w] += 1;
        }
    }

    /// Where the operations slower than `SLOW_US` happened: how many, in
    /// how many windows, and the worst windows.
    fn print_slow(&self) {
        let total: u64 = self.slow.iter().sum();
        let windows = self.slow.iter().filter(|n| **n > 0).count();
        let mut worst: Vec<(usize, u64)> = self.slow.iter().copied().enumerate().filter(|(_, n)| *n > 0).collect();
        worst.sort_by_key(|w| std::cmp::Reverse(w.1));
        let top: u64 = worst.iter().take(5).map(|(_, n)| n).sum();
        let list: Vec<String> = worst.iter().take(5).map(|(w, n)| format!("{:.1}s:{n}", *w as f64 * WINDOW_MS as f64 / 1000.0)).collect();
        println!(
            "  ops >= {} ms: {total} ({:.3}%) in {windows} of {} {WINDOW_MS}-ms windows; the worst 5 windows hold {top}: {}",
            SLOW_US / 1000,
            100.0 * total as f64 / self.ops().max(1) as f64,
            self.slow.len(),
            list.join(" ")
        );
    }
    fn ops(&self) -> u64 {
        self.get.len() + self.put.len()
    }
    fn print(&self, name: &str, secs: f64) {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!("{name}: {:.0} ops/s ({} ops, {} errors in {secs:.1} s)", self.ops() as f64 / secs, self.ops(), self.errors);
        for (op, h) in [("get", &self.get), ("put", &self.put)] {
            println!(
                "  {op}: {:>8.0} ops/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
                h.len() as f64 / secs,
                ms(h, 0.5),
                ms(h, 0.99),
                ms(h, 0.999),
                h.max() as f64 / 1000.0
            );
        }
        self.print_slow();
    }
}

fn make_client(kind: &str, addr: &str, tls: Option<&TlsConfig>) -> Box<dyn KvClient> {
    let t = Duration::from_secs(5);
    match (kind, tls) {
        ("http", None) => Box::new(HttpClient::with_timeout(addr, t)),
        ("http", Some(tls)) => Box::new(HttpClient::with_tls(addr, t, tls)),
        (_, None) => Box::new(TcpClient::new(addr, t)),
        (_, Some(tls)) => Box::new(TcpClient::with_tls(addr, t, tls.clone())),
    }
}

async fn run_store(args: &Args, dir: &std::path::Path) -> Result<(Stats, f64), Box<dyn std::error::Error>> {
    let addrs: Vec<String> = (0..3).map(|_| nimbus_state_store::local::free_addr()).collect::<Result<_, _>>()?;
    let ca = if args.tls { Some(DevCa::new("store-bench CA")?) } else { None };
    let client_tls = ca.as_ref().map(|ca| ca.tls_config(&["store-bench-client"])).transpose()?;
    let mut nodes = Vec::new();
    let mut servers = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let mut cfg = Config::new(a.clone(), dir.join(format!("n{i}")));
        cfg.fsync = args.fsync;
        cfg.memtable_bytes = args.memtable_mib.saturating_mul(1 << 20);
        cfg.seeds = addrs.clone();
        let listener = tokio::net::TcpListener::bind(a).await?;
        let tls = ca.as_ref().map(|ca| ca.tls_config(&["127.0.0.1"])).transpose()?;
        let transport: Arc<dyn nimbus_state_store::rpc::Transport> = match (args.transport.as_str(), &tls) {
            ("http", None) => Arc::new(HttpTransport::new()),
            ("http", Some(t)) => Arc::new(HttpTransport::with_tls(t)),
            (_, None) => Arc::new(TcpTransport::new()),
            (_, Some(t)) => Arc::new(TcpTransport::with_tls(t.clone())),
        };
        let node = Node::start(cfg, transport).await?;
        servers.push(match tls {
            Some(t) => tcp::serve_tls(node.clone(), listener, t),
            None => tcp::serve(node.clone(), listener),
        });
        nodes.push(node);
    }
    for n in &nodes {
        n.join().await?;
    }
    let value = vec![b'x'; args.value_size];
    // preload every key once so gets return a value
    let preload: Vec<_> = (0..args.clients)
        .map(|c| {
            let client = make_client(&args.client, &addrs[c % 3], client_tls.as_ref());
            let (value, clients, keys) = (value.clone(), args.clients, args.keys);
            tokio::spawn(async move {
                let mut ctxs = HashMap::new();
                for k in (c..keys).step_by(clients) {
                    if let Ok(ctx) = client.put(format!("bench/{k}").as_bytes(), value.clone(), &Context::empty()).await {
                        ctxs.insert(k, ctx);
                    }
                }
                ctxs
            })
        })
        .collect();
    let mut ctx_maps = Vec::new();
    for p in preload {
        ctx_maps.push(p.await?);
    }
    let deadline = Instant::now() + Duration::from_secs(args.duration_secs);
    let start = Instant::now();
    let tasks: Vec<_> = ctx_maps
        .into_iter()
        .enumerate()
        .map(|(c, mut ctxs)| {
            let client = make_client(&args.client, &addrs[c % 3], client_tls.as_ref());
            let (value, clients, keys) = (value.clone(), args.clients, args.keys);
            tokio::spawn(async move {
                // each client owns the keys k ≡ c (mod clients) and chains
                // its writes with the context returned by put, so values
                // never pile up as siblings
                let mut rng = StdRng::seed_from_u64(c as u64);
                let mine: Vec<usize> = (c..keys).step_by(clients).collect();
                let mut st = Stats::new();
                while Instant::now() < deadline && !mine.is_empty() {
                    let k = mine[rng.gen_range(0..mine.len())];
                    let key = format!("bench/{k}");
                    let t = Instant::now();
                    if rng.gen_bool(0.5) {
                        match client.get(key.as_bytes()).await {
                            Ok(_) => st.record(false, t, start),
                            Err(_) => st.errors += 1,
                        }
                    } else {
                        let ctx = ctxs.get(&k).cloned().unwrap_or_default();
                        match client.put(key.as_bytes(), value.clone(), &ctx).await {
                            Ok(new) => {
                                st.record(true, t, start);
                                ctxs.insert(k, new);
                            }
                            Err(_) => st.errors += 1,
                        }
                    }
                }
                st
            })
        })
        .collect();
    let mut total = Stats::new();
    for t in tasks {
        total.add(&t.await?);
    }
    let secs = start.elapsed().as_secs_f64();
    for n in &nodes {
        let w = n.storage().writer_stats();
        println!(
            "  node {}: {} group commits, {:.1} writes/commit, {:.2} ms/commit, of which {:.2} ms in commit (journal append{}), {} commits >= {} ms, longest {:.1} ms; {} periodic fdatasyncs, {:.2} ms each; {} flushed memtables freed off-lock",
            n.id(),
            w.commits,
            w.writes as f64 / w.commits.max(1) as f64,
            w.busy_us as f64 / w.commits.max(1) as f64 / 1000.0,
            w.commit_us as f64 / w.commits.max(1) as f64 / 1000.0,
            if args.fsync == Fsync::Always { " + fdatasync" } else { "" },
            w.slow_commits,
            nimbus_state_store::storage::SLOW_COMMIT_US / 1000,
            w.commit_max_us as f64 / 1000.0,
            w.syncs,
            w.sync_us as f64 / w.syncs.max(1) as f64 / 1000.0,
            w.memtables_freed
        );
        n.shutdown();
    }
    for s in servers {
        s.abort();
    }
    Ok((total, secs))
}

async fn run_redis(args: &Args) -> Result<Option<(Stats, f64)>, Box<dyn std::error::Error>> {
    let Some(bin) = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("redis-server")).find(|f| f.is_file()))
    else {
        println!("redis-server not on PATH: skipping the Redis comparison");
        return Ok(None);
    };
    let port = nimbus_state_store::local::free_port()?.to_string();
    let dir = std::env::temp_dir().join(format!("store-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let persistence: &[&str] = if args.redis_aof { &["--appendonly", "yes", "--appendfsync", "everysec"] } else { &["--appendonly", "no"] };
    let mut child = tokio::process::Command::new(bin)
        .args(["--port", &port, "--save", "", "--bind", "127.0.0.1"])
        .args(persistence)
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let res = drive_redis(args, &port).await;
    // killed and reaped before its directory goes
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    res
}

async fn drive_redis(args: &Args, port: &str) -> Result<Option<(Stats, f64)>, Box<dyn std::error::Error>> {
    let url = format!("redis://127.0.0.1:{port}/");
    let client = redis::Client::open(url)?;
    let ready = Instant::now();
    loop {
        if client.get_multiplexed_async_connection().await.is_ok() {
            break;
        }
        if ready.elapsed() > Duration::from_secs(10) {
            return Err("redis did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let value = vec![b'x'; args.value_size];
    {
        let mut con = client.get_multiplexed_async_connection().await?;
        for k in 0..args.keys {
            let _: () = redis::cmd("SET").arg(format!("bench/{k}")).arg(&value).query_async(&mut con).await?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(args.duration_secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut con = client.get_multiplexed_async_connection().await?;
        let (value, keys) = (value.clone(), args.keys);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(c as u64);
            let mut st = Stats::new();
            while Instant::now() < deadline {
                let key = format!("bench/{}", rng.gen_range(0..keys));
                let t = Instant::now();
                if rng.gen_bool(0.5) {
                    let r: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("GET").arg(&key).query_async(&mut con).await;
                    match r {
                        Ok(_) => st.record(false, t, start),
                        Err(_) => st.errors += 1,
                    }
                } else {
                    let r: redis::RedisResult<()> = redis::cmd("SET").arg(&key).arg(&value).query_async(&mut con).await;
                    match r {
                        Ok(_) => st.record(true, t, start),
                        Err(_) => st.errors += 1,
                    }
                }
            }
            st
        }));
    }
    let mut total = Stats::new();
    for t in tasks {
        total.add(&t.await?);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Some((total, secs)))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,lsm_tree=error".into()))
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("store-bench-{}", std::process::id()));
    println!(
        "store-bench: 3 nodes N=3 R=2 W=2 on-disk (fsync {:?}, {} MiB memtables, {}), {} clients, 50/50 get/put, {} B values, {} keys, {} s",
        args.fsync,
        args.memtable_mib,
        if args.tls { "mutual TLS" } else { "plaintext" },
        args.clients,
        args.value_size,
        args.keys,
        args.duration_secs
    );
    let res = run_store(&args, &dir).await;
    let (store, secs) = match res {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    store.print("nimbus-state-store", secs);
    let p999 = |h: &Histogram<u64>| h.value_at_quantile(0.999) as f64 / 1000.0;
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "target p99.9 <= 5 ms: get {:.2} ms ({}), put {:.2} ms ({})",
        p999(&store.get),
        verdict(p999(&store.get) <= 5.0),
        p999(&store.put),
        verdict(p999(&store.put) <= 5.0)
    );
    if !args.no_redis {
        if let Some((redis, rsecs)) = run_redis(&args).await? {
            let label = if args.redis_aof {
                "redis (single instance, append-only file fsynced every second)"
            } else {
                "redis (single instance, no persistence)"
            };
            redis.print(label, rsecs);
            let ratio = (store.ops() as f64 / secs) / (redis.ops() as f64 / rsecs).max(1.0);
            println!("throughput ratio store/redis: {ratio:.3} (target >= 0.3: {})", verdict(ratio >= 0.3));
            let (g, p) = (p999(&store.get) / p999(&redis.get).max(0.001), p999(&store.put) / p999(&redis.put).max(0.001));
            println!(
                "p99.9 store/redis: get {g:.2}x, put {p:.2}x (target <= 2x of a durable Redis{}: {})",
                if args.redis_aof { "" } else { "; this Redis is not durable, use --redis-aof" },
                verdict(args.redis_aof && g <= 2.0 && p <= 2.0)
            );
        }
    }
    // removed last: the nodes' databases close once their last in-flight
    // task has let go of them
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
