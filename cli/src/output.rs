//! Rendering of API responses: plain tables (default) or pretty JSON.

use chrono::{DateTime, SecondsFormat, Utc};
use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, ColumnConstraint, Table};
use nimbus_proto::api::*;
use serde_json::Value;

/// The raw API body, pretty-printed.
pub fn json(raw: &Value) -> String {
    // A `Value` always serializes.
    serde_json::to_string_pretty(raw).unwrap_or_else(|_| raw.to_string())
}

/// A borderless table: columns separated by two spaces, no trailing blanks.
fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.iter().copied());
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, if i + 1 == header.len() { 0 } else { 2 }));
        col.set_constraint(ColumnConstraint::ContentWidth);
    }
    t
}

fn finish(t: Table) -> String {
    t.lines().map(|l| l.trim_end().to_string()).collect::<Vec<_>>().join("\n")
}

fn right(t: &mut Table, cols: &[usize]) {
    for &c in cols {
        if let Some(col) = t.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Instances: ID, STATE, TYPE, AZ, IMAGE, LAUNCHED (and REASON when any has one).
pub fn instances_table(instances: &[Instance]) -> String {
    let with_reason = instances.iter().any(|i| i.state_reason.is_some());
    let with_ssh = instances.iter().any(|i| i.ssh_endpoint.is_some());
    let mut header = vec!["ID", "STATE", "TYPE", "AZ", "IMAGE", "LAUNCHED", "PRIVATE-IP", "PUBLIC-IP"];
    if with_ssh {
        header.push("SSH");
    }
    if with_reason {
        header.push("REASON");
    }
    let mut t = table(&header);
    for i in instances {
        let mut row = vec![
            i.instance_id.clone(),
            i.state.name.to_string(),
            i.instance_type.clone(),
            or_dash(&i.availability_zone).to_string(),
            i.image_id.clone(),
            time(&i.launch_time),
            i.private_ip_address.clone().unwrap_or_else(|| "-".into()),
            i.public_ip_address.clone().unwrap_or_else(|| "-".into()),
        ];
        if with_ssh {
            row.push(i.ssh_endpoint.clone().unwrap_or_else(|| "-".into()));
        }
        if with_reason {
            row.push(i.state_reason.clone().unwrap_or_else(|| "-".into()));
        }
        t.add_row(row);
    }
    finish(t)
}

/// A reservation: one line naming it, then its instances.
pub fn reservation(r: &Reservation) -> String {
    format!("RESERVATION {}  OWNER {}\n{}", r.reservation_id, r.owner_id, instances_table(&r.instances))
}

/// A page of instances, with the token of the next page if there is one.
pub fn instance_page(l: &InstanceList) -> String {
    let mut s = instances_table(&l.instances);
    if let Some(tok) = &l.next_token {
        s.push_str(&format!("\nNEXT TOKEN: {tok}"));
    }
    s
}

pub fn state_changes_table(changes: &[StateChange]) -> String {
    let mut t = table(&["ID", "PREVIOUS", "CURRENT"]);
    for c in changes {
        t.add_row([c.instance_id.clone(), c.previous_state.name.to_string(), c.current_state.name.to_string()]);
    }
    finish(t)
}

fn used_total(used: impl std::fmt::Display, total: impl std::fmt::Display, unit: &str) -> String {
    format!("{used}/{total}{unit}")
}

/// Hosts: ID, NAME, AZ, HYPERVISOR, STATUS, HEALTH, VCPU, MEM, DISK (used/total), INSTANCES,
/// HEARTBEAT; then one line per problem a host's agent reported.
pub fn hosts_table(hosts: &[Host]) -> String {
    let mut t = table(&["ID", "NAME", "AZ", "HYPERVISOR", "STATUS", "HEALTH", "VCPU", "MEM", "DISK", "INSTANCES", "HEARTBEAT"]);
    for h in hosts {
        t.add_row([
            h.host_id.clone(),
            h.name.clone(),
            h.availability_zone.clone(),
            h.hypervisor.clone(),
            h.status.clone(),
            h.health.clone(),
            used_total(h.used.vcpus, h.total.vcpus, ""),
            used_total(h.used.memory_mib, h.total.memory_mib, " MiB"),
            used_total(h.used.disk_gib, h.total.disk_gib, " GiB"),
            h.instance_count.to_string(),
            h.last_heartbeat.as_ref().map(time).unwrap_or_else(|| "-".into()),
        ]);
    }
    right(&mut t, &[6, 7, 8, 9]);
    let mut out = finish(t);
    for h in hosts {
        for p in &h.problems {
            out.push_str(&format!("\nPROBLEM {}: {p}", h.name));
        }
    }
    out
}

/// An account: its id and name, then each limit with what is in use.
pub fn account(a: &nimbus_proto::api::AccountView) -> String {
    let q = &a.image_quota;
    format!(
        "account {} ({})\ninstances: {} of {}\nvCPUs:     {} of {}\nElastic IPs: at most {}\nimages:    {} of {} ({} of {} bytes)",
        a.account_id,
        a.name,
        a.usage.instances,
        a.limits.max_instances,
        a.usage.vcpus,
        a.limits.max_vcpus,
        a.max_elastic_ips,
        q.images,
        q.max_images,
        q.image_bytes,
        q.max_image_bytes,
    )
}

/// A table of the objects in `raw[list]` with the given (header, field) columns;
/// a field may be a path `a.b`, a missing one shows `-`.
pub fn objects_table(raw: &Value, list: &str, columns: &[(&str, &str)]) -> String {
    let header: Vec<&str> = columns.iter().map(|c| c.0).collect();
    let mut t = table(&header);
    let items: Vec<Value> = match raw.get(list) {
        Some(Value::Array(a)) => a.clone(),
        _ if list.is_empty() => vec![raw.clone()],
        _ => Vec::new(),
    };
    for item in &items {
        t.add_row(columns.iter().map(|(_, path)| {
            let v = path.split('.').try_fold(item, |v, k| v.get(k));
            match v {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => "-".into(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| x.get("group_id").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| x.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
                Some(other) => other.to_string(),
            }
        }));
    }
    finish(t)
}

/// Security groups, then one line per rule.
pub fn security_groups(raw: &Value) -> String {
    let mut out = objects_table(
        raw,
        "security_groups",
        &[("ID", "group_id"), ("NAME", "group_name"), ("VPC", "vpc_id"), ("DESCRIPTION", "description")],
    );
    for g in raw.get("security_groups").and_then(Value::as_array).into_iter().flatten() {
        for (dir, key) in [("IN", "ingress"), ("OUT", "egress")] {
            for r in g.get(key).and_then(Value::as_array).into_iter().flatten() {
                let s = |k: &str| r.get(k).map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
                out.push_str(&format!(
                    "\nRULE {} {dir} {} {}-{} {}",
                    g["group_id"].as_str().unwrap_or("-"),
                    s("protocol").unwrap_or_default(),
                    s("from_port").unwrap_or_default(),
                    s("to_port").unwrap_or_default(),
                    s("cidr").or_else(|| s("referenced_group_id")).unwrap_or_default()
                ));
            }
        }
    }
    out
}

pub fn instance_types_table(types: &[InstanceType]) -> String {
    let mut t = table(&["NAME", "VCPUS", "MEMORY (MiB)", "DISK (GiB)"]);
    for it in types {
        t.add_row([it.name.clone(), it.vcpus.to_string(), it.memory_mib.to_string(), it.disk_gib.to_string()]);
    }
    right(&mut t, &[1, 2, 3]);
    finish(t)
}

/// Images: ID, NAME, OWNER, STATE, PUBLIC, DEFAULT, BOOT, ROOT DISK, SOURCE, CREATED.
pub fn images_table(images: &[Image]) -> String {
    let mut t = table(&["ID", "NAME", "OWNER", "STATE", "PUBLIC", "DEFAULT", "BOOT", "ROOT DISK", "SOURCE", "CREATED"]);
    let yes = |b: bool| if b { "yes".to_string() } else { "no".to_string() };
    for i in images {
        t.add_row([
            i.image_id.clone(),
            i.name.clone(),
            i.owner_id.clone(),
            i.state.clone(),
            yes(i.public),
            yes(i.default),
            i.boot.as_str().to_string(),
            i.root_disk.as_ref().map(|d| d.name.clone()).unwrap_or_else(|| "-".into()),
            i.source_url.clone().unwrap_or_else(|| "-".into()),
            time(&i.creation_date),
        ]);
    }
    finish(t)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;
    use nimbus_proto::InstanceState;

    pub(crate) fn sample_instance(id: &str, state: InstanceState) -> Instance {
        Instance {
            metadata_options: None,
            instance_id: id.into(),
            reservation_id: "r-0123456789abcdef0".into(),
            image_id: "ami-0123456789abcdef0".into(),
            instance_type: "t3.micro".into(),
            state: state.into(),
            availability_zone: "az-1".into(),
            launch_time: Utc.with_ymd_and_hms(2026, 11, 25, 15, 4, 5).unwrap(),
            ami_launch_index: 0,
            state_reason: None,
            key_name: None,
            tags: Vec::new(),
            private_ip_address: Some("172.31.0.4".into()),
            private_dns_name: None,
            public_ip_address: None,
            vpc_id: None,
            subnet_id: None,
            security_groups: Vec::new(),
            network_interfaces: Vec::new(),
            ssh_endpoint: None,
        }
    }

    #[test]
    fn instance_table_has_header_and_aligned_row() {
        let s = instances_table(&[sample_instance("i-0123456789abcdef0", InstanceState::Running)]);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 2, "{s}");
        assert_eq!(
            lines[0],
            "ID                   STATE    TYPE      AZ    IMAGE                  LAUNCHED              PRIVATE-IP  PUBLIC-IP"
        );
        assert_eq!(lines[1], "i-0123456789abcdef0  running  t3.micro  az-1  ami-0123456789abcdef0  2026-11-25T15:04:05Z  172.31.0.4  -");
    }

    #[test]
    fn reason_column_only_when_some_instance_has_one() {
        let mut failed = sample_instance("i-1", InstanceState::Terminated);
        failed.state_reason = Some("Server.InternalError: boot failed".into());
        failed.availability_zone = String::new();
        let s = instances_table(&[sample_instance("i-2", InstanceState::Pending), failed]);
        assert!(s.lines().next().unwrap().ends_with("REASON"), "{s}");
        assert!(s.contains("Server.InternalError: boot failed"));
        assert!(s.lines().nth(2).unwrap().contains(" -  "), "an empty zone shows a dash: {s}");
    }

    #[test]
    fn next_token_line_and_empty_table() {
        let l = InstanceList { instances: vec![], next_token: Some("abc".into()) };
        assert_eq!(instance_page(&l), "ID  STATE  TYPE  AZ  IMAGE  LAUNCHED  PRIVATE-IP  PUBLIC-IP\nNEXT TOKEN: abc");
    }

    #[test]
    fn hosts_table_shows_used_over_total() {
        let h = Host {
            host_id: "h-1".into(),
            name: "node1".into(),
            availability_zone: "az-1".into(),
            hypervisor: "kvm".into(),
            status: "available".into(),
            total: Resources { vcpus: 8, memory_mib: 16384, disk_gib: 100 },
            used: Resources { vcpus: 2, memory_mib: 1024, disk_gib: 16 },
            instance_count: 2,
            last_heartbeat: None,
            health: "ok".into(),
            problems: vec![],
        };
        let s = hosts_table(std::slice::from_ref(&h));
        let row = s.lines().nth(1).unwrap();
        for part in ["h-1", "node1", "kvm", "available", " ok ", "2/8", "1024/16384 MiB", "16/100 GiB"] {
            assert!(row.contains(part), "{part} missing in {row}");
        }
        assert!(row.trim_end().ends_with('-'));
        assert_eq!(s.lines().count(), 2, "no problems, no problem lines: {s}");

        let sick = Host { health: "degraded".into(), problems: vec!["starting a guest took 52.0 s".into()], ..h };
        let s = hosts_table(&[sick]);
        assert!(s.lines().nth(1).unwrap().contains(" degraded "), "{s}");
        assert_eq!(s.lines().nth(2), Some("PROBLEM node1: starting a guest took 52.0 s"), "{s}");
    }

    #[test]
    fn json_output_is_the_raw_body_pretty() {
        let v = serde_json::json!({"hosts": [], "x": 1});
        assert_eq!(json(&v), "{\n  \"hosts\": [],\n  \"x\": 1\n}");
    }
}
