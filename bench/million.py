"""The million run: TARGET waiting long polls on this box, then messages and a broadcast.

    make million [TARGET=1000000]
    .venv/bin/python bench/million.py [--target N] [--messages 100000] [--send-rate 10000]
                                      [--json FILE] [--max-time 570]

1. Starts `manager.py --host 127.0.0.1` with one worker per core, or more where the open-file
   limit needs them (each holds at most RLIMIT_NOFILE - 64 connections: 20,000 here, so
   1,000,000 takes 51 workers; under tuning/limits.conf's 1,048,576, 10,000,000 on 16 cores
   takes 16).
2. Starts `client.py` for TARGET ids at full speed (`--rate 0`) in as many processes (again one
   per core, or what its open-file limit needs); it picks its own source addresses
   (127.0.0.x). Time to open is taken from the server's side: until /stats says TARGET polls
   are waiting (confirmed, not the client's count).
3. With every poll waiting: worker RSS and bytes per connection (RSS growth over the idle
   workers' RSS), kernel memory (/proc/meminfo Slab, /proc/net/sockstat TCP inuse and mem),
   the server's CPU so far and the client's (it runs on the same cores).
4. client.py sends --messages messages through the app port at --send-rate (binary frames),
   each to one of its waiting ids, and measures delivery (sent, received, lost, p50/p99 from the
   intended send time). Each answered poll re-polls, as a browser would.
5. One `POST /broadcast`: the time until the workers have written it to every poll waiting at
   that moment (/stats `delivered` grew by that many, polled every 20 ms: the server's side;
   the clients' receive lags it by their own reading); then until 99% poll again (each client
   re-polls after its answer, as a browser does: a storm of TARGET new connections).
6. Stops everything (client first: its report, then the manager with SIGTERM), writes
   bench/results/million-<host>.json with every figure and the /stats time series (sampled
   until the re-polls settle; `marks`: when the messages and the broadcast started), prints a
   table and draws million-<host>.svg beside the JSON (bench/figures.py; without matplotlib,
   a line saying what to install). Bounded by --max-time (default 570 s) whatever happens;
   nothing is left running.

Kernel settings matter at this scale (tuning/: `sudo tuning/apply.sh`); `tuning/check.py` says
what caps the count. Without them the run reports where it stalled, it does not hang.
"""

import argparse
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CLK_TCK,
    ROOT,
    free_port_block,
    http_json,
    http_request,
    machine,
    machine_line,
    rss,
)
from figures import draw  # noqa: E402

PER_WORKER_SPARE = 64  # fds a worker keeps for itself (listener, link, page, epoll, stdio...)
CLIENT_SPARE = 100  # and a client process (client.py's FD_MARGIN)
POLL_S = 0.5  # /stats period while the connections come in
BROADCAST_POLL_S = 0.02


def stats(app_port: int) -> dict:
    return http_json(app_port, "/stats", timeout=10.0)


def kernel_memory() -> dict:
    """Slab (where socket structures live) and the TCP line of /proc/net/sockstat."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            if name in ("Slab", "SUnreclaim", "MemAvailable"):
                out[name.lower() + "_bytes"] = int(value.split()[0]) * 1024
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                tcp = dict(zip(parts[::2], map(int, parts[1::2]), strict=True))
                out["tcp_inuse"] = tcp.get("inuse", 0)
                out["tcp_orphan"] = tcp.get("orphan", 0)
                out["tcp_tw"] = tcp.get("tw", 0)
                out["tcp_mem_bytes"] = tcp.get("mem", 0) * os.sysconf("SC_PAGE_SIZE")
    return out


def sample(result: dict, s: dict, t0: float) -> dict:
    """One point of the /stats time series (the million figure): connections, waiting polls,
    the workers' RSS, kernel memory."""
    t = s["totals"]
    point = {"t": round(time.monotonic() - t0, 2), "connections": t["connections"],
             "waiting": t["waiting"], "rss_bytes": t["rss_bytes"], **kernel_memory()}
    result["series"].append(point)
    return point


def server_pids(s: dict, manager_pid: int) -> list:
    return [manager_pid] + [w["pid"] for w in s["workers"] if w["pid"]]


def cpu_of(pids: list) -> float:
    return sum(cpu_split(pids))


def cpu_split(pids: list) -> tuple[float, float]:
    """(utime, stime) of `pids` together, in seconds: Python against the kernel."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def session_cpu(sid: int) -> tuple[float, float]:
    """(utime, stime) of every process of session `sid` (client.py, started in a session of
    its own, and its children), with what each has reaped of children that already exited."""
    user = system = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == sid:  # field 6 of stat(5), the session id
            user += int(fields[11]) + int(fields[13])
            system += int(fields[12]) + int(fields[14])
    return user / CLK_TCK, system / CLK_TCK


def settled(measure, every: float = 0.5, within: float = 0.005, limit: float = 15.0) -> int:
    """The workers' idle RSS: `measure()` again every `every` s until two readings in a row
    differ by at most `within` of the earlier (start-up allocations done), or `limit` s."""
    last = measure()
    end = time.monotonic() + limit
    while time.monotonic() < end:
        time.sleep(every)
        now = measure()
        if abs(now - last) <= within * last:
            return now
        last = now
    return last


def stop(proc: subprocess.Popen, sig: int, wait: float) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def run(a) -> dict:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_worker = nofile - PER_WORKER_SPARE
    # One process per core at least: a worker (or client process) holds one core at most, and
    # with a high open-file limit the fd arithmetic alone would leave cores idle (10 for 16).
    cores = os.cpu_count() or 1
    workers = a.workers or max(cores, math.ceil(a.target / max(1, per_worker)))
    client_procs = a.client_procs or max(cores, math.ceil(a.target / max(1, nofile - CLIENT_SPARE)))
    base_port = free_port_block(workers + 1)  # the app port right after the comet ports
    app_port = base_port + workers
    deadline = time.monotonic() + a.max_time
    result = {"bench": "million", "machine": machine(), "host": socket.gethostname(),
              "target": a.target, "workers": workers, "client_procs": client_procs,
              "nofile": nofile,
              "messages": a.messages, "send_rate": a.send_rate, "series": []}
    print(machine_line(result["machine"]))
    print(f"target {a.target:,} polls: {workers} workers and {client_procs} client processes "
          f"(open-file limit {nofile:,}), ports {base_port}-{base_port + workers - 1}, app port "
          f"{app_port}", flush=True)
    log = open(a.log, "w")
    manager = subprocess.Popen(
        [sys.executable, str(ROOT / "manager.py"), "--host", "127.0.0.1", "--workers",
         str(workers), "--base-port", str(base_port), "--app-port", str(app_port),
         "--status-interval", "10", "--backlog", "65535"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = None
    client_json = Path(a.json).with_suffix(".client.json")
    try:
        while True:  # every worker healthy: "up" is only spawned, and 51 workers
            # importing on 2 busy cores take seconds, which would count as time to open
            if time.monotonic() > deadline or manager.poll() is not None:
                raise RuntimeError(f"the manager did not come up (see {a.log})")
            try:
                s = stats(app_port)
                if all(w["healthy"] for w in s["workers"]):
                    break
            except (OSError, RuntimeError, ValueError):
                pass
            time.sleep(0.2)
        pids = server_pids(s, manager.pid)
        rss_idle = settled(lambda: sum(rss(p) for p in pids[1:]))
        kernel0 = kernel_memory()
        split0 = cpu_split(pids)
        cpu0 = sum(split0)
        client = subprocess.Popen(
            [sys.executable, str(ROOT / "client.py"), "m", "127.0.0.1", "--workers",
             str(workers), "--base-port", str(base_port), "--app-port", str(app_port),
             "--conns", str(a.target), "--procs", str(client_procs), "--rate", "0",
             "--send", str(a.messages),
             "--send-rate", str(a.send_rate), "--hold", str(a.max_time),
             "--max-time", str(a.max_time), "--json", str(client_json)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        opened_at = None
        peak = 0
        while time.monotonic() < deadline:  # the connections come in
            time.sleep(POLL_S)
            s = stats(app_port)
            t = s["totals"]
            now = sample(result, s, t0)["t"]
            peak = max(peak, t["waiting"])
            print(f"  {now:6.1f} s  waiting {t['waiting']:>10,}  rss "
                  f"{t['rss_bytes'] / 2**20:8.1f} MiB", flush=True)
            if t["waiting"] >= a.target:
                opened_at = now
                break
            if client.poll() is not None:
                break
            if len(result["series"]) > 20 and \
                    result["series"][-20]["waiting"] == t["waiting"]:
                break  # stalled for 10 s: report it
        result["open_s"] = opened_at
        result["peak_waiting"] = peak
        if opened_at:
            result["connects_per_s"] = round(a.target / opened_at)
        s = stats(app_port)
        t = s["totals"]
        pids = server_pids(s, manager.pid)
        rss_full = sum(rss(p) for p in pids[1:])
        result["waiting"] = t["waiting"]
        result["worker_rss_bytes"] = rss_full
        result["worker_rss_idle_bytes"] = rss_idle
        result["bytes_per_conn"] = round((rss_full - rss_idle) / max(1, t["waiting"]), 1)
        result["kernel_idle"] = kernel0
        result["kernel_full"] = kernel_memory()
        result["kernel_bytes_per_conn"] = round(
            (result["kernel_full"]["slab_bytes"] - kernel0["slab_bytes"])
            / max(1, t["waiting"]), 1)
        split = cpu_split(pids)
        # The client on the same cores: the box's time to open is both sides' CPU over them.
        client_split = session_cpu(client.pid)
        result["client_cpu_open_s"] = round(sum(client_split), 2)
        result["client_cpu_open_user_s"] = round(client_split[0], 2)
        result["client_cpu_open_sys_s"] = round(client_split[1], 2)
        result["server_cpu_open_s"] = round(sum(split) - cpu0, 2)
        result["server_cpu_open_user_s"] = round(split[0] - split0[0], 2)
        result["server_cpu_open_sys_s"] = round(split[1] - split0[1], 2)
        # The messages: client.py sends them once its ramp is over; wait for them.
        cpu1 = cpu_of(pids)
        t_send = time.monotonic()
        result["marks"] = {"messages_t": round(t_send - t0, 2)}
        delivered0 = t["delivered"]
        while time.monotonic() < deadline and client.poll() is None:
            time.sleep(POLL_S)
            s = stats(app_port)
            sample(result, s, t0)
            if s["manager"]["messages_in"] >= a.messages and \
                    s["totals"]["delivered"] - delivered0 >= a.messages:
                break
            if time.monotonic() - t_send > 60 + a.messages / max(1, a.send_rate):
                break
        time.sleep(2.0)  # the last answers reach the client
        s = stats(app_port)
        result["server_cpu_messages_s"] = round(cpu_of(pids) - cpu1, 2)
        # The broadcast, to every poll waiting now.
        waiting = s["totals"]["waiting"]
        delivered = s["totals"]["delivered"]
        cpu2 = cpu_of(pids)
        t_b = time.monotonic()
        result["marks"]["broadcast_t"] = round(t_b - t0, 2)
        status, _ = http_request(app_port, b"POST /broadcast HTTP/1.1\r\nHost: x\r\n"
                                           b"Content-Length: 3\r\nConnection: close\r\n\r\nall")
        reached = None
        while time.monotonic() < min(deadline, t_b + 120):
            s = stats(app_port)
            if s["totals"]["delivered"] - delivered >= waiting:
                reached = time.monotonic() - t_b
                break
            time.sleep(BROADCAST_POLL_S)
        cpu_b = round(cpu_of(pids) - cpu2, 2)
        # Every answered poll re-polls: wait for that storm to settle before stopping the
        # client, or its busy processes miss their last reports (and their latencies).
        repolled = None
        while time.monotonic() < min(deadline - 30, t_b + 180):
            if sample(result, stats(app_port), t0)["waiting"] >= waiting * 0.99:
                repolled = time.monotonic() - t_b
                break
            time.sleep(POLL_S)
        # Connections the workers closed unanswered, by cause, over the whole run: in the
        # re-poll storm a client too busy reading answers to send its next request in time
        # shows here as closed_header_timeout (and as "closed" in the client's failures).
        totals = stats(app_port)["totals"]
        result["server_closed"] = {k[len("closed_"):]: v for k, v in totals.items()
                                   if k.startswith("closed_")}
        result["broadcast"] = {"status": status, "waiting": waiting,
                               "written": s["totals"]["delivered"] - delivered,
                               "time_to_all_s": round(reached, 3) if reached else None,
                               "server_cpu_s": cpu_b,
                               "repolled_99pct_s": round(repolled, 1) if repolled else None}
    finally:
        if client is not None:
            stop(client, signal.SIGTERM, 30)
        stop(manager, signal.SIGTERM, 10)
        log.close()
    try:
        c = json.loads(Path(client_json).read_text())
        result["client"] = {k: c.get(k) for k in (
            "opened", "peak_open", "connect_rate", "ramp_s", "sent", "received", "lost",
            "duplicates", "latency_ms", "latency_histogram", "msgs_per_s", "other_messages",
            "cause", "failed")}
    except (OSError, ValueError):
        result["client"] = None
    return result


def table(r: dict) -> str:
    c = r.get("client") or {}
    lat = c.get("latency_ms") or {}
    k = r.get("kernel_full") or {}
    b = r.get("broadcast") or {}
    rows = [
        ("target", f"{r['target']:,} polls, {r['workers']} workers, "
                   f"{r.get('client_procs', '?')} client processes"),
        ("time to open", f"{r['open_s']:.1f} s (all {r['target']:,} waiting per /stats)"
         if r.get("open_s") else f"not reached: peak {r.get('peak_waiting', 0):,} waiting"),
        ("connects/s", f"{r.get('connects_per_s', 0):,}"),
        ("peak waiting", f"{r.get('peak_waiting', 0):,}"),
        ("worker RSS", f"{r.get('worker_rss_bytes', 0) / 2**20:,.0f} MiB "
                       f"({r.get('bytes_per_conn', 0):.0f} B per connection over idle)"),
        ("kernel", f"Slab {k.get('slab_bytes', 0) / 2**20:,.0f} MiB "
                   f"(+{r.get('kernel_bytes_per_conn', 0):,.0f} B per connection, both ends); "
                   f"TCP inuse {k.get('tcp_inuse', 0):,}, mem "
                   f"{k.get('tcp_mem_bytes', 0) / 2**20:,.0f} MiB"),
        ("server CPU", f"{r.get('server_cpu_open_s', 0)} s to open (user "
                       f"{r.get('server_cpu_open_user_s', 0)}, sys "
                       f"{r.get('server_cpu_open_sys_s', 0)}), "
                       f"{r.get('server_cpu_messages_s', 0)} s for the messages"),
        ("client CPU", f"{r.get('client_cpu_open_s', 0)} s to open (user "
                       f"{r.get('client_cpu_open_user_s', 0)}, sys "
                       f"{r.get('client_cpu_open_sys_s', 0)})"),
        ("delivery", f"sent {c.get('sent', 0):,}, received {c.get('received', 0):,}, lost "
                     f"{c.get('lost', 0):,}; p50 {lat.get('p50', 0)} ms, p99 "
                     f"{lat.get('p99', 0)} ms"),
        ("broadcast", f"written to all {b.get('written', 0):,} of {b.get('waiting', 0):,} in "
                      f"{b.get('time_to_all_s')} s (server CPU {b.get('server_cpu_s')} s); "
                      + (f"99% polling again after {b['repolled_99pct_s']} s"
                         if b.get("repolled_99pct_s") else
                         "not 99% polling again before the run stopped waiting")),
        ("closed", "unanswered, by the workers' cause: " + (", ".join(
            f"{k} {v:,}" for k, v in (r.get("server_closed") or {}).items() if v) or "none")
         + "; the client's failures: " + (", ".join(
            f"{k} {v:,}" for k, v in (c.get("failed") or {}).items() if v) or "none")),
    ]
    return "\n".join(f"  {name:14} {value}" for name, value in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="the million-connection run, see the docstring")
    p.add_argument("--target", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=0,
                   help="default: one per core, or more where the open-file limit needs them")
    p.add_argument("--client-procs", type=int, default=0,
                   help="client.py's processes; default: one per core, or more where the "
                        "open-file limit needs them (its own count: client.py keeps 100 fds)")
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--send-rate", type=int, default=5_000)
    p.add_argument("--max-time", type=float, default=570.0)
    p.add_argument("--json", default=None,
                   help="default bench/results/million-<host>.json")
    p.add_argument("--log", default="/tmp/megacomet-million.log",
                   help="the manager's and client's output")
    a = p.parse_args(argv)
    a.json = a.json or str(ROOT / "bench" / "results" / f"million-{socket.gethostname()}.json")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    result = run(a)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    print(text)
    Path(a.json).with_suffix(".txt").write_text(machine_line(result["machine"]) + "\n" + text
                                                + "\n")
    print(f"results written to {a.json} and {Path(a.json).with_suffix('.txt')}")
    draw(result, a.json)  # after the JSON: without matplotlib, it says so, and that is all
    return 0 if result.get("open_s") else 1


if __name__ == "__main__":
    sys.exit(main())
