"""Worker RSS per idle waiting connection, long polls and Server-Sent Events streams:
MegaComet's worker against a plain asyncio one.

    .venv/bin/python bench/memory.py [--conns 19000] [--runs 3] [--json FILE] [--uvloop]

For each case and run, on a fresh server: wait until it is idle, read its worker's RSS
(VmRSS), open --conns connections with distinct ids (with one worker they are all its own),
wait until the server reports them all waiting and it is idle again, read the RSS again.
bytes/conn = (after - before) / conns. Kernel memory (socket buffers, epoll entries) is not
in RSS and not counted, for either side. No id has any history: the figure is what a waiting
connection costs by itself.

- project-polls: `manager.py --workers 1 --host 127.0.0.1 --status-interval 0`, each
  connection `GET /u<i>.js HTTP/1.1`; the RSS is the worker's (server.py), waiting from the
  app port's `GET /stats` totals.waiting.
- project-streams: the same server, each connection `GET /u<i>.sse HTTP/1.1`, an SSE stream;
  waiting once totals.waiting == totals.streams == --conns, and every load socket has read
  the stream's `200` head (with `retry: 2000`); the load side reads and discards what comes.
- asyncio: bench/asyncio_worker.py (asyncio.Protocol, dict id -> transport), one process,
  long polls (it serves no streams): the baseline.
- uvloop (with --uvloop): bench/uvloop_worker.py, the same code on uvloop's loop, long polls.

The load side spreads its sockets over two processes (bench/_load.py), as the open-file limit
is 20,000 per process, from source addresses 127.0.0.2 and 127.0.0.3. Runs are interleaved
(project-polls, project-streams, asyncio, project-polls, ...) so that drift hits every case
alike. Prints the median and spread over --runs, the ratio to the C original's 275 B/conn and
to asyncio, and whether polls and streams each meet the target (<= 100 B/conn).
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
    wait_streams,
    wait_waiting,
)

C_ORIGINAL = 275  # B/conn, MegaComet in C + libev (the author's 523k-connection test)
TARGET = 100  # B/conn, this project's goal, for polls and streams alike
# case -> (server implementation, load suffix)
CASES = {"project-polls": ("project", "js"), "project-streams": ("project", "sse"),
         "asyncio": ("asyncio", "js"), "uvloop": ("uvloop", "js")}
TARGETED = ("project-polls", "project-streams")


def wait_heads(load: LoadGroup, n: int, timeout: float = 30.0) -> dict:
    """Until every load socket has read its stream's `200` head; returns the counters."""
    deadline = time.monotonic() + timeout
    while True:
        st = load.stats()
        if st["s200"] + st["other"] >= n or time.monotonic() >= deadline:
            return st
        time.sleep(0.2)


def measure(case: str, conns: int) -> dict:
    impl, suffix = CASES[case]
    server = Server(impl)
    load = None
    try:
        wait_idle(server.pids)
        before = rss(server.worker_pid)
        overflows = listen_overflows()
        t0 = time.monotonic()
        load = LoadGroup(server.port, conns, suffix=suffix)
        opened = load.wait_open()
        extra: dict = {}
        if suffix == "sse":
            waiting, streams = wait_streams(server, conns)
            st = wait_heads(load, conns)
            extra = {"streams": streams, "heads_200": st["s200"], "heads_other": st["other"],
                     "load_bytes_read": st["bytes"], "load_eof": st["eof"]}
            if streams != conns or st["s200"] != conns:
                raise RuntimeError(f"{case}: {streams} streams and {st['s200']} heads of "
                                   f"{conns} (load side: {st})")
        else:
            waiting = wait_waiting(server, conns)
        ramp = time.monotonic() - t0
        wait_idle(server.pids)
        after = rss(server.worker_pid)
        if waiting != conns:
            raise RuntimeError(f"{case}: {waiting} of {conns} waiting (load side: {opened})")
        return {"case": case, "impl": impl, "conns": conns, "rss_before": before,
                "rss_after": after, "bytes_per_conn": (after - before) / conns,
                "ramp_s": round(ramp, 2), "waiting": waiting,
                "connect_failed": opened["failed"],
                "listen_overflows": listen_overflows() - overflows, **extra}
    finally:
        if load is not None:
            load.close()
        server.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="worker RSS per idle waiting poll and stream")
    p.add_argument("--conns", type=int, default=19000,
                   help="connections held by the one worker (default 19000; the open-file "
                        "limit here is 20000 per process)")
    p.add_argument("--runs", type=int, default=3, help="measurements per case")
    p.add_argument("--uvloop", action="store_true", help="also measure bench/uvloop_worker.py")
    p.add_argument("--json", metavar="FILE", help="write the results there as JSON")
    a = p.parse_args(argv)
    cases = ["project-polls", "project-streams", "asyncio"] + (["uvloop"] if a.uvloop else [])

    m = machine()
    print(machine_line(m))
    print(f"{a.conns:,} idle waiting connections on one worker, {a.runs} runs each")
    runs: dict = {case: [] for case in cases}
    for r in range(a.runs):
        for case in cases:
            res = measure(case, a.conns)
            runs[case].append(res)
            print(f"  run {r + 1} {case:15} rss {res['rss_before'] / 2**20:6.1f} -> "
                  f"{res['rss_after'] / 2**20:6.1f} MiB  {res['bytes_per_conn']:7.1f} B/conn  "
                  f"(ramp {res['ramp_s']:.1f} s, connect failures {res['connect_failed']}, "
                  f"listen overflows box-wide {res['listen_overflows']})", flush=True)

    result = {"bench": "memory", "machine": m, "conns": a.conns, "runs": a.runs,
              "c_original_bytes_per_conn": C_ORIGINAL, "target_bytes_per_conn": TARGET,
              "cases": {}}
    print(f"\nbytes of worker RSS per idle waiting connection (median of {a.runs}, spread "
          "= (max-min)/median):")
    for case in cases:
        s = summary([x["bytes_per_conn"] for x in runs[case]])
        result["cases"][case] = {"impl": CASES[case][0], "suffix": CASES[case][1],
                                 "bytes_per_conn": s, "details": runs[case]}
        print(f"  {case:15} {s['median']:7.1f} B/conn  (min {s['min']:.1f}, max "
              f"{s['max']:.1f}, spread {s['spread_pct']:.1f}%)  = "
              f"{s['median'] / C_ORIGINAL:.2f}x the C original's {C_ORIGINAL} B")
    med = {case: result["cases"][case]["bytes_per_conn"]["median"] for case in cases}
    base = med["asyncio"]
    result["meets_target"] = {}
    for case in TARGETED:
        ok = med[case] <= TARGET
        result[f"{case.replace('-', '_')}_vs_asyncio"] = med[case] / base
        result["meets_target"][case] = ok
        print(f"  {case} / asyncio polls = {med[case] / base:.3f} (asyncio needs "
              f"{base / med[case]:.1f}x the memory); target <= {TARGET} B/conn: "
              f"{'met' if ok else 'MISSED'}")
    result["streams_vs_polls"] = med["project-streams"] / med["project-polls"]
    print(f"  project streams / polls = {result['streams_vs_polls']:.3f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
