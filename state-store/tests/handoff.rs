//! Hinted handoff delivers to the returning owner, read repair fixes a
//! stale replica, silent replicas bound requests by the timeout or, when a
//! quorum remains, do not hold them up at all.

mod common;
use common::{wait_until, Cluster};
use nimbus_state_store::rpc::{Request, Response};
use nimbus_state_store::{Context, KvClient, LocalClient, StoreError};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hinted_handoff_delivers_when_owner_returns() {
    let c = Cluster::start(5, 7).await;
    let key = b"instance/i-123";
    let ring = c.node(0).expect("n0").membership().ring();
    let owner_id = ring.preference_list(ring.partition_of(key), 3)[0].clone();
    let owner = c.ids.iter().position(|x| *x == owner_id).expect("owner index");
    let coord = (owner + 1) % 5;
    c.kill(owner);
    let client = LocalClient(c.node(coord).expect("coordinator"));
    client.put(key, b"running".to_vec(), &Context::empty()).await.expect("sloppy write acknowledged");
    // a stand-in holds a hint naming the owner (the slot for the dead
    // owner may still be finishing after the quorum answered)
    let hinted = || -> u64 { c.live().iter().map(|n| n.admin_view().hints_by_owner.get(&owner_id).copied().unwrap_or(0)).sum() };
    wait_until("a stand-in holds the hint", Duration::from_secs(5), || hinted() >= 1).await;
    assert_eq!(hinted(), 1, "exactly one stand-in holds the hint");

    let back = c.restart(owner).await;
    assert!(back.storage().get(key).expect("read").is_none(), "owner missed the write while down");
    c.wait_all_alive().await;
    for n in c.live() {
        n.deliver_hints().await;
    }
    let rec = back.storage().get(key).expect("read").expect("owner now holds the value");
    assert_eq!(rec.values(), vec![b"running".to_vec()]);
    let left: u64 = c.live().iter().map(|n| n.storage().hint_count().expect("count")).sum();
    assert_eq!(left, 0, "hint removed after the owner acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_repair_fixes_stale_replica() {
    // every read asks all three replicas (the stale one may not be among
    // the R a read otherwise asks)
    let c = Cluster::start_with(5, 8, |cfg| cfg.read_repair_chance = 1.0).await;
    let key = b"instance/i-9";
    let n0 = c.node(0).expect("n0");
    let ring = n0.membership().ring();
    let pref = ring.preference_list(ring.partition_of(key), 3);
    let stale = c.ids.iter().position(|x| *x == pref[2]).expect("index");
    let client = LocalClient(n0.clone());
    client.put(key, b"v1".to_vec(), &Context::empty()).await.expect("put v1");
    // cut the third replica off, update, reconnect
    let others: Vec<String> = c.ids.iter().filter(|x| **x != pref[2]).cloned().collect();
    c.net.partition(&[pref[2].clone()], &others);
    wait_until("writes reach the first two replicas", Duration::from_secs(5), || {
        pref[..2].iter().all(|id| {
            let i = c.ids.iter().position(|x| x == id).unwrap_or(0);
            c.node(i).and_then(|n| n.storage().get(key).ok().flatten()).is_some()
        })
    })
    .await;
    let ctx = client.get(key).await.expect("get").context;
    client.put(key, b"v2".to_vec(), &ctx).await.expect("put v2");
    c.net.heal();
    c.wait_all_alive().await;
    // the stale replica may hold a hint-free old version; a read repairs it
    let r = client.get(key).await.expect("get");
    assert_eq!(r.values, vec![b"v2".to_vec()]);
    let stale_node = c.node(stale).expect("stale node");
    wait_until("read repair reaches the stale replica", Duration::from_secs(5), || {
        stale_node.storage().get(key).ok().flatten().map(|r| r.values()) == Some(vec![b"v2".to_vec()])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_silent_nodes_time_out() {
    // 3 nodes, N=3: no fallbacks, so two silent owners mean no quorum
    let c = Cluster::start(3, 9).await;
    let n0 = c.node(0).expect("n0");
    let client = LocalClient(n0.clone());
    client.put(b"k", b"v".to_vec(), &Context::empty()).await.expect("put before");
    c.net.hang(&"n1".to_string());
    c.net.hang(&"n2".to_string());
    let t = std::time::Instant::now();
    let err = client.put(b"k", b"w".to_vec(), &Context::empty()).await.expect_err("no write quorum");
    assert!(matches!(err, nimbus_state_store::StoreError::QuorumFailed { got: 1, needed: 2 }), "{err:?}");
    let err = client.get(b"k").await.expect_err("no read quorum");
    assert!(matches!(err, nimbus_state_store::StoreError::QuorumFailed { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(6), "timeouts bound the wait: {:?}", t.elapsed());
    c.net.heal();
    wait_until("silent nodes answer gossip again", Duration::from_secs(10), || {
        n0.membership().is_alive("n1") && n0.membership().is_alive("n2")
    })
    .await;
    let r = client.get(b"k").await.expect("get after heal");
    assert!(r.values.contains(&b"v".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_do_not_wait_for_a_silent_replica() {
    // 3 nodes, N=3, R=W=2, and a request timeout far longer than the test
    // may take: with one owner silent, a read must get its second reply
    // from the third owner (asked when the first call fails or after
    // `read_hedge`) and a write its second ack from it, without waiting
    // for the silent one's timeout.
    let c = Cluster::start_with(3, 10, |cfg| cfg.request_timeout = Duration::from_secs(120)).await;
    let n0 = c.node(0).expect("n0");
    let client = LocalClient(n0.clone());
    let mut ctx = Context::empty();
    for i in 0..20 {
        ctx = client.put(b"k", format!("v{i}").into_bytes(), &ctx).await.expect("put before");
    }
    c.net.hang(&"n1".to_string());
    let quick = Duration::from_secs(20);
    for i in 0..20 {
        // reads rotate between n1 and n2 as n0's second replica: half of
        // them ask the silent n1 first
        let r = tokio::time::timeout(quick, client.get(b"k")).await.expect("a read waited for the silent replica").expect("get");
        assert_eq!(r.values, vec![format!("v{}", 19 + i).into_bytes()]);
        tokio::time::timeout(quick, client.put(b"k", format!("v{}", 20 + i).into_bytes(), &r.context))
            .await
            .expect("a write waited for the silent replica")
            .expect("put");
    }
    c.net.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_whose_reply_is_lost_is_not_applied_twice() {
    let c = Cluster::start(5, 14).await;
    let key = b"instance/i-lost";
    let pref = c.preference_list(key);
    let outsider = c.ids.iter().position(|x| !pref.contains(x)).expect("a node that owns no replica");
    // the outsider forwards the write to the first owner, which applies
    // and replicates it; then the connection breaks before the reply
    c.net.lose_replies_from(&pref[0]);
    let client = LocalClient(c.node(outsider).expect("outsider"));
    let err = client.put(key, b"v1".to_vec(), &Context::empty()).await.expect_err("the outcome is unknown");
    assert!(matches!(err, StoreError::OutcomeUnknown(_)), "{err:?}");
    c.net.heal();
    c.wait_all_alive().await;
    wait_until("every owner holds the write", Duration::from_secs(5), || pref.iter().all(|id| c.stored(id, key).is_some())).await;
    // applied once: one version, not two siblings of the same value
    for id in &pref {
        let rec = c.stored(id, key).expect("record");
        assert_eq!(rec.values(), vec![b"v1".to_vec()], "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waits_for_live_owners_instead_of_counting_empty_stand_ins() {
    // every read asks every candidate at once, fallbacks included
    let c = Cluster::start_with(5, 15, |cfg| cfg.read_repair_chance = 1.0).await;
    let key = b"instance/i-slow";
    let pref = c.preference_list(key);
    let outsider = c.ids.iter().position(|x| !pref.contains(x)).expect("a node that owns no replica");
    let client = LocalClient(c.node(outsider).expect("outsider"));
    client.put(key, b"v1".to_vec(), &Context::empty()).await.expect("put");
    wait_until("every owner holds the write", Duration::from_secs(5), || pref.iter().all(|id| c.stored(id, key).is_some())).await;
    // the owners answer late; the outsider itself and the fifth node,
    // which never held the key, answer at once
    for id in &pref {
        c.net.slow_down(id, Duration::from_millis(200));
    }
    for _ in 0..3 {
        let r = client.get(key).await.expect("get");
        assert_eq!(r.values, vec![b"v1".to_vec()], "a read answered from stand-ins while the owners were alive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_hands_hints_for_a_down_owner_to_another_node() {
    let c = Cluster::start(5, 16).await;
    let key = b"instance/i-hint";
    let pref = c.preference_list(key);
    let owner = c.index(&pref[0]);
    c.kill(owner);
    let client = LocalClient(c.node(c.index(&pref[1])).expect("second owner"));
    client.put(key, b"v1".to_vec(), &Context::empty()).await.expect("sloppy write");
    wait_until("a stand-in holds the hint", Duration::from_secs(5), || c.hint_holder().is_some()).await;
    let leaver = c.hint_holder().expect("stand-in");
    let leaver_idx = c.index(leaver.id());
    let report = leaver.leave().await.expect("leave");
    assert_eq!(report.hints_handed_off, 1, "{report:?}");
    assert_eq!(leaver.storage().hint_count().expect("count"), 0);
    // once leaving, the node refuses replica writes
    let record = c.stored(&pref[1], key).expect("record");
    let resp = leaver.handle_local(Request::Hinted { owner: pref[0].clone(), key: key.to_vec(), record }).await;
    assert!(matches!(resp, Response::Error(_)), "{resp:?}");
    c.kill(leaver_idx);
    drop(leaver);
    // the owner returns and gets the write from the hint's new holder
    let back = c.restart(owner).await;
    assert!(back.storage().get(key).expect("read").is_none(), "the owner missed the write while down");
    c.wait_all_alive().await;
    c.drain_hints().await;
    let rec = back.storage().get(key).expect("read").expect("the owner holds the write");
    assert_eq!(rec.values(), vec![b"v1".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_requests_with_bad_keys_are_refused() {
    let c = Cluster::start(3, 19).await;
    let n0 = c.node(0).expect("n0");
    let client = LocalClient(n0.clone());
    client.put(b"k", b"v".to_vec(), &Context::empty()).await.expect("put");
    let record = n0.storage().get(b"k").expect("read").expect("record");
    let big = vec![b'k'; nimbus_state_store::error::MAX_KEY_BYTES + 1];
    for req in [
        Request::Put { key: big.clone(), record: record.clone() },
        Request::Hinted { owner: "n1".into(), key: big.clone(), record: record.clone() },
        Request::PutMany { items: vec![(b"ok".to_vec(), record.clone()), (Vec::new(), record.clone())] },
    ] {
        let resp = n0.handle_local(req).await;
        assert!(matches!(resp, Response::Error(_)), "{resp:?}");
    }
    assert!(n0.storage().get(&big).expect("read").is_none());
    assert_eq!(n0.storage().hint_count().expect("hints"), 0);
    assert!(n0.storage().get(b"ok").expect("read").is_none(), "nothing of a refused batch is written");
}
