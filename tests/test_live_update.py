"""Live update: the daemon replaces itself with a new process through Xen's own xenstore-control,
in the middle of traffic, and no client notices (beyond a pause)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from test_cli_tools import xenstore_control
from test_domains import GUESTS, introduce, spawn_guest

from xenstored.client import SyncClient
from xenstored.wire import XsError


def live_update(daemon, *extra: str) -> subprocess.CompletedProcess[str]:
    """``xenstore-control live-update -c <cmdline> <binary>``: the new process is this Python."""
    cmdline = f"-m xenstored -N --rundir {daemon.rundir}"
    return subprocess.run(
        [xenstore_control(), "live-update", *extra, "-c", cmdline, sys.executable],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class SocketWorker(threading.Thread):
    """A dom0 client writing and reading back its own keys, with a watch on them."""

    def __init__(self, daemon, n: int, rounds: int) -> None:
        super().__init__(daemon=True)
        self.sock, self.n, self.rounds = daemon.socket, n, rounds
        self.error: BaseException | None = None
        self.events = 0
        self.client = SyncClient(self.sock)

    def run(self) -> None:
        try:
            c = self.client
            c.watch(f"/sc/{self.n}", "w")
            for i in range(self.rounds):
                c.write(f"/sc/{self.n}/k", str(i))
                assert c.read(f"/sc/{self.n}/k") == str(i).encode()
                time.sleep(0.002)
        except (OSError, AssertionError, XsError) as e:  # reported by the test
            self.error = e


def test_live_update_in_the_middle_of_traffic(daemon):
    d0 = SyncClient(daemon.socket)
    guests = (41, 42, 43, 44, 45)
    for domid in guests:
        introduce(d0, daemon, domid)
    workers = [SocketWorker(daemon, n, 300) for n in range(10)]
    for w in workers:
        w.start()
    procs = [spawn_guest(daemon, f"{GUESTS}/worker.py", str(d), "500") for d in guests]
    time.sleep(0.3)
    pid = daemon.proc.pid
    start = time.perf_counter()
    r = live_update(daemon)
    took = time.perf_counter() - start
    assert r.returncode == 0, r.stdout + r.stderr
    assert "live update: exec" in daemon.log()
    for w in workers:
        w.join(60)
        assert not w.is_alive()
        assert w.error is None, repr(w.error)
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        result = json.loads(out)
        assert result["errors"] == {} and result["done"] == 500, result
    # Same process (exec), every client still connected, watches still firing.
    assert daemon.proc.poll() is None and daemon.proc.pid == pid
    assert daemon.log().count("restored") == 1
    for w in workers:
        d0.write(f"/sc/{w.n}/after", "x")
        deadline = time.monotonic() + 10
        while w.client.read_watch(timeout=max(deadline - time.monotonic(), 0.01)) != (f"/sc/{w.n}/after", "w"):
            pass  # events of the writes before it come first
    for domid in guests:
        assert d0.read(f"/local/domain/{domid}/data/tx")
    print(f"live update under traffic: {took:.2f}s")


def test_live_update_keeps_nodes_perms_watches_and_guests(daemon):
    d0 = SyncClient(daemon.socket)
    introduce(d0, daemon, 46)
    d0.write("/keep/me", b"bin\0ary")
    d0.set_perms("/keep/me", ["n46", "r0"])
    d0.set_perms("@releaseDomain", ["n0", "r46"])
    d0.watch("/keep", "k")
    assert d0.read_watch(timeout=5) == ("/keep", "k")
    assert live_update(daemon).returncode == 0
    assert d0.read("/keep/me") == b"bin\0ary"
    assert d0.get_perms("/keep/me") == ["n46", "r0"]
    assert d0.get_perms("@releaseDomain") == ["n0", "r46"]
    d0.write("/keep/new", "1")
    assert d0.read_watch(timeout=5) == ("/keep/new", "k")
    r = subprocess.run(
        [sys.executable, "-m", "xenstored.guest", "46", "read", "/keep/me"],
        env=dict(daemon.env, FAKEXEN_DIR=os.path.join(daemon.rundir, "fx")),
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert r.returncode == 0 and r.stdout.rstrip(b"\n") == b"bin\0ary", r.stderr


def test_live_update_waits_for_transactions_then_refuses_or_forces(daemon):
    d0 = SyncClient(daemon.socket)
    d0.write("/t", "0")
    other = SyncClient(daemon.socket)
    tx = other.transaction_start()
    other.write("/t", "1", tx)
    time.sleep(1.2)
    r = live_update(daemon, "-t", "1")
    assert r.returncode != 0
    assert "transactions still open" in r.stdout + r.stderr
    other.transaction_end(tx)  # the daemon did not restart: the transaction is intact
    assert d0.read("/t") == b"1"
    tx = other.transaction_start()
    time.sleep(1.2)
    r = live_update(daemon, "-F", "-t", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        other.transaction_end(tx)
        raise AssertionError("a forced live update discards open transactions")
    except XsError as e:
        assert e.name == "ENOENT"


def test_a_live_update_to_a_broken_binary_is_refused_and_the_old_daemon_serves_on(daemon, tmp_path):
    """A new binary that cannot start (or cannot read the state) must not take the store with
    it: the old daemon checks it first, answers the requester with why, and keeps everything."""
    with SyncClient(daemon.socket) as d0:
        d0.write("/before", "kept")
        broken = tmp_path / "xenstored-broken"
        broken.write_text("#!/bin/sh\necho 'ImportError: no module named trio' >&2\nexit 1\n")
        broken.chmod(0o755)
        done = subprocess.run(
            [xenstore_control(), "live-update", str(broken)],
            env=daemon.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        out = done.stdout + done.stderr
        assert "failed its start-up check (exit 1)" in out and "no module named trio" in out, out
        assert "still running the old daemon" in out
        assert d0.read("/before") == b"kept"
        d0.write("/after", "1")
        assert daemon.proc.poll() is None
        # A working binary afterwards still updates.
        ok = live_update(daemon)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    with SyncClient(daemon.socket) as d0:
        assert d0.read("/after") == b"1"
    assert "live update refused" in daemon.log()
