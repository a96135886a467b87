//! Public addresses: Elastic IPs (AllocateAddress, AssociateAddress,
//! DisassociateAddress, ReleaseAddress, DescribeAddresses) and the
//! addresses a launch assigns, both taken from the operator's pool
//! (`--public-pool`). An Elastic IP counts against the account's limit and
//! stays allocated until released; an address assigned at launch returns
//! to the pool when its interface loses it. Associating or disassociating
//! bumps the interface's host and marks its instance changed, so a delta
//! carries the new `nics` (lock order: instance, interface, address, hosts).

use super::filters::{check_filter_names, passes, Filters};
use super::util::{check_id, tags_into};
use crate::error::{Result, ServiceError};
use crate::ids;
use crate::service::{Caller, Service};
use nimbus_proto::api::Address;
use nimbus_proto::network::Cidr;
use sqlx::PgConnection;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// An Elastic IP and what it is associated with (DescribeAddresses).
#[derive(sqlx::FromRow)]
struct AddressRow {
    allocation_id: String,
    public_ip: String,
    association_id: Option<String>,
    network_interface_id: Option<String>,
    instance_id: Option<String>,
    private_ip_address: Option<String>,
}

impl Service {
    pub(crate) fn pool(&self) -> Result<Cidr> {
        self.config.public_pool.ok_or_else(|| {
            ServiceError::InsufficientAddressCapacity("No public address pool is configured (the operator's --public-pool)".into())
        })
    }

    /// Allocates an Elastic IP from the pool, within the account's limit.
    pub async fn allocate_address(&self, caller: &Caller) -> Result<Address> {
        let pool = self.pool()?;
        let mut tx = self.db.begin().await?;
        let limit: Option<(Option<i32>,)> = sqlx::query_as("SELECT max_elastic_ips FROM accounts WHERE id = $1 FOR NO KEY UPDATE")
            .bind(&caller.account_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (limit,) = limit.ok_or_else(|| ServiceError::AccountNotFound(caller.account_id.clone()))?;
        let limit = limit.map_or(i64::from(self.config.default_max_elastic_ips), i64::from);
        let (held,): (i64,) = sqlx::query_as("SELECT count(*) FROM public_addresses WHERE account_id = $1 AND allocation_id IS NOT NULL")
            .bind(&caller.account_id)
            .fetch_one(&mut *tx)
            .await?;
        if held >= limit {
            return Err(ServiceError::AddressLimitExceeded(format!("The maximum number of addresses ({limit}) has been reached.")));
        }
        let allocation_id = ids::new_id(ids::ALLOCATION);
        let ip = allocate_public(&mut tx, pool, &caller.account_id, &[(Some(allocation_id.clone()), None)]).await?;
        tx.commit().await?;
        let public_ip = ip.into_iter().next().unwrap_or_default();
        tracing::info!(%allocation_id, %public_ip, "Elastic IP allocated");
        Ok(Address {
            allocation_id,
            public_ip,
            domain: "vpc".into(),
            association_id: None,
            instance_id: None,
            network_interface_id: None,
            private_ip_address: None,
            owner_id: caller.account_id.clone(),
            tags: vec![],
        })
    }

    /// The allocation id of an Elastic IP named by allocation id or address.
    async fn resolve_address(&self, caller: &Caller, allocation_id: Option<&str>, public_ip: Option<&str>) -> Result<String> {
        match (allocation_id, public_ip) {
            (Some(a), _) => {
                let row: Option<(String,)> =
                    sqlx::query_as("SELECT allocation_id FROM public_addresses WHERE allocation_id = $1 AND account_id = $2")
                        .bind(a)
                        .bind(&caller.account_id)
                        .fetch_optional(&self.db)
                        .await?;
                row.map(|r| r.0).ok_or_else(|| ServiceError::AllocationNotFound(a.to_string()))
            }
            (None, Some(ip)) => {
                let ip4: Ipv4Addr =
                    ip.parse().map_err(|_| ServiceError::InvalidParameterValue(format!("Invalid value '{ip}' for PublicIp")))?;
                let row: Option<(String,)> = sqlx::query_as(
                    "SELECT allocation_id FROM public_addresses WHERE public_ip = $1::inet AND account_id = $2 AND allocation_id IS NOT NULL",
                )
                .bind(ip4.to_string())
                .bind(&caller.account_id)
                .fetch_optional(&self.db)
                .await?;
                row.map(|r| r.0).ok_or_else(|| ServiceError::AddressNotFound(ip.to_string()))
            }
            (None, None) => Err(ServiceError::MissingParameter("AllocationId".into())),
        }
    }

    /// Maps an Elastic IP to an instance's primary interface or to an
    /// interface; returns the association id. An address assigned at
    /// launch on the target goes back to the pool; another Elastic IP on it
    /// is disassociated; an address associated elsewhere moves only with
    /// `allow_reassociation` (else Resource.AlreadyAssociated).
    pub async fn associate_address(
        &self,
        caller: &Caller,
        allocation_id: Option<&str>,
        public_ip: Option<&str>,
        target: &nimbus_proto::api::AssociateAddressRequest,
    ) -> Result<String> {
        let allocation_id = self.resolve_address(caller, allocation_id, public_ip).await?;
        let eni_id = match (&target.instance_id, &target.network_interface_id) {
            (Some(_), Some(_)) => {
                return Err(ServiceError::InvalidParameterCombination("Name either an instance or a network interface, not both".into()))
            }
            (None, None) => return Err(ServiceError::MissingParameter("InstanceId".into())),
            (Some(i), None) => {
                if !ids::is_valid(ids::INSTANCE, i) {
                    return Err(ServiceError::InstanceIdMalformed(i.clone()));
                }
                let row: Option<(String,)> = sqlx::query_as(
                    "SELECT n.id FROM network_interfaces n JOIN instances i ON i.id = n.instance_id \
                     WHERE i.id = $1 AND i.account_id = $2 AND n.device_index = 0 AND i.capacity_held",
                )
                .bind(i)
                .bind(&caller.account_id)
                .fetch_optional(&self.db)
                .await?;
                row.ok_or_else(|| ServiceError::InstanceNotFound(i.clone()))?.0
            }
            (None, Some(n)) => {
                check_id(ids::NETWORK_INTERFACE, n, ServiceError::NetworkInterfaceIdMalformed)?;
                n.clone()
            }
        };
        // `None`: the interface changed under us; look again (a few times).
        for _ in 0..crate::service::TX_ATTEMPTS {
            if let Some(id) = crate::service::retrying(|| self.try_associate(caller, &allocation_id, &eni_id, target)).await? {
                return Ok(id);
            }
        }
        Err(ServiceError::Internal(format!("the network interface {eni_id} kept changing while {allocation_id} was associated")))
    }

    /// `Ok(None)`: the interface moved between our read and our lock; try again.
    async fn try_associate(
        &self,
        caller: &Caller,
        allocation_id: &str,
        eni_id: &str,
        target: &nimbus_proto::api::AssociateAddressRequest,
    ) -> Result<Option<String>> {
        let mut tx = self.db.begin().await?;
        // Lock order: instance, interface, address, hosts.
        let owner: Option<(Option<String>,)> =
            sqlx::query_as("SELECT instance_id FROM network_interfaces WHERE id = $1 AND account_id = $2")
                .bind(eni_id)
                .bind(&caller.account_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (instance,) = owner.ok_or_else(|| ServiceError::NetworkInterfaceNotFound(eni_id.to_string()))?;
        if let Some(i) = &instance {
            sqlx::query("SELECT 1 FROM instances WHERE id = $1 FOR UPDATE").bind(i).execute(&mut *tx).await?;
        }
        let row: Option<(Option<String>, String, Option<String>)> = sqlx::query_as(
            "SELECT instance_id, host(private_ip), (SELECT host_id FROM instances WHERE id = n.instance_id) \
             FROM network_interfaces n WHERE id = $1 FOR UPDATE",
        )
        .bind(eni_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (instance_now, private_ip, host) = row.ok_or_else(|| ServiceError::NetworkInterfaceNotFound(eni_id.to_string()))?;
        if instance_now != instance {
            return Ok(None);
        }
        if let Some(p) = &target.private_ip_address {
            if p != &private_ip {
                return Err(ServiceError::InvalidParameterValue(format!("The private address {p} is not the interface's ({private_ip})")));
            }
        }
        let addr: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT network_interface_id, association_id FROM public_addresses WHERE allocation_id = $1 AND account_id = $2 FOR UPDATE",
        )
        .bind(allocation_id)
        .bind(&caller.account_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (current, association) = addr.ok_or_else(|| ServiceError::AllocationNotFound(allocation_id.to_string()))?;
        if current.as_deref() == Some(eni_id) {
            return association.map(Some).ok_or_else(|| ServiceError::Internal("an associated address without an association id".into()));
        }
        let mut hosts: BTreeSet<String> = host.into_iter().collect();
        let mut touched: Vec<String> = instance.into_iter().collect();
        if let Some(other) = &current {
            if !target.allow_reassociation {
                return Err(ServiceError::AlreadyAssociated(format!("resource {allocation_id} is already associated with {other}")));
            }
            let was: Option<(Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT n.instance_id, i.host_id FROM network_interfaces n LEFT JOIN instances i ON i.id = n.instance_id WHERE n.id = $1",
            )
            .bind(other)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((i, h)) = was {
                touched.extend(i);
                hosts.extend(h);
            }
        }
        // What the target had: an address from launch goes back to the pool, an Elastic IP is disassociated.
        sqlx::query("DELETE FROM public_addresses WHERE network_interface_id = $1 AND allocation_id IS NULL")
            .bind(eni_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE public_addresses SET network_interface_id = NULL, association_id = NULL WHERE network_interface_id = $1")
            .bind(eni_id)
            .execute(&mut *tx)
            .await?;
        let association_id = ids::new_id(ids::ASSOCIATION);
        sqlx::query("UPDATE public_addresses SET network_interface_id = $2, association_id = $3 WHERE allocation_id = $1")
            .bind(allocation_id)
            .bind(eni_id)
            .bind(&association_id)
            .execute(&mut *tx)
            .await?;
        self.touch_instances(&mut tx, &hosts, touched).await?;
        tx.commit().await?;
        tracing::info!(%allocation_id, %eni_id, %association_id, "Elastic IP associated");
        Ok(Some(association_id))
    }

    /// Unmaps an Elastic IP named by its association id, its address or
    /// (REST) its allocation id; an address that is not associated is
    /// InvalidAssociationID.NotFound.
    pub async fn disassociate_address(
        &self,
        caller: &Caller,
        association_id: Option<&str>,
        allocation_id: Option<&str>,
        public_ip: Option<&str>,
    ) -> Result<()> {
        if association_id.is_none() && (allocation_id.is_some() || public_ip.is_some()) {
            let allocation = self.resolve_address(caller, allocation_id, public_ip).await?;
            let row: Option<(Option<String>,)> = sqlx::query_as("SELECT association_id FROM public_addresses WHERE allocation_id = $1")
                .bind(&allocation)
                .fetch_optional(&self.db)
                .await?;
            let association =
                row.and_then(|r| r.0).ok_or_else(|| ServiceError::AssociationNotFound(format!("{allocation} is not associated")))?;
            return Box::pin(self.disassociate_address(caller, Some(&association), None, None)).await;
        }
        let allocation_id = match (association_id, public_ip) {
            (Some(a), _) => {
                let row: Option<(String,)> =
                    sqlx::query_as("SELECT allocation_id FROM public_addresses WHERE association_id = $1 AND account_id = $2")
                        .bind(a)
                        .bind(&caller.account_id)
                        .fetch_optional(&self.db)
                        .await?;
                row.ok_or_else(|| ServiceError::AssociationNotFound(a.to_string()))?.0
            }
            (None, Some(_)) => self.resolve_address(caller, None, public_ip).await?,
            (None, None) => return Err(ServiceError::MissingParameter("AssociationId".into())),
        };
        let allocation_id = &allocation_id;
        crate::service::retrying(|| async move {
            let mut tx = self.db.begin().await?;
            let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT n.instance_id, i.host_id FROM public_addresses p JOIN network_interfaces n ON n.id = p.network_interface_id \
                 LEFT JOIN instances i ON i.id = n.instance_id WHERE p.allocation_id = $1",
            )
            .bind(allocation_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((instance, host)) = row else {
                return match association_id {
                    Some(a) => Err(ServiceError::AssociationNotFound(a.to_string())),
                    None => Ok(()),
                };
            };
            if let Some(i) = &instance {
                sqlx::query("SELECT 1 FROM instances WHERE id = $1 FOR UPDATE").bind(i).execute(&mut *tx).await?;
            }
            let done = sqlx::query(
                "UPDATE public_addresses SET network_interface_id = NULL, association_id = NULL \
                 WHERE allocation_id = $1 AND ($2::text IS NULL OR association_id = $2) AND network_interface_id IS NOT NULL",
            )
            .bind(allocation_id)
            .bind(association_id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                if let Some(a) = association_id {
                    return Err(ServiceError::AssociationNotFound(a.to_string()));
                }
            }
            self.touch_instances(&mut tx, &host.into_iter().collect(), instance.into_iter().collect()).await?;
            tx.commit().await?;
            Ok::<_, ServiceError>(())
        })
        .await
    }

    /// Returns an Elastic IP to the pool; it must not be associated.
    pub async fn release_address(&self, caller: &Caller, allocation_id: Option<&str>, public_ip: Option<&str>) -> Result<()> {
        let allocation_id = self.resolve_address(caller, allocation_id, public_ip).await?;
        let mut tx = self.db.begin().await?;
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT network_interface_id FROM public_addresses WHERE allocation_id = $1 FOR UPDATE")
                .bind(&allocation_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (eni,) = row.ok_or_else(|| ServiceError::AllocationNotFound(allocation_id.clone()))?;
        if let Some(eni) = eni {
            return Err(ServiceError::AddressInUse(format!(
                "The address with allocation id [{allocation_id}] is in use (associated with {eni})"
            )));
        }
        sqlx::query("DELETE FROM public_addresses WHERE allocation_id = $1").bind(&allocation_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM tags WHERE account_id = $1 AND resource_id = $2")
            .bind(&caller.account_id)
            .bind(&allocation_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn describe_addresses(
        &self,
        caller: &Caller,
        public_ips: &[String],
        allocation_ids: &[String],
        filters: &Filters,
    ) -> Result<Vec<Address>> {
        check_filter_names(
            filters,
            &[
                "allocation-id",
                "association-id",
                "domain",
                "instance-id",
                "network-interface-id",
                "private-ip-address",
                "public-ip",
                "network-interface-owner-id",
            ],
        )?;
        let rows: Vec<AddressRow> = sqlx::query_as(
            "SELECT p.allocation_id, host(p.public_ip) AS public_ip, p.association_id, p.network_interface_id, n.instance_id, \
                    host(n.private_ip) AS private_ip_address \
             FROM public_addresses p LEFT JOIN network_interfaces n ON n.id = p.network_interface_id \
             WHERE p.account_id = $1 AND p.allocation_id IS NOT NULL ORDER BY p.public_ip",
        )
        .bind(&caller.account_id)
        .fetch_all(&self.db)
        .await?;
        for ip in public_ips {
            if !rows.iter().any(|r| &r.public_ip == ip) {
                return Err(ServiceError::AddressNotFound(ip.clone()));
            }
        }
        for a in allocation_ids {
            if !rows.iter().any(|r| &r.allocation_id == a) {
                return Err(ServiceError::AllocationNotFound(a.clone()));
            }
        }
        let mut tags = self.tags_of(caller, &rows.iter().map(|r| r.allocation_id.clone()).collect::<Vec<_>>()).await?;
        Ok(rows
            .into_iter()
            .filter(|r| {
                (public_ips.is_empty() || public_ips.contains(&r.public_ip))
                    && (allocation_ids.is_empty() || allocation_ids.contains(&r.allocation_id))
            })
            .map(|AddressRow { allocation_id, public_ip, association_id, network_interface_id, instance_id, private_ip_address }| Address {
                tags: tags_into(&mut tags, &allocation_id),
                allocation_id,
                public_ip,
                domain: "vpc".into(),
                association_id,
                instance_id,
                network_interface_id,
                private_ip_address,
                owner_id: caller.account_id.clone(),
            })
            .filter(|a| {
                let mut facts =
                    vec![("allocation-id", a.allocation_id.clone()), ("public-ip", a.public_ip.clone()), ("domain", a.domain.clone())];
                for (k, v) in [
                    ("association-id", &a.association_id),
                    ("instance-id", &a.instance_id),
                    ("network-interface-id", &a.network_interface_id),
                    ("private-ip-address", &a.private_ip_address),
                ] {
                    if let Some(v) = v {
                        facts.push((k, v.clone()));
                    }
                }
                if a.network_interface_id.is_some() {
                    facts.push(("network-interface-owner-id", a.owner_id.clone()));
                }
                passes(filters, &facts, &a.tags)
            })
            .collect())
    }
}

/// Takes public addresses from the pool, one per `(allocation id,
/// interface)` wanted: random free ones (concurrent allocators rarely
/// collide; a collision only makes us pick again; the primary key settles
/// it). Returns the addresses in order.
pub(crate) async fn allocate_public(
    conn: &mut PgConnection,
    pool: Cidr,
    account_id: &str,
    wanted: &[(Option<String>, Option<String>)],
) -> Result<Vec<String>> {
    let (first, last) = if pool.prefix >= 31 { (0, pool.size() - 1) } else { (1, pool.size() - 2) };
    let mut out: Vec<Option<String>> = vec![None; wanted.len()];
    for _ in 0..8 {
        let todo: Vec<usize> = (0..wanted.len()).filter(|i| out[*i].is_none()).collect();
        if todo.is_empty() {
            break;
        }
        let free: Vec<(String,)> = sqlx::query_as(
            "SELECT host(c.a) FROM (SELECT set_masklen($1::cidr + n, 32) AS a FROM generate_series($2::bigint, $3::bigint) AS n) c \
             WHERE NOT EXISTS (SELECT 1 FROM public_addresses p WHERE p.public_ip = c.a) ORDER BY random() LIMIT $4",
        )
        .bind(pool.to_string())
        .bind(first as i64)
        .bind(last as i64)
        .bind(todo.len() as i64)
        .fetch_all(&mut *conn)
        .await?;
        if free.len() < todo.len() {
            return Err(ServiceError::InsufficientAddressCapacity("There are no free addresses left in the public address pool".into()));
        }
        let mut ips: Vec<String> = free.into_iter().map(|r| r.0).collect();
        ips.sort();
        let allocs: Vec<Option<String>> = todo.iter().map(|i| wanted[*i].0.clone()).collect();
        let enis: Vec<Option<String>> = todo.iter().map(|i| wanted[*i].1.clone()).collect();
        let inserted: Vec<(String,)> = sqlx::query_as(
            "INSERT INTO public_addresses (public_ip, account_id, allocation_id, network_interface_id) \
             SELECT ip::inet, $1, a, e FROM unnest($2::text[], $3::text[], $4::text[]) AS t(ip, a, e) \
             ON CONFLICT (public_ip) DO NOTHING RETURNING host(public_ip)",
        )
        .bind(account_id)
        .bind(&ips)
        .bind(&allocs)
        .bind(&enis)
        .fetch_all(&mut *conn)
        .await?;
        for (k, i) in todo.iter().enumerate() {
            if inserted.iter().any(|r| r.0 == ips[k]) {
                out[*i] = Some(ips[k].clone());
            }
        }
    }
    out.into_iter()
        .map(|o| o.ok_or_else(|| ServiceError::InsufficientAddressCapacity("The public address pool is contended; try again".into())))
        .collect()
}
