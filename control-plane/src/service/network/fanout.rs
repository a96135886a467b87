//! The fan-out to hosts inside a changing transaction: the hosts it knows
//! directly are bumped in it ([`bump_hosts`]: generation + `pg_notify`,
//! delivered on commit), an instance whose interfaces changed is marked
//! changed at its host's new generation ([`Service::touch_instances`]), and
//! the rows a change must hold are locked in the lock order's own order
//! (id order). What other hosts must learn goes to the relay
//! ([`super::relay`]).

use crate::error::Result;
use crate::service::Service;
use sqlx::PgConnection;
use std::collections::{BTreeMap, BTreeSet};

/// Bumps the generation of `hosts` (in id order, the order every
/// transaction locks hosts in) and notifies their agents on commit.
pub(crate) async fn bump_hosts(conn: &mut PgConnection, hosts: &BTreeSet<String>) -> Result<BTreeMap<String, i64>> {
    if hosts.is_empty() {
        return Ok(BTreeMap::new());
    }
    let ids: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "WITH h AS (SELECT id FROM hosts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE) \
         UPDATE hosts SET generation = generation + 1 FROM h WHERE hosts.id = h.id RETURNING hosts.id, hosts.generation",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_notify($1, h) FROM unnest($2::text[]) AS h").bind(crate::notify::CHANNEL).bind(&ids).execute(&mut *conn).await?;
    Ok(rows.into_iter().collect())
}

async fn lock_rows(conn: &mut PgConnection, table: &str, ids: &BTreeSet<String>) -> Result<Vec<String>> {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let rows: Vec<(String,)> = sqlx::query_as(&format!("SELECT id FROM {table} WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE"))
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Locks VPC rows (id order): their set of hosts or subnets is changing.
pub(crate) async fn lock_vpcs(conn: &mut PgConnection, ids: &BTreeSet<String>) -> Result<Vec<String>> {
    lock_rows(conn, "vpcs", ids).await
}

/// Locks security-group rows (id order): their members or rules are changing.
pub(crate) async fn lock_groups(conn: &mut PgConnection, ids: &BTreeSet<String>) -> Result<Vec<String>> {
    lock_rows(conn, "security_groups", ids).await
}

impl Service {
    /// Bumps `hosts` and marks `instances` (on them) changed at their
    /// host's new generation, so a delta carries their new interfaces.
    pub(crate) async fn touch_instances(&self, conn: &mut PgConnection, hosts: &BTreeSet<String>, instances: Vec<String>) -> Result<()> {
        let generations = bump_hosts(conn, hosts).await?;
        if !instances.is_empty() {
            let (h, g): (Vec<String>, Vec<i64>) = generations.into_iter().unzip();
            sqlx::query(
                "UPDATE instances SET changed_generation = g.gen FROM unnest($2::text[], $3::bigint[]) AS g(host, gen) \
                 WHERE instances.id = ANY($1) AND instances.host_id = g.host",
            )
            .bind(&instances)
            .bind(&h)
            .bind(&g)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}
