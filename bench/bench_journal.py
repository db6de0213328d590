"""What the write-ahead journal costs, and how fast a crashed daemon comes back.

    python -m bench.bench_journal [--rounds 5] [--nodes 100000] [--rings 100] [--watches 1000]

Part 1, side by side in one run: our daemon with the journal (the default) and with
``--no-journal``, alternating A B A B for ``--rounds`` rounds: sequential WRITE round trip
(µs) and daemon CPU per WRITE (utime + stime from /proc/<pid>/stat over the workload), pipelined
WRITE throughput (1 connection x 64 in flight), and RSS after 20,000 distinct nodes.  Medians
and ratios of medians.

Part 2: recovery.  A daemon with ``--nodes`` nodes, ``--rings`` introduced guests holding
``--watches`` watches between them is killed with SIGKILL and started again with the same
command; the time from the new process's exec to its socket answering, and to every guest's
ring answering a READ, is reported with the state checked intact.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from xenstored import guest as guestlib
from xenstored.wire import Op

from .proto import Client, cpu_seconds, frame, hv_control, rss_bytes, z
from .workloads import seq_us

READ, WRITE, INTRODUCE, SET_PERMS = Op.READ, Op.WRITE, Op.INTRODUCE, Op.SET_PERMS


def start(rundir: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("XENSTORED_PATH", "FAKEXEN_DIR")}
    log = open(os.path.join(rundir, "daemon.log"), "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenstored", "-N", "--emulate", "--rundir", rundir, "--log-level", "warning", *extra],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    log.close()
    return proc


def wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        try:
            Client(path).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def cost_round(extra: tuple[str, ...], n_seq: int, n_pipe: int) -> dict[str, float]:
    rundir = tempfile.mkdtemp(prefix="xsbj", dir="/tmp")
    proc = start(rundir, *extra)
    sock = os.path.join(rundir, "socket")
    try:
        wait_socket(sock, proc)
        with Client(sock) as c:
            writes = [frame(WRITE, b"/j/w%d\0value-%d" % (i % 16, i)) for i in range(n_seq)]
            seq_us(c, writes[:500])
            cpu0 = cpu_seconds(proc.pid)
            us = seq_us(c, writes)
            cpu = (cpu_seconds(proc.pid) - cpu0) / n_seq * 1e6
            frames = [frame(WRITE, b"/j/p%d\0value-%d" % (i % 64, i)) for i in range(n_pipe)]
            c.pipeline(frames[:256], 64)
            t0 = time.perf_counter()
            c.pipeline(frames, 64)
            ops = n_pipe / (time.perf_counter() - t0)
            rss0 = rss_bytes(proc.pid)
            c.pipeline([frame(WRITE, b"/j/n/%d\0value" % i) for i in range(20000)], 64)
            rss = rss_bytes(proc.pid) - rss0
        return {"seq_write_us": us, "seq_write_cpu_us": cpu, "pipe_write_ops": ops, "rss_20k_nodes_kib": rss / 1024}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        subprocess.run(["rm", "-rf", rundir], check=False)


def part1(rounds: int, n_seq: int, n_pipe: int) -> None:
    results: dict[str, list[dict[str, float]]] = {"journal": [], "no journal": []}
    for _ in range(rounds):
        results["journal"].append(cost_round((), n_seq, n_pipe))
        results["no journal"].append(cost_round(("--no-journal",), n_seq, n_pipe))
    print(f"{'metric':<44}{'journal':>12}{'no journal':>12}{'ratio':>8}")
    for key, label in (
        ("seq_write_us", "sequential WRITE round trip (µs)"),
        ("seq_write_cpu_us", "daemon CPU per sequential WRITE (µs)"),
        ("pipe_write_ops", "pipelined WRITE, 1 conn x 64 (ops/s)"),
        ("rss_20k_nodes_kib", "RSS growth for 20,000 nodes (KiB)"),
    ):
        a = statistics.median(r[key] for r in results["journal"])
        b = statistics.median(r[key] for r in results["no journal"])
        print(f"{label:<44}{a:>12,.1f}{b:>12,.1f}{a / b:>8.2f}")


def part2(nodes: int, rings: int, watches: int) -> None:
    rundir = tempfile.mkdtemp(prefix="xsbr", dir="/tmp")
    sock = os.path.join(rundir, "socket")
    fx = os.path.join(rundir, "fx")
    proc = start(rundir)
    guests: list[guestlib.Guest] = []
    try:
        wait_socket(sock, proc)
        with Client(sock) as c:
            per_dir = 100
            c.pipeline([frame(WRITE, b"/scale/d%d/n%d\0value-%d" % (i // per_dir, i % per_dir, i)) for i in range(nodes)], 64)
            for k in range(rings):
                domid = 100 + k
                hv_control(fx, f"create {domid}")
                c.write(f"/local/domain/{domid}", "")
                c.call(SET_PERMS, z(f"/local/domain/{domid}", f"n{domid}"))
                c.call(INTRODUCE, z(str(domid), "1", "1"))
        per_guest = max(watches // rings, 1)
        for k in range(rings):
            g = guestlib.Guest(100 + k, fx, timeout=30)
            for w in range(per_guest):
                g.watch(f"data/w{w}", f"t{w}")
            while g.events:
                g.events.popleft()
            g.write("data/x", str(k))
            guests.append(g)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.perf_counter()
        proc = start(rundir)
        wait_socket(sock, proc)
        t_socket = time.perf_counter() - t0
        for k, g in enumerate(guests):
            assert g.read("data/x") == str(k).encode()
        t_rings = time.perf_counter() - t0
        with Client(sock) as c:
            assert c.read(f"/scale/d{(nodes - 1) // per_dir}/n{(nodes - 1) % per_dir}") == f"value-{nodes - 1}".encode()
        with open(os.path.join(rundir, "daemon.log")) as f:
            log = f.read()
        line = [ln for ln in log.splitlines() if "recovered from the journal" in ln][-1]
        print(f"recovery: {nodes:,} nodes, {rings} guest rings, {per_guest * rings:,} watches")
        print(f"  exec to socket answering: {t_socket:.3f} s")
        print(f"  exec to every ring answering: {t_rings:.3f} s")
        print(f"  daemon's own account: {line.split('journal in ', 1)[1]}")
    finally:
        for g in guests:
            g.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        subprocess.run(["rm", "-rf", rundir], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq", type=int, default=5000)
    ap.add_argument("--pipe", type=int, default=50000)
    ap.add_argument("--nodes", type=int, default=100000)
    ap.add_argument("--rings", type=int, default=100)
    ap.add_argument("--watches", type=int, default=1000)
    ap.add_argument("--only", choices=("cost", "recovery"))
    a = ap.parse_args()
    if a.only != "recovery":
        part1(a.rounds, a.seq, a.pipe)
    if a.only != "cost":
        part2(a.nodes, a.rings, a.watches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
