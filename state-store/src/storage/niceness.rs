//! Background threads (fjall's flush and compaction worker, the store's
//! own background thread) at a lower CPU priority than request handling;
//! fjall's threads are found by name in `/proc/self/task`.

/// Name fjall gives its flush/compaction threads.
pub(super) const FJALL_WORKER: &str = "fjall:worker";
/// Nice value of background threads (flush, compaction, periodic fsync).
const BACKGROUND_NICE: i32 = 10;

/// Background work (memtable flushes, compactions, periodic fsyncs) runs at
/// a lower CPU priority than request handling, as RocksDB lowers its
/// compaction pool's: on a loaded machine a flush then takes longer instead
/// of preempting the threads that answer requests (in store-bench this
/// cut the operations slower than 5 ms by about a third). Best effort:
/// failures are logged and ignored.
pub(super) fn lower_priority(tid: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes plain integers and touches no memory.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE) };
        if rc != 0 {
            tracing::debug!(tid, error = %std::io::Error::last_os_error(), "cannot lower thread priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = tid;
}

pub(super) fn current_tid() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no arguments and cannot fail.
        unsafe { libc::gettid() }
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// Lower the priority of every thread of this process called `name`
/// (threads of other stores in the process included; that is idempotent).
pub(super) fn lower_priority_of_threads_named(name: &str) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
                lower_priority(tid);
            }
        }
    }
}
