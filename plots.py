"""Figures of the runs: what people look at instead of reading the tables.

Drawing is optional: matplotlib is a dev dependency (requirements-dev.txt), never a runtime
one. Every figure is drawn from a run's JSON, which holds all the data behind it, so a figure
can be redrawn without running again:

    python plots.py FILE.json [-o OUT.svg|OUT.png]

Without matplotlib, `pyplot()` raises PlotUnavailable, whose message says what to install;
a run asked to draw (client.py --plot, make bench, make million) says so and still finishes.

Latency is drawn as HdrHistogram's users (and wrk2's) draw it: latency against the percentile
on a log scale of 1 / (1 - q), so 50%, 90%, 99%, 99.9% and 99.99% are evenly spaced and the
tail, not the median, fills the picture.
"""

import math

MATPLOTLIB = "matplotlib==3.11.2"
INSTALL = f"pip install '{MATPLOTLIB}'"
# Percentiles marked on a latency plot's x axis; the curve itself is drawn at many more.
PERCENTILE_TICKS = (0.5, 0.9, 0.99, 0.999, 0.9999)
CURVE_POINTS = 200  # points of a percentile curve, evenly spaced in log(1 / (1 - q))
CURVE_TOP = 0.99999  # the curve stops here: past it, one sample is the whole tail


class PlotUnavailable(RuntimeError):
    """matplotlib is missing: the message says what to install."""


def pyplot():
    """matplotlib.pyplot with a file-only backend (no screen needed), or PlotUnavailable."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(f"drawing needs matplotlib, a dev dependency: {INSTALL} (or "
                              "`make test` installs it into .venv); the run itself is not "
                              "affected, and `python plots.py FILE.json` draws it later "
                              "from its JSON") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def histogram(hist_json: dict):
    """client.py's latency Histogram (µs) from its JSON form."""
    from client import Histogram  # (client.py is the one that records them)
    return Histogram.from_json(hist_json)


def percentile_curve(hist_json: dict) -> tuple[list, list]:
    """(percentiles q, latency in ms at q) for the points of a percentile plot, up to the
    highest percentile the samples can tell apart (1 - 1/count)."""
    h = histogram(hist_json)
    if not h.count:
        return [], []
    top = min(CURVE_TOP, 1 - 1 / (2 * h.count)) if h.count > 1 else 0.5
    hi = math.log10(1 / (1 - top))
    qs = [1 - 10 ** (-hi * k / (CURVE_POINTS - 1)) for k in range(CURVE_POINTS)]
    return qs, [h.percentile(q) / 1000 for q in qs]


def draw_percentiles(ax, curves: dict, title: str = "") -> None:
    """One line per label in `curves` ({label: client.py histogram JSON}) on `ax`: latency
    (ms) against the percentile, x = 1 / (1 - q) on a log scale."""
    for label, hist_json in curves.items():
        qs, ms = percentile_curve(hist_json)
        if qs:
            ax.plot([1 / (1 - q) for q in qs], ms, label=label, drawstyle="steps-post")
    ax.set_xscale("log")
    ticks = [q for q in PERCENTILE_TICKS]
    ax.set_xticks([1 / (1 - q) for q in ticks])
    ax.set_xticklabels([f"{q * 100:g}%" for q in ticks])
    ax.minorticks_off()
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title)
    if len(curves) > 1 or any(curves):
        ax.legend(loc="upper left")


def save(fig, path) -> str:
    """Write the figure (SVG or PNG by the path's suffix) and close it."""
    path = str(path)
    if not path.endswith((".svg", ".png")):
        raise ValueError(f"a figure is written as .svg or .png, not {path!r}")
    fig.savefig(path, bbox_inches="tight", dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# client.py --plot: the ramp, and the delivery latency
# ---------------------------------------------------------------------------------------------

def is_client_summary(data) -> bool:
    return isinstance(data, dict) and "target" in data and "ramp_end" in data


def client_figure(summary: dict, path) -> str:
    """client.py's figure (client_fig) written to `path`."""
    return save(client_fig(summary), path)


def client_fig(summary: dict):
    """client.py's figure from its --json summary: open connections and connects/s over time,
    the stall (where the open count stopped growing) marked with its named cause; below, when
    --send ran, the delivery latency against the percentile."""
    import textwrap
    series = summary.get("series")
    if not series:
        raise ValueError("this client.py summary has no \"series\" (written by a client.py "
                         "before --plot): run it again")
    plt = pyplot()
    hist = summary.get("latency_histogram")
    fig, axes = plt.subplots(2 if hist else 1, 1, figsize=(9, 8.5 if hist else 4.5),
                             squeeze=False)
    ax = axes[0][0]
    target = summary["target"]
    ax.plot(series["t"], series["open"], color="C0", label="open connections")
    ax.plot(series["t"], series["connecting"], color="C0", linestyle="--", linewidth=0.8,
            label="connecting")
    ax.axhline(target, color="gray", linestyle=":", linewidth=0.8, label=f"target {target:,}")
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("connections")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    rate_ax = ax.twinx()
    rate_ax.plot(series["t"], series["connects_per_s"], color="C1", linewidth=0.8,
                 label="connects/s")
    rate_ax.set_ylabel("connects/s (re-polls included)")
    rate_ax.set_ylim(bottom=0)
    stall = summary.get("stall")
    if stall and stall.get("t") is not None:
        ax.axvline(stall["t"], color="C3", linestyle="--", gid="stall")
        right = stall["t"] > max(series["t"]) / 2   # the cause on the side with room
        rate_ax.annotate(textwrap.fill(stall["cause"], 45), (stall["t"], 0.9),  # on top
                         xycoords=rate_ax.get_xaxis_transform(), xytext=(-5 if right else 5, 0),
                         textcoords="offset points", ha="right" if right else "left",
                         va="top", color="C3", fontsize=8, gid="stall-cause",
                         bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    lines = ax.get_lines() + rate_ax.get_lines()
    ax.legend([ln for ln in lines if not ln.get_label().startswith("_")],
              [ln.get_label() for ln in lines if not ln.get_label().startswith("_")],
              loc="lower right", fontsize=8)
    hosts = summary.get("hosts")    # client.py --hosts: several nodes
    where = f"{len(hosts)} nodes" if hosts and len(hosts) > 1 else summary["host"]
    ax.set_title(f"{summary['ids_opened']:,} of {target:,} ids to {where} "
                 f"({summary['workers']} workers, {summary['procs']} client "
                 f"process{'es' if summary['procs'] > 1 else ''}), "
                 f"ramp {summary['ramp_end'] or 'unfinished'}", fontsize=10)
    if hist:
        rate = summary.get("send_rate")
        label = f"{hist['count']:,} messages" + (f" at {rate:g}/s" if rate else " at once")
        draw_percentiles(axes[1][0], {label: hist},
                         "delivery latency, from the intended send time")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# python plots.py FILE.json: redraw a run's figures from its JSON
# ---------------------------------------------------------------------------------------------

def figures(data: dict, out: str) -> list:
    """Draw what the JSON is the record of; the paths written. `out` is the figure's path
    (for the bench's several figures, the one they are named after)."""
    kind = data.get("bench") if isinstance(data, dict) else None
    if kind in ("suite", "million"):
        try:
            from bench import figures as bench_figures
        except ModuleNotFoundError as e:
            if e.name not in ("bench", "bench.figures"):
                raise
            raise ValueError(f"a {kind!r} bench result is drawn by bench/figures.py, which "
                             f"is not here (run from the repository root)") from None
        draw = bench_figures.bench_figures if kind == "suite" else bench_figures.million_figures
        return list(draw(data, out) or [])
    if is_client_summary(data):
        return [client_figure(data, out)]
    raise ValueError("not a run this draws: expected client.py's --json summary, or make "
                     "bench's / make million's JSON (\"bench\": \"suite\" or \"million\")")


def main(argv: list | None = None) -> int:
    import argparse
    import json
    import sys
    p = argparse.ArgumentParser(prog="plots.py", description="Redraw a run's figures from its "
                                "JSON (client.py --json, make bench, make million).")
    p.add_argument("json", metavar="FILE.json")
    p.add_argument("-o", "--out", metavar="OUT.svg|OUT.png",
                   help="the figure to write (default: FILE.svg beside FILE.json)")
    args = p.parse_args(argv)
    out = args.out or (args.json[:-5] if args.json.endswith(".json") else args.json) + ".svg"
    if not out.endswith((".svg", ".png")):
        p.error(f"-o: a figure is written as .svg or .png, not {out!r}")
    try:
        with open(args.json) as f:
            data = json.load(f)
        for path in figures(data, out):
            print(path)
    except OSError as e:
        print(f"plots.py: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except ValueError as e:     # json.JSONDecodeError is one
        print(f"plots.py: {args.json}: {e}", file=sys.stderr)
        return 1
    except (KeyError, TypeError) as e:
        print(f"plots.py: {args.json}: not a whole record of a run ({e!r})", file=sys.stderr)
        return 1
    except PlotUnavailable as e:
        print(f"plots.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # As the module `plots`, not `__main__`: bench/figures.py imports plots, and a second copy's
    # PlotUnavailable would not be the class main() catches.
    import plots
    raise SystemExit(plots.main())
