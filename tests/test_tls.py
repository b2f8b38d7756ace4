"""TLS in front: a real HAProxy, configured by tuning/haproxy.py, ends TLS on one public port
per worker and forwards to the workers of a real manager. Through it, with the test's own
self-signed certificate as the only CA: a long poll, a 307 that stays on https and on the
proxy's ports (from the static options, or from the proxy's forwarded headers), an SSE stream
that is not buffered. Then the rules of a 307's scheme and port, on location() itself: trusted
forwarded headers over --public-scheme/--public-base-port over the defaults, and a header from
an untrusted peer never changes anything.

haproxy and openssl are real programs; missing, the test fails with the command that installs
them (.ci/run installs haproxy)."""

import grp
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, free_port_block, read_response
from test_comet import id_for, wait_waiting
from test_resume import publish

import server
from server import Public, location, parse_request

INSTALL = {"haproxy": "apt-get install -y haproxy", "openssl": "apt-get install -y openssl"}
HAPROXY_PY = ROOT / "tuning" / "haproxy.py"
WAIT = 10.0  # seconds any one step may take


def program(name: str) -> str:
    """The program's path (PATH, then /usr/sbin), or a failure naming how to install it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is missing: this test runs a real {name}; install it with "
                    f"`{INSTALL[name]}`")
    return path


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """(PEM with certificate and key for HAProxy, the certificate alone as the client's CA)."""
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run([program("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    pem = d / "haproxy.pem"
    pem.write_bytes(crt.read_bytes() + key.read_bytes())
    return str(pem), str(crt)


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HAPROXY_PY), *args], capture_output=True,
                          text=True, timeout=WAIT)


class PortTaken(RuntimeError):
    pass


class HAProxy:
    """A real haproxy in the foreground on the config tuning/haproxy.py writes; stop() ends it.
    Its public ports are drawn free, or `public_base` when the manager was told it already."""

    def __init__(self, tmp_path, cert_pem: str, workers: int, base_port: int,
                 public_base: int | None = None):
        self.workers = workers
        self.cfg = tmp_path / "haproxy.cfg"
        self.log = tmp_path / "haproxy.log"
        for _ in range(5 if public_base is None else 1):  # drawn ports may be taken meanwhile
            self.public_base = public_base or free_port_block(workers)
            done = generate("--workers", str(workers), "--base-port", str(base_port),
                            "--public-base-port", str(self.public_base), "--cert", cert_pem,
                            "--bind", "127.0.0.1", "--maxconn", "1000", "-o", str(self.cfg))
            assert done.returncode == 0, done.stderr
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen([program("haproxy"), "-db", "-f", str(self.cfg)],
                                             stdout=log, stderr=subprocess.STDOUT)
            if self.wait_ready():
                return
        raise PortTaken(f"haproxy could not bind its ports: {self.log.read_text()}")

    def wait_ready(self) -> bool:
        """True once every public port accepts; False if a port was taken."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "Address already in use" in self.log.read_text():
                    return False
                raise RuntimeError(f"haproxy exited: {self.log.read_text()}")
            try:
                for n in range(self.workers):
                    socket.create_connection(("127.0.0.1", self.public_base + n), 1).close()
                return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"haproxy did not listen within {WAIT} s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def haproxy_factory(tmp_path, cert):
    started = []

    def start(base_port: int, workers: int = 2, public_base: int | None = None) -> HAProxy:
        started.append(HAProxy(tmp_path, cert[0], workers, base_port, public_base))
        return started[-1]

    yield start
    for h in started:
        h.stop()


@pytest.fixture(params=["static", "forwarded"])
def proxied(request, manager_factory, haproxy_factory):
    """(manager, haproxy): the manager told where the proxy is either by the static options
    alone (nothing trusted) or only by trusting the proxy's forwarded headers."""
    if request.param == "static":
        for _ in range(5):  # the drawn public ports may be taken while the manager starts
            public = free_port_block(2)
            m = manager_factory("--public-scheme", "https", "--public-base-port", str(public))
            try:
                return m, haproxy_factory(m.base_port, public_base=public)
            except PortTaken:
                m.stop()
        raise RuntimeError("no free ports for haproxy")
    m = manager_factory("--trusted-proxy", "127.0.0.1")
    return m, haproxy_factory(m.base_port)


def tls_connect(port: int, ca: str) -> ssl.SSLSocket:
    """A TLS connection to the proxy that verifies its certificate against the test's CA."""
    ctx = ssl.create_default_context(cafile=ca)
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def get(s, path: str, port: int, extra: str = "") -> None:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n{extra}\r\n".encode())


def quiet(s: ssl.SSLSocket, for_s: float = 0.3) -> bool:
    """No application byte and no close arrives within for_s (the socket being readable is not
    enough: TLS 1.3 session tickets come after the handshake, and are no answer)."""
    s.settimeout(for_s)
    try:
        s.recv(1)
    except TimeoutError:
        return True
    finally:
        s.settimeout(WAIT)
    return False


# ---------------------------------------------------------------------------------------------
# tuning/haproxy.py: its output passes `haproxy -c`, and bad options are refused
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers, extra", [
    (2, []),
    (2, ["--bind", "::", "--backend-host", "::1", "--maxconn", "5000"]),
    (3, ["--source-ips", "3", "--poll-timeout", "55", "--sse-heartbeat", "20"]),
    (2, ["--maxconn", "1000000", "--user", f"{pwd.getpwuid(os.getuid()).pw_name}:"
                                           f"{grp.getgrgid(os.getgid()).gr_name}"]),
])
def test_generated_config_passes_haproxy_check(tmp_path, cert, workers, extra):
    out = tmp_path / "h.cfg"
    done = generate("--workers", str(workers), "--cert", cert[0], "-o", str(out), *extra)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    check = subprocess.run([program("haproxy"), "-c", "-f", str(out)], capture_output=True,
                           text=True, timeout=WAIT)
    assert check.returncode == 0, check.stdout + check.stderr + text
    for n in range(workers):  # public port 8443 + n to worker n's 8000 + n, one frontend each
        frontend = text.split(f"frontend w{n}\n")[1].split("\nbackend")[0]
        assert f":{8443 + n} ssl crt {cert[0]} " in frontend
        assert f"default_backend w{n}\n" in frontend
        backend = text.split(f"\nbackend w{n}\n")[1].split("frontend")[0]
        assert f":{8000 + n}\n" in backend or f":{8000 + n} source" in backend
    assert text.count("frontend w") == workers
    assert "option forwardfor" in text and "del-header X-Forwarded- -m beg" in text


def test_generated_timeouts_are_above_poll_timeout_and_heartbeat(tmp_path, cert):
    import tuning.haproxy as hp
    assert hp.idle_timeout(55, 30) == 110
    assert hp.idle_timeout(10, 20) == hp.MIN_IDLE
    assert hp.idle_timeout(0, 30) == hp.UNBOUNDED_IDLE  # polls without end
    assert hp.idle_timeout(55, 0) == hp.UNBOUNDED_IDLE  # silent streams
    done = generate("--workers", "1", "--cert", cert[0], "--poll-timeout", "300")
    assert done.returncode == 0, done.stderr
    for name in ("client", "server", "tunnel"):
        assert f"timeout {name} 600s\n" in done.stdout
    assert "timeout http-request 10s\n" in done.stdout
    assert "--poll-timeout 300" in done.stdout  # the matching manager command line


def test_source_addresses_sized_to_the_target(cert):
    import tuning.haproxy as hp
    # 10240-65535: 27,648 even ports per pair; 1M over 2 workers, 10% skew: 20 addresses
    assert hp.source_ips_needed(1_000_000, 2, (10240, 65535)) == 20
    assert hp.source_ips_needed(1000, 2, (10240, 65535)) == 1
    done = generate("--workers", "2", "--cert", cert[0], "--source-ips", "3")
    backend = done.stdout.split("\nbackend w1\n")[1]
    assert "balance leastconn" in backend
    for k in range(3):
        assert f"server w1s{k} 127.0.0.1:8001 source 127.0.0.{1 + k}\n" in backend
    assert "--trusted-proxy 127.0.0.0/8" in done.stdout  # every source address trusted


def test_warnings_name_the_limit_and_the_fix():
    import dataclasses

    import tuning.haproxy as hp
    args = hp.parse_args(["--workers", "2", "--cert", "c.pem", "--source-ips", "1"])
    args.box = dataclasses.replace(args.box, nr_open=1_048_576, port_range=(32768, 60999))
    lines = hp.box_warnings(args)
    assert any("above fs.nr_open 1,048,576" in line and "tuning/sysctl.conf" in line
               for line in lines), lines
    assert any("14,116 ports" in line and "raise --source-ips" in line for line in lines), lines
    args.maxconn = 20_000
    args.box = dataclasses.replace(args.box, nr_open=2_097_152)
    assert hp.box_warnings(args) == []


@pytest.mark.parametrize("args, error", [
    (["--workers", "2", "--cert", "c.pem", "--public-base-port", "8001"], "overlap"),
    (["--workers", "2", "--cert", "c.pem", "--public-base-port", "65535"], "past port 65535"),
    (["--workers", "0", "--cert", "c.pem"], "must be 1 or more"),
    (["--workers", "2", "--cert", "a b.pem"], "without spaces"),
    (["--workers", "2", "--cert", "c.pem", "--backend-host", "localhost"], "IP address"),
    (["--workers", "2", "--cert", "c.pem", "--backend-host", "10.0.0.5", "--source-ips", "2"],
     "loopback"),
    (["--workers", "2", "--cert", "c.pem", "--poll-timeout", "nan"], "finite"),
    (["--workers", "2"], "--cert"),
    (["--workers", "2", "--cert", "c.pem", "--user", "a b"], "--user"),
])
def test_bad_options_are_refused_with_a_reason(args, error):
    done = generate(*args)
    assert done.returncode == 2 and error in done.stderr, done.stderr
    assert done.stdout == ""


# ---------------------------------------------------------------------------------------------
# Through the proxy, over TLS
# ---------------------------------------------------------------------------------------------


def test_long_poll_through_tls_waits_then_gets_the_message(proxied, cert):
    m, h = proxied
    id_ = id_for(1)
    port = h.public_base + 1
    with tls_connect(port, cert[1]) as s:
        get(s, f"/{id_}.js", port)
        wait_waiting(m, 1)
        assert quiet(s), "answered before anything was published"
        mid = publish(m, id_, b"over tls")
        status, headers, body = read_response(s)
        assert (status, body, headers["x-message-id"]) == (200, b"over tls", mid)
        # The worker closed its side, but HAProxy keeps the client's TLS connection: the next
        # poll goes on it, without a new handshake.
        get(s, f"/{id_}.js", port)
        wait_waiting(m, 1)
        assert quiet(s), "answered before anything was published"
        mid = publish(m, id_, b"again")
        status, headers, body = read_response(s)
        assert (status, body, headers["x-message-id"]) == (200, b"again", mid)


def test_redirect_stays_on_https_and_the_proxy_ports(proxied, cert):
    m, h = proxied
    id_ = id_for(0)
    mid = publish(m, id_, b"after the 307")
    query = f"?since=0-0&exp=99&sig=ab{id_}"
    wrong = h.public_base + 1
    with tls_connect(wrong, cert[1]) as s:
        get(s, f"/{id_}.js{query}", wrong)
        status, headers, _ = read_response(s)
    url = f"https://localhost:{h.public_base}/{id_}.js{query}"
    assert (status, headers["location"]) == (307, url)
    # Followed as a browser would: a new TLS connection to the port in the Location.
    with tls_connect(h.public_base, cert[1]) as s:
        get(s, f"/{id_}.js{query}", h.public_base)
        status, headers, body = read_response(s)
    assert (status, body, headers["x-message-id"]) == (200, b"after the 307", mid)


def read_chunked_events(s: ssl.SSLSocket, buf: bytearray, chunked: bool, want: bytes) -> None:
    """Read until `want` is in the decoded body `buf` (HAProxy may re-frame the close-delimited
    stream as chunked for a keep-alive client), within WAIT seconds."""
    raw = bytearray()
    deadline = time.monotonic() + WAIT
    while want not in buf:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {want!r} within {WAIT} s; body so far {bytes(buf)!r}")
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(65536)
        assert chunk, f"closed before {want!r}; body so far {bytes(buf)!r}"
        if not chunked:
            buf += chunk
            continue
        raw += chunk
        while True:  # decode the whole chunks in raw
            line_end = raw.find(b"\r\n")
            if line_end < 0:
                break
            size = int(raw[:line_end].split(b";")[0], 16)
            if len(raw) < line_end + 2 + size + 2:
                break
            buf += raw[line_end + 2:line_end + 2 + size]
            del raw[:line_end + 2 + size + 2]


def test_sse_through_tls_is_not_buffered(manager_factory, haproxy_factory, cert):
    m = manager_factory("--trusted-proxy", "127.0.0.1")
    h = haproxy_factory(m.base_port)
    id_ = id_for(1)
    port = h.public_base + 1
    with tls_connect(port, cert[1]) as s:
        get(s, f"/{id_}.sse", port)
        head = b""
        deadline = time.monotonic() + WAIT
        while b"\r\n\r\n" not in head and time.monotonic() < deadline:
            head += s.recv(65536)
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"content-type: text/event-stream" in head.lower(), head
        chunked = b"transfer-encoding: chunked" in head.lower()
        body = bytearray()
        read_chunked_events(_Prefixed(s, rest), body, chunked, b"retry: 2000\n\n")
        wait_waiting(m, 1)
        first = publish(m, id_, b"one")
        # The first event must arrive while the stream is open and before the second exists.
        read_chunked_events(s, body, chunked, b"data: one\n\n")
        second = publish(m, id_, b"two")
        read_chunked_events(s, body, chunked, b"data: two\n\n")
    assert bytes(body) == (b"retry: 2000\n\n" + b"id: %s\ndata: one\n\n" % first.encode() +
                           b"id: %s\ndata: two\n\n" % second.encode())


class _Prefixed:
    """A socket whose first recv returns bytes already read with the head."""

    def __init__(self, s, first: bytes):
        self.s, self.first = s, first

    def settimeout(self, t: float) -> None:
        self.s.settimeout(t)

    def recv(self, n: int) -> bytes:
        if self.first:
            data, self.first = self.first, b""
            return data
        return self.s.recv(n)


class Recorder:
    """A one-shot HTTP server standing where a worker would: keeps the request head it got."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.heads: list = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        self.sock.settimeout(WAIT)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(WAIT)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.heads.append(data.partition(b"\r\n\r\n")[0].decode("latin-1"))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


def test_proxy_sets_forwarded_headers_and_drops_the_clients(haproxy_factory, cert):
    rec = Recorder()
    h = haproxy_factory(rec.port, workers=1)
    forged = ("X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 1\r\n"
              "X-Forwarded-Host: evil.example\r\nForwarded: for=6.6.6.6;proto=http\r\n")
    with tls_connect(h.public_base, cert[1]) as s:
        get(s, "/a.js", h.public_base, forged)
        status, _, body = read_response(s)
    assert (status, body) == (200, b"ok")
    rec.thread.join(WAIT)
    lines = rec.heads[0].split("\r\n")[1:]
    headers = [(n.strip().lower(), v.strip()) for n, _, v in (x.partition(":") for x in lines)]
    forwarded = sorted((n, v) for n, v in headers if n.startswith("x-forwarded-") or
                       n == "forwarded")
    assert forwarded == [("x-forwarded-for", "127.0.0.1"),
                         ("x-forwarded-port", str(h.public_base)),
                         ("x-forwarded-proto", "https")], rec.heads[0]


# ---------------------------------------------------------------------------------------------
# Which scheme and port a 307 names: on the worker ports, and on location() itself
# ---------------------------------------------------------------------------------------------


def redirect_from(port: int, id_: str, extra: str, source: str) -> str:
    """The Location of a poll sent straight to a worker port from `source` (127.0.0.x)."""
    s = socket.socket()
    s.settimeout(WAIT)
    s.bind((source, 0))
    with s:
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET /{id_}.js?x=1 HTTP/1.1\r\nHost: localhost:{port}\r\n{extra}\r\n".encode())
        status, headers, _ = read_response(s)
    assert status == 307, (status, headers)
    return headers["location"]


def test_forwarded_headers_count_only_from_a_trusted_peer(manager_factory):
    public = free_port_block(2)
    m = manager_factory("--public-scheme", "https", "--public-base-port", str(public),
                        "--trusted-proxy", "127.0.0.1")
    id_ = id_for(0)
    wrong = m.base_port + 1
    forged = "X-Forwarded-Proto: http\r\nX-Forwarded-Port: 20001\r\n"
    # 127.0.0.2 is not trusted: its headers change nothing, the static options stand.
    assert redirect_from(wrong, id_, forged, "127.0.0.2") == \
        f"https://localhost:{public}/{id_}.js?x=1"
    # The trusted proxy's: worker 1 was reached on 20001, so worker 0 is on 20000.
    assert redirect_from(wrong, id_, forged, "127.0.0.1") == f"http://localhost:20000/{id_}.js?x=1"


def accepted_pair(family=socket.AF_INET, bind="127.0.0.1"):
    """(client, server side) of a real TCP connection from 127.0.0.1: location() reads the
    server side's peer and local addresses."""
    with socket.create_server((bind, 0), family=family, dualstack_ipv6=family ==
                              socket.AF_INET6) as lsn:
        client = socket.create_connection(("127.0.0.1", lsn.getsockname()[1]), timeout=WAIT)
        conn, _ = lsn.accept()
    return client, conn


def where(head: bytes, public: Public, home: int = 0, **pair) -> bytes:
    client, conn = accepted_pair(**pair)
    with client, conn:
        req, _ = parse_request(head)
        return location(req, home, conn.fileno(), public)


LOOPBACK = (server.ipaddress.ip_network("127.0.0.1"),)
ELSEWHERE = (server.ipaddress.ip_network("10.0.0.0/8"),)
FWD = b"X-Forwarded-Proto: https\r\nX-Forwarded-Port: 9443\r\n"


@pytest.mark.parametrize("public, headers, expected", [
    # Defaults: http, the workers' own ports; forwarded headers ignored (nobody trusted).
    (Public(b"http", 8000, (), 1), FWD, b"http://h:8000/a.js?q=1"),
    # Static options over the defaults.
    (Public(b"https", 8443, (), 1), b"", b"https://h:8443/a.js?q=1"),
    # A trusted peer's forwarded headers over the static options: 9443 is worker 1's port.
    (Public(b"http", 8000, LOOPBACK, 1), FWD, b"https://h:9442/a.js?q=1"),
    (Public(b"https", 8443, LOOPBACK, 1), b"X-Forwarded-Proto: http\r\n", b"http://h:8443/a.js?q=1"),
    (Public(b"https", 8443, LOOPBACK, 1), b"X-Forwarded-Port: 100\r\n", b"https://h:99/a.js?q=1"),
    # An untrusted peer's: ignored.
    (Public(b"https", 8443, ELSEWHERE, 1), b"X-Forwarded-Proto: http\r\nX-Forwarded-Port: 1\r\n",
     b"https://h:8443/a.js?q=1"),
    # Malformed forwarded values from a trusted peer: ignored, each on its own.
    (Public(b"https", 8443, LOOPBACK, 1), b"X-Forwarded-Proto: javascript\r\n",
     b"https://h:8443/a.js?q=1"),
    (Public(b"https", 8443, LOOPBACK, 1), b"X-Forwarded-Port: 0\r\n", b"https://h:8443/a.js?q=1"),
    (Public(b"https", 8443, LOOPBACK, 1), b"X-Forwarded-Port: 99999\r\n", b"https://h:8443/a.js?q=1"),
    (Public(b"https", 8443, LOOPBACK, 1), b"X-Forwarded-Port: 1\r\n", b"https://h:8443/a.js?q=1"),
    (Public(b"https", 8443, LOOPBACK, 1), b"X-Forwarded-Port: +944\r\n", b"https://h:8443/a.js?q=1"),
    # A list (or the header twice): the last value, the one the nearest proxy added.
    (Public(b"http", 8000, LOOPBACK, 1),
     b"X-Forwarded-Proto: http, HTTPS\r\nX-Forwarded-Port: 1, 9443\r\n", b"https://h:9442/a.js?q=1"),
    (Public(b"http", 8000, LOOPBACK, 1),
     b"X-Forwarded-Proto: https\r\nX-Forwarded-Proto: http\r\n", b"http://h:8000/a.js?q=1"),
])
def test_location_precedence(public, headers, expected):
    head = b"GET /a.js?q=1 HTTP/1.1\r\nHost: h:7777\r\n" + headers + b"\r\n"
    assert where(head, public) == expected  # and never the Host header's port, 7777


def test_location_keeps_the_host_and_the_whole_query():
    head = (b"GET /alice.js?since=1-0&exp=1700000000&sig=0123abcd HTTP/1.1\r\n"
            b"Host: [::1]:8001\r\n\r\n")
    assert where(head, Public(b"https", 8443, (), 1), home=2) == \
        b"https://[::1]:8445/alice.js?since=1-0&exp=1700000000&sig=0123abcd"
    # No Host (HTTP/1.0): the address the client connected to.
    assert where(b"GET /a.js HTTP/1.0\r\n\r\n", Public(b"https", 8443, (), 1)) == \
        b"https://127.0.0.1:8443/a.js"


def test_location_trusts_an_ipv4_peer_on_a_dual_stack_listener():
    # The peer reads ::ffff:127.0.0.1 there; --trusted-proxy 127.0.0.1 must still match it.
    head = b"GET /a.js HTTP/1.1\r\nHost: h\r\n" + FWD + b"\r\n"
    assert where(head, Public(b"http", 8000, LOOPBACK, 1), family=socket.AF_INET6,
                 bind="::") == b"https://h:9442/a.js"


def test_trusted_proxy_option_is_checked(manager_factory):
    from options import networks
    assert networks("127.0.0.1, ::1,10.0.0.0/8") == tuple(
        server.ipaddress.ip_network(x) for x in ("127.0.0.1", "::1", "10.0.0.0/8"))
    assert networks("") == ()
    for bad in ("localhost", "10.0.0.1/8", "300.1.1.1"):
        done = subprocess.run([sys.executable, str(ROOT / "manager.py"), "--trusted-proxy", bad],
                              capture_output=True, text=True, timeout=WAIT)
        assert done.returncode == 2 and "--trusted-proxy" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, str(ROOT / "manager.py"), "--workers", "2",
                           "--public-base-port", "65535"], capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 2 and "--public-base-port" in done.stderr, done.stderr
