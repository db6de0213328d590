"""Where a sequential request's daemon CPU goes: the kernel's floor, trio's share, ours.

    python -m bench.bench_floor [--requests 5000] [--rounds 5] [--against-cmd 'CMD {rundir}']

One client sends READs one at a time (as libxl, xenbus and every ``xenstore-*`` tool do) to:

* ``raw``: a bare epoll server that answers without doing anything (bench/floor_server.py):
  the kernel's cost of a request (wakeup, ``epoll_wait``, ``recv``, ``send``), plus the least
  Python can add;
* ``oneshot``: the same, re-arming a one-shot epoll registration per request (trio's way);
* ``trio``: the same, waiting with ``trio.lowlevel.wait_readable`` (a task per connection, as
  our daemon did before the hub);
* ``hub``: the same, served by ``xenstored.hub`` as our daemon does now;
* ``ours``: our daemon, a real READ of a real node;
* the other daemon, if ``--against-cmd`` starts one.

Each is measured with client and daemon pinned to different CPUs (a cross-CPU wakeup per
message, as with a guest on its own vCPU) and to one CPU (a round trip is then both sides' CPU,
what a busy dom0 pays).  Reported per request: the daemon's CPU (its threads' run time from
``/proc/<pid>/task/*/schedstat``: utime + stime at nanosecond precision) and the round trip, medians over rounds that alternate the servers.
``trio - raw`` is what trio's wait costs; ``hub - raw`` what the hub costs; ``ours - hub`` is our
daemon's own work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from . import proto
from .daemons import start_cmd, start_ours
from .proto import READ, Client, frame, z
from .workloads import pinned_apart, pinned_together


class _Floor:
    """A floor server in a subprocess, with the attributes the measurement needs."""

    def __init__(self, kind: str) -> None:
        self.rundir = tempfile.mkdtemp(prefix="xsfl", dir="/tmp")
        self.socket = os.path.join(self.rundir, "socket")
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.floor_server", kind, self.socket])
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise RuntimeError(f"floor server {kind} did not start")
            time.sleep(0.01)
        self.pid = self._proc.pid

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait()


def _measure(d: object, n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    pid = d.pid  # type: ignore[attr-defined]
    with Client(d.socket) as c:  # type: ignore[attr-defined]
        c.write("/bench/floor", "some-value")
        frames = [frame(READ, z("/bench/floor"))] * n
        for name, pinning in (("apart", pinned_apart), ("one_cpu", pinned_together)):
            with pinning(pid):
                for f in frames[:300]:
                    c.send_frame(f)
                cpu0 = proto.cpu_seconds(pid)
                t0 = time.perf_counter()
                for f in frames:
                    c.send_frame(f)
                rt = time.perf_counter() - t0
                out[f"{name}_cpu_us"] = (proto.cpu_seconds(pid) - cpu0) / n * 1e6
                out[f"{name}_rt_us"] = rt / n * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--against-cmd", help="starts the other daemon; {rundir} is replaced")
    ap.add_argument("--label", default="C")
    args = ap.parse_args()

    kinds = ["raw", "oneshot", "trio", "hub", "ours"] + ([args.label] if args.against_cmd else [])
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            if kind in ("raw", "oneshot", "trio", "hub"):
                d: object = _Floor(kind)
            elif kind == "ours":
                d = start_ours()
            else:
                d = start_cmd(args.against_cmd, kind)
            try:
                results[kind].append(_measure(d, args.requests))
            finally:
                d.stop()  # type: ignore[attr-defined]

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    keys = ("apart_cpu_us", "apart_rt_us", "one_cpu_cpu_us", "one_cpu_rt_us")
    titles = ("CPU/req, 2 CPUs", "round trip, 2 CPUs", "CPU/req, 1 CPU", "round trip, 1 CPU")
    print(f"sequential READ, {args.requests} requests x {args.rounds} rounds, medians (µs)")
    print(f"{'server':<8}" + "".join(f"{t:>20}" for t in titles))
    for kind in kinds:
        print(f"{kind:<8}" + "".join(f"{med(kind, k):>20.1f}" for k in keys))
    print()
    print("shares of our daemon CPU per request (2 CPUs / 1 CPU):")
    for label, lo, hi in (("kernel + minimal Python (raw)", None, "raw"),
                          ("re-arming per wait (oneshot - raw)", "raw", "oneshot"),
                          ("trio's scheduler (trio - oneshot)", "oneshot", "trio"),
                          ("the hub instead (hub - raw)", "raw", "hub"),
                          ("our daemon's own work (ours - hub)", "hub", "ours")):
        parts = []
        for k in ("apart_cpu_us", "one_cpu_cpu_us"):
            v = med(hi, k) - (med(lo, k) if lo else 0.0)
            parts.append(f"{v:6.1f}")
        print(f"  {label:<40} {' / '.join(parts)}")
    if args.against_cmd:
        for k, t in zip(keys, titles):
            print(f"  ours / {args.label}, {t}: {med('ours', k) / med(args.label, k):.2f}x")


if __name__ == "__main__":
    main()
