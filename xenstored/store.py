"""The MVCC node table: every committed version of every node, stamped with a generation.

A transaction is just a snapshot generation plus a private write set (see transactions.py), so
starting one copies nothing.  Reading at a snapshot finds the newest version not newer than the
snapshot; versions no open snapshot can see any more are reclaimed as the oldest snapshot moves on.

Layout, chosen for memory (the store may hold 10^5 nodes; cxenstored spends about 108 bytes on
one): a node is one bytes object and one list slot, nothing else.

* ``_dirs[parent]`` is the sorted list of the entries of ``parent``'s children, each
  ``name + NUL + value + (vgen, cgen, permissions id)``.  NUL sorts below every path character,
  so the list is in the byte order of the names (DIRECTORY needs no sort), a bisection on
  ``name + NUL`` finds a child, and a child's path is never stored: the directory's key and the
  entry's name make it.  A global table keyed by full paths cost a path string (64-80 bytes) and
  a dict entry (26-34) per node on top of the record.
* Finding a node is a dict lookup of its parent and a bisection among its siblings; creating one
  inserts into its siblings' list.  A directory of more than ``_BIG`` children becomes a
  ``SortedList`` (sublists of about a thousand), so that no insertion moves more than a few
  thousand pointers however big one directory grows; its sublists are searched directly
  (``_slot``), relying on the documented two-level layout of sortedcontainers 2.x (pinned in
  pyproject.toml).
* ``_old[path]`` holds ``(generation, entry | None)`` pairs, oldest first (``None`` = deleted),
  only while an older version is still visible to some snapshot; the directory then holds the
  newest entry, or for a deleted node a tombstone: ``name + NUL`` alone.  A store without open
  transactions has no ``_old`` and no tombstone.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Protocol

from sortedcontainers import SortedList

from .paths import ROOT, join, parent
from .perms import Perms, owner_only


class Node:
    """One immutable version of a node.

    ``vgen`` moves when the value or permissions change, ``cgen`` when the child list changes:
    keeping them apart lets a transaction that only read a node's value survive another one
    adding a child under it (the blind-create merge of Part A).
    """

    __slots__ = ("cgen", "perms", "value", "vgen")

    def __init__(self, value: bytes, perms: Perms, vgen: int, cgen: int) -> None:
        self.value = value
        self.perms = perms
        self.vgen = vgen
        self.cgen = cgen

    @property
    def gen(self) -> int:
        """The generation DIRECTORY_PART reports: any change to the node moves it."""
        return max(self.cgen, self.vgen)

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def __repr__(self) -> str:
        return f"Node({self.value!r}, {self.perms!r}, v{self.vgen}, c{self.cgen})"


# The trailer of an entry: ``vgen, cgen, permissions id``, after the value so that reading it
# needs no search for the NUL (every permission check reads it).  Nodes are unpacked on the way
# out only (the value must be a bytes object for the reply anyway).
_REC = struct.Struct("=QQI")
_REC_SIZE = _REC.size
_TAIL = -_REC_SIZE
Record = bytes
Version = tuple[int, "Record | None"]
# What lookup() hands the write fast path: the path, and where its entry sits (the directory's
# list and the index; None for the root), so that overwrite() need not search again.
Key = tuple[str, "list[Record] | None", int]
# What Store._find says of a path: its directory, ``name + NUL``, the directory's container,
# the plain list and index where the entry is or would go, and the entry found there (or None).
Where = tuple[str, bytes, "list[Record] | SortedList | None", "list[Record]", int, "Record | None"]

NODE_OVERHEAD = 16  # per-node header, as C-4.19+ counts it

# The parent recorded in ``_users`` for the root, which has none.
_NO_PARENT = ""
# Names of one permission list's entries kept per directory before it is scanned instead.
_NAMED = 8


def _note(tracked: dict[str, set[str] | None], up: str, name: str) -> None:
    """Record that directory ``up`` holds ``name`` with a tracked permission list (see
    Store._users)."""
    if up not in tracked:
        tracked[up] = {name}
        return
    names = tracked[up]
    if names is not None:
        names.add(name)
        if len(names) > _NAMED:
            tracked[up] = None

# Children beyond which a directory's plain list becomes a SortedList: inserting into a plain
# list of 100k entries moves 800 KB (35 us per creation); below a few thousand it is cheaper
# than a SortedList's bookkeeping.
_BIG = 4096
_NOWHERE: list[Record] = []  # never mutated: the slot of a name above a big directory's last


def _slot(entries: list[Record] | SortedList, name: bytes) -> tuple[list[Record], int]:
    """The plain list that holds ``name``'s entry (or would) and the index in it: the directory
    itself, or for a big one the sublist whose range covers the name."""
    if type(entries) is list:
        return entries, bisect_left(entries, name)
    maxes = entries._maxes
    pos = bisect_left(maxes, name)
    if pos == len(maxes):
        return _NOWHERE, 0
    sub = entries._lists[pos]
    return sub, bisect_left(sub, name)


def node_bytes(path: str, node: Node) -> int:
    """What a node costs its owner against the memory quota."""
    return node_size(path, len(node.value), node.perms)


def node_size(path: str, value_len: int, perms: Perms) -> int:
    """The memory-quota cost of a node at ``path`` with a value of ``value_len`` bytes."""
    return NODE_OVERHEAD + len(path) + value_len + 8 * len(perms)


def _split(path: str) -> tuple[str, bytes]:
    """A non-root path's directory and the ``name + NUL`` its entry starts with."""
    cut = path.rfind("/")
    return (path[:cut] if cut > 0 else ROOT), path[cut + 1 :].encode() + b"\0"


def _head(path: str) -> bytes:
    """``name + NUL`` of any path (the root's name is empty)."""
    return path[path.rfind("/") + 1 :].encode() + b"\0"


def _value_len(rec: Record) -> int:
    return len(rec) - _REC_SIZE - 1 - rec.index(0)


class NodeLog(Protocol):
    """Where committed node changes are recorded before anyone sees them (journal.Journal)."""

    def node(self, path: str, value: bytes, perms: Perms) -> None: ...
    def removed(self, path: str) -> None: ...


class Store:
    """Committed state.  Mutated only by :meth:`apply`, one generation per commit."""

    def __init__(self) -> None:
        self.gen = 0
        self.log: NodeLog | None = None
        self._dirs: dict[str, list[Record] | SortedList] = {}
        self._old: dict[str, list[Version]] = {}
        # Open snapshots: generation -> how many.  Generations only grow, so a new snapshot's is
        # never below an open one's and the dict's order is ascending: the oldest is its first
        # key (a SortedList cost a microsecond or two per transaction start and end).
        self._snapshots: dict[int, int] = {}
        self._open = 0
        self._garbage: deque[tuple[int, str]] = deque()
        # Live nodes per owner domain: the nodes quota, kept exact at every commit.
        self.owned: dict[int, int] = {}
        # Approximate bytes of those nodes (path, value, permissions): the memory quota's share.
        self.owned_bytes: dict[int, int] = {}
        # Permission lists are few and shared by many nodes: records name them by number.
        self._perm_ids: dict[Perms, int] = {}
        self._perm_lists: list[Perms] = []
        # Where latest entries of a permission list live (id -> parent path -> their names, or
        # None for "scan this directory"): which nodes name a domain, found from the few
        # distinct lists instead of a walk of the whole tree (a domain's death).  A directory
        # holding few such entries among many others (a domain's home among every domain's in
        # /local/domain) keeps their names, so a release does not scan its siblings; past
        # _NAMED of them the directory is scanned instead (a guest's own subtree, where nearly
        # every entry matches), so a node costs nothing here.  Entries stay listed after they
        # change, until naming() finds them gone.  Only lists naming a domain other than 0 are
        # tracked: dom0's own nodes (most of a big store) are never looked up so, dom0 is never
        # released.
        self._users: dict[int, dict[str, set[str] | None]] = {}
        # The tracked permission lists naming each domain (lists are never forgotten): a
        # release looks at its domain's few, not at every domain's.
        self._lists_naming: dict[int, list[int]] = {}
        root = Node(b"", owner_only(0), 0, 0)
        self._root: Record = b"\0" + _REC.pack(0, 0, self._perm_id(root.perms))
        self.owned[0] = 1
        self.owned_bytes[0] = node_bytes(ROOT, root)

    # ----------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return sum(1 for _ in self.walk())

    def _perm_id(self, node_perms: Perms) -> int:
        pid = self._perm_ids.get(node_perms)
        if pid is None:
            pid = len(self._perm_lists)
            self._perm_ids[node_perms] = pid
            self._perm_lists.append(node_perms)
            if any(p.domid for p in node_perms):
                self._users[pid] = {}
                for domid in {p.domid for p in node_perms}:
                    self._lists_naming.setdefault(domid, []).append(pid)
        return pid

    def _track(self, path: str, pid: int) -> None:
        tracked = self._users.get(pid)
        if tracked is not None:
            cut = path.rfind("/")
            if cut > 0:
                _note(tracked, path[:cut], path[cut + 1 :])
            elif path != ROOT:
                _note(tracked, ROOT, path[1:])
            else:
                tracked[_NO_PARENT] = None

    def _unpack(self, rec: Record) -> Node:
        vgen, cgen, pid = _REC.unpack_from(rec, len(rec) - _REC_SIZE)
        return Node(rec[rec.index(0) + 1 : _TAIL], self._perm_lists[pid], vgen, cgen)

    def get(self, path: str) -> Node | None:
        """Current committed node."""
        rec = self._latest(path)
        return None if rec is None else self._unpack(rec)

    def lookup(self, path: str) -> tuple[Key, Record] | None:
        """The key and current record of a live node, unpacked no further: the write fast path
        needs only its permissions and value length.  ``_latest``, inlined: READ and WRITE
        start here."""
        cut = path.rfind("/")
        if cut > 0:
            entries = self._dirs.get(path[:cut])
        elif len(path) == 1:
            return (path, None, 0), self._root
        else:
            entries = self._dirs.get(ROOT)
        if entries is None:
            return None
        name = path[cut + 1 :].encode()
        # The first entry not below the bare name is that name's (``name + NUL...``) if any:
        # NUL is below every character that could follow the name in another entry.
        if type(entries) is list:
            i = bisect_left(entries, name)
        else:  # a big directory: its key names no slot (overwrite() searches again)
            entries, i = _slot(entries, name)
            if i < len(entries):
                rec = entries[i]
                n = len(name)
                if len(rec) > n + 1 and rec[n] == 0 and rec.startswith(name):
                    return (path, None, 0), rec
            return None
        if i < len(entries):
            rec = entries[i]
            n = len(name)
            if len(rec) > n + 1 and rec[n] == 0 and rec.startswith(name):
                return (path, entries, i), rec
        return None

    def gens(self, path: str) -> tuple[int, int] | None:
        """``(vgen, cgen)`` of the current node (None: no such node): what commit validation
        compares, without building a Node."""
        rec = self._latest(path)
        if rec is None:
            return None
        vgen, cgen, _pid = _REC.unpack_from(rec, len(rec) - _REC_SIZE)
        return vgen, cgen

    def record_perms(self, rec: Record) -> Perms:
        return self._perm_lists[_REC.unpack_from(rec, len(rec) - _REC_SIZE)[2]]

    @staticmethod
    def record_value_len(rec: Record) -> int:
        return len(rec) - _REC_SIZE - 1 - rec.index(0)

    @staticmethod
    def record_value(rec: Record) -> bytes:
        return rec[rec.index(0) + 1 : _TAIL]

    def _version(self, path: str) -> Record | list[Version] | None:
        v = self._old.get(path)
        return self._latest(path) if v is None else v

    def get_at(self, path: str, snap: int) -> Node | None:
        """The node as a snapshot taken at generation ``snap`` sees it.  A node with no older
        version kept (the usual case: only nodes changed since some open snapshot have any) is
        read with one unpack of its record (every read inside a transaction comes here)."""
        old = self._old
        v = old.get(path) if old else None
        if v is not None:
            rec = self._at(v, snap)
            return None if rec is None else self._unpack(rec)
        rec = self._latest(path)
        if rec is None:
            return None
        vgen, cgen, pid = _REC.unpack_from(rec, len(rec) - _REC_SIZE)
        if vgen > snap or cgen > snap:  # created or changed after the snapshot: not in it
            return None
        return Node(rec[rec.index(0) + 1 : _TAIL], self._perm_lists[pid], vgen, cgen)

    def listing(self, path: str, snap: int) -> tuple[int, list[str]] | None:
        """``(cgen, child names)`` of the node as the snapshot ``snap`` sees it (None: no such
        node there): what a transaction lists and records for validation, from one search for
        the node.  A snapshot of the current generation sees the live lists (no per-child look
        at old versions): the usual case, a transaction nobody committed across."""
        if snap == self.gen:
            rec = self._latest(path)
            if rec is None:
                return None
            return _REC.unpack_from(rec, len(rec) - _REC_SIZE)[1], self.child_names(path)
        old = self._old
        v = old.get(path) if old else None
        if v is not None:
            rec = self._at(v, snap)
            if rec is None:
                return None
            cgen = _REC.unpack_from(rec, len(rec) - _REC_SIZE)[1]
        else:
            rec = self._latest(path)
            if rec is None:
                return None
            vgen, cgen, _pid = _REC.unpack_from(rec, len(rec) - _REC_SIZE)
            if vgen > snap or cgen > snap:
                return None
        return cgen, self.child_names(path, snap)

    @staticmethod
    def _at(v: Record | list[Version] | None, snap: int) -> Record | None:
        if v is None:
            return None
        if type(v) is bytes:
            vgen, cgen, _ = _REC.unpack_from(v, len(v) - _REC_SIZE)
            return v if max(vgen, cgen) <= snap else None
        for gen, rec in reversed(v):  # type: ignore[arg-type]
            if gen <= snap:
                return rec
        return None

    def child_names(self, path: str, snap: int | None = None) -> list[str]:
        """Names of the children of ``path`` in byte order, live or at a snapshot."""
        entries = self._dirs.get(path)
        if not entries:
            return []
        old = self._old
        if snap is None or snap == self.gen:  # the current generation's snapshot is live
            if not old:  # no tombstone anywhere: every entry is a live node
                return [e.partition(b"\0")[0].decode() for e in entries]
            return [e[:n].decode() for e in entries if len(e) > (n := e.index(0)) + 1]
        out: list[str] = []
        at = self._at
        for e in entries:
            n = e.index(0)
            name = e[:n].decode()
            v = old.get(join(path, name)) if old else None
            if v is None:
                v = e if len(e) > n + 1 else None
            if at(v, snap) is not None:
                out.append(name)
        return out

    def child_nodes(self, path: str) -> list[tuple[str, Node]]:
        """The live children of ``path`` with their nodes, in byte order, from its directory's
        entries (a subtree's removal reads every node below its top: no search per node)."""
        entries = self._dirs.get(path)
        if not entries:
            return []
        out = []
        perm_lists, unpack = self._perm_lists, _REC.unpack_from
        for e in entries:
            n = e.index(0)
            if len(e) > n + 1:  # not a tombstone
                vgen, cgen, pid = unpack(e, len(e) - _REC_SIZE)
                out.append((e[:n].decode(), Node(e[n + 1 : _TAIL], perm_lists[pid], vgen, cgen)))
        return out

    def child_payload(self, path: str) -> bytes:
        """The live children of ``path`` as DIRECTORY's reply spells them (``a\0b\0``), cut
        straight from the entries: a tree walk is one of these per node, and decoding each name
        only to encode it again cost a fifth of the request."""
        entries = self._dirs.get(path)
        if not entries:
            return b""
        if not self._old:  # no tombstone anywhere: every entry is a live node
            return b"".join([e[: e.index(0) + 1] for e in entries])
        return b"".join([e[: n + 1] for e in entries if len(e) > (n := e.index(0)) + 1])

    def walk(self, path: str = ROOT) -> Iterator[str]:
        """Live paths of the subtree at ``path``, pre-order, iteratively (XSA-418: no recursion)."""
        if self.get(path) is None:
            return
        stack = [path]
        while stack:
            p = stack.pop()
            yield p
            stack.extend(join(p, n) for n in reversed(self.child_names(p)))

    # ----------------------------------------------------------------------------- snapshots
    def open_snapshot(self) -> int:
        snap = self.gen
        snaps = self._snapshots
        snaps[snap] = snaps.get(snap, 0) + 1
        self._open += 1
        return snap

    def close_snapshot(self, snap: int) -> None:
        snaps = self._snapshots
        n = snaps[snap] - 1
        if n:
            snaps[snap] = n
        else:
            del snaps[snap]
        self._open -= 1
        if self._garbage:
            self._collect()

    @property
    def open_snapshots(self) -> int:
        return self._open

    def _horizon(self) -> int:
        snaps = self._snapshots
        return next(iter(snaps)) if snaps else self.gen

    def _collect(self) -> None:
        """Drop versions that no open or future snapshot can see.  Amortised O(1) per write."""
        horizon = self._horizon()
        garbage = self._garbage
        old = self._old
        while garbage and garbage[0][0] <= horizon:
            _, path = garbage.popleft()
            v = old.get(path)
            if v is None:
                continue
            # Keep the newest version visible at the horizon and everything after it.
            keep = 0
            for i, (gen, _node) in enumerate(v):
                if gen <= horizon:
                    keep = i
            rest = v[keep:]
            if len(rest) == 1:
                del old[path]
                if rest[0][1] is None:
                    self._drop_tombstone(path)
            else:
                old[path] = rest

    def _drop_tombstone(self, path: str) -> None:
        up, head = _split(path)
        entries = self._dirs.get(up)
        if entries is None:
            return
        sub, i = _slot(entries, head)
        if i < len(sub) and sub[i] == head:
            self._delete(up, entries, sub, i)

    def _delete(self, up: str, entries: list[Record] | SortedList, sub: list[Record], i: int) -> None:
        if type(entries) is list:
            del entries[i]
        else:
            entries.remove(sub[i])
        if not entries:
            del self._dirs[up]

    # ----------------------------------------------------------------------------- writing
    def _find(self, path: str) -> Where:
        """Where ``path``'s entry is (or would go): its directory, ``name + NUL``, the
        directory's container, the plain list and index from _slot, and the entry there
        (a tombstone included; None when absent).  One search, which a commit then installs
        through (:meth:`_put_found`) instead of searching again."""
        if path == ROOT:
            return _NO_PARENT, b"\0", None, _NOWHERE, 0, self._root
        up, head = _split(path)
        entries = self._dirs.get(up)
        if entries is None:
            return up, head, None, _NOWHERE, 0, None
        if type(entries) is list:
            sub, i = entries, bisect_left(entries, head)
        else:
            sub, i = _slot(entries, head)
        if i < len(sub) and sub[i].startswith(head):
            return up, head, entries, sub, i, sub[i]
        return up, head, entries, sub, i, None

    def _put_record(self, path: str, rec: Record | None, gen: int) -> None:
        """Make ``rec`` (an entry, or None: deleted) the newest version of ``path``, keeping the
        one it replaces while an open snapshot may still read it."""
        self._put_found(path, self._find(path), rec, gen)

    def _put_found(self, path: str, where: Where, rec: Record | None, gen: int) -> None:
        """:meth:`_put_record` at the place :meth:`_find` just found (nothing changed since)."""
        up, head, entries, sub, i, cur = where
        if rec is None and up == _NO_PARENT:
            raise ValueError("the root cannot be removed")
        old = self._old
        hist = old.get(path) if old else None
        if hist is None:
            # ``cur`` is absent or a live entry with no shadowed version.
            if cur is None or not self._snapshots:
                if rec is not None:
                    self._install(up, entries, sub, i, cur, rec)
                elif cur is not None:
                    self._delete(up, entries, sub, i)  # type: ignore[arg-type]
                return
            vgen, cgen, _ = _REC.unpack_from(cur, len(cur) - _REC_SIZE)
            old_gen = max(vgen, cgen)
            old[path] = [(gen, rec)] if old_gen == gen else [(old_gen, cur), (gen, rec)]
        elif hist[-1][0] == gen:
            hist[-1] = (gen, rec)
        else:
            hist.append((gen, rec))
        self._install(up, entries, sub, i, cur, head if rec is None else rec)
        self._garbage.append((gen, path))

    def _install(
        self, up: str, entries: list[Record] | SortedList | None, sub: list[Record], i: int,
        cur: Record | None, rec: Record,
    ) -> None:
        """Put ``rec`` in place of ``cur`` (None: a new entry) at ``sub[i]`` from _slot."""
        if up == _NO_PARENT:
            self._root = rec
        elif entries is None:
            self._dirs[up] = [rec]
        elif type(entries) is list:
            if cur is not None:
                entries[i] = rec
            else:
                entries.insert(i, rec)
                if len(entries) > _BIG:
                    self._dirs[up] = SortedList(entries)
        else:  # a big directory: the SortedList keeps its sublists and their maxima right
            if cur is not None:
                entries.remove(cur)
            entries.add(rec)

    def _latest(self, path: str) -> Record | None:
        """The newest live entry of ``path``: None if absent or a tombstone (see lookup)."""
        cut = path.rfind("/")
        if cut > 0:
            entries = self._dirs.get(path[:cut])
        elif len(path) == 1:
            return self._root
        else:
            entries = self._dirs.get(ROOT)
        if entries is None:
            return None
        name = path[cut + 1 :].encode()
        if type(entries) is list:
            i = bisect_left(entries, name)
        else:
            entries, i = _slot(entries, name)
        if i < len(entries):
            rec = entries[i]
            n = len(name)
            if len(rec) > n + 1 and rec[n] == 0 and rec.startswith(name):
                return rec
        return None

    # The current record of a live node (None: no such node), for a request that needs no key:
    # :meth:`lookup` without building one (the same function: READ must not pay a call more).
    latest_record = _latest

    def _charge(self, path: str, rec: Record, sign: int) -> None:
        """Add (+1) or remove (-1) a committed record from its owner's node count and bytes."""
        perms = self._perm_lists[_REC.unpack_from(rec, len(rec) - _REC_SIZE)[2]]
        o = perms[0].domid
        size = node_size(path, _value_len(rec), perms)
        owned, owned_bytes = self.owned, self.owned_bytes
        n = owned.get(o, 0) + sign
        if n > 0:
            owned[o] = n
            owned_bytes[o] = owned_bytes.get(o, 0) + sign * size
        else:
            owned.pop(o, None)
            owned_bytes.pop(o, None)

    def apply(self, writes: dict[str, Node | None]) -> int:
        """Install a validated write set as one new generation, and return the generation.

        ``writes`` maps each path to its new node (value and perms; generations are assigned
        here) or None for deletion.  Parents whose child list changes get a new ``cgen``.
        Works on the packed records directly: a commit unpacks nothing it does not need, and
        finds each entry once (the search that tells what it replaces also tells where the new
        one goes).  This loop runs for every node a transaction writes: the accounting
        (_charge, node_size) and, when no snapshot needs old versions, the installation
        (what _put_found decides then) are spelt out.
        """
        gen = self.gen + 1
        # Directories whose child list changes, but not those created in this commit (their
        # cgen is this generation already) nor those it deletes: rewriting their entry again
        # would be a second search and a second copy per new directory.
        touched_parents: dict[str, None] = {}
        fresh: set[str] = set()
        owned, owned_bytes = self.owned, self.owned_bytes
        perm_lists = self._perm_lists
        nlog = self.log
        pack, unpack = _REC.pack, _REC.unpack_from
        find, put, install = self._find, self._put_found, self._install
        # No snapshot open and no old version kept (the usual commit: a transaction closes its
        # own snapshot first): every entry is replaced, inserted or cut where it was found, and
        # no tombstone exists.  Nothing in this loop opens a snapshot or keeps a version then.
        plain = not self._snapshots and not self._old
        users = self._users
        last_perms: Perms | None = None  # the nodes of a write set mostly share one list
        last_pid = 0
        dirs = self._dirs
        for path, new in writes.items():
            cut = path.rfind("/")
            if cut > 0 or len(path) > 1:  # _find(path), spelt out but for the root
                up = path[:cut] if cut > 0 else ROOT
                head = path[cut + 1 :].encode() + b"\0"
                entries = dirs.get(up)
                if entries is None:
                    sub, i, cur = _NOWHERE, 0, None
                else:
                    if type(entries) is list:
                        sub, i = entries, bisect_left(entries, head)
                    else:
                        sub, i = _slot(entries, head)
                    cur = sub[i] if i < len(sub) and sub[i].startswith(head) else None
            else:
                up, head, entries, sub, i, cur = find(path)
            found = cur  # (put() wants the entry there, a tombstone included)
            if cur is not None and len(cur) == len(head):
                cur = None  # a tombstone: the node is gone
            if cur is None and new is None:
                continue
            if nlog is not None:
                if new is None:
                    nlog.removed(path)
                else:
                    nlog.node(path, new.value, new.perms)
            if cur is not None:
                _vgen, cgen, pid = unpack(cur, len(cur) - _REC_SIZE)
                old_perms = perm_lists[pid]
                if new is not None and old_perms is new.perms:
                    # An overwrite with the same permission list (the common case): the owner
                    # keeps its count and only the value's size changes.
                    rec = cur[: len(head)] + new.value + pack(gen, cgen, pid)
                    owned_bytes[old_perms[0].domid] += len(rec) - len(cur)
                    if plain:
                        install(up, entries, sub, i, cur, rec)
                    else:
                        put(path, (up, head, entries, sub, i, found), rec, gen)
                    continue
                o = old_perms[0].domid  # _charge(path, cur, -1)
                n = owned.get(o, 0) - 1
                if n > 0:
                    owned[o] = n
                    owned_bytes[o] -= NODE_OVERHEAD + len(path) + len(cur) - _REC_SIZE - len(head) + 8 * len(old_perms)
                else:
                    owned.pop(o, None)
                    owned_bytes.pop(o, None)
                if new is None:
                    touched_parents[up] = None  # (the root is never deleted: put refuses)
                    if plain and up != _NO_PARENT:
                        self._delete(up, entries, sub, i)  # type: ignore[arg-type]
                    else:
                        put(path, (up, head, entries, sub, i, found), None, gen)
                    continue
            else:
                assert new is not None
                if up != _NO_PARENT:
                    touched_parents[up] = None
                cgen = gen
                fresh.add(path)
            node_perms = new.perms
            if node_perms is not last_perms:
                last_perms, last_pid = node_perms, self._perm_id(node_perms)
            pid = last_pid
            tracked = users.get(pid)
            if tracked is not None:  # _track(path, pid) and _note, spelt out
                if up == _NO_PARENT:
                    tracked[_NO_PARENT] = None
                elif up not in tracked:
                    tracked[up] = {path[cut + 1 :]}
                else:
                    names = tracked[up]
                    if names is not None:
                        names.add(path[cut + 1 :])
                        if len(names) > _NAMED:
                            tracked[up] = None
            value = new.value
            rec = head + value + pack(gen, cgen, pid)
            o = node_perms[0].domid  # _charge(path, rec, +1), without unpacking what we packed
            owned[o] = owned.get(o, 0) + 1
            owned_bytes[o] = owned_bytes.get(o, 0) + NODE_OVERHEAD + len(path) + len(value) + 8 * len(node_perms)
            if not plain:
                put(path, (up, head, entries, sub, i, found), rec, gen)
            elif type(entries) is list:  # _install into a plain list, spelt out
                if cur is not None:
                    entries[i] = rec
                else:
                    entries.insert(i, rec)
                    if len(entries) > _BIG:
                        dirs[up] = SortedList(entries)
            else:
                install(up, entries, sub, i, cur, rec)
        for p in touched_parents:
            if p not in fresh and (p not in writes or writes[p] is not None):
                self._child_list_changed(p, gen)
        self.gen = gen
        if self._garbage:
            self._collect()
        return gen

    def _child_list_changed(self, path: str, gen: int, found: tuple[Key, Record] | None = None) -> None:
        """The node at ``path`` gained or lost a child in commit ``gen``: a new version with
        the same value and vgen and ``cgen = gen`` (nothing if the node itself is gone).
        ``found``: what :meth:`lookup` says of ``path``, if the caller has it (still true:
        a child lives in another list than its parent's entry)."""
        if found is not None:
            (_path, entries, i), cur = found
            if entries is not None and entries[i] is cur and not self._snapshots and not self._old:
                vgen, _cgen, pid = _REC.unpack_from(cur, len(cur) - _REC_SIZE)
                entries[i] = cur[:_TAIL] + _REC.pack(vgen, gen, pid)  # nothing to keep: in place
                return
        where = self._find(path)
        cur = where[5]
        if cur is None or len(cur) == len(where[1]):
            return  # gone (or a tombstone)
        vgen, _cgen, pid = _REC.unpack_from(cur, len(cur) - _REC_SIZE)
        self._put_found(path, where, cur[:_TAIL] + _REC.pack(vgen, gen, pid), gen)

    def overwrite(self, key: Key, cur: Record, value: bytes) -> Perms:
        """Replace the value of a live node as a commit of its own, keeping its permissions and
        child list: what a WRITE outside a transaction to an existing node does, without a write
        set.  ``key, cur`` come from :meth:`lookup` in the same request (nothing can have changed
        in between on the single-threaded loop).  Returns the node's permissions, which the
        caller's watch events need and which it would otherwise unpack from ``cur`` again."""
        gen = self.gen + 1
        path = key[0]
        _vgen, cgen, pid = _REC.unpack_from(cur, len(cur) - _REC_SIZE)
        node_perms = self._perm_lists[pid]
        if self.log is not None:
            self.log.node(path, value, node_perms)
        rec = b"".join((cur[: cur.index(0) + 1], value, _REC.pack(gen, cgen, pid)))  # one copy of the value
        grow = len(rec) - len(cur)
        if grow:  # a state key rewritten with a value of the same length, mostly: nothing to charge
            self.owned_bytes[node_perms[0].domid] += grow
        self._replace(key, cur, rec, gen)
        return node_perms

    def _replace(self, key: Key, cur: Record, rec: Record, gen: int) -> int:
        """Commit ``rec`` in place of a live node's ``cur`` as generation ``gen``, where lookup
        found it when no snapshot needs the old version (else beside it), and return ``gen``."""
        path, entries, i = key
        if entries is not None and not self._old and not self._snapshots and entries[i] is cur:
            entries[i] = rec  # nothing to keep for a snapshot: the entry where lookup found it
        else:
            self._put_record(path, rec, gen)
        self.gen = gen
        if self._garbage:
            self._collect()
        return gen

    def set_perms(self, key: Key, cur: Record, perms: Perms) -> int:
        """Replace the permissions of a live node as a commit of its own (SET_PERMS outside a
        transaction), keeping its value and child list: what :meth:`apply` does with a write
        set of that one node.  ``key, cur`` come from :meth:`lookup` in the same request.
        Returns the new generation."""
        gen = self.gen + 1
        path = key[0]
        cgen = _REC.unpack_from(cur, len(cur) - _REC_SIZE)[1]
        if self.log is not None:
            self.log.node(path, cur[cur.index(0) + 1 : _TAIL], perms)
        self._charge(path, cur, -1)
        pid = self._perm_id(perms)
        self._track(path, pid)
        rec = cur[:_TAIL] + _REC.pack(gen, cgen, pid)
        self._charge(path, rec, +1)
        return self._replace(key, cur, rec, gen)

    def create(
        self, path: str, value: bytes, perms: Perms, parent_key: Key, parent_rec: Record | None = None
    ) -> int:
        """Add a node under an existing parent (``parent_key`` and ``parent_rec`` from
        :meth:`lookup` in the same request) as a commit of its own: a WRITE outside a
        transaction creating one node.  Returns the new generation."""
        gen = self.gen + 1
        if self.log is not None:
            self.log.node(path, value, perms)
        pid = self._perm_id(perms)
        rec = _head(path) + value + _REC.pack(gen, gen, pid)
        o = perms[0].domid  # _charge(path, rec, +1), without unpacking what was just packed
        self.owned[o] = self.owned.get(o, 0) + 1
        self.owned_bytes[o] = self.owned_bytes.get(o, 0) + node_size(path, len(value), perms)
        self._track(path, pid)
        self._put_record(path, rec, gen)
        self._child_list_changed(parent_key[0], gen, None if parent_rec is None else (parent_key, parent_rec))
        self.gen = gen
        if self._garbage:
            self._collect()
        return gen

    def remove(self, path: str, key: Key | None = None) -> list[tuple[str, Perms]]:
        """Delete a live node (not the root) and its subtree as a commit of its own (RM outside
        a transaction), iteratively.  Returns each removed path with its permissions, top first,
        then pre-order, for watch events.  ``key`` is what :meth:`lookup` found in the same
        request, if the caller has it."""
        if not self._snapshots and not self._old:
            return self._remove_unseen(path, key)
        gen = self.gen + 1
        perm_lists = self._perm_lists
        removed: list[tuple[str, Perms]] = []
        stack = [path]
        while stack:
            p = stack.pop()
            rec = self._latest(p)
            if rec is None:
                continue
            removed.append((p, perm_lists[_REC.unpack_from(rec, len(rec) - _REC_SIZE)[2]]))
            if self.log is not None:
                self.log.removed(p)
            stack.extend(join(p, n) for n in reversed(self.child_names(p)))
            self._charge(p, rec, -1)
            self._put_record(p, None, gen)
        self._child_list_changed(parent(path), gen)
        self.gen = gen
        self._collect()
        return removed

    def _remove_unseen(self, path: str, key: Key | None) -> list[tuple[str, Perms]]:
        """:meth:`remove` when no snapshot is open (the usual case, and every RM of test-xenstore
        or a toolstack's cleanup): no version needs keeping, so the subtree's directories are
        dropped whole (one dict pop each) and the top's entry cut from its parent's list,
        instead of a search and a tombstone per node: RM of a directory costs its nodes' count,
        journal record and event, nothing more."""
        gen = self.gen + 1
        dirs = self._dirs
        up, head = _split(path)
        if key is not None and key[1] is not None and key[1][key[2]].startswith(head):
            entries: list[Record] | SortedList = key[1]
            sub, i = key[1], key[2]
        else:
            found = dirs.get(up)
            if found is None:
                return []
            entries = found
            sub, i = _slot(entries, head)
            if i >= len(sub) or not sub[i].startswith(head):
                return []
        top = sub[i]
        self._delete(up, entries, sub, i)
        perm_lists, unpack, tail = self._perm_lists, _REC.unpack_from, _REC_SIZE
        owned, owned_bytes = self.owned, self.owned_bytes
        nlog = self.log
        removed: list[tuple[str, Perms]] = []
        stack = [(path, top)]
        while stack:
            p, rec = stack.pop()
            node_perms = perm_lists[unpack(rec, len(rec) - tail)[2]]
            removed.append((p, node_perms))
            if nlog is not None:
                nlog.removed(p)
            o = node_perms[0].domid  # _charge(p, rec, -1), inlined
            n = owned.get(o, 0) - 1
            if n > 0:
                owned[o] = n
                owned_bytes[o] -= NODE_OVERHEAD + len(p) + len(rec) - tail - 1 - rec.index(0) + 8 * len(node_perms)
            else:
                owned.pop(o, None)
                owned_bytes.pop(o, None)
            children = dirs.pop(p, None)
            if children:
                prefix = p + "/"
                stack.extend([(prefix + e[: e.index(0)].decode(), e) for e in reversed(children)])
        self._child_list_changed(up, gen)
        self.gen = gen
        if self._garbage:
            self._collect()
        return removed

    def load(self, nodes: dict[str, tuple[bytes, Perms]]) -> list[str]:
        """Replace the whole tree at once (recovery): one generation, each directory sorted
        once instead of 10^5 insertions.  Nodes whose parent is missing are left out and
        returned (a damaged journal must not produce an orphan nobody can list)."""
        if self._snapshots:
            raise RuntimeError("load() needs a store without open snapshots")
        gen = self.gen + 1
        pack, pid_of = _REC.pack, self._perm_id
        dirs: dict[str, list[Record]] = {}
        owned: dict[int, int] = {}
        owned_bytes: dict[int, int] = {}
        orphans = []
        if ROOT not in nodes:
            nodes = {ROOT: (b"", owner_only(0)), **nodes}
        loaded = {ROOT}
        overhead = NODE_OVERHEAD
        pids: dict[int, int] = {}  # permission lists are shared objects: hash each one once

        def add(path: str, value: bytes, node_perms: Perms) -> None:
            pid = pids.get(id(node_perms))
            if pid is None:
                pid = pids[id(node_perms)] = pid_of(node_perms)
            cut = path.rfind("/")
            rec = path[cut + 1 :].encode() + b"\0" + value + pack(gen, gen, pid)
            if path == ROOT:
                self._root = rec
            else:
                up = path[:cut] if cut > 0 else ROOT
                entries = dirs.get(up)
                if entries is None:
                    dirs[up] = [rec]
                else:
                    entries.append(rec)
            o = node_perms[0].domid
            owned[o] = owned.get(o, 0) + 1
            owned_bytes[o] = owned_bytes.get(o, 0) + overhead + len(path) + len(value) + 8 * len(node_perms)

        # Insertion order puts parents first (a snapshot is pre-order, and a journal creates a
        # node only under an existing parent), so one pass in that order finds the orphans.
        for path, (value, node_perms) in nodes.items():
            if path != ROOT:
                cut = path.rfind("/")
                if (path[:cut] if cut > 0 else ROOT) not in loaded:
                    orphans.append(path)
                    continue
                loaded.add(path)
            add(path, value, node_perms)
        if orphans:
            # Out of order after all?  Sorted, a parent comes before its children.
            late, orphans = orphans, []
            for path in sorted(late):
                if parent(path) not in loaded:
                    orphans.append(path)
                    continue
                loaded.add(path)
                add(path, *nodes[path])
        del loaded
        users: dict[int, dict[str, set[str] | None]] = {pid: {} for pid in self._users}
        unpack = _REC.unpack_from
        for up, entries in dirs.items():
            entries.sort()
            if len(entries) > _BIG:
                dirs[up] = SortedList(entries)  # type: ignore[assignment]
            for rec in entries:
                tracked = users.get(unpack(rec, len(rec) - _REC_SIZE)[2])
                if tracked is not None:
                    _note(tracked, up, rec[: rec.index(0)].decode())
        root_users = users.get(unpack(self._root, len(self._root) - _REC_SIZE)[2])
        if root_users is not None:
            root_users[_NO_PARENT] = None
        self._users = users
        self._dirs = dirs
        self._old = {}
        self._garbage.clear()
        self.owned, self.owned_bytes = owned, owned_bytes
        self.gen = gen
        return orphans

    def naming(self, domid: int) -> list[tuple[str, Record]]:
        """Live paths whose permission list names ``domid`` (as owner or otherwise), each with
        its current record (the caller needs its permissions and value: no second search):
        O(distinct permission lists + the entries of the directories holding the answer),
        whatever the size of the store."""
        if domid == 0:  # not tracked (see _users): the walk, for the one domain never released
            out0 = []
            for p in self.walk():
                rec = self._latest(p)
                if rec is not None and any(e.domid == 0 for e in self.record_perms(rec)):
                    out0.append((p, rec))
            return out0
        out: list[tuple[str, Record]] = []
        users = self._users
        unpack = _REC.unpack_from
        latest = self._latest
        for pid in self._lists_naming.get(domid, ()):
            where = users.get(pid)
            if not where:
                continue
            for up, names in list(where.items()):
                found = False
                if up == _NO_PARENT:
                    rec = self._root
                    if unpack(rec, len(rec) - _REC_SIZE)[2] == pid:
                        out.append((ROOT, rec))
                        found = True
                elif names is None:  # many such entries here: scan the directory
                    for rec in self._dirs.get(up, ()):
                        n = rec.index(0)
                        if len(rec) > n + 1 and unpack(rec, len(rec) - _REC_SIZE)[2] == pid:
                            out.append((join(up, rec[:n].decode()), rec))
                            found = True
                else:
                    prefix = "/" if up == ROOT else up + "/"
                    for name in list(names):
                        path = prefix + name
                        hit = latest(path)
                        if hit is not None and unpack(hit, len(hit) - _REC_SIZE)[2] == pid:
                            out.append((path, hit))
                            found = True
                        else:
                            names.discard(name)  # changed or gone since
                if not found:
                    del where[up]  # its last such entry changed since
        return out

    def _entries(self) -> Iterator[tuple[str, Record]]:
        """Every path and latest entry (tombstones included), the root first."""
        yield ROOT, self._root
        for up, entries in self._dirs.items():
            for rec in entries:
                yield join(up, rec[: rec.index(0)].decode()), rec

    def audit(self) -> tuple[dict[int, int], dict[int, int], list[str]]:
        """Recount every live node from the table itself: nodes and bytes per owner, and the
        paths whose parent is missing (must be empty).

        One pass over the directories, O(nodes), with no tree walk: a walk from the root could
        never meet a node whose parent is gone, and a flat pass is three times faster.
        """
        counts: dict[int, int] = {}
        sizes: dict[int, int] = {}
        broken: list[str] = []
        perm_lists = self._perm_lists
        unpack = _REC.unpack_from
        live_parent: dict[str, bool] = {}
        for path, rec in self._entries():
            n = rec.index(0)
            if len(rec) == n + 1:
                continue  # a tombstone
            node_perms = perm_lists[unpack(rec, len(rec) - _REC_SIZE)[2]]
            o = node_perms[0].domid
            counts[o] = counts.get(o, 0) + 1
            sizes[o] = sizes.get(o, 0) + node_size(path, len(rec) - _REC_SIZE - 1 - n, node_perms)
            if path == ROOT:
                continue
            up = parent(path)
            ok = live_parent.get(up)
            if ok is None:
                ok = live_parent[up] = self._latest(up) is not None
            if not ok:
                broken.append(path)
        return counts, sizes, broken

    def paths(self) -> Iterable[str]:
        """Every path with a live node, in no particular order (for whole-store maintenance)."""
        return [p for p, rec in self._entries() if len(rec) > rec.index(0) + 1]

    def version_count(self) -> int:
        """Stored versions including shadowed ones: lets tests see that reclamation works."""
        old = self._old
        return sum(len(old[p]) if p in old else 1 for p, _rec in self._entries())
