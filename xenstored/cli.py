"""The ``xenstored`` command: cxenstored-compatible options, daemonising, and the trio main.

Without ``-N`` the daemon forks like cxenstored, and the parent exits only once the socket
accepts connections, so an init script can use the store right after starting it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import trio

from .config import Config
from .service import Service

log = logging.getLogger("xenstored")

DEFAULT_RUNDIR = "/run/xenstored"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xenstored", description="XenStore daemon", add_help=False)
    p.add_argument("-H", "--help", action="help", help="show this help and exit")
    p.add_argument("-N", "--no-fork", action="store_true", help="stay in the foreground")
    p.add_argument("-F", "--pid-file", help="write the daemon's pid to this file")
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
    p.add_argument("-T", "--trace-file", help="trace file")
    p.add_argument("-K", "--keep-orphans", action="store_true", help="keep nodes of dead domains")
    p.add_argument("-V", "--verbose", action="store_true")
    p.add_argument("--master-domid", "-m", type=int, default=0)
    p.add_argument("--priv-domid", "-p", type=int, default=0)
    p.add_argument("--rundir", help="run directory (default $XENSTORED_RUNDIR or /run/xenstored)")
    p.add_argument("--emulate", action="store_true", default=None, help="emulated hypervisor")
    p.add_argument("--log-level", default=None, help="debug, info, warning, error")
    p.add_argument("-U", "--live-update", action="store_true", help="(internal) restore after live update")
    p.add_argument("--persistent", action="store_true", default=None, help="keep the store across restarts")
    p.add_argument("--persistent-file", help="where --persistent keeps it")
    p.add_argument("--persistent-interval", type=float, help="seconds between snapshots (0: at stop only)")
    return p


def _parse_assign(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not value.strip().isdigit():
        raise SystemExit(f"xenstored: bad quota setting {text!r} (want NAME=NUMBER)")
    return name.strip(), int(value)


def config_from_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"xenstored: ignoring unknown arguments {' '.join(unknown)}", file=sys.stderr)
    rundir = args.rundir or os.environ.get("XENSTORED_RUNDIR") or DEFAULT_RUNDIR
    cfg = Config(rundir=os.path.abspath(rundir))
    cfg.socket_path = os.environ.get("XENSTORED_PATH") or None
    cfg.priv_domid = args.priv_domid
    cfg.master_domid = args.master_domid
    cfg.keep_orphans = args.keep_orphans
    cfg.emulate = args.emulate
    cfg.domain_init = not args.no_domain_init
    cfg.trace_file = args.trace_file
    cfg.pid_file = args.pid_file
    cfg.log_level = args.log_level or ("debug" if args.verbose else "info")
    cfg.live_update = args.live_update
    if args.persistent:
        cfg.persistent = True
    if args.persistent_interval is not None:
        cfg.persistent_interval = args.persistent_interval
    if args.persistent_file:
        cfg.persistent_file = os.path.abspath(args.persistent_file)
    q = cfg.quotas
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
    try:
        for text in args.quota:
            q.set(*_parse_assign(text))
        for text in args.quota_soft:
            name, value = _parse_assign(text)
            if name != "memory":
                raise SystemExit(f"xenstored: only the memory quota has a soft limit, not {name!r}")
            q.set("soft-memory", value)
    except Exception as e:  # XsError from an unknown quota name
        if isinstance(e, SystemExit):
            raise
        raise SystemExit(f"xenstored: {e}") from None
    for text in args.timeout:
        name, value = _parse_assign(text)
        if name != "watch-event":
            raise SystemExit(f"xenstored: unknown timeout {name!r}")
        cfg.watch_event_timeout = float(value)
    return cfg, args


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s xenstored[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def _write_pid_file(path: str) -> None:
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    cfg, args = config_from_args(argv)
    _setup_logging(cfg.log_level)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if args.no_fork:
        if cfg.pid_file:
            _write_pid_file(cfg.pid_file)
        service = Service(cfg, argv)
        service.restore(cfg.live_update)
        trio.run(service.run)
        return 0
    return _daemonize(cfg, argv)


def _daemonize(cfg: Config, argv: list[str] | None) -> int:
    """Double fork; the original process exits 0 once the daemon is ready, 1 if it died."""
    rfd, wfd = os.pipe()
    if os.fork():
        os.close(wfd)
        ok = os.read(rfd, 1)
        return 0 if ok == b"1" else 1
    os.close(rfd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    if cfg.pid_file:
        _write_pid_file(cfg.pid_file)

    def ready() -> None:
        os.write(wfd, b"1")
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
