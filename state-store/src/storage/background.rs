//! The store's background thread: it frees flushed memtables outside
//! fjall's locks (the reaper) and, under `Fsync::Periodic`, fdatasyncs the
//! active journal through a descriptor of its own.

use super::niceness::{current_tid, lower_priority};
use super::WriterStats;
use fjall::{Database, Keyspace, PersistMode};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

/// How often the background thread looks for flushed memtables to free.
const REAP_TICK: std::time::Duration = std::time::Duration::from_millis(20);

/// The store's background thread (both policies).
///
/// It frees flushed memtables of the data keyspace. Otherwise the last
/// reference to a flushed 64 MiB memtable is dropped by fjall while it
/// holds the tree's version lock, which every commit takes, and the tens
/// of thousands of frees behind that drop stalled commits for 15-70 ms in
/// store-bench. The thread keeps a reference to each memtable it has seen
/// active and drops it once it is the only holder left (at most
/// `REAP_TICK` after fjall let go of it), outside every engine lock.
///
/// Under `Fsync::Periodic(every)` it also fdatasyncs the active journal
/// about every `every` through a descriptor of its own. fjall's `persist`
/// would hold the journal lock for the whole fsync and stall commits
/// behind it; an fsync on another descriptor of the same file flushes the
/// same pages without that lock. The active journal is the
/// highest-numbered `<n>.jnl` in the database directory (fjall's layout);
/// when a journal is sealed fjall fsyncs it itself. If none is found, or
/// it was removed before we opened it, fall back to `persist`.
pub(super) fn background_loop(
    dir: &Path,
    db: &Database,
    data: &Keyspace,
    sync_every: Option<std::time::Duration>,
    stop: &std_mpsc::Receiver<()>,
    stats: &WriterStats,
) {
    use fjall::AbstractTree;
    lower_priority(current_tid());
    let tick = sync_every.map_or(REAP_TICK, |e| e.min(REAP_TICK));
    let mut memtables = vec![data.tree.active_memtable()];
    let mut last_sync = std::time::Instant::now();
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(tick) {
        let active = data.tree.active_memtable();
        if memtables.last().map(|m| m.id()) != Some(active.id()) {
            memtables.push(active);
        }
        memtables.retain(|m| {
            let others = Arc::strong_count(m) > 1;
            if !others {
                stats.memtables_freed.fetch_add(1, Ordering::Relaxed);
            }
            others
        });
        if let Some(every) = sync_every {
            if last_sync.elapsed() >= every {
                last_sync = std::time::Instant::now();
                sync_journal(dir, db, stats);
            }
        }
    }
}

/// One periodic fdatasync of the active journal (see [`background_loop`]).
fn sync_journal(dir: &Path, db: &Database, stats: &WriterStats) {
    let started = std::time::Instant::now();
    let own_fd = active_journal(dir).map(|p| std::fs::File::open(p).and_then(|f| f.sync_data()));
    let res = match own_fd {
        Some(Ok(())) => Ok(()),
        // no journal found, or it was sealed and removed between the
        // listing and the open: let fjall sync whatever is active now
        None | Some(Err(_)) => db.persist(PersistMode::SyncData).map_err(|e| e.to_string()),
    };
    if let Err(e) = res {
        tracing::error!(error = %e, "periodic journal fsync failed");
    }
    stats.syncs.fetch_add(1, Ordering::Relaxed);
    stats.sync_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
}
fn active_journal(dir: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n: u64 = name.to_str()?.strip_suffix(".jnl")?.parse().ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}
