"""A worker out of file descriptors: accept() fails with EMFILE. It must not spin, must keep
serving what it holds, answer /stats, and take the waiting connections once fds free up."""

import socket
import time

from test_comet import answer, id_for, ids_for, send, start_poll, wait_until

NOFILE = 64  # a worker this small fills up with a few dozen connections


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks


def test_emfile_pauses_accept_without_spinning_and_recovers(manager_factory):
    m = manager_factory(workers=1, nofile=NOFILE)
    pid = m.stats()["workers"][0]["pid"]
    socks = []
    try:
        for i in range(NOFILE + 30):  # more than the worker can hold: the rest wait in backlog
            socks.append(start_poll(m.base_port, f"e{i}"))
        wait_until(lambda: m.stats()["totals"]["waiting"] >= NOFILE - 16, 5, what="worker full")
        before = cpu_seconds(pid)
        time.sleep(1.0)
        assert cpu_seconds(pid) - before < 0.3, "the worker spins on a full fd table"
        stats = m.stats()  # answered with every fd taken (it used to crash the worker)
        assert stats["workers"][0]["pid"] == pid and stats["workers"][0]["restarts"] == 0
        held = stats["totals"]["waiting"]
        assert held < NOFILE

        for s in socks[:40]:  # free fds: the backlog is taken once the listener is re-armed
            s.close()
        late = socks[-1]
        wait_until(lambda: m.stats()["totals"]["waiting"] >= len(socks) - 40, 5,
                   what="backlog accepted after fds were freed")
        send(m, f"e{len(socks) - 1}", b"finally")
        assert answer(late)[3] == b"finally"
    finally:
        for s in socks:
            s.close()
    assert m.stop() == 0
    assert "open-file limit" in m.output


def test_full_worker_does_not_disturb_the_other(manager_factory):
    m = manager_factory(workers=2, nofile=NOFILE)
    other = id_for(1, "calm")
    waiter = start_poll(m.port_for(other), other)
    socks = []
    try:
        for id_ in ids_for(0, NOFILE + 10, prefix="f"):
            socks.append(start_poll(m.base_port, id_))
        time.sleep(0.5)  # worker 0 is full and its listener paused by now
        send(m, other, b"unbothered")
        assert answer(waiter)[3] == b"unbothered"
    finally:
        for s in socks:
            s.close()
        waiter.close()


def test_client_that_does_not_read_its_answer_is_closed_after_write_timeout(manager_factory):
    """An 8 MB answer to a client with a tiny receive window that never reads: the worker
    keeps the rest for --write-timeout, then closes it; others are served meanwhile."""
    m = manager_factory("--max-message", "8000000", "--write-timeout", "0.5", workers=1)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", m.base_port))
    slow.sendall(b"GET /slow.js HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: m.stats()["totals"]["waiting"] == 1, 5, what="slow client waiting")
    other = start_poll(m.base_port, "other")
    try:
        send(m, "slow", b"x" * 8_000_000)
        wait_until(lambda: m.stats()["totals"]["connections"] == 1, 5,
                   what="the slow reader closed after --write-timeout")
        send(m, "other", b"served")
        assert answer(other)[3] == b"served"
    finally:
        slow.close()
        other.close()
