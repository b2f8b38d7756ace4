"""Subscriber keys (SPEC "Subscriber keys"): signed poll and stream URLs.

First the check as a pure function (server.signature_error) and the key file's format
(server.read_keys), then every sentence of the SPEC over real sockets against a real manager
started with --subscriber-key-file: the order of the answers, rotation by SIGHUP with waiting
polls left alone, the 307 that keeps the signature, streams, the key file's errors, and the
load client signing its polls. Signatures are made here with hmac.new, straight from the SPEC's
formula, not with the server's own sign()."""

import hashlib
import hmac
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, free_port_block
from hypothesis import given
from hypothesis import strategies as st
from test_client import run_client
from test_comet import (
    answer,
    exchange,
    id_for,
    poll_now,
    send,
    start_poll,
    still_waiting,
    totals,
    wait_until,
    wait_waiting,
)
from test_manager import alive, worker_pids
from test_resume import Stream, event, publish

import server
from server import KeyFileError, hmac_sha256, key_pads, read_keys, signature_error

K1 = b"first-key-0123456789abcdef0123456789"
K2 = b"second-key-0123456789abcdef012345678"
K3 = b"third-key-0123456789abcdef0123456789"
UNSIGNED = b"a signed URL is required: exp and sig (see --subscriber-key-file)\n"

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def sig_of(key: bytes, id_: str, exp) -> str:
    """SPEC: the first 32 hex digits of HMAC-SHA256(key, "<id>:<exp>"), exp as written."""
    return hmac.new(key, f"{id_}:{exp}".encode(), hashlib.sha256).hexdigest()[:32]


# One expiry for the whole module: two signed() calls for the same id and key give the same
# query (a test compares a 307's Location with one made again), even across a second's turn.
EXP = int(time.time()) + 3600


def signed(id_: str, key: bytes = K1, exp=None, upper: bool = False) -> str:
    """A query `?exp=..&sig=..` for id_, valid for an hour unless exp is given."""
    exp = EXP if exp is None else exp
    sig = sig_of(key, id_, exp)
    return f"?exp={exp}&sig={sig.upper() if upper else sig}"


def write_keys(path, *lines: bytes) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    write_keys(path, b"# subscriber keys, one a line", K1, b"", b"  " + K2 + b"  ")
    return path


@pytest.fixture
def keyed(manager_factory, key_file):
    """A manager with 2 workers and the keys K1 and K2."""
    m = manager_factory("--subscriber-key-file", str(key_file))
    m.key_file = key_file
    return m


def refused(port: int, id_: str, query: str):
    """(status, body) of a poll answered at once."""
    status, _, _, body = poll_now(port, id_, query)
    return status, body


def status_now(port: int, id_: str, query: str):
    """The status of a poll answered within 0.2 s; None for one that waits (then closed)."""
    with start_poll(port, id_, query) as s:
        if still_waiting(s, 0.2):
            return None
        return answer(s)[0]


def hup_and_wait(m, id_by_worker: list, refused_query, served_query) -> None:
    """SIGHUP the manager, then wait until every worker refuses `refused_query(id)` with 403
    (the workers read the file within a loop pass, a second at most)."""
    m.proc.send_signal(signal.SIGHUP)
    for id_ in id_by_worker:
        port = m.port_for(id_)
        wait_until(lambda i=id_, p=port: status_now(p, i, refused_query(i)) == 403, 5.0, 0.05,
                   f"worker on {port} to drop the removed key")
        s = start_poll(port, id_, served_query(id_))
        assert still_waiting(s, 0.3), "a URL signed with the new key is refused"
        s.close()


# ---------------------------------------------------------------------------------------------
# The check, a pure function
# ---------------------------------------------------------------------------------------------

NOW = 1_750_000_000.0


def check(keys: list, id_: bytes, query: bytes, now: float):
    """signature_error with keys as bytes (the worker holds them as key_pads)."""
    return signature_error([key_pads(k) for k in keys], id_, query, now)


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_hmac_from_the_pads_is_hmac(key, message):
    assert hmac_sha256(key_pads(key), message) == hmac.digest(key, message, "sha256")


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 128, 1000])
def test_hmac_from_the_pads_around_the_block_size(size):
    # Keys shorter than, as long as and longer than SHA-256's 64-byte block (hashed first).
    key = bytes(range(256)) * 4
    for message in (b"", b"alice:1750000060", bytes(200)):
        assert hmac_sha256(key_pads(key[:size]), message) == \
            hmac.digest(key[:size], message, "sha256")


def q(id_: str, key: bytes = K1, exp=None, sig=None) -> bytes:
    exp = int(NOW) + 60 if exp is None else exp
    sig = sig_of(key, id_, exp) if sig is None else sig
    return f"exp={exp}&sig={sig}".encode()


def test_a_good_signature_passes_with_one_key_or_either_of_two():
    assert check([K1], b"alice", q("alice"), NOW) is None
    assert check([K1, K2], b"alice", q("alice", K1), NOW) is None
    assert check([K1, K2], b"alice", q("alice", K2), NOW) is None
    assert check([K2], b"alice", q("alice", K1), NOW).status == 403


def test_the_readme_python_lines_sign_a_url_the_worker_takes():
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Subscriber keys", 1)[1].split("```python\n", 1)[1].split("```")[0]
    assert len(code.strip().splitlines()) == 3, code
    names = {"key": K2, "id": "alice", "port": 8001}
    exec(code, names)
    path, _, query = names["url"].partition("?")
    assert path == "http://comet.example.com:8001/alice.js"
    assert check([K1, K2], b"alice", query.encode(), time.time()) is None


def test_sign_is_the_spec_formula():
    assert server.sign(K1, b"alice", 1750000060).decode() == sig_of(K1, "alice", 1750000060)


@pytest.mark.parametrize("query", [b"", b"exp=1750000060", b"sig=" + b"0" * 32,
                                   b"exp=&sig=" + b"0" * 32, b"exp=1750000060&sig=",
                                   b"expiry=1750000060&signature=" + b"0" * 32, b"_=1"])
def test_no_exp_or_no_sig_is_401(query):
    err = check([K1], b"alice", query, NOW)
    assert (err.status, err.reason + "\n") == (401, UNSIGNED.decode())


@pytest.mark.parametrize("exp", ["12a", "+5", "1e9", "-5", "0x10", "1750000060.5", " 1750000060",
                                 "1750000060 ", "١٧٥٠٠٠٠٠٦٠"])
def test_an_exp_that_is_not_a_decimal_integer_is_403(exp):
    # Signed over that very exp text, so only the exp's form can be the reason.
    err = check([K1], b"alice", f"exp={exp}&sig={sig_of(K1, 'alice', exp)}".encode(),
                          NOW)
    assert err.status == 403 and "decimal integer" in err.reason


def test_an_exp_in_the_past_is_403_and_now_itself_is_still_good():
    exp = int(NOW)
    assert check([K1], b"alice", q("alice", exp=exp), NOW) is None
    err = check([K1], b"alice", q("alice", exp=exp), NOW + 1)
    assert err.status == 403 and "expired" in err.reason
    assert check([K1], b"alice", q("alice", exp=0), NOW).status == 403


def test_exp_is_signed_as_written_leading_zeros_and_all():
    exp = "0" + str(int(NOW) + 60)
    assert check([K1], b"alice", q("alice", exp=exp), NOW) is None
    # The digits of a valid exp, signed without the zero: not the text sent.
    wrong = f"exp={exp}&sig={sig_of(K1, 'alice', int(exp))}".encode()
    assert check([K1], b"alice", wrong, NOW).status == 403


def test_a_far_exp_is_accepted_without_converting_thousands_of_digits():
    for exp in ("9" * 30, "9" * 5000, "0" * 5000 + str(int(NOW) + 60)):  # int() limit: 4300
        assert check([K1], b"alice", q("alice", exp=exp), NOW) is None
    assert check([K1], b"alice", q("alice", exp="0" * 5000 + "1"), NOW).status == 403


def test_either_case_of_hex_and_only_32_digits():
    good = sig_of(K1, "alice", int(NOW) + 60)
    for sig in (good.upper(), good[:16] + good[16:].upper()):
        assert check([K1], b"alice", q("alice", sig=sig), NOW) is None
    full = hmac.new(K1, f"alice:{int(NOW) + 60}".encode(), hashlib.sha256).hexdigest()
    for sig in (full, good[:31], good + "0", "g" + good[1:], good[:-1] + " "):
        err = check([K1], b"alice", q("alice", sig=sig), NOW)
        assert err is not None and err.status == 403, sig


def test_a_signature_for_another_id_or_exp_is_403():
    exp = int(NOW) + 60
    other = f"exp={exp}&sig={sig_of(K1, 'bob', exp)}".encode()
    err = check([K1], b"alice", other, NOW)
    assert (err.status, err.reason) == (403, "wrong signature for this id and exp")
    moved = f"exp={exp + 1}&sig={sig_of(K1, 'alice', exp)}".encode()
    assert check([K1], b"alice", moved, NOW).status == 403


def test_other_parameters_are_ignored_and_a_repeated_one_takes_the_last():
    exp = int(NOW) + 60
    good = sig_of(K1, "alice", exp)
    query = f"callback=f&exp=1&since=1-0&exp={exp}&sig={'0' * 32}&_=9&sig={good}".encode()
    assert check([K1], b"alice", query, NOW) is None


def test_no_keys_read_is_503_after_the_401():
    assert check([], b"alice", q("alice"), NOW).status == 503
    assert check([], b"alice", b"", NOW).status == 401


def test_every_key_is_compared_without_an_early_exit(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append(a)
        return real(a, b)
    monkeypatch.setattr(server.hmac, "compare_digest", counting)
    keys = [K1, K2, K3]
    for key in keys:
        calls.clear()
        assert check(keys, b"alice", q("alice", key), NOW) is None
        assert len(calls) == len(keys), key  # the matching key's place does not show
    calls.clear()
    assert check(keys, b"alice", q("alice", b"not-a-key-of-ours"), NOW).status == 403
    assert len(calls) == len(keys)


# ---------------------------------------------------------------------------------------------
# The key file
# ---------------------------------------------------------------------------------------------


def test_key_file_format(tmp_path):
    path = tmp_path / "keys"
    path.write_bytes(b"# rotation: new key first\r\n\r\n  " + K1 + b"\t\r\n   # indented comment\n"
                     + b"key#with#hashes\n" + K1 + b"\n\xc3\xa9t\xc3\xa9 key\n" + K2)
    assert read_keys(str(path)) == [K1, b"key#with#hashes", "été key".encode(), K2]


@pytest.mark.parametrize("content, why", [
    (b"", "holds no key"),
    (b"\n  \n\t\n", "holds no key"),
    (b"# only\n  # comments\n", "holds no key"),
    (b"x" * (server.KEY_FILE_MAX + 1), "over 64 KiB"),
    (b"".join(b"key%d-0123456789abcdef\n" % i for i in range(server.KEYS_MAX + 1)),
     "more than 16"),
])
def test_key_file_errors_name_the_file(tmp_path, content, why):
    path = tmp_path / "keys"
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as e:
        read_keys(str(path))
    assert why in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_key_files(tmp_path):
    for path, why in ((tmp_path / "missing", "No such file"), (tmp_path, "Is a directory")):
        with pytest.raises(KeyFileError) as e:
            read_keys(str(path))
        assert why in str(e.value) and str(path) in str(e.value)


def start_manager(*args: str) -> subprocess.CompletedProcess:
    base, app = free_port_block(2), free_port_block(1)
    return subprocess.run([sys.executable, str(ROOT / "manager.py"), "--host", "127.0.0.1",
                           "--workers", "2", "--base-port", str(base), "--app-port", str(app),
                           "--status-interval", "0", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("content, why", [(None, "No such file or directory"),
                                          (b"", "holds no key"),
                                          (b"# a comment\n\n  # another\n", "holds no key")])
def test_manager_refuses_a_bad_key_file_with_one_line_and_status_2(tmp_path, content, why):
    path = tmp_path / "keys"
    if content is not None:
        path.write_bytes(content)
    p = start_manager("--subscriber-key-file", str(path))
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0] and str(path) in lines[0], p.stderr
    assert "--subscriber-key-file" in lines[0] and not p.stdout


# ---------------------------------------------------------------------------------------------
# Over real sockets: the order of the answers
# ---------------------------------------------------------------------------------------------


def test_unsigned_polls_are_401_with_a_one_line_body(keyed):
    m = keyed
    id_ = id_for(0, "un")
    port = m.port_for(id_)
    exp = int(time.time()) + 300
    sig = sig_of(K1, id_, exp)
    for query in ("", f"?exp={exp}", f"?sig={sig}", f"?callback=f&since=1-0&sig={sig}"):
        status, _, headers, body = poll_now(port, id_, query)
        assert (status, body) == (401, UNSIGNED), query
        assert headers["content-type"] == "text/plain; charset=utf-8"
    assert totals(m)["waiting"] == 0 and totals(m)["rejected"] == 4


def test_unsigned_on_another_workers_port_is_401_not_307(keyed):
    m = keyed
    id_ = id_for(1, "un")
    assert refused(m.base_port, id_, "") == (401, UNSIGNED)


@pytest.mark.parametrize("case", ["wrong key", "expired", "other id", "12a", "+5", "1e9",
                                  "31 digits", "33 digits", "64 digits"])
def test_bad_signatures_are_403(keyed, case):
    m = keyed
    id_ = id_for(0, "bad")
    exp = int(time.time()) + 300
    if case == "wrong key":
        query = signed(id_, K3)
    elif case == "expired":
        query = signed(id_, K1, int(time.time()) - 2)
    elif case == "other id":
        query = signed(id_for(0, "other"), K1, exp)
    elif "digits" in case:
        full = hmac.new(K1, f"{id_}:{exp}".encode(), hashlib.sha256).hexdigest() + "0"
        query = f"?exp={exp}&sig={full[:int(case.split()[0])]}"
    else:  # an exp that is not a decimal integer, signed as written
        query = f"?exp={case}&sig={sig_of(K1, id_, case)}"
    status, body = refused(m.port_for(id_), id_, query)
    assert status == 403 and body.endswith(b"\n") and body.count(b"\n") == 1, (case, body)
    assert totals(m)["waiting"] == 0


def test_signed_polls_wait_and_get_their_message_either_key_either_case(keyed):
    m = keyed
    ids = [id_for(0, "ok"), id_for(1, "ok"), id_for(0, "up"), id_for(1, "up")]
    polls = [start_poll(m.port_for(ids[0]), ids[0], signed(ids[0], K1)),
             start_poll(m.port_for(ids[1]), ids[1], signed(ids[1], K2)),
             start_poll(m.port_for(ids[2]), ids[2], signed(ids[2], K1, upper=True)),
             start_poll(m.port_for(ids[3]), ids[3], signed(ids[3], K2, upper=True) + "&_=1")]
    wait_waiting(m, 4)
    for id_, s in zip(ids, polls, strict=True):
        send(m, id_, b"to " + id_.encode())
        status, _, _, body = answer(s)
        s.close()
        assert (status, body) == (200, b"to " + id_.encode())


def test_jsonp_and_cursor_polls_are_signed_too(keyed):
    m = keyed
    id_ = id_for(1, "js")
    publish(m, id_, b"kept")
    status, _, _, body = poll_now(m.port_for(id_), id_, signed(id_) + "&callback=cb&since=0-0")
    assert status == 200 and body.startswith(b'cb("kept", "')
    assert refused(m.port_for(id_), id_, "?callback=cb&since=0-0") == (401, UNSIGNED)


def test_a_307_keeps_exp_and_sig_and_the_redirected_poll_waits_and_gets_its_message(keyed):
    m = keyed
    id_ = id_for(1, "hop")
    query = signed(id_, K2)
    status, _, headers, _ = poll_now(m.base_port, id_, query)  # worker 0's port
    assert status == 307
    location = headers["location"]
    assert location == f"http://127.0.0.1:{m.port_for(id_)}/{id_}.js{query}"
    port = int(location.split(":")[2].split("/")[0])
    s = start_poll(port, id_, location[location.index("?"):])
    wait_waiting(m, 1)
    send(m, id_, b"after the hop")
    status, _, _, body = answer(s)
    s.close()
    assert (status, body) == (200, b"after the hop")


@pytest.mark.parametrize("raw, status", [
    ("GET /a.b.js HTTP/1.1\r\nHost: h\r\n\r\n", 400),  # invalid id
    ("GET /{id}.js?callback=1x HTTP/1.1\r\nHost: h\r\n\r\n", 400),  # bad callback
    ("GET /{id}.js?since=x HTTP/1.1\r\nHost: h\r\n\r\n", 400),  # bad cursor
    ("GET /{id}.sse?since=1-x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("GET /{id}.js HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("GET /{id}.js HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("GET /favicon.ico HTTP/1.1\r\nHost: h\r\n\r\n", 404),
    ("GET /{id}/x.js HTTP/1.1\r\nHost: h\r\n\r\n", 404),
    ("POST /{id}.js HTTP/1.1\r\nHost: h\r\n\r\n", 405),
    ("HEAD /{id}.js HTTP/1.1\r\nHost: h\r\n\r\n", 405),
    ("GET /{id}.js HTTP/1.1\r\nHost: h\r\nX: " + "x" * 9000 + "\r\n\r\n", 431),
])
def test_a_malformed_request_is_answered_as_before_ahead_of_the_401(keyed, raw, status):
    m = keyed
    id_ = id_for(0, "mal")
    got, _, _, body = exchange(m.port_for(id_), raw.replace("{id}", id_))
    assert got == status, body
    assert b"signed" not in body


def test_options_and_info_stay_open(keyed):
    m = keyed
    id_ = id_for(1, "open")
    status, _, headers, _ = exchange(m.base_port, f"OPTIONS /{id_}.js HTTP/1.1\r\nHost: h\r\n"
                                     "Access-Control-Request-Headers: x-a\r\n\r\n")
    assert status == 204 and headers["access-control-allow-headers"] == "x-a"
    for n in range(2):
        status, _, _, body = exchange(m.base_port + n, "GET /_info HTTP/1.1\r\nHost: h\r\n\r\n")
        assert status == 200 and b'"worker": %d' % n in body


def test_a_signed_stream_works_and_an_unsigned_one_is_401(keyed):
    m = keyed
    id_ = id_for(1, "sse")
    port = m.port_for(id_)
    status, _, headers, body = exchange(port, f"GET /{id_}.sse HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (status, body) == (401, UNSIGNED)
    assert headers["content-type"] == "text/plain; charset=utf-8"  # no stream was started
    status, _, _, _ = exchange(port, f"GET /{id_}.sse{signed(id_, K3)} HTTP/1.1\r\nHost: h\r\n"
                               "Last-Event-ID: 0-0\r\n\r\n")
    assert status == 403
    # Through the 307 of another worker's port, with the signature kept.
    status, _, headers, _ = exchange(m.base_port, f"GET /{id_}.sse{signed(id_, K2)} "
                                     "HTTP/1.1\r\nHost: h\r\n\r\n")
    assert status == 307 and headers["location"].endswith(f"/{id_}.sse{signed(id_, K2)}")
    stream = Stream(m, id_, signed(id_, K2)).opened()
    mid = publish(m, id_, b"streamed")
    stream.expect(event(mid, b"streamed"))
    assert totals(m)["streams"] == 1
    stream.close()


# ---------------------------------------------------------------------------------------------
# Rotation: SIGHUP, connections kept
# ---------------------------------------------------------------------------------------------


def test_rotation_by_sighup_leaves_waiting_polls_alone(keyed):
    m = keyed
    ids = [id_for(0, "rot"), id_for(1, "rot")]
    # Polls signed with either key wait, on both workers.
    waiting = [start_poll(m.port_for(i), i, signed(i, k)) for i in ids for k in (K1, K2)]
    wait_waiting(m, 4)
    pids = worker_pids(m)
    write_keys(m.key_file, K2, K3)  # K1 removed, K3 added
    hup_and_wait(m, ids, lambda i: signed(i, K1), lambda i: signed(i, K3))
    for i in ids:
        s = start_poll(m.port_for(i), i, signed(i, K2))  # the kept key still works
        assert still_waiting(s, 0.2)
        s.close()
    assert worker_pids(m) == pids  # no worker restarted
    for s in waiting:
        assert still_waiting(s, 0.05)  # a waiting poll is not checked again
    for i in ids:
        send(m, i, b"after rotation")
    for s in waiting:
        status, _, _, body = answer(s)
        s.close()
        assert (status, body) == (200, b"after rotation")
    assert m.stop() == 0
    assert "SIGHUP: 2 subscriber keys read from" in m.output and "2 workers told" in m.output


def test_sighup_with_a_bad_file_keeps_the_keys(keyed):
    m = keyed
    ids = [id_for(0, "keep"), id_for(1, "keep")]
    waiting = [start_poll(m.port_for(i), i, signed(i, K1)) for i in ids]
    wait_waiting(m, 2)
    for bad in (b"# nothing but a comment\n", None):
        if bad is None:
            os.unlink(m.key_file)
        else:
            m.key_file.write_bytes(bad)
        m.proc.send_signal(signal.SIGHUP)
        time.sleep(1.2)  # a worker reads the file within a loop pass (1 s): it would have now
        for i in ids:
            s = start_poll(m.port_for(i), i, signed(i, K2))
            assert still_waiting(s, 0.2), "the keys read before were dropped"
            s.close()
    # A SIGHUP straight to the workers (a hangup of the whole group, `systemctl kill`): each
    # reads the bad file itself, and keeps its keys too.
    pids = worker_pids(m)
    for pid in pids:
        os.kill(pid, signal.SIGHUP)
    time.sleep(1.2)
    for i in ids:
        s = start_poll(m.port_for(i), i, signed(i, K2))
        assert still_waiting(s, 0.2), "a worker dropped its keys"
        s.close()
    assert all(still_waiting(s, 0.05) for s in waiting)
    assert m.proc.poll() is None and worker_pids(m) == pids
    write_keys(m.key_file, K3)  # fixed: the next SIGHUP takes it
    hup_and_wait(m, ids, lambda i: signed(i, K1), lambda i: signed(i, K3))
    assert m.stop() == 0
    out = m.output
    assert "SIGHUP: subscriber key file" in out and "holds no key" in out
    assert "SIGHUP: cannot read subscriber key file" in out
    assert out.count("the workers keep the keys they have") == 2
    for n in range(2):
        assert f"worker {n}: cannot read subscriber key file {m.key_file}: No such file or " \
            "directory; keeping the 2 keys read before" in out


def test_a_worker_that_cannot_read_the_file_at_start_refuses_503_until_a_good_one(keyed):
    m = keyed
    id_ = id_for(0, "broken")
    port = m.port_for(id_)
    m.key_file.write_bytes(b"# emptied by mistake\n")
    old = worker_pids(m)[0]
    os.kill(old, signal.SIGKILL)  # its successor reads the broken file
    wait_until(lambda: worker_pids(m)[0] not in (None, old), 5.0, 0.05, "worker 0 restarted")
    status = wait_until(lambda: status_now(port, id_, signed(id_, K1)), 5.0, 0.05,
                        "worker 0 answering")
    assert status == 503  # fails closed: never serves an unchecked poll
    assert poll_now(port, id_, "")[0] == 401  # (the 401 still comes first)
    write_keys(m.key_file, K1)
    hup_and_wait(m, [id_], lambda i: signed(i, K2), lambda i: signed(i, K1))
    assert m.stop() == 0
    assert "worker 0: subscriber key file" in m.output and "refusing every poll and stream " \
        "(503) until a SIGHUP finds a good file" in m.output


def test_a_restarted_worker_reads_the_keys(keyed):
    m = keyed
    id_ = id_for(0, "again")
    old = worker_pids(m)[0]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: worker_pids(m)[0] not in (None, old) and alive(worker_pids(m)[0]),
               5.0, 0.05, "worker 0 restarted")
    port = m.port_for(id_)
    wait_until(lambda: refused(port, id_, "")[0] == 401, 5.0, 0.05, "worker 0 serving")
    s = start_poll(port, id_, signed(id_, K2))
    assert still_waiting(s, 0.3)
    s.close()


def test_sighup_without_a_key_file_changes_nothing(manager):
    m = manager
    id_ = id_for(1, "plain")
    pids = worker_pids(m)
    m.proc.send_signal(signal.SIGHUP)
    s = start_poll(m.port_for(id_), id_)  # no signature needed
    wait_waiting(m, 1)
    time.sleep(0.3)
    assert worker_pids(m) == pids and all(alive(p) for p in pids)
    send(m, id_, b"still open")
    assert answer(s)[3] == b"still open"
    s.close()
    assert m.stop() == 0
    assert "SIGHUP: nothing to reload (no --subscriber-key-file)" in m.output


# ---------------------------------------------------------------------------------------------
# The load client signs its polls
# ---------------------------------------------------------------------------------------------


def test_client_signs_its_polls(keyed, tmp_path):
    m = keyed
    only_k2 = tmp_path / "client-keys"
    write_keys(only_k2, b"# the client signs with the first key", K2, K3)
    summary, out = run_client(m, "sk", "127.0.0.1", "--conns", "20", "--send", "20",
                              "--subscriber-key-file", str(only_k2), tmp_path=tmp_path)
    assert (summary["sent"], summary["received"], summary["lost"]) == (20, 20, 0), out
    assert "401" not in summary["status"] and "403" not in summary["status"]


def test_client_without_the_key_is_told_why(keyed, tmp_path):
    summary, out = run_client(keyed, "nk", "127.0.0.1", "--conns", "5", "--hold", "0",
                              tmp_path=tmp_path, expect=1)
    assert summary["status"] == {"401": 5}
    assert "--subscriber-key-file" in out


def test_client_refuses_a_bad_key_file(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "client.py"), "a", "127.0.0.1",
                        "--subscriber-key-file", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 2
    assert p.stderr.startswith("client.py: cannot read subscriber key file") and \
        str(tmp_path / "none") in p.stderr


def test_systemctl_reload_sends_the_manager_sighup():
    unit = (ROOT / "tuning/megacomet.service").read_text()
    assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in unit


def test_a_sighup_while_the_manager_starts_is_a_reload_not_its_end(tmp_path):
    """Found in review: SIGHUP's default action ended a manager that had not installed its
    handler yet (systemctl start, then at once systemctl reload). Sent as soon as main() has
    printed its first line, long before the ports are open and the handler is in place.
    (Within the interpreter's own start-up, before main(), it still ends it: README.)"""
    key_file = tmp_path / "keys"
    key_file.write_text("a-key-long-enough-to-be-quiet\n")
    base, app = free_port_block(2), free_port_block(1)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manager.py"), "--workers", "2", "--host", "127.0.0.1",
         "--base-port", str(base), "--app-port", str(app), "--status-interval", "0",
         "--subscriber-key-file", str(key_file)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        assert "subscriber keys read" in first, first
        proc.send_signal(signal.SIGHUP)
        lines: list = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()  # (select() on a text pipe misses lines already in its buffer)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None and \
                not any("SIGHUP:" in x for x in lines):
            time.sleep(0.05)
        assert proc.poll() is None, f"manager ended by SIGHUP: exit {proc.returncode}"
        assert any("SIGHUP: 1 subscriber keys read" in x for x in lines), lines
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0, lines
