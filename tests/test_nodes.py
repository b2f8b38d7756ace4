"""More than one box (SPEC "More than one box: Redis"), end to end: three nodes on this box,
each a real manager.py with its workers, sharing one real redis-server started for this module
(no persistence) on a free port. Each test names the SPEC sentence it holds the nodes to."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, Manager, PortTaken, free_port_block, http_request, read_response

import server

W = 2  # workers per node
N = 3
MID_RE = re.compile(r"[0-9]+-[0-9]+")
INSTALL = "apt-get install -y redis-server (.ci/run installs it)"


# ---------------------------------------------------------------------------------------------
# Redis and the nodes
# ---------------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server on a free port, no persistence; stop() and start() keep the port."""

    def __init__(self):
        self.exe = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
        if self.exe is None:
            pytest.fail(f"redis-server is not installed: {INSTALL}")
        self.port = free_port_block(1)
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning",
             "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.call("PING") == b"PONG":
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not come up")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)

    def asleep(self, seconds: float) -> threading.Thread:
        """Redis stops answering for `seconds` (DEBUG SLEEP, in a thread: join it), as a
        partition or a Redis loading its data looks to a node."""
        sleeper = threading.Thread(target=self.call, args=("DEBUG", "SLEEP", str(seconds)))
        sleeper.start()
        time.sleep(0.1)
        return sleeper

    def call(self, *args) -> object:
        """One command over a plain socket (RESP), the reply parsed: no client library."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            out = [b"*%d\r\n" % len(args)]
            for a in args:
                a = a if isinstance(a, bytes) else str(a).encode()
                out.append(b"$%d\r\n%s\r\n" % (len(a), a))
            s.sendall(b"".join(out))
            f = s.makefile("rb")
            return resp(f)


def resp(f):
    line = f.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [resp(f) for _ in range(n)]
    raise RuntimeError(f"unexpected RESP {line!r}")


@pytest.fixture(scope="module")
def redis_server():
    r = RedisServer()
    yield r
    r.stop()


class Node(Manager):
    """manager.py as node K of N, on ports given by the cluster."""

    def __init__(self, k: int, base: int, args: list, redis_up: bool = True):
        self.k, self.workers, self.args = k, W, args
        self.base_port, self.app_port = base, base + W
        self.start(redis_up)

    def start(self, redis_up: bool = True) -> None:
        """Up: workers serving and, with `redis_up`, Redis answering it (publishes are
        refused until then)."""
        cmd = [sys.executable, str(ROOT / "manager.py"), "--host", "127.0.0.1",
               "--workers", str(W), "--base-port", str(self.base_port),
               "--app-port", str(self.app_port), *self.args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        try:
            self.wait_ready()
            deadline = time.monotonic() + 10
            while redis_up and self.stats().get("redis") != "up":
                assert time.monotonic() < deadline, "the node never saw Redis"
                time.sleep(0.02)
        except BaseException:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def kill(self) -> None:
        """SIGKILL the manager; its workers exit at their link's EOF."""
        pids = [w["pid"] for w in self.stats()["workers"]]
        self.proc.kill()
        self.proc.wait(5)
        self.proc.stdout.close()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids), "the workers outlived their manager"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class Cluster:
    def __init__(self, redis_url: str, prefix: str, *extra: str, status: float = 0,
                 redis_up: bool = True):
        for _ in range(5):
            block = free_port_block(N * (W + 1))
            self.bases = [block + k * (W + 1) for k in range(N)]
            hosts = ",".join(f"127.0.0.1:{b}" for b in self.bases)
            self.nodes = []
            try:
                for k in range(N):
                    self.nodes.append(Node(k, self.bases[k], [
                        "--redis", redis_url, "--node", f"{k}/{N}", "--nodes", hosts,
                        "--stream-prefix", prefix, "--status-interval", str(status), *extra],
                        redis_up))
                return
            except PortTaken:
                self.stop()
        raise RuntimeError("no free ports for three nodes")

    def owner(self, id_: str) -> tuple:
        """(node, port) that SPEC's slot function gives."""
        s = server.x31(id_.encode()) % (N * W)
        return s // W, self.bases[s // W] + s % W

    def id_on(self, k: int, prefix: str = "u") -> str:
        return next(f"{prefix}{i}" for i in range(10_000) if self.owner(f"{prefix}{i}")[0] == k)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture
def cluster(redis_server, request):
    c = Cluster(redis_server.url, f"t{request.node.name[-20:]}")
    yield c
    c.stop()


def get(port: int, path: str, headers: str = "", timeout: float = 5.0):
    return http_request(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n",
                        timeout)


def start_poll(port: int, path: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return s


def post(node: Node, path: str, body: bytes):
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    status, _, reply = http_request(node.app_port, head.encode() + body)
    return status, json.loads(reply)


def publish(node: Node, id_: str, message: bytes) -> str:
    status, reply = post(node, f"/send/{id_}", message)
    assert status == 202 and reply["ok"] and MID_RE.fullmatch(reply["mid"]), reply
    return reply["mid"]


def wait_until(cond, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out: {what}")


def waiting(node: Node) -> int:
    return node.stats()["totals"]["waiting"]


def mid_key(mid: str) -> tuple:
    ms, seq = mid.split("-")
    return int(ms), int(seq)


# ---------------------------------------------------------------------------------------------
# Slots, 307s and /_info
# ---------------------------------------------------------------------------------------------


def test_info_names_the_node_and_every_slot_307s_to_its_owner(cluster):
    """/_info adds "node", "nodes", "hosts"; a poll for another node's id gets a 307 to
    HOSTk:BASEk + s % W, query kept; slot s = x31(id) % (N x W)."""
    hosts = [f"127.0.0.1:{b}" for b in cluster.bases]
    for k, node in enumerate(cluster.nodes):
        for w in range(W):
            status, _, body = get(node.base_port + w, "/_info")
            assert status == 200
            assert json.loads(body) == {"worker": w, "workers": W, "base_port": node.base_port,
                                        "node": k, "nodes": N, "hosts": hosts}
    seen = set()
    for i in range(40):
        id_ = f"slot{i}"
        k, port = cluster.owner(id_)
        seen.add(k)
        status, headers, _ = get(cluster.bases[(k + 1) % N], f"/{id_}.js?since=0-0&x=1")
        assert status == 307
        assert headers["location"] == f"http://127.0.0.1:{port}/{id_}.js?since=0-0&x=1"
    assert seen == {0, 1, 2}


# ---------------------------------------------------------------------------------------------
# Publishing through any node, and straight into a stream
# ---------------------------------------------------------------------------------------------


def test_a_message_published_on_any_node_reaches_the_owner_with_its_stream_id(cluster,
                                                                              redis_server):
    """Any node's app port takes messages (HTTP here) and XADDs each to the owner's stream
    `<prefix>:<k>`, fields id and message; the mid is the entry id the client sees."""
    prefix = cluster.nodes[0].args[cluster.nodes[0].args.index("--stream-prefix") + 1]
    for k in range(N):
        id_ = cluster.id_on(k, f"pub{k}-")
        _, port = cluster.owner(id_)
        for publisher in cluster.nodes:
            s = start_poll(port, f"/{id_}.js")
            wait_until(lambda n=cluster.nodes[k]: waiting(n) == 1, what="poll waiting")
            mid = publish(publisher, id_, b"via %d" % publisher.k)
            status, headers, body = read_response(s)
            s.close()
            assert (status, body) == (200, b"via %d" % publisher.k)
            assert headers["x-message-id"] == mid
            entries = redis_server.call("XRANGE", f"{prefix}:{k}", mid, mid)
            assert entries == [[mid.encode(), [b"id", id_.encode(), b"message", body]]]


def test_json_lines_and_binary_frames_publish_across_nodes(cluster):
    """All three protocols: a JSON line's reply carries the entry id; binary frames have none."""
    a, b = cluster.id_on(1, "js"), cluster.id_on(2, "bin")
    with socket.create_connection(("127.0.0.1", cluster.nodes[0].app_port), timeout=5) as s:
        s.sendall(json.dumps({"id": a, "message": "hello"}).encode() + b"\n" +
                  json.dumps({"id": "bad id!", "message": "x"}).encode() + b"\n")
        f = s.makefile("rb")
        first, second = json.loads(f.readline()), json.loads(f.readline())
    assert first["ok"] is True and MID_RE.fullmatch(first["mid"])
    assert second["ok"] is False
    status, headers, body = get(cluster.owner(a)[1], f"/{a}.js")
    assert (status, body, headers["x-message-id"]) == (200, b"hello", first["mid"])
    with socket.create_connection(("127.0.0.1", cluster.nodes[1].app_port), timeout=5) as s:
        s.sendall(b"\x02%s\x00frame one\x00\x02%s\x00frame two\x00" % (b.encode(), b.encode()))
        port = cluster.owner(b)[1]
        wait_until(lambda: cluster.nodes[2].stats()["totals"]["queued_messages"] >= 2,
                   what="both frames at node 2")
    assert get(port, f"/{b}.js")[2] == b"frame one"
    assert get(port, f"/{b}.js")[2] == b"frame two"


def test_an_app_may_xadd_into_the_owner_stream_itself(cluster, redis_server):
    """"An app may XADD there itself in the same form"; entries a node does not own, with a
    bad id or missing fields are dropped and counted as rejected."""
    node = cluster.nodes[2]
    prefix = node.args[node.args.index("--stream-prefix") + 1]
    key = f"{prefix}:2"
    id_ = cluster.id_on(2, "direct")
    mid = redis_server.call("XADD", key, "*", "id", id_, "message", "straight in").decode()
    status, headers, body = get(cluster.owner(id_)[1], f"/{id_}.js")
    assert (status, body, headers["x-message-id"]) == (200, b"straight in", mid)
    before = node.stats()["manager"]["stream_rejected"]
    app_before = node.stats()["manager"]["app_rejected"]
    redis_server.call("XADD", key, "*", "id", cluster.id_on(0, "other"), "message", "not mine")
    redis_server.call("XADD", key, "*", "id", "bad id", "message", "x")
    redis_server.call("XADD", key, "*", "id", id_)  # no message
    redis_server.call("XADD", key, "*", "message", "no id")
    wait_until(lambda: node.stats()["manager"]["stream_rejected"] == before + 4,
               what="four entries rejected")
    assert node.stats()["manager"]["app_rejected"] == app_before + 4
    # ... and the node goes on: the next good entry is delivered.
    redis_server.call("XADD", key, "*", "id", id_, "message", "after")
    assert get(cluster.owner(id_)[1], f"/{id_}.js")[2] == b"after"
    metrics = http_request(node.app_port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")[2]
    assert f"megacomet_stream_rejected_total {before + 4}".encode() in metrics
    assert b"megacomet_redis_up 1" in metrics


def test_a_broadcast_reaches_every_node_with_one_id_per_node(cluster, redis_server):
    """A broadcast gets an entry (broadcast = 1, message) in every node's stream; the reply's
    mid is node 0's entry id."""
    polls = []
    for k in range(N):
        id_ = cluster.id_on(k, "bc")
        polls.append(start_poll(cluster.owner(id_)[1], f"/{id_}.js"))
    for k in range(N):
        wait_until(lambda n=cluster.nodes[k]: waiting(n) == 1, what="poll waiting")
    status, reply = post(cluster.nodes[1], "/broadcast", b"to all")
    assert status == 202
    mids = []
    for s in polls:
        status, headers, body = read_response(s)
        s.close()
        assert (status, body) == (200, b"to all")
        mids.append(headers["x-message-id"])
    assert mids[0] == reply["mid"]
    prefix = cluster.nodes[0].args[cluster.nodes[0].args.index("--stream-prefix") + 1]
    for k in range(N):
        entries = redis_server.call("XRANGE", f"{prefix}:{k}", mids[k], mids[k])
        assert entries == [[mids[k].encode(), [b"broadcast", b"1", b"message", b"to all"]]]


# ---------------------------------------------------------------------------------------------
# A node restart loses nothing
# ---------------------------------------------------------------------------------------------


def test_a_node_killed_and_restarted_replays_its_stream_and_old_cursors_work(cluster):
    """On start a node replays the last --queue-ttl of its stream as not yet delivered, before
    serving: messages published while it was down are delivered after, and a cursor from before
    the restart still works (no gap: it is not older than the oldest entry replayed)."""
    node = cluster.nodes[1]
    id_ = cluster.id_on(1, "restart")
    _, port = cluster.owner(id_)
    mid1 = publish(cluster.nodes[0], id_, b"one")
    status, headers, body = get(port, f"/{id_}.js")
    assert (status, body) == (200, b"one")
    node.kill()
    mid2 = publish(cluster.nodes[2], id_, b"two")  # the node is down; Redis keeps it
    mid3 = publish(cluster.nodes[0], id_, b"three")
    node.start()
    # The cursor from before: the next one, at once, no gap.
    status, headers, body = get(port, f"/{id_}.js?since={mid1}", timeout=3)
    assert (status, body, headers["x-message-id"]) == (200, b"two", mid2)
    assert "x-message-gap" not in headers
    status, headers, body = get(port, f"/{id_}.js?since={mid2}", timeout=3)
    assert (body, headers["x-message-id"]) == (b"three", mid3)
    # Without a cursor: replayed as not yet delivered, so "one" comes again (its id tells).
    status, headers, body = get(port, f"/{id_}.js", timeout=3)
    assert (body, headers["x-message-id"]) == (b"one", mid1)
    # A cursor older than the oldest entry replayed is told of a gap.
    older = f"{mid_key(mid1)[0] - 1}-0"
    status, headers, body = get(port, f"/{id_}.js?since={older}", timeout=3)
    assert (body, headers.get("x-message-gap")) == (b"one", "1")
    assert node.stats()["manager"]["stream_replayed"] == 3


def test_a_node_serves_nothing_before_its_replay_is_in(redis_server):
    """"Before serving": while Redis is slow to give the replay (DEBUG SLEEP), a poll that
    reaches the restarting node waits in the backlog until the replay is in. Served earlier,
    a cursor poll would wait, and be answered by the first replayed message, older than its
    cursor."""
    c = Cluster(redis_server.url, "early")
    try:
        node = c.nodes[0]
        id_ = c.id_on(0, "early")
        _, port = c.owner(id_)
        mids = [publish(c.nodes[1], id_, b"m%d" % i) for i in range(50)]
        node.kill()
        sleeper = redis_server.asleep(1.5)
        node.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manager.py"), "--host", "127.0.0.1", "--workers",
             str(W), "--base-port", str(node.base_port), "--app-port", str(node.app_port),
             *node.args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while True:  # the moment the port takes connections (the kernel's backlog)
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        s.sendall(f"GET /{id_}.js?since={mids[-2]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = read_response(s)
        s.close()
        sleeper.join()
        assert (status, body, headers["x-message-id"]) == (200, b"m49", mids[-1])
        node.wait_ready()
    finally:
        c.stop()


# ---------------------------------------------------------------------------------------------
# Redis unreachable
# ---------------------------------------------------------------------------------------------


def test_redis_stopped_and_restarted_mid_run(redis_server):
    """Redis unreachable: connections keep being served; publishes are refused within 2 s
    (HTTP 503, JSON ok false, binary: the connection closed, counted); /stats and the status
    line say so; publishing and delivery work again within 5 s of Redis answering."""
    c = Cluster(redis_server.url, "outage", status=0.5)
    try:
        node = c.nodes[0]
        id_ = c.id_on(0, "out")
        _, port = c.owner(id_)
        held = start_poll(port, f"/{id_}.js")
        wait_until(lambda: waiting(node) == 1, what="poll waiting")
        redis_server.stop()
        try:
            t0 = time.monotonic()
            status, reply = post(node, f"/send/{id_}", b"lost?")
            assert time.monotonic() - t0 < 2.0
            assert status == 503 and reply["ok"] is False and "redis" in reply["error"], reply
            wait_until(lambda: node.stats()["redis"] == "down", 5, "/stats redis down")
            with socket.create_connection(("127.0.0.1", node.app_port), timeout=5) as s:
                s.sendall(json.dumps({"id": id_, "message": "x"}).encode() + b"\n")
                reply = json.loads(s.makefile("rb").readline())
            assert reply["ok"] is False and "redis" in reply["error"]
            rejected = node.stats()["manager"]["app_rejected"]
            with socket.create_connection(("127.0.0.1", node.app_port), timeout=5) as s:
                s.sendall(b"\x02%s\x00frame\x00" % id_.encode())
                assert s.recv(100) == b""  # closed
            assert node.stats()["manager"]["app_rejected"] == rejected + 1
            # Connections are still served: the held poll waits on, a new one is answered.
            assert get(port, "/_info")[0] == 200
            assert waiting(node) == 1
        finally:
            redis_server.start()
        t_up = time.monotonic()
        while True:  # publishing works again within 5 s
            status, reply = post(c.nodes[2], f"/send/{id_}", b"back")
            if status == 202:
                break
            assert time.monotonic() - t_up < 5.0, reply
            time.sleep(0.1)
        status, headers, body = read_response(held)
        held.close()
        assert (status, body) == (200, b"back")
        assert time.monotonic() - t_up < 5.5
        wait_until(lambda: node.stats()["redis"] == "up", 5, "/stats redis up")
        deadline = time.monotonic() + 5
        while "redis: down" not in c.nodes[0].proc.stdout.readline():
            assert time.monotonic() < deadline
    finally:
        c.stop()


def test_a_node_starts_without_redis_and_catches_up_when_it_answers(redis_server):
    """Unreachable at start: nodes start and serve; publishes are refused; when Redis comes
    the node reads its stream."""
    redis_server.stop()
    try:
        c = Cluster(redis_server.url, "late", redis_up=False)
    finally:
        redis_server.start()
    try:
        node = c.nodes[1]
        id_ = c.id_on(1, "late")
        _, port = c.owner(id_)
        wait_until(lambda: node.stats()["redis"] == "up", 6, "node sees redis")
        redis_server.call("XADD", "late:1", "*", "id", id_, "message", "caught up")
        status, _, body = get(port, f"/{id_}.js")
        assert (status, body) == (200, b"caught up")
    finally:
        c.stop()


# ---------------------------------------------------------------------------------------------
# Trimming, options, the optional package
# ---------------------------------------------------------------------------------------------


def test_streams_are_trimmed_by_age(redis_server):
    """Every XADD carries MINID ~ now - --queue-ttl: old entries go (~: Redis trims whole
    nodes of its radix tree, 100 entries each by default, so 300 are published)."""
    c = Cluster(redis_server.url, "trim", "--queue-ttl", "1")
    try:
        id_ = c.id_on(0, "trim")
        with socket.create_connection(("127.0.0.1", c.nodes[0].app_port), timeout=5) as s:
            s.sendall(b"".join(b"\x02%s\x00m%d\x00" % (id_.encode(), i) for i in range(300)))
            wait_until(lambda: redis_server.call("XLEN", "trim:0") == 300, what="300 entries")
        time.sleep(1.5)  # past --queue-ttl (the MINID is recomputed every 0.1 s here)
        publish(c.nodes[0], id_, b"new")
        assert redis_server.call("XLEN", "trim:0") < 100
    finally:
        c.stop()


@pytest.mark.parametrize("args, error", [
    (["--node", "0/2"], "--redis"),
    (["--redis", "redis://x", "--node", "0/2"], "--nodes must name the 2 nodes"),
    (["--redis", "redis://x", "--node", "2/2", "--nodes", "a,b"], "expected K/N"),
    (["--redis", "redis://x", "--node", "0/2", "--nodes", "a:1,b:2,c:3"],
     "--nodes names 3 nodes"),
    (["--redis", "redis://x", "--nodes", "a:99999"], "HOST[:PORT]"),
    (["--redis", "localhost:6379"], "expected a URL"),
])
def test_node_options_are_checked(args, error):
    out = subprocess.run([sys.executable, str(ROOT / "manager.py"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and error in out.stderr, out.stderr


def test_redis_without_the_package_says_what_to_install(tmp_path):
    """"With it but without the package, the manager prints one line on stderr naming the
    package and the command that installs it, and exits 2 before opening any port." """
    fake = tmp_path / "redis"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no redis here')\n")
    port = free_port_block(2)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, str(ROOT / "manager.py"), "--redis",
                          "redis://127.0.0.1:1/0", "--workers", "1", "--base-port", str(port),
                          "--app-port", str(port + 1)], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis" in lines[0] and "pip install" in lines[0], out.stderr
    for p in (port, port + 1):  # nothing was opened: both ports still free
        socket.create_server(("127.0.0.1", p)).close()


def test_one_node_owns_ids_exactly_as_one_box(redis_server, manager_factory):
    """"With one node, exactly version 1's x31(id) % W"."""
    m = manager_factory("--redis", redis_server.url, "--stream-prefix", "single", workers=3)
    for i in range(30):
        id_ = f"one{i}"
        w = server.owner(id_.encode(), 3)
        status, headers, _ = get(m.base_port + (w + 1) % 3, f"/{id_}.js")
        assert status == 307 and headers["location"].endswith(f":{m.base_port + w}/{id_}.js")


def test_a_node_works_without_hiredis(redis_server, tmp_path):
    """hiredis is part of the extra for speed only: without it redis-py's own parser reads the
    replies (redis-py 7+ refuses its cloud maintenance notifications with that parser unless
    they are turned off: nodes.connection does)."""
    fake = tmp_path / "hiredis"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no hiredis here')\n")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tmp_path)
    try:
        base = free_port_block(W + 1)
        node = Node(0, base, ["--redis", redis_server.url, "--stream-prefix", "nohiredis",
                              "--status-interval", "0"])
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    try:
        id_ = "plain"
        port = base + server.owner(id_.encode(), W)
        mid = publish(node, id_, b"parsed in Python")
        status, headers, body = get(port, f"/{id_}.js")
        assert (status, body, headers["x-message-id"]) == (200, b"parsed in Python", mid)
    finally:
        node.stop()


def late_start(redis_server, prefix: str, entries: list, cursor: str):
    """A node started while Redis does not answer (DEBUG SLEEP 4: a partition, or a Redis
    loading its data), so its workers serve at once and its history, `entries` (seq, message)
    of id x at 10 s ago, comes late; a poll and a stream wait with `since=<ms>-<cursor>`.
    Returns (node, sleeper, ms, port, the poll's answer, the stream's bytes up to its first
    event); the caller stops the node and joins the sleeper."""
    ms = time.time_ns() // 1_000_000 - 10_000  # within --queue-ttl
    for seq, message in entries:
        redis_server.call("XADD", f"{prefix}:0", f"{ms}-{seq}", "id", "x", "message", message)
    sleeper = redis_server.asleep(4)
    base = free_port_block(W + 1)
    try:
        node = Node(0, base, ["--redis", redis_server.url, "--stream-prefix", prefix,
                              "--status-interval", "0"], redis_up=False)
    except BaseException:
        sleeper.join()
        raise
    port = base + server.owner(b"x", W)
    s = start_poll(port, f"/x.js?since={ms}-{cursor}")
    stream = socket.create_connection(("127.0.0.1", port), timeout=10)
    stream.sendall(f"GET /x.sse?since={ms}-{cursor} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    wait_until(lambda: waiting(node) == 2, what="poll and stream waiting")
    assert node.stats()["redis"] == "down"  # still asleep: the history is yet to come
    poll = read_response(s)
    s.close()
    got = b""
    while b"\ndata: " not in got or not got.endswith(b"\n\n"):
        chunk = stream.recv(4096)
        assert chunk, got
        got += chunk
    stream.close()
    return node, sleeper, ms, port, poll, got


def test_a_cursor_is_never_answered_with_an_older_message_when_the_replay_comes_late(
        redis_server):
    """Redis not answering at start: the workers serve at once, and the history comes when
    Redis answers, older than the cursors clients bring. A poll or stream waiting with a
    cursor gets the first message above it, not the first replayed (SPEC "History and the
    cursor")."""
    node, sleeper, ms, port, poll, got = late_start(
        redis_server, "lateall", [(1, "older"), (9, "newer")], "5")
    try:
        status, headers, body = poll
        assert (status, body, headers["x-message-id"]) == (200, b"newer", f"{ms}-9")
        assert b"older" not in got and f"id: {ms}-9".encode() in got, got
        # Caught up: a poll without a cursor gets the oldest not had, "older".
        status, headers, body = get(port, "/x.js")
        assert (body, headers["x-message-id"]) == (b"older", f"{ms}-1")
    finally:
        sleeper.join()
        node.stop()


def test_publishes_are_refused_within_2_s_when_redis_hangs(redis_server):
    """"Publishes are refused within 2 s": also one made while an earlier batch waits for a
    Redis that stopped answering (DEBUG SLEEP: as a network partition looks)."""
    base = free_port_block(W + 1)
    node = Node(0, base, ["--redis", redis_server.url, "--stream-prefix", "hang",
                          "--status-interval", "0"])
    sleeper = None
    try:
        publish(node, "warm", b"x")
        sleeper = redis_server.asleep(3)
        took = {}

        def timed(name: str, id_: str) -> None:
            t = time.monotonic()
            status, reply = post(node, f"/send/{id_}", b"x")
            took[name] = (time.monotonic() - t, status, reply)
        first = threading.Thread(target=timed, args=("first", "a"))
        first.start()
        time.sleep(0.3)  # the first batch is in flight
        timed("second", "b")
        first.join()
        for name, (seconds, status, reply) in took.items():
            assert status == 503 and "redis" in reply["error"], (name, reply)
            assert seconds < 2.0, (name, seconds)
    finally:
        if sleeper is not None:
            sleeper.join()
        node.stop()


def test_an_entry_that_can_never_fit_an_outbox_is_dropped_and_the_rest_goes_on(
        redis_server):
    """An entry bigger than a worker's outbox (--queue-bytes; an app's own XADD) would hold
    the reader for good, and a restarted node's workers: dropped and counted instead."""
    base = free_port_block(W + 1)
    args = ["--redis", redis_server.url, "--stream-prefix", "poison", "--queue-bytes", "4096",
            "--status-interval", "0"]
    node = Node(0, base, args)
    try:
        big, small = "big", next(f"s{i}" for i in range(100)
                                 if server.owner(f"s{i}".encode(), W) !=
                                 server.owner(b"big", W))
        redis_server.call("XADD", "poison:0", "*", "id", big, "message", "x" * 5000)
        mid = redis_server.call("XADD", "poison:0", "*", "id", small, "message", "fits").decode()
        status, headers, body = get(base + server.owner(small.encode(), W), f"/{small}.js")
        assert (body, headers["x-message-id"]) == (b"fits", mid)
        assert node.stats()["manager"]["stream_rejected"] == 1
        node.stop()
        node.start()  # the replay meets the same entry, and the workers are released
        assert get(base + server.owner(small.encode(), W), "/_info", timeout=5)[0] == 200
    finally:
        node.stop()


def test_an_ipv6_host_is_one_node_in_brackets(redis_server):
    """--redis alone on --host ::1: the node's own --nodes entry is [::1]:BASE (a bare ::1:BASE
    is no HOST:PORT, and the workers would refuse it)."""
    base = free_port_block(W + 1)
    proc = subprocess.Popen([sys.executable, str(ROOT / "manager.py"), "--host", "::1",
                             "--workers", str(W), "--base-port", str(base), "--app-port",
                             str(base + W), "--redis", redis_server.url, "--status-interval",
                             "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("::1", base), timeout=2) as s:
                    s.sendall(b"GET /_info HTTP/1.1\r\nHost: x\r\n\r\n")
                    status, _, body = read_response(s)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert status == 200 and json.loads(body)["hosts"] == [f"[::1]:{base}"]
    finally:
        proc.send_signal(15)
        out = proc.communicate(timeout=10)[0]
    assert "exited with status" not in out, out


def test_a_node_with_another_layout_says_so(redis_server):
    """Every node must have the same N and W: a node that differs from what the first wrote
    in `<prefix>:layout` logs a LAYOUT MISMATCH and shows it in /stats."""
    base = free_port_block(2 * (W + 2))
    first = Node(0, base, ["--redis", redis_server.url, "--stream-prefix", "layout",
                           "--status-interval", "0"])
    try:
        wait_until(lambda: first.stats()["manager"]["layout"] == "ok", what="layout written")
        assert redis_server.call("HGETALL", "layout:layout") == [b"nodes", b"1", b"workers",
                                                                 str(W).encode()]
        other = Manager("--redis", redis_server.url, "--stream-prefix", "layout",
                        workers=W + 1)
        wait_until(lambda: other.stats()["manager"]["layout"] not in (None, "ok"),
                   what="mismatch seen")
        assert f"W={W + 1}" in other.stats()["manager"]["layout"]
        other.stop()
        assert "LAYOUT MISMATCH" in other.output
    finally:
        first.stop()


def test_a_late_cursor_is_told_of_a_gap_against_the_replayed_history(redis_server):
    """While the history comes late, a gap is decided when the message comes, against what is
    replayed by then ("the worker's start" = the oldest entry replayed), not on arrival, when
    nothing is: the next message after the cursor comes without X-Message-Gap or `event: gap`."""
    node, sleeper, ms, port, poll, got = late_start(
        redis_server, "lategap", [(1, "m1"), (2, "m2")], "1")
    try:
        status, headers, body = poll
        assert (status, body, headers.get("x-message-gap")) == (200, b"m2", None)
        assert b"event: gap" not in got and b"data: m2" in got, got
        # A cursor older than the oldest replayed is a gap, as at any start.
        status, headers, body = get(port, f"/x.js?since={ms - 1}-0")
        assert (body, headers.get("x-message-gap")) == (b"m1", "1")
    finally:
        sleeper.join()
        node.stop()


def test_redis_users_without_transactions_or_hashes_still_publish(redis_server):
    """An ACL user without MULTI/EXEC (or a proxy without transactions): each XADD ran at once,
    its reply is its result, the message is accepted once (not refused although written). One
    without hash commands: the layout check says "not checked", the node works."""
    redis_server.call("ACL", "SETUSER", "nomulti", "on", ">pw", "~*", "&*", "+@all", "-multi",
                      "-exec", "-@hash")
    url = f"redis://nomulti:pw@127.0.0.1:{redis_server.port}/0"
    base = free_port_block(W + 1)
    node = Node(0, base, ["--redis", url, "--stream-prefix", "acl", "--status-interval", "0"])
    try:
        assert node.stats()["manager"]["layout"].startswith("not checked: ")
        mid = publish(node, "a", b"hello")
        assert redis_server.call("XLEN", "acl:0") == 1
        status, headers, body = get(base + server.owner(b"a", W), "/a.js")
        assert (body, headers["x-message-id"]) == (b"hello", mid)
    finally:
        node.stop()


def test_minid_is_on_redis_clock_not_the_node_s():
    """MINID = the newest entry id Redis gave - --queue-ttl: a node whose clock runs ahead of
    Redis's by more than the ttl would otherwise trim the entry it adds (Redis trims an XADD's
    own entry when its MINID is above it)."""
    import nodes
    state = nodes.RedisState("redis://x", ())
    router = nodes.RedisRouter(None, None, state, None, ttl=60)
    assert router.min_id() == b"0"  # no id from Redis yet: nothing trimmed
    state.saw(b"1000000-5")  # Redis's clock, 1970: far behind ours
    state.saw(b"999000-9")  # an older entry (a replay) says less, and changes nothing
    time.sleep(0.2)
    router.minid_at = float("-inf")
    ms, _, seq = router.min_id().partition(b"-")
    assert 940_200 <= int(ms) < 940_200 + 1000 and seq == b"0"  # + the time passed since
