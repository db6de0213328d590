"""Act as an emulated guest domain over its xenstore ring page.

What a guest kernel's xenbus driver does, in user space, over the fakexen convention that both
our emulated hypervisor and the oracle's shim implement (see xenstored.hypervisor.emulated):

* ``<fx>/dom<N>.ring`` is our 4 KiB page; we create and size it, the daemon maps the same file;
* ``<fx>/dom<N>.evtchn`` is our datagram socket, where the daemon's kicks (``notify <port>``) land;
* ``<fx>/evtchn.sock`` is the daemon's; we kick it with ``notify <N> <port>`` after every index
  update and send hypervisor commands (``create N``...) to it, waiting for the ``ok``/``err`` reply.

Making the domain exist and XS_INTRODUCE-ing it are the toolstack's business (dom0 over the socket),
not the guest's: ``Guest(5)`` only attaches to the page.  The daemon must have been told about the
domain before requests get answered.

Console use (exit status 1 and the error name on stderr on failure)::

    xenstore-guest [--fakexen-dir DIR] DOMID read PATH... | write PATH VALUE [PATH VALUE]... |
                   ls PATH | rm PATH... | mkdir PATH... | exists PATH... | chmod PATH PERM... |
                   perms PATH | watch [-n COUNT] PATH [TOKEN] | domain-path |
                   tx OP ARGS [OP ARGS]...   (tx ops: read P, write P V, rm P, mkdir P, ls P)
                   create | destroy | shutdown [REASON] | crash | dying | exists-domain
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import mmap
import os
import select
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Self

from . import fxtable
from .ring import PAGE_SIZE, RECONNECT, RING_SIZE, GuestRing
from .wire import ERRORS, Op, Parser, XsError, encode

Text = str | bytes


def _b(s: Text) -> bytes:
    return s.encode() if isinstance(s, str) else s


def default_fakexen_dir() -> str:
    """$FAKEXEN_DIR, else the oracle's habit of ``fx`` beside $XENSTORED_PATH's socket."""
    d = os.environ.get("FAKEXEN_DIR")
    if d:
        return d
    sock = os.environ.get("XENSTORED_PATH")
    if sock:
        return os.path.join(os.path.dirname(sock), "fx")
    raise RuntimeError("set FAKEXEN_DIR (or pass fakexen_dir) to find the emulated hypervisor")


def ask(command: str, fakexen_dir: str, timeout: float = 5.0) -> str:
    """Send one command to the running emulated hypervisor and return its reply; raises
    FileNotFoundError or ConnectionRefusedError when no daemon serves ``fakexen_dir``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("")  # autobind, so the hypervisor has an address to answer to
        s.settimeout(timeout)
        s.sendto(command.encode(), os.path.join(fakexen_dir, "evtchn.sock"))
        return s.recv(512).decode(errors="replace")


def control(command: str, fakexen_dir: str | None = None, timeout: float = 5.0) -> str:
    """Send one fake-hypervisor command and return its ``ok ...``/``err ...`` reply."""
    fx = fakexen_dir or default_fakexen_dir()
    try:
        return ask(command, fx, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        # No daemon serves the emulated hypervisor (it died, or has not started): domains
        # are the hypervisor's, not the daemon's, so change the table it left behind.
        return fxtable.apply_offline(fx, command)


def default_port(domid: int, fakexen_dir: str) -> int:
    """The event channel port a guest kicks: 1, or for dom0 the one in ``xsd_port``."""
    if domid != 0:
        return 1
    try:
        with open(os.path.join(fakexen_dir, "xsd_port")) as f:
            return int(f.read().strip() or "1", 0)
    except (FileNotFoundError, ValueError):
        return 1


def unserved_reason(domid: int, fakexen_dir: str, port: int | None = None, timeout: float = 2.0) -> str | None:
    """Why nobody will answer ``domid``'s requests, when that is knowable at once: no emulated
    hypervisor at ``fakexen_dir``, or the domain not introduced; else None (served, or no way to
    know, e.g. the hypervisor does not answer in time).

    INTRODUCE makes the daemon bind an event channel to the guest's port, and the hypervisor
    answers a kick from a named sender with ``ok notify <p>`` or ``err no binding for dom<N>``
    (ours and the oracle's fakexen alike): one datagram round trip says at once what would
    otherwise be a timeout.  The probe is a real kick, which costs the daemon a look at the ring.
    """
    if port is None:
        port = default_port(domid, fakexen_dir)
    try:
        reply = ask(f"notify {domid} {port}", fakexen_dir, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        sock = os.path.join(fakexen_dir, "evtchn.sock")
        return f"no emulated hypervisor answers at {sock} (is xenstored running, with this FAKEXEN_DIR?)"
    except OSError:
        return None  # no answer in time: the caller's own request says what happens next
    if not reply.startswith("err no binding"):
        return None
    try:
        known = ask(f"exists {domid}", fakexen_dir, timeout)
    except OSError:
        known = ""
    if known == "ok 0":
        detail = f"the hypervisor has no dom{domid}: create it (xenstore-guest {domid} create), then introduce it"
    else:
        detail = (
            f"xenstored has no event channel bound to dom{domid} port {port}: the toolstack must "
            f"introduce it first (SyncClient().introduce({domid}, 0, {port}))"
        )
    return f"domain {domid} is not introduced (or not created): {detail}"


def _check(reply: str) -> str:
    if not reply.startswith("ok"):
        raise RuntimeError(f"fake hypervisor: {reply}")
    return reply


def _raise_error(payload: bytes) -> None:
    name = payload.rstrip(b"\0").decode(errors="replace")
    if name in ERRORS:
        raise XsError(name)
    raise XsError("EIO", f"unknown error reply {name!r}")


class Guest:
    """Synchronous guest-side XenStore client over a ring page; one request in flight at a time.

    Watch events that arrive while waiting for a reply are queued in ``events`` as
    ``(path, token)`` and handed out by :meth:`wait_event`.
    """

    def __init__(
        self,
        domid: int,
        fakexen_dir: str | None = None,
        *,
        port: int | None = None,
        create: bool = False,
        timeout: float = 5.0,
    ) -> None:
        self.domid = domid
        self.dir = fakexen_dir or default_fakexen_dir()
        self.timeout = timeout
        os.makedirs(self.dir, exist_ok=True)
        if create:
            _check(control(f"create {domid}", self.dir, timeout))
        if port is None:
            port = default_port(domid, self.dir)
        self.port = port
        self._daemon = os.path.join(self.dir, "evtchn.sock")
        self._kick_msg = b"notify %d %d" % (domid, port)

        fd = os.open(os.path.join(self.dir, f"dom{domid}.ring"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < PAGE_SIZE:
                os.ftruncate(fd, PAGE_SIZE)
            self._mem = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.ring = GuestRing(self._mem)

        self._evpath = os.path.join(self.dir, f"dom{domid}.evtchn")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._evpath)
        self._ev = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._ev.bind(self._evpath)
        self._ev.setblocking(False)
        self._ev_ino = os.stat(self._evpath).st_ino
        # Kicks go out from an unnamed socket: the hypervisor then has nobody to acknowledge to,
        # which saves a datagram per kick.
        self._kick = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._kick.setblocking(False)

        self._parser = Parser()
        self._inbox: collections.deque[tuple[int, int, int, bytes]] = collections.deque()
        self.events: collections.deque[tuple[str, str]] = collections.deque()
        self._req_ids = itertools.count(1)

    # -- low level -----------------------------------------------------------------------------

    def kick(self) -> None:
        try:
            self._kick.sendto(self._kick_msg, socket.MSG_DONTWAIT, self._daemon)
        except BlockingIOError:
            # The daemon's queue is full (Linux allows only net.unix.max_dgram_qlen, often 10,
            # datagrams), and not necessarily with kicks of *our* port: dropping this one could
            # strand our request.  Wait for room instead, bounded so a hung daemon cannot hang us.
            try:
                self._kick.settimeout(min(self.timeout, 1.0))
                self._kick.sendto(self._kick_msg, self._daemon)
            except OSError:
                pass
            finally:
                self._kick.setblocking(False)
        except (FileNotFoundError, ConnectionRefusedError):
            pass  # no daemon (yet): it reads the ring when it introduces us

    def _wait(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            why = unserved_reason(self.domid, self.dir, self.port, timeout=1.0)
            raise TimeoutError(
                f"dom{self.domid}: no progress on the ring (indexes {self.ring.indexes()})"
                + (f"; {why}" if why else "")
            )
        # Wake up now and then even without a kick: polling the ring is always allowed.
        r, _, _ = select.select([self._ev], [], [], min(remaining, 0.25))
        if r:
            with contextlib.suppress(BlockingIOError):
                while True:
                    self._ev.recv(64)

    def send_raw(self, data: bytes, timeout: float | None = None) -> None:
        """Put bytes on the request ring, waiting for space; framing is the caller's business."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        view = memoryview(data)
        while view:
            n = self.ring.write(view)
            if n:
                view = view[n:]
                self.kick()
            else:
                self._poll()  # drain replies so the daemon can make room for us
                self._wait(deadline)

    def _poll(self) -> bool:
        """Move available response bytes into the inbox; True if anything arrived."""
        data = self.ring.read()
        if not data:
            return False
        if len(data) >= RING_SIZE:
            # The ring was full, so the daemon may be waiting for room: tell it (as Linux's
            # xb_read does).  Otherwise it is not waiting, and a kick would only cost both sides
            # a wakeup per reply.
            self.kick()
        for m in self._parser.feed(data):
            if m.type == Op.WATCH_EVENT:
                parts = m.payload.split(b"\0")
                if len(parts) >= 2:
                    self.events.append((parts[0].decode(errors="replace"), parts[1].decode(errors="replace")))
            else:
                self._inbox.append((m.type, m.req_id, m.tx_id, m.payload))
        return True

    def request(self, op: int, payload: bytes, tx: int = 0, timeout: float | None = None) -> bytes:
        """Send one request and return its reply payload; XsError for an XS_ERROR reply."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        req_id = next(self._req_ids) & 0xFFFFFFFF
        self.send_raw(encode(op, req_id, tx, payload), timeout)
        while True:
            while self._inbox:
                type_, rid, _tx, body = self._inbox.popleft()
                if rid != req_id:
                    continue  # a stale reply from before a reset; nothing waits for it
                if type_ == Op.ERROR:
                    _raise_error(body)
                return body
            if not self._poll():
                self._wait(deadline)

    def wait_event(self, timeout: float | None = None) -> tuple[str, str]:
        """Next watch event ``(path, token)``; TimeoutError if none arrives in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.events:
            if not self._poll():
                self._wait(deadline)
        return self.events.popleft()

    def reconnect(self, timeout: float | None = None) -> None:
        """Ask the daemon to reset the connection (feature RECONNECTION) and wait until it has."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self.ring.connection = RECONNECT
        self.kick()
        while self.ring.connection == RECONNECT:
            self._wait(deadline)
        self._parser.reset()
        self._inbox.clear()
        self.events.clear()

    # -- operations ----------------------------------------------------------------------------

    def read(self, path: Text, tx: int = 0) -> bytes:
        return self.request(Op.READ, _b(path) + b"\0", tx)

    def write(self, path: Text, value: Text, tx: int = 0) -> None:
        self.request(Op.WRITE, _b(path) + b"\0" + _b(value), tx)

    def mkdir(self, path: Text, tx: int = 0) -> None:
        self.request(Op.MKDIR, _b(path) + b"\0", tx)

    def rm(self, path: Text, tx: int = 0) -> None:
        self.request(Op.RM, _b(path) + b"\0", tx)

    def ls(self, path: Text, tx: int = 0) -> list[str]:
        body = self.request(Op.DIRECTORY, _b(path) + b"\0", tx)
        return [p.decode(errors="replace") for p in body.split(b"\0")[:-1]]

    def exists(self, path: Text, tx: int = 0) -> bool:
        try:
            self.read(path, tx)
        except XsError as e:
            if e.name == "ENOENT":
                return False
            raise
        return True

    def get_perms(self, path: Text, tx: int = 0) -> list[str]:
        body = self.request(Op.GET_PERMS, _b(path) + b"\0", tx)
        return [p.decode(errors="replace") for p in body.split(b"\0")[:-1]]

    def set_perms(self, path: Text, perms: Sequence[Text], tx: int = 0) -> None:
        self.request(Op.SET_PERMS, _b(path) + b"\0" + b"".join(_b(p) + b"\0" for p in perms), tx)

    def watch(self, path: Text, token: Text) -> None:
        self.request(Op.WATCH, _b(path) + b"\0" + _b(token) + b"\0")

    def unwatch(self, path: Text, token: Text) -> None:
        self.request(Op.UNWATCH, _b(path) + b"\0" + _b(token) + b"\0")

    def transaction_start(self) -> int:
        return int(self.request(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        self.request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[int]:
        """Commit on normal exit, abort on an exception; EAGAIN from the commit propagates."""
        tx = self.transaction_start()
        try:
            yield tx
        except BaseException:
            with contextlib.suppress(XsError, TimeoutError):
                self.transaction_end(tx, commit=False)
            raise
        self.transaction_end(tx, commit=True)

    def get_domain_path(self, domid: int | None = None) -> str:
        body = self.request(Op.GET_DOMAIN_PATH, b"%d\0" % (self.domid if domid is None else domid))
        return body.rstrip(b"\0").decode()

    def reset_watches(self) -> None:
        self.request(Op.RESET_WATCHES, b"")

    # -- hypervisor control --------------------------------------------------------------------

    def control(self, command: str) -> str:
        return control(command, self.dir, self.timeout)

    def create(self) -> str:
        return _check(self.control(f"create {self.domid}"))

    def destroy(self) -> str:
        return _check(self.control(f"destroy {self.domid}"))

    def shutdown(self, reason: int = 0) -> str:
        return _check(self.control(f"shutdown {self.domid} {reason}"))

    def crash(self) -> str:
        return _check(self.control(f"crash {self.domid}"))

    def dying(self) -> str:
        return _check(self.control(f"dying {self.domid}"))

    def domain_exists(self) -> bool:
        return _check(self.control(f"exists {self.domid}")) == "ok 1"

    def unserved_reason(self) -> str | None:
        """See :func:`unserved_reason`: why nobody will answer us, if knowable at once."""
        return unserved_reason(self.domid, self.dir, self.port, min(self.timeout, 2.0))

    def close(self) -> None:
        self._ev.close()
        self._kick.close()
        with contextlib.suppress(OSError):
            # Only remove our own socket: a newer guest process may have re-bound the name.
            if os.stat(self._evpath).st_ino == self._ev_ino:
                os.unlink(self._evpath)
        self.ring.release()
        self._mem.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- console command ---------------------------------------------------------------------------

_TX_ARITY = {"read": 1, "write": 2, "rm": 1, "mkdir": 1, "ls": 1}
_CONTROL_OPS = {"create", "destroy", "shutdown", "crash", "dying", "exists-domain"}
_RING_OPS = {"read", "write", "ls", "list", "rm", "mkdir", "exists", "chmod", "perms", "domain-path", "tx", "watch"}


def _run_tx(g: Guest, args: list[str], out: list[str]) -> None:
    steps: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(args):
        op = args[i]
        if op not in _TX_ARITY or i + 1 + _TX_ARITY[op] > len(args):
            raise SystemExit(f"xenstore-guest: bad tx step at {' '.join(args[i:])!r}")
        steps.append((op, args[i + 1 : i + 1 + _TX_ARITY[op]]))
        i += 1 + _TX_ARITY[op]
    for _attempt in range(100):
        out.clear()
        try:
            with g.transaction() as tx:
                for op, a in steps:
                    if op == "read":
                        out.append(g.read(a[0], tx).decode(errors="replace"))
                    elif op == "write":
                        g.write(a[0], a[1], tx)
                    elif op == "rm":
                        g.rm(a[0], tx)
                    elif op == "mkdir":
                        g.mkdir(a[0], tx)
                    else:
                        out.extend(g.ls(a[0], tx))
            return
        except XsError as e:
            if e.name != "EAGAIN":
                raise
    raise XsError("EAGAIN")


def _run(g: Guest, op: str, args: list[str], out: list[str]) -> int:
    """One console operation; returns the exit status (exists can fail without an error)."""
    if op == "read":
        out.extend(g.read(p).decode(errors="replace") for p in args)
    elif op == "write":
        if not args or len(args) % 2:
            raise SystemExit("xenstore-guest: write needs PATH VALUE pairs")
        for p, v in zip(args[::2], args[1::2], strict=True):
            g.write(p, v)
    elif op in ("ls", "list"):
        out.extend(g.ls(args[0] if args else g.get_domain_path()))
    elif op == "rm":
        for p in args:
            g.rm(p)
    elif op == "mkdir":
        for p in args:
            g.mkdir(p)
    elif op == "exists":
        for p in args:
            if not g.exists(p):
                raise XsError("ENOENT")
    elif op == "chmod":
        if len(args) < 2:
            raise SystemExit("xenstore-guest: chmod needs PATH PERM...")
        g.set_perms(args[0], args[1:])
    elif op == "perms":
        out.append(" ".join(g.get_perms(args[0])))
    elif op == "domain-path":
        out.append(g.get_domain_path())
    elif op == "tx":
        _run_tx(g, args, out)
    else:
        raise SystemExit(f"xenstore-guest: unknown operation {op!r}")
    return 0


def _watch(g: Guest, args: list[str], timeout: float | None) -> None:
    ap = argparse.ArgumentParser(prog="xenstore-guest DOMID watch")
    ap.add_argument("-n", "--count", type=int, default=0, help="stop after COUNT events (0: forever)")
    ap.add_argument("path")
    ap.add_argument("token", nargs="?", default="xenstore-guest")
    a = ap.parse_args(args)
    g.watch(a.path, a.token)
    seen = 0
    while not a.count or seen < a.count:
        try:
            path, token = g.wait_event(timeout=timeout if timeout is not None else 3600.0)
        except TimeoutError:
            if timeout is not None:
                raise
            continue
        print(f"{path} {token}" if token != a.token else path, flush=True)
        seen += 1


OPERATIONS = """\
operations (paths are relative to /local/domain/DOMID unless they start with /):
  read PATH...                  print each value
  write PATH VALUE [PATH VALUE]...
  ls [PATH]                     children, one a line (default: the domain's home)
  rm PATH...    mkdir PATH...   exists PATH... (exit status 1 if one is missing)
  chmod PATH PERM...            e.g. chmod data n5 r0
  perms PATH                    print the permission list
  watch [-n COUNT] PATH [TOKEN] print events until COUNT (default: forever)
  domain-path                   print /local/domain/DOMID
  tx OP ARGS [OP ARGS]...       one transaction, retried on EAGAIN (read P, write P V,
                                rm P, mkdir P, ls P)
emulated hypervisor (commands to $FAKEXEN_DIR/evtchn.sock, no ring involved):
  create | destroy | shutdown [REASON] | crash | dying | exists-domain

The domain must have been created and introduced (INTRODUCE, by the toolstack over the
socket) before ring operations get answers; if it was not, that is said at once.
"""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="xenstore-guest",
        description="Talk to xenstored as emulated guest DOMID over its ring page.",
        epilog=OPERATIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--fakexen-dir", default=None, help="emulated hypervisor state (default $FAKEXEN_DIR)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds to wait for each reply (default 10)")
    ap.add_argument(
        "--port", type=int, default=None, help="our event channel port (default 1, dom0: xsd_port)"
    )
    ap.add_argument("domid", type=int)
    ap.add_argument("op", help="one of the operations below")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        fx = a.fakexen_dir or default_fakexen_dir()
        if a.op in _CONTROL_OPS:
            cmd = "exists" if a.op == "exists-domain" else a.op
            reply = control(" ".join([cmd, str(a.domid), *a.args]), fx, a.timeout or 10.0)
            if not reply.startswith("ok") or reply == "ok 0":
                print(reply, file=sys.stderr)
                return 1
            return 0
        if a.op not in _RING_OPS:
            raise SystemExit(f"xenstore-guest: unknown operation {a.op!r} (see xenstore-guest --help)")
        # Before attaching (which creates dom<N>.ring): a domain nobody serves is said at once,
        # not after the reply timeout, and leaves no ring file behind.
        why = unserved_reason(a.domid, fx, a.port)
        if why is not None:
            print(f"xenstore-guest: {why}", file=sys.stderr)
            return 1
        out: list[str] = []
        with Guest(a.domid, fx, port=a.port, timeout=a.timeout or 10.0) as g:
            if a.op == "watch":
                _watch(g, a.args, a.timeout)
                return 0
            status = _run(g, a.op, a.args, out)
        for line in out:
            print(line)
        return status
    except XsError as e:
        print(e.name, file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(f"ETIMEDOUT: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        print(f"xenstore-guest: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
