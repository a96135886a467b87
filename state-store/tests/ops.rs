//! Readiness and metrics of nodes on the simulated network: readiness
//! follows the join and the quorum; counters and gauges move with the
//! work they count.

mod common;
use common::{wait_until, Cluster};
use nimbus_state_store::{Context, KvClient, LocalClient, Node, NotReady};
use std::time::Duration;

/// The value of the sample `series` (name and labels as printed) in a
/// Prometheus text page.
pub fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{page}"))
        .parse()
        .expect("a number")
}

fn metric(n: &Node, series: &str) -> f64 {
    sample(&n.render_metrics(), series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_join_and_the_quorum() {
    let c = Cluster::start(3, 31).await;
    let n0 = c.node(0).expect("n0");
    assert_eq!(n0.readiness(), Err(NotReady::JoinPending));
    for n in c.live() {
        n.join().await.expect("join");
    }
    assert_eq!(n0.readiness(), Ok(()));
    assert_eq!(metric(&n0, "nimbus_store_ready"), 1.0);
    // R = W = 2: one node alive of three is not enough
    c.kill(1);
    c.kill(2);
    wait_until("n0 sees too few live nodes", Duration::from_secs(10), || {
        matches!(n0.readiness(), Err(NotReady::NoQuorum { alive: 1, members: 3, needed: 2, .. }))
    })
    .await;
    assert_eq!(metric(&n0, "nimbus_store_ready"), 0.0);
    c.restart(1).await;
    wait_until("n0 is ready again with two live nodes", Duration::from_secs(10), || n0.readiness().is_ok()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_work() {
    let c = Cluster::start(5, 32).await;
    for n in c.live() {
        n.join().await.expect("join");
    }
    let n0 = c.node(0).expect("n0");
    let client = LocalClient(n0.clone());
    let commits_before = metric(&n0, "nimbus_store_storage_commits_total");
    let mut ctx = Context::empty();
    for i in 0..10 {
        ctx = client.put(format!("m-{i}").as_bytes(), b"v".to_vec(), &Context::empty()).await.expect("put");
    }
    for i in 0..5 {
        client.get(format!("m-{i}").as_bytes()).await.expect("get");
    }
    client.delete(b"m-9", &ctx).await.expect("delete");
    assert!(client.put(b"", b"v".to_vec(), &Context::empty()).await.is_err());
    let page = n0.render_metrics();
    assert_eq!(sample(&page, r#"nimbus_store_requests_total{op="put",result="ok"}"#), 10.0);
    assert_eq!(sample(&page, r#"nimbus_store_requests_total{op="put",result="error"}"#), 1.0);
    assert_eq!(sample(&page, r#"nimbus_store_requests_total{op="get",result="ok"}"#), 5.0);
    assert_eq!(sample(&page, r#"nimbus_store_requests_total{op="delete",result="ok"}"#), 1.0);
    assert_eq!(sample(&page, r#"nimbus_store_request_duration_seconds_count{op="put"}"#), 11.0);
    assert_eq!(sample(&page, r#"nimbus_store_request_duration_seconds_bucket{op="get",le="+Inf"}"#), 5.0);
    assert!(sample(&page, "nimbus_store_storage_commits_total") > commits_before);
    assert_eq!(sample(&page, r#"nimbus_store_members{status="joined",alive="true"}"#), 5.0);
    assert_eq!(sample(&page, "nimbus_store_ring_nodes"), 5.0);
    let owned = n0.membership().ring().replicated_partitions(n0.id(), 3).len();
    assert!(owned > 0);
    assert_eq!(sample(&page, "nimbus_store_partitions_owned"), owned as f64);

    // a hint is held while its owner is down and delivered when it is back
    let key = b"hinted";
    let owner = c.preference_list(key).into_iter().find(|o| o != "n0").expect("an owner other than n0");
    let oi = c.index(&owner);
    c.kill(oi);
    client.put(key, b"v".to_vec(), &Context::empty()).await.expect("sloppy put");
    let held = || c.live().iter().map(|n| metric(n, "nimbus_store_hints_held")).sum::<f64>();
    wait_until("a stand-in holds the hint", Duration::from_secs(5), || held() == 1.0).await;
    c.restart(oi).await;
    c.wait_all_alive().await;
    c.drain_hints().await;
    assert_eq!(held(), 0.0);
    let delivered: f64 = c.live().iter().map(|n| metric(n, "nimbus_store_hints_delivered_total")).sum();
    assert_eq!(delivered, 1.0);

    // anti-entropy: a key only one replica holds is repaired and counted
    let record = c.stored(&c.preference_list(b"m-0")[0], b"m-0").expect("a stored record");
    let lonely = b"only-one-replica";
    let holder = c.node(c.index(&c.preference_list(lonely)[0])).expect("holder");
    holder.storage().merge(lonely, record).await.expect("merge");
    let rounds = metric(&holder, "nimbus_store_anti_entropy_rounds_total");
    let repaired = metric(&holder, "nimbus_store_anti_entropy_keys_repaired_total");
    let report = holder.run_anti_entropy().await;
    assert!(report.keys_repaired >= 2, "both other replicas repaired: {report:?}");
    assert_eq!(report.partitions, holder.membership().ring().replicated_partitions(holder.id(), 3).len());
    assert_eq!(report.failed_exchanges, 0);
    assert_eq!(metric(&holder, "nimbus_store_anti_entropy_rounds_total"), rounds + 1.0);
    assert_eq!(metric(&holder, "nimbus_store_anti_entropy_keys_repaired_total"), repaired + report.keys_repaired as f64);
    for owner in c.preference_list(lonely) {
        assert!(c.stored(&owner, lonely).is_some(), "{owner} holds the repaired key");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_rounds_can_be_awaited_and_run_on_demand() {
    let c = Cluster::start_with(3, 33, |cfg| cfg.anti_entropy_interval = Duration::from_millis(200)).await;
    let n0 = c.node(0).expect("n0");
    // the periodic loop's rounds can be awaited
    let first = tokio::time::timeout(Duration::from_secs(10), n0.next_anti_entropy_round()).await.expect("a periodic round");
    let second = tokio::time::timeout(Duration::from_secs(10), n0.next_anti_entropy_round()).await.expect("the next one");
    assert!(first.round >= 1 && second.round == first.round + 1, "{first:?} then {second:?}");
    // a round on demand waits for a running one and is the next number;
    // an awaiting task sees it
    let waiter = {
        let n0 = n0.clone();
        tokio::spawn(async move { n0.next_anti_entropy_round().await })
    };
    let now = n0.run_anti_entropy().await;
    assert!(now.round > second.round && now.partitions == 256, "{now:?}");
    let seen = tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("woken").expect("task");
    assert!(seen.round > second.round);
}
