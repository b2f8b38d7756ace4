"""Streams that are behind: replays read from history in chunks and in linear time, ids that
never go back, delivery counted for what a pushed-out stream was written, a stalled stream
closed after --write-timeout. Each test reproduces a bug found in review of the SSE change."""

import socket
import time

import test_reliability
from test_app import app_connect, frame
from test_comet import start_poll, totals, wait_total, wait_until
from test_resume import key, parse_events

import link
import server

thread_worker = test_reliability.thread_worker  # the fixture: a real Worker in a thread

BIG = b"x" * 60000  # 100 of them are far more than a 4 KiB socket buffer takes

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def open_stream(port: int, id_: str, query: str = "", rcvbuf: int | None = None):
    """GET /<id>.sse on a raw socket; with rcvbuf, a small receive window so it falls behind."""
    s = socket.socket()
    if rcvbuf is not None:  # before connect: it sets the window the server sees
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET /{id_}.sse{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s


def read_until(s: socket.socket, done, timeout: float = 10.0) -> bytes:
    """What s receives until done(received) holds, the peer closes, or timeout passes."""
    s.settimeout(0.2)
    buf = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not done(buf):
        try:
            chunk = s.recv(1 << 20)
        except TimeoutError:
            continue
        if not chunk:
            break
        buf += chunk
    return buf


def link_broadcast(tw, message: bytes) -> None:
    """A broadcast as the manager sends it to the worker."""
    tw.link.sendall(link.encode(link.BROADCAST, b"", message, *tw.ids.next()))


def shrink_stream_sndbuf(tw, size: int = 4096) -> None:
    """Shrink the send buffer of the worker's end of its one stream, so the stream falls behind
    in the worker rather than in the kernel."""
    fd = next(fd for fd, is_stream in enumerate(tw.worker.is_stream) if is_stream)
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    finally:
        sock.detach()  # the fd stays the worker's


def backlog_bytes(tw) -> list:
    """The bytes in each stream backlog of the worker."""
    return [len(b.out) for b in list(tw.worker.backlog.values())]


def replaying(tw) -> bool:
    """The worker's one stream is behind and still replaying history."""
    backlogs = list(tw.worker.backlog.values())
    return len(backlogs) == 1 and backlogs[0].cursor is not None


def stream_events(response: bytes) -> list:
    """The whole events after a stream's head, as (kind, id or None, data lines)."""
    return parse_events(response.partition(b"\r\n\r\n")[2])


# ---------------------------------------------------------------------------------------------
# A stream without a cursor
# ---------------------------------------------------------------------------------------------


def test_no_cursor_stream_backlog_is_bounded(thread_worker):
    """A stream without a cursor reads the undelivered messages from history in chunks."""
    tw = thread_worker("--queue-max", "200")
    for _ in range(100):
        tw.send(b"u", BIG)
    wait_until(lambda: tw.count("queued_messages") == 100)
    socks = [open_stream(tw.port, "u", rcvbuf=4096) for _ in range(3)]
    wait_until(lambda: tw.count("streams") == 3)
    time.sleep(0.3)
    sizes = backlog_bytes(tw)
    # as a replay from a cursor: REPLAY_CHUNK and at most one message more
    assert sizes and max(sizes) <= server.REPLAY_CHUNK + 70000, sizes
    for s in socks:
        s.close()


# ---------------------------------------------------------------------------------------------
# Replay time
# ---------------------------------------------------------------------------------------------


def test_replay_is_not_quadratic(thread_worker):
    """A replay from a cursor takes about as long as one without: linear in --queue-max."""
    n = 20000
    tw = thread_worker("--queue-max", str(n), "--worker-timeout", "1000")
    for _ in range(n):
        tw.send(b"q", b"m")
    wait_until(lambda: tw.count("queued_messages") == n, 20)
    t0 = time.monotonic()
    s = open_stream(tw.port, "q")  # no cursor
    read_until(s, lambda b: b.count(b"id: ") >= n, 60)
    t_linear = time.monotonic() - t0
    t0 = time.monotonic()
    s2 = open_stream(tw.port, "q", "?since=0-0")  # a cursor: store.after() per message
    body = read_until(s2, lambda b: b.count(b"id: ") >= n, 120)
    t_cursor = time.monotonic() - t0
    assert body.count(b"id: ") == n
    assert t_cursor < 5 * t_linear + 0.5, f"no cursor {t_linear:.2f} s, since=0-0 {t_cursor:.2f} s"
    s.close()
    s2.close()


def test_one_replay_does_not_get_the_worker_killed(manager_factory):
    """A since=0-0 replay of 20,000 messages takes under 2 s, with the default --worker-timeout."""
    n = 20000
    m = manager_factory("--queue-max", str(n), workers=1)
    a = app_connect(m)
    a.sendall(b"".join(frame("q", b"m") for _ in range(n)))
    wait_total(m, "queued_messages", n, 20)
    s = open_stream(m.port_for("q"), "q", "?since=0-0")
    t0 = time.monotonic()
    time.sleep(0.3)
    other = start_poll(m.port_for("zz"), "zz")  # the worker still serves others meanwhile
    a.sendall(frame("zz", b"hello"))
    assert b"hello" in read_until(other, lambda b: b"hello" in b, 40)
    body = read_until(s, lambda b: b.count(b"id: ") >= n, 40)
    assert body.count(b"id: ") == n
    assert totals(m)["restarts"] == 0
    assert time.monotonic() - t0 < 2
    for sock in (a, s, other):
        sock.close()


# ---------------------------------------------------------------------------------------------
# Order and delivery
# ---------------------------------------------------------------------------------------------


def test_ids_on_a_stream_never_go_back(thread_worker):
    """A broadcast during a replay goes after the messages older than it: ids never go back."""
    tw = thread_worker("--queue-max", "200", "--sse-buffer", str(64 << 20))
    for i in range(100):
        tw.send(b"r", b"%d:" % i + BIG)
    wait_until(lambda: tw.count("queued_messages") == 100)
    s = open_stream(tw.port, "r", "?since=0-0", rcvbuf=4096)
    wait_until(lambda: tw.count("streams") == 1)
    time.sleep(0.2)
    assert replaying(tw)
    link_broadcast(tw, b"BROADCAST")
    tw.send(b"r", b"after-broadcast")
    wait_until(lambda: tw.count("queued_messages") == 101)  # the worker has taken both
    assert replaying(tw)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # now the rest can come fast
    body = read_until(s, lambda b: b"BROADCAST" in b and b"after-broadcast" in b, 20)
    events = stream_events(body)
    ids = [key(mid) for _, mid, _ in events if mid is not None]
    assert ids == sorted(ids), [b"".join(data)[:20] for _, _, data in events][-4:]
    s.close()


def test_pushed_out_stream_backlog_counts_delivered(thread_worker):
    """The backlog a pushed-out stream is written before `replaced` counts as delivered."""
    tw = thread_worker("--max-waiters", "1", "--sse-buffer", str(64 << 20))
    s = open_stream(tw.port, "p", rcvbuf=4096)
    wait_until(lambda: tw.count("streams") == 1)
    shrink_stream_sndbuf(tw)
    for i in range(60):
        tw.send(b"p", b"%d:" % i + BIG)
    wait_until(lambda: tw.count("queued_messages") == 60)
    wait_until(lambda: tw.worker.backlog)
    time.sleep(0.3)
    # a poll with a cursor in the future takes the one waiter's place (--max-waiters 1)
    p = start_poll(tw.port, "p", "?since=99999999999999-0")
    body = read_until(s, lambda b: b"event: replaced" in b, 20)
    got = [mid for _, mid, _ in stream_events(body) if mid is not None]
    assert len(got) == 60 and b"event: replaced" in body
    time.sleep(0.3)
    assert tw.count("undelivered") == 0
    assert tw.count("delivered") == 60
    s.close()
    p.close()


def test_stalled_replay_is_not_held_forever(thread_worker):
    """A replaying stream that stops reading is closed after --write-timeout."""
    tw = thread_worker("--queue-max", "200", "--write-timeout", "1")
    for _ in range(100):
        tw.send(b"f", BIG)
    wait_until(lambda: tw.count("queued_messages") == 100)
    s = open_stream(tw.port, "f", "?since=0-0", rcvbuf=4096)  # open, never read
    wait_until(lambda: tw.count("streams") == 1)
    shrink_stream_sndbuf(tw)
    wait_until(lambda: tw.worker.backlog)
    time.sleep(3)  # 3 x --write-timeout
    assert not tw.worker.backlog, (backlog_bytes(tw), tw.count("streams"))
    s.close()
