"""Live update and restart-with-persistence times for a big store.

Builds the state the issue names (100,000 nodes as 1,000 domains x 100, 1,000 watches over 100
connections), then measures:

* live update: ``xenstore-control live-update`` from request to ``OK`` (the new process has
  restored everything and answered), and that every connection still works afterwards;
* restart with persistence: SIGTERM (state written) to exit, and start until the socket answers
  with the whole store back.

Usage: python -m bench.bench_lifecycle [--nodes 100000] [--connections 100] [--watches 1000]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from xenstored.wire import Op, Parser, encode


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}


def start(rundir: str, *extra: str) -> tuple[subprocess.Popen[bytes], float]:
    sock = os.path.join(rundir, "socket")
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenstored", "-N", "--rundir", rundir, *extra],
        env=_env(),
        stdout=open(os.path.join(rundir, "daemon.log"), "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.close()
            return proc, time.perf_counter() - t
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"daemon died: see {rundir}/daemon.log") from None
            time.sleep(0.005)


class Raw:
    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.p = Parser()
        self.pending: list = []

    def pipeline(self, msgs: list[bytes]) -> int:
        """Send all, collect as many replies; returns the number of errors."""
        errors = 0
        window = 256
        sent = got = 0
        while got < len(msgs):
            while sent < len(msgs) and sent - got < window:
                self.s.sendall(msgs[sent])
                sent += 1
            for m in self.p.feed(self.s.recv(1 << 16)):
                if m.type == Op.WATCH_EVENT:
                    continue
                got += 1
                errors += m.type == Op.ERROR
        return errors

    def call(self, op: int, payload: bytes) -> bytes:
        self.s.sendall(encode(op, 1, 0, payload))
        while True:
            for m in self.p.feed(self.s.recv(1 << 16)):
                if m.type != Op.WATCH_EVENT:
                    return m.payload


def populate(sock: str, nodes: int, conns: int, watches: int) -> list[Raw]:
    d0 = Raw(sock)
    per = 100
    msgs = [
        encode(Op.WRITE, i, 0, f"/local/domain/{i // per + 1}/data/k{i % per}\0".encode() + b"v" * 16)
        for i in range(nodes)
    ]
    assert d0.pipeline(msgs) == 0
    clients = [Raw(sock) for _ in range(conns)]
    for n, c in enumerate(clients):
        wmsgs = [
            encode(Op.WATCH, j, 0, f"/local/domain/{(n * watches // conns + j) % (nodes // per) + 1}\0w{j}\0".encode())
            for j in range(watches // conns)
        ]
        assert c.pipeline(wmsgs) == 0
    clients.append(d0)
    return clients


def xenstore_control() -> str:
    for c in [os.environ.get("XENSTORE_CONTROL", ""), *sorted(glob.glob("/usr/lib/xen-*/bin/xenstore-control"))]:
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit("needs the real xenstore-control (tests/install-deps.sh)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--watches", type=int, default=1000)
    args = ap.parse_args()
    rundir = tempfile.mkdtemp(prefix="xsb", dir="/tmp")
    sock = os.path.join(rundir, "socket")
    try:
        proc, _ = start(rundir, "--persistent", "--persistent-interval", "0")
        t = time.perf_counter()
        clients = populate(sock, args.nodes, args.connections, args.watches)
        print(f"populate: {args.nodes} nodes, {args.watches} watches, {len(clients)} connections "
              f"in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        r = subprocess.run(
            [xenstore_control(), "live-update", "-c", (f"-m xenstored -N --rundir {rundir} --persistent "
             "--persistent-interval 0"), sys.executable],
            env=dict(_env(), XENSTORED_PATH=sock), capture_output=True, text=True, check=False,
        )
        lu = time.perf_counter() - t
        assert r.returncode == 0, r.stderr
        alive = sum(c.call(Op.READ, b"/local/domain/1/data/k0\0") == b"v" * 16 for c in clients)
        print(f"live update: {lu:.2f} s (request to OK), {alive}/{len(clients)} connections answer after")
        for c in clients:
            c.s.close()
        t = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(600)
        stop = time.perf_counter() - t
        proc, up = start(rundir, "--persistent", "--persistent-interval", "0")
        d0 = Raw(sock)
        t = time.perf_counter()
        names = d0.call(Op.DIRECTORY, b"/local/domain\0").split(b"\0")[:-1]
        ok = len(names) == args.nodes // 100 and d0.call(Op.READ, b"/local/domain/1/data/k5\0") == b"v" * 16
        print(f"restart with persistence: stop (state written) {stop:.2f} s, start until serving {up:.2f} s, "
              f"store intact: {ok}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(600)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


if __name__ == "__main__":
    main()
