"""The MVCC node table: every committed version of every node, stamped with a generation.

A transaction is just a snapshot generation plus a private write set (see transactions.py), so
starting one copies nothing.  Reading at a snapshot finds the newest version not newer than the
snapshot; versions no open snapshot can see any more are reclaimed as the oldest snapshot moves on.

Layout, chosen for memory (the store may hold 10^5 nodes):

* ``_versions[key]`` is a bare :class:`Node` in the common case of one live version, or a list of
  ``(generation, Node | None)`` pairs (oldest first, ``None`` = deleted) while older versions are
  still visible to some snapshot.  ``key`` is ``parent + b"\\0" + name``, as bytes: a bytes
  object's header is 16 bytes smaller than a str's (one pymalloc size class per node, 8% of a
  big store), and paths are ASCII, so encoding costs a copy and decoding a child name no more.
* ``_index`` is a sorted list of the same key objects (the very same objects: a path's characters
  are stored once).  NUL sorts below every path character, so the children of a node form one
  contiguous run in byte order: DIRECTORY is a range scan, O(children), already sorted.
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


# How a committed version is kept: one bytes object, ``vgen, cgen, permissions id`` then the value.
# A Node object, a separate value object and an int per node would cost about 80 bytes more
# each; nodes are unpacked on the way out (the value must be a bytes object for the reply anyway).
_REC = struct.Struct("=QQI")
_REC_SIZE = _REC.size
Record = bytes
Version = tuple[int, "Record | None"]

NODE_OVERHEAD = 16  # per-node header, as C-4.19+ counts it


def node_bytes(path: str, node: Node) -> int:
    """What a node costs its owner against the memory quota."""
    return node_size(path, len(node.value), node.perms)


def node_size(path: str, value_len: int, perms: Perms) -> int:
    """The memory-quota cost of a node at ``path`` with a value of ``value_len`` bytes."""
    return NODE_OVERHEAD + len(path) + value_len + 8 * len(perms)

_HI = b"\x01"  # upper bound of a child-key range: just above the NUL separator


Key = bytes
_ROOT_KEY = b"/\0"


def _key(path: str) -> Key:
    """``parent + NUL + name``: the one object a node is stored under, in both the version table
    and the child index (so a path costs its characters once, not twice)."""
    b = path.encode()
    cut = b.rfind(b"/")
    if cut <= 0:
        return b"/\0" + b[1:]
    return b[:cut] + b"\0" + b[cut + 1 :]


def _path(key: Key) -> str:
    parent_path, _, name = key.decode().partition("\0")
    return "/" + name if parent_path == ROOT else parent_path + "/" + name


class NodeLog(Protocol):
    """Where committed node changes are recorded before anyone sees them (journal.Journal)."""

    def node(self, path: str, value: bytes, perms: Perms) -> None: ...
    def removed(self, path: str) -> None: ...


class Store:
    """Committed state.  Mutated only by :meth:`apply`, one generation per commit."""

    def __init__(self) -> None:
        self.gen = 0
        self.log: NodeLog | None = None
        self._versions: dict[Key, Record | list[Version]] = {}
        self._index: SortedList = SortedList()
        self._snapshots: SortedList = SortedList()
        self._garbage: deque[tuple[int, Key]] = deque()
        # Live nodes per owner domain: the nodes quota, kept exact at every commit.
        self.owned: dict[int, int] = {}
        # Approximate bytes of those nodes (path, value, permissions): the memory quota's share.
        self.owned_bytes: dict[int, int] = {}
        # Permission lists are few and shared by many nodes: records name them by number.
        self._perm_ids: dict[Perms, int] = {}
        self._perm_lists: list[Perms] = []
        # Latest records by permission list (id -> keys): which nodes name a domain, found from
        # the few distinct lists instead of a walk of the whole tree (a domain's death).  Only
        # lists naming a domain other than 0 are tracked: dom0's own nodes (most of a big store)
        # cost no memory here, and dom0 is never released.
        self._users: dict[int, set[Key]] = {}
        root = Node(b"", owner_only(0), 0, 0)
        self._versions[_key(ROOT)] = self._pack(root)
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
                self._users[pid] = set()
        return pid

    def _pack(self, node: Node) -> Record:
        return _REC.pack(node.vgen, node.cgen, self._perm_id(node.perms)) + node.value

    def _unpack(self, rec: Record) -> Node:
        vgen, cgen, pid = _REC.unpack_from(rec)
        return Node(rec[_REC_SIZE:], self._perm_lists[pid], vgen, cgen)

    def get(self, path: str) -> Node | None:
        """Current committed node."""
        rec = self._latest(_key(path))
        return None if rec is None else self._unpack(rec)

    def lookup(self, path: str) -> tuple[Key, Record] | None:
        """The key and current record of a live node, unpacked no further: the write fast path
        needs only its permissions and value length."""
        key = _key(path)
        rec = self._latest(key)
        return None if rec is None else (key, rec)

    def record_perms(self, rec: Record) -> Perms:
        return self._perm_lists[_REC.unpack_from(rec)[2]]

    @staticmethod
    def record_value_len(rec: Record) -> int:
        return len(rec) - _REC_SIZE

    @staticmethod
    def record_value(rec: Record) -> bytes:
        return rec[_REC_SIZE:]

    def get_at(self, path: str, snap: int) -> Node | None:
        """The node as a snapshot taken at generation ``snap`` sees it."""
        rec = self._at(self._versions.get(_key(path)), snap)
        return None if rec is None else self._unpack(rec)

    @staticmethod
    def _at(v: Record | list[Version] | None, snap: int) -> Record | None:
        if v is None:
            return None
        if type(v) is bytes:
            vgen, cgen, _ = _REC.unpack_from(v)
            return v if max(vgen, cgen) <= snap else None
        for gen, rec in reversed(v):  # type: ignore[arg-type]
            if gen <= snap:
                return rec
        return None

    def child_names(self, path: str, snap: int | None = None) -> list[str]:
        """Names of the children of ``path`` in byte order, live or at a snapshot."""
        b = path.encode()
        lo = b + b"\0"
        start = len(lo)
        keys = self._index_range(lo, b + _HI)
        if snap is None and not self._garbage:
            # No shadowed version left anywhere: every indexed key is a live node.
            return [key[start:].decode() for key in keys]
        out: list[str] = []
        versions = self._versions
        for key in keys:
            v = versions.get(key)
            if snap is None:
                present = v is not None and (type(v) is bytes or v[-1][1] is not None)  # type: ignore[index]
            else:
                present = self._at(v, snap) is not None
            if present:
                out.append(key[start:].decode())
        return out

    def _index_range(self, lo: Key, hi: Key) -> list[Key]:
        """Indexed keys ``lo <= key < hi``.

        Equivalent to ``SortedList.irange(lo, hi, inclusive=(True, False))``, which builds an
        iterator chain per call; a directory almost always lies inside one of the list's
        sublists (``_lists``, each at most twice its load, bounded by ``_maxes``), where two
        bisections and a slice find it: this halves the cost of a DIRECTORY.  Relies on that
        documented two-level layout of sortedcontainers 2.x (pinned in pyproject.toml).
        """
        index = self._index
        maxes = index._maxes
        pos = bisect_left(maxes, lo)
        if pos == len(maxes):
            return []
        lists = index._lists
        sub = lists[pos]
        i = bisect_left(sub, lo)
        if maxes[pos] >= hi:
            return sub[i : bisect_left(sub, hi, i)]
        out = sub[i:]
        for nxt in range(pos + 1, len(maxes)):
            sub = lists[nxt]
            if maxes[nxt] >= hi:
                out += sub[: bisect_left(sub, hi)]
                break
            out += sub
        return out

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
        self._snapshots.add(snap)
        return snap

    def close_snapshot(self, snap: int) -> None:
        self._snapshots.remove(snap)
        self._collect()

    @property
    def open_snapshots(self) -> int:
        return len(self._snapshots)

    def _horizon(self) -> int:
        return self._snapshots[0] if self._snapshots else self.gen

    def _collect(self) -> None:
        """Drop versions that no open or future snapshot can see.  Amortised O(1) per write."""
        horizon = self._horizon()
        garbage = self._garbage
        versions = self._versions
        while garbage and garbage[0][0] <= horizon:
            _, key = garbage.popleft()
            v = versions.get(key)
            if v is None or type(v) is bytes:
                continue
            # Keep the newest version visible at the horizon and everything after it.
            keep = 0
            for i, (gen, _node) in enumerate(v):  # type: ignore[arg-type]
                if gen <= horizon:
                    keep = i
            rest = v[keep:]  # type: ignore[index]
            if len(rest) == 1:
                node = rest[0][1]
                if node is None:
                    del versions[key]
                    self._index.remove(key)
                else:
                    versions[key] = node
            else:
                versions[key] = rest

    # ----------------------------------------------------------------------------- writing
    def _put_record(self, key: Key, rec: Record | None, gen: int) -> None:
        versions = self._versions
        v = versions.get(key)
        if v is None:
            if rec is None:
                return
            if self._snapshots:
                versions[key] = [(gen, rec)]
            else:
                versions[key] = rec
            self._index.add(key)
            return
        if type(v) is bytes:
            if not self._snapshots and rec is not None:
                versions[key] = rec
                return
            if not self._snapshots and rec is None:
                del versions[key]
                self._index.remove(key)
                return
            vgen, cgen, _ = _REC.unpack_from(v)
            old_gen = max(vgen, cgen)
            if old_gen == gen:  # second write in the same commit (a parent's cgen)
                versions[key] = [(gen, rec)]
            else:
                versions[key] = [(old_gen, v), (gen, rec)]
        else:
            if v[-1][0] == gen:  # type: ignore[index]
                v[-1] = (gen, rec)  # type: ignore[index]
            else:
                v.append((gen, rec))  # type: ignore[union-attr]
        self._garbage.append((gen, key))

    def _latest(self, key: Key) -> Record | None:
        v = self._versions.get(key)
        if v is None or type(v) is bytes:
            return v  # type: ignore[return-value]
        return v[-1][1]  # type: ignore[index]

    def _charge(self, path: str, rec: Record, sign: int) -> None:
        """Add (+1) or remove (-1) a committed record from its owner's node count and bytes."""
        perms = self._perm_lists[_REC.unpack_from(rec)[2]]
        o = perms[0].domid
        size = node_size(path, len(rec) - _REC_SIZE, perms)
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
        Works on the packed records directly: a commit unpacks nothing it does not need.
        """
        gen = self.gen + 1
        touched_parents: set[str] = set()
        owned, owned_bytes = self.owned, self.owned_bytes
        nlog = self.log
        for path, new in writes.items():
            key = _key(path)
            cur = self._latest(key)
            if cur is None and new is None:
                continue
            if nlog is not None:
                if new is None:
                    nlog.removed(path)
                else:
                    nlog.node(path, new.value, new.perms)
            if cur is not None and new is not None:
                # An overwrite: commonly the same permission list, so the owner keeps its count
                # and only the value's size changes.
                _vgen, cgen, pid = _REC.unpack_from(cur)
                if self._perm_lists[pid] is new.perms:
                    rec = _REC.pack(gen, cgen, pid) + new.value
                    o = new.perms[0].domid
                    self.owned_bytes[o] += len(rec) - len(cur)
                    self._put_record(key, rec, gen)
                    continue
            if cur is not None:
                self._charge(path, cur, -1)
                tracked = self._users.get(_REC.unpack_from(cur)[2])
                if tracked is not None:
                    tracked.discard(key)
            if new is None:
                if path != ROOT:
                    touched_parents.add(parent(path))
                self._put_record(key, None, gen)
                continue
            node_perms = new.perms
            if cur is None:
                if path != ROOT:
                    touched_parents.add(parent(path))
                cgen = gen
            else:
                cgen = _REC.unpack_from(cur)[1]
            pid = self._perm_id(node_perms)
            tracked = self._users.get(pid)
            if tracked is not None:
                tracked.add(key)
            rec = _REC.pack(gen, cgen, pid) + new.value
            o = node_perms[0].domid  # _charge(path, rec, +1), without unpacking what we packed
            owned[o] = owned.get(o, 0) + 1
            owned_bytes[o] = owned_bytes.get(o, 0) + node_size(path, len(new.value), node_perms)
            self._put_record(key, rec, gen)
        for p in touched_parents:
            self._child_list_changed(_key(p), gen)
        self.gen = gen
        self._collect()
        return gen

    def _child_list_changed(self, key: Key, gen: int) -> None:
        """The node under ``key`` gained or lost a child in commit ``gen``: a new version with
        the same value and vgen and ``cgen = gen`` (nothing if the node itself is gone)."""
        cur = self._latest(key)
        if cur is not None:
            vgen, _cgen, pid = _REC.unpack_from(cur)
            self._put_record(key, _REC.pack(vgen, gen, pid) + cur[_REC_SIZE:], gen)

    def overwrite(self, key: Key, cur: Record, value: bytes) -> int:
        """Replace the value of a live node as a commit of its own, keeping its permissions and
        child list: what a WRITE outside a transaction to an existing node does, without a write
        set.  ``key, cur`` come from :meth:`lookup` in the same request (nothing can have changed
        in between on the single-threaded loop).  Returns the new generation."""
        gen = self.gen + 1
        _vgen, cgen, pid = _REC.unpack_from(cur)
        if self.log is not None:
            self.log.node(_path(key), value, self._perm_lists[pid])
        self.owned_bytes[self._perm_lists[pid][0].domid] += len(value) + _REC_SIZE - len(cur)
        self._put_record(key, _REC.pack(gen, cgen, pid) + value, gen)
        self.gen = gen
        if self._garbage:
            self._collect()
        return gen

    def create(self, path: str, value: bytes, perms: Perms, parent_key: Key) -> int:
        """Add a node under an existing parent (``parent_key`` from :meth:`lookup` in the same
        request) as a commit of its own: a WRITE outside a transaction creating one node.
        Returns the new generation."""
        gen = self.gen + 1
        if self.log is not None:
            self.log.node(path, value, perms)
        pid = self._perm_id(perms)
        rec = _REC.pack(gen, gen, pid) + value
        self._charge(path, rec, +1)
        key = _key(path)
        tracked = self._users.get(pid)
        if tracked is not None:
            tracked.add(key)
        self._put_record(key, rec, gen)
        self._child_list_changed(parent_key, gen)
        self.gen = gen
        if self._garbage:
            self._collect()
        return gen

    def remove(self, path: str) -> list[tuple[str, Perms]]:
        """Delete a live node (not the root) and its subtree as a commit of its own (RM outside
        a transaction), iteratively.  Returns each removed path with its permissions, top first,
        then pre-order, for watch events."""
        gen = self.gen + 1
        perm_lists = self._perm_lists
        removed: list[tuple[str, Perms]] = []
        stack = [path]
        while stack:
            p = stack.pop()
            key = _key(p)
            rec = self._latest(key)
            if rec is None:
                continue
            pid = _REC.unpack_from(rec)[2]
            removed.append((p, perm_lists[pid]))
            tracked = self._users.get(pid)
            if tracked is not None:
                tracked.discard(key)
            if self.log is not None:
                self.log.removed(p)
            stack.extend(join(p, n) for n in reversed(self.child_names(p)))
            self._charge(p, rec, -1)
            self._put_record(key, None, gen)
        self._child_list_changed(_key(parent(path)), gen)
        self.gen = gen
        self._collect()
        return removed

    def load(self, nodes: dict[str, tuple[bytes, Perms]]) -> list[str]:
        """Replace the whole tree at once (recovery): one generation, the sorted index built in
        one pass instead of 10^5 insertions.  Nodes whose parent is missing are left out and
        returned (a damaged journal must not produce an orphan nobody can list)."""
        if self._snapshots:
            raise RuntimeError("load() needs a store without open snapshots")
        gen = self.gen + 1
        pack, pid_of = _REC.pack, self._perm_id
        versions: dict[Key, Record | list[Version]] = {}
        owned: dict[int, int] = {}
        owned_bytes: dict[int, int] = {}
        orphans = []
        if ROOT not in nodes:
            nodes = {ROOT: (b"", owner_only(0)), **nodes}
        # Insertion order puts parents first (a snapshot is pre-order, and a journal creates a
        # node only under an existing parent), so one pass in that order finds the orphans.
        overhead = NODE_OVERHEAD
        pids: dict[int, int] = {}  # permission lists are shared objects: hash each one once
        for path, (value, node_perms) in nodes.items():
            b = path.encode()
            cut = b.rfind(b"/")
            if cut <= 0:
                if path != ROOT and _ROOT_KEY not in versions:
                    orphans.append(path)
                    continue
                key = b"/\0" + b[1:]
            else:
                key = b[:cut] + b"\0" + b[cut + 1 :]
                up = b[:cut]
                ucut = up.rfind(b"/")
                if ((b"/\0" + up[1:]) if ucut <= 0 else (up[:ucut] + b"\0" + up[ucut + 1 :])) not in versions:
                    orphans.append(path)
                    continue
            pid = pids.get(id(node_perms))
            if pid is None:
                pid = pids[id(node_perms)] = pid_of(node_perms)
            versions[key] = pack(gen, gen, pid) + value
            o = node_perms[0].domid
            owned[o] = owned.get(o, 0) + 1
            owned_bytes[o] = owned_bytes.get(o, 0) + overhead + len(path) + len(value) + 8 * len(node_perms)
        if orphans:
            # Out of order after all?  Sorted, a parent comes before its children.
            late, orphans = orphans, []
            for path in sorted(late):
                if _key(parent(path)) not in versions:
                    orphans.append(path)
                    continue
                value, node_perms = nodes[path]
                versions[_key(path)] = pack(gen, gen, pid_of(node_perms)) + value
                o = node_perms[0].domid
                owned[o] = owned.get(o, 0) + 1
                owned_bytes[o] = owned_bytes.get(o, 0) + node_size(path, len(value), node_perms)
        root_key = _key(ROOT)
        users: dict[int, set[Key]] = {pid: set() for pid in self._users}
        pids_of = _REC.unpack_from
        for key, rec in versions.items():
            tracked = users.get(pids_of(rec)[2])  # type: ignore[arg-type]
            if tracked is not None:
                tracked.add(key)
        self._users = users
        self._versions = versions
        keys = list(versions)
        keys.remove(root_key)
        self._index = SortedList(keys)
        self._garbage.clear()
        self.owned, self.owned_bytes = owned, owned_bytes
        self.gen = gen
        return orphans

    def naming(self, domid: int) -> list[str]:
        """Live paths whose permission list names ``domid`` (as owner or otherwise): O(distinct
        permission lists + the answer), whatever the size of the store."""
        if domid == 0:  # not tracked (see _users): the walk, for the one domain never released
            return [p for p in self.walk() if any(e.domid == 0 for e in self._latest_perms(p))]
        out: list[str] = []
        users = self._users
        for pid, node_perms in enumerate(self._perm_lists):
            keys = users.get(pid)
            if keys and any(p.domid == domid for p in node_perms):
                out.extend(_path(k) for k in keys)
        return out

    def _latest_perms(self, path: str) -> Perms:
        node = self.get(path)
        return node.perms if node is not None else ()

    def audit(self) -> tuple[dict[int, int], dict[int, int], list[str]]:
        """Recount every live node from the table itself: nodes and bytes per owner, and the
        paths whose parent is missing or which the child index lacks (both must be empty).

        One pass over the version table, O(nodes), with no tree walk: a walk from the root
        could never meet a node whose parent is gone, and a flat pass is three times faster.
        """
        counts: dict[int, int] = {}
        sizes: dict[int, int] = {}
        broken: list[str] = []
        versions, perm_lists, index = self._versions, self._perm_lists, self._index
        unpack = _REC.unpack_from
        for key, v in versions.items():
            rec = v if type(v) is bytes else v[-1][1]  # type: ignore[index]
            if rec is None:
                continue
            node_perms = perm_lists[unpack(rec)[2]]  # type: ignore[arg-type]
            o = node_perms[0].domid
            path = _path(key)
            counts[o] = counts.get(o, 0) + 1
            sizes[o] = sizes.get(o, 0) + node_size(path, len(rec) - _REC_SIZE, node_perms)  # type: ignore[arg-type]
            if key == _ROOT_KEY:
                continue  # the root: no parent, not indexed
            up = self._latest(_key(key.partition(b"\0")[0].decode()))
            if up is None or key not in index:
                broken.append(path)
        return counts, sizes, broken

    def paths(self) -> Iterable[str]:
        """Every path with a live node, in no particular order (for whole-store maintenance)."""
        return [_path(k) for k, v in self._versions.items() if self._at(v, self.gen) is not None]

    def version_count(self) -> int:
        """Stored versions including shadowed ones: lets tests see that reclamation works."""
        return sum(1 if type(v) is bytes else len(v) for v in self._versions.values())  # type: ignore[arg-type]
