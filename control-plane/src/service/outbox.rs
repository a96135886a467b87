//! The transactional outbox of instance metadata documents, and its relay.
//!
//! Every transaction that changes what an instance's document says bumps
//! `instances.doc_version` and inserts a `metadata_outbox` row, in the same
//! transaction: triggers do it (migration `0009_metadata_store.sql`), so no
//! code path can forget. The relay then, in four steps that each may be
//! cut short by a crash:
//!
//! 1. [`Relay::pending`]: the instances with outbox rows and the highest
//!    version each waits for;
//! 2. [`Relay::render`]: the document as PostgreSQL has it now, labelled with
//!    the instance's current `doc_version` (at least the pending one: the
//!    row lock of the bump orders versions as their transactions commit, so
//!    what is rendered under version V shows every change up to V);
//! 3. [`publish`]: the document sealed for the instance's host and signed
//!    by the control plane's document key ([`nimbus_records::SealedDocument`]:
//!    only that host can read it, and no node can forge it); a quorum read
//!    of the stored document; unless a validly signed one is already as
//!    new, a write of the newer of the two with the read's context (so it
//!    supersedes every sibling it saw); siblings are resolved by
//!    [`nimbus_records::newest_sealed`], which ignores any that does not
//!    verify (a forged version can neither be served nor hold back a
//!    genuine one). A host without a key (never certified) has no document
//!    published: it has no store node to read one from, and its key, when
//!    it comes, bumps every document of its instances;
//! 4. [`Relay::acknowledge`]: delete the rows up to the published version.
//!
//! A crash between any two steps leaves the rows, so the next pass publishes
//! again: the same version is found stored and only acknowledged (nothing
//! applied twice), an older replay never replaces a newer document, and
//! nothing is lost. A store that is down makes a pass fail; the rows wait,
//! and the relay retries with backoff until the backlog drains.

use super::Service;
use crate::error::{Result, ServiceError};
use nimbus_proto::agent::MetadataOptions;
use nimbus_proto::metadata::{document_key, InstanceDocument, ARCHITECTURE};
use nimbus_proto::network::Nic;
use nimbus_records::{newest_sealed, KeyPair, SealedDocument, TrustedKeys};
use nimbus_state_store::{KvClient, StoreError};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

/// Instances published per pass.
const BATCH: i64 = 256;
/// The longest wait between passes when nothing wakes the relay.
const IDLE: Duration = Duration::from_secs(1);

/// What [`publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The document was written.
    Written,
    /// The store already had this version or a newer one.
    AlreadyCurrent,
    /// The instance's host has no key to seal it for: nothing written.
    NoRecipient,
}

/// A document as rendered, with whom it is for.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub doc: InstanceDocument,
    /// The instance's host.
    pub host_id: String,
    /// That host's public key (uncompressed P-256 point), if it has one.
    pub recipient: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox: {0}")]
    Render(#[from] ServiceError),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
}

/// Writes the document, sealed for its host and signed with `signer`,
/// unless the store's validly signed copy is as new (see the module's doc,
/// step 3).
pub async fn publish(
    client: &(impl KvClient + ?Sized),
    rendered: &Rendered,
    signer: &KeyPair,
    trusted: &TrustedKeys,
) -> std::result::Result<Published, StoreError> {
    let doc = &rendered.doc;
    let Some(recipient) = &rendered.recipient else { return Ok(Published::NoRecipient) };
    let key = document_key(&doc.instance_id);
    let got = client.get(key.as_bytes()).await?;
    let stored = newest_sealed(&got.values, trusted, &doc.instance_id);
    let resolved = got.values.len() <= 1;
    let value = match stored {
        Some(s) if s.version >= doc.version && resolved => return Ok(Published::AlreadyCurrent),
        // Siblings (or forgeries), a genuine one newer: write that one over all of them.
        Some(s) if s.version > doc.version => s.encode(),
        _ => SealedDocument::seal(doc, &rendered.host_id, recipient, signer)
            .map_err(|e| StoreError::Transport(format!("sealing a document: {e}")))?
            .encode(),
    };
    client.put(key.as_bytes(), value, &got.context).await?;
    Ok(Published::Written)
}

/// The relay of one control plane (several may run: their writes commute).
#[derive(Clone)]
pub struct Relay {
    db: PgPool,
    region: String,
    client: Arc<dyn KvClient>,
    signer: KeyPair,
    trusted: TrustedKeys,
}

impl Relay {
    pub fn new(db: PgPool, region: String, client: Arc<dyn KvClient>, signer: KeyPair, trusted: TrustedKeys) -> Relay {
        Relay { db, region, client, signer, trusted }
    }

    /// Step 1: instances with outbox rows, with the highest version waiting.
    pub async fn pending(&self) -> std::result::Result<Vec<(String, i64)>, RelayError> {
        let rows = sqlx::query!(
            r#"SELECT instance_id, max(version) AS "version!" FROM metadata_outbox GROUP BY instance_id ORDER BY min(seq) LIMIT $1"#,
            BATCH
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows.into_iter().map(|r| (r.instance_id, r.version)).collect())
    }

    /// Rows still waiting (tests, metrics).
    pub async fn backlog(&self) -> std::result::Result<i64, RelayError> {
        Ok(sqlx::query_scalar!(r#"SELECT count(*) AS "count!" FROM metadata_outbox"#).fetch_one(&self.db).await?)
    }

    /// Step 2: the instance's document as of now, with its host and the
    /// host's key (`None`: no such instance).
    pub async fn render(&self, instance_id: &str) -> std::result::Result<Option<Rendered>, RelayError> {
        let mut tx = self.db.begin().await?;
        // One snapshot for the row, its tags and its interfaces.
        sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        // The four metadata options are four columns (a macro cannot decode
        // the row value `(a, b, c, d)` the runtime query read as a tuple).
        let row = sqlx::query!(
            r#"SELECT i.id, i.account_id, i.reservation_id, i.ami_launch_index, i.image_id, i.instance_type, i.availability_zone,
                    i.launch_time, i.state, i.user_data, i.key_name, i.public_key,
                    i.metadata_tokens_required, i.metadata_endpoint_enabled, i.metadata_tags_enabled, i.metadata_hop_limit, i.doc_version,
                    i.host_id AS "host_id!", h.public_key AS recipient
             FROM instances i JOIN hosts h ON h.id = i.host_id WHERE i.id = $1"#,
            instance_id
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (id, account_id, reservation_id, launch_index, image_id, instance_type, zone, launch_time, state) = (
            row.id,
            row.account_id,
            row.reservation_id,
            row.ami_launch_index,
            row.image_id,
            row.instance_type,
            row.availability_zone,
            row.launch_time,
            row.state,
        );
        let (user_data, key_name, public_key, version, host_id, recipient) =
            (row.user_data, row.key_name, row.public_key, row.doc_version, row.host_id, row.recipient);
        let opts = (row.metadata_tokens_required, row.metadata_endpoint_enabled, row.metadata_tags_enabled, row.metadata_hop_limit);
        let tags: Vec<(String, String)> =
            sqlx::query!("SELECT key, value FROM tags WHERE account_id = $1 AND resource_id = $2 ORDER BY key", account_id, id)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|t| (t.key, t.value))
                .collect();
        let nics = instance_nics(&mut tx, &id).await?;
        tx.commit().await?;
        // A terminated instance's document keeps what describes it, not its
        // secrets: no guest will read them again, and replicas keep documents.
        let (user_data, key_name, public_key) = if state == "terminated" { (None, None, None) } else { (user_data, key_name, public_key) };
        use base64::Engine;
        let doc = InstanceDocument {
            version: version as u64,
            instance_id: id,
            account_id,
            reservation_id,
            ami_launch_index: launch_index as u32,
            image_id,
            instance_type,
            region: self.region.clone(),
            availability_zone: zone,
            architecture: ARCHITECTURE.into(),
            launch_time,
            state,
            user_data: user_data.map(|u| base64::engine::general_purpose::STANDARD.encode(u)),
            public_keys: match (key_name, public_key) {
                (Some(name), Some(key)) => vec![(name, key)],
                _ => Vec::new(),
            },
            tags,
            options: MetadataOptions {
                tokens_required: opts.0,
                endpoint_enabled: opts.1,
                tags_enabled: opts.2,
                hop_limit: opts.3.clamp(1, 255) as u8,
            },
            nics,
        };
        Ok(Some(Rendered { doc, host_id, recipient }))
    }

    /// Step 3, through this relay's store client.
    pub async fn publish(&self, rendered: &Rendered) -> std::result::Result<Published, StoreError> {
        publish(self.client.as_ref(), rendered, &self.signer, &self.trusted).await
    }

    /// Step 4: forget the rows of `instance_id` up to `version`.
    pub async fn acknowledge(&self, instance_id: &str, version: i64) -> std::result::Result<u64, RelayError> {
        Ok(sqlx::query!("DELETE FROM metadata_outbox WHERE instance_id = $1 AND version <= $2", instance_id, version)
            .execute(&self.db)
            .await?
            .rows_affected())
    }

    /// One pass over a batch: every step for each pending instance. Returns
    /// how many instances were published; the first store or database error
    /// ends the pass. An instance whose document cannot be rendered (bad
    /// data in its row) is logged and left in the outbox: it does not hold
    /// back the others.
    pub async fn pass(&self) -> std::result::Result<usize, RelayError> {
        let pending = self.pending().await?;
        let mut done = 0;
        for (instance_id, waiting) in pending {
            let rendered = match self.render(&instance_id).await {
                Err(RelayError::Render(e)) => {
                    tracing::error!(%instance_id, error = %e, "outbox relay: cannot render the instance's document; skipped");
                    continue;
                }
                other => other?,
            };
            match rendered {
                Some(r) => {
                    let version = r.doc.version as i64;
                    let outcome = self.publish(&r).await?;
                    tracing::debug!(%instance_id, version, ?outcome, "document published");
                    self.acknowledge(&instance_id, version.max(waiting)).await?;
                }
                // Gone from PostgreSQL (retention purges only instances with no
                // outbox row, so only a row left by a crash): nothing to publish.
                None => {
                    self.acknowledge(&instance_id, waiting).await?;
                }
            }
            done += 1;
        }
        Ok(done)
    }

    /// Runs passes until the task is aborted: woken by `NOTIFY nimbus_outbox`
    /// (sent by the outbox trigger), at the latest every [`IDLE`]; after a
    /// failure, again after a backoff ([`crate::jobs`]).
    pub async fn run(self) {
        let pace = crate::jobs::Pace { idle: IDLE, min_interval: Duration::ZERO };
        let db = self.db.clone();
        crate::jobs::run_woken(db, "nimbus_outbox", "outbox relay", pace, || async { self.pass().await.map(|n| n as i64 >= BATCH) }).await
    }
}

/// The instance's interfaces, by device index.
async fn instance_nics(conn: &mut sqlx::PgConnection, instance_id: &str) -> Result<Vec<Nic>> {
    let rows = sqlx::query!(
        r#"SELECT n.id AS eni, n.device_index AS "device_index!", n.mac, host(n.private_ip) AS "ip!", s.id AS subnet_id, s.cidr::text AS "cidr!", n.vpc_id, v.vni,
                host(p.public_ip) AS "public?",
                ARRAY(SELECT g.group_id FROM network_interface_groups g WHERE g.interface_id = n.id ORDER BY g.group_id) AS "groups!"
         FROM network_interfaces n JOIN subnets s ON s.id = n.subnet_id JOIN vpcs v ON v.id = n.vpc_id
         LEFT JOIN public_addresses p ON p.network_interface_id = n.id
         WHERE n.instance_id = $1 ORDER BY n.device_index"#,
        instance_id
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let (eni, idx, mac, ip, subnet_id, cidr, vpc_id, vni, public, groups) =
                (r.eni, r.device_index, r.mac, r.ip, r.subnet_id, r.cidr, r.vpc_id, r.vni, r.public, r.groups);
            let subnet = super::network::db_cidr(&cidr)?;
            Ok(Nic {
                eni_id: eni,
                device_index: idx as u32,
                mac,
                private_ip: super::network::db_ip(&ip)?,
                gateway: subnet.nth(1).ok_or_else(|| ServiceError::Internal(format!("subnet {subnet_id} has no first host address")))?,
                subnet,
                vpc_id,
                vni: vni as u32,
                public_ip: public.as_deref().map(super::network::db_ip).transpose()?,
                group_ids: groups,
            })
        })
        .collect()
}

impl Service {
    /// This control plane's relay (through its own store node).
    pub fn relay(&self) -> Relay {
        Relay::new(
            self.db.clone(),
            self.config.region.clone(),
            Arc::new(self.store.client()),
            self.store.doc_key.clone(),
            self.store.trusted_keys(),
        )
    }
}
