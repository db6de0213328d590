"""xenstore-guest against a real daemon when nothing will answer: the reason at once (not a
10 s ETIMEDOUT), no ring files left behind, and --help that lists what it can do."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import start_daemon, stop_daemon_process

from xenstored import guest as guestlib
from xenstored.client import SyncClient


def xg(daemon, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(daemon.env, FAKEXEN_DIR=os.path.join(daemon.rundir, "fx"))
    return subprocess.run(
        [sys.executable, "-m", "xenstored.guest", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


def rings(daemon) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(daemon.rundir, "fx")) if n.endswith(".ring"))


def test_a_domain_that_was_not_created_is_said_at_once(daemon):
    start = time.monotonic()
    r = xg(daemon, "6", "read", "x")
    elapsed = time.monotonic() - start
    assert r.returncode == 1 and r.stdout == ""
    line = r.stderr.strip()
    assert line.startswith("xenstore-guest: domain 6 is not introduced (or not created): ")
    assert "the hypervisor has no dom6" in line and "ETIMEDOUT" not in line
    assert elapsed < 5, elapsed  # the reply timeout is 10 s
    assert "dom6.ring" not in rings(daemon)


def test_a_created_domain_that_was_not_introduced_is_said_at_once(daemon):
    assert xg(daemon, "6", "create").returncode == 0
    r = xg(daemon, "6", "write", "data/x", "1")
    assert r.returncode == 1
    line = r.stderr.strip()
    assert line.startswith("xenstore-guest: domain 6 is not introduced (or not created): ")
    assert "introduce(6, 0, 1)" in line
    assert "dom6.ring" not in rings(daemon)
    r = xg(daemon, "6", "watch", "-n", "1", "data")
    assert r.returncode == 1 and "is not introduced" in r.stderr


def test_no_emulated_hypervisor_is_said_at_once(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "xenstored.guest", "--fakexen-dir", str(tmp_path), "3", "read", "x"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"xenstore-guest: no emulated hypervisor answers at {tmp_path}/evtchn.sock "
        "(is xenstored running, with this FAKEXEN_DIR?)"
    )
    assert os.listdir(tmp_path) == []


def test_introduced_domain_works_and_destroy_removes_its_ring(daemon):
    assert xg(daemon, "6", "create").returncode == 0
    with SyncClient(daemon.socket) as c:
        c.write("/local/domain/6", "")
        c.set_perms("/local/domain/6", ["n6"])
        c.introduce(6, 0, 1)
        r = xg(daemon, "6", "write", "data/x", "hello")
        assert r.returncode == 0, r.stderr
        assert c.read("/local/domain/6/data/x") == b"hello"
        assert "dom6.ring" in rings(daemon)
        assert xg(daemon, "6", "destroy").returncode == 0
        assert "dom6.ring" not in rings(daemon)
        assert not c.is_domain_introduced(6)
    # A new dom6 starts from a fresh page, not the dead one's indexes.
    assert xg(daemon, "6", "create").returncode == 0
    r = xg(daemon, "6", "read", "data/x")
    assert r.returncode == 1 and "is not introduced" in r.stderr


def test_daemon_stop_removes_the_ring_files_of_domains_that_do_not_exist(daemon):
    fx = os.path.join(daemon.rundir, "fx")
    assert guestlib.control("create 4", fx) == "ok create 4"
    with SyncClient(daemon.socket) as c:
        c.introduce(4, 0, 1)
        assert xg(daemon, "4", "domain-path").stdout.strip() == "/local/domain/4"
    # A guest library user attaching to a domain nobody created leaves a page behind.
    guestlib.Guest(9, fx).close()
    assert rings(daemon) == ["dom0.ring", "dom4.ring", "dom9.ring"]
    assert daemon.stop() == 0
    # dom0 and dom4 still exist (the emulated domain table outlives the daemon, as Xen's does),
    # and a restarted daemon serves their pages again; dom9's page belonged to nobody.
    assert rings(daemon) == ["dom0.ring", "dom4.ring"]
    assert not os.path.exists(os.path.join(fx, "evtchn.sock"))
    assert guestlib.control("destroy 4", fx) == "ok destroy 4"  # offline, into the table
    d = start_daemon(rundir=daemon.rundir)
    assert stop_daemon_process(d.proc) == 0
    assert rings(daemon) == ["dom0.ring"]


def test_help_lists_the_operations(daemon):
    r = subprocess.run(
        [sys.executable, "-m", "xenstored.guest", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert r.returncode == 0
    for op in ("read PATH", "write PATH VALUE", "ls [PATH]", "rm PATH", "mkdir PATH", "exists PATH",
               "chmod PATH PERM", "perms PATH", "watch [-n COUNT]", "domain-path", "tx OP ARGS",
               "create | destroy | shutdown [REASON] | crash | dying | exists-domain"):
        assert op in r.stdout, op
    r = xg(daemon, "6", "frobnicate")
    assert r.returncode == 1 and "unknown operation 'frobnicate' (see xenstore-guest --help)" in r.stderr
