"""The ``xenstored`` command: cxenstored-compatible options, daemonising, and the trio main.

Without ``-N`` the daemon forks like cxenstored, and the parent exits only once the socket
accepts connections, so an init script can use the store right after starting it.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys

import trio

from . import logs, migration
from .config import Config, ConfigError, load_file
from .service import Service
from .wire import XsError

log = logging.getLogger("xenstored")

DEFAULT_RUNDIR = "/run/xenstored"


def build_parser() -> argparse.ArgumentParser:
    """cxenstored 4.17's options (getopt ``DE:F:HI::KNPS:t:A:M:Q:q:T:RVW:w:U``) plus ours."""
    p = argparse.ArgumentParser(prog="xenstored", description="XenStore daemon", add_help=False)
    p.add_argument("-H", "--help", action="help", help="show this help and exit")
    p.add_argument("-N", "--no-fork", action="store_true", help="stay in the foreground")
    p.add_argument("-F", "--pid-file", help="write and lock the daemon's pid file")
    p.add_argument("-P", "--output-pid", action="store_true", help="print the daemon's pid on stdout")
    p.add_argument("-D", "--no-domain-init", action="store_true", help="do not introduce dom0 at start")
    p.add_argument("-E", "--entry-nb", type=int, help="nodes quota per domain")
    p.add_argument("-S", "--entry-size", type=int, help="node-size quota")
    p.add_argument("-W", "--watch-nb", type=int, help="watches quota per domain")
    p.add_argument("-t", "--transaction", type=int, help="open transactions quota per domain")
    p.add_argument("-A", "--perm-nb", type=int, help="permission entries per node quota")
    p.add_argument("-M", "--path-max", type=int, help="path length quota")
    p.add_argument("-Q", "--quota", action="append", default=[], metavar="NAME=N", help="set a quota")
    p.add_argument("-q", "--quota-soft", action="append", default=[], metavar="NAME=N", help="set a soft quota")
    p.add_argument("-w", "--timeout", action="append", default=[], metavar="watch-event=S")
    p.add_argument("-T", "--trace-file", help="trace every request and reply to this file (C format)")
    p.add_argument("-K", "--keep-orphans", action="store_true", default=None, help="keep nodes of dead domains")
    p.add_argument("-V", "--verbose", action="store_true", help="log at debug level")
    p.add_argument("-R", "--no-recovery", action="store_true", help="(accepted for compatibility)")
    p.add_argument("-I", "--internal-db", nargs="?", const="on", help="(accepted for compatibility)")
    p.add_argument("--event", type=int, help="(accepted for compatibility)")
    p.add_argument("--trace-control", action="append", default=[], help="(accepted for compatibility)")
    p.add_argument("--master-domid", "-m", type=int)
    p.add_argument("--priv-domid", "-p", type=int)
    p.add_argument("-U", "--live-update", action="store_true", help="(internal) restore after live update")
    p.add_argument("--config", help="config file (default: none; see conf/xenstored.conf)")
    p.add_argument("--rundir", help="run directory (default $XENSTORED_RUNDIR or /run/xenstored)")
    p.add_argument("--emulate", action="store_true", default=None, help="emulated hypervisor (default: auto)")
    p.add_argument("--log-level", help="debug, info, warning, error")
    p.add_argument("--log-file", help="a file, syslog[:facility], or stderr")
    p.add_argument("--persistent", action="store_true", default=None, help="keep the store across restarts")
    p.add_argument("--persistent-file", help="where --persistent keeps it")
    p.add_argument("--persistent-interval", type=float, help="seconds between snapshots (0: at stop only)")
    p.add_argument("--journal-dir", help="where the write-ahead journal lives (default <rundir>/journal)")
    p.add_argument("--journal-sync", choices=("always", "batch", "none"), help="fdatasync policy (default batch)")
    p.add_argument("--no-journal", action="store_true", help="no journal: a crash loses the store, as with C")
    p.add_argument(
        "--check-live-update",
        metavar="FILE",
        help="only check that this binary starts and can restore the state stream FILE, then exit",
    )
    return p


def _parse_assign(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not value.strip().isdigit():
        raise SystemExit(f"xenstored: bad setting {text!r} (want NAME=NUMBER)")
    return name.strip(), int(value)


def config_from_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Defaults, then the config file, then the command line: the last word wins."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"xenstored: ignoring unknown arguments {' '.join(unknown)}", file=sys.stderr)
    cfg = Config()
    if args.config:
        try:
            for note in load_file(cfg, args.config):
                print(f"xenstored: {note}", file=sys.stderr)
        except ConfigError as e:
            raise SystemExit(f"xenstored: {e}") from None
    rundir = args.rundir or os.environ.get("XENSTORED_RUNDIR") or cfg.rundir or DEFAULT_RUNDIR
    cfg.rundir = os.path.abspath(rundir)
    cfg.socket_path = os.environ.get("XENSTORED_PATH") or cfg.socket_path
    overrides = {
        "priv_domid": args.priv_domid,
        "master_domid": args.master_domid,
        "keep_orphans": args.keep_orphans,
        "emulate": args.emulate,
        "trace_file": args.trace_file,
        "pid_file": args.pid_file,
        "log_file": args.log_file,
        "log_level": args.log_level or ("debug" if args.verbose else None),
        "persistent": args.persistent,
        "persistent_interval": args.persistent_interval,
        "persistent_file": os.path.abspath(args.persistent_file) if args.persistent_file else None,
        "journal_dir": os.path.abspath(args.journal_dir) if args.journal_dir else None,
        "journal_sync": args.journal_sync,
        "journal": False if args.no_journal else None,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, value)
    cfg.domain_init = not args.no_domain_init
    cfg.live_update = args.live_update
    q = cfg.quotas
    try:
        for opt, name in (
            ("entry_nb", "nodes"),
            ("entry_size", "node-size"),
            ("watch_nb", "watches"),
            ("transaction", "transactions"),
            ("perm_nb", "node-permissions"),
            ("path_max", "path-max"),
        ):
            value = getattr(args, opt)
            if value is not None:
                q.set(name, value)
        for text in args.quota:
            q.set(*_parse_assign(text))
        for text in args.quota_soft:
            name, value = _parse_assign(text)
            if name != "memory":
                raise SystemExit(f"xenstored: only the memory quota has a soft limit, not {name!r}")
            q.set("soft-memory", value)
    except XsError as e:
        raise SystemExit(f"xenstored: bad quota: {e.detail or e.name}") from None
    for text in args.timeout:
        name, value = _parse_assign(text)
        if name != "watch-event":
            raise SystemExit(f"xenstored: unknown timeout {name!r}")
        cfg.watch_event_timeout = float(value)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = config_from_args(argv)
    if args.check_live_update:
        return _check_live_update(args.check_live_update)
    cfg.foreground = args.no_fork
    logs.setup(cfg, foreground=args.no_fork)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if not args.no_fork:
        return _daemonize(cfg, argv, args.output_pid)
    if cfg.pid_file and not _lock_pid_file(cfg.pid_file):
        return 0
    if args.output_pid:
        print(os.getpid(), flush=True)
    service = Service(cfg, argv)
    service.restore(cfg.live_update)
    trio.run(service.run)
    return 0


def _check_live_update(path: str) -> int:
    """The old daemon runs this before it execs us for a live update: if this binary cannot
    start or cannot read the state, the update is refused and the old daemon keeps serving."""
    try:
        with open(path, "rb") as f:
            state = migration.decode(f.read())
    except (OSError, migration.StreamError) as e:
        print(f"xenstored: cannot restore {path}: {e}", file=sys.stderr)
        return 1
    print(f"ok: {len(state.nodes)} nodes, {len(state.connections)} connections")
    return 0


_pid_fd: int | None = None  # held open for the daemon's life: the lock is the "running" flag


def _lock_pid_file(path: str) -> bool:
    """Write our pid under an exclusive lock; False if another daemon holds it (C exits 0 then)."""
    global _pid_fd
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _pid_fd = fd
    return True


def _daemonize(cfg: Config, argv: list[str] | None, output_pid: bool) -> int:
    """Double fork; the original process exits 0 once the daemon is ready, 1 if it died."""
    rfd, wfd = os.pipe()
    if os.fork():
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            ready = r.read()
        if not ready.startswith(b"1"):
            return 1
        if output_pid:
            print(ready[1:].decode().strip(), flush=True)
        return 0
    os.close(rfd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    if cfg.pid_file and not _lock_pid_file(cfg.pid_file):
        os.write(wfd, b"1already running")
        os._exit(0)

    def ready() -> None:
        os.write(wfd, f"1{os.getpid()}".encode())
        os.close(wfd)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    try:
        service = Service(cfg, argv)
        service.restore(cfg.live_update)
        trio.run(service.run, ready)
    finally:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
