"""XenStore path syntax: validation, canonical form, relative paths and special ``@`` names.

Paths are kept as ``str`` internally: the allowed alphabet is ASCII, so byte order and ``str``
order agree, which lets the store's sorted index list children in the byte order Part A promises.
"""

from __future__ import annotations

import re

from .wire import XsError

INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_NAMES = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

# Allowed bytes: A-Z a-z 0-9 - / _ @ (xenstore.txt); '.' is not among them.
_VALID = re.compile(r"[A-Za-z0-9/_@-]*\Z")
_DOMAIN_HOME = re.compile(r"/local/domain/[0-9]{1,5}/")
_SPECIAL_SUFFIX = re.compile(r"/(0|[1-9][0-9]{0,4})\Z")
# An absolute path already in canonical form: one match accepts the common case; anything else
# goes through the checks that say what is wrong.
_CANONICAL = re.compile(r"/(?:[A-Za-z0-9_@-]+(?:/[A-Za-z0-9_@-]+)*)?\Z")

# The same two forms matched on the request's bytes (a match also proves them ASCII): an
# absolute canonical path, and a relative one that is canonical once put below a home.
_CANONICAL_BYTES = re.compile(rb"/(?:[A-Za-z0-9_@-]+(?:/[A-Za-z0-9_@-]+)*)?\Z")
_RELATIVE_BYTES = re.compile(rb"[A-Za-z0-9_-][A-Za-z0-9_@-]*(?:/[A-Za-z0-9_@-]+)*\Z")

ROOT = "/"


def home_of(domid: int) -> str:
    return f"/local/domain/{domid}"


def decode(raw: bytes) -> str:
    """Bytes from the wire to a path string; anything outside ASCII is simply an invalid path."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise XsError("EINVAL", "path is not ASCII") from None


def _check_absolute(path: str) -> None:
    if not _VALID.match(path):
        raise XsError("EINVAL", "invalid character in path")
    if path != ROOT:
        if path.endswith("/"):
            raise XsError("EINVAL", "trailing slash")
        if "//" in path:
            raise XsError("EINVAL", "empty path component")


def canonicalize(path: str, home: str) -> str:
    """Absolute, validated form of a node path; relative paths hang below ``home``.

    ``@`` names are not nodes: operations on nodes refuse them with EINVAL.
    """
    if not path:
        raise XsError("EINVAL", "empty path")
    first = path[0]
    if first == "/":
        if _CANONICAL.match(path):
            return path
    elif first == "@":
        raise XsError("EINVAL", "special path not allowed here")
    else:
        path = f"{home}/{path}"
    _check_absolute(path)
    return path


# Paths requests named recently, as canonicalize_wire found them: clients name the same few
# keys again and again (a state key, a guest's device directory), and a dict look-up costs a
# third of the match, decode and join it replaces.  Only valid paths are kept; each cache is
# emptied when full, so a client naming ever new paths costs one clear per WIRE_CACHE_MAX of them
# and the memory stays bounded (about 1 MiB for both).
WIRE_CACHE_MAX = 4096
_absolute: dict[bytes, str] = {}
_relative: dict[tuple[str, bytes], str] = {}


def canonicalize_wire(raw: bytes, home: str) -> str:
    """``canonicalize(decode(raw), home)`` for a path as a request carries it: a path seen
    recently comes from a cache; one already in canonical form, absolute or relative
    (test-xenstore's, a guest's), is accepted by one match on the bytes, with no decode error to
    catch and no second check of the joined path; anything else takes the general way, which
    says what is wrong.

    The absolute and relative branches are spelt out, not one helper called with a cache, a key,
    a pattern and a builder: this runs for every request, and the call would cost each one more
    than the look-up it wraps."""
    if raw[:1] == b"/":
        path = _absolute.get(raw)
        if path is None:
            if not _CANONICAL_BYTES.match(raw):
                return canonicalize(decode(raw), home)
            if len(_absolute) >= WIRE_CACHE_MAX:
                _absolute.clear()
            path = _absolute[raw] = raw.decode("ascii")
        return path
    key = (home, raw)
    path = _relative.get(key)
    if path is None:
        if not _RELATIVE_BYTES.match(raw):
            return canonicalize(decode(raw), home)
        if len(_relative) >= WIRE_CACHE_MAX:
            _relative.clear()
        path = _relative[key] = f"{home}/{raw.decode('ascii')}"
    return path


def is_special(path: str) -> bool:
    return path.startswith("@")


def canonicalize_special(path: str) -> str:
    """Validate ``@introduceDomain``/``@releaseDomain`` with an optional ``/<domid>`` suffix."""
    if not _VALID.match(path):
        raise XsError("EINVAL", "invalid character in special path")
    for name in SPECIAL_NAMES:
        if path == name:
            return path
        if path.startswith(name) and _SPECIAL_SUFFIX.match(path, len(name)):
            return path
    raise XsError("EINVAL", "unknown special path")


def canonicalize_any(path: str, home: str) -> str:
    """For WATCH/UNWATCH/GET_PERMS/SET_PERMS, which also take the special names."""
    if path.startswith("@"):
        return canonicalize_special(path)
    return canonicalize(path, home)


def effective_length(path: str) -> int:
    """Length that counts against path-max: the part below ``/local/domain/<id>/`` if any.

    Measuring below the home keeps a guest's paths valid when it migrates to another domid.
    """
    m = _DOMAIN_HOME.match(path)
    return len(path) - (m.end() if m else 0)


def parent(path: str) -> str:
    """Parent of a non-root absolute path."""
    idx = path.rfind("/")
    return ROOT if idx <= 0 else path[:idx]


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def join(parent_path: str, name: str) -> str:
    return f"/{name}" if parent_path == ROOT else f"{parent_path}/{name}"


def ancestors(path: str) -> list[str]:
    """``path`` then each ancestor up to ``/``: the watch paths a change of ``path`` can fire."""
    out = [path]
    while path != ROOT:
        path = parent(path)
        out.append(path)
    return out


def depth_below(path: str, ancestor: str) -> int:
    """How many levels ``path`` lies below ``ancestor`` (0 when equal)."""
    if path == ancestor:
        return 0
    if ancestor == ROOT:
        return path.count("/")
    return path.count("/") - ancestor.count("/")


def is_descendant_or_self(path: str, ancestor: str) -> bool:
    if path == ancestor:
        return True
    if ancestor == ROOT:
        return path.startswith("/")
    return path.startswith(ancestor + "/")


def relative_to(path: str, home: str) -> str:
    """Event path as seen by a watch registered relative to ``home``."""
    prefix = home + "/"
    if path.startswith(prefix):
        return path[len(prefix) :]
    return path


def is_relative(raw: str) -> bool:
    """A path as a client gave it is relative to its home unless absolute or special: a watch
    placed that way reports its events relative again."""
    return not raw.startswith("/") and not raw.startswith("@")
