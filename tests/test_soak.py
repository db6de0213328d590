"""A short soak in CI: ~15 s of mixed socket and guest load with domains coming and going.

bench/soak.py is the full tool (minutes, more clients); this runs its core on the test's daemon
and holds it to the same verdict: only expected errors (EAGAIN), no lost watch events for readers,
a consistent store, and no runaway RSS growth.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from robustness import assert_healthy, fx

from bench.soak import soak


def test_short_soak(daemon):
    """Mixed load for 15 s: throughput, errors by kind, lost events and RSS trend."""
    report = soak(daemon.socket, fx(daemon), daemon.proc.pid, seconds=15, sockets=3, guests=2, guest_ops=250)
    print(report)
    assert report["unexpected_errors"] == {}, report
    assert report["watch_events_lost"] == 0, report
    assert report["check"] == "OK"
    assert report["ops"] > 1000 and report["domains_cycled"] >= 2, report
    # Generous: warm-up and allocator noise, not a leak, fit in 20 MiB over a short run.
    assert report["rss_kib_max"] - report["rss_kib_first"] < 20 * 1024, report
    assert_healthy(daemon)
