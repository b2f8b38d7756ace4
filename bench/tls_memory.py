"""What an idle TLS connection costs, by where TLS ends: in a Python process, with the ssl
module (as a worker that spoke TLS itself would hold it), or in HAProxy in front of the
workers (tuning/haproxy.py). The figures behind README's "TLS in front (HAProxy)".

    .venv/bin/python bench/tls_memory.py [--conns 1000]

- python-ssl: a child process accepts --conns TLS connections (ssl.SSLContext.wrap_socket,
  server side, TLS 1.3, a self-signed RSA-2048 certificate made with openssl) and holds them,
  each with its handshake done and nothing to read; its RSS (VmRSS) before and after.
- haproxy: `manager.py --workers 1` behind haproxy on the configuration tuning/haproxy.py
  writes; --conns TLS long polls through it, all waiting (the app port's /stats); haproxy's
  RSS before and after, and the worker's, per connection.
bytes/conn = (after - before) / conns, after a warm-up of WARMUP connections (first-use
allocations: session cache, pools). Kernel memory (socket buffers) is in neither.
Needs haproxy and openssl (apt-get install -y haproxy openssl).
"""

import argparse
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Server, free_port_block, machine, machine_line, rss  # noqa: E402

WARMUP = 50
TIMEOUT = 60.0  # seconds for all connections to be waiting


def make_cert(d: Path) -> tuple:
    """(key, certificate, the two in one PEM for haproxy)."""
    key, crt, pem = d / "key.pem", d / "cert.pem", d / "haproxy.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    pem.write_bytes(crt.read_bytes() + key.read_bytes())
    return str(key), str(crt), str(pem)


def client(crt: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=crt)


def python_ssl(conns: int, key: str, crt: str) -> float:
    """Bytes of RSS per idle TLS connection in a Python process that ends TLS."""
    lsn = socket.create_server(("127.0.0.1", 0), backlog=conns + WARMUP)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server: accept, handshake, hold
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        held = [ctx.wrap_socket(lsn.accept()[0], server_side=True) for _ in range(WARMUP)]
        before = rss(os.getpid())
        held += [ctx.wrap_socket(lsn.accept()[0], server_side=True) for _ in range(conns)]
        os.write(w, b"%d %d" % (before, rss(os.getpid())))
        time.sleep(TIMEOUT)
        os._exit(0)
    ctx, port, held = client(crt), lsn.getsockname()[1], []
    try:
        for _ in range(WARMUP + conns):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT),
                                server_hostname="localhost")
            held.append(s)
        before, after = map(int, os.read(r, 100).split())
        return (after - before) / conns
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        for s in held:
            s.close()


def haproxy(conns: int, crt: str, pem: str, tmp: Path) -> tuple:
    """(haproxy's, the worker's) bytes of RSS per idle TLS long poll through haproxy."""
    server = Server("project")
    proxy = None
    held = []
    try:
        public = free_port_block(1)
        cfg = tmp / "haproxy.cfg"
        subprocess.run([sys.executable, str(ROOT / "tuning" / "haproxy.py"), "--workers", "1",
                        "--base-port", str(server.port), "--public-base-port", str(public),
                        "--cert", pem, "--bind", "127.0.0.1", "--maxconn", str(conns * 2),
                        "--source-ips", "1", "-o", str(cfg)], check=True)
        proxy = subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f",
                                  str(cfg)], stdout=subprocess.DEVNULL)
        ctx = client(crt)

        def poll(i: int) -> ssl.SSLSocket:
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", public), timeout=10),
                                server_hostname="localhost")
            s.sendall(b"GET /u%d.js HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % (i, public))
            return s

        deadline = time.monotonic() + 10
        while True:  # until haproxy listens
            try:
                held.append(poll(0))
                break
            except OSError:
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise RuntimeError("haproxy did not start") from None
                time.sleep(0.1)
        held += [poll(i) for i in range(1, WARMUP)]
        settle(server, WARMUP)
        before = rss(proxy.pid), rss(server.worker_pid)
        held += [poll(i) for i in range(WARMUP, WARMUP + conns)]
        settle(server, WARMUP + conns)
        after = rss(proxy.pid), rss(server.worker_pid)
        return (after[0] - before[0]) / conns, (after[1] - before[1]) / conns
    finally:
        for s in held:
            s.close()
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=10)
        server.close()


def settle(server: Server, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while server.waiting() < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {server.waiting()} of {n} polls waiting")
        time.sleep(0.1)
    time.sleep(0.5)  # the last reads and frees done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", type=int, default=1000, help="connections per case (default 1000)")
    args = p.parse_args(argv)
    for tool in ("openssl", "haproxy"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            print(f"tls_memory.py: {tool} is missing; install it with "
                  f"`apt-get install -y {tool}`", file=sys.stderr)
            return 2
    print(machine_line(machine()))
    with tempfile.TemporaryDirectory() as d:
        key, crt, pem = make_cert(Path(d))
        in_python = python_ssl(args.conns, key, crt)
        in_haproxy, in_worker = haproxy(args.conns, crt, pem, Path(d))
    print(f"python-ssl: {in_python:,.0f} B per idle TLS connection in the process ending TLS")
    print(f"haproxy:    {in_haproxy:,.0f} B per idle TLS long poll in haproxy, "
          f"{in_worker:,.0f} B in the worker behind it ({args.conns:,} connections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
