"""Split drivers through the daemon: a blkback process in dom0 (socket) and a blkfront process in
a guest (its emulated ring) bring a virtual block device up and down, as xen-blkback,
xen-blkfront and libxl do on a real host.

Why end to end with separate processes: the vbd handshake is what every PV guest's boot waits on,
and it exercises what unit tests cannot: watches firing across connections of different kinds,
permission inheritance in libxl's device layout, the XSA-115 event filter letting exactly the
right events through, transactions from a ring, and a dead connection's watches going away.
The toolstack (libxl's part) is the test itself, as dom0 over the socket.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from robustness import GUESTS, assert_healthy, fx, genv

from xenstored.client import SyncClient

sys.path.insert(0, GUESTS)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xenbus import (
    State,
    backend_path,
    domain_destroy,
    domain_make,
    frontend_path,
    read_state,
    vbd_add,
    vbd_destroy,
    vbd_remove_start,
)

from bench.bench_domains import run_wave

TIMEOUT = 20.0


class Program:
    """A driver process whose JSON stdout lines are collected by a thread, so the test can wait
    for one with a deadline instead of blocking on a pipe."""

    def __init__(self, daemon, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(GUESTS, script), *args],
            env=genv(daemon),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._seen = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(json.loads(line))
        self._q.put(None)

    def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next line (after those already looked at) that satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        for line in self.lines[self._seen :]:
            self._seen += 1
            if pred(line):
                return line
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching line within {timeout}s; got {self.lines}") from None
            if line is None:
                raise AssertionError(f"exited ({self.proc.poll()}) without a matching line; got {self.lines}; "
                                     f"stderr: {self.stderr()}")
            self.lines.append(line)
            self._seen += 1
            if pred(line):
                return line

    def drain(self) -> list[dict[str, Any]]:
        """Wait for the exit and return every line."""
        self.proc.wait(TIMEOUT)
        while True:
            line = self._q.get(timeout=TIMEOUT)
            if line is None:
                return self.lines
            self.lines.append(line)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def collect(self) -> list[dict[str, Any]]:
        """Every line printed so far (without waiting)."""
        while True:
            try:
                line = self._q.get_nowait()
            except queue.Empty:
                return self.lines
            if line is None:
                self._q.put(None)  # keep the end marker for expect() and drain()
                return self.lines
            self.lines.append(line)

    def states(self, domid: int, key: str = "state") -> list[int]:
        self.collect()
        return [ln[key] for ln in self.lines if ln.get("dom") == domid and key in ln]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def d0(daemon):
    with SyncClient(daemon.socket) as c:
        yield c


@pytest.fixture
def programs():
    started: list[Program] = []
    yield started
    for p in started:
        p.stop()


def wait_states(c: SyncClient, want: dict[str, State], timeout: float = TIMEOUT) -> None:
    """The toolstack's libxl__ev_devstate_wait: watch each ``<dir>/state``, re-read on events."""
    tokens = {f"st{i}": path for i, path in enumerate(want)}
    for token, path in tokens.items():
        c.watch(f"{path}/state", token)
    try:
        deadline = time.monotonic() + timeout
        pending = dict(want)
        while True:
            for path in list(pending):
                if read_state(c, path) == pending[path]:
                    del pending[path]
            if not pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"states not reached: {pending} (now "
                                     f"{ {p: read_state(c, p) for p in pending} })")
            try:
                c.read_watch(timeout=left)
            except TimeoutError:
                pass
    finally:
        for token, path in tokens.items():
            c.unwatch(f"{path}/state", token)


def dedup(xs: list[int]) -> list[int]:
    return [x for i, x in enumerate(xs) if i == 0 or xs[i - 1] != x]


def in_order(seen: list[int], order: list[int]) -> bool:
    """``seen`` is ``order`` with some states skipped, none repeated or reversed."""
    it = iter(order)
    return all(any(x == y for y in it) for x in seen)


def memreport(daemon, c: SyncClient) -> dict[str, int]:
    """``watches`` and ``connections`` from CONTROL memreport (written to a file of ours)."""
    path = os.path.join(daemon.rundir, "memreport.txt")
    with open(path, "w"):
        pass
    c.control("memreport", path)
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("watches", "connections"):
                out[key] = int(value.split()[0])
    return out


def test_vbd_handshake_and_hot_unplug(daemon, d0, programs):
    """Initialising -> InitWait -> Initialised -> Connected on both sides, then libxl's
    hot-unplug (online=0, Closing) to Closed and the removal of both halves."""
    domid = 7
    fe, be = frontend_path(domid), backend_path(domid)
    domain_make(d0, fx(daemon), domid)
    backend = Program(daemon, "blkback.py", "--verbose")
    programs.append(backend)
    backend.expect(lambda ln: ln.get("ready"))
    vbd_add(d0, domid)
    # libxl's layout: the frontend half is the guest's, readable by the backend domain; the
    # backend half is dom0's, readable by the guest; nodes inherit their directory's perms.
    assert d0.get_perms(fe) == [f"n{domid}", "r0"]
    assert d0.get_perms(f"{fe}/state") == [f"n{domid}", "r0"]
    assert d0.get_perms(be) == ["n0", f"r{domid}"]
    assert d0.get_perms(f"{be}/params") == ["n0", f"r{domid}"]
    backend.expect(lambda ln: ln.get("dom") == domid and ln.get("state") == State.INIT_WAIT)

    frontend = Program(daemon, "blkfront.py", str(domid), "--verbose", "--exit-when-unplugged")
    programs.append(frontend)
    connected = frontend.expect(lambda ln: ln.get("state") == State.CONNECTED)
    wait_states(d0, {fe: State.CONNECTED, be: State.CONNECTED})
    assert connected["disk"] == {
        "sectors": "2097152", "info": "0", "sector-size": "512", "physical-sector-size": "4096",
        "feature-flush-cache": "1", "feature-discard": "1", "feature-persistent": "1",
        "feature-max-indirect-segments": "32",
    }
    # What the frontend published, owned by the guest and readable by dom0 (inherited perms).
    assert d0.read(f"{fe}/ring-ref") == b"776" and d0.read(f"{fe}/event-channel") == b"778"
    assert d0.read(f"{fe}/protocol") == b"x86_64-abi"
    assert d0.get_perms(f"{fe}/ring-ref") == [f"n{domid}", "r0"]
    assert d0.get_perms(f"{be}/sectors") == ["n0", f"r{domid}"]

    vbd_remove_start(d0, domid)
    wait_states(d0, {fe: State.CLOSED, be: State.CLOSED})
    backend.expect(lambda ln: ln.get("dom") == domid and ln.get("unregistered"))
    vbd_destroy(d0, domid)
    lines = frontend.drain()  # the frontend exits once its device directory is gone
    assert frontend.proc.returncode == 0, frontend.stderr()
    assert lines[-1] == {"exit": True, "errors": 0}
    assert frontend.states(domid) == [State.INITIALISED, State.CONNECTED, State.CLOSING, State.CLOSED]
    seen = dedup(frontend.states(domid, "be"))
    assert seen[-4:] == [State.INIT_WAIT, State.CONNECTED, State.CLOSING, State.CLOSED], seen
    # A watch event names the path, not the value: a side that reads the other's state late sees
    # only the newest one (Linux's drivers too), so the backend may miss the frontend's short
    # Closing, or Connected when the toolstack unplugs at once.  It reacts in order all the same.
    be_states = backend.states(domid)
    assert be_states in ([State.INIT_WAIT, State.CONNECTED, State.CLOSING, State.CLOSED],
                         [State.INIT_WAIT, State.CONNECTED, State.CLOSED]), be_states
    fe_seen = dedup(backend.states(domid, "fe"))
    assert in_order(fe_seen, [State.INITIALISING, State.INITIALISED, State.CONNECTED, State.CLOSING,
                              State.CLOSED]), fe_seen
    assert State.INITIALISED in fe_seen and fe_seen[-1] == State.CLOSED, fe_seen
    assert not d0.exists(fe) and not d0.exists(be) and not d0.exists(f"/local/domain/0/backend/vbd/{domid}")
    assert not [ln for ln in backend.collect() if "error" in ln]
    domain_destroy(d0, fx(daemon), domid)
    assert_healthy(daemon)


def test_backend_killed_mid_handshake_and_a_new_one_takes_over(daemon, d0, programs):
    """kill -9 of the backend after InitWait: the frontend stays Initialised, the daemon drops the
    dead connection and its watches, and a new backend process completes the handshake."""
    domid = 8
    fe, be = frontend_path(domid), backend_path(domid)
    domain_make(d0, fx(daemon), domid)
    vbd_add(d0, domid)
    before = memreport(daemon, d0)
    first = Program(daemon, "blkback.py", "--freeze-at", str(int(State.INITIALISED)))
    programs.append(first)
    frontend = Program(daemon, "blkfront.py", str(domid), "--verbose")
    programs.append(frontend)
    first.expect(lambda ln: ln.get("frozen"))  # it saw Initialised and hangs before connecting
    # The backend's connection, with its bus and otherend watches; the frontend's two watches.
    assert memreport(daemon, d0) == {"watches": before["watches"] + 4, "connections": before["connections"] + 1}
    first.proc.kill()
    first.proc.wait(TIMEOUT)

    # The toolstack sees the backend's connection and both its watches (bus, otherend) gone.
    deadline = time.monotonic() + TIMEOUT
    while memreport(daemon, d0) != dict(before, watches=before["watches"] + 2):
        assert time.monotonic() < deadline, memreport(daemon, d0)
        time.sleep(0.02)
    # Nobody moves: the frontend waits in Initialised for a backend that is in InitWait.
    time.sleep(0.3)
    assert (read_state(d0, fe), read_state(d0, be)) == (State.INITIALISED, State.INIT_WAIT)
    assert frontend.states(domid) == [State.INITIALISED]

    second = Program(daemon, "blkback.py")
    programs.append(second)
    wait_states(d0, {fe: State.CONNECTED, be: State.CONNECTED})
    frontend.expect(lambda ln: ln.get("state") == State.CONNECTED)
    assert frontend.states(domid) == [State.INITIALISED, State.CONNECTED]
    # The new backend re-announced InitWait (ignored by a frontend that is past Initialising).
    second.expect(lambda ln: ln.get("state") == State.CONNECTED)
    assert second.states(domid) == [State.INIT_WAIT, State.CONNECTED]
    assert d0.read(f"{be}/sectors") == b"2097152"

    vbd_remove_start(d0, domid)
    wait_states(d0, {fe: State.CLOSED, be: State.CLOSED})
    vbd_destroy(d0, domid)
    frontend.stop()
    assert not [ln for ln in frontend.collect() + second.collect() if "error" in ln]
    domain_destroy(d0, fx(daemon), domid)
    assert_healthy(daemon)


def test_fifty_domains_connect_at_once(daemon):
    """bench.bench_domains reduced: 50 domains in 2 blkfront processes against 2 blkback
    processes, all Connected on both sides, then unplugged and released, with no error.
    (Counts only: timings on a shared machine belong to the benchmark, not to a test.)"""
    r = run_wave(daemon.socket, fx(daemon), list(range(100, 150)), frontends=2, backends=2, timeout=60.0)
    assert r["errors"] == 0, r["error_samples"]
    assert r["connected"] == r["both_connected"] == 50, r
    assert "destroy_per_domain_ms" in r, r  # the teardown ran to the end
    with SyncClient(daemon.socket) as c:
        assert not c.exists("/local/domain/0/backend/vbd") or c.ls("/local/domain/0/backend/vbd") == []
        assert [d for d in c.ls("/local/domain") if d != "0"] == []
    assert_healthy(daemon)
