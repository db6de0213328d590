"""Shared fixtures: a real daemon subprocess per test, and async clients connected to it.

The daemon runs as a separate process (``python -m xenstored -N``) rather than in-process so the
tests exercise exactly what ships: argument parsing, socket setup, signal handling and logging.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from xenstored.client import Client

DAEMON_START_TIMEOUT = 10.0
DAEMON_STOP_TIMEOUT = 5.0


@dataclass
class Daemon:
    """A running daemon: where it listens and the env a CLI tool needs to reach it."""

    rundir: str
    socket: str
    proc: subprocess.Popen[bytes]
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    expect_exit: bool = False  # set by a test that stops the daemon on purpose

    def stop(self) -> int | None:
        """SIGTERM the daemon and wait; the fixture then does not report it as having died."""
        self.expect_exit = True
        return stop_daemon_process(self.proc)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _clean_env() -> dict[str, str]:
    # An inherited XENSTORED_PATH would make the daemon (and the tools) use someone else's socket.
    env = {k: v for k, v in os.environ.items() if k not in ("XENSTORED_PATH", "XENSTORED_RUNDIR")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_accepting(path: str, proc: subprocess.Popen[bytes], log_path: str) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"daemon exited with {proc.returncode} before accepting:\n{Path(log_path).read_text()}"
            )
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not accept on {path} within {DAEMON_START_TIMEOUT}s")
        time.sleep(0.01)


def start_daemon(*extra_args: str, rundir: str | None = None) -> Daemon:
    """Start a daemon in a fresh short rundir (AF_UNIX paths are limited to ~108 bytes), or in
    ``rundir`` to find what a previous daemon left there."""
    rundir = rundir or tempfile.mkdtemp(prefix="xs", dir="/tmp")
    sock = os.path.join(rundir, "socket")
    log_path = os.path.join(rundir, "daemon.log")
    env = _clean_env()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xenstored", "-N", "--rundir", rundir, *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C on pytest must not hit the daemon first
        )
    try:
        _wait_accepting(sock, proc, log_path)
    except BaseException:
        stop_daemon_process(proc)
        shutil.rmtree(rundir, ignore_errors=True)
        raise
    tool_env = dict(env, XENSTORED_PATH=sock)
    return Daemon(rundir=rundir, socket=sock, proc=proc, log_path=log_path, env=tool_env)


def stop_daemon_process(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(DAEMON_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    """A fresh daemon for this test; the test fails if the daemon logged a Python traceback."""
    d = start_daemon()
    try:
        yield d
    finally:
        still_running = d.proc.poll() is None
        rc = stop_daemon_process(d.proc)
        log = d.log()
        shutil.rmtree(d.rundir, ignore_errors=True)
    if "Traceback (most recent call last)" in log:
        pytest.fail(f"daemon wrote a traceback to its log:\n{log}")
    if not still_running and not d.expect_exit:
        pytest.fail(f"daemon died during the test (exit {d.proc.returncode}):\n{log}")
    if rc is None:
        pytest.fail(f"daemon ignored SIGTERM for {DAEMON_STOP_TIMEOUT}s:\n{log}")


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    """An async client connected to this test's daemon."""
    async with Client(daemon.socket) as c:
        yield c
