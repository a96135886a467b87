//! Security-group rules as stored and as the agent gets them: a rule is
//! stored once ([`RuleKey`]: protocol, ports, a CIDR or a peer group; the
//! `security_group_rules_unique` constraint), a permission's protocol and
//! ports are checked as EC2 checks them ([`protocol_of`], [`ports_of`]),
//! [`insert_rules`] writes rules skipping those that exist, and a VPC's
//! default group is made with its rules ([`create_default_group`]: all from
//! its own members in, all out). The operations on groups and rules are
//! `groups`.

use super::util::db_cidr;
use crate::error::{Result, ServiceError};
use crate::ids;
use nimbus_proto::api::SecurityGroupRule;
use nimbus_proto::network::{self as wire, Peer, Protocol, Rule};
use sqlx::PgConnection;

const DEFAULT_GROUP_DESCRIPTION: &str = "default VPC security group";

/// A rule in its stored form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct RuleKey {
    pub protocol: &'static str,
    pub from: i32,
    pub to: i32,
    pub cidr: Option<String>,
    pub peer: Option<String>,
}

impl RuleKey {
    pub(super) fn describe(&self) -> String {
        let peer = self.cidr.clone().or_else(|| self.peer.clone()).unwrap_or_default();
        format!("peer: {peer}, {}, from port: {}, to port: {}, ALLOW", self.protocol.to_uppercase(), self.from, self.to)
    }

    /// The agent's form of the rule.
    pub(super) fn to_wire(&self) -> Result<Rule> {
        let protocol = match self.protocol {
            "-1" => Protocol::All,
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "icmp" => Protocol::Icmp,
            other => return Err(ServiceError::Internal(format!("bad protocol in database: {other}"))),
        };
        let ports = match protocol {
            Protocol::All => None,
            Protocol::Tcp | Protocol::Udp => Some((self.from as u16, self.to as u16)),
            Protocol::Icmp if self.from < 0 => None,
            Protocol::Icmp => Some((self.from as u16, if self.to < 0 { wire::ANY_ICMP_CODE } else { self.to as u16 })),
        };
        let peer = match (&self.cidr, &self.peer) {
            (Some(c), _) => Peer::Cidr(db_cidr(c)?),
            (None, Some(g)) => Peer::Group(g.clone()),
            (None, None) => return Err(ServiceError::Internal("a rule without a peer in the database".into())),
        };
        Ok(Rule { protocol, ports, peer })
    }
}

pub(super) fn protocol_of(p: &str) -> Result<&'static str> {
    match p.to_ascii_lowercase().as_str() {
        "tcp" | "6" => Ok("tcp"),
        "udp" | "17" => Ok("udp"),
        "icmp" | "1" => Ok("icmp"),
        "-1" | "all" => Ok("-1"),
        _ => Err(ServiceError::InvalidParameterValue(format!(
            "Invalid value '{p}' for IP protocol: Nimbus supports tcp, udp, icmp and -1 (all)"
        ))),
    }
}

/// The (protocol, from, to) of a permission, checked as EC2 checks them.
pub(super) fn ports_of(protocol: &'static str, from: Option<i32>, to: Option<i32>) -> Result<(i32, i32)> {
    match protocol {
        "-1" => Ok((-1, -1)),
        "tcp" | "udp" => {
            let (Some(from), Some(to)) = (from, to) else {
                return Err(ServiceError::InvalidParameterValue(
                    "Invalid value for portRange. Must specify both from and to ports with TCP/UDP.".into(),
                ));
            };
            if from == -1 && to == -1 {
                return Ok((0, 65535));
            }
            if !(0..=65535).contains(&from) || !(0..=65535).contains(&to) || from > to {
                return Err(ServiceError::InvalidParameterValue(format!(
                    "Invalid port range {from}-{to}: ports are 0 to 65535, from <= to"
                )));
            }
            Ok((from, to))
        }
        _ => {
            let (t, c) = (from.unwrap_or(-1), to.unwrap_or(-1));
            if !(-1..=255).contains(&t) || !(-1..=255).contains(&c) {
                return Err(ServiceError::InvalidParameterValue(format!("Invalid ICMP type {t} or code {c}: -1 or 0 to 255")));
            }
            Ok(if t == -1 { (-1, -1) } else { (t, c) })
        }
    }
}

pub(super) fn rule_view(id: String, group_id: &str, egress: bool, k: &RuleKey, description: Option<String>) -> SecurityGroupRule {
    SecurityGroupRule {
        rule_id: id,
        group_id: group_id.to_string(),
        egress,
        protocol: k.protocol.to_string(),
        from_port: k.from,
        to_port: k.to,
        cidr: k.cidr.clone(),
        referenced_group_id: k.peer.clone(),
        description,
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct RuleRow {
    pub(super) id: String,
    pub(super) group_id: String,
    pub(super) egress: bool,
    pub(super) protocol: String,
    pub(super) from_port: i32,
    pub(super) to_port: i32,
    pub(super) cidr: Option<String>,
    pub(super) peer_group_id: Option<String>,
    pub(super) description: Option<String>,
}

impl RuleRow {
    pub(super) fn key(&self) -> Result<RuleKey> {
        Ok(RuleKey {
            protocol: protocol_of(&self.protocol)?,
            from: self.from_port,
            to: self.to_port,
            cidr: self.cidr.clone(),
            peer: self.peer_group_id.clone(),
        })
    }
}

pub(super) const RULE_COLUMNS: &str = "id, group_id, egress, protocol, from_port, to_port, cidr::text AS cidr, peer_group_id, description";

pub(super) async fn create_default_group(conn: &mut PgConnection, account_id: &str, vpc_id: &str) -> Result<()> {
    let id = ids::new_id(ids::SECURITY_GROUP);
    sqlx::query(
        "INSERT INTO security_groups (id, account_id, vpc_id, name, description, is_default) VALUES ($1, $2, $3, 'default', $4, true)",
    )
    .bind(&id)
    .bind(account_id)
    .bind(vpc_id)
    .bind(DEFAULT_GROUP_DESCRIPTION)
    .execute(&mut *conn)
    .await?;
    let from_self = RuleKey { protocol: "-1", from: -1, to: -1, cidr: None, peer: Some(id.clone()) };
    let anywhere = RuleKey { protocol: "-1", from: -1, to: -1, cidr: Some("0.0.0.0/0".into()), peer: None };
    insert_rules(conn, &id, false, &[from_self], None).await?;
    insert_rules(conn, &id, true, &[anywhere], None).await?;
    Ok(())
}

/// Inserts rules (each once: an existing one is skipped); returns those inserted.
pub(super) async fn insert_rules(
    conn: &mut PgConnection,
    group_id: &str,
    egress: bool,
    keys: &[RuleKey],
    descriptions: Option<&[Option<String>]>,
) -> Result<Vec<SecurityGroupRule>> {
    let ids: Vec<String> = keys.iter().map(|_| ids::new_id(ids::SECURITY_GROUP_RULE)).collect();
    let protocols: Vec<&str> = keys.iter().map(|k| k.protocol).collect();
    let froms: Vec<i32> = keys.iter().map(|k| k.from).collect();
    let tos: Vec<i32> = keys.iter().map(|k| k.to).collect();
    let cidrs: Vec<Option<String>> = keys.iter().map(|k| k.cidr.clone()).collect();
    let peers: Vec<Option<String>> = keys.iter().map(|k| k.peer.clone()).collect();
    let descs: Vec<Option<String>> = descriptions.map(|d| d.to_vec()).unwrap_or_else(|| vec![None; keys.len()]);
    let rows = sqlx::query_as::<_, RuleRow>(&format!(
        "INSERT INTO security_group_rules (id, group_id, egress, protocol, from_port, to_port, cidr, peer_group_id, description) \
         SELECT id, $2, $3, p, f, t, c::cidr, g, d FROM unnest($1::text[], $4::text[], $5::int[], $6::int[], $7::text[], $8::text[], $9::text[]) \
              AS r(id, p, f, t, c, g, d) \
         ON CONFLICT ON CONSTRAINT security_group_rules_unique DO NOTHING RETURNING {RULE_COLUMNS}"
    ))
    .bind(&ids)
    .bind(group_id)
    .bind(egress)
    .bind(&protocols)
    .bind(&froms)
    .bind(&tos)
    .bind(&cidrs)
    .bind(&peers)
    .bind(&descs)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let k = r.key()?;
            Ok(rule_view(r.id.clone(), &r.group_id, r.egress, &k, r.description.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_are_checked_as_ec2_checks_them() {
        assert_eq!(protocol_of("6").unwrap(), "tcp");
        assert_eq!(protocol_of("ALL").unwrap(), "-1");
        assert!(protocol_of("47").is_err());
        assert_eq!(ports_of("tcp", Some(22), Some(22)).unwrap(), (22, 22));
        assert!(ports_of("tcp", Some(22), None).is_err());
        assert!(ports_of("udp", Some(100), Some(99)).is_err());
        assert!(ports_of("tcp", Some(0), Some(65536)).is_err());
        assert_eq!(ports_of("-1", Some(5), Some(6)).unwrap(), (-1, -1));
        assert_eq!(ports_of("icmp", Some(-1), Some(3)).unwrap(), (-1, -1));
        assert_eq!(ports_of("icmp", Some(8), Some(-1)).unwrap(), (8, -1));
        let k = RuleKey { protocol: "icmp", from: 8, to: -1, cidr: Some("0.0.0.0/0".into()), peer: None };
        assert_eq!(k.to_wire().unwrap().ports, Some((8, wire::ANY_ICMP_CODE)));
        let k = RuleKey { protocol: "-1", from: -1, to: -1, cidr: None, peer: Some("sg-1".into()) };
        assert_eq!(k.to_wire().unwrap(), Rule { protocol: Protocol::All, ports: None, peer: Peer::Group("sg-1".into()) });
    }
}
