"""The workloads.  Each ``run(daemon, size, rnd)`` does one round and returns its metrics.

Every workload works under its own subtree (``/bench/<name>/r<round>``) so rounds do not see
each other's nodes; daemons are started fresh per workload (``scale``: per round).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import selectors
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import proto, testxs
from .daemons import Daemon
from .parallel import run_workers, span
from .proto import (
    CONTROL,
    DIRECTORY,
    ERROR,
    HEADER,
    INTRODUCE,
    READ,
    RELEASE,
    UNWATCH,
    WATCH,
    WATCH_EVENT,
    WRITE,
    Client,
    XsErr,
    frame,
    hv_control,
    pipeline_bodies,
    z,
)

perf = time.perf_counter
Metrics = dict[str, float]


@dataclass
class Size:
    """Workload sizes; ``quick`` trades precision for a run under a minute."""

    quick: bool
    seq: int = 5000
    pipe: int = 40000
    idle_reads: int = 3000
    watch_writes: int = 2000
    unrelated_watches: int = 10000
    fanout_writes: int = 300
    tx_per_client: int = 150
    vms: int = 200
    scale_domains: int = 1000
    scale_per_domain: int = 100
    lat_samples: int = 5000
    guest_reads: int = 2000
    guests: int = 100
    guest_reads_each: int = 100
    testxs_iters: int = 1000

    @classmethod
    def make(cls, quick: bool) -> Size:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True, seq=1500, pipe=12000, idle_reads=1000, watch_writes=800, fanout_writes=100,
            tx_per_client=40, vms=100, lat_samples=2000, guest_reads=600, guest_reads_each=30,
            testxs_iters=200,
        )


# ------------------------------------------------------------------------------------- helpers
def seq_us(c: Client, frames: list[bytes]) -> float:
    """Mean µs per round trip over ``frames``, sent one at a time."""
    send = c.send_frame
    t0 = perf()
    for f in frames:
        send(f)
    return (perf() - t0) / len(frames) * 1e6


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def retry_tx(c: Client, body: Callable[[int], None], limit: int = 1000) -> int:
    """Run ``body(tx)`` in a transaction until it commits; returns how many EAGAINs it took."""
    for eagain in range(limit):
        tx = c.start()
        try:
            body(tx)
        except BaseException:
            try:
                c.end(tx, commit=False)
            except XsErr:
                pass
            raise
        try:
            c.end(tx)
            return eagain
        except XsErr as e:
            if e.name != "EAGAIN":
                raise
    raise RuntimeError("transaction never committed")


# ------------------------------------------------------------------------------------- sequential
def w_sequential(d: Daemon, size: Size, rnd: int) -> Metrics:
    """One request at a time, as libxl, xenbus and the ``xenstore-*`` tools send them.

    Measured twice: client and daemon pinned to different CPUs (``read_us``: a cross-CPU wakeup
    per message hides the daemon's CPU in the round trip) and to one CPU (``read_one_cpu_us``:
    a round trip is then both sides' CPU, what a busy dom0 pays).  The daemon's CPU per request
    comes from its threads' run time (/proc/<pid>/task/*/schedstat) over each run."""
    base = f"/bench/seq/r{rnd}"
    with Client(d.socket) as c:
        c.write(f"{base}/r", "some-value")
        reads = [frame(READ, z(f"{base}/r"))] * size.seq
        writes = [frame(WRITE, b"%s/w%d\0value-%d" % (base.encode(), i % 16, i)) for i in range(size.seq)]
        seq_us(c, reads[:200])
        seq_us(c, writes[:200])
        out: Metrics = {}
        for suffix, pinning in (("", pinned_apart), ("_one_cpu", pinned_together)):
            with pinning(d.pid):
                for name, frames in (("read", reads), ("write", writes)):
                    cpu0 = proto.cpu_seconds(d.pid)
                    out[f"{name}{suffix}_us"] = seq_us(c, frames)
                    out[f"{name}{suffix}_cpu_us"] = (proto.cpu_seconds(d.pid) - cpu0) / len(frames) * 1e6
        return out


# ------------------------------------------------------------------------------------- pipelined
def _pipe_worker(arg: tuple[str, list[bytes], int], ready: Callable[[], None]) -> dict[str, Any]:
    path, frames, depth = arg
    with Client(path) as c:
        c.pipeline(frames[:depth * 4], depth)  # warm up, and create the write targets
        ready()
        t0 = perf()
        c.pipeline(frames, depth)
        return {"t0": t0, "t1": perf(), "n": len(frames)}


def w_pipelined(d: Daemon, size: Size, rnd: int) -> Metrics:
    base = f"/bench/pipe/r{rnd}"
    with Client(d.socket) as c:
        c.write(f"{base}/r", "some-value")
    out: Metrics = {}
    for conns, depth in ((1, 64), (8, 16)):
        n = size.pipe // conns
        for op in ("read", "write"):
            args = []
            for k in range(conns):
                if op == "read":
                    frames = [frame(READ, z(f"{base}/r"))] * n
                else:
                    frames = [frame(WRITE, b"%s/c%d/w%d\0value-%d" % (base.encode(), k, i % 64, i)) for i in range(n)]
                args.append((d.socket, frames, depth))
            cpu0 = proto.cpu_seconds(d.pid)
            res = run_workers(_pipe_worker, args)
            cpu = proto.cpu_seconds(d.pid) - cpu0  # warm-up requests included: an upper bound
            done = sum(r["n"] for r in res)
            out[f"{op}_{conns}x{depth}_ops"] = done / span(res)
            out[f"{op}_{conns}x{depth}_cpu_us"] = cpu / done * 1e6
    return out


# ------------------------------------------------------------------------------------- idle conns
@contextlib.contextmanager
def _pinned(daemon_pid: int, apart: bool) -> Iterator[None]:
    """This client on the first CPU and the daemon on the second (``apart``) or the same one,
    for the duration; unpinned if there is one CPU or the daemon is not ours to pin."""
    cpus = sorted(os.sched_getaffinity(0))
    if apart and len(cpus) < 2:
        yield
        return
    try:
        before = os.sched_getaffinity(daemon_pid)
        os.sched_setaffinity(daemon_pid, {cpus[1] if apart else cpus[0]})
    except OSError:
        yield
        return
    os.sched_setaffinity(0, {cpus[0]})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(daemon_pid, before)


def pinned_apart(daemon_pid: int) -> contextlib.AbstractContextManager[None]:
    """Daemon on one CPU, this client on another, for the duration.

    On a VM the scheduler sometimes runs client and daemon on one CPU (a round trip then costs
    the sum of their CPU time) and sometimes on two (plus a cross-CPU wakeup each way: about
    47 µs against 30 here), and it changes its mind when connections come and go.  Latency
    comparisons within one daemon (the own-ratio targets) would otherwise measure that choice;
    two CPUs is the dom0 case (toolstack and daemon on different vCPUs).  No-op on one CPU.
    """
    return _pinned(daemon_pid, apart=True)


def pinned_together(daemon_pid: int) -> contextlib.AbstractContextManager[None]:
    """Daemon and this client on one CPU, for the duration (see :func:`pinned_apart`)."""
    return _pinned(daemon_pid, apart=False)


def w_idle(d: Daemon, size: Size, rnd: int) -> Metrics:
    """READ latency of one connection while 0, 64 or 512 others sit idle.

    The three settings are measured twice in turn (0, 64, 512, 0, 64, 512) and each figure is
    the mean of its two: one connection's latency drifts by several µs over a run on a shared
    VM (the scheduler moves client and daemon between CPUs), which a single pass in a fixed
    order would charge to whichever setting came later.  Client and daemon are pinned apart
    (see :func:`pinned_apart`)."""
    base = f"/bench/idle/r{rnd}"
    out: Metrics = {}
    got: dict[int, list[float]] = {0: [], 64: [], 512: []}
    with Client(d.socket) as c, pinned_apart(d.pid):
        c.write(f"{base}/r", "some-value")
        reads = [frame(READ, z(f"{base}/r"))] * size.idle_reads
        for _ in range(2):
            for k, values in got.items():
                idle = [Client(d.socket) for _ in range(k)]
                try:
                    for ic in idle:  # make sure the daemon has accepted and serves each one
                        ic.read(f"{base}/r")
                    seq_us(c, reads[:100])
                    values.append(seq_us(c, reads))
                finally:
                    for ic in idle:
                        ic.close()
    for k, values in got.items():
        out[f"read_us_idle{k}"] = statistics.fmean(values)
    out["idle512_over_idle0"] = out["read_us_idle512"] / out["read_us_idle0"]
    return out


# ------------------------------------------------------------------------------------- watches
def _fan_worker(arg: tuple[str, str, int, int, int], ready: Callable[[], None]) -> dict[str, Any]:
    path, wpath, nconns, writes, role = arg
    if role == 0:  # the writer
        with Client(path) as c:
            frames = [frame(WRITE, b"%s/x\0v%d" % (wpath.encode(), i)) for i in range(writes)]
            ready()
            t0 = perf()
            c.pipeline(frames, 16)
            return {"t0": t0, "t1": perf()}
    conns = [Client(path) for _ in range(nconns)]
    for i, c in enumerate(conns):
        c.call(WATCH, z(wpath, f"tok{i}"))
        c.drain_events(1)  # the initial event
    byfd = {c.sock.fileno(): c for c in conns}
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ)
    ready()
    t0 = t1 = perf()
    received = 0
    expected = writes * len(conns)
    # C xenstored drops events beyond a few dozen unread per connection, so "all arrived" may
    # never happen: stop at the expected count or after a quiet spell once something arrived.
    while received < expected:
        ready_keys = sel.select(0.5 if received else 30)
        if not ready_keys:
            break
        for key, _ in ready_keys:
            c = byfd[key.fd]
            data = c.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("daemon closed a watcher")
            buf = c.buf
            buf += data
            pos, n = 0, len(buf)
            while n - pos >= 16:
                type_, _r, _t, length = HEADER.unpack_from(buf, pos)
                if pos + 16 + length > n:
                    break
                if type_ == WATCH_EVENT:
                    received += 1
                pos += 16 + length
            del buf[:pos]
        t1 = perf()
    for c in conns:
        c.close()
    return {"t0": t0, "t1": t1, "received": received, "expected": expected}


def w_watches(d: Daemon, size: Size, rnd: int) -> Metrics:
    """WRITE latency with and without 10,000 watches on unrelated paths.

    Measured A B A B (the watches are set, then removed again) and compared by medians: the
    latency of one connection drifts by several µs over a run on a shared VM, so a single
    "none first, then many" pair would mostly measure the drift."""
    base = f"/bench/watch/r{rnd}"
    out: Metrics = {}
    with Client(d.socket) as c, pinned_apart(d.pid):
        writes = [frame(WRITE, b"%s/w/x%d\0value-%d" % (base.encode(), i % 8, i)) for i in range(size.watch_writes)]
        holders = [Client(d.socket) for _ in range(10)]
        per = size.unrelated_watches // len(holders)
        nones: list[float] = []
        manys: list[float] = []
        for _ in range(2):
            seq_us(c, writes[:200])
            nones.append(seq_us(c, writes))
            for h, hc in enumerate(holders):
                hc.pipeline([frame(WATCH, z(f"/bench/unrelated/h{h}/p{i}", f"t{i}")) for i in range(per)], 64)
            seq_us(c, writes[:200])
            manys.append(seq_us(c, writes))
            for h, hc in enumerate(holders):
                hc.pipeline([frame(UNWATCH, z(f"/bench/unrelated/h{h}/p{i}", f"t{i}")) for i in range(per)], 64)
        for hc in holders:
            hc.close()
    none, many = statistics.median(nones), statistics.median(manys)
    out["write_us_nowatch"] = none
    out["write_us_10kwatch"] = many
    out["w10k_over_none"] = many / none
    nw, per_proc = 100, 25
    args = [(d.socket, f"{base}/fan", 0, size.fanout_writes, 0)]
    args += [(d.socket, f"{base}/fan", per_proc, size.fanout_writes, 1) for _ in range(nw // per_proc)]
    res = run_workers(_fan_worker, args)
    t0 = res[0]["t0"]
    t1 = max(r["t1"] for r in res)
    received = sum(r.get("received", 0) for r in res[1:])
    out["fanout100_events_s"] = received / (t1 - t0)
    out["fanout100_delivered"] = received / (nw * size.fanout_writes)
    return out


# ------------------------------------------------------------------------------------- transactions
def _tx_worker(arg: tuple[str, str, int, int], ready: Callable[[], None]) -> dict[str, Any]:
    path, base, k, count = arg
    mine = f"{base}/c{k}"
    with Client(path) as c:
        for n in "abc":
            c.write(f"{mine}/{n}", "0")
        eagain = 0
        ready()
        t0 = perf()
        for i in range(count):
            def body(tx: int, i: int = i) -> None:
                vals = [int(c.read(f"{mine}/{n}", tx)) for n in "abc"]
                for n, v in zip("abc", vals, strict=True):
                    c.write(f"{mine}/{n}", str(v + 1), tx)
                c.write(f"{base}/common/c{k}-{i}", "", tx)

            eagain += retry_tx(c, body)
        return {"t0": t0, "t1": perf(), "commits": count, "eagain": eagain}


def w_transactions(d: Daemon, size: Size, rnd: int) -> Metrics:
    base = f"/bench/tx/r{rnd}"
    with Client(d.socket) as c:
        c.mkdir(f"{base}/common")
    res = run_workers(_tx_worker, [(d.socket, base, k, size.tx_per_client) for k in range(8)])
    commits = sum(r["commits"] for r in res)
    return {"tx_commits_s": commits / span(res), "tx_eagain_per_commit": sum(r["eagain"] for r in res) / commits}


# ------------------------------------------------------------------------------------- VM lifecycle
VBD, VIF = ("vbd", 51712), ("vif", 0)


def vm_cycle(c: Client, fx: str, domid: int) -> int:
    """One guest's life as libxl drives xenstore: build, devices, run, shutdown, destroy.

    Returns the EAGAINs the transactions took.
    """
    dom = f"/local/domain/{domid}"
    uuid = f"00000000-0000-4000-8000-{domid:012d}"
    vm = f"/vm/{uuid}"
    ro = ["n0", f"r{domid}"]
    rw = [f"n{domid}"]
    eagain = 0
    hv_control(fx, f"create {domid}")

    def make(tx: int) -> None:  # libxl__domain_make
        c.rm(dom, tx)
        c.mkdir(dom, tx)
        c.setperms(dom, ro, tx)
        c.mkdir(vm, tx)
        c.setperms(vm, ro, tx)
        for sub in ("cpu", "memory", "device", "control", "data", "drivers", "feature", "attr", "error"):
            c.mkdir(f"{dom}/{sub}", tx)
            c.setperms(f"{dom}/{sub}", rw if sub in ("data", "drivers", "feature", "attr", "error", "device")
                       else ro, tx)
        for node in ("shutdown", "sysrq"):
            c.mkdir(f"{dom}/control/{node}", tx)
            c.setperms(f"{dom}/control/{node}", rw, tx)
        c.write(f"{vm}/uuid", uuid, tx)
        c.write(f"{vm}/name", f"guest{domid}", tx)
        c.write(f"{vm}/start_time", "1700000000.00", tx)
        c.write(f"{dom}/vm", vm, tx)
        c.write(f"{dom}/name", f"guest{domid}", tx)
        c.write(f"{dom}/domid", str(domid), tx)
        c.write(f"{dom}/memory/static-max", "1048576", tx)
        c.write(f"{dom}/memory/target", "1048576", tx)

    eagain += retry_tx(c, make)
    c.call(INTRODUCE, z(str(domid), "0", "1"))
    for kind, devid in (VBD, VIF):
        be = f"/local/domain/0/backend/{kind}/{domid}/{devid}"
        fe = f"{dom}/device/{kind}/{devid}"

        def add(tx: int, be: str = be, fe: str = fe, kind: str = kind, devid: int = devid) -> None:
            c.rm(be, tx)
            c.rm(fe, tx)
            c.mkdir(be, tx)
            c.setperms(be, ro, tx)
            c.mkdir(fe, tx)
            c.setperms(fe, rw + ["r0"], tx)
            for k, v in (("frontend", fe), ("frontend-id", str(domid)), ("online", "1"), ("state", "1"),
                         ("params" if kind == "vbd" else "mac", "aio:/dev/vg/guest" if kind == "vbd"
                          else "00:16:3e:00:00:01"), ("type" if kind == "vbd" else "bridge", "phy")):
                c.write(f"{be}/{k}", v, tx)
            for k, v in (("backend", be), ("backend-id", "0"), ("state", "1"),
                         ("virtual-device" if kind == "vbd" else "handle", str(devid))):
                c.write(f"{fe}/{k}", v, tx)

        eagain += retry_tx(c, add)
    for kind, devid in (VBD, VIF):  # the backend and frontend connect
        for st in ("2", "4"):
            c.write(f"/local/domain/0/backend/{kind}/{domid}/{devid}/state", st)
            c.write(f"{dom}/device/{kind}/{devid}/state", st)
    c.write(f"{dom}/control/shutdown", "poweroff")
    for kind, devid in (VBD, VIF):
        be = f"/local/domain/0/backend/{kind}/{domid}/{devid}"
        fe = f"{dom}/device/{kind}/{devid}"

        def remove(tx: int, be: str = be, fe: str = fe) -> None:
            c.rm(be, tx)
            c.rm(fe, tx)

        eagain += retry_tx(c, remove)
    c.call(RELEASE, z(str(domid)))

    def destroy(tx: int) -> None:
        c.rm(dom, tx)
        c.rm(vm, tx)
        for kind, _ in (VBD, VIF):
            c.rm(f"/local/domain/0/backend/{kind}/{domid}", tx)

    eagain += retry_tx(c, destroy)
    hv_control(fx, f"destroy {domid}")
    return eagain


def _vm_worker(arg: tuple[str, str, list[int]], ready: Callable[[], None]) -> dict[str, Any]:
    path, fx, domids = arg
    with Client(path) as c:
        ready()
        t0 = perf()
        eagain = sum(vm_cycle(c, fx, domid) for domid in domids)
        return {"t0": t0, "t1": perf(), "eagain": eagain}


def w_vm(d: Daemon, size: Size, rnd: int) -> Metrics:
    base = 1 + (rnd % 8) * 2 * size.vms
    with Client(d.socket) as c:
        cpu0 = proto.cpu_seconds(d.pid)
        t0 = perf()
        eag_seq = sum(vm_cycle(c, d.fx, base + i) for i in range(size.vms))
        seq = perf() - t0
        seq_cpu = proto.cpu_seconds(d.pid) - cpu0
    ids = [base + size.vms + i for i in range(size.vms)]
    res = run_workers(_vm_worker, [(d.socket, d.fx, ids[k::16]) for k in range(16)])
    return {
        "vm_seq_s": seq,
        "vm_seq_cpu_ms": seq_cpu / size.vms * 1e3,
        "vm_par16_s": span(res),
        "vm_par16_eagain": float(sum(r["eagain"] for r in res)),
        "vm_seq_eagain": float(eag_seq),
    }


# ------------------------------------------------------------------------------------- scale
def _populate_worker(arg: tuple[str, list[int], int], ready: Callable[[], None]) -> dict[str, Any]:
    path, domids, per = arg
    frames = [frame(WRITE, b"/local/domain/%d/n%d\0value-%d" % (dom, j, j)) for dom in domids for j in range(per)]
    with Client(path) as c:
        ready()
        t0 = perf()
        c.pipeline(frames, 64)
        return {"t0": t0, "t1": perf(), "n": len(frames)}


def _populate(d: Daemon, domids: list[int], per: int, procs: int = 2) -> float:
    res = run_workers(_populate_worker, [(d.socket, domids[k::procs], per) for k in range(procs)])
    return span(res)


def _read_latencies(c: Client, domids: list[int], per: int, n: int, rng: random.Random) -> list[float]:
    frames = [frame(READ, b"/local/domain/%d/n%d\0" % (rng.choice(domids), rng.randrange(per))) for _ in range(n)]
    send = c.send_frame
    lat = []
    for f in frames[:200]:
        send(f)
    for f in frames:
        t0 = perf()
        send(f)
        lat.append(perf() - t0)
    return lat


def tree_walk(c: Client, root: str = "/") -> tuple[int, float]:
    """Every node by pipelined DIRECTORY, level by level, as xenstore-ls would; (nodes, seconds).
    Paths stay bytes and frames are packed directly: the walk should time the daemon, not the
    client's string handling."""
    pack = HEADER.pack
    t0 = perf()
    level = [root.encode()]
    nodes = 0
    while level:
        nodes += len(level)
        replies = pipeline_bodies(c, [pack(DIRECTORY, 0, 0, len(p) + 1) + p + b"\0" for p in level], 64)
        nxt: list[bytes] = []
        for p, (type_, body) in zip(level, replies, strict=True):
            if type_ == ERROR or not body:
                continue
            prefix = p if p.endswith(b"/") else p + b"/"
            nxt.extend([prefix + name for name in body[:-1].split(b"\0")])
        level = nxt
    return nodes, perf() - t0


def w_scale(d: Daemon, size: Size, rnd: int) -> Metrics:
    rng = random.Random(rnd)
    per = size.scale_per_domain
    doms = list(range(1, size.scale_domains + 1))
    small = doms[:10]
    with Client(d.socket) as c:
        rss0 = proto.rss_bytes(d.pid)
        t_small = _populate(d, small, per)
        lat_small = _read_latencies(c, small, per, size.lat_samples, rng)
        t_big = _populate(d, doms[10:], per)
        time.sleep(0.2)
        rss1 = proto.rss_bytes(d.pid)
        lat_big = _read_latencies(c, doms, per, size.lat_samples, rng)
        nodes, walk = tree_walk(c)
        t0 = perf()
        c.call(CONTROL, z("check"))
        check = perf() - t0
    added = len(doms) * (per + 1)
    return {
        "scale_nodes": float(nodes),
        "populate_s": t_small + t_big,
        "rss_per_node_b": (rss1 - rss0) / added,
        "read_p50_1k_us": percentile(lat_small, 0.5) * 1e6,
        "read_p99_1k_us": percentile(lat_small, 0.99) * 1e6,
        "read_p50_100k_us": percentile(lat_big, 0.5) * 1e6,
        "read_p99_100k_us": percentile(lat_big, 0.99) * 1e6,
        "p99_100k_over_1k": percentile(lat_big, 0.99) / percentile(lat_small, 0.99),
        "walk_dir_ms": walk * 1e3,
        "walk_check_ms": check * 1e3,
    }


# ------------------------------------------------------------------------------------- guest rings
def _introduce(c: Client, fx: str, domid: int) -> None:
    hv_control(fx, f"create {domid}")
    c.call(INTRODUCE, z(str(domid), "0", "1"))
    home = f"/local/domain/{domid}"
    c.mkdir(home)
    c.setperms(home, [f"n{domid}"])
    c.write(f"{home}/x", "guest-value")


def _release(c: Client, fx: str, domid: int) -> None:
    c.call(RELEASE, z(str(domid)))
    c.rm(f"/local/domain/{domid}")
    hv_control(fx, f"destroy {domid}")


def _guest_worker(arg: tuple[str, list[int], int], ready: Callable[[], None]) -> dict[str, Any]:
    from xenstored.guest import Guest

    fx, domids, n = arg
    guests = [Guest(domid, fx, timeout=20.0) for domid in domids]
    reqs = [frame(READ, z(f"/local/domain/{domid}/x")) for domid in domids]
    for g, r in zip(guests, reqs, strict=True):  # one round trip each: the ring works
        g.request(READ, r[16:])
    left = [n] * len(guests)
    evs = [g._ev for g in guests]
    ready()
    t0 = perf()
    for g, r in zip(guests, reqs, strict=True):
        g.send_raw(r)
    active = len(guests)
    while active:
        select.select(evs, [], [], 0.05)
        for i, g in enumerate(guests):
            if not left[i]:
                continue
            try:
                while True:
                    g._ev.recv(64)
            except BlockingIOError:
                pass
            if not g._poll():
                continue
            while g._inbox:
                type_, _rid, _tx, body = g._inbox.popleft()
                if type_ == ERROR:
                    raise XsErr(body.rstrip(b"\0").decode())
                left[i] -= 1
                if left[i]:
                    g.send_raw(reqs[i])
                else:
                    active -= 1
    t1 = perf()
    for g in guests:
        g.close()
    return {"t0": t0, "t1": t1, "n": n * len(guests)}


def w_guest(d: Daemon, size: Size, rnd: int) -> Metrics:
    from xenstored.guest import Guest

    out: Metrics = {}
    one = 7000 + rnd
    with Client(d.socket) as c:
        g = Guest(one, d.fx, timeout=20.0)
        try:
            _introduce(c, d.fx, one)
            path = f"/local/domain/{one}/x".encode() + b"\0"

            def seq_reads(cpu_key: str) -> float:
                for _ in range(100):
                    g.request(READ, path)
                cpu0 = proto.cpu_seconds(d.pid)
                t0 = perf()
                for _ in range(size.guest_reads):
                    g.request(READ, path)
                us = (perf() - t0) / size.guest_reads * 1e6
                out[cpu_key] = (proto.cpu_seconds(d.pid) - cpu0) / size.guest_reads * 1e6
                return us

            # A guest runs on its own vCPU, never on dom0's: the main figure keeps the guest
            # process and the daemon on different CPUs.  Sharing one CPU (only possible when
            # emulated) shows the CPU cost of both sides instead; reported for comparison.
            with pinned_apart(d.pid):
                out["guest_read_us"] = seq_reads("guest_read_cpu_us")
            with pinned_together(d.pid):
                out["guest_read_one_cpu_us"] = seq_reads("guest_read_one_cpu_cpu_us")
        finally:
            g.close()
        _release(c, d.fx, one)
        many = [8000 + rnd * size.guests + i for i in range(size.guests)]
        for domid in many:
            _introduce(c, d.fx, domid)
        res = run_workers(_guest_worker, [(d.fx, many[k::4], size.guest_reads_each) for k in range(4)])
        out["guests100_ops_s"] = sum(r["n"] for r in res) / span(res)
        for domid in many:
            _release(c, d.fx, domid)
    return out


# ------------------------------------------------------------------------------------- test-xenstore
def w_testxs(d: Daemon, size: Size, rnd: int) -> Metrics:
    cases = testxs.run(d.socket, size.testxs_iters)
    return {f"txs_{name}_us": ns / 1e3 for name, ns in cases.items()}


WORKLOADS: dict[str, tuple[Callable[[Daemon, Size, int], Metrics], bool]] = {
    # name: (function, needs a fresh daemon every round)
    "sequential": (w_sequential, False),
    "pipelined": (w_pipelined, False),
    "idle": (w_idle, False),
    "watches": (w_watches, False),
    "transactions": (w_transactions, False),
    "vm": (w_vm, False),
    "scale": (w_scale, True),
    "guest": (w_guest, False),
    "testxs": (w_testxs, False),
}

__all__ = ["WORKLOADS", "Size"]
