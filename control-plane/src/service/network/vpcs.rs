//! VPCs: CreateVpc (a /16 to a /28, at most [`MAX_VPCS`] an account, each
//! with its default security group), DeleteVpc (not the default one, not
//! while it has subnets or groups but its default one), DescribeVpcs, and
//! the account's default VPC (172.31.0.0/16) with a default subnet (a /20)
//! per availability zone of the registered hosts and its default group,
//! created lazily by [`Service::ensure_default_network`].

use super::filters::{check_filter_names, passes, yes_no, Filters};
use super::relay::{self, Change};
use super::rules::create_default_group;
use super::util::{check_id, db_cidr, opt_list, parse_cidr, tags_into};
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::{Caller, Service};
use nimbus_proto::api::Vpc;
use nimbus_proto::network::Cidr;
use std::collections::BTreeSet;

pub const DEFAULT_VPC_CIDR: &str = "172.31.0.0/16";
/// VPCs an account may have, the default one included (EC2's default quota).
pub const MAX_VPCS: i64 = 5;

impl Service {
    /// The account's default VPC, created with its default security group
    /// and a default subnet per zone of the registered hosts if missing
    /// (a zone that appeared since gets its subnet now). Idempotent and
    /// safe under concurrency: its own transaction, the VPC row locked while
    /// subnets are added.
    pub async fn ensure_default_network(&self, account_id: &str) -> Result<String> {
        crate::service::retrying(|| self.try_ensure_default_network(account_id)).await
    }

    async fn try_ensure_default_network(&self, account_id: &str) -> Result<String> {
        const MISSING_ZONES: &str = "SELECT DISTINCT h.availability_zone FROM hosts h WHERE NOT EXISTS \
             (SELECT 1 FROM subnets s WHERE s.vpc_id = $1 AND s.default_for_az AND s.availability_zone = h.availability_zone) ORDER BY 1";
        let existing: Option<(String, Vec<String>)> = sqlx::query_as(&format!(
            "SELECT v.id, ARRAY({}) FROM vpcs v WHERE v.account_id = $2 AND v.is_default",
            MISSING_ZONES.replace("$1", "v.id")
        ))
        .bind(account_id)
        .bind(account_id)
        .fetch_optional(&self.db)
        .await?;
        if let Some((id, missing)) = &existing {
            if missing.is_empty() {
                return Ok(id.clone());
            }
        }
        let mut tx = self.db.begin().await?;
        let new_id = ids::new_id(ids::VPC);
        let inserted = sqlx::query(
            "INSERT INTO vpcs (id, account_id, cidr, is_default) VALUES ($1, $2, $3::cidr, true) \
             ON CONFLICT (account_id) WHERE is_default DO NOTHING",
        )
        .bind(&new_id)
        .bind(account_id)
        .bind(DEFAULT_VPC_CIDR)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 1 {
            create_default_group(&mut tx, account_id, &new_id).await?;
        }
        let (vpc_id, vpc_cidr): (String, String) =
            sqlx::query_as("SELECT id, cidr::text FROM vpcs WHERE account_id = $1 AND is_default FOR NO KEY UPDATE")
                .bind(account_id)
                .fetch_one(&mut *tx)
                .await?;
        let missing: Vec<(String,)> = sqlx::query_as(MISSING_ZONES).bind(&vpc_id).fetch_all(&mut *tx).await?;
        if !missing.is_empty() {
            let vpc = db_cidr(&vpc_cidr)?;
            let taken: Vec<(String,)> =
                sqlx::query_as("SELECT cidr::text FROM subnets WHERE vpc_id = $1").bind(&vpc_id).fetch_all(&mut *tx).await?;
            let mut taken: Vec<Cidr> = taken.iter().map(|t| db_cidr(&t.0)).collect::<Result<_>>()?;
            for (zone,) in missing {
                let block = (0..vpc.size() / 4096)
                    .filter_map(|i| Some(Cidr { addr: vpc.nth(i * 4096)?, prefix: 20 }))
                    .find(|c| !taken.iter().any(|t| t.overlaps(c)));
                let Some(block) = block else {
                    tracing::warn!(%account_id, %zone, "no free /20 left in the default VPC for the zone's default subnet");
                    continue;
                };
                sqlx::query(
                    "INSERT INTO subnets (id, account_id, vpc_id, availability_zone, cidr, default_for_az, map_public_ip_on_launch) \
                     VALUES ($1, $2, $3, $4, $5::cidr, true, $6)",
                )
                .bind(ids::new_id(ids::SUBNET))
                .bind(account_id)
                .bind(&vpc_id)
                .bind(&zone)
                .bind(block.to_string())
                .bind(self.config.public_pool.is_some())
                .execute(&mut *tx)
                .await?;
                taken.push(block);
            }
            let change = Change { vpcs: BTreeSet::from([vpc_id.clone()]), ..Default::default() };
            relay::note(&mut tx, &change).await?;
        }
        tx.commit().await?;
        Ok(vpc_id)
    }

    pub async fn create_vpc(&self, caller: &Caller, cidr_block: &str) -> Result<Vpc> {
        let cidr = parse_cidr(cidr_block, "cidrBlock")?;
        if !(16..=28).contains(&cidr.prefix) {
            return Err(ServiceError::VpcRange(format!("The CIDR '{cidr}' is invalid: a VPC is a /16 to a /28")));
        }
        self.ensure_default_network(&caller.account_id).await?;
        let mut tx = self.db.begin().await?;
        sqlx::query("SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE").bind(&caller.account_id).execute(&mut *tx).await?;
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM vpcs WHERE account_id = $1").bind(&caller.account_id).fetch_one(&mut *tx).await?;
        if n >= MAX_VPCS {
            return Err(ServiceError::VpcLimitExceeded(format!("The maximum number of VPCs ({MAX_VPCS}) has been reached.")));
        }
        let id = ids::new_id(ids::VPC);
        sqlx::query("INSERT INTO vpcs (id, account_id, cidr) VALUES ($1, $2, $3::cidr)")
            .bind(&id)
            .bind(&caller.account_id)
            .bind(cidr.to_string())
            .execute(&mut *tx)
            .await?;
        create_default_group(&mut tx, &caller.account_id, &id).await?;
        tx.commit().await?;
        tracing::info!(vpc_id = %id, %cidr, "VPC created");
        Ok(Vpc {
            vpc_id: id,
            cidr_block: cidr.to_string(),
            is_default: false,
            state: "available".into(),
            owner_id: caller.account_id.clone(),
            tags: vec![],
        })
    }

    /// Deletes a VPC with no subnets and no groups but its default one.
    pub async fn delete_vpc(&self, caller: &Caller, vpc_id: &str) -> Result<()> {
        check_id(ids::VPC, vpc_id, ServiceError::VpcIdMalformed)?;
        let mut tx = self.db.begin().await?;
        let row: Option<(bool,)> = sqlx::query_as("SELECT is_default FROM vpcs WHERE id = $1 AND account_id = $2 FOR UPDATE")
            .bind(vpc_id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (is_default,) = row.ok_or_else(|| ServiceError::VpcNotFound(vpc_id.to_string()))?;
        if is_default {
            return Err(ServiceError::OperationNotPermitted(format!("The default VPC {vpc_id} cannot be deleted in Nimbus")));
        }
        let (subnets, groups): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM subnets WHERE vpc_id = $1), (SELECT count(*) FROM security_groups WHERE vpc_id = $1 AND NOT is_default)",
        )
        .bind(vpc_id)
        .fetch_one(&mut *tx)
        .await?;
        if subnets > 0 || groups > 0 {
            return Err(ServiceError::DependencyViolation(format!(
                "The vpc '{vpc_id}' has dependencies and cannot be deleted ({subnets} subnet(s), {groups} security group(s))."
            )));
        }
        let dependent = |e: sqlx::Error| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
                ServiceError::DependencyViolation(format!("The vpc '{vpc_id}' has dependencies and cannot be deleted."))
            }
            _ => e.into(),
        };
        sqlx::query("DELETE FROM security_groups WHERE vpc_id = $1").bind(vpc_id).execute(&mut *tx).await.map_err(dependent)?;
        sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = $2")
            .bind(&caller.account_id)
            .bind(vpc_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM vpcs WHERE id = $1").bind(vpc_id).execute(&mut *tx).await.map_err(dependent)?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn describe_vpcs(&self, caller: &Caller, vpc_ids: &[String], filters: &Filters) -> Result<Vec<Vpc>> {
        for id in vpc_ids {
            check_id(ids::VPC, id, ServiceError::VpcIdMalformed)?;
        }
        check_filter_names(
            filters,
            &[
                "vpc-id",
                "cidr",
                "cidr-block",
                "cidrBlock",
                "cidr-block-association.cidr-block",
                "is-default",
                "isDefault",
                "state",
                "owner-id",
            ],
        )?;
        self.ensure_default_network(&caller.account_id).await?;
        let rows: Vec<(String, String, bool)> = sqlx::query_as(
            "SELECT id, cidr::text, is_default FROM vpcs WHERE account_id = $1 AND ($2::text[] IS NULL OR id = ANY($2)) ORDER BY created_at, id",
        )
        .bind(&caller.account_id)
        .bind(opt_list(vpc_ids))
        .fetch_all(&self.db)
        .await?;
        if let Some(missing) = vpc_ids.iter().find(|id| !rows.iter().any(|r| &r.0 == *id)) {
            return Err(ServiceError::VpcNotFound(missing.clone()));
        }
        let mut tags = self.tags_of(caller, &rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()).await?;
        Ok(rows
            .into_iter()
            .map(|(id, cidr, is_default)| Vpc {
                tags: tags_into(&mut tags, &id),
                vpc_id: id,
                cidr_block: cidr,
                is_default,
                state: "available".into(),
                owner_id: caller.account_id.clone(),
            })
            .filter(|v| {
                let facts = [
                    ("vpc-id", v.vpc_id.clone()),
                    ("cidr", v.cidr_block.clone()),
                    ("cidr-block", v.cidr_block.clone()),
                    ("cidrBlock", v.cidr_block.clone()),
                    ("cidr-block-association.cidr-block", v.cidr_block.clone()),
                    ("is-default", yes_no(v.is_default)),
                    ("isDefault", yes_no(v.is_default)),
                    ("state", v.state.clone()),
                    ("owner-id", v.owner_id.clone()),
                ];
                passes(filters, &facts, &v.tags)
            })
            .collect())
    }
}
