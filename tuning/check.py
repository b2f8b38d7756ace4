"""Which limit caps the number of connections on this box, at what count, and how to lift it.

Reads the live limits (no root needed) and prints one row per limit: its value and how many
concurrent connections it allows for the SERVER (manager + workers), for a LOAD CLIENT
(client.py), and for BOTH on this one box (a loopback test, where every connection is two
sockets, two fds and two epoll watches here). Then the first cap on each side and its fix.

    python3 tuning/check.py                     # this box, as the current user sees it
    python3 tuning/check.py --target 1000000    # exit 1 if the server side cannot hold 1M
    python3 tuning/check.py --json              # the same, for machines
    python3 tuning/check.py --root /tmp/fake    # read DIR/proc/... instead (tests)

The manager prints `manager_capacity_line(workers, nofile)` at start: the same arithmetic
(there is one implementation), in one line.

It cannot see what is outside the box (cloud firewalls, security groups, NAT); it says so.

Sections, in dependency order (grep "# ---"):
  constants    per-connection costs, each with where the number comes from
  readers      /proc and getrlimit; a missing or odd file reads as None ("unknown"), never raises
  arithmetic   one small function per limit: how many connections it allows
  report       the rows, the first cap per side, warnings and notes; text and JSON
  CLI
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import textwrap
from dataclasses import asdict, dataclass, field

# --- constants ---------------------------------------------------------------------------------

# Every worker (and every client process) keeps a few fds for itself before it can hold a
# connection: its listen socket, the link to the manager, the epoll fd, stdin/stdout/stderr, and
# slack for what Python or a log file opens. 16 is that list rounded up, so "nofile - 16" is what
# is left for connections.
WORKER_RESERVED_FDS = 16

# Kernel memory per idle TCP socket, measured: /proc/meminfo Slab growth while bench/million.py
# opened its connections, over the sockets (two per loopback connection), Linux 6.18: 4,101 B
# at 10,000,000 connections on a 16-core box (8,202 B per connection, both ends), 5,051 B at
# 1,000,000 on the 2-core development box. The larger, as a cap should err: ~5.1 KB. (The seed's
# slabtop at 494,950 connections on a 2011 kernel gave ~3.4 KB: TCP 1.62K, sock_inode_cache
# 0.62K, dentry, filp, eventpoll_epi and kmallocs.) An idle socket has empty queues, so no
# buffer memory on top. Kernel only: the server's own (Python) bytes per connection come on
# top; bench/memory.py measures those.
KERNEL_BYTES_PER_IDLE_SOCKET = 5100

# tcp_mem is counted in pages of queued data, not in sockets: an idle socket charges nothing to
# it, but a socket with anything queued charges at least one whole page (SK_MEM_QUANTUM, 4096
# bytes). A broadcast queues a reply on every waiting socket at once, so tcp_mem's max in pages
# is the number of connections a broadcast can reach before the kernel stops allocating
# (sends stall, receives drop; "TCP: out of memory -- consider tuning tcp_mem" in dmesg).
TCP_MEM_PAGE_BYTES = 4096
TCP_MEM_PAGES_PER_BUSY_SOCKET = 1

# The server's listen backlog by default (SPEC.md, --backlog); the kernel caps it at somaxconn.
SERVER_BACKLOG = 4096

# Linux connect() (4.6+, "tcp/dccp: try to not exhaust ip_local_port_range in connect()") tries
# the even ports of ip_local_port_range first and leaves the odd ones to bind(). Once one
# (source address, destination address:port) pair holds more than the even half, every connect()
# scans the range in the kernel under a lock: measured here at ~18k per pair, 7.7 ms per
# connect() and 100% system CPU; a 1M run stalled at 880k. So a client plans on the even half
# (even_ports below).

# A count at or above this prints as "unlimited" (systemd sets fs.file-max to LONG_MAX).
UNLIMITED = 2**62

OUTSIDE_NOTE = (
    "not visible from inside this box: cloud firewalls and security groups (a tracked "
    "security-group connection counts against a per-instance allowance; on EC2 ENA see "
    "`ethtool -S eth0 | grep allowance`, conntrack_allowance_exceeded), NAT gateways and load "
    "balancers in the path (an AWS NAT gateway allows ~55,000 connections per destination "
    "address:port), and the peer's own limits. A SYN dropped out there looks like a connect "
    "timeout here, with nothing in the kernel log, which is how the seed's 494k wall looked."
)

# --- readers of /proc ----------------------------------------------------------------------------


def _path(root: str, rel: str) -> str:
    return os.path.join(root, rel.lstrip("/"))


def read_text(root: str, rel: str) -> str | None:
    """The file's text, or None if it is missing or unreadable."""
    try:
        with open(_path(root, rel), encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_ints(root: str, rel: str) -> tuple[int, ...] | None:
    """A /proc/sys value as integers ("32768\t60999" -> (32768, 60999)), or None."""
    text = read_text(root, rel)
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split())
    except ValueError:
        return None
    return values or None


def read_int(root: str, rel: str) -> int | None:
    values = read_ints(root, rel)
    return values[0] if values else None


def read_mem_total(root: str) -> int | None:
    """MemTotal from /proc/meminfo, in bytes."""
    for line in (read_text(root, "proc/meminfo") or "").splitlines():
        name, _, rest = line.partition(":")
        if name == "MemTotal":
            try:
                return int(rest.split()[0]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def read_nofile(root: str) -> tuple[int, int] | None:
    """(soft, hard) RLIMIT_NOFILE: this process's when root is "/", else DIR/proc/self/limits."""
    if root == "/":
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (OSError, ValueError):
            return None
        return (soft, hard)
    for line in (read_text(root, "proc/self/limits") or "").splitlines():
        if line.startswith("Max open files"):
            fields = line[len("Max open files"):].split()
            try:
                return (int(fields[0]), int(fields[1]))
            except (IndexError, ValueError):
                return None  # "unlimited" cannot happen for nofile on Linux
    return None


def parse_port_list(text: str) -> tuple[tuple[int, int], ...] | None:
    """ip_local_reserved_ports' format: "8000-8127,9000" -> ((8000, 8127), (9000, 9000));
    empty -> (); garbage -> None."""
    out = []
    try:
        for part in text.strip().split(","):
            if part:
                lo, _, hi = part.partition("-")
                out.append((int(lo), int(hi or lo)))
    except ValueError:
        return None
    return tuple(out)


def _parse_cpu_list(text: str) -> int | None:
    """ "0-3,8,10-11" -> 7."""
    count = 0
    try:
        for part in text.strip().split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
    except ValueError:
        return None
    return count or None


def read_cpus(root: str) -> int | None:
    """CPUs this process may run on: sched_getaffinity on "/", else Cpus_allowed_list."""
    if root == "/":
        try:
            return len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return os.cpu_count()
    for line in (read_text(root, "proc/self/status") or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return _parse_cpu_list(line.partition(":")[2])
    return None


@dataclass
class Box:
    """Everything read from the box. None means unknown, except conntrack_max (not loaded)."""

    root: str
    file_max: int | None
    nr_open: int | None
    nofile: tuple[int, int] | None
    port_range: tuple[int, int] | None
    reserved_ports: tuple[tuple[int, int], ...] | None
    tcp_mem: tuple[int, ...] | None
    somaxconn: int | None
    syn_backlog: int | None
    conntrack_max: int | None
    conntrack_count: int | None
    epoll_watches: int | None
    mem_total: int | None
    cpus: int | None


def read_box(root: str = "/") -> Box:
    """Read every limit this module knows about. Never raises for missing files."""
    sys_ = "proc/sys/"
    ports = read_ints(root, sys_ + "net/ipv4/ip_local_port_range")
    return Box(
        root=root,
        file_max=read_int(root, sys_ + "fs/file-max"),
        nr_open=read_int(root, sys_ + "fs/nr_open"),
        nofile=read_nofile(root),
        port_range=(ports[0], ports[1]) if ports and len(ports) == 2 else None,
        reserved_ports=parse_port_list(
            read_text(root, sys_ + "net/ipv4/ip_local_reserved_ports") or ""),
        tcp_mem=read_ints(root, sys_ + "net/ipv4/tcp_mem"),
        somaxconn=read_int(root, sys_ + "net/core/somaxconn"),
        syn_backlog=read_int(root, sys_ + "net/ipv4/tcp_max_syn_backlog"),
        # Absent file = nf_conntrack not loaded = nothing tracks connections = no cap.
        conntrack_max=read_int(root, sys_ + "net/netfilter/nf_conntrack_max"),
        conntrack_count=read_int(root, sys_ + "net/netfilter/nf_conntrack_count"),
        epoll_watches=read_int(root, sys_ + "fs/epoll/max_user_watches"),
        mem_total=read_mem_total(root),
        cpus=read_cpus(root),
    )


def raise_nofile() -> int:
    """Raise this process's soft open-file limit to the hard one (children inherit it);
    returns the limit now in force. The manager and client.py call it at start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# --- arithmetic --------------------------------------------------------------------------------
# One function per limit, each answering "how many connections does this allow". `sides` is how
# many sockets one connection costs on this box: 1 for a server or a client alone, 2 when both
# run here (loopback).


def per_worker_capacity(nofile: int) -> int:
    """Connections one worker (or client process) can hold under an open-file limit."""
    return max(0, nofile - WORKER_RESERVED_FDS)


def open_files_capacity(nofile: int, processes: int) -> int:
    return per_worker_capacity(nofile) * processes


def file_max_capacity(file_max: int, sides: int) -> int:
    # Counted for everyone, although the kernel lets a CAP_SYS_ADMIN (root) process past it.
    return file_max // sides


def epoll_capacity(max_user_watches: int, sides: int) -> int:
    # Per user: all workers (and a client run by the same user) share the one count.
    return max_user_watches // sides


def even_ports(lo: int, hi: int) -> int:
    """How many even ports lie in [lo, hi]: what connect() uses per pair before it scans."""
    return max(0, hi // 2 - (lo + 1) // 2 + 1)


def ephemeral_capacity(port_range: tuple[int, int], source_ips: int, dest_ports: int) -> int:
    return even_ports(*port_range) * source_ips * dest_ports


def port_list_text(ranges) -> str:
    """((9000, 9000), (8000, 8063), (8064, 8127)) -> "8000-8127,9000": merged and sorted, in
    ip_local_reserved_ports' format."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in merged)


def exposed_ports(box: Box, ports) -> list[int]:
    """The ports among `ports` that connect() may pick as a local port: inside
    ip_local_port_range and not in ip_local_reserved_ports. Any program's outgoing connection,
    or its TIME-WAIT for 60 s after it closed, then holds the port, and a listener cannot bind
    it (EADDRINUSE, with nothing listening there)."""
    if box.port_range is None:
        return []
    lo, hi = box.port_range
    reserved = box.reserved_ports or ()
    return sorted(p for p in set(ports)
                  if lo <= p <= hi and not any(a <= p <= b for a, b in reserved))


def reserve_advice(box: Box, ports) -> str:
    """What to do about exposed_ports: the whole value to set, the box's reservations kept."""
    wanted = [(p, p) for p in ports] + list(box.reserved_ports or ())
    return (f"net.ipv4.ip_local_reserved_ports = {port_list_text(wanted)} in "
            "tuning/sysctl.conf, then tuning/apply.sh (or use ports outside the range)")


def port_clash_hint(port: int, ports=(), root: str = "/") -> str:
    """For the manager's EADDRINUSE on `port`: why it can happen with nothing listening there,
    or "" when the port is outside the ephemeral range (or reserved). The advice reserves
    `ports` (all of the manager's) with it. Never raises."""
    try:
        box = read_box(root)
        if not exposed_ports(box, [port]):
            return ""
        lo, hi = box.port_range
        return (f"port {port} is inside net.ipv4.ip_local_port_range {lo}-{hi}, where the "
                "kernel picks the local ports of outgoing connections: another program's "
                "connection, even one closed less than 60 s ago (TIME-WAIT), holds it with "
                f"nothing listening (`ss -tan 'sport = :{port}'` lists them); reserve the "
                "comet and app ports: " + reserve_advice(box, exposed_ports(box, [port, *ports])))
    except Exception:  # an error message must never raise itself
        return ""


def memory_capacity(mem_total: int, sides: int) -> int:
    return mem_total // (KERNEL_BYTES_PER_IDLE_SOCKET * sides)


def tcp_mem_capacity(tcp_mem_max_pages: int, sides: int) -> int:
    return tcp_mem_max_pages // (TCP_MEM_PAGES_PER_BUSY_SOCKET * sides)


def conntrack_capacity(conntrack_max: int) -> int:
    # One entry per connection, both directions; loopback traffic is tracked too unless a raw
    # table rule says NOTRACK, so a loopback connection also takes one entry, not two.
    return conntrack_max


# --- report ------------------------------------------------------------------------------------

SIDES = ("server", "client", "loopback")


@dataclass
class Row:
    """One limit. A cell is a connection count, or None: no cap on that side (or unknown, when
    value is "unknown")."""

    name: str
    key: str
    value: str
    server: int | None = None
    client: int | None = None
    loopback: int | None = None
    fix: dict[str, str] = field(default_factory=dict)

    def cell(self, side: str) -> int | None:
        return getattr(self, side)


@dataclass
class Cap:
    limit: str
    connections: int
    fix: str


@dataclass
class Report:
    root: str
    cpus: int | None
    workers: int
    client_processes: int
    source_ips: int
    dest_ports: int
    rows: list[Row]
    first_cap: dict[str, Cap | None]
    warnings: list[str]
    notes: list[str]
    target: int | None = None
    target_ok: bool | None = None
    short_of_target: list[str] = field(default_factory=list)
    broadcast_reach: dict | None = None  # see broadcast_reach()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _count(n: int) -> str:
    return "unlimited" if n >= UNLIMITED else f"{n:,}"


def _rows(box: Box, workers: int, client_procs: int, source_ips: int, dest_ports: int,
          ) -> list[Row]:
    rows = []
    unknown = "unknown"

    # Open files per process: each side has its own processes, each with its own limit.
    if box.nofile:
        soft, hard = box.nofile
        per = per_worker_capacity(hard)
        value = f"{hard:,}" if soft == hard else f"{hard:,} (soft {soft:,})"
        ceiling = f", up to fs.nr_open {box.nr_open:,}" if box.nr_open else ""
        server = open_files_capacity(hard, workers)
        client = open_files_capacity(hard, client_procs)
        rows.append(Row(
            "open files per process", "RLIMIT_NOFILE", value, server, client,
            min(server, client), {
                "server": f"open-file limit {hard:,} per process caps each worker at {per:,} "
                          f"connections x {workers} workers; raise LimitNOFILE "
                          f"(tuning/megacomet.service{ceiling}) or run more workers",
                "client": f"open-file limit {hard:,} per process caps each client process at "
                          f"{per:,} x {client_procs} processes; raise `ulimit -n` "
                          f"(tuning/limits.conf, then log in again) or run more client processes",
            }))
    else:
        rows.append(Row("open files per process", "RLIMIT_NOFILE", unknown))

    if box.file_max is not None:
        fm = box.file_max
        fix = "raise fs.file-max (tuning/sysctl.conf)"
        rows.append(Row(
            "fs.file-max (system-wide)", "fs.file-max", _count(fm), file_max_capacity(fm, 1),
            file_max_capacity(fm, 1), file_max_capacity(fm, 2),
            {s: fix + (": both ends share it on loopback" if s == "loopback" else "")
             for s in SIDES}))
    else:
        rows.append(Row("fs.file-max (system-wide)", "fs.file-max", unknown))

    if box.epoll_watches is not None:
        w = box.epoll_watches
        fix = "raise fs.epoll.max_user_watches (tuning/sysctl.conf)"
        rows.append(Row(
            "epoll watches per user", "fs.epoll.max_user_watches", _count(w),
            epoll_capacity(w, 1), epoll_capacity(w, 1), epoll_capacity(w, 2),
            {s: fix for s in SIDES}))
    else:
        rows.append(Row("epoll watches per user", "fs.epoll.max_user_watches", unknown))

    if box.port_range:
        lo, hi = box.port_range
        half = even_ports(lo, hi)
        n = ephemeral_capacity(box.port_range, source_ips, dest_ports)
        fix = (f"{half:,} even ports per (source, destination) pair x "
               f"{_plural(source_ips, 'source address')} x "
               f"{_plural(dest_ports, 'destination port')}; add source addresses "
               "(client.py --source-ips; 127.0.0.2, .3, ... on loopback) or destination ports "
               "(more workers); a wider ip_local_port_range (tuning/sysctl.conf) helps less")
        rows.append(Row("ephemeral ports (even half)", "net.ipv4.ip_local_port_range",
                        f"{lo}-{hi}", None, n, n, {"client": fix, "loopback": fix}))
    else:
        rows.append(Row("ephemeral ports (even half)",
                        "net.ipv4.ip_local_port_range", unknown))

    if box.mem_total is not None:
        m = box.mem_total
        fix = (f"more RAM: each idle socket costs ~{KERNEL_BYTES_PER_IDLE_SOCKET:,} bytes of "
               "kernel memory, before the server's own")
        rows.append(Row(
            f"RAM, ~{KERNEL_BYTES_PER_IDLE_SOCKET / 1000:.1f} KB/socket", "MemTotal", _gib(m),
            memory_capacity(m, 1), memory_capacity(m, 1), memory_capacity(m, 2),
            {s: fix for s in SIDES}))
    else:
        rows.append(Row("RAM", "MemTotal", unknown))

    # tcp_mem is no row here: it caps what one broadcast can reach, not what can be open
    # (a 16-core box held 10,000,000 idle polls under a tcp_mem max of 3,090,648 pages).
    # See broadcast_reach().

    if box.conntrack_max is not None and box.conntrack_count == 0:
        # Loaded, but no netfilter rule asks for it, so its hooks are not registered: it
        # tracks nothing (seen here: 398,700 loopback connections past a max of 262,144).
        rows.append(Row("nf_conntrack_max", "net.netfilter.nf_conntrack_max",
                        f"{box.conntrack_max:,} (tracks 0: no cap)"))
    elif box.conntrack_max is not None:
        c = conntrack_capacity(box.conntrack_max)
        fix = (f"nf_conntrack is loaded and tracks every connection (loopback too), "
               f"{box.conntrack_max:,} at most, then drops SYNs ('nf_conntrack: table full' in "
               "dmesg); raise net.netfilter.nf_conntrack_max (tuning/sysctl.conf) or exempt the "
               "comet ports: iptables -t raw -I PREROUTING -p tcp --dport 8000:8063 -j CT "
               "--notrack (and the OUTPUT chain, --sport, for loopback)")
        rows.append(Row("nf_conntrack_max", "net.netfilter.nf_conntrack_max",
                        f"{box.conntrack_max:,}", c, c, c, {s: fix for s in SIDES}))
    else:
        rows.append(Row("nf_conntrack_max", "net.netfilter.nf_conntrack_max",
                        "not loaded (no cap)"))

    # Not a cap by itself: the ceiling that LimitNOFILE / limits.conf cannot exceed.
    rows.append(Row("fs.nr_open (nofile ceiling)", "fs.nr_open",
                    _count(box.nr_open) if box.nr_open is not None else unknown))
    return rows


def _first_cap(rows: list[Row], side: str) -> Cap | None:
    capped = [(r.cell(side), r) for r in rows if r.cell(side) is not None]
    if not capped:
        return None
    n, row = min(capped, key=lambda c: c[0])
    return Cap(row.name, n, f"{row.name}: {row.fix.get(side, '')}".rstrip(": "))


def broadcast_reach(box: Box) -> dict | None:
    """How many waiting sockets one broadcast can queue a reply on at once: net.ipv4.tcp_mem's
    max in pages, one page per reply (the loopback column: both ends' replies and reads count).
    Not a cap on connections: idle sockets charge nothing to tcp_mem."""
    if not box.tcp_mem or len(box.tcp_mem) != 3:
        return None
    pages = box.tcp_mem[2]
    return {"pages": pages, "server": tcp_mem_capacity(pages, 1),
            "loopback": tcp_mem_capacity(pages, 2)}


def _reach_line(reach: dict | None, target: int | None) -> str:
    if reach is None:
        return "unknown (net.ipv4.tcp_mem could not be read)"
    line = (f"{reach['server']:,} waiting sockets at once ({reach['loopback']:,} with the "
            f"client on this box): net.ipv4.tcp_mem max {reach['pages']:,} pages "
            f"({_gib(reach['pages'] * TCP_MEM_PAGE_BYTES)}), one page per queued reply. Not a "
            "cap on connections (idle sockets cost tcp_mem nothing): a broadcast to more "
            "waiting polls than this stalls its sends until replies drain")
    if target is not None and reach["server"] < target:
        line += (f". For a broadcast to reach {target:,} at once, set the third number of "
                 f"net.ipv4.tcp_mem to at least {target * TCP_MEM_PAGES_PER_BUSY_SOCKET:,} "
                 "in tuning/sysctl.conf and run tuning/apply.sh (it keeps the higher of that "
                 "and the box's value)")
    return line


def _warnings(box: Box, base_port: int, workers: int, app_port: int) -> list[str]:
    out = []
    exposed = exposed_ports(box, [*range(base_port, base_port + workers), app_port])
    if exposed:
        lo, hi = box.port_range
        out.append(f"ports {port_list_text((p, p) for p in exposed)} of the manager (comet "
                   f"ports --base-port {base_port} + {_plural(workers, 'worker')}, --app-port "
                   f"{app_port}) are inside net.ipv4.ip_local_port_range {lo}-{hi} and not "
                   "reserved: any program's outgoing connection, or its TIME-WAIT for 60 s "
                   "after it closed, can hold one, and the manager then cannot listen there at "
                   "start (EADDRINUSE with nothing listening). Set "
                   + reserve_advice(box, exposed))
    if box.nofile and box.nofile[0] < box.nofile[1]:
        out.append(f"soft open-file limit {box.nofile[0]:,} is below the hard {box.nofile[1]:,}: "
                   "the counts assume each process raises its soft limit to the hard one at "
                   "start (resource.setrlimit, no privilege needed)")
    if box.somaxconn is not None:
        backlog = min(SERVER_BACKLOG, box.somaxconn)
        syn = f", tcp_max_syn_backlog {box.syn_backlog:,}" if box.syn_backlog else ""
        out.append(f"net.core.somaxconn {box.somaxconn:,}{syn}: each worker's accept backlog is "
                   f"{backlog:,} (--backlog {SERVER_BACKLOG} capped by somaxconn); not a cap on "
                   "connections, but a connect burst faster than the workers accept overflows "
                   "it: SYNs dropped, clients retry after 1 s, 3 s, ... "
                   "(`nstat -az TcpExtListenOverflows`)")
    return out


def build_report(box: Box, workers: int | None = None, client_processes: int | None = None,
                 source_ips: int = 1, dest_ports: int | None = None,
                 target: int | None = None, base_port: int = 8000,
                 app_port: int = 9000) -> Report:
    """The whole analysis, from a Box (read_box) and the planned process layout."""
    cpus = box.cpus or 1
    workers = workers or cpus
    client_processes = client_processes or cpus
    dest_ports = dest_ports or workers  # each worker listens on its own port
    rows = _rows(box, workers, client_processes, source_ips, dest_ports)
    first = {side: _first_cap(rows, side) for side in SIDES}
    notes = [
        "open files are this shell's limits; under systemd the unit's LimitNOFILE applies "
        "(tuning/megacomet.service sets 1,048,576 per process)",
        "loopback column: server and client on this box share fs.file-max, RAM, tcp_mem and, "
        "if run by one user, the epoll watches; each connection counts twice in those",
    ]
    report = Report(box.root, box.cpus, workers, client_processes, source_ips, dest_ports,
                    rows, first, _warnings(box, base_port, workers, app_port), notes)
    report.broadcast_reach = broadcast_reach(box)
    if target is not None:
        report.target = target
        cap = first["server"]
        report.target_ok = cap is None or cap.connections >= target
        report.short_of_target = [
            f"{r.name} allows {r.server:,}: {r.fix['server']}"
            for r in rows if r.server is not None and r.server < target]
        need = -(-target // workers) + WORKER_RESERVED_FDS
        if any(r.key == "RLIMIT_NOFILE" and r.server is not None and r.server < target
               for r in rows):
            fix = f"for {target:,} over {workers} workers, each needs LimitNOFILE >= {need:,}"
            if box.nr_open is not None and need > box.nr_open:
                fix += f" (above fs.nr_open {box.nr_open:,}: raise that first)"
            # Where the limit is fixed (a container, a shared box): more processes instead.
            more = -(-target // max(1, per_worker_capacity(box.nofile[1]))) if box.nofile else 0
            if more > workers:
                fix += (f"; or, where the limit cannot be raised, at least {more:,} workers "
                        f"(manager.py --workers {more})")
            report.short_of_target.append(fix)
        if cap is None:
            report.notes.append(f"no limit could be read, so nothing shows {target:,} is "
                                "out of reach; that is not a proof that it is in reach")
        elif report.target_ok:
            report.notes.append(f"everything this box shows allows {target:,} connections; if a "
                                "run still stalls below that, look outside the box (below)")
    report.notes.append(OUTSIDE_NOTE)
    return report


def _cell(row: Row, side: str) -> str:
    n = row.cell(side)
    if n is not None:
        return _count(n)
    return "unknown" if row.value == "unknown" else "-"


def _wrap(text: str, indent: str, hang: int = 2) -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent=indent,
                         subsequent_indent=" " * (len(indent) + hang), break_on_hyphens=False)


def format_report(report: Report) -> str:
    cpus = report.cpus if report.cpus is not None else "unknown"
    vw = max(24, *(len(r.value) + 1 for r in report.rows))  # a long value keeps the columns
    lines = [
        f"MegaComet capacity (root {report.root}): {cpus} CPUs, "
        f"{_plural(report.workers, 'worker')}, "
        f"{_plural(report.client_processes, 'client process')}, "
        f"{_plural(report.source_ips, 'source address')}, "
        f"{_plural(report.dest_ports, 'destination port')}",
        "",
        f"{'limit':<29} {'value':<{vw}} {'server':>11} {'client':>11} {'loopback':>11}",
    ]
    for r in report.rows:
        lines.append(f"{r.name:<29} {r.value:<{vw}} {_cell(r, 'server'):>11} "
                     f"{_cell(r, 'client'):>11} {_cell(r, 'loopback'):>11}")
    lines += ["", "first cap:"]
    for side in SIDES:
        cap = report.first_cap[side]
        if cap is None:
            lines.append(f"  {side:<9} unknown (no limit could be read)")
        else:
            lines += _wrap(cap.fix, f"  {side:<8} {_count(cap.connections):>9}  ", hang=0)
    lines += [""] + _wrap(_reach_line(report.broadcast_reach, report.target),
                          "broadcast reach: ", hang=0)
    if report.target is not None:
        verdict = "yes" if report.target_ok else "NO"
        lines += ["", f"target {report.target:,} connections on the server side: {verdict}"]
        for s in report.short_of_target:
            lines += _wrap(s, "  - ")
    for title, items in (("warnings:", report.warnings), ("notes:", report.notes)):
        if items:
            lines += ["", title]
            for item in items:
                lines += _wrap(item, "  - ")
    return "\n".join(lines)


def report_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2)


def manager_capacity_line(workers: int, nofile: int, root: str = "/") -> str:
    """One line for the manager to print at start: its open-file arithmetic and the first cap.

    `nofile` is the limit the workers run under (after raising soft to hard). Never raises.
    """
    try:
        if nofile < 0:  # RLIM_INFINITY: not possible for nofile on Linux, but do not lie
            return (f"capacity: open-file limit unlimited x {workers} workers; the first cap on "
                    "this box is unknown; see tuning/check.py")
        box = read_box(root)
        box.nofile = (nofile, nofile)
        report = build_report(box, workers=workers)
        cap = report.first_cap["server"]
        first = (f"{cap.limit} at {cap.connections:,} connections" if cap else "unknown")
        unread = [r.key for r in report.rows if r.value == "unknown"]
        if unread:
            first += f" (could not read: {', '.join(unread)})"
        return (f"capacity: open-file limit {nofile:,} per worker x {workers} workers = "
                f"{open_files_capacity(nofile, workers):,} connections (each worker keeps "
                f"{WORKER_RESERVED_FDS} fds for itself); the first cap on this box is {first}; "
                "see tuning/check.py")
    except Exception as exc:  # a status line must never stop the manager
        return f"capacity: unknown ({exc.__class__.__name__}); see tuning/check.py"


# --- CLI ---------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    # Standalone (run as a script, options.py is not on its path); same wording as options.py.
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number 1 or more, got {text!r}")
    return n


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Which limit caps the connections on this box, server and client side.")
    p.add_argument("--root", default="/", help="read DIR/proc/... instead of /proc (default /)")
    p.add_argument("--cpus", type=_positive, help="CPU count (default: the affinity mask)")
    p.add_argument("--workers", type=_positive, help="server worker processes (default: CPUs)")
    p.add_argument("--client-procs", type=_positive,
                   help="load-client processes (default: CPUs)")
    p.add_argument("--nofile", type=_positive,
                   help="assume this open-file limit per process (default: the live one)")
    p.add_argument("--source-ips", type=_positive, default=1,
                   help="client source addresses (default 1)")
    p.add_argument("--dest-ports", type=_positive,
                   help="server ports the client spreads over (default: workers)")
    p.add_argument("--base-port", type=_port, default=8000,
                   help="the manager's --base-port, for the reserved-ports check (8000)")
    p.add_argument("--app-port", type=_port, default=9000,
                   help="the manager's --app-port, for the reserved-ports check (9000)")
    p.add_argument("--target", type=_positive,
                   help="exit 1 if the server side cannot hold this many connections")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)

    box = read_box(args.root)
    if args.cpus:
        box.cpus = args.cpus
    if args.nofile:
        box.nofile = (args.nofile, args.nofile)
    report = build_report(box, workers=args.workers, client_processes=args.client_procs,
                          source_ips=args.source_ips, dest_ports=args.dest_ports,
                          target=args.target, base_port=args.base_port,
                          app_port=args.app_port)
    print(report_json(report) if args.json else format_report(report))
    return 1 if report.target_ok is False else 0


if __name__ == "__main__":
    sys.exit(main())
