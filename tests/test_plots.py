"""client.py --plot and plots.py: figures drawn from recorded summaries (tests/data/, written by
client.py --json against a manager: client-send.json with --conns 200 --send 50, a complete
ramp; client-stall.json with --workers 4 against 2, half the ids refused, a stalled ramp), then
client.py --plot end to end, without matplotlib, and with a bad file name. No timings."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

import client
import plots

DATA = ROOT / "tests" / "data"
CLIENT = [sys.executable, str(ROOT / "client.py")]
TICKS = ["50%", "90%", "99%", "99.9%", "99.99%"]


def summary(name: str) -> dict:
    return json.loads((DATA / f"client-{name}.json").read_text())


def labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def stall_marks(fig) -> list:
    return fig.findobj(lambda a: a.get_gid() in ("stall", "stall-cause"))


def test_the_ramp_and_the_latency_percentiles():
    s = summary("send")
    fig = plots.client_fig(s)
    ramp, latency, rate = fig.axes     # the twin axis (connects/s) is added last
    assert ramp.get_xlabel() == "seconds since the start" and ramp.get_ylabel() == "connections"
    assert labels(ramp) == ["open connections", "connecting", "target 200"]
    assert list(ramp.get_lines()[0].get_ydata()) == s["series"]["open"]
    assert list(ramp.get_lines()[0].get_xdata()) == s["series"]["t"]
    assert labels(rate) == ["connects/s"] and rate.get_ylabel().startswith("connects/s")
    assert list(rate.get_lines()[0].get_ydata()) == s["series"]["connects_per_s"]
    assert latency.get_xscale() == "log" and latency.get_xlabel() == "percentile"
    assert latency.get_ylabel() == "latency (ms)"
    assert [t.get_text() for t in latency.get_xticklabels()] == TICKS
    assert labels(latency) == ["50 messages at 100/s"]
    ms = latency.get_lines()[0].get_ydata()
    assert list(ms) == sorted(ms) and ms[-1] == s["latency_ms"]["max"]
    assert stall_marks(fig) == []   # the ramp completed: nothing to mark


def test_a_stall_is_marked_with_its_cause():
    s = summary("stall")
    assert s["stall"] and s["latency_histogram"] is None
    fig = plots.client_fig(s)
    assert len(fig.axes) == 2           # no --send: the ramp alone (and its twin axis)
    ramp, rate = fig.axes
    line = [a for a in stall_marks(fig) if a.get_gid() == "stall"]
    text = [a for a in stall_marks(fig) if a.get_gid() == "stall-cause"]
    assert len(line) == 1 and list(line[0].get_xdata()) == [s["stall"]["t"]] * 2
    assert len(text) == 1 and text[0].get_text().replace("\n", " ") == s["stall"]["cause"]
    assert s["stall"]["cause"].startswith("server refused")
    # the stall sits where the open count stopped growing
    series = s["series"]
    i = series["t"].index(s["stall"]["t"])
    assert series["open"][i] == max(series["open"]) > series["open"][i - 1]


@pytest.mark.parametrize("name, stalled", [("send", False), ("stall", True)])
def test_svg_and_png_are_written(tmp_path, name, stalled):
    svg = plots.client_figure(summary(name), tmp_path / "f.svg")
    text = open(svg).read()
    assert text.startswith("<?xml") and ("<svg" in text)
    assert ('id="stall"' in text) == stalled
    png = plots.client_figure(summary(name), tmp_path / "f.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_py_redraws_a_summary_from_its_json(tmp_path, capsys):
    copy = tmp_path / "run.json"
    copy.write_text((DATA / "client-stall.json").read_text())
    assert plots.main([str(copy)]) == 0
    assert (tmp_path / "run.svg").read_text().count('id="stall"') == 1
    assert plots.main([str(copy), "-o", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").stat().st_size > 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "run.svg"),
                                               str(tmp_path / "other.png")]


def test_plots_py_says_what_it_cannot_draw(tmp_path, capsys):
    old = summary("send")
    del old["series"]
    cases = {"old.json": json.dumps(old), "other.json": '{"x": 1}', "bad.json": "{",
             "cut.json": json.dumps({"target": 1, "ramp_end": None, "series": {"t": [0]}})}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    expect = {"old.json": 'has no "series"', "other.json": "not a run this draws",
              "bad.json": "Expecting property name", "cut.json": "not a whole record",
              "missing.json": "No such file"}
    for name, words in expect.items():
        assert plots.main([str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("plots.py: ") and words in err, err
    with pytest.raises(SystemExit):
        plots.main([str(tmp_path / "old.json"), "-o", "x.pdf"])
    assert "a figure is written as .svg or .png" in capsys.readouterr().err


def run_client(m, tmp_path, *args, env=None):
    cmd = [*CLIENT, "p", "127.0.0.1", "--conns", "200", "--send", "50", "--base-port",
           str(m.base_port), "--app-port", str(m.app_port), "--max-time", "20",
           "--json", str(tmp_path / "s.json"), *args]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    return p, json.loads((tmp_path / "s.json").read_text())


def test_plot_end_to_end(manager, tmp_path):
    p, s = run_client(manager, tmp_path, "--plot", "run.svg")
    assert p.returncode == 0 and s["exit_status"] == 0, p.stdout + p.stderr
    assert "  figure    run.svg" in p.stdout.splitlines() and p.stderr == ""
    assert (tmp_path / "run.svg").read_text().startswith("<?xml")
    assert s["latency_histogram"]["count"] == 50 and s["stall"] is None
    series = s["series"]
    assert series["interval_s"] == client.REPORT_S and series["open"][-1] == 200
    assert len(series["t"]) == len(series["open"]) == len(series["connects_per_s"])
    assert series["t"] == sorted(series["t"]) and series["ramp_end_t"] <= s["elapsed_s"]


def test_plot_without_matplotlib_says_what_to_install_and_the_run_is_unchanged(
        manager, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "matplotlib.py").write_text("raise ImportError('hidden by the test')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(hide)}
    p, s = run_client(manager, tmp_path, "--plot", "run.png", env=env)
    assert p.returncode == 0 and s["exit_status"] == 0, p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("client.py: --plot: ")
    assert plots.INSTALL in p.stderr
    assert "MegaComet client" in p.stdout and "received 50" in p.stdout
    assert "figure" not in p.stdout and not (tmp_path / "run.png").exists()
    assert s["received"] == 50 and s["series"]["open"][-1] == 200


def test_plot_without_plots_py_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "plots", None)     # `import plots` fails as if absent
    client.draw(summary("send"), "x.svg")
    err = capsys.readouterr().err
    assert err.startswith("client.py: --plot needs plots.py beside client.py")
    assert err.count("\n") == 1


@pytest.mark.parametrize("name", ["out.pdf", "out", "out.svg.txt"])
def test_a_bad_plot_name_is_refused_before_anything_runs(name):
    p = subprocess.run([*CLIENT, "x", "127.0.0.1", "--workers", "2", "--plot", name], cwd=ROOT,
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 2
    assert f"argument --plot: a figure is written as .svg or .png, got '{name}'" in p.stderr
