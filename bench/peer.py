"""The peer: a plain asyncio implementation of MegaComet's manager/worker design, on asyncio's
event loop or on uvloop's. `make bench` (bench/suite.py) measures the project against it.

    python bench/peer.py [--workers W] [--host 127.0.0.1] [--base-port 8000]
                         [--app-port 9000] [--loop asyncio|uvloop]

It is the design of manager.py + server.py written the way asyncio's documentation suggests,
meant to be fair and idiomatic, not a strawman:

- The manager starts W worker processes (this file with --worker n), pins worker n to
  cpus[n % len(cpus)] as manager.py does, and links each by a UNIX socket pair (an
  asyncio.Protocol at both ends) carrying length-prefixed frames:
      kind (1 byte) | id length (1) | payload length (4, big-endian) | id | payload
  kinds M (a message for an id), B (a broadcast), S (manager -> worker: send your figures;
  worker -> manager: the figures as JSON).
- Worker n listens on base_port + n (its own listening socket, SO_REUSEADDR), one
  asyncio.Protocol per connection (bench/asyncio_worker.py's CometProtocol, with __slots__):
  `GET /<id>.js` waits for the next message of the id, or gets its oldest queued one at once;
  the answer is `200` with the message and closes (server.py's head minus X-Message-Id and
  the Expose-Headers line); an id another worker owns (x31(id) % W, the contract's hash) gets
  `307` to the owner's port; `GET /_info` answers {"worker": n, "workers": W, "base_port": P},
  so client.py works unchanged.
- The app port (127.0.0.1, asyncio streams as manager.py's): the original's binary frames
  (0x02 <id> 0x00 <message> 0x00, repeated, no reply), or HTTP/1.1 keep-alive: POST
  /send/<id> and POST /broadcast answer 202, GET /stats 200 with the workers' figures (asked
  of each worker over its link) and their totals {connections, waiting, delivered, accepted}.
  The frames of one app read are joined into one link write per worker.

It does less than the project (no message ids or history, one waiter per id, no timeouts,
no restarts, no backpressure, no JSON lines, no auth, no CORS preflight, no SSE), so its
figures flatter it if anything. Needs uvloop only with --loop uvloop (a dev dependency).
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
from collections import deque
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))
from asyncio_worker import ID_RE, MAX_HEAD, CometProtocol, Hub, response  # noqa: E402

from server import owner  # noqa: E402  (the contract's x31 hash, the project's own code)

HEAD = struct.Struct("!cBI")
HEAD_SIZE = HEAD.size
MSG, BROADCAST, STATS = b"M", b"B", b"S"
STATS_ASK = HEAD.pack(STATS, 0, 0)
MAX_MESSAGE = 65536
APP_READ = 256 * 1024
STATS_TIMEOUT = 5.0
SHUTDOWN_GRACE = 3.0
TOTALS = ("connections", "waiting", "delivered", "accepted")


def frame(kind: bytes, id_: bytes, payload: bytes) -> bytes:
    return HEAD.pack(kind, len(id_), len(payload)) + id_ + payload


def frames(buf: bytes):
    """The whole frames at the start of buf: ([(kind, id, payload), ...], bytes used)."""
    out, pos, size = [], 0, len(buf)
    unpack = HEAD.unpack_from
    while size - pos >= HEAD_SIZE:
        kind, idlen, length = unpack(buf, pos)
        start = pos + HEAD_SIZE
        mid = start + idlen
        end = mid + length
        if end > size:
            break
        out.append((kind, buf[start:mid], buf[mid:end]))
        pos = end
    return out, pos


def new_loop_factory(name: str):
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    return None


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


class PeerHub(Hub):
    """asyncio_worker's Hub, plus the worker's place among W and broadcasts."""

    def __init__(self, n: int, workers: int, base_port: int):
        super().__init__()
        self.n, self.workers, self.base_port = n, workers, base_port
        info = json.dumps({"worker": n, "workers": workers, "base_port": base_port}).encode()
        self.info = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/json"
                     b"\r\nCache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(info), info))

    def broadcast(self, message: bytes) -> None:
        """To every poll waiting at this moment (queued for nobody)."""
        data = response(200, message)
        waiters, self.waiters = self.waiters, {}
        for transport in waiters.values():
            if not transport.is_closing():
                transport.write(data)
                transport.close()
                self.delivered += 1

    def stats(self) -> dict:
        return {"worker": self.n, **super().stats()}


class PeerComet(CometProtocol):
    """A comet connection of worker n: asyncio_worker's, plus /_info and the 307."""

    __slots__ = ()

    def request(self, head: bytes) -> None:
        eol = head.find(b"\r\n")
        parts = (head if eol < 0 else head[:eol]).split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            return self.reply(400, b"malformed request line\n")
        method, target, _ = parts
        if method != b"GET":
            return self.reply(405, b"only GET is served\n")
        path = target.partition(b"?")[0]
        hub = self.hub
        if path == b"/_info":
            self.transport.write(hub.info)
            return self.transport.close()
        if not path.endswith(b".js") or path.find(b"/", 1) != -1:
            return self.reply(404, b"not found: poll GET /<id>.js\n")
        id_ = path[1:-3]
        if ID_RE.fullmatch(id_) is None:
            return self.reply(400, b"invalid id\n")
        n = owner(id_, hub.workers)
        if n != hub.n:
            return self.redirect(head, target, hub.base_port + n)
        self.poll(id_)

    def redirect(self, head: bytes, target: bytes, port: int) -> None:
        host = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"host":
                host = value.strip()
        if host:
            host = host[:host.index(b"]") + 1] if host.startswith(b"[") else \
                host.split(b":")[0]
        else:
            host = self.transport.get_extra_info("sockname")[0].encode()
        self.transport.write(b"HTTP/1.1 307 Temporary Redirect\r\nContent-Length: 0\r\n"
                             b"Location: http://%s:%d%s\r\nCache-Control: no-store\r\n"
                             b"Connection: close\r\n\r\n" % (host, port, target))
        self.transport.close()


class WorkerLink(asyncio.Protocol):
    """The worker's end of its link: frames in, figures out (asked with S)."""

    def __init__(self, hub: PeerHub, stop: asyncio.Event):
        self.hub, self.stop = hub, stop
        self.transport = None
        self.buf = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        got, used = frames(buf)
        self.buf = buf[used:]
        hub = self.hub
        for kind, id_, payload in got:
            if kind == MSG:
                hub.deliver(id_, payload)
            elif kind == BROADCAST:
                hub.broadcast(payload)
            elif kind == STATS:
                self.transport.write(frame(STATS, b"", json.dumps(hub.stats()).encode()))

    def connection_lost(self, exc) -> None:
        self.stop.set()  # the manager is gone


async def worker_main(opts) -> None:
    loop = asyncio.get_running_loop()
    hub = PeerHub(opts.worker, opts.workers, opts.base_port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    comet = await loop.create_server(lambda: PeerComet(hub), opts.host,
                                     opts.base_port + opts.worker, backlog=opts.backlog,
                                     reuse_address=True)
    sock = socket.socket(fileno=opts.link_fd)
    sock.setblocking(False)
    await loop.connect_accepted_socket(lambda: WorkerLink(hub, stop), sock)
    await stop.wait()
    comet.close()


# ---------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------


class ManagerLink(asyncio.Protocol):
    """The manager's end of worker n's link."""

    def __init__(self, n: int):
        self.n = n
        self.transport = None
        self.buf = b""
        self.asked: deque = deque()  # futures waiting for S replies, in order
        self.stopping = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def ask_stats(self) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self.transport is None or self.transport.is_closing():
            fut.set_exception(ConnectionError(f"worker {self.n} is gone"))
        else:
            self.asked.append(fut)
            self.transport.write(STATS_ASK)
        return fut

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        got, used = frames(buf)
        self.buf = buf[used:]
        for kind, _, payload in got:
            if kind == STATS and self.asked:
                fut = self.asked.popleft()
                if not fut.done():
                    fut.set_result(json.loads(payload))

    def connection_lost(self, exc) -> None:
        self.transport = None
        if not self.stopping:
            print(f"peer: worker {self.n}'s link closed (no restarts here)", file=sys.stderr,
                  flush=True)
        while self.asked:
            fut = self.asked.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError(f"worker {self.n} is gone"))


class Manager:
    def __init__(self, opts, procs: list, links: list):
        self.opts = opts
        self.procs = procs
        self.links = links
        self.workers = len(links)
        self.messages_in = 0
        self.bad_frames = 0

    # -- routing -----------------------------------------------------------------------------

    def send(self, id_: bytes, message: bytes) -> None:
        self.messages_in += 1
        self.links[owner(id_, self.workers)].write(frame(MSG, id_, message))

    def broadcast(self, message: bytes) -> None:
        self.messages_in += 1
        data = frame(BROADCAST, b"", message)
        for lk in self.links:
            lk.write(data)

    async def stats(self) -> dict:
        rows = []
        answers = await asyncio.gather(
            *(asyncio.wait_for(lk.ask_stats(), STATS_TIMEOUT) for lk in self.links),
            return_exceptions=True)
        for lk, proc, answer in zip(self.links, self.procs, answers, strict=True):
            row = {"worker": lk.n, "pid": proc.pid, "port": self.opts.base_port + lk.n,
                   "up": not isinstance(answer, BaseException)}
            row.update({k: 0 for k in TOTALS} if isinstance(answer, BaseException) else answer)
            row["pid"] = proc.pid
            rows.append(row)
        totals = {k: sum(r[k] for r in rows) for k in TOTALS}
        return {"workers": rows, "totals": totals,
                "manager": {"pid": os.getpid(), "messages_in": self.messages_in,
                            "app_rejected": self.bad_frames}}

    # -- the app port ------------------------------------------------------------------------

    async def app_connection(self, reader, writer) -> None:
        try:
            first = await reader.read(APP_READ)
            if first[:1] == b"\x02":
                await self.serve_binary(reader, first)
            elif first[:1].isalpha():
                await self.serve_http(reader, writer, first)
        except (ConnectionError, ValueError):
            pass  # gone, or a Content-Length that is not a number
        finally:
            writer.close()

    async def serve_binary(self, reader, buf: bytes) -> None:
        """0x02 <id> 0x00 <message> 0x00, repeated; one link write per worker per read."""
        workers, links = self.workers, self.links
        while True:
            out: dict = {}
            pos, size = 0, len(buf)
            while pos < size:
                if buf[pos] != 0x02:
                    self.bad_frames += 1
                    return
                idend = buf.find(b"\x00", pos + 1)
                end = buf.find(b"\x00", idend + 1) if idend >= 0 else -1
                if end < 0:
                    if size - pos > MAX_MESSAGE + 256:
                        self.bad_frames += 1
                        return
                    break
                id_, message = buf[pos + 1:idend], buf[idend + 1:end]
                if ID_RE.fullmatch(id_) is None or len(message) > MAX_MESSAGE:
                    self.bad_frames += 1
                    return
                n = owner(id_, workers)
                part = out.get(n)
                if part is None:
                    part = out[n] = []
                part.append(frame(MSG, id_, message))
                pos = end + 1
            self.messages_in += sum(len(v) for v in out.values())
            for n, part in out.items():
                links[n].write(b"".join(part))
            data = await reader.read(APP_READ)
            if not data:
                return
            buf = buf[pos:] + data

    async def serve_http(self, reader, writer, buf: bytes) -> None:
        """HTTP/1.1 keep-alive: POST /send/<id>, POST /broadcast, GET /stats."""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    writer.write(app_reply(431, {"ok": False}, False))
                    return
                data = await reader.read(APP_READ)
                if not data:
                    return
                buf += data
                continue
            lines = buf[:end].split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                writer.write(app_reply(400, {"ok": False}, False))
                return
            method, path, _ = parts
            length, keep = 0, True
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    keep = False
            start = end + 4
            while len(buf) < start + length:
                data = await reader.read(APP_READ)
                if not data:
                    return
                buf += data
            body, buf = buf[start:start + length], buf[start + length:]
            if method == b"POST" and path.startswith(b"/send/"):
                id_ = path[6:]
                if ID_RE.fullmatch(id_) is None or length > MAX_MESSAGE:
                    writer.write(app_reply(400, {"ok": False, "error": "invalid"}, keep))
                else:
                    self.send(id_, body)
                    writer.write(ACCEPTED_KEEP if keep else ACCEPTED_CLOSE)
            elif method == b"POST" and path == b"/broadcast":
                self.broadcast(body)
                writer.write(ACCEPTED_KEEP if keep else ACCEPTED_CLOSE)
            elif method == b"GET" and path == b"/stats":
                writer.write(app_reply(200, await self.stats(), keep))
            else:
                writer.write(app_reply(404, {"ok": False, "error": "not found"}, keep))
            if not keep:
                await writer.drain()
                return
            if not buf:
                await writer.drain()


def app_reply(status: int, body: dict, keep: bool) -> bytes:
    data = json.dumps(body).encode()
    reason = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 404: b"Not Found",
              431: b"Request Header Fields Too Large"}[status]
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
        b"Connection: %s\r\n\r\n%s" % (status, reason, len(data),
                                        b"keep-alive" if keep else b"close", data)


ACCEPTED_KEEP = app_reply(202, {"ok": True}, True)
ACCEPTED_CLOSE = app_reply(202, {"ok": True}, False)


def spawn_workers(opts) -> tuple[list, list]:
    """W processes, each with its end of a socket pair, pinned like manager.py's workers."""
    cpus = sorted(os.sched_getaffinity(0))
    procs, socks = [], []
    for n in range(opts.workers):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n),
               "--workers", str(opts.workers), "--host", opts.host,
               "--base-port", str(opts.base_port), "--backlog", str(opts.backlog),
               "--loop", opts.loop, "--link-fd", str(theirs.fileno())]
        proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        try:
            os.sched_setaffinity(proc.pid, {cpus[n % len(cpus)]})
        except OSError:
            pass
        procs.append(proc)
        socks.append(mine)
    return procs, socks


async def manager_main(opts, procs: list, socks: list) -> None:
    loop = asyncio.get_running_loop()
    links = []
    for n, sock in enumerate(socks):
        sock.setblocking(False)
        _, lk = await loop.connect_accepted_socket(lambda n=n: ManagerLink(n), sock)
        links.append(lk)
    manager = Manager(opts, procs, links)
    app = await asyncio.start_server(manager.app_connection, opts.app_host, opts.app_port,
                                     backlog=opts.backlog, limit=APP_READ)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"peer ({opts.loop}) manager pid {os.getpid()}: {opts.workers} workers on "
          f"{opts.host}:{opts.base_port}..{opts.base_port + opts.workers - 1}, app port "
          f"{opts.app_host}:{opts.app_port}", file=sys.stderr, flush=True)
    await stop.wait()
    app.close()
    for lk in links:
        lk.stopping = True
        if lk.transport is not None:
            lk.transport.close()


def stop_workers(procs: list) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=SHUTDOWN_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--base-port", type=int, default=8000)
    p.add_argument("--app-host", default="127.0.0.1")
    p.add_argument("--app-port", type=int, default=9000)
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--link-fd", type=int, default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.workers < 1:
        p.error("--workers must be at least 1")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    raise_nofile()
    factory = new_loop_factory(opts.loop)
    if opts.worker is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the manager decides
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(worker_main(opts))
        return 0
    procs, socks = spawn_workers(opts)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(manager_main(opts, procs, socks))
    finally:
        stop_workers(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
