"""Worker RSS per idle waiting connection: MegaComet's worker against a plain asyncio one.

    .venv/bin/python bench/memory.py [--conns 19000] [--runs 3] [--json FILE] [--uvloop]

For each implementation and run, on a fresh server: wait until it is idle, read its worker's
RSS (VmRSS), open --conns connections that each send `GET /u<i>.js HTTP/1.1` (distinct ids;
with one worker they are all its own), wait until the server reports them all waiting and
it is idle again, read the RSS again. bytes/conn = (after - before) / conns. Kernel memory
(socket buffers, epoll entries) is not in RSS and not counted, for either side.

- project: `manager.py --workers 1 --host 127.0.0.1 --status-interval 0`; the RSS is the
  worker's (server.py), waiting from the app port's `GET /stats` totals.waiting.
- asyncio: bench/asyncio_worker.py (asyncio.Protocol, dict id -> transport), one process.
- uvloop (with --uvloop): bench/uvloop_worker.py, the same code on uvloop's loop.

The load side spreads its sockets over two processes (bench/_load.py), as the open-file limit
is 20,000 per process, from source addresses 127.0.0.2 and 127.0.0.3. Runs are interleaved
(project, asyncio, project, ...) so that drift hits every implementation alike. Prints the
median and spread over --runs, and the ratio to the C original's 275 B/conn and to asyncio.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    LoadGroup,
    Server,
    listen_overflows,
    machine,
    machine_line,
    rss,
    summary,
    wait_idle,
    wait_waiting,
)

C_ORIGINAL = 275  # B/conn, MegaComet in C + libev (the author's 523k-connection test)
TARGET = 150  # B/conn, this project's goal


def measure(impl: str, conns: int) -> dict:
    server = Server(impl)
    load = None
    try:
        wait_idle(server.pids)
        before = rss(server.worker_pid)
        overflows = listen_overflows()
        t0 = time.monotonic()
        load = LoadGroup(server.port, conns)
        opened = load.wait_open()
        waiting = wait_waiting(server, conns)
        ramp = time.monotonic() - t0
        wait_idle(server.pids)
        after = rss(server.worker_pid)
        if waiting < conns:
            raise RuntimeError(f"{impl}: only {waiting} of {conns} waiting "
                               f"(load side: {opened})")
        return {"impl": impl, "conns": conns, "rss_before": before, "rss_after": after,
                "bytes_per_conn": (after - before) / conns, "ramp_s": round(ramp, 2),
                "connect_failed": opened["failed"],
                "listen_overflows": listen_overflows() - overflows}
    finally:
        if load is not None:
            load.close()
        server.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="worker RSS per idle waiting connection")
    p.add_argument("--conns", type=int, default=19000,
                   help="connections held by the one worker (default 19000; the open-file "
                        "limit here is 20000 per process)")
    p.add_argument("--runs", type=int, default=3, help="measurements per implementation")
    p.add_argument("--uvloop", action="store_true", help="also measure bench/uvloop_worker.py")
    p.add_argument("--json", metavar="FILE", help="write the results there as JSON")
    a = p.parse_args(argv)
    impls = ["project", "asyncio"] + (["uvloop"] if a.uvloop else [])

    m = machine()
    print(machine_line(m))
    print(f"{a.conns:,} idle waiting connections on one worker, {a.runs} runs each")
    runs: dict = {impl: [] for impl in impls}
    for r in range(a.runs):
        for impl in impls:
            res = measure(impl, a.conns)
            runs[impl].append(res)
            print(f"  run {r + 1} {impl:8} rss {res['rss_before'] / 2**20:6.1f} -> "
                  f"{res['rss_after'] / 2**20:6.1f} MiB  {res['bytes_per_conn']:7.1f} B/conn  "
                  f"(ramp {res['ramp_s']:.1f} s, connect failures {res['connect_failed']}, "
                  f"listen overflows box-wide {res['listen_overflows']})", flush=True)

    result = {"bench": "memory", "machine": m, "conns": a.conns, "runs": a.runs,
              "c_original_bytes_per_conn": C_ORIGINAL, "target_bytes_per_conn": TARGET,
              "impls": {}}
    print(f"\nbytes of worker RSS per idle waiting connection (median of {a.runs}, spread "
          "= (max-min)/median):")
    for impl in impls:
        s = summary([x["bytes_per_conn"] for x in runs[impl]])
        result["impls"][impl] = {"bytes_per_conn": s, "details": runs[impl]}
        print(f"  {impl:8} {s['median']:7.1f} B/conn  (min {s['min']:.1f}, max {s['max']:.1f}, "
              f"spread {s['spread_pct']:.1f}%)  = {s['median'] / C_ORIGINAL:.2f}x the C "
              f"original's {C_ORIGINAL} B")
    proj = result["impls"]["project"]["bytes_per_conn"]["median"]
    base = result["impls"]["asyncio"]["bytes_per_conn"]["median"]
    result["project_vs_asyncio"] = proj / base
    result["meets_target"] = proj <= TARGET
    print(f"  project / asyncio = {proj / base:.3f} (asyncio needs {base / proj:.1f}x the "
          f"memory); target <= {TARGET} B/conn: {'met' if proj <= TARGET else 'MISSED'}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
