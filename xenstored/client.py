"""XenStore client library: an async (trio) :class:`Client` and a blocking :class:`SyncClient`.

Why a client of our own: the tests, the benchmarks and operator scripts need to drive a daemon
(ours or a reference one) over the Unix socket without depending on libxenstore or pyxs, and the
async client must be able to keep many requests in flight on one connection, which is what the
daemon's batching is built for and what blocking clients cannot exercise.

Design, in short:

* One connection, one reader task.  Requests are written under a send lock (so frames never
  interleave) and each caller then waits for the reply carrying its ``req_id``; the reader task
  demultiplexes replies by ``req_id`` and WATCH_EVENTs by token.  Any number of tasks may await
  requests concurrently: that is pipelining, with no extra API.
* Errors come back as :class:`xenstored.wire.XsError` with the protocol's error name in ``.name``,
  so callers match on the same names the daemon and libxenstore use (``ENOENT``, ``EAGAIN``...).
* Transactions are async context managers that commit on a clean exit and abort when the body
  raises; :meth:`Client.transact` re-runs a function on ``EAGAIN`` (bounded attempts), which is
  the only correct way to use optimistic transactions.
* Watches are async context managers yielding an async iterator of ``(path, token)``.  Each watch
  has a bounded queue; the reader task never blocks on a slow consumer (that would stall every
  reply on the connection).  On overflow the newest events are dropped and counted, and once the
  consumer has drained the queue it receives one synthetic event for the watched path itself.
  That is sound because XenStore watches only say "something under here may have changed, re-read":
  the synthetic event tells the consumer to re-scan the whole watched subtree.

* Inside ``with c.transaction() as t:`` the data operations belong on ``t``.  Calling them on
  the client instead would silently run them outside the transaction, so that raises
  RuntimeError: always for :class:`SyncClient`; for :class:`Client` when the call comes from the
  task that entered the transaction (other tasks may use the connection meanwhile: that is
  pipelining, and their requests rightly run outside it).  :meth:`Client.request_raw` is not
  checked.

Paths and tokens may be ``str`` or ``bytes``; values written may be ``str`` (UTF-8) or ``bytes``
(anything else, an ``int`` say, is a TypeError rather than ``bytes(5)``'s five NULs); values
read are always ``bytes`` because XenStore values are binary.
"""

from __future__ import annotations

import collections
import errno
import itertools
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Self, TypeVar

import trio

from .wire import ERRORS, HEADER, PAYLOAD_MAX, Op, Parser, ProtocolError, XsError, op_name

__all__ = [
    "Client",
    "ConnectionClosed",
    "SyncClient",
    "SyncTransaction",
    "Transaction",
    "WatchEvents",
    "default_socket_path",
]

DEFAULT_SOCKET = "/run/xenstored/socket"
DEFAULT_WATCH_QUEUE = 1024  # matches oxenstored's per-watch event queue (quota-maxwatchevents)
DEFAULT_TRANSACT_ATTEMPTS = 16

T = TypeVar("T")
Bytesish = str | bytes


class ConnectionClosed(ConnectionError):
    """The daemon closed the connection (or the client was closed) while a request was pending."""


def default_socket_path() -> str:
    """The socket libxenstore would use: ``$XENSTORED_PATH``, else the standard location."""
    return os.environ.get("XENSTORED_PATH") or DEFAULT_SOCKET


# --------------------------------------------------------------------------------------------
# Payload helpers shared by both clients (pure functions, so the two stay consistent)


def _b(value: Bytesish) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    # bytes(5) would be five NUL bytes and bytes([..]) a surprise: refuse, say what was given.
    raise TypeError(f"XenStore paths and values are str or bytes, not {type(value).__name__}")


def _num(value: int, what: str = "domain id") -> bytes:
    """A decimal argument (domain id, frame, port): an int >= 0, refused early otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"a {what} is an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"a {what} is >= 0, not {value}")
    return b"%d\0" % value


# The operations a transaction applies to: issued on the client while one of its transactions
# is open (in the same task), they would silently run outside it.
_TX_DATA_OPS = frozenset(
    {Op.READ, Op.WRITE, Op.MKDIR, Op.RM, Op.DIRECTORY, Op.DIRECTORY_PART, Op.GET_PERMS, Op.SET_PERMS}
)


def _outside_transaction_error(op: int, tx_id: int) -> RuntimeError:
    name = op_name(op)
    return RuntimeError(
        f"{name} called on the client inside 'with client.transaction() as t' (transaction "
        f"{tx_id}) would run outside that transaction: call it on t, or use another client"
    )


def _connect_error(e: OSError, path: str) -> OSError:
    """The same exception type, saying which socket and what probably is wrong."""
    if isinstance(e, FileNotFoundError):
        why = "no XenStore socket (is xenstored running? XENSTORED_PATH names another socket)"
    elif isinstance(e, ConnectionRefusedError):
        why = "nobody listens on this XenStore socket (xenstored is not running)"
    elif isinstance(e, PermissionError):
        why = "no permission to connect to the XenStore socket (it is mode 0600: run as its owner)"
    else:
        why = e.strerror or str(e)
    return type(e)(e.errno or errno.EIO, why, path)


def _arg(value: Bytesish) -> bytes:
    """One NUL-terminated argument; embedded NULs would silently split it, so refuse them."""
    raw = _b(value)
    if b"\0" in raw:
        raise ValueError(f"argument contains a NUL byte: {raw!r}")
    return raw + b"\0"


def _strings(payload: bytes) -> list[str]:
    """Decode a NUL-separated reply list (DIRECTORY, GET_PERMS); an empty payload is an empty list."""
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def _text(payload: bytes) -> str:
    """A single-string reply without its terminating NUL."""
    if payload.endswith(b"\0"):
        payload = payload[:-1]
    return payload.decode("utf-8", "surrogateescape")


def _error(payload: bytes) -> XsError:
    """Map an ERROR reply to XsError; unknown names (O's ``EQUOTA``) become EINVAL as in libxenstore."""
    name = _text(payload)
    if name in ERRORS:
        return XsError(name)
    return XsError("EINVAL", f"daemon sent unknown error {name!r}")


def _watch_event(payload: bytes) -> tuple[str, str] | None:
    parts = payload.split(b"\0")
    if len(parts) < 2:
        return None
    return parts[0].decode("utf-8", "surrogateescape"), parts[1].decode("utf-8", "surrogateescape")


def _check_size(payload: bytes) -> None:
    # The daemon drops the whole connection on len > 4096; fail this one call instead.
    if len(payload) > PAYLOAD_MAX:
        raise XsError("E2BIG", f"request payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")


def _perms_payload(path: Bytesish, perms: Iterable[str | bytes]) -> bytes:
    body = [_arg(path)]
    body.extend(_arg(p) for p in perms)
    if len(body) < 2:
        raise ValueError("set_perms needs at least one permission entry (the owner)")
    return b"".join(body)


class _ReqIds:
    """32-bit request ids, wrapping, never 0 and never one still awaiting its reply."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 1

    def take(self, busy: dict[int, object] | None = None) -> int:
        while True:
            rid = self._next
            self._next = (rid + 1) & 0xFFFFFFFF or 1
            if busy is None or rid not in busy:
                return rid


# --------------------------------------------------------------------------------------------
# Async client


class _AsyncOps:
    """The XenStore operations, written once for plain connections and transactions.

    Subclasses provide :meth:`request`; a transaction's version stamps its tx_id on each call.
    """

    async def request(self, op: int, payload: bytes) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    async def read(self, path: Bytesish) -> bytes:
        """The value of ``path`` (binary, possibly empty)."""
        return await self.request(Op.READ, _arg(path))

    async def write(self, path: Bytesish, value: Bytesish) -> None:
        """Create or overwrite ``path``; missing parents are created with empty values."""
        await self.request(Op.WRITE, _arg(path) + _b(value))

    async def mkdir(self, path: Bytesish) -> None:
        """Create ``path`` with an empty value if it does not exist (no error if it does)."""
        await self.request(Op.MKDIR, _arg(path))

    async def rm(self, path: Bytesish) -> None:
        """Remove ``path`` and its whole subtree."""
        await self.request(Op.RM, _arg(path))

    async def ls(self, path: Bytesish) -> list[str]:
        """Names of the children of ``path`` (DIRECTORY), not full paths."""
        return _strings(await self.request(Op.DIRECTORY, _arg(path)))

    directory = ls

    async def exists(self, path: Bytesish) -> bool:
        """Whether ``path`` exists, the way xenstore-exists decides it (a READ that is not ENOENT)."""
        try:
            await self.read(path)
        except XsError as e:
            if e.name == "ENOENT":
                return False
            raise
        return True

    async def get_perms(self, path: Bytesish) -> list[str]:
        """Permission entries such as ``["n0", "r5"]``: the first names the owner."""
        return _strings(await self.request(Op.GET_PERMS, _arg(path)))

    async def set_perms(self, path: Bytesish, perms: Iterable[str | bytes]) -> None:
        """Replace the permission list of ``path``; ``perms[0]`` is owner plus everyone-else access."""
        await self.request(Op.SET_PERMS, _perms_payload(path, perms))


class Transaction(_AsyncOps):
    """Operations bound to one open transaction; obtained from :meth:`Client.transaction`."""

    def __init__(self, client: Client, tx_id: int) -> None:
        self.client = client
        self.tx_id = tx_id

    async def request(self, op: int, payload: bytes) -> bytes:
        return await self.client.request(op, payload, tx_id=self.tx_id)

    def __repr__(self) -> str:
        return f"<Transaction {self.tx_id}>"


class WatchEvents:
    """The event stream of one watch: ``async for path, token in events``.

    The daemon sends one event right after registration (for the watched path itself); it is
    delivered like any other.  Paths are reported as the daemon sends them: relative when the
    watch was registered with a relative path.

    Overflow: at most ``maxsize`` events are queued.  Further events are dropped (and counted in
    :attr:`dropped`) rather than blocking the connection's reader; when the consumer has drained
    the queue it gets one synthetic ``(watched path, token)`` event meaning "re-scan everything".
    """

    def __init__(self, path: str, token: str, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("watch queue size must be at least 1")
        self.path = path
        self.token = token
        self.maxsize = maxsize
        self.dropped = 0
        self._queue: collections.deque[tuple[str, str]] = collections.deque()
        self._overflowed = False
        self._closed: BaseException | None = None
        self._wakeup = trio.Event()

    def _push(self, event: tuple[str, str]) -> None:
        """Called by the reader task; never blocks."""
        if len(self._queue) >= self.maxsize:
            self.dropped += 1
            self._overflowed = True
        else:
            self._queue.append(event)
        self._wakeup.set()

    def _close(self, exc: BaseException | None) -> None:
        if self._closed is None:
            self._closed = exc if exc is not None else StopAsyncIteration()
        self._wakeup.set()

    def matches(self, epath: str) -> bool:
        """Could this watch have produced an event for ``epath``?  Used when tokens are shared."""
        w = self.path
        return epath == w or w == "/" or epath.startswith(w.rstrip("/") + "/")

    def get_nowait(self) -> tuple[str, str] | None:
        """The next queued event, or None; the synthetic overflow event counts as queued."""
        if self._queue:
            return self._queue.popleft()
        if self._overflowed:
            self._overflowed = False
            return (self.path, self.token)
        return None

    async def get(self) -> tuple[str, str]:
        while True:
            event = self.get_nowait()
            if event is not None:
                return event
            if self._closed is not None:
                raise self._closed
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    def __aiter__(self) -> WatchEvents:
        return self

    async def __anext__(self) -> tuple[str, str]:
        return await self.get()

    def __len__(self) -> int:
        return len(self._queue)


class _Pending:
    __slots__ = ("done", "exc", "msg_type", "payload")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.msg_type = 0
        self.payload = b""
        self.exc: BaseException | None = None


class Client(_AsyncOps):
    """An async XenStore connection over the Unix socket.

    Use as ``async with Client(path) as c: await c.read("/tool")`` or ``c = await
    Client.connect(path)`` followed by ``await c.aclose()``.  Methods may be awaited concurrently
    from many tasks; requests are pipelined on the one connection.

    Cancelling a request that was already sent abandons its reply (it is discarded when it
    arrives); the write itself is shielded so a cancelled task never leaves half a frame behind.
    """

    def __init__(self, path: str | None = None, *, watch_queue_size: int = DEFAULT_WATCH_QUEUE) -> None:
        self.path = path or default_socket_path()
        self.watch_queue_size = watch_queue_size
        self._stream: trio.SocketStream | None = None
        self._stack: AsyncExitStack | None = None
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        self._ids = _ReqIds()
        self._watches: dict[str, list[WatchEvents]] = {}
        self._tokens = itertools.count(1)
        self._closed: BaseException | None = None
        # task -> the transactions it has open through transaction(), innermost last
        self._tx_tasks: dict[trio.lowlevel.Task, list[Transaction]] = {}

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def connect(cls, path: str | None = None, **kwargs: int) -> Self:
        client = cls(path, **kwargs)
        await client.__aenter__()
        return client

    async def __aenter__(self) -> Self:
        if self._stream is not None:
            raise RuntimeError("client already connected")
        stack = AsyncExitStack()
        try:
            try:
                self._stream = await trio.open_unix_socket(self.path)
            except OSError as e:
                raise _connect_error(e, self.path) from None
            stack.push_async_callback(self._stream.aclose)
            nursery = await stack.enter_async_context(trio.open_nursery())
            nursery.start_soon(self._reader)
            stack.callback(nursery.cancel_scope.cancel)  # runs before the nursery joins
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; pending requests and open watch streams get ConnectionClosed."""
        self._shutdown(ConnectionClosed("client closed"))
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def _shutdown(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        for p in self._pending.values():
            p.exc = self._closed
            p.done.set()
        self._pending.clear()
        for subs in self._watches.values():
            for sub in subs:
                sub._close(ConnectionClosed(str(exc)))

    async def _reader(self) -> None:
        assert self._stream is not None
        parser = Parser()
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    raise ConnectionClosed("daemon closed the connection")
                for msg in parser.feed(data):
                    if msg.type == Op.WATCH_EVENT:
                        self._deliver_event(msg.payload)
                        continue
                    pending = self._pending.pop(msg.req_id, None)
                    if pending is None:
                        continue  # its caller was cancelled
                    pending.msg_type = msg.type
                    pending.payload = msg.payload
                    pending.done.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._shutdown(ConnectionClosed(f"connection lost: {e}"))
        except ConnectionClosed as e:
            self._shutdown(e)
        except ProtocolError as e:  # a reply header announcing more than 4096 bytes
            self._shutdown(ConnectionClosed(f"bad reply framing: {e}"))

    def _deliver_event(self, payload: bytes) -> None:
        event = _watch_event(payload)
        if event is None:
            return
        subs = self._watches.get(event[1])
        if not subs:
            return  # e.g. an event already queued by the daemon when we unwatched
        if len(subs) == 1:
            subs[0]._push(event)
            return
        targets = [s for s in subs if s.matches(event[0])] or subs
        for s in targets:
            s._push(event)

    # -- requests -------------------------------------------------------------------------

    async def request(self, op: int, payload: bytes, tx_id: int = 0) -> bytes:
        """Send one raw request and return the reply payload; an ERROR reply raises XsError.

        RuntimeError for a data operation outside any transaction from a task that is inside
        ``async with client.transaction()`` (see the module docstring)."""
        if self._tx_tasks and not tx_id and op in _TX_DATA_OPS:
            txs = self._tx_tasks.get(trio.lowlevel.current_task())
            if txs:
                raise _outside_transaction_error(op, txs[-1].tx_id)
        msg_type, reply = await self.request_raw(op, payload, tx_id)
        if msg_type == Op.ERROR:
            raise _error(reply)
        return reply

    async def request_raw(self, op: int, payload: bytes, tx_id: int = 0) -> tuple[int, bytes]:
        """Like :meth:`request` but returns ``(reply type, payload)`` without interpreting errors."""
        _check_size(payload)
        if self._closed is not None:
            raise ConnectionClosed(str(self._closed))
        if self._stream is None:
            raise RuntimeError("client is not connected (use 'async with Client(...)')")
        rid = self._ids.take(self._pending)
        pending = _Pending()
        self._pending[rid] = pending
        frame = HEADER.pack(op, rid, tx_id, len(payload)) + payload
        try:
            with trio.CancelScope(shield=True):
                async with self._send_lock:
                    await self._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._pending.pop(rid, None)
            self._shutdown(ConnectionClosed(f"connection lost: {e}"))
            raise ConnectionClosed(str(e)) from e
        try:
            await pending.done.wait()
        finally:
            if not pending.done.is_set():
                self._pending.pop(rid, None)
        if pending.exc is not None:
            raise ConnectionClosed(str(pending.exc))
        return pending.msg_type, pending.payload

    async def get_domain_path(self, domid: int) -> str:
        """The home path of a domain (``/local/domain/<domid>``)."""
        return _text(await self.request(Op.GET_DOMAIN_PATH, _num(domid)))

    # -- domains (the toolstack's side; privileged connections only) ------------------------

    async def introduce(self, domid: int, gfn: int, port: int) -> None:
        """INTRODUCE: start serving ``domid``, whose xenstore page is at frame ``gfn`` and whose
        unbound event channel is ``port``; ``@introduceDomain`` fires."""
        await self.request(Op.INTRODUCE, _num(domid) + _num(gfn, "page frame") + _num(port, "port"))

    async def release(self, domid: int) -> None:
        """RELEASE: stop serving ``domid`` (its nodes stay); ``@releaseDomain`` fires."""
        await self.request(Op.RELEASE, _num(domid))

    async def resume(self, domid: int) -> None:
        """RESUME: clear the domain's shutdown flag, so a later shutdown fires again."""
        await self.request(Op.RESUME, _num(domid))

    async def is_domain_introduced(self, domid: int) -> bool:
        """Whether the daemon is serving ``domid`` (INTRODUCE'd, not yet released or dead)."""
        return _text(await self.request(Op.IS_DOMAIN_INTRODUCED, _num(domid))) == "T"

    async def set_target(self, domid: int, target: int) -> None:
        """SET_TARGET: ``domid`` (a device model, say) gets ``target``'s rights."""
        await self.request(Op.SET_TARGET, _num(domid) + _num(target, "target domain id"))

    async def control(self, *args: str) -> str:
        """A CONTROL (xenstore-control) command, e.g. ``control("check")``; returns the reply text."""
        if not args:
            raise ValueError("control needs a command")
        return _text(await self.request(Op.CONTROL, b"".join(_arg(a) for a in args)))

    async def reset_watches(self) -> None:
        """Drop all watches and open transactions of this connection on the daemon side."""
        await self.request(Op.RESET_WATCHES, b"")

    # -- transactions ---------------------------------------------------------------------

    async def transaction_start(self) -> int:
        return int(_text(await self.request(Op.TRANSACTION_START, b"\0")))

    async def transaction_end(self, tx_id: int, commit: bool = True) -> None:
        """Commit (``T``) or abort (``F``); a failed commit raises XsError("EAGAIN")."""
        await self.request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx_id=tx_id)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """``async with c.transaction() as t:``: commit on clean exit, abort if the body raises.

        A conflicting commit raises ``XsError("EAGAIN")`` out of the ``async with``; use
        :meth:`transact` to retry automatically.
        """
        tx_id = await self.transaction_start()
        t = Transaction(self, tx_id)
        task = trio.lowlevel.current_task()
        self._tx_tasks.setdefault(task, []).append(t)
        try:
            try:
                yield t
            finally:
                txs = self._tx_tasks[task]
                txs.remove(t)
                if not txs:
                    del self._tx_tasks[task]
        except BaseException:
            if not self.closed:
                with trio.CancelScope(shield=True):
                    try:
                        await self.transaction_end(tx_id, commit=False)
                    except (XsError, ConnectionClosed):
                        pass  # the original exception matters more; the daemon drops it anyway
            raise
        await self.transaction_end(tx_id, commit=True)

    async def transact(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        attempts: int = DEFAULT_TRANSACT_ATTEMPTS,
        backoff: float = 0.001,
    ) -> T:
        """Run ``await fn(t)`` in a transaction and commit, re-running it on EAGAIN.

        ``fn`` must be safe to run more than once (only its last run's writes take effect).
        After ``attempts`` conflicts the last EAGAIN is raised.  A short randomised backoff keeps
        two clients from conflicting in lock-step.
        """
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        for attempt in range(attempts):
            try:
                async with self.transaction() as t:
                    result = await fn(t)
            except XsError as e:
                if e.name != "EAGAIN" or attempt == attempts - 1:
                    raise
                await trio.sleep(backoff * random.uniform(0.5, 1.5) * (attempt + 1))
                continue
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    # -- watches --------------------------------------------------------------------------

    @asynccontextmanager
    async def watch(
        self, path: Bytesish, token: Bytesish | None = None, *, maxsize: int | None = None
    ) -> AsyncIterator[WatchEvents]:
        """``async with c.watch("/a") as events: async for path, token in events: ...``.

        The watch is registered before the context body runs and removed (UNWATCH) when it ends.
        The first event is the daemon's initial event for ``path`` itself.  Tokens default to a
        fresh per-client string; with a shared token, events are routed by path (see WatchEvents).
        """
        spath = _b(path).decode("utf-8", "surrogateescape")
        stoken = (
            _b(token).decode("utf-8", "surrogateescape") if token is not None else f"xsc{next(self._tokens)}"
        )
        sub = WatchEvents(spath, stoken, maxsize or self.watch_queue_size)
        # Registered before sending: the initial event follows the OK immediately.
        self._watches.setdefault(stoken, []).append(sub)
        try:
            await self.request(Op.WATCH, _arg(spath) + _arg(stoken))
            try:
                yield sub
            finally:
                if not self.closed:
                    with trio.CancelScope(shield=True):
                        try:
                            await self.request(Op.UNWATCH, _arg(spath) + _arg(stoken))
                        except (XsError, ConnectionClosed):
                            pass
        finally:
            subs = self._watches.get(stoken, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._watches.pop(stoken, None)
            sub._close(None)


# --------------------------------------------------------------------------------------------
# Blocking client


class SyncClient:
    """A minimal blocking client for scripts: plain socket, one request at a time, no trio.

    Watch events that arrive while waiting for a reply are queued and returned by
    :meth:`read_watch`, so watches and requests can be mixed on one connection.
    """

    def __init__(self, path: str | None = None, *, timeout: float | None = 30.0) -> None:
        self.path = path or default_socket_path()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            raise _connect_error(e, self.path) from None
        except BaseException:
            self._sock.close()
            raise
        self._transactions: list[SyncTransaction] = []  # open through transaction(), innermost last
        self._parser = Parser()
        self._inbox: collections.deque[tuple[int, int, bytes]] = collections.deque()
        self._events: collections.deque[tuple[str, str]] = collections.deque()
        self._ids = _ReqIds()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _pump(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionClosed("daemon closed the connection")
        for msg in self._parser.feed(data):
            if msg.type == Op.WATCH_EVENT:
                event = _watch_event(msg.payload)
                if event is not None:
                    self._events.append(event)
            else:
                self._inbox.append((msg.type, msg.req_id, msg.payload))

    def request(self, op: int, payload: bytes, tx_id: int = 0) -> bytes:
        """Send one raw request and return the reply payload; an ERROR reply raises XsError.

        RuntimeError for a data operation outside any transaction while this client is inside
        ``with client.transaction()``: it would silently miss the transaction."""
        if self._transactions and not tx_id and op in _TX_DATA_OPS:
            raise _outside_transaction_error(op, self._transactions[-1].tx_id)
        _check_size(payload)
        rid = self._ids.take()
        self._sock.sendall(HEADER.pack(op, rid, tx_id, len(payload)) + payload)
        while True:
            while self._inbox:
                msg_type, reply_id, reply = self._inbox.popleft()
                if reply_id != rid:
                    continue  # reply to a request abandoned by an exception (e.g. timeout)
                if msg_type == Op.ERROR:
                    raise _error(reply)
                return reply
            self._pump()

    def read(self, path: Bytesish, tx_id: int = 0) -> bytes:
        return self.request(Op.READ, _arg(path), tx_id)

    def write(self, path: Bytesish, value: Bytesish, tx_id: int = 0) -> None:
        self.request(Op.WRITE, _arg(path) + _b(value), tx_id)

    def mkdir(self, path: Bytesish, tx_id: int = 0) -> None:
        self.request(Op.MKDIR, _arg(path), tx_id)

    def rm(self, path: Bytesish, tx_id: int = 0) -> None:
        self.request(Op.RM, _arg(path), tx_id)

    def ls(self, path: Bytesish, tx_id: int = 0) -> list[str]:
        return _strings(self.request(Op.DIRECTORY, _arg(path), tx_id))

    directory = ls

    def exists(self, path: Bytesish, tx_id: int = 0) -> bool:
        try:
            self.read(path, tx_id)
        except XsError as e:
            if e.name == "ENOENT":
                return False
            raise
        return True

    def get_perms(self, path: Bytesish, tx_id: int = 0) -> list[str]:
        return _strings(self.request(Op.GET_PERMS, _arg(path), tx_id))

    def set_perms(self, path: Bytesish, perms: Iterable[str | bytes], tx_id: int = 0) -> None:
        self.request(Op.SET_PERMS, _perms_payload(path, perms), tx_id)

    def get_domain_path(self, domid: int) -> str:
        """The home path of a domain (``/local/domain/<domid>``)."""
        return _text(self.request(Op.GET_DOMAIN_PATH, _num(domid)))

    def introduce(self, domid: int, gfn: int, port: int) -> None:
        """INTRODUCE ``domid`` (page frame ``gfn``, event channel ``port``); see Client.introduce."""
        self.request(Op.INTRODUCE, _num(domid) + _num(gfn, "page frame") + _num(port, "port"))

    def release(self, domid: int) -> None:
        """RELEASE ``domid``: the daemon stops serving it; ``@releaseDomain`` fires."""
        self.request(Op.RELEASE, _num(domid))

    def resume(self, domid: int) -> None:
        """RESUME ``domid``: clear its shutdown flag."""
        self.request(Op.RESUME, _num(domid))

    def is_domain_introduced(self, domid: int) -> bool:
        """Whether the daemon is serving ``domid``."""
        return _text(self.request(Op.IS_DOMAIN_INTRODUCED, _num(domid))) == "T"

    def set_target(self, domid: int, target: int) -> None:
        """SET_TARGET: ``domid`` gets ``target``'s rights."""
        self.request(Op.SET_TARGET, _num(domid) + _num(target, "target domain id"))

    def control(self, *args: str) -> str:
        if not args:
            raise ValueError("control needs a command")
        return _text(self.request(Op.CONTROL, b"".join(_arg(a) for a in args)))

    def transaction_start(self) -> int:
        return int(_text(self.request(Op.TRANSACTION_START, b"\0")))

    def transaction_end(self, tx_id: int, commit: bool = True) -> None:
        self.request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx_id)

    @contextmanager
    def transaction(self) -> Iterator[SyncTransaction]:
        """Commit on clean exit (EAGAIN raises XsError), abort if the body raises."""
        tx_id = self.transaction_start()
        t = SyncTransaction(self, tx_id)
        self._transactions.append(t)
        try:
            try:
                yield t
            finally:
                self._transactions.remove(t)
        except BaseException:
            try:
                self.transaction_end(tx_id, commit=False)
            except (XsError, OSError):
                pass
            raise
        self.transaction_end(tx_id, commit=True)

    def transact(
        self,
        fn: Callable[[SyncTransaction], T],
        *,
        attempts: int = DEFAULT_TRANSACT_ATTEMPTS,
        backoff: float = 0.001,
    ) -> T:
        """Run ``fn(t)`` in a transaction and commit, re-running it on EAGAIN (as
        :meth:`Client.transact`): ``fn`` must be safe to run more than once; after ``attempts``
        conflicts the last EAGAIN is raised."""
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        for attempt in range(attempts):
            try:
                with self.transaction() as t:
                    result = fn(t)
            except XsError as e:
                if e.name != "EAGAIN" or attempt == attempts - 1:
                    raise
                time.sleep(backoff * random.uniform(0.5, 1.5) * (attempt + 1))
                continue
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def watch(self, path: Bytesish, token: Bytesish) -> None:
        """Register a watch; its events (the initial one first) come from :meth:`read_watch`."""
        self.request(Op.WATCH, _arg(path) + _arg(token))

    def unwatch(self, path: Bytesish, token: Bytesish) -> None:
        self.request(Op.UNWATCH, _arg(path) + _arg(token))

    def read_watch(self, timeout: float | None = None) -> tuple[str, str]:
        """The next watch event ``(path, token)``; raises TimeoutError after ``timeout`` seconds."""
        if self._events:
            return self._events.popleft()
        old = self._sock.gettimeout()
        self._sock.settimeout(timeout)
        try:
            while not self._events:
                self._pump()  # socket timeout -> TimeoutError
        finally:
            self._sock.settimeout(old)
        return self._events.popleft()


class SyncTransaction:
    """Blocking operations bound to one transaction; from :meth:`SyncClient.transaction`."""

    def __init__(self, client: SyncClient, tx_id: int) -> None:
        self.client = client
        self.tx_id = tx_id

    def __repr__(self) -> str:
        return f"<SyncTransaction {self.tx_id}>"

    def read(self, path: Bytesish) -> bytes:
        return self.client.read(path, self.tx_id)

    def write(self, path: Bytesish, value: Bytesish) -> None:
        self.client.write(path, value, self.tx_id)

    def mkdir(self, path: Bytesish) -> None:
        self.client.mkdir(path, self.tx_id)

    def rm(self, path: Bytesish) -> None:
        self.client.rm(path, self.tx_id)

    def ls(self, path: Bytesish) -> list[str]:
        return self.client.ls(path, self.tx_id)

    def exists(self, path: Bytesish) -> bool:
        return self.client.exists(path, self.tx_id)

    def get_perms(self, path: Bytesish) -> list[str]:
        return self.client.get_perms(path, self.tx_id)

    def set_perms(self, path: Bytesish, perms: Iterable[str | bytes]) -> None:
        self.client.set_perms(path, perms, self.tx_id)
