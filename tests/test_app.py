"""The app port: binary frames, JSON lines and HTTP, with and without --app-token."""

import json
import os
import re
import signal
import socket
import time

import pytest
from conftest import Manager, http_request, read_response
from test_comet import (
    answer,
    app_http,
    hold,
    id_for,
    ids_for,
    poll_now,
    still_waiting,
    totals,
    wait_total,
    wait_until,
)

STAT_FIELDS = ("connections", "waiting", "queued_messages", "queued_bytes", "delivered",
               "expired", "dropped", "rejected", "restarts", "rss_bytes")



class accepted:
    """Equal to an accepted publish's reply: {"ok": true, "mid": "<ms>-<seq>"}."""

    def __eq__(self, reply):
        return isinstance(reply, dict) and set(reply) == {"ok", "mid"} and \
            reply["ok"] is True and re.fullmatch(r"[0-9]+-[0-9]+", reply["mid"]) is not None

    def __repr__(self):
        return '{"ok": true, "mid": "<ms>-<seq>"}'


def app_connect(m, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", m.app_port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def closed_by_server(s: socket.socket, timeout: float = 3.0) -> bool:
    """True when the server closes s (FIN or reset) within timeout; no data expected."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def frame(id_: str | bytes, message: bytes) -> bytes:
    id_ = id_.encode() if isinstance(id_, str) else id_
    return b"\x02" + id_ + b"\x00" + message + b"\x00"


def manager_stats(m) -> dict:
    return m.stats()["manager"]


# ---------------------------------------------------------------------------------------------
# Binary frames
# ---------------------------------------------------------------------------------------------


def test_binary_frames_split_at_awkward_boundaries(manager):
    m = manager
    ids = ids_for(0, 3, "bin") + ids_for(1, 3, "bin")
    frames = []
    expected = {}
    for n, id_ in enumerate(ids):
        for k in range(2):
            msg = b"msg-%d-%d" % (n, k) + b"\xff" * n
            frames.append(frame(id_, msg))
            expected.setdefault(id_, []).append(msg)
    stream = b"".join(frames)
    # Cut right after 0x02, inside an id, on each 0x00, inside a message, between frames.
    cuts = sorted({1, 3, len(frames[0]) - 1, len(frames[0]), len(frames[0]) + 1,
                   len(frames[0]) + len(ids[1].encode()) + 1, len(frames[0]) + 7,
                   len(stream) // 2, len(stream) - 2, len(stream) - 1})
    with app_connect(m) as s:
        prev = 0
        for c in cuts + [len(stream)]:
            s.sendall(stream[prev:c])
            prev = c
            time.sleep(0.01)
        wait_total(m, "queued_messages", len(frames))
    for id_, msgs in expected.items():
        for msg in msgs:
            status, _, _, body = poll_now(m.port_for(id_), id_)
            assert (status, body) == (200, msg)
    assert manager_stats(m)["app_rejected"] == 0
    assert manager_stats(m)["messages_in"] == len(frames)


def test_binary_frame_to_a_waiting_poll(manager):
    m = manager
    id_ = id_for(1, "binw")
    s = hold(m, id_)
    with app_connect(m) as a:
        a.sendall(frame(id_, b"live"))
        assert answer(s)[3] == b"live"


def test_binary_message_of_exactly_max_message_is_accepted(manager_factory):
    m = manager_factory("--max-message", "100")
    id_ = id_for(0, "exact")
    with app_connect(m) as a:
        a.sendall(frame(id_, b"x" * 100))
        wait_total(m, "queued_messages", 1)
    assert poll_now(m.port_for(id_), id_)[3] == b"x" * 100


BAD_FRAMES = {
    "first-byte": b"\x03bad0\x00m\x00",
    "invalid-id": b"\x02a.b\x00m\x00",
    "empty-id": b"\x02\x00m\x00",
    "long-id": b"\x02" + b"a" * 129 + b"\x00m\x00",
    "long-id-no-nul": b"\x02" + b"a" * 200,
    "over-max-message": b"\x02bad0\x00" + b"y" * 101 + b"\x00",
    "over-max-message-no-nul": b"\x02bad0\x00" + b"y" * 300,
}


@pytest.mark.parametrize("bad", list(BAD_FRAMES), ids=list(BAD_FRAMES))
def test_malformed_binary_frame_closes_and_is_counted(manager_factory, bad):
    m = manager_factory("--max-message", "100")
    good = id_for(0, "good")
    after = id_for(1, "after")
    with app_connect(m) as a:
        a.sendall(frame(good, b"before"))
        time.sleep(0.05)
        # The bad frame, split so the manager sees part of it first, then a good one after it.
        raw = BAD_FRAMES[bad]
        a.sendall(raw[:3])
        time.sleep(0.05)
        try:
            a.sendall(raw[3:] + frame(after, b"after"))
        except OSError:
            pass
        assert closed_by_server(a)
    wait_until(lambda: manager_stats(m)["app_rejected"] == 1, what="app_rejected == 1")
    assert manager_stats(m)["messages_in"] == 1
    wait_total(m, "queued_messages", 1)
    assert poll_now(m.port_for(good), good)[3] == b"before"
    for id_ in ("bad0", after):  # never (half-)delivered
        s = hold(m, id_)
        assert still_waiting(s, 0.2)
        s.close()
        wait_total(m, "waiting", 0)
    assert totals(m)["undelivered"] == 0


def test_unknown_first_byte_closes(manager):
    m = manager
    with app_connect(m) as a:
        a.sendall(b"\x07hello\n")
        assert closed_by_server(a)
    wait_until(lambda: manager_stats(m)["app_rejected"] == 1, what="app_rejected == 1")


# ---------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------


class Lines:
    """A JSON-lines app connection."""

    def __init__(self, m):
        self.s = app_connect(m)
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.s.sendall(data)

    def reply(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; have {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def ask(self, obj) -> dict:
        self.send_raw((obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n")
        return self.reply()

    def close(self):
        self.s.close()


@pytest.fixture
def lines_factory():
    opened = []

    def make(m):
        c = Lines(m)
        opened.append(c)
        return c
    yield make
    for c in opened:
        c.close()


def test_json_lines_id_ids_broadcast(manager, lines_factory):
    m = manager
    c = lines_factory(m)
    a, b = id_for(0, "ja"), id_for(1, "jb")
    assert c.ask({"id": a, "message": "one"}) == accepted()
    assert c.ask({"ids": [a, b], "message": "two \u00e9"}) == accepted()
    wait_total(m, "queued_messages", 3)
    assert poll_now(m.port_for(a), a)[3] == b"one"
    assert poll_now(m.port_for(a), a)[3] == b"two \xc3\xa9"
    assert poll_now(m.port_for(b), b)[3] == b"two \xc3\xa9"
    sa = hold(m, a)
    sb = hold(m, b, n_before=1)
    assert c.ask({"broadcast": True, "message": "all"}) == accepted()
    assert answer(sa)[3] == b"all"
    assert answer(sb)[3] == b"all"
    assert totals(m)["undelivered"] == 0
    assert manager_stats(m)["messages_in"] == 4


def test_json_lines_many_per_send_and_split_lines(manager, lines_factory):
    m = manager
    c = lines_factory(m)
    ids = ids_for(0, 2, "jl") + ids_for(1, 2, "jl")
    data = b"".join(json.dumps({"id": i, "message": i}).encode() + b"\n" for i in ids)
    c.send_raw(data[:7])
    time.sleep(0.05)
    c.send_raw(data[7:30])
    time.sleep(0.05)
    c.send_raw(data[30:] + b"\n\n")  # blank lines get no reply
    assert [c.reply() for _ in ids] == [accepted()] * 4
    wait_total(m, "queued_messages", 4)
    for i in ids:
        assert poll_now(m.port_for(i), i)[3] == i.encode()


BAD_LINES = [
    "{not json",
    '{"id": "x", "message": "unterminated',
    "[1, 2]",
    "{} ",
    '{"id": "jx"}',
    '{"id": "jx", "message": 5}',
    '{"id": "jx", "message": null}',
    '{"id": "a.b", "message": "m"}',
    '{"id": "", "message": "m"}',
    '{"id": 7, "message": "m"}',
    '{"ids": "jx", "message": "m"}',
    '{"message": "m"}',
    '{"broadcast": false, "message": "m"}',
]


def test_json_lines_errors_keep_the_connection(manager_factory, lines_factory):
    m = manager_factory("--max-message", "100")
    c = lines_factory(m)
    for line in BAD_LINES:  # the first starts with "{": it picks the protocol
        reply = c.ask(line)
        assert reply["ok"] is False, line
        assert isinstance(reply["error"], str) and reply["error"], line
    good, bad = id_for(0, "jg"), id_for(1, "jb")
    reply = c.ask({"ids": [good, bad, "no/slash"], "message": "none of them"})
    assert reply["ok"] is False and "error" in reply
    reply = c.ask({"id": good, "message": "x" * 101})
    assert reply["ok"] is False and "error" in reply
    reply = c.ask({"broadcast": True, "message": "x" * 101})
    assert reply["ok"] is False
    assert manager_stats(m)["messages_in"] == 0
    assert totals(m)["queued_messages"] == 0
    # Still usable.
    assert c.ask({"ids": [good, bad], "message": "x" * 100}) == accepted()
    wait_total(m, "queued_messages", 2)
    assert poll_now(m.port_for(good), good)[3] == b"x" * 100
    assert poll_now(m.port_for(bad), bad)[3] == b"x" * 100


def test_json_lines_message_limit_counts_utf8_bytes(manager_factory, lines_factory):
    m = manager_factory("--max-message", "10")
    c = lines_factory(m)
    id_ = id_for(0, "utf")
    assert c.ask({"id": id_, "message": "\u00e9" * 5}) == accepted()  # 10 bytes
    assert c.ask({"id": id_, "message": "\u00e9" * 6})["ok"] is False  # 12 bytes


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def test_http_send_202(manager):
    m = manager
    id_ = id_for(1, "hs")
    status, headers, body = app_http(m, post(f"/send/{id_}", b"via http"))
    assert status == 202
    assert json.loads(body) == accepted()
    assert headers["content-type"] == "application/json"
    wait_total(m, "queued_messages", 1)
    assert poll_now(m.port_for(id_), id_)[3] == b"via http"


def test_http_keep_alive_two_requests_on_one_connection(manager):
    m = manager
    a, b = id_for(0, "ka"), id_for(1, "ka")
    with app_connect(m) as s:
        s.sendall(post(f"/send/{a}", b"first"))
        status, headers, _ = read_response(s)
        assert status == 202
        assert headers.get("connection", "keep-alive").lower() != "close"
        s.sendall(post(f"/send/{b}", b"second"))
        assert read_response(s)[0] == 202
        # Pipelined: two in one write.
        s.sendall(post(f"/send/{a}", b"third") + b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[0] == 202
        status, _, body = read_response(s)
        assert status == 200 and "workers" in json.loads(body)
    wait_total(m, "queued_messages", 3)
    assert poll_now(m.port_for(a), a)[3] == b"first"
    assert poll_now(m.port_for(a), a)[3] == b"third"
    assert poll_now(m.port_for(b), b)[3] == b"second"


def test_http_many_pipelined_requests_in_one_write(manager):
    """3,000 publishes in one write, one of them split over two sends: every one is answered
    202 in order and queued once; the last body arrives in a later segment."""
    m = manager
    ids = [f"pp{i}" for i in range(3000)]
    data = b"".join(post(f"/send/{id_}", b"m" + id_.encode()) for id_ in ids)
    with app_connect(m, timeout=10) as s:
        s.sendall(data[:-3])
        time.sleep(0.1)
        s.sendall(data[-3:])
        for _ in ids:
            assert read_response(s)[0] == 202
    wait_total(m, "queued_messages", len(ids))
    assert poll_now(m.port_for(ids[-1]), ids[-1])[3] == b"m" + ids[-1].encode()


def test_http_broadcast_202(manager):
    m = manager
    a, b = id_for(0, "hb"), id_for(1, "hb")
    sa = hold(m, a)
    sb = hold(m, b, n_before=1)
    status, _, body = app_http(m, post("/broadcast", b"to all"))
    assert status == 202
    assert answer(sa)[3] == b"to all"
    assert answer(sb)[3] == b"to all"


def test_http_stats_fields(manager):
    m = manager
    id_ = id_for(1, "st")
    s = hold(m, id_)
    app_http(m, post(f"/send/{id_}x", b"12345"))  # another id, queued (maybe on worker 0)
    status, headers, body = app_http(m, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"] == "application/json"
    stats = json.loads(body)
    workers = stats["workers"]
    assert len(workers) == 2
    for n, w in enumerate(workers):
        for field in ("worker", "pid", "cpu", "port") + STAT_FIELDS:
            assert isinstance(w[field], int), (field, w)
        assert w["worker"] == n
        assert w["port"] == m.base_port + n
        assert w["pid"] > 0 and w["pid"] != m.proc.pid
        assert w["rss_bytes"] > 1_000_000
        assert w["restarts"] == 0
    for field in STAT_FIELDS:
        assert stats["totals"][field] == sum(w[field] for w in workers), field
    wait_total(m, "queued_messages", 1)
    t = totals(m)
    assert t["waiting"] == 1 and t["connections"] >= 1 and t["queued_bytes"] == 5
    assert workers[1]["waiting"] == 1
    s.close()


@pytest.mark.parametrize(("raw", "expected"), [
    (post("/send/a.b", b"m"), 400),
    (post("/send/", b"m"), 400),
    (post("/send/" + "a" * 129, b"m"), 400),
    (b"POST /send/abc HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    (b"POST /broadcast HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    (post("/send/abc", b"z" * 101), 413),
    (post("/broadcast", b"z" * 101), 413),
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (post("/stat", b""), 404),
    (b"GET /send/abc HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"GET /broadcast HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (post("/stats", b""), 405),
])
def test_http_errors(manager_factory, raw, expected):
    m = manager_factory("--max-message", "100")
    status, headers, body = app_http(m, raw)
    assert status == expected, body
    reply = json.loads(body)
    assert reply["ok"] is False and reply["error"]
    assert manager_stats(m)["messages_in"] == 0
    assert totals(m)["queued_messages"] == 0


def test_http_max_message_body_is_accepted(manager_factory):
    m = manager_factory("--max-message", "100")
    assert app_http(m, post("/send/abc", b"z" * 100))[0] == 202


def test_http_error_then_keep_alive_still_works(manager):
    m = manager
    with app_connect(m) as s:
        s.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[0] == 404
        s.sendall(post("/send/a.b", b"m"))
        assert read_response(s)[0] == 400
        s.sendall(post("/send/fine", b"m"))
        assert read_response(s)[0] == 202


# ---------------------------------------------------------------------------------------------
# --app-token
# ---------------------------------------------------------------------------------------------


TOKEN = "T0k3n"


class TokenManager(Manager):
    """conftest's Manager, whose /stats (used by wait_ready) sends the token."""

    def stats(self) -> dict:
        status, _, body = http_request(
            self.app_port,
            f"GET /stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
        assert status == 200, body
        return json.loads(body)


@pytest.fixture
def token_manager():
    m = TokenManager("--app-token", TOKEN)
    yield m
    m.stop()


def test_token_http(token_manager):
    m = token_manager
    id_ = id_for(0, "tok")
    status, headers, _ = app_http(m, post(f"/send/{id_}", b"no"))
    assert status == 401
    assert app_http(m, post(f"/send/{id_}", b"no", "Authorization: Bearer wrong\r\n"))[0] == 401
    assert app_http(m, post(f"/send/{id_}", b"no", f"Authorization: {TOKEN}\r\n"))[0] == 401
    assert app_http(m, post("/broadcast", b"no"))[0] == 401
    assert app_http(m, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 401
    assert manager_stats(m)["messages_in"] == 0
    status, _, _ = app_http(m, post(f"/send/{id_}", b"yes", f"Authorization: Bearer {TOKEN}\r\n"))
    assert status == 202
    wait_total(m, "queued_messages", 1)
    assert poll_now(m.port_for(id_), id_)[3] == b"yes"


def test_token_json_lines(token_manager, lines_factory):
    m = token_manager
    id_ = id_for(1, "tokj")
    c = lines_factory(m)
    assert c.ask({"id": id_, "message": "too early"})["ok"] is False
    assert c.ask({"auth": "wrong"})["ok"] is False
    assert manager_stats(m)["messages_in"] == 0
    assert c.ask({"auth": TOKEN}) == {"ok": True}
    assert c.ask({"id": id_, "message": "after auth"}) == accepted()
    wait_total(m, "queued_messages", 1)
    assert poll_now(m.port_for(id_), id_)[3] == b"after auth"
    other = lines_factory(m)  # auth is per connection
    assert other.ask({"id": id_, "message": "x"})["ok"] is False


def test_token_auth_line_carrying_a_message_is_not_silently_dropped(token_manager,
                                                                     lines_factory):
    """{"auth": T, "id": ..., "message": ...}: either refused, or the message is sent;
    never {"ok": true} for a message that went nowhere."""
    m = token_manager
    id_ = id_for(0, "toka")
    c = lines_factory(m)
    reply = c.ask({"auth": TOKEN, "id": id_, "message": "with the token"})
    if reply["ok"]:
        wait_total(m, "queued_messages", 1)
        assert poll_now(m.port_for(id_), id_)[3] == b"with the token"
    else:
        assert manager_stats(m)["messages_in"] == 0


def test_token_refuses_binary_frames(token_manager):
    m = token_manager
    id_ = id_for(0, "tokb")
    with app_connect(m) as a:
        try:
            a.sendall(frame(id_, b"no token"))
        except OSError:
            pass
        assert closed_by_server(a)
    stats = m.stats()
    assert stats["manager"]["messages_in"] == 0
    assert stats["manager"]["app_rejected"] == 1
    assert stats["totals"]["queued_messages"] == 0
    s = hold(m, id_)
    assert still_waiting(s, 0.2)
    s.close()


# -- found in review: inputs that used to drop an app connection or mislead a client --------


def test_json_lines_deep_nesting_and_bad_auth_keep_the_connection(token_manager, lines_factory):
    m = token_manager
    c = lines_factory(m)
    deep = b'{"id": [' + b"[" * 100_000 + b"]" * 100_000 + b'], "message": "x"}'
    c.send_raw(deep + b"\n")
    assert c.reply()["ok"] is False  # was a RecursionError that killed the connection
    assert c.ask('{"auth": "\\ud800"}')["ok"] is False  # a lone surrogate as the token
    assert c.ask({"auth": TOKEN}) == {"ok": True}
    id_ = id_for(0, "deep")
    assert c.ask({"id": id_, "message": "still here"}) == accepted()
    wait_total(m, "queued_messages", 1)


def test_http_content_length_of_thousands_of_digits_is_413(manager):
    status, _, body = app_http(manager, b"POST /send/a1 HTTP/1.1\r\nContent-Length: " +
                               b"1" * 5000 + b"\r\n\r\n")
    assert status == 413 and b"max-message" in body


def test_http_bearer_scheme_is_case_insensitive(token_manager):
    m = token_manager
    id_ = id_for(1, "lc")
    assert app_http(m, post(f"/send/{id_}", b"x", f"Authorization: bearer {TOKEN}\r\n"))[0] == 202


def test_http_expect_100_refused_before_the_body(manager):
    """An invalid id is refused at once: no 100 Continue, so the client sends no body."""
    with app_connect(manager) as s:
        s.sendall(b"POST /send/bad!id HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        status, _, _ = read_response(s)
        assert status == 400


def test_stats_answer_while_publishers_are_paused(manager):
    """Backpressure stops reading publishers, not GET /stats on a new connection."""
    m = manager
    pid = m.stats()["workers"][0]["pid"]
    ids = ids_for(0, 200, prefix="bp")
    os.kill(pid, signal.SIGSTOP)
    pub = app_connect(m, timeout=0.5)
    try:
        message = b"y" * 60_000
        frames = b"".join(frame(i, message) for i in ids) * 5  # 60 MB: fills link and buffers
        sent = 0
        try:
            while sent < len(frames):
                sent += pub.send(frames[sent:sent + (1 << 20)])
        except (TimeoutError, BlockingIOError):
            pass  # blocked: backpressure is on
        assert sent < len(frames)
        t0 = time.monotonic()
        stats = m.stats()
        assert time.monotonic() - t0 < 3
        assert stats["manager"]["paused"]
    finally:
        os.kill(pid, signal.SIGCONT)
        pub.close()


def test_json_message_that_is_not_unicode_is_refused(manager, lines_factory):
    c = lines_factory(manager)
    reply = c.ask('{"id": "a1", "message": "\\ud800"}')
    assert reply["ok"] is False and "surrogate" in reply["error"]
    assert c.ask({"id": "a1", "message": "fine"}) == accepted()


def test_json_line_over_the_limit_is_answered_and_closed(manager_factory, lines_factory):
    m = manager_factory("--max-message", "100")  # lines up to 8 x 100 + 4096 bytes
    c = lines_factory(m)
    c.send_raw(b'{"id": "a1", "message": "' + b"x" * 10_000)
    assert c.reply() == {"ok": False, "error": "line too long"}
    assert closed_by_server(c.s)
    assert manager_stats(m)["app_rejected"] == 1


# ---------------------------------------------------------------------------------------------
# Input strictness on the app port
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [0xAA, 0xB5, 0xBA, 0xC0, 0xE9, 0xFF])
def test_a_non_ascii_letter_is_no_protocol(manager, first):
    """`str.isalpha()` takes ª, µ, º and most of Latin-1 for letters; SPEC says ASCII."""
    m = manager
    with app_connect(m) as s:
        s.sendall(bytes([first]) + b"OST /send/a1 HTTP/1.1\r\nContent-Length: 1\r\n\r\nx")
        assert closed_by_server(s)
    assert manager_stats(m)["messages_in"] == 0


@pytest.mark.parametrize(("line", "said"), [
    ('{"id": "a1", "message": "m", "n": NaN}', "NaN is not a JSON value"),
    ('{"id": "a1", "message": "m", "n": -Infinity}', "-Infinity is not a JSON value"),
    ('{"id": "a1", "message": "m", "n": 1e999999}', "out of range"),
    ('{"id": "a1", "message": "m", "n": ' + "9" * 5000 + "}", "5,000 digits is out of range"),
    ('{"n": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deep"),
    ('{"id": "a1", "message": "m",}', "invalid JSON at character"),
])
def test_json_that_is_not_standard_json_is_refused_in_our_words(manager, lines_factory, line,
                                                                  said):
    c = lines_factory(manager)
    reply = c.ask(line)
    assert reply["ok"] is False and said in reply["error"], reply
    for python_words in ("sys.set_int_max_str_digits", "recursion", "Exceeds the limit"):
        assert python_words not in reply["error"]
    assert c.ask({"id": "a1", "message": "still fine"}) == accepted()


def test_json_that_is_not_utf8_is_refused_in_our_words(manager, lines_factory):
    c = lines_factory(manager)
    c.send_raw(b'{"id": "a1", "message": "\xff\xfe"}\n')
    reply = c.reply()
    assert reply == {"ok": False, "error": "invalid JSON: the line is not UTF-8"}
