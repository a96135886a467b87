//! Application-level reconciliation through the store.

mod common;
use common::Cluster;
use nimbus_state_store::merge::{reconcile_instance_json, InstanceMeta, InstanceState};
use nimbus_state_store::{get_reconciled, Context, KvClient, LocalClient};

fn meta(state: InstanceState, tags: &[(&str, &str)]) -> Vec<u8> {
    let m = InstanceMeta { state, tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
    serde_json::to_vec(&m).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siblings_are_reconciled_by_the_instance_merge() {
    let c = Cluster::start(3, 21).await;
    let a = LocalClient(c.node(0).expect("n0"));
    let b = LocalClient(c.node(1).expect("n1"));
    // two writers update the same instance without seeing each other
    a.put(b"i-42", meta(InstanceState::Terminated, &[("team", "infra")]), &Context::empty()).await.expect("put a");
    b.put(b"i-42", meta(InstanceState::Running, &[("env", "prod")]), &Context::empty()).await.expect("put b");
    assert_eq!(a.get(b"i-42").await.expect("get").values.len(), 2, "concurrent writes are siblings");

    let merged = get_reconciled(&a, b"i-42", reconcile_instance_json).await.expect("reconcile").expect("present");
    let m: InstanceMeta = serde_json::from_slice(&merged).expect("json");
    assert_eq!(m.state, InstanceState::Terminated, "terminated wins");
    assert_eq!(m.tags.len(), 2, "tags merged by key");
    // the reconciled value superseded both siblings
    let r = b.get(b"i-42").await.expect("get");
    assert_eq!(r.values, vec![merged]);
}
