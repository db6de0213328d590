"""Transactions: a snapshot generation, a private write set, and the read set commit validates.

Every mutating request runs in a :class:`Transaction`.  A client's explicit transaction reads at
its snapshot and commits with validation; a request outside any transaction gets an *implicit*
one that reads the live store and commits at once (nothing can interleave inside one request on
the single-threaded loop), which gives every request all-or-nothing behaviour for free: a request
that fails half-way leaves no trace (XSA-414/415).

Serializability: commits happen in a total order; a transaction commits only if everything it
read (node contents and existence via ``vgen``, child lists it listed via ``cgen``) is unchanged
since its snapshot, so running it at its commit point would have read the same and done the same.
What it never read may change freely: blind creation of different children of one parent merges.
A transaction that wrote nothing serialises at its snapshot and always commits.
"""

from __future__ import annotations

from dataclasses import dataclass

from .paths import ROOT
from .perms import Perms
from .store import Node, Store


@dataclass(slots=True)
class Change:
    """A modified node, for watch dispatch at commit.

    ``exact`` changes (descendants removed by RM) fire only watches placed exactly on the path;
    the others fire watches on the path and its ancestors.  The perms before and after feed the
    XSA-115 rule that only domains able to read the node hear about it.
    """

    path: str
    exact: bool
    old_perms: Perms | None
    new_perms: Perms | None


class Conflict(Exception):
    """Commit validation failed: EAGAIN."""


class Transaction:
    __slots__ = (
        "added",
        "blind_writes",
        "changes",
        "closed",
        "dir_reads",
        "failed",
        "implicit",
        "mem",
        "owned_delta",
        "reads",
        "removed",
        "snap",
        "started",
        "store",
        "tx_id",
        "writes",
    )

    def __init__(self, store: Store, tx_id: int = 0, *, implicit: bool = False) -> None:
        self.store = store
        self.tx_id = tx_id
        self.implicit = implicit
        self.snap = store.gen if implicit else store.open_snapshot()
        self.writes: dict[str, Node | None] = {}
        self.reads: dict[str, int | None] = {}
        self.dir_reads: dict[str, int] = {}
        self.added: dict[str, set[str]] = {}
        self.removed: dict[str, set[str]] = {}
        self.changes: dict[str, Change] = {}
        # Sticky failure (an error name) that makes commit fail, e.g. after a quota refusal.
        self.failed: str | None = None
        self.closed = False
        # Net nodes this transaction creates for its connection's domain (nodes quota).
        self.owned_delta = 0
        self.started = 0.0  # monotonic time a client opened it (live update refuses old ones)
        # Bytes this transaction's pending writes hold for its domain (memory quota, XSA-326).
        self.mem = 0
        self.blind_writes = 0  # nodes written without being read first (for ``touched``)

    # --------------------------------------------------------------------------- reading
    def get(self, path: str) -> Node | None:
        """The node as this transaction sees it; the first look is recorded for validation."""
        writes = self.writes
        if path in writes:
            return writes[path]
        if self.implicit:
            return self.store.get(path)
        reads = self.reads
        if path in reads:
            if reads[path] is None:
                return None  # absent from the snapshot, which never changes: no second search
            return self.store.get_at(path, self.snap)
        node = self.store.get_at(path, self.snap)
        reads[path] = node.vgen if node is not None else None
        return node

    def children(self, path: str) -> list[str]:
        """Child names in byte order; records the listing so a concurrent change conflicts."""
        store = self.store
        if self.implicit:
            names = store.child_names(path) if store.latest_record(path) is not None else []
        else:
            found = store.listing(path, self.snap)
            if found is None:
                names = []
            else:
                cgen, names = found
                dir_reads = self.dir_reads
                if path not in dir_reads:
                    dir_reads[path] = cgen
        return self._merged(path, names)

    def _children_of(self, path: str, base: Node) -> list[str]:
        """:meth:`children` of a node :meth:`get` just read from the snapshot (or, implicit,
        the store): ``base`` says it exists there and its cgen, so no second search."""
        store = self.store
        if self.implicit:
            names = store.child_names(path)
        else:
            dir_reads = self.dir_reads
            if path not in dir_reads:
                dir_reads[path] = base.cgen
            names = store.child_names(path, self.snap)
        return self._merged(path, names)

    def _merged(self, path: str, names: list[str]) -> list[str]:
        """The snapshot's ``names`` under ``path`` with this transaction's links applied."""
        added = self.added.get(path)
        removed = self.removed.get(path)
        if added or removed:
            s = set(names)
            if removed:
                s -= removed
            if added:
                s |= added
            names = sorted(s)
        return names

    @property
    def touched(self) -> int:
        """Distinct nodes read or written: what the transaction-nodes quota counts.  O(1): a
        request must not cost more as its transaction grows."""
        return len(self.reads) + self.blind_writes

    # --------------------------------------------------------------------------- writing
    def _link(self, path: str, present: bool) -> None:
        if path == ROOT:
            return
        cut = path.rfind("/")  # paths.parent and basename, with one search
        p, name = path[:cut] or ROOT, path[cut + 1 :]
        if present:
            gone = self.removed.get(p)
            if gone and name in gone:
                gone.discard(name)
            else:
                added = self.added.get(p)
                if added is None:
                    self.added[p] = {name}
                else:
                    added.add(name)
        else:
            new = self.added.get(p)
            if new and name in new:
                new.discard(name)
            else:
                removed = self.removed.get(p)
                if removed is None:
                    self.removed[p] = {name}
                else:
                    removed.add(name)

    def put(self, path: str, value: bytes, perms: Perms, *, existed: bool) -> None:
        """Write a node; ``existed`` says whether it was visible before (the caller looked)."""
        if path not in self.reads and path not in self.writes:
            self.blind_writes += 1
        self.writes[path] = Node(value, perms, 0, 0)
        if not existed:
            self._link(path, True)

    def delete(self, path: str) -> None:
        if path not in self.reads and path not in self.writes:
            self.blind_writes += 1
        self.writes[path] = None
        self._link(path, False)

    def remove_tree(self, top: str) -> list[Node]:
        """Delete ``top`` and its subtree, iteratively (XSA-418), noting the watch events: the
        top fires watches on it and its ancestors, each descendant only watches placed exactly on
        it.  Returns the removed nodes (for node accounting)."""
        writes, reads, store = self.writes, self.reads, self.store
        implicit = self.implicit
        # While the snapshot is the live store (an implicit transaction, or nobody committed
        # since this one began), the children of a node read from it come with their nodes
        # from its directory: no search per descendant.
        live = implicit or self.snap == store.gen
        removed: list[Node] = []
        stack: list[tuple[str, Node | None]] = [(top, None)]
        while stack:
            p, node = stack.pop()
            written = p in writes
            if node is None or written:
                node = self.get(p)
                if node is None:
                    assert p != top
                    continue
            elif not implicit and p not in reads:
                reads[p] = node.vgen  # what get() records of a read from the snapshot
            removed.append(node)
            self.note_change(p, exact=p != top, old=node.perms, new=None)
            prefix = "/" if p == ROOT else p + "/"
            if written:
                stack.extend([(prefix + n, None) for n in reversed(self.children(p))])
            elif live and not self.added.get(p) and not self.removed.get(p):
                if not implicit and p not in self.dir_reads:
                    self.dir_reads[p] = node.cgen
                stack.extend([(prefix + n, c) for n, c in reversed(store.child_nodes(p))])
            else:
                stack.extend([(prefix + n, None) for n in reversed(self._children_of(p, node))])
            self.delete(p)
        return removed

    def note_change(self, path: str, *, exact: bool, old: Perms | None, new: Perms | None) -> None:
        """Remember a change for watch events; a path changed twice fires once."""
        prev = self.changes.get(path)
        if prev is None:
            self.changes[path] = Change(path, exact, old, new)
        else:
            prev.exact = prev.exact and exact
            prev.new_perms = new

    # --------------------------------------------------------------------------- ending
    def validate(self) -> bool:
        if self.implicit or not self.writes:
            return True
        store = self.store
        if store.gen == self.snap:
            # Nothing committed since the snapshot: everything read is as it was (the common
            # case: a toolstack's transactions rarely overlap), so no read needs a look.
            return True
        gens = store.gens
        for path, vgen in self.reads.items():
            cur = gens(path)
            if (cur[0] if cur is not None else None) != vgen:
                return False
        for path, cgen in self.dir_reads.items():
            cur = gens(path)
            if cur is None or cur[1] != cgen:
                return False
        return True

    def commit(self) -> list[Change]:
        """Validate and install; raises Conflict.  Returns the changes to fire watches for."""
        try:
            if not self.validate():
                raise Conflict()
            # Validated: our own snapshot has served its purpose.  Releasing it before the
            # install means the versions we replace need not be kept for it (when no other
            # snapshot is open, apply then writes plain records instead of version lists).
            self.close()
            if self.writes:
                self.store.apply(self.writes)
            return list(self.changes.values())
        finally:
            self.close()

    def close(self) -> None:
        """Abort (or finish): release the snapshot so its old versions can be reclaimed."""
        if not self.closed:
            self.closed = True
            if not self.implicit:
                self.store.close_snapshot(self.snap)


class LiveView:
    """Read-only requests outside a transaction read the committed store directly: the same
    interface as a Transaction's reads, without building one per request."""

    __slots__ = ("get", "store", "writes")

    implicit = True

    def __init__(self, store: Store) -> None:
        self.store = store
        self.get = store.get
        self.writes: dict[str, Node | None] = {}  # always empty: nothing is written through it

    def children(self, path: str) -> list[str]:
        return self.store.child_names(path) if self.store.get(path) is not None else []

    def close(self) -> None:
        pass
