//! Fault test: 5 nodes on the simulated network (fixed seed), 10,000 keys
//! written by 16 concurrent writers while messages are dropped, nodes are
//! killed and restarted (reopening their on-disk stores) and the network is
//! partitioned. Checked at the end: no acknowledged write lost, concurrent
//! writes survive as siblings until superseded, deleted keys stay deleted,
//! and after healing plus anti-entropy every replica of every partition has
//! the same Merkle root.

mod common;
use common::Cluster;
use nimbus_state_store::{Context, KvClient, LocalClient, Node};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const KEYS: usize = 10_000;
const WRITERS: usize = 16;

#[derive(Default)]
struct Ledger {
    /// acknowledged values per key
    acked: HashMap<String, Vec<Vec<u8>>>,
    /// values read before an acknowledged write with that context
    superseded: HashMap<String, HashSet<Vec<u8>>>,
    /// values read before a write whose outcome is unknown (may or may not
    /// have superseded them)
    maybe_superseded: HashMap<String, HashSet<Vec<u8>>>,
    /// values read before an acknowledged delete
    deleted: HashMap<String, HashSet<Vec<u8>>>,
    /// keys written concurrently by two blind writers, both acknowledged
    sibling_keys: HashMap<String, (Vec<u8>, Vec<u8>)>,
}

fn pick(c: &Cluster, rng: &mut StdRng) -> Arc<Node> {
    loop {
        let live = c.live();
        if !live.is_empty() {
            return live[rng.gen_range(0..live.len())].clone();
        }
    }
}

/// Put with up to 5 attempts; every attempt writes a distinct value so an
/// attempt that failed but still reached a replica is recognisable.
/// Returns the acknowledged value.
async fn put_retry(c: &Cluster, rng: &mut StdRng, key: &str, value: &str, ctx: &Context) -> Option<Vec<u8>> {
    for t in 0..5 {
        let node = pick(c, rng);
        let v = format!("{value}#{t}").into_bytes();
        if LocalClient(node).put(key.as_bytes(), v.clone(), ctx).await.is_ok() {
            return Some(v);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_under_faults_lose_nothing() {
    let c = Arc::new(Cluster::start(5, 42).await);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let progress = Arc::new(AtomicUsize::new(0));
    let (ptx, prx) = tokio::sync::watch::channel(0usize);
    let ptx = Arc::new(ptx);

    // fault schedule, driven by write progress
    let ctl = {
        let c = c.clone();
        let prx = prx.clone();
        tokio::spawn(async move {
            let at = |n: usize| {
                let mut prx = prx.clone();
                async move {
                    let _ = prx.wait_for(|p| *p >= n).await;
                }
            };
            at(1000).await;
            c.net.set_drop_rate(0.05);
            at(2500).await;
            c.kill(3);
            at(5000).await;
            c.restart(3).await;
            at(6000).await;
            let (a, b) = (c.ids[..2].to_vec(), c.ids[2..].to_vec());
            c.net.partition(&a, &b);
            at(7500).await;
            c.net.heal();
            at(8500).await;
            c.kill(1);
            at(9500).await;
            c.restart(1).await;
        })
    };

    // phase 1: concurrent writers; every 10th key gets two concurrent blind
    // writes that must both survive as siblings
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (c, ledger, progress, ptx) = (c.clone(), ledger.clone(), progress.clone(), ptx.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(1000 + w as u64);
            for i in (w..KEYS).step_by(WRITERS) {
                let key = format!("inst/{i:05}");
                if i % 10 == 0 {
                    let (c1, c2) = (c.clone(), c.clone());
                    let (k1, k2) = (key.clone(), key.clone());
                    let mut r1 = StdRng::seed_from_u64(rng.gen());
                    let mut r2 = StdRng::seed_from_u64(rng.gen());
                    let a = tokio::spawn(async move { put_retry(&c1, &mut r1, &k1, "a", &Context::empty()).await });
                    let b = tokio::spawn(async move { put_retry(&c2, &mut r2, &k2, "b", &Context::empty()).await });
                    let (a, b) = (a.await.ok().flatten(), b.await.ok().flatten());
                    let mut l = ledger.lock().expect("ledger");
                    if let (Some(a), Some(b)) = (&a, &b) {
                        l.sibling_keys.insert(key.clone(), (a.clone(), b.clone()));
                    }
                    for v in [a, b].into_iter().flatten() {
                        l.acked.entry(key.clone()).or_default().push(v);
                    }
                } else {
                    let v = format!("v{i}-w{w}");
                    if let Some(v) = put_retry(&c, &mut rng, &key, &v, &Context::empty()).await {
                        ledger.lock().expect("ledger").acked.entry(key).or_default().push(v);
                    }
                }
                let p = progress.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = ptx.send(p);
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    ptx.send_modify(|p| *p += 1);
    ctl.await.expect("fault controller");

    // phase 2 (drops still on): supersede half of the sibling keys with a
    // write that read both, and delete 1,000 keys with their context
    let mut rng = StdRng::seed_from_u64(99);
    let mut supersede_ok = 0;
    let mut deletes_ok = 0;
    for i in 0..KEYS {
        let key = format!("inst/{i:05}");
        let supersede = i % 20 == 0;
        let delete = i % 10 == 5;
        if !supersede && !delete {
            continue;
        }
        let mut read = None;
        for _ in 0..5 {
            if let Ok(r) = LocalClient(pick(&c, &mut rng)).get(key.as_bytes()).await {
                read = Some(r);
                break;
            }
        }
        let Some(r) = read else { continue };
        let seen: HashSet<Vec<u8>> = r.values.iter().cloned().collect();
        let (ok, merged) = if supersede {
            let m = put_retry(&c, &mut rng, &key, "merged", &r.context).await;
            (m.is_some(), m)
        } else {
            let mut ok = false;
            for _ in 0..5 {
                if LocalClient(pick(&c, &mut rng)).delete(key.as_bytes(), &r.context).await.is_ok() {
                    ok = true;
                    break;
                }
            }
            (ok, None)
        };
        let mut l = ledger.lock().expect("ledger");
        if ok {
            l.superseded.entry(key.clone()).or_default().extend(seen.iter().cloned());
            if supersede {
                supersede_ok += 1;
                l.acked.entry(key.clone()).or_default().extend(merged);
            } else {
                deletes_ok += 1;
                l.deleted.insert(key.clone(), seen);
            }
        } else {
            l.maybe_superseded.entry(key.clone()).or_default().extend(seen);
        }
    }
    let dropped = c.net.dropped();

    // heal everything, hand hints back, run anti-entropy to quiescence
    c.net.set_drop_rate(0.0);
    c.net.heal();
    c.wait_all_alive().await;
    c.drain_hints().await;
    let repaired = c.converge().await;
    let (parts, bad_roots) = c.root_mismatches();

    // final check, read through the coordinator of node 0
    let client = LocalClient(c.node(0).expect("n0"));
    let l = std::mem::take(&mut *ledger.lock().expect("ledger"));
    let (mut lost, mut resurrected, mut sibling_bad, mut siblings_seen, mut acked_total) = (0, 0, 0, 0, 0);
    for i in 0..KEYS {
        let key = format!("inst/{i:05}");
        let r = client.get(key.as_bytes()).await.expect("final read");
        let present: HashSet<&Vec<u8>> = r.values.iter().collect();
        let sup = l.superseded.get(&key);
        let maybe = l.maybe_superseded.get(&key);
        for v in l.acked.get(&key).into_iter().flatten() {
            acked_total += 1;
            let gone_ok = sup.is_some_and(|s| s.contains(v)) || maybe.is_some_and(|s| s.contains(v));
            if !gone_ok && !present.contains(v) {
                lost += 1;
                eprintln!("LOST {key} {:?} now {:?}", String::from_utf8_lossy(v), r.values);
            }
        }
        // nothing superseded by an acknowledged write or delete comes back
        if sup.is_some_and(|s| s.iter().any(|v| present.contains(v))) {
            resurrected += 1;
            eprintln!("RESURRECTED {key}: now {:?}", r.values);
        }
        if l.deleted.contains_key(&key) && !r.deleted {
            eprintln!("DELETE MISSING {key}: now {:?}", r.values);
            resurrected += 1;
        }
        if let Some((a, b)) = l.sibling_keys.get(&key) {
            if sup.is_none() && maybe.is_none() {
                if present.contains(a) && present.contains(b) {
                    siblings_seen += 1;
                } else {
                    sibling_bad += 1;
                }
            }
        }
    }
    println!(
        "faults: keys={KEYS} acked_values={acked_total} lost={lost} deletes_acked={deletes_ok} resurrected={resurrected} \
         sibling_pairs_kept={siblings_seen} sibling_pairs_broken={sibling_bad} superseded_pairs={supersede_ok} \
         messages_dropped={dropped} anti_entropy_keys_repaired={repaired} partitions={parts} root_mismatches={bad_roots}"
    );
    assert_eq!(lost, 0, "acknowledged writes lost");
    assert_eq!(resurrected, 0, "deleted values came back");
    assert_eq!(sibling_bad, 0, "concurrent writes lost a sibling");
    assert!(siblings_seen > 300, "too few sibling pairs exercised: {siblings_seen}");
    assert!(deletes_ok > 500, "too few deletes acknowledged: {deletes_ok}");
    assert_eq!(bad_roots, 0, "replicas disagree after anti-entropy");
}
