//! The control plane's side of the state store: the cluster CA
//! ([`crate::auth::ca`]), the control plane's own store node (mutual TLS
//! with a certificate of that CA), and the handle the outbox relay
//! ([`crate::service::outbox`]) and the readers of console output and
//! status checks use.
//!
//! The node is a full member of the ring (it holds replicas like every
//! host's node); hosts learn its address at registration
//! (`POST /v1/agent/certificate`) and join through it.

use crate::auth::ca::{Ca, CaError};
use crate::auth::secrets::MasterKey;
use crate::config::Config;
use nimbus_state_store::{tcp, LocalClient, Node, TcpTransport, TlsConfig};
use sqlx::PgPool;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreSetupError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("the CA in the database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("state store node: {0}")]
    Node(#[from] nimbus_state_store::StoreError),
    #[error("state store TLS: {0}")]
    Tls(#[from] nimbus_state_store::TlsError),
    #[error("state store listener {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("{path}: {source}")]
    Write { path: std::path::PathBuf, source: std::io::Error },
}

/// The CA, the control plane's store node and its TLS identity.
pub struct Store {
    pub ca: Ca,
    /// The node's id: `ip:port` of its listener.
    pub address: String,
    pub node: Arc<Node>,
    /// The control plane's TLS identity (CA, own certificate and key): its
    /// node's, and its client side towards other nodes.
    pub tls: TlsConfig,
    /// The control plane's own certificate and key (PEM): its store node's
    /// and its TLS listener's (`api/tls.rs`).
    own: crate::auth::ca::OwnCertificate,
    server: tokio::task::JoinHandle<()>,
    /// The outbox relay's task, once started ([`Store::start_relay`]).
    relay: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The control plane's document key: signs instance documents and the
    /// revocation list (see `nimbus-records`).
    pub doc_key: nimbus_records::KeyPair,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("address", &self.address).finish_non_exhaustive()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Store {
    /// Loads (or makes, the first time) the CA, certifies the control
    /// plane's own key, and starts its store node.
    pub async fn start(db: &PgPool, config: &Config) -> Result<Store, StoreSetupError> {
        let master = match config.master_key.as_deref().map(MasterKey::from_hex) {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => return Err(CaError::Sealed(e).into()),
            None => None,
        };
        let ca = load_ca(db, master.as_ref()).await?;
        let doc_key = load_doc_key(db, master.as_ref()).await?;
        if let Some(path) = &config.ca_cert_out {
            std::fs::write(path, ca.cert_pem()).map_err(|source| StoreSetupError::Write { path: path.clone(), source })?;
        }
        let listener = tokio::net::TcpListener::bind(config.store_listen)
            .await
            .map_err(|source| StoreSetupError::Listen { addr: config.store_listen, source })?;
        let local = listener.local_addr().map_err(|source| StoreSetupError::Listen { addr: config.store_listen, source })?;
        let address = local.to_string();
        let mut names = vec![local.ip().to_string()];
        names.extend(config.agent_listen.map(|a| a.ip().to_string()));
        names.extend(config.tls_names.iter().cloned());
        names.sort();
        names.dedup();
        let own = ca.issue_own(&names)?;
        let tls = TlsConfig::from_pem(ca.cert_pem().as_bytes(), own.cert_pem.as_bytes(), own.key_pem.as_bytes())?
            .with_admin_name(nimbus_proto::agent::CONTROL_PLANE_NAME)?;
        let mut cfg = nimbus_state_store::Config::new(address.clone(), &config.store_dir);
        // Seeds: the configured ones and the hosts' nodes PostgreSQL knows
        // (a restarted control plane rejoins the ring at once, instead of
        // waiting for a host's gossip to find it).
        let hosts = sqlx::query_scalar!(
            r#"SELECT store_address AS "store_address!" FROM hosts WHERE store_address IS NOT NULL ORDER BY last_heartbeat DESC NULLS LAST LIMIT 16"#,
        )
        .fetch_all(db)
        .await?;
        let mut seeds: Vec<String> = config.store_seeds.clone();
        seeds.extend(hosts);
        seeds.retain(|s| *s != address);
        seeds.sort();
        seeds.dedup();
        cfg.seeds = seeds;
        let node = Node::start(cfg, Arc::new(TcpTransport::with_tls(tls.clone()))).await?;
        let server = tcp::serve_tls(node.clone(), listener, tls.clone());
        if !node.config().seeds.is_empty() {
            let joining = node.clone();
            tokio::spawn(async move {
                if let Err(e) = joining.join().await {
                    tracing::error!(error = %e, "the control plane's store node was refused by the ring");
                }
            });
        }
        tracing::info!(%address, "state store node started");
        Ok(Store { ca, address, node, tls, own, server, relay: Default::default(), doc_key })
    }

    /// The control plane's certificate and key, PEM.
    pub fn own_certificate(&self) -> (&str, &str) {
        (&self.own.cert_pem, &self.own.key_pem)
    }

    /// The document keys readers trust (the one this control plane signs with).
    pub fn trusted_keys(&self) -> nimbus_records::TrustedKeys {
        nimbus_records::TrustedKeys::from_points([self.doc_key.public().as_slice()])
    }

    /// A client of the ring through this node (quorum reads and writes).
    pub fn client(&self) -> LocalClient {
        LocalClient(self.node.clone())
    }

    /// Stops the node's loops and its listener (tests: a control plane
    /// that "crashes" gives its port back).
    pub fn stop(&self) {
        if let Some(relay) = self.relay.lock().unwrap_or_else(|p| p.into_inner()).take() {
            relay.abort();
        }
        self.node.shutdown();
        self.server.abort();
    }

    /// Runs `relay` until the store stops.
    pub fn start_relay(&self, relay: crate::service::outbox::Relay) {
        let task = tokio::spawn(relay.run());
        if let Some(old) = self.relay.lock().unwrap_or_else(|p| p.into_inner()).replace(task) {
            old.abort();
        }
    }
}

/// The control plane's document key: the stored one, or a new one stored
/// now (the first of two control planes starting at once wins; both use
/// it). Without a master key it lives in this process only, like the CA.
async fn load_doc_key(db: &PgPool, master: Option<&MasterKey>) -> Result<nimbus_records::KeyPair, StoreSetupError> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    const AAD: &str = "nimbus-document-key";
    let Some(master) = master else { return Ok(nimbus_records::KeyPair::generate()) };
    // (The same query twice: a macro takes its SQL as a literal.)
    if let Some(sealed) =
        sqlx::query_scalar!(r#"SELECT doc_key_sealed AS "doc_key_sealed!" FROM cluster_ca WHERE doc_key_sealed IS NOT NULL"#)
            .fetch_optional(db)
            .await?
    {
        return open_doc_key(master, &sealed);
    }
    let key = nimbus_records::KeyPair::generate();
    let der = key.to_der().map_err(|e| CaError::Generate(e.to_string()))?;
    let sealed = crate::auth::secrets::seal(master, AAD, &b64.encode(der)).map_err(CaError::Sealed)?;
    sqlx::query!("UPDATE cluster_ca SET doc_key_sealed = $1, doc_key_public = $2 WHERE doc_key_sealed IS NULL", sealed, key.public())
        .execute(db)
        .await?;
    let sealed = sqlx::query_scalar!(r#"SELECT doc_key_sealed AS "doc_key_sealed!" FROM cluster_ca WHERE doc_key_sealed IS NOT NULL"#)
        .fetch_one(db)
        .await?;
    tracing::info!("document key ready");
    return open_doc_key(master, &sealed);

    fn open_doc_key(master: &MasterKey, sealed: &[u8]) -> Result<nimbus_records::KeyPair, StoreSetupError> {
        let der = crate::auth::secrets::open(master, AAD, sealed).map_err(CaError::Sealed)?;
        let der = base64::engine::general_purpose::STANDARD.decode(der).map_err(|e| CaError::Generate(format!("document key: {e}")))?;
        Ok(nimbus_records::KeyPair::from_der(&der).map_err(|e| CaError::Generate(e.to_string()))?)
    }
}

/// The cluster's CA: the stored one, or a new one stored now (of two
/// control planes starting at once, the first insert wins and both use it).
/// Without a master key the CA cannot be kept sealed: it lives in this
/// process only, and hosts must fetch new certificates when it restarts.
async fn load_ca(db: &PgPool, master: Option<&MasterKey>) -> Result<Ca, StoreSetupError> {
    let Some(master) = master else {
        tracing::warn!("no master key: the CA is kept in memory only (hosts need new certificates after a restart)");
        return Ok(Ca::generate()?);
    };
    // (The same query twice: a macro takes its SQL as a literal.)
    if let Some(r) = sqlx::query!("SELECT common_name, cert_pem, key_sealed FROM cluster_ca").fetch_optional(db).await? {
        return Ok(Ca::open(master, &r.common_name, &r.cert_pem, &r.key_sealed)?);
    }
    let (name, cert, sealed) = Ca::generate()?.sealed(master)?;
    sqlx::query!(
        "INSERT INTO cluster_ca (common_name, cert_pem, key_sealed) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        name,
        cert,
        sealed
    )
    .execute(db)
    .await?;
    let r = sqlx::query!("SELECT common_name, cert_pem, key_sealed FROM cluster_ca").fetch_one(db).await?;
    let (name, cert, sealed) = (r.common_name, r.cert_pem, r.key_sealed);
    tracing::info!(ca = %name, "cluster CA ready");
    Ok(Ca::open(master, &name, &cert, &sealed)?)
}
