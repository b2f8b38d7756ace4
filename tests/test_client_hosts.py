"""client.py --hosts: ids spread over several MegaComet nodes by the servers' slot function
(SPEC, "More than one box: Redis"). First the parsing and the planning as pure functions, then
whole runs on loopback: real managers on 127.0.0.2 and 127.0.0.3, and a small fake node 0 on
127.0.0.1 whose /_info says it is node 0 of 3 (a manager without --redis says nothing about
nodes), which holds or redirects the polls it gets and records them; and three real nodes
sharing a redis-server (tests/test_nodes.py's Cluster)."""

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, free_port_block
from hypothesis import given
from hypothesis import strategies as st
from test_client import small_config

import client
from client import (
    MAX_LEARNT_HOSTS,
    Node,
    location_target,
    nodes_problem,
    overlapping_nodes,
    per_port_counts,
    slot,
)
from options import MAX_NODES, host_list
from server import owner, x31

CLIENT = [sys.executable, str(ROOT / "client.py")]
V4 = socket.AF_INET

# ---------------------------------------------------------------------------------------------
# --hosts: parsing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [
    ("10.0.0.1", (("10.0.0.1", None),)),
    ("h0:8000,h1,h2:9000", (("h0", 8000), ("h1", None), ("h2", 9000))),
    ("[::1]:8000,[0:0::2]", (("[::1]", 8000), ("[::2]", None))),
    ("box-1.example.com:1", (("box-1.example.com", 1),)),
    ("a:8000,a:8001", (("a", 8000), ("a", 8001))),
    (" a , b:1 ", (("a", None), ("b", 1))),
])
def test_hosts_parse_in_order(text, parsed):
    assert host_list(text) == parsed


@pytest.mark.parametrize("text, words", [
    ("", "got '' (entry 1): an empty entry"),
    ("a,,b", "got '' (entry 2): an empty entry"),
    ("a,b,", "(entry 3): an empty entry"),
    ("a:0", "got 'a:0' (entry 1): a port is a number 1-65535"),
    ("a:65536", "a port is a number 1-65535"),
    ("a:", "a port is a number 1-65535"),
    ("a:+80", "a port is a number 1-65535"),
    ("a:８０", "a port is a number 1-65535"),
    ("a b", "a host is a name or an address"),
    ("-a", "a host is a name or an address"),
    ("::1", "an IPv6 address goes in brackets: [::1]:8000"),
    ("[::1]8000", "write [IPv6] or [IPv6]:PORT"),
    ("[::1", "write [IPv6] or [IPv6]:PORT"),
    ("[10.0.0.1]:80", "not an IPv6 address in the brackets"),
    ("a:80,b,a:80", "got 'a:80' (entry 3): named twice"),
    (",".join(f"h{i}" for i in range(MAX_NODES + 1)),
     f"expected at most {MAX_NODES} entries, got {MAX_NODES + 1:,}"),
])
def test_bad_hosts_say_what_is_wrong(text, words):
    with pytest.raises(Exception) as e:
        host_list(text)
    assert words in str(e.value)
    assert str(e.value).startswith("expected")


def test_bad_hosts_fail_at_once_with_one_line():
    p = subprocess.run([*CLIENT, "x", "127.0.0.1", "--hosts", "a,,b"], cwd=ROOT,
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 2
    assert "argument --hosts: expected HOST[:PORT] entries separated by commas" in p.stderr
    assert "--hosts" in subprocess.run([*CLIENT, "--help"], capture_output=True, text=True,
                                       timeout=20).stdout


# ---------------------------------------------------------------------------------------------
# The slot function and the plan
# ---------------------------------------------------------------------------------------------

ids = st.binary(min_size=1, max_size=40)


@given(ids, st.integers(1, 600))
def test_one_node_is_exactly_version_1s_owner(id_, workers):
    assert slot(id_, 1, workers) == (0, owner(id_, workers))


@given(ids, st.integers(1, 64), st.integers(1, 600))
def test_slot_is_node_then_worker_of_x31_mod_n_times_w(id_, nodes, workers):
    node, w = slot(id_, nodes, workers)
    assert 0 <= node < nodes and 0 <= w < workers
    assert node * workers + w == x31(id_) % (nodes * workers)
    # The worker is the one a node's own x31(id) % W picks: a node can hold a redirected id.
    assert w == owner(id_, workers)


def test_per_port_counts_are_per_node_and_port():
    counts = per_port_counts(b"a", 3000, 2, nodes=3)
    assert len(counts) == 6 and sum(counts) == 3000
    for node in range(3):
        for w in range(2):
            assert counts[node * 2 + w] == sum(slot(b"a%d" % i, 3, 2) == (node, w)
                                               for i in range(3000))
    assert all(c > 300 for c in counts)     # every node gets its share
    assert per_port_counts(b"a", 1000, 3) == per_port_counts(b"a", 1000, 3, nodes=1)


def test_sources_plan_for_the_busiest_host_port_not_the_busiest_port():
    # 3 nodes of 1 worker: port 8000 on each node is a different destination, so the plan
    # sees a third of the ids per destination, not all of them on "port 8000".
    counts = per_port_counts(b"p", 3000, 1, nodes=3)
    assert max(counts) < 1200
    sources, needed, _ = client.plan_sources(max(counts), (40000, 40999), None, True)
    assert needed == 3 and len(sources) == 3     # 450 a pair: 1,000+ needs 3, 3,000 would 7


def test_a_child_plans_each_id_on_its_node_and_round_robins_sources_per_destination():
    nodes = tuple(Node(f"127.0.0.{k + 1}", f"127.0.0.{k + 1}", V4, 8000 + 10 * k)
                  for k in range(3))
    cfg = small_config(conns=600, workers=2, nodes=nodes, sources=("127.0.0.5", "127.0.0.6"))
    child = client.Child(0, cfg, 0, 600, -1, -1)
    used: dict = {}
    for j in range(600):
        child.plan_id(j)
        k, w = slot(b"t%d" % j, 3, 2)
        assert child.dest_of[j] == k and child.port_of[j] == 8000 + 10 * k + w
        used.setdefault((k, w), []).append(child.src_of[j])
    for srcs in used.values():      # each destination alternates sources from its own start
        assert srcs[:4] == [0, 1, 0, 1]
    child.ep.close()


# ---------------------------------------------------------------------------------------------
# Redirects: a Location's host is followed with --hosts
# ---------------------------------------------------------------------------------------------


def test_location_target_takes_host_and_port():
    assert location_target(b"http://127.0.0.2:8003/a1.js?x=1") == (b"127.0.0.2", 8003)
    assert location_target(b"http://[::1]:8001/x.js") == (b"[::1]", 8001)
    assert location_target(b"http://h.example:9?x") == (b"h.example", 9)
    assert location_target(b"http://example.com/x.js") is None
    assert location_target(b"http://h:70000/x.js") is None
    assert location_target(None) is None


def redirect_child(nodes: tuple) -> client.Child:
    cfg = small_config(conns=4, workers=2, nodes=nodes)
    child = client.Child(0, cfg, 0, 4, -1, -1)
    for j in range(4):
        child.plan_id(j)
    return child


def test_a_307_to_another_node_moves_the_id_there():
    nodes = (Node("127.0.0.1", "127.0.0.1", V4, 8000), Node("127.0.0.2", "127.0.0.2", V4, 9000))
    child = redirect_child(nodes)
    assert child.redirect(0, b"http://127.0.0.2:9001/t0.js")
    assert child.dest_of[0] == 1 and child.port_of[0] == 9001
    assert child.redirect(1, b"http://127.0.0.3:8001/t1.js")    # not a node: learnt
    assert child.dests[child.dest_of[1]] == client.Dest(b"127.0.0.3", "127.0.0.3", V4)
    assert child.redirect(2, b"http://[::1]:8001/t2.js")
    assert child.dests[child.dest_of[2]] == client.Dest(b"[::1]", "::1", socket.AF_INET6)
    assert child.redirect(3, b"http://127.0.0.3:8000/t3.js")    # learnt once, reused
    assert child.dest_of[3] == child.dest_of[1] and len(child.dests) == 4
    assert not child.redirect(0, b"http://bad host:8000/t0.js")
    assert not child.redirect(0, b"http://[nope]:8000/t0.js")
    assert not child.redirect(0, b"http://127.0.0.2/t0.js")     # no port
    assert child.dest_of[0] == 1 and child.port_of[0] == 9001   # unchanged by the failures
    child.ep.close()


def test_hosts_learnt_from_locations_are_bounded():
    child = redirect_child((Node("127.0.0.1", "127.0.0.1", V4, 8000),))
    for i in range(MAX_LEARNT_HOSTS):
        assert child.redirect(0, b"http://10.1.%d.%d:8000/t0.js" % divmod(i, 256))
    assert not child.redirect(0, b"http://10.2.0.1:8000/t0.js")
    assert len(child.dests) == 1 + MAX_LEARNT_HOSTS
    child.ep.close()


def test_without_hosts_a_location_moves_only_the_port():
    child = client.Child(0, small_config(conns=1, workers=2, base_port=8000), 0, 1, -1, -1)
    child.plan_id(0)
    assert child.redirect(0, b"http://127.0.0.9:8001/t0.js")
    assert child.dest_of[0] == 0 and child.port_of[0] == 8001 and len(child.dests) == 1
    child.ep.close()


# ---------------------------------------------------------------------------------------------
# /_info against --hosts
# ---------------------------------------------------------------------------------------------

THREE = tuple(Node(f"10.0.0.{k}", f"10.0.0.{k}", V4, 8000) for k in range(3))


@pytest.mark.parametrize("info, nodes, words", [
    ({"workers": 2}, THREE[:1], None),
    ({"workers": 2, "node": 0, "nodes": 1}, THREE[:1], None),
    ({"workers": 2, "node": 0, "nodes": 3}, THREE, None),
    ({"workers": 2}, THREE, 'names 3 nodes, but http://10.0.0.0:8000/_info has no "nodes"'),
    ({"workers": 2, "node": 0, "nodes": 2}, THREE,
     "names 3 nodes, but http://10.0.0.0:8000/_info says 2: the ids would land on the wrong"),
    ({"workers": 2, "node": 0, "nodes": 3}, THREE[:1], "names 1 nodes, but"),
    ({"workers": 2, "node": 2, "nodes": 3}, THREE, "starts with 10.0.0.0:8000, but that is node 2"),
])
def test_nodes_problem_compares_info_with_hosts(info, nodes, words):
    problem = nodes_problem(info, nodes)
    assert (problem is None) if words is None else (words in problem), problem


def test_overlapping_port_ranges_on_one_address_are_found():
    a = Node("a", "10.0.0.1", V4, 8000)
    assert overlapping_nodes((a, Node("b", "10.0.0.1", V4, 8002)), 2) is None
    assert "a:8000 and b:8001 both take port 8001 of 10.0.0.1" in overlapping_nodes(
        (Node("b", "10.0.0.1", V4, 8001), a), 2)
    assert overlapping_nodes((a, Node("c", "10.0.0.2", V4, 8000)), 2) is None


# ---------------------------------------------------------------------------------------------
# Whole runs: real managers on 127.0.0.2 and .3, a fake node 0 on 127.0.0.1
# ---------------------------------------------------------------------------------------------

W = 2


class FakeNode:
    """Node 0 of 3 on 127.0.0.1, ports base..base+W-1: GET /_info says so; a poll is recorded
    as (port, id) and then held open, or with `redirect_to` answered 307 to the same port on
    that host (the real node there holds it: its x31(id) % W is the same worker)."""

    def __init__(self, base: int, info: dict, redirect_to: str | None = None):
        self.base, self.info, self.redirect_to = base, info, redirect_to
        self.polls: list[tuple[int, str]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.listen(), self.loop).result(5)

    async def listen(self):
        self.servers = [await asyncio.start_server(
            lambda r, w, port=self.base + n: self.serve(r, w, port), "127.0.0.1",
            self.base + n, backlog=4096) for n in range(W)]

    async def serve(self, reader, writer, port):
        # Every error handled here: a traceback printed from this thread meanwhile pytest
        # parses source can trip CPython 3.11's AST recursion check (SystemError).
        try:
            await self.answer(reader, writer, port)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(self, reader, writer, port):
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        if path == "/_info":
            body = json.dumps({**self.info, "worker": port - self.base}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        self.polls.append((port, path[1:].removesuffix(".js")))
        if self.redirect_to:
            writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://%s:%d%s\r\n"
                         b"Content-Length: 0\r\n\r\n" % (self.redirect_to.encode(), port,
                                                           path.encode()))
            return
        await reader.read()         # held until the client goes

    def stop(self):
        async def close():
            for s in self.servers:
                s.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class RealNode:
    """manager.py on 127.0.0.X, comet ports base..base+W-1, its app port on 127.0.0.1."""

    def __init__(self, host: str, base: int):
        self.host, self.base = host, base
        self.app_port = free_port_block(1)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manager.py"), "--host", host, "--workers", str(W),
             "--base-port", str(base), "--app-port", str(self.app_port),
             "--status-interval", "0"], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                for n in range(W):
                    socket.create_connection((host, base + n), timeout=1).close()
                if len(self.stats()["workers"]) == W:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"manager on {host}:{base} did not come up: "
                                   f"{self.proc.stdout.read()}")
            time.sleep(0.05)

    def stats(self) -> dict:
        with socket.create_connection(("127.0.0.1", self.app_port), timeout=5) as s:
            s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
                answer = client.parse_response(buf, False)
                if answer:
                    return json.loads(answer[2])
        raise OSError("no /stats")

    def waiting(self) -> list[int]:
        return [w["waiting"] for w in self.stats()["workers"]]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
def three_nodes():
    """start(info, redirect_to): the fake node 0 and two real nodes on one port block."""
    made = []

    def start(info: dict, redirect_to: str | None = None):
        for _ in range(5):      # the drawn block may be taken on .2 or .3 (or meanwhile)
            base = free_port_block(W)
            try:
                fake = FakeNode(base, info, redirect_to)
            except OSError:
                continue
            made.append(fake)
            try:
                for k in (2, 3):
                    made.append(RealNode(f"127.0.0.{k}", base))
            except RuntimeError:
                continue
            return base, fake, made[-2:]
        raise RuntimeError("no port block free on 127.0.0.1-3")

    yield start
    for node in made:
        node.stop()


def home(id_: bytes) -> tuple[int, int]:
    """(node, worker) of an id over the 3 nodes, written out from the SPEC, not client.slot()."""
    s = x31(id_) % (3 * W)
    return s // W, s % W


def expected_counts(prefix: bytes, conns: int) -> dict:
    counts: dict = {}
    for i in range(conns):
        k, w = home(b"%s%d" % (prefix, i))
        counts[k, w] = counts.get((k, w), 0) + 1
    return counts


def run_hosts(base: int, app_port: int, *args: str, tmp_path, expect: int = 0):
    out = tmp_path / "summary.json"
    hosts = f"127.0.0.1:{base},127.0.0.2:{base},127.0.0.3:{base}"
    p = subprocess.run([*CLIENT, "n", "127.0.0.1", "--hosts", hosts,
                        "--app-port", str(app_port), "--max-time", "20", "--json", str(out),
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=40)
    assert p.returncode == expect, p.stdout + p.stderr
    return (json.loads(out.read_text()) if expect == 0 else None), p.stdout + p.stderr


def test_every_id_opens_on_the_node_its_slot_names(three_nodes, tmp_path):
    base, fake, real = three_nodes({"workers": W, "base_port": 0, "node": 0, "nodes": 3})
    want = expected_counts(b"n", 1500)
    out = tmp_path / "summary.json"
    hosts = f"127.0.0.1:{base},127.0.0.2,127.0.0.3:{base}"    # .2 takes --base-port
    p = subprocess.Popen([*CLIENT, "n", "127.0.0.1", "--hosts", hosts, "--base-port", str(base),
                          "--conns", "1500", "--procs", "2", "--hold", "20", "--app-port",
                          str(real[0].app_port), "--json", str(out)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # nodes 1 and 2, real: each worker holds exactly the ids of its slot
        expected = [[want[k, w] for w in range(W)] for k in (1, 2)]
        deadline = time.monotonic() + 15
        while [n.waiting() for n in real] != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [n.waiting() for n in real] == expected
    finally:
        p.terminate()
        output, _ = p.communicate(timeout=10)
    # node 0, the fake: exactly its ids, each on its worker's port, each once
    assert sorted(i for _, i in fake.polls) == sorted(
        f"n{i}" for i in range(1500) if home(b"n%d" % i)[0] == 0)
    assert all(home(i.encode()) == (0, port - base) for port, i in fake.polls)
    assert {port for port, _ in fake.polls} == {base, base + 1}
    s = json.loads(out.read_text())
    assert p.returncode == 128 + 15 and s["stopped_by"] == "SIGTERM", output
    assert s["hosts"] == [f"127.0.0.{k}:{base}" for k in (1, 2, 3)]
    assert s["ids_opened"] == 1500 and s["status"] == {} and not any(s["failed"].values())
    assert s["server"] is None and "counts one node's connections" in " ".join(s["notes"])
    assert f"ids to 3 nodes (127.0.0.1:{base}, 127.0.0.2:{base}, 127.0.0.3:{base}, " \
           f"2 workers each)" in output


def test_a_307_to_another_host_is_followed_there(three_nodes, tmp_path):
    # Node 0 sends every poll on to 127.0.0.2, same port: the id is then held there.
    base, fake, real = three_nodes({"workers": W, "base_port": 0, "node": 0, "nodes": 3},
                                   redirect_to="127.0.0.2")
    want = expected_counts(b"n", 900)
    s, _ = run_hosts(base, real[0].app_port, "--conns", "900", "--hold", "1", tmp_path=tmp_path)
    moved = want[0, 0] + want[0, 1]
    assert s["status"] == {"307": moved} and s["ids_opened"] == 900, s["status"]
    assert len(fake.polls) == moved         # once each: later polls go straight to .2
    assert s["open_at_end"] == 900 and not any(s["failed"].values())


@pytest.mark.parametrize("info, words", [
    ({"workers": W}, 'names 3 nodes, but http://127.0.0.1:'),
    ({"workers": W, "node": 0, "nodes": 4}, "says 4: the ids would land on the wrong nodes"),
    ({"workers": W, "node": 1, "nodes": 3}, "but that is node 1 of 3"),
])
def test_hosts_that_do_not_match_the_servers_are_refused(three_nodes, tmp_path, info, words):
    base, fake, real = three_nodes(info)
    _, out = run_hosts(base, real[0].app_port, "--conns", "10", tmp_path=tmp_path, expect=2)
    assert out.count("\n") == 1 and words in out, out
    assert fake.polls == [] and all(n.waiting() == [0] * W for n in real)


def test_one_host_is_todays_run_on_that_host(tmp_path):
    for _ in range(5):
        base = free_port_block(W)
        try:
            node = RealNode("127.0.0.2", base)
            break
        except RuntimeError:
            continue
    try:
        out = tmp_path / "s.json"
        p = subprocess.run([*CLIENT, "o", "127.0.0.1", "--hosts", f"127.0.0.2:{base}",
                            "--conns", "400", "--hold", "0.5", "--app-port", str(node.app_port),
                            "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=40)
        assert p.returncode == 0, p.stdout + p.stderr
        s = json.loads(out.read_text())
        assert s["hosts"] == [f"127.0.0.2:{base}"] and s["base_port"] == base
        assert s["server"]["waiting"] == 400 and s["ids_opened"] == 400    # checked: one node
        assert s["status"] == {}                    # no redirects: W from its /_info
        assert "ids to 1 node (127.0.0.2:" in p.stdout
    finally:
        node.stop()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="this box has no IPv6 loopback (::1)")
def test_an_ipv6_node_in_brackets(tmp_path):
    for _ in range(5):
        base = free_port_block(W)
        try:
            node = RealNode("::1", base)
            break
        except RuntimeError:
            continue
    try:
        out = tmp_path / "s.json"
        cmd = [*CLIENT, "six", "127.0.0.1", "--hosts", f"[::1]:{base}", "--conns", "300",
               "--hold", "0.5", "--app-port", str(node.app_port), "--json", str(out)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=40)
        assert p.returncode == 0, p.stdout + p.stderr
        s = json.loads(out.read_text())
        assert s["hosts"] == [f"[::1]:{base}"] and s["server"]["waiting"] == 300
        assert s["status"] == {}       # each on its owner's port: no redirects
        p = subprocess.run([*cmd, "--source-ips", "127.0.0.2"], cwd=ROOT, capture_output=True,
                           text=True, timeout=40)
        assert p.returncode == 2 and p.stderr == (
            f"client.py: --source-ips are IPv4 addresses, and --hosts [::1]:{base} is IPv6: "
            f"leave --source-ips out\n")
    finally:
        node.stop()


# ---------------------------------------------------------------------------------------------
# Against three real nodes on one redis-server (tests/test_nodes.py's Cluster)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def real_cluster():
    from test_nodes import Cluster, RedisServer
    redis = RedisServer()
    try:
        cluster = Cluster(redis.url, "hosts")
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        redis.stop()


def test_three_real_nodes_no_redirects_and_every_message_delivered(real_cluster, tmp_path):
    c = real_cluster
    hosts = ",".join(f"127.0.0.1:{b}" for b in c.bases)
    out = tmp_path / "s.json"
    base = [*CLIENT, "r", "127.0.0.1", "--app-port", str(c.nodes[1].app_port),
            "--max-time", "30", "--json", str(out)]
    p = subprocess.run([*base, "--hosts", hosts, "--conns", "1200", "--send", "300",
                        "--send-rate", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    s = json.loads(out.read_text())
    assert "307" not in s["status"] and s["ids_opened"] == 1200, s["status"]
    assert s["sent"] == s["received"] == 300 and s["lost"] == 0     # through node 1's app port
    assert s["hosts"] == hosts.split(",")
    # In another order the first entry is not node 0: refused before anything opens.
    swapped = ",".join(hosts.split(",")[::-1])
    p = subprocess.run([*base, "--hosts", swapped, "--conns", "10"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "but that is node 2 of 3" in p.stderr, p.stderr
    p = subprocess.run([*base, "--hosts", hosts.rsplit(",", 1)[0], "--conns", "10"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "names 2 nodes, but" in p.stderr and "says 3" in p.stderr
