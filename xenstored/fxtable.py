"""The emulated hypervisor's domain table, kept in a file so that it outlives the daemon.

A real hypervisor keeps running when xenstored dies: domains go on existing, and some die while
no daemon watches.  The emulated one lives inside the daemon process, so its table of domains is
also written to ``<fakexen dir>/domains`` (one ``<domid> <flags> <shutdown reason>`` line each)
after every change, and read back by the next process.  While no daemon serves
``evtchn.sock``, the guest tools (``xenstored.guest.control``) apply domain commands to this
file directly, and the restarted daemon notices the difference as a ``VIRQ_DOM_EXC``.

Pure functions over a plain dict and the file: shared by the emulated hypervisor (an edge) and
the guest tools (the client side), so it stands in the protocol layer.
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

# domid -> (flags, shutdown reason)
Table = dict[int, tuple[int, int]]


def load(fx_dir: str | os.PathLike[str]) -> Table | None:
    """The table the last process left, or None if there is none (a fresh hypervisor)."""
    try:
        with open(os.path.join(os.fspath(fx_dir), FILE), encoding="ascii", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    table: Table = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            d, flags, reason = (int(p) for p in parts)
            if d < MAX_DOMID and flags & EXISTS:
                table[d] = (flags, reason)
    table.setdefault(0, (EXISTS, 0))
    return table


def save(fx_dir: str | os.PathLike[str], table: Table) -> None:
    """Write the table atomically (temporary file and rename): a reader sees the old table or
    the new one, never half of one."""
    path = os.path.join(os.fspath(fx_dir), FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    text = "".join(f"{d} {f} {r}\n" for d, (f, r) in sorted(table.items()) if f & EXISTS)
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
    table = load(fx_dir) or {0: (EXISTS, 0)}
    if cmd == "exists":
        return "ok 1" if domid in table else "ok 0"
    arg = int(argv[2]) if len(argv) > 2 and argv[2].isdigit() else None
    err = apply(table, cmd, domid, arg)
    if err is not None:
        return err if cmd in ("create", "destroy", "dying", "shutdown", "crash") else "err no daemon"
    save(fx_dir, table)
    return f"ok {cmd} {domid}"
