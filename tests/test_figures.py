"""The figures of `make bench` and `make million` (bench/figures.py), drawn from recorded JSON:
each is written, with the expected axes and series; without matplotlib the clear message, and
the benchmarks' last step prints it without failing. No timing.

tests/data/bench-small.json: bench/results/bench-vm.json of a real `make bench` on the
development box, trimmed to rounds 1-2 of memory, paced and broadcast, with what it predates
added: each paced run a latency histogram (client.Histogram JSON, `latency_histogram`) of 2,000
log-normal samples shaped by its recorded p50 and p99, each broadcast run the `reach` curve of
a `suite.py --quick` run of the same implementation (asyncio: uvloop's) scaled to its
broadcast_s. tests/data/million-small.json: million-vm.json (the 1,000,000 run), its series cut
to every 10th point, with `marks` and five flat points after the ramp added.
"""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib  # noqa: F401  (requirements-dev.txt: missing is a failure, never a skip)
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(ROOT / "bench"))

import figures  # noqa: E402
import suite  # noqa: E402

import plots  # noqa: E402

IMPLS = ["project", "asyncio", "uvloop"]


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def svg_text(path) -> str:
    """Every text element of an SVG (written with svg.fonttype none: text stays text)."""
    root = ET.parse(path).getroot()
    return " ".join("".join(t.itertext()) for t in root.iter() if t.tag.endswith("text"))


def legend_labels(legend) -> list:
    return [t.get_text() for t in legend.get_texts()]


def test_bench_figures_are_written_beside_as_svg(tmp_path):
    paths = figures.bench_figures(load("bench-small.json"), tmp_path, stem="bench-x")
    assert paths == [str(tmp_path / f"bench-x-{n}.svg") for n in ("bars", "latency",
                                                                    "broadcast")]
    texts = [svg_text(p) for p in paths]
    assert "CPU per message, paced" in texts[0] and "W=8" in texts[0]
    assert "percentile" in texts[1] and "99.9%" in texts[1]
    assert "s after the POST /broadcast" in texts[2]
    for text in texts:
        for impl in IMPLS:
            assert impl in text


def test_bars_a_panel_per_figure_a_group_per_w_a_bar_per_implementation():
    data = load("bench-small.json")
    fig = figures.bench_bars(data)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [title for _, title, _ in figures.BARS]
    groups = {"bytes_per_idle_poll": ["W=1"], "cpu_per_conn_us": ["W=2", "W=8"],
              "cpu_per_msg_us": ["W=2", "W=8"]}
    for ax, (key, _, ylabel) in zip(axes, figures.BARS, strict=True):
        assert ax.get_ylabel() == ylabel and ax.get_xlabel() == "workers"
        assert [t.get_text() for t in ax.get_xticklabels()] == groups[key]
        bars = [c for c in ax.containers if hasattr(c, "patches")]
        assert [c.get_label() for c in bars] == IMPLS
        for c, impl in zip(bars, IMPLS, strict=True):
            heights = [p.get_height() for p in c.patches]
            assert len(heights) == len(groups[key])
            for h, w in zip(heights, groups[key], strict=True):
                entry = data["medians"][f"{key}@{w.replace('=', '')}"][impl]
                assert h == pytest.approx(entry["median"])
                assert entry["min"] <= h <= entry["max"]
    assert legend_labels(fig.legends[0]) == IMPLS


def test_latency_percentile_curves_one_line_per_implementation_a_panel_per_w():
    data = load("bench-small.json")
    fig = figures.bench_latency(data)
    assert [ax.get_title() for ax in fig.axes] == ["paced, W=2 (2 round(s) merged)",
                                                    "paced, W=8 (2 round(s) merged)"]
    for ax, w in zip(fig.axes, (2, 8), strict=True):
        assert ax.get_xlabel() == "percentile" and "latency (ms" in ax.get_ylabel()
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert [line.get_label() for line in ax.get_lines()] == IMPLS
        assert legend_labels(ax.get_legend()) == IMPLS
        for line, impl in zip(ax.get_lines(), IMPLS, strict=True):
            # the rounds' histograms merged: the curve's top is their largest sample
            top = max(r["latency_histogram"]["max"] for r in data["runs"]
                      if r["scenario"] == "paced" and r["workers"] == w and r["impl"] == impl)
            assert max(line.get_ydata()) == pytest.approx(top / 1000)
            assert line.get_color() == figures.COLOR[impl]


def test_broadcast_the_share_reached_over_time_of_each_median_round():
    data = load("bench-small.json")
    fig = figures.bench_broadcast(data)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "s after the POST /broadcast"
    assert ax.get_ylabel() == "share of the 100,000 polls answered"
    assert [line.get_label() for line in ax.get_lines()] == IMPLS
    for line, impl in zip(ax.get_lines(), IMPLS, strict=True):
        runs = sorted(r["broadcast_s"] for r in data["runs"]
                       if r["scenario"] == "broadcast" and r["impl"] == impl)
        xs, ys = list(line.get_xdata()), list(line.get_ydata())
        assert ys[0] == 0 and ys[-1] == 1.0 and ys == sorted(ys) and xs == sorted(xs)
        assert xs[-1] == pytest.approx(runs[len(runs) // 2], rel=1e-4)


def test_a_run_recorded_before_histograms_and_reach_gets_its_bars_only(tmp_path):
    data = load("bench-small.json")
    for r in data["runs"]:
        r.pop("latency_histogram", None)
        r.pop("reach", None)
    assert figures.bench_latency(data) is None and figures.bench_broadcast(data) is None
    assert figures.bench_figures(data, tmp_path, stem="b") == [str(tmp_path / "b-bars.svg")]


def test_million_figure_connections_above_memory_with_the_marks(tmp_path):
    data = load("million-small.json")
    (path,) = figures.million_figures(data, tmp_path)
    assert path == str(tmp_path / "million-vm.svg")
    text = svg_text(path)
    assert "kernel Slab" in text and "broadcast" in text
    fig = figures.million_figure(data)
    top, low = fig.axes
    series = data["series"]
    lines = {line.get_label(): line for line in top.get_lines()}
    assert list(lines["polls waiting"].get_ydata()) == [p["waiting"] for p in series]
    assert list(lines["connections"].get_ydata()) == [p["connections"] for p in series]
    assert top.get_ylabel() == "connections"
    assert low.get_ylabel() == "MiB" and low.get_xlabel() == "s since the client started"
    labels = [line.get_label() for line in low.get_lines() if not line.get_label()
              .startswith("_")]
    assert labels == ["workers' RSS", "kernel Slab", "TCP buffers (sockstat mem)"]
    assert legend_labels(low.get_legend()) == labels
    slab = low.get_lines()[1].get_ydata()
    assert slab[-1] == pytest.approx(series[-1]["slab_bytes"] / 2**20)
    # all waiting, the messages and the broadcast: a vertical line each on both panels
    marks = {data["open_s"], data["marks"]["messages_t"], data["marks"]["broadcast_t"]}
    for ax in (top, low):
        vertical = {line.get_xdata()[0] for line in ax.get_lines()
                    if line.get_label().startswith("_") and len(set(line.get_xdata())) == 1}
        assert vertical == marks


def test_figures_main_redraws_beside_the_json_and_refuses_what_it_cannot_read(tmp_path):
    for name in ("bench-small.json", "million-small.json"):
        shutil.copy(DATA / name, tmp_path / name)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "figures.py"),
                        str(tmp_path / "million-small.json")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "million-small.svg").stat().st_size > 1000
    assert f"figures written: {tmp_path / 'million-small.svg'}" in r.stdout
    assert figures.main([str(tmp_path / "bench-small.json")]) == 0
    assert (tmp_path / "bench-small-latency.svg").exists()
    (tmp_path / "other.json").write_text('{"bench": "memory"}')
    (tmp_path / "bad.json").write_text("{")
    for arg in ("other.json", "bad.json", "missing.json"):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "figures.py"),
                            str(tmp_path / arg)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.startswith("figures: "), (arg, r.stderr)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "figures.py")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage: python bench/figures.py FILE.json" in r.stderr


# Without matplotlib: `import matplotlib` fails (sys.modules entry None), in a fresh interpreter.
NO_MPL = "import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, 'bench'); "


def run_without_matplotlib(code: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_MPL + code], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_without_matplotlib_the_figures_raise_the_install_line():
    r = run_without_matplotlib(
        "import json, figures, plots\n"
        "for fn, name in ((figures.bench_figures, 'bench-small'),"
        " (figures.million_figures, 'million-small')):\n"
        "    data = json.load(open(f'tests/data/{name}.json'))\n"
        "    try:\n"
        "        fn(data, '/nonexistent')\n"
        "    except plots.PlotUnavailable as e:\n"
        "        print('unavailable:', e)\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("unavailable: ") and plots.INSTALL in line


def test_without_matplotlib_the_benchmarks_last_step_says_so_and_the_run_stands(tmp_path):
    bench = tmp_path / "bench-small.json"
    shutil.copy(DATA / "bench-small.json", bench)
    r = run_without_matplotlib(
        f"import suite; sys.exit(suite.main(['--report', {str(bench)!r}]))")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| figure | W | this project |" in r.stdout
    assert "figures: not drawn: drawing needs matplotlib" in r.stdout
    assert plots.INSTALL in r.stdout
    assert not list(tmp_path.glob("*.svg"))
    # million.py's last step: its run replaced by the recorded result
    out = tmp_path / "million-x.json"
    r = run_without_matplotlib(
        "import json, million\n"
        "million.run = lambda a: json.load(open('tests/data/million-small.json'))\n"
        f"sys.exit(million.main(['--json', {str(out)!r}]))")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(out.read_text())["series"] == load("million-small.json")["series"]
    assert "results written to" in r.stdout and plots.INSTALL in r.stdout
    assert not list(tmp_path.glob("*.svg"))
    # and with matplotlib, the same step draws
    r = subprocess.run([sys.executable, "-c", "import sys, json; sys.path.insert(0, 'bench'); "
                        "import million\n"
                        "million.run = lambda a: json.load(open('tests/data/million-small.json'"
                        "))\n" f"sys.exit(million.main(['--json', {str(out)!r}]))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "million-x.svg").exists()


def test_reach_keeps_the_share_answered_at_each_step():
    times = [i / 1000 for i in range(1, 1001)]  # 1,000 answers, one a ms
    got = dict((q, s) for s, q in suite.reach(times))
    assert set(got) == set(suite.REACH_SHARES)
    assert got[0.0] == 0.001 and got[0.5] == 0.5 and got[0.999] == 0.999 and got[1.0] == 1.0
    assert suite.reach([]) == []


def test_plots_py_dispatches_here_with_its_out_path_and_its_message(tmp_path):
    for name in ("bench-small.json", "million-small.json"):
        shutil.copy(DATA / name, tmp_path / name)
    r = subprocess.run([sys.executable, "plots.py", str(tmp_path / "bench-small.json"), "-o",
                        str(tmp_path / "b.png")], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / f"b-{n}.png")
                                for n in ("bars", "latency", "broadcast")]
    assert (tmp_path / "b-bars.png").read_bytes().startswith(b"\x89PNG")
    r = subprocess.run([sys.executable, "plots.py", str(tmp_path / "million-small.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == [str(tmp_path / "million-small.svg")]
    # no matplotlib to import (a module that fails in its place): the line, no traceback
    (tmp_path / "matplotlib.py").write_text("raise ImportError('not installed')\n")
    r = subprocess.run([sys.executable, "plots.py", str(tmp_path / "bench-small.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("plots.py: drawing needs matplotlib") and plots.INSTALL in r.stderr
