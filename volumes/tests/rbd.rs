//! The RBD operations against a real cluster: the one `scripts/ceph.sh start`
//! makes (scripts/test.sh exports its `env`). Without `NIMBUS_CEPH_CONF` each
//! test says so and passes without doing anything.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nimbus_volumes::{Cluster, Error};

const MIB: u64 = 1 << 20;

fn cluster(test: &str) -> Option<Cluster> {
    let c = Cluster::from_env();
    if c.is_none() {
        eprintln!("SKIPPED {test}: NIMBUS_CEPH_CONF is not set (eval \"$(scripts/ceph.sh env)\" after scripts/ceph.sh start)");
    }
    c
}

/// A name no other test or run uses.
fn unique(what: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    format!("test-{what}-{}-{nanos:x}", std::process::id())
}

#[tokio::test]
async fn create_resize_snapshot_clone_flatten_remove() {
    let Some(c) = cluster("round trip") else { return };
    let vol = unique("vol");
    let clone = format!("{vol}-clone");

    c.create(&vol, 64 * MIB).await.unwrap();
    let info = c.info(&vol).await.unwrap();
    assert_eq!((info.name.as_str(), info.size, info.parent.as_ref()), (vol.as_str(), 64 * MIB, None));
    assert!(c.list().await.unwrap().contains(&vol));

    c.resize(&vol, 128 * MIB).await.unwrap();
    assert_eq!(c.info(&vol).await.unwrap().size, 128 * MIB);
    c.resize(&vol, 128 * MIB).await.unwrap();
    assert!(matches!(c.resize(&vol, 64 * MIB).await, Err(Error::Invalid(_))));

    c.snap_create(&vol, "s1").await.unwrap();
    assert!(matches!(c.snap_create(&vol, "s1").await, Err(Error::Exists { .. })));
    c.snap_protect(&vol, "s1").await.unwrap();
    c.snap_protect(&vol, "s1").await.unwrap();
    let snaps = c.snap_list(&vol).await.unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!((snaps[0].name.as_str(), snaps[0].size, snaps[0].protected), ("s1", 128 * MIB, true));

    c.clone(&vol, "s1", &clone).await.unwrap();
    let info = c.info(&clone).await.unwrap();
    let parent = info.parent.expect("a clone has a parent");
    assert_eq!((parent.image.as_str(), parent.snapshot.as_str(), info.size), (vol.as_str(), "s1", 128 * MIB));
    let children = c.children(&vol, "s1").await.unwrap();
    assert_eq!(children.iter().map(|ch| ch.image.as_str()).collect::<Vec<_>>(), [clone.as_str()]);

    // A snapshot with clones stays; so does an image with snapshots.
    assert!(matches!(c.snap_remove(&vol, "s1").await, Err(Error::HasChildren { .. })));
    assert!(matches!(c.remove(&vol).await, Err(Error::HasSnapshots { .. })));

    c.flatten(&clone).await.unwrap();
    assert_eq!(c.info(&clone).await.unwrap().parent, None);
    c.flatten(&clone).await.unwrap();
    assert!(c.children(&vol, "s1").await.unwrap().is_empty());

    assert!(matches!(c.snap_remove(&vol, "s1").await, Err(Error::Protected { .. })));
    c.snap_unprotect(&vol, "s1").await.unwrap();
    c.snap_unprotect(&vol, "s1").await.unwrap();
    c.snap_remove(&vol, "s1").await.unwrap();
    assert!(c.snap_list(&vol).await.unwrap().is_empty());

    c.remove(&clone).await.unwrap();
    c.remove(&vol).await.unwrap();
    c.remove(&vol).await.unwrap();
    assert!(!c.list().await.unwrap().contains(&vol));
}

#[tokio::test]
async fn missing_things_are_not_found() {
    let Some(c) = cluster("not found") else { return };
    let vol = unique("missing");
    assert!(matches!(c.info(&vol).await, Err(Error::NotFound { .. })));
    assert!(matches!(c.resize(&vol, MIB).await, Err(Error::NotFound { .. })));
    assert!(matches!(c.snap_create(&vol, "s").await, Err(Error::NotFound { .. })));
    assert!(matches!(c.snap_list(&vol).await, Err(Error::NotFound { .. })));
    assert!(matches!(c.clone(&vol, "s", &unique("c")).await, Err(Error::NotFound { .. })));
    c.remove(&vol).await.unwrap();

    c.create(&vol, MIB).await.unwrap();
    assert!(matches!(c.snap_remove(&vol, "nosnap").await, Err(Error::NotFound { .. })));
    assert!(matches!(c.clone(&vol, "nosnap", &unique("c")).await, Err(Error::NotFound { what }) if what.ends_with("@nosnap")));
    c.remove(&vol).await.unwrap();
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one() {
    let Some(c) = cluster("concurrent creates") else { return };
    let vol = unique("race");
    let results = futures::future::join_all((0..6).map(|_| c.create(&vol, 16 * MIB))).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exists = results.iter().filter(|r| matches!(r, Err(Error::Exists { .. }))).count();
    assert_eq!((ok, exists), (1, 5), "{results:?}");
    c.remove(&vol).await.unwrap();
}

#[tokio::test]
async fn an_open_image_is_not_removed() {
    let Some(c) = cluster("watchers") else { return };
    let vol = unique("open");
    c.create(&vol, MIB).await.unwrap();
    // `rbd watch` keeps the image open until its stdin closes.
    let spec = format!("{}/{vol}", c.pool);
    let mut watch = tokio::process::Command::new("rbd")
        .arg("--conf")
        .arg(&c.conf)
        .arg("--id")
        .arg(&c.client_id)
        .arg("--keyring")
        .arg(&c.keyring)
        .args(["watch", &spec])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.watchers(&vol).await.unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "rbd watch did not open {spec}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(c.remove(&vol).await, Err(Error::HasWatchers { .. })));
    drop(watch.stdin.take());
    watch.wait().await.unwrap();
    c.remove(&vol).await.unwrap();
}

#[tokio::test]
async fn import_a_raw_file() {
    let Some(c) = cluster("import") else { return };
    let vol = unique("import");
    let file = std::env::temp_dir().join(format!("{vol}.raw"));
    let mut bytes = vec![0u8; 3 * MIB as usize];
    bytes[..12].copy_from_slice(b"nimbus-image");
    std::fs::write(&file, &bytes).unwrap();
    let r = c.import(&file, &vol).await;
    std::fs::remove_file(&file).unwrap();
    r.unwrap();
    assert_eq!(c.info(&vol).await.unwrap().size, 3 * MIB);
    assert!(matches!(c.import(&std::env::temp_dir().join("no-such-file"), &unique("x")).await, Err(Error::NotFound { .. })));
    c.remove(&vol).await.unwrap();
}

#[tokio::test]
async fn the_key_for_libvirt() {
    let Some(c) = cluster("key") else { return };
    let b64 = c.key_base64().unwrap();
    let bytes = c.key_bytes().unwrap();
    // A Ceph key: type (2 bytes), creation time (8), length (2), a 16-byte secret.
    assert_eq!(bytes.len(), 28, "{b64}");
    assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 16);
}

/// The three-OSD cluster (`scripts/ceph.sh --osds 3`, pool size 3, min_size 2;
/// scripts/test.sh exports its env as NIMBUS_CEPH3_*): an OSD stopped and
/// started again loses nothing, and the pool takes writes while it is down.
#[tokio::test]
async fn replicated_pool_keeps_data_through_an_osd_stop() {
    let Some(c) = Cluster::from_env_prefix("NIMBUS_CEPH3") else {
        eprintln!("SKIPPED replication: NIMBUS_CEPH3_CONF is not set (scripts/ceph.sh --osds 3 start; its env as NIMBUS_CEPH3_*)");
        return;
    };
    // The conf is $NIMBUS_HOME/ceph-3/ceph.conf: the script is asked about that cluster.
    let home = c.conf.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph.sh");
    let osd = |verb: &'static str| {
        let status = std::process::Command::new(&script).args(["--osds", "3", verb, "1"]).env("NIMBUS_HOME", &home).status().unwrap();
        assert!(status.success(), "ceph.sh {verb} 1 failed");
    };
    /// Starts osd.1 again however the test ends.
    struct Restart<F: Fn(&'static str)>(F);
    impl<F: Fn(&'static str)> Drop for Restart<F> {
        fn drop(&mut self) {
            (self.0)("start-osd");
        }
    }

    let dir = std::env::temp_dir().join(unique("replication"));
    std::fs::create_dir_all(&dir).unwrap();
    let random = |n: usize, seed: u64| -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let (before, during) = (unique("before"), unique("during"));
    let (data1, data2) = (random(8 * MIB as usize, 1), random(4 * MIB as usize, 2));
    std::fs::write(dir.join("1"), &data1).unwrap();
    std::fs::write(dir.join("2"), &data2).unwrap();
    c.import(&dir.join("1"), &before).await.unwrap();

    osd("stop-osd");
    let restart = Restart(osd);
    c.export(&before, None, &dir.join("1.out")).await.unwrap();
    assert!(std::fs::read(dir.join("1.out")).unwrap() == data1, "data read with osd.1 down differs");
    c.import(&dir.join("2"), &during).await.unwrap();
    drop(restart);

    c.export(&during, None, &dir.join("2.out")).await.unwrap();
    assert!(std::fs::read(dir.join("2.out")).unwrap() == data2, "data written with osd.1 down differs");
    c.remove(&before).await.unwrap();
    c.remove(&during).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
