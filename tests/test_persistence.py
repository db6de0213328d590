"""Persistence across restarts: a clean stop saves everything, a kill -9 loses at most one
snapshot interval, a damaged state file is refused rather than silently dropped."""

from __future__ import annotations

import os
import shutil
import signal
import time

from conftest import start_daemon, stop_daemon_process
from test_domains import introduce

from xenstored import guest as guestlib
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
