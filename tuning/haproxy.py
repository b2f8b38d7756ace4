"""An HAProxy configuration that puts TLS in front of the workers, one public port per worker.

Browsers on an HTTPS page may only poll `https://` URLs (mixed content). TLS stays out of the
workers: an OpenSSL connection costs tens of KB, against the ~90 B an idle poll costs a
worker. HAProxy (C, one process) ends TLS and forwards plain HTTP over loopback:

    client --TLS--> :public_base+n  (frontend wn) --HTTP--> backend_host:base+n  (worker n)

One frontend per worker, each with its own backend of one worker, so the id -> worker mapping
(x31(id) % W, port base + n) holds through the proxy: a page computes the port as before, with
public_base instead of base, and a 307 from worker n points at the proxy's port of the owner
(the manager is told --public-scheme https --public-base-port public_base, and/or trusts the
proxy's X-Forwarded-Proto/-Port with --trusted-proxy).

    python3 tuning/haproxy.py --workers 4 --cert /etc/ssl/private/megacomet.pem \\
        > /etc/haproxy/haproxy.cfg
    haproxy -c -f /etc/haproxy/haproxy.cfg && systemctl restart haproxy

The generated file starts with the manager command line that matches it. Standard library only.

Sections (grep "# ---"): constants, arithmetic, the configuration text, CLI.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tuning.check import even_ports, read_box  # noqa: E402

# --- constants ---------------------------------------------------------------------------------

# Timeouts, seconds. HAProxy measures inactivity: a long poll is silent until its answer, a
# stream until its next event or heartbeat, so `timeout client`/`server`/`tunnel` must be well
# above the longest silence of a healthy connection, or HAProxy cuts it (a 504, or a reset
# stream). IDLE_FACTOR gives that margin; UNBOUNDED_IDLE is used when polls or streams may be
# silent forever (--poll-timeout 0, --sse-heartbeat 0): past it HAProxy ends the poll with a
# 504 and the page polls again, so set --poll-timeout on the manager below it.
IDLE_FACTOR = 2
MIN_IDLE = 60
UNBOUNDED_IDLE = 3600
HEAD_TIMEOUT = 10  # `timeout http-request`: a whole head by then, as the workers' --header-timeout
KEEPALIVE_TIMEOUT = 10  # a browser's next poll comes at once; the TLS session waits this long
CONNECT_TIMEOUT = 5  # to a worker on the same box: its backlog takes connections, even while
# the worker restarts (the manager keeps the listening socket), so a slow connect is a fault
FIN_TIMEOUT = 5  # a half-closed client is gone
# Reload (`systemctl reload haproxy`): the old process keeps its connections until they end,
# which for polls and streams may be an hour; it is stopped after this, and its clients poll
# again (EventSource with Last-Event-ID) on the new one.
HARD_STOP_AFTER = 30
# TCP keepalive on client sockets, as the workers' --keepalive 60 with 9 probes: a peer that
# vanished (NAT timeout, pulled cable) is reaped instead of holding two fds for an hour.
KEEPALIVE_IDLE, KEEPALIVE_INTVL, KEEPALIVE_CNT = 60, 15, 9
# HAProxy needs two fds per proxied connection (client side, worker side) plus one per
# listener and a few of its own; it raises its own open-file limit to that at start (as root),
# which fails past fs.nr_open.
FDS_PER_CONNECTION = 2
FDS_SPARE = 100
# Ids spread over the workers by x31(id) % W, not exactly evenly: per-worker capacity planned
# with this margin over maxconn / W.
SKEW = 1.1
MAX_SOURCE_IPS = 1000

# --- arithmetic --------------------------------------------------------------------------------


def idle_timeout(poll_timeout: float, sse_heartbeat: float) -> int:
    """`timeout client`/`server`/`tunnel`: IDLE_FACTOR x the longest silence of a healthy
    connection, at least MIN_IDLE; UNBOUNDED_IDLE when a silence has no bound (0: off)."""
    if poll_timeout <= 0 or sse_heartbeat <= 0:
        return UNBOUNDED_IDLE
    return max(MIN_IDLE, math.ceil(IDLE_FACTOR * max(poll_timeout, sse_heartbeat)))


def source_ips_needed(maxconn: int, workers: int, port_range: tuple[int, int] | None) -> int:
    """Source addresses HAProxy needs towards each worker: its connections to worker n all go
    to one address:port, and Linux's connect() takes only the even half of
    ip_local_port_range per (source, destination) pair before each connect scans the range
    (tuning/check.py). Each extra loopback source address (127.0.0.2, ...) adds that many."""
    if port_range is None:
        return 1
    per_pair = even_ports(*port_range)
    if per_pair <= 0:
        return 1
    return max(1, math.ceil(SKEW * maxconn / workers / per_pair))


def fds_needed(maxconn: int, workers: int, source_ips: int) -> int:
    return FDS_PER_CONNECTION * maxconn + workers * (1 + source_ips) + FDS_SPARE


# --- the configuration text --------------------------------------------------------------------


def address(host: str, port: int) -> str:
    """host:port as HAProxy reads it; an empty host is every IPv4 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def manager_command(args) -> str:
    return (f"python3 manager.py --host {args.backend_host} --workers {args.workers} "
            f"--base-port {args.base_port} --public-scheme https --public-base-port "
            f"{args.public_base_port} --trusted-proxy {args.trusted}"
            + (f" --poll-timeout {args.poll_timeout:g}" if args.poll_timeout else "")
            + (f" --sse-heartbeat {args.sse_heartbeat:g}" if args.sse_heartbeat != 30 else ""))


def render(args, command: str) -> str:
    idle = idle_timeout(args.poll_timeout, args.sse_heartbeat)
    bind_opts = "ssl crt " + args.cert + " alpn http/1.1" + (" v4v6" if args.bind == "::" else "")
    lines = [
        "# MegaComet: TLS in front of the workers. Generated by:",
        f"#     {command}",
        "# Start the manager to match (307s then point at this proxy's https ports):",
        f"#     {manager_command(args)}",
        "# Check: haproxy -c -f THIS_FILE. README.md, \"TLS in front (HAProxy)\", says why each",
        "# value is what it is.",
        "",
        "global",
        f"    maxconn {args.maxconn}",
        f"    # ~{fds_needed(args.maxconn, args.workers, args.source_ips):,} fds: HAProxy raises "
        "its own limit to that at start; fs.nr_open must allow it",
        "    log stderr format raw daemon notice",
        *([f"    user {args.user}", f"    group {args.group}"] if args.user else []),
        "    ssl-default-bind-options ssl-min-ver TLSv1.2",
        f"    hard-stop-after {HARD_STOP_AFTER}s",
        "",
        "defaults",
        "    mode http",
        "    log global",
        f"    maxconn {args.maxconn}",
        "    # One X-Forwarded-For with the client's address (the frontends drop the client's own)",
        "    option forwardfor",
        "    option clitcpka",
        f"    clitcpka-idle {KEEPALIVE_IDLE}s",
        f"    clitcpka-intvl {KEEPALIVE_INTVL}s",
        f"    clitcpka-cnt {KEEPALIVE_CNT}",
        f"    timeout connect {CONNECT_TIMEOUT}s",
        f"    timeout http-request {HEAD_TIMEOUT}s",
        f"    timeout http-keep-alive {KEEPALIVE_TIMEOUT}s",
        f"    # Polls wait up to --poll-timeout {args.poll_timeout:g}s (0: no bound), streams "
        f"hear a heartbeat every {args.sse_heartbeat:g}s (0: none)",
        f"    timeout client {idle}s",
        f"    timeout server {idle}s",
        f"    timeout tunnel {idle}s",
        f"    timeout client-fin {FIN_TIMEOUT}s",
    ]
    for n in range(args.workers):
        lines += [
            "",
            f"frontend w{n}",
            f"    bind {address(args.bind, args.public_base_port + n)} {bind_opts}",
            "    # What a client says about forwarding is dropped; the proxy says it itself",
            "    http-request del-header X-Forwarded- -m beg",
            "    http-request del-header Forwarded",
            "    http-request set-header X-Forwarded-Proto https",
            "    http-request set-header X-Forwarded-Port %[dst_port]",
            f"    default_backend w{n}",
            "",
            f"backend w{n}",
        ]
        target = address(args.backend_host, args.base_port + n)
        if args.source_ips == 1:
            lines.append(f"    server w{n} {target}")
        else:
            # Several source addresses to the one worker (see source_ips_needed); any of them
            # is as good, leastconn spreads the ports evenly.
            lines.append("    balance leastconn")
            first = ipaddress.ip_address(args.backend_host)
            for k in range(args.source_ips):
                lines.append(f"    server w{n}s{k} {target} source {first + k}")
    return "\n".join(lines) + "\n"


# --- CLI ---------------------------------------------------------------------------------------


def _int_at_least(low: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value
    return check


def _port(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a port (1-65535): {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Print an HAProxy configuration: TLS on one public port per MegaComet "
                    "worker, forwarded to that worker. See README.md, \"TLS in front\".")
    p.add_argument("--workers", type=_int_at_least(1), required=True,
                   help="the manager's --workers W")
    p.add_argument("--base-port", type=_port, default=8000,
                   help="the manager's --base-port (default 8000)")
    p.add_argument("--public-base-port", type=_port, default=8443,
                   help="worker n is reached over TLS on this + n (default 8443)")
    p.add_argument("--cert", required=True,
                   help="PEM file with the certificate chain and its private key")
    p.add_argument("--bind", default="",
                   help="address the public ports bind to (default: every IPv4 address; "
                        ":: for IPv6 and IPv4)")
    p.add_argument("--backend-host", default="127.0.0.1",
                   help="the manager's --host, where the workers listen (default 127.0.0.1)")
    p.add_argument("--maxconn", type=_int_at_least(1), default=1_000_000,
                   help="concurrent client connections to plan for (default 1000000)")
    p.add_argument("--source-ips", type=_int_at_least(1), default=None,
                   help="loopback source addresses towards each worker (default: enough for "
                        "--maxconn under this box's ip_local_port_range)")
    p.add_argument("--poll-timeout", type=_seconds, default=0.0,
                   help="the manager's --poll-timeout (default 0: off)")
    p.add_argument("--sse-heartbeat", type=_seconds, default=30.0,
                   help="the manager's --sse-heartbeat (default 30)")
    p.add_argument("--user", default=None, metavar="USER[:GROUP]",
                   help="HAProxy runs as this user (and group, default the same name) once "
                        "its ports and certificate are open (default: as started)")
    p.add_argument("-o", "--output", default="-", help="write here instead of stdout")
    args = p.parse_args(argv)
    if args.base_port + args.workers - 1 > 65535:
        p.error("--base-port + --workers runs past port 65535")
    if args.public_base_port + args.workers - 1 > 65535:
        p.error("--public-base-port + --workers runs past port 65535")
    if args.public_base_port < args.base_port + args.workers and \
            args.base_port < args.public_base_port + args.workers:
        p.error(f"public ports {args.public_base_port}-{args.public_base_port + args.workers - 1}"
                f" overlap the workers' ports {args.base_port}-"
                f"{args.base_port + args.workers - 1}")
    if any(c.isspace() for c in args.cert) or not args.cert:
        p.error("--cert must be a path without spaces (HAProxy reads it as one word)")
    try:
        backend = ipaddress.ip_address(args.backend_host)
    except ValueError:
        p.error(f"--backend-host must be an IP address, got {args.backend_host!r}")
    if args.bind:
        try:
            ipaddress.ip_address(args.bind)
        except ValueError:
            p.error(f"--bind must be an IP address, got {args.bind!r}")
    args.user, _, args.group = (args.user or "").partition(":")
    args.group = args.group or args.user
    if any(not name.replace("-", "").replace("_", "").replace(".", "").isalnum()
           for name in (args.user, args.group) if args.user):
        p.error("--user must be USER or USER:GROUP, names of letters, digits, - _ .")
    box = read_box()
    if args.source_ips is None:
        args.source_ips = source_ips_needed(args.maxconn, args.workers, box.port_range)
    if args.source_ips > 1 and not (backend.version == 4 and backend.is_loopback):
        p.error(f"{args.source_ips} source addresses are needed for --maxconn {args.maxconn} "
                "(or were asked for): that takes an IPv4 loopback --backend-host (127.0.0.1), "
                "whose whole 127.0.0.0/8 is this box's; else lower --maxconn or use "
                "--source-ips 1")
    if args.source_ips > MAX_SOURCE_IPS:
        p.error(f"--source-ips {args.source_ips} is too many (at most {MAX_SOURCE_IPS}); widen "
                "ip_local_port_range (tuning/sysctl.conf) or lower --maxconn")
    # The manager believes the forwarded headers from the addresses HAProxy connects from.
    args.trusted = (str(backend) if args.source_ips == 1 else
                    str(ipaddress.ip_network(f"{backend}/8", strict=False)))
    args.box = box
    return args


def box_warnings(args) -> list[str]:
    out = []
    need = fds_needed(args.maxconn, args.workers, args.source_ips)
    if args.box.nr_open is not None and need > args.box.nr_open:
        out.append(f"warning: HAProxy needs ~{need:,} open files for --maxconn {args.maxconn:,} "
                   f"(2 per connection), above fs.nr_open {args.box.nr_open:,} on this box: it "
                   "will not start; raise fs.nr_open (tuning/sysctl.conf) or lower --maxconn")
    if args.box.port_range is not None:
        per_pair = even_ports(*args.box.port_range)
        reach = per_pair * args.source_ips
        if reach * args.workers < args.maxconn:
            out.append(f"warning: {args.source_ips} source address(es) x {per_pair:,} ports "
                       f"reach {reach:,} connections per worker, {reach * args.workers:,} in "
                       f"all, below --maxconn {args.maxconn:,}: raise --source-ips")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    shown = shlex.join(["python3", "tuning/haproxy.py", *(sys.argv[1:] if argv is None else argv)])
    text = render(args, shown)
    for line in box_warnings(args):
        print(line, file=sys.stderr)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        try:
            Path(args.output).write_text(text)
        except OSError as e:
            print(f"haproxy.py: cannot write {args.output}: {e.strerror}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
