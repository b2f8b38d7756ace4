"""Rough edges a new user hit: README examples that end, option errors that say what is
expected, bind errors that name the likely cause, and worker deaths told as they happened."""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, free_port_block
from test_comet import wait_until

import manager
from tuning.check import exposed_ports, port_clash_hint, read_box

README = (ROOT / "README.md").read_text()


def run(prog: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / prog), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=10)


# ---------------------------------------------------------------------------------------------
# The README's JSON-lines example
# ---------------------------------------------------------------------------------------------


def readme_block_after(marker: str) -> str:
    """The first ```sh block after `marker` in the README, as a shell command."""
    rest = README[README.index(marker):]
    start = rest.index("```sh\n") + len("```sh\n")
    return rest[start:rest.index("```", start)]


def test_the_readme_json_lines_example_prints_the_replies_and_ends(manager):
    block = readme_block_after("**JSON lines**")
    assert "9000" in block and "curl" not in block, block
    r = subprocess.run(["bash", "-c", block.replace("9000", str(manager.app_port))],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith('{"ok": true, "mid": ') for line in lines), \
        r.stdout


# ---------------------------------------------------------------------------------------------
# Option errors: what is expected, through the real command lines
# ---------------------------------------------------------------------------------------------

WORKER = ["--worker", "0", "--workers", "1"]


@pytest.mark.parametrize("prog, args, message", [
    # options.py, shared: positive_int, non_negative_int, positive_float, non_negative, port
    ("manager.py", ["--workers", "abc"],
     "argument --workers: expected a whole number 1 or more, got 'abc'"),
    ("manager.py", ["--workers", "1.5"],
     "argument --workers: expected a whole number 1 or more, got '1.5'"),
    ("manager.py", ["--queue-max", "0"],
     "argument --queue-max: expected a whole number 1 or more, got '0'"),
    ("manager.py", ["--header-timeout", "0"],
     "argument --header-timeout: expected a number more than 0, got '0'"),
    ("manager.py", ["--poll-timeout", "soon"],
     "argument --poll-timeout: expected a number 0 or more, got 'soon'"),
    ("manager.py", ["--keepalive=-1"],
     "argument --keepalive: expected a number 0 or more, got '-1'"),
    ("manager.py", ["--queue-ttl", "nan"],
     "argument --queue-ttl: expected a finite number, got 'nan'"),
    ("manager.py", ["--base-port", "http"],
     "argument --base-port: expected a port number 1-65535, got 'http'"),
    ("manager.py", ["--app-port", "0"],
     "argument --app-port: expected a port number 1-65535, got '0'"),
    # token, header_value
    ("manager.py", ["--app-token", ""],
     "argument --app-token: expected a token of visible ASCII characters (no spaces), got ''"),
    ("manager.py", ["--app-token", "  "], "argument --app-token: expected a token"),
    ("manager.py", ["--app-token", "two words"], "argument --app-token: expected a token"),
    ("manager.py", ["--app-token", "caf\u00e9"], "argument --app-token: expected a token"),
    ("manager.py", ["--cors-origin", "*\r\nSet-Cookie: x=1"],
     "argument --cors-origin: expected an HTTP header value of visible ASCII characters"),
    ("manager.py", ["--cors-origin", ""], "argument --cors-origin: expected an HTTP header"),
    # parse-time port plans ({B}: a free port block)
    ("manager.py", ["--workers", "3", "--base-port", "{B}", "--app-port", "{B+1}"],
     "--app-port {B+1} is one of the comet ports {B}-{B+2} (--base-port {B} + --workers 3, "
     "worker 1 listens there): pick an app port outside them"),
    ("manager.py", ["--workers", "2", "--base-port", "{B}", "--app-port", "{B+1}",
                    "--host", "127.0.0.1", "--app-host", "0.0.0.0"],
     "--app-port {B+1} is one of the comet ports {B}-{B+1}"),
    ("manager.py", ["--workers", "100", "--base-port", "65500"],
     "--base-port 65500 + --workers 100 runs past port 65535 (the last worker would listen on "
     "65599)"),
    # client.py: the same checks, imported
    ("client.py", ["x", "127.0.0.1", "--rate", "abc"],
     "argument --rate: expected a number 0 or more, got 'abc'"),
    ("client.py", ["x", "127.0.0.1", "--conns", "many"],
     "argument --conns: expected a whole number 1 or more, got 'many'"),
    ("client.py", ["x", "127.0.0.1", "--send", "1.5"],
     "argument --send: expected a whole number 0 or more, got '1.5'"),
    ("client.py", ["x", "127.0.0.1", "--connect-timeout", "0"],
     "argument --connect-timeout: expected a number more than 0, got '0'"),
    ("client.py", ["x", "127.0.0.1", "--base-port", "65536"],
     "argument --base-port: expected a port number 1-65535, got '65536'"),
    # server.py (started by the manager, but its own command line all the same)
    ("server.py", ["--worker", "0", "--workers", "abc"],
     "argument --workers: expected a whole number 1 or more, got 'abc'"),
    ("server.py", ["--worker", "-1", "--workers", "1"],
     "argument --worker: expected a whole number 0 or more, got '-1'"),
    ("server.py", [*WORKER, "--listen-fd", "x"],
     "argument --listen-fd: expected a whole number 0 or more, got 'x'"),
    ("server.py", [*WORKER, "--cors-origin", "a\nb"], "argument --cors-origin: expected"),
    # tuning/check.py keeps its own two (it runs as a script), worded alike
    ("tuning/check.py", ["--workers", "abc"],
     "argument --workers: expected a whole number 1 or more, got 'abc'"),
    ("tuning/check.py", ["--app-port", "0"],
     "argument --app-port: expected a port number 1-65535, got '0'"),
])
def test_an_option_error_says_what_is_expected(prog, args, message):
    base = free_port_block(4)
    fill = lambda text: text.replace("{B}", str(base)).replace(  # noqa: E731
        "{B+1}", str(base + 1)).replace("{B+2}", str(base + 2))
    args, message = [fill(a) for a in args], fill(message)
    if prog == "manager.py":  # were a check missing, it would start here, not on 8000/9000
        args = ["--host", "127.0.0.1", "--workers", "1", "--base-port", str(base + 2),
                "--app-port", str(base + 3), "--status-interval", "0", *args]
    r = run(prog, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"{prog.split('/')[-1]}: error: ") and message in last, r.stderr
    assert " value: " not in last  # argparse's "invalid positive_int value: 'abc'"
    assert "Traceback" not in r.stderr


def test_the_reported_app_port_inside_the_comet_range(capsys):
    """--workers 500 --base-port 18500 --app-port 18600 failed with a bare bind error."""
    with pytest.raises(SystemExit) as e:
        manager.parse_args(["--workers", "500", "--base-port", "18500", "--app-port", "18600"])
    assert e.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith(
        ": error: --app-port 18600 is one of the comet ports 18500-18999 (--base-port "
        "18500 + --workers 500, worker 100 listens there): pick an app port outside them")
    # Not an overlap: the same number on two other addresses is two different sockets.
    opts = manager.parse_args(["--workers", "500", "--base-port", "18500", "--app-port",
                               "18600", "--host", "127.0.0.2", "--app-host", "127.0.0.1"])
    assert opts.app_port == 18600
    assert manager.parse_args(["--app-token", "s3cr3t-~+/="]).app_token == "s3cr3t-~+/="
    assert manager.parse_args(["--cors-origin", "https://a.example"]).cors_origin == \
        "https://a.example"


# ---------------------------------------------------------------------------------------------
# Bind errors: one wording, and the ephemeral-range cause named
# ---------------------------------------------------------------------------------------------

BIND_LINE = re.compile(
    r"megacomet: cannot listen on (comet|app) port 127\.0\.0\.1:(\d+) \((--host, --base-port|"
    r"--app-host, --app-port)\): Address already in use; is another server running there\?"
    r"( Or: port \d+ is inside net\.ipv4\.ip_local_port_range .*)?")


def second_manager(base: int, app: int) -> subprocess.CompletedProcess:
    return run("manager.py", "--host", "127.0.0.1", "--workers", "2", "--base-port", str(base),
               "--app-port", str(app), "--status-interval", "0")


def listener_on(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_the_comet_and_app_port_bind_errors_are_worded_alike():
    base = free_port_block(4)
    with listener_on(base + 3):
        comet = second_manager(base + 2, base + 1)     # worker 1's port is taken
        app = second_manager(base, base + 3)           # the app port is taken
    lines = []
    for r, kind, flags in ((comet, "comet", "--host, --base-port"),
                           (app, "app", "--app-host, --app-port")):
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line
        m = BIND_LINE.fullmatch(line)
        assert m and m.group(1) == kind and m.group(2) == str(base + 3) and m.group(3) == flags, \
            line
        lines.append(line.split(" Or: ")[0].replace(f"{kind} port", "X").replace(flags, "F"))
    assert lines[0] == lines[1]  # word for word, but for which port and which options


def test_a_port_held_by_a_time_wait_socket_is_named_as_the_likely_cause():
    """Nothing listens on the port: a closed outgoing connection from it sits in TIME-WAIT,
    as 14k of a load test's did on port 8000 when the ephemeral range began at 1024."""
    base = free_port_block(3)
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        out = socket.socket()
        out.bind(("127.0.0.1", base))           # as connect() picks it from the range
        out.connect(lsock.getsockname())
        peer, _ = lsock.accept()
        out.close()                             # the side that closes first keeps TIME-WAIT
        peer.recv(1)
        peer.close()
    r = second_manager(base, base + 2)
    line = r.stderr.strip()
    assert r.returncode == 1 and BIND_LINE.fullmatch(line), line
    # The cause is named exactly when this box's ranges make it possible (no sysctl changes).
    box = read_box("/")
    if exposed_ports(box, [base]):
        lo, hi = box.port_range
        assert f" Or: port {base} is inside net.ipv4.ip_local_port_range {lo}-{hi}" in line
        assert "TIME-WAIT" in line and f"`ss -tan 'sport = :{base}'`" in line
        assert "net.ipv4.ip_local_reserved_ports = " in line and "tuning/sysctl.conf" in line
        assert f"{base}-{base + 2}" in line    # all three of its ports, to reserve together
    else:
        assert " Or: " not in line


def fake_proc(root, port_range: str, reserved: str | None):
    sys_ = root / "proc/sys/net/ipv4"
    sys_.mkdir(parents=True)
    (sys_ / "ip_local_port_range").write_text(port_range)
    if reserved is not None:
        (sys_ / "ip_local_reserved_ports").write_text(reserved)
    return str(root)


def test_port_clash_hint_on_fake_boxes(tmp_path):
    # The reported box: range 1024-20000, nothing reserved.
    root = fake_proc(tmp_path / "a", "1024\t20000\n", "\n")
    hint = port_clash_hint(8000, [8000, 8001, 9000], root=root)
    assert hint.startswith("port 8000 is inside net.ipv4.ip_local_port_range 1024-20000, ")
    assert hint.endswith("net.ipv4.ip_local_reserved_ports = 8000-8001,9000 in "
                         "tuning/sysctl.conf, then tuning/apply.sh (or use ports outside the "
                         "range)")
    # What the box reserves already is kept in the advice.
    root = fake_proc(tmp_path / "b", "1024\t20000\n", "5432\n")
    assert "ip_local_reserved_ports = 5432,8000,9000 in" in port_clash_hint(8000, [9000],
                                                                             root=root)
    # Reserved, or outside the range, or unreadable: no hint.
    root = fake_proc(tmp_path / "c", "1024\t20000\n", "8000-8127,9000\n")
    assert port_clash_hint(8000, root=root) == ""
    root = fake_proc(tmp_path / "d", "32768\t60999\n", None)
    assert port_clash_hint(8000, root=root) == ""
    assert port_clash_hint(8000, root=str(tmp_path / "nothing")) == ""


# ---------------------------------------------------------------------------------------------
# How a worker died
# ---------------------------------------------------------------------------------------------


def killed(sig: int) -> int:
    """A wait status for a process killed by sig."""
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), sig)
        os._exit(99)
    return os.waitpid(pid, 0)[1]


def test_describe_exit_says_out_of_memory_only_with_a_reason():
    status = killed(signal.SIGKILL)
    assert manager.describe_exit(status) == "killed by SIGKILL"
    assert manager.describe_exit(status, by_watchdog=True) == \
        "killed by SIGKILL from the watchdog (--worker-timeout)"
    assert manager.describe_exit(status, oom_kills=2) == (
        "killed by SIGKILL (out of memory? the kernel's OOM killer killed 2 processes "
        "meanwhile: see dmesg)")
    assert manager.describe_exit(killed(signal.SIGTERM), oom_kills=2) == "killed by SIGTERM"


def test_oom_kill_count_reads_vmstat(tmp_path):
    f = tmp_path / "vmstat"
    f.write_text("nr_free_pages 1\noom_kill 7\nnr_zone_x 2\n")
    assert manager.oom_kill_count(str(f)) == 7
    f.write_text("nr_free_pages 1\n")
    assert manager.oom_kill_count(str(f)) is None
    assert manager.oom_kill_count(str(tmp_path / "missing")) is None


def worker_pids(m) -> list:
    return [w["pid"] for w in m.stats()["workers"]]


def test_a_hand_sent_sigkill_is_logged_as_such(manager_factory):
    m = manager_factory("--worker-timeout", "1")
    oom0 = manager.oom_kill_count()
    old = worker_pids(m)
    os.kill(old[0], signal.SIGKILL)
    wait_until(lambda: worker_pids(m)[0] not in (None, old[0]), timeout=5, what="restart")
    os.kill(old[1], signal.SIGSTOP)            # left for the watchdog
    wait_until(lambda: worker_pids(m)[1] not in (None, old[1]), timeout=10,
               what="watchdog restart")
    oom_meanwhile = manager.oom_kill_count() != oom0
    m.stop()
    log = m.output
    by_hand = re.search(rf"worker 0 \(pid {old[0]}, cpu \d+\) killed by SIGKILL(.*)", log)
    assert by_hand, log
    if not oom_meanwhile:
        assert by_hand.group(1) == "", by_hand.group(0)
    assert re.search(rf"worker 1 \(pid {old[1]}, cpu \d+\) killed by SIGKILL from the "
                     r"watchdog \(--worker-timeout\)", log), log
    assert "out of memory, or the watchdog" not in log


def test_readme_shows_the_new_words():
    assert "curl -s telnet://" not in README
    assert "argument --workers: expected a whole number 1 or more, got 'abc'" in README
    assert "cannot listen on comet port 0.0.0.0:8000 (--host, --base-port)" in README
