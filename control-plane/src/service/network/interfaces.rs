//! Network interfaces: DescribeNetworkInterfaces, DeleteNetworkInterface
//! (only a detached one: kept after its instance ended, DeleteOnTermination
//! false), the interfaces of instances in DescribeInstances
//! ([`Service::with_network`]), the groups of an instance's primary
//! interface (ModifyInstanceAttribute groupSet), and what becomes of an
//! instance's interfaces once its host confirmed it gone
//! ([`release_interfaces`]). A launch's interfaces are made by the launch
//! (`service::launch`).

use super::fanout::lock_groups;
use super::filters::{check_filter_names, passes, yes_no, Filters};
use super::groups::MAX_GROUPS_PER_INTERFACE;
use super::relay::{self, Change};
use super::util::{check_id, opt_list, private_dns_name, tags_into};
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::{Caller, Service};
use nimbus_proto::api::{GroupRef, InterfaceAssociation, InterfaceAttachment, NetworkInterface};
use sqlx::PgConnection;
use std::collections::{BTreeSet, HashMap};

/// Device indexes 0 to 7.
pub const MAX_INTERFACES: usize = 8;

#[derive(sqlx::FromRow)]
struct InterfaceRow {
    id: String,
    subnet_id: String,
    vpc_id: String,
    availability_zone: String,
    private_ip: String,
    mac: String,
    instance_id: Option<String>,
    device_index: Option<i32>,
    attachment_id: Option<String>,
    delete_on_termination: bool,
    attached_at: Option<chrono::DateTime<chrono::Utc>>,
    public_ip: Option<String>,
    allocation_id: Option<String>,
    association_id: Option<String>,
    group_ids: Vec<String>,
    group_names: Vec<String>,
}

const INTERFACE_SELECT: &str = "SELECT n.id, n.subnet_id, n.vpc_id, s.availability_zone, host(n.private_ip) AS private_ip, n.mac, \
        n.instance_id, n.device_index, n.attachment_id, n.delete_on_termination, n.attached_at, \
        host(p.public_ip) AS public_ip, p.allocation_id, p.association_id, \
        ARRAY(SELECT g.id FROM network_interface_groups ng JOIN security_groups g ON g.id = ng.group_id \
              WHERE ng.interface_id = n.id ORDER BY g.id) AS group_ids, \
        ARRAY(SELECT g.name FROM network_interface_groups ng JOIN security_groups g ON g.id = ng.group_id \
              WHERE ng.interface_id = n.id ORDER BY g.id) AS group_names \
     FROM network_interfaces n JOIN subnets s ON s.id = n.subnet_id \
     LEFT JOIN public_addresses p ON p.network_interface_id = n.id";

impl InterfaceRow {
    fn view(self, owner: &str, region: &str) -> NetworkInterface {
        let attachment = match (self.instance_id, self.device_index, self.attachment_id) {
            (Some(instance_id), Some(idx), Some(attachment_id)) => Some(InterfaceAttachment {
                attachment_id,
                instance_id,
                device_index: idx as u32,
                status: "attached".into(),
                attach_time: self.attached_at,
                delete_on_termination: self.delete_on_termination,
            }),
            _ => None,
        };
        NetworkInterface {
            status: if attachment.is_some() { "in-use" } else { "available" }.to_string(),
            private_dns_name: private_dns_name(&self.private_ip, region),
            network_interface_id: self.id,
            subnet_id: self.subnet_id,
            vpc_id: self.vpc_id,
            availability_zone: self.availability_zone,
            private_ip_address: self.private_ip,
            mac_address: self.mac,
            groups: self
                .group_ids
                .into_iter()
                .zip(self.group_names)
                .map(|(group_id, group_name)| GroupRef { group_id, group_name })
                .collect(),
            attachment,
            association: self.public_ip.map(|public_ip| InterfaceAssociation {
                public_ip,
                allocation_id: self.allocation_id,
                association_id: self.association_id,
            }),
            owner_id: owner.to_string(),
            tags: Vec::new(),
        }
    }
}

impl Service {
    /// Interfaces of the caller, by id and/or instance.
    pub(crate) async fn interfaces(
        &self,
        caller: &Caller,
        ids: Option<&[String]>,
        instances: Option<&[String]>,
    ) -> Result<Vec<NetworkInterface>> {
        let rows = sqlx::query_as::<_, InterfaceRow>(&format!(
            "{INTERFACE_SELECT} WHERE n.account_id = $1 AND ($2::text[] IS NULL OR n.id = ANY($2)) \
               AND ($3::text[] IS NULL OR n.instance_id = ANY($3)) ORDER BY n.instance_id, n.device_index, n.id"
        ))
        .bind(&caller.account_id)
        .bind(ids)
        .bind(instances)
        .fetch_all(&self.db)
        .await?;
        Ok(rows.into_iter().map(|r| r.view(&caller.account_id, &self.config.region)).collect())
    }

    pub async fn describe_network_interfaces(
        &self,
        caller: &Caller,
        eni_ids: &[String],
        filters: &Filters,
    ) -> Result<Vec<NetworkInterface>> {
        for id in eni_ids {
            check_id(ids::NETWORK_INTERFACE, id, ServiceError::NetworkInterfaceIdMalformed)?;
        }
        check_filter_names(
            filters,
            &[
                "network-interface-id",
                "vpc-id",
                "subnet-id",
                "availability-zone",
                "private-ip-address",
                "addresses.private-ip-address",
                "private-dns-name",
                "mac-address",
                "status",
                "group-id",
                "group-name",
                "attachment.instance-id",
                "attachment.attachment-id",
                "attachment.device-index",
                "attachment.status",
                "attachment.delete-on-termination",
                "association.public-ip",
                "association.allocation-id",
                "association.association-id",
                "owner-id",
            ],
        )?;
        let mut list = self.interfaces(caller, opt_list(eni_ids).as_deref(), None).await?;
        if let Some(missing) = eni_ids.iter().find(|id| !list.iter().any(|n| &n.network_interface_id == *id)) {
            return Err(ServiceError::NetworkInterfaceNotFound(missing.clone()));
        }
        let mut tags = self.tags_of(caller, &list.iter().map(|n| n.network_interface_id.clone()).collect::<Vec<_>>()).await?;
        for n in &mut list {
            n.tags = tags_into(&mut tags, &n.network_interface_id);
        }
        list.retain(|n| {
            let mut facts = vec![
                ("network-interface-id", n.network_interface_id.clone()),
                ("vpc-id", n.vpc_id.clone()),
                ("subnet-id", n.subnet_id.clone()),
                ("availability-zone", n.availability_zone.clone()),
                ("private-ip-address", n.private_ip_address.clone()),
                ("addresses.private-ip-address", n.private_ip_address.clone()),
                ("private-dns-name", n.private_dns_name.clone()),
                ("mac-address", n.mac_address.clone()),
                ("status", n.status.clone()),
                ("owner-id", n.owner_id.clone()),
            ];
            for g in &n.groups {
                facts.push(("group-id", g.group_id.clone()));
                facts.push(("group-name", g.group_name.clone()));
            }
            if let Some(a) = &n.attachment {
                facts.push(("attachment.instance-id", a.instance_id.clone()));
                facts.push(("attachment.attachment-id", a.attachment_id.clone()));
                facts.push(("attachment.device-index", a.device_index.to_string()));
                facts.push(("attachment.status", a.status.clone()));
                facts.push(("attachment.delete-on-termination", yes_no(a.delete_on_termination)));
            }
            if let Some(a) = &n.association {
                facts.push(("association.public-ip", a.public_ip.clone()));
                if let Some(x) = &a.allocation_id {
                    facts.push(("association.allocation-id", x.clone()));
                }
                if let Some(x) = &a.association_id {
                    facts.push(("association.association-id", x.clone()));
                }
            }
            passes(filters, &facts, &n.tags)
        });
        Ok(list)
    }

    /// Deletes an interface that is not attached (one kept after its
    /// instance ended, DeleteOnTermination false); its address returns to
    /// the subnet and an Elastic IP on it is disassociated.
    pub async fn delete_network_interface(&self, caller: &Caller, eni_id: &str) -> Result<()> {
        check_id(ids::NETWORK_INTERFACE, eni_id, ServiceError::NetworkInterfaceIdMalformed)?;
        let mut tx = self.db.begin().await?;
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT instance_id FROM network_interfaces WHERE id = $1 AND account_id = $2 FOR UPDATE")
                .bind(eni_id)
                .bind(&caller.account_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (instance,) = row.ok_or_else(|| ServiceError::NetworkInterfaceNotFound(eni_id.to_string()))?;
        if let Some(i) = instance {
            return Err(ServiceError::DependencyViolation(format!("Network interface '{eni_id}' is currently in use by {i}.")));
        }
        sqlx::query("UPDATE public_addresses SET network_interface_id = NULL, association_id = NULL WHERE network_interface_id = $1 AND allocation_id IS NOT NULL")
            .bind(eni_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM public_addresses WHERE network_interface_id = $1").bind(eni_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM network_interfaces WHERE id = $1").bind(eni_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = $2")
            .bind(&caller.account_id)
            .bind(eni_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Adds the network of each instance (its interfaces) to its view.
    pub(crate) async fn with_network(&self, caller: &Caller, instances: &mut [nimbus_proto::api::Instance]) -> Result<()> {
        if instances.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = instances.iter().map(|i| i.instance_id.clone()).collect();
        let mut by_instance: HashMap<String, Vec<NetworkInterface>> = HashMap::new();
        for n in self.interfaces(caller, None, Some(ids.as_slice())).await? {
            if let Some(a) = &n.attachment {
                by_instance.entry(a.instance_id.clone()).or_default().push(n);
            }
        }
        for i in instances {
            let nics = by_instance.remove(&i.instance_id).unwrap_or_default();
            if let Some(p) = nics.iter().find(|n| n.attachment.as_ref().is_some_and(|a| a.device_index == 0)) {
                i.private_ip_address = Some(p.private_ip_address.clone());
                i.private_dns_name = Some(p.private_dns_name.clone());
                i.public_ip_address = p.association.as_ref().map(|a| a.public_ip.clone());
                i.vpc_id = Some(p.vpc_id.clone());
                i.subnet_id = Some(p.subnet_id.clone());
            }
            let groups: BTreeSet<GroupRef> = nics.iter().flat_map(|n| n.groups.iter().cloned()).collect();
            i.security_groups = groups.into_iter().collect();
            i.network_interfaces = nics;
        }
        Ok(())
    }

    /// Replaces the security groups of an instance's primary interface
    /// (ModifyInstanceAttribute groupSet), in the caller's transaction,
    /// which holds the instance's row lock.
    pub(crate) async fn set_instance_groups(
        &self,
        conn: &mut PgConnection,
        caller: &Caller,
        instance_id: &str,
        group_ids: &[String],
    ) -> Result<()> {
        if group_ids.is_empty() {
            return Err(ServiceError::MissingParameter("GroupId".into()));
        }
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT n.id, n.vpc_id, i.host_id FROM network_interfaces n JOIN instances i ON i.id = n.instance_id \
             WHERE n.instance_id = $1 AND n.device_index = 0",
        )
        .bind(instance_id)
        .fetch_optional(&mut *conn)
        .await?;
        let (eni, vpc_id, host) =
            row.ok_or_else(|| ServiceError::IncorrectInstanceState(format!("The instance '{instance_id}' has no network interface")))?;
        let new = self.groups_in_vpc(caller, &vpc_id, group_ids, &[]).await?;
        if new.len() > MAX_GROUPS_PER_INTERFACE {
            return Err(ServiceError::SecurityGroupsPerInterfaceLimitExceeded(format!(
                "An interface has at most {MAX_GROUPS_PER_INTERFACE} security groups"
            )));
        }
        let old: Vec<(String,)> = sqlx::query_as("SELECT group_id FROM network_interface_groups WHERE interface_id = $1")
            .bind(&eni)
            .fetch_all(&mut *conn)
            .await?;
        let mut all: BTreeSet<String> = old.into_iter().map(|r| r.0).collect();
        all.extend(new.iter().cloned());
        let locked = lock_groups(conn, &all).await?;
        if let Some(gone) = new.iter().find(|g| !locked.contains(g)) {
            return Err(ServiceError::GroupNotFound(format!("The security group '{gone}' does not exist")));
        }
        sqlx::query("DELETE FROM network_interface_groups WHERE interface_id = $1").bind(&eni).execute(&mut *conn).await?;
        sqlx::query("INSERT INTO network_interface_groups (interface_id, group_id) SELECT $1, g FROM unnest($2::text[]) AS g")
            .bind(&eni)
            .bind(&new)
            .execute(&mut *conn)
            .await?;
        relay::note(conn, &Change { members_of: all, ..Default::default() }).await?;
        self.touch_instances(conn, &BTreeSet::from([host]), vec![instance_id.to_string()]).await
    }
}

/// An interface of an instance whose host confirmed it gone.
#[derive(sqlx::FromRow)]
struct EndedNic {
    id: String,
    vpc_id: String,
    delete_on_termination: bool,
    account_id: String,
}

/// Frees the interfaces of instances whose host confirmed they are gone
/// (the report transaction, which holds their rows): those with
/// DeleteOnTermination are deleted (their address returns to the subnet),
/// the others detached; addresses assigned at launch return to the pool,
/// Elastic IPs on deleted interfaces are disassociated. Records what other
/// hosts must learn for the network relay; returns the hosts to bump now
/// (the reporting host, when anything changed).
pub(crate) async fn release_interfaces(conn: &mut PgConnection, instances: &[String], host_id: &str) -> Result<BTreeSet<String>> {
    let rows: Vec<EndedNic> = sqlx::query_as(
        "SELECT id, vpc_id, delete_on_termination, account_id FROM network_interfaces WHERE instance_id = ANY($1) ORDER BY id",
    )
    .bind(instances)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(BTreeSet::new());
    }
    let all: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    let vpcs: BTreeSet<String> = rows.iter().map(|r| r.vpc_id.clone()).collect();
    let accounts: Vec<String> = rows.iter().map(|r| r.account_id.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let groups: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT group_id FROM network_interface_groups WHERE interface_id = ANY($1)")
        .bind(&all)
        .fetch_all(&mut *conn)
        .await?;
    let groups: BTreeSet<String> = groups.into_iter().map(|r| r.0).collect();
    sqlx::query("SELECT 1 FROM network_interfaces WHERE id = ANY($1) ORDER BY id FOR UPDATE").bind(&all).execute(&mut *conn).await?;
    let (doomed, kept): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.delete_on_termination);
    let doomed: Vec<String> = doomed.into_iter().map(|r| r.id).collect();
    let kept: Vec<String> = kept.into_iter().map(|r| r.id).collect();
    sqlx::query("DELETE FROM public_addresses WHERE network_interface_id = ANY($1) AND allocation_id IS NULL")
        .bind(&all)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE public_addresses SET network_interface_id = NULL, association_id = NULL WHERE network_interface_id = ANY($1)")
        .bind(&doomed)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM network_interfaces WHERE id = ANY($1)").bind(&doomed).execute(&mut *conn).await?;
    sqlx::query("DELETE FROM tags WHERE account_id = ANY($1) AND resource_id = ANY($2)")
        .bind(&accounts)
        .bind(&doomed)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE network_interfaces SET instance_id = NULL, device_index = NULL, attachment_id = NULL, attached_at = NULL WHERE id = ANY($1)",
    )
    .bind(&kept)
    .execute(&mut *conn)
    .await?;
    relay::note(conn, &Change { vpcs, members_of: groups, rules_of: BTreeSet::new() }).await?;
    Ok(BTreeSet::from([host_id.to_string()]))
}
