"""MegaComet manager: starts the workers, keeps them alive, and routes the app's messages.

    python manager.py [--workers W] [--base-port 8000] [--app-port 9000] ...

Theory of operation
-------------------
Three roles, in this order in the file, split as gunicorn splits its arbiter from its workers:

- Outbox, one per worker: every message frame for worker n, from the moment the manager
  accepts it until the worker has acted on it. It is the only place such a frame lives.
- Supervisor: owns what must outlive a worker (the listening socket of every comet port,
  inherited by worker n as fd 3, so a restarted worker serves the same port and connections
  arriving meanwhile wait in the backlog; the worker's shared page, fd 5, see link.py) and the
  worker processes: spawn (pinned to cpus[n % len(cpus)], linked by a UNIX socket, fd 4), reap,
  one reconcile pass that brings the workers back to W, and the heartbeat watchdog. Signal
  handlers only wake the loop (asyncio's add_signal_handler); exit statuses become readable
  lines; a worker that cannot boot exits with server.EXIT_BOOT_ERROR and the manager stops
  instead of restart-looping. SIGHUP re-reads --subscriber-key-file and, if it is good, passes
  the SIGHUP on to the workers, which read it themselves (the keys never travel the link).
  SIGTERM or SIGINT drains (stop): publishes are refused, each worker gets SIGTERM, stops
  listening, ends its waiting connections over --drain seconds and exits; none is restarted;
  what still runs DRAIN_GRACE later is killed. It also reads the figures for /stats, /metrics
  and /healthz from the pages: no worker is asked, so a stopped or busy one cannot delay an
  answer.
- Router: one message id per accepted message (MessageIds), the frames into the outboxes.
- AppServer: the app port's three protocols, told apart by the first byte of a connection
  (0x02 the original's binary frames, `{` JSON lines, an ASCII letter HTTP/1.1). It only needs
  a Router (send, broadcast), the stats and the Flow gate. GET /metrics is the same figures
  in Prometheus's text format (metrics_text), GET /healthz whether every worker is up.

Delivery promises (the README has the full list). A message is accepted only when its
worker's outbox has room (--queue-bytes of unacknowledged frames per worker), else refused with
a clear error; an accepted one stays in the outbox until the worker's page says it acted on it
(link_done), and is replayed to the successor of a worker that died first. While any outbox
holds more than FLOW_HIGH bytes the manager stops reading app connections (Flow): a burst slows
the publisher instead of being dropped, and a hung worker cannot hold that for longer than
--worker-timeout, after which the watchdog kills it. Lost are only: what a dying worker held
that no client had had (counted as `lost` from its page), what --queue-ttl, --queue-max and
--queue-bytes evict before a client had it (counted), and a message written to a client that
vanished without a FIN while we had not yet noticed (keepalive reaps those). A frame the worker
was acting on when it was killed may be delivered twice (at-least-once); it keeps its message
id (MessageIds, given at acceptance), so clients recognise the second copy.
"""

import argparse
import asyncio
import errno
import fcntl
import hmac
import json
import math
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

import link
import options
import server
from link import BEAT_NS, BROADCAST, LINK_DONE, READY, WAITING
from server import LINK_FD, LISTEN_FD, PAGE_FD, HTTPError, parse_request, valid_id
from tuning.check import manager_capacity_line, port_clash_hint, raise_nofile

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

READY_FRAME = link.encode(READY, b"", b"", 0, 0)  # the node's replay is in (link.py)
READY_PARTIAL = link.encode(READY, b"", b"", 1, 0)  # ... it comes late: Redis was unreachable
CAUGHT_UP_FRAME = link.encode(link.CAUGHT_UP, b"", b"", 0, 0)
SERVER_PY = str(Path(__file__).resolve().parent / "server.py")
FLOW_HIGH = 4 * 1024 * 1024  # unacknowledged bytes for one worker that pause the app...
FLOW_LOW = 1024 * 1024  # ... and resume it
ACK_POLL = 0.01  # seconds between two looks at a paused worker's page
APP_READ_SIZE = 256 * 1024
APP_HEAD_MAX = 8192  # app HTTP request heads, same limit as the comet ports
QUICK_DEATH = 1.0  # a worker dying younger than this is crash-looping: restart after a pause
RESTART_PAUSE = 0.5  # keeps "restarted within 1 s" while not burning a CPU on a crash loop
# A worker still running this long after --drain is over gets SIGKILL, and the manager exits
# at most 0.5 s later: the whole stop fits in --drain + 3 s (SPEC).
DRAIN_GRACE = 2.0
UP_BEATS = 2  # a worker whose loop has not passed for this many beat intervals is down
SHORT_KEY = 16  # bytes: a subscriber key shorter than this is warned about (it can be guessed)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
APP_REASONS = {**server.REASONS, 202: b"Accepted"}
GET_PATHS = (b"/stats", b"/metrics", b"/healthz")  # the app port's read-only paths
# Per-worker figures in /stats (SPEC's list, then ours), summed into the totals.
ROW_GAUGES = ("connections", "waiting", "streams", "queued_messages", "queued_bytes",
              "undelivered")
STAT_FIELDS = ("connections", "waiting", "queued_messages", "queued_bytes", "delivered",
               "expired", "dropped", "rejected", "restarts", "rss_bytes", "accepted", "lost",
               "outbox_bytes", "streams", "undelivered", "expired_undelivered",
               "dropped_undelivered",
               *link.COUNTERS[link.COUNTERS.index("closed_header_timeout"):])


def describe_exit(status: int, by_watchdog: bool = False, oom_kills: int = 0) -> str:
    """`oom_kills`: how many processes the kernel's OOM killer killed while this one lived.
    A SIGKILL is only called "out of memory?" on that evidence: a person or a script sends
    it too."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = ""
        if sig == signal.SIGKILL and by_watchdog:
            why = " from the watchdog (--worker-timeout)"
        elif sig == signal.SIGKILL and oom_kills > 0:
            why = (f" (out of memory? the kernel's OOM killer killed {oom_kills:,} "
                   f"process{'es' if oom_kills > 1 else ''} meanwhile: see dmesg)")
        return f"killed by {signal.Signals(sig).name}{why}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def oom_kill_count(path: str = "/proc/vmstat") -> int | None:
    """The kernel's count of OOM kills since boot (global and cgroup ones: Linux 4.13+), or
    None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def bind_error(what: str, host: str, port: int, flags: str, e: OSError, opts) -> str:
    """The one wording for a comet port and the app port that cannot be bound."""
    # asyncio's start_server words its own strerror ("error while attempting to bind ...").
    why = e.strerror if isinstance(e, socket.gaierror) or not e.errno else os.strerror(e.errno)
    advice = ""
    if e.errno == errno.EADDRINUSE:
        advice = "; is another server running there?"
        hint = port_clash_hint(port, [*range(opts.base_port, opts.base_port + opts.workers),
                                      opts.app_port])
        if hint:
            advice += " Or: " + hint
    elif e.errno == errno.EADDRNOTAVAIL:
        advice = f"; is {host} an address of this box?"
    elif e.errno == errno.EACCES and port < 1024:
        advice = "; ports below 1024 need root (or CAP_NET_BIND_SERVICE)"
    return (f"megacomet: cannot listen on {what} {host}:{port} ({flags}): "
            f"{why or e}{advice}")


def log(line: str) -> None:
    try:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
    except OSError:
        # stdout is gone (journald restarted, the reading end of a pipe closed): a log line
        # must not stop a stop. Later lines go nowhere, and the exit does not fail on them.
        sys.stdout = open(os.devnull, "w")


def http_reply(status: int, body: dict, keep: bool, extra: bytes = b"") -> bytes:
    """A whole app-port HTTP response with a JSON body."""
    data = json.dumps(body).encode()
    if status == 401:
        extra += b"WWW-Authenticate: Bearer\r\n"
    elif status == 405:
        extra += b"Allow: GET\r\n" if body.get("error") == "use GET" else b"Allow: POST\r\n"
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s" \
        b"Connection: %s\r\n\r\n%s" % (status, APP_REASONS.get(status, b""), len(data), extra,
                                        b"keep-alive" if keep else b"close", data)




def accepted_reply(mid: tuple, keep: bool) -> bytes:
    """202 {"ok": true, "mid": ...}: the answer to nearly every publish, formatted directly."""
    body = b'{"ok": true, "mid": "%d-%d"}' % mid
    return b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
        b"Connection: %s\r\n\r\n%s" % (len(body), b"keep-alive" if keep else b"close", body)

JSON_NUMBER_DIGITS = 100  # no field of ours is a number; a longer one is an attack on int()


# JSON as RFC 8259 has it: Python's json also takes NaN, Infinity and numbers that overflow.
def json_no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or len(text) > JSON_NUMBER_DIGITS:
        raise ValueError(f"number {text[:24]} is out of range")
    return value


def json_int(text: str) -> int:
    if len(text) > JSON_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(text):,} digits is out of range")
    return int(text)


def high_dup(fd: int) -> int:
    """A copy of fd numbered 10 or more: posix_spawn's dup2 onto fds 3-5 must not find its
    sources there (dup2 onto itself would keep close-on-exec)."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


# ---------------------------------------------------------------------------------------------
# Flow: the one gate on reading app connections
# ---------------------------------------------------------------------------------------------


class Flow:
    """Open while no worker is behind. `reasons` says who closed it (worker numbers, and
    "redis" while too much waits for Redis on a node)."""

    def __init__(self):
        self.open = asyncio.Event()
        self.open.set()
        self.reasons: set = set()
        self.paused: set = set()  # binary app connections (AppProtocol) waiting for it

    def block(self, reason) -> None:
        self.reasons.add(reason)
        self.open.clear()

    def unblock(self, reason) -> None:
        self.reasons.discard(reason)
        if not self.reasons and not self.open.is_set():
            self.open.set()
            paused, self.paused = self.paused, set()
            for protocol in paused:  # not now: this may be inside a flush of the outboxes
                asyncio.get_running_loop().call_soon(protocol.resume)


# ---------------------------------------------------------------------------------------------
# Outbox: one worker's frames until it has acted on them
# ---------------------------------------------------------------------------------------------


class Outbox:
    """Every message frame for one worker, from acceptance until the worker acted on it.

    Invariant: an accepted frame is in exactly one of these two, in acceptance order
    (everything in `unacked` is older than everything in `unsent`), until acknowledged:
      unacked  written to the current link, in batches (end offset on this link, [frames]);
      unsent   not written yet: accepted during this loop pass, or the worker is not up.
    `bytes` is the size of all of them; `put` refuses a frame that would take it over `limit`.

    The acknowledgement is the worker's page: link_done, the link bytes it has acted on, whole
    frames only (link.py). So:
      put(frame)      -> False when full (the caller refuses the message, nothing is lost);
      flush()         writes unsent as one batch, once per loop pass (one send() for a whole
                      read of app frames instead of one per message);
      ack(done)       drops the batches that end at or before `done`;
      attach(link)    a worker is up: offsets restart at 0 on its new link, unsent is written;
      detach(done)    its process is dead (so `done` is final): what it had not acted on goes
                      back to the front of unsent, for its successor.
    The Flow gate is closed by an outbox over `high` only while its worker is up: a worker
    that is behind slows every publisher (it cannot tell whose message comes next), but one
    that is down, or crash-looping, only has its own messages refused once `limit` is full.
    Frames are bytes shared with the other outboxes for a broadcast: no copies.
    """

    def __init__(self, n: int, limit: int, flow: Flow, flush_soon):
        self.n, self.limit, self.flow = n, limit, flow
        self.flush_soon = flush_soon  # schedules flush() once, at the end of this loop pass
        self.high = min(FLOW_HIGH, limit // 2)
        self.low = min(FLOW_LOW, self.high // 4)
        self.link = None  # the transport of the live link, or None
        self.written = 0  # bytes written to the current link
        self.unacked: deque = deque()  # (end offset, [frames])
        self.unsent: list = []
        self.bytes = 0

    def room(self, size: int) -> bool:
        return self.bytes + size <= self.limit

    def put(self, data: bytes) -> bool:
        if self.bytes + len(data) > self.limit:
            return False
        unsent = self.unsent
        unsent.append(data)
        self.bytes += len(data)
        if self.link is not None:
            if self.bytes > self.high:
                self.flow.block(self.n)
            if len(unsent) == 1:  # the first of this loop pass
                self.flush_soon(self)
        return True

    def put_control(self, data: bytes) -> None:
        """A frame that is not a message (READY): never refused, it carries nothing."""
        self.unsent.append(data)
        self.bytes += len(data)
        if self.link is not None:
            self.flush_soon(self)

    def flush(self) -> None:
        if self.link is None or not self.unsent:
            return
        if self.link.is_closing():  # dead or dying: its detach comes with the reaping
            return
        data = b"".join(self.unsent)
        self.link.write(data)
        self.written += len(data)
        self.unacked.append((self.written, self.unsent))
        self.unsent = []

    def ack(self, done: int) -> None:
        unacked = self.unacked
        while unacked and unacked[0][0] <= done:
            _, frames = unacked.popleft()
            self.bytes -= sum(map(len, frames))
        if self.bytes <= self.low:
            self.flow.unblock(self.n)

    def attach(self, transport) -> None:
        self.link, self.written = transport, 0
        if self.bytes > self.high:
            self.flow.block(self.n)
        self.flush_soon(self)  # at the end of this loop pass, which also watches the acks

    def link_lost(self) -> None:
        """The link closed before the process was reaped: nothing is written until detach."""
        self.link = None
        self.flow.unblock(self.n)

    def detach(self, done: int) -> int:
        """Returns how many frames go back to be replayed."""
        self.ack(done)
        replay = []
        if self.unacked:
            end0, frames0 = self.unacked[0]
            pos = end0 - sum(map(len, frames0))  # where the first unacked batch starts
            for frames in (b for _, b in self.unacked):
                for f in frames:
                    pos += len(f)
                    if pos > done:  # a frame partly read is not done
                        replay.append(f)
                    else:
                        self.bytes -= len(f)
        self.unacked.clear()
        # READY and CAUGHT_UP are not replayed: the successor gets what is true when it
        # attaches (Link.connection_made).
        replay = [f for f in replay if f[:1] not in link.CONTROL]
        unsent = [f for f in self.unsent if f[:1] not in link.CONTROL]
        self.bytes = sum(map(len, replay)) + sum(map(len, unsent))
        self.unsent = replay + unsent
        self.link, self.written = None, 0
        # No worker, no reason to hold the other workers' publishers: this outbox fills up to
        # its limit and then refuses, for this worker only, until a successor attaches.
        self.flow.unblock(self.n)
        return len(replay)


# ---------------------------------------------------------------------------------------------
# Supervisor: the worker processes
# ---------------------------------------------------------------------------------------------


class Slot:
    """Worker n: what outlives the process in it (CPU, port, listening socket, page, outbox,
    counters carried over from dead processes), and the process now in it."""

    def __init__(self, n: int, cpu: int, port: int, listener: socket.socket, outbox: Outbox):
        self.n, self.cpu, self.port, self.listener, self.outbox = n, cpu, port, listener, outbox
        self.page_fd, self.page = link.new_page(f"megacomet-worker-{n}")
        self.pid = None
        self.started = 0.0
        self.restart_at = 0.0  # when the reconcile pass may spawn it again
        self.killed_by_watchdog = False
        self.oom_kills0 = None  # the kernel's OOM kill count when the process started
        self.restarts = 0
        self.link = None  # the live Link protocol, or None
        self.carried = dict.fromkeys(link.COUNTERS, 0)  # dead processes' final counters
        self.lost = 0  # messages queued in processes that died
        self.base_rss = 0


class Link(asyncio.Protocol):
    """The manager's end of one worker's link. Nothing comes back on it but the EOF of the
    worker's death: acknowledgements and figures are in the page."""

    def __init__(self, supervisor: "Supervisor", slot: Slot):
        self.supervisor, self.slot = supervisor, slot
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        # Flow is decided by unacknowledged bytes (Outbox), not by this buffer: no pause.
        transport.set_write_buffer_limits(high=2**62)
        if self.slot.link is self:
            self.slot.outbox.attach(transport)
            if self.supervisor.hold and not self.supervisor.held:  # after what it replays
                self.slot.outbox.put_control(READY_PARTIAL if self.supervisor.late else
                                             READY_FRAME)
        else:  # its worker died before the link was set up: it was reaped already
            transport.close()

    def data_received(self, data: bytes) -> None:
        pass  # a worker writes nothing on its link

    def connection_lost(self, exc) -> None:
        slot = self.slot
        if slot.link is self:  # not a late call for a link that was replaced already
            slot.link = None
            slot.outbox.link_lost()  # frames wait in the outbox; the reaper replays them


class Supervisor:
    def __init__(self, opts, flow: Flow):
        self.opts = opts
        self.flow = flow
        self.loop = asyncio.get_running_loop()
        self.cpus = sorted(os.sched_getaffinity(0))
        self.slots: list = []
        self.stopping = False  # draining: from the first SIGTERM/SIGINT on
        self.stop_started = 0.0
        self.hurried = False  # a second signal came
        self.lost_before_stop = 0
        self.exit_code = 0
        self.done = asyncio.Event()
        self.flushing: set = set()  # outboxes to flush at the end of this loop pass
        self.batching = False  # an AppProtocol read is being routed: it flushes at its end
        self.ack_poll = None  # timer while the flow is blocked
        # --redis: workers start with --hold and accept once the node's history is replayed
        # from its stream (nodes.StreamReader calls release).
        self.hold = opts.redis is not None
        self.held = self.hold
        self.late = False  # released without the replay: it comes late (release)
        # Up (/healthz, megacomet_up): a live loop passes at least every beat interval.
        self.up_beat_age = UP_BEATS * min(server.BEAT_INTERVAL, opts.worker_timeout / 4)

    # -- ports and processes -----------------------------------------------------------------

    def open_ports(self) -> None:
        o = self.opts
        for n in range(o.workers):
            port = o.base_port + n
            try:
                listener = server.make_listener(o.host, port, o.backlog, o.keepalive)
            except OSError as e:
                sys.exit(bind_error("comet port", o.host, port, "--host, --base-port", e, o))
            outbox = Outbox(n, o.queue_bytes, self.flow, self.flush_soon)
            self.slots.append(Slot(n, self.cpus[n % len(self.cpus)], port, listener, outbox))

    def worker_argv(self, n: int) -> list:
        o = self.opts
        return [sys.executable, SERVER_PY, "--worker", str(n), "--workers", str(o.workers),
                "--base-port", str(o.base_port), "--queue-ttl", str(o.queue_ttl),
                "--queue-max", str(o.queue_max), "--queue-bytes", str(o.queue_bytes),
                "--poll-timeout", str(o.poll_timeout), "--header-timeout",
                str(o.header_timeout), "--write-timeout", str(o.write_timeout),
                "--worker-timeout", str(o.worker_timeout), "--cors-origin", o.cors_origin,
                "--max-waiters", str(o.max_waiters), "--sse-heartbeat", str(o.sse_heartbeat),
                "--sse-buffer", str(o.sse_buffer), "--drain", str(o.drain),
                "--public-scheme", o.public_scheme,
                "--public-base-port", str(o.public_base_port or o.base_port),
                "--trusted-proxy", ",".join(map(str, o.trusted_proxy))] + (
                    ["--subscriber-key-file", o.subscriber_key_file]
                    if o.subscriber_key_file is not None else []) + (
                    ["--hold", "--node", "{}/{}".format(*o.node),
                     "--nodes", ",".join(f"{h}:{p}" for h, p in o.nodes)]
                    if o.redis is not None else [])

    def spawn(self, slot: Slot) -> None:
        if not slot.listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            # A worker drained by a SIGTERM of its own stopped the listener (shutdown), which
            # cannot listen again: a new socket on the same port for its successor.
            o = self.opts
            try:
                listener = server.make_listener(o.host, slot.port, o.backlog, o.keepalive)
            except OSError as e:
                log(f"worker {slot.n}: cannot listen on {o.host}:{slot.port} again "
                    f"({e.strerror}); retrying")
                slot.restart_at = time.monotonic() + RESTART_PAUSE
                return
            slot.listener.close()
            slot.listener = listener
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Sources above the targets, so no dup2 below overwrites another's source.
        sources = [high_dup(slot.listener.fileno()), high_dup(theirs.fileno()),
                   high_dup(slot.page_fd)]
        try:
            slot.pid = os.posix_spawn(
                sys.executable, self.worker_argv(slot.n), os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, src, dst) for src, dst in
                              zip(sources, (LISTEN_FD, LINK_FD, PAGE_FD), strict=True)],
                # A SIGHUP forwarded while it boots waits until it has its handler (server.main).
                setsigmask={signal.SIGHUP})
        except OSError as e:  # out of processes or memory: try again, do not lose the slot
            log(f"worker {slot.n}: cannot start a process ({e.strerror}); retrying")
            mine.close()
            slot.restart_at = time.monotonic() + RESTART_PAUSE
            return
        finally:
            for fd in sources:
                os.close(fd)
            theirs.close()
        slot.started = time.monotonic()
        slot.killed_by_watchdog = False
        slot.oom_kills0 = oom_kill_count()
        try:
            os.sched_setaffinity(slot.pid, {slot.cpu})
        except OSError:
            pass  # already gone: the reaper will see it
        mine.setblocking(False)
        slot.link = Link(self, slot)
        self.loop.create_task(
            self.loop.connect_accepted_socket(lambda lk=slot.link: lk, mine))

    def reap(self) -> None:
        """SIGCHLD: collect every dead child; its frames and counters stay with the slot."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                self.buried(slot, status)
        self.reconcile()

    def buried(self, slot: Slot, status: int) -> None:
        """A worker's process is dead: its page holds its final figures."""
        page = slot.page
        figures = link.figures(page)
        for name in link.COUNTERS:
            slot.carried[name] += figures[name]
        slot.lost += figures["undelivered"]  # (kept messages clients had are not lost)
        replayed = slot.outbox.detach(page[LINK_DONE])
        link.clear(page)  # for the successor
        if slot.link is not None and slot.link.transport is not None:
            slot.link.transport.close()
        slot.link = None
        pid, slot.pid = slot.pid, None
        if self.stopping:
            if os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status):
                log(f"worker {slot.n} (pid {pid}) {describe_exit(status)} while draining")
            self.stop_listening(slot)
            if all(s.pid is None for s in self.slots):
                self.stopped()
            return
        code = os.waitstatus_to_exitcode(status)
        lost = f", {figures['undelivered']:,} undelivered messages lost" \
            if figures["undelivered"] else ""
        again = f", {replayed:,} unacknowledged frames replayed" if replayed else ""
        oom_now = oom_kill_count()
        ooms = oom_now - slot.oom_kills0 if None not in (oom_now, slot.oom_kills0) else 0
        how = describe_exit(status, slot.killed_by_watchdog, ooms)
        log(f"worker {slot.n} (pid {pid}, cpu {slot.cpu}) {how}{lost}{again}")
        if code == server.EXIT_BOOT_ERROR:
            log(f"worker {slot.n} cannot boot; stopping (see the line above)")
            self.exit_code = 1
            self.stop(f"worker {slot.n} cannot boot")
            return
        slot.restarts += 1
        quick = time.monotonic() - slot.started < QUICK_DEATH
        slot.restart_at = time.monotonic() + (RESTART_PAUSE if quick and slot.restarts > 1
                                              else 0.0)

    def reconcile(self) -> None:
        """One pass that brings the world back to W live workers (gunicorn's
        manage_workers): spawn every empty slot whose restart pause is over."""
        if self.stopping:
            return
        now = time.monotonic()
        later = []
        for slot in self.slots:
            if slot.pid is None:
                if slot.restart_at <= now:
                    self.spawn(slot)
                    if slot.pid is None:  # posix_spawn failed: try again after a pause
                        later.append(RESTART_PAUSE)
                else:
                    later.append(slot.restart_at - now)
        if later:
            self.loop.call_later(min(later), self.reconcile)

    # -- the watchdog ------------------------------------------------------------------------

    async def watchdog(self) -> None:
        """Kill a worker whose heartbeat is older than --worker-timeout (stopped, stuck in a
        loop, swapped out). Its frames are replayed to its successor like any dead one's."""
        timeout = self.opts.worker_timeout
        while not self.stopping:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for slot in self.slots:
                slot.outbox.ack(slot.page[LINK_DONE])  # frees what idle workers acted on
                if slot.pid is None or slot.killed_by_watchdog:
                    continue
                silent = now - max(slot.started, slot.page[BEAT_NS] / 1e9)
                if silent > timeout:
                    log(f"worker {slot.n} (pid {slot.pid}) missed its heartbeat for "
                        f"{silent:.1f} s (--worker-timeout {timeout:g}): stopped or stuck; "
                        "killing it")
                    slot.killed_by_watchdog = True
                    try:
                        os.kill(slot.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    # -- outboxes: flushed once a loop pass, acknowledged from the pages ---------------------

    def release(self, partial: bool) -> None:
        """The replay is in the outboxes: every worker may accept (READY, after it). Or
        `partial`: Redis could not be reached, the replay comes late (caught_up says when).
        A worker not linked yet gets its READY when it is (Link.connection_made)."""
        if self.held:
            self.held, self.late = False, partial
            for slot in self.slots:
                if slot.outbox.link is not None:
                    slot.outbox.put_control(READY_PARTIAL if partial else READY_FRAME)

    def caught_up(self) -> None:
        if self.late:
            self.late = False
            for slot in self.slots:
                if slot.outbox.link is not None:
                    slot.outbox.put_control(CAUGHT_UP_FRAME)

    def flush_soon(self, outbox: Outbox) -> None:
        if not self.flushing and not self.batching:
            self.loop.call_soon(self.flush)
        self.flushing.add(outbox)

    def flush(self) -> None:
        for outbox in self.flushing:
            outbox.ack(self.slots[outbox.n].page[LINK_DONE])
            outbox.flush()
        self.flushing.clear()
        if self.flow.reasons and self.ack_poll is None:
            self.ack_poll = self.loop.call_later(ACK_POLL, self.poll_acks)

    def poll_acks(self) -> None:
        """While the flow is blocked nothing else wakes us when a worker catches up."""
        self.ack_poll = None
        for n in [r for r in self.flow.reasons if r.__class__ is int]:
            slot = self.slots[n]
            slot.outbox.ack(slot.page[LINK_DONE])
            slot.outbox.flush()
        if self.flow.reasons:
            self.ack_poll = self.loop.call_later(ACK_POLL, self.poll_acks)

    # -- reload ------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: read the subscriber key file again; if it is good, every worker reads it too
        (server.Worker.load_keys), connections kept. A bad one changes nothing."""
        path = self.opts.subscriber_key_file
        if self.stopping:
            return
        if path is None:
            log("megacomet: SIGHUP: nothing to reload (no --subscriber-key-file)")
            return
        try:
            keys = read_subscriber_keys(path)
        except server.KeyFileError as e:
            log(f"megacomet: SIGHUP: {e}; the workers keep the keys they have")
            return
        told = 0
        for slot in self.slots:
            if slot.pid is not None:
                try:
                    os.kill(slot.pid, signal.SIGHUP)
                    told += 1
                except ProcessLookupError:
                    pass  # dead: its successor reads the file when it starts
        log(f"megacomet: SIGHUP: {len(keys)} subscriber keys read from {path}; "
            f"{told} workers told to read them")

    # -- stop --------------------------------------------------------------------------------

    def stop(self, why: str = "") -> None:
        """SIGTERM/SIGINT: drain. Publishes are refused from now on (Router); each worker gets
        SIGTERM, stops listening, ends its waiting connections over --drain seconds and exits
        (server.py, Worker.start_drain); none is restarted. The links stay open meanwhile: a
        worker keeps acting on the frames accepted before, and a link's EOF would make it exit
        at once. A second signal ends the drain at once (another SIGTERM to each worker);
        DRAIN_GRACE after the drain, what still runs gets SIGKILL."""
        if self.stopping:
            if not self.hurried and why:
                self.hurried = True
                log(f"{why} again: ending the drain now")
                self.signal_workers(signal.SIGTERM)
            return
        self.stopping = True
        self.stop_started = time.monotonic()
        self.lost_before_stop = sum(slot.lost for slot in self.slots)
        drain = self.opts.drain
        waiting = sum(slot.page[WAITING] for slot in self.slots if slot.pid is not None)
        log(f"{why or 'stopping'}: draining {waiting:,} waiting polls and streams over "
            f"{drain:g} s (--drain); new connections and publishes are refused")
        for slot in self.slots:
            if slot.pid is None:
                self.stop_listening(slot)  # no worker to answer what would queue there
        self.signal_workers(signal.SIGTERM)
        if all(s.pid is None for s in self.slots):
            self.stopped()
        self.loop.call_later(drain + DRAIN_GRACE, self.kill_rest)

    def signal_workers(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass  # dead already: the reaper will see it

    def stop_listening(self, slot: Slot) -> None:
        """What a draining worker does itself (shutdown stops every copy of the socket):
        for a slot whose worker died or never drained, new connects are refused at once."""
        try:
            slot.listener.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # stopped already

    def kill_rest(self) -> None:
        late = time.monotonic() - self.stop_started
        for slot in self.slots:
            if slot.pid is not None:
                log(f"worker {slot.n} (pid {slot.pid}) still running {late:.1f} s after "
                    f"SIGTERM (--drain {self.opts.drain:g}); killing it (SIGKILL)")
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.loop.call_later(0.5, self.stopped)

    def stopped(self) -> None:
        """Every worker is gone (or the last wait is over): one line, then run() returns."""
        if self.done.is_set():
            return
        self.done.set()
        lost = sum(slot.lost for slot in self.slots) - self.lost_before_stop
        unsent = sum(len(slot.outbox.unsent) for slot in self.slots)
        what = f"; lost with them: {lost:,} messages queued for clients that were not " \
            "waiting" if lost else ""
        if unsent:
            what += f"; {unsent:,} accepted messages never reached a worker"
        left = [slot.n for slot in self.slots if slot.pid is not None]
        gone = f"workers {left} still running" if left else "every worker exited"
        log(f"stopped: {gone} {time.monotonic() - self.stop_started:.2f} s after the "
            f"signal{what}")

    # -- figures -----------------------------------------------------------------------------

    def healthy(self, slot: Slot, now: float) -> bool:
        """Up, as /healthz and megacomet_up say: its process is alive (not yet reaped), its
        link is attached (a message can be handed to it), its loop has passed within the last
        UP_BEATS beat intervals (2 s by default: a stopped or stuck worker is down long before
        --worker-timeout kills it; a new one is down until its first pass), and no drain has
        begun (a draining worker takes no new connection)."""
        beat = slot.page[BEAT_NS]
        return (not self.stopping and slot.pid is not None and slot.outbox.link is not None
                and beat != 0 and now - beat / 1e9 <= self.up_beat_age)

    def worker_row(self, slot: Slot, now: float) -> dict:
        figures = link.figures(slot.page) if slot.pid is not None else \
            dict.fromkeys(link.PAGE_FIELDS, 0)
        rss = 0
        if slot.pid is not None:
            try:
                with open(f"/proc/{slot.pid}/statm", "rb") as f:
                    rss = int(f.read().split()[1]) * PAGE_SIZE
            except (OSError, IndexError, ValueError):
                pass
            if not slot.base_rss or figures["connections"] == 0:
                slot.base_rss = rss
        beat = max(slot.started, figures["beat_ns"] / 1e9)
        row = {"worker": slot.n, "pid": slot.pid, "cpu": slot.cpu, "port": slot.port,
               "up": slot.pid is not None, "healthy": self.healthy(slot, now),
               "heartbeat_age": round(now - beat, 3) if slot.pid is not None else None}
        for name in ROW_GAUGES:
            row[name] = figures[name]
        for name in link.COUNTERS:
            row[name] = figures[name] + slot.carried[name]
        row.update(restarts=slot.restarts, rss_bytes=rss, lost=slot.lost,
                   outbox_bytes=slot.outbox.bytes)
        return row

    def stats(self) -> dict:
        now = time.monotonic()
        workers = [self.worker_row(slot, now) for slot in self.slots]
        totals = {f: sum(w[f] for w in workers) for f in STAT_FIELDS}
        return {"workers": workers, "totals": totals}


# ---------------------------------------------------------------------------------------------
# Router: the app's messages to the worker that owns the id
# ---------------------------------------------------------------------------------------------


class MessageIds:
    """Message ids `<ms>-<seq>` (SPEC "Message ids"), Redis's stream id rule: the wall clock's
    milliseconds and a sequence within one; strictly increasing even if the clock steps back
    (the last ms is kept and seq counts on)."""

    def __init__(self):
        self.ms = 0
        self.seq = -1

    def next(self) -> tuple[int, int]:
        ms = time.time_ns() // 1_000_000
        if ms > self.ms:
            self.ms, self.seq = ms, 0
        else:
            self.seq += 1
        return self.ms, self.seq


class Router:
    """send / broadcast for the AppServer: a message is accepted whole (into every outbox it
    needs) with one message id, or refused whole with the reason, never half-delivered. Each
    returns ((ms, seq), None) when accepted, (None, why) when not. Nothing is accepted once the
    manager is stopping: the links are closing, and it would be lost."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.slots = supervisor.slots
        self.ids = MessageIds()
        self.outbox_limit = min(s.outbox.limit for s in self.slots)  # (--queue-bytes)
        self.messages_in = 0
        self.refused = 0  # messages refused because an outbox was full

    def full(self, outbox: Outbox, size: int) -> tuple:
        self.refused += 1
        if self.supervisor.stopping:
            return None, "the server is shutting down: try again later"
        if size > outbox.limit:
            return None, (f"a message of {size:,} bytes can never fit worker {outbox.n}'s "
                          f"outbox (--queue-bytes {outbox.limit:,})")
        state = "up" if outbox.link is not None else "down, restarting"
        return None, (f"worker {outbox.n} is not keeping up ({state}; {outbox.bytes:,} bytes "
                      f"waiting for it, --queue-bytes {outbox.limit:,}): try again later")

    def send(self, ids: list, message: bytes) -> tuple:
        """One message to one or more ids: one message id for all (SPEC)."""
        W = len(self.slots)
        size = link.HEAD_SIZE + len(message)
        need: dict = {}
        for i in ids:
            outbox = self.slots[server.owner(i, W)].outbox
            need[outbox] = need.get(outbox, 0) + size + len(i)
        for outbox, total in need.items():
            if not outbox.room(total) or self.supervisor.stopping:
                return self.full(outbox, total)
        ms, seq = self.ids.next()
        for i in ids:
            self.slots[server.owner(i, W)].outbox.put(link.encode_msg(i, message, ms, seq))
        self.messages_in += len(ids)  # one per id: each copy is kept and counted apart
        return (ms, seq), None

    def send_one(self, id_: bytes, message: bytes) -> tuple:
        """The fast path of binary frames and POST /send: one id, no lists."""
        outbox = self.slots[server.owner(id_, len(self.slots))].outbox
        ms, seq = self.ids.next()  # (a refused message leaves a hole in the ids: harmless)
        data = link.encode_msg(id_, message, ms, seq)
        if self.supervisor.stopping or not outbox.put(data):
            return self.full(outbox, len(data))
        self.messages_in += 1
        return (ms, seq), None

    def deliver(self, n: int, frame: bytes) -> bool:
        """A node's stream entry (nodes.StreamReader) to worker n; False while its outbox is
        full or the manager stops (the entry stays in the stream)."""
        return not self.supervisor.stopping and self.slots[n].outbox.put(frame)

    def deliver_all(self, frame: bytes) -> bool:
        """A broadcast entry to every worker, or to none yet."""
        if self.supervisor.stopping or not all(s.outbox.room(len(frame)) for s in self.slots):
            return False
        for slot in self.slots:
            slot.outbox.put(frame)
        return True

    def broadcast(self, message: bytes) -> tuple:
        size = link.HEAD_SIZE + len(message)
        for slot in self.slots:
            if not slot.outbox.room(size) or self.supervisor.stopping:
                return self.full(slot.outbox, size)
        ms, seq = self.ids.next()
        data = link.encode(BROADCAST, b"", message, ms, seq)
        for slot in self.slots:
            slot.outbox.put(data)
        self.messages_in += 1
        return (ms, seq), None


# ---------------------------------------------------------------------------------------------
# Metrics: GET /metrics in the Prometheus text format, from the same figures as /stats
# ---------------------------------------------------------------------------------------------

METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# Per worker, labelled worker="n": (name, type, field of a /stats worker row, help). SPEC's
# names, then ours. Counters are /stats's: a dead process's last figures are carried over, so
# none goes down across a restart.
WORKER_METRICS = (
    ("megacomet_connections", "gauge", "connections", "Open client connections."),
    ("megacomet_waiting", "gauge", "waiting", "Polls and streams waiting for a message."),
    ("megacomet_streams", "gauge", "streams", "Server-Sent Events streams (part of waiting)."),
    ("megacomet_queued_messages", "gauge", "queued_messages",
     "Messages kept in the ids' histories, delivered or not."),
    ("megacomet_queued_bytes", "gauge", "queued_bytes", "Bytes of the kept messages."),
    ("megacomet_rss_bytes", "gauge", "rss_bytes", "Resident memory of the worker process."),
    ("megacomet_up", "gauge", "healthy",
     "1 if the worker is up as /healthz says (alive, linked, heartbeat fresh, not draining)."),
    ("megacomet_accepted_total", "counter", "accepted", "Client connections accepted."),
    ("megacomet_delivered_total", "counter", "delivered",
     "Answers and stream events that carried a message."),
    ("megacomet_expired_total", "counter", "expired", "Kept messages evicted by --queue-ttl."),
    ("megacomet_dropped_total", "counter", "dropped",
     "Kept messages evicted by --queue-max or --queue-bytes."),
    ("megacomet_rejected_total", "counter", "rejected",
     "Requests answered with an error status, or closed before a whole request head."),
    ("megacomet_restarts_total", "counter", "restarts", "Times the worker was restarted."),
    ("megacomet_undelivered", "gauge", "undelivered", "Kept messages no client has had."),
    ("megacomet_outbox_bytes", "gauge", "outbox_bytes",
     "Bytes accepted for the worker that it has not acted on yet."),
    ("megacomet_lost_total", "counter", "lost",
     "Messages no client had had, held by a worker process when it died."),
    ("megacomet_expired_undelivered_total", "counter", "expired_undelivered",
     "Messages that reached --queue-ttl before any client had them."),
    ("megacomet_dropped_undelivered_total", "counter", "dropped_undelivered",
     "Messages evicted by the bounds before any client had them."),
    ("megacomet_refused_no_watch_total", "counter", "refused_no_watch",
     "Connections refused because epoll could not watch one more fd."),
)
CLOSE_CAUSES = tuple(f[len("closed_"):] for f in link.COUNTERS if f.startswith("closed_"))
# The manager's own: (name, type, field of /stats "manager", help).
MANAGER_METRICS = (
    ("megacomet_messages_in_total", "counter", "messages_in",
     "Messages accepted on the app port (one per id of an ids line)."),
    ("megacomet_app_rejected_total", "counter", "app_rejected",
     "App frames, lines and requests refused."),
    ("megacomet_app_connections", "gauge", "app_connections", "Open app-port connections."),
    ("megacomet_draining", "gauge", "draining", "1 from SIGTERM (or SIGINT) until the exit."),
)


# A node's (--redis): (name, type, field of /stats "manager", or "redis", help).
NODE_METRICS = (
    ("megacomet_redis_up", "gauge", "redis", "1 while Redis answers this node."),
    ("megacomet_stream_read_total", "counter", "stream_read",
     "Entries of this node's stream handed to its workers."),
    ("megacomet_stream_rejected_total", "counter", "stream_rejected",
     "Entries of this node's stream dropped: not its id, a bad id, missing fields."),
)


def metrics_text(stats: dict) -> bytes:
    """The Prometheus text exposition format (0.0.4) of a /stats answer."""
    lines = []
    workers = stats["workers"]
    for name, kind, field, doc in WORKER_METRICS:
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{worker="{w["worker"]}"}} {int(w[field])}' for w in workers]
    name = "megacomet_closed_total"
    lines += [f"# HELP {name} Connections closed unanswered, by cause (README, /stats).",
              f"# TYPE {name} counter"]
    lines += [f'{name}{{worker="{w["worker"]}",cause="{cause}"}} {w["closed_" + cause]}'
              for w in workers for cause in CLOSE_CAUSES]
    for name, kind, field, doc in MANAGER_METRICS:
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}",
                  f"{name} {int(stats['manager'][field])}"]
    if "redis" in stats:  # a node (--redis)
        for name, kind, field, doc in NODE_METRICS:
            value = stats["redis"] == "up" if field == "redis" else stats["manager"][field]
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {int(value)}"]
    return ("\n".join(lines) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# AppServer: the app port's three protocols
# ---------------------------------------------------------------------------------------------


class AppProtocol(asyncio.BufferedProtocol):
    """One app connection. Binary frames, the protocol of publishers in a hurry, are routed
    right here in the read callback: one loop pass per read. (Through asyncio streams a read
    takes three: the read wakes the task's future, the task routes and schedules the flush,
    the flush writes; each pass is an epoll_wait and a turn of the loop, per message when
    messages come one at a time.) Every other protocol is handed to AppServer.app_connection
    as a stream at its first byte.

    Reads go into one buffer shared by every connection (BufferedProtocol): the stock
    transport recv()s a fresh 256 KiB bytes object per read, which glibc mmaps, and shrinking
    and freeing it cost mremap + munmap and page faults, ~15 µs a read, for reads that are
    mostly a few dozen bytes (strace of a paced run). What a read brings is copied out before
    the callback returns."""

    view = memoryview(bytearray(APP_READ_SIZE))
    refused = False  # --redis: a frame of ours was not handed over (handed)

    def __init__(self, app: "AppServer"):
        self.app = app
        self.transport = None
        self.stream = None  # the StreamReaderProtocol, once handed to app_connection
        self.binary = False
        self.first = True  # the first read is taken whole, gate or not (read_more)
        self.buf = b""  # binary: what is not routed yet (a part frame, or frames gated)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.app.app_connections += 1

    def get_buffer(self, sizehint: int):
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.stream is not None:
            self.stream.data_received(self.view[:nbytes])
            return
        data = bytes(self.view[:nbytes])
        if not self.binary:
            if data[0] != 0x02 or self.app.opts.app_token is not None:
                self.stream = asyncio.StreamReaderProtocol(
                    asyncio.StreamReader(APP_READ_SIZE), self.app.app_connection)
                self.stream.connection_made(self.transport)
                self.stream.data_received(data)
                return
            self.binary = True
        self.buf = self.buf + data if self.buf else data
        self.route()

    def route(self) -> None:
        """Route the whole frames in hand, up to the gate; read on, or wait for the gate."""
        supervisor, flow = self.app.supervisor, self.app.flow
        while True:
            supervisor.batching = True
            try:
                used, gated, why = self.app.binary_frames(self.buf, self.first, self)
            finally:
                supervisor.batching = False
                if supervisor.flushing:
                    supervisor.flush()  # (its acks may open the gate again: see below)
            self.first = False
            if why is not None:
                self.app.app_error_bare(why)
                self.buf = b""
                self.transport.close()
                return
            self.buf = self.buf[used:]
            if not flow.open.is_set() or not gated:
                break
            # The gate was closed at a frame and opened by the flush's acks: nobody would
            # resume us, so the frames left are routed now.
        # Held between messages, never inside one (AppServer.read_more says why).
        if not flow.open.is_set() and (gated or not self.buf):
            self.transport.pause_reading()
            flow.paused.add(self)

    def handed(self, fut) -> None:
        """--redis: Redis's answer for a frame. A frame it did not take is counted and logged
        (also when the publisher has gone already), and closes the connection: the publisher
        has no other way to hear it (SPEC). The frames after it may have been taken."""
        if fut.cancelled():
            return
        why = fut.result()[1]
        if why is None:
            return
        if self.refused:  # logged once, with the first
            self.app.app_rejected += 1
            return
        self.refused = True
        self.app.app_error_bare(f"binary frame not handed over: {why}")
        self.buf = b""
        self.transport.close()

    def resume(self) -> None:
        if self.transport.is_closing():
            return
        if self.buf:
            self.route()  # may pause again
        if self not in self.app.flow.paused:
            self.transport.resume_reading()

    def eof_received(self):
        if self.stream is not None:
            return self.stream.eof_received()
        if self.buf:
            self.app.app_error_bare("connection closed inside a binary frame")
        return False  # close

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.pause_writing()

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.resume_writing()

    def connection_lost(self, exc) -> None:
        self.app.app_connections -= 1
        self.app.flow.paused.discard(self)
        if self.stream is not None:
            self.stream.connection_lost(exc)


class AppServer:
    def __init__(self, opts, router: Router, supervisor: Supervisor, flow: Flow, node=None):
        self.opts = opts
        self.router = router  # a Router, or on a node (--redis) a nodes.RedisRouter
        self.node = node  # --redis: the nodes.Node
        self.supervisor = supervisor
        self.flow = flow
        self.app_rejected = 0
        self.app_connections = 0

    def stats(self) -> dict:
        s = self.supervisor.stats()
        # An entry of the node's stream dropped is an app frame refused too (SPEC: "counted
        # as rejected"); stream_rejected (Node.stats) says how many of them.
        rejected = self.app_rejected + (self.node.reader.rejected if self.node else 0)
        s["manager"] = {"pid": os.getpid(), "messages_in": self.router.messages_in,
                        "app_rejected": rejected,
                        "app_refused_full": self.router.refused,
                        "app_connections": self.app_connections,
                        "outbox_messages": sum(len(sl.outbox.unsent) for sl in
                                               self.supervisor.slots),
                        "paused": sorted(r for r in self.flow.reasons if r.__class__ is int) +
                        sorted(r for r in self.flow.reasons if r.__class__ is not int),
                        "draining": self.supervisor.stopping}
        if self.node is not None:
            s["redis"] = "up" if self.node.state.up else "down"
            s["manager"].update(self.node.stats())
        return s

    def get(self, req, keep: bool):
        """GET /stats, /metrics and /healthz, answered from the pages (no worker is asked);
        None for any other request, and for one without the token (http_action says 401).
        /healthz needs no token: it tells nothing but up or down (SPEC)."""
        if req.method != b"GET":
            return None
        path = req.path
        if path == b"/healthz":
            now = time.monotonic()
            sup = self.supervisor
            down = [slot.n for slot in sup.slots if not sup.healthy(slot, now)]
            if not down:
                return http_reply(200, {"ok": True}, keep)
            body = {"ok": False, "down": down}
            if sup.stopping:
                body["draining"] = True
            return http_reply(503, body, keep)
        if path not in (b"/stats", b"/metrics") or not self.authorized(req):
            return None
        if path == b"/stats":
            return http_reply(200, self.stats(), keep)
        data = metrics_text(self.stats())
        return b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n" \
            b"Connection: %s\r\n\r\n%s" % (METRICS_TYPE, len(data),
                                            b"keep-alive" if keep else b"close", data)

    async def app_connection(self, reader, writer) -> None:
        """JSON lines and HTTP, as a stream (AppProtocol hands them over)."""
        try:
            # Not held back by the flow gate: a GET /stats is most wanted exactly then. What
            # this read brings is bounded all the same: a full outbox refuses (Outbox.put).
            data = await reader.read(APP_READ_SIZE)
            if not data:
                return
            first = data[0]
            if first == 0x02:  # (without --app-token, AppProtocol serves them)
                self.app_error(writer, "binary frames refused: --app-token is set")
            elif first == ord("{"):
                await self.serve_json_lines(reader, writer, data)
            elif 65 <= first <= 90 or 97 <= first <= 122:  # an ASCII letter, as SPEC says
                await self.serve_http(reader, writer, data)
            else:
                self.app_error(writer, f"unknown protocol (first byte 0x{first:02x})")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only at shutdown, for connections still open. Ending the task normally: on 3.11
            # a cancelled one makes asyncio's streams print a traceback for each.
            pass
        except Exception as e:  # a bug shown in one line, never a silent dead connection
            self.app_error(writer, f"internal error {e!r}")
        finally:
            writer.close()

    def app_error(self, writer, why: str) -> None:
        self.app_rejected += 1
        peer = writer.get_extra_info("peername")
        log(f"app connection {peer}: {why}; closed")

    async def read_more(self, reader, partial: bool) -> bytes:
        """The one place app bytes come in after the first read: waits while the flow is
        blocked (a worker is behind), unless `partial`: part of a message is in hand. The
        gate holds a publisher between two messages, not inside one (else a publish whose
        bytes came in two segments would stall half-sent for up to --worker-timeout); the
        serve loops, for their part, stop after one message once the gate is closed
        (`gated`). So a closed gate lets in at most one message per connection, refused if
        the outbox is full."""
        if not partial and not self.flow.open.is_set():
            await self.flow.open.wait()
        return await reader.read(APP_READ_SIZE)

    def gated(self) -> bool:
        return not self.flow.open.is_set()

    def binary_frames(self, buf: bytes, first: bool, conn) -> tuple:
        """The original's frames: 0x02 <id> 0x00 <message> 0x00, repeated, no reply. Routes
        the whole ones at the start of buf; returns (bytes used, gated, error or None).
        Once the gate is closed, the frames after the one in hand wait (`gated`), except in
        a connection's first read, taken whole. On a node (--redis) Redis answers later:
        `conn.handed` hears of each frame's fate."""
        max_message = self.opts.max_message
        pos, size = 0, len(buf)
        while pos < size:
            if pos and not first and not self.flow.open.is_set():
                return pos, True, None
            if buf[pos] != 0x02:
                return pos, False, "binary frame does not start with 0x02"
            id_end = buf.find(b"\x00", pos + 1, pos + 130)
            if id_end == -1:
                if size - pos >= 130:
                    return pos, False, "binary frame id over 128 bytes"
                break
            id_ = buf[pos + 1:id_end]
            if not valid_id(id_):
                return pos, False, f"invalid id {id_[:40]!r} in a binary frame"
            msg_end = buf.find(b"\x00", id_end + 1, id_end + max_message + 2)
            if msg_end == -1:
                if size - id_end - 1 > max_message:
                    return pos, False, f"message over --max-message {max_message}"
                break
            mid, refused = self.router.send_one(id_, buf[id_end + 1:msg_end])
            if refused is not None:  # the frames before it were taken
                return pos, False, f"binary frame refused: {refused}"
            if mid.__class__ is not tuple:
                mid.add_done_callback(conn.handed)
            pos = msg_end + 1
        return pos, False, None

    def app_error_bare(self, why: str) -> None:
        self.app_rejected += 1
        log(f"app connection: {why}; closed")

    async def serve_json_lines(self, reader, writer, buf: bytes) -> None:
        """One JSON object a line, one reply line each."""
        authed = self.opts.app_token is None
        line_max = self.opts.max_message * 8 + 4096  # room for JSON's escapes
        first = True  # the first read is taken whole, gate or not (see app_connection)
        out = []  # this read's replies, in order (on a node some are Redis's, to come)
        while True:
            pos = 0
            gated = False
            while True:
                end = buf.find(b"\n", pos)
                if end == -1:
                    break
                if pos and not first and self.gated():
                    gated = True  # the lines after this one wait for the gate
                    break
                line, pos = buf[pos:end], end + 1
                if not line.strip():
                    continue
                reply, authed = self.json_line(line, authed)
                out.append(reply)
            if out:
                await self.settle(out)
                writer.write(b"".join(json.dumps(r).encode() + b"\n" for r in out))
                out.clear()
            buf = buf[pos:]
            first = False
            if len(buf) > line_max and not gated:
                writer.write(b'{"ok": false, "error": "line too long"}\n')
                self.app_rejected += 1
                return
            await writer.drain()
            if gated:
                await self.flow.open.wait()
                continue
            data = await self.read_more(reader, bool(buf))
            if not data:
                return
            buf += data

    def json_line(self, line: bytes, authed: bool):
        def no(why):
            self.app_rejected += 1
            return {"ok": False, "error": why}, authed
        try:
            obj = json.loads(line, parse_constant=json_no_constant, parse_float=json_float,
                             parse_int=json_int)
        except json.JSONDecodeError as e:
            return no(f"invalid JSON at character {e.pos}: {e.msg}")
        except UnicodeDecodeError:
            return no("invalid JSON: the line is not UTF-8")
        except RecursionError:
            return no("invalid JSON: nested too deep")
        except ValueError as e:  # from the three checks above
            return no(f"invalid JSON: {e}")
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
            mid, refused = self.router.broadcast(message)
            return (no(refused) if refused else (self.json_reply(mid), authed))
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
        mid, refused = self.router.send(raw, message)  # all valid: none is half-delivered
        return no(refused) if refused else (self.json_reply(mid), authed)

    def json_reply(self, mid):
        if mid.__class__ is tuple:
            return {"ok": True, "mid": "{}-{}".format(*mid)}
        return self.json_later(mid)

    async def json_later(self, fut) -> dict:
        mid, refused = await fut
        if refused is not None:
            self.app_rejected += 1
            return {"ok": False, "error": refused}
        return {"ok": True, "mid": "{}-{}".format(*mid)}

    async def settle(self, out: list) -> None:
        """Replies Redis has yet to give (--redis), awaited in order, in place. Cancelled
        (a stop) the ones not had are dropped, so that a `finally` can write the rest."""
        if self.node is None:
            return
        for i, reply in enumerate(out):
            if reply.__class__ is not bytes and reply.__class__ is not dict:
                try:
                    out[i] = await reply
                except BaseException:
                    for later in out[i + 1:]:
                        if asyncio.iscoroutine(later):
                            later.close()  # never started: no "never awaited" warning
                    del out[i:]
                    raise

    async def serve_http(self, reader, writer, buf: bytes) -> None:
        """HTTP/1.1 with keep-alive: POST /send/<id>, POST /broadcast, GET /stats.
        Pipelined requests already in the buffer are answered with one write: asyncio's
        write() is a send() each time its buffer is empty."""
        pos = scanned = 0  # the request being read starts at buf[pos]
        first = True  # the first read is taken whole, gate or not (see app_connection)
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
                        read_only = req.method == b"GET" and req.path in GET_PATHS
                        refused = None if read_only else self.http_action(req, None, False)
                        if refused is not None:  # no body wanted: refuse before it is sent
                            out.append(refused)
                            return
                        out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
                        continued = True
                if req is None or len(buf) < used + length:
                    scanned = used if req is None else 0  # a whole head is parsed again: cheap
                    if out:
                        await self.settle(out)
                        writer.write(b"".join(out))
                        out.clear()
                    await writer.drain()
                    first = False
                    data = await self.read_more(reader, len(buf) > pos)
                    if not data:
                        return
                    buf, pos = buf[pos:] + data, 0
                    continue
                body, pos, scanned = buf[used:used + length], used + length, 0
                continued = False
                conn = req.headers.get(b"connection", b"").lower()
                keep = b"close" not in conn if req.version == b"HTTP/1.1" else \
                    b"keep-alive" in conn
                reply = self.get(req, keep)
                out.append(reply if reply is not None else self.http_action(req, body, keep))
                if not keep:
                    return
                if not first and len(buf) > pos and self.gated():  # the next ones wait
                    await self.settle(out)
                    writer.write(b"".join(out))
                    out.clear()
                    await writer.drain()
                    await self.flow.open.wait()
        finally:
            if out:
                await self.settle(out)
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
        """Act on one whole request (but those get() answers); returns the whole response.
        With body None it only checks: the refusal, or None if the request would be taken."""
        def no(status, why):
            self.app_rejected += 1
            return http_reply(status, {"ok": False, "error": why}, keep)
        if req.path == b"/healthz":  # open to all, GET only
            return no(405, "use GET")
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
                mid, refused = self.router.broadcast(body)
            else:
                mid, refused = self.router.send_one(path[6:], body)
            if refused is not None:
                return self.publish_refused(refused, keep)
            if mid.__class__ is not tuple:
                return self.http_later(mid, keep)
            return accepted_reply(mid, keep)
        if path in GET_PATHS:
            return no(405, "use GET")
        return no(404, "POST /send/<id>, POST /broadcast, GET /stats, /metrics or /healthz")

    def publish_refused(self, why: str, keep: bool) -> bytes:
        self.app_rejected += 1
        return http_reply(503, {"ok": False, "error": why}, keep, b"Retry-After: 1\r\n")

    async def http_later(self, fut, keep: bool) -> bytes:
        mid, refused = await fut
        return self.publish_refused(refused, keep) if refused is not None else \
            accepted_reply(mid, keep)

    async def status_lines(self) -> None:
        interval = self.opts.status_interval
        last_accepted = last_delivered = last_in = 0
        slots = self.supervisor.slots
        while not self.supervisor.stopping:
            await asyncio.sleep(interval)
            s = self.stats()
            t = s["totals"]
            conns = t["connections"]
            base = sum(slot.base_rss for slot in slots)
            per_conn = (t["rss_bytes"] - base) / conns if conns else 0
            up = sum(w["up"] for w in s["workers"])
            messages_in = self.router.messages_in
            log(f"conns {conns:,} (+{(t['accepted'] - last_accepted) / interval:,.0f}/s) "
                f"waiting {t['waiting']:,} | msgs in "
                f"{(messages_in - last_in) / interval:,.0f}/s out "
                f"{(t['delivered'] - last_delivered) / interval:,.0f}/s queued "
                f"{t['queued_messages']:,} dropped {t['dropped']:,} expired {t['expired']:,} "
                f"lost {t['lost']:,} | rss {t['rss_bytes'] / 2**20:,.1f} MiB, "
                f"{per_conn:,.0f} B/conn | workers {up}/{len(slots)} up" +
                (f" | redis: {s['redis']}" if self.node is not None else ""))
            last_accepted, last_delivered, last_in = t["accepted"], t["delivered"], messages_in


# ---------------------------------------------------------------------------------------------
# Start and run
# ---------------------------------------------------------------------------------------------


async def run(opts) -> int:
    loop = asyncio.get_running_loop()
    flow = Flow()
    supervisor = Supervisor(opts, flow)
    supervisor.open_ports()
    router = Router(supervisor)
    node = None
    if opts.redis is not None:
        import nodes  # only here: the one-box manager never needs the redis package
        node = nodes.Node(opts, router, supervisor, flow)
    app = AppServer(opts, router if node is None else node.router, supervisor, flow, node)
    try:
        server_ = await loop.create_server(lambda: AppProtocol(app), opts.app_host,
                                           opts.app_port, backlog=opts.backlog)
    except OSError as e:
        sys.exit(bind_error("app port", opts.app_host, opts.app_port,
                            "--app-host, --app-port", e, opts))
    for sig in (signal.SIGTERM, signal.SIGINT):  # both drain; a second one hurries it
        loop.add_signal_handler(sig, supervisor.stop, sig.name)
    loop.add_signal_handler(signal.SIGCHLD, supervisor.reap)
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # (blocked in main)
    supervisor.reconcile()  # the first pass spawns every worker
    log(f"megacomet: {opts.workers} workers on {opts.host}:{opts.base_port}-"
        f"{opts.base_port + opts.workers - 1}, app port {opts.app_host}:{opts.app_port}, "
        f"pid {os.getpid()}")
    tasks = [loop.create_task(supervisor.watchdog())]
    if node is not None:
        tasks += [loop.create_task(t) for t in node.tasks()]
    if opts.status_interval > 0:
        tasks.append(loop.create_task(app.status_lines()))
    await supervisor.done.wait()
    server_.close()
    for task in tasks:
        task.cancel()
    if node is not None:
        await node.close()
    supervisor.reap()
    return supervisor.exit_code


def read_subscriber_keys(path: str) -> list:
    """server.read_keys, and a warning for keys short enough to be guessed."""
    keys = server.read_keys(path)
    short = sum(len(k) < SHORT_KEY for k in keys)
    if short:
        log(f"megacomet: warning: {short} of the {len(keys)} keys in {path} are shorter than "
            f"{SHORT_KEY} bytes and can be guessed; make one with python3 -c "
            "'import secrets; print(secrets.token_hex(32))'")
    return keys


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MegaComet: long-polling HTTP server, one worker "
                                "per CPU, app messages on the app port. See README.md.")
    p.add_argument("--workers", type=options.positive_int,
                   default=len(os.sched_getaffinity(0)),
                   help="worker processes (default: CPUs in the affinity mask)")
    p.add_argument("--host", default="0.0.0.0", help="comet ports bind here")
    p.add_argument("--base-port", type=options.port, default=8000,
                   help="worker n listens on base + n (default 8000)")
    p.add_argument("--app-host", default="127.0.0.1", help="app port host (private default)")
    p.add_argument("--app-port", type=options.port, default=9000)
    p.add_argument("--backlog", type=options.positive_int, default=4096,
                   help="listen backlog (capped by net.core.somaxconn)")
    p.add_argument("--max-message", type=options.positive_int, default=65536,
                   help="larger messages are refused (bytes)")
    p.add_argument("--queue-ttl", type=options.positive_float, default=60.0,
                   help="messages are kept (delivered or not) this many seconds")
    p.add_argument("--queue-max", type=options.positive_int, default=100,
                   help="messages kept per id; overflow drops the oldest")
    p.add_argument("--queue-bytes", type=options.positive_int, default=64 * 1024 * 1024,
                   help="queued bytes per worker; overflow drops the oldest. Also the bound on "
                        "a worker's outbox in the manager: past it publishes are refused")
    p.add_argument("--poll-timeout", type=options.non_negative, default=0.0,
                   help="a waiting poll gets 204 after this many seconds (0: off)")
    p.add_argument("--max-waiters", type=options.positive_int, default=4,
                   help="polls and streams that may wait on one id; one more pushes the "
                        "oldest out (409, or `event: replaced` for a stream)")
    p.add_argument("--sse-heartbeat", type=options.non_negative, default=30.0,
                   help="seconds between SSE comment lines to idle streams (0: off)")
    p.add_argument("--sse-buffer", type=options.positive_int, default=256 * 1024,
                   help="bytes of live messages a stream may leave unread before it is closed")
    p.add_argument("--keepalive", type=options.non_negative, default=60.0,
                   help="TCP keepalive idle seconds on client sockets (0: off)")
    p.add_argument("--header-timeout", type=options.positive_float, default=10.0,
                   help="close connections that sent no whole request head by then")
    p.add_argument("--write-timeout", type=options.positive_float, default=30.0,
                   help="close a client that has not read its whole answer by then")
    p.add_argument("--worker-timeout", type=options.positive_float, default=10.0,
                   help="kill and restart a worker whose heartbeat is older than this "
                        "(seconds; a stopped or stuck worker)")
    p.add_argument("--status-interval", type=options.non_negative, default=10.0,
                   help="status line period in seconds (0: off)")
    p.add_argument("--cors-origin", type=options.header_value, default="*",
                   help="Access-Control-Allow-Origin value")
    p.add_argument("--app-token", type=options.token, default=None,
                   help="require this token on the app port (HTTP Bearer, JSON auth line)")
    p.add_argument("--public-scheme", choices=("http", "https"), default="http",
                   help="scheme of a 307's Location: https behind a TLS proxy (default http)")
    p.add_argument("--public-base-port", type=options.port, default=None,
                   help="a 307 points at this + the owner's n: the proxy's port of worker 0 "
                        "(default: --base-port)")
    p.add_argument("--trusted-proxy", type=options.networks, default=(),
                   metavar="ADDR[,ADDR...]",
                   help="peers (addresses or networks) whose X-Forwarded-Proto and "
                        "X-Forwarded-Port set a 307's scheme and port (default: none)")
    p.add_argument("--subscriber-key-file", metavar="F", default=None,
                   help="every poll and stream must carry exp and sig, signed with a key of "
                        "this file (one a line); SIGHUP reads it again")
    p.add_argument("--drain", type=options.non_negative, default=2.0,
                   help="SIGTERM: seconds over which the workers answer their waiting polls "
                        "204 and end their streams before exiting (0: all at once)")
    p.add_argument("--redis", metavar="URL", default=None,
                   help="several boxes sharing one Redis (redis://HOST:6379/0): publishes "
                        "go through the owner node's stream (needs the redis package)")
    p.add_argument("--node", type=options.node_of, default=None, metavar="K/N",
                   help="with --redis: this box is node K of N, K from 0 (default 0/1)")
    p.add_argument("--nodes", type=options.host_list, default=None,
                   metavar="HOST0[:BASE0],...",
                   help="with --redis: every node as clients reach it, in node order (BASE "
                        "default: this node's --base-port)")
    p.add_argument("--stream-prefix", type=options.stream_prefix, default="megacomet",
                   help="with --redis: node k reads the stream PREFIX:k (default megacomet)")
    opts = p.parse_args(argv)
    last = opts.base_port + opts.workers - 1
    if opts.redis is None:
        if opts.node is not None or opts.nodes is not None:
            p.error("--node and --nodes are for several boxes sharing one Redis: add --redis")
    else:
        opts.node = opts.node or (0, 1)
        if opts.nodes is None:
            if opts.node[1] > 1:
                p.error(f"--node {opts.node[0]}/{opts.node[1]}: --nodes must name the "
                        f"{opts.node[1]} nodes")
            wildcard = opts.host in ("", "0.0.0.0", "::")
            host = socket.gethostname() if wildcard else opts.host
            opts.nodes = ((f"[{host}]" if ":" in host else host, None),)
        if len(opts.nodes) != opts.node[1]:
            p.error(f"--nodes names {len(opts.nodes)} nodes, --node {opts.node[0]}/"
                    f"{opts.node[1]} says {opts.node[1]}")
        opts.nodes = tuple((h, opts.base_port if b is None else b) for h, b in opts.nodes)
        if not opts.redis.startswith(("redis://", "rediss://", "unix://")):
            p.error(f"--redis: expected a URL redis://[:PASSWORD@]HOST[:PORT][/DB] (or "
                    f"rediss://, unix://), got {opts.redis!r}")
    if last > 65535:
        p.error(f"--base-port {opts.base_port} + --workers {opts.workers} runs past port 65535 "
                f"(the last worker would listen on {last})")
    if opts.base_port <= opts.app_port <= last and same_address(opts.host, opts.app_host):
        p.error(f"--app-port {opts.app_port} is one of the comet ports {opts.base_port}-{last} "
                f"(--base-port {opts.base_port} + --workers {opts.workers}, worker "
                f"{opts.app_port - opts.base_port} listens there): pick an app port outside "
                "them")
    if opts.public_base_port and opts.public_base_port + opts.workers - 1 > 65535:
        p.error(f"--public-base-port {opts.public_base_port} + --workers {opts.workers} runs "
                f"past port 65535 (the last worker's public port would be "
                f"{opts.public_base_port + opts.workers - 1})")
    return opts


def same_address(a: str, b: str) -> bool:
    """Whether listeners on host a and host b, same port, would collide: the same address,
    or either one a wildcard (which takes the port on every address)."""
    wild = ("", "0.0.0.0", "::", "0:0:0:0:0:0:0:0")
    return a == b or a in wild or b in wild


def main(argv=None) -> int:
    # SIGHUP's default action ends a process: until run() has its handler, one sent by a
    # reload right after the start (systemctl start; systemctl reload) waits instead.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    opts = parse_args(argv)
    if opts.redis is not None:
        import nodes
        try:
            nodes.redis_module()
        except nodes.RedisMissing as e:
            print(e, file=sys.stderr)
            return 2
    if opts.subscriber_key_file is not None:
        # Absolute: the workers read it (at start, on SIGHUP) whatever their directory.
        opts.subscriber_key_file = os.path.abspath(opts.subscriber_key_file)
        try:
            keys = read_subscriber_keys(opts.subscriber_key_file)
        except server.KeyFileError as e:
            print(f"megacomet: {e} (--subscriber-key-file)", file=sys.stderr)
            return 2
        log(f"megacomet: {len(keys)} subscriber keys read from {opts.subscriber_key_file}: "
            "every poll and stream must be signed")
    nofile = raise_nofile()
    log(manager_capacity_line(opts.workers, nofile))
    return asyncio.run(run(opts))


if __name__ == "__main__":
    sys.exit(main())
