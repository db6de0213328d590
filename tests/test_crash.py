"""Crash-only: ``kill -9`` the daemon at any moment, start it again with the same command, and
everything acknowledged is there, every guest carries on (SPEC: the journal, issue 13).

Each test kills a real daemon process with SIGKILL and starts the next one on the same run
directory, exactly as an operator (or systemd's ``Restart=always``) would.  Guests are separate
processes or in-process ``xenstored.guest`` clients over the emulated rings: they outlive the
daemon, as a real guest does.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, _clean_env, _wait_accepting, start_daemon, stop_daemon_process
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from robustness import GUESTS, fx, guest, introduce, spawn, wait_until

from xenstored import guest as guestlib
from xenstored.client import SyncClient
from xenstored.wire import Op, XsError, encode

ARGS = ("--emulate",)


def crash_and_restart(d: Daemon) -> Daemon:
    """SIGKILL, then the same command on the same run directory."""
    d.expect_exit = True
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    return start_daemon(*ARGS, rundir=d.rundir)


@pytest.fixture
def crashing():
    """Daemons started by a test, stopped at its end; a traceback in any log fails it."""
    started: list[Daemon] = []

    def start(rundir: str | None = None) -> Daemon:
        d = start_daemon(*ARGS, rundir=rundir)
        started.append(d)
        return d

    def restart(d: Daemon) -> Daemon:
        d2 = crash_and_restart(d)
        started.append(d2)
        return d2

    yield start, restart
    logs = []
    for d in started:
        stop_daemon_process(d.proc)
        logs.append(d.log())
    text = "\n".join(logs)
    assert "Traceback (most recent call last)" not in text, text


def test_acknowledged_writes_survive_with_their_permissions_and_removals_stay_removed(crashing):
    start, restart = crashing
    d = start()
    with SyncClient(d.socket) as d0:
        for i in range(50):
            d0.write(f"/vm/n{i}", f"v{i}")
        d0.set_perms("/vm/n3", ["n0", "r7"])
        d0.rm("/vm/n4")
        d0.write("/vm/big", "x" * 4000)
        d0.request(Op.SET_QUOTA, b"nodes\0" + b"1234\0")
    d = restart(d)
    with SyncClient(d.socket) as d0:
        assert sorted(d0.ls("/vm")) == sorted([f"n{i}" for i in range(50) if i != 4] + ["big"])
        assert d0.read("/vm/n49") == b"v49"
        assert d0.get_perms("/vm/n3") == ["n0", "r7"]
        assert d0.read("/vm/big") == b"x" * 4000
        assert d0.request(Op.GET_QUOTA, b"nodes\0") == b"1234\0"
        assert d0.control("check") == "OK"
    assert "recovered from the journal" in d.log()


def test_a_guest_carries_on_without_a_new_introduce(crashing):
    start, restart = crashing
    d = start()
    with SyncClient(d.socket) as d0:
        introduce(d0, d, 5)
        d0.set_perms("/local/domain/5", ["n5"])
    with guest(d, 5, timeout=20) as g:
        g.write("data/x", "before")
        g.watch("data", "tok")
        assert g.wait_event() == ("data", "tok")
        d = restart(d)
        assert g.read("data/x") == b"before"
        g.write("data/y", "after")
        assert g.wait_event() == ("data/y", "tok")  # a watch from before the crash, on its own write
        with SyncClient(d.socket) as d0:
            assert d0.request(Op.IS_DOMAIN_INTRODUCED, b"5\0") == b"T\0"
            d0.write("/local/domain/5/data/z", "from dom0")
            assert d0.get_perms("/local/domain/5/data/y") == ["n5"]
        assert g.wait_event() == ("data/z", "tok")
        g.write("health", "5")
    with SyncClient(d.socket) as d0:
        assert d0.control("check") == "OK"


def test_an_open_transaction_ends_with_eagain_and_leaves_nothing(crashing):
    start, restart = crashing
    d = start()
    with SyncClient(d.socket) as d0:
        introduce(d0, d, 6)
    with guest(d, 6, timeout=20) as g:
        tx = g.transaction_start()
        g.write("data/in-tx", "1", tx)
        other = g.transaction_start()
        d = restart(d)
        with pytest.raises(XsError) as e:
            g.write("data/more", "1", tx)
        assert e.value.name == "EAGAIN"
        with pytest.raises(XsError) as e:
            g.transaction_end(tx)
        assert e.value.name == "EAGAIN"
        with pytest.raises(XsError) as e:
            g.transaction_end(other)
        assert e.value.name == "EAGAIN"
        with pytest.raises(XsError) as e:
            g.read("data/in-tx")
        assert e.value.name == "ENOENT"
        # Once ended, the id is unknown, and new transactions get ids the guest never had.
        with pytest.raises(XsError) as e:
            g.transaction_end(tx)
        assert e.value.name == "ENOENT"
        new = g.transaction_start()
        assert new not in (tx, other)
        g.write("data/in-new", "1", new)
        g.transaction_end(new)
        assert g.read("data/in-new") == b"1"


def test_a_guest_destroyed_while_the_daemon_is_down_is_released_after_the_restart(crashing):
    start, _restart = crashing
    d = start()
    with SyncClient(d.socket) as d0:
        introduce(d0, d, 7)
        introduce(d0, d, 8)
        d0.write("/local/domain/7/data", "seven")
    with guest(d, 8, timeout=20) as watcher:
        watcher.watch("@releaseDomain", "gone")
        assert watcher.wait_event() == ("@releaseDomain", "gone")
        d.expect_exit = True
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        # The hypervisor outlives the daemon: the domain dies with nobody watching.
        assert guestlib.control("destroy 7", fx(d)) == "ok destroy 7"
        d = start(d.rundir)
        assert watcher.wait_event() == ("@releaseDomain", "gone")
        with SyncClient(d.socket) as d0:
            assert d0.request(Op.IS_DOMAIN_INTRODUCED, b"7\0") == b"F\0"
            assert d0.request(Op.IS_DOMAIN_INTRODUCED, b"8\0") == b"T\0"
            assert "7" not in d0.ls("/local/domain")
        watcher.write("still", "here")


def test_replies_and_events_queued_for_a_ring_are_delivered_once_after_a_crash(crashing):
    """More events than the ring holds, the guest reading none of them: after the restart it
    gets every one, in order, none twice (the journal's positions against rsp_prod)."""
    start, restart = crashing
    d = start()
    with SyncClient(d.socket) as d0:
        introduce(d0, d, 9)
    with guest(d, 9, timeout=20) as g:
        g.watch("ev", "t")
        with SyncClient(d.socket) as d0:
            for i in range(60):
                d0.write(f"/local/domain/9/ev/n{i:02}", "x")
        time.sleep(0.3)
        d = restart(d)
        got = [g.wait_event() for _ in range(61)]
        assert got == [("ev", "t")] + [(f"ev/n{i:02}", "t") for i in range(60)]
        g.write("after", "1")
        assert g.read("after") == b"1"
        assert not g.events


def test_a_request_half_written_before_the_crash_is_completed_after_it(crashing):
    start, restart = crashing
    d = start()
    with SyncClient(d.socket) as d0:
        introduce(d0, d, 10)
    with guest(d, 10, timeout=20) as g:
        g.write("x", "whole")
        payload = b"y\0" + b"z" * 1500  # larger than the ring: it is consumed in pieces
        req = encode(Op.WRITE, 4242, 0, payload)
        g.send_raw(req[:900])
        deadline = time.monotonic() + 5
        while g.ring.indexes()[0] < 900 + 0:  # the daemon took the first piece
            assert time.monotonic() < deadline
            time.sleep(0.01)
        d = restart(d)
        g.send_raw(req[900:])
        assert g.read("y") == b"z" * 1500
        assert g.read("x") == b"whole"


def test_a_torn_last_record_is_dropped_and_a_damaged_snapshot_stops_the_start(crashing):
    start, _restart = crashing
    d = start()
    with SyncClient(d.socket) as d0:
        d0.write("/kept", "1")
    d.expect_exit = True
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    jdir = os.path.join(d.rundir, "journal")
    newest = max((n for n in os.listdir(jdir) if n.startswith("journal.")), key=lambda n: int(n.split(".")[1]))
    with open(os.path.join(jdir, newest), "ab") as f:
        f.write(b"\x40\x00\x00\x00garbage")  # a record header promising more than is there
    d = start(d.rundir)
    with SyncClient(d.socket) as d0:
        assert d0.read("/kept") == b"1"
    assert "torn tail" in d.log()
    d.expect_exit = True
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    snap = next(n for n in os.listdir(jdir) if n.startswith("snapshot."))
    with open(os.path.join(jdir, snap), "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff\xff")
    with pytest.raises(RuntimeError) as e:
        start(d.rundir)
    assert "cannot recover from the journal" in str(e.value) and "move that directory away" in str(e.value)


def test_kill_9_at_random_points_under_guest_and_socket_traffic(crashing):
    """Three guests in their own processes (writes, removals, transactions), a socket client
    writing, and the daemon killed three times at random moments."""
    start, restart = crashing
    seed = int(os.environ.get("XS_CRASH_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    d = start()
    domids = (11, 12, 13)
    with SyncClient(d.socket) as d0:
        for domid in domids:
            introduce(d0, d, domid)
    procs = {domid: spawn(d, os.path.join(GUESTS, "crashy.py"), str(domid), "150") for domid in domids}

    acked: dict[str, int] = {}
    inflight: dict[str, int] = {}
    stop = threading.Event()
    socket_path = d.socket

    def socket_writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                with SyncClient(socket_path, timeout=5) as c:
                    while not stop.is_set():
                        key = f"/sock/k{i % 13}"
                        inflight[key] = i
                        c.write(key, str(i))
                        acked[key] = i
                        i += 1
            except (OSError, XsError, EOFError):
                time.sleep(0.02)  # the daemon is down: reconnect, as a libxenstore client would

    writer = threading.Thread(target=socket_writer, daemon=True)
    writer.start()
    kills = 0
    try:
        for _ in range(3):
            time.sleep(rnd.uniform(0.1, 0.7))
            d = restart(d)
            kills += 1
        results = {}
        for domid, p in procs.items():
            line = p.stdout.readline()  # type: ignore[union-attr]
            assert line, f"dom{domid} guest failed (seed {seed}): {p.stderr.read()}"  # type: ignore[union-attr]
            results[domid] = json.loads(line)
    finally:
        stop.set()
        writer.join(timeout=10)
    with SyncClient(d.socket) as d0:
        for domid in domids:
            assert d0.request(Op.IS_DOMAIN_INTRODUCED, f"{domid}\0".encode()) == b"T\0"
            home = f"/local/domain/{domid}"
            model = results[domid]["model"]
            have = {f"data/{n}": d0.read(f"{home}/data/{n}").decode() for n in d0.ls(f"{home}/data")}
            assert have == model, f"dom{domid} (seed {seed})"
            # Exactly once: every acknowledged commit counted, no request applied twice.
            assert int(have["data/counter"]) == results[domid]["commits"]
            d0.write(f"{home}/w/fire", "1")  # the watch each guest placed before the first kill
        for key, value in acked.items():
            got = int(d0.read(key))
            assert got in (value, inflight.get(key)), (key, got, value, seed)
        assert d0.control("check") == "OK"
    for domid, p in procs.items():
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert json.loads(line) == {"event": ["w/fire", "w"]}, (domid, seed)
        assert p.wait(10) == 0
    assert kills == 3


# ----------------------------------------------------------------------------- model test
KEYS = st.sampled_from([f"/m/k{i}" for i in range(6)] + ["/m/d/a", "/m/d/b"])
VALUES = st.binary(max_size=40)


class CrashMachine(RuleBasedStateMachine):
    """Operations and crashes mixed at random against a dict: after every crash the store is
    exactly the model (every acknowledged change, nothing removed coming back)."""

    daemon: Daemon | None = None  # one daemon for all examples: a crash restarts it in place
    total_crashes = 0

    @initialize()
    def fresh(self) -> None:
        cls = type(self)
        if cls.daemon is None or cls.daemon.proc.poll() is not None:
            cls.daemon = start_daemon(*ARGS)
            with SyncClient(cls.daemon.socket) as d0:
                introduce(d0, cls.daemon, 20)
        self.model: dict[str, tuple[bytes, list[str]]] = {}
        self.guest = guestlib.Guest(20, fx(cls.daemon), timeout=20)
        self.guest_model: dict[str, bytes] = {}
        with SyncClient(cls.daemon.socket) as d0:
            d0.rm("/m")
            d0.write("/m", "")
        for name in list(self.guest_model):
            self.guest.rm(name)
        self.guest.rm("g")
        self.crashes = 0

    def teardown(self) -> None:
        self.guest.close()

    def _parents(self, path: str) -> None:
        p = path.rsplit("/", 1)[0]
        while p != "/m" and p not in self.model:
            self.model[p] = (b"", ["n0"])
            p = p.rsplit("/", 1)[0]

    @rule(path=KEYS, value=VALUES)
    def write(self, path: str, value: bytes) -> None:
        with SyncClient(self.daemon.socket) as d0:
            d0.write(path, value)
        self._parents(path)
        old = self.model.get(path)
        self.model[path] = (value, old[1] if old else ["n0"])

    @rule(path=KEYS)
    def remove(self, path: str) -> None:
        with SyncClient(self.daemon.socket) as d0:
            try:
                d0.rm(path)
            except XsError as e:
                assert e.name == "ENOENT" and path.rsplit("/", 1)[0] not in self.model
                return
        for p in [p for p in self.model if p == path or p.startswith(path + "/")]:
            del self.model[p]

    @rule(path=KEYS, reader=st.sampled_from([3, 5, 20]))
    def set_perms(self, path: str, reader: int) -> None:
        if path not in self.model:
            return
        with SyncClient(self.daemon.socket) as d0:
            d0.set_perms(path, ["n0", f"r{reader}"])
        self.model[path] = (self.model[path][0], ["n0", f"r{reader}"])

    @rule(name=st.sampled_from(["g/a", "g/b", "g/c"]), value=VALUES)
    def guest_write(self, name: str, value: bytes) -> None:
        self.guest.write(name, value)
        self.guest_model[name] = value

    @rule()
    def crash(self) -> None:
        type(self).daemon = crash_and_restart(self.daemon)
        self.crashes += 1
        type(self).total_crashes += 1

    @invariant()
    def store_is_the_model(self) -> None:
        with SyncClient(self.daemon.socket) as d0:
            stack, have = ["/m"], {}
            while stack:
                p = stack.pop()
                for n in d0.ls(p):
                    c = f"{p}/{n}"
                    have[c] = (d0.read(c), d0.get_perms(c))
                    stack.append(c)
        assert have == self.model
        for name, value in self.guest_model.items():
            assert self.guest.read(name) == value


def test_operations_and_crashes_against_a_model() -> None:
    examples = int(os.environ.get("XS_CRASH_EXAMPLES", "100"))
    try:
        run_state_machine_as_test(
            CrashMachine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=6,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        if CrashMachine.daemon is not None:
            CrashMachine.daemon.expect_exit = True
            stop_daemon_process(CrashMachine.daemon.proc)
            log = CrashMachine.daemon.log()
            CrashMachine.daemon = None
            assert "Traceback (most recent call last)" not in log, log
    # Crash points tried, for the record (and so that a change that never crashes fails).
    print(f"\n{CrashMachine.total_crashes} crashes in {examples} examples")
    assert CrashMachine.total_crashes >= examples // 5


def test_a_full_journal_disk_costs_durability_for_a_while_never_the_daemon(crashing, tmp_path):
    """The file size limit stands in for a full disk: the journal's next reservation fails, the
    daemon says so and serves on, and the next snapshot (retried every second) repairs it."""
    start, _restart = crashing
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    limit = 1536 * 1024
    boot = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "sys.argv = ['xenstored', *sys.argv[1:]]; runpy.run_module('xenstored', run_name='__main__')"
    )
    log_path = os.path.join(rundir, "daemon.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", boot, "-N", "--emulate", "--rundir", rundir],
            env=_clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_accepting(os.path.join(rundir, "socket"), proc, log_path)
        with SyncClient(os.path.join(rundir, "socket")) as d0:
            for i in range(1200):
                d0.write(f"/big/n{i}", "x" * 1000)
            assert wait_until(lambda: "journal: cannot write" in Path(log_path).read_text())
            assert d0.read("/big/n1199") == b"x" * 1000  # still serving
            assert wait_until(lambda: "journal: writing again" in Path(log_path).read_text(), timeout=10)
            d0.write("/after", "ok")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    d = start(rundir)
    with SyncClient(d.socket) as d0:
        assert d0.read("/after") == b"ok"
        assert d0.read("/big/n1199") == b"x" * 1000
        assert all(d0.read(f"/big/n{i}") == b"x" * 1000 for i in range(0, 1200, 7))


def test_the_respawn_wrapper_brings_a_killed_daemon_back_and_stops_with_it(tmp_path):
    """conf/xenstored-supervise: what a host without systemd uses instead of Restart=always."""
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    sock = os.path.join(rundir, "socket")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "xenstored-supervise")
    env = dict(_clean_env(), XENSTORED_DAEMON=f"{sys.executable} -m xenstored", XENSTORED_RUNDIR=rundir)
    done = subprocess.run([script, "--emulate", "--rundir", rundir], env=env, timeout=60, check=False)
    assert done.returncode == 0  # returned once the socket answered
    try:
        with SyncClient(sock) as d0:
            d0.write("/kept", "1")
        pid = _peer_pid(sock)
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: _answers(sock) and _peer_pid(sock) != pid, timeout=20)
        with SyncClient(sock) as d0:
            assert d0.read("/kept") == b"1"
        pid = _peer_pid(sock)
    finally:
        os.kill(_peer_pid(sock), signal.SIGTERM)
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=20)
    time.sleep(0.5)
    assert not _answers(sock)  # a clean stop is not restarted


def _answers(sock: str) -> bool:
    try:
        with SyncClient(sock, timeout=2) as c:
            c.read("/")
        return True
    except (OSError, XsError):
        return False


def _peer_pid(sock: str) -> int:
    import socket as pysocket
    import struct

    s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        s.connect(sock)
        creds = s.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]
    finally:
        s.close()


def test_records_across_journal_windows_read_back_whole(tmp_path: Path) -> None:
    """The journal maps its file a window at a time, each faulted in by a worker thread: 2.4 MB
    of 2 KB values cross two window switches, and every one reads back, in order; the last
    value of a node wins."""
    from xenstored import journal as journal_mod
    from xenstored.core import Core
    from xenstored.perms import owner_only

    core = Core()
    j = journal_mod.Journal(str(tmp_path))
    j.open(core)
    values = {}
    for i in range(1200):
        path, value = f"/n{i % 300}", bytes([65 + i % 26]) * 2000
        values[path] = value
        j.node(path, value, owner_only(0))
        j.flush()
    assert j.size > 2 * journal_mod.WINDOW
    j.close()
    assert not j._prefaulting  # every window's prefault was waited for before its unmap
    rec = journal_mod.read_state(str(tmp_path))
    assert rec is not None and rec.torn_bytes == 0
    assert {p: v for p, (v, _perms) in rec.nodes.items()} == values
