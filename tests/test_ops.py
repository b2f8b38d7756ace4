"""Operations (SPEC "Operations"): GET /metrics, GET /healthz, and the SIGTERM drain, against a
real manager over real sockets. /metrics is read with Prometheus's own parser."""

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import time

import pytest
from conftest import ROOT, http_request
from prometheus_client.parser import text_string_to_metric_families
from test_app import TOKEN, TokenManager
from test_comet import (
    answer,
    id_for,
    ids_for,
    parse,
    send,
    start_poll,
    still_waiting,
    wait_total,
    wait_until,
)
from test_manager import alive, worker_pids
from test_resume import Stream, event, publish

import manager

SPEC_WORKER_GAUGES = ("connections", "waiting", "streams", "queued_messages", "queued_bytes",
                      "rss_bytes", "up")
SPEC_WORKER_COUNTERS = ("accepted", "delivered", "expired", "dropped", "rejected", "restarts")
SPEC_MANAGER_COUNTERS = ("messages_in", "app_rejected")

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def get(m, path: str, token: str | None = None):
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    return http_request(m.app_port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n")


def metrics(m, token: str | None = None) -> dict:
    """{family name: family} from GET /metrics, parsed by prometheus_client."""
    status, headers, body = get(m, "/metrics", token)
    assert status == 200, body
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def per_worker(families: dict, name: str) -> dict:
    """{worker n: value} of a per-worker metric (a counter's family name has no _total)."""
    family = families[name.removesuffix("_total")]
    return {int(s.labels["worker"]): s.value for s in family.samples if s.name == name}


def healthz(m):
    status, _, body = get(m, "/healthz")
    return status, json.loads(body)


def open_polls(m, ids: list) -> list:
    socks = [start_poll(m.port_for(i), i) for i in ids]
    wait_total(m, "waiting", len(ids), timeout=20)
    return socks


def collect(socks: list, deadline: float) -> list:
    """Read every socket to its close: [(seconds of the first byte (monotonic), bytes, error)],
    in the order of `socks`. error is the exception a read raised (a reset), else None."""
    sel = selectors.DefaultSelector()
    got = [[None, b"", None] for _ in socks]
    for k, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, k)
    open_ = len(socks)
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            k, s = key.data, key.fileobj
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                chunk, got[k][2] = b"", e
            if chunk and got[k][0] is None:
                got[k][0] = time.monotonic()
            got[k][1] += chunk
            if not chunk:
                sel.unregister(s)
                open_ -= 1
    sel.close()
    assert not open_, f"{open_} connections still open at the deadline"
    return [tuple(g) for g in got]


def wait_exit(m, timeout: float) -> int:
    try:
        return m.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"manager still running {timeout:.1f} s after the signal") from None


# ---------------------------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------------------------


def test_metrics_has_every_spec_name_with_help_type_and_one_sample_per_worker(manager_factory):
    m = manager_factory(workers=3)
    wait_until(lambda: healthz(m)[0] == 200, 5, what="every worker up")
    status, _, raw = get(m, "/metrics")
    assert status == 200
    text = raw.decode()
    families = metrics(m)
    for short in SPEC_WORKER_GAUGES + SPEC_WORKER_COUNTERS:
        kind = "gauge" if short in SPEC_WORKER_GAUGES else "counter"
        name = f"megacomet_{short}"
        sample = f"{name}_total" if kind == "counter" else name
        assert f"# HELP {sample} " in text and f"# TYPE {sample} {kind}\n" in text
        family = families[name]
        assert family.type == kind and family.documentation
        rows = [s for s in family.samples if s.name == sample]
        assert sorted(s.labels["worker"] for s in rows) == ["0", "1", "2"], rows
        assert all(set(s.labels) == {"worker"} for s in rows)
    for short in SPEC_MANAGER_COUNTERS:
        family = families[f"megacomet_{short}"]
        assert family.type == "counter" and family.documentation
        assert [(s.name, s.labels) for s in family.samples] == [(f"megacomet_{short}_total", {})]
    assert per_worker(families, "megacomet_up") == {0: 1, 1: 1, 2: 1}
    rss = per_worker(families, "megacomet_rss_bytes")
    assert all(v > 1_000_000 for v in rss.values()), rss


def test_metrics_move_with_a_delivery(manager):
    m = manager
    id_ = id_for(1, "metric")
    before = metrics(m)
    s = start_poll(m.port_for(id_), id_)
    wait_total(m, "waiting", 1)
    during = metrics(m)
    assert per_worker(during, "megacomet_waiting") == {0: 0, 1: 1}
    assert per_worker(during, "megacomet_connections")[1] == 1
    send(m, id_, b"hello")
    assert answer(s)[3] == b"hello"
    s.close()
    was = per_worker(before, "megacomet_delivered_total")[1]
    # (counted just after the answer is written: the client may read it first)
    wait_until(lambda: per_worker(metrics(m), "megacomet_delivered_total")[1] == was + 1, 2,
               what="delivered_total + 1")
    after = metrics(m)
    assert per_worker(after, "megacomet_waiting") == {0: 0, 1: 0}
    assert per_worker(after, "megacomet_accepted_total")[1] >= 1
    assert per_worker(after, "megacomet_queued_messages")[1] == 1  # kept in history
    assert after["megacomet_messages_in"].samples[0].value == \
        before["megacomet_messages_in"].samples[0].value + 1


def test_metrics_counters_survive_a_worker_kill_and_restart(manager):
    m = manager
    id_ = id_for(0, "carry")
    s = start_poll(m.port_for(id_), id_)
    wait_total(m, "waiting", 1)
    send(m, id_, b"before the kill")
    assert answer(s)[3] == b"before the kill"
    wait_until(lambda: per_worker(metrics(m), "megacomet_delivered_total")[0] == 1, 2,
               what="delivered_total 1")
    before = metrics(m)
    old = worker_pids(m)[0]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: worker_pids(m)[0] not in (None, old), 5, what="worker 0 restarted")
    wait_until(lambda: healthz(m)[0] == 200, 5, what="healthz 200 again")
    after = metrics(m)
    assert per_worker(after, "megacomet_restarts_total") == {0: 1, 1: 0}
    for name in ("megacomet_delivered_total", "megacomet_accepted_total",
                 "megacomet_rejected_total", "megacomet_expired_total",
                 "megacomet_dropped_total"):
        was, now = per_worker(before, name), per_worker(after, name)
        assert all(now[n] >= was[n] for n in was), (name, was, now)
    assert per_worker(after, "megacomet_delivered_total")[0] == 1
    assert per_worker(after, "megacomet_accepted_total")[0] >= 1


def test_app_token_guards_metrics_but_not_healthz():
    m = TokenManager("--app-token", TOKEN)
    try:
        token_checks(m)
    finally:
        m.stop()


def token_checks(m) -> None:
    status, headers, body = get(m, "/metrics")
    assert status == 401 and headers["www-authenticate"] == "Bearer", body
    assert get(m, "/metrics", "wrong")[0] == 401
    assert "megacomet_up" in metrics(m, TOKEN)
    wait_until(lambda: healthz(m)[0] == 200, 3, what="healthz 200 without a token")
    assert healthz(m)[1] == {"ok": True}
    assert get(m, "/stats")[0] == 401  # (unchanged)
    status, _, body = http_request(
        m.app_port, "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert status == 405, body  # GET only, but no token asked for that either


def test_metrics_and_healthz_are_get_only(manager):
    m = manager
    for path in ("/metrics", "/healthz"):
        status, headers, body = http_request(
            m.app_port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert status == 405 and headers["allow"] == "GET", body


# ---------------------------------------------------------------------------------------------
# /healthz
# ---------------------------------------------------------------------------------------------


def test_healthz_names_a_stopped_worker_within_two_seconds(manager_factory):
    m = manager_factory("--worker-timeout", "60")  # the watchdog must not kill it meanwhile
    wait_until(lambda: healthz(m) == (200, {"ok": True}), 3, what="healthz 200")
    pid = worker_pids(m)[1]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        wait_until(lambda: healthz(m) == (503, {"ok": False, "down": [1]}), 4,
                   what="healthz 503 naming worker 1")
        assert time.monotonic() - t0 < 3.0  # 2 beat intervals, and a beat interval of slack
        assert per_worker(metrics(m), "megacomet_up") == {0: 1, 1: 0}
        row = m.stats()["workers"][1]
        assert row["up"] is True and row["healthy"] is False  # alive, but not serving
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: healthz(m)[0] == 200, 3, what="healthz 200 after SIGCONT")
    assert per_worker(metrics(m), "megacomet_up") == {0: 1, 1: 1}
    assert worker_pids(m)[1] == pid  # the same process: not killed


def test_healthz_names_a_killed_worker_until_its_successor_runs(manager):
    m = manager
    wait_until(lambda: healthz(m)[0] == 200, 3, what="healthz 200")
    old = worker_pids(m)[0]
    os.kill(old, signal.SIGKILL)
    # From its death until the successor's loop first passes (a Python start: tens of ms at
    # least) worker 0 is down; polled every few ms, that is seen.
    seen = wait_until(lambda: healthz(m) == (503, {"ok": False, "down": [0]}), 3,
                      interval=0.002, what="healthz 503 naming worker 0")
    assert seen
    wait_until(lambda: healthz(m) == (200, {"ok": True}), 5, what="healthz 200 again")
    assert worker_pids(m)[0] not in (None, old)


# ---------------------------------------------------------------------------------------------
# Drain
# ---------------------------------------------------------------------------------------------


def test_drain_answers_1000_polls_204_spread_over_drain_seconds(manager_factory):
    drain = 2.0
    m = manager_factory("--drain", str(drain))
    ids = ids_for(0, 500, "drain") + ids_for(1, 500, "drain")
    socks = open_polls(m, ids)
    pids = worker_pids(m)
    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    got = collect(socks, t0 + drain + 3)
    code = wait_exit(m, max(0.1, t0 + drain + 3 - time.monotonic()))
    took = time.monotonic() - t0
    for s in socks:
        s.close()
    assert code == 0
    assert took < drain + 3
    errors = [e for _, _, e in got if e is not None]
    assert not errors, f"{len(errors)} reads failed, e.g. {errors[0]!r}"
    unanswered = sum(1 for _, data, _ in got if not data)
    assert not unanswered, f"{unanswered} connections closed without an answer"
    assert all(parse(data)[0] == 204 for _, data, _ in got)
    times = sorted(t - t0 for t, _, _ in got)
    # Spread over the drain, not in one burst: a tenth in any 100 ms at most, and the middle
    # 80% over more than half the drain.
    assert times[-1] <= drain + 0.5, times[-1]
    assert times[int(0.9 * len(times))] - times[int(0.1 * len(times))] > drain / 2, \
        (times[:5], times[-5:])
    buckets = {}
    for t in times:
        buckets[int(t * 10)] = buckets.get(int(t * 10), 0) + 1
    assert max(buckets.values()) <= len(times) // 10, buckets
    assert not any(alive(p) for p in pids)
    m.stop()
    assert "SIGTERM: draining 1,000 waiting polls and streams over 2 s" in m.output, m.output
    assert "stopped: every worker exited" in m.output, m.output


def test_drain_ends_streams_cleanly_after_their_last_event(manager_factory):
    drain = 1.0
    m = manager_factory("--drain", str(drain))
    streams = []
    for id_ in ids_for(1, 10, "sse-drain"):
        stream = Stream(m, id_).opened()
        mid = publish(m, id_, b"last")
        stream.expect(event(mid, b"last"))
        streams.append(stream)
    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    ends = []
    for stream in streams:  # in the order they began waiting, which is the drain's order
        assert stream.rest(timeout=drain + 2) == b""  # EOF, nothing after the event; a reset
        ends.append(time.monotonic() - t0)            # would raise here
        stream.close()
    assert ends[-1] - ends[0] > drain / 2, ends  # ended by the drain, one by one, not the exit
    assert wait_exit(m, 3.5) == 0


def test_publishes_during_the_drain_are_refused_with_a_clear_error(manager_factory):
    m = manager_factory("--drain", "2")
    id_ = id_for(0, "late")
    s = start_poll(m.port_for(id_), id_)  # the drain lasts while it waits
    wait_total(m, "waiting", 1)
    pub = socket.create_connection(("127.0.0.1", m.app_port), timeout=5)
    pub.sendall(b'{"id": "%s", "message": "before"}\n' % id_.encode())
    lines = pub.makefile("rb")
    assert json.loads(lines.readline())["ok"] is True
    assert answer(s)[3] == b"before"
    s.close()
    s = start_poll(m.port_for(id_), id_)
    wait_total(m, "waiting", 1)
    m.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: healthz(m)[0] == 503, 1, interval=0.01, what="healthz 503 draining")
    assert healthz(m)[1] == {"ok": False, "down": [0, 1], "draining": True}
    head = f"POST /send/{id_} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nlate"
    status, headers, body = http_request(m.app_port, head)
    assert status == 503 and headers["retry-after"] == "1", body
    assert "shutting down" in json.loads(body)["error"]
    pub.sendall(b'{"id": "%s", "message": "late"}\n' % id_.encode())
    reply = json.loads(lines.readline())
    assert reply["ok"] is False and "shutting down" in reply["error"], reply
    pub.sendall(b'{"broadcast": true, "message": "late"}\n')
    assert "shutting down" in json.loads(lines.readline())["error"]
    assert answer(s, timeout=4)[0] == 204  # the waiting poll: 204, not the refused message
    pub.close()
    assert wait_exit(m, 5) == 0


def test_drain_0_answers_everything_at_once(manager_factory):
    m = manager_factory("--drain", "0")
    socks = open_polls(m, ids_for(0, 50, "now") + ids_for(1, 50, "now"))
    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    got = collect(socks, t0 + 3)
    assert all(e is None and parse(data)[0] == 204 for _, data, e in got)
    assert max(t for t, _, _ in got) - t0 < 0.5
    assert wait_exit(m, 3) == 0


def test_new_connections_are_refused_from_the_drain_on(manager_factory):
    m = manager_factory("--drain", "3")
    socks = open_polls(m, [id_for(0, "hold"), id_for(1, "hold")])
    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    # Refused (RST to the SYN: nothing was sent, the client may retry elsewhere) on both
    # ports at once, while the polls are held: one per worker ends ~2 s into a 3 s drain.
    wait_until(lambda: refused(m.base_port) and refused(m.base_port + 1), 1, interval=0.01,
               what="both ports refusing")
    assert time.monotonic() - t0 < 1
    assert all(still_waiting(s, 0.01) for s in socks)
    got = collect(socks, time.monotonic() + 5)
    assert all(parse(data)[0] == 204 for _, data, _ in got)
    assert wait_exit(m, 3) == 0


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_a_second_signal_ends_the_drain_at_once(manager_factory):
    m = manager_factory("--drain", "30")
    socks = open_polls(m, ids_for(0, 20, "hurry") + ids_for(1, 20, "hurry"))
    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    m.proc.send_signal(signal.SIGINT)  # Ctrl-C after a `kill`: either signal hurries it
    got = collect(socks, t0 + 3)
    assert all(e is None and parse(data)[0] == 204 for _, data, e in got)
    assert wait_exit(m, max(0.1, t0 + 3 - time.monotonic())) == 0
    m.stop()
    assert "SIGINT again: ending the drain now" in m.output, m.output


def test_a_worker_that_hangs_in_the_drain_is_killed_and_the_manager_exits_0(manager_factory):
    drain = 0.5
    m = manager_factory("--drain", str(drain), "--worker-timeout", "60")
    # Stopped once its SIGTERM handler is in place: without one, SIGTERM kills even a
    # stopped process.
    wait_until(lambda: healthz(m)[0] == 200, 5, what="every worker up")
    pids = worker_pids(m)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    assert wait_exit(m, drain + 3) == 0
    assert time.monotonic() - t0 > drain + 1  # it waited for worker 1 before killing it
    wait_until(lambda: not any(alive(p) for p in pids), 2, what="workers gone")
    m.stop()
    assert re.search(r"worker 1 \(pid \d+\) still running 2\.\d s after SIGTERM "
                     r"\(--drain 0\.5\); killing it \(SIGKILL\)", m.output), m.output


def test_sigterm_to_one_worker_drains_it_and_its_successor_serves_the_port(manager_factory):
    m = manager_factory("--drain", "0.5")
    id_ = id_for(0, "alone")
    s = start_poll(m.port_for(id_), id_)
    wait_total(m, "waiting", 1)
    old = worker_pids(m)
    os.kill(old[0], signal.SIGTERM)
    assert answer(s, timeout=3)[0] == 204
    wait_until(lambda: worker_pids(m)[0] not in (None, old[0]), 5, what="worker 0 restarted")
    assert worker_pids(m)[1] == old[1]
    s = start_poll(m.port_for(id_), id_)  # its listener was stopped: a new one took the port
    wait_total(m, "waiting", 1)
    send(m, id_, b"after")
    assert answer(s)[3] == b"after"
    assert m.stats()["workers"][0]["restarts"] == 1


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_drain_option_is_checked(value, capsys):
    with pytest.raises(SystemExit) as e:
        manager.parse_args(["--drain", value])
    assert e.value.code == 2
    assert "--drain" in capsys.readouterr().err


def test_systemd_waits_longer_than_the_default_drain():
    unit = (ROOT / "tuning" / "megacomet.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    assert stop > manager.parse_args([]).drain + 3


def test_a_manager_whose_stdout_is_gone_still_drains_and_exits_0(manager_factory):
    """journald restarted, or the pipe's reader died: the drain's log lines fail to write,
    and must not stop the stop."""
    m = manager_factory("--drain", "0.5")
    socks = open_polls(m, [id_for(0, "deaf"), id_for(1, "deaf")])
    pids = worker_pids(m)
    m.proc.stdout.close()  # (so the fixture will not stop it: the finally below does)
    try:
        t0 = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        got = collect(socks, t0 + 3)
        assert all(e is None and parse(data)[0] == 204 for _, data, e in got)
        assert wait_exit(m, max(0.1, t0 + 3.5 - time.monotonic())) == 0
        assert not any(alive(p) for p in pids)
    finally:
        if m.proc.poll() is None:
            m.proc.kill()  # its workers exit when their links close
            m.proc.wait()
