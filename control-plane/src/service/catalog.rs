//! The instance-type catalog (seeded by migration).

use super::Service;
use crate::error::{Result, ServiceError};
use nimbus_proto::api::InstanceType;

struct Row {
    name: String,
    vcpus: i32,
    memory_mib: i64,
    disk_gib: i64,
}

impl From<Row> for InstanceType {
    fn from(r: Row) -> Self {
        InstanceType { name: r.name, vcpus: r.vcpus as u32, memory_mib: r.memory_mib as u64, disk_gib: r.disk_gib as u64 }
    }
}

impl Service {
    /// The catalog, or the named types (each must exist).
    pub async fn describe_instance_types(&self, names: &[String]) -> Result<Vec<InstanceType>> {
        let rows = sqlx::query_as!(Row, "SELECT name, vcpus, memory_mib, disk_gib FROM instance_types ORDER BY vcpus, memory_mib, name")
            .fetch_all(&self.db)
            .await?;
        let mut types: Vec<InstanceType> = rows.into_iter().map(Into::into).collect();
        if let Some(missing) = names.iter().find(|n| !types.iter().any(|t| &t.name == *n)) {
            return Err(ServiceError::InvalidParameterValue(format!("The following supplied instance types do not exist: [{missing}]")));
        }
        if !names.is_empty() {
            types.retain(|t| names.contains(&t.name));
        }
        Ok(types)
    }

    pub async fn instance_type(&self, name: &str) -> Result<InstanceType> {
        sqlx::query_as!(Row, "SELECT name, vcpus, memory_mib, disk_gib FROM instance_types WHERE name = $1", name)
            .fetch_optional(&self.db)
            .await?
            .map(Into::into)
            .ok_or_else(|| ServiceError::InstanceTypeNotFound(name.to_string()))
    }
}
