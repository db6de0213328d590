"""Domains: their records, the domain operations, ring pumping and death handling.

A record exists for every domain the daemon has dealt with: introduced guests, dom0, and domains
named in quotas or features.  Quotas are copied from the global defaults when the record is
created, so later global changes affect only domains created afterwards (as C-4.22).

Everything here is synchronous: the hypervisor's map/bind/notify calls are quick and never block,
so INTRODUCE completes inside its request.  The trio edge (server.py) only calls
:meth:`DomainManager.pump` when a port is kicked or a connection has output.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import paths, perms, quota
from .paths import INTRODUCE_DOMAIN, RELEASE_DOMAIN
from .quota import Quotas
from .ring import Ring, RingError
from .transactions import Transaction
from .wire import (
    DOMID_SELF,
    ERRORS,
    FEATURES_ALL,
    HEADER,
    HEADER_SIZE,
    PAYLOAD_MAX,
    Message,
    ProtocolError,
    XsError,
    atoi,
    parse_domid,
    single_arg,
    split_args,
)

if TYPE_CHECKING:
    from .connection import Connection
    from .core import Core
    from .hypervisor import Hypervisor
    from .migration import RingData

log = logging.getLogger("xenstored.domains")

OK = b"OK\0"
RECONNECT = 1
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


class Domain:
    def __init__(self, domid: int, quotas: Quotas) -> None:
        self.domid = domid
        self.quotas = quotas
        self.features = FEATURES_ALL
        self.target: int | None = None
        self.conn: Connection | None = None  # ring connection once introduced
        self.ring: Ring | None = None
        self.introduced = False
        self.shutdown_reported = False
        self.port: int | None = None  # remote event channel port given at INTRODUCE
        self.local_port: int | None = None
        self.gfn = 0
        # Misbehaved (bad ring index, oversized request): the error field is set and nothing is
        # read or written until the domain dies or the toolstack re-introduces it.
        self.ignored = False
        self.prompt = 0  # see domains.PROMPT_HIT: high while the guest answers notifications at once

    def __repr__(self) -> str:
        return f"<Domain {self.domid}{' introduced' if self.introduced else ''}>"


class DomainManager:
    """The domain operations and the per-domain ring pumps."""

    def __init__(self, core: Core, hv: Hypervisor) -> None:
        self.core = core
        self.hv = hv
        self.by_port: dict[int, Domain] = {}
        self._dirty: dict[int, Domain] = {}
        self._pumping: Domain | None = None
        self.wakeup = lambda: None  # set by the edge: a connection has output to flush
        core.domain_ops = self
        core.hypervisor = hv

    # ------------------------------------------------------------------------- introduce
    def introduce_dom0(self) -> bool:
        """Introduce the store domain's own ring at start (upstream: /proc/xen/xsd_kva)."""
        found = self.hv.dom0_ring()
        if found is None:
            return False
        view, remote = found
        self._connect(self.core.domain(self.core.priv_domid), view, remote, 0)
        return True

    def _attach(self, dom: Domain, ring: Ring, remote_port: int, local: int, gfn: int) -> Connection:
        """Give an introduced (or restored) domain its ring connection on ``local``."""
        conn = self.core.new_connection(dom.domid, socket=False)
        conn.wakeup = lambda: self._mark(dom)
        dom.conn, dom.ring, dom.port, dom.local_port, dom.gfn = conn, ring, remote_port, local, gfn
        dom.introduced = True
        self.by_port[local] = dom
        self._mark(dom)
        return conn

    def _reset_ring(self, dom: Domain, ring: Ring, local: int) -> None:
        """What INTRODUCE does to the page, first time or again: features, all four indexes and
        the error field back to 0, a pending reconnection acknowledged, the guest notified."""
        dom.ignored = False
        dom.shutdown_reported = False
        ring.features = dom.features
        ring.reset()
        ring.set_error(0)
        if ring.connection == RECONNECT:
            ring.connection = 0
        self.hv.notify(local)
        self._mark(dom)

    def _connect(self, dom: Domain, view: memoryview, remote_port: int, gfn: int) -> None:
        ring = Ring(view)
        if ring.evtchn_port:  # dom0less: Xen filled in the port (C-4.21+)
            remote_port = ring.evtchn_port
        local = self.hv.bind_interdomain(dom.domid, remote_port)
        self._attach(dom, ring, remote_port, local, gfn)
        self._reset_ring(dom, ring, local)

    def restore_ring(self, r: RingData, *, target: int | None, rebind: bool) -> Connection | None:
        """Re-attach a ring connection from a state stream, keeping the ring's indexes so traffic
        in flight carries on.  ``rebind``: the event channel must be bound again (a restart, or
        an emulated channel); after a live update on real Xen the inherited binding stays."""
        if self.hv.domain_info(r.domid) is None:
            log.info("dom%d from the saved state no longer exists", r.domid)
            return None
        dom = self.core.domain(r.domid)
        ring = Ring(self.hv.map_ring(r.domid, r.gfn))
        local = self.hv.bind_interdomain(r.domid, r.remote_port) if rebind else r.local_port
        dom.ignored, dom.shutdown_reported, dom.target = r.ignored, r.shutdown_reported, target
        return self._attach(dom, ring, r.remote_port, local, r.gfn)

    def introduce(self, conn: Connection, msg: Message) -> bytes:
        args = split_args(msg.payload)
        if len(args) < 3:
            raise XsError("EINVAL", "INTRODUCE wants domid, gfn and port")
        domid = parse_domid(args[0])
        gfn = atoi(args[1]) & 0xFFFFFFFFFFFFFFFF
        port = atoi(args[2])
        if port <= 0:
            raise XsError("EINVAL", "bad event channel port")
        if self.hv.domain_info(domid) is None:
            raise XsError("EINVAL", "no such domain")
        dom = self.core.domain(domid)
        if dom.introduced:
            # Re-introduction (resume, restore, or reviving an ignored domain): rebind and reset.
            assert dom.conn is not None and dom.local_port is not None
            dom.conn.reset()
            self.by_port.pop(dom.local_port, None)
            self.hv.unbind(dom.local_port)
            ring = dom.ring
            assert ring is not None
            if ring.evtchn_port:
                port = ring.evtchn_port
            local = self.hv.bind_interdomain(domid, port)
            dom.port, dom.local_port = port, local
            self.by_port[local] = dom
            self._reset_ring(dom, ring, local)
            log.info("dom%d re-introduced (port %d)", domid, port)
            return OK
        view = self.hv.map_ring(domid, gfn)
        try:
            self._connect(dom, view, port, gfn)
        except BaseException:
            self.hv.unmap_ring(domid)
            raise
        log.info("dom%d introduced (port %d)", domid, port)
        if domid != self.core.priv_domid:
            self.core.fire_special(INTRODUCE_DOMAIN, domid)
        return OK

    def _introduced(self, raw: bytes) -> Domain:
        domid = parse_domid(raw)
        dom = self.core.domains.get(domid)
        if dom is None or not dom.introduced:
            raise XsError("ENOENT", "domain not introduced")
        if domid == self.core.priv_domid:
            raise XsError("EINVAL", "the privileged domain")
        return dom

    def release(self, conn: Connection, msg: Message) -> bytes:
        dom = self._introduced(single_arg(msg.payload))
        self.destroy(dom, "released")
        return OK

    def resume(self, conn: Connection, msg: Message) -> bytes:
        dom = self._introduced(single_arg(msg.payload))
        dom.shutdown_reported = False
        return OK

    def is_domain_introduced(self, conn: Connection, msg: Message) -> bytes:
        domid = parse_domid(single_arg(msg.payload))
        dom = self.core.domains.get(domid)
        return b"T\0" if domid == DOMID_SELF or (dom is not None and dom.introduced) else b"F\0"

    def set_target(self, conn: Connection, msg: Message) -> bytes:
        args = split_args(msg.payload)
        if len(args) != 2:
            raise XsError("EINVAL", "SET_TARGET wants two domain ids")
        domid, tdomid = parse_domid(args[0]), parse_domid(args[1])
        dom = self.core.domains.get(domid)
        tdom = self.core.domains.get(tdomid)
        if dom is None or tdom is None or not dom.introduced or not tdom.introduced:
            raise XsError("ENOENT", "domain not introduced")
        dom.target = tdomid
        return OK

    # ------------------------------------------------------------------------- features, quotas
    def _existing(self, raw: bytes) -> Domain:
        domid = parse_domid(raw)
        if self.hv.domain_info(domid) is None:
            raise XsError("ENOENT", "no such domain")
        return self.core.domain(domid)

    def get_feature(self, conn: Connection, msg: Message) -> bytes:
        args = split_args(msg.payload)
        if not msg.payload:
            return f"{conn.domain.features if not conn.is_socket else FEATURES_ALL}\0".encode()
        if not conn.privileged:
            raise XsError("EACCES")
        if len(args) != 1:
            raise XsError("EINVAL")
        return f"{self._existing(args[0]).features}\0".encode()

    def set_feature(self, conn: Connection, msg: Message) -> bytes:
        args = split_args(msg.payload)
        if len(args) != 2:
            raise XsError("EINVAL")
        dom = self._existing(args[0])
        if dom.introduced:
            raise XsError("EBUSY", "features are fixed at introduction")
        value = atoi(args[1])
        if value < 0 or value & ~FEATURES_ALL:
            raise XsError("EINVAL", "unsupported feature bits")
        dom.features = value
        return OK

    def get_quota(self, conn: Connection, msg: Message) -> bytes:
        args = split_args(msg.payload)
        if not args:
            return (" ".join(quota.NAMES) + "\0").encode()
        if len(args) == 1:
            name = quota.canonical_name(args[0].decode("latin-1"))
            return f"{self.core.config.quotas[name]}\0".encode()
        if len(args) == 2:
            dom = self._existing(args[0])
            name = quota.canonical_name(args[1].decode("latin-1"))
            return f"{dom.quotas[name]}\0".encode()
        raise XsError("EINVAL")

    def set_quota(self, conn: Connection, msg: Message) -> bytes:
        args = split_args(msg.payload)
        if len(args) == 2:
            target = self.core.config.quotas
            name, raw = args
        elif len(args) == 3:
            target = self._existing(args[0]).quotas
            name, raw = args[1], args[2]
        else:
            raise XsError("EINVAL")
        value = atoi(raw)
        if value < 0 or value >= 0xFFFFFFFF:
            raise XsError("EINVAL")
        target.set(name.decode("latin-1"), value)
        return OK

    # ------------------------------------------------------------------------- ring pumping
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
        for dom in list(self.by_port.values()):
            self.pump(dom)

    def on_port_kicked(self, port: int) -> None:
        dom = self.by_port.get(port)
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
                conn.reset()
                ring.reset()
                ring.connection = 0
                notify = True
            notify |= self._write(ring, conn)
            parser = conn.parser
            for again in range(PUMP_ROUNDS):
                found = False
                while ring.has_input and self.wants_input(dom, conn):
                    data = ring.read(parser.needed())
                    if not data:
                        break
                    notify = found = True
                    if len(data) == HEADER_SIZE and not parser.pending:
                        # A whole header: take the payload it announces in the same breath, so
                        # a request costs one feed.  Exactly the bytes the header-then-payload
                        # reads would consume; an oversized length reads nothing more and the
                        # parser refuses the header as before.
                        length = HEADER.unpack_from(data)[3]
                        if 0 < length <= PAYLOAD_MAX:
                            data += ring.read(length)
                    conn.feed(data)
                    if dom.ignored or conn.closed:
                        return
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

    @staticmethod
    def _write(ring: Ring, conn: Connection) -> bool:
        if not conn.has_output():
            return False
        n = ring.write(conn.peek_output(ring.writable))
        if n:
            conn.consume_output(n)
        return bool(n)

    def _ignore(self, dom: Domain, why: str) -> None:
        """Stop talking to a misbehaving domain; its record stays until it really dies (XSA-325)."""
        log.warning("dom%d: %s; ignoring it until it is re-introduced or dies", dom.domid, why)
        dom.ignored = True
        if dom.conn is not None:
            dom.conn.reset()

    # ------------------------------------------------------------------------- death
    def on_dom_exc(self) -> None:
        """VIRQ_DOM_EXC: find domains that shut down (report once) or died (clean up)."""
        for dom in list(self.core.domains.values()):
            if not dom.introduced or dom.domid == self.core.priv_domid:
                continue
            info = self.hv.domain_info(dom.domid)
            if info is None or info.dying:
                self.destroy(dom, "died" if info is None else "dying")
            elif (info.shutdown or info.crashed) and not dom.shutdown_reported:
                dom.shutdown_reported = True
                log.info("dom%d %s", dom.domid, "crashed" if info.crashed else "shut down")
                self.core.fire_special(RELEASE_DOMAIN, dom.domid)
        # Domains known only from permissions, quotas or features: when they are gone, so are
        # their permission entries and nodes (XSA-417), then the record.
        for domid in [d for d, dom in self.core.domains.items() if not dom.introduced]:
            if domid != self.core.priv_domid and self.hv.domain_info(domid) is None:
                self.remove_domain_nodes(domid)
                del self.core.domains[domid]

    def destroy(self, dom: Domain, why: str) -> None:
        """Forget a domain: its connection, its nodes (events fire), permission entries naming it,
        then ``@releaseDomain``.  A later domain reusing the id inherits nothing."""
        core = self.core
        log.info("dom%d %s: cleaning up", dom.domid, why)
        conn = dom.conn
        if conn is not None:
            core.watches.remove_all(conn)
            conn.close()
        if dom.local_port is not None:
            self.by_port.pop(dom.local_port, None)
            self.hv.unbind(dom.local_port)
        if dom.ring is not None:
            dom.ring.release()
            self.hv.unmap_ring(dom.domid)
        self._dirty.pop(dom.domid, None)
        dom.conn = dom.ring = None
        dom.introduced = False
        self.remove_domain_nodes(dom.domid)
        core.domains.pop(dom.domid, None)
        core.fire_special(RELEASE_DOMAIN, dom.domid)

    def remove_domain_nodes(self, domid: int) -> None:
        """Delete the nodes a dead domain owns (or give them to the privileged domain with
        --keep-orphans) and strip entries naming it from everyone else's permissions."""
        core = self.core
        store = core.store
        txn = Transaction(store, implicit=True)
        priv = core.priv_domid
        keep = core.config.keep_orphans
        stack = [paths.ROOT]
        while stack:
            path = stack.pop()
            node = store.get(path)
            if node is None:
                continue
            if node.owner == domid and path != paths.ROOT:
                if keep:
                    txn.put(path, node.value, perms.with_owner(node.perms, priv), existed=True)
                else:
                    txn.remove_tree(path)
                    continue
            else:
                stripped = perms.without_domain(node.perms, domid)
                if stripped is not None:
                    txn.put(path, node.value, stripped, existed=True)
            stack.extend(paths.join(path, n) for n in store.child_names(path))
        for name, sp in list(core.special_perms.items()):
            stripped = perms.without_domain(sp, domid)
            if stripped is not None:
                core.special_perms[name] = stripped
        core.commit(txn)


__all__ = ["ERRORS", "Domain", "DomainManager"]
