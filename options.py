"""Command-line value checks, one set for manager.py, server.py and client.py.

Each is an argparse `type=`: it returns the parsed value or raises ArgumentTypeError, which
argparse prints as `argument --workers: expected a whole number 1 or more, got 'abc'` (a plain
ValueError would print the function's name instead: `invalid positive_int value: 'abc'`).
Floats must be finite: float() takes "nan" and "inf", and a NaN timeout compares false with
everything, so a deadline built from it never fires.
"""

import argparse
import ipaddress
import math
import re


def _number(kind, text: str, ok, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "a whole number 1 or more")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a number more than 0")


def non_negative(text: str) -> float:
    """A duration or rate where 0 means off (or "at once")."""
    return _number(float, text, lambda v: v >= 0, "a number 0 or more")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "a whole number 0 or more")


def port(text: str) -> int:
    return _number(int, text, lambda v: 1 <= v <= 65535, "a port number 1-65535")


def _visible_ascii(text: str, spaces: bool) -> bool:
    low = 0x20 if spaces else 0x21
    return bool(text.strip()) and all(low <= ord(c) <= 0x7E for c in text)


def token(text: str) -> str:
    """--app-token: compared with the bytes of `Authorization: Bearer T` and of a JSON auth
    line. Visible ASCII only: an empty one would be a lock anyone opens, a space at either end
    is stripped from the header (so it could never match), and a byte that is not ASCII may
    not even be encodable (a non-UTF-8 argv)."""
    if not _visible_ascii(text, spaces=False):
        raise argparse.ArgumentTypeError(
            f"expected a token of visible ASCII characters (no spaces), got {text!r}")
    return text


def header_value(text: str) -> str:
    """A value sent as an HTTP header (--cors-origin): a CR or LF would start a header of
    its own in every answer."""
    if not _visible_ascii(text, spaces=True) or text != text.strip():
        raise argparse.ArgumentTypeError(
            f"expected an HTTP header value of visible ASCII characters (such as * or "
            f"https://example.com), got {text!r}")
    return text


def networks(text: str) -> tuple:
    """`ADDR[,ADDR...]`, each an IP address or a network (`127.0.0.0/8`, `::1`): the peers
    whose X-Forwarded-* headers are believed (--trusted-proxy). Empty text: none."""
    nets = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part))
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"expected IP addresses or networks separated by commas (such as 127.0.0.1 "
                f"or 127.0.0.0/8), got {part!r} ({e})") from None
    return tuple(nets)


MAX_NODES = 1024        # --nodes / --hosts entries: each is a box; far more than one Redis serves
HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")   # a name or IPv4 literal


def host_list(text: str) -> tuple:
    """`HOST[:PORT],HOST[:PORT],...` (--nodes, client.py --hosts): ((host, port or None), ...),
    in order. A host is a name, an IPv4 address, or an IPv6 address in brackets ([::1]:8000:
    its colons would read as a port), kept with its brackets, as a Host header or a Location
    wants it. Every entry once; at most MAX_NODES."""
    parts = text.split(",")
    if len(parts) > MAX_NODES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_NODES} entries, got "
                                         f"{len(parts):,}")
    entries: list = []
    for i, part in enumerate(parts, 1):
        part = part.strip()
        try:
            entry = _host_port(part)
            if entry in entries:
                raise ValueError("named twice")
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"expected HOST[:PORT] entries separated by commas (such as 10.0.0.1:8000,"
                f"10.0.0.2 or [2001:db8::1]:8000), got {part!r} (entry {i}): {e}") from None
        entries.append(entry)
    return tuple(entries)


def _host_port(entry: str) -> tuple:
    """One `HOST[:PORT]`: (host, port or None); ValueError saying what is wrong with it."""
    if not entry:
        raise ValueError("an empty entry")
    if entry.startswith("["):
        inside, bracket, rest = entry[1:].partition("]")
        try:
            host = "[" + ipaddress.IPv6Address(inside).compressed + "]"
        except ValueError:
            raise ValueError("not an IPv6 address in the brackets") from None
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("write [IPv6] or [IPv6]:PORT")
        port_text = rest[1:] if rest else None
    elif entry.count(":") > 1:
        raise ValueError("an IPv6 address goes in brackets: [::1]:8000")
    else:
        host, colon, port_text = entry.partition(":")
        port_text = port_text if colon else None
        if not HOSTNAME_RE.fullmatch(host):
            raise ValueError("a host is a name or an address: letters, digits, '.', '-', '_'")
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError("a port is a number 1-65535")
    return host, int(port_text)


def node_of(text: str) -> tuple:
    """`K/N` (--node): node K of N, K counting from 0."""
    m = re.fullmatch(r"([0-9]{1,4})/([0-9]{1,4})", text.strip())
    if m is None or not 0 <= int(m[1]) < int(m[2]) <= MAX_NODES:
        raise argparse.ArgumentTypeError(
            f"expected K/N, node K of N counting from 0 (such as 0/3; N at most {MAX_NODES}), "
            f"got {text!r}")
    return int(m[1]), int(m[2])


def stream_prefix(text: str) -> str:
    """--stream-prefix: part of a Redis key, printed in logs: visible ASCII, no spaces."""
    if not _visible_ascii(text, spaces=False) or len(text) > 200:
        raise argparse.ArgumentTypeError(
            f"expected up to 200 visible ASCII characters, no spaces (such as megacomet), "
            f"got {text!r}")
    return text
