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
from typing import NoReturn

import trio

from . import __version__, logs
from .config import Config, ConfigError, load_file, log_level
from .hypervisor import HypervisorError
from .service import Service
from .wire import XsError

log = logging.getLogger("xenstored")

DEFAULT_RUNDIR = "/run/xenstored"


class _Parser(argparse.ArgumentParser):
    """argparse, but a malformed option value is one line (no usage dump), still with
    argparse's exit status 2, which the man page documents."""

    def error(self, message: str) -> NoReturn:
        print(f"xenstored: {message} (see xenstored --help)", file=sys.stderr)
        raise SystemExit(2)


def _log_level_arg(text: str) -> str:
    try:
        return log_level(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """cxenstored 4.17's options (getopt ``DE:F:HI::KNPS:t:A:M:Q:q:T:RVW:w:U``) plus ours.

    ``-h``/``--help``/``-H`` and ``--version`` act during parsing, so they print and exit before
    anything touches the run directory."""
    p = _Parser(prog="xenstored", description="XenStore daemon", add_help=False)
    p.add_argument("-h", "-H", "--help", action="help", help="show this help and exit")
    p.add_argument("--version", action="version", version=f"xenstored (Python) {__version__}")
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
    p.add_argument("--log-level", type=_log_level_arg, help="debug, info, warning, error")
    p.add_argument("--log-file", help="a file, syslog[:facility], or stderr")
    p.add_argument("--persistent", action="store_true", default=None, help="keep the store across restarts")
    p.add_argument("--persistent-file", help="where --persistent keeps it")
    p.add_argument("--persistent-interval", type=float, help="seconds between snapshots (0: at stop only)")
    p.add_argument("--journal-dir", help="where the write-ahead journal lives (default <rundir>/journal)")
    p.add_argument("--journal-sync", choices=("always", "batch", "none"), help="fdatasync policy (default none)")
    p.add_argument("--no-journal", action="store_true", help="no journal: a crash loses the store, as with C")
    p.add_argument("--metrics-file", help="write Prometheus metrics to this file (node_exporter textfile)")
    p.add_argument("--metrics-interval", type=float, help="seconds between writes of --metrics-file (default 15)")
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
    for word in unknown:
        print(f"xenstored: warning: ignoring unknown argument {word}{_option_hint(parser, word)}", file=sys.stderr)
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
        "metrics_file": os.path.abspath(args.metrics_file) if args.metrics_file else None,
        "metrics_interval": args.metrics_interval,
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


def _option_hint(parser: argparse.ArgumentParser, word: str) -> str:
    """`` (did you mean --rundir?)`` for an unknown long option close to a known one."""
    if not word.startswith("--"):
        return ""
    name = word.partition("=")[0]
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    import difflib  # only for a mistyped option: 1 ms at every start otherwise

    match = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f" (did you mean {match[0]}?)" if match else ""


def _writable_dir_problem(path: str, what: str) -> str | None:
    """Why ``path`` cannot serve as (or be created as) a directory we write in, or None; creates
    it when missing.

    Checked before anything else is created, so a daemon that cannot start leaves nothing
    behind, and the message names the directory rather than the socket inside it."""
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        if probe == path:
            return f"{what} {path} exists and is not a directory"
        return f"cannot create {what} {path}: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        if probe == path:
            return f"{what} {path} is not writable by uid {os.geteuid()}"
        return f"cannot create {what} {path}: {probe} is not writable by uid {os.geteuid()}"
    if probe != path:
        # Access bits do not tell everything (root, /proc, /sys): the kernel has the last word.
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            return f"cannot create {what} {path}: {e.strerror or e}"
    return None


def check_paths(cfg: Config) -> None:
    """Refuse to start (one line, exit status 1) when the run directory or the socket's
    directory cannot be written; SystemExit carries the message."""
    problem = _writable_dir_problem(cfg.rundir, "run directory")
    if problem is None and cfg.socket_path:
        problem = _writable_dir_problem(os.path.dirname(cfg.socket_path) or ".", "socket directory")
    if problem is not None:
        raise SystemExit(f"xenstored: {problem}")


def _start(cfg: Config, argv: list[str] | None) -> Service:
    """Build the service and restore its state; every expected refusal becomes SystemExit with
    one line saying why (the forked daemon hands that line to its parent)."""
    try:
        service = Service(cfg, argv)
    except HypervisorError as e:
        raise SystemExit(f"xenstored: {e}") from None
    service.restore(cfg.live_update)
    return service


def main(argv: list[str] | None = None) -> int:
    cfg, args = config_from_args(argv)
    if args.check_live_update:
        return _check_live_update(args.check_live_update)
    cfg.foreground = args.no_fork
    if not cfg.live_update:  # a live update inherits its socket: nothing to create
        check_paths(cfg)
    try:
        logs.setup(cfg, foreground=args.no_fork)
    except OSError as e:
        raise SystemExit(f"xenstored: cannot open log file {cfg.log_file}: {e.strerror or e}") from None
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if not args.no_fork:
        return _daemonize(cfg, argv, args.output_pid)
    if cfg.pid_file and not _lock_pid_file(cfg.pid_file):
        return 0
    if args.output_pid:
        print(os.getpid(), flush=True)
    service = _start(cfg, argv)
    trio.run(service.run)
    return 0


def _check_live_update(path: str) -> int:
    """The old daemon runs this before it execs us for a live update: if this binary cannot
    start or cannot read the state, the update is refused and the old daemon keeps serving."""
    from . import migration  # the state stream is read at start only for a live update

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
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise SystemExit(f"xenstored: cannot open pid file {path}: {e.strerror or e}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _pid_fd = fd
    return True


def _failure_text(e: BaseException) -> str:
    """One line for the parent to print: the SystemExit message, else the exception itself."""
    if isinstance(e, SystemExit):
        if isinstance(e.code, str):
            return e.code
        return f"xenstored: the daemon exited with status {e.code} before it was ready"
    return f"xenstored: the daemon failed before it was ready: {type(e).__name__}: {e}"


def _daemonize(cfg: Config, argv: list[str] | None, output_pid: bool) -> int:
    """Double fork; the original process exits 0 once the daemon is ready, 1 if it died.

    The pipe carries ``1<pid>`` when the daemon is ready, or ``0<why>`` when it gave up: the
    daemon's stderr is not the caller's terminal for long, and an init script's operator must
    see the reason (``another daemon is serving ...``) where they started it."""
    rfd, wfd = os.pipe()
    if os.fork():
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            ready = r.read()
        if not ready.startswith(b"1"):
            why = ready[1:].decode(errors="replace").strip() if ready.startswith(b"0") else ""
            print(why or "xenstored: the daemon died before it was ready", file=sys.stderr)
            return 1
        if output_pid:
            print(ready[1:].decode().strip(), flush=True)
        return 0
    os.close(rfd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")

    def ready() -> None:
        os.write(wfd, f"1{os.getpid()}".encode())
        os.close(wfd)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    try:
        try:
            if cfg.pid_file and not _lock_pid_file(cfg.pid_file):
                os.write(wfd, b"1already running")
                os._exit(0)
            service = _start(cfg, argv)
        except BaseException as e:  # noqa: BLE001 - every reason goes to the parent
            why = _failure_text(e)
            if cfg.log_file != "stderr":  # else the parent's copy is the one the user sees
                log.error("%s", why.removeprefix("xenstored: "))
            os.write(wfd, b"0" + why.encode(errors="replace"))
            os._exit(1)
        trio.run(service.run, ready)
    finally:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
