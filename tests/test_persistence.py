"""Persistence across restarts: a clean stop saves everything, a kill -9 loses at most one
snapshot interval, a damaged state file is refused rather than silently dropped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from conftest import _clean_env, _wait_accepting, start_daemon, stop_daemon_process
from test_domains import introduce

from xenstored import guest as guestlib
from xenstored import migration
from xenstored.client import SyncClient


def test_stop_and_start_keep_nodes_perms_quotas_domains_and_watches():
    d = start_daemon("--persistent")
    try:
        d0 = SyncClient(d.socket)
        introduce(d0, d, 50)
        d0.write("/vm/abc/name", b"guest\0one")
        d0.set_perms("/vm/abc", ["n0", "r50"])
        d0.request(26, b"50\0watches\x0077\0")  # SET_QUOTA for dom50
        with guestlib.Guest(50, os.path.join(d.rundir, "fx")) as g:
            g.write("data/x", "1")
            g.watch("data", "w")
            assert g.wait_event() == ("data", "w")
            d0.close()
            assert d.stop() == 0
            assert "state saved" in d.log()
            d2 = start_daemon("--persistent", rundir=d.rundir)
            try:
                d0 = SyncClient(d2.socket)
                assert d0.read("/vm/abc/name") == b"guest\0one"
                assert d0.get_perms("/vm/abc") == ["n0", "r50"]
                assert d0.get_perms("/local/domain/50/data/x") == ["n50"]
                assert d0.request(25, b"50\0watches\0") == b"77\0"
                assert d0.request(17, b"50\0") == b"T\0"
                # The guest's ring and its watch carry on with the new daemon.
                d0.write("/local/domain/50/data/y", "2")
                assert g.wait_event(timeout=5) == ("data/y", "w")
                assert g.read("data/x") == b"1"
            finally:
                stop_daemon_process(d2.proc)
    finally:
        stop_daemon_process(d.proc)
        shutil.rmtree(d.rundir, ignore_errors=True)


def test_kill_9_loses_at_most_one_interval_and_never_corrupts():
    d = start_daemon("--persistent", "--persistent-interval", "0.2")
    try:
        d0 = SyncClient(d.socket)
        for i in range(200):
            d0.write(f"/k/n{i}", str(i))
        time.sleep(1.0)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        d2 = start_daemon("--persistent", rundir=d.rundir)
        try:
            d0 = SyncClient(d2.socket)
            assert len(d0.ls("/k")) == 200
            assert d0.read("/k/n199") == b"199"
        finally:
            stop_daemon_process(d2.proc)
        # Damage the file: the daemon refuses to start instead of silently starting empty.
        path = os.path.join(d.rundir, "xenstored.state")
        with open(path, "r+b") as f:
            f.truncate(100)
        try:
            start_daemon("--persistent", rundir=d.rundir)
            raise AssertionError("started from a damaged state file")
        except RuntimeError as e:
            assert "cannot restore" in str(e)
    finally:
        stop_daemon_process(d.proc)
        shutil.rmtree(d.rundir, ignore_errors=True)


def test_full_disk_while_persisting_keeps_serving_and_the_last_good_state():
    """The file size limit stands in for a full disk: snapshots fail with EFBIG, the daemon logs
    it and keeps serving, and the state file on disk stays the last complete one."""
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    sock = os.path.join(rundir, "socket")
    log_path = os.path.join(rundir, "daemon.log")
    limit = 64 * 1024
    # The daemon sets its own file size limit before starting (no preexec_fn in a threaded test).
    boot = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "sys.argv = ['xenstored', *sys.argv[1:]]; runpy.run_module('xenstored', run_name='__main__')"
    )
    argv = [sys.executable, "-c", boot, "-N", "--rundir", rundir, "--persistent",
            "--persistent-interval", "0.1", "--log-level", "warning"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_accepting(sock, proc, log_path)
        d0 = SyncClient(sock)
        d0.write("/small", "fits")
        time.sleep(0.5)
        state = os.path.join(rundir, "xenstored.state")
        for i in range(100):  # ~100 KiB of values: the next snapshot cannot be written
            d0.write(f"/big/n{i}", "x" * 1000)
        time.sleep(0.6)
        with open(log_path) as f:
            assert "cannot write" in f.read()
        with open(state, "rb") as f:  # the last snapshot that fitted, complete: never a torn file
            saved = {n.path for n in migration.decode(f.read()).nodes}
        assert "/small" in saved and "/big/n99" not in saved
        assert d0.read("/big/n99") == b"x" * 1000  # still serving
        d0.rm("/big")
        d0.write("/after", "ok")
        time.sleep(0.6)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        d2 = start_daemon("--persistent", rundir=rundir)
        try:
            c = SyncClient(d2.socket)
            assert c.read("/after") == b"ok" and c.read("/small") == b"fits"
            # A temporary file the kill cut short is cleared away at start.
            assert not [f for f in os.listdir(rundir) if ".tmp" in f]
        finally:
            stop_daemon_process(d2.proc)
    finally:
        stop_daemon_process(proc)
        shutil.rmtree(rundir, ignore_errors=True)
