"""The XenStore state stream (docs/designs/xenstore-migration.md): encode, decode, dump, restore.

One format serves live update (the new daemon inherits every file descriptor and reads the stream
the old one wrote), persistence across restarts, and interchange with cxenstored's live-update
dump.  Records are 8-byte aligned ``type, len, body``; unknown types are skipped, which is how we
carry what the upstream format has no room for (the remote event-channel port of a ring, the
live-update bookkeeping) in private record types without breaking other readers.

Encoding and decoding are pure functions over dataclasses; :func:`dump_core` and
:func:`restore_core` translate between those and a running Core.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from . import paths, quota
from .core import Core
from .domains import DomainManager
from .ops import handle
from .perms import Perm, Perms
from .store import Node
from .transactions import Transaction
from .watches import Watch
from .wire import DOMID_INVALID

MAGIC = b"xenstore"
VERSION = 2

REC_END = 0
REC_GLOBAL = 1
REC_CONNECTION = 2
REC_WATCH = 3
REC_TRANSACTION = 4
REC_NODE = 5
REC_GLOBAL_QUOTA = 6
REC_DOMAIN = 7
REC_WATCH_EXT = 8
# Private records (skipped by other readers): ring details the upstream CONNECTION record lacks.
REC_PRIV_RING = 0x78730001
REC_PRIV_HV = 0x78730002  # the emulated hypervisor's domain table (it outlives a daemon process)

CONN_RING = 0
CONN_SOCKET = 1
DEPTH_UNLIMITED = 0xFFFF
PERM_IGNORE = 0x01

_ACCESS_LETTER = {0: ord("n"), 1: ord("r"), 2: ord("w"), 3: ord("b")}
_LETTER_ACCESS = {v: k for k, v in _ACCESS_LETTER.items()}


class StreamError(Exception):
    """The stream is not a XenStore state stream or is truncated/corrupt."""


@dataclass
class GlobalData:
    socket_fd: int = -1
    evtchn_fd: int = -1


@dataclass
class ConnectionData:
    conn_id: int
    socket: bool
    domid: int = 0
    target: int | None = None
    evtchn: int = 0  # the server's (local) port
    socket_fd: int = -1
    in_data: bytes = b""
    out_data: bytes = b""
    out_resp_len: int = 0


@dataclass
class WatchData:
    conn_id: int
    path: str
    token: str
    depth: int | None = None


@dataclass
class NodeData:
    path: str
    value: bytes
    perms: Perms


@dataclass
class QuotaData:
    """GLOBAL_QUOTA (domid None) or DOMAIN record."""

    values: dict[str, int]
    domid: int | None = None
    features: int = 0
    global_values: dict[str, int] = field(default_factory=dict)


@dataclass
class RingData:
    conn_id: int
    domid: int
    remote_port: int
    local_port: int
    gfn: int
    ignored: bool = False
    shutdown_reported: bool = False


@dataclass
class State:
    globals: GlobalData = field(default_factory=GlobalData)
    connections: list[ConnectionData] = field(default_factory=list)
    watches: list[WatchData] = field(default_factory=list)
    nodes: list[NodeData] = field(default_factory=list)
    global_quota: QuotaData | None = None
    domains: list[QuotaData] = field(default_factory=list)
    rings: list[RingData] = field(default_factory=list)
    hv_state: bytes = b""  # opaque, from Hypervisor.export_state()


# ----------------------------------------------------------------------------- encoding
_E = "<" if sys.byteorder == "little" else ">"  # records in native order; flags say which


def _pad(body: bytes) -> bytes:
    return body + b"\0" * (-len(body) % 8)


def _record(rtype: int, body: bytes) -> bytes:
    body = _pad(body)
    return struct.pack(_E + "II", rtype, len(body)) + body


def _perms_bytes(perms: Perms) -> bytes:
    return b"".join(
        struct.pack(_E + "BBH", _ACCESS_LETTER[p.access], PERM_IGNORE if p.ignore else 0, p.domid) for p in perms
    )


def _quota_body(values: dict[str, int]) -> tuple[bytes, bytes]:
    names = list(values)
    vals = b"".join(struct.pack(_E + "I", values[n] & 0xFFFFFFFF) for n in names)
    return vals, b"".join(n.encode() + b"\0" for n in names)


def encode(state: State) -> Iterator[bytes]:
    """The stream as chunks (a 100k-node store need not exist twice in memory)."""
    flags = 0 if _E == "<" else 1
    yield MAGIC + struct.pack(">I", VERSION) + struct.pack(_E + "I", flags)
    g = state.globals
    yield _record(REC_GLOBAL, struct.pack(_E + "ii", g.socket_fd, g.evtchn_fd))
    if state.global_quota is not None:
        gq = state.global_quota
        dom_vals, dom_names = _quota_body(gq.values)
        glob_vals, glob_names = _quota_body(gq.global_values)
        body = struct.pack(_E + "HH", len(gq.values), len(gq.global_values)) + dom_vals + glob_vals
        yield _record(REC_GLOBAL_QUOTA, body + dom_names + glob_names)
    watches_by_conn: dict[int, list[WatchData]] = {}
    for w in state.watches:
        watches_by_conn.setdefault(w.conn_id, []).append(w)
    for c in state.connections:
        if c.socket:
            spec = struct.pack(_E + "iI", c.socket_fd, 0)
        else:
            target = DOMID_INVALID if c.target is None else c.target
            spec = struct.pack(_E + "HHI", c.domid, target, c.evtchn)
        head = struct.pack(_E + "IHH", c.conn_id, CONN_SOCKET if c.socket else CONN_RING, 0) + spec
        head += struct.pack(_E + "HHI", len(c.in_data), c.out_resp_len, len(c.out_data))
        yield _record(REC_CONNECTION, head + c.in_data + c.out_data)
        for w in watches_by_conn.get(c.conn_id, ()):
            wp, tk = w.path.encode("latin-1") + b"\0", w.token.encode("latin-1") + b"\0"
            depth = DEPTH_UNLIMITED if w.depth is None else w.depth
            yield _record(REC_WATCH_EXT, struct.pack(_E + "IHHHH", w.conn_id, len(wp), len(tk), depth, 0) + wp + tk)
    for n in state.nodes:
        p = n.path.encode("ascii") + b"\0"
        head = struct.pack(_E + "IIHHHH", 0, 0, len(p), len(n.value), 0, len(n.perms))
        yield _record(REC_NODE, head + _perms_bytes(n.perms) + p + n.value)
    for d in state.domains:
        vals, names = _quota_body(d.values)
        assert d.domid is not None
        yield _record(REC_DOMAIN, struct.pack(_E + "HHI", d.domid, len(d.values), d.features) + vals + names)
    for r in state.rings:
        flags = (1 if r.ignored else 0) | (2 if r.shutdown_reported else 0)
        body = struct.pack(_E + "IHHIIQI", r.conn_id, r.domid, 0, r.remote_port, r.local_port, r.gfn, flags)
        yield _record(REC_PRIV_RING, body)
    if state.hv_state:
        yield _record(REC_PRIV_HV, struct.pack(_E + "I", len(state.hv_state)) + state.hv_state)
    yield _record(REC_END, b"")


def encode_bytes(state: State) -> bytes:
    return b"".join(encode(state))


# ----------------------------------------------------------------------------- decoding
def _names(buf: bytes, offset: int, count: int) -> tuple[list[str], int]:
    out = []
    for _ in range(count):
        end = buf.index(b"\0", offset)
        out.append(buf[offset:end].decode("ascii"))
        offset = end + 1
    return out, offset


def decode(data: bytes) -> State:
    """Parse a stream; raises StreamError on anything malformed (never a bare struct.error)."""
    try:
        return _decode(memoryview(data).tobytes())
    except StreamError:
        raise
    except (struct.error, ValueError, IndexError, UnicodeDecodeError, KeyError) as e:
        raise StreamError(f"corrupt state stream: {e}") from None


def _decode(data: bytes) -> State:
    if len(data) < 16 or data[:8] != MAGIC:
        raise StreamError("not a XenStore state stream")
    version = struct.unpack_from(">I", data, 8)[0]
    if version not in (1, 2):
        raise StreamError(f"unsupported stream version {version}")
    flags = struct.unpack_from("<I", data, 12)[0]
    e = ">" if flags & 1 else "<"
    state = State()
    pos = 16
    while True:
        if pos + 8 > len(data):
            raise StreamError("stream ends without END record")
        rtype, length = struct.unpack_from(e + "II", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise StreamError("truncated record")
        pos += 8 + length
        pos += -pos % 8
        if rtype == REC_END:
            return state
        if rtype == REC_GLOBAL:
            state.globals = GlobalData(*struct.unpack_from(e + "ii", body, 0))
        elif rtype == REC_CONNECTION:
            conn_id, ctype, _fields = struct.unpack_from(e + "IHH", body, 0)
            in_len, resp_len, out_len = struct.unpack_from(e + "HHI", body, 16)
            in_data = body[24 : 24 + in_len]
            out_data = body[24 + in_len : 24 + in_len + out_len]
            if ctype == CONN_SOCKET:
                (fd,) = struct.unpack_from(e + "i", body, 8)
                c = ConnectionData(conn_id, True, socket_fd=fd)
            else:
                domid, target, evtchn = struct.unpack_from(e + "HHI", body, 8)
                c = ConnectionData(
                    conn_id, False, domid=domid, target=None if target == DOMID_INVALID else target, evtchn=evtchn
                )
            c.in_data, c.out_data, c.out_resp_len = in_data, out_data, resp_len
            state.connections.append(c)
        elif rtype in (REC_WATCH, REC_WATCH_EXT):
            if rtype == REC_WATCH:
                conn_id, plen, tlen = struct.unpack_from(e + "IHH", body, 0)
                depth, off = DEPTH_UNLIMITED, 8
            else:
                conn_id, plen, tlen, depth, _ = struct.unpack_from(e + "IHHHH", body, 0)
                off = 12
            path = body[off : off + plen].rstrip(b"\0").decode("latin-1")
            token = body[off + plen : off + plen + tlen].rstrip(b"\0").decode("latin-1")
            state.watches.append(WatchData(conn_id, path, token, None if depth == DEPTH_UNLIMITED else depth))
        elif rtype == REC_NODE:
            conn_id, _tx, plen, vlen, _access, nperms = struct.unpack_from(e + "IIHHHH", body, 0)
            if conn_id:
                continue  # a transaction's pending node: transactions are not carried over
            perms = []
            off = 16
            for _ in range(nperms):
                letter, pflags, domid = struct.unpack_from(e + "BBH", body, off)
                perms.append(Perm(domid, _LETTER_ACCESS[letter], bool(pflags & PERM_IGNORE)))
                off += 4
            path = body[off : off + plen].rstrip(b"\0").decode("ascii")
            value = body[off + plen : off + plen + vlen]
            state.nodes.append(NodeData(path, value, tuple(perms)))
        elif rtype == REC_GLOBAL_QUOTA:
            n_dom, n_glob = struct.unpack_from(e + "HH", body, 0)
            vals = struct.unpack_from(e + f"{n_dom + n_glob}I", body, 4)
            names, _ = _names(body, 4 + 4 * (n_dom + n_glob), n_dom + n_glob)
            state.global_quota = QuotaData(
                dict(zip(names[:n_dom], vals[:n_dom], strict=True)),
                global_values=dict(zip(names[n_dom:], vals[n_dom:], strict=True)),
            )
        elif rtype == REC_DOMAIN:
            domid, n, features = struct.unpack_from(e + "HHI", body, 0)
            vals = struct.unpack_from(e + f"{n}I", body, 8)
            names, _ = _names(body, 8 + 4 * n, n)
            state.domains.append(QuotaData(dict(zip(names, vals, strict=True)), domid=domid, features=features))
        elif rtype == REC_PRIV_RING:
            conn_id, domid, _pad0, remote, local, gfn, rflags = struct.unpack_from(e + "IHHIIQI", body, 0)
            state.rings.append(RingData(conn_id, domid, remote, local, gfn, bool(rflags & 1), bool(rflags & 2)))
        elif rtype == REC_PRIV_HV:
            (n,) = struct.unpack_from(e + "I", body, 0)
            state.hv_state = body[4 : 4 + n]
        # REC_TRANSACTION and unknown types: skipped.


# ----------------------------------------------------------------------------- core <-> state
def snapshot_nodes(core: Core, snap: int | None = None) -> Iterator[NodeData]:
    """Every node pre-order from '/', then the special paths (as C writes them).

    With ``snap`` (an open snapshot generation) the walk reads that snapshot, so a caller may
    interleave it with other work, even writes, and still get one consistent tree: the MVCC
    store keeps the versions it needs until the snapshot is closed."""
    store = core.store
    if snap is None:
        get, names = store.get, store.child_names
    else:
        def get(p: str) -> Node | None:
            return store.get_at(p, snap)

        def names(p: str) -> list[str]:
            return store.child_names(p, snap)

    stack = [paths.ROOT]
    while stack:
        path = stack.pop()
        node = get(path)
        if node is None:
            continue
        yield NodeData(path, node.value, node.perms)
        stack.extend(paths.join(path, n) for n in reversed(names(path)))
    for name in (paths.RELEASE_DOMAIN, paths.INTRODUCE_DOMAIN):
        yield NodeData(name, b"", core.special_perms[name])


def dump_core(core: Core, sockets: dict[int, int] | None = None, *, listen_fd: int = -1, evtchn_fd: int = -1,
              nodes: Iterable[NodeData] | None = None) -> State:
    """The whole daemon state.  ``sockets`` maps connection ids to the fds the next process will
    inherit; socket connections without one (a restart, not a live update) are left out."""
    sockets = sockets or {}
    state = State(GlobalData(listen_fd, evtchn_fd))
    state.global_quota = QuotaData(
        {n: v for n, v in core.config.quotas.values.items() if n != "soft-memory"},
        global_values={"soft-memory": core.config.quotas.values["soft-memory"]},
    )
    for conn in core.connections.values():
        if conn.is_socket and conn.id not in sockets:
            continue
        out = conn.peek_output()
        dom = core.domains.get(conn.domid)
        c = ConnectionData(
            conn.id,
            conn.is_socket,
            domid=conn.domid,
            target=conn.domain.target,
            evtchn=(dom.local_port or 0) if dom is not None else 0,
            socket_fd=sockets.get(conn.id, -1),
            in_data=conn.parser.pending_bytes(),
            out_data=out,
            out_resp_len=conn.partial_output(),
        )
        state.connections.append(c)
        for w in core.watches.owned_by(conn):
            state.watches.append(WatchData(conn.id, w.path, w.token, w.depth))
        if not conn.is_socket and dom is not None and dom.local_port is not None:
            state.rings.append(
                RingData(conn.id, dom.domid, dom.port or 0, dom.local_port, dom.gfn, dom.ignored, dom.shutdown_reported)
            )
    state.nodes = list(snapshot_nodes(core)) if nodes is None else list(nodes)
    for dom in core.domains.values():
        state.domains.append(QuotaData(dict(dom.quotas.values), domid=dom.domid, features=dom.features))
    hv = core.hypervisor
    export = getattr(hv, "export_state", None)
    if export is not None:
        state.hv_state = export()
    return state


def restore_tree(core: Core, state: State) -> None:
    """Replace the store's contents and the global/domain settings with the stream's."""
    store = core.store
    txn = Transaction(store, implicit=True)
    seen = set()
    for n in state.nodes:
        if paths.is_special(n.path):
            core.special_perms[n.path] = n.perms
            continue
        if n.path != paths.ROOT and paths.parent(n.path) not in seen and store.get(paths.parent(n.path)) is None:
            raise StreamError(f"node {n.path} arrives before its parent")
        txn.put(n.path, n.value, n.perms, existed=store.get(n.path) is not None)
        seen.add(n.path)
    # Nodes the stream does not mention are gone.
    for path in list(store.walk()):
        if path not in seen and path != paths.ROOT and txn.get(path) is not None:
            txn.remove_tree(path)
    txn.changes.clear()  # a restore is not a change anyone watches
    txn.commit()
    if state.global_quota is not None:
        for name, value in {**state.global_quota.values, **state.global_quota.global_values}.items():
            if name in quota.DEFAULTS or name in quota.ALIASES:
                core.config.quotas.set(name, value)
    for d in state.domains:
        assert d.domid is not None
        dom = core.domain(d.domid)
        dom.features = d.features
        for name, value in d.values.items():
            if name in quota.DEFAULTS or name in quota.ALIASES:
                dom.quotas.set(name, value)



def restore_connections(
    core: Core, manager: DomainManager | None, state: State, *, rebind: bool
) -> list[tuple[int, int]]:
    """Recreate connections, their watches and pending I/O.  Returns (connection id, socket fd)
    pairs for the edge to serve; ring connections are re-attached through the domain manager."""
    rings = {r.conn_id: r for r in state.rings}
    by_old_id = {}
    sockets: list[tuple[int, int]] = []
    for c in state.connections:
        if c.socket:
            if c.socket_fd < 0:
                continue
            conn = core.new_connection(socket=True)
            sockets.append((conn.id, c.socket_fd))
        else:
            r = rings.get(c.conn_id)
            if manager is None or r is None:
                continue
            conn = manager.restore_ring(
                r.domid,
                r.gfn,
                r.remote_port,
                r.local_port,
                ignored=r.ignored,
                shutdown_reported=r.shutdown_reported,
                target=c.target,
                rebind=rebind,
            )
            if conn is None:
                continue
        by_old_id[c.conn_id] = (conn, c)
    for w in state.watches:
        entry = by_old_id.get(w.conn_id)
        if entry is None:
            continue
        conn = entry[0]
        cpath = paths.canonicalize_any(w.path, conn.home)
        relative = paths.is_relative(w.path)
        core.watches.add(Watch(conn, w.path, cpath, w.token, w.depth, relative))
    for conn, c in by_old_id.values():
        conn.queue_raw(c.out_data)
        if c.in_data:
            handle(core, conn, c.in_data)
    return sockets
