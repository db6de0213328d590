"""A daemon core with no I/O, for testing operations in microseconds.

``Peer`` wraps one Connection: it frames requests, feeds them, and parses everything the
connection queued back into messages, so tests read like the wire protocol.
"""

from __future__ import annotations

from xenstored.config import Config
from xenstored.core import Core
from xenstored.ops import handle
from xenstored.wire import Message, Op, Parser, encode


class Peer:
    def __init__(self, core: Core, domid: int | None = None, *, socket: bool = True) -> None:
        self.core = core
        self.conn = core.new_connection(domid, socket=socket)
        self.parser = Parser()
        self.req_id = 0
        self.events: list[tuple[str, str]] = []

    def send(self, op: int, payload: bytes, tx_id: int = 0) -> list[Message]:
        """Send one request; return every message it produced (events and the reply)."""
        self.req_id += 1
        handle(self.core, self.conn, encode(op, self.req_id, tx_id, payload))
        return self.drain()

    def drain(self) -> list[Message]:
        msgs = self.parser.feed(self.conn.take_output())
        for m in msgs:
            if m.type == Op.WATCH_EVENT:
                path, token, _ = m.payload.split(b"\0")
                self.events.append((path.decode(), token.decode("latin-1")))
        return msgs

    def call(self, op: int, payload: bytes, tx_id: int = 0) -> bytes:
        """The reply payload; raises AssertionError naming the error for an ERROR reply."""
        replies = [m for m in self.send(op, payload, tx_id) if m.type != Op.WATCH_EVENT]
        assert len(replies) == 1, replies
        r = replies[0]
        if r.type == Op.ERROR:
            raise XsErr(r.payload.rstrip(b"\0").decode())
        assert r.type == op and r.req_id == self.req_id
        return r.payload

    def err(self, op: int, payload: bytes, tx_id: int = 0) -> str:
        """The error name a request fails with (asserts that it fails)."""
        try:
            got = self.call(op, payload, tx_id)
        except XsErr as e:
            return e.name
        raise AssertionError(f"expected an error, got {got!r}")

    # Conveniences.
    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else value
        assert self.call(Op.WRITE, path.encode() + b"\0" + v, tx) == b"OK\0"

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.call(Op.READ, path.encode() + b"\0", tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        assert self.call(Op.MKDIR, path.encode() + b"\0", tx) == b"OK\0"

    def rm(self, path: str, tx: int = 0) -> None:
        assert self.call(Op.RM, path.encode() + b"\0", tx) == b"OK\0"

    def ls(self, path: str, tx: int = 0) -> list[str]:
        out = self.call(Op.DIRECTORY, path.encode() + b"\0", tx)
        return [n.decode() for n in out.split(b"\0")[:-1]] if out else []

    def getperms(self, path: str, tx: int = 0) -> list[str]:
        out = self.call(Op.GET_PERMS, path.encode() + b"\0", tx)
        return [p.decode() for p in out.split(b"\0")[:-1]]

    def setperms(self, path: str, *perms: str, tx: int = 0) -> None:
        payload = path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
        assert self.call(Op.SET_PERMS, payload, tx) == b"OK\0"

    def start(self) -> int:
        return int(self.call(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))

    def end(self, tx: int, commit: bool = True) -> None:
        assert self.call(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx) == b"OK\0"

    def watch(self, path: str, token: str, depth: int | None = None) -> None:
        payload = path.encode() + b"\0" + token.encode() + b"\0"
        if depth is not None:
            payload += str(depth).encode() + b"\0"
        self.call(Op.WATCH, payload)


class XsErr(AssertionError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def make_core(**kw: object) -> Core:
    return Core(Config(**kw))  # type: ignore[arg-type]
