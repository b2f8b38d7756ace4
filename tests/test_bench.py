"""Smoke tests of `make bench` (bench/suite.py --quick), `make bench-micro` (bench/micro.py),
`make million` (bench/million.py with a small target) and `make bench-nodes` (bench/nodes.py
--quick, on a real redis-server): they run to the end and report every figure. No timing is
asserted: the figures are the benchmark's business, and this box is shared."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import pyperf  # noqa: E402,F401  (requirements-dev.txt: missing is a failure, never a skip)
import suite  # noqa: E402
import uvloop  # noqa: E402,F401  (the peer's fast loop)

IMPLS = ("project", "asyncio", "uvloop")
ROWS = ("bytes_per_idle_poll@W1", "cpu_per_conn_us@W2", "cpu_per_conn_us@W8",
        "cpu_per_msg_us@W2", "cpu_per_msg_us@W8", "p50_ms@W2", "p50_ms@W8", "p99_ms@W2",
        "p99_ms@W8", "blast_msgs_per_s@W2", "blast_msgs_per_s@W8", "broadcast_s@W6")


@pytest.mark.timeout(200)
def test_suite_quick_reports_every_figure_for_every_implementation(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--quick",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=190)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["errors"] == 0
    assert len(data["runs"]) == 6 * len(IMPLS)  # 6 scenarios, one round
    assert set(data["medians"]) == set(ROWS)
    for row in ROWS:
        entry = data["medians"][row]
        for impl in IMPLS:
            assert entry[impl]["median"] is not None, (row, impl)
            assert entry[impl]["median"] >= 0, (row, impl)
        project = entry["project"]["median"]
        for peer in ("uvloop", "asyncio"):
            # CPU time comes in 10 ms ticks: a quick run's small load may measure 0, and a
            # ratio to 0 is None, not a division error.
            below = entry[peer]["median"]
            expected = pytest.approx(project / below) if below else None
            assert entry[f"project_vs_{peer}"] == expected, (row, peer)
    for run in data["runs"]:
        if run["scenario"] in ("paced", "blast"):
            assert run["received"] == run["sent"] == 1000, run
        if run["scenario"] == "broadcast":  # the figure's data: every answer's time, in shares
            times = [t for t, _ in run["reach"]]
            assert [q for _, q in run["reach"]] == sorted(set(suite.REACH_SHARES))
            assert times == sorted(times) and times[0] >= 0
            assert times[-1] == pytest.approx(run["broadcast_s"], abs=1e-5)
        if run["scenario"] == "paced":  # the latency figure's data
            assert run["latency_histogram"]["count"] == run["received"], run
    for name in ("bars", "latency", "broadcast"):
        assert (tmp_path / f"bench-{name}.svg").stat().st_size > 1000, name
    assert "figures written: " in r.stdout
    assert r.stdout.startswith("machine: ")
    assert "| figure | W | this project | asyncio peer | uvloop peer |" in r.stdout
    assert "project / uvloop" in r.stdout
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--report",
                            str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(ROWS)
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == table


@pytest.mark.timeout(120)
def test_micro_runs_every_benchmark():
    from micro import BENCHMARKS

    r = subprocess.run([sys.executable, str(ROOT / "bench" / "micro.py"),
                        "--debug-single-value", "--quiet"], cwd=ROOT, capture_output=True,
                       text=True, timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name, _ in BENCHMARKS:
        assert f"{name}:" in r.stdout, name


@pytest.mark.timeout(120)
def test_million_with_a_small_target_reports_every_figure(tmp_path):
    out = tmp_path / "million.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "million.py"), "--target", "3000",
                        "--messages", "300", "--json", str(out), "--log",
                        str(tmp_path / "log")], cwd=ROOT, capture_output=True, text=True,
                       timeout=110)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["waiting"] == 3000 and data["open_s"] > 0 and data["bytes_per_conn"] > 0
    assert data["server_cpu_open_user_s"] + data["server_cpu_open_sys_s"] == \
        pytest.approx(data["server_cpu_open_s"], abs=0.02)
    assert data["client_cpu_open_s"] > 0  # client.py and its children, by session
    assert data["client_cpu_open_user_s"] + data["client_cpu_open_sys_s"] == \
        pytest.approx(data["client_cpu_open_s"], abs=0.02)
    assert data["series"] and data["kernel_full"]["tcp_inuse"] >= 3000
    c = data["client"]
    assert (c["sent"], c["received"], c["lost"]) == (300, 300, 0)
    assert c["latency_ms"]["count"] == 300
    b = data["broadcast"]
    assert b["status"] == 202 and b["written"] == b["waiting"] == 3000 and b["time_to_all_s"]
    assert "time to open" in out.with_suffix(".txt").read_text()
    assert "client CPU" in out.with_suffix(".txt").read_text()
    # the workers' unanswered closes by cause: none in a run this small
    assert data["server_closed"]["header_timeout"] == 0 and "reset" in data["server_closed"]
    assert "closed         unanswered, by the workers' cause: none" in \
        out.with_suffix(".txt").read_text()
    # the figure's data: sampled past the ramp, the messages and the broadcast marked
    assert data["series"][-1]["t"] > data["marks"]["broadcast_t"] > data["marks"]["messages_t"]
    assert all("slab_bytes" in p and "rss_bytes" in p for p in data["series"])
    assert (tmp_path / "million.svg").stat().st_size > 1000


def test_million_takes_the_idle_rss_once_it_stops_growing():
    """The baseline of bytes per connection: 51 workers still importing when the client
    starts made a million connections look like 421 B each instead of ~120."""
    saved = sys.path[:]
    try:
        import million
    finally:
        sys.path[:] = saved  # (million puts bench/ first: `import nodes` would find its nodes.py)
    readings = iter([883, 950, 1100, 1115, 1116, 1300])
    assert million.settled(lambda: next(readings), every=0) == 1116
    growing = iter(range(100, 10**6, 50))
    assert million.settled(lambda: next(growing), every=0.01, limit=0.3) > 100  # bounded


def test_million_table_says_when_the_repoll_storm_did_not_settle():
    saved = sys.path[:]
    try:
        import million
    finally:
        sys.path[:] = saved
    b = {"written": 10, "waiting": 10, "time_to_all_s": 1.5, "server_cpu_s": 1.0,
         "repolled_99pct_s": None}
    r = {"target": 10, "workers": 1, "broadcast": b}
    assert "not 99% polling again before the run stopped waiting" in million.table(r)
    b["repolled_99pct_s"] = 145.2
    assert "99% polling again after 145.2 s" in million.table(r)


def test_hotpath_measures_both_paths_in_process(tmp_path):
    """make bench-hotpath, small: one run of each path, a CPU figure for each, with the
    caches written over before each call (--evict)."""
    out = tmp_path / "hotpath.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "hotpath.py"), "--polls", "200",
                        "--runs", "1", "--evict", "1", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["evict_mb"] == 1
    assert len(data["accept_us"]) == len(data["message_us"]) == 1
    assert data["accept_us"][0] > 0 and data["message_us"][0] > 0
    assert "read_link() of one message" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "hotpath.py"), "--root",
                        str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no server.py there" in r.stderr


@pytest.mark.timeout(120)
def test_bench_nodes_quick_reports_every_figure(tmp_path):
    """make bench-nodes: one node against three on Redis, paced and blast, every message
    received, CPU split per node and Redis."""
    out = tmp_path / "nodes.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "nodes.py"), "--quick", "--json",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["errors"] == 0
    assert [(x["kind"], x["mode"]) for x in data["runs"]] == [
        ("one", "paced"), ("three", "paced"), ("one", "blast"), ("three", "blast")]
    for run in data["runs"]:
        assert run["received"] == run["sent"] == 1000, run
        assert run["msgs_per_s"] > 0 and run["cpu_per_msg_us"] is not None, run
        if run["kind"] == "three":
            assert set(run["cpu_s"]) == {"node0", "node1", "node2", "redis"}
            assert sum(run["stream_read"]) == 1000, run  # every message read back once
            assert run["node0_us_per_msg"] is not None and len(run["node_us_per_read"]) == 2
    assert "three/one" in r.stdout
