"""Socket throughput/latency benchmark: sequential and pipelined READ and WRITE.

Usage::

    python -m bench.bench_socket                 # starts its own daemon in a temp rundir
    python -m bench.bench_socket --socket PATH   # any running XenStore daemon (ours or upstream)

The client is a minimal raw-socket loop (struct + one buffer) rather than the project's client
library, so that the figures measure the daemon and are comparable across daemons: the same
client drives every daemon.  Sequential rows are round-trip latency (client cost included, so
compare them only against the same client); pipelined rows keep ``--depth`` requests in flight,
which is what a busy toolstack or a guest's xenbus does, and measure daemon throughput.
Each figure is the median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HEADER = struct.Struct("=IIII")
XS_READ = 2
XS_WRITE = 11
XS_ERROR = 16


class RawClient:
    """Blocking socket; frames are prebuilt so the loop costs as little client time as possible."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _take_replies(self) -> int:
        """Cut complete replies off the buffer; returns how many, failing on an ERROR reply."""
        buf = self.buf
        pos = 0
        n = 0
        while len(buf) - pos >= 16:
            type_, _rid, _tx, length = HEADER.unpack_from(buf, pos)
            end = pos + 16 + length
            if end > len(buf):
                break
            if type_ == XS_ERROR:
                raise RuntimeError(f"daemon error: {bytes(buf[pos + 16 : end])!r}")
            pos = end
            n += 1
        if pos:
            del buf[:pos]
        return n

    def _recv(self) -> int:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("daemon closed the connection")
        self.buf += data
        return self._take_replies()

    def sequential(self, frames: list[bytes]) -> None:
        send = self.sock.sendall
        for f in frames:
            send(f)
            while not self._recv():
                pass

    def pipelined(self, frames: list[bytes], depth: int) -> None:
        total = len(frames)
        sent = min(depth, total)
        self.sock.sendall(b"".join(frames[:sent]))
        done = 0
        while done < total:
            got = self._recv()
            done += got
            if got and sent < total:
                nxt = min(total, sent + got)
                self.sock.sendall(b"".join(frames[sent:nxt]))
                sent = nxt


def frame(op: int, req_id: int, payload: bytes) -> bytes:
    return HEADER.pack(op, req_id, 0, len(payload)) + payload


def read_frames(n: int) -> list[bytes]:
    return [frame(XS_READ, i + 1, b"/bench/r\0") for i in range(n)]


def write_frames(n: int) -> list[bytes]:
    return [frame(XS_WRITE, i + 1, b"/bench/w/%d\0value-%d" % (i % 64, i)) for i in range(n)]


def start_daemon() -> tuple[subprocess.Popen[bytes], str, str]:
    rundir = tempfile.mkdtemp(prefix="xsb", dir="/tmp")
    path = os.path.join(rundir, "socket")
    env = {k: v for k, v in os.environ.items() if k not in ("XENSTORED_PATH", "XENSTORED_RUNDIR")}
    log = open(os.path.join(rundir, "daemon.log"), "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenstored", "-N", "--rundir", rundir, "--log-level", "warning"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited early; see {rundir}/daemon.log")
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.close()
            return proc, rundir, path
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("daemon did not start within 10 s") from None
            time.sleep(0.02)


def stop_daemon(proc: subprocess.Popen[bytes], rundir: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(rundir, ignore_errors=True)


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_bench(path: str, n_seq: int, n_pipe: int, depth: int, runs: int) -> list[dict[str, object]]:
    c = RawClient(path)
    try:
        c.sequential([frame(XS_WRITE, 1, b"/bench/r\0some-value")])
        c.pipelined(write_frames(256), depth)  # warm up: creates the write targets
        rows = []
        cases = [
            ("READ", "sequential", read_frames(n_seq), lambda fr: c.sequential(fr)),
            ("WRITE", "sequential", write_frames(n_seq), lambda fr: c.sequential(fr)),
            ("READ", f"pipelined x{depth}", read_frames(n_pipe), lambda fr: c.pipelined(fr, depth)),
            ("WRITE", f"pipelined x{depth}", write_frames(n_pipe), lambda fr: c.pipelined(fr, depth)),
        ]
        for op, mode, frames, fn in cases:
            times = [timed(lambda fn=fn, frames=frames: fn(frames)) for _ in range(runs)]
            med = statistics.median(times)
            n = len(frames)
            rows.append(
                {
                    "op": op,
                    "mode": mode,
                    "n": n,
                    "us_per_op": med / n * 1e6,
                    "ops_per_s": n / med,
                    "spread_pct": (max(times) - min(times)) / med * 100,
                }
            )
        return rows
    finally:
        c.close()


def print_table(rows: list[dict[str, object]], label: str) -> None:
    print(f"daemon: {label}")
    print(f"{'op':<6} {'mode':<14} {'n':>7} {'us/op':>9} {'ops/s':>10} {'spread':>7}")
    for r in rows:
        print(
            f"{r['op']:<6} {r['mode']:<14} {r['n']:>7} {r['us_per_op']:>9.1f} "
            f"{r['ops_per_s']:>10.0f} {r['spread_pct']:>6.0f}%"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", help="benchmark a running daemon at this socket instead of starting one")
    p.add_argument("-n", "--sequential", type=int, default=5000, help="requests per sequential run")
    p.add_argument("-p", "--pipelined", type=int, default=20000, help="requests per pipelined run")
    p.add_argument("--depth", type=int, default=64, help="requests in flight when pipelined")
    p.add_argument("--runs", type=int, default=5, help="runs per figure (the median is reported)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    proc = None
    if args.socket:
        path, label = args.socket, args.socket
    else:
        proc, rundir, path = start_daemon()
        label = f"xenstored (python, pid {proc.pid})"
    try:
        rows = run_bench(path, args.sequential, args.pipelined, args.depth, args.runs)
    finally:
        if proc is not None:
            stop_daemon(proc, rundir)
    if args.json:
        print(json.dumps({"daemon": label, "rows": rows}, indent=2))
    else:
        print_table(rows, label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
