"""MessageStore (SPEC "History and the cursor"): pure, property-tested against a model.

A hypothesis state machine drives one store through any sequence of appends (several ids, keys
strictly increasing as the manager makes them, bodies of every size up to past max_bytes,
sometimes already delivered; also append(trim=False), delivery, trim() as the worker does it),
time passing with and without expire(), polls without a cursor (oldest_undelivered +
delivered), readers with a cursor (after), and deliveries of any message ever appended. A
model keeps what the SPEC says must be kept and checks after every step:

- each id's history is exactly the model's: FIFO key order, at most per_id, an id with nothing
  kept has no `histories` entry; the kept bodies sum to at most max_bytes after every append;
- `order`, tombstones left out, is every kept message in arrival order (also across its
  compaction: test_order_compaction_keeps_every_kept_message);
- `count` equals the model: queued messages and bytes, undelivered; expired + dropped is every
  eviction; the _UNDELIVERED figures are exactly the evictions of messages no client had had;
  expire() keeps nothing past its TTL and returns the next deadline;
- a reader that passes the key of the last message it had never gets one twice, and gets
  every kept message above its cursor, in order;
- gap(): True whenever a message of the id above the cursor was evicted (also once the store
  forgot the eviction), or the cursor is not 0-0 and older than the start; False when none
  was, the cursor is not older than the start and not below `forgotten`; the cursor's own
  message evicted is no gap; evicted_after() is exactly the evictions the store remembers.
  (0-0 once the eviction is forgotten: test_gap_for_0_0_after_the_store_forgot_the_eviction.)

Smaller properties and worked examples come first: parse_cursor / cursor_text, expiry not held
back by the per-id cap's tombstones, compaction, the gap's cases one by one.
"""

from collections import deque

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import link
from link import (
    DROPPED,
    DROPPED_UNDELIVERED,
    EXPIRED,
    EXPIRED_UNDELIVERED,
    QUEUED_BYTES,
    QUEUED_MESSAGES,
    UNDELIVERED,
)
from server import SEQ_BITS, MessageStore, cursor_text, mid_key, parse_cursor

U64 = 2**64 - 1
IDS = [b"a", b"b", b"c"]
NEVER = b"never"  # an id no message is ever appended to
STORE_FIGURES = {QUEUED_MESSAGES, QUEUED_BYTES, UNDELIVERED, EXPIRED, DROPPED,
                 EXPIRED_UNDELIVERED, DROPPED_UNDELIVERED}


def new_count():
    return [0] * len(link.PAGE_FIELDS)


# ---------------------------------------------------------------------------------------------
# parse_cursor, cursor_text
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, key", [
    (b"0-0", 0),
    (b"1-2", mid_key(1, 2)),
    (b"18446744073709551615-18446744073709551615", mid_key(U64, U64)),
    (b"0001-002", mid_key(1, 2)),
    (b"00-00", 0),
    (b"1700000000000-0", mid_key(1700000000000, 0)),
    (b"0" * 30 + b"18446744073709551615-7", mid_key(U64, 7)),
])
def test_parse_cursor_valid(text, key):
    assert parse_cursor(text) == key


@pytest.mark.parametrize("text", [
    b"1", b"-1", b"1-", b"-", b"a-1", b"1-a", b"1-2-3", b"18446744073709551616-0",
    b"0-18446744073709551616", b"9" * 5000 + b"-0", b"0-" + b"1" * 5000, b"1 -2", b"1- 2",
    b" 1-2", b"1-2 ", b"1-2\n", b"+1-2", b"1-+2", b"", b"1_0-2", b"0x1-2", "\u0661-2".encode(),
])
def test_parse_cursor_invalid(text):
    assert parse_cursor(text) is None


@pytest.mark.parametrize("text, key", [
    (b"0" * 5000 + b"-0", 0),
    (b"0-" + b"0" * 4301, 0),
    (b"0" * 4300 + b"1-1", mid_key(1, 1)),
])
def test_parse_cursor_long_leading_zeros_never_raise(text, key):
    # A cursor comes from the client (?since=, Last-Event-ID) and the head may hold 8 KiB: a
    # part of more than 4,300 digits, most of them leading zeros, must not reach int(), which
    # refuses it with ValueError (an exception out of the worker's request handler).
    try:
        result = parse_cursor(text)
    except ValueError as e:
        pytest.fail(f"parse_cursor raised {e!r}")
    assert result in (None, key)  # leading zeros are accepted elsewhere; refusing is safe


@pytest.mark.parametrize("zeros", [0, 3])
def test_cursor_text_round_trip_examples(zeros):
    for ms, seq in [(0, 0), (1, 2), (U64, U64), (U64, 0), (0, U64), (1700000000000, 41)]:
        key = mid_key(ms, seq)
        text = cursor_text(key)
        assert text == b"%d-%d" % (ms, seq)
        assert parse_cursor(text) == key
        assert parse_cursor(b"0" * zeros + text) == key


U64S = st.integers(min_value=0, max_value=U64)


@settings(max_examples=300, deadline=None)
@given(U64S, U64S, st.integers(0, 3), st.integers(0, 3))
def test_cursor_text_round_trip_property(ms, seq, zeros_ms, zeros_seq):
    key = mid_key(ms, seq)
    assert key >> SEQ_BITS == ms and key & U64 == seq
    assert cursor_text(key) == b"%d-%d" % (ms, seq)
    assert parse_cursor(cursor_text(key)) == key
    assert parse_cursor(b"0" * zeros_ms + b"%d-" % ms + b"0" * zeros_seq + b"%d" % seq) == key
    assert mid_key(ms, seq) <= mid_key(ms, U64) < mid_key(ms + 1, 0)  # key order: (ms, seq)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=30),
                 st.from_regex(rb"\A[0-9]{0,25}-[0-9]{0,25}\Z"),
                 st.from_regex(rb"\A[ +0-9-]{0,12}\Z")))
def test_parse_cursor_any_bytes(text):
    # never raises; a key exactly for <digits>-<digits> with both parts below 2**64
    key = parse_cursor(text)
    parts = text.split(b"-")
    valid = (len(parts) == 2 and all(p and p.isdigit() and p.isascii() and int(p) <= U64
                                     for p in parts))
    assert (key is not None) == valid
    if valid:
        assert key == mid_key(int(parts[0]), int(parts[1]))


# ---------------------------------------------------------------------------------------------
# Worked examples (each also reachable by the state machine below)
# ---------------------------------------------------------------------------------------------

def test_ttl_expiry_is_not_held_back_by_a_per_id_tombstone():
    # x's first message is pushed out by x's second (per_id=1) at t=5; its tombstone stays at
    # the head of `order`, its `expires` now the time to forget the eviction (15). y's message
    # (t=1, TTL 10) must be gone at t=11, and expire() must not name 15 as the next deadline.
    count = new_count()
    store = MessageStore(count, 10, 1, 10**6, 0)
    store.append(b"x", mid_key(1, 0), b"1-0", b"a", 0)
    y = store.append(b"y", mid_key(1, 1), b"1-1", b"b", 1)
    store.append(b"x", mid_key(1, 2), b"1-2", b"c", 5)
    nxt = store.expire(12)
    assert b"y" not in store.histories, "y's message outlived its TTL (kept until t=15)"
    assert y.body is None
    assert count[EXPIRED] == 1 and count[QUEUED_MESSAGES] == 1
    assert nxt == 15  # x's second message expires at 15, as does forgetting x's eviction


@settings(max_examples=300, deadline=None)
@given(ttl=st.integers(1, 10), per_id=st.integers(1, 3),
       ops=st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.integers(0, 4),
                              st.booleans()), max_size=40))
def test_expire_keeps_nothing_past_its_ttl(ttl, per_id, ops):
    # Appends to a few ids as time passes, expire() now and then (bytes not a bound): after
    # expire(now), every kept message is younger than ttl, and the deadline returned is no
    # later than the next expiry (a worker sleeps until it).
    count = new_count()
    store = MessageStore(count, ttl, per_id, 10**9, 0)
    now, appended = 0, {}
    for i, (id_, dt, expire) in enumerate(ops):
        now += dt
        if expire:
            nxt = store.expire(now)
            kept = [m for history in store.histories.values() for m in history]
            assert all(appended[m.key] + ttl > now for m in kept), \
                "a message past its TTL is still kept after expire(now)"
            assert count[QUEUED_MESSAGES] == len(kept)
            if kept:
                assert nxt is not None and now < nxt <= min(appended[m.key] for m in kept) + ttl
        else:
            key = mid_key(1, i)
            store.append(id_, key, cursor_text(key), b"m", now)
            appended[key] = now


@settings(max_examples=25, deadline=None)
@given(per_id=st.integers(1, 3), max_bytes=st.sampled_from([5, 50, 10**6]),
       ops=st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.integers(1, 700),
                              st.integers(0, 3), st.integers(0, 2), st.booleans()),
                    min_size=1, max_size=8))
def test_order_compaction_keeps_every_kept_message(per_id, max_bytes, ops):
    # Runs of appends to one id (the per-id cap leaves a tombstone in `order` for each),
    # other ids between them, time passing, expire() now and then: `order` is compacted past
    # 2 * kept + 1024 entries, and always holds every kept message in arrival order.
    count = new_count()
    store = MessageStore(count, 5, per_id, max_bytes, 0)
    now, appended, compactions, key = 0, [], 0, 0
    for id_, n, size, dt, expire in ops:
        now += dt
        for _ in range(n):
            key += 1
            before = store.order
            appended.append(store.append(id_, key, cursor_text(key), b"x" * size, now))
            compactions += store.order is not before
            assert len(store.order) <= 2 * count[QUEUED_MESSAGES] + 1024
        if expire:
            store.expire(now)
        kept = [m for m in appended if m.body is not None]
        assert [m for m in store.order if m.body is not None] == kept
        assert sorted(m.key for h in store.histories.values() for m in h) == [m.key for m in kept]
        assert count[QUEUED_MESSAGES] == len(kept)
    event("order compacted" if compactions else "order not compacted")


def test_gap_examples():
    count = new_count()
    store = MessageStore(count, 10, 2, 10**6, start_ms=100)
    keys = [mid_key(100, i) for i in range(4)]
    for i, key in enumerate(keys):
        store.append(b"x", key, cursor_text(key), b"m%d" % i, 0)
    # per_id=2: 100-0 and 100-1 were dropped
    assert count[DROPPED] == 2 and count[DROPPED_UNDELIVERED] == 2
    assert store.gap(b"x", 0)  # 0-0: evictions above it
    assert store.gap(b"x", keys[0])  # 100-1 evicted above the cursor
    assert not store.gap(b"x", keys[1])  # the cursor's own message evicted: no gap
    assert not store.gap(b"x", keys[2])
    assert not store.gap(b"x", keys[3] + 5)
    assert store.gap(b"x", mid_key(99, 7))  # older than the start (and evictions above)
    assert store.gap(b"y", mid_key(99, 7))  # older than the start, an id never seen
    assert not store.gap(b"y", 0)  # 0-0 gets a gap only from evictions
    assert not store.gap(b"y", mid_key(100, 0))
    assert store.evicted_after(b"x", keys[0]) and not store.evicted_after(b"x", keys[1])
    # After ttl the store forgets x's evictions; a cursor below them is still a gap.
    assert store.expire(10) == 20  # all expired at 10; the drops (at 0) forgotten at 10
    assert store.forgotten == keys[1] and store.histories == {}
    assert store.gap(b"x", keys[0]) and not store.gap(b"x", keys[3])
    assert store.expire(20) is None  # the expiries forgotten at 20
    assert store.forgotten == keys[3] and store.evicted == {}
    assert store.gap(b"x", keys[0]) and store.gap(b"x", keys[2])
    assert not store.gap(b"x", keys[3])
    assert not store.evicted_after(b"x", keys[0])


def test_gap_for_0_0_only_while_the_store_remembers_the_eviction():
    # 0-0 asks for "whatever is kept": it is told about evictions the store remembers (ttl
    # after each), and not about forgotten ones. The alternative, the `forgotten` rule for 0-0
    # too, would tell every fresh page on a worker that has run for two TTLs "reload your
    # state", ids that never had a message included (a choice the README states).
    count = new_count()
    store = MessageStore(count, 10, 1, 10**6, start_ms=0)
    store.append(b"x", mid_key(1, 0), b"1-0", b"a", 0)
    store.append(b"x", mid_key(1, 1), b"1-1", b"b", 0)  # 1-0 dropped (per_id=1)
    assert store.gap(b"x", 0)
    store.append(b"x", mid_key(30, 0), b"30-0", b"c", 25)  # 1-1 dropped at 25
    store.expire(30)  # forgets the eviction of 1-0 (at 0 + 10)
    assert store.forgotten == mid_key(1, 0)
    assert store.gap(b"x", mid_key(0, 5))  # below the (remembered) eviction of 1-1
    assert store.gap(b"x", 0)
    store.expire(40)  # 30-0 expired at 35, and the eviction of 1-1 forgotten at 35
    assert store.gap(b"x", 0)  # the eviction of 30-0 (at 35) is remembered until 45
    store.expire(50)  # and forgotten at 45
    assert store.histories == {} and store.evicted == {}
    assert store.gap(b"x", mid_key(0, 5)), "nonzero cursor below a forgotten eviction: gap"
    assert not store.gap(b"x", 0)
    assert not store.gap(b"never", 0)


def test_oversized_message_is_evicted_and_counted():
    count = new_count()
    store = MessageStore(count, 10, 5, 10, start_ms=0)
    small = store.append(b"x", mid_key(1, 0), b"1-0", b"12345", 0)
    big = store.append(b"y", mid_key(1, 1), b"1-1", b"x" * 11, 0, delivered=True)
    assert big is not None and big.body is None
    assert count[QUEUED_BYTES] <= 10
    assert count[DROPPED] == 2 and count[EXPIRED] == 0  # oldest first: x's, then y's own
    assert small.body is None and store.histories == {}
    assert store.gap(b"y", 0) and store.gap(b"y", mid_key(1, 0))
    assert not store.gap(b"y", mid_key(1, 1))
    assert count[DROPPED_UNDELIVERED] == 1  # x had not been delivered; y had


def test_duplicate_frame_is_refused():
    count = new_count()
    store = MessageStore(count, 10, 5, 100, start_ms=0)
    assert store.append(b"x", mid_key(1, 0), b"1-0", b"a", 0) is not None
    before = list(count)
    assert store.append(b"x", mid_key(1, 0), b"1-0", b"a", 0) is None
    assert store.append(b"x", mid_key(0, 9), b"0-9", b"a", 0) is None
    assert count == before and len(store.histories[b"x"]) == 1


def test_start_key_follows_an_older_first_frame():
    count = new_count()
    store = MessageStore(count, 10, 5, 100, start_ms=50)
    assert store.gap(b"x", mid_key(49, 0)) and not store.gap(b"x", mid_key(50, 0))
    store.append(b"x", mid_key(40, 3), b"40-3", b"a", 0)  # held by the manager while we started
    assert not store.gap(b"x", mid_key(45, 0)) and not store.gap(b"x", mid_key(40, 3))
    assert store.gap(b"x", mid_key(40, 2)) and not store.gap(b"x", 0)


# ---------------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------------

class Kept:
    """The model's record of one appended message."""
    __slots__ = ("msg", "id", "key", "size", "t", "delivered", "evicted_at")

    def __init__(self, msg, id_, key, size, t, delivered):
        self.msg, self.id, self.key, self.size, self.t = msg, id_, key, size, t
        self.delivered = delivered
        self.evicted_at = None


class StoreMachine(RuleBasedStateMachine):

    @initialize(ttl=st.sampled_from([1, 2, 3, 5, 12]), per_id=st.sampled_from([1, 1, 2, 3, 5]),
                max_bytes=st.sampled_from([0, 10, 100, 1000, 1000]),
                start_ms=st.integers(0, 6), first_ms=st.integers(-4, 4),
                first_seq=st.sampled_from([0, 1, U64 - 2]), now=st.integers(0, 1000))
    def setup(self, ttl, per_id, max_bytes, start_ms, first_ms, first_seq, now):
        self.count = new_count()
        self.ttl, self.per_id, self.max_bytes = ttl, per_id, max_bytes
        self.store = MessageStore(self.count, ttl, per_id, max_bytes, start_ms)
        self.now = now
        self.last_expire = None  # `now` of the last expire() call
        self.ms, self.seq = max(0, start_ms + first_ms), first_seq
        self.started = False  # no key handed out yet
        self.start = mid_key(start_ms, 0)
        self.all = []  # every appended message, in arrival order
        self.kept = []  # the kept ones, in arrival order
        self.evictions = {}  # id -> [Kept, ...] in eviction order
        self.remembered = deque()  # evictions not yet forgotten, in eviction (= time) order
        self.figures = dict.fromkeys(STORE_FIGURES, 0)
        self.forgotten = 0
        self.readers = []  # [id, cursor, keys had]

    # -- the model ------------------------------------------------------------------------

    def next_key(self, bump):
        if self.started:
            if bump == 0 and self.seq < U64:
                self.seq += 1
            else:
                self.ms, self.seq = self.ms + max(bump, 1), 0
        self.started = True
        return mid_key(self.ms, self.seq)

    def model_evict(self, rec, cause):
        self.kept.remove(rec)
        rec.evicted_at = self.now
        self.evictions.setdefault(rec.id, []).append(rec)
        self.remembered.append(rec)
        self.figures[QUEUED_MESSAGES] -= 1
        self.figures[QUEUED_BYTES] -= rec.size
        self.figures[cause] += 1
        if not rec.delivered:
            self.figures[UNDELIVERED] -= 1
            self.figures[EXPIRED_UNDELIVERED if cause == EXPIRED else DROPPED_UNDELIVERED] += 1

    def do_append(self, id_, size, delivered, bump, split=False):
        """append(); with `split`, as the worker does it: append(trim=False), the message to
        its waiters (delivered or not), then trim()."""
        key = self.next_key(bump)
        body = bytes([65 + len(self.all) % 26]) * size
        if split:
            msg = self.store.append(id_, key, cursor_text(key), body, self.now, trim=False)
        else:
            msg = self.store.append(id_, key, cursor_text(key), body, self.now, delivered)
        assert msg is not None, "a key above every key so far was refused"
        assert msg.key == key and msg.id == id_ and msg.mid == cursor_text(key)
        rec = Kept(msg, id_, key, size, self.now, delivered and not split)
        self.all.append(rec)
        self.kept.append(rec)
        self.start = min(self.start, key)
        self.figures[QUEUED_MESSAGES] += 1
        self.figures[QUEUED_BYTES] += size
        if not rec.delivered:
            self.figures[UNDELIVERED] += 1
        mine = [r for r in self.kept if r.id == id_]
        if len(mine) > self.per_id:
            self.model_evict(mine[0], DROPPED)
        if split:
            if delivered:
                self.mark_delivered(rec)
            self.store.trim(self.now)
        while self.figures[QUEUED_BYTES] > self.max_bytes:
            self.model_evict(self.kept[0], DROPPED)
        # checked after every append, not only between steps
        assert self.count[QUEUED_BYTES] <= self.max_bytes
        assert self.count[QUEUED_BYTES] == self.figures[QUEUED_BYTES]
        assert self.count[QUEUED_MESSAGES] == self.figures[QUEUED_MESSAGES]
        # compaction keeps `order` within about twice what is kept
        assert len(self.store.order) <= 2 * self.count[QUEUED_MESSAGES] + 1024
        return rec

    def kept_of(self, id_):
        return [r for r in self.kept if r.id == id_]

    # -- rules ----------------------------------------------------------------------------

    @rule(id_=st.sampled_from(IDS),
          size=st.one_of(st.integers(0, 12), st.integers(0, 120), st.just(1001)),
          delivered=st.booleans(), bump=st.sampled_from([0, 0, 1, 3]))
    def append(self, id_, size, delivered, bump):
        self.do_append(id_, size, delivered, bump)

    @precondition(lambda self: hasattr(self.store, "trim"))
    @rule(id_=st.sampled_from(IDS),
          size=st.one_of(st.integers(0, 12), st.integers(0, 120), st.just(1001)),
          delivered=st.booleans(), bump=st.sampled_from([0, 0, 1, 3]))
    def append_then_trim(self, id_, size, delivered, bump):
        self.do_append(id_, size, delivered, bump, split=True)

    @rule(id_=st.sampled_from(IDS), n=st.sampled_from([2, 3, 8, 40]),
          size=st.sampled_from([0, 1]))
    def burst(self, id_, n, size):
        # Appends to one id at one instant: per-id tombstones in `order`
        for _ in range(n):
            self.do_append(id_, size, False, 0)

    @rule(id_=st.sampled_from(IDS))
    def duplicate_frame(self, id_):
        mine = self.kept_of(id_)
        assume(mine)
        before = list(self.count)
        last = mine[-1]
        assert self.store.append(id_, last.key, cursor_text(last.key), b"dup", self.now) is None
        assert self.count == before

    @rule(dt=st.sampled_from([0, 1, 1, 2, 3, 5, 13, 30]))
    def advance(self, dt):
        self.now += dt

    @rule(dt=st.sampled_from([0, 1, 1, 2, 3, 5, 13, 30]))
    def tick(self, dt):
        self.now += dt
        self.expire()

    @rule()
    def expire(self):
        now = self.now
        nxt = self.store.expire(now)
        self.last_expire = now
        for rec in list(self.kept):
            if rec.t + self.ttl <= now:
                self.model_evict(rec, EXPIRED)
        remembered = self.remembered
        while remembered and remembered[0].evicted_at + self.ttl <= now:
            self.forgotten = max(self.forgotten, remembered.popleft().key)
        deadlines = [r.t + self.ttl for r in self.kept[:1]]  # the next to expire
        deadlines += [r.evicted_at + self.ttl for r in list(remembered)[:1]]  # to forget
        assert all(m.expires > now for h in self.store.histories.values() for m in h), \
            "a message past its TTL is still kept after expire(now)"
        assert nxt == (min(deadlines) if deadlines else None)

    @rule(id_=st.sampled_from(IDS + [NEVER]))
    def poll(self, id_):
        # GET /<id>.js without a cursor: the oldest message no client had, then delivered
        msg = self.store.oldest_undelivered(id_)
        undelivered = [r for r in self.kept_of(id_) if not r.delivered]
        assert [m for m in self.store.undelivered(id_)] == [r.msg for r in undelivered]
        if not undelivered:
            assert msg is None
            return
        assert msg is undelivered[0].msg
        self.mark_delivered(undelivered[0])

    def mark_delivered(self, rec):
        self.store.delivered(rec.msg)
        if not rec.delivered:
            rec.delivered = True
            if rec.evicted_at is None:
                self.figures[UNDELIVERED] -= 1

    @rule(i=st.integers(0, 10**6))
    def deliver_any(self, i):
        # delivered() on any message ever appended, kept or evicted, delivered before or not
        assume(self.all)
        self.mark_delivered(self.all[i % len(self.all)])

    @rule(id_=st.sampled_from(IDS + [NEVER]), choice=st.integers(0, 10**6),
          kind=st.sampled_from(["zero", "appended", "random", "below-start"]))
    def new_reader(self, id_, choice, kind):
        if kind == "zero" or not self.all:
            cursor = 0
        elif kind == "appended":
            cursor = self.all[choice % len(self.all)].key
        elif kind == "below-start":
            cursor = max(0, self.start - 1 - choice % 3)
        else:
            cursor = choice % (self.all[-1].key + 2)
        self.readers.append([id_, cursor, set()])

    @rule(i=st.integers(0, 10**6))
    @precondition(lambda self: self.readers)
    def read(self, i):
        # GET /<id>.js?since=<cursor>: the oldest kept message above it, then delivered
        reader = self.readers[i % len(self.readers)]
        id_, cursor, had = reader
        msg = self.store.after(id_, cursor)
        above = [r for r in self.kept_of(id_) if r.key > cursor]
        if not above:
            assert msg is None
            return
        assert msg is above[0].msg
        assert msg.key not in had, "a reader had the same message twice"
        had.add(msg.key)
        reader[1] = msg.key
        self.mark_delivered(above[0])

    @rule(i=st.integers(0, 10**6))
    @precondition(lambda self: self.readers)
    def drain(self, i):
        # a stream's replay: read until nothing is left above the cursor
        reader = self.readers[i % len(self.readers)]
        id_, cursor, had = reader
        expected = [r for r in self.kept_of(id_) if r.key > cursor]
        got = []
        while (msg := self.store.after(id_, cursor)) is not None:
            assert msg.key > cursor and msg.key not in had
            got.append(msg)
            had.add(msg.key)
            cursor = msg.key
            self.store.delivered(msg)
            assert len(got) <= len(expected)
        assert got == [r.msg for r in expected]
        for rec in expected:
            self.mark_delivered(rec)
        reader[1] = cursor

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def histories_match(self):
        store = self.store
        assert set(store.histories) == {r.id for r in self.kept}, \
            "an id with nothing kept has a history entry (or one with messages has none)"
        for id_, history in store.histories.items():
            assert history, "an empty history is kept"
            assert len(history) <= self.per_id
            keys = [m.key for m in history]
            assert keys == sorted(set(keys)), "a history out of key order"
            assert history == [r.msg for r in self.kept_of(id_)]
            assert all(m.body is not None for m in history)
        for rec in self.all[-50:]:
            assert (rec.msg.body is None) == (rec.evicted_at is not None)
            if rec.evicted_at is None:
                assert len(rec.msg.body) == rec.size

    @invariant()
    def order_holds_every_kept_message(self):
        live = [m for m in self.store.order if m.body is not None]
        assert live == [r.msg for r in self.kept], "order lost or reordered a kept message"

    @invariant()
    def figures_match(self):
        count = self.count
        for field in STORE_FIGURES:
            assert count[field] == self.figures[field], link.PAGE_FIELDS[field]
        for field in range(len(count)):
            if field not in STORE_FIGURES:
                assert count[field] == 0, link.PAGE_FIELDS[field]
        assert count[QUEUED_MESSAGES] == len(self.kept)
        assert count[QUEUED_BYTES] == sum(r.size for r in self.kept)
        assert count[UNDELIVERED] == sum(not r.delivered for r in self.kept)
        # (self.figures counts each eviction by cause, and by whether a client had had it)
        assert count[EXPIRED] + count[DROPPED] == sum(map(len, self.evictions.values()))
        assert count[EXPIRED] + count[DROPPED] + count[QUEUED_MESSAGES] == len(self.all)
        assert self.store.forgotten == self.forgotten
        assert self.store.start_key == self.start

    def cursors(self, id_):
        """0-0, around the start, around the last keys appended (any id) and the id's newest
        evicted ones, `forgotten`, the readers' cursors, past the newest."""
        keys = {0, 1, self.start, self.start + 1, max(0, self.start - 1), self.forgotten}
        recent = self.all[-6:] + self.evictions.get(id_, [])[-3:] + self.kept_of(id_)[:2]
        for rec in recent:
            keys.update((rec.key - 1, rec.key, rec.key + 1))
        keys.update(r[1] for r in self.readers[-6:] if r[0] == id_)
        if self.all:
            keys.add(self.all[-1].key + 1)
        return sorted(k for k in keys if k >= 0)

    @invariant()
    def gaps(self):
        store = self.store
        for id_ in IDS + [NEVER]:
            evictions = self.evictions.get(id_, [])
            newest = evictions[-1] if evictions else None
            remembered = (newest is not None
                          and (self.last_expire is None
                               or newest.evicted_at + self.ttl > self.last_expire))
            for cursor in self.cursors(id_):
                gap = store.gap(id_, cursor)
                evicted_above = newest is not None and newest.key > cursor  # (key order)
                # evicted_after: exactly what the store still remembers
                assert store.evicted_after(id_, cursor) == (remembered and newest.key > cursor)
                if evicted_above and (cursor != 0 or remembered):
                    # (0-0 after the store forgot: test_gap_for_0_0_after_the_store_forgot_...)
                    assert gap, f"no gap for {cursor_text(cursor)}: a later message was evicted"
                if cursor != 0 and cursor < self.start:
                    assert gap, "a cursor older than the start is a gap"
                if (not evicted_above and not (cursor != 0 and cursor < self.start)
                        and not cursor < store.forgotten):
                    assert not gap, f"a gap for {cursor_text(cursor)} with nothing evicted above"
                if cursor == 0 and not evicted_above:
                    assert not gap, "0-0 gets a gap only from evictions"


StoreMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_store_machine = StoreMachine.TestCase
