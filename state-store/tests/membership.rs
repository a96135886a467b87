//! Explicit leave and join, and tombstone garbage collection.

mod common;
use common::{config, wait_until, Cluster};
use nimbus_state_store::rpc::Handler;
use nimbus_state_store::storage::Storage;
use nimbus_state_store::{Context, Fsync, KvClient, LocalClient, Node};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_hands_over_and_join_takes_partitions() {
    // every read asks all replicas and repairs them: the reads below move
    // keys to owners that changed with the ring
    let c = Cluster::start_with(5, 11, |cfg| cfg.read_repair_chance = 1.0).await;
    let client = LocalClient(c.node(0).expect("n0"));
    for i in 0..500 {
        client.put(format!("k{i}").as_bytes(), format!("v{i}").into_bytes(), &Context::empty()).await.expect("put");
    }
    // n4 leaves: every key it held reaches the new owners first
    let leaver = c.node(4).expect("n4");
    let report = leaver.leave().await.expect("leave");
    assert!(report.keys_handed_off > 0);
    wait_until("everyone sees the 4-node ring", Duration::from_secs(10), || {
        c.live().iter().filter(|n| n.id() != "n4").all(|n| n.membership().ring().nodes().len() == 4)
    })
    .await;
    c.kill(4);
    drop(leaver);
    for i in 0..500 {
        let r = client.get(format!("k{i}").as_bytes()).await.expect("get");
        assert_eq!(r.values, vec![format!("v{i}").into_bytes()]);
    }
    // every owner on the new ring holds its keys once the hints written
    // for owners that did not answer in time are delivered (no repair by
    // anti-entropy needed). Partitions can also move between the remaining
    // nodes (bounded rendezvous assignment); their new owners get the keys
    // from the read repair of the reads above, which runs in the background
    // after each read returns, so wait for it.
    c.drain_hints().await;
    let missing = || {
        let ring = c.node(0).expect("n0").membership().ring();
        (0..500).map(|i| format!("k{i}")).find_map(|key| {
            ring.preference_list(ring.partition_of(key.as_bytes()), 3).into_iter().find_map(|owner| {
                let idx = c.ids.iter().position(|x| *x == owner).expect("idx");
                let has = c.node(idx).and_then(|n| n.storage().get(key.as_bytes()).ok().flatten()).is_some();
                (!has).then(|| format!("{owner} lacks {key}"))
            })
        })
    };
    wait_until("every new owner holds its keys after handoff and read repair", Duration::from_secs(10), || missing().is_none()).await;

    // a new node joins through a seed and takes over partitions
    let cfg = config(c.dir.path(), "n5", &["n0".to_string()]);
    let n5 = Node::start(cfg, c.net.clone()).await.expect("start n5");
    let h: Arc<dyn Handler> = n5.clone();
    c.net.register(&"n5".to_string(), Arc::downgrade(&h));
    wait_until("everyone sees the 5-node ring", Duration::from_secs(10), || {
        let mut all = c.live();
        all.push(n5.clone());
        all.iter().filter(|n| n.id() != "n4").all(|n| n.membership().ring().nodes().len() == 5)
    })
    .await;
    let ring = n5.membership().ring();
    assert!(!ring.replicated_partitions("n5", 3).is_empty());
    // anti-entropy fills the new replica until its roots match the others
    for _ in 0..20 {
        let mut moved = n5.anti_entropy_round().await;
        for n in c.live() {
            moved += n.anti_entropy_round().await;
        }
        if moved == 0 {
            break;
        }
    }
    let roots5 = n5.partition_roots();
    for p in ring.replicated_partitions("n5", 3) {
        for owner in ring.preference_list(p, 3).into_iter().filter(|o| o != "n5") {
            let idx = c.ids.iter().position(|x| *x == owner).expect("idx");
            let other = c.node(idx).expect("owner").partition_roots();
            assert_eq!(roots5[p as usize], other[p as usize], "partition {p} differs between n5 and {owner}");
        }
    }
    assert!(n5.storage().len().expect("len") > 0);

    // nodes that lost partitions to n5 hand those keys over and drop them:
    // in the end every node holds only partitions it replicates, and every
    // key still reads back
    let mut all = c.live();
    all.push(n5.clone());
    let foreign = |nodes: &[Arc<Node>]| -> usize {
        nodes
            .iter()
            .map(|n| {
                let ring = n.membership().ring();
                let held = n.storage().partitions_with_data().expect("partitions");
                held.into_iter().filter(|p| !ring.preference_list(*p, 3).contains(n.id())).count()
            })
            .sum()
    };
    let started = std::time::Instant::now();
    let mut handed_off = 0;
    while foreign(&all) > 0 {
        assert!(started.elapsed() < Duration::from_secs(15), "foreign partitions left: {}", foreign(&all));
        for n in &all {
            handed_off += n.anti_entropy_round().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("handed off after the join: {handed_off} key exchanges");
    for i in 0..500 {
        let r = client.get(format!("k{i}").as_bytes()).await.expect("get after handoff");
        assert_eq!(r.values, vec![format!("v{i}").into_bytes()]);
    }
    n5.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_collected_only_when_all_replicas_have_them() {
    // no grace period: only the all-replicas rule holds the tombstones back
    let c = Cluster::start_with(5, 12, |cfg| cfg.tombstone_grace = Duration::from_millis(0)).await;
    let client = LocalClient(c.node(0).expect("n0"));
    client.put(b"gone", b"v".to_vec(), &Context::empty()).await.expect("put");
    let ctx = client.get(b"gone").await.expect("get").context;
    let ring = c.node(0).expect("n0").membership().ring();
    let pref = ring.preference_list(ring.partition_of(b"gone"), 3);
    let idx = |id: &str| c.ids.iter().position(|x| x == id).expect("idx");
    let holds_tombstone =
        |id: &str| c.node(idx(id)).and_then(|n| n.storage().get(b"gone").ok().flatten()).is_some_and(|r| r.is_tombstone());
    // the last replica is cut off while the delete happens
    let others: Vec<String> = c.ids.iter().filter(|x| **x != pref[2]).cloned().collect();
    c.net.partition(&[pref[2].clone()], &others);
    client.delete(b"gone", &ctx).await.expect("delete");
    wait_until("the reachable owners hold the tombstone", Duration::from_secs(5), || {
        holds_tombstone(&pref[0]) && holds_tombstone(&pref[1])
    })
    .await;
    let first_id = idx(&pref[0]);
    let first = c.node(first_id).expect("first owner");
    assert_eq!(first.gc_tombstones().await, 0, "collected while {} lacks the tombstone", pref[2]);
    assert!(holds_tombstone(&pref[0]) && holds_tombstone(&pref[1]), "a tombstone went while a replica lacks it");
    c.net.heal();
    c.wait_all_alive().await;
    c.drain_hints().await;
    c.converge().await;
    for id in &pref {
        assert!(holds_tombstone(id), "{id} holds the tombstone");
    }
    // every replica has it now, but within a grace period nothing goes
    c.kill(first_id);
    drop(first);
    let mut cfg = config(c.dir.path(), &pref[0], &c.ids);
    cfg.tombstone_grace = Duration::from_secs(3600);
    let graceful = {
        let start = std::time::Instant::now();
        loop {
            match Node::start(cfg.clone(), c.net.clone()).await {
                Ok(n) => break n,
                Err(_) => {
                    assert!(start.elapsed() < Duration::from_secs(10));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    };
    let h: Arc<dyn Handler> = graceful.clone();
    c.net.register(&pref[0], Arc::downgrade(&h));
    drop(h);
    c.nodes.lock().expect("lock")[first_id] = Some(graceful.clone());
    c.wait_all_alive().await;
    assert_eq!(graceful.gc_tombstones().await, 0, "collected within the grace period");
    // after it (the cluster's zero grace), it is collected everywhere
    c.kill(first_id);
    drop(graceful);
    let first = c.restart(first_id).await;
    c.wait_all_alive().await;
    assert_eq!(first.gc_tombstones().await, 1);
    for id in &pref {
        let n = c.node(idx(id)).expect("owner");
        assert!(n.storage().get(b"gone").expect("read").is_none(), "{id} still holds the tombstone");
    }
    let r = client.get(b"gone").await.expect("get");
    assert!(r.values.is_empty());
    assert_eq!(c.root_mismatches().1, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_dead_node_rebuilds_its_replicas() {
    let c = Cluster::start(5, 13).await;
    let client = LocalClient(c.node(0).expect("n0"));
    c.kill(3);
    for i in 0..200 {
        client.put(format!("r{i}").as_bytes(), format!("v{i}").into_bytes(), &Context::empty()).await.expect("put");
    }
    let hints: u64 = c.live().iter().map(|n| n.storage().hint_count().expect("count")).sum();
    assert!(hints > 0, "writes for the dead node are held as hints");
    c.node(0).expect("n0").remove_member("n3").await.expect("remove");
    wait_until("everyone sees the 4-node ring", Duration::from_secs(10), || {
        c.live().iter().all(|n| n.membership().ring().nodes().len() == 4)
    })
    .await;
    c.drain_hints().await;
    c.converge().await;
    assert_eq!(c.root_mismatches().1, 0);
    for i in 0..200 {
        let key = format!("r{i}");
        let ring = c.node(0).expect("n0").membership().ring();
        for owner in ring.preference_list(ring.partition_of(key.as_bytes()), 3) {
            let idx = c.ids.iter().position(|x| *x == owner).expect("idx");
            let rec = c.node(idx).and_then(|n| n.storage().get(key.as_bytes()).ok().flatten());
            assert_eq!(rec.map(|r| r.values()), Some(vec![format!("v{i}").into_bytes()]), "{owner} holds {key}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collected_key_stays_deleted_when_older_copies_surface() {
    let c = Cluster::start_with(5, 17, |cfg| cfg.tombstone_grace = Duration::from_millis(0)).await;
    let key = b"instance/i-buried";
    let pref = c.preference_list(key);
    let idx = |id: &str| c.index(id);
    let stored = |id: &str| c.stored(id, key);
    // the third owner is down while the value is written: a stand-in
    // holds its copy as a hint
    let third = idx(&pref[2]);
    c.kill(third);
    let client = LocalClient(c.node(idx(&pref[0])).expect("first owner"));
    client.put(key, b"v1".to_vec(), &Context::empty()).await.expect("put");
    wait_until("a stand-in holds the hint", Duration::from_secs(5), || c.hint_holder().is_some()).await;
    let holder_id = c.hint_holder().expect("stand-in").id().clone();
    let old = stored(&pref[0]).expect("the first owner holds v1");
    // the stand-in is cut off before it can deliver; the owner returns
    let others: Vec<String> = c.ids.iter().filter(|x| **x != holder_id).cloned().collect();
    c.net.partition(std::slice::from_ref(&holder_id), &others);
    c.restart(third).await;
    wait_until("the owners see each other", Duration::from_secs(20), || {
        pref.iter().all(|a| pref.iter().all(|b| c.node(idx(a)).is_some_and(|n| n.membership().is_alive(b))))
    })
    .await;
    // delete, spread the tombstone, collect it on all three owners
    let ctx = client.get(key).await.expect("get").context;
    client.delete(key, &ctx).await.expect("delete");
    c.converge().await;
    for id in &pref {
        assert!(stored(id).is_some_and(|r| r.is_tombstone()), "{id} holds the tombstone");
    }
    assert_eq!(c.node(idx(&pref[0])).expect("first owner").gc_tombstones().await, 1);
    for id in &pref {
        assert!(stored(id).is_none(), "{id} still holds the key");
    }
    // the stand-in returns and hands its old copy to the owner
    c.net.heal();
    c.wait_all_alive().await;
    c.drain_hints().await;
    for id in &pref {
        assert!(stored(id).is_none(), "the hint brought the deleted value back on {id}");
    }
    assert!(client.get(key).await.expect("get").values.is_empty());
    // a replica that lost its disk gets the old copy again; anti-entropy
    // with a replica that collected the key buries it there too
    let second = idx(&pref[1]);
    c.kill(second);
    let wiped = c.dir.path().join(&pref[1]);
    // once the killed instance has closed its store (it can be opened
    // again), the disk is lost
    let start = std::time::Instant::now();
    while Storage::open(&wiped.join("store"), 256, Fsync::Always, 1 << 20).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "the killed replica's store stays open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::remove_dir_all(&wiped).expect("lose the disk");
    let fresh = c.restart(second).await;
    c.wait_all_alive().await;
    fresh.storage().merge(key, old).await.expect("stale copy");
    assert!(stored(&pref[1]).is_some());
    c.converge().await;
    for id in &pref {
        assert!(stored(id).is_none(), "anti-entropy brought the deleted value back on {id}");
    }
    assert_eq!(c.root_mismatches().1, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graves_move_with_their_partitions() {
    let c = Cluster::start_with(5, 18, |cfg| cfg.tombstone_grace = Duration::from_millis(0)).await;
    let n0 = c.node(0).expect("n0");
    let ring = n0.membership().ring();
    // a key whose preference list takes in n5 when it joins
    let mut with_n5: Vec<String> = c.ids.clone();
    with_n5.push("n5".into());
    let joined = nimbus_state_store::ring::Ring::new(&with_n5, ring.partitions());
    let key = (0..10_000)
        .map(|i| format!("instance/i-{i}"))
        .find(|k| {
            let p = ring.partition_of(k.as_bytes());
            let (before, after) = (ring.preference_list(p, 3), joined.preference_list(p, 3));
            after.contains(&"n5".to_string()) && !before.contains(&"n5".to_string())
        })
        .expect("a key that moves to n5");
    let key = key.as_bytes();
    let pref = ring.preference_list(ring.partition_of(key), 3);
    let idx = |id: &str| c.index(id);
    let client = LocalClient(n0.clone());
    client.put(key, b"v1".to_vec(), &Context::empty()).await.expect("put");
    let ctx = client.get(key).await.expect("get").context;
    client.delete(key, &ctx).await.expect("delete");
    c.converge().await;
    assert_eq!(c.node(idx(&pref[0])).expect("first owner").gc_tombstones().await, 1);
    for id in &pref {
        assert!(c.node(idx(id)).expect("owner").storage().grave(key).expect("grave").is_some(), "{id} keeps a grave");
    }
    // n5 joins and takes the partition over from one of the owners
    let cfg = config(c.dir.path(), "n5", &["n0".to_string()]);
    let n5 = Node::start(cfg, c.net.clone()).await.expect("start n5");
    let h: Arc<dyn Handler> = n5.clone();
    c.net.register(&"n5".to_string(), Arc::downgrade(&h));
    wait_until("everyone sees the 6-node ring", Duration::from_secs(10), || {
        c.live().iter().all(|n| n.membership().ring().nodes().len() == 6) && n5.membership().ring().nodes().len() == 6
    })
    .await;
    let new_pref = n5.membership().ring().preference_list(ring.partition_of(key), 3);
    let gone: Vec<String> = pref.iter().filter(|o| !new_pref.contains(o)).cloned().collect();
    assert!(!gone.is_empty(), "an owner lost the partition: {pref:?} -> {new_pref:?}");
    let node_of = |id: &str| if id == "n5" { Some(n5.clone()) } else { c.node(idx(id)) };
    let handed_over = || {
        new_pref.iter().all(|id| node_of(id).is_some_and(|n| n.storage().grave(key).ok().flatten().is_some()))
            && gone.iter().all(|id| node_of(id).is_some_and(|n| n.storage().grave(key).ok().flatten().is_none()))
    };
    let start = std::time::Instant::now();
    while !handed_over() {
        assert!(start.elapsed() < Duration::from_secs(15), "the grave did not move to {new_pref:?}");
        for n in c.live() {
            n.anti_entropy_round().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // an owner leaves: the owners after it hold the grave too
    let leaver = node_of(&new_pref[0]).expect("an owner");
    leaver.leave().await.expect("leave");
    let observer = c.live().into_iter().find(|n| n.id() != leaver.id()).expect("another node");
    wait_until("the ring drops the leaver", Duration::from_secs(10), || !observer.membership().ring().nodes().contains(leaver.id())).await;
    let last_pref = observer.membership().ring().preference_list(ring.partition_of(key), 3);
    assert!(last_pref.iter().any(|id| !new_pref.contains(id)), "a new owner took the leaver's place");
    for id in &last_pref {
        assert!(node_of(id).is_some_and(|n| n.storage().grave(key).ok().flatten().is_some()), "{id} lacks the grave after the leave");
    }
    n5.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_other_ring_parameters_is_refused() {
    use nimbus_state_store::rpc::{Request, Response, Transport};
    use nimbus_state_store::{Config, StoreError};
    let c = Cluster::start(3, 21).await;
    for n in c.live() {
        n.join().await.expect("join");
    }
    let client = LocalClient(c.node(0).expect("n0"));
    type Tweak = fn(&mut Config);
    let tweaks: [(&str, Tweak); 2] = [("partitions", |cfg| cfg.partitions = 64), ("n", |cfg| cfg.n = 2)];
    for (what, tweak) in tweaks {
        let id = format!("bad-{what}");
        let mut cfg = config(c.dir.path(), &id, &["n0".to_string()]);
        tweak(&mut cfg);
        let bad = Node::start(cfg, c.net.clone()).await.expect("start");
        let h: Arc<dyn Handler> = bad.clone();
        c.net.register(&id, Arc::downgrade(&h));
        // the join is refused with both sides' parameters
        let err = bad.join().await.expect_err("a disagreeing node's join is refused");
        assert!(matches!(err, StoreError::RingMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("N=3 partitions=256") && msg.contains(&id), "{msg}");
        // it serves no client operations
        let r = LocalClient(bad.clone()).put(b"k", b"v".to_vec(), &Context::empty()).await;
        assert!(matches!(r, Err(StoreError::NotInRing(_))), "{r:?}");
        assert!(matches!(LocalClient(bad.clone()).get(b"k").await, Err(StoreError::NotInRing(_))));
        // its gossip is refused by nodes it did not join through too
        let req = Request::Gossip { from: id.clone(), params: bad.membership().params(), members: bad.membership().snapshot() };
        let resp = c.net.call(&id, &"n2".to_string(), req).await;
        assert!(matches!(resp, Ok(Response::Failed(StoreError::RingMismatch { .. }))), "{resp:?}");
        // gossip goes on: no established node ever takes it into its ring
        for _ in 0..10 {
            bad.gossip_round().await;
            for n in c.live() {
                n.gossip_round().await;
            }
        }
        for n in c.live() {
            assert_eq!(n.membership().ring().nodes().len(), 3, "{} took {id} into its ring", n.id());
            assert!(n.membership().view().iter().all(|m| m.id != id), "{} lists {id}", n.id());
            assert!(n.readiness().is_ok(), "{} is still ready: {:?}", n.id(), n.readiness());
        }
        // writes through one established node read back through another
        assert!(matches!(bad.readiness(), Err(nimbus_state_store::NotReady::JoinRefused(_))));
        for i in 0..50 {
            let key = format!("{what}-{i}");
            client.put(key.as_bytes(), b"v".to_vec(), &Context::empty()).await.expect("put");
            let r = LocalClient(c.node(1 + i % 2).expect("node")).get(key.as_bytes()).await.expect("get");
            assert_eq!(r.values, vec![b"v".to_vec()], "{key}");
        }
        bad.shutdown();
        c.net.kill(&id);
    }
    // a member restarted with another N (on its own store: a different
    // partition count would not even open it) is refused too, and stays
    // in the ring as a down node (its partitions do not move) until it
    // comes back with the right one
    c.kill(2);
    let mut cfg = config(c.dir.path(), "n2", &c.ids);
    cfg.n = 2;
    let wrong = Node::start(cfg, c.net.clone()).await.expect("start");
    let h: Arc<dyn Handler> = wrong.clone();
    c.net.register(&"n2".to_string(), Arc::downgrade(&h));
    assert!(matches!(wrong.join().await, Err(StoreError::RingMismatch { .. })));
    let n0 = c.node(0).expect("n0");
    assert!(!n0.membership().is_alive("n2"), "refused means down");
    assert_eq!(n0.membership().ring().nodes().len(), 3, "n2 keeps its partitions");
    assert!(n0.admin_view().refused_members.contains_key("n2"));
    wrong.shutdown();
    c.net.kill(&"n2".to_string());
    drop((h, wrong));
    c.restart(2).await;
    wait_until("n2 is back with the right parameters", Duration::from_secs(10), || {
        n0.membership().is_alive("n2") && !n0.admin_view().refused_members.contains_key("n2")
    })
    .await;
}
