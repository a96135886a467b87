//! Tags on the caller's resources (instances and images today).

use super::{Caller, Service};
use crate::error::{Result, ServiceError};
use crate::ids;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const MAX_TAGS_PER_RESOURCE: usize = 50;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tag {
    pub resource_id: String,
    pub resource_type: String,
    pub key: String,
    pub value: String,
}

pub fn resource_type(id: &str) -> &'static str {
    if id.starts_with("i-") {
        "instance"
    } else if id.starts_with("ami-") {
        "image"
    } else {
        "unknown"
    }
}

/// Checks keys and values as EC2 does.
pub fn validate_tags(tags: &[(String, String)]) -> Result<()> {
    if tags.len() > MAX_TAGS_PER_RESOURCE {
        return Err(ServiceError::InvalidParameterValue(format!("at most {MAX_TAGS_PER_RESOURCE} tags per resource")));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 || k.starts_with("aws:") {
            return Err(ServiceError::InvalidParameterValue(format!("Tag key {k:?} must be 1 to 128 characters and not start with aws:")));
        }
        if v.chars().count() > 256 {
            return Err(ServiceError::InvalidParameterValue(format!("Tag value of {k:?} is longer than 256 characters")));
        }
    }
    Ok(())
}

impl Service {
    /// Checks that every resource exists and is the caller's; an unknown or
    /// foreign id answers exactly as a missing one.
    async fn check_resources(&self, caller: &Caller, resources: &[String]) -> Result<()> {
        if resources.is_empty() {
            return Err(ServiceError::MissingParameter("ResourceId".into()));
        }
        for id in resources {
            let exists: Option<(i32,)> = match resource_type(id) {
                "instance" if ids::is_valid(ids::INSTANCE, id) => {
                    sqlx::query_as("SELECT 1 FROM instances WHERE id = $1 AND account_id = $2").bind(id).bind(&caller.account_id).fetch_optional(&self.db).await?
                }
                "image" if ids::is_valid(ids::IMAGE, id) => {
                    sqlx::query_as("SELECT 1 FROM images WHERE id = $1 AND account_id = $2").bind(id).bind(&caller.account_id).fetch_optional(&self.db).await?
                }
                _ => return Err(ServiceError::InvalidParameterValue(format!("Invalid resource id {id:?}"))),
            };
            if exists.is_none() {
                return Err(match resource_type(id) {
                    "instance" => ServiceError::InstanceNotFound(id.clone()),
                    _ => ServiceError::ImageNotFound(id.clone()),
                });
            }
        }
        Ok(())
    }

    pub async fn create_tags(&self, caller: &Caller, resources: &[String], tags: &[(String, String)]) -> Result<()> {
        validate_tags(tags)?;
        self.check_resources(caller, resources).await?;
        let mut tx = self.db.begin().await?;
        for r in resources {
            for (k, v) in tags {
                sqlx::query(
                    "INSERT INTO tags (account_id, resource_id, key, value) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (account_id, resource_id, key) DO UPDATE SET value = EXCLUDED.value",
                )
                .bind(&caller.account_id)
                .bind(r)
                .bind(k)
                .bind(v)
                .execute(&mut *tx)
                .await?;
            }
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM tags WHERE account_id = $1 AND resource_id = $2")
                .bind(&caller.account_id)
                .bind(r)
                .fetch_one(&mut *tx)
                .await?;
            if n as usize > MAX_TAGS_PER_RESOURCE {
                return Err(ServiceError::TagLimitExceeded(format!("{r} would have {n} tags; the limit is {MAX_TAGS_PER_RESOURCE}")));
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes tags: each `(key, None)` whatever its value, `(key, Some(v))`
    /// only with that value; no tags at all means every tag of the resources.
    pub async fn delete_tags(&self, caller: &Caller, resources: &[String], tags: &[(String, Option<String>)]) -> Result<()> {
        self.check_resources(caller, resources).await?;
        if tags.is_empty() {
            sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = ANY($2)")
                .bind(&caller.account_id)
                .bind(resources)
                .execute(&self.db)
                .await?;
            return Ok(());
        }
        for (k, v) in tags {
            sqlx::query(
                "DELETE FROM tags WHERE account_id = $1 AND resource_id = ANY($2) AND key = $3 AND ($4::text IS NULL OR value = $4)",
            )
            .bind(&caller.account_id)
            .bind(resources)
            .bind(k)
            .bind(v)
            .execute(&self.db)
            .await?;
        }
        Ok(())
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
        Ok(rows.into_iter().map(|(r, k, v)| Tag { resource_type: resource_type(&r).to_string(), resource_id: r, key: k, value: v }).collect())
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
