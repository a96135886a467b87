//! Counters and latency histograms of a node, and their Prometheus text
//! exposition (`GET /metrics`, format 0.0.4). Counters are atomics bumped
//! on the request path; gauges (membership, hints held, partitions owned)
//! are read from the node when the page is rendered.

use crate::node::Node;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];

/// A cumulative histogram with fixed buckets (lock-free).
#[derive(Default)]
pub struct Histogram {
    /// per bucket (not cumulative), plus one for +Inf
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|b| s <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cum}");
        }
        cum += self.counts[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cum}");
    }
}

/// A client operation, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get = 0,
    Put = 1,
    Delete = 2,
}

const OPS: [(Op, &str); 3] = [(Op::Get, "get"), (Op::Put, "put"), (Op::Delete, "delete")];

#[derive(Default)]
pub struct OpMetrics {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub latency: Histogram,
}

/// Everything a node counts.
#[derive(Default)]
pub struct Metrics {
    pub ops: [OpMetrics; 3],
    pub hints_delivered: AtomicU64,
    pub read_repairs: AtomicU64,
    pub anti_entropy_rounds: AtomicU64,
    pub anti_entropy_keys_repaired: AtomicU64,
    pub anti_entropy_keys_handed_off: AtomicU64,
    pub anti_entropy_errors: AtomicU64,
    pub tombstones_collected: AtomicU64,
    /// gossip refused because ring parameters disagree (either side)
    pub ring_refusals: AtomicU64,
    /// TLS handshakes refused by this node's listener
    pub tls_refused: AtomicU64,
    /// requests refused for lack of a client certificate (or plaintext)
    pub unauthenticated: AtomicU64,
}

impl Metrics {
    /// Count one client operation and its latency.
    pub fn op(&self, op: Op, ok: bool, took: Duration) {
        let m = &self.ops[op as usize];
        if ok {
            m.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            m.errors.fetch_add(1, Ordering::Relaxed);
        }
        m.latency.observe(took);
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn one(out: &mut String, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

impl Node {
    /// The node's metrics in the Prometheus text exposition format.
    pub fn render_metrics(&self) -> String {
        let m = self.metrics();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::with_capacity(8 * 1024);
        family(
            &mut out,
            "nimbus_store_requests_total",
            "counter",
            "Client operations coordinated or answered by this node, by operation and result.",
        );
        for (op, name) in OPS {
            let o = &m.ops[op as usize];
            let _ = writeln!(out, "nimbus_store_requests_total{{op=\"{name}\",result=\"ok\"}} {}", load(&o.ok));
            let _ = writeln!(out, "nimbus_store_requests_total{{op=\"{name}\",result=\"error\"}} {}", load(&o.errors));
        }
        family(&mut out, "nimbus_store_request_duration_seconds", "histogram", "Latency of client operations, by operation.");
        for (op, name) in OPS {
            m.ops[op as usize].latency.render(&mut out, "nimbus_store_request_duration_seconds", &format!("op=\"{name}\""));
        }
        let hints = self.storage.hint_count().unwrap_or(0);
        one(&mut out, "nimbus_store_hints_held", "gauge", "Hinted writes this node holds for other owners.", hints);
        one(
            &mut out,
            "nimbus_store_hints_delivered_total",
            "counter",
            "Hints delivered to their owners (or new owners) and removed.",
            load(&m.hints_delivered),
        );
        one(&mut out, "nimbus_store_read_repairs_total", "counter", "Stale replicas repaired by reads.", load(&m.read_repairs));
        one(
            &mut out,
            "nimbus_store_anti_entropy_rounds_total",
            "counter",
            "Completed anti-entropy rounds (periodic and on demand).",
            load(&m.anti_entropy_rounds),
        );
        one(
            &mut out,
            "nimbus_store_anti_entropy_keys_repaired_total",
            "counter",
            "Keys exchanged with replicas by anti-entropy.",
            load(&m.anti_entropy_keys_repaired),
        );
        one(
            &mut out,
            "nimbus_store_anti_entropy_keys_handed_off_total",
            "counter",
            "Keys (and graves) of partitions this node no longer replicates, handed to their owners.",
            load(&m.anti_entropy_keys_handed_off),
        );
        one(
            &mut out,
            "nimbus_store_anti_entropy_errors_total",
            "counter",
            "Partition exchanges of anti-entropy that failed.",
            load(&m.anti_entropy_errors),
        );
        one(
            &mut out,
            "nimbus_store_tombstones_collected_total",
            "counter",
            "Tombstones collected by this node's GC pass.",
            load(&m.tombstones_collected),
        );
        one(
            &mut out,
            "nimbus_store_ring_refusals_total",
            "counter",
            "Gossip exchanges refused because ring parameters disagree.",
            load(&m.ring_refusals),
        );
        one(
            &mut out,
            "nimbus_store_tls_handshakes_refused_total",
            "counter",
            "TLS handshakes this node's listener refused (bad or foreign certificates).",
            load(&m.tls_refused),
        );
        one(
            &mut out,
            "nimbus_store_unauthenticated_requests_total",
            "counter",
            "Requests and framed connections refused for lack of a client certificate, or sent in plaintext to a TLS port.",
            load(&m.unauthenticated),
        );

        let view = self.membership.view();
        family(&mut out, "nimbus_store_members", "gauge", "Members known to this node, by status and liveness.");
        for status in [crate::membership::Status::Joined, crate::membership::Status::Leaving, crate::membership::Status::Left] {
            for alive in [true, false] {
                let n = view.iter().filter(|v| v.status == status && v.alive == alive).count();
                let _ = writeln!(out, "nimbus_store_members{{status=\"{}\",alive=\"{alive}\"}} {n}", format!("{status:?}").to_lowercase());
            }
        }
        let ring = self.membership.ring();
        one(&mut out, "nimbus_store_ring_nodes", "gauge", "Nodes in this node's view of the ring.", ring.nodes().len());
        one(&mut out, "nimbus_store_ring_partitions", "gauge", "Partitions of the ring (fixed).", ring.partitions());
        one(&mut out, "nimbus_store_replication_factor", "gauge", "N, replicas per key.", self.cfg.n);
        one(
            &mut out,
            "nimbus_store_partitions_owned",
            "gauge",
            "Partitions this node replicates (is in the preference list of).",
            ring.replicated_partitions(&self.cfg.id, self.cfg.n).len(),
        );
        one(
            &mut out,
            "nimbus_store_refused_members",
            "gauge",
            "Nodes refused because their ring parameters disagree.",
            self.membership.refused().len(),
        );
        one(
            &mut out,
            "nimbus_store_ready",
            "gauge",
            "1 when the node is ready (GET /readyz answers 200).",
            u8::from(self.readiness().is_ok()),
        );

        let w = self.storage.writer_stats();
        one(&mut out, "nimbus_store_storage_commits_total", "counter", "Storage commits (write batches).", w.commits);
        one(&mut out, "nimbus_store_storage_writes_total", "counter", "Writes committed (a commit holds one or more).", w.writes);
        one(&mut out, "nimbus_store_storage_slow_commits_total", "counter", "Commits that took at least 2 ms.", w.slow_commits);
        one(&mut out, "nimbus_store_storage_commit_seconds_total", "counter", "Time spent in commits.", w.commit_us as f64 / 1e6);
        one(&mut out, "nimbus_store_storage_fsyncs_total", "counter", "Periodic fdatasyncs of the journal.", w.syncs);
        one(&mut out, "nimbus_store_uptime_seconds", "gauge", "Seconds since the node started.", self.started.elapsed().as_secs_f64());
        out
    }
}
