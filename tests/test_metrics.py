"""Metrics: the Prometheus text file and ``xenstore-control stats``, against a real daemon with a
socket client and an emulated guest; and the latency histogram's arithmetic.

The daemon writes its metrics file every second here (``--metrics-interval 1``); each test waits
for a write that shows what it did, so none depends on timing beyond "within a few seconds".
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
from conftest import Daemon, start_daemon, stop_daemon_process
from robustness import guest, hv, introduce
from test_cli_tools import xenstore_control

from xenstored import metrics
from xenstored.client import SyncClient
from xenstored.config import Config, load_file
from xenstored.core import Core
from xenstored.ops import dispatch
from xenstored.wire import Message, Op, XsError

SAMPLE = re.compile(r"^([a-z_]+)(?:\{([^}]*)\})? (\S+)$")


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def mdaemon() -> Iterator[Daemon]:
    """A daemon writing its metrics file every second."""
    rundir = tempfile.mkdtemp(prefix="xsm", dir="/tmp")
    d = start_daemon("--metrics-file", os.path.join(rundir, "xenstored.prom"), "--metrics-interval", "1", rundir=rundir)
    try:
        yield d
    finally:
        rc = stop_daemon_process(d.proc)
        log = d.log()
        shutil.rmtree(d.rundir, ignore_errors=True)
    assert "Traceback" not in log, log
    assert rc == 0, log


def prom_path(d: Daemon) -> str:
    return os.path.join(d.rundir, "xenstored.prom")


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples by (name, labels); checks the format as it goes: every sample's family has its
    HELP and TYPE lines before it, and every family is a metric of metrics.METRICS."""
    declared: dict[str, str] = {}
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    known = {m.name: m for m in metrics.METRICS}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name in known, line
            assert line == f"# HELP {name} {known[name].help}"
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind == known[name].type
            declared[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            family = re.sub(r"_(sum|count)$", "", name) if name not in declared else name
            assert family in declared, f"{name} has no TYPE line before it"
            pairs = frozenset(tuple(p.split("=", 1)) for p in labels.split(",")) if labels else frozenset()
            pairs = frozenset((k, v.strip('"')) for k, v in pairs)
            assert {k for k, _ in pairs} <= set(known[family].labels), line
            out[(name, pairs)] = float(value)
    return out


def value(samples: dict, name: str, **labels: object) -> float | None:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def wait_for_file(d: Daemon, pred, timeout: float = 8.0) -> dict:
    """The metrics file's samples once ``pred(samples)`` holds (the daemon rewrites it every
    second); fails with the last file seen."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            with open(prom_path(d)) as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if text:
            samples = parse(text)
            if pred(samples):
                return samples
        time.sleep(0.1)
    pytest.fail(f"metrics file never showed it:\n{text}")


# ----------------------------------------------------------------------------- the file
def test_metrics_file_after_socket_and_guest_traffic(mdaemon: Daemon) -> None:
    d = mdaemon
    with SyncClient(d.socket) as d0, SyncClient(d.socket) as other:
        d0.write("/tool/m", "1")
        assert d0.read("/tool/m") == b"1"
        with pytest.raises(XsError, match="ENOENT"):
            d0.read("/tool/missing")
        # A commit conflict: what the transaction read changed before it committed.
        tx = d0.transaction_start()
        d0.request(Op.READ, b"/tool/m\0", tx)
        other.write("/tool/m", "2")
        d0.request(Op.WRITE, b"/tool/n\0x", tx)
        with pytest.raises(XsError, match="EAGAIN"):
            d0.transaction_end(tx)
        # A guest with a nodes quota of 3: its home and two more, then a refusal.
        introduce(d0, d, 5, quotas={"nodes": 3})
        with guest(d, 5) as g:
            g.write("a", "1")
            g.write("b", "2")
            with pytest.raises(XsError, match="ENOSPC"):
                g.write("c", "3")
            with pytest.raises(XsError, match="EACCES"):
                g.read("/tool/m")
            g.watch("a", "tok")

            s = wait_for_file(d, lambda s: value(s, "xenstored_quota_refusals_total", domid=5, quota="nodes") == 1)
            assert value(s, "xenstored_errors_total", domid=0, error="ENOENT") == 1
            assert value(s, "xenstored_errors_total", domid=0, error="EAGAIN") == 1
            assert value(s, "xenstored_errors_total", domid=5, error="ENOSPC") == 1
            assert value(s, "xenstored_errors_total", domid=5, error="EACCES") == 1
            assert value(s, "xenstored_transaction_conflicts_total", domid=0) == 1
            assert value(s, "xenstored_requests_total", domid=5) == 5
            assert value(s, "xenstored_requests_total", domid=0) >= 8
            assert value(s, "xenstored_nodes", domid=5) == 3
            assert value(s, "xenstored_watches", domid=5) == 1
            assert value(s, "xenstored_memory_bytes", domid=5) > 0
            assert value(s, "xenstored_rings") >= 1
            assert value(s, "xenstored_connections", kind="ring") >= 1
            assert value(s, "xenstored_connections", kind="socket") >= 2
            assert value(s, "xenstored_request_duration_seconds_count", op="READ") >= 3
            p50 = value(s, "xenstored_request_duration_seconds", op="WRITE", quantile="0.5")
            p99 = value(s, "xenstored_request_duration_seconds", op="WRITE", quantile="0.99")
            assert p50 is not None and p99 is not None
            if not math.isnan(p50):  # WRITEs fell in this window
                assert 0 < p50 <= p99 < 1.0
            assert 0 < value(s, "xenstored_request_duration_seconds_sum", op="READ") < 1.0
            assert time.time() - 60 < value(s, "xenstored_start_time_seconds") <= time.time()
    # Written by rename: no temporary file is left beside it.
    assert sorted(n for n in os.listdir(d.rundir) if n.startswith("xenstored.prom")) == ["xenstored.prom"]


def test_a_dead_domains_series_end(mdaemon: Daemon) -> None:
    d = mdaemon
    with SyncClient(d.socket) as d0:
        introduce(d0, d, 7, quotas={"watches": 1})
        with guest(d, 7) as g:
            g.watch("x", "1")
            with pytest.raises(XsError, match="ENOSPC"):
                g.watch("y", "2")
        wait_for_file(d, lambda s: value(s, "xenstored_quota_refusals_total", domid=7, quota="watches") == 1)
        hv(d, "destroy 7")
        s = wait_for_file(d, lambda s: value(s, "xenstored_nodes", domid=7) is None)
        assert not [k for k in s if ("domid", "7") in k[1]], "dom7's series outlive it"


# ----------------------------------------------------------------------------- stats
def test_xenstore_control_stats(mdaemon: Daemon) -> None:
    d = mdaemon
    with SyncClient(d.socket) as d0:
        introduce(d0, d, 5, quotas={"nodes": 2})
        with guest(d, 5) as g:
            g.write("a", "1")
            with pytest.raises(XsError, match="ENOSPC"):
                g.write("b", "2")
            with pytest.raises(XsError, match="ENOENT"):
                g.read("nothing")
        exe = xenstore_control()
        out = subprocess.run([exe, "stats"], env=d.env, capture_output=True, text=True, timeout=10, check=True).stdout
        assert "quota refusals 1" in out, out
        assert re.search(r"^latency \(us\)\s+count\s+p50\s+p90\s+p99$", out, re.MULTILINE), out
        assert re.search(r"^WRITE\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.MULTILINE), out
        assert re.search(r"^\s+5\s+3\s+2\s+1\s+2\s", out, re.MULTILINE), out  # domid requests errors refused nodes
        one = subprocess.run(
            [exe, "stats", "5"], env=d.env, capture_output=True, text=True, timeout=10, check=True
        ).stdout
        assert one.startswith("domain 5: "), one
        assert "quota refusals: nodes=1" in one
        assert "errors: ENOENT=1 ENOSPC=1" in one
        assert "nodes 2," in one
        # What the tool shows is the daemon's reply, which a library client gets the same.
        assert d0.control("stats", "5").splitlines()[1:] == one.rstrip("\n").splitlines()[1:]
        bad = subprocess.run([exe, "stats", "99"], check=False, env=d.env, capture_output=True, text=True, timeout=10)
        assert bad.returncode != 0
        with pytest.raises(XsError, match="EINVAL"):
            d0.control("stats", "x")


def test_stats_fits_one_reply_with_hundreds_of_domains() -> None:
    """The whole-daemon view lists the busiest domains and says how many more lines there were."""
    m = metrics.Metrics()
    state = metrics.State(domains={d: metrics.DomainState(requests=d, nodes=3) for d in range(1, 600)})
    text = metrics.report(m, state)
    assert len(text.encode()) < 4000
    assert "more lines" in text.splitlines()[-1]
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("domid"))
    assert lines[head + 1].split()[0] == "599"  # busiest first


# ----------------------------------------------------------------------------- units
def test_histogram_buckets_hold_their_values() -> None:
    rng = random.Random(1)
    values = [0, 1, 2, 3, 4, 5, 7, 8, 1023, 1024, 1025, 5000, 2**22 - 1, 2**22, 2**40 + 12345, 2**63 - 1]
    values += [rng.randrange(1, 2**34) for _ in range(5000)]
    for ns in values:
        i = metrics.bucket_of(ns)
        low, high = metrics.bucket_bounds(i)
        assert low <= ns < high, (ns, i, low, high)
        assert 0 <= i < metrics.BUCKETS
        assert (high - low) <= max(1, low // 4)  # a quarter of an octave at most
        if ns >= 1024:  # the dispatcher's table is exact from 1 us up
            assert metrics.bucket(ns) == i, ns
    assert [metrics.bucket_of(v) for v in sorted(values)] == sorted(metrics.bucket_of(v) for v in values)


def test_histogram_percentiles() -> None:
    m = metrics.Metrics()
    # 10,000 durations uniform over 10..110 us: p50 60, p90 100, p99 109 us.
    for k in range(10_000):
        m.observe(Op.READ, 10_000 + k * 10)
    h = m.latency[Op.READ]
    assert sum(h) == 10_000
    for q, want in ((0.5, 60_000), (0.9, 100_000), (0.99, 109_000)):
        got = metrics.percentile(h, q)
        assert got is not None and abs(got - want) / want < 0.05, (q, got, want)
    exact = sum(10_000 + k * 10 for k in range(10_000))
    assert abs(metrics.estimated_sum(h) - exact) / exact < 0.02
    # One value: every quantile is inside its bucket.
    one = [0] * metrics.BUCKETS
    one[metrics.bucket_of(123_456)] += 1
    low, high = metrics.bucket_bounds(metrics.bucket_of(123_456))
    for q in metrics.QUANTILES:
        assert low <= metrics.percentile(one, q) <= high
    # Two clusters: the median sits in the lower, p99 in the upper.
    two = [0] * metrics.BUCKETS
    two[metrics.bucket_of(2_000)] += 900
    two[metrics.bucket_of(1_000_000)] += 100
    assert metrics.percentile(two, 0.5) < 2_500
    assert 800_000 < metrics.percentile(two, 0.99) < 1_250_000
    assert metrics.percentile([0] * metrics.BUCKETS, 0.5) is None


def test_dispatch_counts_requests_errors_and_latency() -> None:
    """In-process: each request lands in its op's histogram, errors by name, unknown op codes
    in their own slot; a commit conflict, a commit and a transaction lost in a restart are
    counted."""
    core = Core()
    conn = core.new_connection()
    dispatch(core, conn, Message(Op.WRITE, 1, 0, b"/tool/a\0v"))
    dispatch(core, conn, Message(Op.READ, 2, 0, b"/tool/a\0"))
    dispatch(core, conn, Message(Op.READ, 3, 0, b"/tool/b\0"))
    dispatch(core, conn, Message(0xFFFF, 4, 0, b""))
    lat = core.metrics.latency
    assert sum(lat[Op.WRITE]) == 1 and sum(lat[Op.READ]) == 2 and sum(lat[metrics.UNKNOWN_OP]) == 1
    assert core.metrics.error_counts() == {(0, "ENOENT"): 1, (0, "ENOSYS"): 1}
    other = core.new_connection()
    tx = int(_reply(core, conn, Message(Op.TRANSACTION_START, 5, 0, b"\0")).rstrip(b"\0"))
    dispatch(core, conn, Message(Op.READ, 6, tx, b"/tool/a\0"))
    dispatch(core, other, Message(Op.WRITE, 7, 0, b"/tool/a\0w"))
    dispatch(core, conn, Message(Op.WRITE, 8, tx, b"/tool/c\0x"))
    dispatch(core, conn, Message(Op.TRANSACTION_END, 9, tx, b"T\0"))
    assert core.metrics.conflicts == {0: 1}
    tx = int(_reply(core, conn, Message(Op.TRANSACTION_START, 10, 0, b"\0")).rstrip(b"\0"))
    dispatch(core, conn, Message(Op.TRANSACTION_END, 11, tx, b"T\0"))
    assert core.metrics.committed == {0: 1}
    # A transaction a previous daemon process had open (recovery marks its id lost).
    conn.lost_transactions.add(77)
    dispatch(core, conn, Message(Op.READ, 12, 77, b"/tool/a\0"))
    assert core.metrics.lost == {0: 1}
    text = metrics.prometheus(core.metrics, core.metrics_state())
    samples = parse(text)
    assert value(samples, "xenstored_errors_total", domid=0, error="EAGAIN") == 2
    assert value(samples, "xenstored_transactions_lost_total", domid=0) == 1
    assert value(samples, "xenstored_transaction_conflicts_total", domid=0) == 1
    assert value(samples, "xenstored_request_duration_seconds_count", op="unknown") == 1


def _reply(core: Core, conn, msg: Message) -> bytes:
    conn.take_output()
    dispatch(core, conn, msg)
    return conn.take_output()[16:]


def test_config_keys_and_options(tmp_path) -> None:
    conf = tmp_path / "x.conf"
    conf.write_text("metrics-file = /var/lib/node-exporter/xenstored.prom\nmetrics-interval = 30\n")
    cfg = Config()
    assert cfg.metrics_file is None and cfg.metrics_interval == 15.0
    load_file(cfg, str(conf))
    assert cfg.metrics_file == "/var/lib/node-exporter/xenstored.prom" and cfg.metrics_interval == 30.0
    from xenstored.cli import config_from_args

    cfg, _ = config_from_args(["--metrics-file", "m.prom", "--metrics-interval", "5"])
    assert cfg.metrics_file == os.path.abspath("m.prom") and cfg.metrics_interval == 5.0


def test_an_unwritable_metrics_file_is_logged_once_and_the_daemon_serves_on() -> None:
    d = start_daemon("--metrics-file", "/nonexistent-dir/xenstored.prom", "--metrics-interval", "1")
    try:
        with SyncClient(d.socket) as c:
            deadline = time.monotonic() + 5
            while "metrics: cannot write" not in d.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.5)  # another attempt has failed meanwhile
            c.write("/tool/still", "serving")
            assert c.read("/tool/still") == b"serving"
        assert d.log().count("metrics: cannot write") == 1, d.log()
    finally:
        rc = stop_daemon_process(d.proc)
        shutil.rmtree(d.rundir, ignore_errors=True)
    assert rc == 0


def test_sample_values_keep_their_precision() -> None:
    """A Unix time keeps its digits (%g would round it to 1.79641921e+09), durations lose only
    what is below a nanosecond."""
    m = metrics.Metrics()
    m.started = 1796419206.127
    m.observe(Op.READ, 391_905)
    text = metrics.prometheus(m, metrics.State())
    assert "xenstored_start_time_seconds 1796419206.127\n" in text
    assert re.search(r'^xenstored_request_duration_seconds\{op="READ",quantile="0.5"\} 0\.000\d+$', text, re.MULTILINE)
    assert 'xenstored_request_duration_seconds_count{op="READ"} 1\n' in text
