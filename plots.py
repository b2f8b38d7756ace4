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
