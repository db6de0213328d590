"""A do-nothing XenStore-shaped server: the floor under any Python daemon's sequential request.

    python -m bench.floor_server raw|oneshot|trio SOCKET

It answers every whole ``xsd_sockmsg`` frame with the same 4-byte reply and does nothing else,
so its CPU per request is what the kernel (wakeup, ``recv``, ``send``) and the event loop cost,
with none of a daemon's work.  ``raw`` is a bare level-triggered epoll loop (3 syscalls per
request: ``epoll_wait``, ``recv``, ``send``); ``oneshot`` is the same loop re-arming a one-shot
registration after each request as trio does (the kernel's share of trio's wait); ``trio`` waits the way our daemon does, with
``trio.lowlevel.wait_readable`` (trio re-arms a one-shot registration per wait: a 4th syscall,
``epoll_ctl``, and one pass of trio's scheduler); ``hub`` serves through ``xenstored.hub`` as the
daemon does (while trio idles: ``epoll_wait``, ``recv``, ``send``, and no pass).  ``bench.bench_floor`` runs both beside our
daemon and another one: the differences are the event loop's share and our own.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
from collections.abc import Callable

HEADER = struct.Struct("<IIII")
REPLY_BODY = b"abc\0"


def _listen(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(16)
    ls.setblocking(False)
    return ls


def _replies(buf: bytearray) -> bytes:
    """Cut every whole frame off ``buf``; one reply per frame (same type and request id)."""
    out = []
    while len(buf) >= HEADER.size:
        type_, req_id, tx_id, length = HEADER.unpack_from(buf)
        if len(buf) < HEADER.size + length:
            break
        del buf[: HEADER.size + length]
        out.append(HEADER.pack(type_, req_id, tx_id, len(REPLY_BODY)) + REPLY_BODY)
    return b"".join(out)


def serve_raw(path: str, oneshot: bool = False) -> None:
    ls = _listen(path)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    flags = select.EPOLLIN | (select.EPOLLONESHOT if oneshot else 0)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    while True:
        for fd, _ in ep.poll():
            if fd == ls.fileno():
                c, _ = ls.accept()
                c.setblocking(False)
                conns[c.fileno()] = (c, bytearray())
                ep.register(c.fileno(), flags)
                continue
            c, buf = conns[fd]
            data = c.recv(65536)
            if not data:
                ep.unregister(fd)
                c.close()
                del conns[fd]
                continue
            buf += data
            reply = _replies(buf)
            if reply:
                c.send(reply)
            if oneshot:
                ep.modify(fd, flags)  # re-armed per wait, as trio does


def serve_trio(path: str) -> None:
    import trio

    async def conn(c: socket.socket) -> None:
        c.setblocking(False)
        buf = bytearray()
        with c:
            while True:
                await trio.lowlevel.wait_readable(c)
                data = c.recv(65536)
                if not data:
                    return
                buf += data
                reply = _replies(buf)
                if reply:
                    c.send(reply)

    async def main() -> None:
        ls = _listen(path)
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(ls)
                c, _ = ls.accept()
                nursery.start_soon(conn, c)

    trio.run(main)


def serve_hub(path: str) -> None:
    """The daemon's way since the hub: trio runs, and xenstored.hub serves each socket (in
    epoll_wait itself while trio idles).  Its cost above ``raw`` is what the hub adds."""
    import trio

    from xenstored.hub import Hub

    def handler(c: socket.socket, buf: bytearray, hub: Hub) -> Callable[[], None]:
        def on_readable() -> None:
            data = c.recv(65536)
            if not data:
                hub.remove(c.fileno())
                c.close()
                return
            buf.extend(data)
            reply = _replies(buf)
            if reply:
                c.send(reply)

        return on_readable

    def fail(e: BaseException) -> None:
        raise SystemExit(f"floor server: {e!r}")

    async def main() -> None:
        ls = _listen(path)
        hub = Hub()
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            while True:
                await trio.lowlevel.wait_readable(ls)
                c, _ = ls.accept()
                c.setblocking(False)
                hub.add(c.fileno(), handler(c, bytearray(), hub), fail)

    trio.run(main)


if __name__ == "__main__":
    kind, sock_path = sys.argv[1], sys.argv[2]
    if kind == "oneshot":
        serve_raw(sock_path, oneshot=True)
    else:
        {"raw": serve_raw, "trio": serve_trio, "hub": serve_hub}[kind](sock_path)
