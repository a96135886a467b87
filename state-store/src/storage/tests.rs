//! Unit tests of the store: persistence, Merkle trees and their snapshot,
//! graves, the memtable reaper, dot minting after a failed commit.

use super::*;
use crate::clock::{Dot, Sibling, VersionVector};

fn rec(n: &str, c: u64, v: &str) -> Record {
    Record::single(Sibling { dot: Dot { node: n.into(), counter: c }, context: VersionVector::new(), value: Some(v.into()), written_ms: 1 })
}

#[tokio::test]
async fn flushed_memtables_are_freed_by_the_background_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s =
        Storage::open(&dir.path().join("db"), 16, Fsync::Periodic(std::time::Duration::from_millis(5)), crate::node::MIN_MEMTABLE_BYTES)
            .expect("open");
    // Writes through 1 MiB memtables, in bursts of about 400 KiB with a
    // pause between them so that the background thread (nice 10) sees
    // memtables while they are active, until one has been flushed and
    // freed; at most 64 MiB in all.
    let value = "v".repeat(2048);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut i = 0u64;
    while s.writer_stats().memtables_freed == 0 {
        assert!(std::time::Instant::now() < deadline, "no flushed memtable freed after {i} writes");
        if i < 32 * 1024 {
            for _ in 0..200 {
                s.merge(format!("k{i}").as_bytes(), rec("a", i + 1, &value)).await.expect("merge");
                i += 1;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn merge_persists_and_merkle_tracks_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let p = crate::ring::partition_of(b"k1", 16);
    let all_leaves: Vec<usize> = (0..crate::merkle::LEAVES).collect();
    let rebuilt = |s: &Storage| {
        let digests = s.key_digests(p, &all_leaves).expect("digests");
        MerkleTree::from_digests(digests.iter().map(|(k, d)| (k.as_slice(), *d)))
    };
    let first;
    {
        let s = Storage::open(&path, 16, Fsync::Always, DEFAULT_MEMTABLE_BYTES).expect("open");
        first = s.incarnation();
        s.merge(b"k1", rec("a", 1, "x")).await.expect("merge");
        let r = s.merge(b"k1", rec("b", 1, "y")).await.expect("merge");
        assert_eq!(r.siblings.len(), 2);
        s.hint_merge("owner", b"k2", rec("a", 2, "z")).await.expect("hint");
        // the tree kept up to date write by write equals one built from the data
        assert_eq!(s.merkle(p).expect("merkle"), rebuilt(&s));
        assert_ne!(s.merkle(p).expect("merkle"), MerkleTree::default());
    }
    let s = Storage::open(&path, 16, Fsync::Periodic(std::time::Duration::from_millis(5)), DEFAULT_MEMTABLE_BYTES).expect("reopen");
    assert!(s.incarnation() > first, "every opening is a new incarnation");
    assert_eq!(s.get(b"k1").expect("get").map(|r| r.siblings.len()), Some(2));
    let hints = s.hints().expect("hints");
    assert_eq!(hints.len(), 1);
    assert_eq!(hints[0].owner, "owner");
    assert!(s.get(b"k2").expect("get").is_none());
    assert!(s.get_with_hints(b"k2").expect("get").is_some());
    assert_eq!(s.merkle(p).expect("merkle"), rebuilt(&s));
    // a dropped key is gone from reads (and from the record cache)
    let k1 = s.get(b"k1").expect("get").expect("k1");
    let d = crate::merkle::key_digest(b"k1", &encode_record(&k1).expect("encode"));
    assert!(!s.drop_if(b"k1", d ^ 1).await.expect("drop"), "a changed record is kept");
    assert!(s.drop_if(b"k1", d).await.expect("drop"));
    assert!(s.get(b"k1").expect("get").is_none());
    assert_eq!(s.merkle(p).expect("merkle"), MerkleTree::default());
    assert!(!s.hint_remove_if("owner", b"k2", rec("a", 9, "q")).await.expect("rm"));
    assert!(s.hint_remove_if("owner", b"k2", hints[0].record.clone()).await.expect("rm"));
    assert_eq!(s.hint_count().expect("count"), 0);
}

#[tokio::test]
async fn merkle_trees_are_saved_at_a_clean_close_and_used_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let every = Fsync::Periodic(std::time::Duration::from_millis(5));
    let all = |s: &Storage| (0..16).map(|p| s.merkle(p).expect("merkle")).collect::<Vec<_>>();
    let saved;
    {
        let s = Storage::open(&path, 16, every, DEFAULT_MEMTABLE_BYTES).expect("open");
        assert!(!s.merkle_snapshot_used(), "a new store has no snapshot");
        for i in 0..40u64 {
            s.merge(format!("k{i}").as_bytes(), rec("a", i + 1, "v")).await.expect("merge");
        }
        saved = all(&s);
    }
    {
        let s = Storage::open(&path, 16, every, DEFAULT_MEMTABLE_BYTES).expect("reopen");
        assert!(s.merkle_snapshot_used(), "a clean close saves the trees");
        assert_eq!(all(&s), saved);
        assert_eq!(all(&s), build_trees(&s.db.data, 16).expect("scan"));
        assert!(
            s.meta.get(MERKLE_SNAPSHOT).expect("meta").is_none(),
            "the snapshot is gone while the store is open, so a crash now means a rebuild"
        );
        s.merge(b"late", rec("b", 1, "w")).await.expect("merge");
    }
    let s = Storage::open(&path, 16, every, DEFAULT_MEMTABLE_BYTES).expect("reopen");
    assert!(s.merkle_snapshot_used());
    assert_ne!(all(&s), saved, "the second close saved the later write too");
    assert_eq!(all(&s), build_trees(&s.db.data, 16).expect("scan"));
    drop(s);
    // a snapshot for another partition count is not used
    let s = Storage::open(&path, 32, every, DEFAULT_MEMTABLE_BYTES).expect("reopen");
    assert!(!s.merkle_snapshot_used());
}

#[tokio::test]
async fn a_collected_tombstone_keeps_older_copies_from_coming_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let every = Fsync::Periodic(std::time::Duration::from_millis(5));
    let tree_ok = |s: &Storage| {
        let built = build_trees(&s.db.data, 16).expect("scan");
        (0..16u32).all(|q| s.merkle(q).expect("merkle") == built[q as usize])
    };
    // a tombstone written by b after reading a's value
    let mut ctx = VersionVector::new();
    ctx.add(&Dot { node: "a".into(), counter: 1 });
    let tomb = Record::single(Sibling { dot: Dot { node: "b".into(), counter: 1 }, context: ctx, value: None, written_ms: 1 });
    {
        let s = Storage::open(&path, 16, every, DEFAULT_MEMTABLE_BYTES).expect("open");
        assert!(s.grave(b"k").expect("grave").is_none());
        s.merge(b"k", rec("a", 1, "old")).await.expect("merge");
        let stored = s.merge(b"k", tomb.clone()).await.expect("merge");
        assert!(stored.is_tombstone());
        let d = key_digest(b"k", &encode_record(&stored).expect("encode"));
        assert!(!s.bury_if(b"k", d ^ 1).await.expect("bury"), "a changed record is not collected");
        assert!(s.bury_if(b"k", d).await.expect("bury"));
        assert!(s.get(b"k").expect("get").is_none());
        assert!(tree_ok(&s));
    }
    // the grave survives a restart, and the old value cannot come back
    let s = Storage::open(&path, 16, every, DEFAULT_MEMTABLE_BYTES).expect("reopen");
    let grave = s.grave(b"k").expect("grave").expect("a grave");
    assert!(grave.covers(&Dot { node: "a".into(), counter: 1 }) && grave.covers(&Dot { node: "b".into(), counter: 1 }));
    s.merge(b"k", rec("a", 1, "old")).await.expect("merge");
    s.merge(b"k", tomb).await.expect("merge");
    assert!(s.get(b"k").expect("get").is_none(), "a covered copy was stored again");
    assert!(tree_ok(&s));
    // a new write (a dot the grave does not cover) is stored
    s.merge(b"k", rec("c", 1, "new")).await.expect("merge");
    assert_eq!(s.get(b"k").expect("get").map(|r| r.values()), Some(vec![b"new".to_vec()]));
    // burying what another replica collected drops only covered siblings
    let mut both = rec("a", 2, "stale");
    both.merge(&rec("c", 1, "new"));
    s.merge(b"k2", both).await.expect("merge");
    let mut covered = VersionVector::new();
    covered.add(&Dot { node: "a".into(), counter: 2 });
    assert!(s.bury(b"k2", covered).await.expect("bury"));
    assert_eq!(s.get(b"k2").expect("get").map(|r| r.values()), Some(vec![b"new".to_vec()]));
    assert!(tree_ok(&s));
}

#[test]
fn after_a_failed_commit_dots_belong_to_a_new_actor() {
    let mut m = Minter::default();
    assert_eq!(m.mint("a@1"), Dot { node: "a@1".into(), counter: 1 });
    m.commit_failed();
    let d = m.mint("a@1");
    assert_ne!(d.node, "a@1", "a dot minted after a lost commit must not extend the old actor");
    assert_eq!(d.counter, 2, "counters are never reused");
    m.commit_failed();
    let e = m.mint("a@1");
    assert!(e.node != "a@1" && e.node != d.node, "each failure starts another actor: {e:?}");
}
