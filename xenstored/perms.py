"""Node permissions: the ``n0 r5 b7`` lists, and who may read or write a node.

Entry 0 names the owner (who always has full access) and, through its letter, what every
unlisted domain gets.  Later entries grant per-domain access; the first entry matching the
connection's domain or its SET_TARGET target wins, as in C.  Access depends on the node's own
list only: there is no traversal check through ancestors.
"""

from __future__ import annotations

from typing import NamedTuple

from .wire import DOMID_ANY, XsError

NONE = 0
READ = 1
WRITE = 2
BOTH = READ | WRITE

_LETTER_TO_ACCESS = {"n": NONE, "r": READ, "w": WRITE, "b": BOTH}
_ACCESS_TO_LETTER = {v: k for k, v in _LETTER_TO_ACCESS.items()}

DOMID_MAX = 0xFFFF


class Perm(NamedTuple):
    """One entry of a permission list.  A named tuple, not a dataclass: permission lists are
    dictionary keys on every commit (the store numbers distinct lists), and a tuple hashes and
    compares in C where a dataclass calls Python methods per entry."""

    domid: int
    access: int
    # Stale entry (its domain is gone or unknown): listed by GET_PERMS, grants nothing.
    ignore: bool = False

    def format(self) -> str:
        return f"{_ACCESS_TO_LETTER[self.access]}{self.domid}"


Perms = tuple[Perm, ...]


def owner_only(domid: int) -> Perms:
    """``n<domid>``: what the initial tree and new domain homes start with."""
    return (Perm(domid, NONE),)


def _parse_id(text: str) -> int:
    """C's strtol(s, &end, 0) with the rule that the whole string must be consumed."""
    s = text
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    try:
        if s[:2] in ("0x", "0X"):
            value = int(s, 0) if s[2:] else None
        elif len(s) > 1 and s[0] == "0":
            value = int(s[1:], 8)
        else:
            value = int(s, 10)
    except ValueError:
        value = None
    if value is None or not s or not s.isascii() or "_" in s or s.strip() != s:
        raise XsError("EINVAL", f"bad domain id in permission {text!r}")
    value *= sign
    if not 0 <= value <= DOMID_MAX:
        raise XsError("EINVAL", f"domain id out of range in permission {text!r}")
    return value


def parse_one(entry: bytes) -> Perm:
    try:
        text = entry.decode("ascii")
    except UnicodeDecodeError:
        raise XsError("EINVAL", "permission is not ASCII") from None
    if len(text) < 2 or text[0] not in _LETTER_TO_ACCESS:
        raise XsError("EINVAL", f"bad permission {text!r}")
    return Perm(_parse_id(text[1:]), _LETTER_TO_ACCESS[text[0]])


def parse(entries: list[bytes]) -> Perms:
    """Permission strings from SET_PERMS; at least one entry (the owner)."""
    if not entries:
        raise XsError("EINVAL", "no permissions given")
    return tuple(parse_one(e) for e in entries)


def format_list(perms: Perms) -> bytes:
    """GET_PERMS reply: every entry NUL-terminated, stale ones included (as C lists them)."""
    return "".join(p.format() + "\0" for p in perms).encode("ascii")


def access_for(perms: Perms, domid: int, target: int | None = None) -> int:
    """The access bits ``domid`` (acting also for ``target``) has on a node with ``perms``."""
    owner = perms[0]
    if owner.domid == domid or (target is not None and owner.domid == target):
        return BOTH
    for p in perms[1:]:
        if p.ignore:
            continue
        if p.domid == domid or p.domid == DOMID_ANY or (target is not None and p.domid == target):
            return p.access
    if owner.domid == DOMID_ANY and not owner.ignore:
        return BOTH
    return owner.access


def allows(perms: Perms, domid: int, target: int | None, want: int) -> bool:
    """True if every bit of ``want`` is granted."""
    return access_for(perms, domid, target) & want == want


def allows_any(perms: Perms, domid: int, target: int | None, want: int) -> bool:
    """True if any bit of ``want`` is granted: C's rule for choosing EACCES over ENOENT."""
    return bool(access_for(perms, domid, target) & want)


def is_owner(perms: Perms, domid: int, target: int | None = None) -> bool:
    owner = perms[0].domid
    return owner == domid or (target is not None and owner == target)


def with_owner(perms: Perms, domid: int) -> Perms:
    """Copy of ``perms`` with entry 0's domain replaced: how an unprivileged creator takes
    ownership of a new node while keeping the parent's "others" letter."""
    return (Perm(domid, perms[0].access),) + perms[1:]


def without_domain(perms: Perms, domid: int) -> Perms | None:
    """Drop non-owner entries naming ``domid`` (dead domain cleanup); None if nothing changed."""
    kept = tuple(p for i, p in enumerate(perms) if i == 0 or p.domid != domid)
    return kept if len(kept) != len(perms) else None
