"""Command-line value checks, one set for manager.py, server.py and client.py.

Each is an argparse `type=`: it returns the parsed value or raises ArgumentTypeError with a
line that names what was wrong. Floats must be finite: float() takes "nan" and "inf", and a NaN
timeout compares false with everything, so a deadline built from it never fires.
"""

import argparse
import ipaddress
import math


def _number(kind, text: str, ok, must: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "1 or more")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "more than 0")


def non_negative(text: str) -> float:
    """A duration or rate where 0 means off (or "at once")."""
    return _number(float, text, lambda v: v >= 0, "0 or more")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "0 or more")


def port(text: str) -> int:
    value = _number(int, text, lambda v: True, "")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (1-65535): {text}")
    return value


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
                f"not an IP address or network: {part!r} ({e})") from None
    return tuple(nets)
