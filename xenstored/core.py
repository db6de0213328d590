"""The daemon's state: store, watches, domains, connections, quotas; and watch-event dispatch.

Plain Python: ops.py mutates it on behalf of one request at a time, the trio edges only move
bytes in and out of connections.  What lives above (the domain manager, the hypervisor, the
tracer, live update) is reached through the small protocols declared here and installed by the
layers that own them, so this module imports nothing above itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, TextIO

from . import paths, perms
from .config import Config
from .connection import Connection
from .metrics import DomainState, Metrics, State
from .paths import INTRODUCE_DOMAIN, RELEASE_DOMAIN
from .perms import Perm, Perms
from .quota import Quotas, RefusalLog
from .ring import Ring
from .store import Store
from .transactions import Change, LiveView, Transaction
from .watches import Watch, WatchRegistry
from .wire import DOMID_ANY, FEATURES_ALL, HEADER, Message

log = logging.getLogger("xenstored")


class Domain:
    """What the daemon knows of one domain: quotas, features, target, and once it is introduced
    its ring connection and event channel."""

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
        self.prompt = 0  # see ringpump.PROMPT_HIT: high while the guest answers notifications at once

    def __repr__(self) -> str:
        return f"<Domain {self.domid}{' introduced' if self.introduced else ''}>"


class DomainDirectory(Protocol):
    """The one hypervisor question the daemon state asks: does this domain exist?"""

    def domain_info(self, domid: int) -> object | None: ...


class DomainOps(Protocol):
    """The domain operations (domains.DomainManager), each ``(conn, msg) -> reply payload``."""

    def introduce(self, conn: Connection, msg: Message) -> bytes: ...
    def release(self, conn: Connection, msg: Message) -> bytes: ...
    def resume(self, conn: Connection, msg: Message) -> bytes: ...
    def is_domain_introduced(self, conn: Connection, msg: Message) -> bytes: ...
    def set_target(self, conn: Connection, msg: Message) -> bytes: ...
    def get_feature(self, conn: Connection, msg: Message) -> bytes: ...
    def set_feature(self, conn: Connection, msg: Message) -> bytes: ...
    def get_quota(self, conn: Connection, msg: Message) -> bytes: ...
    def set_quota(self, conn: Connection, msg: Message) -> bytes: ...


class Tracer(Protocol):
    """C's trace file and O's access log (logs.Tracer)."""

    trace_on: bool
    trace: TextIO | None

    def request(self, conn: Connection, type_: int, tx_id: int, payload: bytes) -> None: ...
    def reply(self, conn: Connection, type_: int, tx_id: int, payload: bytes) -> None: ...
    def connection(self, conn: Connection, opened: bool) -> None: ...
    def reopen(self, trace_path: str | None = None) -> None: ...


class Journal(Protocol):
    """The write-ahead journal (journal.Journal), as the daemon state drives it: each hook
    records a change, :meth:`flush` makes the recorded changes durable before the edges let
    anyone see them."""

    dirty: bool

    def domain_changed(self, dom: Domain) -> None: ...
    def domain_gone(self, domid: int) -> None: ...
    def settings_changed(self) -> None: ...
    def watch_added(self, conn: Connection, w: Watch) -> None: ...
    def watch_removed(self, conn: Connection, w: Watch) -> None: ...
    def watches_cleared(self, conn: Connection) -> None: ...
    def transactions_changed(self, conn: Connection) -> None: ...
    def ring_attached(self, dom: Domain) -> None: ...
    def ring_state(self, dom: Domain) -> None: ...
    def ring_input(self, dom: Domain, cons: int, pending: bytes) -> None: ...
    def flush(self) -> None: ...


# XS_CONTROL live-update: (requester, request, words) -> reply, or None when it is withheld.
LiveUpdateHandler = Callable[[Connection, Message, list[str]], "bytes | None"]


class Core:
    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.store = Store()
        self.live_view = LiveView(self.store)
        self.watches = WatchRegistry()
        self.refusals = RefusalLog()
        self.metrics = Metrics()  # counters the dispatcher bumps; gauges come from metrics_state
        self.domains: dict[int, Domain] = {}
        # Records created since the last domain-state scan (VIRQ_DOM_EXC): a scan that the
        # hypervisor tells which domains changed looks at these too (DomainManager.on_dom_exc).
        self.new_domains: set[int] = set()
        self.connections: dict[int, Connection] = {}
        self.priv_domid = self.config.priv_domid
        owner = perms.owner_only(self.priv_domid)
        # Special paths are not nodes below '/': their permissions live here (C-4.19+ records).
        self.special_perms: dict[str, Perms] = {
            INTRODUCE_DOMAIN: owner,
            RELEASE_DOMAIN: owner + (Perm(DOMID_ANY, perms.READ),),
        }
        # Hooks the domain layer installs (hypervisor access); None when only sockets are served.
        self.hypervisor: DomainDirectory | None = None
        self.domain_ops: DomainOps | None = None
        # Set by the service (process-level features the sans-I/O core cannot do itself).
        self.socket_fds: dict[int, int] = {}
        self.live_update: LiveUpdateHandler | None = None
        self.reopen_logs: Callable[[], None] | None = None
        self.open_tracer: Callable[[], Tracer] | None = None  # CONTROL logfile without -T
        self._tracer: Tracer | None = None  # when a trace file or access log is configured
        self.journal: Journal | None = None  # installed by journal.Journal.open
        self._initial_tree(owner)

    @property
    def tracer(self) -> Tracer | None:
        return self._tracer

    @tracer.setter
    def tracer(self, tracer: Tracer | None) -> None:
        """Every connection traces its own replies: tell each of them (an admin action)."""
        self._tracer = tracer
        for conn in self.connections.values():
            conn.tracer = tracer

    def _initial_tree(self, owner: Perms) -> None:
        txn = Transaction(self.store, implicit=True)
        txn.put("/", b"", owner, existed=True)
        txn.put("/tool", b"", owner, existed=False)
        txn.put("/tool/xenstored", b"", owner, existed=False)
        txn.commit()

    # ------------------------------------------------------------------------- domains
    def domain(self, domid: int) -> Domain:
        """The record for ``domid``, created with the current global quotas on first use."""
        dom = self.domains.get(domid)
        if dom is None:
            dom = Domain(domid, self.config.quotas.copy())
            self.domains[domid] = dom
            self.new_domains.add(domid)
            self.domain_changed(dom)
        return dom

    # ------------------------------------------------------------------------- durability
    def domain_changed(self, dom: Domain) -> None:
        """A domain record changed (introduction, target, features, quotas, state): journal it."""
        if self.journal is not None:
            self.journal.domain_changed(dom)

    def forget_domain(self, domid: int) -> None:
        if self.domains.pop(domid, None) is not None and self.journal is not None:
            self.journal.domain_gone(domid)
        self.metrics.forget(domid)
        self.refusals.forget(domid)

    def settings_changed(self) -> None:
        """Global quotas or a special path's permissions changed."""
        if self.journal is not None:
            self.journal.settings_changed()

    def set_special_perms(self, name: str, node_perms: Perms) -> None:
        self.special_perms[name] = node_perms
        self.settings_changed()

    def transactions_changed(self, conn: Connection) -> None:
        """A ring connection started or ended a transaction: its ids must outlive a crash."""
        if self.journal is not None and not conn.is_socket:
            self.journal.transactions_changed(conn)

    def durable(self) -> None:
        """Before the edges make anything visible (a socket send, a ring write, a ring's input
        consumed): what was recorded reaches the journal first."""
        journal = self.journal
        if journal is not None and journal.dirty:
            journal.flush()

    # ------------------------------------------------------------------------- watches
    def add_watch(self, conn: Connection, w: Watch) -> None:
        self.watches.add(w)
        if self.journal is not None and not conn.is_socket:
            self.journal.watch_added(conn, w)

    def remove_watch(self, conn: Connection, cpath: str, token: str) -> None:
        """Raises XsError(ENOENT) for a watch that does not exist."""
        w = self.watches.remove(conn, cpath, token)
        if self.journal is not None and not conn.is_socket:
            self.journal.watch_removed(conn, w)

    def remove_all_watches(self, conn: Connection) -> None:
        self.watches.remove_all(conn)
        if self.journal is not None and not conn.is_socket:
            self.journal.watches_cleared(conn)

    def mark_stale(self, node_perms: Perms) -> Perms:
        """Flag entries naming domains the hypervisor does not know (XSA-322/417): they are
        listed but grant nothing, so a future domain reusing the id inherits no access."""
        hv = self.hypervisor
        if hv is None:
            return node_perms
        for i in range(1, len(node_perms)):
            p = node_perms[i]
            if p.domid != DOMID_ANY and not p.ignore and hv.domain_info(p.domid) is None:
                break
        else:
            return node_perms  # nothing to mark (the usual case): the same list, not a copy
        out = tuple(
            p if i == 0 or p.domid == DOMID_ANY or hv.domain_info(p.domid) is not None else Perm(p.domid, p.access, True)
            for i, p in enumerate(node_perms)
        )
        return out

    def domain_usage(self, dom: Domain) -> dict[str, int]:
        """What a domain currently uses of each quota (CONTROL quota <domid>, GET_QUOTA)."""
        conn = dom.conn
        return {
            "nodes": self.store.owned.get(dom.domid, 0),
            "watches": self.watches.count_of(conn) if conn else 0,
            "transactions": len(conn.transactions) if conn else 0,
            "outstanding": conn.outstanding if conn else 0,
            "memory": self.memory_usage(conn) if conn else self.store.owned_bytes.get(dom.domid, 0),
        }

    def memory_usage(self, conn: Connection) -> int:
        """Bytes a domain holds in the daemon: its nodes, its watches and its queued output."""
        pending = sum(t.mem for t in conn.transactions.values())
        return self.store.owned_bytes.get(conn.domid, 0) + self.watches.bytes.get(conn, 0) + conn.out_bytes + pending

    def metrics_state(self) -> State:
        """The gauges at this moment (xenstore-control stats, the metrics file): one pass over
        domains and connections, nothing kept between two looks."""
        store = self.store
        owned, owned_bytes = store.owned, store.owned_bytes
        closed = self.metrics.closed_requests
        doms = {
            d: DomainState(requests=closed.get(d, 0), nodes=owned.get(d, 0), memory=owned_bytes.get(d, 0))
            for d in self.domains
        }
        state = State(domains=doms, refusals=dict(self.refusals.counts))
        state.rings = sum(1 for dom in self.domains.values() if dom.ring is not None)
        watch_count = self.watches.count_of
        for conn in self.connections.values():
            s = doms.get(conn.domid)
            if s is None:
                s = doms[conn.domid] = DomainState()
            s.requests += conn.requests
            if conn.is_socket:
                state.socket_connections += 1
            else:
                state.ring_connections += 1
                s.memory = self.memory_usage(conn)  # what the memory quota charges a ring domain
            s.watches += watch_count(conn)
            s.transactions += len(conn.transactions)
            s.queued_bytes += conn.out_bytes
            s.queued_events += len(conn._event_times)  # unread events of unprivileged domains
        return state

    def note_domains(self, node_perms: Perms) -> None:
        """Give every live domain named in a permission list a record (XSA-417): when it dies,
        the death scan then strips its entries before a new domain can reuse the id."""
        if self.hypervisor is None:
            return
        for p in node_perms:
            if not p.ignore and p.domid not in self.domains and p.domid != DOMID_ANY:
                self.domain(p.domid)

    def is_privileged(self, domid: int) -> bool:
        return domid == self.priv_domid

    # ------------------------------------------------------------------------- connections
    def new_connection(self, domid: int | None = None, *, socket: bool = True) -> Connection:
        """A socket client acts for the privileged domain; a ring client for its own domain."""
        if domid is None:
            domid = self.priv_domid
        cfg = self.config
        conn = Connection(
            self.domain(domid),
            socket=socket,
            privileged=self.is_privileged(domid),
            pause_bytes=cfg.output_pause_bytes,
            limit_bytes=cfg.output_limit_bytes,
        )
        self.connections[conn.id] = conn
        tracer = self._tracer
        if tracer is not None:
            conn.tracer = tracer
            tracer.connection(conn, True)
        return conn

    def reset_connection(self, conn: Connection) -> None:
        """Forget a connection's watches, transactions, partial input and queued output (ring
        reconnection, re-INTRODUCE, an ignored domain)."""
        self.remove_all_watches(conn)
        conn.reset()
        self.transactions_changed(conn)

    def close_connection(self, conn: Connection) -> None:
        """The connection is gone for good (socket closed, domain destroyed)."""
        if conn.closed:
            return
        self.remove_all_watches(conn)
        conn.close()
        self.connections.pop(conn.id, None)
        self.metrics.connection_closed(conn.domid, conn.requests)
        if self._tracer is not None:
            self._tracer.connection(conn, False)

    def send_event(self, conn: Connection, path: str, token: str) -> None:
        """Queue one watch event, unless an unprivileged watcher that does not read its events
        would grow the daemon past its memory quota: it loses the event (as C drops them)."""
        if not conn.privileged:
            limit = conn.domain.quotas["memory"]
            if limit:
                usage = self.memory_usage(conn) + len(path) + len(token) + 2 + HEADER.size
                if usage > limit:
                    self.refusals.refuse(conn.domid, "memory", limit, usage, "event")
                    return
        conn.event(path, token)

    # ------------------------------------------------------------------------- watch events
    def can_see(self, conn: Connection, change: Change) -> bool:
        """XSA-115: a domain hears about a node only if it can (or could) read it or its parent."""
        d, t = conn.domid, conn.target
        if change.new_perms is not None and perms.allows(change.new_perms, d, t, perms.READ):
            return True
        if change.old_perms is not None and perms.allows(change.old_perms, d, t, perms.READ):
            return True
        if change.path != paths.ROOT:
            parent = self.store.get(paths.parent(change.path))
            if parent is not None and perms.allows(parent.perms, d, t, perms.READ):
                return True
        return False

    def fire(self, changes: list[Change]) -> None:
        """Queue the watch events for committed changes, in commit order."""
        if not self.watches.count:
            return  # nobody watches anything: no change needs a look
        matching = self.watches.matching
        for change in changes:
            for w in matching(change.path, change.exact):
                conn: Connection = w.owner  # type: ignore[assignment]
                if not conn.privileged and not self.can_see(conn, change) and self.config.perms_watch_activate:
                    continue
                epath = paths.relative_to(change.path, conn.home) if w.relative else change.path
                self.send_event(conn, epath, w.token)

    def fire_node_change(self, path: str, old: Perms | None, new: Perms) -> None:
        """Watch events for one node a write replaced or created (the in-place write path):
        nothing is built while no watch covers the path."""
        if self.watches.may_fire(path):
            self.fire([Change(path, False, old, new)])

    def fire_removed(self, removed: list[tuple[str, Perms]]) -> None:
        """Events for a subtree the store removed, top first: the top fires watches on it and
        its ancestors, each descendant only watches placed exactly on it (as RM always does)."""
        if self.watches.count:
            top = removed[0][0]
            self.fire([Change(p, p != top, node_perms, None) for p, node_perms in removed])

    def fire_special(self, name: str, domid: int | None = None) -> None:
        """``@introduceDomain`` / ``@releaseDomain``: heard by the privileged and by domains the
        special path's permissions let read it."""
        sp = self.special_perms[name]
        for w, epath in self.watches.matching_special(name, domid):
            conn: Connection = w.owner  # type: ignore[assignment]
            if not conn.privileged and not perms.allows(sp, conn.domid, conn.target, perms.READ):
                continue
            self.send_event(conn, epath, w.token)

    def commit(self, txn: Transaction) -> None:
        """Commit (raises Conflict) and fire the resulting watch events."""
        self.fire(txn.commit())
