"""make bench-micro: pyperf benchmarks of the per-request and per-message building blocks.

    .venv/bin/python bench/micro.py [pyperf options: --fast, --rigorous, -o FILE, ...]

- parse_request: server.parse_request on a minimal poll head (what client.py sends) and on a
  browser-like head of 10 header lines;
- x31: server.x31 on a 6-byte and on a 128-byte id (the longest valid one);
- response_head: server.response_head for a message answer, and the whole answer as
  Worker.message_response builds it (head with X-Message-Id, then the body);
- link: link.encode_msg of 10 frames joined (one manager write), link.decode of that batch;
- signature check: server.signature_error as a worker with --subscriber-key-file runs it on
  each poll and stream (exp and sig taken from the query, HMAC-SHA256 with every key,
  compare_digest, time.time() included), with 1 key and with 2 (a rotation).

pyperf runs each in its own worker processes (20 by default) and prints mean +- std dev;
`--fast` gives rough figures sooner (10 processes: still ~30 s on a busy 2-core box),
`--debug-single-value` one value each (what tests/test_bench.py runs: a few seconds), `-o FILE`
keeps the results for `python -m pyperf compare_to`.
"""

import sys
import time
from pathlib import Path

import pyperf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import link  # noqa: E402
import server  # noqa: E402

POLL_HEAD = b"GET /a12345.js HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"
BROWSER_HEAD = (
    b"GET /alice.js?since=1732763000000-0&_=1732763001234 HTTP/1.1\r\n"
    b"Host: comet.example.com:8001\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/131.0.0.0 Safari/537.36\r\n"
    b"Accept: */*\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Origin: https://app.example.com\r\n"
    b"Referer: https://app.example.com/chat\r\n"
    b"Connection: keep-alive\r\n"
    b"Sec-Fetch-Mode: cors\r\n"
    b"Cookie: session=3f9a0c1e7b2d4a58; theme=dark\r\n"
    b"\r\n")
ID6 = b"a12345"
ID128 = b"x" * 64 + b"0123456789abcdef" * 4
MESSAGE = b"t=1732763001234567890;seq=12345"
MID = b"1732763001234-0"
TAIL = (b"Cache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\n"
        b"Access-Control-Expose-Headers: X-Message-Id, X-Message-Gap\r\nConnection: close\r\n\r\n")
EXP = 4102444800  # 2100-01-01: never expired while benchmarking
KEY1 = b"2f6a0c1e7b2d4a58e91f3c7d5b0a6e4f2f6a0c1e7b2d4a58e91f3c7d5b0a6e4f"  # 64 hex chars
KEY2 = b"9c41d7e2a05b3f68c1e94d7a2b0f5e3c9c41d7e2a05b3f68c1e94d7a2b0f5e3c"
# A browser's query with a cursor, signed with KEY1 (the first key tried: every key is anyway).
SIGNED_QUERY = b"since=1732763000000-0&exp=%d&sig=%s" % (EXP, server.sign(KEY1, ID6, EXP))
KEYS1 = [server.key_pads(KEY1)]  # as a worker holds them
KEYS2 = [server.key_pads(KEY1), server.key_pads(KEY2)]
BATCH_IDS = [b"a%d" % i for i in range(10)]
BATCH = b"".join(link.encode_msg(i, MESSAGE, 1732763001234, n) for n, i in enumerate(BATCH_IDS))


def message_response(message: bytes, mid: bytes) -> bytes:
    """Worker.message_response's plain path (no JSONP, no gap)."""
    return server.response_head(200, len(message), server.TEXT, TAIL,
                                b"X-Message-Id: %s\r\n" % mid) + message


def encode_batch() -> bytes:
    encode = link.encode_msg
    return b"".join([encode(i, MESSAGE, 1732763001234, n) for n, i in enumerate(BATCH_IDS)])


BENCHMARKS = (  # (name, statement), timed by pyperf's timeit
    ("parse_request poll head", "parse_request(POLL_HEAD)"),
    ("parse_request browser head (10 headers)", "parse_request(BROWSER_HEAD)"),
    ("x31 6-byte id", "x31(ID6)"),
    ("x31 128-byte id", "x31(ID128)"),
    ("response_head 200", "response_head(200, 31, TEXT, TAIL, b'X-Message-Id: 1-0\\r\\n')"),
    ("message_response (head + body)", "message_response(MESSAGE, MID)"),
    ("link.encode_msg x10 joined", "encode_batch()"),
    ("link.decode batch of 10", "decode(BATCH)"),
    ("signature check, 1 key", "signature_error(KEYS1, ID6, SIGNED_QUERY, time())"),
    ("signature check, 2 keys", "signature_error(KEYS2, ID6, SIGNED_QUERY, time())"),
)


def main() -> None:
    runner = pyperf.Runner()
    runner.metadata["description"] = "MegaComet building blocks (server.py, link.py)"
    names = {**globals(), "parse_request": server.parse_request, "x31": server.x31,
             "response_head": server.response_head, "TEXT": server.TEXT,
             "decode": link.decode, "signature_error": server.signature_error,
             "time": time.time}
    for name, stmt in BENCHMARKS:
        runner.timeit(name, stmt, globals=names)


if __name__ == "__main__":
    main()
