"""Shared fixtures: start a real manager.py on free ports and talk to it over real sockets."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from bench._common import free_port_block  # noqa: E402  (one copy, for tests and benches)


class PortTaken(RuntimeError):
    pass


class Manager:
    """A running `python manager.py` on free ports; stopped with SIGTERM by `stop()`."""

    def __init__(self, *args: str, workers: int = 2, nofile: int | None = None):
        self.workers = workers
        limit = None
        if nofile is not None:
            def limit():
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        for _ in range(5):  # another test may take the drawn ports between check and bind
            # One block: the app port right after the comet ports, never inside them.
            self.base_port = free_port_block(workers + 1)
            self.app_port = self.base_port + workers
            cmd = [sys.executable, str(ROOT / "manager.py"), "--host", "127.0.0.1",
                   "--workers", str(workers), "--base-port", str(self.base_port),
                   "--app-port", str(self.app_port), "--status-interval", "0", *args]
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True,
                                         preexec_fn=limit)
            try:
                self.wait_ready()
                return
            except PortTaken:
                continue
            except BaseException:
                # Never left running behind a failed test (with its workers: they exit when
                # its links close).
                self.proc.kill()
                self.proc.wait(5)
                raise
        raise RuntimeError("could not start a manager on free ports")

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        ports = [self.base_port + n for n in range(self.workers)] + [self.app_port]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read()
                self.proc.stdout.close()
                if "cannot listen" in out:
                    raise PortTaken(out)
                raise RuntimeError(f"manager exited: {out}")
            try:
                for p in ports:
                    socket.create_connection(("127.0.0.1", p), timeout=1).close()
                if len(self.stats()["workers"]) == self.workers:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("manager did not come up")

    def port_for(self, id_: str) -> int:
        from server import owner
        return self.base_port + owner(id_.encode(), self.workers)

    def stats(self) -> dict:
        status, _, body = http_request(self.app_port, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> int:
        if self.proc.stdout.closed:  # stopped already (a test, then the fixture)
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=10)
            self.output = self.proc.stdout.read()
            return code
        finally:
            self.proc.stdout.close()


def http_request(port: int, raw: str | bytes, timeout: float = 5.0):
    """Send raw bytes, read one whole response (to close or Content-Length).
    Returns (status, headers dict with lower-case names, body bytes)."""
    if isinstance(raw, str):
        raw = raw.encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        return read_response(s)


_leftover = weakref.WeakKeyDictionary()  # bytes read past one response (pipelining)


def read_response(s: socket.socket):
    """Read exactly one response; bytes of the next one are kept for the next call."""
    data = _leftover.pop(s, b"")
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    if len(body) > length:
        _leftover[s] = body[length:]
        body = body[:length]
    return status, headers, body


@pytest.fixture
def manager_factory():
    started = []

    def start(*args: str, workers: int = 2, nofile: int | None = None) -> Manager:
        m = Manager(*args, workers=workers, nofile=nofile)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def manager(manager_factory):
    return manager_factory()


def pids_alive(pids) -> list:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive
