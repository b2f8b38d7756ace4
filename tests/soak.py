"""Soak test: the manager, its workers and every kind of trouble at once, then an exact ledger.

    SOAK_SECONDS=300 python tests/soak.py        (make soak; tests/test_soak.py runs 60 s)

Theory of operation
-------------------
On loopback, for SOAK_SECONDS, all at once:

- a real `manager.py` (3 workers, short --queue-ttl, small --queue-max, short header and write
  timeouts, and --worker-timeout when the manager has it);
- a population of `client.py` processes holding POPULATION long polls that re-poll after every
  answer, with `client.py --send` publishing binary frames to them (their own ids);
- the publisher (a process): JSON lines and HTTP keep-alive connections to the app port,
  publishing to ids nobody polls (they expire), bursts to a few "hot" ids (over --queue-max:
  dropped), big messages to the slow readers below, and now and then a broadcast; it times
  every publish from its write to its `ok` reply;
- the floods (a process): on the comet ports random bytes, TLS ClientHellos, slowloris heads,
  heads over 8 KiB, silent connections, pipelined requests never read, a flood after a poll,
  and slow readers that read the head of a big answer and then never read again; on the app
  port, waves of connections opened at once, idle, with garbage, or with half a request;
- faults (a thread): SIGKILL of a random worker, SIGSTOP then SIGCONT, or SIGSTOP left for
  the manager's watchdog to kill;
- /stats asked every second (a thread): the manager must answer it throughout.

Then the drain: stop sending and killing, let the client see its last messages, wait until no
worker holds a queued message (past --queue-ttl), and count.

The ledger. Every message the manager accepted from us ends in exactly one place:
    sent        = client.py's frames + the publisher's `ok` replies (broadcasts apart)
    delivered   = distinct messages the client population received (client.py's `received`)
                + distinct tokens the slow readers saw at the head of an answer
    expired, dropped = the manager's /stats totals expired_undelivered, dropped_undelivered:
                  messages evicted from history before any client had them (cumulative over
                  worker restarts; a delivered message is kept too, and evicted later: that
                  one is counted as delivered, not again)
    lost_in_killed_workers = totals.lost: what a killed worker held that no client had had
    unaccounted = sent - delivered - expired - dropped - lost, which must be 0.
Nothing else publishes: the floods never complete a message (no NUL ends a binary frame, no
JSON line is valid, no HTTP body is whole), and they poll only ids nobody publishes to; so
`manager.messages_in` must equal sent + broadcasts, and that is checked too. A negative
figure is a message counted twice: delivery is at-least-once across a worker crash, and a
replayed copy of a message that was delivered may be queued again and expire (or be lost).

Every process started here is stopped at the end, whatever happened (the manager's process
group gets SIGCONT, SIGTERM, then SIGKILL). Ports are drawn between 10000 and 32000. The load
is sized for a 2-core box that also runs the rest of the test suite.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter, deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port_block  # noqa: E402

from server import owner  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Constants: the size of the trouble
# ---------------------------------------------------------------------------------------------

DEFAULT_SECONDS = 300
WORKERS = 3  # odd: x31 % W spreads sequential ids evenly (README, "A note on x31")
QUEUE_TTL = 5.0  # short, so the drain is short: every undelivered message expires by then
QUEUE_MAX = 5  # the hot ids get bursts of HOT_BURST: the oldest are dropped, counted
HEADER_TIMEOUT = 3.0  # slowloris connections are closed after this
WRITE_TIMEOUT = 2.0  # slow readers are closed after this
WORKER_TIMEOUT = 3.0  # the watchdog, where the manager has one
MAX_MESSAGE = 256 * 1024  # room for the slow readers' big messages

POPULATION = 2000  # client.py long polls
POPULATION_PROCS = 2
POPULATION_RATE = 100.0  # messages a second client.py sends to its own ids

ABSENT_IDS = 300  # ids nobody polls: every message to them expires (or is lost)
ABSENT_RATE = 150.0  # messages a second to them
HOT_IDS = 4  # ids nobody polls that get bursts over --queue-max
HOT_BURST = 8  # messages in one burst, one burst a second: 3 of each 8 are dropped
SLOW_IDS = 8  # ids polled by slow readers
SLOW_RATE = 2.0  # big messages a second to them
SLOW_SIZE = 200 * 1024  # more than loopback's socket buffers take before the reader reads
BROADCAST_EVERY = 5.0  # seconds
WINDOW = 200  # publishes in flight per app connection
PUBLISHER_WAIT = 15.0  # seconds the publisher waits for its last replies

GARBAGE_RATE = 20.0  # garbage connections a second on the comet ports
SLOWLORIS = 150  # slowloris connections kept open
APP_WAVE = 120  # app connections opened at once, one wave every APP_WAVE_EVERY
APP_WAVE_EVERY = 4.0

FAULTS = {  # name: (method of Faults, cards in the deck)
    "kill": ("kill", 2),  # SIGKILL
    "stop": ("stop_cont", 2),  # SIGSTOP, SIGCONT after STOP_FOR
    "watchdog": ("stop_for_watchdog", 1),  # SIGSTOP, left for --worker-timeout to kill
    "full": ("stop_and_fill", 1),  # the same, and its outbox filled past the flow mark
}
FILL_SIZE = 200 * 1024  # FILL_COUNT messages of this size: over the manager's FLOW_HIGH
FILL_COUNT = 25  # (4 MiB of unacknowledged frames for one worker pauses every publisher)
STALL_MAX = WORKER_TIMEOUT + 3  # a longer publisher stall while a worker is stopped: PROBLEM
FAULT_GAP = (2.0, 5.0)  # seconds between two faults
STOP_FOR = (0.3, WORKER_TIMEOUT / 2)  # a SIGSTOP later SIGCONTed: short of the watchdog
STATS_EVERY = 1.0
STATS_TIMEOUT = 5.0  # a /stats that takes longer counts as not answered

CLIENT_GRACE = QUEUE_TTL + 4  # client.py waits this long after its last send
DRAIN_MAX = QUEUE_TTL + 25  # the drain gives up after this long

# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def log(line: str) -> None:
    print(f"soak: {line}", flush=True)


def get_stats(app_port: int, timeout: float = STATS_TIMEOUT) -> dict:
    """GET /stats on a new connection: the manager answers it even while it holds back the
    publishers."""
    with socket.create_connection(("127.0.0.1", app_port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"/stats answered {head[:40]!r}")
    return json.loads(body)


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def is_worker(pid: int, manager_pid: int) -> bool:
    """A live child of our manager: never signal a pid that may have been reused."""
    st = proc_state(pid)
    return st is not None and st[1] == manager_pid and st[0] not in "ZX"


def die_with_parent() -> None:
    """preexec_fn: SIGTERM when the soak dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def tls_client_hello() -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The publisher: JSON lines and HTTP, every publish timed to its reply
# ---------------------------------------------------------------------------------------------


class AppPipe:
    """One app connection with publishes in flight, answered in order (FIFO)."""

    def __init__(self, proto: str, port: int, tally: dict):
        self.proto, self.port, self.tally = proto, port, tally
        self.pending: deque = deque()  # (time written, category, token)
        self.writer = None
        self.broken = True
        self.task = None

    async def open(self) -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.broken = False
        self.task = asyncio.create_task(self.read_replies(reader))

    def publish(self, category: str, id_: str | None, message: bytes, token=None) -> None:
        if self.proto == "json":
            obj = {"broadcast": True} if id_ is None else {"id": id_}
            obj["message"] = message.decode()
            data = json.dumps(obj).encode() + b"\n"
        else:
            path = b"/broadcast" if id_ is None else b"/send/" + id_.encode()
            data = b"POST %s HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n%s" % (
                path, len(message), message)
        self.writer.write(data)
        self.pending.append((time.monotonic(), category, token))

    async def read_replies(self, reader) -> None:
        t = self.tally
        try:
            while True:
                if self.proto == "json":
                    line = await reader.readline()
                    if not line:
                        raise ConnectionError("app port closed the JSON-lines connection")
                    reply = json.loads(line)
                    ok, error = reply.get("ok") is True, reply.get("error")
                else:
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head.split(b" ", 2)[1])
                    length = 0
                    for h in head.split(b"\r\n"):
                        if h.lower().startswith(b"content-length:"):
                            length = int(h.split(b":")[1])
                    body = await reader.readexactly(length)
                    ok, error = status == 202, None if status == 202 else f"{status} {body[:80]}"
                now = time.monotonic()
                sent_t, category, token = self.pending.popleft()
                latency = now - sent_t
                t["lat_max"] = max(t["lat_max"], latency)
                t["sent_at"].append(sent_t)
                t["answered_at"].append(now)
                if ok:
                    t["ok"][category] += 1
                    if token is not None:
                        t["ok_tokens"].append(token)
                else:
                    t["refused"][category] += 1
                    t["errors"][str(error)[:80]] += 1
        except (OSError, EOFError, asyncio.IncompleteReadError, ValueError) as e:
            t["errors"][f"connection: {e!r}"[:80]] += 1
        finally:
            self.broken = True

    def settle_broken(self) -> None:
        """Publishes whose reply never came: accepted or not, nobody knows."""
        self.tally["unknown"] += len(self.pending)
        self.pending.clear()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def publisher(cfg: dict) -> dict:
    tally = {"ok": Counter(), "refused": Counter(), "unknown": 0, "errors": Counter(),
             "lat_max": 0.0, "sent_at": array("d"), "answered_at": array("d"),
             "ok_tokens": []}
    port = cfg["app_port"]
    pipes = [AppPipe("json", port, tally), AppPipe("json", port, tally),
             AppPipe("http", port, tally)]
    absent, hot, slow = ids("soaka", ABSENT_IDS), ids("soakh", HOT_IDS), ids("soaks", SLOW_IDS)
    rng = random.Random()
    pad = b"x" * SLOW_SIZE
    t0 = time.monotonic()
    n_absent = n_slow = n_hot_bursts = n_broadcasts = 0
    until = cfg["until"]
    while time.monotonic() < until:
        for p in pipes:
            if p.broken:
                p.settle_broken()
                try:
                    await p.open()
                except OSError as e:
                    tally["errors"][f"connect: {e!r}"[:80]] += 1
        live = [p for p in pipes if not p.broken]
        jsons = [p for p in live if p.proto == "json" and len(p.pending) < WINDOW]
        https = [p for p in live if p.proto == "http" and len(p.pending) < WINDOW]
        elapsed = time.monotonic() - t0
        # Absent ids, over JSON lines and HTTP alike.
        due = min(int(elapsed * ABSENT_RATE) - n_absent, 50)
        for _ in range(max(0, due)):
            choices = jsons + https
            if not choices:
                break
            rng.choice(choices).publish("absent", rng.choice(absent),
                                        b"soak absent %d" % n_absent)
            n_absent += 1
        if jsons and int(elapsed) >= n_hot_bursts:
            target = hot[n_hot_bursts % HOT_IDS]
            for i in range(HOT_BURST):
                jsons[0].publish("hot", target, b"soak hot %d.%d" % (n_hot_bursts, i))
            n_hot_bursts += 1
        if https and int(elapsed * SLOW_RATE) >= n_slow:
            token = n_slow
            msg = b"tok=%d;" % token + pad[: rng.randrange(SLOW_SIZE // 2, SLOW_SIZE)]
            https[0].publish("slow", slow[n_slow % SLOW_IDS], msg, token)
            n_slow += 1
        if jsons and elapsed >= n_broadcasts * BROADCAST_EVERY:
            jsons[-1].publish("broadcast", None, b"soak broadcast %d" % n_broadcasts)
            n_broadcasts += 1
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + PUBLISHER_WAIT
    while any(p.pending and not p.broken for p in pipes) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for p in pipes:
        p.settle_broken()
        if p.task is not None:
            p.task.cancel()
    return tally


# ---------------------------------------------------------------------------------------------
# The floods: garbage on the comet ports, slow readers, waves of app connections
# ---------------------------------------------------------------------------------------------


class Floods:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.until = cfg["until"]
        self.ports = [cfg["base_port"] + n for n in range(WORKERS)]
        self.rng = random.Random()
        self.outcomes: dict = {}  # kind -> Counter of outcomes
        self.hello = tls_client_hello()
        self.slow_tokens: list = []  # tokens seen by slow readers, repeats included
        self.slow_other = 0
        self.slowloris_longest = 0.0
        self.tasks: set = set()

    def count(self, kind: str, outcome: str) -> None:
        self.outcomes.setdefault(kind, Counter())[outcome] += 1

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def connect(self, port: int, rcvbuf: int = 0) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            await asyncio.wait_for(self.loop.sock_connect(sock, ("127.0.0.1", port)), 5)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def close(sock: socket.socket, reset: bool = False) -> None:
        if reset:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        sock.close()

    async def answer(self, sock: socket.socket, wait: float) -> str:
        """The status the peer answered, or how the connection ended, within `wait` s."""
        data = b""
        try:
            async with asyncio.timeout(wait):
                while True:
                    chunk = await self.loop.sock_recv(sock, 4096)
                    if not chunk:
                        break
                    data += chunk
                    if b"\r\n" in data:
                        break
        except TimeoutError:
            return data[:12].decode("latin-1") or "no answer"
        except OSError:
            return "reset" if not data else data[:12].decode("latin-1")
        if data.startswith(b"HTTP/1.1 "):
            return data[9:12].decode("latin-1")
        if data.startswith(b'{"ok": false'):
            return '{"ok": false}'
        return "closed" if not data else "other"

    # -- one connection of garbage ------------------------------------------------------------

    async def garbage(self, kind: str) -> None:
        port = self.rng.choice(self.ports)
        rng = self.rng
        reset = rng.random() < 0.3
        rcvbuf = 0
        chunks: list = []
        wait = 3.0
        if kind == "random bytes":
            chunks = [os.urandom(rng.randrange(1, 4096))]
        elif kind == "TLS hello":
            chunks = [self.hello]
        elif kind == "8 KiB+ head":
            pad = b"a" * rng.randrange(8200, 20000)
            variant = rng.randrange(3)
            if variant == 0:
                chunks = [b"GET /soakg1.js HTTP/1.1\r\nX-Pad: " + pad + b"\r\n\r\n"]
            elif variant == 1:
                chunks = [b"GET /soakg1.js HTTP/1.1\r\n" + pad]  # no line end at all
            else:
                head = b"GET /soakg1.js HTTP/1.1\r\n" + b"X-H: 12345678\r\n" * 700
                chunks = [head[i:i + 1000] for i in range(0, len(head), 1000)]
        elif kind == "silent":
            wait = HEADER_TIMEOUT + 3
        elif kind == "never reads":
            rcvbuf = 4096
            chunks = [b"GET /_info HTTP/1.1\r\nHost: soak\r\n\r\n" * rng.randrange(50, 500)]
        elif kind == "flood after poll":
            gid = f"soakg{rng.randrange(100)}"
            port = self.cfg["base_port"] + owner(gid.encode(), WORKERS)
            chunks = [b"GET /%s.js HTTP/1.1\r\nHost: soak\r\n\r\n" % gid.encode()]
            chunks += [os.urandom(65536) for _ in range(5)]
        try:
            sock = await self.connect(port, rcvbuf)
        except (OSError, TimeoutError):
            self.count(kind, "connect failed")
            return
        try:
            for chunk in chunks:
                await asyncio.wait_for(self.loop.sock_sendall(sock, chunk), 5)
            if kind == "never reads":
                await asyncio.sleep(rng.uniform(1, 4))
                outcome = "held, never read"
            else:
                outcome = await self.answer(sock, wait)
        except (OSError, TimeoutError):
            outcome = "reset while sending"
        finally:
            self.close(sock, reset)
        self.count(kind, outcome)

    async def slowloris(self, n: int) -> None:
        """A head that never ends, one header line a second, until the server closes it."""
        while time.monotonic() < self.until:
            port = self.ports[n % WORKERS]
            try:
                sock = await self.connect(port)
            except (OSError, TimeoutError):
                self.count("slowloris", "connect failed")
                await asyncio.sleep(1)
                continue
            born = time.monotonic()
            outcome = "still open at the end"
            try:
                await self.loop.sock_sendall(sock, b"GET /soakg%d.js HTTP/1.1\r\n" % n)
                while time.monotonic() < self.until:
                    await asyncio.sleep(1.0)
                    await self.loop.sock_sendall(sock, b"X-Slow-%d: 1\r\n" % self.rng.randrange(99))
            except OSError:
                outcome = "closed by the server"
                self.slowloris_longest = max(self.slowloris_longest, time.monotonic() - born)
            finally:
                self.close(sock, reset=True)
            self.count("slowloris", outcome)

    async def slow_reader(self, n: int) -> None:
        """Polls its id; reads the head and the token of the answer, then never reads again:
        the worker's --write-timeout must close it. The token counts as delivered."""
        id_ = b"soaks%d" % n
        port = self.cfg["base_port"] + owner(id_, WORKERS)
        request = b"GET /%s.js HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (id_, port)
        while time.monotonic() < self.cfg["readers_until"]:
            try:
                sock = await self.connect(port, rcvbuf=4096)
            except (OSError, TimeoutError):
                self.count("slow reader", "connect failed")
                await asyncio.sleep(0.5)
                continue
            data = b""
            try:
                await self.loop.sock_sendall(sock, request)
                async with asyncio.timeout(max(0.1, self.cfg["readers_until"] - time.monotonic())):
                    while True:
                        chunk = await self.loop.sock_recv(sock, 1024)
                        if not chunk:
                            break
                        data += chunk
                        head, sep, body = data.partition(b"\r\n\r\n")
                        if sep and (b";" in body[:32] or len(body) >= 32):
                            break  # the token is in: from here on, never read
            except (OSError, TimeoutError):
                pass
            head, sep, body = data.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200") and body.startswith(b"tok="):
                self.slow_tokens.append(int(body[4:body.index(b";")]))
                self.count("slow reader", "200, head read, rest never")
                await asyncio.sleep(WRITE_TIMEOUT + 1)  # not reading: the worker gives up
            elif head.startswith(b"HTTP/1.1 200"):
                self.slow_other += 1  # a broadcast
                self.count("slow reader", "200 broadcast")
            elif data:
                self.count("slow reader", data[9:12].decode("latin-1"))
            else:
                self.count("slow reader", "closed without an answer")
            self.close(sock, reset=True)

    # -- the app port ---------------------------------------------------------------------------

    async def app_one(self, kind: str) -> None:
        rng = self.rng
        payload = {
            "idle": b"",
            "garbage": bytes(b or 1 for b in os.urandom(rng.randrange(1, 3000))),
            "JSON garbage": b"{" + bytes(b or 1 for b in os.urandom(200)) + b"\n",
            "half HTTP head": b"POST /send/soakf1 HTTP/1.1\r\nContent-Le",
            "half HTTP body": b"POST /send/soakf1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                              b"\r\n\r\nonly part of it",
            "half binary frame": b"\x02soakf1\x00never finished",
            "half JSON line": b'{"id": "soakf1", "message": "never fin',
            "bad binary id": b"\x02bad id!\x00x\x00",
            "stats": b"GET /stats HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n",
        }[kind]
        try:
            sock = await self.connect(self.cfg["app_port"])
        except (OSError, TimeoutError):
            self.count(f"app {kind}", "connect failed")
            return
        try:
            if payload:
                await asyncio.wait_for(self.loop.sock_sendall(sock, payload), 5)
            if kind == "stats":
                outcome = await self.answer(sock, STATS_TIMEOUT)
            else:
                outcome = await self.answer(sock, rng.uniform(0.5, 2.5))
                outcome = {"no answer": "held open"}.get(outcome, outcome)
        except (OSError, TimeoutError):
            outcome = "reset"
        finally:
            self.close(sock, reset=rng.random() < 0.5)
        self.count(f"app {kind}", outcome)

    async def app_waves(self) -> None:
        kinds = ["idle", "garbage", "JSON garbage", "half HTTP head", "half HTTP body",
                 "half binary frame", "half JSON line", "bad binary id", "stats"]
        while time.monotonic() < self.until:
            wave = [self.app_one(kinds[i % len(kinds)]) for i in range(APP_WAVE)]
            await asyncio.gather(*wave)
            await asyncio.sleep(self.rng.uniform(0.5, APP_WAVE_EVERY))

    async def run(self) -> dict:
        for n in range(SLOWLORIS):
            self.spawn(self.slowloris(n))
        for n in range(SLOW_IDS):
            self.spawn(self.slow_reader(n))
        self.spawn(self.app_waves())
        kinds = ["random bytes", "TLS hello", "8 KiB+ head", "silent", "never reads",
                 "flood after poll"]
        started = 0
        t0 = time.monotonic()
        while time.monotonic() < self.until:
            due = int((time.monotonic() - t0) * GARBAGE_RATE) - started
            for _ in range(max(0, min(due, 20))):
                self.spawn(self.garbage(kinds[started % len(kinds)]))
                started += 1
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 15
        while self.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for task in list(self.tasks):
            task.cancel()
        return {"outcomes": {k: dict(v) for k, v in self.outcomes.items()},
                "slow_tokens": self.slow_tokens, "slow_other": self.slow_other,
                "slowloris_longest": self.slowloris_longest}


async def floods(cfg: dict) -> dict:
    return await Floods(cfg).run()


def role_main(role, cfg: dict, conn) -> None:
    """A forked process running one async role; its result goes back through `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    die_with_parent()
    try:
        result = asyncio.run(role(cfg))
    except BaseException as e:  # a bug in the soak itself: say so
        import traceback
        result = {"crash": f"{e!r}\n{traceback.format_exc()}"}
    conn.send(result)
    conn.close()


# ---------------------------------------------------------------------------------------------
# Faults and /stats: threads of the main process
# ---------------------------------------------------------------------------------------------


class Watch:
    """Asks /stats every STATS_EVERY; the last answer is what the faults pick workers from."""

    def __init__(self, app_port: int, until_event: threading.Event):
        self.app_port = app_port
        self.stop = until_event
        self.asked = self.answered = 0
        self.slowest = 0.0
        self.failures: list = []
        self.last: dict | None = None
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            self.asked += 1
            try:
                s = get_stats(self.app_port)
                with self.lock:
                    self.last = s
                self.answered += 1
                self.slowest = max(self.slowest, time.monotonic() - t)
            except (OSError, ValueError) as e:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {e!r}"[:120])
            self.stop.wait(max(0.0, STATS_EVERY - (time.monotonic() - t)))


class Faults:
    """One fault at a time, drawn from a shuffled deck (every kind comes up in every round of
    DECK faults, so a short run sees them all)."""

    def __init__(self, manager_pid: int, app_port: int, watch: Watch, until: float,
                 kinds: set):
        self.manager_pid, self.app_port, self.watch, self.until = (manager_pid, app_port,
                                                                   watch, until)
        self.deck_kinds = [k for k in FAULTS for _ in range(FAULTS[k][1]) if k in kinds]
        self.deck: list = []
        self.rng = random.Random()
        self.counts = Counter()
        self.stopped_spans: list = []  # (SIGSTOP time, SIGCONT or death time)
        self.watchdog_waits: list = []  # seconds from SIGSTOP to the worker's death
        self.fill = {"ok": 0, "refused": 0, "unknown": 0}  # the "full" fault's publishes
        self.problems: list = []

    def pick(self) -> tuple[int, int] | None:
        """(pid, worker number) of a live worker, from the last /stats."""
        with self.watch.lock:
            s = self.watch.last
        if not s:
            return None
        rows = [(w["pid"], w["worker"]) for w in s["workers"] if w.get("pid")]
        rows = [r for r in rows if is_worker(r[0], self.manager_pid)]
        return self.rng.choice(rows) if rows else None

    def run(self) -> None:
        time.sleep(1.0)
        while time.monotonic() < self.until and self.deck_kinds:
            target = self.pick()
            if target is not None:
                if not self.deck:
                    self.deck = self.rng.sample(self.deck_kinds, len(self.deck_kinds))
                getattr(self, FAULTS[self.deck.pop()][0])(*target)
            gap = self.rng.uniform(*FAULT_GAP)
            time.sleep(max(0.0, min(gap, self.until - time.monotonic())))

    def signal(self, pid: int, sig: int) -> bool:
        try:
            os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False

    def kill(self, pid: int, n: int) -> None:
        if self.signal(pid, signal.SIGKILL):
            self.counts["SIGKILL"] += 1

    def stop_cont(self, pid: int, n: int) -> None:
        t0 = time.monotonic()
        if not self.signal(pid, signal.SIGSTOP):
            return
        time.sleep(self.rng.uniform(*STOP_FOR))
        if is_worker(pid, self.manager_pid):
            self.signal(pid, signal.SIGCONT)
        self.stopped_spans.append((t0, time.monotonic()))
        self.counts["SIGSTOP then SIGCONT"] += 1

    def stop_for_watchdog(self, pid: int, n: int, fill: bool = False) -> None:
        t0 = time.monotonic()
        if not self.signal(pid, signal.SIGSTOP):
            return
        filler = None
        if fill:
            filler = threading.Thread(target=self.fill_outbox, args=(n,), daemon=True)
            filler.start()
        deadline = t0 + WORKER_TIMEOUT + 5
        while time.monotonic() < deadline and is_worker(pid, self.manager_pid):
            time.sleep(0.05)
        t1 = time.monotonic()
        if is_worker(pid, self.manager_pid):
            self.problems.append(f"the watchdog left worker pid {pid} stopped for "
                                 f"{t1 - t0:.1f} s (--worker-timeout {WORKER_TIMEOUT:g})")
            self.signal(pid, signal.SIGCONT)
        else:
            self.watchdog_waits.append(t1 - t0)
        self.stopped_spans.append((t0, t1))
        if filler is not None:
            filler.join(WORKER_TIMEOUT + 20)
            self.counts["SIGSTOP, outbox filled, left to the watchdog"] += 1
        else:
            self.counts["SIGSTOP left to the watchdog"] += 1

    def stop_and_fill(self, pid: int, n: int) -> None:
        self.stop_for_watchdog(pid, n, fill=True)

    def fill_outbox(self, n: int) -> None:
        """More than the manager's flow mark for the stopped worker n, to an id of its that
        nobody polls: the manager stops reading every app connection until the watchdog has
        killed n and its successor has taken the replay (SPEC: at most --worker-timeout)."""
        k = 0
        while owner(b"soakb%d" % k, WORKERS) != n:
            k += 1
        body = b"b" * FILL_SIZE
        request = b"POST /send/soakb%d HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n%s" \
            % (k, len(body), body)
        answered = 0
        try:
            with socket.create_connection(("127.0.0.1", self.app_port), timeout=5) as sock:
                sock.settimeout(WORKER_TIMEOUT + 15)
                sock.sendall(request * FILL_COUNT)
                data = b""
                while answered < FILL_COUNT:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    while b"\r\n\r\n" in data:
                        head, _, data = data.partition(b"\r\n\r\n")
                        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                        while len(data) < length:
                            data += sock.recv(65536)
                        data = data[length:]
                        answered += 1
                        self.fill["ok" if head.startswith(b"HTTP/1.1 202") else "refused"] += 1
        except (OSError, ValueError, IndexError) as e:
            self.problems.append(f"filling worker {n}'s outbox: {e!r}")
        self.fill["unknown"] += FILL_COUNT - answered


# ---------------------------------------------------------------------------------------------
# The run: start, soak, drain, count
# ---------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, seconds: float, workdir: Path, faults: set):
        self.seconds = seconds
        self.fault_kinds = faults
        self.workdir = workdir
        self.manager = None  # Popen
        self.client = None  # Popen
        self.roles: list = []  # (name, Process, Connection)
        self.problems: list = []
        self.manager_log = workdir / "manager.log"
        self.client_log = workdir / "client.log"
        self.client_json = workdir / "client.json"

    # -- processes ------------------------------------------------------------------------------

    def manager_has(self, option: str) -> bool:
        out = subprocess.run([sys.executable, str(ROOT / "manager.py"), "--help"],
                             capture_output=True, text=True, timeout=30).stdout
        return option in out

    def start_manager(self) -> None:
        self.watchdog = self.manager_has("--worker-timeout")
        extra = ["--worker-timeout", str(WORKER_TIMEOUT)] if self.watchdog else []
        for _ in range(5):  # another program may take the drawn ports between check and bind
            self.base_port = free_port_block(WORKERS + 1)  # the app port right after
            self.app_port = self.base_port + WORKERS
            cmd = [sys.executable, str(ROOT / "manager.py"), "--host", "127.0.0.1",
                   "--workers", str(WORKERS), "--base-port", str(self.base_port),
                   "--app-port", str(self.app_port), "--queue-ttl", str(QUEUE_TTL),
                   "--queue-max", str(QUEUE_MAX), "--header-timeout", str(HEADER_TIMEOUT),
                   "--write-timeout", str(WRITE_TIMEOUT), "--max-message", str(MAX_MESSAGE),
                   "--status-interval", "10", *extra]
            with open(self.manager_log, "w") as out:
                self.manager = subprocess.Popen(cmd, cwd=ROOT, stdout=out,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True,
                                                preexec_fn=die_with_parent)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.manager.poll() is None:
                try:
                    s = get_stats(self.app_port, 2)
                    if all(w["up"] for w in s["workers"]) and len(s["workers"]) == WORKERS:
                        return
                except (OSError, ValueError):
                    pass
                time.sleep(0.1)
            if self.manager.poll() is not None and "cannot listen" in self.manager_log.read_text():
                continue
            raise RuntimeError("the manager did not come up:\n" + self.manager_log.read_text())
        raise RuntimeError("no free ports for the manager")

    def start_client(self, sends: int) -> None:
        cmd = [sys.executable, str(ROOT / "client.py"), "soakp", "127.0.0.1",
               "--conns", str(POPULATION), "--workers", str(WORKERS),
               "--base-port", str(self.base_port), "--procs", str(POPULATION_PROCS),
               "--rate", "2000", "--send", str(sends), "--send-rate", str(POPULATION_RATE),
               "--grace", str(CLIENT_GRACE), "--app-port", str(self.app_port),
               "--max-time", str(self.seconds + 120), "--json", str(self.client_json)]
        with open(self.client_log, "w") as out:
            self.client = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True, preexec_fn=die_with_parent)

    def start_role(self, name: str, role, cfg: dict) -> None:
        ctx = multiprocessing.get_context("fork")
        mine, theirs = ctx.Pipe(duplex=False)
        p = ctx.Process(target=role_main, args=(role, cfg, theirs), daemon=True)
        p.start()
        theirs.close()
        self.roles.append((name, p, mine))

    def role_result(self, name: str, timeout: float) -> dict:
        for n, p, conn in self.roles:
            if n == name:
                if conn.poll(timeout):
                    try:
                        result = conn.recv()
                    except EOFError:
                        result = {"crash": f"{name} died without a result"}
                else:
                    result = {"crash": f"{name} gave no result in {timeout:.0f} s"}
                p.join(5)
                if "crash" in result:
                    self.problems.append(f"{name}: {result['crash']}")
                return result
        raise KeyError(name)

    def stop_all(self) -> None:
        """Whatever happened: every process we started is gone when this returns."""
        for _, p, _ in self.roles:
            if p.is_alive():
                p.kill()
            p.join(5)
        if self.client is not None and self.client.poll() is None:
            try:
                os.killpg(self.client.pid, signal.SIGINT)
                self.client.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.client is not None:
            try:
                os.killpg(self.client.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.client.wait()
        if self.manager is not None:
            try:
                os.killpg(self.manager.pid, signal.SIGCONT)  # a stopped worker cannot exit
                self.manager.send_signal(signal.SIGTERM)
                self.manager.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(self.manager.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.manager.wait()

    # -- the phases -----------------------------------------------------------------------------

    def run(self) -> int:
        self.start_manager()
        log(f"{self.seconds:g} s of chaos; manager pid {self.manager.pid}, workers on "
            f"127.0.0.1:{self.base_port}-{self.base_port + WORKERS - 1}, app port "
            f"{self.app_port}, " + (f"--worker-timeout {WORKER_TIMEOUT:g}" if self.watchdog
                                    else "no watchdog (every SIGSTOP is SIGCONTed)"))
        sends = int(POPULATION_RATE * self.seconds)  # its sends end with the chaos
        self.start_client(sends)
        ramp_until = time.monotonic() + 20
        while time.monotonic() < ramp_until:
            try:
                if get_stats(self.app_port)["totals"]["waiting"] >= POPULATION * 0.95:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        t0 = time.monotonic()
        until = t0 + self.seconds
        cfg = {"app_port": self.app_port, "base_port": self.base_port, "until": until,
               "readers_until": until + QUEUE_TTL + 4}
        # Forked before any thread starts.
        self.start_role("publisher", publisher, cfg)
        self.start_role("floods", floods, cfg)
        stop_watch = threading.Event()
        watch = Watch(self.app_port, stop_watch)
        kinds = set(self.fault_kinds)
        if not self.watchdog and kinds & {"watchdog", "full"}:
            kinds -= {"watchdog", "full"}  # a stopped worker would stall publishing for good
            kinds.add("stop")
        faults = Faults(self.manager.pid, self.app_port, watch, until, kinds)
        threads = [threading.Thread(target=watch.run, daemon=True),
                   threading.Thread(target=faults.run, daemon=True)]
        for t in threads:
            t.start()
        next_line = t0 + 10
        while time.monotonic() < until:
            time.sleep(min(0.5, max(0.0, until - time.monotonic())))
            if time.monotonic() >= next_line:
                next_line += 10
                self.progress(t0, watch, faults)
            if self.manager.poll() is not None:
                self.problems.append(f"the manager exited with {self.manager.returncode}")
                break
        threads[1].join(WORKER_TIMEOUT + 10)
        log(f"chaos over after {time.monotonic() - t0:.0f} s; draining")

        pub = self.role_result("publisher", PUBLISHER_WAIT + 10)
        flo = self.role_result("floods", QUEUE_TTL + 30)
        client = self.wait_client(until)
        drained = self.drain()
        self.check_closed()
        stop_watch.set()
        threads[0].join(STATS_TIMEOUT + 2)
        return self.report(pub, flo, client, drained, watch, faults)

    def progress(self, t0: float, watch: Watch, faults: Faults) -> None:
        s = watch.last or {}
        up = sum(w.get("up", False) for w in s.get("workers", []))
        restarts = sum(w.get("restarts", 0) for w in s.get("workers", []))
        m = s.get("manager", {})
        t = s.get("totals", {})
        log(f"[{time.monotonic() - t0:4.0f}s] faults {sum(faults.counts.values())} "
            f"({', '.join(f'{k} {v}' for k, v in faults.counts.items()) or 'none'}) | "
            f"workers up {up}/{WORKERS}, restarts {restarts} | msgs in "
            f"{m.get('messages_in', 0):,}, delivered {t.get('delivered', 0):,}, queued "
            f"{t.get('queued_messages', 0):,} | conns {t.get('connections', 0):,} | /stats "
            f"{watch.answered}/{watch.asked}, slowest {watch.slowest:.2f} s")

    def wait_client(self, until: float) -> dict:
        deadline = until + 10 + CLIENT_GRACE + 30
        try:
            self.client.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.problems.append("client.py did not finish in time; stopped with SIGINT")
            os.killpg(self.client.pid, signal.SIGINT)
            try:
                self.client.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            return json.loads(self.client_json.read_text())
        except (OSError, ValueError) as e:
            self.problems.append(f"client.py left no summary ({e!r}); its output:\n"
                                 + self.client_log.read_text()[-3000:])
            return {}

    def drain(self) -> dict | None:
        """Until every worker is up and holds no queued message, and the manager holds none:
        past --queue-ttl every message is delivered, expired, dropped or lost."""
        deadline = time.monotonic() + DRAIN_MAX
        s = None
        while time.monotonic() < deadline:
            try:
                s = get_stats(self.app_port)
            except (OSError, ValueError):
                time.sleep(0.5)
                continue
            if (all(w["up"] for w in s["workers"]) and s["totals"]["queued_messages"] == 0
                    and s["manager"]["outbox_messages"] == 0):
                time.sleep(0.5)  # a last look: nothing may still be on its way
                s2 = get_stats(self.app_port)
                if s2["manager"]["messages_in"] == s["manager"]["messages_in"] and \
                        s2["totals"]["queued_messages"] == 0:
                    return s2
            time.sleep(0.5)
        self.problems.append(f"not drained after {DRAIN_MAX:g} s: {s and s['totals']}")
        return s

    def check_closed(self) -> None:
        """Everyone has gone: every comet and app connection must be closed by now (the
        lingering ones after LINGER_TIMEOUT, the slow readers after --write-timeout)."""
        deadline = time.monotonic() + 10
        left = None
        while time.monotonic() < deadline:
            try:
                s = get_stats(self.app_port)
            except (OSError, ValueError):
                time.sleep(0.5)
                continue
            # This /stats request is an app connection too.
            left = (s["totals"]["connections"], s["manager"]["app_connections"] - 1)
            if left == (0, 0):
                return
            time.sleep(0.5)
        self.problems.append(f"connections still open 10 s after everyone left: comet "
                             f"{left and left[0]}, app {left and left[1]}")

    # -- the ledger -----------------------------------------------------------------------------

    def report(self, pub, flo, client, stats, watch, faults) -> int:
        problems = self.problems + faults.problems
        if watch.failures:
            problems.append(f"/stats not answered {len(watch.failures)} times: "
                            f"{watch.failures[:3]}")
        log_text = self.manager_log.read_text(errors="replace")
        for marker in ("Traceback", "internal error", "exited with status"):
            if marker in log_text:
                problems.append(f"the manager's log has {log_text.count(marker)} "
                                f"'{marker}' lines")

        # Faults and inputs.
        log("faults: " + (", ".join(f"{k} {v}" for k, v in faults.counts.items()) or "none")
            + (f"; the watchdog killed stopped workers after {min(faults.watchdog_waits):.1f}"
               f"-{max(faults.watchdog_waits):.1f} s" if faults.watchdog_waits else ""))
        for kind, outcomes in sorted(flo.get("outcomes", {}).items()):
            total = sum(outcomes.values())
            text = ", ".join(f"{o} {n:,}" for o, n in sorted(outcomes.items(),
                                                              key=lambda x: -x[1]))
            log(f"  {kind:<22} {total:>6,}: {text}")
        log(f"  slowloris heads lived at most {flo.get('slowloris_longest', 0):.1f} s "
            f"(--header-timeout {HEADER_TIMEOUT:g})")

        # The stall: publishes in flight while a worker was stopped.
        spans = faults.stopped_spans
        stall = 0.0
        for a, b in zip(pub.get("sent_at", ()), pub.get("answered_at", ()), strict=True):
            if b - a > stall and any(a <= s1 and b >= s0 for s0, s1 in spans):
                stall = b - a
        log(f"publisher: ok {sum(pub.get('ok', {}).values()):,} "
            f"({', '.join(f'{k} {v:,}' for k, v in pub.get('ok', {}).items())}), "
            f"refused {sum(pub.get('refused', {}).values()):,}, unknown {pub.get('unknown', 0)}"
            f", longest publish {pub.get('lat_max', 0):.3f} s")
        if pub.get("errors"):
            log(f"  publisher errors: {dict(pub['errors'])}")
        if pub.get("unknown"):
            problems.append(f"{pub['unknown']} publishes got no reply: the ledger cannot be "
                            f"exact")
        log(f"longest stall any publisher saw while a worker was stopped: {stall:.3f} s "
            f"({len(spans)} stops)")
        if stall > STALL_MAX:
            problems.append(f"a publisher waited {stall:.1f} s for its reply while a worker "
                            f"was stopped: over --worker-timeout {WORKER_TIMEOUT:g} + "
                            f"{STALL_MAX - WORKER_TIMEOUT:g} s")
        fill = faults.fill
        if sum(fill.values()):
            log(f"outbox fillers: ok {fill['ok']:,}, refused {fill['refused']:,}, unknown "
                f"{fill['unknown']:,} ({FILL_COUNT} x {FILL_SIZE // 1024} KiB each time)")
        if fill["unknown"]:
            problems.append(f"{fill['unknown']} outbox-filling publishes got no reply: the "
                            f"ledger cannot be exact")
        log(f"/stats answered {watch.answered}/{watch.asked}, slowest {watch.slowest:.2f} s")

        # The ledger.
        pop_sent, pop_recv = client.get("sent", 0), client.get("received", 0)
        log(f"population: {POPULATION:,} ids, client.py sent {pop_sent:,} received "
            f"{pop_recv:,} duplicates {client.get('duplicates', 0):,} unsendable "
            f"{client.get('unsendable', 0):,}, answers {client.get('status', {})}, failed "
            f"{client.get('failed_total', 0):,}")
        ok = pub.get("ok", {})
        ok_tokens = set(pub.get("ok_tokens", []))
        seen = flo.get("slow_tokens", [])
        slow_delivered = len(set(seen) & ok_tokens)
        if set(seen) - ok_tokens:
            problems.append(f"slow readers saw {len(set(seen) - ok_tokens)} messages never "
                            f"accepted")
        log(f"slow readers: {slow_delivered:,} of {len(ok_tokens):,} big messages seen, "
            f"{len(seen) - len(set(seen)):,} seen twice")
        broadcasts = ok.get("broadcast", 0)
        sent = pop_sent + sum(ok.values()) - broadcasts + fill["ok"]
        delivered = pop_recv + slow_delivered
        totals = (stats or {}).get("totals", {})
        expired = totals.get("expired_undelivered", 0)
        dropped = totals.get("dropped_undelivered", 0)
        lost = totals.get("lost", 0)
        if stats and "lost" not in totals:
            log("the manager has no totals.lost yet: counted as 0")
        restarts = sum(w.get("restarts", 0) for w in (stats or {}).get("workers", []))
        deaths = faults.counts["SIGKILL"] + len(faults.watchdog_waits)
        if restarts != deaths:
            problems.append(f"{restarts} worker restarts for {deaths} workers killed here or "
                            f"by the watchdog: a worker died by itself (see the manager's log)")
        if client.get("gave_up"):
            problems.append(f"client.py gave up {client['gave_up']} ids (a 409 or another 4xx "
                            f"to a valid poll): {client.get('status')}")
        messages_in = (stats or {}).get("manager", {}).get("messages_in", 0)
        if messages_in != sent + broadcasts:
            problems.append(f"manager.messages_in {messages_in:,} != ours {sent + broadcasts:,}"
                            f" (sent {sent:,} + broadcasts {broadcasts:,})")
        else:
            log(f"manager.messages_in {messages_in:,} = sent {sent:,} + broadcasts "
                f"{broadcasts:,}")
        unaccounted = sent - delivered - expired - dropped - lost
        if unaccounted < 0:
            log(f"overcounted={-unaccounted} (messages counted twice: at-least-once replays "
                f"after a worker death; client duplicates {client.get('duplicates', 0)}, "
                f"worker deaths {deaths})")
        for p in problems:
            log(f"PROBLEM: {p}")
        log(f"sent={sent} delivered={delivered} expired={expired} dropped={dropped} "
            f"lost_in_killed_workers={lost} unaccounted={unaccounted}")
        return 0 if unaccounted == 0 and not problems else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="MegaComet soak test (see the module docstring)")
    p.add_argument("--seconds", type=float,
                   default=float(os.environ.get("SOAK_SECONDS", DEFAULT_SECONDS)),
                   help="seconds of chaos (default: $SOAK_SECONDS, else 300)")
    p.add_argument("--faults", default=",".join(FAULTS),
                   help=f"comma list of {', '.join(FAULTS)} (default: all; without the "
                        f"manager's --worker-timeout, watchdog becomes stop)")
    p.add_argument("--logs", metavar="DIR",
                   help="keep the manager's and client.py's output here (default: a "
                        "temporary directory, removed at the end)")
    args = p.parse_args(argv)
    if not 5 <= args.seconds <= 24 * 3600:
        p.error("--seconds must be between 5 and 86400")
    faults = {f.strip() for f in args.faults.split(",") if f.strip()}
    if faults - set(FAULTS):
        p.error(f"unknown faults {sorted(faults - set(FAULTS))}; known: {', '.join(FAULTS)}")

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(args.logs or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        soak = Soak(args.seconds, workdir, faults)
        try:
            return soak.run()
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            soak.stop_all()
            if soak.manager is not None and soak.manager.returncode not in (0, None):
                log(f"manager exit status {soak.manager.returncode}")


if __name__ == "__main__":
    sys.exit(main())
