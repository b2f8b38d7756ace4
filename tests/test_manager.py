"""The manager: pinning, supervision, shutdown, startup lines, backpressure, bind failures."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

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
    send,
    start_poll,
    still_waiting,
    wait_total,
    wait_until,
)

MANAGER = [sys.executable, str(ROOT / "manager.py")]


def alive(pid) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def worker_pids(m) -> list:
    return [w["pid"] for w in m.stats()["workers"]]


def info_ok(port: int) -> bool:
    try:
        with connect(port, timeout=1) as s:
            s.sendall(b"GET /_info HTTP/1.1\r\nHost: h\r\n\r\n")
            return parse(read_all(s, 1))[0] == 200
    except OSError:
        return False


def test_workers_are_pinned(manager):
    m = manager
    cpus = sorted(os.sched_getaffinity(0))
    for n, w in enumerate(m.stats()["workers"]):
        assert w["cpu"] == cpus[n % len(cpus)]
        assert os.sched_getaffinity(w["pid"]) == {w["cpu"]}


def test_more_workers_than_cpus_wrap_around(manager_factory):
    cpus = sorted(os.sched_getaffinity(0))
    workers = len(cpus) + 1
    m = manager_factory(workers=workers)
    rows = m.stats()["workers"]
    assert len(rows) == workers
    for n, w in enumerate(rows):
        assert w["cpu"] == cpus[n % len(cpus)]
        assert os.sched_getaffinity(w["pid"]) == {cpus[n % len(cpus)]}


def test_sigkill_worker_restarts_on_the_same_port(manager):
    m = manager
    survivor_id = id_for(1, "keep")
    survivor = hold(m, survivor_id)
    old = worker_pids(m)
    t0 = time.monotonic()
    os.kill(old[0], signal.SIGKILL)

    def restarted():
        pid = worker_pids(m)[0]
        return pid is not None and pid != old[0] and alive(pid) and info_ok(m.base_port)
    wait_until(restarted, timeout=5, interval=0.01, what="worker 0 back")
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, f"restart took {elapsed:.2f} s"
    assert not alive(old[0])
    stats = m.stats()
    w0, w1 = stats["workers"]
    assert w0["restarts"] == 1 and w1["restarts"] == 0
    assert w1["pid"] == old[1]
    assert w0["port"] == m.base_port and w0["cpu"] == sorted(os.sched_getaffinity(0))[0]
    assert os.sched_getaffinity(w0["pid"]) == {w0["cpu"]}
    assert stats["totals"]["restarts"] == 1
    # The new worker serves its port; the other worker's poll was not disturbed.
    id0 = id_for(0, "new")
    s = hold(m, id0, n_before=1)
    send(m, id0, b"from the new worker")
    assert answer(s)[3] == b"from the new worker"
    assert still_waiting(survivor, 0.05)
    send(m, survivor_id, b"still here")
    assert answer(survivor)[3] == b"still here"


def test_messages_for_a_dead_worker_are_held_and_delivered(manager):
    m = manager
    old = worker_pids(m)
    ids = ids_for(0, 3, "held")
    os.kill(old[0], signal.SIGKILL)
    wait_until(lambda: not alive(old[0]), timeout=2, interval=0.005, what="worker dead")
    for id_ in ids:  # right after the kill: the worker is down
        send(m, id_, b"held for " + id_.encode())
    wait_until(lambda: worker_pids(m)[0] not in (None, old[0]), timeout=5, what="restart")
    wait_total(m, "queued_messages", 3)
    for id_ in ids:
        status, _, _, body = poll_now(m.port_for(id_), id_)
        assert (status, body) == (200, b"held for " + id_.encode())


def test_poll_during_a_restart_waits_in_the_backlog(manager):
    m = manager
    old = worker_pids(m)
    id_ = id_for(0, "backlog")
    os.kill(old[0], signal.SIGKILL)
    wait_until(lambda: not alive(old[0]), timeout=2, interval=0.005, what="worker dead")
    s = start_poll(m.port_for(id_), id_)  # accepted by the kernel, served by the new worker
    wait_total(m, "waiting", 1)
    send(m, id_, b"after restart")
    assert answer(s)[3] == b"after restart"


def stop_with(m, sig) -> None:
    pids = worker_pids(m)
    assert all(alive(p) for p in pids)
    t0 = time.monotonic()
    m.proc.send_signal(sig)
    try:
        code = m.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"manager still running 5 s after {sig.name}") from None
    assert code == 0
    left = max(0.1, 5.0 - (time.monotonic() - t0))
    wait_until(lambda: not any(alive(p) for p in pids), timeout=left, what="workers gone")


def test_sigterm_stops_everything_with_status_0(manager):
    stop_with(manager, signal.SIGTERM)


def test_sigint_stops_everything_with_status_0(manager):
    stop_with(manager, signal.SIGINT)


def test_sigterm_with_waiting_connections(manager):
    m = manager
    socks = [hold(m, i, n_before=n) for n, i in enumerate(ids_for(0, 3, "w") + ids_for(1, 3, "w"))]
    t0 = time.monotonic()
    stop_with(m, signal.SIGTERM)
    assert time.monotonic() - t0 < 5
    for s in socks:
        s.settimeout(2)
        try:
            s.recv(100)  # closed (or answered), not left hanging
        except ConnectionResetError:
            pass
        s.close()


def test_workers_exit_when_the_manager_is_killed(manager):
    m = manager
    pids = worker_pids(m)
    m.proc.kill()
    m.proc.wait(timeout=5)
    t0 = time.monotonic()
    wait_until(lambda: not any(alive(p) for p in pids), timeout=4, what="workers gone")
    assert time.monotonic() - t0 < 2.0


def test_startup_prints_the_capacity_line(manager):
    m = manager
    m.proc.send_signal(signal.SIGTERM)
    out, _ = m.proc.communicate(timeout=5)
    assert "capacity:" in out
    assert any(line.count("capacity:") == 1 for line in out.splitlines())


def test_backpressure_slows_the_publisher_instead_of_dropping(manager_factory):
    count_ids, per_id, size = 100, 100, 4000  # 10,000 messages, 40 MB, all for worker 0
    m = manager_factory("--queue-max", "1000", "--queue-bytes", str(200 * 2**20))
    ids = ids_for(0, count_ids, "bp")
    stream = b"".join(b"\x02" + i.encode() + b"\x00" + bytes([65 + k % 26]) * size + b"\x00"
                      for k in range(per_id) for i in ids)
    total = count_ids * per_id
    pid0 = worker_pids(m)[0]
    done = threading.Event()
    failure = []

    def publish():
        try:
            with socket.create_connection(("127.0.0.1", m.app_port), timeout=30) as s:
                s.sendall(stream)
        except OSError as e:
            failure.append(e)
        finally:
            done.set()

    os.kill(pid0, signal.SIGSTOP)
    try:
        t = threading.Thread(target=publish, daemon=True)
        t.start()
        assert not done.wait(2.0), f"publisher was not slowed down: {failure}"
    finally:
        os.kill(pid0, signal.SIGCONT)
    assert done.wait(20), "publisher still blocked after SIGCONT"
    t.join(5)
    assert not failure, failure
    wait_total(m, "queued_messages", total, timeout=15)
    stats = m.stats()
    assert stats["totals"]["dropped"] == 0
    assert stats["totals"]["queued_bytes"] == total * size
    assert stats["manager"]["messages_in"] == total
    assert stats["workers"][0]["pid"] == pid0
    assert stats["manager"]["paused"] == []
    first = ids[0]
    assert poll_now(m.port_for(first), first)[3] == b"A" * size


def run_second_manager(base_port: int, app_port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        MANAGER + ["--host", "127.0.0.1", "--workers", "2", "--base-port", str(base_port),
                   "--app-port", str(app_port), "--status-interval", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=10)


def test_bind_failure_on_a_comet_port(manager):
    m = manager
    r = run_second_manager(m.base_port, free_port_block(1))
    assert r.returncode != 0
    err = r.stderr.strip()
    assert err.count("\n") == 0, err
    assert str(m.base_port) in err
    assert "Traceback" not in r.stderr + r.stdout
    assert m.proc.poll() is None  # the first one is unharmed
    assert all(alive(p) for p in worker_pids(m))


def test_bind_failure_on_the_second_comet_port(manager):
    m = manager
    r = run_second_manager(m.base_port + 1, free_port_block(1))
    assert r.returncode != 0
    assert str(m.base_port + 1) in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_bind_failure_on_the_app_port(manager):
    m = manager
    base = free_port_block(2)
    r = run_second_manager(base, m.app_port)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert err.count("\n") == 0, err
    assert str(m.app_port) in err
    assert "Traceback" not in r.stderr + r.stdout
    # It gave its comet ports back.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", base))


def binary_frames(ids, message: bytes) -> bytes:
    return b"".join(b"\x02" + i.encode() + b"\x00" + message + b"\x00" for i in ids)


def test_frames_a_worker_never_acknowledged_go_to_its_successor(manager):
    """A stopped worker cannot read its link; everything sent to it then is in the link's
    buffers when it is killed. The successor gets all of it: none lost, none twice."""
    m = manager
    old = worker_pids(m)
    ids = ids_for(0, 300, "ack")
    os.kill(old[0], signal.SIGSTOP)
    try:
        with socket.create_connection(("127.0.0.1", m.app_port), timeout=5) as s:
            s.sendall(binary_frames(ids, b"m" * 1000))
        time.sleep(0.3)  # the manager has written them into the link by now
    finally:
        os.kill(old[0], signal.SIGKILL)  # a stopped process dies of it too: no SIGCONT
    wait_until(lambda: worker_pids(m)[0] not in (None, old[0]), timeout=5, what="restart")
    wait_total(m, "queued_messages", len(ids))
    assert m.stats()["workers"][0]["queued_messages"] == len(ids)
