"""A real browser against the real server: headless Chromium's EventSource gets a message, has
its stream closed by the server, comes back by itself with `Last-Event-ID`, and gets the message
published while it was away, once.

Standard library and pytest only. The page reports what it sees by POSTing JSON to a small
collector (an http.server that also serves the page); a tap, a byte-for-byte TCP relay in front
of the owner worker's port, records the request heads the browser sends."""

import json
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import http_request
from test_comet import answer, id_for, start_poll

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-breakpad", "--disable-dev-shm-usage"]

PAGE = """<!doctype html><meta charset="utf-8"><title>EventSource under test</title><script>
let n = 0;
const report = (o) => fetch('/report', {method: 'POST', body: JSON.stringify({n: n++, ...o})});
window.onerror = (message) => report({type: 'js-error', data: String(message)});
const es = new EventSource(URL);
es.onopen = () => report({type: 'open'});
es.onerror = () => report({type: 'error', state: es.readyState});
es.onmessage = (e) => report({type: 'message', id: e.lastEventId, data: e.data});
for (const name of ['gap', 'replaced'])
  es.addEventListener(name, (e) => report({type: name, id: e.lastEventId, data: e.data}));
</script>
"""


# ---------------------------------------------------------------------------------------------
# Harness: collector, tap, browser
# ---------------------------------------------------------------------------------------------


class Collector(ThreadingHTTPServer):
    """Serves the page at / and keeps what the page POSTs to /report, in the page's order."""

    daemon_threads = True

    def __init__(self, page: str):
        self.page = page.encode()
        self.reports = []
        self.cond = threading.Condition()
        super().__init__(("127.0.0.1", 0), CollectorHandler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def events(self) -> list:
        """The reports in the page's order, up to the first one still in flight."""
        with self.cond:
            got = sorted(self.reports, key=lambda r: r["n"])
        events = []
        for r in got:
            if r["n"] != len(events):
                break
            events.append(r)
        return events

    def wait_for(self, what: str, cond, timeout: float = 10.0) -> list:
        """Wait until cond(events) is true; the events, or a failure that lists them."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                events = self.events()
                if cond(events):
                    return events
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"timed out after {timeout} s waiting for {what}; "
                                f"the page reported {events}")
                self.cond.wait(min(left, 0.1))

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class CollectorHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/":
            return self.reply(404, b"")
        self.reply(200, self.server.page, "text/html; charset=utf-8")

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.cond:
            self.server.reports.append(json.loads(body))
            self.server.cond.notify_all()
        self.reply(204, b"")

    def reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Tap:
    """A TCP relay from a free port to `port`; records each connection's request head and
    when it had passed through whole."""

    def __init__(self, port: int):
        self.target = port
        self.heads = []  # (time.monotonic(), head)
        self.conns = []
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.lsock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            pair = [client, upstream]
            self.conns.append(pair)
            threading.Thread(target=self._pump, args=(client, upstream, pair, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, pair, False),
                             daemon=True).start()

    def _pump(self, src, dst, pair, record: bool) -> None:
        head = b""
        try:
            while chunk := src.recv(65536):
                if record:  # the time is taken before the server can see the whole head
                    head += chunk
                    if b"\r\n\r\n" in head:
                        record = False
                        text = head.partition(b"\r\n\r\n")[0].decode("latin-1")
                        self.heads.append((time.monotonic(), text))
                dst.sendall(chunk)
        except OSError:
            pass
        self._close(pair)  # either side ends: both go, as a proxy would

    @staticmethod
    def _close(pair) -> None:
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the other pump's recv()
            except OSError:
                pass
            s.close()

    def stop(self) -> None:
        self.lsock.close()
        for pair in self.conns:
            self._close(pair)


def browser_pids(sid: int, home: str) -> list:
    """Live processes of the browser: those in its session, and those that left it (the crash
    handler calls setsid) but name its private HOME on their command line."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and (int(fields[3]) == sid or home.encode() in cmdline):
            pids.append(int(entry))
    return pids


@contextmanager
def chromium(url: str, tmp_path):
    """Headless Chromium showing `url`; it and every process it started are killed at the end."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: this test drives a real browser; "
                    f"install it with `{INSTALL}`")
    home = str(tmp_path / "home")  # crash reports and caches land here, not in ~root
    env = {**os.environ, "HOME": home, "XDG_CONFIG_HOME": f"{home}/.config",
           "XDG_CACHE_HOME": f"{home}/.cache"}
    with open(tmp_path / "chromium.log", "wb") as log:
        proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", url],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while (left := browser_pids(proc.pid, home)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        assert not left, f"browser processes left behind: {left}"


# ---------------------------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------------------------


def publish(m, id_: str, message: bytes) -> str:
    """POST /send/<id> on the app port; the message id the manager gave it."""
    head = f"POST /send/{id_} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(message)}\r\n\r\n"
    status, _, body = http_request(m.app_port, head.encode() + message)
    assert status == 202, body
    return json.loads(body)["mid"]


def of_type(events: list, *types: str) -> list:
    return [e for e in events if e["type"] in types]


def messages(events: list) -> list:
    return [(e["id"], e["data"]) for e in of_type(events, "message")]


def reconnect_scenario(m, id_: str, tmp_path) -> None:
    """Works against anything with `app_port` and `port_for(id)`: the real manager in the test,
    a stand-in while the harness was built."""
    tap = Tap(m.port_for(id_))
    collector = Collector(PAGE.replace("URL", json.dumps(f"http://127.0.0.1:{tap.port}/{id_}.sse")))
    others = []
    try:
        with chromium(collector.url, tmp_path):
            collector.wait_for("the stream to open", lambda ev: of_type(ev, "open"), 20)
            mid1 = publish(m, id_, b"one")
            collector.wait_for("message one", lambda ev: messages(ev))
            # Push the browser's stream out: it and 4 more waiters on the id are one too many.
            others = [start_poll(m.port_for(id_), id_) for _ in range(4)]
            collector.wait_for("the stream to be closed by the server",
                               lambda ev: of_type(ev, "error"))
            # The browser waits `retry: 2000` ms before it comes back; publish meanwhile.
            mid2 = publish(m, id_, b"two")
            published = time.monotonic()
            for s in others:
                status, _, _, body = answer(s)
                assert (status, body) == (200, b"two"), f"a test poll got {status} {body!r}"
            collector.wait_for("the reconnected stream to deliver message two",
                               lambda ev: len(of_type(ev, "open")) == 2 and len(messages(ev)) >= 2)
            time.sleep(0.5)  # room for a duplicate to show up
            events = collector.events()
    finally:
        for s in others:
            s.close()
        tap.stop()
        collector.stop()
    sequence = [e["type"] for e in events]
    assert sequence == ["open", "message", "replaced", "error", "open", "message"], events
    assert messages(events) == [(mid1, "one"), (mid2, "two")], events
    assert of_type(events, "replaced")[0]["data"] == id_, events
    heads = [(t, h) for t, h in tap.heads if h.startswith(f"GET /{id_}.sse ")]
    assert len(heads) == 2, tap.heads
    assert "last-event-id:" not in heads[0][1].lower(), heads[0][1]
    assert f"\r\nlast-event-id: {mid1}".lower() in heads[1][1].lower(), heads[1][1]
    assert heads[1][0] > published, (
        "the browser came back before message two was published (in under 2 s?), so its "
        "delivery proves no replay; the box may be too loaded")


def test_event_source_reconnects_with_last_event_id_and_misses_nothing(manager, tmp_path):
    reconnect_scenario(manager, id_for(1, "browser"), tmp_path)
