"""An emulated hypervisor that speaks the oracle's fakexen convention, so that the same guest
programs (our :mod:`xenstored.guest`, the oracle's ``xsring.py``) drive either daemon.

State directory (``$FAKEXEN_DIR``, default ``<rundir>/fx``):

``dom<N>.ring``
    4 KiB file, domain N's xenstore page; both sides ``mmap(MAP_SHARED)`` it.  The gfn given to
    INTRODUCE is ignored.  Like fakexen we create and size the file when it is missing or short.
``xsd_port``
    dom0's event channel as text (created with ``$FAKEXEN_XSD_PORT`` or ``1`` when absent/empty).
``evtchn.sock``
    our AF_UNIX SOCK_DGRAM socket; one text command per datagram::

        notify <domid> [<remote_port>]   a guest kicks its channel -> "ok notify <local_port>"
        port <local_port>                kick a local port directly -> "ok port <p>"
        create|destroy|dying|crash <N>   change the domain table, raise VIRQ_DOM_EXC -> "ok <cmd> <N>"
        shutdown <N> [<reason>]          likewise
        virq                             raise VIRQ_DOM_EXC -> "ok virq <virq_port>"
        exists <N>                       -> "ok 1" / "ok 0"

    A sender with an address (bound or autobound) gets the reply once the command is applied;
    for domain changes, that is after the daemon's ``on_dom_exc`` has run, so a test that says
    ``destroy 5`` can immediately observe the cleanup.  Kicks coalesce per port.
``dom<N>.evtchn``
    optional guest socket; notifying a port bound to domain N sends ``notify <remote_port>`` there.
``domains``
    the domain table (:mod:`xenstored.fxtable`): a log of ``<domid> <flags> <reason>`` lines,
    one appended per change and compacted now and then; it outlives the daemon.
``xenstored.lock``
    held (``flock``) by the daemon serving this folder, and holding its pid: a second daemon
    pointed at the same folder would steal ``evtchn.sock`` and delete it on exit, so it refuses
    to start instead, naming the holder.

Ring files go with their domain: ``destroy <N>`` removes ``dom<N>.ring`` (a later ``create <N>``
must not find the dead domain's indexes in it), and a clean stop removes those of domains the
table does not hold (a guest that attached to a domain never created, one destroyed offline).
The rings of existing domains stay: the table outlives the daemon, as a real hypervisor's does,
and a restarted daemon (journal, persistence) serves those pages again.

Why not the real text parsing of C (strtol): we accept what ``int(x, 0)`` accepts; garbage gets an
``err ...`` reply instead of being read as 0.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import inspect
import logging
import mmap
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import trio

from .. import fxtable
from ..wire import XsError
from .base import (
    SHUTDOWN_CRASH,
    DomainInfo,
    DomExcCallback,
    Hypervisor,
    HypervisorError,
    PortCallback,
)

log = logging.getLogger("xenstored.hypervisor")

PAGE_SIZE = 4096
MAX_DOMID = 0x7FF0  # DOMID_FIRST_RESERVED
MAX_PORT = 4096
DGRAM_MAX = 512  # commands are short; anything longer is garbage anyway
BATCH = 256  # datagrams drained per wakeup before yielding, as fakexen does
LOCK_FILE = "xenstored.lock"
_RING_FILE = re.compile(r"dom([0-9]+)\.ring")

_EXISTS = 0x01
_DYING = 0x02
_SHUTDOWN = 0x04
_CRASHED = 0x08


def parse_domain_list(spec: str | None) -> set[int]:
    """``"1-10,42"`` -> {1..10, 42}; bad tokens are skipped (the env var is a test convenience)."""
    out: set[int] = set()
    if not spec:
        return out
    for tok in spec.replace(",", " ").split():
        lo, sep, hi = tok.partition("-")
        try:
            a = int(lo, 0)
            b = int(hi, 0) if sep else a
        except ValueError:
            continue
        out.update(d for d in range(max(a, 0), min(b, MAX_DOMID - 1) + 1))
    return out


def _int(tok: str) -> int | None:
    try:
        return int(tok, 0)
    except ValueError:
        return None


class _Port:
    __slots__ = ("addr", "domid", "msg", "rport", "sock")

    def __init__(self, domid: int, rport: int, addr: str) -> None:
        self.domid = domid
        self.rport = rport
        self.addr = addr
        self.msg = b"notify %d" % rport
        # Connected once, then plain send(): resolving the path on every kick costs more than the
        # rest of a ring round trip.
        self.sock: socket.socket | None = None

    def kick(self) -> None:
        for _attempt in (0, 1):
            try:
                if self.sock is None:
                    if not os.path.exists(self.addr):
                        # Nobody bound (the usual case at INTRODUCE, and for guests that poll):
                        # one stat, where a socket, a failed connect and a close cost 20 us.
                        return
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                    try:
                        s.connect(self.addr)
                    except OSError:
                        s.close()
                        return  # nobody listening (yet): the guest polls its ring anyway
                    self.sock = s
                self.sock.send(self.msg)
                return
            except BlockingIOError:
                return  # its queue is full: it has kicks to read anyway
            except OSError:
                # The guest re-bound its socket (a new endpoint at the same path): reconnect once.
                self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class EmulatedHypervisor(Hypervisor):
    """Files and datagram sockets standing in for grant tables and event channels."""

    emulated = True

    def __init__(
        self,
        fx_dir: str | os.PathLike[str],
        domains: str | None = None,
        xsd_port: str | None = None,
    ) -> None:
        self.dir = Path(fx_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HypervisorError(
                f"cannot create the emulated hypervisor's folder {self.dir}: {e.strerror or e}"
            ) from None
        self._lock_fd = self._lock()
        if domains is None:
            domains = os.environ.get("FAKEXEN_DOMAINS")
        self._xsd_port_text = xsd_port or os.environ.get("FAKEXEN_XSD_PORT") or "1"
        self._flags: dict[int, int] = {0: _EXISTS}
        self._reason: dict[int, int] = {}
        for d in parse_domain_list(domains):
            self._flags[d] = _EXISTS
        # The table outlives the daemon, as a real hypervisor does: a restarted daemon finds the
        # domains that exist now (some may have died while it was down), not FAKEXEN_DOMAINS.
        # Domains changed since the daemon's last scan (changed_domains); None: unknown (at
        # start, after a state import or a bare ``virq``), so the next scan looks at them all.
        self._changed: set[int] | None = None
        self._table_file = fxtable.TableFile(self.dir)
        saved = self._table_file.load()
        if saved is not None:
            self._flags = {d: f for d, (f, _r) in saved.items()}
            self._reason = {d: r for d, (_f, r) in saved.items() if r}
        else:
            self._save_table()
        self._ports: dict[int, _Port] = {}
        # (domid, remote port) -> lowest local port bound to it: a kick costs one lookup, however
        # many domains there are.
        self._by_remote: dict[tuple[int, int], int] = {}
        # Every local port bound to each (domid, remote port) pair (nearly always one): when the
        # lowest goes, the next is found here, not by a sort of every binding.
        self._pair_ports: dict[tuple[int, int], list[int]] = {}
        # Free ports below _next_port, as a heap: binding takes the lowest free port, as
        # fakexen does, without scanning the bound ones (O(log ports), not O(ports)).
        self._free_ports: list[int] = []
        self._next_port = 1
        # The exact datagram a guest kicks with (``notify <domid> <rport>``, as our Guest and the
        # oracle's xsring send it) -> its local port, learnt from the first such kick and dropped
        # whenever a binding changes: a kick then costs one dict lookup instead of decoding and
        # parsing text.  Bounded by the number of bound ports.
        self._kicks: dict[bytes, int] = {}
        # Port 1 is the VIRQ_DOM_EXC binding, as in a C xenstored under fakexen (it binds the VIRQ
        # before introducing dom0), so port numbers in replies match the oracle's.
        self.virq_port = 1
        self._maps: dict[int, tuple[mmap.mmap, memoryview]] = {}
        # The folder as a string: file names per domain are made by formatting, not pathlib
        # (a ``Path / name`` cost 7 us, at every INTRODUCE and every destroy).
        self._dir = os.fspath(self.dir)
        self.sock_path = f"{self._dir}/evtchn.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        try:
            self._sock.bind(self.sock_path)
        except OSError as e:
            self._sock.close()
            os.close(self._lock_fd)
            raise HypervisorError(f"cannot bind {self.sock_path}: {e.strerror or e}") from None

    def _lock(self) -> int:
        """Take the folder's lock (flock, so it dies with the process, and O_CLOEXEC, so a live
        update's exec hands it to the new binary, which takes it again); write our pid in it."""
        path = self.dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise HypervisorError(f"cannot open {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise HypervisorError(
                f"the emulated hypervisor in {self.dir} is in use by another xenstored{who}; "
                "stop that one, or give this one its own folder (FAKEXEN_DIR or --rundir)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    # -- domains -------------------------------------------------------------------------------

    def _info(self, domid: int, flags: int) -> DomainInfo:
        return DomainInfo(
            domid=domid,
            shutdown=bool(flags & (_SHUTDOWN | _CRASHED)),
            crashed=bool(flags & _CRASHED),
            dying=bool(flags & _DYING),
            shutdown_reason=self._reason.get(domid, 0),
        )

    def domain_info(self, domid: int) -> DomainInfo | None:
        flags = self._flags.get(domid, 0)
        if not flags & _EXISTS:
            return None
        return self._info(domid, flags)

    def domains(self) -> list[DomainInfo]:
        return [self._info(d, f) for d, f in sorted(self._flags.items()) if f & _EXISTS]

    def export_state(self) -> bytes:
        """The domain table, for a state stream: the emulated hypervisor must outlive a daemon
        process across live update and restart, as the real one does."""
        entries = sorted(self._flags.items())
        return "".join(f"{d} {f} {self._reason.get(d, 0)}\n" for d, f in entries).encode("ascii")

    def changed_domains(self) -> set[int] | None:
        """The domains a command changed since the last call (a VIRQ_DOM_EXC scan then looks at
        those, not at every domain), or None when the scan must look at all of them."""
        changed, self._changed = self._changed, set()
        return changed

    def _note_change(self, domid: int) -> None:
        if self._changed is not None:
            self._changed.add(domid)

    def import_state(self, data: bytes) -> None:
        for line in data.decode("ascii", "replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and all(p.isdigit() for p in parts):
                d, f, r = (int(p) for p in parts)
                self._flags[d] = f
                if r:
                    self._reason[d] = r
        self._changed = None
        self._save_table()

    def _save_table(self) -> None:
        """Write the whole domain table (fxtable), compacted: at start-up and after a state
        import.  A failure costs durability only, never the command."""
        table = {d: (f, self._reason.get(d, 0)) for d, f in self._flags.items()}
        try:
            self._table_file.save(table)
        except OSError as e:
            log.warning("emulated hypervisor: cannot save the domain table in %s: %s", self.dir, e)

    def _save_domain(self, domid: int) -> None:
        """Keep ``domid``'s change on disk: one appended line, O(1) in the number of domains
        (rewriting the table made every create and destroy O(domains)); now and then the log is
        compacted instead, which costs O(domains) once per O(domains) changes."""
        tf = self._table_file
        if tf.due(len(self._flags)):
            self._save_table()
            return
        try:
            tf.append(domid, self._flags.get(domid, 0), self._reason.get(domid, 0))
        except OSError as e:
            log.warning("emulated hypervisor: cannot save the domain table in %s: %s", self.dir, e)

    # Direct table manipulation, for in-process tests and embedding (no VIRQ raised).
    def create_domain(self, domid: int) -> None:
        self._flags[domid] = _EXISTS
        self._reason.pop(domid, None)
        self._note_change(domid)
        self._save_domain(domid)

    def destroy_domain(self, domid: int) -> None:
        """Forget the domain and remove its ring file: its page dies with it (a mapping still
        held by the core or a guest process stays valid until unmapped)."""
        if domid == 0:
            raise ValueError("cannot destroy dom0")
        self._flags.pop(domid, None)
        self._reason.pop(domid, None)
        self._note_change(domid)
        self._save_domain(domid)
        try:
            os.unlink(self.ring_path(domid))
        except OSError:
            pass

    # -- rings ---------------------------------------------------------------------------------

    def ring_path(self, domid: int) -> str:
        return f"{self._dir}/dom{domid}.ring"

    def _map_file(self, path: str) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < PAGE_SIZE:
                os.ftruncate(fd, PAGE_SIZE)
            return mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def map_ring(self, domid: int, gfn: int) -> memoryview:
        if self.domain_info(domid) is None:
            raise XsError("EINVAL", f"map ring of nonexistent dom{domid}")
        self.unmap_ring(domid)  # a re-map must see the current file, not a stale inode
        try:
            m = self._map_file(self.ring_path(domid))
        except OSError as e:
            raise XsError("EINVAL", f"map ring of dom{domid}: {e}") from e
        view = memoryview(m)
        self._maps[domid] = (m, view)
        return view

    def unmap_ring(self, domid: int) -> None:
        entry = self._maps.pop(domid, None)
        if entry is None:
            return
        m, view = entry
        view.release()
        try:
            m.close()
        except BufferError:
            # Someone still holds a view (a Ring not yet released); the mapping goes away with
            # the last view instead of failing a cleanup path.
            pass

    def dom0_ring(self) -> tuple[memoryview, int] | None:
        port_file = self.dir / "xsd_port"
        try:
            text = port_file.read_text().strip()
        except FileNotFoundError:
            text = ""
        if not text:
            port_file.write_text(self._xsd_port_text)
            text = self._xsd_port_text.strip()
        port = _int(text)
        if port is None or port <= 0:
            return None
        return self.map_ring(0, 0), port

    # -- event channels ------------------------------------------------------------------------

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        if self.domain_info(domid) is None:
            raise XsError("EINVAL", f"bind to nonexistent dom{domid}")
        if self._free_ports:
            p = heapq.heappop(self._free_ports)
        else:
            p = self._next_port
            while p == self.virq_port:
                p += 1
            if p >= MAX_PORT:
                raise XsError("ENOSPC", "no free event channel port")
            self._next_port = p + 1
        pair = (domid, remote_port)
        self._ports[p] = _Port(domid, remote_port, f"{self._dir}/dom{domid}.evtchn")
        self._pair_ports.setdefault(pair, []).append(p)
        self._by_remote.setdefault(pair, p)
        self._forget_kick(pair)
        return p

    def unbind(self, local_port: int) -> None:
        port = self._ports.pop(local_port, None)
        if port is None:
            return
        port.close()
        heapq.heappush(self._free_ports, local_port)
        pair = (port.domid, port.rport)
        self._forget_kick(pair)
        bound = self._pair_ports[pair]
        bound.remove(local_port)
        if not bound:
            del self._pair_ports[pair]
            self._by_remote.pop(pair, None)
        elif self._by_remote.get(pair) == local_port:
            self._by_remote[pair] = min(bound)  # another binding of the same pair

    def _forget_kick(self, pair: tuple[int, int]) -> None:
        """A binding of ``pair`` changed: the one cached kick that resolves through it goes (only
        the canonical ``notify <domid> <rport>`` is ever cached).  Clearing the whole cache made
        every other guest's next kick take the parsing path, at each INTRODUCE and RELEASE."""
        self._kicks.pop(b"notify %d %d" % pair, None)

    def _first_port(self, domid: int) -> int | None:
        """``notify <domid>`` without a port: the domain's lowest bound port (rare)."""
        ports = [p for p, b in self._ports.items() if b.domid == domid]
        return min(ports) if ports else None

    def notify(self, local_port: int) -> None:
        port = self._ports.get(local_port)
        if port is not None:
            port.kick()

    def bound_ports(self) -> dict[int, tuple[int, int]]:
        """local port -> (domid, remote port), for state dumps and tests."""
        return {p: (b.domid, b.rport) for p, b in self._ports.items()}

    # -- command channel -----------------------------------------------------------------------

    def command(self, text: str) -> tuple[str, int | None, bool]:
        """Apply one command; returns (reply, local port kicked or None, raises VIRQ_DOM_EXC)."""
        argv = text.split()[:4]
        if not argv:
            return "err empty", None, False
        cmd = argv[0]
        domid = _int(argv[1]) if len(argv) > 1 else None
        if cmd == "notify" and domid is not None and domid >= 0:
            rport = _int(argv[2]) if len(argv) > 2 else -1
            if rport is None:
                return "err bad command", None, False
            p = self._by_remote.get((domid, rport)) if rport >= 0 else self._first_port(domid)
            if p is None:
                return f"err no binding for dom{domid}", None, False
            return f"ok notify {p}", p, False
        if cmd == "port" and domid is not None:
            if domid == self.virq_port:
                self._changed = None  # a bare VIRQ: who knows what changed
                return f"ok port {domid}", None, True
            if domid in self._ports:
                return f"ok port {domid}", domid, False
        if cmd == "virq":
            self._changed = None
            return f"ok virq {self.virq_port}", None, True
        if domid is None or not 0 <= domid < MAX_DOMID:
            return "err bad command", None, False
        flags = self._flags.get(domid, 0)
        if cmd == "create":
            self.create_domain(domid)
        elif cmd == "destroy":
            if domid == 0:
                return "err cannot destroy dom0", None, False
            self.destroy_domain(domid)
        elif cmd == "dying":
            self._flags[domid] = flags | _DYING
        elif cmd == "shutdown":
            reason = _int(argv[2]) if len(argv) > 2 else 0
            self._flags[domid] = flags | _SHUTDOWN
            self._reason[domid] = reason if reason is not None else 0
        elif cmd == "crash":
            self._flags[domid] = flags | _CRASHED
            self._reason[domid] = SHUTDOWN_CRASH
        elif cmd == "exists":
            return ("ok 1" if flags & _EXISTS else "ok 0"), None, False
        else:
            return f"err unknown command {cmd}"[:200], None, False
        if cmd in ("dying", "shutdown", "crash"):
            self._note_change(domid)
            self._save_domain(domid)
        return f"ok {cmd} {domid}", None, True

    def _drain(
        self, on_port_kicked: PortCallback, replies: list[tuple[bytes, str | bytes]]
    ) -> tuple[dict[int, None], bool]:
        """Read up to BATCH datagrams, pumping each kicked port as soon as its first kick is read:
        the guest is waiting for that, the rest of the queue is not.  Returns the ports kicked
        again after their pump (in order, each once: pump them once more) and whether
        VIRQ_DOM_EXC was raised; replies owed to senders are appended to ``replies``."""
        pumped: set[int] = set()
        again: dict[int, None] = {}  # insertion-ordered set: later kicks coalesce per port
        virq = False
        kicks = self._kicks
        ports = self._ports
        recvfrom = self._sock.recvfrom
        for _ in range(BATCH):
            try:
                data, addr = recvfrom(DGRAM_MAX)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # pragma: no cover - e.g. ECONNREFUSED noise; keep serving
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                continue
            port = kicks.get(data)
            if port is not None:  # a guest's kick, seen before
                if addr:
                    replies.append((b"ok notify %d" % port, addr))
            elif data == b"wake":
                continue
            else:
                try:
                    text = data.decode("ascii")
                except UnicodeDecodeError:
                    reply, port, raised = "err bad command", None, False
                else:
                    reply, port, raised = self.command(text)
                virq |= raised
                if addr:
                    replies.append((reply.encode("ascii", "replace"), addr))
                if port is None:
                    continue
                self._learn_kick(data, port)
            if port in pumped:
                again[port] = None
            elif port in ports:  # may have been unbound by an earlier callback
                pumped.add(port)
                on_port_kicked(port)
        return again, virq

    def _learn_kick(self, data: bytes, port: int) -> None:
        """Remember ``data`` as the kick of ``port`` if it is the canonical ``notify <domid>
        <rport>`` that resolves to it; other spellings keep taking the parsing path."""
        b = self._ports.get(port)
        if (
            b is not None
            and data == b"notify %d %d" % (b.domid, b.rport)
            and self._by_remote.get((b.domid, b.rport)) == port
        ):
            self._kicks[data] = port

    def _send_replies(self, replies: list[tuple[bytes, str | bytes]]) -> None:
        for reply, addr in replies:
            try:
                self._sock.sendto(reply, socket.MSG_DONTWAIT, addr)
            except OSError:
                pass  # the sender is gone or not reading; it asked, we tried

    def event_fd(self) -> int | None:
        return self._sock.fileno()

    def handle_events(self, on_port_kicked: PortCallback, on_dom_exc: Callable[[], None]) -> None:
        replies: list[tuple[bytes, str | bytes]] = []
        try:
            if self._pump_kicks(on_port_kicked, replies):
                on_dom_exc()
        finally:
            if replies:
                self._send_replies(replies)

    def _pump_kicks(self, on_port_kicked: PortCallback, replies: list[tuple[bytes, str | bytes]]) -> bool:
        """One batch of datagrams: each kicked port pumped (again if kicked again meanwhile);
        True if VIRQ_DOM_EXC was raised.  The replies owed are appended to ``replies``."""
        again, virq = self._drain(on_port_kicked, replies)
        ports = self._ports
        for port in again:
            if port in ports:
                on_port_kicked(port)
        return virq

    async def run(
        self,
        on_port_kicked: PortCallback,
        on_dom_exc: DomExcCallback,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            # wait_readable is the loop's one scheduling point: another pass per batch would
            # only add latency to every ring round trip.
            await trio.lowlevel.wait_readable(self._sock)
            replies: list[tuple[bytes, str | bytes]] = []
            try:
                if self._pump_kicks(on_port_kicked, replies):
                    res = on_dom_exc()
                    if inspect.isawaitable(res):
                        await res
            finally:
                if replies:
                    self._send_replies(replies)

    def close(self) -> None:
        for domid in list(self._maps):
            self.unmap_ring(domid)
        for port in self._ports.values():
            port.close()
        if self._sock.fileno() >= 0:
            self._sock.close()
            try:
                os.unlink(self.sock_path)
            except OSError:
                pass
            self._remove_ring_files()
        self._table_file.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # last: the folder is clean before another daemon may take it
            self._lock_fd = -1

    def _remove_ring_files(self) -> None:
        """Pages of domains that do not exist: nobody will map them again."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            m = _RING_FILE.fullmatch(name)
            if m and self.domain_info(int(m.group(1))) is None:
                try:
                    os.unlink(self.dir / name)
                except OSError:
                    pass
