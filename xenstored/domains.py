"""Domains: the domain operations (INTRODUCE, RELEASE, quotas, features...) and death handling.

A record (core.Domain) exists for every domain the daemon has dealt with: introduced guests, dom0,
and domains named in quotas or features.  Quotas are copied from the global defaults when the
record is created, so later global changes affect only domains created afterwards (as C-4.22).

Everything here is synchronous: the hypervisor's map/bind/notify calls are quick and never block,
so INTRODUCE completes inside its request.  Moving bytes between a ring and its connection is the
edge's (ringpump.py): this module only tells it, through :attr:`DomainManager.output_ready`, that
a domain has something to send.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from . import paths, perms, quota
from .connection import Connection
from .core import Core, Domain
from .paths import INTRODUCE_DOMAIN, RELEASE_DOMAIN
from .ring import Ring
from .transactions import Transaction
from .wire import (
    DOMID_SELF,
    ERRORS,
    FEATURES_ALL,
    Message,
    XsError,
    atoi,
    parse_domid,
    single_arg,
    split_args,
)

log = logging.getLogger("xenstored.domains")


class DomainState(Protocol):
    """A domain's state as the hypervisor reports it (hypervisor.base.DomainInfo)."""

    shutdown: bool
    crashed: bool
    dying: bool


class Hypervisor(Protocol):
    """The synchronous part of hypervisor.base.Hypervisor that the domain operations call: every
    method returns promptly (INTRODUCE maps and binds inside its request)."""

    def domain_info(self, domid: int) -> DomainState | None: ...
    def map_ring(self, domid: int, gfn: int) -> memoryview: ...
    def unmap_ring(self, domid: int) -> None: ...
    def bind_interdomain(self, domid: int, remote_port: int) -> int: ...
    def unbind(self, local_port: int) -> None: ...
    def notify(self, local_port: int) -> None: ...
    def dom0_ring(self) -> tuple[memoryview, int] | None: ...

OK = b"OK\0"
RECONNECT = 1


class DomainManager:
    """The domain operations and domain death; the introduced domains by local port."""

    def __init__(self, core: Core, hv: Hypervisor) -> None:
        self.core = core
        self.hv = hv
        self.by_port: dict[int, Domain] = {}
        # Set by the edge that moves ring bytes (ringpump.RingPump): this domain has output or a
        # freshly reset ring to look at.
        self.output_ready: Callable[[Domain], None] = _nothing
        # Domains (re)introduced since the last death scan: a scan limited to the domains the
        # hypervisor says changed must look at these too (one may be dying or shut down
        # already, which the last scan saw before it was introduced).
        self._recheck: set[int] = set()
        # Set while a scan runs: one that failed half-way (its hint is spent) makes the next
        # look at every domain, as each scan did before the hint.
        self._rescan_all = False
        core.domain_ops = self
        core.hypervisor = hv

    # ------------------------------------------------------------------------- introduce
    def introduce_dom0(self) -> bool:
        """Serve the store domain's own ring at start (upstream: /proc/xen/xsd_kva).

        Unlike INTRODUCE, the page's indexes are kept, as C xenstored's ``dom0_init`` keeps them:
        dom0's kernel may already have queued requests there.  Any libxenstore client whose
        connect() to our socket is refused (before we listen) falls back to /dev/xen/xenbus, and
        the kernel writes its request into this page and kicks a port nobody has bound yet.
        Zeroing the indexes would drop that request and leave the client blocked for ever
        (xen-init-dom0 hung that way under QEMU).  The first pump answers what is waiting."""
        found = self.hv.dom0_ring()
        if found is None:
            return False
        view, remote = found
        dom = self.core.domain(self.core.priv_domid)
        ring = Ring(view)
        if ring.evtchn_port:
            remote = ring.evtchn_port
        local = self.hv.bind_interdomain(dom.domid, remote)
        dom.ignored = False
        dom.shutdown_reported = False
        self._recheck.add(dom.domid)
        ring.features = dom.features
        # (A reconnection the kernel asked for before we ran is the pump's handshake, as always.)
        self._attach(dom, ring, remote, local, 0)
        if self.core.journal is not None:
            self.core.journal.ring_attached(dom)
        self.hv.notify(local)
        return True

    def _attach(self, dom: Domain, ring: Ring, remote_port: int, local: int, gfn: int) -> Connection:
        """Give an introduced (or restored) domain its ring connection on ``local``."""
        conn = self.core.new_connection(dom.domid, socket=False)
        conn.wakeup = lambda: self.output_ready(dom)
        dom.conn, dom.ring, dom.port, dom.local_port, dom.gfn = conn, ring, remote_port, local, gfn
        dom.introduced = True
        self._recheck.add(dom.domid)
        self.by_port[local] = dom
        self.core.domain_changed(dom)
        self.output_ready(dom)
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
        self.core.domain_changed(dom)
        if self.core.journal is not None:
            self.core.journal.ring_attached(dom)
        self.hv.notify(local)
        self.output_ready(dom)

    def _connect(self, dom: Domain, view: memoryview, remote_port: int, gfn: int) -> None:
        ring = Ring(view)
        if ring.evtchn_port:  # dom0less: Xen filled in the port (C-4.21+)
            remote_port = ring.evtchn_port
        local = self.hv.bind_interdomain(dom.domid, remote_port)
        self._attach(dom, ring, remote_port, local, gfn)
        self._reset_ring(dom, ring, local)

    def restore_ring(
        self,
        domid: int,
        gfn: int,
        remote_port: int,
        local_port: int,
        *,
        ignored: bool,
        shutdown_reported: bool,
        target: int | None,
        rebind: bool,
    ) -> Connection | None:
        """Re-attach a ring connection from a state stream, keeping the ring's indexes so traffic
        in flight carries on.  ``rebind``: the event channel must be bound again (a restart, or
        an emulated channel); after a live update on real Xen the inherited binding stays."""
        if self.hv.domain_info(domid) is None:
            log.info("dom%d from the saved state no longer exists", domid)
            return None
        dom = self.core.domain(domid)
        ring = Ring(self.hv.map_ring(domid, gfn))
        local = self.hv.bind_interdomain(domid, remote_port) if rebind else local_port
        dom.ignored, dom.shutdown_reported, dom.target = ignored, shutdown_reported, target
        return self._attach(dom, ring, remote_port, local, gfn)

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
            self.core.reset_connection(dom.conn)
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
        self._recheck.add(dom.domid)  # still shut down: the next scan reports it again
        self.core.domain_changed(dom)
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
        self.core.domain_changed(dom)
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
        self.core.domain_changed(dom)
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
        if len(args) == 2:
            self.core.settings_changed()
        else:
            self.core.domain_changed(self._existing(args[0]))
        return OK

    # ------------------------------------------------------------------------- death
    def on_dom_exc(self) -> None:
        """VIRQ_DOM_EXC: find domains that shut down (report once) or died (clean up).

        When the hypervisor says which domains changed (the emulated one does; Xen's VIRQ does
        not), only those are looked at, with the records created and the domains (re)introduced
        since the last scan, whose state that scan could not see: a domain's creation or death
        then costs O(1), not a look at each of 1,000 domains.  Otherwise, every domain."""
        core = self.core
        changed_domains = getattr(self.hv, "changed_domains", None)
        changed: set[int] | None = changed_domains() if changed_domains is not None else None
        if self._rescan_all:
            changed = None
        self._rescan_all = True
        if changed is None:
            scan = list(core.domains.values())
        else:
            changed |= self._recheck
            scan = [dom for d in sorted(changed) if (dom := core.domains.get(d)) is not None]
        self._recheck.clear()
        for dom in scan:
            if not dom.introduced or dom.domid == core.priv_domid:
                continue
            info = self.hv.domain_info(dom.domid)
            if info is None or info.dying:
                self.destroy(dom, "died" if info is None else "dying")
            elif (info.shutdown or info.crashed) and not dom.shutdown_reported:
                dom.shutdown_reported = True
                core.domain_changed(dom)
                log.info("dom%d %s", dom.domid, "crashed" if info.crashed else "shut down")
                core.fire_special(RELEASE_DOMAIN, dom.domid)
        # Domains known only from permissions, quotas or features: when they are gone, so are
        # their permission entries and nodes (XSA-417), then the record.
        if changed is None:
            known = [d for d, dom in core.domains.items() if not dom.introduced]
        else:
            candidates = sorted(changed | core.new_domains)
            known = [d for d in candidates if (dom := core.domains.get(d)) is not None and not dom.introduced]
        core.new_domains.clear()
        for domid in known:
            if domid != core.priv_domid and self.hv.domain_info(domid) is None:
                self.remove_domain_nodes(domid)
                core.forget_domain(domid)
        self._rescan_all = False

    def destroy(self, dom: Domain, why: str) -> None:
        """Forget a domain: its connection, its nodes (events fire), permission entries naming it,
        then ``@releaseDomain``.  A later domain reusing the id inherits nothing."""
        core = self.core
        log.info("dom%d %s: cleaning up", dom.domid, why)
        conn = dom.conn
        if conn is not None:
            core.close_connection(conn)
        if dom.local_port is not None:
            self.by_port.pop(dom.local_port, None)
            self.hv.unbind(dom.local_port)
        if dom.ring is not None:
            dom.ring.release()
            self.hv.unmap_ring(dom.domid)
        dom.conn = dom.ring = None
        dom.introduced = False
        self.remove_domain_nodes(dom.domid)
        core.forget_domain(dom.domid)
        core.fire_special(RELEASE_DOMAIN, dom.domid)

    def remove_domain_nodes(self, domid: int) -> None:
        """Delete the nodes a dead domain owns (or give them to the privileged domain with
        --keep-orphans) and strip entries naming it from everyone else's permissions."""
        core = self.core
        store = core.store
        txn = Transaction(store, implicit=True)
        priv = core.priv_domid
        keep = core.config.keep_orphans
        strip: dict[perms.Perms, perms.Perms | None] = {}
        # The nodes naming the domain, from the store's index (not a walk of the whole tree:
        # a release must not cost more with every other guest's nodes), parents first, each
        # with its record.  Each path comes once: one the transaction wrote already went with
        # an owned subtree above it.
        writes = txn.writes
        for path, rec in sorted(store.naming(domid)):
            if path in writes:
                continue
            node_perms = store.record_perms(rec)
            if node_perms[0].domid == domid and path != paths.ROOT:
                if keep:
                    txn.put(path, store.record_value(rec), perms.with_owner(node_perms, priv), existed=True)
                else:
                    txn.remove_tree(path)
            else:
                # Nodes share a few permission lists: strip each list once, so that the nodes
                # sharing it share the result too (the commit numbers a list once per run).
                if node_perms in strip:
                    stripped = strip[node_perms]
                else:
                    stripped = strip[node_perms] = perms.without_domain(node_perms, domid)
                if stripped is not None:
                    txn.put(path, store.record_value(rec), stripped, existed=True)
        for name, sp in list(core.special_perms.items()):
            stripped = perms.without_domain(sp, domid)
            if stripped is not None:
                core.set_special_perms(name, stripped)
        core.commit(txn)


def _nothing(dom: Domain) -> None:
    pass


__all__ = ["ERRORS", "Domain", "DomainManager"]
