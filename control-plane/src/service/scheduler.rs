//! Placement: which host runs each instance of a launch.
//!
//! Planning is a pure function over a snapshot of host capacity ([`plan`]).
//! Claiming is a set of conditional updates in the launch's transaction
//! ([`claim`]): `used + need <= total` is re-checked by PostgreSQL under the
//! host row's lock, so two launches racing for the last slot cannot both win;
//! the loser sees zero rows updated, rolls back and plans again from a fresh
//! snapshot. Hosts are updated in id order, so concurrent launches never
//! deadlock on each other. The `hosts_*_not_overcommitted` CHECK constraints
//! back this up in the schema.

use crate::config::PlacementPolicy;
use sqlx::{Postgres, Transaction};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Need {
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
}

impl Need {
    fn times(self, n: i64) -> Need {
        Need { vcpus: self.vcpus * n, memory_mib: self.memory_mib * n, disk_gib: self.disk_gib * n }
    }
}

/// One host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCapacity {
    pub id: String,
    pub availability_zone: String,
    pub total_vcpus: i32,
    pub total_memory_mib: i64,
    pub total_disk_gib: i64,
    pub used_vcpus: i32,
    pub used_memory_mib: i64,
    pub used_disk_gib: i64,
}

impl HostCapacity {
    fn fits(&self, need: Need) -> bool {
        i64::from(self.used_vcpus) + need.vcpus <= i64::from(self.total_vcpus)
            && self.used_memory_mib + need.memory_mib <= self.total_memory_mib
            && self.used_disk_gib + need.disk_gib <= self.total_disk_gib
    }

    fn take(&mut self, need: Need) {
        self.used_vcpus += need.vcpus as i32;
        self.used_memory_mib += need.memory_mib;
        self.used_disk_gib += need.disk_gib;
    }

    /// The fullest dimension, 0.0 (empty) to 1.0 (full).
    fn load(&self) -> f64 {
        fn frac(used: i64, total: i64) -> f64 {
            if total <= 0 {
                1.0
            } else {
                used as f64 / total as f64
            }
        }
        frac(self.used_vcpus.into(), self.total_vcpus.into())
            .max(frac(self.used_memory_mib, self.total_memory_mib))
            .max(frac(self.used_disk_gib, self.total_disk_gib))
    }
}

/// How close to the best load a host counts as equally good for `Spread`
/// (a t3.nano is 1/32 of a 64-vCPU host's vCPUs).
const SPREAD_SLACK: f64 = 0.02;

/// Chooses a host for each of up to `count` instances needing `need` each,
/// returning host ids in launch order (possibly fewer than `count`).
///
/// Without a requested zone, each instance goes to the zone where this launch
/// placed the fewest so far, then the least loaded zone, so launches spread
/// across zones. Within the zone, `Pack` picks the most loaded host that fits,
/// `Spread` one of the least loaded (within [`SPREAD_SLACK`]). Ties are
/// broken by a hash of `seed` and the host id: a launch passes a random seed,
/// so concurrent launches that see the same snapshot choose different hosts
/// among equally good ones instead of all queueing on the same host row;
/// the same seed gives the same plan.
pub fn plan(hosts: &[HostCapacity], need: Need, count: u32, zone: Option<&str>, policy: PlacementPolicy, seed: u64) -> Vec<String> {
    let mut hosts: Vec<HostCapacity> = hosts.iter().filter(|h| zone.is_none_or(|z| h.availability_zone == z)).cloned().collect();
    hosts.sort_by(|a, b| a.id.cmp(&b.id));
    let mut placed_in_zone: BTreeMap<String, u32> = BTreeMap::new();
    let mut out = Vec::new();
    for _ in 0..count {
        let zones: BTreeMap<&str, f64> = {
            let mut z: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
            for h in hosts.iter().filter(|h| h.fits(need)) {
                let e = z.entry(h.availability_zone.as_str()).or_insert((0.0, 0));
                e.0 += h.load();
                e.1 += 1;
            }
            z.into_iter().map(|(k, (sum, n))| (k, sum / n as f64)).collect()
        };
        let Some(best_zone) = zones
            .iter()
            .min_by(|a, b| {
                let pa = placed_in_zone.get(*a.0).copied().unwrap_or(0);
                let pb = placed_in_zone.get(*b.0).copied().unwrap_or(0);
                pa.cmp(&pb).then(a.1.total_cmp(b.1)).then(a.0.cmp(b.0))
            })
            .map(|(z, _)| z.to_string())
        else {
            break;
        };
        let loads = hosts.iter().filter(|h| h.availability_zone == best_zone && h.fits(need)).map(HostCapacity::load);
        // The loads that count as best: the fullest for Pack, the emptiest (and
        // those within the slack) for Spread.
        let (lo, hi) = match policy {
            PlacementPolicy::Pack => {
                let max = loads.fold(f64::MIN, f64::max);
                (max, max)
            }
            PlacementPolicy::Spread => {
                let min = loads.fold(f64::MAX, f64::min);
                (min, min + SPREAD_SLACK)
            }
        };
        let chosen = hosts
            .iter_mut()
            .filter(|h| h.availability_zone == best_zone && h.fits(need) && (lo..=hi).contains(&h.load()))
            .min_by_key(|h| (tie_break(seed, &h.id), h.id.clone()));
        let Some(host) = chosen else { break };
        host.take(need);
        out.push(host.id.clone());
        *placed_in_zone.entry(best_zone).or_insert(0) += 1;
    }
    out
}

/// A host's rank among equally good ones, for one seed.
fn tie_break(seed: u64, host_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    host_id.hash(&mut h);
    h.finish()
}

/// Hosts that take new instances: those with a recent heartbeat.
pub async fn schedulable_hosts(tx: &mut Transaction<'_, Postgres>, heartbeat_timeout: Duration) -> Result<Vec<HostCapacity>, sqlx::Error> {
    sqlx::query_as!(
        HostCapacity,
        "SELECT id, availability_zone, total_vcpus, total_memory_mib, total_disk_gib, \
                used_vcpus, used_memory_mib, used_disk_gib \
         FROM hosts WHERE last_heartbeat > now() - make_interval(secs => $1) ORDER BY id",
        heartbeat_timeout.as_secs_f64()
    )
    .fetch_all(&mut **tx)
    .await
}

/// Outcome of [`claim`].
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Each host's generation after the claim.
    Claimed(BTreeMap<String, i64>),
    /// Another transaction took the capacity after our snapshot: plan again.
    Raced,
}

/// Claims the capacity of `placements` (host id per instance) in host-id
/// order, bumping each host's generation and notifying its agent on commit.
pub async fn claim(tx: &mut Transaction<'_, Postgres>, placements: &[String], need: Need) -> Result<Claim, sqlx::Error> {
    let mut per_host: BTreeMap<&str, i64> = BTreeMap::new();
    for h in placements {
        *per_host.entry(h.as_str()).or_insert(0) += 1;
    }
    let mut generations = BTreeMap::new();
    for (host, n) in per_host {
        let total = need.times(n);
        let updated = sqlx::query_scalar!(
            "UPDATE hosts SET used_vcpus = used_vcpus + $2, used_memory_mib = used_memory_mib + $3, \
                    used_disk_gib = used_disk_gib + $4, generation = generation + 1 \
             WHERE id = $1 AND used_vcpus + $2 <= total_vcpus AND used_memory_mib + $3 <= total_memory_mib \
                   AND used_disk_gib + $4 <= total_disk_gib RETURNING generation",
            host,
            total.vcpus as i32,
            total.memory_mib,
            total.disk_gib
        )
        .fetch_optional(&mut **tx)
        .await?;
        let Some(generation) = updated else { return Ok(Claim::Raced) };
        generations.insert(host.to_string(), generation);
        sqlx::query!("SELECT pg_notify($1, $2)", crate::notify::CHANNEL, host).execute(&mut **tx).await?;
    }
    Ok(Claim::Claimed(generations))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, az: &str, vcpus: i32, used: i32) -> HostCapacity {
        HostCapacity {
            id: id.into(),
            availability_zone: az.into(),
            total_vcpus: vcpus,
            total_memory_mib: 1 << 20,
            total_disk_gib: 1 << 20,
            used_vcpus: used,
            used_memory_mib: 0,
            used_disk_gib: 0,
        }
    }
    const ONE: Need = Need { vcpus: 1, memory_mib: 1, disk_gib: 1 };

    #[test]
    fn pack_fills_the_fullest_host_first() {
        let hosts = [host("h-a", "z1", 4, 0), host("h-b", "z1", 4, 2)];
        assert_eq!(plan(&hosts, ONE, 3, None, PlacementPolicy::Pack, 0), vec!["h-b", "h-b", "h-a"]);
    }

    #[test]
    fn spread_uses_the_emptiest_host() {
        let hosts = [host("h-a", "z1", 4, 0), host("h-b", "z1", 4, 2)];
        assert_eq!(plan(&hosts, ONE, 3, None, PlacementPolicy::Spread, 0), vec!["h-a", "h-a", "h-a"]);
        let hosts = [host("h-a", "z1", 4, 0), host("h-b", "z1", 4, 0)];
        for seed in 0..8 {
            let p = plan(&hosts, ONE, 4, None, PlacementPolicy::Spread, seed);
            assert_eq!(p.iter().filter(|h| *h == "h-a").count(), 2, "{p:?}");
            assert_ne!(p[0], p[1], "{p:?}");
            assert_eq!(p, plan(&hosts, ONE, 4, None, PlacementPolicy::Spread, seed), "same seed, same plan");
        }
    }

    /// Concurrent launches see the same snapshot: with their own seeds
    /// they choose among the equally empty hosts, not all the same one.
    #[test]
    fn seeds_spread_launches_over_equally_good_hosts() {
        let hosts: Vec<HostCapacity> = (0..100).map(|i| host(&format!("h-{i:03}"), "z1", 64, 0)).collect();
        let chosen: std::collections::BTreeSet<String> =
            (0..32).map(|seed| plan(&hosts, ONE, 1, None, PlacementPolicy::Spread, seed).remove(0)).collect();
        assert!(chosen.len() >= 20, "32 launches chose only {} hosts", chosen.len());
    }

    #[test]
    fn zones_alternate_without_a_requested_zone() {
        let hosts = [host("h-a", "z1", 8, 0), host("h-b", "z2", 8, 0)];
        let p = plan(&hosts, ONE, 4, None, PlacementPolicy::Pack, 0);
        assert_eq!(p, vec!["h-a", "h-b", "h-a", "h-b"]);
    }

    #[test]
    fn single_launches_go_to_the_least_loaded_zone() {
        let hosts = [host("h-a", "z1", 8, 6), host("h-b", "z2", 8, 1)];
        assert_eq!(plan(&hosts, ONE, 1, None, PlacementPolicy::Pack, 0), vec!["h-b"]);
    }

    #[test]
    fn requested_zone_is_honoured() {
        let hosts = [host("h-a", "z1", 8, 0), host("h-b", "z2", 8, 0)];
        assert_eq!(plan(&hosts, ONE, 3, Some("z2"), PlacementPolicy::Spread, 0), vec!["h-b", "h-b", "h-b"]);
        assert!(plan(&hosts, ONE, 1, Some("z9"), PlacementPolicy::Spread, 0).is_empty());
    }

    #[test]
    fn never_plans_beyond_capacity() {
        let hosts = [host("h-a", "z1", 3, 1), host("h-b", "z2", 2, 0)];
        let need = Need { vcpus: 2, memory_mib: 1, disk_gib: 1 };
        let p = plan(&hosts, need, 10, None, PlacementPolicy::Pack, 0);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.contains(&"h-a".to_string()) && p.contains(&"h-b".to_string()));
    }

    #[test]
    fn memory_and_disk_limit_too() {
        let mut h = host("h-a", "z1", 64, 0);
        h.total_memory_mib = 1000;
        let need = Need { vcpus: 1, memory_mib: 512, disk_gib: 1 };
        assert_eq!(plan(&[h.clone()], need, 5, None, PlacementPolicy::Pack, 0).len(), 1);
        h.total_memory_mib = 1 << 20;
        h.total_disk_gib = 20;
        let need = Need { vcpus: 1, memory_mib: 1, disk_gib: 8 };
        assert_eq!(plan(&[h], need, 5, None, PlacementPolicy::Pack, 0).len(), 2);
    }
}
