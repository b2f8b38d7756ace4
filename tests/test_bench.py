"""Smoke test of `make bench-micro` (bench/micro.py): it runs to the end and reports every
figure. No timing is asserted: the figures are the
benchmark's business, and this box is shared."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

pytest.importorskip("pyperf")

@pytest.mark.timeout(120)
def test_micro_runs_every_benchmark():
    from micro import BENCHMARKS

    r = subprocess.run([sys.executable, str(ROOT / "bench" / "micro.py"),
                        "--debug-single-value", "--quiet"], cwd=ROOT, capture_output=True,
                       text=True, timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name, _ in BENCHMARKS:
        assert f"{name}:" in r.stdout, name
