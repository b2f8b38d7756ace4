"""MegaComet manager: starts the workers, keeps them alive, and routes the app's messages.

    python manager.py [--workers W] [--base-port 8000] [--app-port 9000] ...

Theory of operation
-------------------
The manager owns everything that must outlive a worker: the listening socket of every comet
port (created here, inherited by worker n as fd 3, so a restarted worker serves the same port
and connections arriving meanwhile wait in the backlog) and the app port. Worker n is pinned
to CPU cpus[n % len(cpus)] and linked to the manager by a UNIX stream socket (fd 4 in the
worker); when the link closes the worker exits, so workers never outlive the manager.

The app port takes three protocols, told apart by the first byte of a connection: 0x02
starts the original's binary frames, `{` JSON lines, a letter HTTP/1.1. Every accepted message
is routed to the worker that owns its id (server.owner) as one link frame.

Supervision follows gunicorn's arbiter: signal handlers only wake the loop (asyncio's
add_signal_handler), the loop reaps children with waitpid(WNOHANG) until none is left and
respawns the missing ones; exit statuses become readable lines. A worker that cannot even boot
exits with server.EXIT_BOOT_ERROR, and the manager stops instead of restart-looping.

Delivery promises (the README has the full list): a message the manager accepted is written
to its worker's link, or held here while that worker restarts (up to --queue-bytes per
worker). Every frame written is kept until the worker acknowledges it, and replayed to the
successor of a worker that died first. When a link's buffer is full, or a held queue is, the
manager stops reading every app connection until it drains: a burst slows the publisher
instead of being dropped. Lost are only: what a dying worker had queued, what --queue-ttl,
--queue-max and --queue-bytes drop (counted), and a message written to a client that vanished
without a FIN while we had not yet noticed (keepalive reaps those).
"""

import argparse
import asyncio
import fcntl
import hmac
import json
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

import server
from server import (
    ACK,
    ACK_BODY,
    BROADCAST,
    LINK_FD,
    LINK_HEAD,
    LISTEN_FD,
    MSG,
    STATS,
    HTTPError,
    parse_request,
    valid_id,
)
from tuning.check import manager_capacity_line, raise_nofile

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

SERVER_PY = str(Path(__file__).resolve().parent / "server.py")
LINK_HIGH_WATER = 4 * 1024 * 1024  # bytes buffered for one worker before the app is paused
LINK_LOW_WATER = 1024 * 1024  # ... and resumed
APP_READ_SIZE = 256 * 1024
APP_HEAD_MAX = 8192  # app HTTP request heads, same limit as the comet ports
STATS_TIMEOUT = 1.0  # a worker that does not answer by then is shown with its last figures
QUICK_DEATH = 1.0  # a worker dying younger than this is crash-looping: restart after a pause
RESTART_PAUSE = 0.5  # keeps "restarted within 1 s" while not burning a CPU on a crash loop
SHUTDOWN_GRACE = 3.0  # SIGTERM, then SIGKILL after this; the whole shutdown fits in 5 s
APP_REASONS = {**server.REASONS, 202: b"Accepted"}
STAT_FIELDS = ("connections", "waiting", "queued_messages", "queued_bytes", "delivered",
               "expired", "dropped", "rejected", "restarts", "rss_bytes", "accepted")


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = " (out of memory?)" if sig == signal.SIGKILL else ""
        return f"killed by {signal.Signals(sig).name}{why}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def http_reply(status: int, body: dict, keep: bool) -> bytes:
    """A whole app-port HTTP response with a JSON body."""
    data = json.dumps(body).encode()
    extra = b""
    if status == 401:
        extra = b"WWW-Authenticate: Bearer\r\n"
    elif status == 405:
        extra = b"Allow: GET\r\n" if body.get("error") == "use GET" else b"Allow: POST\r\n"
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s" \
        b"Connection: %s\r\n\r\n%s" % (status, APP_REASONS.get(status, b""), len(data), extra,
                                        b"keep-alive" if keep else b"close", data)


ACCEPTED_KEEP = http_reply(202, {"ok": True}, True)  # the answer to nearly every publish


def high_dup(fd: int) -> int:
    """A copy of fd numbered 10 or more: posix_spawn's dup2 onto fds 3 and 4 must not find its
    sources there (dup2 onto itself would keep close-on-exec)."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def frame(kind: bytes, id_: bytes, message: bytes) -> bytes:
    return LINK_HEAD.pack(kind, len(id_), len(message)) + id_ + message


# ---------------------------------------------------------------------------------------------
# Workers and their links
# ---------------------------------------------------------------------------------------------


class Slot:
    """Worker n: its CPU, port and listening socket, which outlive the process in it."""

    def __init__(self, n: int, cpu: int, port: int, listener: socket.socket):
        self.n, self.cpu, self.port, self.listener = n, cpu, port, listener
        self.pid = None
        self.started = 0.0
        self.restarts = 0
        self.link = None  # its Link while the worker is up
        self.outgoing: list = []  # frames for the link, written at the end of this loop pass
        self.held: deque = deque()  # frames for a worker that is restarting
        self.held_bytes = 0
        self.pending_stats: deque = deque()  # futures answered by the worker's STATS frames
        self.last_stats: dict = {}
        self.base_rss = 0


class Link(asyncio.Protocol):
    """The manager's end of one worker's link.

    Every frame written is kept in `unacked` until the worker acknowledges the bytes it has
    read and acted on; if the worker dies first, those frames go back to the front of the
    slot's held queue and its successor gets them. So a worker's death loses no message still
    on its way to it; one it had acted on but not yet acknowledged (at most one read) may be
    delivered twice."""

    def __init__(self, manager: "Manager", slot: Slot):
        self.manager, self.slot = manager, slot
        self.transport = None
        self.buf = b""
        self.sent = 0  # bytes written to this link, in all
        self.unacked: deque = deque()  # (self.sent after them, [frames])

    def alive(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, frames: list) -> None:
        data = b"".join(frames)
        self.transport.write(data)
        self.sent += len(data)
        self.unacked.append((self.sent, frames))

    def connection_made(self, transport) -> None:
        slot = self.slot
        self.transport = transport
        transport.set_write_buffer_limits(high=LINK_HIGH_WATER, low=LINK_LOW_WATER)
        slot.link = self
        if slot.held:
            self.send(list(slot.held))
            slot.held.clear()
            slot.held_bytes = 0
        self.manager.unblock(("held", slot.n))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        pos = 0
        while len(buf) - pos >= LINK_HEAD.size:
            kind, idlen, size = LINK_HEAD.unpack_from(buf, pos)
            end = pos + LINK_HEAD.size + idlen + size
            if end > len(buf):
                break
            if kind == ACK:
                done = ACK_BODY.unpack_from(buf, end - size)[0]
                while self.unacked and self.unacked[0][0] <= done:
                    self.unacked.popleft()
            elif kind == STATS:
                self.stats_received(json.loads(buf[end - size:end]))
            pos = end
        self.buf = buf[pos:]

    def stats_received(self, stats: dict) -> None:
        slot = self.slot
        if not slot.base_rss or stats["connections"] == 0:
            slot.base_rss = stats["rss_bytes"]
        slot.last_stats = stats
        if slot.pending_stats:
            fut = slot.pending_stats.popleft()
            if not fut.done():
                fut.set_result(stats)

    def pause_writing(self) -> None:
        self.manager.block(("link", self.slot.n))

    def resume_writing(self) -> None:
        self.manager.unblock(("link", self.slot.n))

    def connection_lost(self, exc) -> None:
        slot = self.slot
        if slot.link is self:
            slot.link = None
            while slot.pending_stats:
                fut = slot.pending_stats.popleft()
                if not fut.done():
                    fut.set_result(None)
        replay = [f for _, frames in self.unacked for f in frames if f[:1] != STATS]
        self.unacked.clear()
        self.manager.replay(slot, replay)
        self.manager.unblock(("link", slot.n))


# ---------------------------------------------------------------------------------------------
# The manager: supervision, routing, stats
# ---------------------------------------------------------------------------------------------


class Manager:
    def __init__(self, opts):
        self.opts = opts
        self.cpus = sorted(os.sched_getaffinity(0))
        self.slots: list = []
        self.stopping = False
        self.exit_code = 0
        self.flow = asyncio.Event()  # set while app connections may be read
        self.flow.set()
        self.flush_soon = False
        self.blocked: set = set()  # why the flow is stopped: ("link", n) / ("held", n)
        self.messages_in = 0
        self.app_rejected = 0
        self.app_connections = 0
        self.done = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    # -- backpressure ------------------------------------------------------------------------

    def block(self, reason) -> None:
        self.blocked.add(reason)
        self.flow.clear()

    def unblock(self, reason) -> None:
        self.blocked.discard(reason)
        if not self.blocked:
            self.flow.set()

    # -- routing -----------------------------------------------------------------------------

    def send(self, id_: bytes, message: bytes) -> None:
        self.messages_in += 1
        self.put(self.slots[server.owner(id_, len(self.slots))], frame(MSG, id_, message))

    def broadcast(self, message: bytes) -> None:
        self.messages_in += 1
        data = frame(BROADCAST, b"", message)
        for slot in self.slots:
            self.put(slot, data)

    def put(self, slot: Slot, data: bytes) -> None:
        """Queue a frame for a worker. Frames are written once per loop pass, joined: one
        send() for a whole read of binary frames instead of one per message."""
        link = slot.link
        if slot.outgoing or (link is not None and link.alive()):  # outgoing keeps the order
            slot.outgoing.append(data)
            if not self.flush_soon:
                self.flush_soon = True
                self.loop.call_soon(self.flush_links)
            return
        self.hold(slot, data)

    def hold(self, slot: Slot, data: bytes) -> None:
        if data[:1] == STATS:
            return  # a stats request is answered by the worker that got it, or not at all
        slot.held.append(data)
        slot.held_bytes += len(data)
        if slot.held_bytes > self.opts.queue_bytes:
            self.block(("held", slot.n))

    def flush_links(self) -> None:
        self.flush_soon = False
        for slot in self.slots:
            if not slot.outgoing:
                continue
            link = slot.link
            if link is not None and link.alive():
                link.send(slot.outgoing)
            else:
                for data in slot.outgoing:
                    self.hold(slot, data)
            slot.outgoing = []

    def replay(self, slot: Slot, frames: list) -> None:
        """Frames a dead worker never acknowledged: first in line for its successor."""
        if not frames:
            return
        slot.held.extendleft(reversed(frames))
        slot.held_bytes += sum(map(len, frames))
        if slot.held_bytes > self.opts.queue_bytes:
            self.block(("held", slot.n))
        link = slot.link
        if link is not None and link.alive():  # the successor is already up
            link.send(list(slot.held))
            slot.held.clear()
            slot.held_bytes = 0
            self.unblock(("held", slot.n))

    # -- workers -----------------------------------------------------------------------------

    def open_ports(self) -> None:
        o = self.opts
        for n in range(o.workers):
            port = o.base_port + n
            try:
                listener = server.make_listener(o.host, port, o.backlog, o.keepalive)
            except OSError as e:
                sys.exit(f"megacomet: cannot listen on {o.host}:{port}: {e.strerror}; "
                         "is another server running there? (--host, --base-port)")
            self.slots.append(Slot(n, self.cpus[n % len(self.cpus)], port, listener))

    def worker_argv(self, n: int) -> list:
        o = self.opts
        return [sys.executable, SERVER_PY, "--worker", str(n), "--workers", str(o.workers),
                "--base-port", str(o.base_port), "--queue-ttl", str(o.queue_ttl),
                "--queue-max", str(o.queue_max), "--queue-bytes", str(o.queue_bytes),
                "--poll-timeout", str(o.poll_timeout), "--header-timeout",
                str(o.header_timeout), "--write-timeout", str(o.write_timeout),
                "--cors-origin", o.cors_origin]

    async def spawn(self, slot: Slot) -> None:
        if self.stopping:
            return
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Sources above the targets, so no dup2 below overwrites the other's source.
        listen_src = high_dup(slot.listener.fileno())
        link_src = high_dup(theirs.fileno())
        try:
            slot.pid = os.posix_spawn(
                sys.executable, self.worker_argv(slot.n), os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, listen_src, LISTEN_FD),
                              (os.POSIX_SPAWN_DUP2, link_src, LINK_FD)])
        except OSError as e:  # out of processes or memory: try again, do not lose the slot
            log(f"worker {slot.n}: cannot start a process ({e.strerror}); retrying")
            mine.close()
            self.loop.call_later(RESTART_PAUSE, lambda: self.loop.create_task(self.spawn(slot)))
            return
        finally:
            os.close(listen_src)
            os.close(link_src)
            theirs.close()
        slot.started = time.monotonic()
        try:
            os.sched_setaffinity(slot.pid, {slot.cpu})
        except (ProcessLookupError, OSError):
            pass  # already gone: the reaper will see it
        mine.setblocking(False)
        await self.loop.connect_accepted_socket(lambda: Link(self, slot), mine)

    def reap(self) -> None:
        """SIGCHLD: collect every dead child, then bring the workers back to W."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = None
            if slot.link is not None:
                slot.link.transport.close()
            if self.stopping:
                if all(s.pid is None for s in self.slots):
                    self.done.set()
                continue
            code = os.waitstatus_to_exitcode(status)
            log(f"worker {slot.n} (pid {pid}, cpu {slot.cpu}) {describe_exit(status)}")
            if code == server.EXIT_BOOT_ERROR:
                log(f"worker {slot.n} cannot boot; stopping (see the line above)")
                self.exit_code = 1
                self.stop()
                continue
            slot.restarts += 1
            quick = time.monotonic() - slot.started < QUICK_DEATH
            delay = RESTART_PAUSE if quick and slot.restarts > 1 else 0.0
            self.loop.call_later(delay, lambda s=slot: self.loop.create_task(self.spawn(s)))

    def stop(self) -> None:
        """SIGTERM/SIGINT: close the links (workers exit on that), SIGTERM, then SIGKILL."""
        if self.stopping:
            return
        self.stopping = True
        for slot in self.slots:
            if slot.link is not None:
                slot.link.transport.close()
            if slot.pid is not None:
                try:
                    os.kill(slot.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if all(s.pid is None for s in self.slots):
            self.done.set()
        self.loop.call_later(SHUTDOWN_GRACE, self.kill_rest)

    def kill_rest(self) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                log(f"worker {slot.n} (pid {slot.pid}) ignored SIGTERM; killing it")
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.loop.call_later(0.5, self.done.set)

    # -- stats -------------------------------------------------------------------------------

    async def worker_stats(self, slot: Slot):
        if slot.link is None:
            return None
        fut = self.loop.create_future()
        slot.pending_stats.append(fut)
        self.put(slot, frame(STATS, b"", b""))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), STATS_TIMEOUT)
        except TimeoutError:
            return None

    async def stats(self) -> dict:
        answers = await asyncio.gather(*(self.worker_stats(s) for s in self.slots))
        workers = []
        for slot, got in zip(self.slots, answers, strict=True):
            figures = got or slot.last_stats
            row = {"worker": slot.n, "pid": slot.pid, "cpu": slot.cpu, "port": slot.port,
                   "up": got is not None}
            for field in STAT_FIELDS:
                row[field] = figures.get(field, 0)
            row["restarts"] = slot.restarts
            workers.append(row)
        totals = {f: sum(w[f] for w in workers) for f in STAT_FIELDS}
        held = sum(len(s.held) for s in self.slots)
        return {"workers": workers, "totals": totals,
                "manager": {"pid": os.getpid(), "messages_in": self.messages_in,
                            "app_rejected": self.app_rejected,
                            "app_connections": self.app_connections,
                            "held_messages": held, "paused": sorted(map(str, self.blocked))}}

    async def status_lines(self) -> None:
        interval = self.opts.status_interval
        last_accepted = last_delivered = last_in = 0
        while not self.stopping:
            await asyncio.sleep(interval)
            s = await self.stats()
            t = s["totals"]
            conns = t["connections"]
            base = sum(slot.base_rss for slot in self.slots)
            per_conn = (t["rss_bytes"] - base) / conns if conns else 0
            up = sum(w["up"] for w in s["workers"])
            log(f"conns {conns:,} (+{(t['accepted'] - last_accepted) / interval:,.0f}/s) "
                f"waiting {t['waiting']:,} | msgs in "
                f"{(self.messages_in - last_in) / interval:,.0f}/s out "
                f"{(t['delivered'] - last_delivered) / interval:,.0f}/s queued "
                f"{t['queued_messages']:,} dropped {t['dropped']:,} expired {t['expired']:,} | "
                f"rss {t['rss_bytes'] / 2**20:,.1f} MiB, {per_conn:,.0f} B/conn | "
                f"workers {up}/{len(self.slots)} up")
            last_accepted, last_delivered, last_in = t["accepted"], t["delivered"], \
                self.messages_in

    # -- the app port ------------------------------------------------------------------------

    async def app_connection(self, reader, writer) -> None:
        self.app_connections += 1
        try:
            # Not held back by backpressure: a GET /stats is most wanted exactly then.
            data = await reader.read(APP_READ_SIZE)
            if not data:
                return
            first = data[0]
            if first == 0x02:
                if self.opts.app_token is None:
                    await self.serve_binary(reader, data)
                else:
                    self.app_error(writer, "binary frames refused: --app-token is set")
            elif first == ord("{"):
                await self.serve_json_lines(reader, writer, data)
            elif chr(first).isalpha():
                await self.serve_http(reader, writer, data)
            else:
                self.app_error(writer, f"unknown protocol (first byte 0x{first:02x})")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as e:  # a bug shown in one line, never a silent dead connection
            self.app_error(writer, f"internal error {e!r}")
        finally:
            self.app_connections -= 1
            writer.close()

    def app_error(self, writer, why: str) -> None:
        self.app_rejected += 1
        peer = writer.get_extra_info("peername")
        log(f"app connection {peer}: {why}; closed")

    async def read_more(self, reader) -> bytes:
        """The one place app bytes come in: waits while a worker's link is full."""
        if not self.flow.is_set():
            await self.flow.wait()
        return await reader.read(APP_READ_SIZE)

    async def serve_binary(self, reader, buf: bytes) -> None:
        """The original's frames: 0x02 <id> 0x00 <message> 0x00, repeated, no reply."""
        max_message = self.opts.max_message
        while True:
            pos, size = 0, len(buf)
            while pos < size:
                if buf[pos] != 0x02:
                    return self.app_error_bare("binary frame does not start with 0x02")
                id_end = buf.find(b"\x00", pos + 1, pos + 130)
                if id_end == -1:
                    if size - pos >= 130:
                        return self.app_error_bare("binary frame id over 128 bytes")
                    break
                id_ = buf[pos + 1:id_end]
                if not valid_id(id_):
                    return self.app_error_bare(f"invalid id {id_[:40]!r} in a binary frame")
                msg_end = buf.find(b"\x00", id_end + 1, id_end + max_message + 2)
                if msg_end == -1:
                    if size - id_end - 1 > max_message:
                        return self.app_error_bare(f"message over --max-message {max_message}")
                    break
                self.send(id_, buf[id_end + 1:msg_end])
                pos = msg_end + 1
            buf = buf[pos:]
            data = await self.read_more(reader)
            if not data:
                if buf:
                    self.app_error_bare("connection closed inside a binary frame")
                return
            buf += data

    def app_error_bare(self, why: str) -> None:
        self.app_rejected += 1
        log(f"app connection: {why}; closed")

    async def serve_json_lines(self, reader, writer, buf: bytes) -> None:
        """One JSON object a line, one reply line each."""
        authed = self.opts.app_token is None
        line_max = self.opts.max_message * 8 + 4096  # room for JSON's escapes
        while True:
            lines = buf.split(b"\n")
            buf = lines.pop()
            for line in lines:
                if not line.strip():
                    continue
                reply, authed = self.json_line(line, authed)
                writer.write(json.dumps(reply).encode() + b"\n")
            if len(buf) > line_max:
                writer.write(b'{"ok": false, "error": "line too long"}\n')
                self.app_rejected += 1
                return
            await writer.drain()
            data = await self.read_more(reader)
            if not data:
                return
            buf += data

    def json_line(self, line: bytes, authed: bool):
        def no(why):
            self.app_rejected += 1
            return {"ok": False, "error": why}, authed
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            return no(f"invalid JSON: {str(e)[:200]}")
        if not isinstance(obj, dict):
            return no("each line must be a JSON object")
        if "auth" in obj:
            token, expected = obj["auth"], self.opts.app_token
            if expected is not None and not (isinstance(token, str) and hmac.compare_digest(
                    token.encode("utf-8", "surrogatepass"), expected.encode())):
                return no("wrong token")
            authed = True
            if len(obj) == 1:
                return {"ok": True}, authed
        elif not authed:
            return no('authentication required: open with {"auth": "<token>"}')
        message = obj.get("message")
        if not isinstance(message, str):
            return no('"message" must be a string')
        try:
            message = message.encode()
        except UnicodeEncodeError:
            return no('"message" has a lone surrogate: not valid Unicode')
        if len(message) > self.opts.max_message:
            return no(f"message over --max-message ({self.opts.max_message} bytes)")
        if obj.get("broadcast") is True:
            self.broadcast(message)
            return {"ok": True}, authed
        if "id" in obj:
            ids = [obj["id"]]
        elif "ids" in obj and isinstance(obj["ids"], list):
            ids = obj["ids"]  # as many as fit in one line (line_max)
        else:
            return no('need "id", "ids" or "broadcast": true')
        raw = []
        for id_ in ids:
            if not isinstance(id_, str) or not valid_id(id_.encode("utf-8", "replace")):
                return no(f"invalid id {str(id_)[:40]!r}: 1-128 of [A-Za-z0-9_~-]")
            raw.append(id_.encode())
        for id_ in raw:  # all valid: none is half-delivered
            self.send(id_, message)
        return {"ok": True}, authed

    async def serve_http(self, reader, writer, buf: bytes) -> None:
        """HTTP/1.1 with keep-alive: POST /send/<id>, POST /broadcast, GET /stats.
        Pipelined requests already in the buffer are answered with one write: asyncio's
        write() is a send() each time its buffer is empty."""
        pos = scanned = 0  # the request being read starts at buf[pos]
        continued = False  # "100 Continue" sent for the request being read
        out = []
        try:
            while True:
                try:
                    # A head-sized slice: slicing all the rest per request would be quadratic.
                    head = buf[pos:pos + APP_HEAD_MAX + 4]
                    req, used = parse_request(head, scanned, APP_HEAD_MAX)
                except HTTPError as err:
                    self.app_rejected += 1
                    out.append(http_reply(err.status, {"ok": False, "error": err.reason}, False))
                    return
                if req is not None:
                    length, error = self.body_length(req)
                    if error is not None:
                        self.app_rejected += 1
                        out.append(http_reply(error[0], {"ok": False, "error": error[1]}, False))
                        return
                    used += pos
                    if length and len(buf) < used + length and not continued and \
                            req.headers.get(b"expect", b"").lower() == b"100-continue":
                        stats = req.path == b"/stats" and req.method == b"GET"
                        refused = None if stats else self.http_action(req, None, False)
                        if refused is not None:  # no body wanted: refuse before it is sent
                            out.append(refused)
                            return
                        out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
                        continued = True
                if req is None or len(buf) < used + length:
                    scanned = used if req is None else 0  # a whole head is parsed again: cheap
                    if out:
                        writer.write(b"".join(out))
                        out.clear()
                    await writer.drain()
                    data = await self.read_more(reader)
                    if not data:
                        return
                    buf, pos = buf[pos:] + data, 0
                    continue
                body, pos, scanned = buf[used:used + length], used + length, 0
                continued = False
                conn = req.headers.get(b"connection", b"").lower()
                keep = b"close" not in conn if req.version == b"HTTP/1.1" else \
                    b"keep-alive" in conn
                if req.path == b"/stats" and req.method == b"GET" and self.authorized(req):
                    out.append(http_reply(200, await self.stats(), keep))
                else:
                    out.append(self.http_action(req, body, keep))
                if not keep:
                    return
        finally:
            if out:
                writer.write(b"".join(out))
                await writer.drain()

    def body_length(self, req):
        """(length, None), or (None, (status, why)) for a body we will not read."""
        h = req.headers
        if b"transfer-encoding" in h:
            return None, (411, "send Content-Length, not chunked")
        length = h.get(b"content-length")
        if length is None:
            return 0, None
        if not length.isdigit():
            return None, (400, "invalid Content-Length")
        # Length of the digits first: int() refuses strings over 4,300 digits.
        if len(length.lstrip(b"0")) > len(str(self.opts.max_message)) or \
                int(length) > self.opts.max_message:
            return None, (413, f"message over --max-message ({self.opts.max_message} bytes)")
        return int(length), None

    def authorized(self, req) -> bool:
        token = self.opts.app_token
        if token is None:
            return True
        scheme, _, given = req.headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(),
                                                                   token.encode())

    def http_action(self, req, body, keep: bool):
        """Act on one whole request (but GET /stats); returns the whole response. With body
        None it only checks: the refusal, or None if the request would be taken."""
        def no(status, why):
            self.app_rejected += 1
            return http_reply(status, {"ok": False, "error": why}, keep)
        if not self.authorized(req):
            return no(401, "Authorization: Bearer <token> required")
        path = req.path
        if path.startswith(b"/send/") or path == b"/broadcast":
            if req.method != b"POST":
                return no(405, "use POST")
            if b"content-length" not in req.headers:
                return no(411, "Content-Length required")
            if path != b"/broadcast" and not valid_id(path[6:]):
                return no(400, "invalid id: 1-128 of [A-Za-z0-9_~-]")
            if body is None:
                return None
            if path == b"/broadcast":
                self.broadcast(body)
            else:
                self.send(path[6:], body)
            return ACCEPTED_KEEP if keep else http_reply(202, {"ok": True}, False)
        if path == b"/stats":
            return no(405, "use GET")
        return no(404, "POST /send/<id>, POST /broadcast, GET /stats")

    # -- start and run -----------------------------------------------------------------------

    async def run(self) -> int:
        o = self.opts
        self.open_ports()
        try:
            app = await asyncio.start_server(self.app_connection, o.app_host, o.app_port,
                                             limit=APP_READ_SIZE, backlog=o.backlog)
        except OSError as e:
            sys.exit(f"megacomet: cannot listen on app port {o.app_host}:{o.app_port}: "
                     f"{e.strerror} (--app-host, --app-port)")
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop)
        self.loop.add_signal_handler(signal.SIGCHLD, self.reap)
        for slot in self.slots:
            await self.spawn(slot)
        log(f"megacomet: {o.workers} workers on {o.host}:{o.base_port}-"
            f"{o.base_port + o.workers - 1}, app port {o.app_host}:{o.app_port}, "
            f"pid {os.getpid()}")
        status = None
        if o.status_interval > 0:
            status = self.loop.create_task(self.status_lines())
        await self.done.wait()
        app.close()
        if status is not None:
            status.cancel()
        self.reap()
        return self.exit_code


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def positive(kind):
    def check(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return check


def non_negative(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MegaComet: long-polling HTTP server, one worker "
                                "per CPU, app messages on the app port. See README.md.")
    p.add_argument("--workers", type=positive(int), default=len(os.sched_getaffinity(0)),
                   help="worker processes (default: CPUs in the affinity mask)")
    p.add_argument("--host", default="0.0.0.0", help="comet ports bind here")
    p.add_argument("--base-port", type=positive(int), default=8000,
                   help="worker n listens on base + n (default 8000)")
    p.add_argument("--app-host", default="127.0.0.1", help="app port host (private default)")
    p.add_argument("--app-port", type=positive(int), default=9000)
    p.add_argument("--backlog", type=positive(int), default=4096,
                   help="listen backlog (capped by net.core.somaxconn)")
    p.add_argument("--max-message", type=positive(int), default=65536,
                   help="larger messages are refused (bytes)")
    p.add_argument("--queue-ttl", type=positive(float), default=60.0,
                   help="undelivered messages expire after this many seconds")
    p.add_argument("--queue-max", type=positive(int), default=100,
                   help="messages queued per id; overflow drops the oldest")
    p.add_argument("--queue-bytes", type=positive(int), default=64 * 1024 * 1024,
                   help="queued bytes per worker; overflow drops the oldest")
    p.add_argument("--poll-timeout", type=non_negative, default=0.0,
                   help="a waiting poll gets 204 after this many seconds (0: off)")
    p.add_argument("--keepalive", type=non_negative, default=60.0,
                   help="TCP keepalive idle seconds on client sockets (0: off)")
    p.add_argument("--header-timeout", type=positive(float), default=10.0,
                   help="close connections that sent no whole request head by then")
    p.add_argument("--write-timeout", type=positive(float), default=30.0,
                   help="close a client that has not read its whole answer by then")
    p.add_argument("--status-interval", type=non_negative, default=10.0,
                   help="status line period in seconds (0: off)")
    p.add_argument("--cors-origin", default="*", help="Access-Control-Allow-Origin value")
    p.add_argument("--app-token", default=None,
                   help="require this token on the app port (HTTP Bearer, JSON auth line)")
    opts = p.parse_args(argv)
    if opts.base_port + opts.workers - 1 > 65535:
        p.error("--base-port + --workers runs past port 65535")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    nofile = raise_nofile()
    log(manager_capacity_line(opts.workers, nofile))

    async def go():
        return await Manager(opts).run()

    return asyncio.run(go())


if __name__ == "__main__":
    sys.exit(main())
