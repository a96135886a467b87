//! Security groups and the operations on their rules: CreateSecurityGroup
//! (no inbound, all outbound, as EC2), DeleteSecurityGroup (not while an
//! interface uses the group or another group's rule names it),
//! DescribeSecurityGroups, AuthorizeSecurityGroupIngress/Egress and
//! RevokeSecurityGroupIngress/Egress (all or nothing; a rule is stored
//! once, see `rules`), DescribeSecurityGroupRules. A group a rule names
//! must be the caller's and in the group's VPC. A rule change reaches the
//! hosts with an interface in the group through the relay.

use super::fanout::lock_groups;
use super::filters::{check_filter_names, passes, Filters};
use super::relay::{self, Change};
use super::rules::{insert_rules, ports_of, protocol_of, rule_view, RuleKey, RuleRow, RULE_COLUMNS};
use super::util::{check_id, opt_list, parse_cidr, tags_into};
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::{Caller, Service};
use nimbus_proto::api::{IpPermission, SecurityGroup, SecurityGroupRule};
use std::collections::{BTreeSet, HashMap};

pub const MAX_GROUPS_PER_VPC: i64 = 500;
/// Rules per group and direction (EC2's default quota).
pub const MAX_RULES_PER_DIRECTION: i64 = 60;
pub const MAX_GROUPS_PER_INTERFACE: usize = 5;

/// A security group named by id, or by name (in the default VPC, as EC2's `GroupName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupSel {
    Id(String),
    Name(String),
}

/// A security group as DescribeSecurityGroups reads it.
#[derive(sqlx::FromRow)]
struct GroupRow {
    id: String,
    name: String,
    description: String,
    vpc_id: String,
}

impl Service {
    /// The group's id and VPC; a name is looked up in `vpc_id`, or in the
    /// default VPC without one.
    async fn resolve_group(&self, caller: &Caller, sel: &GroupSel, vpc_id: Option<&str>) -> Result<(String, String)> {
        let row: Option<(String, String)> = match sel {
            GroupSel::Id(id) => {
                check_id(ids::SECURITY_GROUP, id, ServiceError::GroupIdMalformed)?;
                sqlx::query_as("SELECT id, vpc_id FROM security_groups WHERE id = $1 AND account_id = $2")
                    .bind(id)
                    .bind(&caller.account_id)
                    .fetch_optional(&self.db)
                    .await?
            }
            GroupSel::Name(name) => {
                let vpc = match vpc_id {
                    Some(v) => v.to_string(),
                    None => self.ensure_default_network(&caller.account_id).await?,
                };
                sqlx::query_as("SELECT id, vpc_id FROM security_groups WHERE name = $1 AND vpc_id = $2 AND account_id = $3")
                    .bind(name)
                    .bind(&vpc)
                    .bind(&caller.account_id)
                    .fetch_optional(&self.db)
                    .await?
            }
        };
        row.ok_or_else(|| {
            ServiceError::GroupNotFound(match sel {
                GroupSel::Id(id) => format!("The security group '{id}' does not exist"),
                GroupSel::Name(n) => format!("The security group '{n}' does not exist in the VPC"),
            })
        })
    }

    /// Group ids and names resolved in `vpc_id`: each must be the caller's
    /// and in that VPC. Returns distinct ids, sorted.
    pub(crate) async fn groups_in_vpc(&self, caller: &Caller, vpc_id: &str, group_ids: &[String], names: &[String]) -> Result<Vec<String>> {
        for id in group_ids {
            check_id(ids::SECURITY_GROUP, id, ServiceError::GroupIdMalformed)?;
        }
        if group_ids.is_empty() && names.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, name FROM security_groups WHERE account_id = $1 AND vpc_id = $2 AND (id = ANY($3) OR name = ANY($4))",
        )
        .bind(&caller.account_id)
        .bind(vpc_id)
        .bind(group_ids)
        .bind(names)
        .fetch_all(&self.db)
        .await?;
        let mut out = BTreeSet::new();
        for id in group_ids {
            if !rows.iter().any(|r| &r.0 == id) {
                return Err(ServiceError::GroupNotFound(format!("The security group '{id}' does not exist in VPC '{vpc_id}'")));
            }
            out.insert(id.clone());
        }
        for name in names {
            let Some(r) = rows.iter().find(|r| &r.1 == name) else {
                return Err(ServiceError::GroupNotFound(format!("The security group '{name}' does not exist in VPC '{vpc_id}'")));
            };
            out.insert(r.0.clone());
        }
        Ok(out.into_iter().collect())
    }

    /// Creates a group (no inbound, all outbound, as EC2) in `vpc_id`, or
    /// in the default VPC.
    pub async fn create_security_group(
        &self,
        caller: &Caller,
        name: &str,
        description: &str,
        vpc_id: Option<&str>,
    ) -> Result<SecurityGroup> {
        if name.is_empty() || name.chars().count() > 255 || name.chars().any(char::is_control) {
            return Err(ServiceError::InvalidParameterValue("GroupName must be 1 to 255 characters".into()));
        }
        if name.starts_with("sg-") {
            return Err(ServiceError::InvalidParameterValue("Group names may not be in the format sg-*".into()));
        }
        if name == "default" {
            return Err(ServiceError::GroupReserved("The security group name 'default' is reserved".into()));
        }
        if description.is_empty() {
            return Err(ServiceError::MissingParameter("GroupDescription".into()));
        }
        if description.chars().count() > 255 || description.chars().any(char::is_control) {
            return Err(ServiceError::InvalidParameterValue("GroupDescription must be at most 255 characters".into()));
        }
        let default_vpc = self.ensure_default_network(&caller.account_id).await?;
        let vpc_id = match vpc_id {
            Some(v) => {
                check_id(ids::VPC, v, ServiceError::VpcIdMalformed)?;
                v.to_string()
            }
            None => default_vpc,
        };
        let mut tx = self.db.begin().await?;
        let found: Option<(String,)> = sqlx::query_as("SELECT id FROM vpcs WHERE id = $1 AND account_id = $2 FOR KEY SHARE")
            .bind(&vpc_id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            return Err(ServiceError::VpcNotFound(vpc_id));
        }
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM security_groups WHERE vpc_id = $1").bind(&vpc_id).fetch_one(&mut *tx).await?;
        if n >= MAX_GROUPS_PER_VPC {
            return Err(ServiceError::SecurityGroupLimitExceeded(format!(
                "The maximum number of security groups per VPC ({MAX_GROUPS_PER_VPC}) has been reached."
            )));
        }
        let id = ids::new_id(ids::SECURITY_GROUP);
        sqlx::query("INSERT INTO security_groups (id, account_id, vpc_id, name, description) VALUES ($1, $2, $3, $4, $5)")
            .bind(&id)
            .bind(&caller.account_id)
            .bind(&vpc_id)
            .bind(name)
            .bind(description)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if crate::db::Constraint::GroupNamePerVpc.violated_by(&e) {
                    ServiceError::GroupDuplicate(name.to_string(), vpc_id.clone())
                } else {
                    e.into()
                }
            })?;
        let all = RuleKey { protocol: "-1", from: -1, to: -1, cidr: Some("0.0.0.0/0".into()), peer: None };
        let egress = insert_rules(&mut tx, &id, true, &[all], None).await?;
        tx.commit().await?;
        tracing::info!(group_id = %id, %vpc_id, %name, "security group created");
        Ok(SecurityGroup {
            group_id: id,
            group_name: name.to_string(),
            description: description.to_string(),
            vpc_id,
            owner_id: caller.account_id.clone(),
            ingress: vec![],
            egress,
            tags: vec![],
        })
    }

    /// Deletes a group that no interface uses and no other group's rule names.
    pub async fn delete_security_group(&self, caller: &Caller, sel: &GroupSel) -> Result<String> {
        let (id, _) = self.resolve_group(caller, sel, None).await?;
        let mut tx = self.db.begin().await?;
        let row: Option<(bool,)> = sqlx::query_as("SELECT is_default FROM security_groups WHERE id = $1 AND account_id = $2 FOR UPDATE")
            .bind(&id)
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (is_default,) = row.ok_or_else(|| ServiceError::GroupNotFound(format!("The security group '{id}' does not exist")))?;
        if is_default {
            return Err(ServiceError::CannotDelete(format!("the specified group: \"{id}\" name: \"default\" cannot be deleted by a user")));
        }
        sqlx::query("DELETE FROM security_groups WHERE id = $1").bind(&id).execute(&mut *tx).await.map_err(|e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
                ServiceError::DependencyViolation(format!("resource {id} has a dependent object"))
            }
            _ => e.into(),
        })?;
        sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = $2")
            .bind(&caller.account_id)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn describe_security_groups(
        &self,
        caller: &Caller,
        group_ids: &[String],
        names: &[String],
        filters: &Filters,
    ) -> Result<Vec<SecurityGroup>> {
        for id in group_ids {
            check_id(ids::SECURITY_GROUP, id, ServiceError::GroupIdMalformed)?;
        }
        check_filter_names(filters, &["group-id", "group-name", "description", "vpc-id", "owner-id"])?;
        let default_vpc = self.ensure_default_network(&caller.account_id).await?;
        let rows: Vec<GroupRow> = sqlx::query_as(
            "SELECT id, name, description, vpc_id FROM security_groups WHERE account_id = $1 \
               AND ($2::text[] IS NULL OR id = ANY($2)) AND ($3::text[] IS NULL OR (name = ANY($3) AND vpc_id = $4)) \
             ORDER BY created_at, id",
        )
        .bind(&caller.account_id)
        .bind(opt_list(group_ids))
        .bind(opt_list(names))
        .bind(&default_vpc)
        .fetch_all(&self.db)
        .await?;
        if let Some(missing) = group_ids.iter().find(|id| !rows.iter().any(|r| &r.id == *id)) {
            return Err(ServiceError::GroupNotFound(format!("The security group '{missing}' does not exist")));
        }
        if let Some(missing) = names.iter().find(|n| !rows.iter().any(|r| &r.name == *n)) {
            return Err(ServiceError::GroupNotFound(format!(
                "The security group '{missing}' does not exist in default VPC '{default_vpc}'"
            )));
        }
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let rules = sqlx::query_as::<_, RuleRow>(&format!(
            "SELECT {RULE_COLUMNS} FROM security_group_rules WHERE group_id = ANY($1) ORDER BY group_id, egress, protocol, from_port, to_port, cidr, peer_group_id"
        ))
        .bind(&ids)
        .fetch_all(&self.db)
        .await?;
        let mut by_group: HashMap<String, (Vec<SecurityGroupRule>, Vec<SecurityGroupRule>)> = HashMap::new();
        for r in rules {
            let k = r.key()?;
            let v = rule_view(r.id.clone(), &r.group_id, r.egress, &k, r.description.clone());
            let e = by_group.entry(r.group_id.clone()).or_default();
            if r.egress {
                e.1.push(v)
            } else {
                e.0.push(v)
            }
        }
        let mut tags = self.tags_of(caller, &ids).await?;
        Ok(rows
            .into_iter()
            .map(|GroupRow { id, name, description, vpc_id }| {
                let (ingress, egress) = by_group.remove(&id).unwrap_or_default();
                SecurityGroup {
                    tags: tags_into(&mut tags, &id),
                    group_id: id,
                    group_name: name,
                    description,
                    vpc_id,
                    owner_id: caller.account_id.clone(),
                    ingress,
                    egress,
                }
            })
            .filter(|g| {
                let facts = [
                    ("group-id", g.group_id.clone()),
                    ("group-name", g.group_name.clone()),
                    ("description", g.description.clone()),
                    ("vpc-id", g.vpc_id.clone()),
                    ("owner-id", g.owner_id.clone()),
                ];
                passes(filters, &facts, &g.tags)
            })
            .collect())
    }

    /// The rules of IpPermissions, with referenced groups resolved in `vpc_id`.
    async fn rule_keys(&self, caller: &Caller, vpc_id: &str, perms: &[IpPermission]) -> Result<Vec<(RuleKey, Option<String>)>> {
        if perms.is_empty() {
            return Err(ServiceError::MissingParameter("IpPermissions".into()));
        }
        let mut out = Vec::new();
        for p in perms {
            let protocol = protocol_of(&p.protocol)?;
            let (from, to) = ports_of(protocol, p.from_port, p.to_port)?;
            if p.cidrs.is_empty() && p.group_ids.is_empty() && p.group_names.is_empty() {
                return Err(ServiceError::PermissionMalformed("A permission must name a CIDR or a security group".into()));
            }
            if let Some(d) = &p.description {
                if d.chars().count() > 255 || d.chars().any(char::is_control) {
                    return Err(ServiceError::InvalidParameterValue("A rule description is at most 255 characters".into()));
                }
            }
            for c in &p.cidrs {
                let cidr = parse_cidr(c, "CidrIp")?;
                out.push((RuleKey { protocol, from, to, cidr: Some(cidr.to_string()), peer: None }, p.description.clone()));
            }
            for g in self.groups_in_vpc(caller, vpc_id, &p.group_ids, &p.group_names).await? {
                out.push((RuleKey { protocol, from, to, cidr: None, peer: Some(g) }, p.description.clone()));
            }
        }
        Ok(out)
    }

    /// Adds allow rules to a group; all or nothing (a rule that exists,
    /// even twice in the request, is InvalidPermission.Duplicate).
    pub async fn authorize_security_group(
        &self,
        caller: &Caller,
        sel: &GroupSel,
        egress: bool,
        perms: &[IpPermission],
    ) -> Result<Vec<SecurityGroupRule>> {
        let (group_id, vpc_id) = self.resolve_group(caller, sel, None).await?;
        let keys = self.rule_keys(caller, &vpc_id, perms).await?;
        let mut seen = BTreeSet::new();
        for (k, _) in &keys {
            if !seen.insert(k.clone()) {
                return Err(ServiceError::PermissionDuplicate(format!("the specified rule \"{}\" already exists", k.describe())));
            }
        }
        crate::service::retrying(|| self.try_authorize(&group_id, egress, &keys)).await
    }

    async fn try_authorize(&self, group_id: &str, egress: bool, keys: &[(RuleKey, Option<String>)]) -> Result<Vec<SecurityGroupRule>> {
        let mut tx = self.db.begin().await?;
        let mut groups: BTreeSet<String> = keys.iter().filter_map(|(k, _)| k.peer.clone()).collect();
        groups.insert(group_id.to_string());
        let locked = lock_groups(&mut tx, &groups).await?;
        if let Some(gone) = groups.iter().find(|g| !locked.contains(g)) {
            return Err(ServiceError::GroupNotFound(format!("The security group '{gone}' does not exist")));
        }
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM security_group_rules WHERE group_id = $1 AND egress = $2")
            .bind(group_id)
            .bind(egress)
            .fetch_one(&mut *tx)
            .await?;
        if n + keys.len() as i64 > MAX_RULES_PER_DIRECTION {
            return Err(ServiceError::RulesPerSecurityGroupLimitExceeded(format!(
                "The maximum number of rules per security group and direction ({MAX_RULES_PER_DIRECTION}) has been reached."
            )));
        }
        let just_keys: Vec<RuleKey> = keys.iter().map(|(k, _)| k.clone()).collect();
        let descriptions: Vec<Option<String>> = keys.iter().map(|(_, d)| d.clone()).collect();
        let created = insert_rules(&mut tx, group_id, egress, &just_keys, Some(&descriptions)).await?;
        if created.len() < keys.len() {
            let dup = just_keys.iter().find(|k| {
                !created.iter().any(|c| {
                    c.protocol == k.protocol
                        && c.from_port == k.from
                        && c.to_port == k.to
                        && c.cidr == k.cidr
                        && c.referenced_group_id == k.peer
                })
            });
            return Err(ServiceError::PermissionDuplicate(format!(
                "the specified rule \"{}\" already exists",
                dup.map(RuleKey::describe).unwrap_or_default()
            )));
        }
        let change = Change { rules_of: BTreeSet::from([group_id.to_string()]), ..Default::default() };
        relay::note(&mut tx, &change).await?;
        tx.commit().await?;
        tracing::info!(%group_id, egress, rules = created.len(), "security group rules authorized");
        Ok(created)
    }

    /// Removes rules given as permissions, or by rule id; all or nothing (a
    /// rule that does not exist is InvalidPermission.NotFound).
    pub async fn revoke_security_group(
        &self,
        caller: &Caller,
        sel: &GroupSel,
        egress: bool,
        perms: &[IpPermission],
        rule_ids: &[String],
    ) -> Result<()> {
        let (group_id, vpc_id) = self.resolve_group(caller, sel, None).await?;
        let keys: Vec<RuleKey> = if rule_ids.is_empty() {
            self.rule_keys(caller, &vpc_id, perms).await?.into_iter().map(|(k, _)| k).collect()
        } else {
            Vec::new()
        };
        let (group_id, keys) = (&group_id, &keys);
        crate::service::retrying(|| async move {
            let mut tx = self.db.begin().await?;
            let mut groups: BTreeSet<String> = keys.iter().filter_map(|k| k.peer.clone()).collect();
            groups.insert(group_id.clone());
            lock_groups(&mut tx, &groups).await?;
            let rows = sqlx::query_as::<_, RuleRow>(&format!(
                "SELECT {RULE_COLUMNS} FROM security_group_rules WHERE group_id = $1 AND egress = $2"
            ))
            .bind(group_id)
            .bind(egress)
            .fetch_all(&mut *tx)
            .await?;
            let mut doomed = BTreeSet::new();
            for k in keys {
                let mut found = None;
                for r in &rows {
                    if &r.key()? == k {
                        found = Some(r.id.clone());
                    }
                }
                let id = found.ok_or_else(|| {
                    ServiceError::PermissionNotFound(format!(
                        "The specified rule \"{}\" does not exist in this security group.",
                        k.describe()
                    ))
                })?;
                doomed.insert(id);
            }
            for id in rule_ids {
                if !rows.iter().any(|r| &r.id == id) {
                    return Err(ServiceError::SecurityGroupRuleNotFound(id.clone()));
                }
                doomed.insert(id.clone());
            }
            let doomed: Vec<String> = doomed.into_iter().collect();
            sqlx::query("DELETE FROM security_group_rules WHERE id = ANY($1)").bind(&doomed).execute(&mut *tx).await?;
            let change = Change { rules_of: BTreeSet::from([group_id.clone()]), ..Default::default() };
            relay::note(&mut tx, &change).await?;
            tx.commit().await?;
            tracing::info!(%group_id, egress, rules = doomed.len(), "security group rules revoked");
            Ok::<_, ServiceError>(())
        })
        .await
    }

    pub async fn describe_security_group_rules(
        &self,
        caller: &Caller,
        rule_ids: &[String],
        filters: &Filters,
    ) -> Result<Vec<SecurityGroupRule>> {
        check_filter_names(filters, &["group-id", "security-group-rule-id"])?;
        let rows = sqlx::query_as::<_, RuleRow>(&format!(
            "SELECT {} FROM security_group_rules r JOIN security_groups g ON g.id = r.group_id \
             WHERE g.account_id = $1 AND ($2::text[] IS NULL OR r.id = ANY($2)) ORDER BY r.group_id, r.egress, r.id",
            RULE_COLUMNS.split(", ").map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", ")
        ))
        .bind(&caller.account_id)
        .bind(opt_list(rule_ids))
        .fetch_all(&self.db)
        .await?;
        if let Some(missing) = rule_ids.iter().find(|id| !rows.iter().any(|r| &r.id == *id)) {
            return Err(ServiceError::SecurityGroupRuleNotFound(missing.clone()));
        }
        let mut out = Vec::new();
        for r in rows {
            let k = r.key()?;
            let v = rule_view(r.id.clone(), &r.group_id, r.egress, &k, r.description.clone());
            if passes(filters, &[("group-id", v.group_id.clone()), ("security-group-rule-id", v.rule_id.clone())], &[]) {
                out.push(v);
            }
        }
        Ok(out)
    }
}
