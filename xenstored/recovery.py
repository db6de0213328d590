"""Start-up recovery from the journal: the one path by which the daemon starts after a crash,
a ``kill -9``, a ``systemctl restart`` or a clean stop (a fresh start is recovery from nothing).

The journal (journal.py) gives back what the dead process had acknowledged; this module puts it
into a fresh daemon state: the tree, the settings, the domain records, and for every introduced
guest its ring page mapped again, its event channel bound again to the guest's own remote port
(kept in the journal, never read from ``store/port`` in the tree), the watches it had, the
transaction ids it had used, the reply bytes it had not received yet and the partial request it
had sent.  Transactions open at the crash do not survive: the guest's next request on one gets
EAGAIN.  A guest that died while no daemon ran is released afterwards, ``@releaseDomain`` and all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from . import paths, quota
from .core import Core
from .domains import DomainManager
from .journal import Recovered
from .perms import Perm
from .ring import RING_SIZE
from .watches import Watch

log = logging.getLogger("xenstored.recovery")

_MASK = 0xFFFFFFFF


@dataclass
class Report:
    nodes: int = 0
    domains: int = 0
    rings: int = 0
    watches: int = 0
    dead: list[int] | None = None
    seconds: float = 0.0


def apply(core: Core, manager: DomainManager, rec: Recovered) -> tuple[Report, list[int]]:
    """Install ``rec`` into a fresh ``core``; returns the report and the domains that died while
    the daemon was down (the caller destroys them once the journal records again)."""
    start = time.perf_counter()
    report = Report()
    if rec.settings is not None:
        for name, value in rec.settings.get("quotas", {}).items():
            if name in quota.DEFAULTS or name in quota.ALIASES:
                core.config.quotas.set(name, value)
        for name, entries in rec.settings.get("special", {}).items():
            if name in core.special_perms and entries:
                core.special_perms[name] = tuple(_perm(e) for e in entries)
    orphans = core.store.load(rec.nodes)
    if orphans:
        log.warning("recovery: %d nodes without a parent left out (first: %s)", len(orphans), orphans[0])
    report.nodes = len(rec.nodes) - len(orphans)
    dead: list[int] = []
    for domid, m in sorted(rec.domains.items()):
        dom = core.domain(domid)
        dom.features = m.get("feat", dom.features)
        for name, value in m.get("quotas", {}).items():
            if name in quota.DEFAULTS or name in quota.ALIASES:
                dom.quotas.set(name, value)
        dom.target = m.get("target")
        dom.shutdown_reported = bool(m.get("sr"))
        report.domains += 1
        if not m.get("intro"):
            continue
        conn = manager.restore_ring(
            domid,
            m.get("gfn") or 0,
            m.get("port") or 0,
            m.get("lport") or 0,
            ignored=bool(m.get("ign")),
            shutdown_reported=dom.shutdown_reported,
            target=dom.target,
            rebind=True,
        )
        if conn is None:
            dead.append(domid)
            continue
        report.rings += 1
        ring = dom.ring
        assert ring is not None
        tx = rec.transactions.get(domid)
        if tx is not None:
            conn.restore_transaction_ids(tx.get("next", 1), set(tx.get("open", ())))
        pos = rec.ring_in.get(domid)
        if pos is not None:
            cons, pending = pos
            ahead = (cons - ring.in_cons) & _MASK
            if 0 < ahead <= RING_SIZE:
                # The dead process journaled a request's effect and reply but died before it
                # moved req_cons: the request is done, do not read it again.
                ring.in_cons = cons
            if pending:
                conn.feed(pending)  # a partial request: the parser keeps it, nothing completes
        conn.queue_raw(_unsent(rec.ring_out.get(domid, []), ring.out_prod))
    for (domid, cpath, token), (path, depth) in rec.watches.items():
        dom = core.domains.get(domid)
        if dom is None or dom.conn is None:
            continue
        relative = paths.is_relative(path)
        core.watches.add(Watch(dom.conn, path, cpath, token, depth, relative))
        report.watches += 1
    for domid in dead:
        # Destroyed while no daemon ran: keep the record as introduced, so that releasing it
        # (nodes, permissions, @releaseDomain) takes the usual path.
        core.domain(domid).introduced = True
    report.dead = dead
    report.seconds = time.perf_counter() - start
    return report, dead


def _perm(entry: list) -> Perm:
    return Perm(int(entry[0]), int(entry[1]), bool(entry[2]))


def _unsent(chunks: list[tuple[int, bytes]], written: int) -> bytes:
    """The journaled output bytes the guest's ring does not have yet: ``written`` is the ring's
    ``rsp_prod``, the stream position up to which the dead process got."""
    out = bytearray()
    for pos, data in chunks:
        behind = (written - pos) & _MASK  # how far the ring already is past this chunk's start
        if behind < 1 << 31:
            if behind < len(data):
                out += data[behind:]
        else:
            out += data
    return bytes(out)


__all__ = ["Report", "apply"]
