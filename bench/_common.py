"""Shared by bench/memory.py and bench/cpu.py: start the servers under test on free ports,
read their RSS and CPU time from /proc, drive the load processes (bench/_load.py), and
describe the machine. Everything started here is stopped by `close()`, which the benchmarks
call in `finally`."""

import json
import os
import platform
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
IMPLS = ("project", "asyncio", "uvloop")
# On a box with 2+ CPUs the server under test gets the first CPU of our affinity mask (the
# manager pins worker 0 there too) and the load side the others, so that neither steals the
# other's CPU and loopback softirq work lands on the side that caused it.
_MASK = sorted(os.sched_getaffinity(0))
SERVER_CPUS = {_MASK[0]}
LOAD_CPUS = set(_MASK[1:]) or SERVER_CPUS


def ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(n: int) -> int:
    """A base port with n consecutive free ports after it. Drawn below the box's ephemeral
    range (32768+ by default, 10240+ after tuning/apply.sh), so that no outgoing connection
    of this box (the load's own) can take it between check and use."""
    rng = random.Random()
    low = ephemeral_low()
    lo, hi = (10000, min(32000, low)) if low >= 12000 else (1100, low)
    if hi - n <= lo + 100:  # an odd range: the old draw, and the retries below
        lo, hi = 10000, 32000
    for _ in range(500):
        base = rng.randrange(lo, hi - n)
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free port block")


# ---------------------------------------------------------------------------------------------
# /proc
# ---------------------------------------------------------------------------------------------


def rss(pid: int) -> int:
    """Resident set size in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (clock ticks, 1/CLK_TCK resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def listen_overflows() -> int:
    """TcpExt ListenOverflows: handshakes the kernel dropped because an accept queue was
    full (system-wide; the client retransmits, so they cost time, not connections)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            d = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
            return d.get("ListenOverflows", 0)
    return 0


def wait_idle(pids, quiet: float = 0.3, timeout: float = 10.0) -> None:
    """Until none of `pids` has used a CPU tick for `quiet` seconds (or `timeout`)."""
    deadline = time.monotonic() + timeout
    last = [cpu_seconds(p) for p in pids]
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = [cpu_seconds(p) for p in pids]
        if now == last:
            return
        last = now


# ---------------------------------------------------------------------------------------------
# The servers under test
# ---------------------------------------------------------------------------------------------


def http_request(port: int, raw: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send one raw request to 127.0.0.1:port; (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                head = data[:end].decode("latin-1").lower()
                length = int(head.split("content-length:")[1].split("\r\n")[0])
                if len(data) >= end + 4 + length:
                    return int(head.split()[1]), data[end + 4:end + 4 + length]
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"closed early: {data[:200]!r}")
            data += chunk


def http_json(port: int, path: str, timeout: float = 5.0) -> dict:
    status, body = http_request(
        port, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode(), timeout)
    return json.loads(body)


class Server:
    """One server under test: `project` (manager.py --workers 1), `asyncio` or `uvloop`
    (bench/asyncio_worker.py, bench/uvloop_worker.py)."""

    def __init__(self, impl: str):
        self.impl = impl
        self.port = free_port_block(2)
        self.app_port = self.port + 1
        self.log = tempfile.TemporaryFile()
        if impl == "project":
            cmd = [sys.executable, str(ROOT / "manager.py"), "--workers", "1",
                   "--host", "127.0.0.1", "--status-interval", "0",
                   "--base-port", str(self.port), "--app-port", str(self.app_port)]
        else:
            cmd = [sys.executable, str(BENCH / f"{impl}_worker.py"), "--host", "127.0.0.1",
                   "--port", str(self.port), "--app-port", str(self.app_port)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.worker_pid = self.manager_pid = None
        self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.impl} server exited: {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                s = self.stats()
            except (OSError, ValueError):
                time.sleep(0.1)
                continue
            if self.impl == "project":
                w = s["workers"][0]
                if not w.get("up") or not w.get("pid"):
                    time.sleep(0.1)
                    continue
                self.worker_pid = w["pid"]
                self.manager_pid = s["manager"]["pid"]
            else:
                self.worker_pid = s["pid"]
            for pid in self.pids:
                os.sched_setaffinity(pid, SERVER_CPUS)
            return
        raise RuntimeError(f"{self.impl} server did not come up: {self.output()}")

    @property
    def pids(self) -> list:
        return [p for p in (self.worker_pid, self.manager_pid) if p]

    def stats(self) -> dict:
        return http_json(self.app_port, "/stats")

    def waiting(self) -> int:
        s = self.stats()
        return s["totals"]["waiting"] if self.impl == "project" else s["waiting"]

    def waiting_streams(self) -> tuple:
        """(totals.waiting, totals.streams) from the app port's /stats (project only)."""
        t = self.stats()["totals"]
        return t["waiting"], t["streams"]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        # A worker that outlived its manager would be a leak: make sure it is gone.
        if self.worker_pid and self.worker_pid != self.proc.pid:
            try:
                os.kill(self.worker_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


# ---------------------------------------------------------------------------------------------
# The load side
# ---------------------------------------------------------------------------------------------


class LoadGroup:
    """`conns` long-poll connections (suffix "js") or SSE streams (suffix "sse") spread over
    `procs` bench/_load.py processes (the open-file limit is per process), each from its own
    source address 127.0.0.<2+k>. With `workers` W > 1, `port` is worker 0's and each id goes
    to its owner's port. `pin`: the load on LOAD_CPUS, away from the server's first CPU."""

    def __init__(self, port: int, conns: int, prefix: str = "u", procs: int = 2,
                 source_base: int = 2, rate: float = 0, suffix: str = "js",
                 workers: int = 1, pin: bool = True):
        self.procs = []
        share = -(-conns // procs)
        for k in range(procs):
            start, count = k * share, min(share, conns - k * share)
            if count <= 0:
                break
            cmd = [sys.executable, str(BENCH / "_load.py"), "--port", str(port),
                   "--prefix", prefix, "--suffix", suffix,
                   "--start", str(start), "--count", str(count),
                   "--source-ip", f"127.0.0.{source_base + k}", "--rate", str(rate / procs),
                   "--workers", str(workers)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            if pin:
                os.sched_setaffinity(proc.pid, LOAD_CPUS)
            self.procs.append(proc)

    def _line(self, proc, timeout: float) -> dict:
        r, _, _ = select.select([proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError("load process did not answer")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load process exited ({proc.poll()})")
        return json.loads(line)

    def wait_open(self, timeout: float = 90.0) -> dict:
        """Every connect finished; returns the summed counters."""
        deadline = time.monotonic() + timeout
        return self._sum([self._line(p, max(0.1, deadline - time.monotonic()))
                          for p in self.procs])

    def stats(self) -> dict:
        for p in self.procs:
            p.stdin.write(b"stats\n")
            p.stdin.flush()
        return self._sum([self._line(p, 10.0) for p in self.procs])

    def answer_times(self, t0: float) -> list:
        """Every answer's arrival, s after `t0` (CLOCK_MONOTONIC), all processes, sorted."""
        for p in self.procs:
            p.stdin.write(b"times %r\n" % t0)
            p.stdin.flush()
        return sorted(us / 1e6 for p in self.procs for us in self._line(p, 10.0)["us"])

    @staticmethod
    def _sum(parts: list) -> dict:
        total = {k: sum(p[k] for p in parts)
                 for k in ("ok", "failed", "s200", "other", "eof", "bytes")}
        errors: dict = {}
        for p in parts:
            for k, v in p["errors"].items():
                errors[k] = errors.get(k, 0) + v
        total["errors"] = errors
        total["last_answer_t"] = max(p.get("last_answer_t", 0.0) for p in parts)
        return total

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.stdin.write(b"quit\n")
                    p.stdin.flush()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
            p.stdin.close()
            p.stdout.close()


def wait_waiting(server: Server, n: int, timeout: float = 60.0) -> int:
    """Until the server reports n waiting connections; returns the last count seen."""
    deadline = time.monotonic() + timeout
    got = -1
    while time.monotonic() < deadline:
        got = server.waiting()
        if got >= n:
            return got
        time.sleep(0.2)
    return got


def wait_streams(server: Server, n: int, timeout: float = 60.0) -> tuple:
    """Until the project's /stats totals say n waiting and n of them streams; returns the
    last (waiting, streams) seen."""
    deadline = time.monotonic() + timeout
    got = (-1, -1)
    while time.monotonic() < deadline:
        got = server.waiting_streams()
        if got[0] >= n and got[1] >= n:
            return got
        time.sleep(0.2)
    return got


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "cpu": model, "mem_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "kernel": platform.release()}


def summary(values: list) -> dict:
    """Median and spread (min, max, and max-min relative to the median) of one figure."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread_pct": (max(values) - min(values)) / med * 100 if med else 0.0,
            "runs": values}


def machine_line(m: dict) -> str:
    return (f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB, "
            f"{m['implementation']} {m['python']}, Linux {m['kernel']}")
