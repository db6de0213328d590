"""One client connection, socket or ring: a sans-I/O protocol object, as h11's Connection.

Bytes in, messages out; replies and events in, bytes out.  The transport edge (server.py for
sockets, ringpump.py for domains) hands received bytes to :meth:`Connection.feed`, which returns
the complete requests; the edge passes each one to the dispatcher (ops.dispatch), which writes
the reply back with :meth:`reply` or :meth:`error`; the edge then drains
:meth:`peek_output`/:meth:`consume_output`.  The connection never calls up: it does not know the
dispatcher, the daemon state or the transport.

Output is a queue of whole messages so that the edge can write any amount (a ring may take a
few bytes at a time) and the queue can be bounded by message count and bytes.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from . import paths
from .quota import Quotas
from .store import Store
from .transactions import Transaction
from .wire import HEADER, PAYLOAD_MAX, Message, Op, Parser

log = logging.getLogger("xenstored.connection")

_ids = itertools.count(1)


def _nothing() -> None:
    pass


class DomainView(Protocol):
    """What a connection needs of the domain it speaks for (core.Domain is the real record: it
    lives above this module, so the connection names only these attributes)."""

    domid: int
    target: int | None
    features: int
    quotas: Quotas


class Tracer(Protocol):
    """Where replies and events are traced (logs.Tracer, installed by the daemon state)."""

    def reply(self, conn: Connection, type_: int, tx_id: int, payload: bytes) -> None: ...


class Connection:
    def __init__(
        self,
        domain: DomainView,
        *,
        socket: bool,
        privileged: bool,
        pause_bytes: int,
        limit_bytes: int,
    ) -> None:
        self.id = next(_ids)
        self.domain = domain
        self.domid = domain.domid
        self.is_socket = socket
        self.privileged = privileged
        self.home = paths.home_of(self.domid)
        self.parser = Parser()
        self.transactions: dict[int, Transaction] = {}
        self._next_tx = 1
        self._out: deque[bytes] = deque()
        self._out_off = 0  # bytes of _out[0] already written
        # (time queued, message) of watch events not yet written, oldest first: unread events
        # to unprivileged domains expire (cxenstored's watch-event timeout).
        self._event_times: deque[tuple[float, bytes]] = deque()
        self.out_bytes = 0
        # Set by the edge: called when output appears, so its writer wakes up.
        self.wakeup: Callable[[], None] = _nothing
        # A reason to disconnect once the edge notices (output overflow for a socket client).
        self.doomed: str | None = None
        self.closed = False
        self.requests = 0
        # Back-pressure: stop reading above pause_bytes of queued output; a client whose watch
        # events pile up past limit_bytes is disconnected.
        self.pause_bytes = pause_bytes
        self.limit_bytes = limit_bytes
        self.tracer: Tracer | None = None
        # Set by the journal for ring connections: every framed output message is recorded
        # before it can reach the ring, and dropping queued output (unread events expiring, a
        # reset) records the queue anew.
        self.on_output: Callable[[bytes], None] | None = None
        self.on_output_dropped: Callable[[], None] | None = None
        # Transactions a previous daemon process had open for this guest: they did not survive
        # it, so a request naming one gets EAGAIN (xenbus and the toolstack retry) once.
        self.lost_transactions: set[int] = set()

    def __repr__(self) -> str:
        kind = "socket" if self.is_socket else "ring"
        return f"<Connection {self.id} {kind} dom{self.domid}>"

    @property
    def target(self) -> int | None:
        return self.domain.target

    @property
    def label(self) -> str:
        """How logs name this client: the domain for rings, a number for sockets."""
        return f"socket{self.id}" if self.is_socket else f"dom{self.domid}"

    # ------------------------------------------------------------------------- input
    def feed(self, data: bytes) -> list[Message]:
        """Frame ``data``: the requests it completes, in order, for the edge to dispatch.
        Raises ProtocolError (the edge disconnects or ignores the client)."""
        msgs = self.parser.feed(data)
        self.requests += len(msgs)
        return msgs

    @property
    def outstanding(self) -> int:
        """Replies and events queued but not yet written (the outstanding quota counts these)."""
        return len(self._out)

    @property
    def wants_input(self) -> bool:
        """Back-pressure: read more only while replies are being taken away."""
        return self.out_bytes < self.pause_bytes and not self.doomed

    # ------------------------------------------------------------------------- output
    def _queue(self, data: bytes) -> None:
        if self.on_output is not None:
            self.on_output(data)
        was_empty = not self._out
        self._out.append(data)
        self.out_bytes += len(data)
        if was_empty:
            self.wakeup()

    def reply(self, msg: Message, payload: bytes, type_: int | None = None) -> None:
        if len(payload) > PAYLOAD_MAX:
            self.error(msg, "E2BIG")
            return
        t = msg.type if type_ is None else type_
        tracer = self.tracer
        if tracer is not None:
            tracer.reply(self, t, msg.tx_id, payload)
        data = HEADER.pack(t, msg.req_id, msg.tx_id, len(payload)) + payload
        # _queue, spelt out: every request's reply comes this way.
        if self.on_output is not None:
            self.on_output(data)
        out = self._out
        out.append(data)
        self.out_bytes += len(data)
        if len(out) == 1:
            self.wakeup()

    def error(self, msg: Message, name: str) -> None:
        payload = name.encode() + b"\0"
        tracer = self.tracer
        if tracer is not None:
            tracer.reply(self, Op.ERROR, msg.tx_id, payload)
        self._queue(HEADER.pack(Op.ERROR, msg.req_id, msg.tx_id, len(payload)) + payload)

    def event(self, path: str, token: str) -> None:
        """Queue a WATCH_EVENT.  Oversized events are dropped (XSA-324); the memory quota of an
        unprivileged watcher is the daemon state's to check (core.Core.send_event)."""
        payload = path.encode("ascii") + b"\0" + token.encode("latin-1") + b"\0"
        if len(payload) > PAYLOAD_MAX:
            return
        if self.out_bytes + len(payload) > self.limit_bytes and not self.doomed:
            # A client that lets events pile up without reading would grow us without bound.
            self.doomed = f"output queue over {self.limit_bytes} bytes"
            log.warning("%s: not reading its watch events; disconnecting", self.label)
            self.wakeup()
            return
        if self.doomed:
            return
        tracer = self.tracer
        if tracer is not None:
            tracer.reply(self, Op.WATCH_EVENT, 0, payload)
        data = HEADER.pack(Op.WATCH_EVENT, 0, 0, len(payload)) + payload
        if not self.privileged:
            self._event_times.append((time.monotonic(), data))
        self._queue(data)

    def expire_events(self, timeout: float) -> int:
        """Drop watch events queued longer than ``timeout`` seconds and not yet being written.
        Cheap when nothing is old: only the oldest timestamp is looked at."""
        times = self._event_times
        if not times or timeout <= 0:
            return 0
        cutoff = time.monotonic() - timeout
        if times[0][0] >= cutoff:
            return 0
        out = self._out
        doomed = set()
        while times and times[0][0] < cutoff:
            doomed.add(id(times.popleft()[1]))
        head = out[0] if self._out_off else None  # partly written: must finish
        kept = deque(m for m in out if m is head or id(m) not in doomed)
        dropped = len(out) - len(kept)
        self.out_bytes -= sum(len(m) for m in out if m is not head and id(m) in doomed)
        self._out = kept
        if dropped:
            log.warning("%s: dropped %d watch events unread for %.0f s", self.label, dropped, timeout)
            if self.on_output_dropped is not None:
                self.on_output_dropped()
        return dropped

    def has_output(self) -> bool:
        return bool(self._out)

    def answerable(self) -> bool:
        """Whether a complete request may be answered without the parser (ops.answer): nothing
        half-received to come first, and no tracer to see the request and its reply."""
        return self.tracer is None and not self.parser.pending

    def peek_output(self, limit: int | None = None) -> bytes:
        """Pending output bytes (up to ``limit``) without removing them."""
        out = self._out
        if not out:
            return b""
        if len(out) == 1 and not self._out_off:  # one reply waiting: the usual case
            first = out[0]
            return first if limit is None or len(first) <= limit else first[:limit]
        first = out[0][self._out_off :] if self._out_off else out[0]
        if limit is not None and len(first) >= limit:
            return first[:limit]
        parts = [first]
        size = len(first)
        for chunk in itertools.islice(out, 1, None):
            if limit is not None and size + len(chunk) > limit:
                parts.append(chunk[: limit - size])
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    def consume_output(self, n: int) -> None:
        """Drop ``n`` bytes that the edge has written."""
        out = self._out
        self.out_bytes -= n
        while n and out:
            avail = len(out[0]) - self._out_off
            if n >= avail:
                done = out.popleft()
                times = self._event_times
                if times and times[0][1] is done:
                    times.popleft()
                self._out_off = 0
                n -= avail
            else:
                self._out_off += n
                n = 0

    def partial_output(self) -> int:
        """Bytes left of a message the edge has started writing (0 if none): a state dump must
        not let the next process resend its header."""
        return len(self._out[0]) - self._out_off if self._out and self._out_off else 0

    def queue_raw(self, data: bytes) -> None:
        """Put already framed output back (state restore)."""
        if data:
            self._queue(data)

    def take_output(self) -> bytes:
        data = self.peek_output()
        self.consume_output(len(data))
        return data

    def discard_output(self) -> None:
        self._event_times.clear()
        self._out.clear()
        self._out_off = 0
        self.out_bytes = 0
        if self.on_output_dropped is not None:
            self.on_output_dropped()

    # ------------------------------------------------------------------------- transactions
    @property
    def next_tx_id(self) -> int:
        return self._next_tx

    def restore_transaction_ids(self, next_id: int, lost: set[int]) -> None:
        """After a restart: ids keep counting where the dead process stopped, and the ones it
        had open answer EAGAIN."""
        self._next_tx = next_id or 1
        self.lost_transactions = set(lost)

    def new_transaction(self, store: Store) -> Transaction:
        tx_id = self._next_tx
        while tx_id == 0 or tx_id in self.transactions or tx_id in self.lost_transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        self._next_tx = (tx_id + 1) & 0xFFFFFFFF
        txn = Transaction(store, tx_id)
        txn.started = time.monotonic()
        self.transactions[tx_id] = txn
        return txn

    def drop_transactions(self) -> None:
        for txn in self.transactions.values():
            txn.close()
        self.transactions.clear()

    # ------------------------------------------------------------------------- teardown
    def reset(self) -> None:
        """Forget the per-connection state this object holds (ring reconnection, re-INTRODUCE);
        its watches are the daemon state's (core.Core.reset_connection drops both)."""
        self.drop_transactions()
        self.parser.reset()
        self.discard_output()

    def close(self) -> None:
        """Mark closed and forget everything; core.Core.close_connection also forgets it."""
        if self.closed:
            return
        self.closed = True
        self.reset()
