"""link.py's codec and the manager's Outbox: pure, property-tested.

The Outbox model: a fake link records what the manager writes; a fake worker acts on a prefix
of it (whole frames only, as the real one acknowledges) and may die at any moment, its page's
link_done then final. Whatever happens, the frames the workers acted on, in order, are exactly
the frames accepted, in order: none lost, none twice, per-worker FIFO kept.
"""

import asyncio
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import link
from link import BROADCAST, MSG, LinkError
from manager import Flow, Outbox, Router
from server import owner

ids = st.binary(min_size=0, max_size=40)
payloads = st.binary(min_size=0, max_size=300)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
frames_st = st.lists(st.tuples(st.sampled_from([MSG, BROADCAST]), ids, payloads, u64, u64),
                     max_size=30)


@given(frames_st, st.lists(st.integers(min_value=0, max_value=4000), max_size=10))
def test_any_split_decodes_to_the_frames_encoded(frames, cuts):
    stream = b"".join(link.encode(*frame) for frame in frames)
    got, rest = [], b""
    bounds = sorted({min(c, len(stream)) for c in cuts} | {len(stream)})
    pos = 0
    for b in bounds:
        data = rest + stream[pos:b]
        pos = b
        decoded, used = link.decode(data)
        got += [frame[:5] for frame in decoded]
        ends = [e for *_, e in decoded]
        assert ends == sorted(ends) and (not ends or ends[-1] == used)
        rest = data[used:]
    assert got == frames and rest == b""


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_link_error(data):
    try:
        frames, used = link.decode(data)
    except LinkError:
        return
    assert 0 <= used <= len(data)
    assert all(k in link.KINDS for k, *_ in frames)


@given(st.binary(max_size=128), payloads, u64, u64)
def test_the_message_path_encodes_as_encode_does(id_, message, ms, seq):
    assert link.encode_msg(id_, message, ms, seq) == link.encode(MSG, id_, message, ms, seq)


def test_encode_refuses_what_is_not_a_frame():
    for bad in ((b"X", b"a", b"", 0, 0), (MSG, b"a" * 256, b"", 0, 0), (MSG, b"a", b"", 2**64, 0),
                (MSG, b"a", b"", 0, -1)):
        with pytest.raises(ValueError):
            link.encode(*bad)


def test_the_page_round_trips_every_field():
    page = link.view(bytearray(link.PAGE_SIZE))
    for n, _ in enumerate(link.PAGE_FIELDS):
        page[n] = n * 1000 + 7
    assert link.figures(page) == {f: n * 1000 + 7 for n, f in enumerate(link.PAGE_FIELDS)}
    link.clear(page)
    assert set(link.figures(page).values()) == {0}


# ---------------------------------------------------------------------------------------------
# The Outbox, against a model worker
# ---------------------------------------------------------------------------------------------


class FakeLink:
    def __init__(self):
        self.data = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closing


class ModelWorker:
    """Reads a prefix of what was written and acts on the whole frames in it."""

    def __init__(self, link_: FakeLink):
        self.link = link_
        self.done = 0  # its page's link_done
        self.acted: list = []

    def read(self, upto: int) -> None:
        target = min(len(self.link.data), self.done + upto)
        frames, used = link.decode(self.link.data[self.done:target])
        for _, id_, payload, *_ in frames:
            self.acted.append(id_ + payload)
        self.done += used


ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(min_value=1, max_value=200)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("read"), st.integers(min_value=0, max_value=2000)),
    st.tuples(st.just("ack"), st.just(0)),
    st.tuples(st.just("die"), st.just(0)),
    st.tuples(st.just("start"), st.just(0)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(min_value=300, max_value=5000))
def test_outbox_loses_nothing_and_keeps_order_through_any_deaths(ops, limit):
    asyncio.set_event_loop(asyncio.new_event_loop())  # Flow's Event wants a loop to exist
    flow = Flow()
    box = Outbox(0, limit, flow, lambda _box: None)
    accepted, acted = [], []
    worker = None
    seq = 0
    for op, arg in ops:
        if op == "put":
            body = b"%d:" % seq + b"x" * arg
            seq += 1
            data = link.encode(MSG, b"", body, 1, seq)
            before = box.bytes
            if box.put(data):
                accepted.append(body)
            else:
                assert before + len(data) > limit and box.bytes == before
        elif op == "flush":
            box.flush()
        elif op == "read" and worker is not None:
            worker.read(arg)
        elif op == "ack" and worker is not None:
            box.ack(worker.done)
        elif op == "die" and worker is not None:
            worker.link.closing = True
            box.detach(worker.done)  # the reaper reads a dead worker's final link_done
            acted += worker.acted
            worker = None
        elif op == "start" and worker is None:
            worker = ModelWorker(FakeLink())
            box.attach(worker.link)
        assert box.bytes <= limit
        assert box.bytes == sum(len(f) for _, b in box.unacked for f in b) + \
            sum(map(len, box.unsent))
    # A last worker that reads everything: every accepted frame was acted on once, in order.
    if worker is None:
        worker = ModelWorker(FakeLink())
        box.attach(worker.link)
    box.flush()
    worker.read(len(worker.link.data))
    box.ack(worker.done)
    acted += worker.acted
    assert acted == accepted
    assert box.bytes == 0 and not box.unacked and not box.unsent
    assert flow.open.is_set()


def test_a_frame_half_read_by_a_dead_worker_is_replayed_whole():
    asyncio.set_event_loop(asyncio.new_event_loop())
    box = Outbox(0, 10_000, Flow(), lambda _box: None)
    first = FakeLink()
    box.attach(first)
    frames = [link.encode(MSG, b"id", b"m%d" % k, 1, k) for k in range(3)]
    for f in frames:
        box.put(f)
    box.flush()
    done = len(frames[0]) + 2  # the first frame acted on, two bytes of the second read
    assert box.detach(done) == 2
    second = FakeLink()
    box.attach(second)
    box.flush()  # at the end of the loop pass
    assert second.data == frames[1] + frames[2]


def test_a_down_worker_never_holds_the_gate_it_refuses_past_its_limit():
    """A worker behind closes the gate for every publisher; a dead or crash-looping one must
    not: its outbox fills to its limit and refuses, and the other workers go on."""
    asyncio.set_event_loop(asyncio.new_event_loop())
    flow = Flow()
    box = Outbox(0, 10_000, flow, lambda _box: None)
    box.attach(FakeLink())
    frame = link.encode(MSG, b"id", b"x" * 990, 1, 0)
    while box.put(frame) and box.link is not None:
        if not flow.open.is_set():
            break
    assert not flow.open.is_set()  # up and behind: the gate is closed
    box.detach(0)  # it died: the gate opens, its frames wait for a successor
    assert flow.open.is_set() and box.bytes > box.high
    while box.put(frame):
        pass
    assert flow.open.is_set() and box.bytes <= box.limit
    box.attach(FakeLink())  # the successor is up, and behind: the gate closes again
    assert not flow.open.is_set()


def test_an_ids_message_is_refused_whole_when_one_outbox_is_full():
    """`ids` spanning two workers, one of them full: no id gets it (never half-delivered)."""
    asyncio.set_event_loop(asyncio.new_event_loop())
    flow = Flow()
    slots = [SimpleNamespace(outbox=Outbox(n, 1000, flow, lambda _box: None)) for n in (0, 1)]
    router = Router(SimpleNamespace(slots=slots, stopping=False))
    a = next(b"a%d" % i for i in range(99) if owner(b"a%d" % i, 2) == 0)
    b = next(b"b%d" % i for i in range(99) if owner(b"b%d" % i, 2) == 1)
    mid, refused = router.send_one(b, b"x" * 900)  # worker 1's outbox is now nearly full
    assert refused is None and mid
    mid, refused = router.send([a, b], b"y" * 200)
    assert mid is None and "worker 1" in refused
    assert slots[0].outbox.bytes == 0 and router.messages_in == 1
    mid, refused = router.broadcast(b"z" * 200)
    assert mid is None and refused and slots[0].outbox.bytes == 0


def test_message_ids_increase_strictly_even_when_the_clock_steps_back(monkeypatch):
    """Redis's stream id rule: the last ms is kept and seq counts on."""
    import manager
    clock = iter([5_000_000_000, 5_000_000_000, 7_000_000_000, 6_000_000_000, 6_000_000_000,
                  8_000_000_000])
    monkeypatch.setattr(manager.time, "time_ns", lambda: next(clock))
    ids = manager.MessageIds()
    got = [ids.next() for _ in range(6)]
    assert got == [(5000, 0), (5000, 1), (7000, 0), (7000, 1), (7000, 2), (8000, 0)]


def test_an_ids_message_has_one_message_id_on_every_worker():
    asyncio.set_event_loop(asyncio.new_event_loop())
    flow = Flow()
    slots = [SimpleNamespace(outbox=Outbox(n, 10_000, flow, lambda _box: None)) for n in (0, 1)]
    router = Router(SimpleNamespace(slots=slots, stopping=False))
    mid, refused = router.send([b"a0", b"a1", b"a2"], b"hi")
    assert refused is None
    frames = [f for slot in slots for f in slot.outbox.unsent]
    decoded = [link.decode(f)[0][0] for f in frames]
    assert len(decoded) == 3 and {(ms, seq) for *_, ms, seq, _end in decoded} == {mid}
