"""make bench: MegaComet against the peer (bench/peer.py: the same manager/worker design in
plain asyncio) on asyncio's loop and on uvloop's, side by side, in one run.

    .venv/bin/python bench/suite.py [--rounds 3] [--quick] [--json FILE]
                                    [--conns 39800] [--messages 20000] [--send-rate 5000]
                                    [--memory-conns 19000] [--broadcast-polls 100000]

Every figure is measured on a fresh server (manager.py --workers W --status-interval 0, or
bench/peer.py --workers W --loop asyncio|uvloop, both on 127.0.0.1 and free ports, both pinning
worker n to CPU n % ncpu), in rounds that alternate the implementations: round 1 project,
asyncio, uvloop for each scenario, then round 2, ... The table gives the median over the rounds
and the ratios project / uvloop and project / asyncio. Server CPU is utime + stime of the
manager and all its workers, from /proc/PID/stat.

- bytes per idle poll (W = 1): bench/memory.py's method. The worker's RSS before and after
  --memory-conns idle waiting polls (two bench/_load.py processes, pinned away from the
  worker's CPU), once /stats says they all wait and the server is idle again.
- paced (W = 2 and W = 8): the issue's load, `client.py a 127.0.0.1 --conns N --rate 20000
  --send M --send-rate R` (N = 39,800: 40,000 does not fit 2 workers under a 20,000 open-file
  limit, as x31 puts exactly 20,000 of a0..a39999 on each, and a worker needs a few fds of its
  own). Messages go as binary frames, each to a waiting id; each answered poll re-polls.
  p50/p99 are client.py's (from each message's intended send time). CPU: a thread samples the
  servers' CPU time and the manager's open fds every 10 ms. The send phase starts when the
  client's K processes have connected to the app port (the manager holds K more fds for 30 ms);
  CPU per connection = server CPU from before the client started to the last sample before
  that / ids opened (accept, read, parse, wait); CPU per delivered message = server CPU from
  there to the end of the phase / messages received (the manager's read and routing, the link,
  the worker's answer and close, and the re-poll it causes). So that the end is not mixed with
  the client's exit (it resets every connection at once), the client holds its connections
  --gap s after its last send (`--hold M/R + gap` instead of 0), and the end sample is taken
  --guard s before the manager sees the app connections close; the CPU spent in that guard is
  recorded (`guard_cpu_s`, ~0 when the phase was over).
- blast (W = 2 and W = 8): the same with --send-rate 0 (every message at once);
  msgs/s is client.py's msgs_per_s (received / time from the first intended send to the last
  receive).
- broadcast (W = 6): --broadcast-polls waiting polls (bench/_load.py processes, each id on its
  owner's port, 127.0.0.2.. source addresses, not pinned), then one POST /broadcast; the time
  from just before the POST to the last poll's answer arriving (each load process records when
  it read its last answer: CLOCK_MONOTONIC, one clock for the box). The open-file limit (20,000
  per process here) needs W >= 6 for 100,000 polls, for both implementations.

Writes bench/results/bench-<host>.json (every raw run, the medians, the ratios, the machine)
and prints the table, then draws its figures beside it (bench/figures.py: bars, latency
percentiles, the broadcast's reach; matplotlib, a dev dependency, or a line saying what to
install); --report FILE prints the table again from such a file and redraws them. --quick:
one round of small loads (the smoke test in tests/test_bench.py). Everything is bounded, and
every process started here is stopped in `finally` blocks.
"""

import argparse
import json
import math
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH,
    CLK_TCK,
    ROOT,
    LoadGroup,
    free_port_block,
    http_json,
    machine,
    machine_line,
    rss,
    wait_idle,
)
from figures import draw  # noqa: E402

IMPLS = ("project", "asyncio", "uvloop")
NAMES = {"project": "this project", "asyncio": "asyncio peer", "uvloop": "uvloop peer"}
SAMPLE_S = 0.01
START_SAMPLES = 3  # the manager holds the client's app connections this many samples in a row
NOFILE_SPARE = 100  # what client.py keeps free per process (FD_MARGIN)
LOAD_PER_PROC = 18000  # polls per bench/_load.py process (20,000 fds each here)
# The shares of a broadcast's polls whose answer times are kept (its figure): every 1%, and
# the tail, where the last of them are.
REACH_SHARES = [k / 100 for k in range(101)] + [0.995, 0.999, 0.9999]

# (key, label, unit, which is better)
FIGURES = {
    "bytes_per_idle_poll": ("bytes per idle poll", "B", "lower"),
    "cpu_per_conn_us": ("CPU per connection", "µs", "lower"),
    "cpu_per_msg_us": ("CPU per message, paced", "µs", "lower"),
    "p50_ms": ("p50 latency, paced", "ms", "lower"),
    "p99_ms": ("p99 latency, paced", "ms", "lower"),
    "blast_msgs_per_s": ("blast", "msgs/s", "higher"),
    "broadcast_s": ("broadcast to all", "s", "lower"),
}


class Stopped(Exception):
    """SIGTERM: unwinds through every `finally`, which stops what was started."""


# ---------------------------------------------------------------------------------------------
# The servers under test
# ---------------------------------------------------------------------------------------------


class Cluster:
    """manager.py or bench/peer.py with W workers on free ports, stopped by close()."""

    def __init__(self, impl: str, workers: int, timeout: float = 30.0):
        self.impl, self.workers = impl, workers
        self.proc = None
        self.log = tempfile.TemporaryFile()
        for _ in range(5):  # a port drawn free may be taken before we bind it (a shared box)
            self.base_port = free_port_block(workers + 1)  # the app port right after
            self.app_port = self.base_port + workers
            if impl == "project":
                cmd = [sys.executable, str(ROOT / "manager.py"), "--status-interval", "0"]
            else:
                cmd = [sys.executable, str(BENCH / "peer.py"), "--loop", impl]
            cmd += ["--workers", str(workers), "--host", "127.0.0.1",
                    "--base-port", str(self.base_port), "--app-port", str(self.app_port)]
            self.log.seek(0)
            self.log.truncate()
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
            if self.wait_ready(timeout):
                return
            out = self.output()
            self.stop()
            if "in use" not in out:
                break
        self.log.close()
        raise RuntimeError(f"{impl} with {workers} workers did not come up: {out[-1500:]}")

    def wait_ready(self, timeout: float) -> bool:
        """Every worker up and answering /_info on its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                s = self.stats(timeout=5.0)
                rows = s["workers"]
                if len(rows) == self.workers and all(r.get("up") and r.get("pid")
                                                     for r in rows):
                    for n in range(self.workers):
                        http_json(self.base_port + n, "/_info", timeout=2.0)
                    self.worker_pids = [r["pid"] for r in rows]
                    self.pids = [self.proc.pid] + self.worker_pids
                    return True
            except (OSError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.1)
        return False

    def client_args(self) -> list:
        """Where client.py finds this server."""
        return ["--base-port", str(self.base_port), "--app-port", str(self.app_port)]

    def stats(self, timeout: float = 20.0) -> dict:
        # (the peer asks its workers: one busy accepting a burst on a loaded box is slow)
        return http_json(self.app_port, "/stats", timeout=timeout)

    def totals(self) -> dict:
        return self.stats()["totals"]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM to the manager, then SIGKILL to its whole process group (its workers)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.stop()
        self.log.close()


def wait_totals(cluster: Cluster, key: str, n: int, timeout: float, every: float = 0.2) -> int:
    deadline = time.monotonic() + timeout
    got = -1
    while time.monotonic() < deadline:
        try:
            got = cluster.totals()[key]
        except (OSError, ValueError):  # a timeout: ask again while there is time
            continue
        if got >= n:
            break
        time.sleep(every)
    return got


def post(port: int, path: str, body: bytes, timeout: float = 10.0) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                  b"Connection: close\r\n\r\n%s" % (path.encode(), len(body), body))
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


# ---------------------------------------------------------------------------------------------
# Server CPU and the manager's fds, sampled
# ---------------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """(monotonic time, CPU seconds of all `pids`, open fds of the manager) every SAMPLE_S."""

    def __init__(self, pids: list, manager_pid: int):
        super().__init__(daemon=True)
        self.stat_fds = [os.open(f"/proc/{pid}/stat", os.O_RDONLY) for pid in pids]
        self.fd_dir = f"/proc/{manager_pid}/fd"
        self.samples: list = []
        self.done = threading.Event()
        self.samples.append(self.sample())

    def sample(self) -> tuple:
        """(t, CPU s of all, manager fds, (manager user, manager sys, workers user,
        workers sys) s): the split is the README's where-the-time-goes."""
        split = [0, 0, 0, 0]
        for k, fd in enumerate(self.stat_fds):
            fields = os.pread(fd, 2048, 0).rsplit(b")", 1)[1].split()
            at = 0 if k == 0 else 2  # stat_fds[0] is the manager's
            split[at] += int(fields[11])
            split[at + 1] += int(fields[12])
        return (time.monotonic(), sum(split) / CLK_TCK, len(os.listdir(self.fd_dir)),
                tuple(x / CLK_TCK for x in split))

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            try:
                self.samples.append(self.sample())
            except (OSError, IndexError, ValueError):
                break

    def close(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join(timeout=2)
        for fd in self.stat_fds:
            os.close(fd)


def send_window(samples: list, procs: int, guard: float) -> dict:
    """The send phase in a Sampler's timeline: from the last sample before the manager held
    the client's `procs` app connections (START_SAMPLES in a row) to `guard` s before it
    closed them (the client's exit)."""
    base = samples[0][2]
    threshold = base + procs
    held = [s[2] >= threshold for s in samples]
    start = next((i for i in range(1, len(samples) - START_SAMPLES + 1)
                  if all(held[i:i + START_SAMPLES])), None)
    if start is None:
        raise RuntimeError(f"never saw the client's {procs} app connections (manager fds "
                           f"{base} at the start, at most {max(s[2] for s in samples)})")
    closed = next((j for j in range(start + START_SAMPLES, len(samples)) if not held[j]),
                  len(samples) - 1)
    t_end = samples[closed][0] - guard
    end = max((j for j in range(start, closed) if samples[j][0] <= t_end), default=start)
    late = max((j for j in range(end, closed) if samples[j][0] <= samples[closed][0] - 0.05),
               default=end)
    before = samples[start - 1]
    return {"t0": samples[0], "start": before, "end": samples[end],
            "guard_cpu_s": round(samples[late][1] - samples[end][1], 3),
            "phase_s": round(samples[end][0] - before[0], 3)}


# ---------------------------------------------------------------------------------------------
# The measurements, one fresh server each
# ---------------------------------------------------------------------------------------------


def client_procs(conns: int) -> int:
    """As client.py plans them (plan_procs), but at least 2: the send phase is told apart
    by the client's app connections, and two are never mistaken for a passing /stats."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return max(2, math.ceil(conns / max(1, hard - NOFILE_SPARE)))


def run_client(cluster, args: list, timeout: float, sampler: Sampler | None = None) -> dict:
    """client.py against `cluster` (a Cluster, or bench/nodes.py's Setup: anything with
    client_args()) with `args`; its --json summary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "client.json"
        log = open(Path(tmp) / "client.log", "w+")
        cmd = [sys.executable, str(ROOT / "client.py"), "a", "127.0.0.1",
               *cluster.client_args(), "--max-time", str(int(timeout)), "--json", str(out),
               *args]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            if sampler is not None:
                sampler.start()
            proc.wait(timeout=timeout + 30)
            if sampler is not None:
                time.sleep(0.3)  # the manager closing the app connections
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            if sampler is not None:
                sampler.close()
        try:
            summary = json.loads(out.read_text())
        except (OSError, ValueError):
            log.seek(0)
            raise RuntimeError(f"client.py wrote no summary (exit {proc.returncode}): "
                               f"{log.read()[-1500:]}") from None
        finally:
            log.close()
    summary["exit_status"] = proc.returncode
    return summary


def client_fields(c: dict) -> dict:
    lat = c.get("latency_ms") or {}
    return {"client_exit": c.get("exit_status"), "ids_opened": c.get("ids_opened"),
            "sent": c.get("sent"), "received": c.get("received"), "lost": c.get("lost"),
            "unsendable": c.get("unsendable"), "duplicates": c.get("duplicates"),
            "latency_ms": lat, "latency_histogram": c.get("latency_histogram"),
            "msgs_per_s": c.get("msgs_per_s"),
            "connect_rate": c.get("connect_rate"), "listen_overflows": c.get("listen_overflows"),
            "failed_total": c.get("failed_total"), "status": c.get("status")}


def measure_memory(impl: str, conns: int) -> dict:
    cluster = Cluster(impl, 1)
    load = None
    try:
        wait_idle(cluster.pids)
        worker = cluster.worker_pids[0]
        before = rss(worker)
        t0 = time.monotonic()
        load = LoadGroup(cluster.base_port, conns)
        opened = load.wait_open()
        waiting = wait_totals(cluster, "waiting", conns, 60)
        if waiting != conns:
            raise RuntimeError(f"{waiting} of {conns} waiting (load side: {opened})")
        ramp = time.monotonic() - t0
        wait_idle(cluster.pids)
        after = rss(worker)
        return {"bytes_per_idle_poll": (after - before) / conns, "conns": conns,
                "rss_before": before, "rss_after": after, "ramp_s": round(ramp, 2)}
    finally:
        if load is not None:
            load.close()
        cluster.close()


def measure_paced(impl: str, workers: int, conns: int, messages: int, rate: float,
                  gap: float, guard: float) -> dict:
    cluster = Cluster(impl, workers)
    try:
        wait_idle(cluster.pids)
        procs = client_procs(conns)
        hold = messages / rate + gap
        sampler = Sampler(cluster.pids, cluster.proc.pid)
        c = run_client(cluster, ["--conns", str(conns), "--rate", "20000", "--send",
                                 str(messages), "--send-rate", f"{rate:g}", "--hold",
                                 f"{hold:.2f}", "--procs", str(procs)],
                       timeout=120 + hold, sampler=sampler)
        w = send_window(sampler.samples, procs, guard)
        received = c.get("received") or 0
        ramp_cpu = w["start"][1] - w["t0"][1]
        msg_cpu = w["end"][1] - w["start"][1]
        lat = c.get("latency_ms") or {}
        split = {f"{who}_{mode}_per_msg_us": round((e - b) / received * 1e6, 1)
                 for who, mode, e, b in zip(("manager", "manager", "workers", "workers"),
                                            ("user", "sys", "user", "sys"), w["end"][3],
                                            w["start"][3], strict=True)} if received else {}
        return {"cpu_per_conn_us": ramp_cpu / max(1, c.get("ids_opened") or 0) * 1e6,
                **split,
                "cpu_per_msg_us": msg_cpu / received * 1e6 if received else None,
                "p50_ms": lat.get("p50") if received else None,
                "p99_ms": lat.get("p99") if received else None,
                "ramp_cpu_s": round(ramp_cpu, 3), "send_cpu_s": round(msg_cpu, 3),
                "send_phase_s": w["phase_s"], "guard_cpu_s": w["guard_cpu_s"],
                "client_procs": procs, "hold_s": round(hold, 2), "samples": len(sampler.samples),
                **client_fields(c)}
    finally:
        cluster.close()


def measure_blast(impl: str, workers: int, conns: int, messages: int) -> dict:
    cluster = Cluster(impl, workers)
    try:
        wait_idle(cluster.pids)
        c = run_client(cluster, ["--conns", str(conns), "--rate", "20000", "--send",
                                 str(messages), "--send-rate", "0", "--hold", "0",
                                 "--procs", str(client_procs(conns))], timeout=120)
        ok = (c.get("received") or 0) > 0
        return {"blast_msgs_per_s": c.get("msgs_per_s") if ok else None, **client_fields(c)}
    finally:
        cluster.close()


def measure_broadcast(impl: str, workers: int, polls: int) -> dict:
    cluster = Cluster(impl, workers)
    load = None
    try:
        wait_idle(cluster.pids)
        procs = max(2, math.ceil(polls / LOAD_PER_PROC))
        t0 = time.monotonic()
        load = LoadGroup(cluster.base_port, polls, prefix="b", procs=procs, workers=workers,
                         pin=False)
        opened = load.wait_open(timeout=120)
        waiting = wait_totals(cluster, "waiting", polls, 60)
        if waiting != polls:
            raise RuntimeError(f"{waiting} of {polls} waiting (load side: {opened})")
        ramp = time.monotonic() - t0
        wait_idle(cluster.pids)
        t_post = time.monotonic()
        status = post(cluster.app_port, "/broadcast", b"to all")
        deadline = time.monotonic() + 60
        while True:
            time.sleep(0.25)
            st = load.stats()
            if st["s200"] + st["other"] >= polls or time.monotonic() > deadline:
                break
        if st["s200"] != polls:
            raise RuntimeError(f"broadcast reached {st['s200']:,} of {polls:,} polls "
                               f"(other answers {st['other']:,}, POST answered {status})")
        times = load.answer_times(t_post)
        return {"broadcast_s": st["last_answer_t"] - t_post, "polls": polls,
                "reach": reach(times),
                "answered": st["s200"], "post_status": status, "load_procs": procs,
                "ramp_s": round(ramp, 2)}
    finally:
        if load is not None:
            load.close()
        cluster.close()


def reach(times: list) -> list:
    """[s after the POST, share of the polls answered by then] at REACH_SHARES, from the
    sorted answer times."""
    if not times:
        return []
    n = len(times)
    shares = sorted(set(REACH_SHARES))
    return [[round(times[min(n - 1, max(0, math.ceil(q * n) - 1))], 6), q] for q in shares]


# ---------------------------------------------------------------------------------------------
# The run: rounds, alternating implementations; the table
# ---------------------------------------------------------------------------------------------


def scenarios(a) -> list:
    """(name, workers, function of impl) in the order each round runs them."""
    return [
        ("memory", 1, lambda impl: measure_memory(impl, a.memory_conns)),
        ("paced", 2, lambda impl: measure_paced(impl, 2, a.conns, a.messages, a.send_rate,
                                                a.gap, a.guard)),
        ("paced", 8, lambda impl: measure_paced(impl, 8, a.conns, a.messages, a.send_rate,
                                                a.gap, a.guard)),
        ("blast", 2, lambda impl: measure_blast(impl, 2, a.conns, a.messages)),
        ("blast", 8, lambda impl: measure_blast(impl, 8, a.conns, a.messages)),
        ("broadcast", 6, lambda impl: measure_broadcast(impl, 6, a.broadcast_polls)),
    ]


def progress(run: dict) -> str:
    if run.get("error"):
        return f"ERROR {run['error'][:300]}"
    parts = []
    for key, (label, unit, _) in FIGURES.items():
        if run.get(key) is not None:
            parts.append(f"{label} {run[key]:,.{digits(key)}f} {unit}")
    if run["scenario"] in ("paced", "blast"):
        parts.append(f"received {run.get('received')}/{run.get('sent')}")
    if run.get("manager_user_per_msg_us") is not None:
        parts.append("per msg µs manager user/sys {manager_user_per_msg_us}/"
                     "{manager_sys_per_msg_us}, workers {workers_user_per_msg_us}/"
                     "{workers_sys_per_msg_us}".format(**run))
    if run.get("guard_cpu_s"):
        parts.append(f"guard CPU {run['guard_cpu_s']} s")
    return ", ".join(parts)


def digits(key: str) -> int:
    return {"bytes_per_idle_poll": 1, "cpu_per_conn_us": 1, "cpu_per_msg_us": 1, "p50_ms": 2,
            "p99_ms": 2, "blast_msgs_per_s": 0, "broadcast_s": 3}[key]


def rows_of(a) -> list:
    """(figure key, workers) in table order."""
    return [("bytes_per_idle_poll", 1), ("cpu_per_conn_us", 2), ("cpu_per_conn_us", 8),
            ("cpu_per_msg_us", 2), ("cpu_per_msg_us", 8), ("p50_ms", 2), ("p50_ms", 8),
            ("p99_ms", 2), ("p99_ms", 8), ("blast_msgs_per_s", 2), ("blast_msgs_per_s", 8),
            ("broadcast_s", 6)]


def medians(runs: list, a) -> dict:
    out = {}
    for key, workers in rows_of(a):
        entry = {}
        for impl in IMPLS:
            values = [r[key] for r in runs if r["impl"] == impl and r["workers"] == workers
                      and r.get(key) is not None]
            entry[impl] = {"median": statistics.median(values) if values else None,
                           "min": min(values) if values else None,
                           "max": max(values) if values else None, "runs": values}
        p, u, s = (entry[i]["median"] for i in ("project", "uvloop", "asyncio"))
        entry["project_vs_uvloop"] = p / u if p is not None and u else None
        entry["project_vs_asyncio"] = p / s if p is not None and s else None
        out[f"{key}@W{workers}"] = entry
    return out


def table(med: dict, a) -> str:
    sizes = {"bytes_per_idle_poll": f"{a.memory_conns:,} polls",
             "broadcast_s": f"{a.broadcast_polls:,} polls"}
    head = ("| figure | W | this project | asyncio peer | uvloop peer | project / uvloop "
            "| project / asyncio | better |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, workers in rows_of(a):
        label, unit, better = FIGURES[key]
        e = med[f"{key}@W{workers}"]
        size = sizes.get(key)
        cells = [f"{label} ({unit}{', ' + size if size else ''})", str(workers)]
        for impl in IMPLS:
            m = e[impl]["median"]
            cells.append("n/a" if m is None else f"{m:,.{digits(key)}f}")
        for ratio in ("project_vs_uvloop", "project_vs_asyncio"):
            x = e[ratio]
            cells.append("n/a" if x is None else f"{x:.2f}" if x >= 0.095 else f"{x:.2g}")
        cells.append(better)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(runs: list) -> list:
    """What makes a run's figures doubtful, one line each."""
    out = []
    for r in runs:
        name = f"round {r['round']} {r['scenario']} W={r['workers']} {r['impl']}"
        if r.get("error"):
            continue
        if r["scenario"] in ("paced", "blast") and (r.get("received") != r.get("sent")
                                                    or r.get("client_exit")):
            out.append(f"{name}: client.py exit {r.get('client_exit')}, sent {r.get('sent')}, "
                       f"received {r.get('received')}, unsendable {r.get('unsendable')}")
        if r.get("guard_cpu_s") and r["guard_cpu_s"] > 0.05 * max(r.get("send_cpu_s") or 0,
                                                                   0.01):
            out.append(f"{name}: {r['guard_cpu_s']} s of server CPU in the guard before the "
                       f"client's exit ({r.get('send_cpu_s')} s in the phase): deliveries "
                       f"ran late, CPU per message is low by up to that much")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="the project against the asyncio and uvloop peers")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median of them)")
    p.add_argument("--quick", action="store_true",
                   help="1 round, small loads: 2,000 polls, 1,000 messages, broadcast to 2,000")
    p.add_argument("--conns", type=int, default=39800, help="polls for paced and blast")
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--send-rate", type=float, default=5000, help="paced messages a second")
    p.add_argument("--memory-conns", type=int, default=19000)
    p.add_argument("--broadcast-polls", type=int, default=100000)
    p.add_argument("--gap", type=float, default=2.0,
                   help="s the client holds its polls after its last paced send")
    p.add_argument("--guard", type=float, default=0.3,
                   help="s before the client's exit where the paced phase's end sample is taken")
    p.add_argument("--only", metavar="SCENARIO[:W],...",
                   help="run only these scenarios, e.g. paced:2,blast (memory, paced, blast, "
                        "broadcast; default all)")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help=f"implementations to run, comma-separated (default {','.join(IMPLS)})")
    p.add_argument("--json", help="default bench/results/bench-<host>.json")
    p.add_argument("--report", metavar="FILE",
                   help="run nothing: the table again from the raw runs in FILE (a --json "
                        "of an earlier run), its medians and notes rewritten")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.conns, a.messages = 1, 2000, 1000
        a.memory_conns, a.broadcast_polls, a.gap, a.guard = 2000, 2000, 0.6, 0.2
    if a.guard >= a.gap:
        p.error("--guard must be shorter than --gap")
    a.impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    if not a.impls or set(a.impls) - set(IMPLS):
        p.error(f"--impls: a comma-separated list of {', '.join(IMPLS)}")
    names = {name for name, _, _ in scenarios(a)}
    wanted = [w.strip() for w in (a.only or "").split(",") if w.strip()]
    for w in wanted:
        name, _, workers = w.partition(":")
        if name not in names or (workers and not workers.isdigit()):
            p.error(f"--only {w!r}: expected SCENARIO or SCENARIO:W, SCENARIO one of "
                    f"{', '.join(sorted(names))}")
    a.only = wanted
    return a


def selected(a, name: str, workers: int) -> bool:
    return not a.only or name in a.only or f"{name}:{workers}" in a.only


def report(path: Path) -> int:
    data = json.loads(path.read_text())
    a = argparse.Namespace(**data["config"])
    runs = data["runs"]
    data["medians"], data["notes"] = medians(runs, a), notes(runs)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"median of {a.rounds} alternating round(s) ({data['elapsed_s']:.0f} s); server CPU "
          f"= manager + workers (utime + stime):")
    print(machine_line(data["machine"]))
    print(table(data["medians"], a))
    for note in data["notes"]:
        print(f"note: {note}")
    draw(data, path)
    return 1 if data["errors"] else 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report:
        return report(Path(a.report))

    def on_term(signum, frame):
        raise Stopped(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    host = socket.gethostname()
    path = Path(a.json) if a.json else ROOT / "bench" / "results" / f"bench-{host}.json"
    m = machine()
    print(machine_line(m))
    print(f"load: {a.rounds} alternating round(s); paced {a.conns:,} polls + {a.messages:,} "
          f"msgs at {a.send_rate:,.0f}/s, blast the same at once; idle memory "
          f"{a.memory_conns:,} polls (W=1); broadcast {a.broadcast_polls:,} polls (W=6); "
          f"loadavg at start {os.getloadavg()[0]:.2f}", flush=True)
    t_start = time.monotonic()
    runs: list = []
    try:
        for r in range(a.rounds):
            for name, workers, fn in scenarios(a):
                if not selected(a, name, workers):
                    continue
                for impl in a.impls:
                    t0 = time.monotonic()
                    run = {"round": r + 1, "scenario": name, "workers": workers, "impl": impl}
                    try:
                        run.update(fn(impl))
                    except (RuntimeError, OSError, TimeoutError, ValueError, KeyError) as e:
                        run["error"] = f"{type(e).__name__}: {e}"
                    run["seconds"] = round(time.monotonic() - t0, 1)
                    runs.append(run)
                    print(f"  round {r + 1} {name:9} W={workers} {impl:8} "
                          f"({run['seconds']:4.1f} s) {progress(run)}", flush=True)
    except (KeyboardInterrupt, Stopped):
        print("interrupted: the table has the rounds done so far", flush=True)
    elapsed = time.monotonic() - t_start
    med = medians(runs, a)
    errors = [r for r in runs if r.get("error")]
    result = {"bench": "suite", "host": host, "machine": m,
              "config": {k: v for k, v in vars(a).items() if k != "json"},
              "elapsed_s": round(elapsed, 1), "loadavg_end": os.getloadavg(),
              "medians": med, "errors": len(errors), "notes": notes(runs), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nmedian of {a.rounds} alternating round(s) ({elapsed:.0f} s, loadavg now "
          f"{os.getloadavg()[0]:.2f}); server CPU = manager + workers (utime + stime):")
    print(machine_line(m))
    print(table(med, a))
    for note in notes(runs):
        print(f"note: {note}")
    if errors:
        print(f"{len(errors)} run(s) failed: see `error` in {path}")
    print(f"results written to {path}")
    draw(result, path)  # after the JSON: without matplotlib, it says so, and that is all
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
