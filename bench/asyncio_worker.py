"""A plain asyncio comet worker: the baseline that bench/memory.py and bench/cpu.py measure
MegaComet's server.py against.

    python bench/asyncio_worker.py --port 8000 --app-port 9000 [--host 127.0.0.1]

It is the same worker written the way asyncio's documentation suggests: an asyncio.Protocol
per connection, the loop's own transports, one dict `waiters` id -> transport. It is meant to
be a fair, idiomatic implementation (the protocol even has __slots__), not a strawman; it
does *less* than server.py (no header timeout, no poll timeout, no JSONP, no CORS preflight,
one waiter per id, no redirect since it is a single worker, no message TTL), so its figures
flatter it if anything.

Comet port (`--port`): `GET /<id>.js[?query] HTTP/1.x` + headers. A queued message is answered
at once; otherwise the connection waits in `waiters[id]` until a message arrives, gets
`200` with it and is closed. A second poll on the same id pushes the first out with `409`.
A client hang-up forgets the connection. Bad requests get 400/404/405/431 and a close.

App port (`--app-port`), like manager.py's, told apart by the first byte:
- `0x02`: the original's binary frames, `0x02 <id> 0x00 <message> 0x00`, repeated; no reply.
- a letter: HTTP/1.1 keep-alive, `POST /send/<id>` (body = message) -> `202`,
  `GET /stats` -> `200` `{"waiting", "connections", "accepted", "delivered", "queued",
  "pid", "rss_bytes"}`.

uvloop_worker.py runs this very code on uvloop's event loop.
"""

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import sys
from collections import deque

ID_RE = re.compile(rb"[A-Za-z0-9_~-]{1,128}")
MAX_HEAD = 8192
QUEUE_MAX = 100
TEXT = b"text/plain; charset=utf-8"
TAIL = (b"Cache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\n"
        b"Connection: close\r\n\r\n")
REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 404: b"Not Found",
           405: b"Method Not Allowed", 409: b"Conflict", 411: b"Length Required",
           431: b"Request Header Fields Too Large"}


def response(status: int, body: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nContent-Type: %s\r\n%s%s" % (
        status, REASONS[status], len(body), TEXT, TAIL, body)


class Hub:
    """What the worker holds: the waiting connections and the undelivered messages."""

    def __init__(self):
        self.waiters: dict = {}  # id -> transport of the connection waiting on it
        self.queues: dict = {}  # id -> deque of messages for an id nobody waits on
        self.connections = 0
        self.accepted = 0
        self.delivered = 0

    def deliver(self, id_: bytes, message: bytes) -> None:
        transport = self.waiters.pop(id_, None)
        if transport is not None and not transport.is_closing():
            transport.write(response(200, message))
            transport.close()
            self.delivered += 1
            return
        queue = self.queues.get(id_)
        if queue is None:
            queue = self.queues[id_] = deque(maxlen=QUEUE_MAX)
        queue.append(message)

    def stats(self) -> dict:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * resource.getpagesize()
        return {"waiting": len(self.waiters), "connections": self.connections,
                "accepted": self.accepted, "delivered": self.delivered,
                "queued": sum(len(q) for q in self.queues.values()),
                "pid": os.getpid(), "rss_bytes": rss}


class CometProtocol(asyncio.Protocol):
    __slots__ = ("hub", "transport", "buf", "id")

    def __init__(self, hub: Hub):
        self.hub = hub
        self.transport = None
        self.buf = b""  # request head so far; None once the request is handled
        self.id = None  # the id this connection waits on

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.hub.connections += 1
        self.hub.accepted += 1

    def data_received(self, data: bytes) -> None:
        if self.buf is None:
            return  # bytes after the request: ignored, as server.py does
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self.reply(431, b"request head too large\n")
            else:
                self.buf = buf
            return
        self.buf = None
        self.request(buf[:end])

    def request(self, head: bytes) -> None:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            return self.reply(400, b"malformed request line\n")
        method, target, _ = parts
        if method != b"GET":
            return self.reply(405, b"only GET is served\n")
        path = target.partition(b"?")[0]
        if not path.endswith(b".js") or path.find(b"/", 1) != -1:
            return self.reply(404, b"not found: poll GET /<id>.js\n")
        id_ = path[1:-3]
        if ID_RE.fullmatch(id_) is None:
            return self.reply(400, b"invalid id\n")
        self.poll(id_)

    def poll(self, id_: bytes) -> None:
        """A valid poll of id_: its oldest queued message now, or wait for the next one."""
        hub = self.hub
        queue = hub.queues.get(id_)
        if queue:
            message = queue.popleft()
            if not queue:
                del hub.queues[id_]
            hub.delivered += 1
            return self.reply(200, message)
        old = hub.waiters.get(id_)
        if old is not None:
            old.write(response(409, b"pushed out by a newer poll\n"))
            old.close()
        hub.waiters[id_] = self.transport
        self.id = id_

    def reply(self, status: int, body: bytes) -> None:
        self.transport.write(response(status, body))
        self.transport.close()

    def connection_lost(self, exc) -> None:
        hub = self.hub
        hub.connections -= 1
        if self.id is not None and hub.waiters.get(self.id) is self.transport:
            del hub.waiters[self.id]


class AppProtocol(asyncio.Protocol):
    """Binary frames or HTTP/1.1 keep-alive, picked by the first byte."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.transport = None
        self.buf = b""
        self.mode = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.mode is None:
            self.mode = "binary" if buf[0] == 0x02 else "http"
        if self.mode == "binary":
            self.buf = self.frames(buf)
        else:
            self.buf = self.http(buf)

    def frames(self, buf: bytes) -> bytes:
        pos, deliver = 0, self.hub.deliver
        while True:
            if pos >= len(buf):
                return b""
            if buf[pos] != 0x02:
                self.transport.close()
                return b""
            idend = buf.find(b"\x00", pos + 1)
            if idend < 0:
                return buf[pos:]
            end = buf.find(b"\x00", idend + 1)
            if end < 0:
                return buf[pos:]
            deliver(buf[pos + 1:idend], buf[idend + 1:end])
            pos = end + 1

    def http(self, buf: bytes) -> bytes:
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return buf
            lines = buf[:end].split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                self.transport.write(response(400))
                self.transport.close()
                return b""
            method, path, _ = parts
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            start = end + 4
            if len(buf) - start < length:
                return buf
            body = buf[start:start + length]
            buf = buf[start + length:]
            if method == b"POST" and path.startswith(b"/send/"):
                id_ = path[6:]
                if ID_RE.fullmatch(id_) is None:
                    self.reply(400, b'{"ok": false}')
                    continue
                self.hub.deliver(id_, body)
                self.reply(202, b'{"ok": true}')
            elif method == b"GET" and path == b"/stats":
                self.reply(200, json.dumps(self.hub.stats()).encode())
            else:
                self.reply(404, b'{"ok": false}')

    def reply(self, status: int, body: bytes) -> None:
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (
                                 status, REASONS[status], len(body), body))


async def serve(opts) -> None:
    loop = asyncio.get_running_loop()
    hub = Hub()
    comet = await loop.create_server(lambda: CometProtocol(hub), opts.host, opts.port,
                                     backlog=opts.backlog)
    app = await loop.create_server(lambda: AppProtocol(hub), "127.0.0.1", opts.app_port,
                                   backlog=opts.backlog)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{type(loop).__module__} worker pid {os.getpid()} on {opts.host}:{opts.port}, "
          f"app port {opts.app_port}", file=sys.stderr, flush=True)
    await stop.wait()
    comet.close()
    app.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--app-port", type=int, default=9000)
    p.add_argument("--backlog", type=int, default=4096)
    return p.parse_args(argv)


def main(argv=None, loop_factory=None) -> int:
    opts = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
