"""The figures of `make bench` and `make million`, drawn from their JSON (which holds all the
data behind them), written beside it in bench/results/:

    .venv/bin/python bench/figures.py bench/results/bench-<host>.json     # redraw, no rerun
    .venv/bin/python bench/figures.py bench/results/million-<host>.json

bench (bench/suite.py's JSON), for the implementations it ran (project, asyncio, uvloop):
- <stem>-bars.svg: side-by-side bars of bytes per idle poll, CPU per connection and CPU per
  message (W = 2 and W = 8 groups): the median over the rounds, whiskers from min to max.
- <stem>-latency.svg: the paced runs' delivery latency as percentile curves, one line per
  implementation (its rounds' histograms merged), a panel per W.
- <stem>-broadcast.svg: the share of the polls a broadcast has reached against the time since
  its POST, one line per implementation (its median round).
million (bench/million.py's JSON): <stem>.svg, the connections waiting over time above the
workers' RSS and the kernel's memory (Slab, TCP) over time, the messages and the broadcast
marked.

matplotlib is a dev dependency: without it the functions raise plots.PlotUnavailable (its
message says what to install), and `draw()`, what the benchmarks call after writing their
JSON, prints that message instead of failing the run.
"""

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import plots  # noqa: E402
from plots import PlotUnavailable  # noqa: E402

IMPLS = ("project", "asyncio", "uvloop")  # (bench/suite.py's, in its order)
COLOR = {impl: f"C{k}" for k, impl in enumerate(IMPLS)}  # the same in every figure
# (figure key in the medians, panel title, y label): the bars, one panel each
BARS = (
    ("bytes_per_idle_poll", "memory per idle poll", "bytes (worker RSS growth / polls)"),
    ("cpu_per_conn_us", "CPU per connection", "µs of server CPU"),
    ("cpu_per_msg_us", "CPU per message, paced", "µs of server CPU"),
)
MiB = 2 ** 20
SVG_TEXT = {"svg.fonttype": "none"}  # text stays text in the SVG: smaller, searchable


def _save(plt, fig, path: Path) -> str:
    with plt.rc_context(SVG_TEXT):
        return plots.save(fig, path)


def _impls(data: dict) -> list:
    ran = (data.get("config") or {}).get("impls") or IMPLS
    return [i for i in IMPLS if i in ran]


# ---------------------------------------------------------------------------------------------
# bench/suite.py
# ---------------------------------------------------------------------------------------------


def bench_bars(data: dict):
    """The bars figure: a panel per BARS key, a group per W, a bar per implementation."""
    plt = plots.pyplot()
    impls = _impls(data)
    med = data["medians"]
    fig, axes = plt.subplots(1, len(BARS), figsize=(4.2 * len(BARS), 4.2))
    width = 0.8 / len(impls)
    for ax, (key, title, ylabel) in zip(axes, BARS, strict=True):
        groups = sorted((int(name.rsplit("@W", 1)[1]), entry) for name, entry in med.items()
                        if name.rsplit("@W", 1)[0] == key)
        for k, impl in enumerate(impls):
            xs, ys, lo, hi = [], [], [], []
            for g, (_, entry) in enumerate(groups):
                e = entry.get(impl) or {}
                if e.get("median") is None:
                    continue
                xs.append(g + (k - (len(impls) - 1) / 2) * width)
                ys.append(e["median"])
                lo.append(e["median"] - e["min"])
                hi.append(e["max"] - e["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=impl, color=COLOR[impl])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"W={w}" for w, _ in groups])
        ax.set_xlabel("workers")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    # one legend for the three panels, under them: inside, it would hide a bar
    fig.legend(handles, labels, loc="upper center", ncol=len(impls),
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"{_machine(data)}: median of {data['config'].get('rounds')} round(s), "
                 f"whiskers min-max (lower is better)")
    return fig


def _machine(data: dict) -> str:
    m = data.get("machine") or {}
    cpus = m.get("nproc")
    return f"{data.get('host', '?')}" + (f" ({cpus} CPUs)" if cpus else "")


def _ok(data: dict, scenario: str) -> list:
    return [r for r in data.get("runs", []) if r.get("scenario") == scenario
            and not r.get("error")]


def bench_latency(data: dict):
    """The paced runs' latency percentile curves, a panel per W; None when the JSON has no
    latency histograms (a run recorded before they were kept)."""
    plt = plots.pyplot()
    paced = [r for r in _ok(data, "paced") if r.get("latency_histogram")]
    ws = sorted({r["workers"] for r in paced})
    if not ws:
        return None
    fig, axes = plt.subplots(1, len(ws), figsize=(6 * len(ws), 4.2), squeeze=False)
    for ax, w in zip(axes[0], ws, strict=True):
        curves = {}
        for impl in _impls(data):
            hists = [plots.histogram(r["latency_histogram"]) for r in paced
                     if r["workers"] == w and r["impl"] == impl]
            if hists:
                for h in hists[1:]:
                    hists[0].merge(h)
                curves[impl] = hists[0].to_json()
        rounds = max(1, len({r["round"] for r in paced if r["workers"] == w}))
        plots.draw_percentiles(ax, curves, title=f"paced, W={w} ({rounds} round(s) merged)")
        for line in ax.get_lines():  # each implementation's colour, as in the other figures
            line.set_color(COLOR.get(line.get_label(), line.get_color()))
        if curves:
            ax.legend(loc="upper left")
        # the three's tails differ by orders of magnitude: on a linear scale one hides the rest
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms, log scale)")
    fig.suptitle(f"{_machine(data)}: delivery latency from the intended send time")
    return fig


def bench_broadcast(data: dict):
    """The share of the polls reached against the time since the POST, one line per
    implementation (its median round by broadcast_s); None without `reach` in the runs."""
    plt = plots.pyplot()
    runs = [r for r in _ok(data, "broadcast") if r.get("reach")]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for impl in _impls(data):
        mine = sorted((r for r in runs if r["impl"] == impl), key=lambda r: r["broadcast_s"])
        if not mine:
            continue
        r = mine[len(mine) // 2]
        ax.plot([0] + [s for s, _ in r["reach"]], [0] + [q for _, q in r["reach"]],
                label=impl, color=COLOR[impl])
    polls = statistics.median(r["polls"] for r in runs)
    ax.set_xlabel("s after the POST /broadcast")
    ax.set_ylabel(f"share of the {polls:,.0f} polls answered")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"{_machine(data)}: broadcast, W={runs[0]['workers']} (median round)")
    return fig


def _target(out, stem: str | None, default: str) -> tuple:
    """(folder, stem, suffix): `out` is a folder (the figures named after `stem`, default
    `default`, as SVG) or a figure's path (plots.py's -o: its folder, name and format)."""
    out = Path(out)
    if out.suffix in (".svg", ".png"):
        return out.parent, out.stem, out.suffix
    return out, stem or default, ".svg"


def bench_figures(data: dict, out, stem: str | None = None) -> list:
    """Every bench figure the JSON has the data for, <stem>-bars, -latency and -broadcast in
    the folder `out` (or named after the figure path `out`); their paths."""
    plt = plots.pyplot()
    folder, stem, suffix = _target(out, stem, f"bench-{data.get('host', 'host')}")
    paths = []
    for name, build in (("bars", bench_bars), ("latency", bench_latency),
                        ("broadcast", bench_broadcast)):
        fig = build(data)
        if fig is not None:
            paths.append(_save(plt, fig, folder / f"{stem}-{name}{suffix}"))
    return paths


# ---------------------------------------------------------------------------------------------
# bench/million.py
# ---------------------------------------------------------------------------------------------


def million_figure(data: dict):
    """Connections waiting over time; below, the workers' RSS and the kernel's memory."""
    plt = plots.pyplot()
    series = data["series"]
    ts = [p["t"] for p in series]
    fig, (top, low) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    top.plot(ts, [p["waiting"] for p in series], label="polls waiting", color="C0")
    top.plot(ts, [p["connections"] for p in series], label="connections", color="C1",
             linestyle="--")
    top.axhline(data["target"], color="grey", linewidth=0.8, linestyle=":")
    top.set_ylabel("connections")
    top.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    top.set_title(f"{_machine(data)}: {data['target']:,} polls over {data['workers']} workers")
    low.plot(ts, [p["rss_bytes"] / MiB for p in series], label="workers' RSS", color="C2")
    for key, label, color in (("slab_bytes", "kernel Slab", "C3"),
                              ("tcp_mem_bytes", "TCP buffers (sockstat mem)", "C4")):
        if any(key in p for p in series):
            low.plot(ts, [p.get(key, 0) / MiB for p in series], label=label, color=color)
    low.set_ylabel("MiB")
    low.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    low.set_xlabel("s since the client started")
    marks = dict(data.get("marks") or {})
    if data.get("open_s"):
        marks.setdefault("open_t", data["open_s"])
    names = {"open_t": "all waiting", "messages_t": "messages", "broadcast_t": "broadcast"}
    for key, t in marks.items():
        for ax in (top, low):
            ax.axvline(t, color="black", linewidth=0.8, linestyle="-.")
        top.annotate(names.get(key, key), (t, 1.0), xycoords=("data", "axes fraction"),
                     rotation=90, va="top", ha="right", fontsize=8)
    b = data.get("broadcast") or {}
    if marks.get("broadcast_t") is not None and b.get("time_to_all_s"):
        for ax in (top, low):
            ax.axvspan(marks["broadcast_t"], marks["broadcast_t"] + b["time_to_all_s"],
                       color="grey", alpha=0.2)
    for ax in (top, low):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left")
    return fig


def million_figures(data: dict, out, stem: str | None = None) -> list:
    """<stem>.svg in the folder `out`, or the figure path `out`; [its path]."""
    plt = plots.pyplot()
    folder, stem, suffix = _target(out, stem, f"million-{data.get('host', 'host')}")
    return [_save(plt, million_figure(data), folder / f"{stem}{suffix}")]


# ---------------------------------------------------------------------------------------------
# The benchmarks' last step, and redrawing
# ---------------------------------------------------------------------------------------------


def draw(data: dict, json_path) -> list:
    """The figures of a bench or million JSON beside it; without matplotlib (or with a JSON
    they cannot be drawn from) the reason is printed and nothing else happens."""
    json_path = Path(json_path)
    fn = {"suite": bench_figures, "million": million_figures}.get(data.get("bench"))
    if fn is None:
        print(f"figures: {json_path} is not a bench/suite.py or bench/million.py result")
        return []
    try:
        paths = fn(data, json_path.parent, stem=json_path.stem)
    except PlotUnavailable as e:
        print(f"figures: not drawn: {e}")
        return []
    except (KeyError, TypeError, ValueError, IndexError, OSError) as e:
        print(f"figures: not drawn from {json_path}: {type(e).__name__}: {e}")
        return []
    print(f"figures written: {', '.join(paths)}")
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python bench/figures.py FILE.json (a bench/suite.py or bench/million.py "
              "result; the figures are written beside it)", file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"figures: cannot read {path}: {e}", file=sys.stderr)
        return 1
    if not isinstance(data, dict) or data.get("bench") not in ("suite", "million"):
        print(f"figures: {path} is not a bench/suite.py or bench/million.py result",
              file=sys.stderr)
        return 1
    try:
        plots.pyplot()
    except PlotUnavailable as e:
        print(f"figures: {e}", file=sys.stderr)
        return 1
    return 0 if draw(data, path) else 1


if __name__ == "__main__":
    sys.exit(main())
