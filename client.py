"""MegaComet load client: opens hundreds of thousands of long polls and counts what comes back.

The Python counterpart of the original's `megatest X Y`, built the way wrk.c is built.

    python client.py PREFIX HOST [--conns N] [--source-ips LIST] [--send M] [--json FILE] ...

opens ids PREFIX0 ... PREFIX{N-1}, each to HOST:base_port + x31(id) % W (W asked of GET /_info),
holds them, prints one progress line a second and a summary at the end. With --hosts
H0[:BASE0],H1[:BASE1],... (several nodes sharing one Redis) the ids spread over the nodes by
the servers' slot function: s = x31(id) % (nodes * W), to host H{s // W}, port BASE + s % W.

Theory of operation
-------------------
Processes. One parent and K children; nothing is shared between them. The parent plans, forks,
aggregates and reports; the children do all the network work. Child k owns a contiguous block of
ids, its own epoll, its own counters and its own latency histogram, and tells the parent about
them through a pipe: one JSON line every REPORT_S (0.25 s), and a last one (with the histogram)
when told to stop. The parent merges by adding. No locks anywhere. There are K processes because
one process holds at most RLIMIT_NOFILE sockets: the parent raises the soft limit to the hard one
and splits --conns so that every child stays FD_MARGIN under it.

Source addresses. A TCP connection is the 4-tuple (source ip, source port, destination ip,
destination port). Towards one destination ip:port one source address can hold at most as many
connections as ip_local_port_range has ports (28,232 by default). It gets slow long before that:
connect() tries the even half of the range first (bind() gets the odd half), and once those are
taken every further connect() scans the whole range in the kernel, under a lock. Measured: 7.7 ms
per connect() at ~18k connections per pair, 100% system CPU; and on a 2-core box, 39,968 polls
to 2 ports ramp at 1,962/s from one source address, 24,319/s from two. So the plan keeps each
(source address, destination ip:port) pair under PAIR_FILL of the even half (port 8000 of two
nodes is two destinations), binding every socket to one of several source addresses with
IP_BIND_ADDRESS_NO_PORT (the kernel then picks the port at connect() time, unique per 4-tuple,
instead of at bind() time, unique per address). On loopback all of 127/8 is local, so the
client picks 127.0.0.1, .2, ... itself when the count needs them.

A connection's life, which is also the order of this file:

    CONNECTING  socket(), [bind(source)], connect() -> EINPROGRESS; waits for EPOLLOUT. A
                re-poll sends its request at once instead: on loopback the kernel ran the
                handshake inside connect(), so it goes and the connection is WAITING;
                elsewhere send() says EAGAIN, and it waits for EPOLLOUT too
    WAITING     connected (SO_ERROR == 0 on EPOLLOUT, or that send() went): counted open;
                "GET /<id>.js" sent; waits for the answer, which for a long poll may take
                hours: there is no read timeout, by design
    answer      200: a message (latency recorded); 204: the server's poll timeout. Either way the
                id polls again at once on a new connection, as a browser does. 307: reconnect
                once to the owner's port (with --hosts, on the host the Location names).
                409 (pushed out by a 5th waiter) and other 4xx: the id is given up. 5xx and
                every failure (refused, timeout, reset, EMFILE, EADDRNOTAVAIL, ...): counted
                by cause, retried with exponential backoff.

Every outcome is counted; nothing is printed per connection.

The ramp. Each child starts its first connects at --rate / K a second, at most MAX_CONNECTING in
flight. The ramp ends when every id is open, or when every id has been tried and the open count
has not grown for --stall seconds; then the summary names the likely cause from what it saw. A
server out of file descriptors does not refuse: the kernel completes the handshake and the
connection waits in its accept queue, open as far as a client can tell. So at the ramp's end the
parent also asks the manager's GET /stats (the app port) how many connections the server holds.

--send M. When the ramp ends each child also acts as the app (its Sender, after the Child in
this file): it sends its share of M messages (seq k, k+K, ...) as binary frames over its own
connection to the manager's app port, to its own open ids, round robin. Message `seq` is *meant*
to go at t0 + seq / --send-rate and carries that time: b"t=<CLOCK_MONOTONIC ns>;seq=<n>".
CLOCK_MONOTONIC is one clock for every process on a Linux box, so the child that reads the 200
computes the latency against the intended send time. A sender that falls behind makes latencies
worse, never fewer (no coordinated omission: wrk's known flaw). A delivered message closes that
poll and the id re-polls; a message sent while the id is between polls waits in the server's
queue, so nothing should be lost. Each of the M ends as one of: received; lost (sent, and not
received --grace seconds after the last send); or unsendable, with its cause: the app port
refused or timed out the connection, or closed or reset it (the manager closes a binary-frame
connection when it refuses a frame). The Sender then connects again with backoff and goes on
with the schedule; messages due while it has no connection are unsendable, not sent late.

Bounds. Every loop ends by itself: the run stops --hold seconds after the ramp ends (default
60 s; 0 with --send, whose phase ends when all is received or --grace after the last send), or at
--max-time (default 1 h), or on SIGINT/SIGTERM; children also stop when the
parent's pipe closes. Ctrl-C: the children report at once, the summary is out within
STOP_WAIT_S + STOP_WAIT_PER_CHILD_S per child (a child that has not reported by then is
killed), and the processes are gone once the kernel has closed their sockets (abortively: RST,
no TIME_WAIT left to block the next run).

The verdict. The exit status says whether the run did what it was asked (EXIT_OK: every id open,
every message sent and received), and when not, one line on stderr says what it missed and why:
connections short (with the likely cause), messages unsendable (by cause) or lost, a child
process that failed, an interruption (128 + the signal's number).
"""

import argparse
import errno
import functools
import heapq
import ipaddress
import json
import math
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from array import array
from collections import deque
from dataclasses import dataclass, field, fields
from itertools import zip_longest
from typing import NamedTuple

from options import (
    HOSTNAME_RE,
    host_list,
    non_negative,
    non_negative_int,
    port,
    positive_float,
    positive_int,
)
from server import KeyFileError, read_keys, sign, valid_id, x31
from tuning.check import raise_nofile

# ---------------------------------------------------------------------------------------------
# Constants and limits
# ---------------------------------------------------------------------------------------------

DEFAULT_CONNS = 250_000     # the original megatest opened 250k per client box
FD_MARGIN = 100             # fds a child keeps free for stdio, epoll, pipes, its app socket
PAIR_FILL = 0.9             # fill at most this share of the even half of ip_local_port_range
                            # per (source, destination port) pair: past the half, connect()
                            # scans the range (7.7 ms each at ~18k per pair, measured)
DEFAULT_PORT_RANGE = (32768, 60999)     # Linux's default, if /proc cannot be read
IP_BIND_ADDRESS_NO_PORT = 24            # <linux/in.h>; not exported by the socket module
MAX_CONNECTING = 1000       # connects in flight per child: beyond the listen backlog (4096,
                            # shared by all children) more SYNs only get dropped and retried
CONNECT_TIMEOUT_S = 10.0    # the kernel would retry a SYN for ~127 s; a stuck ramp says so sooner
RETRY_BASE_S = 1.0          # failed connection: retry after 1, 2, 4 ... s,
RETRY_MAX_S = 16.0          # at most this long, so a refusing server is not hammered
MAX_REDIRECTS = 1           # the SPEC's server redirects at most once (to the owner's port)
MAX_LEARNT_HOSTS = 64       # hosts a child learns from Locations beyond --hosts (each one
                            # looked up once): a server naming more is answered by giving up
RECV_SIZE = 65536           # one recv(); messages are at most 64 KiB (--max-message)
MAX_EVENTS = 4096           # epoll events per loop turn
TICK_S = 1.0                # progress line period
REPORT_S = 0.25             # a child's report period: the summary's time series samples at
                            # this rate (a report is a few hundred bytes of JSON)
STALL_S = 5.0               # the ramp is over when the open count has not grown for this long
SERVER_CHECKS = 4           # at the ramp's end, ask the manager's /stats up to this often,
SERVER_CHECK_GAP_S = 0.5    # this far apart, while it holds fewer connections than we opened
STOP_WAIT_S = 1.5           # the parent waits this long for the children's last reports,
STOP_WAIT_PER_CHILD_S = 0.2  # and this much more per child: on a small box 51 children busy
                            # with a million re-polls (a broadcast) took longer than 1.5 s
REPORT_WRITE_S = 5.0        # a child gives up (and exits 1) when its pipe stays full this long
REPORT_MAX = 16 << 20       # a report line longer than this was not written by a child
                            # (the largest real one: 65,536 source addresses, ~0.5 MB)
REAP_WAIT_S = 0.5           # how long the parent waits to learn how a failed child ended
SEND_BATCH = 5000           # frames queued per loop turn, so receiving is never starved
APP_BUFFER_MAX = 1 << 20    # stop queueing frames while this much waits for the app socket
APP_RETRY_BASE_S = 0.1      # the app connection failed or was closed: open it again after
APP_RETRY_MAX_S = 2.0       # 0.1, 0.2, 0.4 ... s, at most this long,
APP_STABLE_S = 1.0          # and from 0.1 s again after a connection that lasted this long
DEFAULT_HOLD_S = 60.0       # hold the connections this long after the ramp (0 with --send)
DEFAULT_MAX_TIME_S = 3600.0     # hard cap on a run, whatever else happens
DEFAULT_GRACE_S = 5.0       # after the last send, wait this long for deliveries before "lost"
DEFAULT_SEND_RATE = 1000.0  # messages a second; 0 = all at once (latency then includes queueing)
SIGN_TTL_S = 3600           # --subscriber-key-file: each poll is signed valid for this long
DEFAULT_APP_HOST = "127.0.0.1"  # where the manager's app port listens by default

# Failure causes, in the order the progress line and the summary show them.
CAUSES = ("refused", "timeout", "reset", "closed", "EMFILE", "EADDRNOTAVAIL", "http", "other")
ERRNO_CAUSE = {
    errno.ECONNREFUSED: "refused",
    errno.ETIMEDOUT: "timeout",
    errno.ECONNRESET: "reset",
    errno.EPIPE: "reset",
    errno.ECONNABORTED: "reset",
    errno.EMFILE: "EMFILE",
    errno.ENFILE: "EMFILE",         # the system-wide table: same fix, different knob
    errno.EADDRNOTAVAIL: "EADDRNOTAVAIL",
    errno.EADDRINUSE: "EADDRNOTAVAIL",  # bind() without a free port: same shortage
    errno.ENETUNREACH: "other",
    errno.EHOSTUNREACH: "other",
}

# ---------------------------------------------------------------------------------------------
# Planning: processes and source addresses (pure functions, unit-tested)
# ---------------------------------------------------------------------------------------------


def parse_source_ips(text: str) -> list[str]:
    """'10.0.0.1,10.0.0.7' or '127.0.0.2-127.0.0.9' or '127.0.0.2-9' or '10.1.0.0/30', or a
    comma list of those: IPv4 addresses in the order given, without duplicates."""
    out: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "/" in item:
            net = ipaddress.IPv4Network(item, strict=False)
            if net.num_addresses > 65536:
                raise ValueError(f"source network {item!r} is over 65536 addresses")
            hosts = list(net.hosts()) or [net.network_address]
            out.extend(str(a) for a in hosts)
        elif "-" in item:
            first_s, _, last_s = item.partition("-")
            first = ipaddress.IPv4Address(first_s.strip())
            last_s = last_s.strip()
            if "." not in last_s:       # 127.0.0.2-9: the last octet only
                last_s = first_s.rsplit(".", 1)[0] + "." + last_s
            last = ipaddress.IPv4Address(last_s)
            if last < first:
                raise ValueError(f"source range {item!r} runs backwards")
            if int(last) - int(first) >= 65536:
                raise ValueError(f"source range {item!r} is over 65536 addresses")
            out.extend(str(ipaddress.IPv4Address(a)) for a in range(int(first), int(last) + 1))
        else:
            out.append(str(ipaddress.IPv4Address(item)))
    if not out:
        raise ValueError("no source address given")
    if len(set(out)) > 65536:
        raise ValueError("over 65536 source addresses")
    return list(dict.fromkeys(out))


def read_port_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return DEFAULT_PORT_RANGE


def pair_limit(port_range: tuple[int, int]) -> int:
    """Connections one (source address, destination ip:port) pair may hold before connect()
    gets slow: PAIR_FILL of the even half of the local port range."""
    lo, hi = port_range
    return max(1, int((hi - lo + 1) // 2 * PAIR_FILL))


def slot(id_: bytes, nodes: int, workers: int) -> tuple[int, int]:
    """(node, worker) that holds `id_` when N nodes of W workers share the ids (SPEC, "More
    than one box"): slot s = x31(id) % (N * W), node s // W, worker s % W. With one node,
    exactly server.owner()."""
    return divmod(x31(id_) % (nodes * workers), workers)


def per_port_counts(prefix: bytes, conns: int, workers: int, nodes: int = 1) -> list[int]:
    """How many of PREFIX0..PREFIX{conns-1} each destination (node, worker port) gets, at
    index node * W + worker (= the slot): ports of different nodes are different destinations.
    The ids come in tens that differ in their last digit only, and the last byte weighs 1 in
    x31: one hash per ten ids (the parent does this before any child starts; 1,000,000 ids
    took 2.0 s hashed one by one)."""
    slots = nodes * workers
    counts = [0] * slots
    for base in range(0, conns, 10):
        h = x31(b"%s%d" % (prefix, base))
        for t in range(min(10, conns - base)):
            counts[((h + t) & 0xFFFFFFFF) % slots] += 1
    return counts


def resolve(host: str) -> tuple[str, int]:
    """(address, socket family) of a host as written in --hosts or a Location: "[v6]" is an
    IPv6 literal; anything else is looked up as IPv4, as HOST is (gethostbyname). OSError when
    it cannot be."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), socket.AF_INET6
        except ValueError:
            raise OSError(f"{host} is not an IPv6 address") from None
    return socket.gethostbyname(host), socket.AF_INET


def overlapping_nodes(nodes, workers: int) -> str | None:
    """Two --hosts entries whose port ranges meet on one address, in words, or None. They
    would be one server's ports counted as two nodes': every plan here would be wrong."""
    ordered = sorted(nodes, key=lambda node: (node.addr, node.base_port))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.addr == b.addr and a.base_port + workers > b.base_port:
            return (f"{a.name} and {b.name} both take port {b.base_port} of {b.addr} "
                    f"({workers} workers each)")
    return None


def plan_sources(max_per_port: int, port_range: tuple[int, int], explicit: list[str] | None,
                 loopback: bool) -> tuple[list[str], int, str | None]:
    """(source addresses to bind, how many the count needs, a warning or None).

    An empty list means "do not bind, let the kernel choose": enough while one source address
    keeps every destination port under pair_limit()."""
    limit = pair_limit(port_range)
    needed = max(1, math.ceil(max_per_port / limit))
    have = len(explicit) if explicit else 1
    warning = None
    if explicit:
        sources = list(explicit)
    elif needed > 1 and loopback:
        sources = [str(ipaddress.IPv4Address("127.0.0.1") + i) for i in range(needed)]
        have = needed
    else:
        sources = []
    if have < needed:
        lo, hi = port_range
        warning = (f"warning: {max_per_port:,} connections to one server port need {needed} "
                   f"source addresses to stay under {limit:,} per (source, port) pair (the even "
                   f"half of ip_local_port_range {lo}-{hi}), and there "
                   f"{'are' if have > 1 else 'is'} {have}: past that line every connect() "
                   f"scans the port range in the kernel; add --source-ips")
    return sources, needed, warning


def plan_procs(conns: int, nofile_hard: int, override: int | None = None
               ) -> tuple[int, str | None]:
    """(child processes, a warning or None): enough that none passes its open-file limit."""
    usable = max(1, nofile_hard - FD_MARGIN)
    needed = max(1, math.ceil(conns / usable))
    if override is None:
        return min(needed, max(1, conns)), None
    procs = max(1, min(override, max(1, conns)))
    warning = None
    if procs < needed:
        warning = (f"warning: {conns:,} connections over {procs} processes is "
                   f"{math.ceil(conns / procs):,} each, over the open-file limit "
                   f"({nofile_hard:,} - {FD_MARGIN} kept free); {needed} processes would fit: "
                   f"expect EMFILE")
    return procs, warning


def listen_overflows(path: str = "/proc/net/netstat") -> int | None:
    """The kernel's TcpExt ListenOverflows: SYNs dropped because an accept queue was full.
    Box-wide (this network namespace's, every program's listeners together), so a run reads it
    before and after and reports the difference as such: not its own drops, which it cannot
    tell apart, but a sign of them when the server is on this box."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            if "ListenOverflows" in fields:
                return int(fields["ListenOverflows"])
    return None


def split_range(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) blocks of range(n), as equal as can be."""
    return [(k * n // parts, (k + 1) * n // parts) for k in range(parts)]


# ---------------------------------------------------------------------------------------------
# Latency histogram: preallocated, log-linear, mergeable (HdrHistogram's bucket layout)
# ---------------------------------------------------------------------------------------------


class Histogram:
    """Latencies in microseconds. Below 2*SUB µs every value has its own bucket; above, each
    power of two is cut into SUB linear buckets, so a percentile is within 1/SUB (3.1%) of the
    true value. 1,184 ints cover up to 2**40 µs (12 days); a bigger value lands in the last
    bucket. Memory does not grow with the number of samples, and two histograms merge by adding
    their buckets, which is how the parent combines the children's."""

    SUB_BITS = 5
    SUB = 1 << SUB_BITS
    MAX_EXP = 35
    SIZE = MAX_EXP * SUB + 2 * SUB
    TOP = (1 << (MAX_EXP + SUB_BITS + 1)) - 1

    def __init__(self):
        self.counts = [0] * self.SIZE
        self.count = 0
        self.total = 0
        self.max = 0
        self.min = None

    @classmethod
    def index(cls, v: int) -> int:
        v = min(max(0, v), cls.TOP)
        e = max(0, v.bit_length() - cls.SUB_BITS - 1)
        return e * cls.SUB + (v >> e)

    @classmethod
    def bounds(cls, i: int) -> tuple[int, int]:
        """The smallest and largest value that land in bucket i."""
        e = 0 if i < 2 * cls.SUB else i // cls.SUB - 1
        m = i - e * cls.SUB
        return m << e, ((m + 1) << e) - 1

    def record(self, v: int) -> None:
        v = max(0, v)
        self.counts[self.index(v)] += 1
        self.count += 1
        self.total += v
        if v > self.max:
            self.max = v
        if self.min is None or v < self.min:
            self.min = v

    def percentile(self, q: float) -> int:
        """The value below which a share q of the samples lie (the bucket's top, capped at the
        largest value seen): never under-reports."""
        if not self.count:
            return 0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(self.bounds(i)[1], self.max)
        return self.max

    def merge(self, other: "Histogram") -> None:
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min

    def to_json(self) -> dict:
        return {"buckets": [[i, c] for i, c in enumerate(self.counts) if c],
                "count": self.count, "total": self.total, "max": self.max, "min": self.min}

    @classmethod
    def from_json(cls, d: dict) -> "Histogram":
        """What to_json wrote; ValueError (or KeyError, TypeError) for anything else."""
        h = cls()
        for i, c in d["buckets"]:
            if not (type(i) is int and 0 <= i < cls.SIZE and type(c) is int and c > 0):
                raise ValueError(f"bad bucket {i!r}: {c!r}")
            h.counts[i] = c
        h.count, h.total, h.max, h.min = d["count"], d["total"], d["max"], d["min"]
        if h.count != sum(h.counts) or not all(
                type(v) is int and v >= 0 for v in (h.total, h.max, h.min or 0)):
            raise ValueError("histogram totals do not add up")
        return h


# ---------------------------------------------------------------------------------------------
# The run's configuration, and a child's report: what the parent tells each child, and what
# each child tells the parent
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One MegaComet box of --hosts, as this client reaches it."""

    host: str                   # as written ("[::1]" for IPv6): the Host header
    addr: str                   # its address, resolved once by the parent
    family: int                 # socket.AF_INET or AF_INET6
    base_port: int              # its worker 0; worker w listens on base_port + w

    @property
    def name(self) -> str:
        return f"{self.host}:{self.base_port}"


@dataclass(frozen=True)
class Config:
    """The run, decided by the parent before it forks; every child gets the same one."""

    prefix: str                 # ids PREFIX0 .. PREFIX{conns-1}
    host: str                   # HOST as given (the Host header) ...
    addr: str                   # ... and its IPv4 address
    loopback: bool
    conns: int
    workers: int                # W: id -> port base_port + x31(id) % W (N nodes: slot())
    base_port: int
    procs: int                  # K child processes
    sources: tuple[str, ...]    # source addresses to bind, round robin; () = the kernel picks
    rate: float                 # new connections a second, all children together (0: at once)
    hold: float
    max_time: float
    connect_timeout: float
    stall: float
    send: int                   # M messages through the app port (0: no --send)
    send_rate: float            # messages a second, all children together (0: all at once)
    grace: float
    app_host: str               # the manager's app port as given (for /stats, and messages) ...
    app_addr: str               # ... and its IPv4 address (the Sender connects to it)
    app_port: int
    key: bytes | None = None    # --subscriber-key-file: polls are signed with this (its first)
    nodes: tuple[Node, ...] = ()    # --hosts: id -> node by slot(); () = HOST:base_port alone

    def node_list(self) -> tuple[Node, ...]:
        """The boxes ids go to: --hosts, or HOST alone (a bracketed HOST never gets here)."""
        return self.nodes or (Node(self.host, self.addr, socket.AF_INET, self.base_port),)


# How the parent adds up one field of the children's reports (Report.merge).
SUM = "sum"                     # a count
BY_KEY = "by key"               # counts by name (failure cause, errno, HTTP status)
BY_POSITION = "by position"     # counts by source address, in Config.sources order
EARLIEST = "earliest"           # a time.monotonic() moment, 0.0 = not yet
LATEST = "latest"
ALL = "all"                     # a flag that holds for the whole run only if for every child
HISTOGRAM = "histogram"         # Histogram.merge
CHILD = "child"                 # which child: not added, None in a total


def _merged(how: str):
    if how == SUM:
        return field(default=0, metadata={"merge": how})
    if how == BY_KEY:
        return field(default_factory=dict, metadata={"merge": how})
    if how == BY_POSITION:
        return field(default_factory=list, metadata={"merge": how})
    if how in (EARLIEST, LATEST):
        return field(default=0.0, metadata={"merge": how})
    if how == ALL:
        return field(default=False, metadata={"merge": how})
    return field(default=None, metadata={"merge": how})


@dataclass
class Report:
    """One child's counters as the parent sees them: sent every REPORT_S, and once more at the
    end with `final` set and the latency histogram. Each field declares how the parent adds
    it up (`merge`); nothing is added by guessing from its type."""

    k: int | None = _merged(CHILD)
    final: bool = _merged(ALL)
    # Connections. open, connecting, unstarted and retrying are the state at the report's
    # time; the rest count since the start.
    open: int = _merged(SUM)
    connecting: int = _merged(SUM)
    opened: int = _merged(SUM)                  # connects completed, re-polls included
    ids_opened: int = _merged(SUM)              # ids open at least once
    unstarted: int = _merged(SUM)               # ids not tried yet
    retrying: int = _merged(SUM)
    gave_up: int = _merged(SUM)                 # ids answered 409 / 4xx: not polled again
    failed: dict[str, int] = _merged(BY_KEY)    # by CAUSES
    errnos: dict[str, int] = _merged(BY_KEY)
    status: dict[str, int] = _merged(BY_KEY)    # answers by HTTP status
    per_source: list[int] = _merged(BY_POSITION)
    ramp_t0: float = _merged(EARLIEST)
    last_first_open_t: float = _merged(LATEST)
    # Messages: every 200 received, and with --send this child's share of the M.
    msgs: int = _merged(SUM)
    other_msgs: int = _merged(SUM)              # not this run's (or not this child's)
    sent: int = _merged(SUM)
    received: int = _merged(SUM)
    dups: int = _merged(SUM)
    unsendable: dict[str, int] = _merged(BY_KEY)  # by cause
    send_done: bool = _merged(ALL)
    last_recv_t: float = _merged(LATEST)
    sends_done_t: float = _merged(LATEST)
    hist: Histogram | None = _merged(HISTOGRAM)

    def merge(self, other: "Report") -> "Report":
        """A new report: the two added up, each field by its own rule."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            how = f.metadata["merge"]
            if how == SUM:
                value = a + b
            elif how == BY_KEY:
                value = dict(a)
                for name, count in b.items():
                    value[name] = value.get(name, 0) + count
            elif how == BY_POSITION:
                value = [x + y for x, y in zip_longest(a, b, fillvalue=0)]
            elif how == EARLIEST:
                value = min(a, b) if a and b else a or b
            elif how == LATEST:
                value = max(a, b)
            elif how == ALL:
                value = a and b
            elif how == HISTOGRAM:
                value = None
                if a is not None or b is not None:
                    value = Histogram()
                    for h in (a, b):
                        if h is not None:
                            value.merge(h)
            else:   # CHILD
                value = None
            out[f.name] = value
        return Report(**out)

    @classmethod
    def total(cls, reports) -> "Report":
        """The reports added up (none: all zero). Starts from the identity of every rule."""
        return functools.reduce(cls.merge, reports, cls(final=True, send_done=True))

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["hist"] = self.hist.to_json() if self.hist is not None else None
        return d

    @classmethod
    def from_json(cls, d) -> "Report":
        """The report a child wrote; ValueError for anything this program did not write."""
        if not isinstance(d, dict):
            raise ValueError("a report is a JSON object")
        rules = {f.name: f.metadata["merge"] for f in fields(cls)}
        unknown = d.keys() - rules.keys()
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)[:3]}")
        kw = {}
        for name, value in d.items():
            how = rules[name]
            if how == HISTOGRAM:
                if value is not None:
                    try:
                        value = Histogram.from_json(value)
                    except (KeyError, TypeError, ValueError, IndexError) as e:
                        raise ValueError(f"hist: not a histogram ({e!r})") from None
            elif not _fits(how, value):
                raise ValueError(f"{name}: {str(value)[:40]!r} is not a {how} value")
            kw[name] = value
        return cls(**kw)


def _count(v) -> bool:
    return type(v) is int and v >= 0


def _fits(how: str, v) -> bool:
    """Whether a JSON value has the type a field merged by `how` holds."""
    if how == SUM:
        return _count(v)
    if how == BY_KEY:
        return isinstance(v, dict) and all(_count(c) for c in v.values())
    if how == BY_POSITION:
        return isinstance(v, list) and all(_count(c) for c in v)
    if how in (EARLIEST, LATEST):
        return type(v) in (int, float) and math.isfinite(v)
    if how == ALL:
        return type(v) is bool
    return v is None or _count(v)   # CHILD


def write_all(fd: int, data: bytes, timeout: float = REPORT_WRITE_S) -> None:
    """Write all of `data` to a pipe, however long. Only a write of up to PIPE_BUF (4096) bytes
    is all-or-nothing; a longer one can be taken in part: the rest of a full pipe (EAGAIN next,
    on a non-blocking fd) or the bytes before a signal arrived. The rest follows as the reader
    makes room. TimeoutError if it makes none for `timeout` s; BrokenPipeError if it is gone."""
    view = memoryview(data)
    poller = None
    while view:
        try:
            view = view[os.write(fd, view):]    # EINTR with nothing written: retried (PEP 475)
            continue
        except BlockingIOError:
            pass
        if poller is None:
            poller = select.poll()          # not select(): fds here may be over 1024
            poller.register(fd, select.POLLOUT)
        if not poller.poll(timeout * 1000):
            raise TimeoutError(f"report pipe full for {timeout:g} s")


# ---------------------------------------------------------------------------------------------
# Responses: a pure parser over bytes
# ---------------------------------------------------------------------------------------------


def parse_response(buf: bytes, eof: bool) -> tuple[int, bytes | None, bytes] | None:
    """(status, Location or None, body) once `buf` holds a whole response; None while more is
    needed. The server closes after every response, so without Content-Length the body ends at
    EOF. Raises ValueError on something that is not an HTTP response or was cut short."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if eof:
            raise ValueError("closed before a whole response head")
        return None
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {lines[0][:60]!r}")
    status = int(parts[1])
    length = None
    location = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"location":
            location = value.strip()
    body = buf[end + 4:]
    if length is None:
        return (status, location, body) if eof else None
    if len(body) < length:
        if eof:
            raise ValueError("closed inside the body")
        return None
    return status, location, body[:length]


def location_target(location: bytes | None) -> tuple[bytes, int] | None:
    """(host, port) of a Location such as b'http://127.0.0.1:8003/a1.js' (an IPv6 host keeps
    its brackets: b'[::1]'); None without a port, or with one out of range."""
    if not location:
        return None
    rest = location.split(b"://", 1)[-1]
    hostport = rest.split(b"/", 1)[0].split(b"?", 1)[0]
    if hostport.startswith(b"["):
        host, bracket, after = hostport.partition(b"]")
        host, hostport = host + bracket, after
    else:
        host = hostport.rpartition(b":")[0]
    _, colon, port = hostport.rpartition(b":")
    if not (colon and port.isdigit() and 1 <= int(port) <= 65535):
        return None
    return host, int(port)


def location_port(location: bytes | None) -> int | None:
    """The port of a Location; None if it has none."""
    target = location_target(location)
    return target[1] if target else None


def message_fields(body: bytes) -> tuple[int, int] | None:
    """(intended send time ns, seq) from b't=<ns>;seq=<n>', or None for someone else's message."""
    if not body.startswith(b"t="):
        return None
    t, sep, seq = body[2:].partition(b";seq=")
    if not sep or not t.isdigit() or not seq.isdigit():
        return None
    return int(t), int(seq)


# ---------------------------------------------------------------------------------------------
# A child: connections and their lives
# ---------------------------------------------------------------------------------------------

CONNECTING, WAITING, CLOSED = 0, 1, 2


class Dest(NamedTuple):
    """A host a child connects to: a node of --hosts, or one a Location named."""

    host: bytes                 # the Host header's host, as written ("[::1]" for IPv6)
    addr: str
    family: int
EV_CONN = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
EV_WAIT = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET  # request sent: answers only


class Conn:
    """One TCP connection: one poll of one id. Measured: ~410 bytes of client RSS per held
    connection (this object, the socket object, its slot in `conns`, the per-id arrays; 18.1 MB
    at 100 connections, 25.7 MB at 19,000). The kernel's socket costs more than that."""

    __slots__ = ("sock", "j", "port", "state", "buf", "out", "redirects")

    def __init__(self, sock: socket.socket, j: int, port: int, redirects: int):
        self.sock = sock
        self.j = j                  # the id's index in this child's block
        self.port = port
        self.state = CONNECTING
        self.buf = b""
        self.out = b""              # request bytes the first send() did not take (rare)
        self.redirects = redirects


class Child:
    """One process's share of the ids: its epoll, its connections, its counters, and with
    --send its Sender."""

    def __init__(self, k: int, cfg: Config, lo: int, hi: int, ctrl_fd: int, report_fd: int):
        self.k = k
        self.cfg = cfg
        self.prefix = cfg.prefix.encode()
        self.lo, self.n = lo, hi - lo
        self.key = cfg.key
        self.workers = cfg.workers
        # Where connections go: the nodes (index k = node k), then hosts learnt from a 307's
        # Location (with --hosts only), each looked up once.
        self.nodes = cfg.node_list()
        self.dests = [Dest(node.host.encode(), node.addr, node.family) for node in self.nodes]
        self.dest_index = {dest.host: d for d, dest in enumerate(self.dests)}
        self.follow_hosts = bool(cfg.nodes)
        self.sources = cfg.sources
        self.rate = cfg.rate / cfg.procs if cfg.rate else 0.0
        self.connect_timeout = cfg.connect_timeout
        self.ctrl_fd, self.report_fd = ctrl_fd, report_fd
        self.told_full = False
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.stop = False

        # Per-id state, in flat arrays: port 0 = not planned yet.
        self.port_of = array("H", bytes(2 * self.n))
        self.dest_of = array("H", bytes(2 * self.n))    # index in self.dests
        self.src_of = array("H", bytes(2 * self.n))
        self.tries = bytearray(self.n)
        self.ever_open = bytearray(self.n)
        # next source, per destination (node, worker port)
        self.rr = array("I", bytes(4 * len(self.nodes) * self.workers))

        self.next_new = 0                   # first-time connects go in id order
        self.ready: deque = deque()         # (j, port, redirects): re-poll at once
        self.retry: list = []               # heap of (due, j, port): backoff
        self.timeouts: deque = deque()      # (deadline, conn), in connect order
        self.ramp_t0 = time.monotonic()

        # Counters: this child's alone, summed by the parent.
        self.open = self.connecting = 0
        self.opened = self.ids_opened = self.gave_up = 0
        self.last_first_open_t = 0.0        # when the last id opened for the first time
        self.failed = dict.fromkeys(CAUSES, 0)
        self.errnos: dict[str, int] = {}
        self.status: dict[str, int] = {}   # answers by HTTP status, as text (JSON keys)
        self.per_source = [0] * max(1, len(self.sources))
        self.msgs = self.other_msgs = 0

        # --send: the app side, this child's share of the messages
        self.sender = Sender(k, cfg, self.ep) if cfg.send else None

    # -- connect -------------------------------------------------------------------------------

    def plan_id(self, j: int) -> None:
        """The id's node and port (its slot) and source address, fixed at its first connect."""
        k, w = slot(self.id_bytes(j), len(self.nodes), self.workers)
        self.dest_of[j] = k
        self.port_of[j] = self.nodes[k].base_port + w
        if self.sources:
            dest = k * self.workers + w
            self.src_of[j] = self.rr[dest] % len(self.sources)
            self.rr[dest] += 1

    def id_bytes(self, j: int) -> bytes:
        return b"%s%d" % (self.prefix, self.lo + j)

    def connect(self, j: int, port: int, redirects: int, now: float) -> Conn | None:
        """Start one non-blocking connect to the id's host (dest_of) and `port`, not yet
        registered with epoll (the caller does, or send_requests()). None when it failed at
        once (counted, retried)."""
        dest = self.dests[self.dest_of[j]]
        try:
            sock = socket.socket(dest.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            self.count_error(e.errno)
            self.schedule_retry(j, port, now)
            return None
        try:
            if self.sources and dest.family == socket.AF_INET:     # sources are IPv4
                # Port chosen at connect() time, per 4-tuple, not at bind() time per address.
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.sources[self.src_of[j]], 0))
            err = sock.connect_ex((dest.addr, port))
        except OSError as e:
            err = e.errno
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.count_error(err)
            self.schedule_retry(j, port, now)
            return None
        conn = Conn(sock, j, port, redirects)
        self.conns[sock.fileno()] = conn
        self.connecting += 1
        self.timeouts.append((now + self.connect_timeout, conn))  # moot once it is WAITING
        return conn

    def send_requests(self, started: list, now: float) -> None:
        """The requests of this turn's re-polls, together, right after their connects, as a
        browser sends one once connected. Loopback runs the whole handshake inside connect(),
        so those sockets are up already: each request goes now, and the connection is WAITING
        without an EPOLLOUT round. After a broadcast that round came behind thousands of
        answers in this process's ready list, late enough for the server's --header-timeout
        to close the connection first. Together, not one after each connect: the workers then
        find the turn's connections queued at once (TCP_DEFER_ACCEPT queues one when its
        request comes). Anywhere else send() says EAGAIN, and EPOLLOUT (or EPOLLERR) says
        when."""
        for conn in started:
            out = self.request(conn)
            try:
                sent = conn.sock.send(out)
            except BlockingIOError:
                conn.out = out      # built (and signed) once: on_connected sends it
                self.ep.register(conn.sock.fileno(), EV_CONN)
                continue
            except OSError as e:    # refused or reset already: what EPOLLERR would have said
                self.count_errno(e.errno)
                self.fail(conn, ERRNO_CAUSE.get(e.errno, "other"), now)
                continue
            self.count_open(conn, now)
            conn.out = out[sent:]
            self.ep.register(conn.sock.fileno(), EV_CONN if conn.out else EV_WAIT)

    def start_connects(self, now: float) -> None:
        """Re-polls first (a browser re-polls at once), their requests sent together right
        after (send_requests); then due retries, then new ids at the ramp's rate, only while
        fewer than MAX_CONNECTING are in flight. Those two wait for EPOLLOUT before their
        request: that round, a turn of this loop, is what paces a full-speed ramp to what
        the workers take (sending at once made the million's ramp slower, see README)."""
        started = []
        while self.ready and not self.stop:
            j, port, redirects = self.ready.popleft()
            if conn := self.connect(j, port, redirects, now):
                started.append(conn)
        self.send_requests(started, now)
        while self.retry and self.retry[0][0] <= now and self.connecting < MAX_CONNECTING:
            _, j, port = heapq.heappop(self.retry)
            if conn := self.connect(j, port, 0, now):
                self.ep.register(conn.sock.fileno(), EV_CONN)
        budget = self.n
        if self.rate:
            budget = int((now - self.ramp_t0) * self.rate) + 1 - self.next_new
        while budget > 0 and self.next_new < self.n and self.connecting < MAX_CONNECTING:
            j = self.next_new
            self.next_new += 1
            budget -= 1
            self.plan_id(j)
            emfile = self.failed["EMFILE"]
            if conn := self.connect(j, self.port_of[j], 0, now):
                self.ep.register(conn.sock.fileno(), EV_CONN)
            elif self.failed["EMFILE"] > emfile:
                break               # out of fds: stop for this turn, the retries will come

    def check_timeouts(self, now: float) -> None:
        while self.timeouts and self.timeouts[0][0] <= now:
            _, conn = self.timeouts.popleft()
            if conn.state == CONNECTING:
                self.fail(conn, "timeout", now)

    # -- write: the request --------------------------------------------------------------------

    def on_connected(self, conn: Conn, now: float) -> None:
        self.count_open(conn, now)
        conn.out = conn.out or self.request(conn)
        self.flush(conn, now)

    def count_open(self, conn: Conn, now: float) -> None:
        conn.state = WAITING
        self.connecting -= 1
        self.open += 1
        self.opened += 1
        if not self.ever_open[conn.j]:
            self.ever_open[conn.j] = 1
            self.ids_opened += 1
            self.last_first_open_t = now
        if self.sources and self.dests[self.dest_of[conn.j]].family == socket.AF_INET:
            self.per_source[self.src_of[conn.j]] += 1

    def request(self, conn: Conn) -> bytes:
        id_ = self.id_bytes(conn.j)
        query = b""
        if self.key is not None:    # signed at each request, so a long run never expires
            exp = int(time.time()) + SIGN_TTL_S
            query = b"?exp=%d&sig=%s" % (exp, sign(self.key, id_, exp))
        return b"GET /%s.js%s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (
            id_, query, self.dests[self.dest_of[conn.j]].host, conn.port)

    def flush(self, conn: Conn, now: float) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return                  # EPOLLOUT will come (edge-triggered, still registered)
        except OSError as e:
            self.fail(conn, ERRNO_CAUSE.get(e.errno, "reset"), now)
            return
        conn.out = conn.out[sent:]

    # -- read: the answer ----------------------------------------------------------------------

    def on_event(self, conn: Conn, ev: int, now: float) -> None:
        if conn.state == CONNECTING:
            # A failed connect always comes with EPOLLERR: only then is SO_ERROR read (a
            # syscall per connection saved).
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) \
                if ev & (select.EPOLLERR | select.EPOLLHUP) else 0
            if err:
                self.count_errno(err)
                self.fail(conn, ERRNO_CAUSE.get(err, "other"), now)
                return
            self.on_connected(conn, now)
        elif conn.out and ev & select.EPOLLOUT:
            self.flush(conn, now)
        if conn.state == WAITING and ev & ~select.EPOLLOUT:
            self.on_readable(conn, now)

    def on_readable(self, conn: Conn, now: float) -> None:
        """Edge-triggered: drain until EAGAIN or EOF, then see if a whole answer is in."""
        eof = False
        while True:
            try:
                data = conn.sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                self.fail(conn, ERRNO_CAUSE.get(e.errno, "reset"), now)
                return
            if not data:
                eof = True
                break
            conn.buf += data
            if len(data) < RECV_SIZE:
                # Drained. A whole answer (its Content-Length) needs no read for the EOF: a
                # syscall per answer saved. One that ends at the EOF reads on to it.
                try:
                    answer = parse_response(conn.buf, False)
                except ValueError:
                    answer = None  # the read to the EOF below says what it is
                if answer is not None:
                    self.on_response(conn, *answer, now)
                    return
        if not conn.buf:
            if eof:         # closed with no answer at all: the server dropped us
                self.fail(conn, "closed", now)
            return
        try:
            answer = parse_response(conn.buf, eof)
        except ValueError:
            self.fail(conn, "reset", now)
            return
        if answer is not None:
            self.on_response(conn, *answer, now)

    # -- response complete ---------------------------------------------------------------------

    def on_response(self, conn: Conn, status: int, location: bytes | None, body: bytes,
                    now: float) -> None:
        key = str(status)
        self.status[key] = self.status.get(key, 0) + 1
        self.close(conn)
        j, port = conn.j, conn.port
        if status in (200, 204):
            self.tries[j] = 0
            if status == 200:
                self.on_message(body, now)
            self.ready.append((j, port, 0))
        elif status == 307 and conn.redirects < MAX_REDIRECTS and self.redirect(j, location):
            # the server knows best; later polls go there too
            self.ready.append((j, self.port_of[j], conn.redirects + 1))
        elif status >= 500:
            self.failed["http"] += 1
            self.schedule_retry(j, port, now)
        else:   # 409 pushed out, 4xx, a second 307: polling again would not help
            self.failed["http"] += 1
            self.gave_up += 1

    def redirect(self, j: int, location: bytes | None) -> bool:
        """Point id j where a 307's Location says. Its port always; its host too with --hosts
        (another node's id), else the host stays (a proxy's public name may not resolve here).
        False when the Location cannot be followed."""
        target = location_target(location)
        if target is None:
            return False
        host, port = target
        if self.follow_hosts and host and host != self.dests[self.dest_of[j]].host:
            d = self.dest_index.get(host)
            if d is None:
                d = self.learn(host)
                if d is None:
                    return False
            self.dest_of[j] = d
        self.port_of[j] = port
        return True

    def learn(self, host: bytes) -> int | None:
        """A host a Location named that --hosts did not, looked up once (blocking, as the
        parent did for --hosts): its index in self.dests, or None if it cannot be reached."""
        if len(self.dests) >= len(self.nodes) + MAX_LEARNT_HOSTS:
            return None
        name = host.decode("ascii", "replace")
        if not (HOSTNAME_RE.fullmatch(name) or name.startswith("[")):
            return None
        try:
            addr, family = resolve(name)
        except OSError:
            return None
        self.dests.append(Dest(host, addr, family))
        self.dest_index[host] = d = len(self.dests) - 1
        return d

    def on_message(self, body: bytes, now: float) -> None:
        self.msgs += 1
        if self.sender is None or not self.sender.on_message(body, now):
            self.other_msgs += 1        # another run's (or another client's) message

    # -- close and failure ---------------------------------------------------------------------

    def close(self, conn: Conn) -> None:
        """The one close path; safe to call twice. Closing the fd also drops it from epoll."""
        if conn.state == CLOSED:
            return
        if conn.state == CONNECTING:
            self.connecting -= 1
        else:
            self.open -= 1
        conn.state = CLOSED
        self.conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
        conn.buf = conn.out = b""

    def fail(self, conn: Conn, cause: str, now: float) -> None:
        self.failed[cause] += 1
        self.close(conn)
        self.schedule_retry(conn.j, conn.port, now)

    def schedule_retry(self, j: int, port: int, now: float) -> None:
        tries = self.tries[j] = min(self.tries[j] + 1, 30)
        delay = min(RETRY_BASE_S * 2 ** (tries - 1), RETRY_MAX_S)
        heapq.heappush(self.retry, (now + delay, j, port))

    def count_error(self, err: int | None) -> None:
        self.count_errno(err)
        self.failed[ERRNO_CAUSE.get(err, "other")] += 1

    def count_errno(self, err: int | None) -> None:
        name = errno.errorcode.get(err or 0, str(err))
        self.errnos[name] = self.errnos.get(name, 0) + 1

    # -- reports to the parent -----------------------------------------------------------------

    def report(self, final: bool = False) -> None:
        r = Report(
            k=self.k, final=final, open=self.open, connecting=self.connecting,
            opened=self.opened, ids_opened=self.ids_opened, unstarted=self.n - self.next_new,
            retrying=len(self.retry), gave_up=self.gave_up, failed=self.failed,
            errnos=self.errnos, status=self.status, per_source=self.per_source,
            ramp_t0=self.ramp_t0, last_first_open_t=self.last_first_open_t,
            msgs=self.msgs, other_msgs=self.other_msgs, send_done=True)
        if self.sender is not None:
            self.sender.add_to(r, final)
        write_all(self.report_fd, json.dumps(r.to_json()).encode() + b"\n")

    def on_control(self) -> None:
        try:
            data = os.read(self.ctrl_fd, 4096)
        except BlockingIOError:
            return
        if not data:        # the parent is gone
            self.stop = True
        for line in data.decode().splitlines():
            cmd, _, arg = line.partition(" ")
            if cmd == "stop":
                self.stop = True
            elif cmd == "send" and self.sender is not None and not self.sender.started:
                targets = array("I", (self.lo + j for j in range(self.n) if self.ever_open[j]))
                self.sender.start(int(arg), self.prefix, targets, time.monotonic())

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        self.ep.register(self.ctrl_fd, select.EPOLLIN)
        next_tick = time.monotonic() + REPORT_S
        while not self.stop:
            now = time.monotonic()
            self.start_connects(now)
            wait = min(next_tick - now, REPORT_S)
            if self.sender is not None:
                wait = min(wait, self.sender.wake_in(now))
            if self.ready or (self.next_new < self.n and self.connecting < MAX_CONNECTING):
                wait = 0.0 if not self.rate else min(wait, 1.0 / self.rate)
            if self.retry:
                wait = min(wait, self.retry[0][0] - now)
            try:
                events = self.ep.poll(max(0.0, wait), MAX_EVENTS)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd, ev in events:
                if fd == self.ctrl_fd:
                    self.on_control()
                    continue
                if self.sender is not None and fd == self.sender.fd:
                    self.sender.on_event(ev, now)
                    continue
                conn = self.conns.get(fd)
                if conn is None:    # closed earlier in this batch
                    continue
                self.on_event(conn, ev, now)
            if self.sender is not None and self.sender.started:
                was_done = self.sender.done
                self.sender.run(now)
                if self.sender.done and not was_done:
                    next_tick = now             # tell the parent now, not in a second
            if self.open == self.n and not self.told_full:
                self.told_full = True           # the ramp may be over: tell the parent now
                next_tick = now
            if now >= next_tick:    # the periodic timer: reports, timeouts, the stop flag
                self.check_timeouts(now)
                if self.sender is not None:
                    self.sender.check_timeout(now)
                self.report()
                next_tick = now + REPORT_S
        self.report(final=True)
        # Abortive close (RST, SO_LINGER 0) for whatever is still open: no TIME_WAIT left on
        # this box to block the next run's ports for 60 s, and a quicker exit.
        linger0 = struct.pack("ii", 1, 0)
        for conn in list(self.conns.values()):
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# --send: the app side of a child
# ---------------------------------------------------------------------------------------------

APP_DOWN, APP_CONNECTING, APP_UP = "down", "connecting", "up"
EV_APP = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


class Sender:
    """One child's share of --send M, and its one connection to the manager's app port.

    The share is seq = k, k + K, k + 2K, ... < M; slot i is seq k + i*K. Message seq is meant
    to go at t0 + seq / --send-rate, to this child's open ids in turn, as a binary frame
    carrying that time. Every slot ends as exactly one of: sent (then received, or lost), or
    unsendable with a cause. Slots move forward only: [0, out_first) are settled, [out_first,
    next_slot) are frames in `out`, waiting for the socket.

    The connection: DOWN -> CONNECTING -> UP, and back to DOWN when connecting fails or the
    manager closes or resets it. It closes a binary-frame connection when it refuses a frame:
    a malformed one, any with --app-token set, or one for a worker whose outbox is over its
    bound. DOWN is left by connecting again after APP_RETRY_BASE_S, doubling up to
    APP_RETRY_MAX_S, and the schedule goes on meanwhile:

      - a frame whose time comes while DOWN is unsendable, with the cause of the last failure:
        an app with no connection cannot publish, and sending it late would hide the outage;
      - while CONNECTING, or while APP_BUFFER_MAX waits for the socket (the manager holding
        publishers back), frames wait and go late: their latency shows the wait;
      - a frame not wholly written when the connection fails is unsendable;
      - a frame written to a connection the manager then closed, and never received, is
        counted unsendable with that cause, not lost: binary frames have no reply, so which
        of them the manager took before closing cannot be known from here.

    Lost is then what went to a connection the manager did not close, and no poll received."""

    def __init__(self, k: int, cfg: Config, ep: select.epoll):
        self.k, self.procs = k, cfg.procs
        self.share = len(range(k, cfg.send, cfg.procs))
        self.interval_ns = int(1e9 / cfg.send_rate) if cfg.send_rate else 0
        self.app = (cfg.app_addr, cfg.app_port)
        self.connect_timeout = cfg.connect_timeout
        self.grace = cfg.grace
        self.ep = ep
        self.started = False
        self.t0_ns = 0
        self.prefix = b""
        self.targets = array("I")           # the ids' numbers: PREFIX<n>

        # The connection.
        self.sock: socket.socket | None = None
        self.state = APP_DOWN
        self.deadline = 0.0                 # CONNECTING: give up then
        self.retry_at = 0.0                 # DOWN: connect again then
        self.tries = 0
        self.up_since = 0.0
        self.cause = ""                     # why the last connection ended
        self.conn_first = 0                 # the first slot written to this connection

        # The schedule and what waits for the socket.
        self.next_slot = 0
        self.out_first = 0
        self.out = bytearray()
        self.out_base = 0                   # stream offset of out[0]
        self.out_ends = deque()             # stream offset where each frame in out ends

        # The accounting.
        self.written = 0                    # frames wholly written to a connection
        self.unsendable: dict[str, int] = {}    # by cause
        self.doubt: list = []               # (first slot, end slot, cause): written, then
                                            # the manager closed that connection
        self.seen = bytearray(self.share)   # by slot: received
        self.received = self.dups = 0
        self.hist = Histogram()
        self.last_recv_t = 0.0
        self.sends_done_t = 0.0             # when every slot was settled
        self.done = self.share == 0         # settled, and received or --grace passed

    @property
    def fd(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def start(self, t0_ns: int, prefix: bytes, targets: array, now: float) -> None:
        self.started = True
        self.t0_ns, self.prefix, self.targets = t0_ns, prefix, targets
        if not targets:
            self.cause = "no open ids"
            self.skip(self.share - self.next_slot)
        else:
            self.connect(now)

    # -- the connection --------------------------------------------------------------------------

    def connect(self, now: float) -> None:
        try:
            self.sock = sock = socket.socket(socket.AF_INET,
                                             socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            err = sock.connect_ex(self.app)
        except OSError as e:       # EMFILE, ...: no socket to connect, as bad as a refusal
            err = e.errno
        if err not in (0, errno.EINPROGRESS):
            self.fail(app_cause(err), now)
            return
        self.ep.register(sock.fileno(), EV_APP)
        self.state = APP_CONNECTING
        self.deadline = now + self.connect_timeout
        if err == 0:
            self.on_up(now)

    def on_up(self, now: float) -> None:
        self.state = APP_UP
        self.up_since = now
        self.conn_first = self.out_first
        self.flush(now)

    def on_event(self, ev: int, now: float) -> None:
        if self.state == APP_CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(app_cause(err), now)
                return
            self.on_up(now)
        if self.state == APP_UP and ev & ~select.EPOLLOUT:
            self.on_readable(now)
        if self.state == APP_UP and ev & select.EPOLLOUT:
            self.flush(now)

    def on_readable(self, now: float) -> None:
        """The binary protocol has no replies: reading only tells whether the manager closed
        (EOF) or reset the connection. Anything else it sends is dropped."""
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as e:
                self.fail(app_cause(e.errno), now)
                return
            if not data:
                self.fail("closed", now)
                return

    def check_timeout(self, now: float) -> None:
        if self.state == APP_CONNECTING and now >= self.deadline:
            self.fail("timeout", now)

    def fail(self, cause: str, now: float) -> None:
        """The one path from CONNECTING or UP to DOWN."""
        if self.state == APP_UP:
            if self.out_first > self.conn_first:
                self.doubt.append((self.conn_first, self.out_first, cause))
            if now - self.up_since >= APP_STABLE_S:
                self.tries = 0
        n = len(self.out_ends)          # not wholly written: never will be
        if n:
            self.unsendable[cause] = self.unsendable.get(cause, 0) + n
        self.out_first = self.next_slot
        self.out_base += len(self.out)
        self.out.clear()
        self.out_ends.clear()
        if self.sock is not None:
            self.sock.close()           # also leaves the epoll set
            self.sock = None
        self.state = APP_DOWN
        self.cause = cause
        self.tries = min(self.tries + 1, 30)
        self.retry_at = now + min(APP_RETRY_BASE_S * 2 ** (self.tries - 1), APP_RETRY_MAX_S)

    # -- the schedule ------------------------------------------------------------------------------

    def run(self, now: float) -> None:
        """Once a loop turn: DOWN, count every frame whose time has come unsendable, and
        connect again when it is time; otherwise queue them (a bounded batch), then write."""
        now_ns = time.monotonic_ns()
        if self.state == APP_DOWN:
            self.skip(self.due(now_ns))
            if self.next_slot < self.share and now >= self.retry_at:
                self.connect(now)
        batch = 0
        while self.next_slot < self.share and batch < SEND_BATCH and self.state != APP_DOWN:
            seq = self.k + self.next_slot * self.procs
            intended = self.t0_ns + seq * self.interval_ns
            if intended > now_ns:
                break
            if len(self.out) >= APP_BUFFER_MAX:
                break
            n = self.targets[self.next_slot % len(self.targets)]
            self.out += b"\x02%s%d\x00t=%d;seq=%d\x00" % (self.prefix, n, intended, seq)
            self.out_ends.append(self.out_base + len(self.out))
            self.next_slot += 1
            batch += 1
        if self.state == APP_UP:
            self.flush(now)
        if not self.sends_done_t and self.out_first == self.share:
            self.sends_done_t = now
        if self.sends_done_t and not self.done:
            self.done = self.received >= self.written or now - self.sends_done_t >= self.grace

    def due(self, now_ns: int) -> int:
        """How many slots from next_slot on are meant to have gone by now_ns."""
        left = self.share - self.next_slot
        if not left or not self.interval_ns:
            return left
        late = now_ns - (self.t0_ns + (self.k + self.next_slot * self.procs) * self.interval_ns)
        return 0 if late < 0 else min(left, late // (self.procs * self.interval_ns) + 1)

    def skip(self, n: int) -> None:
        """n slots due while there is no connection: unsendable, for the last failure's cause."""
        if n:
            self.unsendable[self.cause] = self.unsendable.get(self.cause, 0) + n
            self.next_slot += n
            self.out_first = self.next_slot

    def flush(self, now: float) -> None:
        if not self.out:
            return
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(app_cause(e.errno), now)
            return
        del self.out[:n]
        self.out_base += n
        while self.out_ends and self.out_ends[0] <= self.out_base:
            self.out_ends.popleft()
            self.out_first += 1
            self.written += 1

    def wake_in(self, now: float) -> float:
        """Seconds until the next frame is due (or the next reconnect); TICK_S if nothing is."""
        if not self.started or self.next_slot >= self.share:
            return TICK_S
        if self.state == APP_DOWN:
            return max(0.0, self.retry_at - now)
        if len(self.out) >= APP_BUFFER_MAX:
            return TICK_S               # EPOLLOUT wakes the loop
        seq = self.k + self.next_slot * self.procs
        return max(0.0, (self.t0_ns + seq * self.interval_ns - time.monotonic_ns()) / 1e9)

    # -- deliveries --------------------------------------------------------------------------------

    def on_message(self, body: bytes, now: float) -> bool:
        """A 200's body: False unless it is one of this child's messages of this run. The
        latency of its first delivery is taken from the time it was meant to go."""
        fields = message_fields(body)
        if fields is None or not self.started:
            return False
        intended_ns, seq = fields
        slot, mine = divmod(seq - self.k, self.procs)
        if (mine or not 0 <= slot < self.share
                or intended_ns != self.t0_ns + seq * self.interval_ns):
            return False
        if self.seen[slot]:
            self.dups += 1
        else:
            self.seen[slot] = 1
            self.received += 1
            self.hist.record((time.monotonic_ns() - intended_ns) // 1000)
        self.last_recv_t = now
        return True

    # -- the report ------------------------------------------------------------------------------

    def add_to(self, r: Report, final: bool) -> None:
        """The --send fields of this child's report. At the end every slot is settled: the
        doubtful ones by whether they arrived, those the run stopped before as "run stopped"."""
        r.received, r.dups = self.received, self.dups
        r.last_recv_t, r.sends_done_t = self.last_recv_t, self.sends_done_t
        r.send_done = self.done
        unsendable = dict(self.unsendable)
        sent = self.written
        if final:
            for lo, hi, cause in self.doubt:
                n = self.seen[lo:hi].count(0)
                if n:
                    unsendable[cause] = unsendable.get(cause, 0) + n
                    sent -= n
            left = self.share - self.out_first
            if left:
                unsendable["run stopped"] = unsendable.get("run stopped", 0) + left
            r.hist = self.hist
        r.sent, r.unsendable = sent, unsendable


def app_cause(err: int | None) -> str:
    """An app connection's errno as a cause: refused, timeout, reset, or the errno's name."""
    cause = ERRNO_CAUSE.get(err)
    if cause in (None, "other"):
        return errno.errorcode.get(err or 0, str(err))
    return cause


def child_main(k: int, cfg: Config, lo: int, hi: int, ctrl_fd: int, report_fd: int) -> None:
    """Runs in the forked child; never returns."""
    status = 0
    child = None
    try:
        child = Child(k, cfg, lo, hi, ctrl_fd, report_fd)

        def on_signal(signum, frame):
            child.stop = True
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        os.set_blocking(ctrl_fd, False)
        os.set_blocking(report_fd, False)   # a full pipe must not stop the loop for good
        child.run()
    except BrokenPipeError:
        status = 1          # the parent is gone: nobody to report to
    except BaseException:
        status = 1
        try:    # on a line of its own, even after a report cut short
            write_all(report_fd, b"\n" + json.dumps({"crash": traceback.format_exc()}).encode()
                      + b"\n", timeout=1.0)
        except OSError:
            pass
    finally:
        os._exit(status)


# ---------------------------------------------------------------------------------------------
# The parent: fork, aggregate, decide the phases, summarize
# ---------------------------------------------------------------------------------------------


class ChildProc:
    """The parent's view of one child: its pid, its two pipes, and its reports so far.

    The report stream is trusted only as far as it parses. A child that writes something that
    is not a report, dies in the middle of one, or ends without its final one, is marked
    failed with a line that says which and how; nothing it sends after that is read."""

    def __init__(self, k: int, pid: int, ctrl: int, report: int):
        self.k, self.pid = k, pid
        self.ctrl, self.report = ctrl, report   # write end of its commands, read end of reports
        self.buf = b""                          # the start of a report line
        self.last: Report | None = None
        self.final: Report | None = None
        self.eof = False
        self.failure: str | None = None         # "client process 1 died in the middle of ..."
        self.exit_status: int | None = None     # os.waitpid's, once reaped

    def read(self) -> None:
        """Drain the report pipe (non-blocking)."""
        while not self.eof:
            try:
                data = os.read(self.report, 1 << 16)
            except BlockingIOError:
                return
            self.feed(data)

    def feed(self, data: bytes) -> None:
        """Bytes from the report pipe; b"" is its end."""
        if not data:
            self.eof = True
            if self.buf:
                self.fail(f"died in the middle of a report ({len(self.buf):,} bytes of it)")
            elif self.final is None:
                self.fail("ended before its final report")
            return
        if self.failure:
            return
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            if line:
                self.take(line)
            if self.failure:
                return
        if len(self.buf) > REPORT_MAX:
            self.fail(f"wrote a report line over {REPORT_MAX:,} bytes")

    def take(self, line: bytes) -> None:
        try:
            d = json.loads(line)
        except (ValueError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
            self.fail(f"wrote an unreadable report ({str(e)[:80]})")
            return
        if isinstance(d, dict) and isinstance(d.get("crash"), str):
            print(f"client process {self.k} crashed:\n{d['crash']}", file=sys.stderr)
            lines = d["crash"].strip().splitlines() or ["?"]
            self.fail(f"crashed: {lines[-1][:200]}")
            return
        try:
            r = Report.from_json(d)
            if r.k != self.k:
                raise ValueError(f"it says it is child {r.k}")
        except ValueError as e:
            self.fail(f"wrote an unreadable report ({str(e)[:80]})")
            return
        self.last = r
        if r.final:
            self.final = r

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = f"client process {self.k} {why}"
            self.buf = b""

    def reap(self, wait: float = 0.0) -> int | None:
        """Its exit status once it is gone (waiting up to `wait` s), else None."""
        until = time.monotonic() + wait
        while self.exit_status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                self.exit_status = status
            elif time.monotonic() >= until:
                return None
            else:
                time.sleep(0.01)
        return self.exit_status


def describe_exit(status: int | None) -> str:
    """An os.waitpid() status as words: "exit status 1", "killed by SIGKILL"."""
    if status is None:
        return "still running"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def likely_cause(target: int, peak_open: int, failed: dict, errnos: dict,
                 server: dict | None, client_open: int, overflows: int | None = None
                 ) -> str | None:
    """One line naming why connections stopped short of the target, from what was seen.

    A server out of file descriptors does not refuse: the kernel completes the handshake and
    the connection waits in the listen queue, open as far as this client can tell. Only the
    server's own count (GET /stats on the app port) shows it, so that comes first."""
    if server_short(server, client_open):
        return (f"server accepted only {server.get('connections', 0):,} of this client's "
                f"{client_open:,} open connections (the rest wait in its accept queue): "
                f"the server's open-file limit? see tuning/")
    if peak_open >= target:
        return None
    messages = {
        "EMFILE": "EMFILE: this client's open-file limit (raise ulimit -n, or more --procs)",
        "EADDRNOTAVAIL": "EADDRNOTAVAIL: out of source ports, add --source-ips",
        "refused": "server refused: not listening on that port, or its listen backlog full "
                   "(is it running? --base-port/--workers right?)",
        "timeout": "connect timeouts: SYN backlog / somaxconn full, the server not accepting "
                   "(its open-file limit?), or a firewall",
        "reset": "server reset connections: its open-file limit, or a proxy in between?",
        "closed": "server closed connections without an answer: its open-file limit?",
        "http": "server answered with errors (see the status counts)",
    }
    if overflows:
        messages["timeout"] = (f"connect timeouts, and box-wide ListenOverflows during the run "
                               f"(all programs) rose by {overflows:,}: the server accepts too "
                               f"slowly or not at all (its open-file limit?), or "
                               f"--backlog/somaxconn too small")
    worst = max(failed, key=lambda c: failed[c]) if failed else None
    if worst and failed[worst]:
        if worst == "other":
            top = max(errnos, key=lambda e: errnos[e]) if errnos else "?"
            return f"connect errors ({top}): see the errno counts"
        return messages[worst]
    return "stopped before the ramp finished (--max-time, or interrupted)"


def server_short(server: dict | None, client_open: int) -> bool:
    """True when the server holds fewer connections than this client has open (other clients
    can only add to its count)."""
    if not server or "connections" not in server:
        return False
    if "unaccepted" in server:      # exact: handshakes this client completed, never accepted
        return server["unaccepted"] > 0
    return server["connections"] < client_open


def fetch_server_stats(app_host: str, app_port: int) -> dict | None:
    """The manager's GET /stats totals, best effort (None if it does not answer in 0.5 s)."""
    try:
        with socket.create_connection((app_host, app_port), timeout=0.5) as s:
            s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                answer = parse_response(buf, False)
                if answer:
                    break
            answer = parse_response(buf, True)
        if answer and answer[0] == 200:
            return json.loads(answer[2]).get("totals")
    except (OSError, ValueError):
        pass
    return None


def ask_info(node: Node) -> dict:
    """GET /_info of a node's first worker: {"worker": 0, "workers": W, "base_port": B}, and
    on one of several nodes also "node", "nodes", "hosts". ValueError unless "workers" is a
    count."""
    with socket.create_connection((node.addr, node.base_port), timeout=3.0) as s:
        s.sendall(b"GET /_info HTTP/1.1\r\nHost: %s\r\n\r\n" % node.name.encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            buf += chunk
            answer = parse_response(buf, not chunk)
            if answer:
                break
    status, _, body = answer
    if status != 200:
        raise ValueError(f"GET /_info answered {status}")
    info = json.loads(body)
    if not (isinstance(info, dict) and type(info.get("workers")) is int
            and info["workers"] >= 1):
        raise ValueError(f"GET /_info answered {body[:80]!r}, without a worker count")
    return info


def nodes_problem(info: dict, nodes: tuple[Node, ...]) -> str | None:
    """Why the first node's /_info says --hosts does not match the servers, in one line; None
    when it matches. A mismatch would send ids to nodes that do not hold them: every poll
    redirected, or refused."""
    first, n = nodes[0].name, len(nodes)
    if "nodes" not in info:
        if n == 1:
            return None
        return (f"--hosts names {n} nodes, but http://{first}/_info has no \"nodes\": that "
                f"server is not one of several (started without --redis?)")
    if info["nodes"] != n:
        return (f"--hosts names {n} nodes, but http://{first}/_info says {info['nodes']!r}: "
                f"the ids would land on the wrong nodes; list every node, in the order of the "
                f"servers' --nodes")
    if info.get("node", 0) != 0:
        return (f"--hosts starts with {first}, but that is node {info['node']!r} of {n}: list "
                f"the nodes in the order of the servers' --nodes")
    return None


class Parent:
    def __init__(self, cfg: Config, blocks: list[tuple[int, int]]):
        self.cfg = cfg
        self.blocks = blocks
        self.stop_reason: str | None = None     # "done", "max-time", "SIGINT", ...
        self.kids: list[ChildProc] = []
        self.tty = sys.stdout.isatty()
        self.t_start = time.monotonic()
        self.send_t0_s = 0.0
        self.server: dict | None = None     # the manager's /stats totals at the ramp's end
        # Box-wide SYN drops at full accept queues, all programs: a sign of ours only if the
        # server is on this box. The summary reports the delta over the run.
        self.overflows0 = listen_overflows() if cfg.loopback else None
        self.open_at_ramp_end = 0
        self.accepted0 = None  # the server's accepted count before we start: exact shortfall
        # The ramp over time, one sample each REPORT_S (as often as the children report), for
        # the summary's "series" and the --plot figure: seconds since the start, open, connecting,
        # connects completed a second (re-polls included) since the sample before.
        self.series: dict[str, list] = {"t": [0.0], "open": [0], "connecting": [0],
                                        "connects_per_s": [0.0]}
        self.sampled = (self.t_start, 0)    # (time, opened) of the last sample
        self.grew_t = self.t_start          # the sample where the open count last grew
        self.sampled_peak = 0
        self.ramp_end_t: float | None = None

    def spawn(self) -> None:
        for k, (lo, hi) in enumerate(self.blocks):
            ctrl_r, ctrl_w = os.pipe()
            rep_r, rep_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                for kid in self.kids:   # other children's pipes: keep EOF meaningful
                    os.close(kid.ctrl)
                    os.close(kid.report)
                os.close(ctrl_w)
                os.close(rep_r)
                child_main(k, self.cfg, lo, hi, ctrl_r, rep_w)
            os.close(ctrl_r)
            os.close(rep_w)
            os.set_blocking(rep_r, False)
            self.kids.append(ChildProc(k, pid, ctrl_w, rep_r))

    def read_reports(self, timeout: float) -> None:
        """Whatever the children have written, waiting up to `timeout` s for some. A child
        that fails (ChildProc.failure) ends the run: its ids are no longer held or counted."""
        kids = {kid.report: kid for kid in self.kids if not kid.eof}
        if not kids:
            time.sleep(timeout)
            return
        poller = select.poll()
        for fd in kids:
            poller.register(fd, select.POLLIN)
        try:
            ready = poller.poll(timeout * 1000)
        except InterruptedError:
            return
        for fd, _ in ready:
            kid = kids[fd]
            kid.read()
            if kid.failure and self.stop_reason is None:
                self.stop_reason = "a client process failed"

    def command(self, line: str) -> None:
        for kid in self.kids:
            try:
                os.write(kid.ctrl, line.encode() + b"\n")
            except OSError:
                pass

    def check_server(self, client_open: int, client_opened: int) -> dict | None:
        """The server's totals; asked again a few times while it seems short, since it may
        still be accepting what this client just connected. Not asked over several nodes:
        the app port's /stats counts its own node's connections only."""
        server = None
        if len(self.cfg.node_list()) > 1:
            return None
        for _ in range(SERVER_CHECKS):
            server = fetch_server_stats(self.cfg.app_host, self.cfg.app_port)
            if server and self.accepted0 is not None and "accepted" in server:
                server["unaccepted"] = client_opened - (server["accepted"] - self.accepted0)
            if not server_short(server, client_open) or self.stop_reason:
                break
            time.sleep(SERVER_CHECK_GAP_S)
        return server

    def progress(self, t: Report, rate: float, now: float) -> None:
        cfg = self.cfg
        fails = ", ".join(f"{c} {t.failed[c]:,}" for c in CAUSES if t.failed.get(c))
        line = (f"[{now - self.t_start:5.0f}s] open {t.open:,}/{cfg.conns:,} "
                f"connects {rate:,.0f}/s connecting {t.connecting:,} | "
                f"failed {fails or 0} | msgs {t.msgs:,}")
        if cfg.send:
            line += f" sent {t.sent:,} recv {t.received:,}"
        if self.tty:
            sys.stdout.write("\r" + line + "\x1b[K")
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def sample(self, t: Report, now: float) -> None:
        then, opened = self.sampled
        if now - then < 0.05:       # the final report right after a tick's: nothing new
            return
        if t.open > self.sampled_peak and self.ramp_end_t is None:
            self.sampled_peak, self.grew_t = t.open, now    # where the figure's line bends
        for name, value in (("t", round(now - self.t_start, 3)), ("open", t.open),
                            ("connecting", t.connecting),
                            ("connects_per_s", round((t.opened - opened) / (now - then), 1))):
            self.series[name].append(value)
        self.sampled = (now, t.opened)

    def run(self) -> dict:
        """Every pass (at most 0.2 s apart): read reports, then move the run along its phases:
        ramp -> (send) -> hold -> stop. Progress is printed once a second."""
        cfg = self.cfg
        if len(cfg.node_list()) == 1:
            base = fetch_server_stats(cfg.app_host, cfg.app_port) or {}
            self.accepted0 = base.get("accepted")
        self.spawn()
        deadline = self.t_start + cfg.max_time
        next_tick = self.t_start + TICK_S
        next_sample = self.t_start + REPORT_S
        peak = last_opened = 0
        grew_t = self.t_start
        ramp_end = None
        ramp_reason = None
        send_started = False
        while self.stop_reason is None:
            now = time.monotonic()
            self.read_reports(max(0.0, min(next_tick - now, next_sample - now, 0.2)))
            now = time.monotonic()
            if all(kid.eof for kid in self.kids):
                self.stop_reason = self.stop_reason or "children exited"
                break
            if now >= deadline:
                self.stop_reason = "max-time"
            t = Report.total(kid.last for kid in self.kids if kid.last)
            open_now = t.open
            if open_now > peak:
                peak, grew_t = open_now, now
            if now >= next_sample:
                self.sample(t, now)
                next_sample = max(next_sample + REPORT_S, now)
            if now >= next_tick:
                opened = t.opened  # connects completed, re-polls included
                self.progress(t, (opened - last_opened) / TICK_S, now)
                last_opened = opened
                next_tick = max(next_tick + TICK_S, now)
            if not all(kid.last for kid in self.kids):
                continue                # not every child has reported yet
            if ramp_end is None:
                if max(open_now, t.ids_opened) >= cfg.conns - t.gave_up:
                    ramp_end, ramp_reason = now, "complete"
                elif t.unstarted == 0 and now - grew_t >= cfg.stall:
                    ramp_end, ramp_reason = now, "stalled"
                if ramp_end is not None:
                    # What the server holds now, against what this client holds now: the
                    # difference sits in the server's accept queue. Taken here, not at the
                    # end, when the children may be closing.
                    self.server = self.check_server(open_now, t.opened)
                    self.open_at_ramp_end = open_now
            if ramp_end is not None and self.ramp_end_t is None:
                self.ramp_end_t = ramp_end
            if ramp_end is not None and cfg.send and not send_started:
                send_started = True
                t0_ns = time.monotonic_ns() + 50_000_000    # the same t0 for every child
                self.send_t0_s = t0_ns / 1e9
                self.command(f"send {t0_ns}")
            sends_over = not cfg.send or (send_started and t.send_done)
            if ramp_end is not None and now >= ramp_end + cfg.hold and sends_over:
                self.stop_reason = "done"
        if self.tty:
            sys.stdout.write("\n")
        return self.finish(ramp_end, ramp_reason, peak)

    def finish(self, ramp_end: float | None, ramp_reason: str | None, peak: int) -> dict:
        """Tell every child to stop, take their last reports (SIGKILL for a child that has not
        sent one in STOP_WAIT_S), merge. Reaping comes later, in reap()."""
        cfg = self.cfg
        self.command("stop")
        wait = STOP_WAIT_S + STOP_WAIT_PER_CHILD_S * len(self.kids)
        until = time.monotonic() + wait
        while time.monotonic() < until and not all(k.final or k.eof for k in self.kids):
            self.read_reports(0.05)
        until = time.monotonic() + REAP_WAIT_S
        for kid in self.kids:
            if kid.final and not kid.failure:
                continue
            if kid.eof:     # it ended by itself: say how, if it is gone soon enough
                status = kid.reap(max(0.0, until - time.monotonic()))
                if status is not None:
                    kid.failure += f" ({describe_exit(status)})"
                continue
            kid.fail(f"sent no final report within {wait:g} s (killed)")
            try:
                os.kill(kid.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elapsed = time.monotonic() - self.t_start
        missing = [kid.k for kid in self.kids if not kid.final]
        t = Report.total(kid.final or kid.last for kid in self.kids if kid.final or kid.last)
        hist = t.hist or Histogram()
        self.sample(t, time.monotonic())
        peak = max(peak, t.open)
        first, last = t.ramp_t0, t.last_first_open_t
        ids_opened = t.ids_opened
        ramp_s = last - first if ids_opened > 1 and last > first else 0.0
        server = self.server
        sent, received = t.sent, t.received
        span = t.last_recv_t - self.send_t0_s
        ms = lambda us: round(us / 1000, 3)
        summary = {
            "target": cfg.conns, "workers": cfg.workers, "host": cfg.host,
            "base_port": cfg.base_port, "procs": cfg.procs,
            "source_ips": list(cfg.sources),
            "per_source": dict(zip(cfg.sources, t.per_source, strict=False)),
            "opened": t.opened, "ids_opened": ids_opened, "peak_open": peak,
            "open_at_end": t.open, "connecting_at_end": t.connecting,
            "gave_up": t.gave_up,
            "failed": {c: t.failed.get(c, 0) for c in CAUSES},  # every cause, 0 too
            "failed_total": sum(t.failed.values()), "errnos": t.errnos,
            "status": dict(sorted(t.status.items())),
            "connect_rate": round(ids_opened / ramp_s, 1) if ramp_s else None,
            "ramp_s": round(ramp_s, 3), "ramp_end": ramp_reason,
            "messages": t.msgs, "other_messages": t.other_msgs,
            "sent": sent, "received": received, "lost": max(0, sent - received),
            "duplicates": t.dups, "unsendable": sum(t.unsendable.values()),
            "unsendable_causes": t.unsendable,
            "send_asked": cfg.send, "grace_s": cfg.grace,
            "app": f"{cfg.app_host}:{cfg.app_port}",
            "send_rate": cfg.send_rate if cfg.send else None,
            "latency_ms": {"p50": ms(hist.percentile(0.5)), "p99": ms(hist.percentile(0.99)),
                           "p999": ms(hist.percentile(0.999)), "max": ms(hist.max),
                           "mean": ms(hist.total / hist.count) if hist.count else 0.0,
                           "count": hist.count},
            "clock": "CLOCK_MONOTONIC (time.monotonic_ns), intended send time",
            "elapsed_s": round(elapsed, 3), "stopped_by": self.stop_reason,
            "missing_reports": missing, "server": server,
            "failed_processes": [kid.failure for kid in self.kids if kid.failure],
        }
        if cfg.nodes:
            summary["hosts"] = [node.name for node in cfg.nodes]
        summary["msgs_per_s"] = round(received / span, 1) if received and span > 0 else None
        overflows = None
        end = listen_overflows() if self.overflows0 is not None else None
        if end is not None:
            overflows = end - self.overflows0
        summary["listen_overflows"] = overflows
        summary["cause"] = likely_cause(cfg.conns, max(peak, ids_opened), t.failed,
                                        t.errnos, server, self.open_at_ramp_end, overflows)
        notes = []
        if len(cfg.nodes) > 1:
            notes.append(f"over {len(cfg.nodes)} nodes the server's own count is not checked: "
                         f"the app port's /stats counts one node's connections")
        if overflows:
            notes.append(f"box-wide ListenOverflows during the run (all programs): {overflows:,} "
                         f"SYNs dropped at a full accept queue, the server's or another "
                         f"program's; a dropped SYN is resent after 1, 3, 7 s")
        if summary["lost"] and summary["connecting_at_end"]:
            notes.append(f"{summary['connecting_at_end']:,} re-polls were still connecting at "
                         f"the end; their ids' messages wait in the server meanwhile: a longer "
                         f"--grace, or a paced --send-rate, would see them")
        summary["notes"] = notes
        # What a figure needs (plots.py client_figure): the ramp over time, where it bent and
        # why, and with --send the whole latency histogram.
        since = lambda moment: round(moment - self.t_start, 3) if moment else None
        summary["series"] = {"interval_s": REPORT_S, **self.series,
                             "ramp_end_t": since(self.ramp_end_t),
                             "send_start_t": since(self.send_t0_s)}
        summary["stall"] = None
        if summary["cause"]:
            summary["stall"] = {"t": since(self.grew_t), "detected_t": since(self.ramp_end_t),
                                "cause": summary["cause"]}
        summary["latency_histogram"] = hist.to_json() if cfg.send else None
        return summary


    def reap(self) -> None:
        """Wait for every child to be gone. After the summary is out: a child's exit closes its
        sockets in the kernel, ~10-25 us each on a busy 2-core box (4.6 s for 200k)."""
        for kid in self.kids:
            if kid.exit_status is None:
                try:
                    os.waitpid(kid.pid, 0)
                except ChildProcessError:
                    pass
            os.close(kid.ctrl)
            os.close(kid.report)


def print_summary(s: dict, out=sys.stdout) -> None:
    w = lambda line: print(line, file=out)
    srcs = s["source_ips"]
    src_text = (f"{len(srcs)} source addresses ({srcs[0]}..{srcs[-1]})" if len(srcs) > 1
                else (srcs[0] if srcs else "the kernel's source address"))
    hosts = s.get("hosts")
    if hosts:
        shown = ", ".join(hosts) if len(hosts) <= 4 else f"{hosts[0]} .. {hosts[-1]}"
        where = (f"{len(hosts)} node{'s' if len(hosts) > 1 else ''} ({shown}, "
                 f"{s['workers']} workers each)")
    else:
        where = (f"{s['host']}:{s['base_port']}..{s['base_port'] + s['workers'] - 1} "
                 f"({s['workers']} workers)")
    w(f"MegaComet client: {s['target']:,} ids to {where}, {s['procs']} "
      f"process{'es' if s['procs'] > 1 else ''},"
      f" {src_text}")
    rate = f" ({s['connect_rate']:,.0f}/s)" if s["connect_rate"] else ""
    w(f"  opened    {s['ids_opened']:,} ids in {s['ramp_s']:.1f} s{rate}, peak open "
      f"{s['peak_open']:,}, open at end {s['open_at_end']:,}, connects {s['opened']:,}, "
      f"ramp {s['ramp_end'] or 'unfinished'}")
    w("  answers   " + (", ".join(f"{k}: {v:,}" for k, v in s["status"].items()) or "none"))
    fails = ", ".join(f"{c} {n:,}" for c, n in s["failed"].items() if n)
    errs = ", ".join(f"{e} {n:,}" for e, n in s["errnos"].items())
    w(f"  failed    {fails or 'none'}" + (f" (errno: {errs})" if errs else ""))
    if s["sent"] or s["send_rate"] is not None:
        lat = s["latency_ms"]
        rate = f", {s['msgs_per_s']:,.0f} msgs/s" if s["msgs_per_s"] else ""
        causes = ", ".join(f"{c} {n:,}" for c, n in s["unsendable_causes"].items())
        unsendable = f", unsendable {s['unsendable']:,} ({causes})" if s["unsendable"] else ""
        w(f"  messages  sent {s['sent']:,}, received {s['received']:,}, lost {s['lost']:,}, "
          f"duplicates {s['duplicates']:,}{unsendable}{rate}")
        w(f"  latency   p50 {lat['p50']} ms, p99 {lat['p99']} ms, p99.9 {lat['p999']} ms, "
          f"max {lat['max']} ms (from the intended send time)")
    if s["server"]:
        sv = s["server"]
        w(f"  server    connections {sv.get('connections', 0):,}, waiting "
          f"{sv.get('waiting', 0):,} (its /stats at the ramp's end)")
    for note in s["notes"]:
        w(f"  note      {note}")
    for failure in s["failed_processes"]:
        w(f"  child     {failure}")
    if s["cause"]:
        w(f"  cause     {s['cause']}")
    w(f"  elapsed   {s['elapsed_s']:.1f} s, stopped by {s['stopped_by']}")


# ---------------------------------------------------------------------------------------------
# The verdict: did the run do what it was asked?
# ---------------------------------------------------------------------------------------------

EXIT_OK = 0             # every --conns opened (and the server holds them); with --send M, all
                        # M sent and received
EXIT_SHORT = 1          # the run missed what it was asked for: stderr says why, in one line
EXIT_USAGE = 2          # bad options (argparse's status), nothing run
                        # 128 + N: stopped by signal N (130 for Ctrl-C, 143 for SIGTERM)

APP_CAUSES = {          # why messages were unsendable, in words ({app}: the app port)
    "refused": "the app port {app} refused the connection (is the manager running? "
               "--app-port right?)",
    "timeout": "connecting to the app port {app} timed out",
    "closed": "the app port {app} closed the connection (the manager refused frames: "
              "see its log and app_rejected in its /stats)",
    "reset": "the app port {app} reset the connection (the manager refused frames: "
             "see its log and app_rejected in its /stats)",
    "no open ids": "no connection was open to send them to",
    "run stopped": "the run stopped first ({stopped_by})",
}


def shortfalls(s: dict) -> list[str]:
    """What the run was asked for and did not do, from its summary: one phrase each, the
    most basic first. Empty when it did all of it."""
    out = []
    if s["stopped_by"] in ("SIGINT", "SIGTERM"):
        out.append(f"interrupted by {s['stopped_by']}")
    out.extend(s["failed_processes"])
    if s["cause"]:
        if s["cause"].startswith("server accepted only"):
            out.append(s["cause"])
        else:
            reached = max(s["peak_open"], s["ids_opened"])
            out.append(f"only {reached:,} of {s['target']:,} connections opened: {s['cause']}")
    unsigned = sum(s.get("status", {}).get(code, 0) for code in ("401", "403"))
    if unsigned:  # opened, then refused: the server has --subscriber-key-file
        out.append(f"{unsigned:,} polls refused 401/403 for want of a good signature: pass "
                   "--subscriber-key-file with the server's key file")
    asked = s["send_asked"]
    if asked and s["unsendable"]:
        causes = sorted(s["unsendable_causes"].items(), key=lambda c: -c[1])
        words = [APP_CAUSES.get(c, "the app port {app}: " + c).format(
            app=s["app"], stopped_by=s["stopped_by"]) for c, _ in causes]
        if len(words) > 1:
            words = [f"{w} ({n:,})" for w, (_, n) in zip(words, causes, strict=True)]
        out.append(f"{s['unsendable']:,} of {asked:,} messages could not be sent: "
                   + ", ".join(words))
    if asked and s["lost"]:
        out.append(f"{s['lost']:,} of {s['sent']:,} messages sent were not received within "
                   f"--grace {s['grace_s']:g} s")
    return out


def exit_status(s: dict) -> int:
    if s["stopped_by"] in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[s["stopped_by"]]
    return EXIT_SHORT if shortfalls(s) else EXIT_OK


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def figure_path(text: str) -> str:
    if not text.endswith((".svg", ".png")):
        raise argparse.ArgumentTypeError(f"a figure is written as .svg or .png, got {text!r}")
    return text


def draw(summary: dict, path: str) -> None:
    """--plot: the run's figure, drawn by plots.py beside this file. Drawing is optional (a
    load box may have neither plots.py nor matplotlib): without them, one line on stderr
    says what is missing, and the run's output, JSON and exit status are unchanged."""
    later = "the run is not affected; `python plots.py FILE.json` draws it later from --json"
    try:
        import plots
    except ModuleNotFoundError as e:
        if e.name != "plots":
            raise
        print(f"client.py: --plot needs plots.py beside client.py (from the MegaComet "
              f"repository); {later}", file=sys.stderr)
        return
    try:
        print(f"  figure    {plots.client_figure(summary, path)}")
    except plots.PlotUnavailable as e:
        print(f"client.py: --plot: {e}", file=sys.stderr)
    except OSError as e:
        print(f"client.py: --plot {path}: {e.strerror}; {later}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="client.py",
        description="MegaComet load client: opens --conns long polls with ids PREFIX0.. "
                    "PREFIX{N-1}, each to HOST:base-port + x31(id) % workers, holds them, and "
                    "with --send measures message delivery through the manager's app port.")
    p.add_argument("prefix", metavar="PREFIX", help="id prefix (one per client box: a, b, ...)")
    p.add_argument("host", metavar="HOST",
                   help="the comet server's address (with --hosts: the app host for --send)")
    p.add_argument("--hosts", type=host_list, metavar="H0[:BASE0],...",
                   help="several MegaComet nodes sharing one Redis: each id to node "
                        "x31(id) %% (N * W) // W, port BASEk + x31(id) %% (N * W) %% W "
                        "(BASE defaults to --base-port; W from the first node's /_info)")
    p.add_argument("--conns", type=positive_int, default=DEFAULT_CONNS,
                   help=f"long polls to open (default {DEFAULT_CONNS:,})")
    p.add_argument("--workers", type=positive_int, help="server workers (default: ask GET /_info)")
    p.add_argument("--base-port", type=port, default=8000, help="worker 0's port (8000)")
    p.add_argument("--procs", type=positive_int,
                   help="client processes (default: enough to stay under RLIMIT_NOFILE)")
    p.add_argument("--source-ips", metavar="LIST",
                   help="bind to these: 10.0.0.1,10.0.0.2 or 127.0.0.2-127.0.0.9 or a /cidr "
                        "(default: none, or 127.0.0.x picked as needed on loopback)")
    p.add_argument("--rate", type=non_negative, default=0.0,
                   help="new connections a second, all processes together (0 = at once)")
    p.add_argument("--hold", type=non_negative,
                   help=f"seconds to hold the connections after the ramp ends (default "
                        f"{DEFAULT_HOLD_S:g}; 0 with --send: stop when the send phase ends)")
    p.add_argument("--max-time", type=positive_float, default=DEFAULT_MAX_TIME_S,
                   help=f"stop after this many seconds whatever happens ({DEFAULT_MAX_TIME_S:g})")
    p.add_argument("--stall", type=non_negative, default=STALL_S,
                   help=f"the ramp is over when every id was tried and the open count has not "
                        f"grown for this many seconds ({STALL_S:g})")
    p.add_argument("--connect-timeout", type=positive_float, default=CONNECT_TIMEOUT_S,
                   help=f"seconds a connect may take ({CONNECT_TIMEOUT_S:g})")
    p.add_argument("--send", type=non_negative_int, default=0, metavar="M",
                   help="after the ramp, send M messages through the app port and measure them")
    p.add_argument("--send-rate", type=non_negative, default=DEFAULT_SEND_RATE,
                   help=f"messages a second ({DEFAULT_SEND_RATE:g}; 0 = all at once)")
    p.add_argument("--grace", type=non_negative, default=DEFAULT_GRACE_S,
                   help=f"seconds to wait for deliveries after the last send "
                        f"({DEFAULT_GRACE_S:g})")
    p.add_argument("--app-host",
                   help=f"the manager's app address (default {DEFAULT_APP_HOST}; with --hosts, "
                        f"HOST)")
    p.add_argument("--app-port", type=port, default=9000, help="the manager's app port (9000)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON here")
    p.add_argument("--plot", metavar="FILE", type=figure_path,
                   help="after the run, draw its figure here (.svg or .png; needs matplotlib "
                        "and plots.py beside client.py)")
    p.add_argument("--subscriber-key-file", metavar="F",
                   help="sign every poll with the first key of F, as the server's "
                        "--subscriber-key-file wants (valid for an hour from each request)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    def fail(msg: str, status: int = EXIT_USAGE) -> int:
        print(f"client.py: {msg}", file=sys.stderr)
        return status
    prefix = args.prefix.encode()
    if not valid_id(prefix + str(args.conns - 1).encode()):
        return fail(f"ids {args.prefix}0..{args.prefix}{args.conns - 1} are not valid ids "
                    f"(1-128 of [A-Za-z0-9_~-])")
    key = None
    if args.subscriber_key_file is not None:
        try:
            key = read_keys(args.subscriber_key_file)[0]
        except KeyFileError as e:
            return fail(f"{e} (--subscriber-key-file)")
    app_host = args.app_host or (args.host if args.hosts else DEFAULT_APP_HOST)
    try:
        addr = socket.gethostbyname(args.host)
        app_addr = socket.gethostbyname(app_host)
    except OSError as e:
        return fail(f"cannot resolve {args.host} or --app-host {app_host}: {e}")
    nodes: tuple[Node, ...] = ()
    for host, base in args.hosts or ():
        try:
            nodes += (Node(host, *resolve(host), base or args.base_port),)
        except OSError as e:
            return fail(f"--hosts: cannot resolve {host}: {e}")
    first = nodes[0] if nodes else Node(args.host, addr, socket.AF_INET, args.base_port)
    workers = args.workers
    if workers is None or nodes:    # over nodes, /_info also says whether --hosts is right
        try:
            info = ask_info(first)
        except (OSError, ValueError) as e:
            also = "" if nodes else " (or pass --workers)"
            return fail(f"cannot ask http://{first.name}/_info for the worker count ({e}): "
                        f"is the server running?{also}", EXIT_SHORT)
        if workers is not None and workers != info["workers"]:
            return fail(f"--workers {workers}, but http://{first.name}/_info says "
                        f"{info['workers']}: leave --workers out with --hosts")
        workers = info["workers"]
        problem = nodes_problem(info, nodes) if nodes else None
        if problem:
            return fail(problem)
    for node in nodes or (first,):
        if node.base_port + workers - 1 > 65535:
            where = f"--hosts {node.name}" if nodes else f"--base-port {node.base_port}"
            return fail(f"{where} + {workers} workers runs past port 65535")
    overlap = overlapping_nodes(nodes, workers)
    if overlap:
        return fail(f"--hosts: {overlap}: one box's ports cannot be two nodes'")
    explicit = None
    if args.source_ips:
        try:
            explicit = parse_source_ips(args.source_ips)
        except ValueError as e:
            return fail(f"--source-ips: {e}")
        for src in explicit:
            with socket.socket() as probe:
                try:
                    probe.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    probe.bind((src, 0))
                except OSError as e:
                    return fail(f"--source-ips: cannot bind {src} ({e.strerror}): "
                                f"not an address of this box?")
        ipv6 = [node.name for node in nodes if node.family != socket.AF_INET]
        if ipv6:
            return fail(f"--source-ips are IPv4 addresses, and --hosts {ipv6[0]} is IPv6: "
                        f"leave --source-ips out")
    if args.json:
        try:
            open(args.json, "a").close()
        except OSError as e:
            return fail(f"--json {args.json}: {e.strerror}")
    if args.plot and not os.access(os.path.dirname(os.path.abspath(args.plot)), os.W_OK):
        return fail(f"--plot {args.plot}: cannot write in its folder")
    nofile = raise_nofile()
    procs, warn_procs = plan_procs(args.conns, nofile, args.procs)
    counts = per_port_counts(prefix, args.conns, workers, len(nodes or (first,)))
    # 127.0.0.x sources are picked only when every destination is IPv4 loopback; the server
    # is on this box (its accept queue overflows count) when any one is.
    is_loopback = [ipaddress.ip_address(node.addr).is_loopback for node in nodes or (first,)]
    loopback_v4 = all(is_loopback) and all(node.family == socket.AF_INET for node in nodes)
    loopback = any(is_loopback)
    sources, _, warn_src = plan_sources(max(counts), read_port_range(), explicit, loopback_v4)
    for warning in (warn_procs, warn_src):
        if warning:
            print(warning, file=sys.stderr)
    hold = args.hold if args.hold is not None else (0.0 if args.send else DEFAULT_HOLD_S)
    cfg = Config(prefix=args.prefix, host=args.host, addr=addr, loopback=loopback,
                 conns=args.conns, workers=workers, base_port=first.base_port, procs=procs,
                 sources=tuple(sources), rate=args.rate, hold=hold, max_time=args.max_time,
                 connect_timeout=args.connect_timeout, stall=args.stall, send=args.send,
                 send_rate=args.send_rate, grace=args.grace, app_host=app_host,
                 app_addr=app_addr, app_port=args.app_port, key=key, nodes=nodes)
    parent = Parent(cfg, split_range(args.conns, procs))

    def on_signal(signum, frame):
        parent.stop_reason = signal.Signals(signum).name
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    summary = parent.run()
    summary["shortfalls"] = shortfalls(summary)
    summary["exit_status"] = status = exit_status(summary)
    print_summary(summary)
    sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    if args.plot:
        draw(summary, args.plot)
    if summary["shortfalls"]:
        print("client.py: " + "; ".join(summary["shortfalls"]), file=sys.stderr)
    parent.reap()
    return status


if __name__ == "__main__":
    sys.exit(main())
