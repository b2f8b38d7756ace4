"""Faults and limits: kernel limits hit, hung workers, full outboxes, slow readers.

Each test here failed before the fix it guards. Kernel limits that cannot be reached from a
test without changing the box (fs.epoll.max_user_watches, a huge RLIMIT_NOFILE) are injected
into a real Worker run in a thread, on real sockets.
"""

import asyncio
import errno
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, free_port_block
from test_comet import (
    answer,
    connect,
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
)
from test_manager import alive, worker_pids

import link
import manager
import server

# ---------------------------------------------------------------------------------------------
# A real Worker in a thread of the test process, with its link in the test's hands
# ---------------------------------------------------------------------------------------------


class ThreadWorker:
    def __init__(self, *args: str):
        self.listener = server.make_listener("127.0.0.1", 0, 128, 0)
        self.port = self.listener.getsockname()[1]
        self.link, theirs = socket.socketpair()
        self.theirs = theirs
        os.set_blocking(theirs.fileno(), False)
        opts = server.parse_args(["--worker", "0", "--workers", "1", "--base-port",
                                  str(self.port), *args])
        self.worker = server.Worker(opts, self.listener, theirs.fileno())
        self.ids = manager.MessageIds()
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        try:
            self.worker.run()
        except BaseException as e:  # the test asserts there was none
            self.error = e

    def start(self) -> "ThreadWorker":
        self.thread.start()
        return self

    def send(self, id_: bytes, message: bytes) -> None:
        self.link.sendall(link.encode(link.MSG, id_, message, *self.ids.next()))

    def count(self, field: str) -> int:
        return self.worker.count[link.PAGE_FIELDS.index(field)]

    def stop(self) -> None:
        self.link.close()  # the worker returns when its link closes
        self.thread.join(5)
        assert not self.thread.is_alive(), "worker did not stop"
        self.theirs.close()
        self.listener.close()
        assert self.error is None, f"worker raised {self.error!r}"


@pytest.fixture
def thread_worker():
    made = []

    def make(*args: str, start: bool = True) -> ThreadWorker:
        w = ThreadWorker(*args)
        made.append(w)
        return w.start() if start else w

    yield make
    for w in made:
        if w.thread.is_alive():
            w.stop()


class NoWatches:
    """epoll whose ADD fails for client fds while `full` is set: ENOSPC is what
    fs.epoll.max_user_watches reached looks like, ENOMEM the kernel out of memory."""

    def __init__(self, real, allowed: set, err: int):
        self.real, self.allowed, self.err, self.full = real, allowed, err, True

    def register(self, fd, events):
        if self.full and fd not in self.allowed:
            raise OSError(self.err, os.strerror(self.err))
        self.real.register(fd, events)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.ENOMEM])
def test_epoll_watch_limit_refuses_one_connection_and_keeps_serving(thread_worker, err):
    tw = thread_worker(start=False)
    w = tw.worker
    w.epoll = NoWatches(w.epoll, {w.listen_fd, w.link_fd}, err)
    tw.start()
    status, *_, body = poll_now(tw.port, "a")  # would wait: cannot be watched
    assert status == 503 and b"epoll" in body
    with connect(tw.port) as s:  # an incomplete head would need watching too
        s.sendall(b"GET /a.js HTTP/1.1\r\n")
        assert read_all(s) == b""
    assert tw.count("refused_no_watch") == 2
    w.epoll.full = False  # connections closed; the limit has room again
    s = start_poll(tw.port, "a")
    assert still_waiting(s)
    tw.send(b"a", b"still here")
    assert answer(s)[3] == b"still here"
    tw.stop()


def accept_queue(listener: socket.socket) -> int:
    """Connections in a listener's accept queue: tcp_info's tcpi_unacked (Linux)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int.from_bytes(info[24:28], sys.byteorder)


class BrokenListener:
    def __init__(self, err: int):
        self.err, self.calls = err, 0

    def _accept(self):
        self.calls += 1
        raise OSError(self.err, os.strerror(self.err))


class CountingListener:
    def __init__(self, real):
        self.real, self.calls = real, 0

    def _accept(self):
        self.calls += 1
        return self.real._accept()


def test_accept_takes_one_a_pass_and_the_listener_stays_reported_while_more_wait(
        thread_worker):
    """The listener is level-triggered: each accept() takes one connection, with no accept()
    that only says EAGAIN (an exception), and epoll reports the listener again until the
    queue is empty."""
    tw = thread_worker(start=False)
    w = tw.worker
    w.epoll.register(w.listen_fd, select.EPOLLIN)
    socks = [start_poll(tw.port, f"q{k}") for k in range(3)]
    wait_until(lambda: accept_queue(tw.listener) == 3, what="3 requests in the accept queue")
    w.listener = counting = CountingListener(tw.listener)
    for k in range(3):
        assert (w.listen_fd, select.EPOLLIN) in w.epoll.poll(0)
        assert w.accept() is False
        assert counting.calls == k + 1
    assert w.epoll.poll(0) == []  # all taken: not reported, and no fourth accept()
    assert w.count[link.PAGE_FIELDS.index("waiting")] == 3
    for s in socks:
        s.close()


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EMFILE, errno.ENOBUFS])
def test_a_failing_listener_rests_instead_of_spinning(thread_worker, capsys, err):
    tw = thread_worker(start=False)
    w = tw.worker
    w.epoll.register(w.listen_fd, 0)
    w.listener = BrokenListener(err)
    w.accept()
    assert w.listener.calls == 1 and w.accept_paused_until > 0
    assert "accept failed" in capsys.readouterr().err
    s = start_poll(tw.port, "p1")  # queued behind the real listener fd, which epoll watches
    wait_until(lambda: accept_queue(tw.listener) == 1, what="a request in the accept queue")
    assert w.epoll.poll(0) == []  # resting: not reported, so the loop cannot spin on it
    w.accept_paused_until = time.monotonic() - 1  # the rest is over: it tries again, once
    w.sweep(time.monotonic())
    for _ in range(2):  # watched again, level-triggered: reported while one is queued
        assert w.epoll.poll(0) == [(w.listen_fd, select.EPOLLIN)]
    w.accept()
    assert w.listener.calls == 2 and capsys.readouterr().err == ""  # logged once per 10 s
    s.close()


def test_a_drain_begun_in_a_pass_that_reports_the_listener_accepts_nothing_after_it(
        thread_worker):
    """SIGTERM and a queued connection in one epoll_wait: the drain takes the backlog and shuts
    the listener down, and that pass must not accept again (it did: EINVAL from the shut
    listener, then its pause met an fd epoll no longer had, and the worker died mid-drain)."""
    tw = thread_worker("--drain", "0", start=False)
    r, wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    tw.worker.wake_fd = r  # what main() hands it: signal.set_wakeup_fd's pipe
    s = start_poll(tw.port, "d1")
    wait_until(lambda: accept_queue(tw.listener) == 1, what="a request in the accept queue")
    os.write(wr, bytes([signal.SIGTERM]))
    tw.start()
    assert answer(s)[0] == 204  # taken from the backlog by the drain, and ended by it
    tw.thread.join(5)
    assert not tw.thread.is_alive() and tw.error is None, tw.error
    os.close(r)
    os.close(wr)
    s.close()


def test_an_aborted_connection_does_not_pause_the_listener(thread_worker):
    tw = thread_worker(start=False)
    w = tw.worker
    w.epoll.register(w.listen_fd, 0)
    w.listener = BrokenListener(errno.ECONNABORTED)
    w.accept()
    assert w.listener.calls == 1 and not w.accept_paused_until
    assert w.accept(until_eagain=True) is True  # the drain's: on to the cap, still not paused
    assert w.listener.calls == 1 + server.ACCEPTS_PER_DRAIN_CALL and not w.accept_paused_until


@pytest.mark.parametrize("limit", [resource.RLIM_INFINITY, 1_073_741_816, 1_048_576])
def test_fd_tables_do_not_grow_with_the_open_file_limit(monkeypatch, limit):
    monkeypatch.setattr(server.resource, "getrlimit", lambda _: (limit, limit))
    tw = ThreadWorker()
    try:
        assert len(tw.worker.state) == len(tw.worker.fds) == server.FD_TABLE_START
    finally:
        tw.listener.close()
        tw.link.close()
        tw.theirs.close()


def test_fd_tables_grow_as_fds_grow(monkeypatch, thread_worker):
    monkeypatch.setattr(server, "FD_TABLE_START", 8)
    tw = thread_worker()
    assert len(tw.worker.state) == 8
    socks = [start_poll(tw.port, f"g{k}") for k in range(40)]
    wait_until(lambda: tw.count("waiting") == 40, what="40 waiting")
    assert len(tw.worker.state) > max(tw.worker.waiters.values())
    for k in range(40):
        tw.send(b"g%d" % k, b"m%d" % k)
    for k, s in enumerate(socks):
        assert answer(s)[3] == b"m%d" % k
        s.close()
    tw.stop()


@pytest.mark.parametrize("option,value", [
    ("--header-timeout", 0.3), ("--write-timeout", 0.2), ("--poll-timeout", 0.15),
    ("--sse-heartbeat", 0.1), ("--queue-ttl", 0.05), ("--worker-timeout", 0.2)])
def test_the_timers_are_swept_at_least_as_often_as_the_shortest_timeout(thread_worker,
                                                                          option, value):
    """A pass sweeps only when sweep_at has come; a deadline set between two sweeps is
    never acted on late only if sweep_every is at most every timeout that sets one."""
    w = thread_worker(option, str(value), start=False).worker
    assert w.sweep_every == min(value if option != "--worker-timeout" else value / 4,
                                server.ACCEPT_BACKOFF)
    w = thread_worker(start=False).worker  # the defaults: the listener's rest is shortest
    assert w.sweep_every == server.ACCEPT_BACKOFF


def test_a_loop_pass_sweeps_the_timers_only_when_one_may_be_due(thread_worker, monkeypatch):
    tw = thread_worker(start=False)
    calls = []
    real = tw.worker.sweep
    monkeypatch.setattr(tw.worker, "sweep", lambda now: calls.append(now) or real(now))
    tw.start()
    wait_until(lambda: calls, what="the first sweep")
    passes, t0 = 0, time.monotonic()
    while passes < 20:
        done = tw.count("link_done")
        tw.send(b"nobody%d" % passes, b"m")  # a pass each: nobody waits on these ids
        end = time.monotonic() + 5
        while tw.count("link_done") <= done and time.monotonic() < end:
            time.sleep(0.0005)  # (wait_until's 20 ms steps would leave few passes)
        passes += 1
    elapsed = time.monotonic() - t0
    # Without sweep_at a sweep each pass: 20 and more, in the ~50 ms this takes.
    assert len(calls) <= 2 + elapsed / tw.worker.sweep_every, (len(calls), passes, elapsed)
    tw.stop()


def test_a_long_broadcast_beats_the_heart_as_it_goes(thread_worker, monkeypatch):
    """Answering 500,000 waiting polls takes seconds in one loop pass: the heartbeat must not
    go stale meanwhile, or the watchdog kills a worker that is working."""
    monkeypatch.setattr(server, "BEAT_EVERY", 50)
    tw = thread_worker(start=False)
    w = tw.worker
    socks = [start_poll(tw.port, f"b{k}") for k in range(120)]
    wait_until(lambda: w.accept() or len(w.waiters) == 120, what="120 waiting")
    w.count[link.BEAT_NS] = 0
    before = time.monotonic_ns()
    w.broadcast(1 << 64, b"1-0", b"all")
    assert w.count[link.BEAT_NS] >= before
    assert tw.count("delivered") == 120
    for s in socks:
        s.close()


def test_a_broadcast_answers_every_kind_of_waiter_once(thread_worker):
    """broadcast_plain answers the single plain polls in one loop; what it leaves (an id with
    two polls, a stream, a poll whose peer is gone, an answer bigger than one write) goes on
    by the general path: each live waiter gets the message exactly once, whole, and the
    page's counters add up."""
    tw = thread_worker(start=False)
    w = tw.worker

    def step():
        w.accept()
        for fd, ev in w.epoll.poll(0.05):
            if fd in w.reading:
                w.read_head(fd, w.reading[fd], ev & server.HANGUP)

    # 1: a small message: the singles written whole in the tight loop
    singles = [start_poll(tw.port, f"p{k}") for k in range(20)]
    pair = [start_poll(tw.port, "two"), start_poll(tw.port, "two")]
    stream = connect(tw.port)
    stream.sendall(b"GET /s.sse HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: step() or len(w.waiters) == 22, what="22 ids waiting")
    w.broadcast(1 << 64, b"1-0", b"small")
    assert (w.count[link.WAITING], w.count[link.CONNECTIONS]) == (1, 1)  # the stream
    assert w.count[link.DELIVERED] == 23
    for s in singles + pair:
        status, _, headers, got = answer(s)
        assert (status, got, headers["x-message-id"]) == (200, b"small", "1-0")
    # 2: a message bigger than one write, and a peer that reset
    body = bytes(range(256)) * 16384  # 4 MiB
    big = [start_poll(tw.port, f"q{k}") for k in range(5)]
    gone = start_poll(tw.port, "gone")
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    wait_until(lambda: step() or len(w.waiters) == 7, what="7 ids waiting")
    gone.close()  # a reset: the write to it fails
    time.sleep(0.05)
    w.broadcast(2 << 64, b"2-0", body)
    assert w.count[link.WAITING] == 1
    tw.start()  # the loop writes the rests as the clients read
    for s in big:
        status, _, headers, got = answer(s, timeout=10)
        assert (status, got, headers["x-message-id"]) == (200, body, "2-0")
    stream.settimeout(10)
    data = b""
    while b"id: 2-0" not in data or not data.endswith(b"\n\n"):
        data += stream.recv(1 << 20)
    assert data.count(b"id: 1-0\n") == 1 and data.count(b"id: 2-0\n") == 1
    wait_until(lambda: tw.count("delivered") == 23 + 6, what="29 delivered")
    assert tw.count("connections") == 1 and tw.count("waiting") == 1
    assert tw.count("closed_reset") == 1
    stream.close()


def test_a_long_answer_with_unread_bytes_behind_it_lingers(thread_worker):
    """An answer bigger than the socket buffers, to a client that sent more than we read:
    closing right after the last write resets the connection over the unread bytes and throws
    away the end of the answer still in our send queue. The worker is stepped by hand, so the
    bytes sent late are not read (as when they arrive just before the last EPOLLOUT)."""
    tw = thread_worker(start=False)
    w = tw.worker
    body = bytes(range(256)) * 32768  # 8 MiB: more than one write takes here
    w.deliver(b"big", 1, b"0-1", body)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answer cannot fit at once
    s.connect(("127.0.0.1", tw.port))
    s.sendall(b"GET /big.js HTTP/1.1\r\nHost: x\r\n\r\n" + b"z" * 100)
    wait_until(lambda: w.accept() or w.outbuf, what="a partial write")
    (fd,) = w.outbuf
    s.sendall(b"z" * 1000)  # never read by the worker
    got = []
    reader = threading.Thread(target=lambda: got.append(read_all(s, 10)))
    reader.start()
    deadline = time.monotonic() + 10
    while fd in w.outbuf and time.monotonic() < deadline:
        select.select([], [fd], [], 0.05)  # what EPOLLOUT would say
        w.flush(fd)
    reader.join(10)
    assert got, "the client's read failed (reset?)"
    status, _, _, data = parse(got[0])
    assert status == 200 and data == body
    s.close()


# ---------------------------------------------------------------------------------------------
# The manager: watchdog, bounded outboxes, stats that never wait, counters that survive
# ---------------------------------------------------------------------------------------------


def binary(ids, message: bytes) -> bytes:
    return b"".join(b"\x02" + i.encode() + b"\x00" + message + b"\x00" for i in ids)


def http_publish(s: socket.socket, id_: str, message: bytes) -> tuple:
    """One keep-alive POST /send on s; (status, body)."""
    from conftest import read_response
    s.sendall(f"POST /send/{id_} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(message)}"
              f"\r\n\r\n".encode() + message)
    status, _, body = read_response(s)
    return status, body


def test_a_stopped_worker_is_killed_by_the_watchdog_and_publishing_resumes(manager_factory):
    timeout = 3
    m = manager_factory("--worker-timeout", str(timeout))
    old = worker_pids(m)
    w0_ids = ids_for(0, 100, "hung")
    w1 = id_for(1, "free")
    pub = socket.create_connection(("127.0.0.1", m.app_port), timeout=10)
    assert http_publish(pub, w1, b"before")[0] == 202
    os.kill(old[0], signal.SIGSTOP)
    # 6 MB for the stopped worker: more than a link holds, so the flow gate closes.
    with socket.create_connection(("127.0.0.1", m.app_port), timeout=10) as flood:
        flood.sendall(binary(w0_ids, b"x" * 60_000))
    t0 = time.monotonic()
    stats = m.stats()  # read from the pages: answered while a worker is stopped
    assert time.monotonic() - t0 < 0.5
    row = stats["workers"][0]
    assert row["up"] is True and row["pid"] == old[0]
    wait_until(lambda: m.stats()["manager"]["paused"] == [0], 3, what="flow paused by worker 0")
    t0 = time.monotonic()
    status, body = http_publish(pub, w1, b"after")  # waits on the gate, then goes through
    stall = time.monotonic() - t0
    assert status == 202, body
    assert stall < timeout + 2.0, f"publishing to worker 1 stalled {stall:.1f} s"
    pub.close()
    wait_until(lambda: worker_pids(m)[0] not in (None, old[0]), 5, what="worker 0 restarted")
    assert not alive(old[0])
    assert worker_pids(m)[1] == old[1]
    wait_total(m, "queued_messages", 100 + 2, timeout=10)  # every frame replayed, none twice
    assert poll_now(m.port_for(w1), w1)[3] == b"before"
    assert poll_now(m.port_for(w1), w1)[3] == b"after"
    m.stop()
    assert "missed its heartbeat" in m.output


def test_a_full_outbox_refuses_publishes_with_a_clear_error(manager_factory):
    """New app connections are read once before the flow gate (GET /stats must answer while
    it is closed); a full outbox bounds what those reads can bring."""
    limit = 1_000_000
    m = manager_factory("--queue-bytes", str(limit), "--worker-timeout", "60")
    pid0 = worker_pids(m)[0]
    ids = ids_for(0, 40, "full")
    os.kill(pid0, signal.SIGSTOP)
    results = []
    try:
        for id_ in ids:  # one new connection per publish: the pattern that leaked
            with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as s:
                results.append(http_publish(s, id_, b"y" * 60_000))
        stats = m.stats()
        with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as s:
            s.sendall(b'{"id": "%s", "message": "%s"}\n' % (ids[0].encode(), b"z" * 60_000))
            line = json.loads(s.makefile().readline())
        with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as s:
            s.sendall(binary(ids[:1], b"w" * 60_000))
            s.settimeout(5)
            assert s.recv(1) == b""  # closed at the frame it could not take
    finally:
        os.kill(pid0, signal.SIGCONT)
    taken = [r for r in results if r[0] == 202]
    refused = [r for r in results if r[0] == 503]
    assert len(taken) + len(refused) == len(ids) and refused and taken
    assert b"not keeping up" in refused[0][1]
    assert stats["manager"]["app_refused_full"] == len(refused)  # /stats answered meanwhile
    assert line["ok"] is False and "not keeping up" in line["error"]
    wait_total(m, "queued_messages", len(taken), timeout=10)
    assert m.stats()["manager"]["messages_in"] == len(taken)


def test_publishes_after_sigterm_are_refused_not_lost():
    """From SIGTERM on the links are closing: a message accepted then would be lost."""
    opts = manager.parse_args(["--host", "127.0.0.1", "--workers", "2", "--base-port",
                               str(free_port_block(2)), "--status-interval", "0"])

    async def go():
        sup = manager.Supervisor(opts, manager.Flow())
        sup.open_ports()
        router = manager.Router(sup)
        assert router.send_one(b"a", b"before")[1] is None
        sup.stopping = True  # what stop() sets first
        refused = [router.send_one(b"a", b"late"), router.send([b"a", b"b"], b"late"),
                   router.broadcast(b"late")]
        for slot in sup.slots:
            slot.listener.close()
        return refused, router.messages_in

    refused, messages_in = asyncio.run(go())
    assert all(mid is None and "shutting down" in r for mid, r in refused)
    assert messages_in == 1


def test_app_connections_open_at_shutdown_end_quietly(manager):
    m = manager
    idle = [socket.create_connection(("127.0.0.1", m.app_port), timeout=5) for _ in range(3)]
    idle[0].sendall(b"{")  # JSON lines, waiting for a line
    idle[1].sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive, answered
    idle[2].sendall(b"\x02a")  # half a binary frame
    time.sleep(0.3)
    assert m.stop() == 0
    for s in idle:
        s.close()
    assert "Traceback" not in m.output, m.output


def test_a_failed_spawn_is_retried(monkeypatch):
    """posix_spawn can fail (EAGAIN: out of processes); the slot must be tried again, not left
    empty with its outbox filling and the publishers waiting."""
    import asyncio

    from conftest import free_port_block

    import manager
    base = free_port_block(2)
    app = base + 1
    opts = manager.parse_args(["--host", "127.0.0.1", "--workers", "1", "--base-port",
                               str(base), "--app-port", str(app), "--status-interval", "0"])
    real, calls = os.posix_spawn, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return real(*args, **kwargs)

    monkeypatch.setattr(manager.os, "posix_spawn", flaky)

    async def go():
        sup = manager.Supervisor(opts, manager.Flow())
        sup.open_ports()
        asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, sup.reap)
        sup.reconcile()
        assert sup.slots[0].pid is None
        for _ in range(100):
            await asyncio.sleep(0.02)
            if sup.slots[0].pid is not None:
                break
        pid = sup.slots[0].pid
        sup.stop()
        await asyncio.wait_for(sup.done.wait(), 5)
        asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)
        for slot in sup.slots:
            slot.listener.close()
        return pid

    assert asyncio.run(go()) is not None and len(calls) == 2


def test_frames_sent_after_a_kill_queue_behind_the_replayed_ones(manager_factory):
    m = manager_factory("--queue-max", "1000")
    pid0 = worker_pids(m)[0]
    id_ = id_for(0, "fifo")
    os.kill(pid0, signal.SIGSTOP)
    with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as s:
        s.sendall(b"".join(b"\x02%s\x00old%03d\x00" % (id_.encode(), k) for k in range(100)))
        time.sleep(0.3)
        os.kill(pid0, signal.SIGKILL)
        s.sendall(b"".join(b"\x02%s\x00new%03d\x00" % (id_.encode(), k) for k in range(100)))
    wait_total(m, "queued_messages", 200, timeout=10)
    got = [poll_now(m.port_for(id_), id_)[3] for _ in range(200)]
    assert got == [b"old%03d" % k for k in range(100)] + [b"new%03d" % k for k in range(100)]


def test_a_killed_workers_queue_is_counted_lost_and_its_counters_carried(manager):
    m = manager
    id_ = id_for(0, "carry")
    s = hold(m, id_)
    from test_comet import send
    send(m, id_, b"delivered")
    assert answer(s)[3] == b"delivered"
    for k in range(5):
        send(m, id_, b"queued%d" % k)
    wait_total(m, "undelivered", 5)
    old = worker_pids(m)[0]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: worker_pids(m)[0] not in (None, old), 5, what="restart")
    t = totals(m)
    # The one delivered (and kept) is not lost; the 5 no client had are.
    assert (t["lost"], t["queued_messages"], t["delivered"]) == (5, 0, 1)
    assert m.stats()["workers"][0]["restarts"] == 1


@pytest.mark.parametrize("cause", ["header_timeout", "reset", "flood"])
def test_closes_are_counted_by_cause(manager_factory, cause):
    m = manager_factory("--header-timeout", "0.3")
    id_ = id_for(0, "cause")
    s = connect(m.port_for(id_))
    if cause == "header_timeout":
        s.sendall(b"GET /x.js HTTP/1.1\r\n")
        assert read_all(s) == b""
    else:
        s.sendall(f"GET /{id_}.js HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_total(m, "waiting", 1)
        if cause == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        else:
            try:
                for _ in range(server.GARBAGE_MAX // 16384 + 2):  # paced: counted in all
                    s.sendall(b"z" * 16384)
                    time.sleep(0.002)
            except OSError:
                pass
    s.close()
    wait_total(m, f"closed_{cause}", 1)


@pytest.mark.parametrize("prog,option", [("manager.py", "--header-timeout"),
                                         ("manager.py", "--worker-timeout"),
                                         ("manager.py", "--queue-ttl"),
                                         ("server.py", "--poll-timeout")])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_nan_and_infinite_durations_are_refused(prog, option, value):
    extra = ["--worker", "0", "--workers", "1"] if prog == "server.py" else []
    r = subprocess.run([sys.executable, str(ROOT / prog), *extra, f"{option}={value}"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and option in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# Keepalive: probes that a busy loopback drops must not abort clients that did nothing wrong
# ---------------------------------------------------------------------------------------------


def keepalive_of(fd: int) -> int:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    finally:
        s.close()


def test_keepalive_is_off_for_loopback_peers_and_on_for_the_rest(thread_worker):
    loop = server.make_listener("127.0.0.1", 0, 16, 60)
    assert loop.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    loop.close()
    tw = thread_worker(start=False)
    w = tw.worker
    assert not w.keepalive  # bound to 127.0.0.1: no keepalive to turn off
    # As when bound to 0.0.0.0: the listener has keepalive, a loopback peer's socket must not.
    tw.listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    tw.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, server.KEEPALIVE_PROBES)
    w.keepalive = True
    s = start_poll(tw.port, "ka")
    wait_until(lambda: w.accept() or w.waiters, what="a waiting poll")
    (fd,) = w.waiters.values()
    assert keepalive_of(fd) == 0
    s.close()
    assert server.is_loopback("127.9.0.1") and server.is_loopback("::1")
    assert not server.is_loopback("10.0.0.1") and not server.is_loopback("0.0.0.0")


def test_idle_polls_survive_a_burst_of_keepalive_probes(manager_factory):
    """16,000 polls opened at once go idle in the same timer bucket: with --keepalive 3 their
    probes would all leave in one burst, past what loopback queues (1000 packets), and the
    connections whose probes were dropped 4 times were aborted. Measured before the fix:
    496-4,244 of 16,000 lost in 4 of 4 runs. Every poll must get the broadcast."""
    n = 16_000
    # Bound to every address, as in production: the listener has keepalive, and the worker
    # turns it off for each loopback peer.
    m = manager_factory("--keepalive", "3", "--host", "0.0.0.0")
    socks = []
    ep = select.epoll()
    try:
        for i in range(n):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", m.port_for(f"k{i}")))
            except BlockingIOError:
                pass
            socks.append(s)
            ep.register(s.fileno(), select.EPOLLOUT)
        by_fd = {s.fileno(): i for i, s in enumerate(socks)}
        sent, deadline = 0, time.monotonic() + 30
        while sent < n and time.monotonic() < deadline:  # each request once connected
            for fd, _ in ep.poll(0.5, 4096):
                socks[by_fd[fd]].send(b"GET /k%d.js HTTP/1.1\r\nHost: x\r\n\r\n" % by_fd[fd])
                ep.modify(fd, select.EPOLLIN)
                sent += 1
        assert sent == n
        wait_total(m, "waiting", n, timeout=20)
        time.sleep(3 + 4 * 1 + 2)  # past idle + 4 probes: an aborted poll would be gone by now
        from test_comet import broadcast
        broadcast(m, b"hi")
        got, deadline = 0, time.monotonic() + 15
        while got < n and time.monotonic() < deadline:
            for fd, _ in ep.poll(0.5, 4096):
                ep.unregister(fd)
                got += 1
        assert got == n
        for s in socks:
            s.setblocking(True)
            s.settimeout(1)
        answers = [s.recv(256) for s in socks]
        assert sum(a.startswith(b"HTTP/1.1 200") and a.endswith(b"hi") for a in answers) == n
        t = totals(m)
        assert t["closed_timed_out"] == 0 and t["closed_reset"] == 0
    finally:
        ep.close()
        for s in socks:
            s.close()


def test_write_timeout_closes_a_client_that_does_not_read_a_big_answer(manager_factory):
    """A 64 KiB answer fits the kernel's buffers even when the client reads nothing, so
    --write-timeout was never reached: an 8 MiB one does not fit."""
    m = manager_factory("--max-message", str(8 * 2**20), "--write-timeout", "1")
    id_ = id_for(0, "slow")
    from test_comet import send
    send(m, id_, b"w" * (8 * 2**20))
    wait_total(m, "queued_messages", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", m.port_for(id_)))
    s.sendall(f"GET /{id_}.js HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # and never reads
    wait_total(m, "closed_write_timeout", 1, timeout=5)
    t = totals(m)
    assert t["connections"] == 0 and t["delivered"] == 1  # written in part: README says so
    s.close()

def close_the_gate(m, count: int, tag: str, ok: tuple) -> None:
    """With worker 0 stopped: 60 KB publishes for it, each on a new connection (a first read,
    taken whatever the gate), until its unacknowledged bytes close the flow gate."""
    for id_ in ids_for(0, count, tag):
        with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as s:
            assert http_publish(s, id_, b"y" * 60_000)[0] in ok
    assert m.stats()["manager"]["paused"] == [0]


def test_a_message_half_read_when_the_gate_closes_is_taken_whole(manager_factory):
    """The flow gate holds publishers between messages, not inside one: a JSON line whose two
    halves arrive apart while a stopped worker holds the gate closed is answered at once
    (taken, or refused with the reason), not left half-read until the worker is back."""
    m = manager_factory("--queue-bytes", "1000000", "--worker-timeout", "60")
    pid0 = worker_pids(m)[0]
    ids = ids_for(0, 12, "gate")
    with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as a:
        f = a.makefile("rb")
        a.sendall(b'{"id": "%s", "message": "first"}\n' % ids[0].encode())
        assert json.loads(f.readline())["ok"] is True  # past its first read
        os.kill(pid0, signal.SIGSTOP)
        try:
            for id_ in ids[1:]:  # first reads of new connections: taken, the gate closes
                with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as s:
                    assert http_publish(s, id_, b"y" * 60_000)[0] in (202, 503)
            assert m.stats()["manager"]["paused"] == [0]
            line = b'{"id": "%s", "message": "%s"}\n' % (ids[0].encode(), b"h" * 1000)
            a.sendall(line[:500])
            time.sleep(0.3)
            a.sendall(line[500:])
            a.settimeout(3)
            reply = json.loads(f.readline())  # TimeoutError: held by the gate, half-read
            assert reply["ok"] is True or "not keeping up" in reply["error"]
            a.sendall(b'{"id": "%s", "message": "next"}\n' % ids[0].encode())
            a.settimeout(0.5)
            with pytest.raises(TimeoutError):  # the next message waits for the gate
                f.readline()
        finally:
            os.kill(pid0, signal.SIGCONT)


def test_a_binary_publisher_is_held_by_the_gate_and_resumed_when_it_opens(manager_factory):
    """Binary frames are routed in the read callback: while a stopped worker holds the flow
    gate closed, a binary publisher past its first read gets at most one message through
    (SPEC: the manager stops reading), and the rest follow, in order, once it opens."""
    m = manager_factory("--queue-bytes", "1000000", "--worker-timeout", "60")
    pid0 = worker_pids(m)[0]
    w1 = id_for(1, "heldbin")
    with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as pub:
        pub.sendall(binary([w1], b"m0"))
        wait_total(m, "queued_messages", 1)
        os.kill(pid0, signal.SIGSTOP)
        try:
            close_the_gate(m, 12, "gatebin", (202, 503))
            pub.sendall(b"".join(binary([w1], b"m%d" % k) for k in range(1, 6)))
            time.sleep(0.5)
            held = m.stats()["workers"][1]["queued_messages"]
            assert held <= 2, f"{held - 1} messages passed the closed gate"
        finally:
            os.kill(pid0, signal.SIGCONT)
        wait_until(lambda: m.stats()["workers"][1]["queued_messages"] == 6, 5,
                   what="the held frames routed once the gate opened")
    got = [poll_now(m.port_for(w1), w1)[3] for _ in range(6)]
    assert got == [b"m%d" % k for k in range(6)]


def test_polls_are_corked_and_streams_are_not(thread_worker):
    """The listener corks every connection (an answer's last segment carries the FIN); a
    stream must uncork, or its events would sit in the kernel for up to 200 ms."""
    tw = thread_worker()
    poll = socket.create_connection(("127.0.0.1", tw.port))
    stream = socket.create_connection(("127.0.0.1", tw.port))
    try:
        poll.sendall(b"GET /p.js HTTP/1.1\r\nHost: h\r\n\r\n")
        stream.sendall(b"GET /s.sse HTTP/1.1\r\nHost: h\r\n\r\n")
        wait_until(lambda: tw.count("waiting") == 2, what="2 waiting")
        corked = {}
        for fd, s in enumerate(tw.worker.state):
            if s.__class__ is bytes:
                with socket.socket(fileno=os.dup(fd)) as mine:
                    corked[s] = mine.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)
        assert corked == {b"p": 1, b"s": 0}
        tw.send(b"s", b"hello")
        stream.settimeout(5)
        data = b""
        while b"hello" not in data:
            data += stream.recv(4096)
    finally:
        poll.close()
        stream.close()


def test_a_gate_opened_by_the_flush_of_a_gated_read_does_not_strand_its_frames(manager_factory):
    """Found in review: a binary read routed one frame past the closed gate, held the next,
    and its own flush's acks opened the gate; pausing after that left the held frames (and
    the connection) stranded, as nobody would resume it. The manager is stopped so that the
    worker catches up and the read is taken before the manager's 10 ms ack poll."""
    m = manager_factory("--queue-bytes", "200000", "--worker-timeout", "60")
    pid0 = worker_pids(m)[0]
    w0 = id_for(0, "strand")
    with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as pub:
        pub.sendall(binary([w0], b"m0"))
        wait_total(m, "queued_messages", 1)
        os.kill(pid0, signal.SIGSTOP)
        try:
            close_the_gate(m, 3, "fill", (202,))
            os.kill(m.proc.pid, signal.SIGSTOP)
            try:
                os.kill(pid0, signal.SIGCONT)
                time.sleep(0.5)  # worker 0 acts on its link; the manager cannot see it yet
                pub.sendall(binary([w0], b"m1") + binary([w0], b"m2"))
                time.sleep(0.1)
            finally:
                os.kill(m.proc.pid, signal.SIGCONT)
        finally:
            os.kill(pid0, signal.SIGCONT)
        time.sleep(0.3)
        pub.sendall(binary([w0], b"m3"))
        wait_until(lambda: m.stats()["workers"][0]["queued_messages"] == 7, 5,
                   what="all 4 frames of the binary publisher and the 3 fills routed")


def test_a_worker_exits_when_its_manager_dies_right_after_a_write(manager_factory):
    """Found in review: frames and the link's hang-up seen in one edge; the worker stops
    reading the link at a short read, and must still read on to the EOF and exit (SPEC),
    else it serves its port forever with nobody to publish."""
    m = manager_factory(workers=1)
    pid = worker_pids(m)[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as pub:
            pub.sendall(binary(["orphan"], b"last words"))
            time.sleep(0.3)
        os.kill(m.proc.pid, signal.SIGKILL)
        m.proc.wait(5)
        time.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        wait_until(lambda: not alive(pid), 5, what="the orphaned worker to exit")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
