"""client.py: the planning and parsing as pure functions, then whole runs against a real manager
on loopback (small counts, every run bounded by --max-time and a subprocess timeout)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, Manager, free_port_block, http_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import client
import server
from client import (
    ChildProc,
    Histogram,
    Report,
    likely_cause,
    location_port,
    message_fields,
    pair_limit,
    parse_response,
    parse_source_ips,
    per_port_counts,
    plan_procs,
    plan_sources,
    slot,
    split_range,
)
from server import owner

CLIENT = [sys.executable, str(ROOT / "client.py")]

# ---------------------------------------------------------------------------------------------
# Source addresses and the spread plan
# ---------------------------------------------------------------------------------------------


def test_source_ips_range_list_short_form_and_cidr():
    assert parse_source_ips("127.0.0.2-127.0.0.4") == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert parse_source_ips("127.0.0.2-4") == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert parse_source_ips("10.0.0.1, 10.0.0.7") == ["10.0.0.1", "10.0.0.7"]
    assert parse_source_ips("10.0.0.255-10.0.1.1") == ["10.0.0.255", "10.0.1.0", "10.0.1.1"]
    assert parse_source_ips("10.1.0.0/30") == ["10.1.0.1", "10.1.0.2"]
    assert parse_source_ips("10.0.0.1,10.0.0.1-2") == ["10.0.0.1", "10.0.0.2"]   # no duplicates


@pytest.mark.parametrize("bad", ["", ",", "127.0.0.4-127.0.0.2", "300.0.0.1", "a.b.c.d",
                                 "::1", "10.0.0.0-10.2.0.0"])
def test_source_ips_refused(bad):
    with pytest.raises(ValueError):
        parse_source_ips(bad)


def test_pair_limit_is_under_the_even_half_of_the_port_range():
    assert pair_limit((32768, 60999)) == int(28232 // 2 * client.PAIR_FILL)
    assert pair_limit((1024, 65535)) < 32256
    assert pair_limit((5000, 5000)) == 1


def test_plan_sources_needs_none_while_one_address_is_enough():
    sources, needed, warning = plan_sources(10_000, (32768, 60999), None, loopback=True)
    assert (sources, needed, warning) == ([], 1, None)


def test_plan_sources_picks_loopback_addresses_itself():
    limit = pair_limit((32768, 60999))
    sources, needed, warning = plan_sources(2 * limit + 1, (32768, 60999), None, loopback=True)
    assert needed == 3 and warning is None
    assert sources == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def test_plan_sources_warns_when_too_few_addresses():
    limit = pair_limit((32768, 60999))
    _, needed, warning = plan_sources(3 * limit, (32768, 60999), ["10.0.0.1"], loopback=False)
    assert needed == 3
    assert warning and "--source-ips" in warning and "\n" not in warning
    _, _, warning = plan_sources(3 * limit, (32768, 60999), None, loopback=False)
    assert warning and "--source-ips" in warning
    sources, _, warning = plan_sources(3 * limit, (32768, 60999), ["10.0.0.1", "10.0.0.2",
                                                                   "10.0.0.3"], loopback=False)
    assert warning is None and len(sources) == 3


def test_plan_procs_splits_by_the_open_file_limit():
    assert plan_procs(250_000, 20_000) == (13, None)      # 19,900 usable each
    assert plan_procs(3000, 20_000) == (1, None)
    assert plan_procs(5, 20_000, override=16)[0] == 5     # never an empty process
    procs, warning = plan_procs(100_000, 20_000, override=2)
    assert procs == 2 and "EMFILE" in warning


@given(st.integers(1, 5000), st.integers(1, 40))
def test_split_range_covers_every_id_once(n, parts):
    blocks = split_range(n, parts)
    assert [i for lo, hi in blocks for i in range(lo, hi)] == list(range(n))


def test_per_port_counts_follow_the_owner_function():
    counts = per_port_counts(b"a", 1000, 3)
    assert sum(counts) == 1000
    assert counts[0] == sum(owner(b"a%d" % i, 3) == 0 for i in range(1000))


@pytest.mark.parametrize("prefix", [b"a", b"m", b"zz~", b"x" * 40])  # x * 40: x31 wraps often
@pytest.mark.parametrize("conns", [1, 9, 10, 11, 1001, 23457])
def test_per_port_counts_one_hash_per_ten_ids_counts_what_each_hash_would(prefix, conns):
    for workers, nodes in ((1, 1), (3, 1), (51, 1), (7, 5)):
        one_by_one = [0] * (workers * nodes)
        for i in range(conns):
            node, w = slot(b"%s%d" % (prefix, i), nodes, workers)
            one_by_one[node * workers + w] += 1
        assert per_port_counts(prefix, conns, workers, nodes) == one_by_one


# ---------------------------------------------------------------------------------------------
# The histogram
# ---------------------------------------------------------------------------------------------


def test_histogram_percentiles_within_bucket_precision():
    h = Histogram()
    for v in range(1, 100_001):
        h.record(v)
    for q, exact in ((0.5, 50_000), (0.99, 99_000), (0.999, 99_900)):
        got = h.percentile(q)
        assert exact <= got <= exact * (1 + 1 / Histogram.SUB)
    assert h.max == 100_000 and h.min == 1 and h.count == 100_000
    assert h.percentile(1.0) == 100_000


def test_histogram_small_values_are_exact_and_empty_is_zero():
    assert Histogram().percentile(0.99) == 0
    h = Histogram()
    for v in (3, 3, 3, 7):
        h.record(v)
    assert h.percentile(0.5) == 3 and h.percentile(0.99) == 7


@given(st.integers(0, 1 << 45))
def test_histogram_bucket_holds_its_value(v):
    lo, hi = Histogram.bounds(Histogram.index(v))
    if v <= Histogram.TOP:
        assert lo <= v <= hi
        assert hi - lo <= max(1, lo // Histogram.SUB)
    assert 0 <= Histogram.index(v) < Histogram.SIZE


@given(st.lists(st.integers(0, 10**9), max_size=50), st.lists(st.integers(0, 10**9), max_size=50))
def test_histogram_merge_equals_recording_everything(a, b):
    ha, hb, hall = Histogram(), Histogram(), Histogram()
    for v in a:
        ha.record(v)
        hall.record(v)
    for v in b:
        hb.record(v)
        hall.record(v)
    ha.merge(Histogram.from_json(json.loads(json.dumps(hb.to_json()))))
    assert ha.counts == hall.counts and ha.count == hall.count and ha.max == hall.max
    for q in (0.5, 0.99, 0.999):
        assert ha.percentile(q) == hall.percentile(q)


# ---------------------------------------------------------------------------------------------
# Reports: a child's counters, added up by the parent
# ---------------------------------------------------------------------------------------------


def hist_of(*values):
    h = Histogram()
    for v in values:
        h.record(v)
    return h


def test_report_merge_adds_each_field_by_its_rule():
    a = Report(k=3, final=True, open=2, opened=10, failed={"refused": 1},
               errnos={"ECONNREFUSED": 1}, status={"200": 4}, per_source=[1, 2],
               ramp_t0=5.0, last_first_open_t=9.0, send_done=True, hist=hist_of(5))
    b = Report(k=4, final=True, open=5, opened=1, failed={"refused": 2, "timeout": 1},
               status={"204": 1}, per_source=[3], ramp_t0=4.0, last_first_open_t=7.0,
               send_done=False, hist=hist_of(7000, 9))
    t = Report.total([a, b])
    assert t.k is None                      # the child index is not a counter
    assert t.open == 7 and t.opened == 11
    assert t.failed == {"refused": 3, "timeout": 1} and t.errnos == {"ECONNREFUSED": 1}
    assert t.status == {"200": 4, "204": 1} and t.per_source == [4, 2]
    assert t.ramp_t0 == 4.0 and t.last_first_open_t == 9.0
    assert t.final is True and t.send_done is False
    assert t.hist.count == 3 and t.hist.max == 7000 and t.hist.min == 5
    # The inputs are left as they were.
    assert a.failed == {"refused": 1} and a.hist.count == 1 and b.hist.count == 2
    # 0.0 is "not yet", not the earliest moment; a lone child's total is not that child.
    assert Report(ramp_t0=0.0).merge(Report(ramp_t0=4.0)).ramp_t0 == 4.0
    assert Report.total([a]).k is None and Report.total([]).open == 0


def test_report_json_round_trip():
    a = Report(k=1, final=True, open=3, failed={"reset": 2}, status={"307": 1},
               per_source=[0, 3], ramp_t0=1.5, hist=hist_of(1, 2, 3000))
    b = Report.from_json(json.loads(json.dumps(a.to_json())))
    assert b.to_json() == a.to_json() and b.hist.percentile(0.5) == a.hist.percentile(0.5)
    assert Report.from_json(Report(k=0).to_json()).hist is None


@pytest.mark.parametrize("bad", [
    [], "report", None, {"open": -1}, {"open": "3"}, {"open": True}, {"nope": 1},
    {"failed": {"x": "y"}}, {"failed": []}, {"per_source": [1, -2]}, {"final": 1},
    {"ramp_t0": "soon"}, {"ramp_t0": float("nan")}, {"k": 1.5},
    {"hist": {"buckets": [[99999, 1]], "count": 1, "total": 1, "max": 1, "min": 1}},
    {"hist": {"buckets": [[-1, 1]], "count": 1, "total": 1, "max": 1, "min": 1}},
    {"hist": {"buckets": [[3, 1]], "count": 2, "total": 1, "max": 1, "min": 1}},
    {"hist": {"buckets": []}}, {"hist": [1, 2]},
])
def test_report_from_json_refuses_what_a_child_did_not_write(bad):
    with pytest.raises(ValueError):
        Report.from_json(bad)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in client.fields(Report)]), JSON,
                       max_size=4))
def test_report_from_json_raises_only_valueerror(d):
    try:
        Report.from_json(d)
    except ValueError:
        pass


def small_config(**kw) -> client.Config:
    base = dict(prefix="t", host="127.0.0.1", addr="127.0.0.1", loopback=True, conns=10,
                workers=1, base_port=1, procs=1, sources=(), rate=0.0, hold=0.0, max_time=10.0,
                connect_timeout=1.0, stall=1.0, send=0, send_rate=0.0, grace=0.0,
                app_host="127.0.0.1", app_addr="127.0.0.1", app_port=1)
    return client.Config(**{**base, **kw})


def test_a_100_kb_final_report_goes_whole_through_a_full_pipe_and_signals():
    """Over PIPE_BUF a write may be taken in part (a full pipe, a signal): the rest must follow,
    and the parent must read it as one report. The reader here is slow, and the writer is
    signalled all the while, as a child is by a second Ctrl-C."""
    r, w = os.pipe()
    errnos = {f"E{i:05d}": i for i in range(7000)}
    old = signal.signal(signal.SIGUSR1, lambda *a: None)   # like the child's own handlers
    pid = os.fork()     # (set before the fork: the first signal may come at once)
    if pid == 0:
        try:
            os.close(r)
            child = client.Child(0, small_config(send=10), 0, 10, -1, w)
            os.set_blocking(w, False)                           # as child_main leaves it
            child.errnos = errnos
            child.sender.hist.record(1234)
            child.report(final=True)
            os._exit(0)
        except BaseException:
            os._exit(1)
    signal.signal(signal.SIGUSR1, old)
    os.close(w)
    os.set_blocking(r, False)
    kid = ChildProc(0, pid, -1, r)
    deadline = time.monotonic() + 20
    try:
        while not kid.eof and time.monotonic() < deadline:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            time.sleep(0.002)
            try:
                data = os.read(r, 4096)     # one page at a time: the pipe stays full
            except BlockingIOError:
                continue
            kid.feed(data)
    finally:
        os.close(r)
        status = kid.reap(10)
    assert status == 0 and kid.failure is None
    assert len(json.dumps(kid.final.to_json())) > 100_000
    assert kid.final.errnos == errnos and kid.final.hist.count == 1


def test_a_child_killed_in_the_middle_of_its_report_is_a_failed_child():
    r, w = os.pipe()
    line = json.dumps(Report(k=0, final=True, open=3, hist=hist_of(5)).to_json()).encode()
    pid = os.fork()
    if pid == 0:
        os.write(w, line[:len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    kid = ChildProc(0, pid, -1, r)
    try:
        kid.read()          # a blocking fd: reads to the end
    finally:
        os.close(r)
    assert kid.eof and kid.final is None and kid.last is None
    assert kid.failure.startswith("client process 0 died in the middle of a report")
    assert client.describe_exit(kid.reap(5)) == "killed by SIGKILL"


@pytest.mark.parametrize("line, words", [
    (b"\x16\x03\x01 not json", "unreadable report"),
    (b"\xff\xfe{}", "unreadable report"),
    (b"[1, 2]", "unreadable report"),
    (b"[" * 100_000, "unreadable report"),
    (b'{"k": 2, "open": -3}', "unreadable report"),
    (b'{"k": 5, "open": 3}', "it says it is child 5"),
    (b'{"crash": "Traceback ...\\nZeroDivisionError: division by zero\\n"}',
     "crashed: ZeroDivisionError: division by zero"),
])
def test_a_child_that_writes_something_else_is_a_failed_child(line, words, capsys):
    kid = ChildProc(2, 0, -1, -1)
    kid.feed(b'{"k": 2, "open": 1}\n{"k": 2, "op')     # a report split over two reads
    kid.feed(b'en": 4}\n')
    assert kid.last.open == 4 and kid.failure is None
    kid.feed(line + b"\n" + json.dumps(Report(k=2, final=True).to_json()).encode() + b"\n")
    assert kid.failure.startswith("client process 2 ") and words in kid.failure
    assert kid.final is None        # nothing after the bad line is believed
    kid.feed(b"")
    assert kid.eof and words in kid.failure


def test_a_report_line_without_end_is_cut_off(monkeypatch):
    monkeypatch.setattr(client, "REPORT_MAX", 1000)
    kid = ChildProc(0, 0, -1, -1)
    kid.feed(b"x" * 600)
    assert kid.failure is None
    kid.feed(b"x" * 600)
    assert "over 1,000 bytes" in kid.failure and kid.buf == b""


# ---------------------------------------------------------------------------------------------
# Responses and messages
# ---------------------------------------------------------------------------------------------

OK = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n"
      b"Connection: close\r\n\r\nhello")


def test_parse_response_whole_partial_and_cut():
    assert parse_response(OK, False) == (200, None, b"hello")
    assert parse_response(OK[:-1], False) is None
    with pytest.raises(ValueError):
        parse_response(OK[:-1], True)
    with pytest.raises(ValueError):
        parse_response(b"", True)
    with pytest.raises(ValueError):
        parse_response(b"\x16\x03\x01 garbage\r\n\r\n", False)
    redirect = (b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:8003/a1.js\r\n"
                b"Content-Length: 0\r\n\r\n")
    assert parse_response(redirect, False) == (307, b"http://127.0.0.1:8003/a1.js", b"")
    no_length = b"HTTP/1.0 200 OK\r\n\r\nbody"
    assert parse_response(no_length, False) is None
    assert parse_response(no_length, True) == (200, None, b"body")


# What a worker sends, built by the worker's own code (server.response_head, its tail).
TAIL = b"Cache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n"


def real(status, body=b"", ctype=server.TEXT, extra=b""):
    return server.response_head(status, len(body), ctype, TAIL, extra) + body


REAL = [
    real(200, b"t=12;seq=3"), real(200), real(204),
    real(307, extra=b"Location: http://127.0.0.1:8003/a1.js?x=1\r\n"),
    real(200, server.jsonp_body(b"cb", b"\r\n\r\nhi", b"1-0"), server.JS),
    real(409, b"pushed out: a 5th poll on this id\r\n\r\n"),
]


@given(st.sampled_from(REAL), st.data())
def test_parse_response_any_split_same_answer(raw, data):
    """Read in pieces as the client reads them: no prefix gives an answer (or an error) before
    the whole response is in, a prefix cut by the close is an error, and the whole gives the
    answer the response means, with or without the close behind it."""
    whole = parse_response(raw, True)
    status = int(raw[9:12])
    body = raw[raw.index(b"\r\n\r\n") + 4:]
    location = b"http://127.0.0.1:8003/a1.js?x=1" if status == 307 else None
    assert whole == (status, location, body)
    for cut in data.draw(st.lists(st.integers(0, len(raw) - 1), max_size=8)):
        assert parse_response(raw[:cut], False) is None
        with pytest.raises(ValueError):
            parse_response(raw[:cut], True)
    assert parse_response(raw, False) == whole


@given(st.binary(max_size=200), st.booleans())
def test_parse_response_never_raises_anything_else(data, eof):
    try:
        parse_response(data, eof)
    except ValueError:
        pass


def test_location_port_and_message_fields():
    assert location_port(b"http://127.0.0.1:8003/a1.js") == 8003
    assert location_port(b"http://[::1]:8001/x.js") == 8001
    assert location_port(b"http://example.com/x.js") is None
    assert location_port(None) is None
    assert message_fields(b"t=123;seq=7") == (123, 7)
    assert message_fields(b"hello") is None
    assert message_fields(b"t=12x;seq=1") is None


def test_likely_cause_names_the_biggest_failure():
    failed = dict.fromkeys(client.CAUSES, 0)
    assert likely_cause(100, 100, failed, {}, None, 100) is None
    assert "before the ramp finished" in likely_cause(100, 50, failed, {}, None, 50)
    for cause, words in (("EMFILE", "client's open-file limit"), ("EADDRNOTAVAIL",
                         "--source-ips"), ("refused", "refused"), ("timeout", "somaxconn")):
        f = dict(failed, **{cause: 5, "reset": 1})
        assert words in likely_cause(100, 50, f, {}, None, 50)
    # The server holds fewer than we have open: its accept queue, whatever else we saw.
    cause = likely_cause(1000, 1000, failed, {}, {"connections": 368}, 1000)
    assert "open-file limit" in cause and "368" in cause
    assert likely_cause(1000, 1000, failed, {}, {"connections": 1005}, 1000) is None


def summary_of(**kw) -> dict:
    """The fields of a summary that the verdict reads: a run that did all it was asked."""
    return {"stopped_by": "done", "failed_processes": [], "cause": None, "peak_open": 100,
            "ids_opened": 100, "target": 100, "send_asked": 0, "sent": 0, "received": 0,
            "lost": 0, "unsendable": 0, "unsendable_causes": {}, "app": "127.0.0.1:9000",
            "grace_s": 5.0, **kw}


def test_verdict_ok_only_when_everything_asked_was_done():
    assert client.shortfalls(summary_of()) == [] and client.exit_status(summary_of()) == 0
    sent = summary_of(send_asked=1000, sent=1000, received=1000)
    assert client.exit_status(sent) == 0
    # stopped by --max-time after doing it all is still done
    assert client.exit_status(summary_of(stopped_by="max-time")) == 0


@pytest.mark.parametrize("kw, status, line", [
    (dict(cause="server refused: not listening on that port", peak_open=0, ids_opened=0),
     1, "only 0 of 100 connections opened: server refused: not listening on that port"),
    (dict(cause="server accepted only 368 of this client's 1,000 open connections (...)"),
     1, "server accepted only 368 of this client's 1,000 open connections (...)"),
    (dict(send_asked=1000, sent=1000, received=990, lost=10),
     1, "10 of 1,000 messages sent were not received within --grace 5 s"),
    (dict(send_asked=1000, sent=0, unsendable=1000, unsendable_causes={"refused": 1000}),
     1, "1,000 of 1,000 messages could not be sent: the app port 127.0.0.1:9000 refused the "
        "connection (is the manager running? --app-port right?)"),
    (dict(send_asked=500, sent=300, received=300, unsendable=200, stopped_by="max-time",
          unsendable_causes={"closed": 50, "run stopped": 150}),
     1, "200 of 500 messages could not be sent: the run stopped first (max-time) (150), "
        "the app port 127.0.0.1:9000 closed the connection (the manager refused frames: see "
        "its log and app_rejected in its /stats) (50)"),
    (dict(send_asked=10, unsendable=10, unsendable_causes={"EHOSTUNREACH": 10}),
     1, "10 of 10 messages could not be sent: the app port 127.0.0.1:9000: EHOSTUNREACH"),
    (dict(failed_processes=["client process 3 crashed: ZeroDivisionError"]),
     1, "client process 3 crashed: ZeroDivisionError"),
    (dict(stopped_by="SIGINT"), 130, "interrupted by SIGINT"),
    (dict(stopped_by="SIGTERM", cause="stopped before the ramp finished", peak_open=5,
          ids_opened=7),
     143, "interrupted by SIGTERM; only 7 of 100 connections opened: stopped before the ramp "
          "finished"),
])
def test_verdict_names_what_was_missed(kw, status, line):
    s = summary_of(**kw)
    assert client.exit_status(s) == status
    assert "; ".join(client.shortfalls(s)) == line


# ---------------------------------------------------------------------------------------------
# Whole runs against a real manager
# ---------------------------------------------------------------------------------------------


def run_client(m, *args, tmp_path, timeout=30, app_port=None, expect=0):
    """Run client.py to its end; returns (json summary, stdout + stderr)."""
    out = tmp_path / "summary.json"
    cmd = [*CLIENT, *args, "--base-port", str(m.base_port),
           "--app-port", str(app_port or m.app_port), "--max-time", "20", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert expect is None or p.returncode == expect, p.stdout + p.stderr
    return json.loads(out.read_text()), p.stdout + p.stderr


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_help_works():
    p = subprocess.run([*CLIENT, "--help"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0 and "--source-ips" in p.stdout


def test_no_server_is_one_clear_line():
    port = free_port_block(1)
    p = subprocess.run([*CLIENT, "a", "127.0.0.1", "--base-port", str(port)],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "--workers" in p.stderr


def test_thousands_of_polls_over_two_processes(manager_factory, tmp_path):
    m = manager_factory()
    out = tmp_path / "s.json"
    cmd = [*CLIENT, "a", "127.0.0.1", "--conns", "3000", "--procs", "2", "--hold", "30",
           "--base-port", str(m.base_port), "--app-port", str(m.app_port), "--json", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        assert wait_for(lambda: m.stats()["totals"]["waiting"] == 3000, 15), m.stats()["totals"]
        assert len(m.stats()["workers"]) == 2
        assert all(w["waiting"] > 1000 for w in m.stats()["workers"])   # both ports used
        time.sleep(1.2)     # a progress line
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)       # ends the hold early, like Ctrl-C
        output, _ = p.communicate(timeout=5)
        assert time.monotonic() - t0 < 2.0
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 128 + signal.SIGTERM, output
    assert output.rstrip().endswith("client.py: interrupted by SIGTERM")
    s = json.loads(out.read_text())
    assert s["procs"] == 2 and s["workers"] == 2
    assert s["ids_opened"] == 3000 and s["peak_open"] == 3000 and s["opened"] >= 3000
    assert not any(s["failed"].values())
    assert s["ramp_end"] == "complete" and s["stopped_by"] == "SIGTERM"
    assert s["server"]["waiting"] >= 3000 and s["cause"] is None
    assert s["connect_rate"] > 0 and s["missing_reports"] == []
    assert "open 3,000/3,000" in output      # the progress line, not a TTY: whole lines
    assert wait_for(lambda: m.stats()["totals"]["connections"] == 0, 5)


def test_source_ips_each_used(manager_factory, tmp_path):
    m = manager_factory()
    out = tmp_path / "s.json"
    cmd = [*CLIENT, "s", "127.0.0.1", "--conns", "900", "--source-ips", "127.0.0.2-127.0.0.4",
           "--hold", "30", "--base-port", str(m.base_port), "--app-port", str(m.app_port),
           "--json", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        assert wait_for(lambda: m.stats()["totals"]["waiting"] == 900, 15)
        ss = subprocess.run(["ss", "-Htn", "state", "established", "(", "dport", ">=",
                             f":{m.base_port}", "and", "dport", "<=",
                             f":{m.base_port + 1}", ")"],
                            capture_output=True, text=True, timeout=10)
        if ss.returncode == 0:      # ss is iproute2: skip this half where it is missing
            ours = {"127.0.0.2": 0, "127.0.0.3": 0, "127.0.0.4": 0}
            for line in ss.stdout.splitlines():
                local = line.split()[2].rsplit(":", 1)[0]
                if local in ours:   # (other tests on this box may hold 127.0.0.1 sockets)
                    ours[local] += 1
            assert sum(ours.values()) == 900, ours
            assert all(250 <= n <= 350 for n in ours.values()), ours
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    s = json.loads(out.read_text())
    assert s["source_ips"] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert all(250 <= n <= 350 for n in s["per_source"].values()), s["per_source"]
    assert s["ids_opened"] == 900


def test_a_previous_runs_queued_messages_are_not_counted(manager_factory, tmp_path):
    """Run 1 sends to ids that end up queued (its client is gone); run 2 with the same ids
    gets them on its first polls: they are another run's, not received or duplicates."""
    m = manager_factory()
    run_client(m, "st", "127.0.0.1", "--conns", "100", "--send", "300", "--send-rate", "0",
               "--grace", "0", tmp_path=tmp_path, expect=None)
    s, _ = run_client(m, "st", "127.0.0.1", "--conns", "100", "--send", "300",
                      "--send-rate", "1000", tmp_path=tmp_path)
    assert s["sent"] == 300 and s["received"] == 300 and s["lost"] == 0
    assert s["duplicates"] == 0 and s["latency_ms"]["count"] == 300


@pytest.mark.parametrize("args, message", [
    (["--source-ips", "10.99.99.1"], "cannot bind 10.99.99.1"),
    (["--source-ips", "10.0.0.0/8"], "over 65536"),
    (["--json", "/nonexistent/dir/x.json"], "--json"),
    (["--workers", "0"], "argument --workers: expected a whole number 1 or more, got '0'"),
    (["--rate", "-5"], "argument --rate: expected a number 0 or more, got '-5'"),
    (["--rate", "abc"], "argument --rate: expected a number 0 or more, got 'abc'"),
    (["--send", "-5"], "expected a whole number 0 or more, got '-5'"),
    (["--send", "1.5"], "expected a whole number 0 or more, got '1.5'"),
    (["--rate", "nan"], "argument --rate: expected a finite number, got 'nan'"),
    (["--hold", "inf"], "finite"),
    (["--grace=-inf"], "finite"),
    (["--max-time", "0"], "argument --max-time: expected a number more than 0, got '0'"),
    (["--connect-timeout", "0"], "more than 0"),
    (["--app-port", "70000"], "argument --app-port: expected a port number 1-65535, got '70000'"),
])
def test_bad_options_fail_at_once_with_a_clear_line(args, message):
    p = subprocess.run([*CLIENT, "x", "127.0.0.1", "--workers", "2", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 2 and message in p.stderr, p.stdout + p.stderr


def test_send_delivers_everything(manager_factory, tmp_path):
    m = manager_factory()
    s, output = run_client(m, "m", "127.0.0.1", "--conns", "500", "--procs", "2",
                           "--send", "1000", "--send-rate", "2000", tmp_path=tmp_path)
    assert s["sent"] == 1000 and s["received"] == 1000 and s["lost"] == 0
    assert s["duplicates"] == 0 and s["unsendable"] == 0
    assert s["status"].get("200") == 1000 and s["ids_opened"] == 500
    lat = s["latency_ms"]
    assert lat["count"] == 1000 and 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert s["msgs_per_s"] > 500
    assert "lost 0" in output and "p99" in output
    assert "client.py:" not in output and s["exit_status"] == 0 and s["shortfalls"] == []


def test_an_app_port_that_refuses_makes_every_message_unsendable(manager_factory, tmp_path):
    m = manager_factory()
    closed = free_port_block(1)     # nothing listens there
    for rate in ("0", "500"):       # all at once; paced over 0.6 s, reconnecting meanwhile
        s, output = run_client(m, "u", "127.0.0.1", "--conns", "50", "--send", "300",
                               "--send-rate", rate, tmp_path=tmp_path, app_port=closed,
                               expect=1)
        assert s["ids_opened"] == 50
        assert s["sent"] == 0 and s["received"] == 0 and s["lost"] == 0
        assert s["unsendable"] == 300 and s["unsendable_causes"] == {"refused": 300}
        assert "unsendable 300 (refused 300)" in output
        assert output.rstrip().splitlines()[-1] == (
            f"client.py: 300 of 300 messages could not be sent: the app port "
            f"127.0.0.1:{closed} refused the connection (is the manager running? "
            f"--app-port right?)")


class TokenManager(Manager):
    """A manager with --app-token T: its /stats (used by wait_ready) needs the token."""

    def __init__(self):
        super().__init__("--app-token", "T")

    def stats(self) -> dict:
        status, _, body = http_request(self.app_port, "GET /stats HTTP/1.1\r\nHost: x\r\n"
                                                      "Authorization: Bearer T\r\n\r\n")
        assert status == 200, body
        return json.loads(body)


def test_a_manager_that_closes_binary_frames_makes_them_unsendable(tmp_path):
    """--app-token makes the manager close every binary-frame connection (as it will when a
    worker's outbox is over its bound): what was written to it and never came is unsendable,
    with the cause, not lost; the sender connects again and again meanwhile."""
    m = TokenManager()
    try:
        s, output = run_client(m, "v", "127.0.0.1", "--conns", "50", "--procs", "1",
                               "--send", "300", "--send-rate", "500", "--grace", "0.5",
                               tmp_path=tmp_path, expect=1)
        assert m.stats()["manager"]["app_rejected"] >= 3    # closed, connected again, ...
    finally:
        m.stop()
    assert s["received"] == 0 and s["sent"] == 0 and s["lost"] == 0
    assert s["unsendable"] == 300
    assert set(s["unsendable_causes"]) <= {"closed", "reset"}, s["unsendable_causes"]
    assert "300 of 300 messages could not be sent: the app port" in output
    assert "the manager refused frames" in output


class ClosingProxy:
    """The app port as the manager will be when it refuses: the first binary-frame connection
    is closed after `cut` bytes (passed on; the rest never is), every other one is passed on
    whole, both ways (the client asks GET /stats there too)."""

    def __init__(self, upstream: int, cut: int):
        self.upstream, self.cut = upstream, cut
        self.listener = socket.create_server(("127.0.0.1", free_port_block(1)))
        self.port = self.listener.getsockname()[1]
        self.binary = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.pipe, args=(conn,), daemon=True).start()

    def pipe(self, conn):
        with conn, socket.create_connection(("127.0.0.1", self.upstream)) as up:
            data = conn.recv(65536)
            cut = False
            if data[:1] == b"\x02":
                with self.lock:
                    self.binary += 1
                    cut = self.binary == 1
            else:
                threading.Thread(target=self.back, args=(up, conn), daemon=True).start()
            passed = 0
            while data:
                if cut:
                    data = data[:self.cut - passed]
                up.sendall(data)
                passed += len(data)
                if cut and passed >= self.cut:
                    return
                data = conn.recv(65536)

    def back(self, up, conn):
        try:
            while data := up.recv(65536):
                conn.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()


def test_the_sender_reconnects_after_a_close_and_goes_on(manager_factory, tmp_path):
    m = manager_factory()
    proxy = ClosingProxy(m.app_port, cut=3000)
    try:
        s, output = run_client(m, "w", "127.0.0.1", "--conns", "100", "--procs", "1",
                               "--send", "600", "--send-rate", "600", "--grace", "2",
                               tmp_path=tmp_path, app_port=proxy.port, expect=1)
    finally:
        proxy.close()
    assert proxy.binary >= 2
    assert s["sent"] + s["unsendable"] == 600
    assert s["received"] == s["sent"] and s["lost"] == 0 and s["duplicates"] == 0
    assert s["unsendable"] > 0 and set(s["unsendable_causes"]) <= {"closed", "reset"}
    assert s["received"] > 300          # the schedule went on after the close
    assert s["latency_ms"]["count"] == s["received"]
    assert f"{s['unsendable']} of 600 messages could not be sent" in output


def test_a_full_outbox_closes_the_app_connection_and_nothing_taken_is_lost(manager_factory,
                                                                             tmp_path):
    """The manager's own refusal: worker 0 is stopped, so its outbox (--queue-bytes) fills
    within the Sender's first write, and the manager closes the binary-frame connection at the
    first frame it cannot take. The frames before it were taken and arrive once the worker is
    back (none lost); the rest are unsendable, by cause."""
    # 5,000 bytes: a few dozen frames. The manager's first read of the app connection (taken
    # before the flow gate) may hold only a few hundred of the 3,000 frames, depending on how
    # the client's writes fall: it must overflow the outbox all the same, or the gate (closed
    # past half the bound) holds the publisher until the worker is back, and nothing refuses.
    m = manager_factory("--queue-bytes", "5000", "--worker-timeout", "60")
    pid0 = m.stats()["workers"][0]["pid"]
    out = tmp_path / "s.json"
    cmd = [*CLIENT, "q", "127.0.0.1", "--conns", "200", "--procs", "1", "--workers", "2",
           "--send", "3000", "--send-rate", "0", "--grace", "2", "--max-time", "20",
           "--base-port", str(m.base_port), "--app-port", str(m.app_port), "--json", str(out)]
    os.kill(pid0, signal.SIGSTOP)   # its polls wait in the accept queue meanwhile
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        try:
            assert wait_for(lambda: m.stats()["manager"]["app_refused_full"] >= 1, 15)
        finally:
            os.kill(pid0, signal.SIGCONT)
        output, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 1, output
    s = json.loads(out.read_text())
    assert s["unsendable"] > 0 and set(s["unsendable_causes"]) <= {"closed", "reset"}, s
    assert s["sent"] > 0 and s["sent"] + s["unsendable"] == 3000
    assert s["received"] == s["sent"] and s["lost"] == 0 and s["duplicates"] == 0
    assert s["sent"] == m.stats()["manager"]["messages_in"]
    assert f"{s['unsendable']:,} of 3,000 messages could not be sent: the app port" in output


def test_rate_paces_the_ramp(manager_factory, tmp_path):
    m = manager_factory()
    s, _ = run_client(m, "p", "127.0.0.1", "--conns", "600", "--procs", "2", "--rate", "300",
                      "--hold", "0", tmp_path=tmp_path)
    assert s["ids_opened"] == 600
    assert 1.7 <= s["ramp_s"] <= 3.0 and 200 <= s["connect_rate"] <= 350, s


def test_follows_307_and_repolls_after_204(manager_factory, tmp_path):
    # --workers 1 is wrong on purpose: every id goes to worker 0, which redirects those it
    # does not own; --poll-timeout makes the server answer 204 and the client poll again.
    m = manager_factory("--poll-timeout", "0.5")
    s, _ = run_client(m, "r", "127.0.0.1", "--conns", "200", "--workers", "1", "--hold", "1.6",
                      tmp_path=tmp_path)
    redirected = sum(owner(b"r%d" % i, 2) == 1 for i in range(200))
    assert s["status"]["307"] == redirected
    assert s["status"]["204"] >= 2 * 200
    assert s["ids_opened"] == 200 and not any(s["failed"].values())


def test_nothing_opens_where_no_server_listens_exit_1_and_why(tmp_path):
    port = free_port_block(1)
    out = tmp_path / "s.json"
    p = subprocess.run([*CLIENT, "x", "127.0.0.1", "--conns", "50", "--workers", "1",
                        "--base-port", str(port), "--app-port", str(port), "--stall", "1",
                        "--hold", "0", "--max-time", "10", "--json", str(out)],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(
        "client.py: only 0 of 50 connections opened: server refused: not listening"), p.stderr
    assert "is it running?" in p.stderr
    s = json.loads(out.read_text())
    assert s["ids_opened"] == 0 and s["failed"]["refused"] >= 50
    assert "refused" in s["cause"] and "cause     server refused" in p.stdout
    assert s["exit_status"] == 1 and len(s["shortfalls"]) == 1


def answering_server(port: int, answer: bytes, then_close: bool, stop: threading.Event):
    """Answers every request on `port` with `answer`; closes after it (0.2 s later) or never."""
    held = []
    with socket.socket() as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", port))
        lsock.listen(64)
        lsock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            conn.settimeout(2)
            conn.recv(4096)
            conn.sendall(answer)
            if then_close:
                time.sleep(0.2)
                conn.close()
            else:
                held.append(conn)  # the answer is whole by its Content-Length: no FIN needed
    for conn in held:
        conn.close()


@pytest.mark.parametrize("answer,then_close,least", [
    # Whole by its Content-Length: taken with no FIN ever coming (re-polls go on).
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", False, 5),
    # Without a Content-Length the body ends at the EOF: read on to it, then take it.
    (b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n", True, 1),
])
def test_an_answer_is_taken_when_whole_by_its_length_or_at_the_eof(tmp_path, answer,
                                                                   then_close, least):
    port = free_port_block(2)
    stop = threading.Event()
    t = threading.Thread(target=answering_server, args=(port, answer, then_close, stop))
    t.start()
    try:
        out = tmp_path / "s.json"
        subprocess.run([*CLIENT, "e", "127.0.0.1", "--conns", "1", "--workers", "1",
                        "--base-port", str(port), "--app-port", str(port + 1), "--hold", "1.5",
                        "--max-time", "4", "--json", str(out)], cwd=ROOT, capture_output=True,
                       timeout=30)
        status = json.loads(out.read_text())["status"]
        assert status.get("204", 0) >= least, status
        assert set(status) == {"204"}, status
    finally:
        stop.set()
        t.join(5)


def test_a_server_that_never_accepts_gives_timeouts(tmp_path):
    import socket
    port = free_port_block(2)
    with socket.socket() as lsock:
        # as free_port_block checked it: a TIME_WAIT left on the port by an earlier test
        # would otherwise refuse the bind (EADDRINUSE, seen once in make test)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", port))
        lsock.listen(1)         # never accepted: the queue fills, later SYNs are dropped
        out = tmp_path / "s.json"
        p = subprocess.run([*CLIENT, "t", "127.0.0.1", "--conns", "20", "--workers", "1",
                            "--base-port", str(port), "--app-port", str(port + 1),
                            "--connect-timeout", "1", "--stall", "2.5", "--hold", "0",
                            "--max-time", "10", "--json", str(out)],
                           capture_output=True, text=True, timeout=20)
    assert p.returncode == 1, p.stderr
    assert "client.py: only " in p.stderr and "connect timeouts" in p.stderr
    s = json.loads(out.read_text())
    assert s["failed"]["timeout"] > 0 and s["ids_opened"] < 20
    assert s["cause"].startswith("connect timeouts")
    assert s["listen_overflows"] is None or s["listen_overflows"] > 0
    if s["listen_overflows"]:  # a box-wide count (every program's), said so, never "ours"
        assert "note      box-wide ListenOverflows during the run (all programs): " in p.stdout
        assert "box-wide ListenOverflows during the run (all programs) rose by" in s["cause"]


def test_listen_overflows_are_named_box_wide_not_this_runs():
    """ListenOverflows counts every program's accept queues: the cause says so."""
    cause = client.likely_cause(100, 40, {"timeout": 60}, {}, None, 40, overflows=7)
    assert cause.startswith("connect timeouts, and box-wide ListenOverflows during the run "
                            "(all programs) rose by 7: "), cause


def test_listen_overflows_reads_tcpext(tmp_path):
    f = tmp_path / "netstat"
    f.write_text("TcpExt: SyncookiesSent ListenOverflows ListenDrops\n"
                 "TcpExt: 0 42 43\nIpExt: InNoRoutes\nIpExt: 0\n")
    assert client.listen_overflows(str(f)) == 42
    assert client.listen_overflows(str(tmp_path / "missing")) is None


def test_server_open_file_limit_is_named(tmp_path, manager_factory):
    m = manager_factory(nofile=200)
    s, output = run_client(m, "l", "127.0.0.1", "--conns", "1000", "--hold", "0",
                           "--stall", "2", tmp_path=tmp_path, expect=1)
    assert s["server"] is not None and s["server"]["connections"] < 1000
    assert "open-file limit" in s["cause"] and "server" in s["cause"]
    assert "cause     server" in output
    assert "client.py: server accepted only" in output


def test_a_child_killed_mid_run_is_named_and_ends_the_run(manager_factory, tmp_path):
    m = manager_factory()
    out = tmp_path / "s.json"
    cmd = [*CLIENT, "k", "127.0.0.1", "--conns", "400", "--procs", "2", "--hold", "30",
           "--base-port", str(m.base_port), "--app-port", str(m.app_port), "--json", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert wait_for(lambda: m.stats()["totals"]["waiting"] == 400, 15)
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True,
                              timeout=5).stdout.split()
        assert len(kids) == 2
        t0 = time.monotonic()
        os.kill(int(kids[1]), signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=10)
        assert time.monotonic() - t0 < 5.0      # not the 30 s hold
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert "Traceback" not in stdout + stderr
    assert p.returncode == 1 and stderr.startswith("client.py: client process ")
    s = json.loads(out.read_text())
    assert s["stopped_by"] == "a client process failed"
    [failure] = s["failed_processes"]
    assert failure.startswith("client process ") and "killed by SIGKILL" in failure, failure
    assert f"child     {failure}" in stdout


def test_ctrl_c_stops_every_process_fast(manager_factory):
    m = manager_factory()
    cmd = [*CLIENT, "c", "127.0.0.1", "--conns", "2000", "--procs", "3", "--hold", "60",
           "--base-port", str(m.base_port), "--app-port", str(m.app_port)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        assert wait_for(lambda: m.stats()["totals"]["waiting"] == 2000, 15)
        t0 = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)     # what a terminal's Ctrl-C does: the whole group
        output, _ = p.communicate(timeout=5)
        assert time.monotonic() - t0 < 2.0
        assert p.returncode == 130 and "stopped by SIGINT" in output
        assert output.rstrip().endswith("client.py: interrupted by SIGINT")
        assert subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True).returncode == 1
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


def test_on_loopback_a_turn_sends_its_re_polls_requests_without_waiting_for_epollout():
    """The kernel runs a loopback handshake inside connect(): the turn that starts the re-polls
    sends their requests too, so each connection is open (WAITING) before the child polls once,
    and the server's TCP_DEFER_ACCEPT listener hands each over with its request. (After a
    broadcast, a request that waited for its EPOLLOUT behind thousands of answers was closed by
    the server's --header-timeout.) A new id of the ramp still waits for EPOLLOUT."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    r, w = os.pipe()
    child = client.Child(0, small_config(conns=6, base_port=lst.getsockname()[1]), 0, 6, -1, w)
    try:
        for j in range(5):  # ids 0-4 were open once and got their answer: re-polls
            child.plan_id(j)
            child.ready.append((j, child.port_of[j], 0))
        child.next_new = 5  # id 5 is the ramp's
        child.start_connects(time.monotonic())
        assert (child.open, child.connecting, child.opened) == (5, 1, 5)
        ramp = [c for c in child.conns.values() if c.j == 5]
        assert len(ramp) == 1 and ramp[0].state == client.CONNECTING
        child.close(ramp[0])
        assert all(c.state == client.WAITING and c.out == b"" for c in child.conns.values())
        lst.settimeout(5)
        heads = []
        for _ in range(5):
            s, _ = lst.accept()
            with s:
                s.settimeout(0)  # already there: TCP_DEFER_ACCEPT queued it with its request
                heads.append(s.recv(4096))
        assert sorted(h.split(b" ")[1] for h in heads) == [b"/t%d.js" % i for i in range(5)]
    finally:
        for c in list(child.conns.values()):
            child.close(c)
        lst.close()
        os.close(r)
        os.close(w)


def test_a_refused_connect_is_counted_refused_and_retried_not_open():
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    r, w = os.pipe()
    child = client.Child(0, small_config(conns=3, base_port=port), 0, 3, -1, w)
    try:
        child.start_connects(time.monotonic())
        for _ in range(50):  # a refusal seen only as EPOLLERR comes with a poll
            if child.failed["refused"] == 3:
                break
            for fd, ev in child.ep.poll(0.1):
                child.on_event(child.conns[fd], ev, time.monotonic())
        assert child.failed["refused"] == 3 and child.open == 0 and child.connecting == 0
        assert len(child.retry) == 3 and not child.conns
        # Re-polls send at once: there the refusal comes from that send() (send_requests).
        for j in range(3):
            child.ready.append((j, port, 0))
        child.start_connects(time.monotonic())
        for _ in range(50):
            if child.failed["refused"] == 6:
                break
            for fd, ev in child.ep.poll(0.1):
                child.on_event(child.conns[fd], ev, time.monotonic())
        assert child.failed["refused"] == 6 and child.open == 0 and child.connecting == 0
        assert len(child.retry) == 6 and not child.conns and child.errnos["ECONNREFUSED"] >= 3
    finally:
        os.close(r)
        os.close(w)
