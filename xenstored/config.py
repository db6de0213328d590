"""Daemon settings: one dataclass with every default, filled from the config file and the command
line (cli.py), and read by the core.  Kept free of I/O so tests can build a Core directly."""

from __future__ import annotations

from dataclasses import dataclass, field

from .quota import Quotas


@dataclass
class Config:
    rundir: str = "/run/xenstored"
    socket_path: str | None = None  # default: <rundir>/socket
    priv_domid: int = 0
    master_domid: int = 0
    quotas: Quotas = field(default_factory=Quotas.defaults)
    # Socket clients are privileged and exempt from quotas, but their queues are still bounded:
    # stop reading requests above the pause mark, disconnect a client whose unread watch events
    # pass the limit.
    output_pause_bytes: int = 1 << 20
    output_limit_bytes: int = 16 << 20
    watch_event_timeout: float = 20.0
    # Seconds between looks at every ring whether kicked or not (0 = never): guards against lost
    # notifications.  Emulated event channels can drop kicks when their queue overflows.
    ring_scan_interval: float = 0.2
    keep_orphans: bool = False
    emulate: bool | None = None
    fakexen_dir: str | None = None
    domain_init: bool = True
    log_level: str = "info"
    trace_file: str | None = None
    pid_file: str | None = None
    persistent: bool = False
    persistent_file: str | None = None  # default <rundir>/xenstored.state
    # Seconds between snapshots while running (0: only at a clean stop).  A kill -9 loses at most
    # the changes of this window; a clean stop loses nothing.
    persistent_interval: float = 5.0
    live_update: bool = False  # -U: restore from <rundir>/state_dump

    @property
    def socket(self) -> str:
        return self.socket_path or f"{self.rundir}/socket"
