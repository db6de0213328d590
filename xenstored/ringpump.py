"""The ring edge: moves bytes between each introduced domain's shared ring page and its
connection, and hands the requests it frames to the dispatcher.

It is the ring's counterpart of server.run_socket_connection, but synchronous: the trio task in
server.serve_domains calls :meth:`RingPump.on_port_kicked` for each event-channel kick and
:meth:`RingPump.flush` when some connection has output (a watch event another client's request
caused).  Bounds: a domain whose replies go unread is not read any more (back-pressure), and a
guest that corrupts its ring or sends an oversized request is ignored until it is re-introduced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .connection import Connection
from .core import Domain
from .domains import RECONNECT, DomainManager
from .ops import answer, dispatch
from .ring import RING_SIZE, Ring, RingError
from .wire import HEADER, HEADER_SIZE, PAYLOAD_MAX, ProtocolError

log = logging.getLogger("xenstored.domains")

# How many times one pump notifies the guest and looks at its ring again before it returns to the
# event loop: a guest answering at once gets several round trips per wakeup, but other clients
# and the kicks queued meanwhile (the emulated channel's queue holds only a few) are not starved.
PUMP_ROUNDS = 4
# Whether to notify early, as soon as a request is waiting rather than only once the reply is
# written, depends on how fast the guest wakes up.  A guest whose CPU was idle (halted) takes tens of
# microseconds to run again: notified early, it wakes while we work and finds its reply (C
# notifies on read and on write for the same reason).  A guest that runs the moment it is
# notified (it shares our CPU) would only find an empty ring and go back to sleep, costing it a
# wakeup and us a context switch.  ``Domain.prompt`` tells them apart: it grows by PROMPT_HIT
# each time a second look finds the next request already there, shrinks by 1 each time it does
# not, and early notifications are sent only while it is 0.
PROMPT_HIT = 4
PROMPT_MAX = 16
ERROR_PROTO = 3


def _nothing() -> None:
    pass


class RingPump:
    """The per-domain ring pumps of one DomainManager."""

    def __init__(self, manager: DomainManager) -> None:
        self.manager = manager
        self.core = manager.core
        self.hv = manager.hv
        self._dirty: dict[int, Domain] = {}
        self._pumping: Domain | None = None
        self.wakeup: Callable[[], None] = _nothing  # set by the trio edge: call flush() soon
        manager.output_ready = self._mark

    def _mark(self, dom: Domain) -> None:
        if dom is self._pumping:
            return  # the running pump writes its own replies before it returns
        if dom.domid not in self._dirty:
            self._dirty[dom.domid] = dom
            self.wakeup()

    def flush(self) -> None:
        """Pump every domain that has pending output (called by the edge after wakeups)."""
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for dom in dirty.values():
                self.pump(dom)

    def scan(self) -> None:
        """Look at every ring, kicked or not: the safety net for lost notifications (an emulated
        event channel is a datagram socket whose queue can overflow; O scans rings likewise)."""
        for dom in list(self.manager.by_port.values()):
            self.pump(dom)

    def on_port_kicked(self, port: int) -> None:
        dom = self.manager.by_port.get(port)
        if dom is not None:
            self.pump(dom)

    def wants_input(self, dom: Domain, conn: Connection) -> bool:
        """Stop reading a domain that leaves its replies unread (back-pressure, not buffering)."""
        if conn.privileged:
            return conn.wants_input
        q = dom.quotas.values  # quota.exceeds, spelt out: this runs for every request
        limit = q["outstanding"]
        if limit and conn.outstanding + 1 > limit:
            return False
        limit = q["memory"]
        return not (limit and conn.out_bytes > limit)

    def pump(self, dom: Domain) -> None:
        """Move bytes between a domain's ring and its connection, one request at a time."""
        ring, conn = dom.ring, dom.conn
        if ring is None or conn is None or dom.ignored or conn.closed:
            return
        outer, self._pumping = self._pumping, dom
        try:
            self._pump(dom, ring, conn)
        finally:
            self._pumping = outer
        # Output left over means the ring is full: the guest's kick once it has read (or the
        # periodic scan) brings us back; marking it dirty here would spin.

    def _pump(self, dom: Domain, ring: Ring, conn: Connection) -> None:
        # A request waiting: notify the guest before anything else (C notifies on consuming
        # it), so that its CPU is waking up while we read and answer, and it finds the reply
        # when it gets to look.  Moving this from after the request's header was read to here
        # gained ~5 µs per round trip on 2 CPUs (see PROMPT_HIT for who gets it).
        notify = (
            not dom.prompt and dom.local_port is not None and ring.has_input and self.wants_input(dom, conn)
        )
        if notify:
            self.hv.notify(dom.local_port)
        if not conn.privileged:
            conn.expire_events(self.core.config.watch_event_timeout)
        try:
            if ring.connection == RECONNECT:
                self.core.reset_connection(conn)
                ring.reset()
                ring.connection = 0
                if self.core.journal is not None:
                    self.core.journal.ring_state(dom)
                notify = True
            notify |= self._write(ring, conn)
            parser = conn.parser
            core = self.core
            for again in range(PUMP_ROUNDS):
                found = False
                while ring.has_input and self.wants_input(dom, conn):
                    # One look at everything the guest wrote, cut to one request: the rest of
                    # the message the parser holds, else a header and the payload it announces
                    # (as much of it as is there).  An oversized length takes the header alone,
                    # which the parser refuses.
                    avail = ring.peek()
                    if not avail:
                        break
                    notify = found = True
                    if parser.pending:
                        need = parser.needed()
                    else:
                        need = HEADER_SIZE
                        if len(avail) >= HEADER_SIZE:
                            length = HEADER.unpack_from(avail)[3]
                            if length <= PAYLOAD_MAX:
                                need += length
                    data = avail if len(avail) <= need else avail[:need]
                    # One whole request that needs no parser (a READ or WRITE, mostly): its
                    # reply is queued, so journaled as every ring output is (on_output).
                    reply = answer(core, conn, data)
                    if reply is None:
                        try:
                            msgs = conn.feed(data)
                        except ProtocolError:
                            ring.advance(len(data))  # consumed, as C does, before the error is set
                            raise
                        for msg in msgs:
                            if dom.ignored or conn.closed:
                                return
                            dispatch(core, conn, msg)
                    elif reply:
                        conn.queue_raw(reply)
                    if dom.ignored or conn.closed:
                        return
                    # Consumed only now: the request's effect, its reply and the new input
                    # position reach the journal first, so a crash in between makes the next
                    # process read the request again or deliver its journaled reply.
                    journal = core.journal
                    if journal is not None:
                        cons = (ring.in_cons + len(data)) & 0xFFFFFFFF
                        journal.ring_input(dom, cons, parser.pending_bytes() if parser.pending else b"")
                        journal.flush()
                    ring.advance(len(data))
                    self._write(ring, conn)
                if again:
                    # Did the guest answer our notification before we even looked again?
                    dom.prompt = min(dom.prompt + PROMPT_HIT, PROMPT_MAX) if found else max(dom.prompt - 1, 0)
                if not notify or dom.local_port is None or ring.connection == RECONNECT:
                    break
                # Input exhausted: tell the guest now, then look once more.  A guest that reads
                # the reply and writes its next request while we are still here (it ran on our
                # CPU as soon as the notification woke it) is answered without another wakeup
                # and trip through the event loop; its kicks find an empty ring later.
                self.hv.notify(dom.local_port)
                notify = False
        except RingError as e:
            self._ignore(dom, f"ring index corrupt ({e.detail})")
            notify = True
        except ProtocolError as e:
            ring.set_error(ERROR_PROTO)
            self._ignore(dom, str(e))
            notify = True
        if notify and dom.local_port is not None:
            self.hv.notify(dom.local_port)

    def _write(self, ring: Ring, conn: Connection) -> bool:
        if not conn.has_output():
            return False
        self.core.durable()  # nothing reaches the guest before it is journaled
        n = ring.write(conn.peek_output(RING_SIZE))  # the ring takes what fits
        if n:
            conn.consume_output(n)
        return bool(n)

    def _ignore(self, dom: Domain, why: str) -> None:
        """Stop talking to a misbehaving domain; its record stays until it really dies (XSA-325)."""
        log.warning("dom%d: %s; ignoring it until it is re-introduced or dies", dom.domid, why)
        dom.ignored = True
        self.core.domain_changed(dom)
        if dom.conn is not None:
            self.core.reset_connection(dom.conn)
