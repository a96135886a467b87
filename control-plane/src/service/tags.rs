//! Tags on the caller's resources: instances, images, VPCs, subnets,
//! security groups, network interfaces and Elastic IPs.

use super::{Caller, Service};
use crate::error::{Result, ServiceError};
use crate::ids;

use std::collections::BTreeMap;

pub const MAX_TAGS_PER_RESOURCE: usize = 50;
/// Resources of one CreateTags or DeleteTags call, as in EC2.
pub const MAX_RESOURCES_PER_CALL: usize = 1000;

pub use nimbus_proto::api::Tag;

/// Resource types by id prefix: (prefix, EC2's resource type, table).
const RESOURCES: &[(&str, &str, &str)] = &[
    (ids::INSTANCE, "instance", "instances"),
    (ids::IMAGE, "image", "images"),
    (ids::VPC, "vpc", "vpcs"),
    (ids::SUBNET, "subnet", "subnets"),
    (ids::SECURITY_GROUP, "security-group", "security_groups"),
    (ids::NETWORK_INTERFACE, "network-interface", "network_interfaces"),
];

pub fn resource_type(id: &str) -> &'static str {
    if id.starts_with("eipalloc-") {
        return "elastic-ip";
    }
    RESOURCES.iter().find(|(prefix, _, _)| ids::is_valid(prefix, id)).map(|(_, t, _)| *t).unwrap_or("unknown")
}

/// Checks keys and values as EC2 does, and refuses control characters
/// (they cannot be written in XML 1.0: a tag holding one would make every
/// DescribeInstances answer of its account unreadable).
pub fn validate_tags(tags: &[(String, String)]) -> Result<()> {
    if tags.len() > MAX_TAGS_PER_RESOURCE {
        return Err(ServiceError::InvalidParameterValue(format!("at most {MAX_TAGS_PER_RESOURCE} tags per resource")));
    }
    let mut keys = std::collections::HashSet::new();
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 || k.starts_with("aws:") {
            return Err(ServiceError::InvalidParameterValue(format!("Tag key {k:?} must be 1 to 128 characters and not start with aws:")));
        }
        if v.chars().count() > 256 {
            return Err(ServiceError::InvalidParameterValue(format!("Tag value of {k:?} is longer than 256 characters")));
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return Err(ServiceError::InvalidParameterValue(format!("Tag {k:?} holds a control character")));
        }
        if !keys.insert(k) {
            return Err(ServiceError::InvalidParameterValue(format!("Tag key {k:?} is given twice")));
        }
    }
    Ok(())
}

/// The resource ids of a tags call, each once, in their first order; at most
/// [`MAX_RESOURCES_PER_CALL`].
fn distinct_resources(resources: &[String]) -> Result<Vec<String>> {
    if resources.is_empty() {
        return Err(ServiceError::MissingParameter("ResourceId".into()));
    }
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<String> = resources.iter().filter(|r| seen.insert(r.as_str())).cloned().collect();
    if distinct.len() > MAX_RESOURCES_PER_CALL {
        return Err(ServiceError::InvalidParameterValue(format!("at most {MAX_RESOURCES_PER_CALL} resources per call")));
    }
    Ok(distinct)
}

/// Gives every one of `resources` (just created, in the caller's
/// transaction) each of `tags`: one statement.
pub(crate) async fn insert_new_tags(
    conn: &mut sqlx::PgConnection,
    account_id: &str,
    resources: &[String],
    tags: &[(String, String)],
) -> Result<()> {
    if tags.is_empty() || resources.is_empty() {
        return Ok(());
    }
    let (keys, values): (Vec<&str>, Vec<&str>) = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).unzip();
    sqlx::query(
        "INSERT INTO tags (account_id, resource_id, key, value) \
         SELECT $1, id, t.k, t.v FROM unnest($2::text[]) AS id CROSS JOIN unnest($3::text[], $4::text[]) AS t(k, v)",
    )
    .bind(account_id)
    .bind(resources)
    .bind(&keys)
    .bind(&values)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Locks the instances among `resources` in id order, before their tag
/// rows: the lock order (instances, then what belongs to them) that the
/// tag triggers' document bumps would otherwise reverse. An instance that
/// went meanwhile (forgotten after its retention) is InvalidInstanceID.NotFound.
async fn lock_instances(tx: &mut sqlx::PgConnection, resources: &[String]) -> Result<()> {
    let locked: Vec<(String,)> = sqlx::query_as(&format!(
        "SELECT id FROM instances WHERE id = ANY($1) AND {} ORDER BY id FOR NO KEY UPDATE",
        super::visibility::instance_visible()
    ))
    .bind(resources)
    .fetch_all(&mut *tx)
    .await?;
    let locked: std::collections::HashSet<String> = locked.into_iter().map(|r| r.0).collect();
    match resources.iter().find(|r| resource_type(r) == "instance" && !locked.contains(*r)) {
        Some(gone) => Err(ServiceError::InstanceNotFound(gone.clone())),
        None => Ok(()),
    }
}

impl Service {
    /// Checks that every resource exists and is the caller's (two
    /// set-based queries, whatever the count); an unknown or foreign id
    /// answers exactly as a missing one. Returns the ids, each once.
    pub(crate) async fn check_resources(&self, caller: &Caller, resources: &[String]) -> Result<Vec<String>> {
        let resources = distinct_resources(resources)?;
        for id in &resources {
            if resource_type(id) == "unknown" || (resource_type(id) == "elastic-ip" && !ids::is_valid(ids::ALLOCATION, id)) {
                return Err(ServiceError::InvalidParameterValue(format!("Invalid resource id {id:?}")));
            }
        }
        // Instances as DescribeInstances shows them: a terminated one for an hour.
        let mut union: Vec<String> = RESOURCES
            .iter()
            .map(|(_, _, table)| {
                let visible = if *table == "instances" { format!(" AND {}", super::visibility::instance_visible()) } else { String::new() };
                format!("SELECT id FROM {table} WHERE account_id = $1 AND id = ANY($2){visible}")
            })
            .collect();
        union.push("SELECT allocation_id FROM public_addresses WHERE account_id = $1 AND allocation_id = ANY($2)".into());
        let found: Vec<(String,)> =
            sqlx::query_as(&union.join(" UNION ALL ")).bind(&caller.account_id).bind(&resources).fetch_all(&self.db).await?;
        let found: std::collections::HashSet<String> = found.into_iter().map(|r| r.0).collect();
        if let Some(missing) = resources.iter().find(|id| !found.contains(*id)) {
            return Err(match resource_type(missing) {
                "instance" => ServiceError::InstanceNotFound(missing.clone()),
                "vpc" => ServiceError::VpcNotFound(missing.clone()),
                "subnet" => ServiceError::SubnetNotFound(missing.clone()),
                "security-group" => ServiceError::GroupNotFound(format!("The security group '{missing}' does not exist")),
                "network-interface" => ServiceError::NetworkInterfaceNotFound(missing.clone()),
                "elastic-ip" => ServiceError::AllocationNotFound(missing.clone()),
                _ => ServiceError::ImageNotFound(missing.clone()),
            });
        }
        Ok(resources)
    }

    /// Tags the caller's resources: one statement writes every (resource,
    /// tag) pair, one checks the per-resource limit; all or nothing.
    pub async fn create_tags(&self, caller: &Caller, resources: &[String], tags: &[(String, String)]) -> Result<()> {
        validate_tags(tags)?;
        let mut resources = self.check_resources(caller, resources).await?;
        // Written in id order: concurrent calls lock rows in one order.
        resources.sort();
        let (keys, values): (Vec<&str>, Vec<&str>) = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).unzip();
        super::retrying(|| self.try_create_tags(caller, &resources, &keys, &values)).await
    }

    async fn try_create_tags(&self, caller: &Caller, resources: &[String], keys: &[&str], values: &[&str]) -> Result<()> {
        let mut tx = self.db.begin().await?;
        lock_instances(&mut tx, resources).await?;
        sqlx::query(
            "INSERT INTO tags (account_id, resource_id, key, value) \
             SELECT $1, r, t.k, t.v FROM unnest($2::text[]) AS r CROSS JOIN unnest($3::text[], $4::text[]) AS t(k, v) \
             ON CONFLICT (account_id, resource_id, key) DO UPDATE SET value = EXCLUDED.value",
        )
        .bind(&caller.account_id)
        .bind(resources)
        .bind(keys)
        .bind(values)
        .execute(&mut *tx)
        .await?;
        let over: Option<(String, i64)> = sqlx::query_as(
            "SELECT resource_id, count(*) FROM tags WHERE account_id = $1 AND resource_id = ANY($2) \
             GROUP BY resource_id HAVING count(*) > $3 ORDER BY resource_id LIMIT 1",
        )
        .bind(&caller.account_id)
        .bind(resources)
        .bind(MAX_TAGS_PER_RESOURCE as i64)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((r, n)) = over {
            return Err(ServiceError::TagLimitExceeded(format!("{r} would have {n} tags; the limit is {MAX_TAGS_PER_RESOURCE}")));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes tags: each `(key, None)` whatever its value, `(key, Some(v))`
    /// only with that value; no tags at all means every tag of the resources.
    /// One statement.
    pub async fn delete_tags(&self, caller: &Caller, resources: &[String], tags: &[(String, Option<String>)]) -> Result<()> {
        let mut resources = self.check_resources(caller, resources).await?;
        resources.sort();
        let (keys, values): (Vec<&str>, Vec<Option<&str>>) = tags.iter().map(|(k, v)| (k.as_str(), v.as_deref())).unzip();
        super::retrying(|| self.try_delete_tags(caller, &resources, &keys, &values)).await
    }

    async fn try_delete_tags(&self, caller: &Caller, resources: &[String], keys: &[&str], values: &[Option<&str>]) -> Result<()> {
        let mut tx = self.db.begin().await?;
        lock_instances(&mut tx, resources).await?;
        sqlx::query(
            "DELETE FROM tags WHERE account_id = $1 AND resource_id = ANY($2) AND (cardinality($3::text[]) = 0 OR EXISTS \
                 (SELECT 1 FROM unnest($3::text[], $4::text[]) AS d(k, v) WHERE tags.key = d.k AND (d.v IS NULL OR tags.value = d.v)))",
        )
        .bind(&caller.account_id)
        .bind(resources)
        .bind(keys)
        .bind(values)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// DescribeTags: as [`Service::describe_tags`], and of the given
    /// resource types only (`instance`, `image`, `vpc`, `subnet`,
    /// `security-group`, `network-interface`, `elastic-ip`); none: all.
    pub async fn describe_tags_of_types(
        &self,
        caller: &Caller,
        resource_ids: &[String],
        keys: &[String],
        values: &[String],
        types: &[String],
    ) -> Result<Vec<Tag>> {
        const KNOWN: &[&str] = &["instance", "image", "vpc", "subnet", "security-group", "network-interface", "elastic-ip"];
        if let Some(bad) = types.iter().find(|t| !KNOWN.contains(&t.as_str())) {
            return Err(ServiceError::InvalidParameterValue(format!("The resource type '{bad}' is not supported")));
        }
        let mut tags = self.describe_tags(caller, resource_ids, keys, values).await?;
        tags.retain(|t| types.is_empty() || types.contains(&t.resource_type));
        Ok(tags)
    }

    /// The caller's tags, filtered by resource ids, keys and values (each
    /// filter present must match).
    pub async fn describe_tags(&self, caller: &Caller, resource_ids: &[String], keys: &[String], values: &[String]) -> Result<Vec<Tag>> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT resource_id, key, value FROM tags WHERE account_id = $1 \
               AND (cardinality($2::text[]) = 0 OR resource_id = ANY($2)) \
               AND (cardinality($3::text[]) = 0 OR key = ANY($3)) \
               AND (cardinality($4::text[]) = 0 OR value = ANY($4)) ORDER BY resource_id, key",
        )
        .bind(&caller.account_id)
        .bind(resource_ids)
        .bind(keys)
        .bind(values)
        .fetch_all(&self.db)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(r, k, v)| Tag { resource_type: resource_type(&r).to_string(), resource_id: r, key: k, value: v })
            .collect())
    }

    /// Tags of each of the given resources.
    pub async fn tags_of(&self, caller: &Caller, resource_ids: &[String]) -> Result<BTreeMap<String, Vec<(String, String)>>> {
        let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        if resource_ids.is_empty() {
            return Ok(out);
        }
        for t in self.describe_tags(caller, resource_ids, &[], &[]).await? {
            out.entry(t.resource_id).or_default().push((t.key, t.value));
        }
        Ok(out)
    }
}
