"""What passes between the manager and a worker: frames one way, a shared page the other.

Manager -> worker: frames on the link, a UNIX stream socket (fd 4 in the worker):

    kind (1 byte) | id length (1 byte) | payload length (4 bytes) | ms (8) | seq (8) | id | payload

all big-endian. MSG carries an id and a message; BROADCAST a message and an empty id. Both
carry the message id `<ms>-<seq>` the manager gave the message (SPEC "Message ids"), as two
integers: a replayed frame keeps its id. READY (empty, id 0-0) is sent only to workers started
with --hold (a node on Redis): the history replayed from the node's stream is in, start
accepting connections (nodes.py). Nothing else is sent: a worker's death is the link's
EOF, and the manager's is the worker's.

Worker -> manager: a page of shared memory (a memfd, fd 5 in the worker, mapped by both), an
array of unsigned 64-bit figures named by PAGE_FIELDS. The worker keeps its counters there
instead of in Python attributes, so:
- the manager reads /stats figures without asking: a stopped or busy worker cannot delay it;
- the page outlives the process: when a worker dies the manager reads its last figures exactly,
  to carry its counters over to its successor and to count what was queued in it as lost;
- `link_done`, the link bytes the worker has read *and acted on* (whole frames only), is the
  acknowledgement: the manager keeps every frame it wrote until link_done passes it, and
  replays the rest to the successor of a worker that died. It is updated after each frame, so
  at most the frame being acted on at the moment of a SIGKILL is delivered twice.
- `beat_ns`, CLOCK_MONOTONIC (one clock for the whole box) at the worker's last loop pass, is
  the heartbeat: gunicorn's workers touch a file for the same purpose. The worker passes its
  loop at least every BEAT_INTERVAL even when idle.
Each figure is one aligned 8-byte word: a read never sees half of a write (x86-64, arm64).

Encoding and decoding are pure functions over bytes, property-tested like the HTTP parser.
"""

import mmap
import os
import struct

# ---------------------------------------------------------------------------------------------
# Frames, manager -> worker
# ---------------------------------------------------------------------------------------------

HEAD = struct.Struct("!cBIQQ")
HEAD_SIZE = HEAD.size  # 22
MSG, BROADCAST, READY = b"M", b"B", b"R"
KINDS = (MSG, BROADCAST, READY)
MAX_ID = 255  # the id length is one byte; valid ids are at most 128 bytes anyway
MAX_PAYLOAD = 2**32 - 1


class LinkError(Exception):
    """Bytes on the link that are not a frame: a bug on the other end, never user input."""


def encode(kind: bytes, id_: bytes, payload: bytes, ms: int, seq: int) -> bytes:
    if kind not in KINDS or len(id_) > MAX_ID or len(payload) > MAX_PAYLOAD or \
            not (0 <= ms < 2**64 and 0 <= seq < 2**64):
        raise ValueError(f"not a link frame: kind {kind!r}, id {len(id_)} B, "
                         f"payload {len(payload)} B, message id {ms}-{seq}")
    return HEAD.pack(kind, len(id_), len(payload), ms, seq) + id_ + payload


def encode_msg(id_: bytes, message: bytes, ms: int, seq: int) -> bytes:
    """encode(MSG, ...) for the message path, where the id, the size and the message id are
    checked already (server.valid_id, --max-message, MessageIds)."""
    return HEAD.pack(MSG, len(id_), len(message), ms, seq) + id_ + message


def decode(data: bytes) -> tuple[list, int]:
    """The whole frames at the start of `data`: ([(kind, id, payload, ms, seq, end), ...],
    bytes used). `end` is where each frame ends in `data`, so a reader can acknowledge frame
    by frame. A partial frame at the end is left for the next call (used stops before it)."""
    frames = []
    pos, size = 0, len(data)
    unpack = HEAD.unpack_from
    while size - pos >= HEAD_SIZE:
        kind, idlen, length, ms, seq = unpack(data, pos)
        start = pos + HEAD_SIZE + idlen
        end = start + length
        if end > size:
            break
        if kind not in KINDS:
            raise LinkError(f"unknown link frame kind {kind!r} at byte {pos}")
        frames.append((kind, data[pos + HEAD_SIZE:start], data[start:end], ms, seq, end))
        pos = end
    return frames, pos


# ---------------------------------------------------------------------------------------------
# The shared page, worker -> manager
# ---------------------------------------------------------------------------------------------

PAGE_FIELDS = (
    "beat_ns",            # CLOCK_MONOTONIC ns at the worker's last loop pass (heartbeat)
    "link_done",          # link bytes read and acted on (the acknowledgement)
    "connections",        # open client connections, now
    "waiting",            # of which waiting: polls and streams
    "streams",            # of which Server-Sent Events streams
    "queued_messages",    # messages kept in the ids' histories, delivered or not, now
    "queued_bytes",
    "undelivered",        # of the kept messages, those no client has had yet
    "accepted",           # counters from here on: they only grow
    "delivered",          # answers and stream events carrying a message
    "expired",            # kept messages that reached --queue-ttl
    "dropped",            # kept messages pushed out by --queue-max / --queue-bytes
    "expired_undelivered",  # of those expired, the ones no client had had
    "dropped_undelivered",  # same for dropped
    "rejected",           # requests refused with an error status, or closed unanswered
    "closed_header_timeout",  # no whole request head within --header-timeout
    "closed_write_timeout",   # did not read its answer within --write-timeout
    "closed_flood",           # kept sending after its request
    "closed_reset",           # the peer reset the connection (ECONNRESET, EPIPE)
    "closed_timed_out",       # the kernel gave up on the peer (ETIMEDOUT: keepalive, retries)
    "closed_sse_buffer",      # a stream that did not read --sse-buffer of live messages
    "refused_no_watch",       # epoll could not take one more fd (fs.epoll.max_user_watches)
)
GAUGES = ("beat_ns", "link_done", "connections", "waiting", "streams", "queued_messages",
          "queued_bytes", "undelivered")
COUNTERS = PAGE_FIELDS[PAGE_FIELDS.index("accepted"):]
(BEAT_NS, LINK_DONE, CONNECTIONS, WAITING, STREAMS, QUEUED_MESSAGES, QUEUED_BYTES, UNDELIVERED,
 ACCEPTED, DELIVERED, EXPIRED, DROPPED, EXPIRED_UNDELIVERED, DROPPED_UNDELIVERED, REJECTED,
 CLOSED_HEADER_TIMEOUT, CLOSED_WRITE_TIMEOUT, CLOSED_FLOOD, CLOSED_RESET, CLOSED_TIMED_OUT,
 CLOSED_SSE_BUFFER, REFUSED_NO_WATCH) = range(len(PAGE_FIELDS))
PAGE_SIZE = 8 * len(PAGE_FIELDS)


def new_page(name: str) -> tuple[int, memoryview]:
    """A zeroed shared page for one worker slot: (memfd to hand to the worker, view of it)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, mmap.PAGESIZE)
    return fd, view(mmap.mmap(fd, mmap.PAGESIZE))


def view(buffer) -> memoryview:
    """The figures of a page (an mmap, or a bytearray for a worker run without a manager)."""
    return memoryview(buffer)[:PAGE_SIZE].cast("Q")


def figures(page: memoryview) -> dict:
    return dict(zip(PAGE_FIELDS, page.tolist(), strict=True))


def clear(page: memoryview) -> None:
    page[:] = memoryview(bytes(page.nbytes)).cast("Q")
