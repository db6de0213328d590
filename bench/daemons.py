"""Daemons under test: ours (started here), another one started by a command, or a running one.

Every daemon gets its own run directory; the socket is ``<rundir>/socket`` and the emulated
hypervisor state ``<rundir>/fx`` (the fakexen convention both our emulation and the oracle's shim
follow), so guest-ring workloads drive any of them the same way.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .proto import connect, peer_pid


class Daemon:
    def __init__(self, label: str, socket_path: str, fx: str, rundir: str | None = None) -> None:
        self.label = label
        self.socket = socket_path
        self.fx = fx
        self.rundir = rundir
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._kill_pid: int | None = None
        self._owns_rundir = False

    @property
    def pid(self) -> int:
        if self._pid is None:
            self._pid = peer_pid(self.socket)
        return self._pid

    def stop(self) -> None:
        pid = self._kill_pid
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._owns_rundir and self.rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)


# Where run directories (socket, fakexen folder with its ring files) are made.  A bench may move
# them to tmpfs: on a disk file system, creating the N-th ring file in one folder costs time that
# grows with N, a cost of the emulation (on Xen a ring is a granted page, not a file).
RUN_BASE = "/tmp"

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_socket(path: str, proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(path).close()
            return
        except OSError:
            if proc is not None and proc.poll() not in (None, 0):
                raise SystemExit(f"{what}: exited with status {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise SystemExit(f"{what}: socket {path} did not accept within {timeout} s") from None
            time.sleep(0.02)


def _clean_env() -> dict[str, str]:
    drop = ("XENSTORED_PATH", "XENSTORED_RUNDIR", "FAKEXEN_DIR")
    return {k: v for k, v in os.environ.items() if k not in drop}


def start_ours(label: str = "ours", src: str | None = None) -> Daemon:
    """Our daemon from this checkout, or from the source tree ``src`` (e.g. an exported commit)."""
    rundir = tempfile.mkdtemp(prefix="xsbA", dir=RUN_BASE)
    d = Daemon(label, os.path.join(rundir, "socket"), os.path.join(rundir, "fx"), rundir)
    d._owns_rundir = True
    log = open(os.path.join(rundir, "daemon.log"), "wb")  # noqa: SIM115 - handed to the child
    cmd = [sys.executable, "-m", "xenstored", "-N", "--emulate", "--rundir", rundir, "--log-level", "warning"]
    env = _clean_env()
    if src:
        env["PYTHONPATH"] = os.path.abspath(src) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    d._proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
        # ``-m`` looks in the working directory before PYTHONPATH: run from a checkout, the
        # daemon would be the checkout's, not ``src``'s.
        cwd=os.path.abspath(src) if src else None,
    )
    log.close()
    _wait_socket(d.socket, d._proc, "our daemon")
    return d


def start_cmd(cmd: str, label: str) -> Daemon:
    """Run ``cmd`` with ``{rundir}`` substituted (appended as the last argument if absent).

    The command may stay in the foreground (it is then killed with its process group) or start
    the daemon in the background and exit; the daemon is then found through the socket's peer
    credentials and SIGTERMed by pid.
    """
    rundir = tempfile.mkdtemp(prefix="orcB", dir=RUN_BASE)
    argv = shlex.split(cmd)
    if any("{rundir}" in a for a in argv):
        argv = [a.replace("{rundir}", rundir) for a in argv]
    else:
        argv.append(rundir)
    d = Daemon(label, os.path.join(rundir, "socket"), os.path.join(rundir, "fx"), rundir)
    d._owns_rundir = True
    log = open(os.path.join(rundir, "start.log"), "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_clean_env(),
        start_new_session=True,
    )
    log.close()
    d._proc = proc
    _wait_socket(d.socket, proc, f"--against-cmd {cmd!r}")
    d._kill_pid = d.pid
    return d


def attach(path: str, label: str) -> Daemon:
    fx = os.environ.get("FAKEXEN_DIR") or os.path.join(os.path.dirname(os.path.abspath(path)), "fx")
    return Daemon(label, path, fx)


class Spec:
    """How to get a daemon of one kind, fresh (``start``) or shared (``attach``)."""

    def __init__(self, label: str, *, cmd: str | None = None, socket: str | None = None,
                 src: str | None = None) -> None:
        self.label = label
        self.src = src
        self.cmd = cmd
        self.socket = socket

    @property
    def restartable(self) -> bool:
        return self.socket is None

    def start(self) -> Daemon:
        if self.socket is not None:
            return attach(self.socket, self.label)
        if self.cmd is not None:
            return start_cmd(self.cmd, self.label)
        return start_ours(self.label, self.src)
