"""Where a waiting connection's bytes and CPU go in server.py: runs one server.Worker in a
forked child under tracemalloc or cProfile, with the same load as bench/memory.py and
bench/cpu.py (no manager: this script writes the link frames itself).

    .venv/bin/python bench/profile_worker.py memory [--conns 19000] [--suffix sse]
    .venv/bin/python bench/profile_worker.py cpu [--conns 19000] [--top 25]
    .venv/bin/python bench/profile_worker.py time [--conns 19000] [--defer-accept 10] [--rate 8000]

memory: tracemalloc snapshots before and after --conns connections wait; prints the
allocations that grew, by line, next to the RSS growth (the gap is allocator overhead).
cpu: cProfile of (a) the connections coming in and (b) one message each, printed apart.
time: no tracer; the worker's utime+stime per connection and per message (no manager).
--defer-accept S sets TCP_DEFER_ACCEPT on the listener, to try what it saves.
--suffix sse: the connections are Server-Sent Events streams (`GET /u<i>.sse`) instead of
long polls (`.js`); in cpu and time modes each stream gets its message and stays open.
An analysis tool, not a benchmark: the tracer slows the worker several times over.
"""

import argparse
import cProfile
import os
import pstats
import signal
import socket
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import (  # noqa: E402
    SERVER_CPUS,
    LoadGroup,
    cpu_seconds,
    free_port_block,
    rss,
    wait_idle,
)

import link  # noqa: E402
import server  # noqa: E402


def child(mode: str, listener: socket.socket, link_fd: int, top: int, conns: int) -> None:
    os.sched_setaffinity(0, SERVER_CPUS)
    opts = server.parse_args(["--worker", "0", "--workers", "1"])
    os.set_blocking(link_fd, False)
    worker = server.Worker(opts, listener, link_fd)
    step = [0]
    prof = cProfile.Profile()
    snaps = []
    t = [0.0]
    if mode == "memory":
        tracemalloc.start(1)

    def on_signal(signum, frame):
        step[0] += 1
        if mode == "memory":
            snaps.append((tracemalloc.take_snapshot(), rss(os.getpid())))
            if len(snaps) == 2:
                report_memory(snaps, worker, top)
        elif mode == "time":
            if step[0] % 2:
                t[0] = cpu_seconds(os.getpid())
            else:
                label = "connection" if step[0] == 2 else "message"
                per = (cpu_seconds(os.getpid()) - t[0]) / conns * 1e6
                print(f"worker CPU per {label}: {per:.1f} µs", file=sys.stderr, flush=True)
        elif step[0] % 2:
            prof.enable()
        else:
            prof.disable()
            label = "(a) connections" if step[0] == 2 else "(b) messages"
            print(f"\n===== cProfile, {label} =====", file=sys.stderr)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(top)
            prof.clear()
            sys.stderr.flush()

    signal.signal(signal.SIGUSR1, on_signal)
    worker.run()


def report_memory(snaps, worker, top) -> None:
    (s0, r0), (s1, r1) = snaps
    n = worker.count[server.WAITING]
    streams = worker.count[server.STREAMS]
    out = sys.stderr
    diff = s1.compare_to(s0, "lineno")
    traced = sum(d.size_diff for d in diff)
    print(f"\n===== {n:,} waiting ({streams:,} of them streams): RSS +{r1 - r0:,} B = "
          f"{(r1 - r0) / n:.1f} B/conn; tracemalloc +{traced:,} B = {traced / n:.1f} B/conn "
          "=====", file=out)
    for d in diff[:top]:
        if d.size_diff:
            print(f"  {d.size_diff / n:8.1f} B/conn  {d.count_diff:+8,} blocks  "
                  f"{d.traceback[0].filename.rsplit('/', 1)[-1]}:{d.traceback[0].lineno}",
                  file=out)
    tables = {name: getattr(worker, name) for name in
              ("waiters", "reading", "poll_deadlines", "lingering", "outbuf", "jsonp",
               "backlog", "garbage")}
    tables["store.histories"] = worker.store.histories
    print("  tables (sys.getsizeof, containers only): " + ", ".join(
        f"{k} {len(v):,} entries {sys.getsizeof(v):,} B" for k, v in tables.items()), file=out)
    out.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("memory", "cpu", "time"))
    p.add_argument("--defer-accept", type=int, default=0, metavar="S")
    p.add_argument("--conns", type=int, default=19000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--rate", type=int, default=8000,
                   help="connects per second (8000; 200-400 is the million's per-worker trickle)")
    p.add_argument("--suffix", default="js", choices=("js", "sse"),
                   help="js: long polls (default); sse: Server-Sent Events streams")
    a = p.parse_args(argv)
    port = free_port_block(1)
    listener = server.make_listener("127.0.0.1", port, 4096, 60)
    if a.defer_accept:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, a.defer_accept)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        mine.close()
        try:
            child(a.mode, listener, theirs.fileno(), a.top, a.conns)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(0)
    theirs.close()
    listener.close()
    load = None
    try:
        time.sleep(0.5)
        wait_idle([pid])
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        load = LoadGroup(port, a.conns, rate=0 if a.mode == "memory" else a.rate,
                         suffix=a.suffix)
        load.wait_open()
        wait_idle([pid], quiet=0.5, timeout=120)
        os.kill(pid, signal.SIGUSR1)
        time.sleep(1)
        if a.mode != "memory":
            wait_idle([pid], quiet=0.5, timeout=60)
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.2)
            read0 = load.stats()["bytes"]
            mine.sendall(b"".join(link.encode(link.MSG, b"u%d" % k, b"hello", 1, k)
                                  for k in range(a.conns)))
            deadline = time.monotonic() + 120
            # a poll's answer is its first chunk (a 200); a stream already had its 200 head,
            # so there count the event's bytes (each at least `data: hello` and a blank line)
            while time.monotonic() < deadline:
                st = load.stats()
                if (st["s200"] >= a.conns if a.suffix == "js" else
                        st["bytes"] - read0 >= a.conns * len(b"data: hello\n\n")):
                    break
                time.sleep(0.1)
            wait_idle([pid], quiet=0.5, timeout=60)
            os.kill(pid, signal.SIGUSR1)
            time.sleep(2)
    finally:
        if load is not None:
            load.close()
        mine.close()  # the worker exits when its link closes
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
