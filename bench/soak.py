"""Soak test: mixed load on one daemon for a while, reporting throughput, errors, lost events, RSS.

Load, all at once:

* socket clients (threads): writes, reads, listings, removals, and transactions on a shared
  counter that conflict on purpose (EAGAIN, retried); each has a watcher connection that must see
  one event per write to its watched node;
* emulated guest domains coming and going: the toolstack creates and introduces a domain, a guest
  process does mixed work over its ring (including transactions and a watch it reads), then the
  domain is destroyed and a new one takes its slot.

Report (JSON on stdout): ops done and ops/s, errors by kind (EAGAIN is expected; anything else is
not), watch events lost (must be 0: every watcher reads), RSS samples and the RSS trend (linear fit
over the second half, KiB/min).  Exit status 1 if anything unexpected happened.

    python bench/soak.py --seconds 60 --sockets 4 --guests 3       # starts its own daemon
    python bench/soak.py --socket /path/socket --fx /path/fx --pid N  # an already running one
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xenstored import guest as guestlib
from xenstored.client import SyncClient
from xenstored.wire import Op, XsError

EXPECTED_ERRORS = {"EAGAIN"}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Totals:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops = 0
        self.errors: Counter[str] = Counter()
        self.lost = 0
        self.domains = 0

    def add(self, ops: int = 0, errors: dict[str, int] | None = None, lost: int = 0) -> None:
        with self.lock:
            self.ops += ops
            self.lost += lost
            if errors:
                self.errors.update(errors)


# ------------------------------------------------------------------ socket load
def socket_client(sock: str, i: int, stop: threading.Event, totals: Totals) -> None:
    base = f"/soak/c{i}"
    errors: Counter[str] = Counter()
    seen = [0]
    done_seen = threading.Event()

    def watcher() -> None:
        with SyncClient(sock) as w:
            w.watch(f"{base}/w", "soak")
            w.read_watch(5)  # the initial event
            ready.set()
            while True:
                try:
                    path, _ = w.read_watch(1.0)
                except TimeoutError:
                    continue
                if path.endswith("/seq"):
                    seen[0] += 1
                elif path.endswith("/done"):
                    done_seen.set()
                    return

    ready = threading.Event()
    with SyncClient(sock) as c:
        c.write(f"{base}/w/seq", "0")  # before the watch: reads never miss it, no event counted
    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    ready.wait(5)
    ops = writes = 0
    with SyncClient(sock) as c:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                k = n % 6
                if k == 0:
                    c.write(f"{base}/w/seq", str(n))
                    writes += 1
                elif k == 1:
                    c.write(f"{base}/d/k{n % 17}", "v" * (n % 300))
                elif k == 2:
                    c.read(f"{base}/w/seq")
                elif k == 3:
                    c.ls(base)
                elif k == 4:
                    if n % 60 == 4:
                        c.rm(f"{base}/d")
                    else:
                        c.mkdir(f"{base}/d/m{n % 5}")
                else:
                    for _attempt in range(50):
                        try:
                            with c.transaction() as tx:
                                v = int(tx.read("/soak/shared") or b"0")
                                tx.write("/soak/shared", str(v + 1))
                                tx.write(f"{base}/tx", str(n))
                            break
                        except XsError as e:
                            if e.name != "EAGAIN":
                                raise
                            errors["EAGAIN"] += 1
                ops += 1
            except XsError as e:
                errors[e.name] += 1
        c.write(f"{base}/w/done", "")
    done_seen.wait(10)
    totals.add(ops=ops, errors=dict(errors), lost=writes - seen[0])


# ------------------------------------------------------------------ guest load
def guest_worker(domid: int, nops: int) -> int:
    """Run inside a guest process: mixed work over the ring; prints a JSON line."""
    errors: Counter[str] = Counter()
    done = writes = 0
    with guestlib.Guest(domid, timeout=30.0) as g:
        g.watch("w", "gw")
        g.wait_event()  # initial
        for i in range(nops):
            try:
                k = i % 5
                if k == 0:
                    g.write("w/seq", str(i))
                    writes += 1
                elif k == 1:
                    g.write(f"data/k{i % 10}", f"v{i}")
                elif k == 2:
                    g.read(f"data/k{(i - 1) % 10}")
                elif k == 3:
                    for _attempt in range(50):
                        try:
                            with g.transaction() as tx:
                                g.read("data/tx", tx) if g.exists("data/tx", tx) else None
                                g.write("data/tx", str(i), tx)
                            break
                        except XsError as e:
                            if e.name != "EAGAIN":
                                raise
                            errors["EAGAIN"] += 1
                else:
                    g.ls("data")
                done += 1
            except XsError as e:
                errors[e.name] += 1
        g.write("w/done", "")
        deadline = time.monotonic() + 10
        seen = 0
        finished = False
        while not finished and time.monotonic() < deadline:
            path, _ = g.wait_event(10)
            if path.endswith("/seq"):
                seen += 1
            elif path.endswith("/done"):
                finished = True
    print(json.dumps({"done": done, "errors": dict(errors), "lost": writes - seen}))
    return 0


def guest_slot(sock: str, fx: str, slot: int, nslots: int, ops: int, stop: threading.Event, totals: Totals) -> None:
    gen = 0
    with SyncClient(sock) as d0:
        while not stop.is_set():
            domid = 10 + slot + nslots * gen
            gen += 1
            guestlib.control(f"create {domid}", fx)
            d0.mkdir(f"/local/domain/{domid}")
            d0.set_perms(f"/local/domain/{domid}", [f"n{domid}"])
            d0.request(Op.INTRODUCE, f"{domid}\0{domid}\0{1}\0".encode())
            env = dict(os.environ, FAKEXEN_DIR=fx)
            p = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--guest-worker", str(domid), str(ops)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if p.returncode == 0:
                r = json.loads(p.stdout.strip().splitlines()[-1])
                totals.add(ops=r["done"], errors=r["errors"], lost=r["lost"])
            else:
                totals.add(errors={"guest-crash": 1})
                sys.stderr.write(p.stderr)
            guestlib.control(f"destroy {domid}", fx)
            if d0.exists(f"/local/domain/{domid}"):
                totals.add(errors={"home-left-behind": 1})
            with totals.lock:
                totals.domains += 1


# ------------------------------------------------------------------ driver
def trend_kib_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope over the second half (the first half includes warm-up)."""
    half = samples[len(samples) // 2 :]
    if len(half) < 2:
        return 0.0
    n = len(half)
    mt = sum(t for t, _ in half) / n
    mr = sum(r for _, r in half) / n
    var = sum((t - mt) ** 2 for t, _ in half)
    return 60.0 * sum((t - mt) * (r - mr) for t, r in half) / var if var else 0.0


def soak(sock: str, fx: str, pid: int, seconds: float, sockets: int = 4, guests: int = 2, guest_ops: int = 300) -> dict:
    totals = Totals()
    stop = threading.Event()
    with SyncClient(sock) as c:
        c.write("/soak/shared", "0")
    threads = [threading.Thread(target=socket_client, args=(sock, i, stop, totals)) for i in range(sockets)]
    threads += [
        threading.Thread(target=guest_slot, args=(sock, fx, s, guests, guest_ops, stop, totals)) for s in range(guests)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    samples: list[tuple[float, int]] = []
    while time.monotonic() - start < seconds:
        samples.append((time.monotonic() - start, rss_kib(pid)))
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(180)
    elapsed = time.monotonic() - start
    with SyncClient(sock) as c:
        check = c.control("check")
    unexpected = {k: v for k, v in totals.errors.items() if k not in EXPECTED_ERRORS}
    return {
        "seconds": round(elapsed, 1),
        "ops": totals.ops,
        "ops_per_s": round(totals.ops / elapsed, 1),
        "domains_cycled": totals.domains,
        "errors": dict(totals.errors),
        "unexpected_errors": unexpected,
        "watch_events_lost": totals.lost,
        "check": check,
        "rss_kib_first": samples[0][1] if samples else 0,
        "rss_kib_last": samples[-1][1] if samples else 0,
        "rss_kib_max": max((r for _, r in samples), default=0),
        "rss_trend_kib_per_min": round(trend_kib_per_min(samples), 1),
        "rss_samples": [r for _, r in samples[:: max(1, len(samples) // 20)]],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--sockets", type=int, default=4)
    ap.add_argument("--guests", type=int, default=2)
    ap.add_argument("--guest-ops", type=int, default=300)
    ap.add_argument("--socket", help="an already running daemon's socket (else start one)")
    ap.add_argument("--fx", help="its emulated hypervisor directory")
    ap.add_argument("--pid", type=int, help="its pid (for RSS)")
    ap.add_argument("--guest-worker", nargs=2, type=int, metavar=("DOMID", "OPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.guest_worker:
        return guest_worker(*args.guest_worker)
    proc = rundir = None
    if args.socket:
        sock, fx, pid = args.socket, args.fx, args.pid
    else:
        rundir = tempfile.mkdtemp(prefix="xssoak", dir="/tmp")
        sock, fx = os.path.join(rundir, "socket"), os.path.join(rundir, "fx")
        env = {k: v for k, v in os.environ.items() if k not in ("XENSTORED_PATH", "XENSTORED_RUNDIR")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "xenstored", "-N", "--rundir", rundir],
            env=env,
            stdout=open(os.path.join(rundir, "daemon.log"), "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        pid = proc.pid
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
    try:
        report = soak(sock, fx, pid, args.seconds, args.sockets, args.guests, args.guest_ops)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            shutil.rmtree(rundir or "", ignore_errors=True)
    print(json.dumps(report, indent=1))
    ok = not report["unexpected_errors"] and report["watch_events_lost"] == 0 and report["check"] == "OK"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
