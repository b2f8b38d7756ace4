"""The CPU of a worker's two paced hot paths, one call at a time, in-process: what a paced
message costs the worker without the noise of a whole run (the README's "What a wake-up
costs here" quotes it).

    .venv/bin/python bench/hotpath.py [--polls 4000] [--runs 3] [--root DIR] [--evict MB]
                                      [--json FILE]

- accept: one connection queued (its request arrived, TCP_DEFER_ACCEPT), then one call of
  Worker.accept(): accept, read, parse, register, wait. A paced re-poll, or a ramp over many
  workers, is this once per wake-up.
- message: --polls polls waiting, then for each a link frame written and one call of
  Worker.read_link(): read the link, keep the message, answer the poll and close it.

The load (the client connects, the test writes frames) runs between the calls in this same
process, so each call starts with caches as cold as a paced worker's. CPU per call is
time.thread_time() around it (user + system of this thread); each run in a forked child (a
fresh fd table); the median of --runs runs.

--evict MB writes over MB MiB (one byte a cache line) before each call: the caches as cold
as a worker's that was woken out of an idle wait while other processes ran (a trickle of
connections over many workers, the million's ramp). Here 16 MiB takes accept() from ~52 to
~200 us, what one worker costs per connection at 400 connections/s.

--root DIR imports server.py (and link.py, manager.py) from another checkout, e.g. a git
worktree of an older commit: run both, alternating, to measure a change. What this cannot
show is a cost that depends on the heap's history: glibc mmaps a big malloc only when the
heap has no room for it, so the worker's old 256 KiB link read (os.read), which a paced
worker paid with mmap + mremap + munmap per read (strace), costs nothing extra here.
"""

import argparse
import json
import os
import select
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUEST = b"GET /h%d.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def queued(listener: socket.socket) -> int:
    """Connections in the listener's accept queue (tcp_info's tcpi_unacked, Linux)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int.from_bytes(info[24:28], sys.byteorder)


def make_worker(server, backlog: int):
    listener = server.make_listener("127.0.0.1", 0, backlog, 0)
    port = listener.getsockname()[1]
    ours, theirs = socket.socketpair()
    os.set_blocking(theirs.fileno(), False)
    opts = server.parse_args(["--worker", "0", "--workers", "1", "--base-port", str(port)])
    worker = server.Worker(opts, listener, theirs.fileno())
    worker.epoll.register(worker.listen_fd, 0)  # the loop is not run: calls are made by hand
    return worker, listener, port, ours, theirs


def waiting(worker, link) -> int:
    return worker.count[link.PAGE_FIELDS.index("waiting")]


def poll(port: int, i: int) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(REQUEST % i)
    return c  # kept open by the caller: nothing is closed, the run's child exits


def evict(junk) -> None:
    """Write over `junk` (a bytearray, or None: nothing), one byte per 64-byte line: what
    the other processes on a core do to its caches between two wake-ups of a worker."""
    if junk is not None:
        junk[::64] = bytes(len(junk) // 64)


def accept_run(server, link, polls: int, evict_mb: int = 0) -> float:
    """us of CPU per Worker.accept() of one queued poll."""
    worker, listener, port, _, _ = make_worker(server, 4096)
    clients, spent = [], 0.0
    junk = bytearray(evict_mb << 20) if evict_mb else None
    for i in range(polls):
        clients.append(poll(port, i))
        deadline = time.monotonic() + 5
        while not queued(listener):  # its request has arrived: the kernel queued it
            if time.monotonic() > deadline:
                raise RuntimeError(f"connection {i} never reached the accept queue")
        evict(junk)
        t = time.thread_time()
        worker.accept()
        spent += time.thread_time() - t
    if waiting(worker, link) != polls:
        raise RuntimeError(f"{waiting(worker, link)} of {polls} polls waiting")
    return spent / polls * 1e6


def message_run(server, link, manager, polls: int, evict_mb: int = 0) -> float:
    """us of CPU per Worker.read_link() of one frame for one waiting poll."""
    worker, _, port, ours, theirs = make_worker(server, polls + 128)
    junk = bytearray(evict_mb << 20) if evict_mb else None
    clients = [poll(port, i) for i in range(polls)]
    deadline = time.monotonic() + 30
    while waiting(worker, link) < len(clients):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{waiting(worker, link)} of {polls} polls waiting")
        before = waiting(worker, link)
        worker.accept()  # one a call, or (a --root from before) what is queued
        if waiting(worker, link) == before:
            time.sleep(0.001)
    ids, spent = manager.MessageIds(), 0.0
    for i in range(polls):
        ours.sendall(link.encode(link.MSG, b"h%d" % i, b"hello %d" % i, *ids.next()))
        select.select([theirs], [], [])
        evict(junk)
        t = time.thread_time()
        worker.read_link()
        spent += time.thread_time() - t
    if waiting(worker, link) != 0:
        raise RuntimeError(f"{waiting(worker, link)} polls still waiting")
    return spent / polls * 1e6


def in_child(run, *args) -> float:
    """run(*args) in a forked child: each run starts with a fresh fd table (a run leaves its
    connections open, the worker's fds and the client's: the child's exit closes them)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.write(w, json.dumps(run(*args)).encode())
            code = 0
        except BaseException as e:  # the parent reports it
            os.write(w, json.dumps(repr(e)).encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = json.loads(f.read() or b"null")
    _, status = os.waitpid(pid, 0)
    if status != 0 or not isinstance(out, float):
        raise RuntimeError(f"{run.__name__} failed: {out}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--polls", type=int, default=4000, help="calls per run (default 4000)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--root", type=Path, default=ROOT,
                   help="the checkout whose server.py is measured (default this one)")
    p.add_argument("--evict", type=int, default=0, metavar="MB",
                   help="before each call, write over MB MiB (one byte a cache line): the "
                        "caches as cold as after other processes ran (default 0: off)")
    p.add_argument("--json", help="write the results there as JSON")
    a = p.parse_args(argv)
    if not (a.root / "server.py").is_file():
        p.error(f"--root {a.root}: no server.py there (a checkout of this project)")
    sys.path.insert(0, str(a.root.resolve()))
    import link
    import manager
    import server

    results = {"root": str(a.root.resolve()), "polls": a.polls, "evict_mb": a.evict,
               "accept_us": [], "message_us": []}
    for _ in range(a.runs):
        results["accept_us"].append(
            round(in_child(accept_run, server, link, a.polls, a.evict), 2))
        results["message_us"].append(
            round(in_child(message_run, server, link, manager, a.polls, a.evict), 2))
    for key, what in (("accept_us", "accept() of one queued poll (accept, read, parse, wait)"),
                      ("message_us", "read_link() of one message to a waiting poll (read, "
                                     "keep, answer, close)")):
        runs = results[key]
        print(f"{what}: {statistics.median(runs):.1f} us of CPU (median of {len(runs)}: "
              f"{', '.join(f'{x:.1f}' for x in runs)})")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
