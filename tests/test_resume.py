"""Version 2, end to end over real sockets: message ids, the history and its cursor, and
Server-Sent Events (SPEC "Message ids", "History and the cursor", "Server-Sent Events").

Each test names the SPEC sentence it holds the server to. Helpers for polls and the app port
come from test_comet.py / test_app.py; the ones here are for what only version 2 has: the
message id a publish is given, and an SSE client that reads a stream event by event."""

import json
import os
import select
import signal
import socket
import time

import pytest
from test_app import Lines, accepted, app_connect, frame
from test_comet import (
    MID_RE,
    answer,
    app_http,
    exchange,
    hold,
    id_for,
    ids_for,
    parse,
    poll_now,
    read_all,
    start_poll,
    still_waiting,
    totals,
    wait_total,
    wait_until,
    wait_waiting,
)
from test_manager import alive, info_ok, worker_pids

import manager as manager_py

EXPOSE = "X-Message-Id, X-Message-Gap"
MAX = 2**64 - 1
RETRY = b"retry: 2000\n\n"

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def publish(m, id_: str, message: bytes) -> str:
    """POST /send/<id>; the mid of the 202 (checked to be exactly {"ok": true, "mid"})."""
    head = f"POST /send/{id_} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(message)}\r\n\r\n"
    status, _, body = app_http(m, head.encode() + message)
    assert status == 202, body
    reply = json.loads(body)
    assert reply == accepted(), reply
    return reply["mid"]


def publish_kept(m, id_: str, *messages: bytes) -> list:
    """Publish each message, then wait until the worker holds them all (no eviction)."""
    before = totals(m)["queued_messages"]
    mids = [publish(m, id_, msg) for msg in messages]
    wait_total(m, "queued_messages", before + len(messages))
    return mids


def broadcast_mid(m, message: bytes) -> str:
    head = f"POST /broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: {len(message)}\r\n\r\n"
    status, _, body = app_http(m, head.encode() + message)
    assert status == 202, body
    reply = json.loads(body)
    assert reply == accepted(), reply
    return reply["mid"]


def key(mid: str) -> tuple:
    """A message id as SPEC compares it: the pair (ms, seq)."""
    assert MID_RE.fullmatch(mid), mid
    ms, seq = mid.split("-")
    return int(ms), int(seq)


def since(mid: str) -> str:
    return f"?since={mid}"


def got(reply, body: bytes, mid: str, gap: bool = False) -> None:
    """A poll's parsed answer is `200 body` with X-Message-Id mid, and X-Message-Gap: 1 exactly
    when `gap`."""
    status, _, headers, data = reply
    assert (status, data) == (200, body), (status, headers, data)
    assert headers["x-message-id"] == mid
    if gap:
        assert headers.get("x-message-gap") == "1", headers
    else:
        assert "x-message-gap" not in headers, headers


def event(mid: str, *pieces: bytes) -> bytes:
    """One SSE message event as SPEC writes it."""
    return b"id: %s\n" % mid.encode() + b"".join(b"data: %s\n" % p for p in pieces) + b"\n"


def control(name: str, data: str) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), data.encode())


class Stream:
    """An SSE client on a raw socket: GET /<id>.sse, then the bytes read as they come."""

    def __init__(self, m, id_: str, query: str = "", extra: str = "", port: int | None = None,
                 rcvbuf: int | None = None):
        self.port = port if port is not None else m.port_for(id_)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect: it sets the window the peer sees
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(5)
        s.connect(("127.0.0.1", self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"GET /{id_}.sse{query} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                  f"{extra}\r\n".encode())
        self.s = s
        self.buf = b""
        self.eof = False

    def more(self, deadline: float) -> bool:
        """One read into buf; False at EOF. AssertionError past the deadline."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; have {self.buf[-400:]!r}")
        self.s.settimeout(left)
        try:
            chunk = self.s.recv(65536)
        except TimeoutError:
            raise AssertionError(f"timed out; have {self.buf[-400:]!r}") from None
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def head(self, timeout: float = 3.0):
        """(status, head lines, headers with lower-case names); the body stays in buf."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if not self.more(deadline):
                raise AssertionError(f"closed before a whole head: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon and name.lower() not in headers, line
            headers[name.lower()] = value.strip()
        return int(lines[0].split()[1]), lines, headers

    def opened(self) -> "Stream":
        """The 200 head and the retry line: the stream is waiting on its id."""
        status, _, headers = self.head()
        assert status == 200, (status, headers, self.buf)
        assert headers["content-type"] == "text/event-stream"
        self.expect(RETRY)
        return self

    def expect(self, data: bytes, timeout: float = 3.0) -> None:
        """The next bytes are exactly `data`."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < len(data) and self.buf == data[:len(self.buf)]:
            if not self.more(deadline):
                break
        assert self.buf[:len(data)] == data, (self.buf[:len(data) + 200], data)
        self.buf = self.buf[len(data):]

    def block(self, timeout: float = 3.0) -> bytes:
        """The next event (up to and with its blank line)."""
        deadline = time.monotonic() + timeout
        while b"\n\n" not in self.buf:
            if not self.more(deadline):
                raise AssertionError(f"closed in the middle of an event: {self.buf!r}")
        block, _, self.buf = self.buf.partition(b"\n\n")
        return block + b"\n\n"

    def rest(self, timeout: float = 3.0) -> bytes:
        """Everything until the server closes."""
        deadline = time.monotonic() + timeout
        while self.more(deadline):
            pass
        data, self.buf = self.buf, b""
        return data

    def quiet(self, for_s: float = 0.3) -> bool:
        """Nothing (no byte, no close) arrives within for_s, and nothing is left unread."""
        r, _, _ = select.select([self.s], [], [], for_s)
        return not r and not self.buf

    def close(self) -> None:
        self.s.close()


def overflow_count(size: int) -> int:
    """How many messages of `size` bytes overflow the kernel's buffers of one connection with
    2 MiB to spare: the server's send buffer grows up to tcp_wmem's maximum (4 MiB by
    default) on its own, so only past that do bytes stay in the worker."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            most = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        most = 4 * 1024 * 1024
    return max(100, (most + 2 * 1024 * 1024) // size + 1)


def parse_events(data: bytes) -> list:
    """Whole events of a stream body as (kind, id or None, data lines); an event cut short by
    the close is left out, as EventSource leaves it."""
    out = []
    for block in data.split(b"\n\n")[:-1]:
        fields = {"id": None, "event": "message", "data": []}
        for line in block.split(b"\n"):
            name, _, value = line.partition(b": ")
            if name == b"data":
                fields["data"].append(value)
            elif name in (b"id", b"event", b"retry"):
                fields[name.decode()] = value.decode()
        if "retry" not in fields:
            out.append((fields["event"], fields["id"], fields["data"]))
    return out


# ---------------------------------------------------------------------------------------------
# Message ids
# ---------------------------------------------------------------------------------------------


def test_ids_are_ms_seq_and_strictly_increasing_on_all_three_protocols(manager):
    """`<ms>-<seq>`, the manager's wall clock; JSON lines and HTTP replies carry the mid, a
    binary frame gets no reply and its poll sees X-Message-Id; strictly increasing across
    protocols and ids."""
    m = manager
    id0, id1 = id_for(0, "mi"), id_for(1, "mi")
    t0 = time.time_ns() // 1_000_000
    c = Lines(m)
    sequence = []  # (protocol, mid or None) in the order the manager accepted them
    try:
        with app_connect(m) as binary:
            for r in range(3):
                reply = c.ask({"id": id1, "message": f"j{r}"})
                assert reply == accepted()
                sequence.append(("json", reply["mid"]))
                sequence.append(("http", publish(m, id0, b"h%d" % r)))
                binary.sendall(frame(id0, b"b%d" % r))
                wait_total(m, "queued_messages", 3 * (r + 1))  # taken before the next one
                sequence.append(("binary", None))
            assert still_waiting(binary, 0.2)  # binary frames have no reply
    finally:
        c.close()
    t1 = time.time_ns() // 1_000_000
    # Walk id0's history with the cursor: it holds h0 b0 h1 b1 h2 b2, each with its id.
    walked = []
    cursor = "0-0"
    for _ in range(6):
        status, _, headers, body = poll_now(m.port_for(id0), id0, since(cursor))
        assert status == 200
        cursor = headers["x-message-id"]
        walked.append((body, cursor))
    assert [b for b, _ in walked] == [b"h0", b"b0", b"h1", b"b1", b"h2", b"b2"]
    # The HTTP replies' mids are the ids the polls see.
    assert [mid for p, mid in sequence if p == "http"] == [mid for _, mid in walked[0::2]]
    mids = []
    walked_binary = iter(mid for _, mid in walked[1::2])
    for p, mid in sequence:
        mids.append(next(walked_binary) if p == "binary" else mid)
    keys = [key(mid) for mid in mids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), mids  # strictly increasing
    for ms, _ in keys:
        assert t0 <= ms <= t1, (t0, ms, t1)
    # seq counts from 0 within a millisecond (every publish of this manager is ours).
    assert keys[0][1] == 0
    for (ms0, seq0), (ms1, seq1) in zip(keys, keys[1:], strict=False):
        assert seq1 == (seq0 + 1 if ms1 == ms0 else 0), keys


def test_message_ids_seq_counts_within_a_millisecond_and_never_goes_back(monkeypatch):
    """seq counts from 0 within one ms; if the clock steps back, the last ms is kept and seq
    counts on (Redis's rule), so ids stay strictly increasing."""
    clock = [1_700_000_000_000_000_000]  # ns
    monkeypatch.setattr(manager_py.time, "time_ns", lambda: clock[0])
    ids = manager_py.MessageIds()
    assert [ids.next() for _ in range(3)] == [(1_700_000_000_000, 0), (1_700_000_000_000, 1),
                                            (1_700_000_000_000, 2)]
    clock[0] += 1_000_000
    assert ids.next() == (1_700_000_000_001, 0)
    clock[0] -= 5_000_000_000  # the clock steps back 5 s
    assert [ids.next() for _ in range(2)] == [(1_700_000_000_001, 1), (1_700_000_000_001, 2)]
    clock[0] += 5_000_000_000 + 1_000_000  # and catches up past the last ms
    assert ids.next() == (1_700_000_000_002, 0)


def test_an_ids_line_is_one_message_with_one_id(manager):
    m = manager
    a0, a1 = ids_for(0, 2, "il")
    b = id_for(1, "il")
    waiting = hold(m, a0)
    c = Lines(m)
    try:
        reply = c.ask({"ids": [a0, a1, b], "message": "one for all"})
    finally:
        c.close()
    assert reply == accepted()
    mid = reply["mid"]
    got(answer(waiting), b"one for all", mid)
    wait_total(m, "undelivered", 2)
    got(poll_now(m.port_for(a1), a1), b"one for all", mid)
    got(poll_now(m.port_for(b), b), b"one for all", mid)


def test_a_broadcast_has_one_id_at_every_receiver(manager):
    """Polls on both workers (one JSONP) and a stream see the same X-Message-Id / id:, the mid
    of the reply, for a broadcast sent over HTTP and one over JSON lines."""
    m = manager
    a, b, c_id = id_for(0, "bc"), id_for(1, "bc"), id_for(1, "bcs")
    stream = Stream(m, c_id).opened()
    pa = hold(m, a, n_before=1)
    pb = hold(m, b, "?callback=f", n_before=2)
    mid = broadcast_mid(m, b"to all")
    got(answer(pa), b"to all", mid)
    status, _, headers, body = answer(pb)
    assert (status, headers["x-message-id"]) == (200, mid)
    assert body == b'f("to all", "%s");' % mid.encode()
    stream.expect(event(mid, b"to all"))
    pa = hold(m, a, n_before=1)
    lines = Lines(m)
    try:
        reply = lines.ask({"broadcast": True, "message": "again"})
    finally:
        lines.close()
    assert reply == accepted()
    assert key(reply["mid"]) > key(mid)
    got(answer(pa), b"again", reply["mid"])
    stream.expect(event(reply["mid"], b"again"))
    stream.close()


def test_ids_compare_as_pairs_of_integers(manager):
    """Compare ids as the pair (ms, seq): seq 10 comes after seq 9 (not as text), a cursor of
    the ms before with the largest seq comes before every id of the next ms, and leading zeros
    change nothing."""
    m = manager
    id_ = id_for(0, "cmp")
    n = 99
    # The worker's start comes first (a cursor older than it is a gap): it has had a message.
    (first,) = publish_kept(m, id_, b"first")
    time.sleep(0.005)
    with app_connect(m) as a:  # in one write: many ids share a millisecond
        a.sendall(b"".join(frame(id_, b"m%03d" % i) for i in range(n)))
        wait_total(m, "queued_messages", n + 1)
    port = m.port_for(id_)
    cursor, mids = first, []
    for i in range(n):
        status, _, headers, body = poll_now(port, id_, since(cursor))
        assert (status, body) == (200, b"m%03d" % i), (cursor, status, body)
        cursor = headers["x-message-id"]
        mids.append(cursor)
    keys = [key(x) for x in mids]
    assert keys == sorted(keys) and len(set(keys)) == n
    assert max(seq for _, seq in keys) >= 10, f"no seq past 9 to compare: {mids}"
    s = start_poll(port, id_, since(mids[-1]))  # after the newest: waits
    assert still_waiting(s, 0.2)
    s.close()
    ms0, seq0 = keys[0]
    got(poll_now(port, id_, f"?since={ms0 - 1}-{MAX}"), b"m000", mids[0])
    got(poll_now(port, id_, f"?since=000{ms0}-000{seq0}"), b"m001", mids[1])


def test_expose_headers_on_every_comet_response(manager_factory):
    """Access-Control-Expose-Headers: X-Message-Id, X-Message-Gap on every comet response:
    200 (plain, JSONP), 204 (--poll-timeout, OPTIONS), 307 (.js and .sse), 400, 404, 405,
    409, 431, /_info and the SSE head."""
    m = manager_factory("--poll-timeout", "0.4", "--max-waiters", "1")
    id0, id1 = id_for(0, "ex"), id_for(1, "ex")
    port = m.port_for(id0)
    publish_kept(m, id0, b"one", b"two")
    heads = {}
    heads["200"] = poll_now(port, id0)[2]
    heads["200 jsonp"] = poll_now(port, id0, "?callback=cb")[2]
    timed_out = start_poll(port, id0)
    heads["204 poll-timeout"] = answer(timed_out)[2]
    first = hold(m, id0)
    second = start_poll(port, id0)
    heads["409"] = answer(first)[2]
    second.close()
    heads["307 js"] = poll_now(port, id1)[2]
    heads["307 sse"] = exchange(port, f"GET /{id1}.sse HTTP/1.1\r\nHost: h\r\n\r\n")[2]
    heads["400 since"] = poll_now(port, id0, "?since=x")[2]
    heads["400 sse since"] = exchange(port, f"GET /{id0}.sse?since=1- HTTP/1.1\r\n\r\n")[2]
    heads["404"] = exchange(port, "GET /favicon.ico HTTP/1.1\r\nHost: h\r\n\r\n")[2]
    heads["405"] = exchange(port, f"DELETE /{id0}.js HTTP/1.1\r\nHost: h\r\n\r\n")[2]
    heads["431"] = exchange(port, b"GET /a0.js HTTP/1.1\r\nX: " + b"x" * 9000 + b"\r\n\r\n")[2]
    heads["204 options"] = exchange(port, f"OPTIONS /{id0}.sse HTTP/1.1\r\n\r\n")[2]
    heads["_info"] = exchange(port, "GET /_info HTTP/1.1\r\nHost: h\r\n\r\n")[2]
    stream = Stream(m, id0)
    heads["sse"] = stream.head()[2]
    stream.close()
    statuses = {k: h.get("access-control-expose-headers") for k, h in heads.items()}
    assert statuses == {k: EXPOSE for k in heads}
    assert "x-message-id" in heads["200"] and "x-message-id" in heads["200 jsonp"]


def test_jsonp_carries_the_id_as_second_argument(manager):
    m = manager
    id_ = id_for(1, "jp")
    port = m.port_for(id_)
    (m1,) = publish_kept(m, id_, b"queued \xc3\xa9")
    status, _, headers, body = poll_now(port, id_, "?callback=cb")
    assert (status, headers["x-message-id"]) == (200, m1)
    assert headers["content-type"] == "application/javascript"
    assert body == b'cb("queued \\u00e9", "%s");' % m1.encode()
    s = hold(m, id_, f"?callback=a.b&since={m1}")
    m2 = publish(m, id_, b'say "hi"')
    status, _, headers, body = answer(s)
    assert (status, headers["x-message-id"]) == (200, m2)
    assert body == b'a.b("say \\"hi\\"", "%s");' % m2.encode()
    # with a cursor, answered at once from history
    status, _, headers, body = poll_now(port, id_, "?since=0-0&callback=z")
    assert body == b'z("queued \\u00e9", "%s");' % m1.encode()


MALFORMED_CURSORS = ["abc", "1-", "-1", "1-2-3", "18446744073709551616-0",
                     "0-18446744073709551616", "", "1", "-", "1.5-0", "0x1-0", "+1-0", "1-+0",
                     "1--2", "1_0", "9" * 30 + "-0"]


def test_malformed_since_is_400_on_polls_and_streams(manager):
    """A cursor is exactly <digits>-<digits>, each part below 2^64: anything else in `since`
    is 400, on a poll and on a stream, and nothing waits."""
    m = manager
    id_ = id_for(0, "bad")
    port = m.port_for(id_)
    for value in MALFORMED_CURSORS:
        for path in (f"/{id_}.js", f"/{id_}.sse"):
            status, _, headers, body = exchange(
                port, f"GET {path}?since={value} HTTP/1.1\r\nHost: h\r\n\r\n")
            assert status == 400, (path, value, status, body)
            assert headers["connection"] == "close"
            assert headers["access-control-expose-headers"] == EXPOSE
    t = totals(m)
    assert (t["waiting"], t["streams"]) == (0, 0)


def test_a_cursor_with_thousands_of_leading_zeros_is_a_cursor(manager):
    """<digits>-<digits> below 2^64 each, however many leading zeros (a head fits 8 KiB): a
    valid cursor, as since and as Last-Event-ID; no worker may die of one (Python's int()
    refuses strings of over 4,300 digits)."""
    m = manager
    id_ = id_for(0, "zeros")
    port = m.port_for(id_)
    m1, m2 = publish_kept(m, id_, b"m1", b"m2")
    pids = [w["pid"] for w in m.stats()["workers"]]
    ms, seq = m1.split("-")
    padded = ["0" * 5000 + f"{ms}-{seq}", f"{ms}-" + "0" * 5000 + seq]
    with start_poll(port, id_, f"?since={padded[0]}") as s:
        try:
            data = read_all(s)
        except ConnectionResetError:
            data = b""
    time.sleep(0.1)
    stats = m.stats()
    assert [w["pid"] for w in stats["workers"]] == pids, f"the worker died; read {data!r}"
    assert stats["totals"]["restarts"] == 0
    got(parse(data), b"m2", m2)
    got(poll_now(port, id_, f"?since={padded[1]}"), b"m2", m2)
    stream = Stream(m, id_, extra=f"Last-Event-ID: {padded[0]}\r\n").opened()
    stream.expect(event(m2, b"m2"))
    stream.close()
    assert [w["pid"] for w in m.stats()["workers"]] == pids


def test_largest_cursor_and_a_cursor_newer_than_every_message_wait(manager):
    """Each part up to 2^64 - 1 is a valid cursor; a since newer than every message waits."""
    m = manager
    id_ = id_for(1, "new")
    (m1,) = publish_kept(m, id_, b"old")
    ms, _ = key(m1)
    socks = [hold(m, id_, f"?since={MAX}-{MAX}"),
             hold(m, id_, f"?since={ms + 10**9}-0", n_before=1),
             hold(m, id_, f"?since={m1}", n_before=2)]
    for s in socks:
        assert still_waiting(s, 0.1)
    stream = Stream(m, id_, f"?since={MAX}-{MAX}").opened()
    assert stream.quiet(0.2)
    for s in socks:
        s.close()
    stream.close()


# ---------------------------------------------------------------------------------------------
# History and the cursor
# ---------------------------------------------------------------------------------------------


def test_poll_without_cursor_is_version_1(manager):
    """GET /<id>.js without a cursor: the oldest message not yet delivered, else wait; one a
    cursor poll had is skipped."""
    m = manager
    id_ = id_for(0, "v1")
    port = m.port_for(id_)
    m1, m2, m3 = publish_kept(m, id_, b"m1", b"m2", b"m3")
    got(poll_now(port, id_, "?since=0-0"), b"m1", m1)  # delivered to a cursor poll
    got(poll_now(port, id_), b"m2", m2)
    got(poll_now(port, id_), b"m3", m3)
    wait_total(m, "undelivered", 0)
    assert totals(m)["queued_messages"] == 3
    s = hold(m, id_)
    assert still_waiting(s, 0.2)
    m4 = publish(m, id_, b"m4")
    got(answer(s), b"m4", m4)


def test_since_gets_the_oldest_after_the_cursor_delivered_or_not_and_waits(manager):
    m = manager
    id_ = id_for(1, "since")
    port = m.port_for(id_)
    m1, m2, m3 = publish_kept(m, id_, b"m1", b"m2", b"m3")
    got(poll_now(port, id_), b"m1", m1)  # m1 delivered, m2 and m3 not
    got(poll_now(port, id_, "?since=0-0"), b"m1", m1)  # 0-0: from the start of what is kept
    got(poll_now(port, id_, since(m1)), b"m2", m2)
    got(poll_now(port, id_, since(m1)), b"m2", m2)  # again: a cursor poll reads, not pops
    got(poll_now(port, id_, since(m2)), b"m3", m3)
    s = hold(m, id_, since(m3))
    assert still_waiting(s, 0.2)
    m4 = publish(m, id_, b"m4")
    got(answer(s), b"m4", m4)
    got(poll_now(port, id_, since(m3)), b"m4", m4)


def test_two_tabs_on_one_id_the_one_between_polls_catches_up(manager):
    """Every tab that passes the id of the last message it saw gets every message, even one
    published while it was between two polls."""
    m = manager
    id_ = id_for(0, "tabs")
    port = m.port_for(id_)
    tab_a = hold(m, id_, "?since=0-0")
    tab_b = hold(m, id_, "?since=0-0", n_before=1)
    m1 = publish(m, id_, b"m1")
    got(answer(tab_a), b"m1", m1)
    got(answer(tab_b), b"m1", m1)
    tab_a = hold(m, id_, since(m1))  # tab B is between polls
    m2 = publish(m, id_, b"m2")
    got(answer(tab_a), b"m2", m2)
    got(poll_now(port, id_, since(m1)), b"m2", m2)  # tab B comes back: m2 at once, no gap
    tab_a = hold(m, id_, since(m2))
    tab_b = hold(m, id_, since(m2), n_before=1)
    v1_tab = hold(m, id_, n_before=2)  # a version-1 poll has nothing undelivered: waits too
    assert still_waiting(tab_b, 0.1)
    m3 = publish(m, id_, b"m3")
    for s in (tab_a, tab_b, v1_tab):
        got(answer(s), b"m3", m3)


def test_gap_after_per_id_cap_eviction_above_the_cursor(manager_factory):
    """X-Message-Gap: 1 when a message above the cursor was evicted by --queue-max; evicting
    the cursor's own message is no gap."""
    m = manager_factory("--queue-max", "2")
    id_ = id_for(1, "cap")
    port = m.port_for(id_)
    m1, m2, m3, m4 = [publish(m, id_, b"m%d" % i) for i in range(1, 5)]
    wait_total(m, "dropped", 2)
    got(poll_now(port, id_), b"m3", m3)  # no cursor: no gap header, ever
    got(poll_now(port, id_, since(m1)), b"m3", m3, gap=True)  # m2 is gone
    got(poll_now(port, id_, since(m2)), b"m3", m3)  # only m2 itself is gone
    got(poll_now(port, id_, since(m3)), b"m4", m4)
    s = hold(m, id_, since(m4))
    m5 = publish(m, id_, b"m5")  # evicts m3, below the cursor
    got(answer(s), b"m5", m5)
    wait_total(m, "dropped", 3)
    got(poll_now(port, id_, since(m2)), b"m4", m4, gap=True)  # m3 is gone now
    got(poll_now(port, id_, since(m3)), b"m4", m4)


def test_gap_after_ttl_eviction(manager_factory):
    """X-Message-Gap: 1 when a message above the cursor expired, also on a poll that waited
    for the next message; none for the cursor whose own message expired."""
    m = manager_factory("--queue-ttl", "0.5")
    id_ = id_for(0, "ttl")
    port = m.port_for(id_)
    m1, m2 = publish_kept(m, id_, b"m1", b"m2")
    got(poll_now(port, id_, since(m1)), b"m2", m2)  # a normal cursor poll: no gap
    wait_total(m, "expired", 2, timeout=3)
    behind = hold(m, id_, since(m1))  # m2 expired: waits, and may have missed something
    current = hold(m, id_, since(m2), n_before=1)
    m3 = publish(m, id_, b"m3")
    got(answer(behind), b"m3", m3, gap=True)
    got(answer(current), b"m3", m3)
    got(poll_now(port, id_, since(m1)), b"m3", m3, gap=True)
    got(poll_now(port, id_, since(m2)), b"m3", m3)


def test_gap_after_queue_bytes_eviction(manager_factory):
    """--queue-bytes evicts the worker's oldest messages; a cursor below an evicted one gets
    the gap, the cursor of the evicted one itself does not."""
    m = manager_factory("--queue-bytes", "300")
    a, b = ids_for(0, 2, "qb")
    port = m.port_for(a)
    # One at a time: the manager's outbox for the worker is bounded by --queue-bytes too.
    (a0,) = publish_kept(m, a, b"0" * 10)
    (a1,) = publish_kept(m, a, b"1" * 100)
    (a2,) = publish_kept(m, a, b"2" * 100)
    b1 = publish(m, b, b"b" * 150)  # 360 bytes: a0, then a1 go
    wait_total(m, "dropped", 2)
    t = totals(m)
    assert (t["queued_messages"], t["queued_bytes"], t["dropped_undelivered"]) == (2, 250, 2)
    got(poll_now(port, a, since(a0)), b"2" * 100, a2, gap=True)
    got(poll_now(port, a, since(a1)), b"2" * 100, a2)
    got(poll_now(port, b, "?since=0-0"), b"b" * 150, b1)


def test_restart_gap_for_a_cursor_older_than_the_worker(manager):
    """A cursor older than the worker's start (not 0-0) gets X-Message-Gap: 1 after a SIGKILL
    restart; 0-0 does not, nor a cursor on the worker that did not restart; a message held
    for the restarting worker keeps its id; a stream gets `event: gap` first."""
    m = manager
    id0, id1 = id_for(0, "rs"), id_for(1, "rs")
    c0, c1 = publish(m, id0, b"before0"), publish(m, id1, b"before1")
    wait_total(m, "queued_messages", 2)
    got(poll_now(m.port_for(id0), id0), b"before0", c0)
    got(poll_now(m.port_for(id1), id1), b"before1", c1)
    time.sleep(0.01)  # the worker's start is in a later millisecond than c0
    old = worker_pids(m)[0]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not alive(old), timeout=2, interval=0.005, what="worker 0 dead")
    held = publish(m, id0, b"held")  # for a dead worker: held by the manager
    wait_until(lambda: worker_pids(m)[0] not in (None, old) and info_ok(m.base_port),
               timeout=5, interval=0.01, what="worker 0 back")
    wait_total(m, "queued_messages", 2)  # before1 on worker 1, held on the new worker 0
    port = m.port_for(id0)
    got(poll_now(port, id0, since(c0)), b"held", held, gap=True)
    got(poll_now(port, id0, "?since=0-0"), b"held", held)  # 0-0: no restart gap
    s = hold(m, id0, since(held))
    after = publish(m, id0, b"after")
    got(answer(s), b"after", after)
    s = hold(m, id1, since(c1))  # worker 1 did not restart: no gap
    other = publish(m, id1, b"other")
    got(answer(s), b"other", other)
    stream = Stream(m, id0, extra=f"Last-Event-ID: {c0}\r\n").opened()
    stream.expect(control("gap", c0) + event(held, b"held") + event(after, b"after"))
    assert stream.quiet(0.1)
    stream.close()
    stream = Stream(m, id0, since(held)).opened()
    stream.expect(event(after, b"after"))  # a cursor from after the start: no gap
    stream.close()


def test_cursor_polls_and_streams_mark_messages_delivered(manager):
    """A message answered to a cursor poll (at once or after waiting) or written to a stream
    (live or replayed) counts as delivered for later polls without a cursor."""
    m = manager
    id_ = id_for(1, "dl")
    port = m.port_for(id_)

    def v1_waits():
        s = hold(m, id_)  # (times out if it is answered)
        ok = still_waiting(s, 0.1)
        s.close()
        wait_waiting(m, 0)
        return ok

    (m1,) = publish_kept(m, id_, b"m1")
    assert totals(m)["undelivered"] == 1
    got(poll_now(port, id_, "?since=0-0"), b"m1", m1)
    wait_total(m, "undelivered", 0)  # (the worker counts it right after the answer)
    assert v1_waits()
    s = hold(m, id_, since(m1))
    m2 = publish(m, id_, b"m2")
    got(answer(s), b"m2", m2)
    wait_waiting(m, 0)
    wait_total(m, "undelivered", 0)  # (counted right after the answer's close)
    assert v1_waits()
    stream = Stream(m, id_, since(m2)).opened()
    m3 = publish(m, id_, b"m3")
    stream.expect(event(m3, b"m3"))
    stream.close()
    wait_waiting(m, 0)
    assert totals(m)["undelivered"] == 0
    assert v1_waits()
    (m4,) = publish_kept(m, id_, b"m4")
    assert totals(m)["undelivered"] == 1
    stream = Stream(m, id_, since(m3)).opened()
    stream.expect(event(m4, b"m4"))
    stream.close()
    wait_waiting(m, 0)
    assert totals(m)["undelivered"] == 0
    assert v1_waits()


def test_evictions_are_counted_delivered_or_not(manager_factory):
    """`dropped` (bounds) and `expired` (TTL) count every evicted message, delivered or not;
    the _undelivered parts only the ones no client had; queued_* count the whole history."""
    m = manager_factory("--queue-max", "1")
    id_ = id_for(0, "cnt")
    (m1,) = publish_kept(m, id_, b"m1")
    got(poll_now(m.port_for(id_), id_), b"m1", m1)
    publish(m, id_, b"m2")
    wait_total(m, "dropped", 1)
    t = totals(m)
    assert (t["dropped_undelivered"], t["queued_messages"], t["undelivered"]) == (0, 1, 1)
    publish(m, id_, b"m3")
    wait_total(m, "dropped", 2)
    assert totals(m)["dropped_undelivered"] == 1

    m = manager_factory("--queue-ttl", "0.5")
    id_ = id_for(1, "cnt")
    (m1,) = publish_kept(m, id_, b"first")
    got(poll_now(m.port_for(id_), id_), b"first", m1)
    publish_kept(m, id_, b"second")
    t = totals(m)
    assert (t["queued_messages"], t["queued_bytes"], t["undelivered"]) == (2, 11, 1)
    wait_total(m, "expired", 2, timeout=3)
    t = totals(m)
    assert (t["expired_undelivered"], t["queued_messages"], t["queued_bytes"],
            t["undelivered"], t["dropped"]) == (1, 0, 0, 0, 0)


def test_broadcasts_are_not_kept_in_history(manager):
    """A broadcast reaches the connections waiting at that moment; a tab between polls misses
    it, cursor or not."""
    m = manager
    id_ = id_for(1, "bk")
    port = m.port_for(id_)
    (m1,) = publish_kept(m, id_, b"m1")
    got(poll_now(port, id_), b"m1", m1)
    tab_a = hold(m, id_, since(m1))
    bmid = broadcast_mid(m, b"news")
    got(answer(tab_a), b"news", bmid)
    assert totals(m)["queued_messages"] == 1
    tab_b = hold(m, id_, since(m1))  # tab B, between polls then, does not get it
    assert still_waiting(tab_b, 0.2)
    tab_c = start_poll(port, id_, "?since=0-0")  # nor does a read of the whole history
    got(answer(tab_c), b"m1", m1)
    m2 = publish(m, id_, b"m2")
    got(answer(tab_b), b"m2", m2)
    stream = Stream(m, id_, "?since=0-0").opened()  # nor a stream's replay
    stream.expect(event(m1, b"m1") + event(m2, b"m2"))
    assert stream.quiet(0.15)
    stream.close()


# ---------------------------------------------------------------------------------------------
# Server-Sent Events
# ---------------------------------------------------------------------------------------------


def test_sse_head_is_exact_and_the_body_starts_with_retry(manager_factory):
    m = manager_factory("--cors-origin", "https://app.example")
    id_ = id_for(0, "head")
    stream = Stream(m, id_)
    status, lines, headers = stream.head()
    assert lines[0] == "HTTP/1.1 200 OK"
    assert set(headers) == {"content-type", "cache-control", "access-control-allow-origin",
                            "access-control-expose-headers", "x-accel-buffering", "connection"}
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-store"
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-expose-headers"] == EXPOSE
    assert headers["x-accel-buffering"] == "no"
    assert headers["connection"] == "close"
    stream.expect(RETRY)
    assert stream.quiet(0.2)
    t = totals(m)
    assert (t["streams"], t["waiting"]) == (1, 1)
    stream.close()  # the client going is noticed at once
    wait_total(m, "streams", 0, timeout=2)
    wait_total(m, "connections", 0)
    assert totals(m)["waiting"] == 0


SSE_CASES = [
    (b"plain", [b"plain"]),
    (b"a\n", [b"a", b""]),
    (b"", [b""]),
    (b"x\r\ny\rz\nw", [b"x", b"y", b"z", b"w"]),
    (b"\r\n\n\r", [b"", b"", b"", b""]),
    (b"trailing\r", [b"trailing", b""]),
    (b"\nlead", [b"", b"lead"]),
    (b"caf\xc3\xa9 \xff\xfe end", ["caf\u00e9 \ufffd\ufffd end".encode()]),
    (b"\xe2\x82", ["\ufffd".encode()]),
    (b"data: x\r\n\r\nid: 9-9", [b"data: x", b"", b"id: 9-9"]),
]


def test_sse_event_format(manager):
    """`id: <mid>`, one `data: ` line per piece of the message split at every CRLF, CR and LF
    (the empty message one `data: `), invalid UTF-8 replaced, a blank line: live, and the
    same when replayed from history."""
    m = manager
    id_ = id_for(1, "fmt")
    live = Stream(m, id_, "?since=0-0").opened()
    expected = b""
    for message, pieces in SSE_CASES:
        mid = publish(m, id_, message)
        e = event(mid, *pieces)
        live.expect(e)
        expected += e
    assert live.quiet(0.1)
    live.close()
    replay = Stream(m, id_, "?since=0-0").opened()
    replay.expect(expected)
    assert replay.quiet(0.1)
    replay.close()


def test_sse_stream_stays_open_and_a_poll_and_a_stream_share_a_message(manager):
    m = manager
    id_ = id_for(0, "open")
    stream = Stream(m, id_).opened()
    poll = hold(m, id_, n_before=1)
    m1 = publish(m, id_, b"m1")
    got(answer(poll), b"m1", m1)
    stream.expect(event(m1, b"m1"))
    mids = [publish(m, id_, b"m%d" % i) for i in (2, 3, 4)]
    stream.expect(b"".join(event(mid, b"m%d" % i) for i, mid in zip((2, 3, 4), mids, strict=True)))
    poll = hold(m, id_, n_before=1)
    m5 = publish(m, id_, b"m5")
    got(answer(poll), b"m5", m5)
    stream.expect(event(m5, b"m5"))
    assert stream.quiet(0.1)
    t = totals(m)
    assert (t["streams"], t["waiting"], t["undelivered"]) == (1, 1, 0)
    stream.close()


def test_sse_last_event_id_replays_and_wins_over_since(manager):
    m = manager
    id_ = id_for(1, "lei")
    m1, m2, m3 = publish_kept(m, id_, b"m1", b"m2", b"m3")
    stream = Stream(m, id_, extra=f"Last-Event-ID: {m1}\r\n").opened()
    stream.expect(event(m2, b"m2") + event(m3, b"m3"))
    m4 = publish(m, id_, b"m4")
    stream.expect(event(m4, b"m4"))  # then live, on the same stream
    stream.close()
    stream = Stream(m, id_, "?since=0-0", f"Last-Event-ID: {m3}\r\n").opened()
    stream.expect(event(m4, b"m4"))
    assert stream.quiet(0.15)
    stream.close()


def test_sse_last_event_id_0_0_replays_everything_kept(manager):
    """`0-0` means "from the start of what is kept", as Last-Event-ID too."""
    m = manager
    id_ = id_for(0, "lz")
    m1, m2 = publish_kept(m, id_, b"m1", b"m2")
    got(poll_now(m.port_for(id_), id_), b"m1", m1)  # delivered: not in a no-cursor stream
    stream = Stream(m, id_, extra="Last-Event-ID: 0-0\r\n").opened()
    stream.expect(event(m1, b"m1") + event(m2, b"m2"))
    stream.close()


@pytest.mark.parametrize("bad", ["garbage", "1-", "18446744073709551616-0", "", "1-2-3"])
def test_sse_malformed_last_event_id_is_ignored(manager, bad):
    """No 400 (it would stop EventSource for good): the cursor falls back to ?since=, or to
    none (the undelivered messages)."""
    m = manager
    id_ = id_for(1, "mle")
    port = m.port_for(id_)
    m1, m2, m3 = publish_kept(m, id_, b"m1", b"m2", b"m3")
    got(poll_now(port, id_), b"m1", m1)
    got(poll_now(port, id_), b"m2", m2)  # m3 alone is undelivered
    stream = Stream(m, id_, extra=f"Last-Event-ID: {bad}\r\n").opened()
    stream.expect(event(m3, b"m3"))  # no cursor: what no client had
    assert stream.quiet(0.1)
    stream.close()
    stream = Stream(m, id_, since(m1), f"Last-Event-ID: {bad}\r\n").opened()
    stream.expect(event(m2, b"m2") + event(m3, b"m3"))  # the ?since= cursor
    assert stream.quiet(0.1)
    stream.close()


def test_sse_since_replays_the_history_after_it(manager):
    m = manager
    id_ = id_for(0, "ss")
    port = m.port_for(id_)
    m1, m2, m3 = publish_kept(m, id_, b"m1", b"m2", b"m3")
    for mid, body in ((m1, b"m1"), (m2, b"m2"), (m3, b"m3")):
        got(poll_now(port, id_), body, mid)  # delivered or not, all kept
    stream = Stream(m, id_, since(m1)).opened()
    stream.expect(event(m2, b"m2") + event(m3, b"m3"))
    assert stream.quiet(0.1)
    m4 = publish(m, id_, b"m4")
    stream.expect(event(m4, b"m4"))
    stream.close()


def test_a_repeated_since_takes_the_last_and_a_stream_ignores_callback(manager):
    """Choices the README states: of `since` given twice the last counts; a stream has no use
    for `callback` and ignores it, even one a poll would refuse (400)."""
    m = manager
    id_ = id_for(1, "rep")
    port = m.port_for(id_)
    m1, m2 = publish_kept(m, id_, b"m1", b"m2")
    got(poll_now(port, id_, f"?since=0-0&since={m1}"), b"m2", m2)
    got(poll_now(port, id_, f"?since={m1}&since=0-0"), b"m1", m1)
    assert poll_now(port, id_, "?callback=a(b)")[0] == 400
    stream = Stream(m, id_, f"?callback=a(b)&since={m1}").opened()
    stream.expect(event(m2, b"m2"))
    stream.close()


def test_sse_without_cursor_first_gets_the_undelivered_messages(manager):
    m = manager
    id_ = id_for(1, "und")
    port = m.port_for(id_)
    (m1,) = publish_kept(m, id_, b"m1")
    got(poll_now(port, id_), b"m1", m1)
    m2, m3 = publish_kept(m, id_, b"m2", b"m3")
    stream = Stream(m, id_).opened()
    stream.expect(event(m2, b"m2") + event(m3, b"m3"))
    assert stream.quiet(0.1)
    assert totals(m)["undelivered"] == 0
    poll = hold(m, id_, n_before=1)  # the stream had them: a version-1 poll waits
    assert still_waiting(poll, 0.1)
    m4 = publish(m, id_, b"m4")
    stream.expect(event(m4, b"m4"))
    got(answer(poll), b"m4", m4)
    stream.close()


def test_sse_gap_is_sent_first(manager_factory):
    """`event: gap` with `data: <cursor>` before the replay when messages after the cursor were
    evicted; none when only the cursor's own message was."""
    m = manager_factory("--queue-max", "2")
    id_ = id_for(0, "sg")
    m1, m2, m3, m4 = [publish(m, id_, b"m%d" % i) for i in range(1, 5)]
    wait_total(m, "dropped", 2)
    stream = Stream(m, id_, since(m1)).opened()
    stream.expect(control("gap", m1) + event(m3, b"m3") + event(m4, b"m4"))
    assert stream.quiet(0.1)
    stream.close()
    stream = Stream(m, id_, extra=f"Last-Event-ID: {m1}\r\n").opened()
    stream.expect(control("gap", m1) + event(m3, b"m3") + event(m4, b"m4"))
    stream.close()
    stream = Stream(m, id_, extra=f"Last-Event-ID: {m2}\r\n").opened()
    stream.expect(event(m3, b"m3") + event(m4, b"m4"))
    assert stream.quiet(0.1)
    stream.close()


def test_sse_heartbeat_comments_idle_streams(manager_factory):
    m = manager_factory("--sse-heartbeat", "0.3")
    id_ = id_for(1, "hb")
    stream = Stream(m, id_).opened()
    poll = hold(m, id_for(0, "hbp"), n_before=1)
    stream.expect(b":\n", timeout=2)
    t0 = time.monotonic()
    stream.expect(b":\n", timeout=2)
    t1 = time.monotonic()
    stream.expect(b":\n", timeout=2)
    t2 = time.monotonic()
    assert 0.15 <= t1 - t0 <= 0.8 and 0.15 <= t2 - t1 <= 0.8, (t1 - t0, t2 - t1)
    mid = publish(m, id_, b"between")
    deadline = time.monotonic() + 2
    while stream.buf.startswith(b":\n") or len(stream.buf) < 2:
        if stream.buf.startswith(b":\n"):
            stream.buf = stream.buf[2:]
        else:
            stream.more(deadline)
    stream.expect(event(mid, b"between"))
    assert still_waiting(poll, 0.05)  # polls get no comment
    stream.close()
    poll.close()


def test_sse_heartbeat_0_is_off(manager_factory):
    m = manager_factory("--sse-heartbeat", "0")
    id_ = id_for(0, "hb0")
    stream = Stream(m, id_).opened()
    assert stream.quiet(0.7)
    stream.close()


def test_fifth_waiter_pushes_the_oldest_out_poll_or_stream(manager):
    """Polls and streams together are the 4 waiters of an id: the 5th pushes the oldest out,
    a poll with 409, a stream with `event: replaced` / `data: <id>` and a close."""
    m = manager
    id_ = id_for(1, "mw")
    s1 = Stream(m, id_).opened()
    polls = [hold(m, id_, n_before=1 + i) for i in range(3)]
    s2 = Stream(m, id_).opened()
    s1.expect(control("replaced", id_))
    assert s1.rest() == b""  # closed
    wait_waiting(m, 4)
    assert totals(m)["streams"] == 1
    p4 = start_poll(m.port_for(id_), id_)
    status, _, headers, _ = answer(polls[0])
    assert status == 409 and headers["access-control-expose-headers"] == EXPOSE
    wait_waiting(m, 4)
    mid = publish(m, id_, b"to the four")
    for p in polls[1:] + [p4]:
        got(answer(p), b"to the four", mid)
    s2.expect(event(mid, b"to the four"))
    assert s2.quiet(0.1)
    s2.close()


def test_max_waiters_1(manager_factory):
    m = manager_factory("--max-waiters", "1")
    id_ = id_for(0, "one")
    p1 = hold(m, id_)
    p2 = start_poll(m.port_for(id_), id_)
    assert answer(p1)[0] == 409
    wait_waiting(m, 1)
    s1 = Stream(m, id_).opened()
    assert answer(p2)[0] == 409  # a stream pushes a poll out
    s2 = Stream(m, id_).opened()
    s1.expect(control("replaced", id_))
    assert s1.rest() == b""
    p3 = start_poll(m.port_for(id_), id_)
    s2.expect(control("replaced", id_))  # a poll pushes a stream out
    assert s2.rest() == b""
    wait_total(m, "streams", 0)
    mid = publish(m, id_, b"last one")
    got(answer(p3), b"last one", mid)


def test_a_stream_that_does_not_read_is_closed_and_catches_up_from_history(manager_factory):
    """More than --sse-buffer of live messages unsent: the stream is closed (counted in
    closed_sse_buffer), a stream and a poll on other ids are unaffected, and the client
    coming back with Last-Event-ID gets the rest from history, in order, once."""
    n, size = overflow_count(60_000), 60_000  # 100 with the default tcp_wmem
    m = manager_factory("--sse-buffer", "65536", "--queue-max", str(n))
    slow_id, fast_id, poll_id = ids_for(0, 3, "sb")
    slow = Stream(m, slow_id, rcvbuf=4096)
    assert slow.head()[0] == 200  # then it reads nothing more
    fast = Stream(m, fast_id).opened()
    poll = hold(m, poll_id, n_before=2)
    bodies = [b"%04d:" % i + b"x" * (size - 5) for i in range(n)]
    with app_connect(m) as a:
        a.sendall(b"".join(frame(slow_id, body) for body in bodies))
        wait_total(m, "closed_sse_buffer", 1)
    t = totals(m)
    assert (t["streams"], t["waiting"]) == (1, 2)
    mid = publish(m, fast_id, b"fast")
    fast.expect(event(mid, b"fast"))
    mid = publish(m, poll_id, b"poll")
    got(answer(poll), b"poll", mid)
    assert fast.quiet(0.05)
    # What the closed stream had, whole events only, then the rest with Last-Event-ID.
    data = slow.rest(timeout=5)
    assert data.startswith(RETRY)
    events = parse_events(data)
    k = len(events)
    assert 0 <= k < n
    assert [e[2] for e in events] == [[b] for b in bodies[:k]]
    last = events[-1][1] if events else "0-0"
    back = Stream(m, slow_id, extra=f"Last-Event-ID: {last}\r\n").opened()
    more = []
    while len(more) < n - k:
        more.extend(parse_events(back.block(timeout=5)))
    assert [e[0] for e in more] == ["message"] * (n - k)  # no gap: all was kept
    assert [e[2] for e in more] == [[b] for b in bodies[k:]]
    ids = [key(e[1]) for e in events + more]
    assert ids == sorted(ids) and len(set(ids)) == n
    assert back.quiet(0.1)
    back.close()
    fast.close()
    assert totals(m)["closed_sse_buffer"] == 1


def test_messages_a_closed_stream_never_wrote_stay_undelivered(manager_factory):
    """Only a message written to a stream counts as delivered: those still in the worker's
    buffer of a stream closed for --sse-buffer never reached it, so a poll without a cursor
    (or a stream without one) still gets them."""
    n, size = overflow_count(16_000), 16_000  # a few fit in --sse-buffer
    m = manager_factory("--sse-buffer", "65536", "--queue-max", str(n))
    id_ = id_for(1, "unw")
    slow = Stream(m, id_, rcvbuf=4096)
    assert slow.head()[0] == 200
    bodies = [b"%04d:" % i + b"u" * (size - 5) for i in range(n)]
    with app_connect(m) as a:
        a.sendall(b"".join(frame(id_, body) for body in bodies))
        wait_total(m, "closed_sse_buffer", 1)
        wait_total(m, "queued_messages", n)
    data = slow.rest(timeout=5)
    k = len(parse_events(data))  # whole events; message k may have been written in part
    undelivered = totals(m)["undelivered"]
    status, _, _, body = poll_now(m.port_for(id_), id_)
    assert status == 200
    partial = len(data.rpartition(b"\n\n")[2])
    assert undelivered >= n - k - 1 and int(body[:4]) <= k + 1, \
        f"the client got {k} whole events (and {partial} bytes of the next); undelivered " \
        f"{undelivered} of {n}, a poll without a cursor gets message {body[:4]!r}"


def test_poll_timeout_does_not_end_streams(manager_factory):
    m = manager_factory("--poll-timeout", "0.3")
    id_ = id_for(1, "pts")
    stream = Stream(m, id_).opened()
    t0 = time.monotonic()
    poll = start_poll(m.port_for(id_), id_)
    assert answer(poll)[0] == 204
    assert time.monotonic() - t0 < 1.5
    assert stream.quiet(0.4)  # 0.7 s open: no 204, no close
    assert totals(m)["streams"] == 1
    mid = publish(m, id_, b"still open")
    stream.expect(event(mid, b"still open"))
    stream.close()


def test_sse_on_another_workers_port_is_the_same_307(manager):
    m = manager
    id_ = id_for(1, "redir")
    other = m.base_port  # worker 0's port
    raw = f"GET /{id_}.sse?since=1-0 HTTP/1.1\r\nHost: localhost:{other}\r\n" \
          "Last-Event-ID: 2-0\r\n\r\n"
    status, lines, headers, body = exchange(other, raw)
    assert lines[0].startswith("HTTP/1.1 307")
    assert headers["location"] == f"http://localhost:{m.port_for(id_)}/{id_}.sse?since=1-0"
    assert (headers["content-length"], headers["connection"], body) == ("0", "close", b"")
    assert headers["access-control-expose-headers"] == EXPOSE
    assert totals(m)["streams"] == 0


def test_a_replay_larger_than_the_socket_buffers_arrives_whole_and_once(manager_factory):
    """A replay is written as the socket drains and does not count against --sse-buffer: 100
    messages of 60 KB to a client that reads slowly arrive whole and in order; messages
    published (and a broadcast) during the replay are written once, the stream stays open."""
    n, size = overflow_count(60_000), 60_000  # 100 with the default tcp_wmem
    m = manager_factory("--queue-max", str(n + 10), "--sse-buffer", "65536")
    id_ = id_for(0, "big")
    bodies = [b"%04d:" % i + bytes([65 + i % 26]) * (size - 5) for i in range(n + 5)]
    with app_connect(m) as a:
        a.sendall(b"".join(frame(id_, body) for body in bodies[:n]))
        wait_total(m, "queued_messages", n, timeout=10)
        stream = Stream(m, id_, "?since=0-0", rcvbuf=16384).opened()
        data, stream.buf = bytearray(stream.buf), b""
        published = False
        seen = 0  # blank lines (event ends) in data
        deadline = time.monotonic() + 20
        while seen < n + 6:
            if not published and len(data) > 100_000:
                a.sendall(b"".join(frame(id_, body) for body in bodies[n:]))
                bmid = broadcast_mid(m, b"during the replay")
                published = True
            stream.s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = stream.s.recv(8192)
            assert chunk, f"closed after {len(data)} bytes"
            seen += (data[-1:] + chunk).count(b"\n\n")
            data += chunk
            time.sleep(0.0002)  # slowly
    events = parse_events(bytes(data))
    messages = [e for e in events if e[2] != [b"during the replay"]]
    assert [e[0] for e in events] == ["message"] * (n + 6)  # no gap, no replaced
    assert [e[2] for e in messages] == [[b] for b in bodies]
    ids = [key(e[1]) for e in messages]
    assert ids == sorted(ids) and len(set(ids)) == n + 5
    assert [e[1] for e in events].count(bmid) == 1
    assert stream.quiet(0.1)
    t = totals(m)
    assert (t["closed_sse_buffer"], t["streams"], t["undelivered"]) == (0, 1, 0)
    mid = publish(m, id_, b"live again")
    stream.expect(event(mid, b"live again"))
    stream.close()
