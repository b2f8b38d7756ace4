"""make bench-nodes: messages through Redis to three nodes against one node's app port alone,
in one run (issue 11).

    .venv/bin/python bench/nodes.py [--rounds 3] [--workers 1] [--conns 6000]
                                    [--messages 10000] [--send-rate 2000] [--quick] [--json F]

Each round, alternating:
- `one`: manager.py --workers W alone (no Redis); `client.py a 127.0.0.1 --conns C --send M
  --send-rate R` publishes binary frames on its app port to the waiting ids.
- `three`: a redis-server (no persistence) and three nodes (`--redis --node k/3 --nodes ...`,
  W workers each) on 127.0.0.1, ports of their own; the same client with `--hosts` spreads the
  ids over the nodes by the slot function and publishes on node 0's app port: each message is
  an XADD to its owner's stream, read back by that node (XREAD) and routed to its worker.
Both paced (R a second) and blast (every message at once). Figures: messages/s received (the
client's msgs_per_s: received / time from the first intended send to the last receipt),
p50/p99 from each message's intended send time (paced), and server CPU per message over the
send phase (suite.py's window: from the client's app connections opening to just before they
close), split per node and Redis: what each node spends per message it reads (its stream_read),
and node 0's extra as the publisher. Writes bench/results/nodes-<host>.json and a table with
the ratios three / one (goal: paced throughput >= 80 % of one node's at p99 <= 5 ms).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CLK_TCK, ROOT, free_port_block, http_json, machine, machine_line  # noqa: E402
from suite import Sampler, Stopped, client_fields, client_procs, run_client, send_window  # noqa: E402

NODES = 3


class Setup:
    """`one` (a manager alone) or `three` (redis-server + three nodes), stopped by close()."""

    def __init__(self, kind: str, workers: int):
        self.kind, self.workers = kind, workers
        self.procs: list = []  # (name, Popen)
        self.logs: list = []
        self.redis = None
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        W = self.workers
        n = 1 if self.kind == "one" else NODES
        block = free_port_block(n * (W + 1) + 1)
        self.bases = [block + k * (W + 1) for k in range(n)]
        extra = [[] for _ in range(n)]
        if self.kind == "three":
            exe = shutil.which("redis-server") or "/usr/bin/redis-server"
            if not os.path.exists(exe):
                raise RuntimeError("redis-server is missing: apt-get install -y redis-server")
            port = block + n * (W + 1)
            self.redis = subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            self.wait_port(port)
            hosts = ",".join(f"127.0.0.1:{b}" for b in self.bases)
            for k in range(n):
                extra[k] = ["--redis", f"redis://127.0.0.1:{port}/0", "--node", f"{k}/{n}",
                            "--nodes", hosts]
        for k in range(n):
            log = tempfile.TemporaryFile()
            self.logs.append(log)
            cmd = [sys.executable, str(ROOT / "manager.py"), "--status-interval", "0",
                   "--host", "127.0.0.1", "--workers", str(W), "--base-port",
                   str(self.bases[k]), "--app-port", str(self.bases[k] + W), *extra[k]]
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                                               stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL,
                                               start_new_session=True))
        self.pids = []  # per node: [manager, workers...]
        for k in range(n):
            self.pids.append(self.wait_node(k))

    def wait_port(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nothing listens on {port}")

    def wait_node(self, k: int, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[k].poll() is not None:
                self.logs[k].seek(0)
                raise RuntimeError(f"node {k} exited: {self.logs[k].read()[-1000:]!r}")
            try:
                s = self.stats(k)
                rows = s["workers"]
                if len(rows) == self.workers and all(r.get("up") for r in rows) and \
                        s.get("redis", "up") == "up":
                    for w in range(self.workers):
                        http_json(self.bases[k] + w, "/_info", timeout=2.0)
                    return [self.procs[k].pid] + [r["pid"] for r in rows]
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"node {k} did not come up")

    def stats(self, k: int) -> dict:
        return http_json(self.bases[k] + self.workers, "/stats", timeout=10)

    def client_args(self) -> list:
        args = ["--base-port", str(self.bases[0]), "--app-port", str(self.bases[0] + self.workers)]
        if self.kind == "three":
            args += ["--hosts", ",".join(f"127.0.0.1:{b}" for b in self.bases)]
        return args

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=8)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait(5)
        for log in self.logs:
            log.close()


class GroupSampler(Sampler):
    """suite.Sampler's timeline (the send window is found by node 0's manager fds), with the
    CPU split per group (node k, redis): samples (t, CPU s of all, fds, {group: CPU s})."""

    def __init__(self, groups: dict, fd_pid: int):
        self.groups = {g: [os.open(f"/proc/{p}/stat", os.O_RDONLY) for p in pids]
                       for g, pids in groups.items()}
        super().__init__([], fd_pid)
        self.stat_fds = [fd for fds in self.groups.values() for fd in fds]  # (closed by close)

    def sample(self) -> tuple:
        cpu = {}
        for g, fds in self.groups.items():
            total = 0
            for fd in fds:
                fields = os.pread(fd, 2048, 0).rsplit(b")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            cpu[g] = total / CLK_TCK
        return time.monotonic(), sum(cpu.values()), len(os.listdir(self.fd_dir)), cpu


def measure(kind: str, mode: str, a) -> dict:
    setup = Setup(kind, a.workers)
    try:
        groups = {f"node{k}": pids for k, pids in enumerate(setup.pids)}
        if setup.redis is not None:
            groups["redis"] = [setup.redis.pid]
        read0 = [setup.stats(k)["manager"].get("stream_read", 0) for k in range(len(setup.pids))]
        time.sleep(0.5)  # the /stats connections closed: the window counts the client's fds
        procs = client_procs(a.conns)
        rate = a.send_rate if mode == "paced" else 0
        hold = a.messages / a.send_rate + a.gap
        sampler = GroupSampler(groups, setup.pids[0][0])
        c = run_client(setup, ["--conns", str(a.conns), "--rate", "20000", "--send",
                               str(a.messages), "--send-rate", f"{rate:g}", "--hold",
                               f"{hold:.2f}", "--procs", str(procs)], 120 + hold, sampler)
        w = send_window(sampler.samples, procs, a.guard)
        received = c.get("received") or 0
        reads = [setup.stats(k)["manager"].get("stream_read", 0) - read0[k]
                 for k in range(len(setup.pids))]
        per_group = {g: round(w["end"][3][g] - w["start"][3][g], 3) for g in groups}
        lat = c.get("latency_ms") or {}
        run = {"msgs_per_s": c.get("msgs_per_s") if received else None,
               "p50_ms": lat.get("p50") if received else None,
               "p99_ms": lat.get("p99") if received else None,
               "cpu_per_msg_us": (w["end"][1] - w["start"][1]) / received * 1e6
               if received else None,
               "cpu_s": per_group, "stream_read": reads, "send_phase_s": w["phase_s"],
               **client_fields(c)}
        if kind == "three" and received:
            # What a node spends per entry it reads; node 0 also publishes every message.
            run["node_us_per_read"] = [round(per_group[f"node{k}"] / reads[k] * 1e6, 1)
                                       if reads[k] else None for k in range(1, NODES)]
            run["node0_us_per_msg"] = round(per_group["node0"] / received * 1e6, 1)
            run["redis_us_per_msg"] = round(per_group["redis"] / received * 1e6, 1)
        return run
    finally:
        setup.close()


FIGURES = (("msgs_per_s", "paced", "msgs/s received, paced", 0),
           ("p50_ms", "paced", "p50 ms, paced", 2), ("p99_ms", "paced", "p99 ms, paced", 2),
           ("cpu_per_msg_us", "paced", "server CPU µs/msg, paced", 1),
           ("msgs_per_s", "blast", "msgs/s received, blast", 0),
           ("cpu_per_msg_us", "blast", "server CPU µs/msg, blast", 1))


def median_of(runs: list, kind: str, mode: str, key: str):
    vals = [r[key] for r in runs if r["kind"] == kind and r["mode"] == mode
            and r.get(key) is not None and not r.get("error")]
    return statistics.median(vals) if vals else None


def fmt(v, dig: int) -> str:
    return "-" if v is None else f"{v:,.{dig}f}"


def table(runs: list) -> str:
    lines = [f"| {'figure':30} | {'one node':>10} | {'three nodes':>11} | {'three/one':>9} |",
             "| --- | --- | --- | --- |"]
    for key, mode, label, dig in FIGURES:
        one, three = (median_of(runs, k, mode, key) for k in ("one", "three"))
        ratio = f"{three / one:.2f}" if one and three is not None else "-"
        lines.append(f"| {label:30} | {fmt(one, dig):>10} | {fmt(three, dig):>11} | "
                     f"{ratio:>9} |")
    for key, label in (("node_us_per_read", "µs per entry read, nodes 1-2"),
                       ("node0_us_per_msg", "node 0 µs per msg (publishes all)"),
                       ("redis_us_per_msg", "redis-server µs per msg")):
        for mode in ("paced", "blast"):
            vals = [r[key] for r in runs if r["kind"] == "three" and r["mode"] == mode
                    and r.get(key) is not None]
            if vals:
                flat = [v for x in vals for v in (x if isinstance(x, list) else [x])
                        if v is not None]
                lines.append(f"| {label + ', ' + mode:30} | {'':>10} | "
                             f"{statistics.median(flat):>11,.1f} | {'':>9} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="three nodes on Redis against one node alone")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="workers per node (default 1)")
    p.add_argument("--conns", type=int, default=6000, help="waiting polls")
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--send-rate", type=float, default=2000, help="paced messages a second")
    p.add_argument("--gap", type=float, default=2.0)
    p.add_argument("--guard", type=float, default=0.3)
    p.add_argument("--quick", action="store_true", help="1 round, 600 polls, 1,000 messages")
    p.add_argument("--json", help="default bench/results/nodes-<host>.json")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.conns, a.messages, a.gap, a.guard = 1, 600, 1000, 0.6, 0.2
    return a


def main(argv=None) -> int:
    a = parse_args(argv)

    def on_term(signum, frame):
        raise Stopped(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    host = socket.gethostname()
    path = Path(a.json) if a.json else ROOT / "bench" / "results" / f"nodes-{host}.json"
    m = machine()
    print(machine_line(m))
    print(f"load: {a.rounds} alternating round(s); {a.conns:,} polls, {a.messages:,} messages "
          f"paced at {a.send_rate:,.0f}/s and at once; W = {a.workers} per node", flush=True)
    runs, t0 = [], time.monotonic()
    try:
        for r in range(a.rounds):
            for mode in ("paced", "blast"):
                for kind in ("one", "three"):
                    t = time.monotonic()
                    run = {"round": r + 1, "kind": kind, "mode": mode}
                    try:
                        run.update(measure(kind, mode, a))
                    except (RuntimeError, OSError, ValueError, KeyError) as e:
                        run["error"] = f"{type(e).__name__}: {e}"
                    run["seconds"] = round(time.monotonic() - t, 1)
                    runs.append(run)
                    print(f"  round {r + 1} {mode:5} {kind:5} ({run['seconds']:5.1f} s) " + (
                        run["error"] if run.get("error") else
                        f"{run['msgs_per_s'] or 0:,.0f} msgs/s, p50 {run['p50_ms']} ms, "
                        f"p99 {run['p99_ms']} ms, received {run['received']}/{run['sent']}, "
                        f"CPU s {run['cpu_s']}"), flush=True)
    except (KeyboardInterrupt, Stopped):
        print("interrupted: the table has the rounds done so far")
    errors = sum(1 for r in runs if r.get("error") or r.get("received") != r.get("sent"))
    result = {"bench": "nodes", "host": host, "machine": m, "config": vars(a),
              "elapsed_s": round(time.monotonic() - t0, 1), "errors": errors, "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nmedian of {a.rounds} alternating round(s), server CPU = managers + workers + "
          "redis-server (utime + stime):")
    print(machine_line(m))
    print(table(runs))
    print(f"results written to {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
