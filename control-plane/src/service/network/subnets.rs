//! Subnets: CreateSubnet (a /16 to a /28 inside its VPC, in a zone that
//! has hosts, overlapping no other subnet of the VPC: the
//! `subnets_no_overlap` constraint), DeleteSubnet (not while an interface
//! is in it), ModifySubnetAttribute (MapPublicIpOnLaunch) and
//! DescribeSubnets. The first four addresses and the last of a subnet are
//! reserved, as in EC2. A subnet created or deleted reaches the hosts with
//! an interface in its VPC through the relay.

use super::fanout::lock_vpcs;
use super::filters::{check_filter_names, passes, yes_no, Filters};
use super::relay::{self, Change};
use super::util::{check_id, db_cidr, opt_list, parse_cidr, tags_into};
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::{Caller, Service};
use nimbus_proto::api::Subnet;
use nimbus_proto::network::Cidr;
use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

pub const MAX_SUBNETS_PER_VPC: i64 = 200;

/// The first four addresses and the last of a subnet are reserved, as in EC2.
pub fn usable_addresses(c: &Cidr) -> u64 {
    c.size().saturating_sub(5)
}

pub(crate) fn is_reserved(c: &Cidr, ip: Ipv4Addr) -> bool {
    let off = u64::from(u32::from(ip).wrapping_sub(u32::from(c.network())));
    off < 4 || off + 1 == c.size()
}

#[derive(sqlx::FromRow, Clone, Debug)]
pub(crate) struct SubnetRow {
    pub(crate) id: String,
    pub(crate) vpc_id: String,
    pub(crate) availability_zone: String,
    pub(crate) cidr: String,
    pub(crate) default_for_az: bool,
    pub(crate) map_public_ip_on_launch: bool,
}

pub(crate) const SUBNET_COLUMNS: &str = "id, vpc_id, availability_zone, cidr::text AS cidr, default_for_az, map_public_ip_on_launch";

/// A subnet as a launch needs it.
#[derive(Debug, Clone)]
pub(crate) struct SubnetInfo {
    pub id: String,
    pub vpc_id: String,
    pub zone: String,
    pub cidr: Cidr,
    pub map_public: bool,
}

impl SubnetRow {
    pub(crate) fn info(&self) -> Result<SubnetInfo> {
        Ok(SubnetInfo {
            id: self.id.clone(),
            vpc_id: self.vpc_id.clone(),
            zone: self.availability_zone.clone(),
            cidr: db_cidr(&self.cidr)?,
            map_public: self.map_public_ip_on_launch,
        })
    }
}

impl Service {
    pub async fn create_subnet(&self, caller: &Caller, vpc_id: &str, cidr_block: &str, zone: Option<&str>) -> Result<Subnet> {
        check_id(ids::VPC, vpc_id, ServiceError::VpcIdMalformed)?;
        let cidr = parse_cidr(cidr_block, "cidrBlock")?;
        if !(16..=28).contains(&cidr.prefix) {
            return Err(ServiceError::SubnetRange(format!("The CIDR '{cidr}' is invalid: a subnet is a /16 to a /28")));
        }
        let zones = self.describe_availability_zones().await?;
        let zone = match zone {
            Some(z) if zones.iter().any(|k| k == z) => z.to_string(),
            Some(z) => {
                return Err(ServiceError::InvalidParameterValue(format!(
                    "Value ({z}) for parameter availabilityZone is invalid. Subnets can currently only be created in the following availability zones: {}.",
                    zones.join(", ")
                )))
            }
            None => zones.first().cloned().ok_or_else(|| ServiceError::InvalidParameterValue("no availability zone has a host yet".into()))?,
        };
        self.ensure_default_network(&caller.account_id).await?;
        let mut tx = self.db.begin().await?;
        let vpc: Option<(String,)> = sqlx::query_as("SELECT cidr::text FROM vpcs WHERE id = $1 AND account_id = $2 FOR NO KEY UPDATE")
            .bind(vpc_id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (vpc_cidr,) = vpc.ok_or_else(|| ServiceError::VpcNotFound(vpc_id.to_string()))?;
        if !db_cidr(&vpc_cidr)?.covers(&cidr) {
            return Err(ServiceError::SubnetRange(format!("The CIDR '{cidr}' is invalid: it is not within the VPC's {vpc_cidr}.")));
        }
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM subnets WHERE vpc_id = $1").bind(vpc_id).fetch_one(&mut *tx).await?;
        if n >= MAX_SUBNETS_PER_VPC {
            return Err(ServiceError::SubnetLimitExceeded(format!(
                "The maximum number of subnets ({MAX_SUBNETS_PER_VPC}) has been reached."
            )));
        }
        let id = ids::new_id(ids::SUBNET);
        sqlx::query("INSERT INTO subnets (id, account_id, vpc_id, availability_zone, cidr) VALUES ($1, $2, $3, $4, $5::cidr)")
            .bind(&id)
            .bind(&caller.account_id)
            .bind(vpc_id)
            .bind(&zone)
            .bind(cidr.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if crate::db::Constraint::SubnetsNoOverlap.violated_by(&e) {
                    ServiceError::SubnetConflict(format!("The CIDR '{cidr}' conflicts with another subnet"))
                } else {
                    e.into()
                }
            })?;
        let change = Change { vpcs: BTreeSet::from([vpc_id.to_string()]), ..Default::default() };
        relay::note(&mut tx, &change).await?;
        tx.commit().await?;
        tracing::info!(subnet_id = %id, %vpc_id, %cidr, %zone, "subnet created");
        Ok(Subnet {
            subnet_id: id,
            vpc_id: vpc_id.to_string(),
            cidr_block: cidr.to_string(),
            availability_zone: zone,
            default_for_az: false,
            map_public_ip_on_launch: false,
            available_ip_address_count: usable_addresses(&cidr),
            state: "available".into(),
            owner_id: caller.account_id.clone(),
            tags: vec![],
        })
    }

    /// Deletes a subnet without interfaces (a default subnet comes back
    /// when its zone next needs one).
    pub async fn delete_subnet(&self, caller: &Caller, subnet_id: &str) -> Result<()> {
        check_id(ids::SUBNET, subnet_id, ServiceError::SubnetIdMalformed)?;
        let mut tx = self.db.begin().await?;
        let vpc: Option<(String,)> = sqlx::query_as("SELECT vpc_id FROM subnets WHERE id = $1 AND account_id = $2")
            .bind(subnet_id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (vpc_id,) = vpc.ok_or_else(|| ServiceError::SubnetNotFound(subnet_id.to_string()))?;
        let vpcs = BTreeSet::from([vpc_id]);
        lock_vpcs(&mut tx, &vpcs).await?;
        let deleted = sqlx::query("DELETE FROM subnets WHERE id = $1 AND account_id = $2")
            .bind(subnet_id)
            .bind(&caller.account_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
                    ServiceError::DependencyViolation(format!("The subnet '{subnet_id}' has dependencies and cannot be deleted."))
                }
                _ => e.into(),
            })?;
        if deleted.rows_affected() == 0 {
            return Err(ServiceError::SubnetNotFound(subnet_id.to_string()));
        }
        sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = $2")
            .bind(&caller.account_id)
            .bind(subnet_id)
            .execute(&mut *tx)
            .await?;
        relay::note(&mut tx, &Change { vpcs, ..Default::default() }).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn modify_subnet_attribute(&self, caller: &Caller, subnet_id: &str, map_public_ip_on_launch: bool) -> Result<()> {
        check_id(ids::SUBNET, subnet_id, ServiceError::SubnetIdMalformed)?;
        let done = sqlx::query("UPDATE subnets SET map_public_ip_on_launch = $3 WHERE id = $1 AND account_id = $2")
            .bind(subnet_id)
            .bind(&caller.account_id)
            .bind(map_public_ip_on_launch)
            .execute(&self.db)
            .await?;
        if done.rows_affected() == 0 {
            return Err(ServiceError::SubnetNotFound(subnet_id.to_string()));
        }
        Ok(())
    }

    pub async fn describe_subnets(&self, caller: &Caller, subnet_ids: &[String], filters: &Filters) -> Result<Vec<Subnet>> {
        for id in subnet_ids {
            check_id(ids::SUBNET, id, ServiceError::SubnetIdMalformed)?;
        }
        check_filter_names(
            filters,
            &[
                "subnet-id",
                "vpc-id",
                "vpcId",
                "availability-zone",
                "availabilityZone",
                "default-for-az",
                "defaultForAz",
                "state",
                "cidr",
                "cidr-block",
                "cidrBlock",
                "map-public-ip-on-launch",
                "owner-id",
                "available-ip-address-count",
            ],
        )?;
        self.ensure_default_network(&caller.account_id).await?;
        let rows = sqlx::query_as::<_, SubnetRow>(&format!(
            "SELECT {SUBNET_COLUMNS} FROM subnets WHERE account_id = $1 AND ($2::text[] IS NULL OR id = ANY($2)) \
             ORDER BY vpc_id, availability_zone, cidr"
        ))
        .bind(&caller.account_id)
        .bind(opt_list(subnet_ids))
        .fetch_all(&self.db)
        .await?;
        if let Some(missing) = subnet_ids.iter().find(|id| !rows.iter().any(|r| &r.id == *id)) {
            return Err(ServiceError::SubnetNotFound(missing.clone()));
        }
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let used: Vec<(String, i64)> =
            sqlx::query_as("SELECT subnet_id, count(*) FROM network_interfaces WHERE subnet_id = ANY($1) GROUP BY subnet_id")
                .bind(&ids)
                .fetch_all(&self.db)
                .await?;
        let used: HashMap<String, i64> = used.into_iter().collect();
        let mut tags = self.tags_of(caller, &ids).await?;
        let mut out = Vec::new();
        for r in rows {
            let cidr = db_cidr(&r.cidr)?;
            let s = Subnet {
                available_ip_address_count: usable_addresses(&cidr).saturating_sub(used.get(&r.id).copied().unwrap_or(0) as u64),
                tags: tags_into(&mut tags, &r.id),
                subnet_id: r.id,
                vpc_id: r.vpc_id,
                cidr_block: r.cidr,
                availability_zone: r.availability_zone,
                default_for_az: r.default_for_az,
                map_public_ip_on_launch: r.map_public_ip_on_launch,
                state: "available".into(),
                owner_id: caller.account_id.clone(),
            };
            let facts = [
                ("subnet-id", s.subnet_id.clone()),
                ("vpc-id", s.vpc_id.clone()),
                ("vpcId", s.vpc_id.clone()),
                ("availability-zone", s.availability_zone.clone()),
                ("availabilityZone", s.availability_zone.clone()),
                ("default-for-az", yes_no(s.default_for_az)),
                ("defaultForAz", yes_no(s.default_for_az)),
                ("state", s.state.clone()),
                ("cidr", s.cidr_block.clone()),
                ("cidr-block", s.cidr_block.clone()),
                ("cidrBlock", s.cidr_block.clone()),
                ("map-public-ip-on-launch", yes_no(s.map_public_ip_on_launch)),
                ("owner-id", s.owner_id.clone()),
                ("available-ip-address-count", s.available_ip_address_count.to_string()),
            ];
            if passes(filters, &facts, &s.tags) {
                out.push(s);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_addresses_are_the_first_four_and_the_last() {
        let c = Cidr::parse("10.0.0.0/28").unwrap();
        assert_eq!(usable_addresses(&c), 11);
        for n in [0, 1, 2, 3, 15] {
            assert!(is_reserved(&c, c.nth(n).unwrap()), "{n}");
        }
        for n in 4..15 {
            assert!(!is_reserved(&c, c.nth(n).unwrap()), "{n}");
        }
    }
}
