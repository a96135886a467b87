//! The Nimbus control plane: REST API, scheduler and host registry, backed by
//! PostgreSQL. See ARCHITECTURE.md at the repository root for the map.

pub mod api;
pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod ids;
pub mod image_store;
pub mod jobs;
pub mod notify;
pub mod service;
pub mod store;

pub use config::{Config, PlacementPolicy};
pub use error::ServiceError;
pub use service::Service;

use tokio::net::TcpListener;

/// Connects to PostgreSQL, applies migrations and starts the notification
/// listener, starts the control plane's state-store node: a service ready
/// to be served.
pub async fn build(config: Config) -> anyhow::Result<Service> {
    let db = db::connect(&config.database_url, config.db_connections).await?;
    let events = notify::HostEvents::default();
    events.spawn_listener(db.clone());
    let store = std::sync::Arc::new(store::Store::start(&db, &config).await?);
    let service = Service::new(db, config, events, store);
    // Private images are tenants' data: the store is the control plane's alone.
    service.image_store.close_to_others().await.map_err(|e| anyhow::anyhow!("cannot close the image store to other users: {e}"))?;
    // No upload runs yet: leftovers of uploads a crash cut short, and files
    // no image refers to, go.
    if let Err(e) = service.sweep_image_store(true).await {
        tracing::warn!(error = %e, "cannot sweep the image store");
    }
    if service.config.outbox_relay {
        service.store.start_relay(service.relay());
    }
    service.start_network_relay();
    service.start_revocation();
    service.start_retention();
    Ok(service)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    service: Service,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, api::router(service)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
