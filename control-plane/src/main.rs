use clap::Parser;
use nimbus_control_plane::{build, serve, Config};

/// jemalloc, as in store-node and store-bench: this process embeds a
/// state-store node, which allocates per message (glibc malloc cost it
/// about a quarter of its throughput in store-bench), so what is benchmarked
/// is what runs.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()))
        .init();
    let config = Config::parse();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, placement = ?config.placement, "control plane starting");
    let agents = match config.agent_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
        None => None,
    };
    let service = build(config).await?;
    if let Some(listener) = agents {
        tracing::info!(listen = %listener.local_addr()?, "TLS listener for agents");
        let tls = service.clone();
        tokio::spawn(async move {
            if let Err(e) = nimbus_control_plane::api::tls::serve(tls, listener, std::future::pending()).await {
                tracing::error!(error = %e, "the TLS listener failed");
            }
        });
    }
    serve(service, listener, async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    })
    .await
}
