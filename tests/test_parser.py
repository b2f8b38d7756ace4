"""parse_request: a pure function over bytes. (Request, used) for a whole head, (None, scanned)
while more bytes are needed, HTTPError (.status 400/431) for anything refused."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import (
    HOST_RE,
    MAX_HEAD,
    REG_NAME,
    TCHAR,
    VCHAR,
    HTTPError,
    Request,
    parse_request,
    valid_host,
)

# The grammar as regexes (RFC 9110 5.6.2 token, RFC 9112 3.2 visible ASCII): the parser checks
# them with bytes.translate and byte classes, which must say the same for any bytes.
TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
TARGET_RE = re.compile(rb"[\x21-\x7e]+")

SIMPLE = b"GET /alice.js?callback=cb&x=1 HTTP/1.1\r\nHost: example.com:8001\r\nX-A: b\r\n\r\n"


def parse(buf: bytes):
    return parse_request(buf)


def status_of(buf: bytes) -> int:
    with pytest.raises(HTTPError) as info:
        parse_request(buf)
    return info.value.status


def test_simple_request():
    req, used = parse(SIMPLE)
    assert isinstance(req, Request)
    assert used == len(SIMPLE)
    assert req.method == b"GET"
    assert req.path == b"/alice.js"
    assert req.query == b"callback=cb&x=1"
    assert req.version == b"HTTP/1.1"
    assert req.headers == {b"host": b"example.com:8001", b"x-a": b"b"}


def test_used_stops_at_the_end_of_the_head():
    req, used = parse(SIMPLE + b"GET /next.js HTTP/1.1\r\n\r\n")
    assert req.path == b"/alice.js"
    assert used == len(SIMPLE)


def test_no_query_is_empty():
    req, _ = parse(b"GET /a.js HTTP/1.0\r\n\r\n")
    assert req.path == b"/a.js" and req.query == b"" and req.version == b"HTTP/1.0"
    assert req.headers == {}


def test_query_split_at_first_question_mark():
    req, _ = parse(b"GET /a.js?x=1?y=2 HTTP/1.1\r\n\r\n")
    assert req.path == b"/a.js" and req.query == b"x=1?y=2"
    req, _ = parse(b"GET /a.js? HTTP/1.1\r\n\r\n")
    assert req.path == b"/a.js" and req.query == b""


def test_incomplete_returns_none_and_scanned():
    buf = SIMPLE[:-2]
    req, scanned = parse(buf)
    assert req is None
    assert scanned == len(buf)
    assert parse(b"") == (None, 0)


def test_header_names_lowercased_values_trimmed():
    req, _ = parse(b"GET /a.js HTTP/1.1\r\nHOST:  h  \r\nX-Mixed-Case:\tv\t\r\n\r\n")
    assert req.headers == {b"host": b"h", b"x-mixed-case": b"v"}


def test_bare_lf_line_ends():
    req, used = parse(b"GET /a.js?q HTTP/1.1\nHost: h\nAccept: */*\n\n")
    assert req.path == b"/a.js" and req.query == b"q"
    assert req.headers == {b"host": b"h", b"accept": b"*/*"}
    assert used == len(b"GET /a.js?q HTTP/1.1\nHost: h\nAccept: */*\n\n")


def test_mixed_line_ends():
    raw = b"GET /a.js HTTP/1.1\r\nHost: h\nAccept: x\r\n\n"
    req, used = parse(raw)
    assert req.headers == {b"host": b"h", b"accept": b"x"}
    assert used == len(raw)


def test_repeated_ordinary_header_is_joined():
    req, _ = parse(b"GET /a.js HTTP/1.1\r\nAccept: a\r\naccept: b\r\n\r\n")
    assert req.headers[b"accept"] == b"a, b"


@pytest.mark.parametrize("n", [1, 2, 5])
def test_tls_client_hello_refused_at_once(n):
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    assert status_of(hello[:n]) == 400


@pytest.mark.parametrize("first", [b"\x00", b"\x80", b" ", b"{", b"1", b"\rx", b"\r\n\x16"])
def test_non_method_first_byte_refused_at_once(first):
    assert status_of(first) == 400


def test_a_lower_case_method_is_a_method():
    """Methods are case-sensitive tokens (RFC 9110 9.1): `get` is not GET, and the worker
    answers it 405 like any method it does not serve."""
    req, _ = parse(b"get /a.js HTTP/1.1\r\n\r\n")
    assert req.method == b"get"


def test_a_flood_of_empty_lines_is_refused():
    """Each read of a slow client would walk them again: quadratic CPU for nothing."""
    assert status_of(b"\n" * 9) == 400
    assert status_of(b"\r\n" * 5 + SIMPLE) == 400
    assert parse(b"\r\n" * 4 + SIMPLE)[0].path == b"/alice.js"


@pytest.mark.parametrize("lead", [b"\r\n", b"\n", b"\r\n\r\n", b"\n\r\n"])
def test_empty_lines_before_the_request_line_are_ignored(lead):
    req, used = parse(lead + SIMPLE)
    assert req.path == b"/alice.js" and used == len(lead) + len(SIMPLE)
    assert parse(lead) == (None, len(lead))
    assert parse(lead + b"\r") == (None, len(lead) + 1)


@pytest.mark.parametrize("raw", [
    b"GET /a.js HTTP/1.1\r\r\n\r\n",              # CR CR LF: one CR is a bare one
    b"GET /a.js\rHTTP/1.1\r\n\r\n",
    b"GET /a.js HTTP/1.1\r\nHost: h\r\r\n\r\n",
    b"GET /a.js HTTP/1.1\r\nX\r: y\r\n\r\n",
    b"\rGET /a.js HTTP/1.1\r\n\r\n",
])
def test_a_bare_cr_is_400(raw):
    assert status_of(raw) == 400


@pytest.mark.parametrize(("target", "host", "path", "query"), [
    (b"http://h/a.js", b"h", b"/a.js", b""),
    (b"http://example.com:8001/a.js?callback=f", b"example.com:8001", b"/a.js", b"callback=f"),
    (b"HTTPS://[::1]:8000/a.js", b"[::1]:8000", b"/a.js", b""),
    (b"http://h", b"h", b"/", b""),
])
def test_the_absolute_form_is_accepted_and_its_authority_is_the_host(target, host, path, query):
    req, _ = parse(b"GET " + target + b" HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (req.headers[b"host"], req.path, req.query) == (host, path, query)


@pytest.mark.parametrize("host", [b"a b", b"h\x01", b"h\xc3\xa9", b"h/x", b"h@x", b"h:80x",
                                  b"[zz]", b"h\x7f", b":80", b":", b"%", b"%zz", b"h%4"])
def test_a_host_that_is_not_a_host_is_400(host):
    assert status_of(b"GET /a.js HTTP/1.1\r\nHost: " + host + b"\r\n\r\n") == 400
    if b"/" not in host:  # in the absolute form that would end the authority
        assert status_of(b"GET http://" + host + b"/a.js HTTP/1.1\r\n\r\n") == 400


@pytest.mark.parametrize("host", [b"example.com", b"h:8000", b"[::1]:8000", b"10.0.0.1",
                                  b"my_host.local", b"", b"xn--bcher-kva.example", b"h%41",
                                  b"h.", b"H:"])
def test_hosts_that_are_hosts_pass(host):
    req, _ = parse(b"GET /a.js HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert req.headers[b"host"] == host


def test_head_over_limit_without_terminator_is_431():
    buf = b"GET /a.js HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD
    assert len(buf) > MAX_HEAD
    assert status_of(buf) == 431


def test_head_over_limit_with_terminator_is_431():
    buf = b"GET /a.js HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    assert status_of(buf) == 431


def test_head_exactly_at_limit_is_accepted():
    start = b"GET /a.js HTTP/1.1\r\nX-Big: "
    end = b"\r\n\r\n"
    buf = start + b"a" * (MAX_HEAD - len(start) - len(end)) + end
    assert len(buf) == MAX_HEAD
    req, used = parse(buf)
    assert req is not None and used == MAX_HEAD


def test_head_just_over_limit_is_431():
    start = b"GET /a.js HTTP/1.1\r\nX-Big: "
    end = b"\r\n\r\n"
    buf = start + b"a" * (MAX_HEAD + 1 - len(start) - len(end)) + end
    assert status_of(buf) == 431


def test_incomplete_head_at_limit_still_waits():
    """Exactly MAX_HEAD bytes without the blank line: not over the limit yet, so it waits;
    one byte more is 431; and the blank line arriving right at the limit is a request."""
    start = b"GET /a.js HTTP/1.1\r\nX-Big: "
    buf = start + b"a" * (MAX_HEAD - len(start))
    assert len(buf) == MAX_HEAD
    assert parse(buf) == (None, MAX_HEAD)
    with pytest.raises(HTTPError) as info:
        parse(buf + b"a")
    assert info.value.status == 431
    whole = start + b"a" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(whole) == MAX_HEAD
    req, used = parse(whole)
    assert used == MAX_HEAD and req.headers[b"x-big"] == b"a" * (MAX_HEAD - len(start) - 4)


def test_custom_limit():
    with pytest.raises(HTTPError) as info:
        parse_request(b"GET /a.js HTTP/1.1\r\nX: " + b"a" * 100, 0, 50)
    assert info.value.status == 431


@pytest.mark.parametrize("raw", [
    b"GET /a.js\r\n\r\n",                        # two parts
    b"GET /a.js HTTP/1.1 extra\r\n\r\n",         # four parts
    b"GET  /a.js HTTP/1.1\r\n\r\n",              # double space
    b"GET /a.js HTTP/2.0\r\n\r\n",
    b"GET /a.js HTTP/1.2\r\n\r\n",
    b"GET /a.js http/1.1\r\n\r\n",
    b"GET a.js HTTP/1.1\r\n\r\n",                # target not a path
    b"GET ftp://h/a.js HTTP/1.1\r\n\r\n",
    b"GET * HTTP/1.1\r\n\r\n",
    b"G(T /a.js HTTP/1.1\r\n\r\n",               # bad method token
    b"GET /a.js HTTP/1.1\r\nNoColon\r\n\r\n",
    b"GET /a.js HTTP/1.1\r\nHost : h\r\n\r\n",   # space before colon
    b"GET /a.js HTTP/1.1\r\n: empty-name\r\n\r\n",
    b"GET /a.js HTTP/1.1\r\n folded\r\n\r\n",
    b"GET /a.js HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /a.js HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
    b"GET /a.js HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
    b"GET /a.js HTTP/1.1\r\nX: a\rb\r\n\r\n",     # bare CR inside a value
    b"GET /a.js HTTP/1.1\r\nX: a\x00b\r\n\r\n",
])
def test_malformed_is_400(raw):
    assert status_of(raw) == 400


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

token_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
names = st.text(token_chars, min_size=1, max_size=12).filter(lambda n: n.lower() != "host")
values = st.text(st.sampled_from("abc xyz0123:/;=.,*"), max_size=30).map(str.strip)


@st.composite
def requests(draw):
    method = draw(st.sampled_from(["GET", "OPTIONS", "POST", "HEAD", "get"]))
    path = "/" + draw(st.text(st.sampled_from("abcxyz019_~-"), min_size=0, max_size=20)) + ".js"
    query = draw(st.one_of(st.just(""), st.text(st.sampled_from("abc=&;019"), max_size=20)))
    version = draw(st.sampled_from(["HTTP/1.0", "HTTP/1.1"]))
    nl = draw(st.sampled_from(["\r\n", "\n"]))
    lead = draw(st.sampled_from(["", "\r\n", "\n", "\r\n\r\n"]))  # RFC 9112 2.2
    headers = draw(st.dictionaries(names.map(str.lower), values, max_size=6))
    authority = draw(st.sampled_from([None, "h", "example.com:8001", "[::1]"]))
    target = path + ("?" + query if query else "")
    if authority is not None:  # the absolute form: its authority is the Host
        target = f"http://{authority}{target}"
        headers = {**headers, "host": authority}
    head = f"{lead}{method} {target} {version}{nl}"
    head += "".join(f"{k}: {v}{nl}" for k, v in headers.items() if k != "host")
    head += nl
    return head.encode(), headers


def feed(buf_chunks):
    """Feed chunks one by one as a worker does: accumulate, pass `scanned` back."""
    buf = b""
    scanned = 0
    for chunk in buf_chunks:
        buf += chunk
        req, used = parse_request(buf, scanned)
        if req is not None:
            return req, used
        assert used == len(buf)
        scanned = used
    return None, scanned


@settings(max_examples=300, deadline=None)
@given(requests(), st.lists(st.integers(min_value=0, max_value=400), max_size=10), st.data())
def test_any_split_gives_the_same_request(generated, cuts, data):
    raw, headers = generated
    trailer = data.draw(st.sampled_from([b"", b"GET /b.js HTTP/1.1\r\n\r\n", b"xyz"]))
    whole = raw + trailer
    expected = parse_request(whole)
    assert expected[0] is not None
    assert expected[1] == len(raw)
    assert expected[0].headers == {k.encode(): v.encode() for k, v in headers.items()}
    points = sorted({c % (len(whole) + 1) for c in cuts} | {0, len(whole)})
    chunks = [whole[a:b] for a, b in zip(points, points[1:], strict=False)]
    assert feed(chunks) == expected


@settings(max_examples=100, deadline=None)
@given(requests())
def test_byte_by_byte_gives_the_same_request(generated):
    raw, _ = generated
    expected = parse_request(raw)
    assert feed([raw[i:i + 1] for i in range(len(raw))]) == expected


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_arbitrary_bytes_raise_only_http_error(buf, scanned):
    try:
        req, used = parse_request(buf, min(scanned, len(buf)))
    except HTTPError as err:
        assert err.status in (400, 431)
        return
    if req is None:
        assert used == len(buf)
    else:
        assert 0 < used <= len(buf)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_a_method_raise_only_http_error(tail):
    for prefix in (b"GET ", b"GET /a.js HTTP/1.1\r\n", b"GET /a.js HTTP/1.1\n"):
        try:
            parse_request(prefix + tail)
        except HTTPError as err:
            assert err.status in (400, 431)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=MAX_HEAD - 200, max_value=MAX_HEAD + 200), st.binary(max_size=50))
def test_long_input_is_never_accepted_past_the_limit(pad, tail):
    buf = b"GET /a.js HTTP/1.1\r\nX: " + b"a" * pad + tail
    try:
        req, used = parse_request(buf)
    except HTTPError as err:
        assert err.status in (400, 431)
        return
    if req is None:
        assert len(buf) <= MAX_HEAD
    else:
        assert used <= MAX_HEAD


@pytest.mark.parametrize("byte", [bytes([b]) for b in range(256)])
def test_each_byte_is_in_its_class_as_in_the_regex(byte):
    assert (not byte.translate(None, TCHAR)) == bool(TOKEN_RE.fullmatch(byte))
    assert (not byte.translate(None, VCHAR)) == bool(TARGET_RE.fullmatch(byte))


@given(st.binary(max_size=24))
def test_byte_classes_are_the_grammar(data):
    """`b and not b.translate(None, CLASS)`, as parse_request checks, is the regex exactly."""
    assert (bool(data) and not data.translate(None, TCHAR)) == bool(TOKEN_RE.fullmatch(data))
    assert (bool(data) and not data.translate(None, VCHAR)) == bool(TARGET_RE.fullmatch(data))


HOSTISH = st.binary(max_size=20) | st.lists(
    st.sampled_from([bytes([c]) for c in REG_NAME + b":%[]@/ \x00\x7f\xff"] + [b"%41", b"%g"]),
    max_size=12).map(b"".join)


@given(HOSTISH)
def test_valid_host_is_host_re_exactly(host):
    """valid_host checks a plain name[:port] without the regex, and asks HOST_RE the rest:
    together they say what HOST_RE alone says."""
    assert valid_host(host) == bool(HOST_RE.fullmatch(host))


@pytest.mark.parametrize("host, ok", [
    (b"example.com", True), (b"127.0.0.1:8000", True), (b"a:", True), (b"a:123456", False),
    (b":80", False), (b"[::1]:8000", True), (b"ex%41mple.com", True), (b"a b", False),
    (b"a:8:9", False), (b"a\x00", False), (b"caf\xc3\xa9", False)])
def test_valid_host_examples(host, ok):
    assert valid_host(host) is ok
