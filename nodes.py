"""More than one box: N managers (nodes) sharing one Redis (SPEC "More than one box: Redis").

    python manager.py --redis redis://HOST:6379/0 --node K/N --nodes H0[:BASE0],H1[:BASE1],...

Theory of operation
-------------------
Each node owns the slots K*W .. K*W + W-1 of `x31(id) % (N x W)`, and a Redis stream,
`<prefix>:<K>`, which is its only input. Nothing passes between nodes but Redis:

- RedisRouter takes the app port's messages (all three protocols, as Router does for one box)
  and XADDs each to the stream of the node that owns its id; a broadcast gets an entry in every
  node's stream. The reply's mid is the entry id Redis gave, which is the message id every
  client of that node sees, so a cursor stays good across nodes and restarts. Its XADDs go
  out through the Publisher: everything published during one loop pass is one pipelined write
  on one connection, answered in order (one publisher's messages keep their order).
- StreamReader reads this node's stream (XREAD BLOCK) from the last entry it read and hands
  each entry to the local Router, as the one-box manager does with what the app sends. At
  start it reads from `--queue-ttl` ago, so a restarted node first replays its history into its
  workers; the workers (started with --hold) accept connections only once that replay is in
  (READY frame, link.py), so a poll with an old cursor finds its messages instead of waiting.
  An outbox that is full holds the reader, not the message: the stream keeps it meanwhile.
- RedisState: up or down, from the last command on either connection. While down, publishes
  are refused at once with the reason; a batch in flight when Redis stops answering is refused
  after PUBLISH_TIMEOUT (never accepted and then lost: an XADD whose reply never came may still
  have been written, so the message may come once although refused, never the other way).
  The reader reconnects with backoff (BACKOFF_MAX) and goes on from its last entry.

The RESP commands are written here (`command`, `xadd`): redis-py's pack_command and pipeline
cost ~40 µs a message; the `redis` package still does the connecting (URLs, AUTH, TLS, unix
sockets) and the reply parsing (hiredis when installed: 10x faster on XREAD's replies).
"""

import asyncio
import math
import time
import traceback

import link
import server
from server import valid_id

PUBLISH_TIMEOUT = 1.5  # a batch unanswered this long is refused (SPEC: within 2 s)
CONNECT_TIMEOUT = 1.0
BLOCK_MS = 1000  # XREAD BLOCK: how long a read waits for an entry
READ_GRACE = 1.5  # ... and how much longer before Redis counts as not answering
READ_COUNT = 1000  # entries per XREAD
BACKOFF_MIN, BACKOFF_MAX = 0.1, 4.0  # reconnect delays (SPEC: capped at 5 s; back within 5 s)
OUTBOX_WAIT = 0.01  # seconds between two tries to put an entry into a full outbox
INSTALL = "pip install 'megacomet[redis]' (or: pip install redis hiredis)"


class RedisMissing(Exception):
    pass


def redis_module():
    """The `redis` package's asyncio half, or RedisMissing with the line to print."""
    try:
        import redis.asyncio
        import redis.exceptions
    except ImportError:
        raise RedisMissing("megacomet: --redis needs the Python package redis, which is not "
                           f"installed: {INSTALL}") from None
    return redis


# ---------------------------------------------------------------------------------------------
# Nodes and slots
# ---------------------------------------------------------------------------------------------


class NodeMap:
    """Who owns an id: slot x31(id) % (N x W), node slot // W, worker slot % W."""

    def __init__(self, node: int, nodes: int, workers: int, hosts: tuple, prefix: str):
        self.node, self.nodes, self.workers = node, nodes, workers
        self.hosts = hosts  # ((host, base port), ...) as clients reach each node
        self.slots = nodes * workers
        self.keys = [f"{prefix}:{k}".encode() for k in range(nodes)]
        self.own_key = self.keys[node]

    def node_of(self, id_: bytes) -> int:
        return server.x31(id_) % self.slots // self.workers

    def worker_of(self, id_: bytes) -> int:
        return server.x31(id_) % self.slots % self.workers


# ---------------------------------------------------------------------------------------------
# RESP
# ---------------------------------------------------------------------------------------------


def command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


XADD = (b"*10\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$5\r\nMINID\r\n$1\r\n~\r\n$%d\r\n%s\r\n$1\r\n*\r\n"
        b"$%d\r\n%s\r\n$%d\r\n%s\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n")


def xadd(key: bytes, minid: bytes, field: bytes, value: bytes, message: bytes) -> bytes:
    """XADD key MINID ~ minid * field value message message: the SPEC's entry, trimmed by age
    as it is added (~: Redis trims whole nodes of its radix tree, cheaply)."""
    return XADD % (len(key), key, len(minid), minid, len(field), field, len(value), value,
                   len(message), message)


def entry_id(raw: bytes):
    """(ms, seq) of a stream entry id, or None."""
    ms, sep, seq = raw.partition(b"-")
    if not (sep and ms.isdigit() and seq.isdigit() and len(ms) <= 20 and len(seq) <= 20):
        return None
    ms, seq = int(ms), int(seq)
    return (ms, seq) if ms < 2**64 and seq < 2**64 else None


def connection(redis, url: str):
    """One redis-py connection for `url`, without its retries (we retry, and refuse in time)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    pool = redis.asyncio.ConnectionPool.from_url(url)
    kwargs = dict(pool.connection_kwargs, socket_timeout=None,
                  socket_connect_timeout=CONNECT_TIMEOUT, retry=Retry(NoBackoff(), 0),
                  health_check_interval=0, protocol=2)  # RESP2: XREAD's reply is a list
    return pool.connection_class(**kwargs)


def redacted(url: str) -> str:
    """The URL without its password, for logs and /stats."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}" if sep else url


# ---------------------------------------------------------------------------------------------
# Up or down
# ---------------------------------------------------------------------------------------------


class RedisState:
    def __init__(self, url: str, errors: tuple):
        self.url = redacted(url)
        self.errors = errors  # what a lost or failed connection raises
        self.up = False
        self.why = "not connected yet"

    def set_up(self) -> None:
        if not self.up:
            self.up = True
            server.log(f"redis: up ({self.url})")

    def set_down(self, e) -> None:
        why = str(e) or e.__class__.__name__
        if self.up or why != self.why:
            server.log(f"redis: down ({self.url}: {why})")
        self.up, self.why = False, why

    def refusal(self) -> str:
        return f"redis at {self.url} is unreachable ({self.why}): try again later"


# ---------------------------------------------------------------------------------------------
# Publisher: XADDs, one pipelined round trip per loop pass
# ---------------------------------------------------------------------------------------------


class Publisher:
    """Commands out on one connection, in the order given; each submit's future gets
    pick(replies) (an error reply is a ResponseError in the list), or (None, why) when the
    batch failed. At most `limit` bytes wait; past `high` the Flow gate holds the app's
    publishers until they drop below `low`."""

    def __init__(self, redis, url: str, state: RedisState, flow, limit: int):
        self.redis, self.state, self.flow, self.limit = redis, state, flow, limit
        self.conn = connection(redis, url)
        self.high = min(4 * 1024 * 1024, limit // 2)
        self.low = self.high // 4
        self.pending: list = []  # (command bytes, replies, pick, future)
        self.bytes = 0  # of pending commands and the batch in flight
        self.wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def room(self, size: int) -> bool:
        return self.bytes + size <= self.limit

    def submit(self, data: bytes, replies: int, pick) -> asyncio.Future:
        fut = self.loop.create_future()
        self.pending.append((data, replies, pick, fut))
        self.bytes += len(data)
        if self.bytes > self.high:
            self.flow.block("redis")
        self.wake.set()
        return fut

    async def run(self) -> None:
        errors, response_error = self.state.errors, self.redis.exceptions.ResponseError
        conn = self.conn
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                batch, self.pending = self.pending, []
                size = sum(len(b[0]) for b in batch)
                done = 0
                try:
                    async with asyncio.timeout(PUBLISH_TIMEOUT):
                        await conn.send_packed_command(b"".join(b[0] for b in batch),
                                                       check_health=False)
                        for _, replies, pick, fut in batch:
                            got = []
                            for _ in range(replies):
                                try:
                                    got.append(await conn.read_response(timeout=math.inf))
                                except response_error as e:  # the others still come
                                    got.append(e)
                            done += 1
                            if not fut.done():
                                fut.set_result(pick(got))
                    self.state.set_up()
                except (*errors, OSError, TimeoutError) as e:
                    self.state.set_down(e if not isinstance(e, TimeoutError) else
                                        f"no answer within {PUBLISH_TIMEOUT} s")
                    await conn.disconnect(nowait=True)
                    why = self.state.refusal()
                    for _, _, _, fut in batch[done:]:
                        if not fut.done():
                            fut.set_result((None, why))
                self.bytes -= size
                if self.bytes <= self.low:
                    self.flow.unblock("redis")


# ---------------------------------------------------------------------------------------------
# RedisRouter: the app port's messages into the owners' streams
# ---------------------------------------------------------------------------------------------


def one_entry(replies: list) -> tuple:
    reply = replies[0]
    if isinstance(reply, bytes):
        mid = entry_id(reply)
        if mid is not None:
            return mid, None
    return None, f"redis refused the message: {reply}"


def every_entry(replies: list) -> tuple:
    """A broadcast or an ids line: accepted when every XADD was; the mid is the first's (a
    broadcast's first entry is node 0's, SPEC)."""
    bad = [r for r in replies if not isinstance(r, bytes)]
    if bad:
        return None, (f"redis refused {len(bad)} of the {len(replies)} entries ({bad[0]}); "
                      "the others were written")
    return one_entry(replies)


class RedisRouter:
    """send / send_one / broadcast, as Router's, for the app port of a node. A refusal known
    at once is (None, why); otherwise (future, None), the future giving ((ms, seq), None) or
    (None, why) when Redis answered."""

    def __init__(self, nodemap: NodeMap, publisher: Publisher, state: RedisState,
                 supervisor, ttl: float):
        self.nodemap, self.publisher, self.state = nodemap, publisher, state
        self.supervisor = supervisor
        self.ttl_ms = int(ttl * 1000)
        self.minid_at = 0.0  # the MINID of this second, computed once a second
        self.minid = b"0"
        self.messages_in = 0  # accepted: Redis wrote them
        self.refused = 0

    def refusal(self, size: int):
        if self.supervisor.stopping:
            return "the server is shutting down: try again later"
        if not self.state.up:
            return self.state.refusal()
        if not self.publisher.room(size):
            return (f"redis is not keeping up ({self.publisher.bytes:,} bytes waiting for it, "
                    f"--queue-bytes {self.publisher.limit:,}): try again later")
        return None

    def min_id(self) -> bytes:
        now = time.monotonic()
        if now - self.minid_at >= 1.0:
            self.minid_at = now
            self.minid = b"%d-0" % max(0, time.time_ns() // 1_000_000 - self.ttl_ms)
        return self.minid

    def submit(self, data: bytes, replies: int, pick, count: int) -> tuple:
        why = self.refusal(len(data))
        if why is not None:
            self.refused += 1
            return None, why
        fut = self.publisher.submit(data, replies, pick)
        fut.add_done_callback(lambda f: self.counted(f, count))
        return fut, None

    def counted(self, fut, count: int) -> None:
        if fut.result()[1] is None:
            self.messages_in += count
        else:
            self.refused += 1

    def send_one(self, id_: bytes, message: bytes) -> tuple:
        key = self.nodemap.keys[self.nodemap.node_of(id_)]
        return self.submit(xadd(key, self.min_id(), b"id", id_, message), 1, one_entry, 1)

    def send(self, ids: list, message: bytes) -> tuple:
        """An ids line: an entry per id, in the stream of each id's node."""
        keys, minid = self.nodemap.keys, self.min_id()
        data = b"".join(xadd(keys[self.nodemap.node_of(i)], minid, b"id", i, message)
                        for i in ids)
        return self.submit(data, len(ids), every_entry, len(ids))

    def broadcast(self, message: bytes) -> tuple:
        minid = self.min_id()
        data = b"".join(xadd(key, minid, b"broadcast", b"1", message)
                        for key in self.nodemap.keys)
        return self.submit(data, len(self.nodemap.keys), every_entry, 1)

    def trim(self) -> None:
        """XTRIM this node's stream by age, once per --queue-ttl (the XADDs trim the streams
        they add to; this catches a stream nobody writes to any more)."""
        if self.state.up:
            data = command(b"XTRIM", self.nodemap.own_key, b"MINID", b"~", self.min_id())
            self.publisher.submit(data, 1, lambda replies: (None, None))


# ---------------------------------------------------------------------------------------------
# StreamReader: this node's stream into its workers
# ---------------------------------------------------------------------------------------------


class StreamReader:
    """Reads `<prefix>:<K>` from the last entry read and routes each entry to the worker that
    owns its id (Router.deliver). Starts --queue-ttl back: the replay, after which `ready()`
    lets the workers accept (also when Redis cannot be reached at start: a node serves its
    connections without Redis, SPEC)."""

    def __init__(self, redis, url: str, state: RedisState, nodemap: NodeMap, router,
                 supervisor, opts, ready):
        self.redis, self.state, self.nodemap = redis, state, nodemap
        self.router, self.supervisor, self.ready = router, supervisor, ready
        self.conn = connection(redis, url)
        self.max_message = opts.max_message
        self.last = b"%d-0" % max(0, time.time_ns() // 1_000_000 - int(opts.queue_ttl * 1000))
        self.replaying = True
        self.read = 0  # entries routed to the workers
        self.rejected = 0  # entries dropped: not ours, a bad id, missing fields
        self.replayed = 0

    async def run(self) -> None:
        conn, errors = self.conn, self.state.errors
        backoff = BACKOFF_MIN
        key = self.nodemap.own_key
        while not self.supervisor.stopping:
            block = () if self.replaying else (b"BLOCK", b"%d" % BLOCK_MS)
            try:
                async with asyncio.timeout(BLOCK_MS / 1000 + READ_GRACE):
                    await conn.send_packed_command(command(
                        b"XREAD", b"COUNT", b"%d" % READ_COUNT, *block, b"STREAMS", key,
                        self.last), check_health=False)
                    reply = await conn.read_response(timeout=math.inf)
            except (*errors, OSError, TimeoutError) as e:
                self.state.set_down(e if not isinstance(e, TimeoutError) else
                                    "no answer to XREAD")
                await conn.disconnect(nowait=True)
                self.replay_done()  # serve without the replay; it comes when Redis does
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            self.state.set_up()
            entries = reply[0][1] if reply else ()
            for raw_id, fields in entries:
                await self.route(raw_id, fields)
                self.last = raw_id
            if self.replaying:
                self.replayed += len(entries)
                if len(entries) < READ_COUNT:
                    self.replay_done()

    def replay_done(self) -> None:
        if self.replaying:
            self.replaying = False
            self.ready()

    def reject(self, raw_id: bytes, why: str) -> None:
        self.rejected += 1
        if self.rejected <= 10 or self.rejected % 1000 == 0:
            server.log(f"redis: entry {raw_id[:40]!r} of {self.nodemap.own_key.decode()} "
                       f"dropped: {why} ({self.rejected:,} so far)")

    async def route(self, raw_id: bytes, fields: list) -> None:
        mid = entry_id(raw_id)
        f = dict(zip(fields[::2], fields[1::2], strict=False)) if fields else {}
        message = f.get(b"message")
        if mid is None:
            return self.reject(raw_id, "not an entry id")
        if message is None:
            return self.reject(raw_id, "no message field")
        if len(message) > self.max_message:
            return self.reject(raw_id, f"message over --max-message {self.max_message}")
        ms, seq = mid
        if f.get(b"broadcast") == b"1":
            frame = link.encode(link.BROADCAST, b"", message, ms, seq)
            while not self.router.deliver_all(frame):
                await asyncio.sleep(OUTBOX_WAIT)
        else:
            id_ = f.get(b"id")
            if id_ is None or not valid_id(id_):
                return self.reject(raw_id, "no valid id field (1-128 of [A-Za-z0-9_~-])")
            if self.nodemap.node_of(id_) != self.nodemap.node:
                return self.reject(raw_id, f"id {id_.decode()} is node "
                                           f"{self.nodemap.node_of(id_)}'s")
            frame = link.encode_msg(id_, message, ms, seq)
            worker = self.nodemap.worker_of(id_)
            while not self.router.deliver(worker, frame):
                await asyncio.sleep(OUTBOX_WAIT)
        self.read += 1


# ---------------------------------------------------------------------------------------------
# Node: the above, put together for manager.run
# ---------------------------------------------------------------------------------------------


class Node:
    def __init__(self, opts, router, supervisor, flow):
        redis = redis_module()
        K, N = opts.node
        self.nodemap = NodeMap(K, N, opts.workers, opts.nodes, opts.stream_prefix)
        self.state = RedisState(opts.redis, (redis.exceptions.RedisError,))
        self.publisher = Publisher(redis, opts.redis, self.state, flow, opts.queue_bytes)
        self.router = RedisRouter(self.nodemap, self.publisher, self.state, supervisor,
                                  opts.queue_ttl)
        self.reader = StreamReader(redis, opts.redis, self.state, self.nodemap, router,
                                   supervisor, opts, supervisor.release)
        self.ttl = opts.queue_ttl
        server.log(f"node {K} of {N}: reads {self.nodemap.own_key.decode()} on "
                   f"{self.state.url}; the last {opts.queue_ttl:g} s of it replayed first")

    def tasks(self) -> list:
        return [self.kept(self.publisher.run), self.kept(self.reader.run),
                self.kept(self.trim_every_ttl)]

    async def kept(self, run) -> None:
        """A bug in one of the loops is logged and the loop started again (the reader goes
        on from its last entry), instead of ending delivery without a word."""
        while True:
            try:
                await run()
                return
            except Exception:
                server.log(f"redis: {run.__qualname__} failed, restarted in 1 s:\n"
                           f"{traceback.format_exc()}")
                await asyncio.sleep(1.0)

    async def trim_every_ttl(self) -> None:
        while True:
            await asyncio.sleep(self.ttl)
            self.router.trim()

    def stats(self) -> dict:
        r = self.reader
        return {"node": self.nodemap.node, "nodes": self.nodemap.nodes,
                "stream": self.nodemap.own_key.decode(), "stream_read": r.read,
                "stream_rejected": r.rejected, "stream_replayed": r.replayed,
                "stream_last": r.last.decode(), "redis_waiting_bytes": self.publisher.bytes,
                "redis_error": None if self.state.up else self.state.why}

    async def close(self) -> None:
        for conn in (self.publisher.conn, self.reader.conn):
            await conn.disconnect(nowait=True)
