"""MegaComet worker: holds long-poll connections and the message queues of the ids it owns.
(work in progress: the full worker lands in the next commit)"""

import re

ID_RE = re.compile(rb"[A-Za-z0-9_~-]{1,128}")


def x31(data: bytes) -> int:
    """khash's X31 string hash, as the original MegaComet used to pick a worker for an id."""
    h = 0
    if data:
        h = data[0]
        for c in data[1:]:
            h = (h * 31 + c) & 0xFFFFFFFF
    return h


def owner(id_: bytes, workers: int) -> int:
    """The worker that holds `id_`: every client, the manager and the workers agree on this."""
    return x31(id_) % workers


def valid_id(id_: bytes) -> bool:
    return ID_RE.fullmatch(id_) is not None
