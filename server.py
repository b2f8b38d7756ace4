"""MegaComet worker: one process per core, holding long-poll connections on raw epoll.

The manager (manager.py) spawns W of these. Worker n inherits three file descriptors:
the listening socket of comet port base+n (fd 3), which the manager created and keeps, so a
restarted worker serves the same port and connections that arrive meanwhile wait in the
backlog; its link to the manager (fd 4), a UNIX stream socket carrying app messages in; and
its page (fd 5), shared memory where it keeps its counters, its acknowledgement of the link
frames it has acted on and its heartbeat, all read by the manager (link.py). The worker exits
when the link closes. SIGTERM drains it: it stops listening, answers every waiting poll `204`
and ends every stream, spread over --drain seconds, then exits (Worker.start_drain).

Theory of operation
-------------------
A comet connection lives through these states, kept in `state[fd]`, a list indexed by fd
(as Redis does), so that per-connection bookkeeping is one slot in a preallocated array:

    accept ──> read at once (TCP_DEFER_ACCEPT: the request came with the connection)
                 │ head incomplete: READING, buffer and deadline in `reading`
                 │ whole head parsed
                 ├──> answered at once (307, a kept message, /_info, error) ──> closed
                 └──> waiting: state[fd] is the id (bytes); `waiters[id]` holds the fd
                        │ a poll: message / broadcast / 409 / --poll-timeout
                        │   └──> answered ──> closed (or WRITING until the answer is flushed)
                        └ a stream (`is_stream[fd]`): each message written, the fd waits on;
                          one that is behind has a Backlog in `backlog[fd]` until it catches up

With --subscriber-key-file, a poll or stream is checked once, when its head is parsed
(signature_error): a bad signature is an error like any other, and nothing of the check stays
with the connection.

Errors are answered, then the write side is shut and the socket is drained for a moment
(LINGER) before closing, so the client reads the error instead of a reset.

Invariants:
- `state[fd]` is None exactly when fd is not an open connection of ours; `close()` is the
  only place that ends a connection, and calling it twice is harmless.
- No client input and no kernel limit ends the worker: a limit (open files, epoll watches)
  refuses the one connection, is counted in the page and logged once per LIMIT_LOG_EVERY.
- `count[LINK_DONE]` moves past a link frame only once the worker has acted on it whole.
- A waiting fd is in `waiters[state[fd]]`, and nowhere else holds it (no timers by default).
- Every message is written to the live connections waiting on its id and kept in the id's
  history (`store`, a MessageStore: its own invariants are in its docstring); it is never
  written into a connection we have already seen close. Client events of a batch are handled
  before the manager link, so a hang-up that arrived with a message is seen first.

What an idle waiting connection, poll or stream, costs (64-bit CPython 3.11, 6-byte id, measured by
`make bench-memory`, see README):
- `waiters` dict entry: 24 B entry + 4 B index slot, with the dict at 1/3–2/3 load: ~40 B
- the id: a bytes object of 33 + len(id) bytes, rounded up by pymalloc to 16: 48 B
- the fd as a value: ints above 256 are objects, so fds are interned in `self.fds`, a table
  like `state` (8 B + 32 B per fd slot): 0 B per connection while the table has room. Both
  start at FD_TABLE_START slots (or the open-file limit, if lower: 20,000 on the development
  box, so there nothing grows during a run) and double when an fd does not fit: 40 B per
  slot, paid as the highest fd grows, not per connection.
- `state[fd]` slot: as `fds`: 0 B
- a stream: the same, plus its `is_stream[fd]` byte, in a bytearray sized like `state`: 0 B
- the id's history: nothing for an id with no kept message (no entry in `store.histories`)
- epoll registration, socket buffers: kernel memory, not in the worker's RSS.
Measured: 94 B of worker RSS per waiting connection (the rest is glibc keeping the dict's
old tables after each resize), against 275 B for the C original and ~2,300 B for an asyncio
Protocol-based worker. Nothing else may grow with idle connections: no socket objects, no
per-connection timers, no selectors bookkeeping.
"""

import argparse
import bisect
import errno
import hashlib
import hmac
import ipaddress
import json
import mmap
import os
import re
import resource
import select
import signal
import socket
import sys
import time
from binascii import hexlify
from collections import deque
from itertools import islice
from operator import attrgetter
from typing import NamedTuple

import link
import options
from link import (
    ACCEPTED,
    BEAT_NS,
    BROADCAST,
    CLOSED_FLOOD,
    CLOSED_HEADER_TIMEOUT,
    CLOSED_RESET,
    CLOSED_SSE_BUFFER,
    CLOSED_TIMED_OUT,
    CLOSED_WRITE_TIMEOUT,
    CONNECTIONS,
    DELIVERED,
    DROPPED,
    DROPPED_UNDELIVERED,
    EXPIRED,
    EXPIRED_UNDELIVERED,
    LINK_DONE,
    MSG,
    QUEUED_BYTES,
    QUEUED_MESSAGES,
    READY,
    REFUSED_NO_WATCH,
    REJECTED,
    STREAMS,
    UNDELIVERED,
    WAITING,
)

# ---------------------------------------------------------------------------------------------
# Constants and limits
# ---------------------------------------------------------------------------------------------

LISTEN_FD = 3  # where the manager puts this worker's listening socket
LINK_FD = 4  # where the manager puts this worker's end of the link
PAGE_FD = 5  # where the manager puts this worker's shared page (link.py)
EXIT_BOOT_ERROR = 3  # "cannot even start": the manager stops instead of restart-looping

MAX_HEAD = 8192  # request head limit; over it is 431 (nginx's 8k header buffers, node's old 8 KiB)
# Accepts per call while draining (Worker.start_drain takes the whole backlog in one go).
# The loop takes one per pass (Worker.accept).
ACCEPTS_PER_DRAIN_CALL = 64
# Link reads of LINK_READ_SIZE per loop turn, so that a flood of messages cannot hold back the
# clients' events: the rest is read on the next turn (link_hot).
LINK_READS_PER_TURN = 16
LINK_READ_SIZE = 256 * 1024
GARBAGE_MAX = 256 * 1024  # bytes a client may send after its request, in all, before it is closed
BEAT_EVERY = 1024  # answers between two heartbeats inside one long pass (a broadcast, a sweep)
LINGER_TIMEOUT = 2.0  # seconds an answered error connection is drained before it is closed
DEFER_ACCEPT = 1  # seconds the kernel may hold a silent new connection before accept
ACCEPT_BACKOFF = 0.5  # seconds the listener rests after accept() failed for want of a resource
# accept() errors that concern one connection only (it was reset or refused before we took it);
# any other error is the listener's or the system's, and retrying at once would spin.
ACCEPT_TRANSIENT = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR,
                              errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
                              errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH))
# Keepalive probes unanswered before the kernel aborts a connection (with a RST). Probes go out
# in bursts: the kernel's timer wheel rounds a 60 s timer to a 2 s bucket, so every connection
# that went idle in the same 2 s probes at once, 1/30 of them all. Over loopback the burst
# goes through a per-CPU queue of net.core.netdev_max_backlog packets (1000 by default); the
# rest is dropped without TCP being told, and the unanswered probes are re-armed together.
# Measured on the development box (500,000 polls, client on the same box): with 4 probes,
# 186,192 waiting connections aborted, 37,181 clients read a reset, the others never knew.
# So: 9 probes (Linux's own default), tuning/sysctl.conf raises the queue, and a loopback peer
# gets no keepalive at all: it cannot vanish without its kernel closing the socket.
KEEPALIVE_PROBES = 9
LIMIT_LOG_EVERY = 10.0  # seconds between two log lines about the same limit
FD_TABLE_START = 65536  # fd table slots at start (fewer under a lower open-file limit)
BEAT_INTERVAL = 1.0  # the loop passes at least this often (heartbeat), and --worker-timeout / 4
# Why a connection was closed unanswered, from the errno of the read or write that failed.
CLOSE_CAUSES = {errno.ETIMEDOUT: CLOSED_TIMED_OUT, errno.ECONNRESET: CLOSED_RESET,
                errno.EPIPE: CLOSED_RESET}
# Byte classes, checked as `not b.translate(None, CLASS)` (nothing left: every byte is in
# it). One C call, where a regex match runs the sre engine: a worker woken for one request
# has it cold, ~6 us per first match (bench/hotpath.py --evict). Each is its regex's class
# exactly (tests/test_parser.py, tests/test_hash.py).
ALNUM = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_CHARS = ALNUM + b"_~-"  # an id: 1-128 of them (SPEC)
TCHAR = ALNUM + b"!#$%&'*+.^_`|~-"  # a token (RFC 9110 5.6.2): a method, a header name
VCHAR = bytes(range(0x21, 0x7F))  # visible ASCII (RFC 9112 3.2): a request target
REG_NAME = ALNUM + b"-._~!$&'()*+,;="  # a host name without %-escapes (RFC 3986 3.2.2)
DIGITS = b"0123456789"
ID_MAX = 128
CALLBACK_RE = re.compile(rb"[A-Za-z_$][A-Za-z0-9_$.]{0,63}")
# Host: see valid_host.
HOST_RE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)"
                     rb"(?::[0-9]{0,5})?")
ABSOLUTE_RE = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#]*)(/[^#]*)?")  # absolute-form
EMPTY_LINES_MAX = 8  # bytes of empty lines taken before a request line (RFC 9112 2.2: at least
# one); more is refused, as walking them again on each read of a slow client costs quadratic CPU
LENGTH_DIGITS = 19  # a poll's Content-Length: digits only, 19 of them at most (int64)
NEWLINE_RE = re.compile(rb"\r\n|\r|\n")  # where an SSE message is cut into data: lines
REPLAY_CHUNK = 64 * 1024  # a stream's replay is read from history about this much at a time
SSE_RETRY = b"retry: 2000\n\n"  # EventSource reconnects after 2 s (SPEC)
HEARTBEAT = b":\n"  # an SSE comment line: keeps proxies from closing an idle stream
# A drain (SIGTERM) ends the waiting connections in slices this far apart, each its share of
# --drain, so that clients come back spread over time rather than in the same millisecond.
DRAIN_SLICE = 0.02
DRAIN_FLUSH = 1.0  # after --drain, answers still being written get this long; then the exit

# Connection states that are not "waiting on an id" (a waiting fd's state is its id, bytes).
READING, WRITING, LINGER = 1, 2, 3

EPOLL_CLIENT = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


# ---------------------------------------------------------------------------------------------
# Ownership: which worker holds an id
# ---------------------------------------------------------------------------------------------


def x31(data: bytes) -> int:
    """khash's X31 string hash, as the original MegaComet used to pick a worker for an id."""
    h = 0
    if data:
        h = data[0]
        for c in data[1:]:
            h = (h * 31 + c) & 0xFFFFFFFF
    return h


def owner(id_: bytes, workers: int) -> int:
    """The worker that holds `id_`: every client, the manager and the workers agree on this."""
    return x31(id_) % workers


def valid_id(id_: bytes) -> bool:
    return 0 < len(id_) <= ID_MAX and not id_.translate(None, ID_CHARS)


def valid_host(host: bytes) -> bool:
    """RFC 3986's host (an IP literal, or a reg-name of unreserved, %-escapes and sub-delims)
    and an optional port: nothing else reaches a 307's Location (no controls, no spaces, no
    8-bit). A name and a port without %-escapes, the usual Host, is checked without the
    regex."""
    name, colon, port = host.partition(b":")
    if name and not name.translate(None, REG_NAME) and (
            not colon or (len(port) <= 5 and not port.translate(None, DIGITS))):
        return True
    return HOST_RE.fullmatch(host) is not None


# ---------------------------------------------------------------------------------------------
# Request parsing: a pure function over bytes, no I/O
# ---------------------------------------------------------------------------------------------


class HTTPError(Exception):
    """A request we refuse; carries the status to answer with and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


new_tuple = tuple.__new__


class Request(NamedTuple):
    method: bytes
    path: bytes
    query: bytes
    version: bytes
    headers: dict  # lower-case name -> value, both bytes


def parse_request(buf: bytes, scanned: int = 0, limit: int = MAX_HEAD):
    """Parse one request head from the start of `buf`.

    Returns (Request, bytes used) when the head is whole, or (None, scanned) when more bytes
    are needed: pass that `scanned` back next time, so the search for the blank line covers
    only new bytes. Raises HTTPError for anything we refuse. RFC 9112, with its robustness
    allowances: bare LF line ends (as picohttpparser and nginx), empty lines before the
    request line (2.2), the absolute form of the target (3.2.2, its authority then is the
    Host). A bare CR is refused (2.2), so is a Host that is not a host (3.2).
    """
    if buf and not (65 <= buf[0] <= 90 or 97 <= buf[0] <= 122):
        if buf[0] == 13 or buf[0] == 10:
            return parse_after_empty_lines(buf, scanned, limit)
        # A method starts with a letter; anything else (0x16, a TLS hello) is refused now
        # rather than after the header timeout. A lower-case one is a method we do not serve.
        raise HTTPError(400, "not an HTTP request")
    start = max(0, scanned - 3)
    # Bounded: a buffer of pipelined requests must not be scanned past one head's limit.
    end = buf.find(b"\n\r\n", start, limit + 3)
    end2 = buf.find(b"\n\n", start, limit + 2)
    if end2 != -1 and (end == -1 or end2 < end):
        used = end2 + 2
    elif end != -1:
        used = end + 3
    else:
        if len(buf) > limit:
            raise HTTPError(431, f"request head over {limit} bytes")
        return None, min(len(buf), limit)
    if used > limit:
        raise HTTPError(431, f"request head over {limit} bytes")
    lines = buf[:used].split(b"\n")
    line = lines[0].removesuffix(b"\r")  # one CR: a second one is a bare CR
    # find(), not `in`: bytes.__contains__ tries its argument as an int first, and formats
    # the exception it then clears.
    if line.find(b"\r") != -1:
        raise HTTPError(400, "bare CR in the request line")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not method or method.translate(None, TCHAR):
        raise HTTPError(400, "malformed method")
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        raise HTTPError(400, "only HTTP/1.0 and HTTP/1.1 are served")
    if not target or target.translate(None, VCHAR):
        # Visible ASCII only (RFC 9112 3.2): the target is echoed into a 307's Location.
        raise HTTPError(400, "request target must be a path of visible ASCII")
    authority = None
    if target[0] != 47:  # not "/": the absolute form, http://host/path
        absolute = ABSOLUTE_RE.fullmatch(target)
        if absolute is None or not valid_host(absolute[1]):
            raise HTTPError(400, "request target must be a path or an http:// URL")
        authority, target = absolute[1], absolute[2] or b"/"
    path, _, query = target.partition(b"?")
    headers = {}
    for raw in lines[1:-2]:
        name, colon, value = raw.removesuffix(b"\r").partition(b":")
        if not colon or not name or name.translate(None, TCHAR):
            raise HTTPError(400, "malformed header line")
        value = value.strip(b" \t")
        if value.find(b"\r") != -1 or value.find(b"\x00") != -1:
            raise HTTPError(400, "control character in a header value")
        name = name.lower()
        if name in headers:
            if name in (b"host", b"content-length", b"authorization"):
                raise HTTPError(400, "repeated " + name.decode() + " header")
            value = headers[name] + b", " + value
        headers[name] = value
    if authority is not None:
        headers[b"host"] = authority  # RFC 9112 3.2.2: the target's authority wins
    elif headers.get(b"host") and not valid_host(headers[b"host"]):
        raise HTTPError(400, "invalid Host header")  # an empty one is allowed (RFC 9112 3.2)
    # tuple.__new__ straight: Request(...) would run the named tuple's __new__, a Python
    # function (a frame more, 8 us of a cold worker's time).
    return new_tuple(Request, (method, path, query, version, headers)), used


def parse_after_empty_lines(buf: bytes, scanned: int, limit: int):
    """The request behind empty lines (RFC 9112 2.2: a server ignores at least one); they
    count against the head limit."""
    pos = 0
    while pos <= EMPTY_LINES_MAX:
        if buf.startswith(b"\r\n", pos):
            pos += 2
        elif buf.startswith(b"\n", pos):
            pos += 1
        else:
            break
    if pos > EMPTY_LINES_MAX:
        raise HTTPError(400, "too many empty lines before the request line")
    rest = buf[pos:]
    if rest[:1] == b"\r":
        if len(rest) == 1:
            return None, len(buf)  # the CR of a CRLF, or a bare one: the next byte says
        raise HTTPError(400, "bare CR before the request line")
    req, used = parse_request(rest, max(0, scanned - pos), limit - pos)
    return req, used + pos


# ---------------------------------------------------------------------------------------------
# Subscriber keys: signed poll and stream URLs (SPEC "Subscriber keys")
# ---------------------------------------------------------------------------------------------
# With --subscriber-key-file, a poll or stream URL carries `exp=<unix seconds>&sig=<hex>`, signed
# by the app server with a key it shares with us. It is checked once, at the request, before
# the 307: nothing is kept per connection, and without keys the check is one attribute test.

SIG_DIGITS = 32  # sig: the first 32 hex digits (128 bits) of HMAC-SHA256(key, "<id>:<exp>")
SHA256_BLOCK = 64  # bytes: HMAC pads the key to this (RFC 2104), hashing a longer one first
IPAD = bytes(b ^ 0x36 for b in range(256))  # bytes.translate tables: the key XOR each pad
OPAD = bytes(b ^ 0x5C for b in range(256))
KEY_FILE_MAX = 64 * 1024  # a key file is a few lines; a bigger one is the wrong file
KEYS_MAX = 16  # every key is tried on every signed request (no early exit), ~1.5 us each
EXP_DIGITS = 18  # an exp longer than this (leading zeros aside) is centuries ahead: no int()
SIG_MISSING = HTTPError(401, "a signed URL is required: exp and sig (see --subscriber-key-file)")
SIG_BAD_EXP = HTTPError(403, "exp must be a decimal integer: unix seconds")
SIG_EXPIRED = HTTPError(403, "signed URL expired: exp is in the past")
SIG_BAD_LENGTH = HTTPError(403, f"sig must be {SIG_DIGITS} hex digits: the first {SIG_DIGITS} "
                                "of HMAC-SHA256(key, \"<id>:<exp>\")")
SIG_WRONG = HTTPError(403, "wrong signature for this id and exp")
SIG_NO_KEYS = HTTPError(503, "this worker could not read its subscriber key file: see the log")


class KeyFileError(Exception):
    """A subscriber key file that cannot be used; the message is one line naming the file."""


def read_keys(path: str) -> list:
    """The keys of a key file, as bytes: each non-empty line, stripped of surrounding
    whitespace and not starting with `#` (a repeated one counts once). Raises KeyFileError."""
    try:
        with open(path, "rb") as f:
            data = f.read(KEY_FILE_MAX + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read subscriber key file {path}: "
                           f"{e.strerror or e}") from None
    if len(data) > KEY_FILE_MAX:
        raise KeyFileError(f"subscriber key file {path} is over {KEY_FILE_MAX // 1024} KiB: "
                           "the wrong file? (one key a line)")
    keys = []
    for line in data.splitlines():
        line = line.strip()
        if line and not line.startswith(b"#") and line not in keys:
            keys.append(line)
    if not keys:
        raise KeyFileError(f"subscriber key file {path} holds no key: one key a line, "
                           "# starts a comment")
    if len(keys) > KEYS_MAX:
        raise KeyFileError(f"subscriber key file {path} holds {len(keys)} keys, more than "
                           f"{KEYS_MAX}: each is tried on every request (2 are enough to "
                           "rotate)")
    return keys


def key_pads(key: bytes) -> tuple:
    """HMAC-SHA256's two hash states after the key's inner and outer pads (RFC 2104), made
    once per key when the file is read: a check then costs two copies and two short hashes.
    hmac.digest() makes them again on every call: 3.6-4.4 us a key against 1.4 us this way
    (OpenSSL 3.0; tests/test_keys.py holds it to hmac.digest for any key)."""
    if len(key) > SHA256_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(SHA256_BLOCK, b"\0")
    return hashlib.sha256(key.translate(IPAD)), hashlib.sha256(key.translate(OPAD))


def hmac_sha256(pads: tuple, message: bytes) -> bytes:
    """hmac.digest(key, message, "sha256"), from key_pads(key)."""
    inner, outer = pads[0].copy(), pads[1].copy()
    inner.update(message)
    outer.update(inner.digest())
    return outer.digest()


def sign(key: bytes, id_: bytes, exp: int) -> bytes:
    """The `sig` of a URL for id_ valid until exp (unix seconds), as the app server makes it."""
    return hexlify(hmac.digest(key, b"%s:%d" % (id_, exp), "sha256")[:SIG_DIGITS // 2])


def signature_error(keys: list, id_: bytes, query: bytes, now: float):
    """None when the query carries a good signature of id_ by one of `keys` (SPEC: exp and
    sig; each key as its key_pads), else the HTTPError to refuse with: 401 without exp or sig
    (an empty one counts as absent), 403 for a bad or past exp or a wrong sig, 503 with no
    keys (a worker whose key file could not be read). Of exp or sig given twice, the last
    counts. Pure: `now` is time.time()."""
    exp = sig = b""
    for part in query.split(b"&"):
        if part.startswith(b"exp="):
            exp = part[4:]
        elif part.startswith(b"sig="):
            sig = part[4:]
    if not exp or not sig:
        return SIG_MISSING
    if not keys:
        return SIG_NO_KEYS
    if not exp.isdigit():  # ASCII digits only: no sign, no space, no exponent
        return SIG_BAD_EXP
    digits = exp.lstrip(b"0")
    if len(digits) <= EXP_DIGITS and int(digits or b"0") < now:
        return SIG_EXPIRED
    if len(sig) != SIG_DIGITS:
        return SIG_BAD_LENGTH
    sig = sig.lower()  # either case; hexlify's is lower
    message = id_ + b":" + exp  # exp as sent: the signer wrote these very digits
    good = False
    for pads in keys:  # every key, no early exit: the time taken does not tell which matched
        good |= hmac.compare_digest(hexlify(hmac_sha256(pads, message)[:SIG_DIGITS // 2]), sig)
    return None if good else SIG_WRONG


# ---------------------------------------------------------------------------------------------
# The message store: each id's history (SPEC "History and the cursor")
# ---------------------------------------------------------------------------------------------

SEQ_BITS = 64  # a message id <ms>-<seq> is compared as one integer: ms << 64 | seq
CURSOR_RE = re.compile(rb"([0-9]+)-([0-9]+)")


def mid_key(ms: int, seq: int) -> int:
    return ms << SEQ_BITS | seq


def cursor_text(key: int) -> bytes:
    return b"%d-%d" % (key >> SEQ_BITS, key & ((1 << SEQ_BITS) - 1))


def parse_cursor(text: bytes):
    """The key of a cursor `<digits>-<digits>`, each part below 2**64, or None if `text` is
    not one."""
    m = CURSOR_RE.fullmatch(text)
    if m is None:
        return None
    # Leading zeros off before int(), which refuses strings over 4,300 digits (a head is 8 KiB).
    ms, seq = m[1].lstrip(b"0") or b"0", m[2].lstrip(b"0") or b"0"
    if len(ms) > 20 or len(seq) > 20:
        return None
    ms, seq = int(ms), int(seq)
    if ms >> SEQ_BITS or seq >> SEQ_BITS:
        return None
    return ms << SEQ_BITS | seq


MESSAGE_KEY = attrgetter("key")


class Message:
    """One kept message. `expires` is its TTL deadline while kept, and once evicted, when the
    store forgets that it was evicted (see MessageStore.gap)."""
    __slots__ = ("id", "key", "mid", "body", "expires", "delivered")

    def __init__(self, id_: bytes, key: int, mid: bytes, body: bytes, expires: float,
                 delivered: bool):
        self.id = id_
        self.key = key
        self.mid = mid  # the id as clients see it, b"<ms>-<seq>"
        self.body = body  # None once evicted
        self.expires = expires
        self.delivered = delivered


class MessageStore:
    """Every id's history: the messages kept for it, delivered or not, oldest first.

    Pure: no I/O, no clock (callers pass `now`), so a property test can drive it through any
    sequence of appends, reads and evictions. Its figures are kept in `count` (the worker's
    shared page, or any list indexed like it): QUEUED_MESSAGES, QUEUED_BYTES, UNDELIVERED
    now; EXPIRED, DROPPED and their _UNDELIVERED parts as they happen.

    Bounds, oldest evicted first: `ttl` seconds per message, `per_id` messages per id,
    `max_bytes` of message bodies in all. A message bigger than max_bytes on its own is
    evicted as soon as it is appended (the worker delivers it to its waiters first).

    Gaps. A cursor may have missed messages when one of its id above the cursor was evicted.
    The store remembers each id's newest evicted key for `ttl` after the eviction (what it
    costs: one dict entry per recently evicted id); when it forgets one, `forgotten` keeps the
    newest key it forgot, and a cursor below that on an id it knows nothing about is told
    "gap" too: it cannot know, so messages *may* be missing. A cursor older than the worker's
    start is a gap as well (not 0-0): what a dead worker held is gone. "Start" is `start_ms`, or
the key of the first message appended if that is older (frames the manager held for us while
we started: the lost ones are older still).

    Invariants (tests/test_store.py): each history is in key order and within per_id; the
    bodies kept sum to at most max_bytes after each append; `order` holds every kept message
    in arrival order (arrival + ttl = expiry order), evicted ones as tombstones (body None)
    until they reach its head; an id with no kept message has no history entry.
    """

    def __init__(self, count, ttl: float, per_id: int, max_bytes: int, start_ms: int):
        self.count = count
        self.ttl = ttl
        self.per_id = per_id
        self.max_bytes = max_bytes
        self.start_key = mid_key(start_ms, 0)
        self.histories: dict = {}  # id -> [Message, ...] oldest first
        self.order: deque = deque()  # kept messages in arrival order, and tombstones
        self.evicted: dict = {}  # id -> key of its newest evicted message, for ttl after
        self.forget: deque = deque()  # evicted messages in eviction order, to forget them
        self.forgotten = 0  # newest key the store no longer remembers evicting

    def append(self, id_: bytes, key: int, mid: bytes, body: bytes, now: float,
               delivered: bool = False, trim: bool = True):
        """Keep a new message; returns it, or None for a key not above the id's newest (a
        frame replayed twice: already kept). With trim=False the caller calls trim() itself
        (the worker, after writing the message to its waiters: one bigger than max_bytes is
        still delivered, then evicted)."""
        history = self.histories.get(id_)
        if history is not None:
            if history[-1].key >= key:
                return None
            id_ = history[-1].id  # one id object per history, not one per message (48 B)
        if key < self.start_key:
            # A frame the manager held for this worker while it was (re)starting: what the
            # dead one held is lost from before this key on, not from our start.
            self.start_key = key
        count = self.count
        msg = Message(id_, key, mid, body, now + self.ttl, delivered)
        if history is None:
            self.histories[id_] = [msg]
        else:
            history.append(msg)
            if len(history) > self.per_id:
                self.evict(history[0], DROPPED, now)
        self.order.append(msg)
        count[QUEUED_MESSAGES] += 1
        count[QUEUED_BYTES] += len(body)
        if not delivered:
            count[UNDELIVERED] += 1
        if trim:
            self.trim(now)
        if len(self.order) > 2 * count[QUEUED_MESSAGES] + 1024:
            # Tombstones of messages evicted by the per-id cap wait for the head; compact
            # when they are the majority, so `order` stays within twice what is kept.
            self.order = deque(m for m in self.order if m.body is not None)
        return msg

    def trim(self, now: float) -> None:
        """Evict the oldest messages while the bodies kept exceed max_bytes."""
        count = self.count
        order = self.order
        while count[QUEUED_BYTES] > self.max_bytes:
            old = order.popleft()
            if old.body is not None:
                self.evict(old, DROPPED, now)

    def evict(self, msg: Message, cause: int, now: float) -> None:
        """Remove a kept message; it is always the oldest of its id."""
        history = self.histories[msg.id]
        history.pop(0)
        if not history:
            del self.histories[msg.id]
        count = self.count
        count[QUEUED_MESSAGES] -= 1
        count[QUEUED_BYTES] -= len(msg.body)
        count[cause] += 1
        if not msg.delivered:
            count[UNDELIVERED] -= 1
            count[EXPIRED_UNDELIVERED if cause == EXPIRED else DROPPED_UNDELIVERED] += 1
        msg.body = None
        msg.expires = now + self.ttl  # now: when to forget the eviction
        self.evicted[msg.id] = msg.key
        self.forget.append(msg)

    def expire(self, now: float):
        """Evict what reached its TTL and forget old evictions; returns the next deadline
        (None when nothing is kept or remembered)."""
        order = self.order
        # A tombstone's `expires` is when to forget its eviction, not its TTL: it goes at once.
        while order and (order[0].body is None or order[0].expires <= now):
            msg = order.popleft()
            if msg.body is not None:
                self.evict(msg, EXPIRED, now)
        forget = self.forget
        while forget and forget[0].expires <= now:
            msg = forget.popleft()
            if self.evicted.get(msg.id) == msg.key:
                del self.evicted[msg.id]
            if msg.key > self.forgotten:
                self.forgotten = msg.key
        nxt = order[0].expires if order else None
        if forget and (nxt is None or forget[0].expires < nxt):
            nxt = forget[0].expires
        return nxt

    def delivered(self, msg: Message) -> None:
        """A client had it (a poll's answer, a stream's event): later polls without a cursor
        skip it."""
        if not msg.delivered:
            msg.delivered = True
            if msg.body is not None:
                self.count[UNDELIVERED] -= 1

    def oldest_undelivered(self, id_: bytes):
        history = self.histories.get(id_)
        if history is not None:
            for msg in history:
                if not msg.delivered:
                    return msg
        return None

    def undelivered(self, id_: bytes) -> list:
        return [m for m in self.histories.get(id_, ()) if not m.delivered]

    def after(self, id_: bytes, key: int):
        """The oldest kept message of id_ with a key above `key`, or None."""
        history = self.histories.get(id_)
        if history is None or history[-1].key <= key:
            return None
        # Binary search: a replay calls this once per message (--queue-max may be large).
        return history[bisect.bisect_right(history, key, key=MESSAGE_KEY)]

    def gap(self, id_: bytes, key: int) -> bool:
        """May messages of id_ after the cursor `key` be missing? (SPEC: X-Message-Gap.)
        Evicting the cursor's own message is no gap; 0-0 means "from what is kept"."""
        evicted = self.evicted.get(id_)
        if evicted is not None and evicted > key:
            return True
        return key != 0 and (key < self.start_key or (evicted is None and key < self.forgotten))

    def evicted_after(self, id_: bytes, key: int) -> bool:
        """Was a message of id_ above `key` evicted? (A stream's replay meets a gap.)"""
        return self.evicted.get(id_, -1) > key


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------

TEXT = b"text/plain; charset=utf-8"
JS = b"application/javascript"
JSON = b"application/json"
REASONS = {
    200: b"OK", 204: b"No Content", 307: b"Temporary Redirect", 400: b"Bad Request",
    401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    409: b"Conflict", 411: b"Length Required", 413: b"Content Too Large",
    431: b"Request Header Fields Too Large", 503: b"Service Unavailable",
}


def response_head(status: int, length: int, ctype: bytes, tail: bytes, extra: bytes = b"") -> bytes:
    """`tail` is the per-worker constant part (Cache-Control, CORS, Connection: close)."""
    return b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nContent-Type: %s\r\n%s%s" % (
        status, REASONS[status], length, ctype, extra, tail)


def jsonp_body(callback: bytes, message: bytes, mid: bytes) -> bytes:
    text = json.dumps(message.decode("utf-8", "replace"))  # ASCII-only, U+2028 escaped
    return b'%s(%s, "%s");' % (callback, text.encode(), mid)


def sse_event(mid: bytes, message: bytes) -> bytes:
    """One Server-Sent Event: `id:`, a `data:` line per line of the message (split at CRLF,
    CR and LF, as the EventSource parser splits them), a blank line."""
    if not message.isascii():
        message = message.decode("utf-8", "replace").encode()
    if b"\n" in message or b"\r" in message:
        data = b"".join([b"data: %s\n" % line for line in NEWLINE_RE.split(message)])
    else:
        data = b"data: %s\n" % message
    return b"id: %s\n%s\n" % (mid, data)


def sse_control(event: bytes, data: bytes) -> bytes:
    """`event: gap` / `event: replaced`: named events, which carry no id (EventSource keeps its
    last one)."""
    return b"event: %s\ndata: %s\n\n" % (event, data)


class Backlog:
    """What a stream could not write yet (only a stream that is behind has one).

    `out`: the bytes to write next; its first `replay` bytes are history being replayed, the
    rest live messages. `live`: bytes of live messages not yet written, in `out` or in
    `after` (only those count against --sse-buffer). `cursor`: while the replay is not done,
    the key of the newest message put in `out`; the next ones are read from history as the
    socket drains, including those that arrive meanwhile (they are history too, and part of
    the replay). `skip_until`: a stream opened without a cursor replays only what no client
    had: messages up to this key that are delivered are passed over. `after`: broadcasts that
    arrived during the replay (they are in no history), as (the id's newest key then,
    event): each goes out right after that message, so ids on the stream never go back.
    `marks`: [offset of an event's end, its Message or None] for the events in `out`: an
    event counts as delivered when its last byte is written (`base` is the bytes written so
    far), so a stream closed with messages unsent leaves them undelivered for the next poll.
    `armed`: EPOLLOUT asked for (and a --write-timeout deadline in `flushing`)."""
    __slots__ = ("out", "replay", "live", "cursor", "skip_until", "after", "marks", "base",
                 "armed")

    def __init__(self, cursor=None):
        self.out = bytearray()
        self.replay = 0
        self.live = 0
        self.cursor = cursor
        self.skip_until = -1
        self.after: list = []
        self.marks: deque = deque()
        self.base = 0
        self.armed = False

    def add(self, event: bytes, msg) -> None:
        self.out += event
        self.marks.append((self.base + len(self.out), msg))


class Public(NamedTuple):
    """Where clients reach the workers, for a 307's Location: one per worker, nothing per
    connection. Highest precedence first: X-Forwarded-Proto / X-Forwarded-Port sent by a peer
    in `trusted` (the TLS proxy in front, which knows what the client used), then
    --public-scheme / --public-base-port (a static setting), then http and --base-port.
    A header from any other peer changes nothing: otherwise any client could make a 307 point
    where it likes (an open redirect, and a poisoned cache if one sits in between)."""
    scheme: bytes  # b"http" or b"https" (--public-scheme)
    base: int  # the public port of worker 0 (--public-base-port, default --base-port)
    trusted: tuple  # ipaddress networks (--trusted-proxy); empty: no header is believed
    worker: int  # this worker's n: a forwarded port is this worker's public port, base + n


def location(req: Request, home: int, fd: int, public: Public) -> bytes:
    """The same URL, query kept (a signature in it survives), on worker `home`'s public port,
    on the host the client asked for (without a Host header: the address it connected to).
    The Host header's port is never used: a client can write any port there."""
    headers = req.headers
    scheme, port = public.scheme, public.base + home
    if public.trusted and (b"x-forwarded-proto" in headers or b"x-forwarded-port" in headers) \
            and trusted_peer(fd, public.trusted):
        scheme, port = forwarded(headers, scheme, port, public.worker, home)
    host = headers.get(b"host")  # checked by the parser (valid_host)
    if host:
        host = host[: host.index(b"]") + 1] if host.startswith(b"[") else host.split(b":")[0]
    else:
        sock = socket.socket(fileno=fd)
        try:
            addr = sock.getsockname()[0]
        finally:
            sock.detach()
        host = (b"[%s]" if ":" in addr else b"%s") % addr.encode()
    target = req.path + (b"?" + req.query if req.query else b"")
    return b"%s://%s:%d%s" % (scheme, host, port, target)


def node_location(req: Request, node: tuple, home: int, scheme: bytes) -> bytes:
    """The same URL, query kept, on another node's worker `home` (SPEC "More than one box"):
    that node's host and base port as --nodes gives them, the public scheme."""
    host, base = node
    target = req.path + (b"?" + req.query if req.query else b"")
    return b"%s://%s:%d%s" % (scheme, host.encode(), base + home, target)


def forwarded(headers: dict, scheme: bytes, port: int, worker: int, home: int):
    """(scheme, port) for worker `home` from a trusted proxy's X-Forwarded-Proto and
    X-Forwarded-Port, each used only when well formed (else the static value stays). The
    proxy's public ports are taken to be consecutive in worker order, as the workers' are
    (tuning/haproxy.py makes them so): the forwarded port is this worker's, so the owner's is
    that - worker + home. Of a list (repeated headers are joined with ", "), the last value
    counts: the one the nearest proxy, the trusted one, added."""
    proto = headers.get(b"x-forwarded-proto")
    if proto is not None:
        proto = proto.rpartition(b",")[2].strip().lower()
        if proto == b"https" or proto == b"http":
            scheme = proto
    value = headers.get(b"x-forwarded-port")
    if value is not None:
        value = value.rpartition(b",")[2].strip()
        if value.isdigit() and len(value) <= 5 and 1 <= int(value) <= 65535:
            home_port = int(value) - worker + home
            if 1 <= home_port <= 65535:
                port = home_port
    return scheme, port


def trusted_peer(fd: int, trusted: tuple) -> bool:
    """Whether the peer of fd is in one of the `trusted` networks. Asked of the kernel at 307
    time only (once per redirected request), so no connection keeps its address."""
    sock = socket.socket(fileno=fd)
    try:
        peer = sock.getpeername()[0]
    finally:
        sock.detach()
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
    return any(addr in net for net in trusted)


# ---------------------------------------------------------------------------------------------
# The worker: state, queues, event loop
# ---------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, opts, listener: socket.socket, link_fd: int, page=None, wake_fd=None):
        self.n = opts.worker
        self.workers = opts.workers
        self.base_port = opts.base_port
        self.max_waiters = opts.max_waiters
        self.sse_heartbeat = opts.sse_heartbeat
        self.sse_buffer = opts.sse_buffer
        self.poll_timeout = opts.poll_timeout
        self.header_timeout = opts.header_timeout
        self.write_timeout = opts.write_timeout
        self.drain = opts.drain
        # The loop passes at least this often, idle or not: each pass is a heartbeat.
        self.beat_interval = min(BEAT_INTERVAL, opts.worker_timeout / 4)
        # A pass sweeps the timers only when one may be due (sweep_at): paced traffic wakes
        # the loop per message and per re-poll, and a sweep that finds nothing costs ~2 us.
        # Every deadline a table is given lies at least sweep_every after the moment it is
        # given (these are all the timeouts; a new timer belongs in this list), so sweeps at
        # most sweep_every apart never act late on a deadline set between them.
        self.sweep_every = min(x for x in (
            self.beat_interval, self.header_timeout, self.write_timeout, LINGER_TIMEOUT,
            ACCEPT_BACKOFF, opts.queue_ttl, self.poll_timeout or BEAT_INTERVAL,
            self.sse_heartbeat or BEAT_INTERVAL))
        self.sweep_at = 0.0
        cors = (b"Access-Control-Allow-Origin: %s\r\nAccess-Control-Expose-Headers: "
                b"X-Message-Id, X-Message-Gap\r\n" % opts.cors_origin.encode())
        self.tail = b"Cache-Control: no-store\r\n%sConnection: close\r\n\r\n" % cors
        self.sse_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Cache-Control: no-store\r\n%sX-Accel-Buffering: no\r\n"
                         b"Connection: close\r\n\r\n%s" % (cors, SSE_RETRY))
        self.public = Public(opts.public_scheme.encode(), opts.public_base_port or
                             self.base_port, opts.trusted_proxy, self.n)
        # More than one node (--nodes): slot x31(id) % (N x W), node slot // W, worker
        # slot % W; with one node the slot is the worker (SPEC "More than one box").
        self.node, nodes = opts.node
        self.nodes = opts.nodes
        self.slots = nodes * self.workers
        self.slot = self.node * self.workers + self.n
        info = {"worker": self.n, "workers": self.workers, "base_port": self.base_port}
        if self.nodes:
            info.update(node=self.node, nodes=nodes,
                        hosts=[f"{h}:{p}" for h, p in self.nodes])
        self.info = json.dumps(info).encode()
        # --hold: the listener is watched from the manager's READY frame on, once the node's
        # history is replayed from Redis (link.py); connections wait in the backlog till then.
        self.held = opts.hold
        self.cursors = None  # fd -> cursor key of a waiting poll or stream, only from a
        # READY that says the history comes late until CAUGHT_UP (release)

        self.listener = listener
        self.listen_fd = listener.fileno()
        # Accepted sockets inherit the listener's keepalive; loopback peers get none (see
        # KEEPALIVE_PROBES): one setsockopt each, ~1.7 us, for them only.
        self.keepalive = listener.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        self.family = listener.family
        self.link_fd = link_fd
        self.wake_fd = wake_fd  # signals arrive here as bytes (signal.set_wakeup_fd), or None
        self.epoll = select.epoll()
        # Figures and counters live in the page the manager reads (link.py); without a
        # manager (a profile, a test) in a private buffer.
        self.count = link.view(bytearray(link.PAGE_SIZE) if page is None else page)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_limit = nofile  # for the log line only; may be RLIM_INFINITY
        size = FD_TABLE_START if nofile == resource.RLIM_INFINITY else \
            min(nofile, FD_TABLE_START)
        self.state: list = [None] * size  # fd -> None | READING | WRITING | LINGER | id
        self.fds = list(range(size))  # interned fd ints (see the module docstring)
        self.is_stream = bytearray(size)  # fd -> 1 for a waiting SSE stream: 1 B per slot

        self.waiters: dict = {}  # id -> fd, or a list of fds (oldest first), polls and streams
        self.reading: dict = {}  # fd -> [deadline, bytes so far, scanned]; accept order
        self.poll_deadlines: dict = {}  # fd -> deadline, only with --poll-timeout; wait order
        self.lingering: dict = {}  # fd -> deadline; answered errors being drained
        self.flushing: dict = {}  # fd -> deadline; answers the client is slow to read
        self.outbuf: dict = {}  # fd -> memoryview of the answer's unwritten rest
        self.linger_after: set = set()  # fds in outbuf whose answer ends with a linger
        self.jsonp: dict = {}  # fd -> callback name, for the few waiting JSONP polls
        self.garbage: dict = {}  # fd -> bytes it sent after its request, for the few that do
        self.gapped: set = set()  # waiting cursor polls whose answer says X-Message-Gap: 1
        self.backlog: dict = {}  # fd -> Backlog, for the streams that are behind

        self.store = MessageStore(self.count, opts.queue_ttl, opts.queue_max, opts.queue_bytes,
                                  time.time_ns() // 1_000_000)
        self.next_heartbeat = time.monotonic() + self.sse_heartbeat
        self.link_in = b""
        # One buffer for every link read: os.read(fd, 256 KiB) mallocs that much (glibc
        # mmaps it), then shrinks it to what came (mremap) and frees it (munmap), three
        # syscalls and a page fault per read, and paced traffic reads the link per message.
        self.link_buf = bytearray(LINK_READ_SIZE)
        self.link_view = memoryview(self.link_buf)
        self.link_read = 0  # link bytes read, in all; those not in link_in were acted on
        self.link_hot = False  # the link had more to read when the per-turn cap stopped us
        self.link_hup = False  # epoll saw the manager's end close: read the link to its EOF
        self.accept_paused_until = 0.0  # EMFILE and friends: listener unwatched until then
        self.last_limit_log: dict = {}  # limit name -> when it was last logged
        # --subscriber-key-file: None, every poll is served; else the keys a URL may be signed
        # with, read at start and again on SIGHUP (the handler only sets reload_keys).
        self.key_file = opts.subscriber_key_file
        self.keys = None
        self.reload_keys = False
        if self.key_file is not None:
            self.load_keys()

        self.draining = False  # SIGTERM came: no more accepts, waiting connections ended
        self.drain_last = self.drain_end = 0.0  # the last slice, and when all must be ended
        self.drain_due = 0.0  # connections due to be ended that are not yet

    # -- subscriber keys ---------------------------------------------------------------------

    def load_keys(self) -> None:
        """Read the key file (at start, and on SIGHUP: connections are kept). A file that
        cannot be used keeps the keys read before; at start there are none, and every poll and
        stream is refused (503) until a SIGHUP finds a good file. The manager checked the file
        a moment before, so that takes a file broken since and a worker restart."""
        try:
            self.keys = [key_pads(key) for key in read_keys(self.key_file)]
        except KeyFileError as e:
            then = f"keeping the {len(self.keys)} keys read before" if self.keys else \
                "refusing every poll and stream (503) until a SIGHUP finds a good file"
            log(f"worker {self.n}: {e}; {then}")
            if self.keys is None:
                self.keys = []

    # -- limits: logged once in a while, never fatal -----------------------------------------

    def limit_hit(self, name: str, line: str) -> None:
        now = time.monotonic()
        if now - self.last_limit_log.get(name, -LIMIT_LOG_EVERY) >= LIMIT_LOG_EVERY:
            self.last_limit_log[name] = now
            log(f"worker {self.n}: {line}")

    def grow_tables(self, fd: int) -> None:
        """The fd tables start at FD_TABLE_START slots and double as fds grow: preallocating
        for the open-file limit costs 48 B per slot up front, 48 MiB under the shipped unit's
        LimitNOFILE=1048576 and a MemoryError under infinity."""
        size = len(self.state)
        new = max(size * 2, fd + 1)
        self.state.extend([None] * (new - size))
        self.fds.extend(range(size, new))
        self.is_stream.extend(bytes(new - size))

    def register(self, fd: int, events: int) -> bool:
        """epoll_ctl(ADD). ENOSPC is fs.epoll.max_user_watches reached (every watched fd of
        this user, all processes): that one connection is refused, the rest are served."""
        try:
            self.epoll.register(fd, events)
            return True
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.ENOMEM):
                raise
            why = "fs.epoll.max_user_watches reached; raise it, see tuning/sysctl.conf" \
                if e.errno == errno.ENOSPC else "the kernel is out of memory"
        self.count[REFUSED_NO_WATCH] += 1
        self.limit_hit("watches", f"epoll cannot watch one more connection ({why}); "
                       "refusing new connections until some close")
        return False

    # -- the one close path ------------------------------------------------------------------

    def close(self, fd: int, cause: int = 0) -> None:
        """End a connection; `cause`, when given, is the page counter of why."""
        s = self.state[fd]
        if s is None:
            return
        if s.__class__ is bytes:
            self.forget_waiter(fd, s)
        elif s == READING:
            self.reading.pop(fd, None)
        elif s == LINGER:
            self.lingering.pop(fd, None)
        elif self.outbuf and fd in self.outbuf:
            del self.outbuf[fd]
            self.flushing.pop(fd, None)
            self.linger_after.discard(fd)
        self.state[fd] = None
        if self.garbage:
            self.garbage.pop(fd, None)
        count = self.count
        count[CONNECTIONS] -= 1
        if cause:
            count[cause] += 1
        os.close(fd)  # also removes it from the epoll set: nothing else holds this file

    def close_on_error(self, fd: int, e: OSError) -> None:
        cause = CLOSE_CAUSES.get(e.errno, CLOSED_RESET)
        self.close(fd, cause)

    def forget_waiter(self, fd: int, id_: bytes) -> None:
        w = self.waiters[id_]
        if w.__class__ is int:
            del self.waiters[id_]
        else:
            w.remove(fd)
            if len(w) == 1:
                self.waiters[id_] = w[0]
        self.count[WAITING] -= 1
        if self.is_stream[fd]:
            self.is_stream[fd] = 0
            self.count[STREAMS] -= 1
            if self.backlog and self.backlog.pop(fd, None) is not None:
                self.flushing.pop(fd, None)
        else:
            if self.poll_deadlines:
                self.poll_deadlines.pop(fd, None)
            if self.jsonp:
                self.jsonp.pop(fd, None)
        if self.gapped:
            self.gapped.discard(fd)
        if self.cursors:
            self.cursors.pop(fd, None)

    # -- writing answers ---------------------------------------------------------------------

    def answer(self, fd: int, data: bytes, linger: bool = False) -> bool:
        """Write a whole answer, then close (or linger); False if the peer is already gone."""
        s = self.state[fd]
        if s.__class__ is bytes:
            self.forget_waiter(fd, s)
        elif s == READING:
            self.reading.pop(fd, None)
        self.state[fd] = WRITING
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.close_on_error(fd, e)
            return False
        if n == len(data):
            if linger:
                self.linger(fd)
            else:
                self.close(fd)
            return True
        self.unfinished(fd, data, n, linger)
        return True

    def unfinished(self, fd: int, data: bytes, n: int, linger: bool = False) -> None:
        """An answer of which the first n bytes are written (state WRITING)."""
        # The rest waits for EPOLLOUT; asking for it only now saves a wake-up per connection.
        self.outbuf[fd] = memoryview(data)[n:]  # slices of it copy nothing
        self.flushing[fd] = time.monotonic() + self.write_timeout
        if linger:
            self.linger_after.add(fd)
        self.watch(fd, EPOLL_CLIENT | select.EPOLLOUT)

    def refuse(self, fd: int, err: HTTPError, extra: bytes = b"") -> None:
        """Answer an error with a one-line reason; it lingers, as the client may have sent
        more than we read."""
        self.count[REJECTED] += 1
        body = err.reason.encode() + b"\n"
        self.answer(fd, response_head(err.status, len(body), TEXT, self.tail, extra) + body,
                    linger=True)

    def linger(self, fd: int) -> None:
        """Shut our side and drain the client's leftovers for a moment before closing:
        closing over unread bytes sends a reset, which can destroy the answer just sent."""
        try:
            sock = socket.socket(fileno=fd)
            try:
                sock.shutdown(socket.SHUT_WR)
            finally:
                sock.detach()
        except OSError:
            self.close(fd)
            return
        self.state[fd] = LINGER
        self.lingering[fd] = time.monotonic() + LINGER_TIMEOUT
        self.watch(fd, EPOLL_CLIENT)

    def watch(self, fd: int, events: int) -> None:
        try:
            self.epoll.modify(fd, events)
        except FileNotFoundError:
            if not self.register(fd, events):
                self.close(fd)

    def flush(self, fd: int) -> None:
        data = self.outbuf[fd]
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            return
        except OSError as e:
            self.close_on_error(fd, e)
            return
        if n < len(data):
            self.outbuf[fd] = data[n:]
            return
        del self.outbuf[fd]
        self.flushing.pop(fd, None)
        if fd in self.linger_after:  # unread bytes behind the request: see linger()
            self.linger_after.discard(fd)
            self.linger(fd)
        else:
            self.close(fd)

    # -- accepting and reading requests ------------------------------------------------------

    def accept(self, until_eagain: bool = False) -> bool:
        """One queued connection: accepted, its request read and acted on. The listener is
        level-triggered, so epoll reports it again on the next pass while more are queued.
        Most wake-ups bring one (a re-poll when paced, a ramp spread over many workers): one
        accept per pass needs no accept() that only says EAGAIN (an exception) and no count
        asked of the kernel (tcp_info), each of which cost a worker woken at a trickle more
        than a pass does (bench/hotpath.py --evict); a burst pays a pass per connection
        instead, which also lets the link's messages in between. `until_eagain`: up to
        ACCEPTS_PER_DRAIN_CALL, to the EAGAIN; True if it stopped at that cap (more may wait)."""
        listener, state, fds, count = self.listener, self.state, self.fds, self.count
        for _ in range(ACCEPTS_PER_DRAIN_CALL if until_eagain else 1):
            try:
                # socket.accept() would wrap the fd in a socket object we would throw away.
                fd, peer = listener._accept()
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno in ACCEPT_TRANSIENT:
                    continue  # that one connection is gone; the next may be fine
                self.pause_accept(e)
                return False
            if fd >= len(state):
                self.grow_tables(fd)
            fd = fds[fd]
            # Two fcntl syscalls, yet 1.0 us against 2.3 for fcntl.fcntl's one, whose
            # argument parsing raises and formats an exception for every int it is given.
            os.set_blocking(fd, False)
            if self.keepalive and is_loopback(peer[0]):
                self.sockopt(fd, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
            state[fd] = READING
            count[CONNECTIONS] += 1
            count[ACCEPTED] += 1
            # The request has usually arrived with the handshake (TCP_DEFER_ACCEPT): read it
            # before registering, so a connection answered at once never costs an epoll_ctl.
            self.read_head(fd, None)
        return until_eagain

    def sockopt(self, fd: int, level: int, option: int, value: int) -> None:
        """setsockopt on a bare fd (the connection has no socket object: see the memory
        budget at the top)."""
        sock = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)  # no family lookups
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass  # already reset: the read or write that follows sees it
        finally:
            sock.detach()

    def pause_accept(self, e: OSError) -> None:
        # Linux keeps reporting the listener readable, so stop watching it for a while
        # instead of spinning; the pending connections wait in the backlog.
        self.epoll.modify(self.listen_fd, 0)
        self.accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
        if e.errno in (errno.EMFILE, errno.ENFILE):
            limit = "the open-file limit" if e.errno == errno.EMFILE else \
                "the system-wide open-file limit (fs.file-max)"
            self.limit_hit("accept", f"accept failed ({e.strerror}) with "
                           f"{self.count[CONNECTIONS]:,} connections open: {limit} caps this "
                           f"worker (RLIMIT_NOFILE {self.fd_limit}); see tuning/check.py")
        else:
            self.limit_hit("accept", f"accept failed ({e.strerror}, errno {e.errno}); "
                           f"the listener rests {ACCEPT_BACKOFF} s and tries again")

    def read_head(self, fd: int, entry, hup: int = 0) -> None:
        """Read what the client sent and act on a whole head. `entry` is its `reading` row,
        [deadline, bytes so far, scanned], or None for a fresh connection: nothing read yet,
        not registered with epoll, no row (most connections never need one). `hup`: epoll
        reported a hang-up with this edge."""
        fresh = entry is None
        buf, scanned = (b"", 0) if fresh else (entry[1], entry[2])
        eof = False
        while True:
            want = MAX_HEAD + 1 - len(buf)
            try:
                chunk = os.read(fd, want)
            except BlockingIOError:
                break
            except OSError as e:
                self.close_on_error(fd, e)
                return
            if not chunk:
                eof = True  # the client shut its side; what it sent before still counts
                break
            buf += chunk
            if len(buf) > MAX_HEAD or (len(chunk) < want and not hup):
                # A short read drained the socket (no read just for EAGAIN): bytes or a
                # hang-up that come later bring a new edge (a fresh connection is registered
                # after this, and epoll then reports what came with it). A hang-up that came
                # with this edge is only seen by reading on to the EOF.
                break
        if buf:
            try:
                req, used = parse_request(buf, scanned)
            except HTTPError as err:
                self.refuse(fd, err)
                return
        else:
            req = used = None
        if req is None and eof:
            self.close(fd)  # gone before finishing its request
            return
        if req is None:
            scanned = used or 0
            if fresh:
                if not self.register(fd, EPOLL_CLIENT):
                    self.close(fd)
                    return
                self.reading[fd] = [time.monotonic() + self.header_timeout, buf, scanned]
            else:
                entry[1], entry[2] = buf, scanned
            return
        if not fresh:
            del self.reading[fd]
        # Bytes after the head (a body, a pipelined request) are not read by anyone: closing
        # over them would send a reset that can destroy the answer, so such an answer lingers.
        self.handle(fd, req, fresh, linger=len(buf) > used)
        if eof and self.state[fd].__class__ is bytes:
            self.close(fd)  # half-closed while it would wait: treated as gone

    def handle(self, fd: int, req: Request, fresh: bool, linger: bool = False) -> None:
        """Route one whole request: answer it now, or make the connection wait."""
        self.state[fd] = WRITING
        headers = req.headers
        if b"transfer-encoding" in headers or (b"content-length" in headers and not (
                headers[b"content-length"].isdigit() and
                len(headers[b"content-length"]) <= LENGTH_DIGITS)):
            # RFC 9112 6.3: a body whose length cannot be known is refused; nothing here
            # reads a body, so a chunked one could only be misread as the next request.
            self.refuse(fd, HTTPError(400, "invalid Content-Length, or a Transfer-Encoding: "
                                           "a poll has no body"))
            return
        if req.method != b"GET":
            if req.method == b"OPTIONS":
                allow = req.headers.get(b"access-control-request-headers", b"*")
                self.answer(fd, response_head(204, 0, TEXT, self.tail, (
                    b"Access-Control-Allow-Methods: GET, OPTIONS\r\n"
                    b"Access-Control-Allow-Headers: %s\r\nAccess-Control-Max-Age: 86400\r\n"
                    % allow)), linger)
                return
            self.refuse(fd, HTTPError(405, "only GET and OPTIONS are served"),
                        b"Allow: GET, OPTIONS\r\n")
            return
        path = req.path
        id_ = stream = None
        if path.find(b"/", 1) != -1:
            pass  # /a/b.js: not one of ours
        elif path.endswith(b".js"):
            id_, stream = path[1:-3], False
        elif path.endswith(b".sse"):
            id_, stream = path[1:-4], True
        if id_ is None:
            if path == b"/_info":
                self.answer(fd, response_head(200, len(self.info), JSON, self.tail) + self.info,
                            linger)
            else:
                self.refuse(fd, HTTPError(404, "not found: poll GET /<id>.js, stream "
                                               "GET /<id>.sse"))
            return
        if not 0 < len(id_) <= ID_MAX or id_.translate(None, ID_CHARS):
            self.refuse(fd, HTTPError(400, "invalid id: 1-128 bytes of [A-Za-z0-9_~-]"))
            return
        callback = cursor = None
        if req.query:
            callback, since = query_params(req.query)
            if stream:
                callback = None  # EventSource has no use for one
            elif callback is not None and CALLBACK_RE.fullmatch(callback) is None:
                self.refuse(fd, HTTPError(400, "invalid callback name"))
                return
            if since is not None:
                cursor = parse_cursor(since)
                if cursor is None:
                    self.refuse(fd, HTTPError(400, "invalid since: a message id <ms>-<seq>"))
                    return
        if stream and b"last-event-id" in headers:
            # EventSource sends it when it reconnects. A malformed one is ignored, not 400:
            # that would stop EventSource for good.
            last = parse_cursor(headers[b"last-event-id"])
            if last is not None:
                cursor = last
        if self.keys is not None:  # --subscriber-key-file: after every 400, before the 307
            err = signature_error(self.keys, id_, req.query, time.time())
            if err is not None:
                self.refuse(fd, err)
                return
        home = x31(id_) % self.slots
        if home != self.slot:
            try:
                node, home = divmod(home, self.workers)
                url = location(req, home, fd, self.public) if node == self.node else \
                    node_location(req, self.nodes[node], home, self.public.scheme)
            except HTTPError as err:
                self.refuse(fd, err)
                return
            except OSError:
                self.close(fd)
                return
            self.answer(fd, response_head(307, 0, TEXT, self.tail, b"Location: %s\r\n" % url),
                        linger)
            return
        if stream:
            self.open_stream(fd, id_, cursor, fresh)
            return
        store = self.store
        gap = False
        if cursor is None:
            msg = store.oldest_undelivered(id_)
        else:
            msg = store.after(id_, cursor)
            gap = store.gap(id_, cursor)
        if msg is not None:
            if self.answer(fd, self.message_response(msg.body, msg.mid, callback, gap), linger):
                self.count[DELIVERED] += 1
            store.delivered(msg)  # (answered before: a SIGKILL in between counts it lost)
            return
        if fresh and not self.register(fd, EPOLL_CLIENT):
            self.at_capacity(fd)
            return
        self.wait(fd, id_)
        if cursor is not None and self.cursors is not None:
            self.cursors[fd] = cursor
        if callback is not None:
            self.jsonp[fd] = callback
        if gap and self.cursors is None:  # (while the history comes late: see to_waiters)
            self.gapped.add(fd)
        if self.poll_timeout > 0:
            self.poll_deadlines[fd] = time.monotonic() + self.poll_timeout

    def at_capacity(self, fd: int) -> None:
        """Cannot wait without epoll; answered without a linger, which needs epoll too."""
        self.count[REJECTED] += 1
        body = b"server at capacity (epoll watch limit): try again later\n"
        self.answer(fd, response_head(503, len(body), TEXT, self.tail) + body)

    def wait(self, fd: int, id_: bytes) -> None:
        """Make fd wait on id_. Polls and streams together are --max-waiters per id: the
        oldest is pushed out to make room (a poll with 409, a stream with `event: replaced`)."""
        waiters = self.waiters
        w = waiters.get(id_)
        while w is not None and (1 if w.__class__ is int else len(w)) >= self.max_waiters:
            self.push_out(w if w.__class__ is int else w[0], id_)
            w = waiters.get(id_)
        if w is None:
            waiters[id_] = fd
        elif w.__class__ is int:
            waiters[id_] = [w, fd]
        else:
            w.append(fd)
        self.state[fd] = id_  # the same object as the key above when it is the first waiter
        self.count[WAITING] += 1

    def push_out(self, fd: int, id_: bytes) -> None:
        self.count[REJECTED] += 1
        if self.is_stream[fd]:
            self.end_stream(fd, sse_control(b"replaced", id_))
        else:
            body = b"pushed out: more than %d polls and streams wait on this id\n" % \
                self.max_waiters
            self.answer(fd, response_head(409, len(body), TEXT, self.tail) + body)

    def discard(self, fd: int) -> None:
        """Bytes from a client that has had its say (waiting, or being answered): read and
        drop them, GARBAGE_MAX in all. A hang-up closes the connection at once, but for an
        answer being flushed: a client may shut its side and still read (write errors and
        --write-timeout end it)."""
        total = self.garbage.get(fd, 0)
        while total <= GARBAGE_MAX:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                self.garbage[fd] = total
                return
            except OSError as e:
                self.close_on_error(fd, e)
                return
            if not chunk:
                if self.state[fd] != WRITING:
                    self.close(fd)
                return
            total += len(chunk)
        self.close(fd, CLOSED_FLOOD)  # a flood after its request: not a comet client

    # -- messages ----------------------------------------------------------------------------

    def message_response(self, message: bytes, mid: bytes, callback, gap: bool) -> bytes:
        extra = b"X-Message-Id: %s\r\nX-Message-Gap: 1\r\n" % mid if gap else \
            b"X-Message-Id: %s\r\n" % mid
        if callback is None:
            return response_head(200, len(message), TEXT, self.tail, extra) + message
        body = jsonp_body(callback, message, mid)
        return response_head(200, len(body), JS, self.tail, extra) + body

    def deliver(self, id_: bytes, key: int, mid: bytes, message: bytes) -> None:
        """A message for an id we own: kept in the id's history, and written to every poll
        and stream waiting on it (a stream that is behind reads it from history later)."""
        store = self.store
        now = time.monotonic()
        msg = store.append(id_, key, mid, message, now, trim=False)
        if msg is None:
            return  # kept already (a frame replayed twice)
        if id_ in self.waiters:
            sent = self.to_waiters(id_, key, mid, message, msg)
            if sent:
                store.delivered(msg)
                self.count[DELIVERED] += sent
        if self.count[QUEUED_BYTES] > store.max_bytes:
            store.trim(now)

    def to_waiters(self, id_: bytes, key: int, mid: bytes, message: bytes, msg,
                   plain=None) -> int:
        """Answer every poll waiting on id_, write to every stream; returns how many had it
        whole now (a stream that is behind counts it when written). `msg`: the kept Message,
        None for a broadcast. `plain`: the answer to a poll without callback or gap, when the
        caller has it (a broadcast makes it once for every id)."""
        w = self.waiters[id_]
        sent = 0
        event = None
        behind = self.cursors  # None but while a late history comes in (release)
        for fd in [w] if w.__class__ is int else list(w):
            late_gap = False
            if behind and fd in behind:
                cursor = behind[fd]
                if cursor >= key:
                    continue  # older than what this client has: it stays waiting
                # The first message above its cursor: the later ones are newer still. Its
                # gap is told now, against the history replayed so far (not at its arrival,
                # when nothing was).
                del behind[fd]
                late_gap = self.store.gap(id_, cursor)
            if self.is_stream[fd]:
                if event is None:
                    event = sse_event(mid, message)
                sent += self.stream_send(fd, sse_control(b"gap", cursor_text(cursor)) + event
                                         if late_gap else event, msg)
                continue
            callback = self.jsonp.get(fd) if self.jsonp else None
            gap = late_gap or (fd in self.gapped if self.gapped else False)
            if callback is None and not gap:
                if plain is None:
                    plain = self.message_response(message, mid, None, False)
                sent += self.answer(fd, plain)
            else:
                sent += self.answer(fd, self.message_response(message, mid, callback, gap))
        return sent

    def broadcast(self, key: int, mid: bytes, message: bytes) -> None:
        """To every poll and stream waiting at this moment; kept in no history (SPEC)."""
        count = self.count
        plain = self.message_response(message, mid, None, False)
        if not (self.jsonp or self.gapped or self.cursors or self.poll_deadlines or
                self.garbage):
            self.broadcast_plain(plain)
        for k, id_ in enumerate(list(self.waiters)):
            if id_ in self.waiters:  # (a stream pushed out above may have been its last)
                count[DELIVERED] += self.to_waiters(id_, key, mid, message, None, plain)
            if not k % BEAT_EVERY:  # 500,000 answers take seconds: still alive
                count[BEAT_NS] = time.monotonic_ns()

    def broadcast_plain(self, plain: bytes) -> None:
        """The common case of a broadcast, in one tight loop: each id with one waiting poll
        (no stream, no JSONP, no gap, no --poll-timeout deadline: the caller checked that the
        tables of those are empty) gets `plain` and is closed, with the bookkeeping of
        answer() and close() done once for all (what answer() does per answer is ~4 µs of
        Python against ~12 µs of kernel for the send and the close). What this cannot do
        whole (an error, EAGAIN) is left waiting for the general path after it; an answer
        written in part goes on as answer() would."""
        state, is_stream, size = self.state, self.is_stream, len(plain)
        write, close = os.write, os.close
        count = self.count
        gone, done, partial = [], 0, []
        beat = BEAT_EVERY
        for id_, fd in self.waiters.items():
            if fd.__class__ is not int or is_stream[fd]:
                continue
            try:
                n = write(fd, plain)
            except OSError:
                continue
            if n != size:
                partial.append((id_, fd, n))
                continue
            close(fd)
            state[fd] = None
            gone.append(id_)
            done += 1
            if done == beat:
                beat += BEAT_EVERY
                count[BEAT_NS] = time.monotonic_ns()
        waiters = self.waiters
        for id_ in gone:
            del waiters[id_]
        count[WAITING] -= done
        count[CONNECTIONS] -= done
        count[DELIVERED] += done + len(partial)
        for id_, fd, n in partial:
            self.forget_waiter(fd, id_)
            state[fd] = WRITING
            self.unfinished(fd, plain, n)

    # -- streams (Server-Sent Events) --------------------------------------------------------

    def open_stream(self, fd: int, id_: bytes, cursor, fresh: bool) -> None:
        """The stream's head, then what it missed: with a cursor the history after it (a gap
        first if there is one), without one the messages no client has had; either read from
        history as the socket drains. Then it waits with the polls."""
        if fresh and not self.register(fd, EPOLL_CLIENT):
            self.at_capacity(fd)
            return
        self.wait(fd, id_)
        if cursor is not None and self.cursors is not None:
            self.cursors[fd] = cursor
        self.is_stream[fd] = 1
        self.count[STREAMS] += 1
        # The listener corks every connection, for the FIN to ride on an answer's last
        # segment (make_listener); a stream's events go out as they are written.
        self.sockopt(fd, socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        store = self.store
        backlog = self.backlog[fd] = Backlog(cursor)
        backlog.out += self.sse_head
        if cursor is None:
            first = store.oldest_undelivered(id_)
            if first is not None:
                backlog.cursor = first.key - 1
                backlog.skip_until = store.histories[id_][-1].key
        elif self.cursors is None and store.gap(id_, cursor) and \
                not store.evicted_after(id_, cursor):
            backlog.out += sse_control(b"gap", cursor_text(cursor))  # (else replay_more does)
        backlog.replay = len(backlog.out)
        self.flush_stream(fd)

    def stream_send(self, fd: int, event: bytes, msg) -> bool:
        """Write an event to a stream; True if written whole now. A stream that is behind
        takes it into its backlog, or, while it replays history, skips a kept message (the
        replay reaches it). Past --sse-buffer of live bytes unsent the stream is closed: its
        EventSource comes back with Last-Event-ID and catches up from history."""
        backlog = self.backlog.get(fd) if self.backlog else None
        if backlog is None:
            try:
                n = os.write(fd, event)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self.close_on_error(fd, e)
                return False
            if n == len(event):
                if msg is not None:
                    self.store.delivered(msg)
                return True
            backlog = self.backlog[fd] = Backlog()
            backlog.add(memoryview(event)[n:], msg)
            backlog.live = len(backlog.out)
            self.arm(fd, backlog)
            return False
        if backlog.cursor is None:
            backlog.add(event, msg)
        elif msg is None:
            history = self.store.histories.get(self.state[fd])
            backlog.after.append((history[-1].key if history else -1, event))
        else:
            return False  # written, and counted, when the replay reaches it
        backlog.live += len(event)
        if backlog.live > self.sse_buffer:
            self.close(fd, CLOSED_SSE_BUFFER)
        return False

    def arm(self, fd: int, backlog: Backlog) -> None:
        """Ask for EPOLLOUT, and give the stream --write-timeout to make progress."""
        backlog.armed = True
        self.flushing[fd] = time.monotonic() + self.write_timeout
        self.watch(fd, EPOLL_CLIENT | select.EPOLLOUT)

    def flush_stream(self, fd: int) -> None:
        """Write a stream's backlog as far as the socket takes it, reading the replay from
        history as it goes; once all is written the stream is an idle waiter again."""
        backlog = self.backlog[fd]
        out, marks = backlog.out, backlog.marks
        while True:
            if not out and backlog.cursor is not None:
                self.replay_more(fd, backlog)
            if not out:
                break
            try:
                n = os.write(fd, out)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self.close_on_error(fd, e)
                return
            replayed = min(n, backlog.replay)
            backlog.replay -= replayed
            backlog.live -= n - replayed
            del out[:n]
            backlog.base += n
            while marks and marks[0][0] <= backlog.base:
                msg = marks.popleft()[1]
                self.count[DELIVERED] += 1
                if msg is not None:
                    self.store.delivered(msg)
            if out:
                if not backlog.armed:
                    self.arm(fd, backlog)
                elif n:  # progress: the deadline starts again (at the end: deadline order)
                    self.flushing.pop(fd, None)
                    self.flushing[fd] = time.monotonic() + self.write_timeout
                return
        del self.backlog[fd]
        if backlog.armed:
            self.flushing.pop(fd, None)
            self.watch(fd, EPOLL_CLIENT)

    def replay_more(self, fd: int, backlog: Backlog) -> None:
        """Put the next REPLAY_CHUNK of the id's history after the cursor in the backlog; at
        its end the replay is done, and what is left of the broadcasts held meanwhile
        follows. A broadcast held meanwhile goes right after the message that was the id's
        newest when it came; from then on it counts as replay."""
        id_, store, out, after = self.state[fd], self.store, backlog.out, backlog.after
        if store.evicted_after(id_, backlog.cursor) and backlog.skip_until < 0:
            # Messages after the cursor were evicted (before the stream opened, or while it
            # was behind): the gap event comes first.
            out += sse_control(b"gap", cursor_text(backlog.cursor))
        while len(out) < REPLAY_CHUNK:
            msg = store.after(id_, backlog.cursor)
            if msg is None:
                backlog.cursor = None  # caught up: now the broadcasts held meanwhile
                backlog.replay = len(out)
                for _, event in after:
                    backlog.add(event, None)  # live bytes, counted when they came
                backlog.after = []
                return
            backlog.cursor = msg.key
            if not (msg.delivered and msg.key <= backlog.skip_until):
                backlog.add(sse_event(msg.mid, msg.body), msg)
            while after and after[0][0] <= msg.key:
                event = after.pop(0)[1]
                backlog.add(event, None)
                backlog.live -= len(event)
        backlog.replay = len(out)

    def end_stream(self, fd: int, last: bytes) -> None:
        """Close a stream after its backlog and `last` are written (an answer, then closed);
        the messages in its backlog count as delivered as a poll's answer does."""
        backlog = self.backlog.get(fd) if self.backlog else None
        if backlog is None:
            self.answer(fd, last)
            return
        if self.answer(fd, bytes(backlog.out) + last):  # (forgets the backlog)
            for _, msg in backlog.marks:
                self.count[DELIVERED] += 1
                if msg is not None:
                    self.store.delivered(msg)

    def heartbeat(self) -> None:
        """A comment to every idle stream, one pass for all: no timer per stream (SPEC)."""
        k = 0
        for w in list(self.waiters.values()):
            for fd in [w] if w.__class__ is int else list(w):
                if self.is_stream[fd] and fd not in self.backlog:
                    try:
                        n = os.write(fd, HEARTBEAT)
                    except BlockingIOError:
                        n = len(HEARTBEAT)  # its buffer is full of what it has not read: no need
                    except OSError as e:
                        self.close_on_error(fd, e)
                        continue
                    if n < len(HEARTBEAT):  # ":" alone would make the next line a comment
                        backlog = self.backlog[fd] = Backlog()
                        backlog.out += HEARTBEAT[n:]
                        backlog.replay = len(backlog.out)
                        self.arm(fd, backlog)
                    k += 1
                    if not k % BEAT_EVERY:
                        self.count[BEAT_NS] = time.monotonic_ns()

    # -- draining (SIGTERM) ------------------------------------------------------------------

    def read_signals(self) -> None:
        """The bytes signal.set_wakeup_fd queued, one per signal caught: SIGTERM drains."""
        got = b""
        while True:
            try:
                chunk = os.read(self.wake_fd, 64)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
        if signal.SIGTERM in got:
            self.start_drain()

    def start_drain(self) -> None:
        """Stop taking connections; from now on each loop pass ends its share of the waiting
        ones (drain_pass) and the worker exits when none is left (drained). A second SIGTERM
        ends the rest at once."""
        now = time.monotonic()
        if self.draining:
            self.drain_end = now
            return
        self.draining = True
        self.drain_last, self.drain_end = now, now + self.drain
        # What the kernel queued before now came with its request (TCP_DEFER_ACCEPT): take it
        # all, to answer it, rather than leave it to be reset when the listener goes.
        while self.accept(until_eagain=True):
            self.count[BEAT_NS] = time.monotonic_ns()
        self.accept_paused_until = 0.0
        self.epoll.unregister(self.listen_fd)
        # shutdown(), not close(): the manager holds a copy of this socket, and shutdown stops
        # the socket behind every copy. New connects are refused at once (the SYN gets a
        # reset) instead of waiting in a backlog nobody accepts from, to be reset at exit.
        try:
            self.listener.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # not listening already

    def drain_pass(self, now: float) -> float:
        """One slice of the drain: end the share of the waiting connections that the time
        since the last slice is of the time left, all of them once --drain is over. Returns
        when the loop must pass again."""
        left = self.count[WAITING]
        if left:
            if now >= self.drain_end:
                share = left
            else:  # the fraction of a connection left over waits for the next slice
                self.drain_due += left * (now - self.drain_last) / (self.drain_end -
                                                                     self.drain_last)
                share = int(self.drain_due)
                self.drain_due -= share
            self.drain_last = now
            if share:
                self.end_waiting(share)
        if now >= self.drain_end:
            for fd in list(self.reading):  # no whole request in all this time: not answered
                self.close(fd)
        if self.count[WAITING]:
            return min(now + DRAIN_SLICE, self.drain_end)
        return max(now, self.drain_end) + DRAIN_FLUSH

    def end_waiting(self, share: int) -> None:
        """End the connections of the first `share` ids in waiting order: a poll gets `204`
        (as at --poll-timeout: it polls again), a stream is closed after what it was being
        sent (its EventSource reconnects with Last-Event-ID). Never a reset: nothing is
        left unread on a waiting connection but what discard() drops."""
        no_content = response_head(204, 0, TEXT, self.tail)
        waiters, count = self.waiters, self.count
        k = 0
        for id_ in list(islice(waiters, share)):
            w = waiters.get(id_)
            if w is None:
                continue
            for fd in [w] if w.__class__ is int else list(w):
                if self.is_stream[fd]:
                    self.end_stream(fd, b"")
                else:
                    self.answer(fd, no_content)
                k += 1
                if not k % BEAT_EVERY:
                    count[BEAT_NS] = time.monotonic_ns()

    def drained(self, now: float) -> bool:
        """Nothing left to answer or flush, or the last of the time is up."""
        return not self.count[CONNECTIONS] or now >= self.drain_end + DRAIN_FLUSH

    # -- the manager link --------------------------------------------------------------------

    def read_link(self) -> bool:
        """Read and act on link frames. False when the manager is gone."""
        for _ in range(LINK_READS_PER_TURN):
            try:
                n = os.readv(self.link_fd, (self.link_buf,))
            except BlockingIOError:
                self.link_hot = False
                return True
            except ConnectionResetError:
                return False
            if not n:
                return False
            chunk = bytes(self.link_view[:n])  # frames slice it: their ids and messages
            self.link_read += n
            self.handle_frames(self.link_in + chunk if self.link_in else chunk)
            self.count[BEAT_NS] = time.monotonic_ns()
            if n < LINK_READ_SIZE and not self.link_hup:
                # Drained: what the manager writes next comes with a new edge. Stopping here
                # saves the read that would only say EAGAIN, one per message when paced. (A
                # hang-up that came with this edge brings no other: it is read to the EOF.)
                self.link_hot = False
                return True
        self.link_hot = True
        return True

    def handle_frames(self, data: bytes) -> None:
        """Act on each whole frame, and acknowledge it in the page right after (link.py):
        the manager replays what a dead worker had not acknowledged."""
        count = self.count
        base = self.link_read - len(data)  # link offset of data[0]
        frames, used = link.decode(data)
        for kind, id_, message, ms, seq, end in frames:
            if kind == MSG:
                self.deliver(id_, ms << SEQ_BITS | seq, b"%d-%d" % (ms, seq), message)
            elif kind == BROADCAST:
                self.broadcast(ms << SEQ_BITS | seq, b"%d-%d" % (ms, seq), message)
            elif kind == READY:
                self.release(partial=ms == 1)
            else:  # CAUGHT_UP
                self.cursors = None
            count[LINK_DONE] = base + end
        self.link_in = data[used:]

    def release(self, partial: bool) -> None:
        """READY: start accepting (--hold). Connections that came meanwhile wait in the
        backlog; a draining worker has stopped listening for good. `partial`: the node's
        history will come late (Redis was unreachable), older than what cursors may say:
        until CAUGHT_UP, waiting cursors are kept (`cursors`) and messages at or below one
        are not sent to it (to_waiters)."""
        if self.held and not self.draining:
            self.epoll.modify(self.listen_fd, select.EPOLLIN)  # reported now if any wait
        self.held = False
        if partial and self.cursors is None:
            self.cursors = {}

    # -- timers ------------------------------------------------------------------------------

    def sweep(self, now: float) -> float:
        """Act on every deadline that has passed; return seconds until the next one.
        Each table is in deadline order, so only its head is ever looked at twice."""
        nxt = [now + self.beat_interval]
        if self.reading:
            for fd in due(self.reading, now, nxt):
                self.count[REJECTED] += 1
                # A slow or silent client: no answer, it sent no request.
                self.close(fd, CLOSED_HEADER_TIMEOUT)
        if self.poll_deadlines:
            for k, fd in enumerate(due(self.poll_deadlines, now, nxt)):
                if fd in self.poll_deadlines:
                    self.answer(fd, response_head(204, 0, TEXT, self.tail))
                if not k % BEAT_EVERY:  # a whole ramp's polls may time out in one pass
                    self.count[BEAT_NS] = time.monotonic_ns()
        if self.lingering:
            for fd in due(self.lingering, now, nxt):
                self.close(fd)
        if self.flushing:
            for fd in due(self.flushing, now, nxt):
                self.close(fd, CLOSED_WRITE_TIMEOUT)  # a client that does not read its answer
        kept = self.store.expire(now)
        if kept is not None:
            nxt.append(kept)
        if self.sse_heartbeat > 0 and self.count[STREAMS]:
            if now >= self.next_heartbeat:
                self.heartbeat()
                self.next_heartbeat = now + self.sse_heartbeat
            nxt.append(self.next_heartbeat)
        else:
            self.next_heartbeat = now + self.sse_heartbeat  # the first comes a period after
        if self.draining:
            nxt.append(self.drain_pass(now))
        if self.accept_paused_until:
            if self.accept_paused_until <= now:
                self.accept_paused_until = 0.0
                # reported on the next pass if connections wait in the backlog
                self.epoll.modify(self.listen_fd, select.EPOLLIN)
            else:
                nxt.append(self.accept_paused_until)
        return max(0.0, min(nxt) - now)

    # -- the event loop ----------------------------------------------------------------------

    def run(self) -> None:
        epoll = self.epoll
        state = self.state
        count = self.count
        listen_fd, link_fd, wake_fd = self.listen_fd, self.link_fd, self.wake_fd
        # Level-triggered, unlike every other fd here: see accept().
        epoll.register(listen_fd, 0 if self.held else select.EPOLLIN)
        epoll.register(link_fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        if wake_fd is not None:
            epoll.register(wake_fd, select.EPOLLIN | select.EPOLLET)
        timeout = 0
        while True:
            count[BEAT_NS] = time.monotonic_ns()  # the heartbeat the manager watches
            if self.reload_keys:  # SIGHUP (within a pass: the loop passes every beat_interval)
                self.reload_keys = False
                if self.key_file is not None:
                    self.load_keys()
            if self.link_hot:
                timeout = 0
            events = epoll.poll(timeout, 1024)
            link_ready = self.link_hot
            signalled = accept_ready = False
            for fd, ev in events:
                if fd == listen_fd:
                    accept_ready = True
                    continue
                if fd == link_fd:
                    link_ready = True
                    if ev & HANGUP:
                        self.link_hup = True
                    continue
                if fd == wake_fd:
                    signalled = True
                    continue
                s = state[fd]
                if s is None:
                    continue  # closed earlier in this batch
                if ev & select.EPOLLOUT:
                    if s == WRITING:
                        if fd in self.outbuf:
                            self.flush(fd)
                    elif self.backlog and fd in self.backlog:
                        self.flush_stream(fd)  # a stream that was behind
                    if state[fd] is None or not ev & ~select.EPOLLOUT:
                        continue
                if s == READING:
                    self.read_head(fd, self.reading[fd], ev & HANGUP)
                else:
                    self.discard(fd)
            # The link after the clients (a hang-up in this batch is seen before a message
            # for it), and accepts last (an fd closed above may be reused by accept).
            if link_ready and not self.read_link():
                return
            if signalled:
                self.read_signals()
            # (A drain that began above took the backlog and shut the listener down.)
            if accept_ready and not self.draining:
                self.accept()
            now = time.monotonic()
            # While draining, every pass: a second signal, a poll that starts waiting, change
            # what drain_pass must do now, and they are no deadlines.
            if now >= self.sweep_at or self.draining:
                self.sweep_at = now + min(self.sweep(now), self.sweep_every)
            timeout = max(0.0, self.sweep_at - now)
            if self.draining and self.drained(now):
                return


def due(table: dict, now: float, nxt: list) -> list:
    """The fds of `table` whose deadline has passed; the next deadline is added to `nxt`.
    A table holds one kind of timeout and is filled in time order, so it is in deadline
    order: the scan stops at the first one still running."""
    expired = []
    for fd, value in table.items():
        deadline = value if value.__class__ is float else value[0]
        if deadline > now:
            nxt.append(deadline)
            break
        expired.append(fd)
    return expired


def query_params(query: bytes):
    """(callback, since) from a poll's query; None for either that is absent. Other
    parameters are ignored (a cache-busting `_=`, say)."""
    callback = since = None
    for part in query.split(b"&"):
        if part.startswith(b"callback="):
            callback = part[9:]
        elif part.startswith(b"since="):
            since = part[6:]
    return callback, since


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Listening socket (created by the manager, used here) and command line
# ---------------------------------------------------------------------------------------------


def make_listener(host: str, port: int, backlog: int, keepalive: float) -> socket.socket:
    """The comet port. Accepted sockets inherit SO_KEEPALIVE and its timers from it (Linux
    copies them at accept), so no per-connection setsockopt is needed to reap dead peers.
    Bound to a loopback address it has no keepalive at all: see KEEPALIVE_PROBES.
    TCP_DEFER_ACCEPT (nginx's `deferred`) hands us a connection once its request has arrived:
    one wake-up and one read per connection instead of two; measured 27-33 -> 20-23 us of
    worker CPU per connection. A client silent for DEFER_ACCEPT seconds is handed over anyway
    and then meets --header-timeout.
    TCP_CORK, also inherited: every answer but a stream's is written and then closed at
    once, and a corked socket's close sends the answer's last segment with the FIN on it
    instead of one packet each (tcp_send_fin), so the client reads answer and end in one
    wake-up and both kernels handle a packet less; no syscall per connection. A stream
    uncorks itself when it opens (Worker.open_stream)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    if keepalive > 0 and not is_loopback(host):
        idle = max(1, int(keepalive))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 4))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "localhost") or \
        address.startswith("::ffff:127.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="MegaComet worker. Started by manager.py, which passes the listening "
                    f"socket as fd {LISTEN_FD}, the manager link as fd {LINK_FD} and the shared "
                    f"page as fd {PAGE_FD}.")
    p.add_argument("--worker", type=options.non_negative_int, required=True,
                   help="this worker's number n")
    p.add_argument("--workers", type=options.positive_int, required=True,
                   help="number of workers W")
    p.add_argument("--base-port", type=options.port, default=8000)
    p.add_argument("--queue-ttl", type=options.positive_float, default=60.0)
    p.add_argument("--queue-max", type=options.positive_int, default=100)
    p.add_argument("--queue-bytes", type=options.positive_int, default=64 * 1024 * 1024)
    p.add_argument("--poll-timeout", type=options.non_negative, default=0.0)
    p.add_argument("--max-waiters", type=options.positive_int, default=4)
    p.add_argument("--sse-heartbeat", type=options.non_negative, default=30.0)
    p.add_argument("--sse-buffer", type=options.positive_int, default=256 * 1024)
    p.add_argument("--header-timeout", type=options.positive_float, default=10.0)
    p.add_argument("--write-timeout", type=options.positive_float, default=30.0)
    p.add_argument("--worker-timeout", type=options.positive_float, default=10.0)
    p.add_argument("--cors-origin", type=options.header_value, default="*")
    p.add_argument("--public-scheme", choices=("http", "https"), default="http")
    p.add_argument("--public-base-port", type=options.port, default=None)
    p.add_argument("--trusted-proxy", type=options.networks, default=())
    p.add_argument("--subscriber-key-file", default=None,
                   help="polls and streams must be signed by a key of this file (SIGHUP: read "
                        "it again)")
    p.add_argument("--drain", type=options.non_negative, default=2.0,
                   help="SIGTERM: seconds over which waiting connections are ended")
    p.add_argument("--node", type=options.node_of, default=(0, 1),
                   help="K/N: this worker's node of N (several boxes on Redis)")
    p.add_argument("--nodes", type=options.host_list, default=(),
                   help="HOST:BASE of every node, in order (with --node)")
    p.add_argument("--hold", action="store_true",
                   help="accept connections only from the manager's READY frame on")
    p.add_argument("--listen-fd", type=options.non_negative_int, default=LISTEN_FD)
    p.add_argument("--link-fd", type=options.non_negative_int, default=LINK_FD)
    p.add_argument("--page-fd", type=options.non_negative_int, default=PAGE_FD)
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    if len(opts.nodes) not in (0, opts.node[1]) or any(p is None for _, p in opts.nodes):
        log(f"worker {opts.worker}: --nodes needs HOST:BASE for each of the --node N nodes")
        return EXIT_BOOT_ERROR
    # Ctrl-C reaches the whole process group; the manager decides when workers go.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        listener = socket.socket(fileno=opts.listen_fd)
        listener.setblocking(False)
        os.set_blocking(opts.link_fd, False)
        page = mmap.mmap(opts.page_fd, mmap.PAGESIZE)
        os.close(opts.page_fd)  # the mapping stays
    except (OSError, ValueError) as e:
        log(f"worker {opts.worker}: cannot use the inherited sockets and page ({e}); "
            "server.py is started by manager.py")
        return EXIT_BOOT_ERROR
    # SIGTERM drains (Worker.start_drain). The handler does nothing: set_wakeup_fd queues the
    # signal's number on a pipe the loop watches, so the loop does the work.
    wake, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    worker = Worker(opts, listener, opts.link_fd, page, wake)

    def on_hup(signum, frame):  # only a flag: the loop reads the key file (Worker.run)
        worker.reload_keys = True

    # The manager starts us with SIGHUP blocked, so that one sent before this line (a reload
    # while we boot) waits instead of killing us; the keys were just read, one more read is
    # harmless.
    signal.signal(signal.SIGHUP, on_hup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
