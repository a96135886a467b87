//! Network changes reach the hosts they concern after they commit.
//!
//! What a host must know of the network ([`nimbus_proto::network::HostNetwork`])
//! depends on rows other transactions change concurrently: a launch on host
//! H1 adds a member to a group whose members host H2 filters by, while a
//! launch on H2 does the same the other way round. Computing the hosts to
//! bump inside the changing transaction sees only what committed before it,
//! so two concurrent launches would miss each other's hosts; the earlier
//! design locked the VPC and the groups for the rest of the transaction,
//! which queued every launch into a VPC (an account's default VPC: every
//! launch of the account) behind the one before.
//!
//! Now a changing transaction only records what it changed ([`note`]: one
//! insert into `network_changes`, no lock on anything shared) and bumps the
//! hosts it knows directly (a launch its placement hosts, in the claim).
//! The relay ([`relay_pass`], a background job woken by the insert's
//! `NOTIFY nimbus_network`) then takes the waiting rows, computes the hosts
//! they concern from what is committed by then, bumps those that run the
//! VPC data plane (generation + `NOTIFY nimbus_host`, a statement at a
//! time, so a host row is never locked for long: see [`wake`]), and
//! deletes the rows.
//!
//! Why no host misses a change C: the relay reads after C committed, so it
//! bumps every host whose interest in C (an interface in the group or VPC)
//! committed before that read. A host whose interest commits after the read
//! got it from a transaction that bumped that host itself (a launch bumps
//! its placement hosts) and committed after C, so the host's next fetch
//! sees C too. A crash before the relay's commit leaves the rows: a later
//! pass (of any control plane: rows are taken `FOR UPDATE SKIP LOCKED`)
//! does the work again, and bumping a host twice is harmless.
//!
//! Many changes coalesce: a pass takes up to [`BATCH`] rows and bumps each
//! host once, and passes start at most every [`MIN_INTERVAL`], so a burst
//! of launches into one VPC costs each of its hosts a few wake-ups a
//! second, not one per launch.

use crate::error::Result;
use sqlx::{PgConnection, PgPool};
use std::collections::BTreeSet;
use std::time::Duration;

/// The channel [`note`] notifies and the relay listens on.
pub const CHANNEL: &str = "nimbus_network";
/// Rows taken per pass.
pub const BATCH: i64 = 1024;
/// The shortest time between two passes.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// The longest wait between passes when nothing wakes the relay.
pub const IDLE: Duration = Duration::from_secs(1);

/// What a transaction changed that other hosts may need to know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// VPCs whose set of hosts or subnets changed (every host in them).
    pub vpcs: BTreeSet<String>,
    /// Groups whose members changed (hosts holding their member addresses).
    pub members_of: BTreeSet<String>,
    /// Groups whose rules changed (hosts with an interface in them).
    pub rules_of: BTreeSet<String>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.vpcs.is_empty() && self.members_of.is_empty() && self.rules_of.is_empty()
    }
}

/// Records `change` in the caller's transaction, for the relay to deliver
/// once it commits. Takes no lock on anything shared.
pub(crate) async fn note(conn: &mut PgConnection, change: &Change) -> Result<()> {
    if change.is_empty() {
        return Ok(());
    }
    let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<String>>();
    sqlx::query!(
        "WITH c AS (INSERT INTO network_changes (vpc_ids, member_of, rules_of) VALUES ($1, $2, $3)) SELECT pg_notify($4, '')",
        &list(&change.vpcs),
        &list(&change.members_of),
        &list(&change.rules_of),
        CHANNEL
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// One pass of the relay: takes waiting changes, wakes the hosts they
/// concern (as of now), deletes them. `Ok(true)`: a full batch (more may wait).
///
/// The change rows stay locked (`FOR UPDATE`, so no other relay takes
/// them) until the hosts are woken; a crash before the delete commits
/// leaves them for a later pass.
pub(crate) async fn relay_pass(db: &PgPool) -> Result<bool> {
    let mut tx = db.begin().await?;
    let rows =
        sqlx::query!("SELECT id, vpc_ids, member_of, rules_of FROM network_changes ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED", BATCH)
            .fetch_all(&mut *tx)
            .await?;
    if rows.is_empty() {
        return Ok(false);
    }
    let mut all = Change::default();
    for r in &rows {
        all.vpcs.extend(r.vpc_ids.iter().cloned());
        all.members_of.extend(r.member_of.iter().cloned());
        all.rules_of.extend(r.rules_of.iter().cloned());
    }
    let mut hosts = hosts_in_vpcs(&mut tx, &all.vpcs).await?;
    hosts.extend(hosts_seeing_groups(&mut tx, &all.members_of).await?);
    hosts.extend(hosts_in_groups(&mut tx, &all.rules_of).await?);
    let woken = wake(db, &hosts).await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    sqlx::query!("DELETE FROM network_changes WHERE id = ANY($1)", &ids).execute(&mut *tx).await?;
    tx.commit().await?;
    tracing::debug!(changes = rows.len(), hosts = woken, "network changes delivered");
    Ok(rows.len() as i64 >= BATCH)
}

/// Bumps the generation of those of `hosts` that run the VPC data plane
/// (an underlay address: the others program no network) and notifies
/// them: one statement per round, each committed at once, so host rows are
/// locked only for a statement; rows a launch or a report holds now are
/// skipped and taken in a later round (after a few, waited for). Returns
/// how many hosts were bumped.
async fn wake(db: &PgPool, hosts: &BTreeSet<String>) -> Result<usize> {
    if hosts.is_empty() {
        return Ok(0);
    }
    let ids: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let vpc_hosts =
        sqlx::query_scalar!("SELECT id FROM hosts WHERE id = ANY($1) AND underlay_ip IS NOT NULL", &ids as &[&str]).fetch_all(db).await?;
    let mut left: BTreeSet<String> = vpc_hosts.into_iter().collect();
    let total = left.len();
    let mut round = 0;
    while !left.is_empty() {
        round += 1;
        let skip = if round <= 4 { " SKIP LOCKED" } else { "" };
        let ids: Vec<&str> = left.iter().map(String::as_str).collect();
        // Runtime: SKIP LOCKED is spliced in for the first rounds only.
        let done: Vec<(String,)> = sqlx::query_as(&format!(
            "WITH b AS (UPDATE hosts SET generation = generation + 1 WHERE id IN \
                 (SELECT id FROM hosts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE{skip}) RETURNING id) \
             SELECT b.id FROM b, LATERAL (SELECT pg_notify($2, b.id)) n"
        ))
        .bind(&ids)
        .bind(crate::notify::CHANNEL)
        .fetch_all(db)
        .await?;
        for (id,) in done {
            left.remove(&id);
        }
        if !left.is_empty() && round <= 4 {
            tokio::time::sleep(Duration::from_millis(2 << round)).await;
        }
        if round > 4 {
            // Waited for: what is left was removed meanwhile.
            break;
        }
    }
    Ok(total - left.len())
}

async fn host_set(conn: &mut PgConnection, sql: &str, ids: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    if ids.is_empty() {
        return Ok(BTreeSet::new());
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let rows: Vec<(String,)> = sqlx::query_as(sql).bind(&ids).fetch_all(&mut *conn).await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Hosts with an interface in one of the VPCs.
async fn hosts_in_vpcs(conn: &mut PgConnection, vpcs: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    host_set(
        conn,
        "SELECT DISTINCT i.host_id FROM network_interfaces n JOIN instances i ON i.id = n.instance_id WHERE n.vpc_id = ANY($1)",
        vpcs,
    )
    .await
}

/// Hosts with an interface in one of the groups (their rules changed).
async fn hosts_in_groups(conn: &mut PgConnection, groups: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    host_set(
        conn,
        "SELECT DISTINCT i.host_id FROM network_interface_groups ng JOIN network_interfaces n ON n.id = ng.interface_id \
         JOIN instances i ON i.id = n.instance_id WHERE ng.group_id = ANY($1)",
        groups,
    )
    .await
}

/// Hosts that hold the member addresses of one of the groups: those with an
/// interface in it, or in a group with a rule naming it.
async fn hosts_seeing_groups(conn: &mut PgConnection, groups: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    host_set(
        conn,
        "SELECT DISTINCT i.host_id FROM network_interface_groups ng JOIN network_interfaces n ON n.id = ng.interface_id \
         JOIN instances i ON i.id = n.instance_id \
         WHERE ng.group_id = ANY($1) OR ng.group_id IN (SELECT group_id FROM security_group_rules WHERE peer_group_id = ANY($1))",
        groups,
    )
    .await
}

impl crate::service::Service {
    /// Starts the network relay (one per control plane; passes of several
    /// never take the same rows).
    pub fn start_network_relay(&self) -> tokio::task::JoinHandle<()> {
        let db = self.db.clone();
        let pace = crate::jobs::Pace { idle: IDLE, min_interval: MIN_INTERVAL };
        tokio::spawn(async move {
            let pool = db.clone();
            crate::jobs::run_woken(db, CHANNEL, "network relay", pace, || relay_pass(&pool)).await
        })
    }
}
