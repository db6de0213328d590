"""Logging: warnings to syslog/journal (or a file, or stderr), C's trace file, O's access log.

* The daemon log carries what an operator must see: quota refusals, misbehaving clients, domain
  deaths, each naming the domain.  In the foreground it goes to stderr (systemd's journal catches
  it); a forked daemon uses syslog (ident ``xenstored``, facility daemon) unless told otherwise.
* ``-T FILE``: every request and reply in cxenstored 4.17's trace format,
  ``IN|OUT <conn> YYYYMMDD HH:MM:SS <OP> (<payload, NULs as spaces>)``, switched with
  ``xenstore-control log on|off``, reopened by ``logfile`` and SIGHUP.
* ``access-log-file``: oxenstored's access log, ``[YYYYMMDDTHH:MM:SS.mmmZ] D5.3 write     /p v``,
  rotated after ``access-log-nb-lines`` into ``FILE.1`` ... ``FILE.<nb-files - 1>``.

The hooks cost one attribute test per message when both are off.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING, TextIO

from .wire import Op, op_name

if TYPE_CHECKING:
    from .config import Config
    from .connection import Connection

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(cfg: Config, *, foreground: bool) -> None:
    """Configure the root logger once at start (and again after a live update's exec)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    dest = cfg.log_file or ("stderr" if foreground else "syslog")
    handler: logging.Handler
    if dest == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s xenstored[%(process)d] %(levelname)s %(name)s: %(message)s"))
    elif dest.startswith("syslog"):
        from logging.handlers import SysLogHandler  # with pickle, socket, queue: 3 ms; only here

        facility = dest.partition(":")[2] or "daemon"
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        handler = SysLogHandler(address=address, facility=SysLogHandler.facility_names.get(facility, 3))
        handler.setFormatter(logging.Formatter("xenstored[%(process)d]: %(levelname)s %(name)s: %(message)s"))
    else:
        from logging.handlers import WatchedFileHandler

        handler = WatchedFileHandler(dest)
        handler.setFormatter(logging.Formatter("%(asctime)s " + FORMAT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, cfg.log_level.upper(), logging.INFO))


def reopen() -> None:
    """SIGHUP: log files moved away by logrotate are reopened."""
    from logging.handlers import WatchedFileHandler

    for h in logging.getLogger().handlers:
        if isinstance(h, WatchedFileHandler):
            h.reopenIfNeeded()


def _printable(payload: bytes) -> str:
    return payload.replace(b"\0", b" ").decode("utf-8", "backslashreplace")


class Tracer:
    """Request/reply trace (C) and access log (O); either may be off."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.trace_path = cfg.trace_file
        self.trace: TextIO | None = None
        self.trace_on = bool(cfg.trace_file)
        self.access: TextIO | None = None
        self.access_lines = 0
        self.open()

    @property
    def active(self) -> bool:
        return (self.trace is not None and self.trace_on) or self.access is not None

    def open(self) -> None:
        if self.trace_path:
            self.trace = open(self.trace_path, "a", buffering=1)  # noqa: SIM115 - lives with the daemon
            self.trace.write("\n***\n")
        if self.cfg.access_log_file:
            self.access = open(self.cfg.access_log_file, "a", buffering=1)  # noqa: SIM115
            self.access_lines = 0

    def close(self) -> None:
        for f in (self.trace, self.access):
            if f is not None:
                f.close()
        self.trace = self.access = None

    def reopen(self, trace_path: str | None = None) -> None:
        self.close()
        if trace_path is not None:
            self.trace_path = trace_path
        self.open()

    # ----------------------------------------------------------------------- C trace
    def _trace(self, direction: str, conn: Connection, type_: int, payload: bytes) -> None:
        assert self.trace is not None
        stamp = time.strftime("%Y%m%d %H:%M:%S")
        self.trace.write(f"{direction} {conn.id:#x} {stamp} {op_name(type_)} ({_printable(payload)})\n")

    # ----------------------------------------------------------------------- O access log
    def _access(self, conn: Connection, tx_id: int, what: str, data: str) -> None:
        f = self.access
        assert f is not None
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        who = f"A{conn.id}" if conn.is_socket else f"D{conn.domid}"
        if tx_id:
            who += f".{tx_id}"
        line = f"[{stamp}] {who} {what:<9} {data}"
        limit = self.cfg.access_log_chars
        if limit > 0 and len(line) > limit:
            line = line[: max(limit - 2, 0)] + ".."
        f.write(line + "\n")
        self.access_lines += 1
        if self.cfg.access_log_lines and self.access_lines >= self.cfg.access_log_lines:
            self._rotate()

    def _rotate(self) -> None:
        path = self.cfg.access_log_file
        assert path is not None and self.access is not None
        self.access.close()
        n = max(self.cfg.access_log_files, 1)
        for i in range(n - 1, 0, -1):
            src = path if i == 1 else f"{path}.{i - 1}"
            if os.path.exists(src):
                os.replace(src, f"{path}.{i}")
        if n == 1:
            os.unlink(path)
        self.access = open(path, "a", buffering=1)  # noqa: SIM115
        self.access_lines = 0

    _READ_OPS = frozenset({Op.READ, Op.DIRECTORY, Op.DIRECTORY_PART, Op.GET_PERMS, Op.GET_DOMAIN_PATH})
    _TX_OPS = frozenset({Op.TRANSACTION_START, Op.TRANSACTION_END})
    _SPECIAL_OPS = frozenset(
        {Op.INTRODUCE, Op.RELEASE, Op.RESUME, Op.IS_DOMAIN_INTRODUCED, Op.SET_TARGET, Op.CONTROL}
    )

    def _wanted(self, type_: int) -> bool:
        if type_ in self._READ_OPS:
            return self.cfg.access_log_reads
        if type_ in self._TX_OPS:
            return self.cfg.access_log_transactions
        if type_ in self._SPECIAL_OPS:
            return self.cfg.access_log_special
        return True

    # ----------------------------------------------------------------------- hooks
    def request(self, conn: Connection, type_: int, tx_id: int, payload: bytes) -> None:
        if self.trace is not None and self.trace_on:
            self._trace("IN", conn, type_, payload)
        if self.access is not None and self._wanted(type_):
            self._access(conn, tx_id, op_name(type_).lower().replace("_", ""), _printable(payload))

    def reply(self, conn: Connection, type_: int, tx_id: int, payload: bytes) -> None:
        if self.trace is not None and self.trace_on:
            self._trace("OUT", conn, type_, payload)
        if self.access is not None:
            if type_ == Op.ERROR:
                self._access(conn, tx_id, "error", _printable(payload))
            elif type_ == Op.WATCH_EVENT:
                self._access(conn, 0, "w event", _printable(payload))

    def connection(self, conn: Connection, opened: bool) -> None:
        if self.access is not None:
            self._access(conn, 0, "newconn" if opened else "endconn", "")
