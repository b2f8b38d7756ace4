"""tuning/: check.py's arithmetic on fake /proc trees, its CLI, and apply.sh --dry-run.

Each box is a directory laid out like / (proc/sys/..., proc/meminfo, proc/self/limits,
proc/self/status) passed as --root, so the numbers do not depend on the machine running the tests.
apply.sh is only ever run with --dry-run, against fake /etc and /proc/sys directories.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuning.check import (
    KERNEL_BYTES_PER_IDLE_SOCKET,
    WORKER_RESERVED_FDS,
    build_report,
    even_ports,
    format_report,
    main,
    manager_capacity_line,
    parse_port_list,
    per_worker_capacity,
    port_list_text,
    read_box,
)

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tuning" / "check.py"
APPLY = ROOT / "tuning" / "apply.sh"
GIB = 2**30


def make_box(root: Path, *, nofile=(20000, 20000), cpus=2, mem_gib=24, file_max=2466170,
             nr_open=1048576, ports=(32768, 60999), tcp_mem=(287898, 383867, 575796),
             somaxconn=4096, conntrack=None, epoll=5491511, reserved=None) -> str:
    """Write a fake /proc for one box under root; None leaves that file out."""
    def put(rel, text):
        if text is None:
            return
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    ints = lambda v: None if v is None else "\t".join(map(str, v)) + "\n"  # noqa: E731
    one = lambda v: None if v is None else f"{v}\n"  # noqa: E731
    put("proc/sys/fs/file-max", one(file_max))
    put("proc/sys/fs/nr_open", one(nr_open))
    put("proc/sys/fs/epoll/max_user_watches", one(epoll))
    put("proc/sys/net/ipv4/ip_local_port_range", ints(ports))
    put("proc/sys/net/ipv4/tcp_mem", ints(tcp_mem))
    put("proc/sys/net/ipv4/ip_local_reserved_ports", one(reserved))
    put("proc/sys/net/core/somaxconn", one(somaxconn))
    put("proc/sys/net/netfilter/nf_conntrack_max", one(conntrack))
    if mem_gib is not None:
        put("proc/meminfo", f"MemTotal:       {mem_gib * 1024 * 1024} kB\nMemFree: 1 kB\n")
    if nofile is not None:
        put("proc/self/limits",
            "Limit                     Soft Limit           Hard Limit           Units\n"
            "Max processes             unlimited            unlimited            processes\n"
            f"Max open files            {nofile[0]:<20} {nofile[1]:<20} files\n")
    if cpus is not None:
        put("proc/self/status", f"Name:\tpython3\nCpus_allowed_list:\t0-{cpus - 1}\n")
    return str(root)


def rows(report):
    return {r.key: r for r in report.rows}


# --- arithmetic --------------------------------------------------------------------------------


def test_per_worker_capacity_keeps_reserved_fds():
    assert WORKER_RESERVED_FDS == 16
    assert per_worker_capacity(20000) == 19984
    assert per_worker_capacity(1048576) == 1048560
    assert per_worker_capacity(10) == 0


@pytest.mark.parametrize("lo,hi,expected", [
    (32768, 60999, 14116), (1024, 65535, 32256), (10240, 65535, 27648), (1000, 1000, 1),
    (1001, 1001, 0), (61000, 60999, 0),
])
def test_even_ports(lo, hi, expected):
    assert even_ports(lo, hi) == expected


# --- boxes -------------------------------------------------------------------------------------


def test_this_box_open_files_bind_server_ports_bind_client(tmp_path):
    """The dev box: 20,000 open files, 2 CPUs, 24 GiB, 32768-60999, conntrack not loaded."""
    report = build_report(read_box(make_box(tmp_path)))
    assert report.workers == 2 and report.dest_ports == 2
    r = rows(report)
    assert r["RLIMIT_NOFILE"].server == 2 * 19984 == 39968
    assert r["net.ipv4.ip_local_port_range"].server is None  # the server accepts; no ports used
    assert r["net.ipv4.ip_local_port_range"].client == 14116 * 2
    assert r["fs.file-max"].loopback == 2466170 // 2
    assert r["MemTotal"].server == 24 * GIB // KERNEL_BYTES_PER_IDLE_SOCKET
    assert r["MemTotal"].loopback == 24 * GIB // (2 * KERNEL_BYTES_PER_IDLE_SOCKET)
    assert "net.ipv4.tcp_mem" not in r  # not a cap on connections: the broadcast reach
    assert report.broadcast_reach == {"pages": 575796, "server": 575796, "loopback": 287898}
    assert r["net.netfilter.nf_conntrack_max"].server is None  # not loaded: no cap

    server = report.first_cap["server"]
    assert server.connections == 39968 and "open files" in server.limit
    assert "19,984" in server.fix and "LimitNOFILE" in server.fix
    client = report.first_cap["client"]
    assert client.connections == 28232 and "ephemeral" in client.limit
    assert "--source-ips" in client.fix
    assert report.first_cap["loopback"].connections == 28232


def test_tuned_million_box(tmp_path):
    """nofile 1048576, 16 CPUs, 128 GiB, the tuning/sysctl.conf values: 1M fits on the server."""
    root = make_box(tmp_path, nofile=(1048576, 1048576), cpus=16, mem_gib=128,
                    file_max=4194304, nr_open=2097152, ports=(10240, 65535),
                    tcp_mem=(1048576, 1572864, 2097152), somaxconn=65535, epoll=4194304)
    report = build_report(read_box(root), target=1_000_000)
    r = rows(report)
    assert r["RLIMIT_NOFILE"].server == 16 * 1048560
    assert report.first_cap["server"].connections == 4194304  # fs.file-max (tcp_mem is no cap)
    assert report.target_ok is True and report.short_of_target == []
    assert report.broadcast_reach["server"] == 2097152  # one page per queued reply
    # One source address to 16 ports: 16 x 27,648 even ports, well short of 1M for a client.
    assert report.first_cap["client"].connections == 16 * 27648
    assert report.first_cap["loopback"].connections == 16 * 27648
    # With 40 source addresses the client side reaches the loopback memory caps instead.
    more = build_report(read_box(root), source_ips=40)
    assert rows(more)["net.ipv4.ip_local_port_range"].client == 40 * 16 * 27648
    assert more.first_cap["loopback"].connections == 4194304 // 2  # fs.file-max, both ends


def test_small_conntrack_binds_first(tmp_path):
    root = make_box(tmp_path, nofile=(1048576, 1048576), cpus=16, mem_gib=128,
                    file_max=4194304, ports=(10240, 65535), conntrack=65536)
    report = build_report(read_box(root), source_ips=8)
    for side in ("server", "client", "loopback"):
        cap = report.first_cap[side]
        assert cap.connections == 65536, side
        assert "conntrack" in cap.limit and "nf_conntrack_max" in cap.fix


def test_tiny_port_range_binds_client_only(tmp_path):
    root = make_box(tmp_path, nofile=(1048576, 1048576), ports=(60000, 60099))
    report = build_report(read_box(root))
    assert report.first_cap["client"].connections == 50 * 2  # 50 even ports x 2 worker ports
    server = report.first_cap["server"]
    # Ports never cap it: the server accepts (nofile 1,048,576 x 2 workers is its cap here).
    assert server.connections == 2 * (1048576 - 16) and "open files" in server.limit
    report = build_report(read_box(root), source_ips=3, dest_ports=5)
    assert report.first_cap["client"].connections == 50 * 3 * 5


def test_soft_limit_below_hard_warns(tmp_path):
    report = build_report(read_box(make_box(tmp_path, nofile=(1024, 524288))))
    assert rows(report)["RLIMIT_NOFILE"].server == 2 * (524288 - 16)
    assert any("soft open-file limit 1,024" in w for w in report.warnings)
    assert any("somaxconn" in w for w in report.warnings)


def test_missing_files_do_not_crash(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    box = read_box(str(empty))
    assert box.file_max is None and box.nofile is None and box.mem_total is None
    report = build_report(box, workers=3)
    assert report.first_cap["server"] is None
    assert main(["--root", str(empty), "--workers", "3"]) == 0
    out = capsys.readouterr().out
    assert "unknown" in out
    # Garbage is as good as missing.
    make_box(tmp_path / "junk")
    (tmp_path / "junk/proc/sys/fs/file-max").write_text("lots\n")
    (tmp_path / "junk/proc/meminfo").write_text("MemTotal: ???\n")
    box = read_box(str(tmp_path / "junk"))
    assert box.file_max is None and box.mem_total is None and box.nr_open == 1048576


# --- CLI ---------------------------------------------------------------------------------------


def test_target_exit_codes(tmp_path):
    root = make_box(tmp_path)
    assert main(["--root", root, "--target", "39968"]) == 0
    assert main(["--root", root, "--target", "39969"]) == 1
    # Raising the open-file limit is enough for 1M here; tcp_mem only bounds a broadcast.
    assert main(["--root", root, "--target", "500000", "--nofile", "1048576"]) == 0
    assert main(["--root", root, "--target", "1000000", "--nofile", "1048576"]) == 0
    report = build_report(read_box(root), target=1_000_000)
    assert [s.split(" allows ")[0] for s in report.short_of_target] == [
        "open files per process", "for 1,000,000 over 2 workers, each needs LimitNOFILE >= "
        "500,016; or, where the limit cannot be raised, at least 51 workers (manager.py "
        "--workers 51)"]  # 1,000,000 / 19,984 per worker, rounded up
    # The same through the real command line, as a user runs it.
    run = lambda *a: subprocess.run([sys.executable, str(CHECK), "--root", root, *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=30)
    bad = run("--target", "1000000")
    assert bad.returncode == 1, bad.stderr
    assert "target 1,000,000 connections on the server side: NO" in bad.stdout
    assert "LimitNOFILE >= 500,016" in bad.stdout.replace("\n    ", " ")
    assert run("--target", "1000").returncode == 0
    assert run("--target", "0").returncode == 2  # argparse refuses it


def test_json_output(tmp_path, capsys):
    root = make_box(tmp_path, conntrack=65536)
    assert main(["--root", root, "--json", "--target", "100000"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["workers"] == 2 and data["target"] == 100000 and data["target_ok"] is False
    assert data["first_cap"]["server"]["connections"] == 39968
    by_key = {r["key"]: r for r in data["rows"]}
    assert by_key["net.netfilter.nf_conntrack_max"]["loopback"] == 65536
    assert by_key["net.ipv4.ip_local_port_range"]["server"] is None
    assert any("security groups" in n for n in data["notes"])


def test_text_report_names_cap_fix_and_outside(tmp_path, capsys):
    assert main(["--root", make_box(tmp_path, conntrack=300000), "--nofile", "1048576",
                 "--target", "250000"]) == 0
    out = capsys.readouterr().out
    assert "server" in out and "client" in out and "loopback" in out
    assert "first cap:" in out and "nf_conntrack_max" in out
    assert "everything this box shows allows 250,000" in out
    assert "conntrack_allowance_exceeded" in out.replace("\n      ", " ")


# --- manager_capacity_line ---------------------------------------------------------------------


def test_manager_capacity_line(tmp_path):
    line = manager_capacity_line(2, 20000, root=make_box(tmp_path))
    assert "\n" not in line
    assert line.startswith("capacity: open-file limit 20,000 per worker x 2 workers = 39,968 "
                           "connections (each worker keeps 16 fds for itself)")
    assert "the first cap on this box is open files per process at 39,968" in line
    assert "tuning/check.py" in line
    # When something else caps first, the line names it.
    line = manager_capacity_line(4, 1048576, root=make_box(tmp_path / "ct", conntrack=65536))
    assert "4,194,240 connections" in line and "nf_conntrack_max at 65,536" in line


def test_manager_capacity_line_never_raises(tmp_path):
    line = manager_capacity_line(2, 20000, root=str(tmp_path / "nothing-here"))
    assert "39,968 connections" in line and "could not read: fs.file-max" in line
    assert "unknown" in manager_capacity_line(2, -1)


# --- config files and apply.sh -----------------------------------------------------------------


def test_config_files_are_consistent():
    sysctl = {}
    for line in (ROOT / "tuning/sysctl.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.lstrip("-").partition("=")
            sysctl[key.strip()] = value.split()
    assert int(sysctl["fs.nr_open"][0]) >= 1048576
    assert int(sysctl["net.ipv4.tcp_mem"][2]) < 2**31  # pages, not bytes
    assert int(sysctl["vm.swappiness"][0]) > 0
    for key in ("fs.file-max", "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
                "net.netfilter.nf_conntrack_max", "net.ipv4.ip_local_port_range"):
        assert key in sysctl
    unit = (ROOT / "tuning/megacomet.service").read_text()
    nofile = int(unit.split("LimitNOFILE=")[1].split()[0])
    assert 1048576 <= nofile <= int(sysctl["fs.nr_open"][0])
    for needed in ("manager.py", "Restart=on-failure", "KillSignal=SIGTERM", "TimeoutStopSec="):
        assert needed in unit
    limits = (ROOT / "tuning/limits.conf").read_text()
    assert "root      hard   nofile  1048576" in limits


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_apply_sh_syntax_and_dry_run_touches_nothing(tmp_path):
    subprocess.run(["bash", "-n", str(APPLY)], check=True, timeout=10)
    etc = tmp_path / "etc"
    (etc / "sysctl.d").mkdir(parents=True)
    (etc / "systemd/system").mkdir(parents=True)
    proc_sys = Path(make_box(tmp_path / "box", file_max=100, tcp_mem=(1, 2, 3))) / "proc/sys"
    before = sorted(os.walk(tmp_path))
    env = dict(os.environ, MEGACOMET_ETC=str(etc), MEGACOMET_PROC_SYS=str(proc_sys))
    res = subprocess.run(["bash", str(APPLY), "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "fs.file-max: 100 -> 4194304" in out
    assert "net.ipv4.tcp_mem: 1 2 3 -> 1048576 1572864 2097152" in out
    assert "keep  fs.epoll.max_user_watches = 5491511" in out  # a higher maximum is kept
    assert "skip  net.netfilter.nf_conntrack_max" in out
    assert f"would write {etc}/systemd/system/megacomet.service" in out
    assert "dry run:" in out and "nothing written" in out
    assert sorted(os.walk(tmp_path)) == before
    assert (proc_sys / "fs/file-max").read_text() == "100\n"
    bad = subprocess.run(["bash", str(APPLY), "--bogus"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2


def test_conntrack_loaded_but_tracking_nothing_is_no_cap(tmp_path):
    """Loaded with no rule using it, conntrack tracks nothing (nf_conntrack_count 0): seen on
    the dev box, where 398,700 loopback connections went past nf_conntrack_max 262,144."""
    root = make_box(tmp_path, nofile=(1048576, 1048576), cpus=16, mem_gib=128,
                    file_max=4194304, ports=(10240, 65535), conntrack=65536)
    (tmp_path / "proc/sys/net/netfilter/nf_conntrack_count").write_text("0\n")
    report = build_report(read_box(root))
    assert rows(report)["net.netfilter.nf_conntrack_max"].server is None
    for side in ("server", "client", "loopback"):
        assert "conntrack" not in report.first_cap[side].limit, side


def test_tcp_mem_is_the_broadcast_reach_not_a_connection_cap(tmp_path):
    """A 16-core box held 10,000,000 idle polls under a tcp_mem max of 3,090,648 pages while
    check.py called that the first cap: tcp_mem bounds what one broadcast can queue replies on
    at once. The report says so apart, and how to raise it where tuning/apply.sh will keep it."""
    root = make_box(tmp_path, nofile=(1048576, 1048576), cpus=16, mem_gib=128,
                    file_max=33554432, nr_open=2097152, ports=(10240, 65535),
                    tcp_mem=(1030216, 2060432, 3090648), somaxconn=65535, epoll=33554432)
    report = build_report(read_box(root), workers=541, target=10_000_000)
    assert report.target_ok is True, report.short_of_target  # the connections fit
    assert report.broadcast_reach == {"pages": 3090648, "server": 3090648,
                                      "loopback": 1545324}
    text = format_report(report)
    assert "target 10,000,000 connections on the server side: yes" in text
    reach = text[text.index("broadcast reach:"):text.index("target 10,000,000")]
    assert "3,090,648 waiting sockets at once" in reach
    assert "at least 10,000,000" in " ".join(reach.split()) and "tuning/apply.sh" in reach


# --- comet and app ports inside the ephemeral range ---------------------------------------------


def test_port_lists_parse_and_merge():
    assert parse_port_list("8000-8127,9000\n") == ((8000, 8127), (9000, 9000))
    assert parse_port_list("\n") == () and parse_port_list("80-x") is None
    assert port_list_text([(9000, 9000), (8064, 8127), (8000, 8063), (5432, 5432)]) == \
        "5432,8000-8127,9000"
    assert port_list_text([(8000, 8010), (8005, 8006), (8011, 8011)]) == "8000-8011"


def exposed_warning(report) -> str:
    found = [w for w in report.warnings if "not reserved" in w]
    return found[0] if found else ""


def test_exposed_comet_and_app_ports_are_warned_about(tmp_path):
    """The reported box: ephemeral range 1024-20000, nothing reserved, and 14k TIME-WAIT
    sockets of another program holding port 8000 when the manager started."""
    root = make_box(tmp_path / "a", ports=(1024, 20000), reserved="")
    warning = exposed_warning(build_report(read_box(root), workers=4))
    assert warning.startswith("ports 8000-8003,9000 of the manager (comet ports --base-port "
                              "8000 + 4 workers, --app-port 9000) are inside "
                              "net.ipv4.ip_local_port_range 1024-20000 and not reserved")
    assert "TIME-WAIT" in warning and warning.endswith(
        "Set net.ipv4.ip_local_reserved_ports = 8000-8003,9000 in tuning/sysctl.conf, then "
        "tuning/apply.sh (or use ports outside the range)")
    # What the box reserves already stays in the advice; only the exposed ports are named.
    root = make_box(tmp_path / "b", ports=(1024, 20000), reserved="5432,8000-8001")
    warning = exposed_warning(build_report(read_box(root), workers=4))
    assert warning.startswith("ports 8002-8003,9000 of the manager")
    assert "ip_local_reserved_ports = 5432,8000-8003,9000 in" in warning
    # tuning/sysctl.conf's reservation covers the defaults; the default range misses them.
    for box in (dict(ports=(1024, 20000), reserved="8000-8127,9000"),
                dict(ports=(32768, 60999), reserved="")):
        root = make_box(tmp_path / str(len(os.listdir(tmp_path))), **box)
        assert exposed_warning(build_report(read_box(root), workers=4)) == "", box
    # Other ports, through the command line.
    root = make_box(tmp_path / "cli", ports=(32768, 60999), reserved="")
    r = subprocess.run([sys.executable, str(CHECK), "--root", root, "--workers", "2",
                        "--base-port", "40000", "--app-port", "9000"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "ports 40000-40001 of the manager" in " ".join(r.stdout.split())


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_apply_sh_adds_the_reserved_ports_to_the_boxs(tmp_path):
    """ip_local_reserved_ports is one list for the whole box: setting ours alone would drop
    another service's reservation."""
    key = "net.ipv4.ip_local_reserved_ports"
    for n, (live, said) in enumerate([
            ("5432", f"set   {key}: 5432 -> 5432,8000-8127,9000"),
            ("7000-9500", f"keep  {key} = 7000-9500 (already includes 8000-8127,9000)"),
            ("", f"set   {key}: (empty) -> 8000-8127,9000"),
            ("8000-8127,9000", f"ok    {key} = 8000-8127,9000")]):
        etc = tmp_path / f"etc{n}"
        (etc / "sysctl.d").mkdir(parents=True)
        proc_sys = Path(make_box(tmp_path / f"box{n}", reserved=live)) / "proc/sys"
        env = dict(os.environ, MEGACOMET_ETC=str(etc), MEGACOMET_PROC_SYS=str(proc_sys))
        res = subprocess.run(["bash", str(APPLY), "--dry-run"], env=env, capture_output=True,
                             text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        assert f"  {said}\n" in res.stdout, res.stdout
