use clap::Parser;
use nimbus_host_agent::{Agent, AgentConfig};

/// jemalloc, as in store-node and store-bench: this process embeds a
/// state-store node, which allocates per message (glibc malloc cost it
/// about a quarter of its throughput in store-bench), so what is benchmarked
/// is what runs.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let config = AgentConfig::parse();
    let agent = Agent::new(config).await?;
    agent
        .run(async {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    Ok(())
}
