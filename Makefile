# MegaComet in Python. The runtime needs only the standard library; these targets
# manage the pinned dev tools in .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: test lint run bench bench-micro bench-memory bench-cpu bench-hotpath bench-nodes million check soak clean

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

run:
	$(PYTHON) manager.py

check:
	$(PYTHON) tuning/check.py

# The project against the same design in plain asyncio and on uvloop (bench/peer.py), side by
# side, 3 alternating rounds (~15 min on 2 cores); bench/results/bench-<host>.json.
bench: $(VENV)/.installed
	$(PY) bench/suite.py

# pyperf: the parser, the hash, the response head, the link codec.
bench-micro: $(VENV)/.installed
	$(PY) bench/micro.py

bench-memory: $(VENV)/.installed
	$(PY) bench/memory.py

bench-cpu: $(VENV)/.installed
	$(PY) bench/cpu.py

# In-process CPU of one accept and one message (bench/hotpath.py; --root DIR for an A/B).
bench-hotpath: $(VENV)/.installed
	$(PY) bench/hotpath.py

# Three nodes on a local redis-server against one node alone, paced and blast (bench/nodes.py).
bench-nodes: $(VENV)/.installed
	$(PY) bench/nodes.py

# TARGET waiting polls on this box, 100,000 messages and a broadcast (bench/million.py).
TARGET ?= 1000000
million: $(VENV)/.installed
	$(PY) bench/million.py --target $(TARGET)

# Every fault and bad input at once for SOAK_SECONDS, then every message accounted for.
SOAK_SECONDS ?= 300
soak: $(VENV)/.installed
	$(PY) tests/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
