#!/usr/bin/env python3
"""Why were the request threads off the CPU? Reads `perf script` output of
`sched:sched_switch` events recorded with call graphs and prints, for the
threads whose name starts with PREFIX (default: tokio's workers):

* blocked (state S or D) for at least --min-ms: count, total, longest, by
  the first user-space frames of the stack they blocked in (a lock, a
  syscall, an idle park);
* preempted (state R) for at least --min-ms: which other threads ran on
  the CPUs meanwhile, and for how long.

Record while store-bench runs (see the crate README, "Where the tail
comes from"):

    perf record -e sched:sched_switch --call-graph dwarf,16384 -p PID -o sw.data -- sleep 5
    perf script -i sw.data -F comm,tid,time,event,trace,ip,sym > sw.txt
    python3 state-store/tools/offcpu.py sw.txt
"""
import argparse
import collections
import re

SKIP = ('__schedule', 'schedule', 'do_syscall', 'entry_SYSCALL', '[unknown]', 'futex', '__futex',
        'do_futex', '__x64_sys', 'syscall', 'std::sys', 'std::thread', 'parking_lot', 'core::',
        'std::sync')


def events(path):
    for block in open(path, errors='replace').read().split('\n\n'):
        lines = block.strip().split('\n')
        if not lines or 'sched_switch' not in lines[0]:
            continue
        head = lines[0]
        f = {k: re.search(k + r'=(\S+)', head).group(1)
             for k in ('prev_comm', 'prev_pid', 'prev_state', 'next_comm', 'next_pid')}
        t = float(re.search(r'(\d+\.\d+):', head).group(1))
        frames = [l.strip().split(None, 1)[1] for l in lines[1:] if len(l.strip().split(None, 1)) > 1]
        yield t, f, frames


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('script_output')
    ap.add_argument('--prefix', default='tokio')
    ap.add_argument('--min-ms', type=float, default=1.0)
    a = ap.parse_args()
    off, names, running = {}, {}, {}
    blocked = collections.defaultdict(list)
    preempted = []  # (from, to, tid)
    on_cpu = []  # (from, to, tid)
    for t, f, frames in events(a.script_output):
        prev, nxt = int(f['prev_pid']), int(f['next_pid'])
        names[prev], names[nxt] = f['prev_comm'], f['next_comm']
        if prev in running:
            on_cpu.append((running.pop(prev), t, prev))
        running[nxt] = t
        if f['prev_comm'].startswith(a.prefix):
            off[prev] = (t, f['prev_state'], frames)
        if f['next_comm'].startswith(a.prefix) and nxt in off:
            t0, state, fr = off.pop(nxt)
            ms = (t - t0) * 1000
            if ms < a.min_ms:
                continue
            if state.startswith('R'):
                preempted.append((t0, t, nxt))
            else:
                key = ' < '.join([x for x in fr if not x.startswith(SKIP)][:6])
                blocked[(state, key)].append(ms)
    print(f'blocked >= {a.min_ms} ms, by where:')
    for (state, key), v in sorted(blocked.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f'  {state} n={len(v)} total={sum(v):.0f} ms longest={max(v):.1f} ms | {key[:600]}')
    ran = collections.Counter()
    for t0, t1, tid in preempted:
        for s0, s1, other in on_cpu:
            overlap = min(t1, s1) - max(t0, s0)
            if overlap > 0 and other != tid:
                ran[names.get(other, str(other))] += overlap * 1000
    total = sum((t1 - t0) * 1000 for t0, t1, _ in preempted)
    print(f'preempted >= {a.min_ms} ms: n={len(preempted)} total={total:.0f} ms; meanwhile on the CPUs:')
    for name, ms in ran.most_common(10):
        print(f'  {name}: {ms:.0f} ms')


if __name__ == '__main__':
    main()
