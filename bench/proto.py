"""A minimal blocking XenStore socket client for benchmarks.

Deliberately not the project's client library: frames are prebuilt bytes and replies are cut off
one buffer with ``struct``, so that the client costs as little as possible and the same client
drives every daemon under test.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Self

from xenstored.wire import HEADER, Op

_unpack = HEADER.unpack_from

# Op codes under their xs_wire.h names, taken from the daemon's codec so there is one table.
CONTROL = Op.CONTROL
DIRECTORY = Op.DIRECTORY
READ = Op.READ
GET_PERMS = Op.GET_PERMS
WATCH = Op.WATCH
UNWATCH = Op.UNWATCH
TRANSACTION_START = Op.TRANSACTION_START
TRANSACTION_END = Op.TRANSACTION_END
INTRODUCE = Op.INTRODUCE
RELEASE = Op.RELEASE
WRITE = Op.WRITE
MKDIR = Op.MKDIR
RM = Op.RM
SET_PERMS = Op.SET_PERMS
WATCH_EVENT = Op.WATCH_EVENT
ERROR = Op.ERROR


class XsErr(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def frame(op: int, payload: bytes, req_id: int = 0, tx: int = 0) -> bytes:
    return HEADER.pack(op, req_id, tx, len(payload)) + payload


def z(*parts: bytes | str) -> bytes:
    """NUL-terminate each part: ``z("/a", "n0")`` -> ``b"/a\\0n0\\0"``."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def peer_pid(path: str) -> int:
    """The pid of the process serving ``path`` (SO_PEERCRED), whoever started it."""
    with connect(path) as s:
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far: a round trip's wall-clock hides the daemon's own cost behind
    the kernel's wakeups, this does not.  The sum of its threads' ``sum_exec_runtime``
    (/proc/<pid>/task/*/schedstat, nanoseconds): the time utime + stime of /proc/<pid>/stat
    count, without their 10 ms ticks (a 5,000-request run read through ticks is 2 µs coarse).
    Falls back to /proc/<pid>/stat where schedstat is missing (a kernel without SCHED_INFO)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:  # a thread that just ended
                continue
        return total / 1e9
    except (FileNotFoundError, NotADirectoryError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


_TICK = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Client:
    """One connection.  ``call`` is one round trip; ``pipeline`` keeps ``depth`` in flight.

    Watch events that arrive in between are counted in ``events`` (and dropped).
    """

    def __init__(self, path: str) -> None:
        self.sock = connect(path)
        self.buf = bytearray()
        self.events = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("daemon closed the connection")
        self.buf += data

    def _next(self) -> tuple[int, int, int, bytes] | None:
        """Cut the next reply (not event) off the buffer, or None if incomplete."""
        buf = self.buf
        while len(buf) >= 16:
            type_, rid, tx, length = _unpack(buf)
            end = 16 + length
            if len(buf) < end:
                return None
            body = bytes(buf[16:end])
            del buf[:end]
            if type_ == WATCH_EVENT:
                self.events += 1
                continue
            return type_, rid, tx, body
        return None

    def reply(self) -> tuple[int, bytes]:
        while True:
            m = self._next()
            if m is not None:
                return m[0], m[3]
            self._recv()

    def call(self, op: int, payload: bytes, tx: int = 0) -> bytes:
        self.sock.sendall(HEADER.pack(op, 0, tx, len(payload)) + payload)
        type_, body = self.reply()
        if type_ == ERROR:
            raise XsErr(body.rstrip(b"\0").decode())
        return body

    def send_frame(self, f: bytes) -> bytes:
        """A prebuilt frame, one round trip; errors raise."""
        self.sock.sendall(f)
        type_, body = self.reply()
        if type_ == ERROR:
            raise XsErr(body.rstrip(b"\0").decode())
        return body

    # conveniences
    def read(self, path: str, tx: int = 0) -> bytes:
        return self.call(READ, z(path), tx)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else value
        self.call(WRITE, path.encode() + b"\0" + v, tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.call(MKDIR, z(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        try:
            self.call(RM, z(path), tx)
        except XsErr as e:
            if e.name != "ENOENT":
                raise

    def setperms(self, path: str, perms: Sequence[str], tx: int = 0) -> None:
        self.call(SET_PERMS, z(path, *perms), tx)

    def ls(self, path: str, tx: int = 0) -> list[bytes]:
        return self.call(DIRECTORY, z(path), tx).split(b"\0")[:-1]

    def start(self) -> int:
        return int(self.call(TRANSACTION_START, b"\0").rstrip(b"\0"))

    def end(self, tx: int, commit: bool = True) -> None:
        self.call(TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    def pipeline(self, frames: Sequence[bytes], depth: int, errors_ok: bool = False) -> int:
        """Send every frame keeping at most ``depth`` unanswered; returns the error count.

        Replies are counted from headers only (no per-reply object), to keep the client cheap.
        """
        total = len(frames)
        sent = min(depth, total)
        sock = self.sock
        sock.sendall(b"".join(frames[:sent]))
        done = 0
        errors = 0
        buf = self.buf
        while done < total:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("daemon closed the connection")
            buf += data
            pos = 0
            got = 0
            n = len(buf)
            while n - pos >= 16:
                type_, _rid, _tx, length = _unpack(buf, pos)
                end = pos + 16 + length
                if end > n:
                    break
                if type_ == WATCH_EVENT:
                    self.events += 1
                else:
                    got += 1
                    if type_ == ERROR:
                        if not errors_ok:
                            raise XsErr(bytes(buf[pos + 16 : end]).rstrip(b"\0").decode())
                        errors += 1
                pos = end
            if pos:
                del buf[:pos]
            done += got
            if got and sent < total:
                nxt = min(total, sent + got)
                sock.sendall(b"".join(frames[sent:nxt]))
                sent = nxt
        return errors

    def drain_events(self, want: int) -> None:
        """Read until ``events`` reaches ``want``."""
        while self.events < want:
            if self._next() is None and self.events < want:
                self._recv()


def hv_control(fx: str, command: str, timeout: float = 5.0) -> str:
    """One fake-hypervisor command over ``<fx>/evtchn.sock`` (both daemons speak it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("")
        s.settimeout(timeout)
        s.sendto(command.encode(), os.path.join(fx, "evtchn.sock"))
        reply = s.recv(512).decode(errors="replace")
    if not reply.startswith("ok"):
        raise RuntimeError(f"fake hypervisor: {command!r} -> {reply!r}")
    return reply


def write_frames(paths: Iterable[str], value: bytes = b"v") -> list[bytes]:
    return [frame(WRITE, p.encode() + b"\0" + value) for p in paths]


def read_frames(paths: Iterable[str]) -> list[bytes]:
    return [frame(READ, p.encode() + b"\0") for p in paths]


def pipeline_bodies(c: Client, frames: Sequence[bytes], depth: int) -> list[tuple[int, bytes]]:
    """Like :meth:`Client.pipeline` but returns every reply ``(type, payload)`` in order.

    Replies are cut from each received chunk by offset and the buffer is trimmed once per recv,
    so the client's cost per reply stays small next to the daemon's (the tree walk is 10^5 of
    them)."""
    total = len(frames)
    sent = min(depth, total)
    sock = c.sock
    sock.sendall(b"".join(frames[:sent]))
    out: list[tuple[int, bytes]] = []
    append = out.append
    buf = c.buf
    while len(out) < total:
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("daemon closed the connection")
        buf += data
        view = bytes(buf)
        n = len(view)
        pos = 0
        got = 0
        while n - pos >= 16:
            type_, _rid, _tx, length = _unpack(view, pos)
            end = pos + 16 + length
            if end > n:
                break
            if type_ == WATCH_EVENT:
                c.events += 1
            else:
                append((type_, view[pos + 16 : end]))
                got += 1
            pos = end
        if pos:
            del buf[:pos]
        if got and sent < total:
            nxt = min(total, sent + got)
            sock.sendall(b"".join(frames[sent:nxt]))
            sent = nxt
    return out
