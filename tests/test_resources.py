"""Bounded resources: what a guest that never reads can make the daemon hold.

A guest that floods requests without reading replies, or registers watches and never reads the
events, must cost the daemon at most its memory quota (2.5 MiB by default).  These tests measure
the daemon process's RSS (VmRSS) during such floods and assert a generous bound, and check the
daemon's own accounting (CONTROL ``quota <domid>``) against the quota.
"""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import start_daemon, stop_daemon_process
from robustness import GUESTS, assert_healthy, guest, introduce, quota_usage, rss_kib, spawn

from xenstored.client import SyncClient
from xenstored.wire import Op

QUOTA = 2560 * 1024


@pytest.fixture
def d0(daemon):
    with SyncClient(daemon.socket) as c:
        yield c


def test_request_flood_without_reading_replies_is_bounded(daemon, d0):
    """Three guests pipeline requests for 2 s and never read a reply: the daemon stops reading
    their rings (outstanding quota) instead of buffering, so its RSS barely moves."""
    for domid in (3, 4, 5, 6):
        introduce(d0, daemon, domid)
    rss0 = rss_kib(daemon.proc.pid)
    floods = [spawn(daemon, f"{GUESTS}/hostile.py", str(d), "flood-no-read") for d in (3, 4, 5)]
    peak = rss0
    try:
        while any(p.poll() is None for p in floods):
            peak = max(peak, rss_kib(daemon.proc.pid))
            for d in (3, 4, 5):
                u = quota_usage(d0, d)
                assert u["outstanding"] <= 20 and u["memory"] <= QUOTA, (d, u)
            time.sleep(0.1)
    finally:
        for p in floods:
            p.kill()
            p.wait()
    print(f"request flood: RSS {rss0} -> peak {peak} KiB")
    assert peak - rss0 < 8 * 1024
    with guest(daemon, 6) as other:
        assert_healthy(daemon, other)


def test_watch_event_flood_without_reading_is_bounded(daemon, d0):
    """A guest with 128 watches that never reads: ~60 MB of events are generated for it, the
    daemon keeps at most the memory quota of them and drops the rest."""
    introduce(d0, daemon, 5)
    rss0 = rss_kib(daemon.proc.pid)
    with guest(daemon, 5) as g:
        for i in range(128):
            g.request(Op.WATCH, b"/local/domain/5\0t%03d" % i + b"p" * 100 + b"\0")
        peak = rss0
        with d0.transaction() as t:
            t.write("/local/domain/5/v", "")
        for i in range(3000):
            d0.request(Op.WRITE, b"/local/domain/5/k\0" + b"%d" % i)
            if i % 250 == 0:
                peak = max(peak, rss_kib(daemon.proc.pid))
                assert quota_usage(d0, 5)["memory"] <= QUOTA + 64 * 1024
        peak = max(peak, rss_kib(daemon.proc.pid))
    print(f"watch-event flood: RSS {rss0} -> peak {peak} KiB")
    assert peak - rss0 < 16 * 1024
    assert_healthy(daemon)


def test_unread_events_respect_the_whole_memory_quota(daemon, d0):
    """The memory quota covers nodes, watches and queued output together (C rule)."""
    introduce(d0, daemon, 5)
    with guest(daemon, 5) as g:
        g.write("big", "b" * 2000)
        for i in range(128):
            g.request(Op.WATCH, b"/local/domain/5\0t%03d" % i + b"p" * 100 + b"\0")
        for i in range(600):
            d0.request(Op.WRITE, b"/local/domain/5/k\0" + b"%d" % i)
        u = quota_usage(d0, 5)
        assert u["memory"] <= QUOTA, u


def test_unread_watch_events_expire():
    """Events an unprivileged guest has not started reading within watch-event seconds are
    discarded (C: 20 s default), so a stalled guest does not hold them forever."""
    daemon = start_daemon("-w", "watch-event=1")
    try:
        with SyncClient(daemon.socket) as d0:
            introduce(d0, daemon, 5)
            with guest(daemon, 5) as g:
                g.watch("/local/domain/5", "tok")
                for i in range(200):
                    d0.write(f"/local/domain/5/k{i % 10}", "x" * 100)
                held = quota_usage(d0, 5)["outstanding"]
                assert held > 20
                time.sleep(2.5)
                d0.write("/local/domain/5/poke", "")  # any activity lets expiry run
                time.sleep(0.3)
                assert quota_usage(d0, 5)["outstanding"] <= 2
    finally:
        stop_daemon_process(daemon.proc)
        shutil.rmtree(daemon.rundir, ignore_errors=True)
