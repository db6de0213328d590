"""The emulated hypervisor's domain table, kept in a file so that it outlives the daemon.

A real hypervisor keeps running when xenstored dies: domains go on existing, and some die while
no daemon watches.  The emulated one lives inside the daemon process, so its table of domains is
also kept in ``<fakexen dir>/domains`` and read back by the next process.  While no daemon serves
``evtchn.sock``, the guest tools (``xenstored.guest.control``) apply domain commands to this
file directly, and the restarted daemon notices the difference as a ``VIRQ_DOM_EXC``.

The file is a log of ``<domid> <flags> <shutdown reason>`` lines, replayed in order: a domain's
last line is its state, and a line whose flags lack ``EXISTS`` (``<domid> 0 0`` for a destroy)
removes it.  A change appends one line (:class:`TableFile`), so creating or destroying a domain
costs the same with 10 domains as with 1,000; rewriting the whole table on every change made
each one O(number of domains).  When the lines outnumber the live domains by enough, the file is
compacted: rewritten whole (temporary file and rename, so a reader sees the old file or the new
one), one line per domain, which is also the format of a table written before the log existed.
The rewrite costs O(domains) once per O(domains) appends: O(1) per change, amortized.

A line is only read once its newline is there: a line torn by a crash mid-append is ignored,
and the next writer compacts before appending so that no later line is glued to it.

Pure functions and a small writer over a plain dict and the file: shared by the emulated
hypervisor (an edge) and the guest tools (the client side), so it stands in the protocol layer.
"""

from __future__ import annotations

import contextlib
import os

EXISTS = 0x01
DYING = 0x02
SHUTDOWN = 0x04
CRASHED = 0x08

SHUTDOWN_CRASH = 3  # xen/include/public/sched.h
MAX_DOMID = 0x7FF0  # DOMID_FIRST_RESERVED
FILE = "domains"

# Compact when the file holds more than COMPACT_FACTOR * live + COMPACT_SLACK lines: the slack
# keeps a small table from being rewritten every few changes.
COMPACT_FACTOR = 2
COMPACT_SLACK = 64

# domid -> (flags, shutdown reason)
Table = dict[int, tuple[int, int]]


def line(domid: int, flags: int, reason: int) -> bytes:
    """One record of the file (also the whole of a domain's entry in a compacted file)."""
    return b"%d %d %d\n" % (domid, flags, reason)


def _replay(data: bytes) -> tuple[Table, int, bool]:
    """(table, lines read, whether the file ends in a torn line)."""
    table: Table = {}
    lines = data.split(b"\n")
    torn = lines.pop() != b""  # what follows the last newline: empty unless a line is torn
    for raw in lines:
        parts = raw.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            d, flags, reason = (int(p) for p in parts)
            if d >= MAX_DOMID:
                continue
            if flags & EXISTS:
                table[d] = (flags, reason)
            else:
                table.pop(d, None)
    table.setdefault(0, (EXISTS, 0))
    return table, len(lines), torn


def save(fx_dir: str | os.PathLike[str], table: Table) -> None:
    """Write the table compacted and atomically (temporary file and rename): a reader sees the
    old file or the new one, never half of one."""
    path = os.path.join(os.fspath(fx_dir), FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    data = b"".join(line(d, f, r) for d, (f, r) in sorted(table.items()) if f & EXISTS)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class TableFile:
    """The table file of one fakexen folder, as its one writer (the daemon, which holds the
    folder's lock, or a guest tool while no daemon runs) sees it: how many lines it holds, and
    an append descriptor kept open between changes (opening the file per change would cost as
    much again as the append).

    A failed write leaves the file suspect (it may end in part of a line), so the next change
    compacts instead of appending."""

    def __init__(self, fx_dir: str | os.PathLike[str]) -> None:
        self.path = os.path.join(os.fspath(fx_dir), FILE)
        self.dir = os.fspath(fx_dir)
        self.lines = 0
        self.must_compact = False
        self._fd = -1

    def load(self) -> Table | None:
        """The table the last writer left, or None if there is none (a fresh hypervisor)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        table, self.lines, torn = _replay(data)
        self.must_compact = torn
        return table

    def save(self, table: Table) -> None:
        """Rewrite the file as ``table``, one line per domain (compaction)."""
        self.close()
        save(self.dir, table)
        self.lines = sum(1 for f, _r in table.values() if f & EXISTS)
        self.must_compact = False

    def due(self, live: int) -> bool:
        """Whether the next change should compact instead of appending: the file holds many
        more lines than the ``live`` domains (an upper bound will do), or may end torn."""
        return self.must_compact or self.lines > COMPACT_FACTOR * live + COMPACT_SLACK

    def append(self, domid: int, flags: int, reason: int) -> None:
        """Record domain ``domid``'s new state (``flags`` without EXISTS: it is gone) as one
        line, written with one ``write`` on an ``O_APPEND`` descriptor.  Raises OSError, and
        then leaves the file to be compacted by the next change."""
        data = line(domid, flags, reason)
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if os.write(self._fd, data) != len(data):
                raise OSError(f"short write to {self.path}")
        except OSError:
            self.must_compact = True
            self.close()
            raise
        self.lines += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def load(fx_dir: str | os.PathLike[str]) -> Table | None:
    """The table the last process left, or None if there is none (a fresh hypervisor)."""
    return TableFile(fx_dir).load()


def apply(table: Table, cmd: str, domid: int, arg: int | None = None) -> str | None:
    """Apply one domain command (``create``, ``destroy``, ``dying``, ``shutdown [reason]``,
    ``crash``) to ``table``; returns an ``err ...`` text when it cannot, else None."""
    if not 0 <= domid < MAX_DOMID:
        return "err bad command"
    flags = table.get(domid, (0, 0))[0]
    if cmd == "create":
        table[domid] = (EXISTS, 0)
    elif cmd == "destroy":
        if domid == 0:
            return "err cannot destroy dom0"
        table.pop(domid, None)
    elif cmd == "dying":
        table[domid] = (flags | DYING, table.get(domid, (0, 0))[1])
    elif cmd == "shutdown":
        table[domid] = (flags | SHUTDOWN, arg or 0)
    elif cmd == "crash":
        table[domid] = (flags | CRASHED, SHUTDOWN_CRASH)
    else:
        return f"err unknown command {cmd}"[:200]
    return None


def apply_offline(fx_dir: str | os.PathLike[str], command: str) -> str:
    """Apply a domain command to the table file while no daemon runs (what a real hypervisor
    does regardless of xenstored); the reply has the daemon's ``ok``/``err`` form."""
    argv = command.split()
    if len(argv) < 2 or not argv[1].lstrip("-").isdigit():
        return "err no daemon serves the emulated hypervisor"
    cmd, domid = argv[0], int(argv[1])
    tf = TableFile(fx_dir)
    table = tf.load()
    fresh = table is None
    if table is None:
        table = {0: (EXISTS, 0)}
    if cmd == "exists":
        return "ok 1" if domid in table else "ok 0"
    arg = int(argv[2]) if len(argv) > 2 and argv[2].isdigit() else None
    err = apply(table, cmd, domid, arg)
    if err is not None:
        return err if cmd in ("create", "destroy", "dying", "shutdown", "crash") else "err no daemon"
    try:
        if fresh or tf.due(len(table)):
            tf.save(table)  # a fresh file starts with dom0's line, as the daemon's does
        else:
            flags, reason = table.get(domid, (0, 0))
            tf.append(domid, flags, reason)
    finally:
        tf.close()
    return f"ok {cmd} {domid}"
