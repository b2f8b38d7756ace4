"""Load side of the benchmarks: one process holding a slice of the long-poll (or SSE)
connections.

    python bench/_load.py --port P --prefix u --start 0 --count 9500 --source-ip 127.0.0.2
    python bench/_load.py --port P --suffix sse ...
    python bench/_load.py --port P --workers 6 ...   # each id to P + x31(id) % 6, its owner

Opens `count` connections to host:port (non-blocking connects, at most --inflight at once,
from --source-ip with IP_BIND_ADDRESS_NO_PORT so the port is picked per destination), sends
`GET /<prefix><i>.<suffix> HTTP/1.1` on each (--suffix js, the default: long polls; sse:
Server-Sent Events streams), then holds them, reading and discarding whatever the server
sends: the first chunk's status line is counted (200 / other; a stream's head and its
`retry: 2000` come in it), later bytes only summed (`bytes`), an EOF closes our side;
`last_answer_t` is the CLOCK_MONOTONIC time of the last first chunk (a poll's answer), so a
broadcast's reach is max(last_answer_t) - its send time. One
JSON line on stdout when every connect has finished ({"event": "open", ...}); then stdin
commands, one a line:
`stats` prints the counters as one JSON line; `times T0` prints every answer's arrival time
in µs after T0 (CLOCK_MONOTONIC s), sorted, as {"event": "times", "us": [...]} (the
broadcast figure's fraction reached over time; an answer costs one list append); `quit` (or
EOF) resets every connection
(SO_LINGER 0: no TIME_WAIT left behind) and exits. Used by _common.LoadGroup; a parent holds
19,000 connections over two of these, as the open-file limit is 20,000 per process.
"""

import argparse
import errno
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server import owner  # noqa: E402  (the contract's hash: which worker's port an id is on)

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
LINGER_0 = struct.pack("ii", 1, 0)
CONNECTING, SENT, ANSWERED = 0, 1, 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True,
                   help="the port (with --workers W: worker 0's, each id to its owner's)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--prefix", default="u")
    p.add_argument("--suffix", default="js", choices=("js", "sse"),
                   help="js: long polls (default); sse: Server-Sent Events streams")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--source-ip", default=None)
    p.add_argument("--inflight", type=int, default=256)
    p.add_argument("--rate", type=float, default=0,
                   help="connects per second at most (0: as fast as connects complete)")
    a = p.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ep = select.epoll()
    ep.register(0, select.EPOLLIN)
    socks: dict = {}  # fd -> socket
    phase: dict = {}  # fd -> CONNECTING | SENT | ANSWERED
    c = {"event": "open", "ok": 0, "failed": 0, "s200": 0, "other": 0, "eof": 0,
         "bytes": 0, "errors": {}, "last_answer_t": 0.0}
    answers: list = []  # CLOCK_MONOTONIC of every answer, for `times`
    nxt, end, inflight = a.start, a.start + a.count, 0
    announced = False
    t0 = time.monotonic()
    out = sys.stdout

    def fail(fd, err):
        c["failed"] += 1
        name = errno.errorcode.get(err, str(err))
        c["errors"][name] = c["errors"].get(name, 0) + 1
        drop(fd)

    def drop(fd):
        ep.unregister(fd)
        socks.pop(fd).close()
        phase.pop(fd, None)

    def emit(event):
        c["event"] = event
        c["seconds"] = round(time.monotonic() - t0, 3)
        out.write(json.dumps(c) + "\n")
        out.flush()

    prefix, suffix = a.prefix.encode(), a.suffix.encode()
    pending = b""
    while True:
        limit = end
        if a.rate > 0:
            limit = min(end, a.start + 1 + int((time.monotonic() - t0) * a.rate))
        while inflight < a.inflight and nxt < limit:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            if a.source_ip:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((a.source_ip, 0))
            port = a.port
            if a.workers > 1:
                port += owner(b"%s%d" % (prefix, nxt), a.workers)
            err = s.connect_ex((a.host, port))
            fd = s.fileno()
            socks[fd] = s
            phase[fd] = (CONNECTING, nxt)
            nxt += 1
            if err not in (0, errno.EINPROGRESS):
                ep.register(fd, 0)
                fail(fd, err)
                continue
            inflight += 1
            ep.register(fd, select.EPOLLOUT)
        if not announced and nxt >= end and inflight == 0:
            announced = True
            emit("open")
        for fd, _ev in ep.poll(0.002 if nxt < end else 1.0, 4096):
            if fd == 0:
                data = os.read(0, 4096)
                if not data:
                    return finish(socks)
                pending += data
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    cmd = line.strip()
                    if cmd == b"stats":
                        emit("stats")
                    elif cmd.startswith(b"times "):
                        t_ref = float(cmd.split()[1])
                        out.write(json.dumps({"event": "times", "us": sorted(
                            round((t - t_ref) * 1e6) for t in answers)}) + "\n")
                        out.flush()
                    elif cmd == b"quit":
                        return finish(socks)
                continue
            st = phase.get(fd)
            if st is None:
                continue
            if st[0] == CONNECTING:
                inflight -= 1
                err = socks[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(fd, err)
                    continue
                req = b"GET /%s%d.%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (
                    prefix, st[1], suffix)
                try:
                    socks[fd].send(req)
                except OSError as e:
                    fail(fd, e.errno)
                    continue
                c["ok"] += 1
                phase[fd] = (SENT,)
                ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
                continue
            try:
                data = socks[fd].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            c["bytes"] += len(data)
            if data and st[0] == SENT:
                phase[fd] = (ANSWERED,)
                c["last_answer_t"] = now = time.monotonic()
                answers.append(now)
                if data.startswith(b"HTTP/1.1 200 "):
                    c["s200"] += 1
                else:
                    c["other"] += 1
            if not data:
                c["eof"] += 1
                drop(fd)


def finish(socks: dict) -> int:
    for s in socks.values():
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        except OSError:
            pass
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
