"""Helpers shared by the robustness tests (advisories, resources, faults, fuzzers, soak).

They drive a real daemon (the ``daemon`` fixture) the way a Xen host would: the toolstack over the
socket, guests over emulated ring pages.  Kept in one place so that every hostile test ends with
the same health verdict: the daemon still runs, answers everyone, and its store is consistent.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from xenstored import guest as guestlib
from xenstored.client import SyncClient
from xenstored.wire import Op, Parser, encode

GUESTS = os.path.join(os.path.dirname(__file__), "guests")


def fx(daemon) -> str:
    """The emulated hypervisor directory of a ``daemon`` fixture."""
    return os.path.join(daemon.rundir, "fx")


def genv(daemon) -> dict[str, str]:
    return dict(daemon.env, FAKEXEN_DIR=fx(daemon))


def hv(daemon, command: str) -> str:
    """A command to the emulated hypervisor (``create N``, ``destroy N``...); asserts success."""
    reply = guestlib.control(command, fx(daemon))
    assert reply.startswith("ok"), reply
    return reply


def introduce(d0: SyncClient, daemon, domid: int, *, home: bool = True, quotas: dict[str, int] | None = None) -> None:
    """What the toolstack does for a new guest: create it, give it a home, set quotas, introduce."""
    hv(daemon, f"create {domid}")
    if home:
        d0.mkdir(f"/local/domain/{domid}")
        d0.set_perms(f"/local/domain/{domid}", [f"n{domid}"])
    for name, value in (quotas or {}).items():
        d0.request(Op.SET_QUOTA, f"{domid}\0{name}\0{value}\0".encode())
    d0.request(Op.INTRODUCE, f"{domid}\0{1000 + domid}\0{1}\0".encode())


@contextlib.contextmanager
def guest(daemon, domid: int, timeout: float = 5.0) -> Iterator[guestlib.Guest]:
    """An in-process guest on ``domid``'s ring (introduce it first)."""
    g = guestlib.Guest(domid, fx(daemon), timeout=timeout)
    try:
        yield g
    finally:
        g.close()


def spawn(daemon, *args: str) -> subprocess.Popen[str]:
    """A guest program (tests/guests/*.py) as a separate process, as a domU kernel would be."""
    return subprocess.Popen(
        [sys.executable, *args],
        env=genv(daemon),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def quota_usage(d0: SyncClient, domid: int) -> dict[str, int]:
    """CONTROL ``quota <domid>``: what the daemon thinks a domain uses of each quota."""
    text = d0.control("quota", str(domid))
    out: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        name, rest = line.split(":", 1)
        out[name.strip()] = int(rest.split()[0])
    return out


def count_nodes(d0: SyncClient, top: str) -> int:
    """Nodes at and below ``top`` (iterative: trees in these tests may be very deep)."""
    n, stack = 0, [top]
    while stack:
        p = stack.pop()
        n += 1
        stack.extend(f"{p.rstrip('/')}/{c}" for c in d0.ls(p))
    return n


def assert_healthy(daemon, *guests: guestlib.Guest) -> None:
    """The verdict after every attack: alive, serving a fresh socket client and the given guests,
    and CONTROL ``check`` finds the store consistent without repairing any accounting."""
    assert daemon.proc.poll() is None, daemon.log()
    with SyncClient(daemon.socket) as c:
        c.write("/tool/health", "ok")
        assert c.read("/tool/health") == b"ok"
        assert c.control("check") == "OK"
    for g in guests:
        g.write("health", str(g.domid))
        assert g.read("health") == str(g.domid).encode()
    log = daemon.log()
    assert "check:" not in log, log
    assert "Traceback" not in log, log
    assert "internal error" not in log, log


class Raw:
    """A bare socket client: exact bytes in, parsed messages out, for hostile framing."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(timeout)
        self.parser = Parser()
        self.inbox: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, op: int, payload: bytes, tx: int = 0, req_id: int = 1):
        self.send(encode(op, req_id, tx, payload))
        while True:
            for m in self.inbox:
                if m.type != Op.WATCH_EVENT:
                    self.inbox.remove(m)
                    return m
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.inbox.extend(self.parser.feed(data))

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the daemon has closed this connection (EOF or reset)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


W_ERROR_OFFSET = 2072  # byte offset of the ring page error field


def wait_until(pred, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


