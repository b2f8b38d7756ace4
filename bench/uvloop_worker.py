"""bench/asyncio_worker.py on uvloop's event loop (libuv transports written in Cython): the
fastest way to run a plain asyncio comet worker, and the CPU baseline of bench/cpu.py.

    python bench/uvloop_worker.py --port 8000 --app-port 9000

Needs uvloop (requirements-dev.txt pins uvloop==0.23.0); the project's runtime does not.
"""

import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asyncio_worker  # noqa: E402

if __name__ == "__main__":
    sys.exit(asyncio_worker.main(loop_factory=uvloop.new_event_loop))
