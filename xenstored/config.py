"""Daemon settings: one dataclass with every default, filled from the config file and the command
line (cli.py), and read by the core.  Kept free of I/O so tests can build a Core directly."""

from __future__ import annotations

from dataclasses import dataclass, field

from .quota import Quotas
from .wire import XsError


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
    # The write-ahead journal (journal.py): what makes a restart after kill -9 lose nothing.
    # Default directory <rundir>/journal: a tmpfs on a Xen host, so it survives the daemon and
    # not the host, which is XenStore's lifetime.  Off with --persistent (its snapshots replace it).
    journal: bool = True
    journal_dir: str | None = None
    journal_sync: str = "none"  # always | batch | none
    journal_snapshot_bytes: int = 16 << 20  # compact once the journal is this large
    live_update: bool = False  # -U: restore from <rundir>/state_dump
    foreground: bool = True  # -N (a live update keeps the log destination of a forked daemon)
    # oxenstored switches: permission checks, and the XSA-115 filter on watch events.
    perms_activate: bool = True
    perms_watch_activate: bool = True
    log_file: str | None = None  # a path, "syslog[:facility]", or None: stderr (foreground)
    access_log_file: str | None = None
    access_log_files: int = 20
    access_log_lines: int = 13215
    access_log_chars: int = 180
    access_log_reads: bool = False
    access_log_transactions: bool = False
    access_log_special: bool = False
    # The Prometheus text file for node_exporter's textfile collector (None: not written), and
    # seconds between two writes of it (values below 1 are taken as 1).
    metrics_file: str | None = None
    metrics_interval: float = 15.0

    @property
    def socket(self) -> str:
        return self.socket_path or f"{self.rundir}/socket"

    @property
    def journal_path(self) -> str:
        return self.journal_dir or f"{self.rundir}/journal"


class ConfigError(Exception):
    """A bad config file line: names the file, the line and the key."""


# What a value must look like, said in words: these messages reach operators verbatim (with the
# file, line and key in front), so none of them may be a Python exception text such as
# "invalid literal for int() with base 10".
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _bool(text: str) -> bool:
    t = text.lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"expected true or false (or yes/no, on/off, 1/0), got {text!r}")


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def _uint(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"expected a whole number >= 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _sync_policy(text: str) -> str:
    if text not in ("always", "batch", "none"):
        raise ValueError(f"expected always, batch or none, got {text!r}")
    return text


def _emulate(text: str) -> bool | None:
    t = text.lower()
    if t == "auto":
        return None
    if t in _TRUE or t in _FALSE:
        return _bool(t)
    raise ValueError(f"expected true, false or auto, got {text!r}")


def log_level(text: str) -> str:
    """A log level name, checked: a typo would otherwise silently log at info."""
    t = text.strip().lower()
    if t == "warn":
        t = "warning"
    if t not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return t


def _quota(name: str):
    def set_(cfg: Config, text: str) -> None:
        try:
            cfg.quotas.set(name, _uint(text))
        except XsError as e:  # out of range: say so without the protocol's error name
            raise ValueError(e.detail or e.name) from None

    return set_


def _attr(name: str, conv):
    def set_(cfg: Config, text: str) -> None:
        setattr(cfg, name, conv(text))

    return set_


def _quota_activate(cfg: Config, text: str) -> None:
    if not _bool(text):
        for name in list(cfg.quotas.values):
            cfg.quotas.values[name] = 0


# key -> setter.  Our keys first, then oxenstored.conf keys that mean something here.
KEYS = {
    "rundir": _attr("rundir", str),
    "socket": _attr("socket_path", str),
    "priv-domid": _attr("priv_domid", _uint),
    "pid-file": _attr("pid_file", str),
    "emulate": _attr("emulate", _emulate),
    "log-level": _attr("log_level", log_level),
    "log-file": _attr("log_file", str),
    "trace-file": _attr("trace_file", str),
    "keep-orphans": _attr("keep_orphans", _bool),
    "persistent": _attr("persistent", _bool),
    "persistent-file": _attr("persistent_file", str),
    "persistent-interval": _attr("persistent_interval", _seconds),
    "journal": _attr("journal", _bool),
    "journal-dir": _attr("journal_dir", str),
    "journal-sync": _attr("journal_sync", _sync_policy),
    "journal-snapshot-bytes": _attr("journal_snapshot_bytes", _uint),
    "watch-event-timeout": _attr("watch_event_timeout", _seconds),
    "ring-scan-interval": _attr("ring_scan_interval", _seconds),
    "perms-activate": _attr("perms_activate", _bool),
    "perms-watch-activate": _attr("perms_watch_activate", _bool),
    "metrics-file": _attr("metrics_file", str),
    "metrics-interval": _attr("metrics_interval", _seconds),
    "access-log-file": _attr("access_log_file", str),
    "access-log-nb-files": _attr("access_log_files", _uint),
    "access-log-nb-lines": _attr("access_log_lines", _uint),
    "access-log-nb-chars": _attr("access_log_chars", _int),
    "access-log-read-ops": _attr("access_log_reads", _bool),
    "access-log-transactions-ops": _attr("access_log_transactions", _bool),
    "access-log-special-ops": _attr("access_log_special", _bool),
    "xenstored-log-file": _attr("log_file", str),
    "xenstored-log-level": _attr("log_level", log_level),
    "quota-activate": _quota_activate,
    **{f"quota-{n}": _quota(n) for n in Quotas.defaults().values},
    # oxenstored spellings.
    "quota-maxentity": _quota("nodes"),
    "quota-maxsize": _quota("node-size"),
    "quota-maxwatch": _quota("watches"),
    "quota-transaction": _quota("transactions"),
    "quota-maxrequests": _quota("transaction-nodes"),
    "quota-maxoutstanding": _quota("outstanding"),
}

# oxenstored.conf keys accepted and ignored: their mechanisms do not exist here (our MVCC commits
# need no conflict rate limiting or merge switch; there is no OCaml GC; the store domain's page
# and port come from the hypervisor interface).
IGNORED_KEYS = frozenset(
    {
        "merge-activate",
        "test-eagain",
        "conflict-burst-limit",
        "conflict-max-history-seconds",
        "conflict-rate-limit-is-aggregate",
        "gc-max-overhead",
        "quota-maxwatchevents",
        "allow-debug",
        "xenstored-kva",
        "xenstored-port",
        "xenstored-log-nb-files",
        "xenstored-log-nb-lines",
        "xenstored-log-nb-chars",
    }
)


def nearest_key(key: str, known: list[str] | None = None) -> str | None:
    """The known key ``key`` most likely is a typo of, if any looks close enough."""
    candidates = known if known is not None else [*KEYS, *IGNORED_KEYS]
    import difflib  # only for a mistyped key: 1 ms at every start otherwise

    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    return match[0] if match else None


def load_file(cfg: Config, path: str) -> list[str]:
    """Apply ``key = value`` lines of ``path`` to ``cfg``; returns warnings (keys ignored, unknown
    keys with the nearest known one), each naming the file and line.

    Unknown keys are warnings, not errors, as in oxenstored: a config file written for another
    version of the daemon must not keep the store from starting.  A bad *value* of a known key is
    an error (ConfigError naming file, line and key): starting with a setting silently different
    from what the operator wrote would be worse."""
    notes = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{path}:{lineno}: expected 'key = value', got {raw.strip()!r}")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key in IGNORED_KEYS:
            notes.append(f"{path}:{lineno}: {key} has no effect in this daemon")
            continue
        setter = KEYS.get(key)
        if setter is None:
            near = nearest_key(key)
            hint = f" (did you mean {near!r}?)" if near else ""
            notes.append(f"{path}:{lineno}: warning: unknown key {key!r} ignored{hint}")
            continue
        try:
            setter(cfg, value)
        except ValueError as e:
            raise ConfigError(f"{path}:{lineno}: bad value for {key!r}: {e}") from None
    return notes
