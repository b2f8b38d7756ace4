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


MAX_HOSTS = 1024        # --hosts entries: each is a box; far more than one Redis serves
HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")   # a name or IPv4 literal


def host_ports(text: str) -> tuple[tuple[str, int | None], ...]:
    """`HOST[:PORT],HOST[:PORT],...` (client.py --hosts), in order: a name, an IPv4 address, or
    an IPv6 address in brackets (`[::1]:8000`, kept with its brackets, as a Host header wants
    it). A PORT left out is None: the caller's default. Every entry once; at most MAX_HOSTS."""
    entries = text.split(",")
    if len(entries) > MAX_HOSTS:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_HOSTS} HOST[:PORT] entries, got {len(entries)}")
    out: list[tuple[str, int | None]] = []
    for i, entry in enumerate(entries, 1):
        try:
            value = _host_port(entry)
            if value in out:
                raise ValueError("named twice")
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"expected HOST[:PORT] entries separated by commas (such as "
                f"10.0.0.1,10.0.0.2:8000 or [::1]:8000), got {entry!r} (entry {i}): {e}"
            ) from None
        out.append(value)
    return tuple(out)


def _host_port(entry: str) -> tuple[str, int | None]:
    """One `HOST[:PORT]`; ValueError saying what is wrong with it."""
    if not entry.strip():
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


HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::([0-9]+))?")
MAX_NODES = 1024


def host_list(text: str) -> tuple:
    """`HOST[:PORT],HOST[:PORT],...` (--nodes, client.py --hosts): ((host, port or None), ...),
    in order. An IPv6 address goes in brackets ([::1]:8000): its colons would read as a port."""
    entries = []
    for part in text.split(","):
        part = part.strip()
        m = HOST_RE.fullmatch(part)
        if m is None or (m[2] is not None and not 1 <= int(m[2]) <= 65535):
            raise argparse.ArgumentTypeError(
                f"expected HOST[:PORT] entries separated by commas (such as 10.0.0.1:8000,"
                f"10.0.0.2 or [2001:db8::1]:8000), got {part!r}")
        entries.append((m[1], None if m[2] is None else int(m[2])))
    if len(entries) > MAX_NODES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_NODES} entries, got "
                                         f"{len(entries):,}")
    return tuple(entries)


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
