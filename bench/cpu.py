"""Server CPU per accepted connection and per delivered message: MegaComet against the same
worker on uvloop (and plain asyncio).

    .venv/bin/python bench/cpu.py [--conns 19000] [--messages N] [--runs 5] [--rate 8000]
                                  [--impls project,uvloop,asyncio] [--app-proto binary|http]
                                  [--json FILE]

For each implementation and run, on a fresh server, reading utime+stime of the server
processes from /proc/PID/stat (for the project the worker AND the manager, shown apart):

(a) connections: --conns connections opened (at --rate per second in all, over two load
    processes), each sends `GET /u<i>.js HTTP/1.1` and is held; ends when the server reports
    them all waiting and it is idle again. CPU / conns = cost of accept + read + parse + wait.
(b) messages: one message ("hello") for each of the first --messages waiting ids, written to
    the app port as the original's binary frames (--app-proto binary, the default: the
    cheapest path into either server) or as pipelined `POST /send/<id>` (--app-proto http);
    each is answered `200` and closed; ends when the load side has counted every 200 and the
    server is idle. CPU / messages = cost of routing + answering + closing.

Servers: `project` is manager.py --workers 1 (server.py worker pinned to CPU 0, asyncio
manager routing the app port); `uvloop` and `asyncio` are bench/uvloop_worker.py and
bench/asyncio_worker.py, one process (comet port and app port on one loop). Runs interleave
the implementations. CPU time is in clock ticks (1/100 s), hence the default of 19,000.
"""

import argparse
import importlib.util
import json
import select
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    IMPLS,
    LoadGroup,
    Server,
    cpu_seconds,
    listen_overflows,
    machine,
    machine_line,
    summary,
    wait_idle,
    wait_waiting,
)

MESSAGE = b"hello"


def cpu(server: Server) -> dict:
    out = {"worker": cpu_seconds(server.worker_pid)}
    if server.manager_pid:
        out["manager"] = cpu_seconds(server.manager_pid)
    return out


def delta(after: dict, before: dict, per: int) -> dict:
    """Microseconds per item, by process and in total."""
    d = {k: (after[k] - before[k]) / per * 1e6 for k in after}
    d["total"] = sum(d.values())
    return d


def send_messages(port: int, ids: list, proto: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        if proto == "binary":
            s.sendall(b"".join(b"\x02%s\x00%s\x00" % (i, MESSAGE) for i in ids))
            return
        # HTTP: pipelined keep-alive POSTs; the replies are read by a thread so that neither
        # side blocks on a full buffer.
        replies = [0]

        def read():
            data = b""
            while replies[0] < len(ids):
                chunk = s.recv(1 << 20)
                if not chunk:
                    return
                data = data[-16:] + chunk
                replies[0] += chunk.count(b"HTTP/1.1 202")
        t = threading.Thread(target=read, daemon=True)
        t.start()
        s.sendall(b"".join(b"POST /send/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (i, len(MESSAGE), MESSAGE)
                           for i in ids))
        t.join(timeout=60)


def wait_delivered(load: LoadGroup, n: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = load.stats()
        if st["s200"] + st["other"] >= n or time.monotonic() > deadline:
            return st
        select.select([], [], [], 0.05)


def measure(impl: str, conns: int, messages: int, rate: float, proto: str) -> dict:
    server = Server(impl)
    load = None
    try:
        wait_idle(server.pids)
        overflows = listen_overflows()
        c0 = cpu(server)
        t0 = time.monotonic()
        load = LoadGroup(server.port, conns, rate=rate)
        opened = load.wait_open()
        waiting = wait_waiting(server, conns)
        if waiting < conns:
            raise RuntimeError(f"{impl}: only {waiting} of {conns} waiting (load: {opened})")
        ramp = time.monotonic() - t0
        wait_idle(server.pids)
        c1 = cpu(server)
        t1 = time.monotonic()
        send_messages(server.app_port, [b"u%d" % i for i in range(messages)], proto)
        got = wait_delivered(load, messages)
        deliver = time.monotonic() - t1
        if got["s200"] < messages:
            raise RuntimeError(f"{impl}: {got['s200']} of {messages} messages answered 200 "
                               f"(load: {got})")
        wait_idle(server.pids)
        c2 = cpu(server)
        return {"impl": impl, "conns": conns, "messages": messages,
                "conn_us": delta(c1, c0, conns), "msg_us": delta(c2, c1, messages),
                "ramp_s": round(ramp, 2), "deliver_s": round(deliver, 2),
                "connect_failed": opened["failed"],
                "listen_overflows": listen_overflows() - overflows}
    finally:
        if load is not None:
            load.close()
        server.close()


def fmt(d: dict) -> str:
    parts = [f"{d['total']:6.1f} µs"]
    if "manager" in d:
        parts.append(f"(worker {d['worker']:.1f} + manager {d['manager']:.1f})")
    return " ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="server CPU per connection and per message")
    p.add_argument("--conns", type=int, default=19000, help="connections per run (19000)")
    p.add_argument("--messages", type=int, default=None,
                   help="messages per run, one per waiting id (default: --conns)")
    p.add_argument("--runs", type=int, default=5,
                   help="runs per implementation (default 5: CPU time is noisy)")
    p.add_argument("--rate", type=float, default=8000,
                   help="connects per second, all load processes together (0: unpaced; "
                        "an accept queue overflow then costs SYN retransmits)")
    p.add_argument("--impls", default="project,uvloop,asyncio",
                   help=f"comma-separated, of {', '.join(IMPLS)}")
    p.add_argument("--app-proto", choices=("binary", "http"), default="binary")
    p.add_argument("--json", metavar="FILE", help="write the results there as JSON")
    a = p.parse_args(argv)
    impls = a.impls.split(",")
    for impl in impls:
        if impl not in IMPLS:
            p.error(f"unknown implementation {impl!r}")
    if "uvloop" in impls and importlib.util.find_spec("uvloop") is None:
        p.error("uvloop is not installed: make installs it (requirements-dev.txt), or "
                "--impls project,asyncio")
    messages = min(a.messages or a.conns, a.conns)

    m = machine()
    print(machine_line(m))
    print(f"{a.conns:,} connections at {a.rate:,.0f}/s, then {messages:,} messages "
          f"({a.app_proto} app protocol), {a.runs} runs each")
    runs: dict = {impl: [] for impl in impls}
    for r in range(a.runs):
        for impl in impls:
            res = measure(impl, a.conns, messages, a.rate, a.app_proto)
            runs[impl].append(res)
            print(f"  run {r + 1} {impl:8} per conn {fmt(res['conn_us'])}, per msg "
                  f"{fmt(res['msg_us'])}  (ramp {res['ramp_s']:.1f} s, delivery "
                  f"{res['deliver_s']:.1f} s, connect failures {res['connect_failed']}, "
                  f"listen overflows box-wide {res['listen_overflows']})", flush=True)

    result = {"bench": "cpu", "machine": m, "conns": a.conns, "messages": messages,
              "rate": a.rate, "app_proto": a.app_proto, "runs": a.runs, "impls": {}}
    print(f"\nserver CPU (utime+stime), median of {a.runs}, spread = (max-min)/median:")
    for impl in impls:
        entry = {}
        for what in ("conn_us", "msg_us"):
            entry[what] = {k: summary([x[what][k] for x in runs[impl]])
                           for k in runs[impl][0][what]}
        entry["details"] = runs[impl]
        result["impls"][impl] = entry
        line = [f"  {impl:8}"]
        for what, label in (("conn_us", "per connection"), ("msg_us", "per message")):
            e = entry[what]
            text = f"{label} {e['total']['median']:6.1f} µs (spread {e['total']['spread_pct']:.0f}%"
            if "manager" in e:
                text += (f"; worker {e['worker']['median']:.1f}, manager "
                         f"{e['manager']['median']:.1f}")
            line.append(text + ")")
        print("  ".join(line))
    if "project" in impls and "uvloop" in impls:
        pr, uv = result["impls"]["project"], result["impls"]["uvloop"]
        for what, label in (("conn_us", "connection"), ("msg_us", "message")):
            if not uv[what]["total"]["median"]:
                continue  # under a clock tick (--messages 10, say): no ratio to give
            ratio = pr[what]["total"]["median"] / uv[what]["total"]["median"]
            result[f"project_vs_uvloop_{what}"] = ratio
            print(f"  project / uvloop per {label}: {ratio:.2f} "
                  f"({'below' if ratio < 1 else 'NOT below'} uvloop)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
