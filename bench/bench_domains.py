"""Many guest domains at once, each bringing up a virtual block device through the daemon.

    python -m bench.bench_domains                       # 1000 domains (and 10, 100 first), ours
    python -m bench.bench_domains --domains 200 --levels 10,200
    python -m bench.bench_domains --against-cmd 'start-other-daemon {rundir}' --label C
    python -m bench.bench_domains --json out.json

For each level N (default 10, 100, 1000) a wave of N emulated domains is created and introduced
by the toolstack (libxl's layout, from tests/guests/xenbus.py) and connected: a few blkfront
processes (tests/guests/blkfront.py, each multiplexing many domains over their own rings) and one
or a few blkback processes (tests/guests/blkback.py, dom0 over the socket) run the whole vbd
handshake, driven by watches only.  With the N domains connected it measures:

* the wave's time (toolstack + handshake until every frontend is Connected) and its errors
  (driver error lines, non-zero exits, and any device not Connected on both sides: must be 0);
* the daemon's RSS (VmRSS) and CPU time (utime + stime) spent on the wave;
* one more guest's sequential READ latency, against the same figure with no other domain;
* introducing (XS_INTRODUCE) and releasing (XS_RELEASE) one more domain, per domain, which should
  not depend on N;
* then the hot-unplug of every device (online=0, Closing, to Closed on both sides, removal) and
  the release of every domain.

Figures are wall-clock on whatever machine runs this; on a shared machine they are indicative.
The daemon under test may be another one (``--against-cmd``, as ``python -m bench``): it must
serve the fakexen emulation in ``<rundir>/fx``; a wave it cannot complete is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from xenstored.client import SyncClient
from xenstored.guest import Guest
from xenstored.wire import Op

from . import daemons
from .daemons import Daemon, Spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUESTS = os.path.join(ROOT, "tests", "guests")
sys.path.insert(0, GUESTS)

from xenbus import (
    State,
    backend_path,
    domain_destroy,
    domain_make,
    frontend_path,
    hypervisor,
    read_state,
    vbd_add,
    vbd_destroy,
    vbd_remove_start,
)

perf = time.perf_counter
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def toolstack(sock: str, patience: float = 10.0) -> SyncClient:
    """dom0's connection; a connect refused with EAGAIN (C xenstored's small listen backlog,
    right after start) is tried again."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return SyncClient(sock, timeout=60.0)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Driver:
    """One driver process; its JSON stdout lines go to a queue shared by the wave."""

    def __init__(self, sock: str, fx: str, script: str, args: list[str], out: queue.Queue[Any]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("XENSTORED_PATH", "FAKEXEN_DIR")}
        env.update(XENSTORED_PATH=sock, FAKEXEN_DIR=fx, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.name = f"{script} {' '.join(args)}"
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(GUESTS, script), *args],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.out = out
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.out.put((self, json.loads(line)))
            except ValueError:
                self.out.put((self, {"error": f"bad line {line!r}"}))
        self.out.put((self, {"eof": True}))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _ranges(domids: list[int]) -> str:
    """[3, 4, 5, 9] -> "3-5,9": a short command line for hundreds of domains."""
    out: list[str] = []
    start = prev = domids[0]
    for d in domids[1:] + [None]:  # type: ignore[list-item]
        if d is not None and d == prev + 1:
            prev = d
            continue
        out.append(f"{start}-{prev}" if prev != start else str(start))
        if d is not None:
            start = prev = d
    return ",".join(out)


@dataclass
class Wave:
    """N domains with a vbd each, from creation to Connected and back to nothing."""

    sock: str
    fx: str
    domids: list[int]
    frontends: int = 4
    backends: int = 1
    timeout: float = 600.0
    out: queue.Queue[Any] = field(default_factory=queue.Queue)
    drivers: list[Driver] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    connected: int = 0
    both_connected: int = 0

    def _spawn(self, script: str, *args: str) -> Driver:
        d = Driver(self.sock, self.fx, script, list(args), self.out)
        self.drivers.append(d)
        return d

    def _until(self, what: str, done: Any) -> None:
        """Consume driver lines until ``done(driver, line)`` says so; errors are collected."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                drv, line = self.out.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{what}: not done within {self.timeout} s") from None
            if "error" in line:
                self.errors.append(f"{drv.name}: {line}")
            if line.get("eof") and drv.proc.wait() != 0:
                self.errors.append(f"{drv.name} exited {drv.proc.returncode}: {drv.proc.stderr.read()[-2000:]}")
            if done(drv, line):
                return

    def connect(self) -> None:
        """Backends up, then the toolstack builds domains chunk by chunk; each chunk's frontend
        process starts (the guests boot) as soon as its domains exist, and all connect."""
        for k in range(self.backends):
            self._spawn("blkback.py", "--shard", f"{k}/{self.backends}")
        ready = 0

        def backends_ready(drv: Driver, line: dict[str, Any]) -> bool:
            nonlocal ready
            ready += bool(line.get("ready"))
            return ready == self.backends

        self._until("backends ready", backends_ready)
        n = len(self.domids)
        chunks = [self.domids[i * n // self.frontends : (i + 1) * n // self.frontends] for i in range(self.frontends)]
        t0 = perf()
        with toolstack(self.sock) as c:
            for chunk in chunks:
                if not chunk:
                    continue
                for domid in chunk:
                    domain_make(c, self.fx, domid)
                    vbd_add(c, domid)
                self._spawn("blkfront.py", _ranges(chunk), "--exit-when-unplugged")
            self.times["toolstack_s"] = perf() - t0
            connected: set[int] = set()

            def all_connected(drv: Driver, line: dict[str, Any]) -> bool:
                if line.get("state") == State.CONNECTED and drv.name.startswith("blkfront"):
                    connected.add(line["dom"])
                return len(connected) == n or bool(line.get("eof"))

            self._until("all connected", all_connected)
            self.times["connect_s"] = perf() - t0
            self.connected = len(connected)
            # Both halves of every device, as the store has them.
            self.both_connected = 0
            for domid in self.domids:
                states = (read_state(c, frontend_path(domid)), read_state(c, backend_path(domid)))
                if states == (State.CONNECTED, State.CONNECTED):
                    self.both_connected += 1
                else:
                    self.errors.append(f"dom{domid}: frontend, backend states {states}")

    def disconnect(self) -> None:
        """libxl's hot-unplug of every device, then every domain released and destroyed."""
        n = len(self.domids)
        t0 = perf()
        with toolstack(self.sock) as c:
            for domid in self.domids:
                vbd_remove_start(c, domid)
            closed: set[int] = set()

            def all_closed(drv: Driver, line: dict[str, Any]) -> bool:
                if line.get("state") == State.CLOSED and drv.name.startswith("blkback"):
                    closed.add(line["dom"])
                return len(closed) == n

            self._until("backends closed", all_closed)
            for domid in self.domids:
                if read_state(c, frontend_path(domid)) != State.CLOSED:
                    self.errors.append(f"dom{domid}: frontend not Closed after unplug")
                vbd_destroy(c, domid)
            self.times["unplug_s"] = perf() - t0
            exited = 0

            def frontends_exited(drv: Driver, line: dict[str, Any]) -> bool:
                nonlocal exited
                exited += bool(line.get("eof"))
                return exited == self.frontends

            self._until("frontends exited", frontends_exited)
            t1 = perf()
            for domid in self.domids:
                domain_destroy(c, self.fx, domid)
            self.times["destroy_per_domain_ms"] = (perf() - t1) / n * 1e3
        for d in self.drivers:
            d.stop()

    def close(self) -> None:
        for d in self.drivers:
            d.stop()


def read_latency_us(g: Guest, n: int) -> tuple[float, float]:
    """Median and mean of ``n`` sequential READs of the guest's own node, in microseconds."""
    path = f"/local/domain/{g.domid}/data/x".encode() + b"\0"
    for _ in range(min(200, n)):
        g.request(Op.READ, path)
    lat = []
    for _ in range(n):
        t = perf()
        g.request(Op.READ, path)
        lat.append(perf() - t)
    return statistics.median(lat) * 1e6, statistics.fmean(lat) * 1e6


def intro_release_us(c: SyncClient, fx: str, first: int, cycles: int) -> dict[str, float]:
    """One more domain introduced and released, ``cycles`` times: medians of the two requests
    alone and of the toolstack's whole make/introduce and release/destroy, per domain."""
    intro, release, make, destroy = [], [], [], []
    for domid in range(first, first + cycles):
        t0 = perf()
        domain_make(c, fx, domid, introduce=False)
        t1 = perf()
        c.request(Op.INTRODUCE, f"{domid}\0{domid}\0{1}\0".encode())
        t2 = perf()
        c.request(Op.RELEASE, f"{domid}\0".encode())
        t3 = perf()
        domain_destroy(c, fx, domid, release=False)
        t4 = perf()
        intro.append(t2 - t1)
        release.append(t3 - t2)
        make.append(t2 - t0)
        destroy.append(t4 - t2)
    med = statistics.median
    return {
        "introduce_us": med(intro) * 1e6,
        "release_us": med(release) * 1e6,
        "make_and_introduce_us": med(make) * 1e6,
        "release_and_destroy_us": med(destroy) * 1e6,
    }


def run_wave(
    sock: str, fx: str, domids: list[int], *, frontends: int = 4, backends: int = 1, timeout: float = 600.0,
    measure: Any = None,
) -> dict[str, Any]:
    """Connect ``domids``, call ``measure()`` while they are connected, tear down; the report.

    ``errors`` must be 0 and ``connected`` (frontends that reported Connected) and
    ``both_connected`` (devices Connected on both sides in the store) must equal ``domains``.
    """
    w = Wave(sock, fx, domids, frontends=min(frontends, len(domids)), backends=backends, timeout=timeout)
    report: dict[str, Any] = {"domains": len(domids)}
    try:
        w.connect()
        report["connected"] = w.connected
        report["both_connected"] = w.both_connected
        if measure is not None:
            report.update(measure())
        w.disconnect()
    except (TimeoutError, OSError, RuntimeError) as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        w.errors.append(f"wave aborted: {e!r} at {os.path.basename(where.filename)}:{where.lineno} {where.line}")
    finally:
        w.close()
    report.update(w.times)
    report["errors"] = len(w.errors)
    report["error_samples"] = w.errors[:5]
    return report


def bench(d: Daemon, levels: list[int], *, frontends: int, backends: int, reads: int, cycles: int,
          timeout: float) -> dict[str, Any]:
    pid = d.pid
    out: dict[str, Any] = {"daemon": d.label, "levels": {}}
    probe = 30000  # the latency guest, alive throughout
    with toolstack(d.socket) as c:
        domain_make(c, d.fx, probe)
        c.write(f"/local/domain/{probe}/data/x", "guest-value")
        g = Guest(probe, d.fx, timeout=30.0)
        try:
            out["read_us_alone"], out["read_mean_us_alone"] = read_latency_us(g, reads)
            out["alone"] = intro_release_us(c, d.fx, 31000, cycles)
            out["rss_kib_start"] = rss_kib(pid)
            alone = out["alone"]
            print(f"{d.label}, no other domain: guest READ {out['read_us_alone']:.0f} us; INTRODUCE "
                  f"{alone['introduce_us']:.0f} us, RELEASE {alone['release_us']:.0f} us; daemon RSS "
                  f"{out['rss_kib_start'] / 1024:.1f} MiB", flush=True)
            for k, n in enumerate(levels):
                base = 1000 + 2000 * k
                cpu0 = cpu_seconds(pid)

                def measure(n: int = n, cpu0: float = cpu0, k: int = k) -> dict[str, Any]:
                    m: dict[str, Any] = {"daemon_cpu_s": cpu_seconds(pid) - cpu0, "rss_kib": rss_kib(pid)}
                    idle0, t_idle = cpu_seconds(pid), perf()
                    time.sleep(2.0)  # everyone connected and quiet: what do N idle domains cost?
                    m["idle_cpu_pct"] = (cpu_seconds(pid) - idle0) / (perf() - t_idle) * 100
                    m["read_us"], m["read_mean_us"] = read_latency_us(g, reads)
                    m.update(intro_release_us(c, d.fx, 32000 + k * cycles, cycles))
                    return m

                r = run_wave(d.socket, d.fx, list(range(base, base + n)), frontends=frontends,
                             backends=backends, timeout=timeout, measure=measure)
                r["rss_kib_after_teardown"] = rss_kib(pid)
                out["levels"][n] = r
                print(format_level(n, r), flush=True)
            # Alone again, after every wave: the first figure comes from a daemon just started.
            again = read_latency_us(g, reads)[0]
            out["read_us_alone_before"], out["read_us_alone_after"] = out["read_us_alone"], again
            out["read_us_alone"] = min(out["read_us_alone"], again)
            for n, r in out["levels"].items():
                if "read_us" in r:
                    r["read_ratio"] = r["read_us"] / out["read_us_alone"]
            print(f"guest READ alone: {out['read_us_alone_before']:.0f} us before the waves, {again:.0f} us "
                  f"after; with N connected / alone: "
                  + ", ".join(f"{n}: x{r['read_ratio']:.2f}" for n, r in out["levels"].items() if "read_ratio" in r),
                  flush=True)
        finally:
            g.close()
        c.request(Op.RELEASE, f"{probe}\0".encode())
        hypervisor(d.fx, f"destroy {probe}")
    return out


def format_level(n: int, r: dict[str, Any]) -> str:
    if "connect_s" not in r:
        return f"{n:5d} domains: FAILED, {r['errors']} errors, e.g. {r['error_samples'][:2]}"
    return (
        f"{n:5d} domains: connected {r['connected']}/{n} (both sides {r['both_connected']}) in "
        f"{r['connect_s']:.2f} s (toolstack {r['toolstack_s']:.2f} s), errors {r['errors']}; "
        f"daemon RSS {r['rss_kib'] / 1024:.1f} MiB, CPU {r['daemon_cpu_s']:.2f} s "
        f"({r['daemon_cpu_s'] / n * 1e3:.2f} ms/domain), idle {r['idle_cpu_pct']:.1f}% CPU; "
        f"guest READ {r['read_us']:.0f} us; INTRODUCE {r['introduce_us']:.0f} us, "
        f"RELEASE {r['release_us']:.0f} us; unplug {r.get('unplug_s', float('nan')):.2f} s, "
        f"destroy {r.get('destroy_per_domain_ms', float('nan')):.2f} ms/domain"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_domains", description=__doc__.split("\n\n")[0])
    ap.add_argument("--domains", type=int, default=1000, help="the largest wave (default 1000)")
    ap.add_argument("--levels", default=None, help="comma-separated wave sizes (default 10,100,DOMAINS)")
    ap.add_argument("--frontends", type=int, default=4, help="blkfront processes per wave")
    ap.add_argument("--backends", type=int, default=1, help="blkback processes per wave")
    ap.add_argument("--reads", type=int, default=2000, help="sequential READs per latency figure")
    ap.add_argument("--cycles", type=int, default=30, help="extra domains introduced/released per level")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a wave step may take")
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else "/tmp"
    ap.add_argument("--run-base", default=shm,
                    help="where the daemons' run directories go (default: tmpfs, %(default)s, where an "
                         "emulated ring file costs the same with 10 or 1,000 others beside it; on "
                         "ext4 that cost grows with the folder)")
    ap.add_argument("--against-cmd", help="start another daemon with this command ({rundir} substituted)")
    ap.add_argument("--against", help="socket of a running daemon to measure instead of ours")
    ap.add_argument("--label", default=None, help="name of the other daemon")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    daemons.RUN_BASE = a.run_base
    levels = [int(x) for x in a.levels.split(",")] if a.levels else sorted({10, 100, a.domains})
    if a.against_cmd:
        spec = Spec(a.label or "other", cmd=a.against_cmd)
    elif a.against:
        spec = Spec(a.label or "other", socket=a.against)
    else:
        spec = Spec("ours")
    d = spec.start()
    t0 = perf()
    try:
        result = bench(d, levels, frontends=a.frontends, backends=a.backends, reads=a.reads,
                       cycles=a.cycles, timeout=a.timeout)
    finally:
        d.stop()
    result["seconds"] = perf() - t0
    print(f"whole run {result['seconds']:.0f} s (wall-clock figures: indicative on a shared machine)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    bad = [n for n, r in result["levels"].items() if r["errors"] or r.get("both_connected") != n]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
