"""The running daemon: wiring core, hypervisor and listeners, plus what needs a process around it:
restoring state at start (live update, persistence), live update itself, periodic and final
persistence snapshots, and signals.

Live update follows cxenstored: the old process writes the state stream to
``<rundir>/state_dump``, marks the listening socket and every client socket inheritable and execs
the new binary with ``-U``; the new process restores the store, reattaches the sockets it
inherited and the rings it maps again, and the requester finds ``OK`` waiting in its output.  No
client sees its connection close.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket as pysocket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio
import trio.lowlevel

from . import hypervisor, logs, metrics, recovery
from . import journal as journal_mod
from .config import Config
from .connection import Connection
from .core import Core
from .domains import DomainManager
from .hub import Hub
from .ringpump import RingPump
from .server import make_listening_socket, run_socket_connection, serve_domains, serve_listener
from .store import Store
from .wire import Message, Op, encode

log = logging.getLogger("xenstored")

STATE_DUMP = "state_dump"


@dataclass
class LiveUpdate:
    conn: Connection
    binary: str = ""
    cmdline: str | None = None


def _text(s: str) -> bytes:
    return s.encode() + b"\0"


class Service:
    def __init__(self, cfg: Config, argv: list[str] | None = None) -> None:
        self.cfg = cfg
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.core = Core(cfg)
        # The socket first: a second daemon on the same run directory must stop here, before it
        # touches the running one's hypervisor files.  A live update inherits it instead.
        self._listen_sock: pysocket.socket | None = None
        if not cfg.live_update:
            try:
                self._listen_sock = make_listening_socket(cfg.socket, listen=False)
            except OSError as e:
                raise SystemExit(f"xenstored: cannot listen on {cfg.socket}: {e.strerror or e}") from None
        try:
            self.hv = hypervisor.choose(cfg.emulate, cfg.rundir)
        except BaseException:
            # The socket is ours (bound, not listening): leave no stale one behind.
            if self._listen_sock is not None:
                self._listen_sock.close()
                try:
                    os.unlink(cfg.socket)
                except OSError:
                    pass
            raise
        self.manager = DomainManager(self.core, self.hv)
        self.pump = RingPump(self.manager)
        self.core.live_update = self.live_update_command
        self.core.reopen_logs = self._reopen_logs
        self.core.open_tracer = lambda: logs.Tracer(cfg)
        if cfg.trace_file or cfg.access_log_file:
            self.core.tracer = logs.Tracer(cfg)
        self.lu: LiveUpdate | None = None
        self._listen_fd = -1
        self._restored_sockets: list[tuple[int, int]] = []
        self._nursery: trio.Nursery | None = None
        self._persisted_gen = -1
        # Crash-only: the journal makes every start a recovery (persistence replaces it).
        self.journal: journal_mod.Journal | None = None
        if cfg.journal and not cfg.persistent:
            self.journal = journal_mod.Journal(cfg.journal_path, sync=cfg.journal_sync)

    def _reopen_logs(self) -> None:
        logs.reopen()
        if self.core.tracer is not None:
            self.core.tracer.reopen()

    # ------------------------------------------------------------------------- start
    @property
    def persistent_file(self) -> str:
        return self.cfg.persistent_file or os.path.join(self.cfg.rundir, "xenstored.state")

    def restore(self, live_update: bool) -> None:
        """Load the state a live update, a crash or a stop left, if any: from the state dump of
        a live update, else from the journal (every start after the first is a recovery), else
        from the persistent file."""
        if self.cfg.persistent:
            import glob

            for stale in glob.glob(glob.escape(self.persistent_file) + ".tmp*"):
                os.unlink(stale)  # a snapshot a crash cut short: the real file is intact
        journal = self.journal
        if journal is not None and not live_update:
            try:
                rec = journal_mod.read_state(journal.dir)
            except OSError as e:
                raise SystemExit(
                    f"xenstored: cannot read the journal in {journal.dir}: {e.strerror or e}; "
                    "fix its permissions, or give another journal-dir (--journal-dir)"
                ) from None
            except (ValueError, journal_mod.JournalError) as e:
                raise SystemExit(
                    f"xenstored: cannot recover from the journal in {journal.dir}: {e}; "
                    "move that directory away to start with an empty store"
                ) from None
            if rec is not None:
                self._recover(rec)
                return
        if live_update:
            path = os.path.join(self.cfg.rundir, STATE_DUMP)
        elif self.cfg.persistent and os.path.exists(self.persistent_file):
            path = self.persistent_file
        else:
            if journal is not None:
                self._open_journal()
                journal.snapshot_now()  # the initial tree: recovery starts from a snapshot
            if self.cfg.domain_init and not self.manager.introduce_dom0():
                log.info("no ring page for the store domain; serving the socket only")
            return
        # The state stream, only for a live update or a persistent file: 3 ms of every start.
        from . import migration

        start = time.perf_counter()
        with open(path, "rb") as f:
            try:
                state = migration.decode(f.read())
            except migration.StreamError as e:
                # Refuse rather than start empty: silently dropping the store would be worse.
                raise SystemExit(f"xenstored: cannot restore {path}: {e}; move it away to start afresh") from None
        importer = getattr(self.hv, "import_state", None)
        if state.hv_state and importer is not None:
            importer(state.hv_state)
        migration.restore_tree(self.core, state)
        self._restored_sockets = migration.restore_connections(self.core, self.manager, state, rebind=True)
        if live_update:
            self._listen_fd = state.globals.socket_fd
            os.unlink(path)
        if journal is not None:
            # A live update continues the journal the old process flushed before its exec.
            self._open_journal()
            self._attach_rings()
            if not live_update:
                journal.snapshot_now()
        log.info(
            "restored %d nodes, %d connections, %d watches from %s in %.3f s",
            len(state.nodes),
            len(state.connections),
            len(state.watches),
            path,
            time.perf_counter() - start,
        )

    def _open_journal(self) -> None:
        assert self.journal is not None
        try:
            self.journal.open(self.core)
        except OSError as e:
            raise SystemExit(
                f"xenstored: cannot write the journal in {self.journal.dir}: {e.strerror or e}; "
                "give it a writable journal-dir (--journal-dir), or run without one (--no-journal)"
            ) from None

    def _attach_rings(self) -> None:
        assert self.journal is not None
        for dom in self.core.domains.values():
            if dom.conn is not None and dom.ring is not None:
                self.journal.ring_attached(dom)

    def _recover(self, rec: journal_mod.Recovered) -> None:
        """Crash recovery: the acknowledged state back, every guest's ring served again."""
        assert self.journal is not None
        start = time.perf_counter()
        report, dead = recovery.apply(self.core, self.manager, rec)
        self._open_journal()
        self.journal.replay_bytes = sum(os.path.getsize(p) for p in rec.files)
        self._attach_rings()
        for domid in dead:
            dom = self.core.domains.get(domid)
            if dom is not None:
                self.manager.destroy(dom, "died while xenstored was down")
        self.manager.on_dom_exc()  # shut down or dying meanwhile: report it now
        priv = self.core.domains.get(self.core.priv_domid)
        if self.cfg.domain_init and (priv is None or not priv.introduced):
            self.manager.introduce_dom0()
        for dom in list(self.core.domains.values()):
            if dom.local_port is not None and dom.conn is not None:
                # A request written while we were down: the guest's kick went nowhere.
                self.hv.notify(dom.local_port)
                self.manager.output_ready(dom)
        self.journal.flush()
        log.warning(
            "recovered from the journal in %s: %d nodes, %d domains, %d rings, %d watches, "
            "%d domains released that died meanwhile%s (%d records, %.3f s)",
            self.journal.dir,
            report.nodes,
            report.domains,
            report.rings,
            report.watches,
            len(dead),
            f", a torn tail of {rec.torn_bytes} bytes dropped" if rec.torn_bytes else "",
            rec.records,
            time.perf_counter() - start,
        )

    async def _journal_loop(self) -> None:
        """Compaction: a snapshot once the journal has grown, walked in slices from an MVCC
        store snapshot and written by a worker thread, so requests go on meanwhile.  It also
        repairs a journal whose writes failed (disk full): the snapshot holds everything."""
        journal = self.journal
        assert journal is not None
        store = self.core.store
        while True:
            await trio.sleep(1.0)
            try:
                await self._compact(journal, store)
            except Exception:
                log.exception("journal: compaction failed; serving on, retried in a second")

    async def _compact(self, journal: journal_mod.Journal, store: Store) -> None:
        if journal.wants_snapshot(self.cfg.journal_snapshot_bytes):
            try:
                seq, records = journal.begin_snapshot()
            except OSError as e:
                log.error("journal: cannot start a snapshot in %s: %s (retrying)", journal.dir, e)
                return
            snap = store.open_snapshot()
            try:
                for i, rec in enumerate(journal_mod.node_records(store, snap)):
                    records.append(rec)
                    if i % 2000 == 1999:
                        await trio.lowlevel.checkpoint()
            finally:
                store.close_snapshot(snap)
            try:
                await trio.to_thread.run_sync(journal.finish_snapshot, seq, records)
            except OSError as e:
                log.error("journal: cannot write snapshot %d in %s: %s (retrying)", seq, journal.dir, e)

    # ------------------------------------------------------------------------- main loop
    async def run(self, ready: Callable[[], None] | None = None) -> None:
        cfg = self.cfg
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                hub = Hub()
                await nursery.start(hub.run)
                await nursery.start(serve_domains, self.pump, self.hv, hub)
                if self._listen_sock is not None:
                    sock = self._listen_sock
                    sock.listen(128)  # state restored, hypervisor up: now clients may come
                else:
                    sock = pysocket.socket(fileno=self._listen_fd)
                self._listen_fd = sock.fileno()
                await nursery.start(serve_listener, self.core, sock, hub)
                for conn_id, fd in self._restored_sockets:
                    conn = self.core.connections[conn_id]
                    self.core.socket_fds[conn_id] = fd
                    nursery.start_soon(run_socket_connection, self.core, conn, pysocket.socket(fileno=fd), hub)
                if cfg.persistent and cfg.persistent_interval > 0:
                    nursery.start_soon(self._persist_loop)
                if self.journal is not None:
                    nursery.start_soon(self._journal_loop)
                if cfg.metrics_file:
                    nursery.start_soon(self._metrics_loop, cfg.metrics_file)
                log.info("ready: connect with XENSTORED_PATH=%s xenstore-ls -p /", cfg.socket)
                sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {cfg.socket}")
                if ready is not None:
                    ready()
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: reopening logs")
                        reopen = self.core.reopen_logs
                        if reopen is not None:
                            reopen()
                        continue
                    log.info("signal %d: shutting down", signum)
                    sd_notify("STOPPING=1")
                    nursery.cancel_scope.cancel()
                    break
        if cfg.persistent:
            try:
                self.save(self.persistent_file)
                log.info("state saved to %s", self.persistent_file)
            except OSError as e:
                log.error("persistence: cannot write %s at stop: %s", self.persistent_file, e)
        if self.journal is not None:
            # Nothing to save: the journal has it all.  A snapshot only makes the next start,
            # which recovers from it, quicker.
            try:
                if self.journal.replay_bytes + self.journal.size > 1 << 20:
                    self.journal.snapshot_now()
            except OSError as e:
                log.error("journal: no snapshot at stop: %s (the journal is intact)", e)
            self.journal.close()
        self.hv.close()
        try:
            os.unlink(cfg.socket)
        except OSError:
            pass

    # ------------------------------------------------------------------------- persistence
    def save(self, path: str) -> None:
        """Write the state atomically: temp file, fsync, rename, so a crash leaves the old or
        the new state, never a torn one.  Socket clients are not part of it (they reconnect)."""
        from . import migration

        state = migration.dump_core(self.core)
        _atomic_write(path, migration.encode(state))
        self._persisted_gen = self.core.store.gen

    async def _persist_loop(self) -> None:
        from . import migration

        while True:
            await trio.sleep(self.cfg.persistent_interval)
            store = self.core.store
            if store.gen == self._persisted_gen:
                continue
            # Walk a snapshot in slices so a big store never stalls the loop; MVCC keeps the
            # snapshot consistent while requests go on changing the live tree.
            gen = store.gen
            snap = store.open_snapshot()
            nodes = []
            try:
                for i, node in enumerate(migration.snapshot_nodes(self.core, snap)):
                    nodes.append(node)
                    if i % 2000 == 1999:
                        await trio.lowlevel.checkpoint()
            finally:
                store.close_snapshot(snap)
            state = migration.dump_core(self.core, nodes=nodes)
            try:
                await trio.to_thread.run_sync(_atomic_write, self.persistent_file, migration.encode(state))
            except OSError as e:
                log.error("persistence: cannot write %s: %s (state kept in memory)", self.persistent_file, e)
                continue
            self._persisted_gen = gen

    # ------------------------------------------------------------------------- metrics
    async def _metrics_loop(self, path: str) -> None:
        """The Prometheus text file for node_exporter's textfile collector, every
        metrics-interval seconds: the text is built here in the loop (O(domains + ops): well
        under a millisecond for hundreds of guests) and written by a worker thread, to a
        temporary file renamed over the old one, so a scrape never reads half a file and a slow
        disk never stalls requests.  The first write is at once, so the file exists when the
        daemon is ready to be watched."""
        interval = max(self.cfg.metrics_interval, 1.0)
        core = self.core
        since: list[list[int]] | None = None
        failing = False
        while True:
            try:
                now = core.metrics.latency_copy()
                text = metrics.prometheus(core.metrics, core.metrics_state(), since)
                since = now
                await trio.to_thread.run_sync(_atomic_write, path, [text.encode()], False)
                if failing:
                    log.warning("metrics: %s written again", path)
                failing = False
            except OSError as e:
                if not failing:  # once per outage, not every interval
                    log.error("metrics: cannot write %s: %s (retrying every %.0f s)", path, e, interval)
                failing = True
            except Exception:
                # Never die of the metrics: a bug here costs the file's freshness, not the store.
                log.exception("metrics: cannot build %s; serving on, retried in %.0f s", path, interval)
            await trio.sleep(interval)

    # ------------------------------------------------------------------------- live update
    def live_update_command(self, conn: Connection, msg: Message, args: list[str]) -> bytes | None:
        """``live-update -f FILE | -c CMDLINE | -s [-F] [-t SECS] [-v N] | -a`` (as cxenstored).

        Returns the reply, or None when the reply is withheld: it comes from the new process."""
        if not args:
            return _text("live-update: missing parameters")
        lu = self.lu
        if args[0] == "-a":
            self.lu = None
            return b"OK\0"
        if args[0] == "-f":
            if lu is not None and lu.conn is not conn:
                return _text("live-update session already active.")
            if len(args) != 2:
                return _text("live-update -f needs a file name")
            if not (os.path.isfile(args[1]) and os.access(args[1], os.X_OK)):
                return _text(f"live-update: {args[1]} is not an executable file")
            self.lu = lu = lu or LiveUpdate(conn)
            lu.binary = args[1]
            return b"OK\0"
        if args[0] == "-c":
            if lu is None or lu.conn is not conn:
                return _text("Not in live-update session.")
            lu.cmdline = " ".join(args[1:])
            return b"OK\0"
        if args[0] == "-s":
            if lu is None or lu.conn is not conn or not lu.binary:
                return _text("Not in live-update session.")
            force, timeout = False, 60.0
            rest = args[1:]
            while rest:
                a = rest.pop(0)
                if a == "-F":
                    force = True
                elif a == "-t" and rest:
                    timeout = float(rest.pop(0) or 0)
                elif a == "-v" and rest:
                    rest.pop(0)
                else:
                    return _text(f"live-update: unknown option {a}")
            # As cxenstored: transactions older than the timeout block the update (unless -F);
            # younger ones make it wait (BUSY: xenstore-control asks again every second).
            now = time.monotonic()
            ages = [
                (c, tx, now - t.started) for c in self.core.connections.values() for tx, t in c.transactions.items()
            ]
            old = [a for a in ages if a[2] >= timeout]
            if old and not force:
                self.lu = None
                listing = "".join(f"{c.label} transaction {tx} open for {age:.0f} s\n" for c, tx, age in old[:20])
                return _text(f"Timeout reached, transactions still open:\n{listing}")
            if len(old) < len(ages):
                return b"BUSY\0"
            assert self._nursery is not None
            self._nursery.start_soon(self._exec, lu, msg, force, timeout)
            return None
        return _text(f"live-update: unknown option {args[0]}")

    async def _check_new_binary(self, binary: str, argv: list[str]) -> str | None:
        """Dump the state as it is now to a side file and let the new binary read it."""
        from . import migration

        path = os.path.join(self.cfg.rundir, STATE_DUMP + ".check")
        state = migration.dump_core(self.core, {}, listen_fd=self._listen_fd)
        await trio.to_thread.run_sync(_atomic_write, path, list(migration.encode(state)), False)
        try:
            return await _check_binary(binary, argv, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _exec(self, lu: LiveUpdate, msg: Message, force: bool, timeout: float) -> None:
        # Let the current batch of requests finish, then wait for an instant with no open
        # transaction (they are not carried over): from that check to the exec nothing awaits,
        # so no transaction can start in between.
        import shlex

        from . import migration

        core = self.core
        deadline = time.monotonic() + timeout
        await trio.lowlevel.checkpoint()
        while not force and any(c.transactions for c in core.connections.values()):
            if time.monotonic() > deadline:
                self.lu = None
                lu.conn.reply(msg, _text("Timeout reached, transactions still open"))
                return
            await trio.sleep(0.005)
        argv = shlex.split(lu.cmdline) if lu.cmdline is not None else list(self.argv)
        if "-U" not in argv and "--live-update" not in argv:
            argv.append("-U")
        if "-N" not in argv and "--no-fork" not in argv:
            argv.insert(0, "-N")
            if not self.cfg.log_file and not self.cfg.foreground:
                argv.insert(1, "--log-file=syslog")  # where the forked daemon was logging
        # Before we are gone: does the new binary start and read our state?  If not, the update
        # is refused and this process serves on with everything it has.
        why = await self._check_new_binary(lu.binary, argv)
        if why is not None:
            self.lu = None
            log.error("live update refused: %s", why)
            lu.conn.reply(msg, _text(f"live-update: {why}; still running the old daemon"))
            return
        while not force and any(c.transactions for c in core.connections.values()):
            if time.monotonic() > deadline:  # one started while the check ran, and stays open
                self.lu = None
                lu.conn.reply(msg, _text("Timeout reached, transactions still open"))
                return
            await trio.sleep(0.005)
        start = time.perf_counter()
        if self.journal is not None:
            self.journal.flush()  # the new process continues this journal
        sockets = {cid: fd for cid, fd in core.socket_fds.items() if cid in core.connections}
        state = migration.dump_core(core, sockets, listen_fd=self._listen_fd)
        ok = encode(Op.CONTROL, msg.req_id, msg.tx_id, b"OK\0")
        for c in state.connections:
            if c.conn_id == lu.conn.id:
                c.out_data += ok
        path = os.path.join(self.cfg.rundir, STATE_DUMP)
        _atomic_write(path, migration.encode(state), sync=False)
        fds = [self._listen_fd, *sockets.values()]
        for fd in fds:
            os.set_inheritable(fd, True)
        log.warning(
            "live update: exec %s %s (%d nodes, %d connections, state written in %.3f s)",
            lu.binary,
            " ".join(argv),
            len(state.nodes),
            len(state.connections),
            time.perf_counter() - start,
        )
        for h in logging.getLogger().handlers:
            h.flush()
        try:
            os.execv(lu.binary, [lu.binary, *argv])
        except OSError as e:
            for fd in fds:
                os.set_inheritable(fd, False)
            self.lu = None
            log.error("live update: exec failed: %s", e)
            lu.conn.reply(msg, _text(f"live-update: exec of {lu.binary} failed: {e}"))


async def _check_binary(binary: str, argv: list[str], state_path: str, timeout: float = 60.0) -> str | None:
    """Run ``binary argv --check-live-update STATE``; None if it succeeded, else why not."""
    cmd = [binary, *[a for a in argv if a not in ("-U", "--live-update")], "--check-live-update", state_path]
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    except trio.TooSlowError:
        return f"{binary} did not finish its start-up check in {timeout:.0f} s"
    except OSError as e:
        return f"cannot run {binary}: {e.strerror or e}"
    if done.returncode != 0:
        tail = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
        return f"{binary} failed its start-up check (exit {done.returncode}): {tail[0][:200]}"
    return None


def sd_notify(state: str) -> bool:
    """The systemd notify protocol without libsystemd: one datagram to $NOTIFY_SOCKET (an
    abstract socket when it starts with '@').  False when not run under a notify service."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_DGRAM | pysocket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
    except OSError as e:
        log.warning("systemd notify failed: %s", e)
        return False
    return True


def _atomic_write(path: str, chunks: Iterable[bytes], sync: bool = True) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.writelines(chunks)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync:
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
