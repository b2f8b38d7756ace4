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
  out through the Publisher: everything published during one loop pass is one MULTI/EXEC
  written at once on one connection, answered in order (one publisher's messages keep their
  order), each publish refused if Redis has not answered PUBLISH_TIMEOUT after it.
- StreamReader reads this node's stream (XREAD BLOCK) from the last entry it read and hands
  each entry to the local Router, as the one-box manager does with what the app sends. At
  start it reads from `--queue-ttl` ago, so a restarted node first replays its history into its
  workers; the workers (started with --hold) accept connections only once that replay is in
  (READY frame, link.py), so a poll with an old cursor finds its messages instead of waiting.
  If Redis cannot be reached at start the workers serve at once and the replay comes late
  (READY "partial", then CAUGHT_UP: the workers keep waiting cursors meanwhile, server.py).
  An outbox that is full holds the reader, not the message: the stream keeps it meanwhile.
  It also checks that every node has the same N and W (check_layout).
- RedisState: up or down, from the last command on either connection. While down, publishes
  are refused at once with the reason; a batch in flight when Redis stops answering is refused
  after PUBLISH_TIMEOUT (never accepted and then lost: an XADD whose reply never came may still
  have been written, so the message may come once although refused, never the other way).
  The reader reconnects with backoff (BACKOFF_MAX) and goes on from its last entry.

The RESP commands are written here (`command`, `xadd`): redis-py's pack_command and pipeline
cost ~40 µs a message; the `redis` package still does the connecting (URLs, AUTH, TLS, unix
sockets) and the reply parsing (hiredis when installed: ~20x faster on XREAD's replies).
"""

import asyncio
import math
import time
import traceback
from collections import deque

import link
import server
from server import valid_id

PUBLISH_TIMEOUT = 1.5  # a message Redis has not taken this long after its publish is refused
# (SPEC: within 2 s), counted from the publish: a batch waits for the one before it
BATCH_BYTES = 1024 * 1024  # at most this much in one pipelined write (then the next)
CONNECT_TIMEOUT = 1.0
BLOCK_MS = 1000  # XREAD BLOCK: how long a read waits for an entry
READ_GRACE = 1.5  # ... and how much longer before Redis counts as not answering
READ_COUNT = 1000  # entries per XREAD
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0  # reconnect delays (SPEC: capped at 5 s; back within 5 s)
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

    def __init__(self, node: int, nodes: int, workers: int, prefix: str):
        self.node, self.nodes, self.workers = node, nodes, workers
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


# A batch is one transaction: Redis wakes a node's XREAD BLOCK once for all of the batch's
# entries in its stream, not once per entry (a wake-up costs the reading node ~100 µs here).
MULTI, EXEC = b"*1\r\n$5\r\nMULTI\r\n", b"*1\r\n$4\r\nEXEC\r\n"
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
    if "maint_notifications_config" in kwargs:  # redis-py 7+: a cloud feature, RESP3 only
        from redis.maint_notifications import MaintNotificationsConfig
        kwargs["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return pool.connection_class(**kwargs)


def redacted(url: str) -> str:
    """The URL without its password (user:password@, or ?password=), for logs, /stats and
    the refusals apps read."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    host, q, query = host.partition("?")
    query = "&".join("password=***" if p.lower().startswith("password=") else p
                     for p in query.split("&")) if q else ""
    return f"{scheme}{sep}{'***@' if at else ''}{host}{q}{query}" if sep else url


# ---------------------------------------------------------------------------------------------
# Up or down
# ---------------------------------------------------------------------------------------------


class RedisState:
    def __init__(self, url: str, errors: tuple):
        self.url = redacted(url)
        self.errors = errors  # what a lost or failed connection raises
        self.up = False
        self.why = "not connected yet"
        # Redis's clock: an entry id Redis gave or showed is at most its "now" then, so
        # now >= that ms + the time passed since; the best such bound, kept as an offset to our
        # monotonic clock (which never jumps). None until Redis gave one.
        self.offset = None

    def saw(self, entry: bytes) -> None:
        ms = entry.partition(b"-")[0]
        if ms.isdigit():
            offset = int(ms) - time.monotonic_ns() // 1_000_000
            if self.offset is None or offset > self.offset:
                self.offset = offset

    def redis_ms(self):
        """Redis's wall clock now, in ms (a lower bound), or None."""
        return None if self.offset is None else time.monotonic_ns() // 1_000_000 + self.offset

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
    pick(replies) (an error reply is a ResponseError in the list), or (None, why) when Redis
    did not take it within PUBLISH_TIMEOUT of the submit. Everything submitted during one loop
    pass goes out as one write (BATCH_BYTES at most). At most `limit` bytes wait; past `high`
    the Flow gate holds the app's publishers until they drop below `low`."""

    def __init__(self, redis, url: str, state: RedisState, flow, limit: int):
        self.redis, self.state, self.flow, self.limit = redis, state, flow, limit
        self.conn = connection(redis, url)
        self.high = min(4 * 1024 * 1024, limit // 2)
        self.low = self.high // 4
        self.pending: deque = deque()  # (command bytes, replies, pick, future, deadline)
        self.bytes = 0  # of pending commands and the batch in flight
        self.wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def room(self, size: int) -> bool:
        return self.bytes + size <= self.limit

    def submit(self, data: bytes, replies: int, pick) -> asyncio.Future:
        fut = self.loop.create_future()
        self.pending.append((data, replies, pick, fut, self.loop.time() + PUBLISH_TIMEOUT))
        self.bytes += len(data)
        if self.bytes > self.high:
            self.flow.block("redis")
        self.wake.set()
        return fut

    def next_batch(self) -> list:
        batch, size = [], 0
        pending = self.pending
        while pending and (not batch or size + len(pending[0][0]) <= BATCH_BYTES):
            batch.append(pending.popleft())
            size += len(batch[-1][0])
        return batch

    async def run(self) -> None:
        if self.pending:  # restarted by Node.kept after a bug: what waits still goes
            self.wake.set()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                batch = self.next_batch()
                try:
                    await self.send(batch)
                finally:  # whatever happened, every future of the batch has its answer
                    why = self.state.refusal()
                    for _, _, _, fut, _ in batch:
                        if not fut.done():
                            fut.set_result((None, why))
                    self.bytes -= sum(len(b[0]) for b in batch)
                    if self.bytes <= self.low:
                        self.flow.unblock("redis")

    async def replies(self, conn, commands: int, response_error) -> list:
        """The batch's results, in order: MULTI's +OK, +QUEUED for each command, then EXEC's
        array. A command refused while queued (OOM, READONLY, NOPERM...) makes Redis discard
        the transaction: each gets that first error, none ran. Where MULTI itself is refused
        (an ACL without it, a proxy without transactions) each command ran at once and its
        reply is its result (EXEC's error is only the missing MULTI)."""
        read = conn.read_response
        try:
            await read(timeout=math.inf)
            transaction = True
        except response_error:
            transaction = False
        got, first_error = [], None
        for _ in range(commands):
            try:
                got.append(await read(timeout=math.inf))
            except response_error as e:
                got.append(e)
                first_error = first_error or e
        try:
            results = await read(timeout=math.inf)
        except response_error as e:
            results = e
        if transaction:
            results = results if isinstance(results, list) else \
                [first_error or results] * commands  # EXECABORT: none ran
        else:
            results = got
        for r in results:  # Redis's clock, for MINID (RedisRouter.min_id)
            if r.__class__ is bytes:
                self.state.saw(r)
        return results

    async def send(self, batch: list) -> None:
        errors, response_error = self.state.errors, self.redis.exceptions.ResponseError
        conn = self.conn
        try:
            # The oldest publish of the batch sets the deadline: each is answered in time.
            async with asyncio.timeout_at(batch[0][4]):
                await conn.send_packed_command(b"".join([MULTI, *(b[0] for b in batch), EXEC]),
                                               check_health=False)
                commands = sum(b[1] for b in batch)
                results = await self.replies(conn, commands, response_error)
                at = 0
                for _, replies, pick, fut, _ in batch:
                    if not fut.done():
                        fut.set_result(pick(results[at:at + replies]))
                    at += replies
            self.state.set_up()
        except (*errors, OSError, TimeoutError) as e:
            self.state.set_down(e if not isinstance(e, TimeoutError) else
                                f"no answer within {PUBLISH_TIMEOUT} s")
            await conn.disconnect(nowait=True)
            # Nothing of what waits was sent: refused now, not a timeout later.
            why = self.state.refusal()
            while self.pending:
                _, _, _, fut, _ = self.pending.popleft()
                if not fut.done():
                    fut.set_result((None, why))
            self.bytes = sum(len(b[0]) for b in batch)  # (run takes it off)


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
        self.minid_at = 0.0  # the MINID, computed again every minid_every at most
        self.minid_every = min(1.0, ttl / 10)
        self.minid = b"0"
        self.messages_in = 0  # accepted: Redis wrote them
        self.refused = 0

    def refusal(self, size: int):
        if self.supervisor.stopping:
            return "the server is shutting down: try again later"
        if not self.state.up:
            return self.state.refusal()
        if size > self.publisher.limit:
            return (f"a message of {size:,} bytes can never fit (--queue-bytes "
                    f"{self.publisher.limit:,})")
        if not self.publisher.room(size):
            return (f"redis is not keeping up ({self.publisher.bytes:,} bytes waiting for it, "
                    f"--queue-bytes {self.publisher.limit:,}): try again later")
        return None

    def min_id(self) -> bytes:
        """now - --queue-ttl on Redis's clock (RedisState.redis_ms), not ours: a node whose
        clock ran ahead by more than the ttl would trim the entry it is adding. Before Redis
        has given an id, 0: nothing trimmed."""
        now = time.monotonic()
        if now - self.minid_at >= self.minid_every:
            self.minid_at = now
            ms = self.state.redis_ms()
            self.minid = b"%d-0" % (ms - self.ttl_ms) if ms and ms > self.ttl_ms else b"0"
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
        if fut.cancelled():  # (its publisher's connection was closed at shutdown)
            return
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
    owns its id (Router.deliver). Starts --queue-ttl back: the replay, up to the newest entry
    when Redis first answers, after which the supervisor releases the workers (READY). When
    Redis cannot be reached at start the workers are released at once (a node serves its
    connections without Redis, SPEC) and told that the history comes late, until caught_up."""

    def __init__(self, redis, url: str, state: RedisState, nodemap: NodeMap, router,
                 supervisor, opts):
        self.redis, self.state, self.nodemap = redis, state, nodemap
        self.router, self.supervisor = router, supervisor
        self.conn = connection(redis, url)
        self.max_message = opts.max_message
        self.last = b"%d-0" % max(0, time.time_ns() // 1_000_000 - int(opts.queue_ttl * 1000))
        self.replay_end = None  # (ms, seq) of the newest entry when Redis first answered
        self.layout = None  # "ok", or what differs from the other nodes' N and W (check_layout)
        self.replaying = True  # the workers are held
        self.late = False  # released without the replay, which is still to come
        self.read = 0  # entries routed to the workers
        self.rejected = 0  # entries dropped: not ours, a bad id, missing fields
        self.replayed = 0

    async def run(self) -> None:
        conn, errors = self.conn, self.state.errors
        backoff = BACKOFF_MIN
        key = self.nodemap.own_key
        behind = True  # more entries wait: read without BLOCK
        while not self.supervisor.stopping:
            block = () if behind else (b"BLOCK", b"%d" % BLOCK_MS)
            try:
                async with asyncio.timeout(BLOCK_MS / 1000 + READ_GRACE):
                    if self.layout is None:
                        await self.check_layout(conn)
                    if self.replay_end is None:
                        # Where the replay ends: a stream written to fast would otherwise
                        # keep it going (and the workers held) for as long as that lasts.
                        await conn.send_packed_command(command(
                            b"XREVRANGE", key, b"+", b"-", b"COUNT", b"1"), check_health=False)
                        newest = await conn.read_response(timeout=math.inf)
                        self.replay_end = entry_id(newest[0][0]) if newest else (0, 0)
                    await conn.send_packed_command(command(
                        b"XREAD", b"COUNT", b"%d" % READ_COUNT, *block, b"STREAMS", key,
                        self.last), check_health=False)
                    reply = await conn.read_response(timeout=math.inf)
            except (*errors, OSError, TimeoutError) as e:
                self.state.set_down(e if not isinstance(e, TimeoutError) else
                                    "no answer to XREAD")
                await conn.disconnect(nowait=True)
                if self.replaying:  # serve without the replay; it comes when Redis does
                    self.replaying, self.late = False, True
                    self.supervisor.release(partial=True)
                behind = True  # the first read after a reconnect says at once if Redis is up
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            self.state.set_up()
            entries = reply[0][1] if reply else ()
            for raw_id, fields in entries:
                await self.route(raw_id, fields)
                self.last = raw_id
            if entries:
                self.state.saw(self.last)
            if self.replaying or self.late:
                self.replayed += len(entries)
            behind = len(entries) == READ_COUNT
            if (self.replaying or self.late) and (
                    not behind or (entry_id(self.last) or (0, 0)) >= self.replay_end):
                if self.replaying:
                    self.supervisor.release(partial=False)
                else:
                    self.supervisor.caught_up()
                self.replaying = self.late = False

    async def check_layout(self, conn) -> None:
        """Every node must have the same N and W, or two nodes own an id and the other's
        entries are dropped as "not ours". The first node to reach Redis writes them in
        `<prefix>:layout`; a node that differs says so at every start, loudly, in the log and
        /stats (it still serves: one wrong box must not stop the others' messages)."""
        key = self.nodemap.keys[0].rpartition(b":")[0] + b":layout"
        mine = (b"%d" % self.nodemap.nodes, b"%d" % self.nodemap.workers)
        await conn.send_packed_command(
            command(b"HSETNX", key, b"nodes", mine[0]) +
            command(b"HSETNX", key, b"workers", mine[1]) +
            command(b"HMGET", key, b"nodes", b"workers"), check_health=False)
        response_error = self.redis.exceptions.ResponseError
        replies = []
        for _ in range(3):
            try:
                replies.append(await conn.read_response(timeout=math.inf))
            except response_error as e:
                replies.append(e)
        refused = [r for r in replies if isinstance(r, response_error)]
        if refused:  # an ACL without hashes, say: the check is only a check
            self.layout = f"not checked: {refused[0]}"
            server.log(f"redis: the layout of the nodes is {self.layout}")
            return
        stored = tuple(replies[2])
        if stored == mine:
            self.layout = "ok"
            return
        self.layout = (f"this node has N={mine[0].decode()} W={mine[1].decode()}, the others "
                       f"N={stored[0].decode()} W={stored[1].decode()} ({key.decode()})")
        server.log(f"redis: LAYOUT MISMATCH: {self.layout}: ids this node takes are owned by "
                   "another node too, and entries will be dropped as not ours. Give every "
                   f"node the same --node N and --workers, or, after changing them on every "
                   f"node, DEL {key.decode()}")

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
            if len(frame) > self.router.outbox_limit:
                return self.reject(raw_id, "message can never fit a worker's outbox "
                                           f"(--queue-bytes {self.router.outbox_limit:,})")
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
            if len(frame) > self.router.outbox_limit:
                return self.reject(raw_id, "message can never fit a worker's outbox "
                                           f"(--queue-bytes {self.router.outbox_limit:,})")
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
        self.nodemap = NodeMap(K, N, opts.workers, opts.stream_prefix)
        self.state = RedisState(opts.redis, (redis.exceptions.RedisError,))
        self.publisher = Publisher(redis, opts.redis, self.state, flow, opts.queue_bytes)
        self.router = RedisRouter(self.nodemap, self.publisher, self.state, supervisor,
                                  opts.queue_ttl)
        self.reader = StreamReader(redis, opts.redis, self.state, self.nodemap, router,
                                   supervisor, opts)
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
            await asyncio.sleep(max(1.0, self.ttl))
            self.router.trim()

    def stats(self) -> dict:
        r = self.reader
        return {"node": self.nodemap.node, "nodes": self.nodemap.nodes,
                "stream": self.nodemap.own_key.decode(), "stream_read": r.read,
                "stream_rejected": r.rejected, "stream_replayed": r.replayed,
                "stream_last": r.last.decode(), "redis_waiting_bytes": self.publisher.bytes,
                "redis_error": None if self.state.up else self.state.why,
                "layout": r.layout}

    async def close(self) -> None:
        for conn in (self.publisher.conn, self.reader.conn):
            await conn.disconnect(nowait=True)
