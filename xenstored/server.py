"""trio edges: the Unix-socket listener, socket clients (served by the hub), and the domain pumps.

Bytes go down into Connection.feed, the requests it frames go to the dispatcher (ops.dispatch),
and the replies the dispatcher queued on the connection come back up and out; this module only
moves bytes.  A chunk of pipelined requests is parsed and answered as a batch and the replies leave in
one send, so a busy client costs one recv and one send per batch, not per message.  Nothing here
iterates over other connections, so per-request cost is independent of how many are open.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket as pysocket
import stat
from collections.abc import Callable

import trio

from .connection import Connection
from .core import Core
from .hub import Hub
from .hypervisor.base import Hypervisor
from .ops import answer, handle
from .ringpump import RingPump
from .wire import ProtocolError

log = logging.getLogger("xenstored.server")

RECV_SIZE = 65536


class Waker:
    """A re-armable event: edges sleep on it, the sans-I/O connection pokes it."""

    __slots__ = ("_ev",)

    def __init__(self) -> None:
        self._ev = trio.Event()

    def set(self) -> None:
        self._ev.set()

    async def wait(self) -> None:
        ev = self._ev
        await ev.wait()
        if self._ev is ev:
            self._ev = trio.Event()


def make_listening_socket(path: str, backlog: int = 128, *, listen: bool = True) -> pysocket.socket:
    """Bind ``path`` (mode 0600), replacing a stale socket but never a live daemon's or a file.

    ``listen=False`` only binds: the path is ours, but clients are refused until ``listen()``,
    so nobody connects to a daemon that may still fail to start."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise OSError(errno.EADDRINUSE, f"another daemon is serving {path}")
        finally:
            probe.close()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    raw = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which the socket is reachable by others
    try:
        raw.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    if listen:
        raw.listen(backlog)
    return raw


SEND_CHUNK = 1 << 18


async def run_socket_connection(core: Core, conn: Connection, sock: pysocket.socket, hub: Hub) -> None:
    """Serve one socket client until it disconnects or misbehaves.

    Its requests are answered inline by the hub (:mod:`.hub`): when the socket is readable the
    hub calls :func:`on_readable`, which receives a batch, runs it and sends the replies with a
    non-blocking send, so a sequential request costs ``epoll_wait``, ``recv`` and ``send`` and,
    while trio idles, no scheduler pass.  This task only owns the connection's lifetime and its
    writer, which finishes what the socket would not take at once and delivers output queued by
    other clients' requests (watch events).  Fairness comes from the hub: each ready client gets
    one ``recv`` (at most RECV_SIZE bytes) per round.
    """
    sock.setblocking(False)
    output = Waker()
    ended = trio.Event()
    inline = False
    paused = False

    def wake() -> None:
        if not inline:
            output.set()

    conn.wakeup = wake
    log.debug("%s: connected", conn.label)

    send = sock.send
    peek, consume, has_output = conn.peek_output, conn.consume_output, conn.has_output
    fd = sock.fileno()
    recv = sock.recv
    durable = core.durable

    def send_now() -> bool:
        """Send what the socket takes without waiting; True if everything went."""
        if not has_output():
            return True
        durable()  # a reply is visible only once what it acknowledges is journaled
        while True:
            try:
                n = send(peek(SEND_CHUNK))
            except BlockingIOError:
                return False
            consume(n)
            if not has_output():
                return True

    def send_early() -> None:
        """The replies so far of a long batch (ops.handle's flush): a send error ends the
        connection at the batch's own send, after the batch."""
        with contextlib.suppress(OSError):
            send_now()

    def end() -> None:
        hub.remove(fd)
        ended.set()

    def on_readable() -> None:
        nonlocal inline, paused
        try:
            data = recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            log.debug("%s: recv failed: %s", conn.label, e)
            end()
            return
        if not data:
            end()
            return
        inline = True
        try:
            reply = answer(core, conn, data)
            if reply is None:
                handle(core, conn, data, send_early)
        except ProtocolError as e:
            log.warning("%s: protocol error, disconnecting: %s", conn.label, e)
            end()
            return
        finally:
            inline = False
        if reply:  # one request answered, nothing else queued: its reply goes straight out
            durable()
            try:
                n = send(reply)
            except BlockingIOError:
                n = 0
            except OSError as e:
                log.debug("%s: send failed: %s", conn.label, e)
                end()
                return
            if n < len(reply):
                conn.queue_raw(reply[n:])  # the writer finishes it once the socket takes more
            return
        try:
            sent = send_now()
        except OSError as e:  # the peer went away (EPIPE, ECONNRESET)
            log.debug("%s: send failed: %s", conn.label, e)
            end()
            return
        if not sent or conn.doomed:
            output.set()
        if not conn.wants_input:
            paused = True  # its replies are not being read: read no more until they are
            hub.pause(fd)

    def on_fail(e: BaseException) -> None:
        # A bug costs this one connection, never the daemon.
        log.error("%s: internal error; closing this connection", conn.label, exc_info=e)
        ended.set()

    async def writer() -> None:
        nonlocal paused
        while True:
            if conn.doomed:
                log.warning("%s: disconnected: %s", conn.label, conn.doomed)
                end()
                return
            if not send_now():
                await trio.lowlevel.wait_writable(sock)
                continue
            if paused and conn.wants_input:
                paused = False
                hub.resume(fd)
            await output.wait()

    try:
        hub.add(fd, on_readable, on_fail)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await ended.wait()
            nursery.cancel_scope.cancel()
    except* OSError:
        pass
    except* Exception:
        # A bug costs this one connection, never the daemon.
        log.exception("%s: internal error; closing this connection", conn.label)
    finally:
        hub.remove(fd)
        core.close_connection(conn)
        core.socket_fds.pop(conn.id, None)
        sock.close()
        log.debug("%s: closed", conn.label)


# What failed last, by subsystem, while it keeps failing: one log line per failure streak.
failures: dict[str, int] = {}


def contained(what: str, fn: Callable[..., object], *args: object) -> None:
    """Run one step of a subsystem; an exception costs that step, is logged with what to do, and
    the subsystem is retried on its next event.  It never ends the daemon."""
    try:
        fn(*args)
    except Exception:
        n = failures.get(what, 0) + 1
        failures[what] = n
        if n == 1 or n % 1000 == 0:
            log.exception(
                "%s failed (%d times in a row); xenstored serves on and retries it: "
                "report this with the log if it persists",
                what,
                n,
            )
    else:
        if failures.pop(what, None):
            log.warning("%s works again", what)


async def serve_socket(
    core: Core, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Bind ``path`` and serve it (tests and simple embedding)."""
    async with trio.open_nursery() as nursery:
        hub = Hub()
        await nursery.start(hub.run)
        await serve_listener(core, make_listening_socket(path), hub, task_status=task_status)


async def serve_listener(
    core: Core,
    sock: pysocket.socket,
    hub: Hub,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    sock.setblocking(False)
    log.info("listening on fd %d", sock.fileno())
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                client, _ = sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as e:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", e)
                await trio.sleep(0.1)
                continue
            conn = core.new_connection(socket=True)
            core.socket_fds[conn.id] = client.fileno()
            nursery.start_soon(run_socket_connection, core, conn, client, hub)


async def serve_domains(
    pump: RingPump,
    hv: Hypervisor,
    hub: Hub | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Event channels in, ring output out.  Kicks pump their domain at once; output queued by
    other clients' requests (watch events) is flushed in one pass per wakeup.

    With a hub, the hypervisor's event fd is one of the hub's: a guest's kick is then served
    like a socket client's request, without a trio pass while trio idles."""
    waker = Waker()
    pump.wakeup = waker.set

    def on_port_kicked(port: int) -> None:
        contained("a ring pump", pump.on_port_kicked, port)

    def on_dom_exc() -> None:
        contained("the domain-state scan (VIRQ_DOM_EXC)", pump.manager.on_dom_exc)

    def on_events() -> None:
        contained("reading the event channels", hv.handle_events, on_port_kicked, on_dom_exc)

    def on_fail(e: BaseException) -> None:  # pragma: no cover - on_events contains everything
        log.error("event channels: %r; serving them on", e)
        hub.add(event_fd, on_events, on_fail)  # type: ignore[union-attr]

    async def flusher() -> None:
        while True:
            await waker.wait()
            contained("flushing ring output", pump.flush)

    async def scanner(interval: float) -> None:
        while True:
            await trio.sleep(interval)
            contained("the periodic ring scan", pump.scan)
            if failures.get("the domain-state scan (VIRQ_DOM_EXC)"):
                # A scan that failed (libxenctrl refusing, say) may have missed a death: retry
                # until one succeeds, rather than wait for the next VIRQ that may never come.
                contained("the domain-state scan (VIRQ_DOM_EXC)", pump.manager.on_dom_exc)

    event_fd = hv.event_fd() if hub is not None else None
    async with trio.open_nursery() as nursery:
        if hub is not None and event_fd is not None:
            hub.add(event_fd, on_events, on_fail)
        else:
            await nursery.start(hv.run, on_port_kicked, on_dom_exc)
        nursery.start_soon(flusher)
        interval = pump.core.config.ring_scan_interval
        if interval > 0:
            nursery.start_soon(scanner, interval)
        pump.flush()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            if hub is not None and event_fd is not None:
                hub.remove(event_fd)
