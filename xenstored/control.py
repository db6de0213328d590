"""XS_CONTROL sub-commands (``xenstore-control``), privileged only, as C-4.22.

Each command returns the reply payload: ``OK\\0`` or a NUL-terminated text.  Unknown commands and
bad arguments are EINVAL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import metrics, quota
from .connection import Connection
from .core import Core
from .wire import XsError

log = logging.getLogger("xenstored.control")

OK = b"OK\0"

Command = Callable[[Core, Connection, list[str]], bytes]
COMMANDS: dict[str, tuple[Command, str]] = {}


def command(name: str, synopsis: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[name] = (fn, synopsis)
        return fn

    return register


def control(core: Core, conn: Connection, args: list[bytes]) -> bytes:
    if not args:
        raise XsError("EINVAL", "no control command")
    try:
        words = [a.decode("utf-8") for a in args]
    except UnicodeDecodeError:
        raise XsError("EINVAL", "control arguments must be text") from None
    entry = COMMANDS.get(words[0])
    if entry is None:
        raise XsError("EINVAL", f"unknown control command {words[0]!r}")
    return entry[0](core, conn, words[1:])


def text(s: str) -> bytes:
    return s.encode("utf-8") + b"\0"


@command("help", "")
def _help(core: Core, conn: Connection, args: list[str]) -> bytes:
    if args:
        raise XsError("EINVAL")
    return text("".join(f"{name:<15} {syn}\n" for name, (_, syn) in COMMANDS.items()))


@command("print", "<string>")
def _print(core: Core, conn: Connection, args: list[str]) -> bytes:
    if len(args) != 1:
        raise XsError("EINVAL")
    log.warning("control: %s", args[0])
    return OK


@command("check", "")
def _check(core: Core, conn: Connection, args: list[str]) -> bytes:
    """Verify the store's internal consistency (every node's parent exists and the child index
    lists it) and the per-owner node counts, repairing counts."""
    if args:
        raise XsError("EINVAL")
    store = core.store
    counts, sizes, broken = store.audit()
    for path in broken[:20]:
        log.error("check: %s has no parent or is missing from the child index", path)
    if counts != store.owned or sizes != store.owned_bytes:
        log.warning("check: node accounting repaired (%s -> %s)", store.owned, counts)
        store.owned.clear()
        store.owned.update(counts)
        store.owned_bytes.clear()
        store.owned_bytes.update(sizes)
    return OK


def _quota_table(values: dict[str, int], names: tuple[str, ...]) -> str:
    return "".join(f"{n:<17}: {values[n]:8d} {quota.DESCRIPTIONS[n]}\n" for n in names)


@command("quota", "[set <name> <val>|<domid>|max [-r]]")
def _quota(core: Core, conn: Connection, args: list[str]) -> bytes:
    hard = tuple(n for n in quota.NAMES if n != "soft-memory")
    if not args:
        return text("Quota settings:\n" + _quota_table(core.config.quotas.values, hard))
    if args[0] == "set":
        if len(args) != 3 or not args[2].isdigit() or int(args[2]) < 1:
            raise XsError("EINVAL")
        name = quota.canonical_name(args[1])
        if name == "soft-memory":
            raise XsError("EINVAL")
        core.config.quotas.set(name, int(args[2]))
        core.settings_changed()
        return OK
    if args[0] == "max":
        # Highest current use of each quota among unprivileged domains.  No history is kept, so
        # this is the present maximum and -r has nothing to reset.
        if len(args) > 2 or (len(args) == 2 and args[1] != "-r"):
            raise XsError("EINVAL")
        best: dict[str, int] = {}
        for dom in core.domains.values():
            if core.is_privileged(dom.domid):
                continue
            for name, value in core.domain_usage(dom).items():
                best[name] = max(best.get(name, 0), value)
        counted = ("nodes", "watches", "outstanding", "memory", "transactions")
        return text("Max quota usage:\n" + "".join(f"{n:<17}: {best.get(n, 0):8d}\n" for n in counted))
    if len(args) == 1 and args[0].isdigit():
        dom = core.domains.get(int(args[0]))
        if dom is None:
            raise XsError("ENOENT")
        usage = core.domain_usage(dom)
        lines = "".join(f"{n:<17}: {usage.get(n, 0):8d} (max {dom.quotas[n]})\n" for n in hard if n in usage)
        return text(f"Domain {dom.domid}:\n" + lines)
    raise XsError("EINVAL")


@command("log", "[on|off|+<switch>|-<switch>]")
def _log(core: Core, conn: Connection, args: list[str]) -> bytes:
    """Switch the trace file on or off (C's io switch; the others have no equivalent here)."""
    tracer = core.tracer
    if not args:
        on = bool(tracer is not None and tracer.trace_on and tracer.trace is not None)
        return text(f"Log switch settings:\n{'io':<8}: {'on' if on else 'off'}\n")
    if len(args) != 1 or args[0] not in ("on", "off", "+io", "-io"):
        raise XsError("EINVAL")
    if tracer is None or tracer.trace is None:
        raise XsError("EINVAL", "no trace file (-T or logfile)")
    tracer.trace_on = args[0] in ("on", "+io")
    return OK


@command("logfile", "<file>")
def _logfile(core: Core, conn: Connection, args: list[str]) -> bytes:
    if len(args) != 1 or not args[0]:
        raise XsError("EINVAL")
    tracer = core.tracer
    if tracer is None:
        if core.open_tracer is None:
            raise XsError("EINVAL", "no tracing in this process")
        tracer = core.tracer = core.open_tracer()
    try:
        tracer.reopen(args[0])
    except OSError as e:
        raise XsError("EINVAL", str(e)) from None
    tracer.trace_on = True
    return OK


@command("memreport", "[<file>]")
def _memreport(core: Core, conn: Connection, args: list[str]) -> bytes:
    """What the daemon holds, per structure and per domain, to the given file or the trace."""
    store = core.store
    lines = [
        f"memreport {time.strftime('%Y-%m-%d %H:%M:%S')}",
        (
            f"nodes: {sum(store.owned.values())} live, {store.version_count()} versions, "
            f"{store.open_snapshots} open snapshots, generation {store.gen}"
        ),
        f"watches: {core.watches.count}",
        f"connections: {len(core.connections)}",
        f"rss: {_rss_kib()} KiB",
    ]
    for dom in sorted(core.domains.values(), key=lambda d: d.domid):
        usage = core.domain_usage(dom)
        lines.append(f"dom{dom.domid}: " + " ".join(f"{k}={v}" for k, v in usage.items()))
    report = "\n".join(lines) + "\n"
    if len(args) > 1:
        raise XsError("EINVAL")
    if args:
        try:
            with open(args[0], "a") as f:
                f.write(report)
        except OSError as e:
            raise XsError("EINVAL", str(e)) from None
        return OK
    tracer = core.tracer
    if tracer is None or tracer.trace is None:
        raise XsError("EINVAL", "no trace file to write the report to")
    tracer.trace.write(report)
    return OK


def _rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@command("stats", "[<domid>]")
def _stats(core: Core, conn: Connection, args: list[str]) -> bytes:
    """Counters and gauges (the metrics file's, as text): the daemon with its busiest domains,
    or one domain in full.  Cut to fit one reply: hundreds of guests do not fit 4 KiB."""
    if len(args) > 1 or (args and not args[0].isdigit()):
        raise XsError("EINVAL")
    state = core.metrics_state()
    domid = int(args[0]) if args else None
    if domid is not None and domid not in state.domains:
        raise XsError("ENOENT")
    return text(metrics.report(core.metrics, state, domid))


# Handled by the service (it replaces the process); listed here for help.
COMMANDS["live-update"] = (lambda conn, args: b"OK\0", "[-c <cmdline>] [-F] [-t <timeout>] <file> | -a")


@command("quota-soft", "[set <name> <val>]")
def _quota_soft(core: Core, conn: Connection, args: list[str]) -> bytes:
    if not args:
        v = core.config.quotas.values["soft-memory"]
        return text(f"Soft quota settings:\n{'memory':<17}: {v:8d} {quota.DESCRIPTIONS['soft-memory']}\n")
    if len(args) == 3 and args[0] == "set" and args[1] == "memory" and args[2].isdigit() and int(args[2]) >= 1:
        core.config.quotas.set("soft-memory", int(args[2]))
        core.settings_changed()
        return OK
    raise XsError("EINVAL")
