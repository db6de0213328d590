"""The watch registry: which watches a change fires, found in O(depth + matches).

Watches are indexed by canonical path.  A change of ``/a/b/c`` looks up exactly the four paths
``/a/b/c``, ``/a/b``, ``/a`` and ``/``, so unrelated watches cost nothing however many there are
(C scans every watch on every write).  Special ``@`` events are looked up by their name.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from .paths import ROOT, depth_below
from .wire import XsError


@dataclass(slots=True, eq=False)
class Watch:
    owner: Hashable  # the connection
    path: str  # as the client gave it: the initial event and relative reporting use it
    cpath: str  # canonical
    token: str
    depth: int | None = None  # None: unlimited
    relative: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.cpath, self.token)

    @property
    def size(self) -> int:
        return len(self.path) + len(self.token) + 2


QUIET_PATHS_MAX = 4096


class WatchRegistry:
    def __init__(self) -> None:
        self._by_path: dict[str, list[Watch]] = {}
        self._by_owner: dict[Hashable, dict[tuple[str, str], Watch]] = {}
        # Bytes of path and token per owner: their share of the memory quota.
        self.bytes: dict[Hashable, int] = {}
        self.count = 0
        # Paths whose changes fire nothing under the current set of watches: a state key written
        # over and over then costs one set lookup instead of a walk up its ancestors.  Emptied
        # whenever a watch comes or goes; bounded.
        self._quiet: set[str] = set()

    def add(self, watch: Watch) -> None:
        mine = self._by_owner.setdefault(watch.owner, {})
        if watch.key in mine:
            raise XsError("EEXIST", "duplicate watch")
        mine[watch.key] = watch
        self._quiet.clear()
        self._by_path.setdefault(watch.cpath, []).append(watch)
        self.bytes[watch.owner] = self.bytes.get(watch.owner, 0) + watch.size
        self.count += 1

    def remove(self, owner: Hashable, cpath: str, token: str) -> Watch:
        mine = self._by_owner.get(owner)
        watch = mine.pop((cpath, token), None) if mine else None
        if watch is None:
            raise XsError("ENOENT", "no such watch")
        self._unindex(watch)
        return watch

    def _unindex(self, watch: Watch) -> None:
        self._quiet.clear()
        left = self.bytes.get(watch.owner, 0) - watch.size
        if left > 0:
            self.bytes[watch.owner] = left
        else:
            self.bytes.pop(watch.owner, None)
        lst = self._by_path[watch.cpath]
        lst.remove(watch)
        if not lst:
            del self._by_path[watch.cpath]
        self.count -= 1

    def remove_all(self, owner: Hashable) -> int:
        """Drop every watch of a connection (close, RESET_WATCHES, domain release)."""
        mine = self._by_owner.pop(owner, None)
        if not mine:
            return 0
        for watch in mine.values():
            self._unindex(watch)
        return len(mine)

    def owned_by(self, owner: Hashable) -> list[Watch]:
        mine = self._by_owner.get(owner)
        return list(mine.values()) if mine else []

    def count_of(self, owner: Hashable) -> int:
        mine = self._by_owner.get(owner)
        return len(mine) if mine else 0

    def matching(self, path: str, exact: bool = False) -> list[Watch]:
        """Watches a change of the node ``path`` fires.

        ``exact``: only watches placed on ``path`` itself (descendants removed by RM).
        Depth-limited watches fire only for changes at most ``depth`` levels below them.
        """
        by_path = self._by_path
        if exact:
            return list(by_path.get(path, ()))
        out: list[Watch] = []
        if not by_path:
            return out
        anc = path
        while True:  # the path, then each ancestor up to '/': one dict lookup per level
            lst = by_path.get(anc)
            if lst:
                for w in lst:
                    if w.depth is None or depth_below(path, anc) <= w.depth:
                        out.append(w)
            if anc == ROOT:
                return out
            cut = anc.rfind("/")
            anc = anc[:cut] if cut > 0 else ROOT

    def may_fire(self, path: str) -> bool:
        """Whether a (non-exact) change of ``path`` fires any watch; False is remembered."""
        if not self.count or path in self._quiet:
            return False
        if self.matching(path):
            return True
        if len(self._quiet) >= QUIET_PATHS_MAX:
            self._quiet.clear()
        self._quiet.add(path)
        return False

    def matching_special(self, name: str, domid: int | None) -> list[tuple[Watch, str]]:
        """Watches for ``@introduceDomain``/``@releaseDomain`` and the event path each gets.

        Plain watches (no depth) hear the bare name; watches with depth >= 1 hear
        ``name/<domid>``; a watch on ``name/<domid>`` hears only that domain.
        """
        out: list[tuple[Watch, str]] = []
        for w in self._by_path.get(name, ()):
            if w.depth is None or w.depth == 0 or domid is None:
                out.append((w, name))
            else:
                out.append((w, f"{name}/{domid}"))
        if domid is not None:
            specific = f"{name}/{domid}"
            for w in self._by_path.get(specific, ()):
                out.append((w, specific))
        return out

    def all(self) -> list[Watch]:
        return [w for lst in self._by_path.values() for w in lst]


__all__ = ["ROOT", "Watch", "WatchRegistry"]
