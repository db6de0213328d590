"""The dispatcher: what every wire operation does.  One handler per op, found in ``HANDLERS``.

A handler gets the connection, the request and (for node operations) the transaction to run in,
and returns the reply payload or raises :class:`XsError`.  Mutating requests outside a client
transaction run in an implicit one committed right after the handler, so a request that fails
half-way changes nothing.  Watch events a request causes are queued before its reply (as C); the
initial event of WATCH follows its ``OK``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import perf_counter_ns

from . import paths, perms, quota
from .connection import Connection
from .control import control
from .core import Core
from .metrics import BUCKET_TABLE, ERROR_INDEX, TABLE_SHIFT, UNKNOWN_OP, bucket_of
from .perms import READ, WRITE, Perms
from .store import Node, node_size
from .transactions import Conflict, Transaction
from .watches import Watch
from .wire import (
    DOMID_ANY,
    DOMID_SELF,
    FEATURE_WATCHDEPTH,
    HEADER,
    HEADER_SIZE,
    PAYLOAD_MAX,
    Message,
    Op,
    XsError,
    atoi,
    error_payload,
    parse_domid,
    single_arg,
    split_args,
)

log = logging.getLogger("xenstored.ops")

OK = b"OK\0"

Handler = Callable[[Core, Connection, Message, Transaction], "bytes | None"]


# ----------------------------------------------------------------------------- arguments
def node_path(conn: Connection, raw: bytes) -> str:
    """Canonical node path from a request argument, with the unprivileged path-max rule."""
    path = paths.canonicalize_wire(raw, conn.home)
    if not (conn.privileged or conn.is_socket):
        _check_path_max(conn, path)
    return path


def _check_path_max(conn: Connection, path: str) -> None:
    if conn.privileged or conn.is_socket:
        return
    limit = conn.domain.quotas.values["path-max"]
    # quota.exceeds(limit, effective_length(path)), without the pattern match for the usual
    # path no longer than the limit (the effective length never exceeds the full length).
    if limit and len(path) > limit and paths.effective_length(path) > limit:
        raise XsError("EINVAL", "path too long")


def check_memory(core: Core, conn: Connection, extra: int, what: str) -> None:
    """Hard memory quota (refuse) and soft quota (warn) for an unprivileged domain growing by
    ``extra`` bytes."""
    if conn.privileged:
        return
    q = conn.domain.quotas
    usage = core.memory_usage(conn) + extra
    if quota.exceeds(q["memory"], usage):
        raise _refuse(core, conn, "memory", q["memory"], usage, what)
    if quota.exceeds(q["soft-memory"], usage):
        core.refusals.warn_soft(conn.domid, q["soft-memory"], usage)


def _refuse(core: Core, conn: Connection, name: str, limit: int, value: int, what: str = "") -> XsError:
    core.refusals.refuse(conn.domid, name, limit, value, what)
    return XsError("ENOSPC", f"{name} quota")


# ----------------------------------------------------------------------------- permissions
def can(core: Core, conn: Connection, node_perms: Perms, want: int) -> bool:
    return (
        conn.privileged
        or perms.allows(node_perms, conn.domid, conn.target, want)
        or not core.config.perms_activate
    )


def _disclose(conn: Connection, txn: Transaction, path: str, name: str, want: int) -> XsError:
    """C's rule (§3.5): an error about ``path`` becomes EACCES unless the nearest existing
    ancestor grants the caller some of ``want`` — so probing for missing nodes under a node one
    cannot read reveals nothing."""
    if conn.privileged or name == "EACCES":
        return XsError(name)
    p = path
    while p != paths.ROOT:
        p = paths.parent(p)
        node = txn.get(p)
        if node is not None:
            if perms.allows_any(node.perms, conn.domid, conn.target, want):
                return XsError(name)
            return XsError("EACCES")
    return XsError(name)


def get_node(core: Core, conn: Connection, txn: Transaction, path: str, want: int) -> Node:
    node = txn.get(path)
    if node is None:
        raise _disclose(conn, txn, path, "ENOENT", want)
    if not can(core, conn, node.perms, want):
        raise XsError("EACCES")
    return node


# ----------------------------------------------------------------------------- node creation
def _check_node_size(core: Core, conn: Connection, value: bytes, node_perms: Perms) -> None:
    if conn.privileged:
        return
    limit = conn.domain.quotas["node-size"]
    size = len(value) + 8 * len(node_perms)
    if quota.exceeds(limit, size):
        raise _refuse(core, conn, "node-size", limit, size)


def _check_creation(
    core: Core, conn: Connection, txn: Transaction | None, missing: list[str], value: bytes, anc_perms: Perms
) -> tuple[Perms, int]:
    """Permission and quota checks for creating ``missing`` (the node first, then its missing
    ancestors) below an existing ancestor: returns the new nodes' permissions and the bytes they
    cost their owner."""
    if not can(core, conn, anc_perms, WRITE):
        raise XsError("EACCES")
    if conn.privileged:
        return anc_perms, 0
    new_perms = perms.with_owner(anc_perms, conn.domid)
    _check_node_size(core, conn, value, new_perms)
    path = missing[0]
    limit = conn.domain.quotas["nodes"]
    count = core.store.owned.get(conn.domid, 0) + len(missing) + (txn.owned_delta if txn else 0)
    if quota.exceeds(limit, count):
        raise _refuse(core, conn, "nodes", limit, count, path)
    size = sum(node_size(p, len(value) if p == path else 0, new_perms) for p in missing)
    check_memory(core, conn, size, path)
    return new_perms, size


def create_node(core: Core, conn: Connection, txn: Transaction, path: str, value: bytes) -> None:
    """Create ``path`` and any missing ancestors, inheriting the deepest existing ancestor's
    permissions; an unprivileged creator becomes the owner (C rule).  Only ``path`` fires."""
    missing = [path]
    p = path
    while True:
        p = paths.parent(p)
        anc = txn.get(p)
        if anc is not None:
            break
        missing.append(p)
    if conn.privileged:  # what _check_creation says then: the ancestor's list, nothing counted
        new_perms = anc.perms
    else:
        new_perms, size = _check_creation(core, conn, txn, missing, value, anc.perms)
        txn.owned_delta += len(missing)
        if not txn.implicit:
            txn.mem += size
    if len(missing) == 1:
        txn.put(path, value, new_perms, existed=False)
    else:
        for p in reversed(missing):
            txn.put(p, value if p == path else b"", new_perms, existed=False)
    txn.note_change(path, exact=False, old=None, new=new_perms)


# ----------------------------------------------------------------------------- node ops
def op_read(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    path = node_path(conn, single_arg(msg.payload))
    return get_node(core, conn, txn, path, READ).value


def _split_write(conn: Connection, payload: bytes) -> tuple[str, bytes]:
    idx = payload.find(0)
    if idx < 0:
        raise XsError("EINVAL", "WRITE without NUL")
    return node_path(conn, payload[:idx]), payload[idx + 1 :]


def _check_overwrite(core: Core, conn: Connection, path: str, value: bytes, node_perms: Perms, old_len: int) -> int:
    """Permission and quota checks for replacing an existing node's value; returns the bytes it
    grows by (negative when it shrinks)."""
    if not can(core, conn, node_perms, WRITE):
        raise XsError("EACCES")
    grow = len(value) - old_len
    if not conn.privileged:
        _check_node_size(core, conn, value, node_perms)
        if grow > 0:
            check_memory(core, conn, grow, path)
    return grow


def read_live(core: Core, conn: Connection, msg: Message) -> bytes | None:
    """READ outside a transaction of a node that exists, straight from the committed record
    (None when it does not: the general path then chooses the error and discloses nothing)."""
    path = node_path(conn, single_arg(msg.payload))
    store = core.store
    rec = store.latest_record(path)
    if rec is None:
        return None
    if not conn.privileged and not can(core, conn, store.record_perms(rec), READ):
        raise XsError("EACCES")
    return store.record_value(rec)


def op_write(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    path, value = _split_write(conn, msg.payload)
    node = txn.get(path)
    if node is None:
        create_node(core, conn, txn, path, value)
        return OK
    grow = _check_overwrite(core, conn, path, value, node.perms, len(node.value))
    if grow > 0 and not txn.implicit and not conn.privileged:
        txn.mem += grow
    txn.put(path, value, node.perms, existed=True)
    txn.note_change(path, exact=False, old=node.perms, new=node.perms)
    return OK


def write_in_place(core: Core, conn: Connection, msg: Message) -> bytes | None:
    """WRITE outside a transaction, when the node or its parent exists: the commonest mutations
    (state keys, handshakes, a new key in an existing directory) can fail only before they change
    anything, so they need no write set, no validation and no implicit Transaction; the store
    installs the change as a generation of its own.  Returns None when the parent is missing
    too: creating ancestors takes the general path."""
    path, value = _split_write(conn, msg.payload)
    store = core.store
    found = store.lookup(path)
    if found is not None:
        key, cur = found
        if not conn.privileged:  # the privileged may write anything, with no quota to check
            _check_overwrite(core, conn, path, value, store.record_perms(cur), store.record_value_len(cur))
        node_perms = store.overwrite(key, cur, value)
        core.fire_node_change(path, node_perms, node_perms)
        return OK
    return _create_in_place(core, conn, path, value)


def _create_in_place(core: Core, conn: Connection, path: str, value: bytes) -> bytes | None:
    """Create ``path``, missing, under its existing parent as a generation of its own (WRITE
    and MKDIR outside a transaction); None when the parent is missing too (the general path
    creates ancestors)."""
    if path == paths.ROOT:
        return None
    store = core.store
    up = store.lookup(paths.parent(path))
    if up is None:
        return None
    parent_key, parent_rec = up
    new_perms, _size = _check_creation(core, conn, None, [path], value, store.record_perms(parent_rec))
    store.create(path, value, new_perms, parent_key, parent_rec)
    core.fire_node_change(path, None, new_perms)
    return OK


def op_mkdir(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    path = node_path(conn, single_arg(msg.payload))
    node = txn.get(path)
    if node is not None:
        if not can(core, conn, node.perms, WRITE):
            raise XsError("EACCES")
        return OK
    create_node(core, conn, txn, path, b"")
    return OK


def mkdir_in_place(core: Core, conn: Connection, msg: Message) -> bytes | None:
    """MKDIR outside a transaction: of an existing node, a permission check; of a new node
    under an existing parent, what WRITE does with an empty value (no implicit Transaction)."""
    path = node_path(conn, single_arg(msg.payload))
    store = core.store
    rec = store.latest_record(path)
    if rec is not None:
        if not can(core, conn, store.record_perms(rec), WRITE):
            raise XsError("EACCES")
        return OK
    return _create_in_place(core, conn, path, b"")


def op_rm(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    path = node_path(conn, single_arg(msg.payload))
    node = txn.get(path)
    if node is None:
        # C: removing what is already gone is fine, as long as the parent exists (a toolstack
        # clears every path it is about to create, so this is common: no exception raised).
        err = _disclose(conn, txn, path, "ENOENT", WRITE)
        if err.name == "ENOENT" and txn.get(paths.parent(path)) is not None:
            return OK
        raise err
    if not can(core, conn, node.perms, WRITE):
        raise XsError("EACCES")
    if path == paths.ROOT:
        raise XsError("EINVAL", "cannot remove /")
    domid = conn.domid
    for removed in txn.remove_tree(path):
        if removed.owner == domid:
            txn.owned_delta -= 1
    return OK


def rm_in_place(core: Core, conn: Connection, msg: Message) -> bytes | None:
    """RM outside a transaction of a node that exists: the store removes the subtree as one
    generation, without a write set.  Returns None for what the general path decides (a missing
    node, the root)."""
    path = node_path(conn, single_arg(msg.payload))
    store = core.store
    found = store.lookup(path)
    if found is None:
        # Already gone (a toolstack clears each path before creating it): OK while the parent
        # exists, as op_rm decides, where the parent is also the nearest existing ancestor
        # whose permissions choose between ENOENT (then OK) and EACCES.
        if path == paths.ROOT:
            return None
        up = store.latest_record(paths.parent(path))
        if up is None:
            return None
        if conn.privileged or perms.allows_any(store.record_perms(up), conn.domid, conn.target, WRITE):
            return OK
        raise XsError("EACCES")
    if path == paths.ROOT:
        return None
    key, rec = found
    if not conn.privileged and not can(core, conn, store.record_perms(rec), WRITE):
        raise XsError("EACCES")
    core.fire_removed(store.remove(path, key))
    return OK


def op_directory(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    path = node_path(conn, single_arg(msg.payload))
    get_node(core, conn, txn, path, READ)
    names = txn.children(path)
    if not names:
        return b""
    return ("\0".join(names) + "\0").encode("ascii")


def directory_live(core: Core, conn: Connection, msg: Message) -> bytes | None:
    """DIRECTORY outside a transaction of a node that exists (a tree walk is 10^5 of these):
    one lookup (no key built) and one index range scan."""
    path = node_path(conn, single_arg(msg.payload))
    store = core.store
    rec = store.latest_record(path)
    if rec is None:
        return None
    if not conn.privileged and not can(core, conn, store.record_perms(rec), READ):
        raise XsError("EACCES")
    return store.child_payload(path)


def op_directory_part(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    args = split_args(msg.payload)
    if len(args) != 2 or msg.payload.count(0) != 2 or msg.payload[-1] != 0:
        raise XsError("EINVAL", "DIRECTORY_PART wants path and offset")
    path = node_path(conn, args[0])
    node = get_node(core, conn, txn, path, READ)
    offset = atoi(args[1])
    gen = node.gen if node.gen or not txn.writes else core.store.gen + 1
    head = f"{gen}\0".encode()
    children = "".join(n + "\0" for n in txn.children(path)).encode("ascii")
    if offset >= len(children):
        return head + b"\0"
    budget = PAYLOAD_MAX - len(head) - 1
    pos = max(offset, 0)
    end = pos
    while end < len(children):
        nxt = children.index(b"\0", end) + 1
        if nxt - pos >= budget:
            break
        end = nxt
    chunk = children[pos:end]
    if end >= len(children):
        chunk += b"\0"
    return head + chunk


def op_get_perms(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    raw = paths.decode(single_arg(msg.payload))
    if paths.is_special(raw):
        name = paths.canonicalize_special(raw)
        return perms.format_list(core.special_perms[_special_base(name)])
    path = paths.canonicalize(raw, conn.home)
    _check_path_max(conn, path)
    return perms.format_list(get_node(core, conn, txn, path, READ).perms)


def _special_base(name: str) -> str:
    return name.split("/", 1)[0]


# Permission lists as SET_PERMS spells them (the payload after the path) -> parsed.  A toolstack
# sets the same few lists on every guest's nodes, and parsing costs a microsecond an entry; the
# tuples are immutable, so sharing one is safe.  Bounded: emptied when full.
_PARSED: dict[bytes, Perms] = {}
_PARSED_MAX = 1024


def _set_perms_args(core: Core, conn: Connection, msg: Message) -> tuple[str, Perms]:
    """SET_PERMS's path (decoded, not yet canonical) and new permission list, checked."""
    payload = msg.payload
    args = split_args(payload)
    if len(args) < 2:
        raise XsError("EINVAL", "SET_PERMS wants a path and at least one permission")
    if not conn.privileged:
        limit = conn.domain.quotas["node-permissions"]
        if quota.exceeds(limit, len(args) - 1):
            raise _refuse(core, conn, "node-permissions", limit, len(args) - 1)
    spelt = payload[len(args[0]) + 1 :]
    parsed = _PARSED.get(spelt)
    if parsed is None:
        parsed = perms.parse(args[1:])  # raises for a bad list, which is then not kept
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[spelt] = parsed
    return paths.decode(args[0]), parsed


def _set_special_perms(core: Core, conn: Connection, raw: str, new_perms: Perms) -> bytes:
    name = paths.canonicalize_special(raw)
    if name not in paths.SPECIAL_NAMES:
        raise XsError("EINVAL", "permissions are kept on the plain special names")
    old = core.special_perms[name]
    if not conn.privileged:
        if not perms.is_owner(old, conn.domid, conn.target):
            raise XsError("EACCES")
        if new_perms[0].domid != old[0].domid:
            raise XsError("EPERM")
    core.set_special_perms(name, new_perms)
    return OK


def _replacing_perms(core: Core, conn: Connection, old: Perms, new_perms: Perms) -> Perms:
    """The list SET_PERMS installs in place of ``old``, once the caller may: ownership rules,
    an owner that exists, stale entries marked (and every domain named given a record)."""
    if not conn.privileged:
        if not perms.is_owner(old, conn.domid, conn.target):
            raise XsError("EACCES")
        if new_perms[0].domid != old[0].domid:
            raise XsError("EPERM", "only the privileged domain may change a node's owner")
    owner = new_perms[0].domid
    hv = core.hypervisor
    if hv is not None and owner != DOMID_ANY and hv.domain_info(owner) is None:
        # As C 4.17: a node cannot be given to a domain that does not exist (a domain that
        # exists but is not introduced yet is fine: libxl sets permissions before INTRODUCE).
        raise XsError("ENOENT", f"owner dom{owner} does not exist")
    new_perms = core.mark_stale(new_perms)
    core.note_domains(new_perms)
    return new_perms


def op_set_perms(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    raw, new_perms = _set_perms_args(core, conn, msg)
    if paths.is_special(raw):
        return _set_special_perms(core, conn, raw, new_perms)
    path = paths.canonicalize(raw, conn.home)
    _check_path_max(conn, path)
    node = txn.get(path)
    if node is None:
        raise _disclose(conn, txn, path, "ENOENT", WRITE)
    new_perms = _replacing_perms(core, conn, node.perms, new_perms)
    txn.put(path, node.value, new_perms, existed=True)
    txn.note_change(path, exact=False, old=node.perms, new=new_perms)
    return OK


def set_perms_in_place(core: Core, conn: Connection, msg: Message) -> bytes | None:
    """SET_PERMS outside a transaction of a special name or an existing node: the store
    replaces the node's permissions as a generation of its own, without a write set.  None
    for a missing node (the general path decides what error to disclose)."""
    raw, new_perms = _set_perms_args(core, conn, msg)
    if paths.is_special(raw):
        return _set_special_perms(core, conn, raw, new_perms)
    path = paths.canonicalize(raw, conn.home)
    _check_path_max(conn, path)
    store = core.store
    found = store.lookup(path)
    if found is None:
        return None
    key, cur = found
    old = store.record_perms(cur)
    new_perms = _replacing_perms(core, conn, old, new_perms)
    store.set_perms(key, cur, new_perms)
    core.fire_node_change(path, old, new_perms)
    return OK


# ----------------------------------------------------------------------------- watches
def op_watch(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    args = split_args(msg.payload)
    depth: int | None = None
    if len(args) == 3 and conn.domain.features & FEATURE_WATCHDEPTH:
        depth = atoi(args[2])
        if depth < 0:
            raise XsError("EINVAL", "negative watch depth")
    elif len(args) != 2:
        raise XsError("EINVAL", "WATCH wants a path and a token")
    raw = paths.decode(args[0])
    cpath = paths.canonicalize_any(raw, conn.home)
    if not paths.is_special(cpath):
        _check_path_max(conn, cpath)
    token = args[1].decode("latin-1")
    if not conn.privileged:
        limit = conn.domain.quotas["watches"]
        count = core.watches.count_of(conn) + 1
        if quota.exceeds(limit, count):
            raise _refuse(core, conn, "watches", limit, count, raw)
        check_memory(core, conn, len(raw) + len(token) + 2, raw)
    relative = paths.is_relative(raw)
    core.add_watch(conn, Watch(conn, raw, cpath, token, depth, relative))
    conn.reply(msg, OK)
    core.send_event(conn, raw, token)
    return b""


def op_unwatch(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    args = split_args(msg.payload)
    if len(args) != 2:
        raise XsError("EINVAL", "UNWATCH wants a path and a token")
    cpath = paths.canonicalize_any(paths.decode(args[0]), conn.home)
    core.remove_watch(conn, cpath, args[1].decode("latin-1"))
    return OK


def op_reset_watches(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    core.remove_all_watches(conn)
    conn.drop_transactions()
    conn.lost_transactions.clear()
    core.transactions_changed(conn)
    return OK


# ----------------------------------------------------------------------------- transactions
def op_transaction_start(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    if not conn.privileged:
        limit = conn.domain.quotas["transactions"]
        count = len(conn.transactions) + 1
        if quota.exceeds(limit, count):
            raise _refuse(core, conn, "transactions", limit, count)
    new = conn.new_transaction(core.store)
    core.transactions_changed(conn)
    return f"{new.tx_id}\0".encode()


def op_transaction_end(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    arg = single_arg(msg.payload)
    if arg not in (b"T", b"F"):
        raise XsError("EINVAL", "TRANSACTION_END wants T or F")
    del conn.transactions[txn.tx_id]
    core.transactions_changed(conn)
    if arg == b"F":
        txn.close()
        return OK
    if txn.failed:
        txn.close()
        raise XsError(txn.failed)
    if not conn.privileged and txn.writes:
        _recheck_nodes_quota(core, conn, txn)
    try:
        changes = txn.commit()
    except Conflict:
        core.metrics.conflict(conn.domid)
        raise XsError("EAGAIN") from None
    core.metrics.commit(conn.domid)
    core.fire(changes)
    return OK


def _recheck_nodes_quota(core: Core, conn: Connection, txn: Transaction) -> None:
    """Nodes quota at commit: other requests may have created nodes since the transaction did."""
    limit = conn.domain.quotas["nodes"]
    if not limit:
        return
    domid = conn.domid
    get = core.store.get
    delta = 0
    for path, new in txn.writes.items():
        old = get(path)
        delta -= old is not None and old.owner == domid
        delta += new is not None and new.owner == domid
    count = core.store.owned.get(domid, 0) + delta
    if delta > 0 and quota.exceeds(limit, count):
        txn.close()
        raise _refuse(core, conn, "nodes", limit, count, "transaction commit")


# ----------------------------------------------------------------------------- misc
def op_get_domain_path(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
    domid = parse_domid(single_arg(msg.payload))
    return f"{paths.home_of(domid)}\0".encode()


def op_control(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes | None:
    args = split_args(msg.payload)
    if args and args[0] == b"live-update":
        handler = core.live_update
        if handler is None:
            return b"live-update is not available in this process\0"
        return handler(conn, msg, [a.decode("utf-8", "replace") for a in args[1:]])
    return control(core, conn, args)


def _domain_op(name: str) -> Handler:
    def handler(core: Core, conn: Connection, msg: Message, txn: Transaction) -> bytes:
        ops = core.domain_ops
        if ops is None:
            raise XsError("ENOSYS", "no hypervisor interface")
        return getattr(ops, name)(conn, msg)

    handler.__name__ = f"op_{name}"
    return handler


# ----------------------------------------------------------------------------- dispatch
# op -> (handler, runs in a transaction, mutates the store)
HANDLERS: dict[int, tuple[Handler, bool, bool]] = {
    Op.READ: (op_read, True, False),
    Op.WRITE: (op_write, True, True),
    Op.MKDIR: (op_mkdir, True, True),
    Op.RM: (op_rm, True, True),
    Op.DIRECTORY: (op_directory, True, False),
    Op.DIRECTORY_PART: (op_directory_part, True, False),
    Op.GET_PERMS: (op_get_perms, True, False),
    Op.SET_PERMS: (op_set_perms, True, True),
    Op.WATCH: (op_watch, False, False),
    Op.UNWATCH: (op_unwatch, False, False),
    Op.RESET_WATCHES: (op_reset_watches, False, False),
    Op.TRANSACTION_START: (op_transaction_start, False, False),
    Op.TRANSACTION_END: (op_transaction_end, True, False),
    Op.GET_DOMAIN_PATH: (op_get_domain_path, False, False),
    Op.CONTROL: (op_control, False, False),
    Op.INTRODUCE: (_domain_op("introduce"), False, False),
    Op.RELEASE: (_domain_op("release"), False, False),
    Op.RESUME: (_domain_op("resume"), False, False),
    Op.IS_DOMAIN_INTRODUCED: (_domain_op("is_domain_introduced"), False, False),
    Op.SET_TARGET: (_domain_op("set_target"), False, False),
    Op.GET_FEATURE: (_domain_op("get_feature"), False, False),
    Op.SET_FEATURE: (_domain_op("set_feature"), False, False),
    Op.GET_QUOTA: (_domain_op("get_quota"), False, False),
    Op.SET_QUOTA: (_domain_op("set_quota"), False, False),
}

# Requests outside a transaction that work on the committed store directly in their common
# case, without a Transaction or LiveView (returning None sends them down the general path).
IN_PLACE: dict[int, Callable[[Core, Connection, Message], bytes | None]] = {
    Op.READ: read_live,
    Op.DIRECTORY: directory_live,
    Op.WRITE: write_in_place,
    Op.RM: rm_in_place,
    Op.MKDIR: mkdir_in_place,
    Op.SET_PERMS: set_perms_in_place,
}

PRIVILEGED_OPS = frozenset(
    {
        Op.CONTROL,
        Op.INTRODUCE,
        Op.RELEASE,
        Op.IS_DOMAIN_INTRODUCED,
        Op.RESUME,
        Op.SET_TARGET,
        Op.SET_FEATURE,
        Op.GET_QUOTA,
        Op.SET_QUOTA,
    }
)
# Ops whose tx_id is ignored rather than looked up.
NO_TXN_OPS = frozenset({Op.WATCH, Op.UNWATCH, Op.TRANSACTION_START})


def dispatch(core: Core, conn: Connection, msg: Message) -> None:
    """Run one request and queue its reply (and any events) on the connection, and count it.

    What the metrics cost per request: two clock reads and one histogram bucket (what
    metrics.Metrics.observe does, inlined in the ``finally``: a call, or this body in a
    function of its own, would cost as much again; an exact sum of durations would add a
    quarter); an error costs a dict increment more (metrics.Metrics.error, inlined too)."""
    start = perf_counter_ns()
    error: str | None = None
    try:
        tracer = conn.tracer  # core.tracer, without the property: Core keeps them equal
        if tracer is not None:
            tracer.request(conn, msg.type, msg.tx_id, msg.payload)
        tx_id = msg.tx_id
        if not tx_id:
            in_place = IN_PLACE.get(msg.type)
            if in_place is not None:
                try:
                    payload = in_place(core, conn, msg)
                except XsError as e:
                    error = e.name
                    conn.error(msg, error)
                    return
                except Exception:
                    log.exception("%s: internal error in %s", conn.label, Op(msg.type).name)
                    error = "EIO"
                    conn.error(msg, error)
                    return
                if payload is not None:
                    conn.reply(msg, payload)
                    return
        entry = HANDLERS.get(msg.type)
        if entry is None:
            error = "ENOSYS"
            conn.error(msg, error)
            return
        handler, in_txn, mutates = entry
        if msg.type in PRIVILEGED_OPS and not conn.privileged:
            error = "EACCES"
            conn.error(msg, error)
            return
        txn: Transaction | None = None
        implicit = False
        try:
            if msg.type == Op.TRANSACTION_START and tx_id:
                raise XsError("EBUSY" if tx_id in conn.transactions else "ENOENT")
            if msg.type == Op.TRANSACTION_END and not tx_id:
                raise XsError("ENOENT", "no transaction")
            if tx_id and msg.type not in NO_TXN_OPS:
                txn = conn.transactions.get(tx_id)
                if txn is None:
                    if tx_id in conn.lost_transactions:
                        # Open when the previous daemon process died: its writes are gone, and the
                        # guest retries the whole transaction on EAGAIN.
                        if msg.type == Op.TRANSACTION_END:
                            conn.lost_transactions.discard(tx_id)
                            core.transactions_changed(conn)
                        core.metrics.lost_transaction(conn.domid)
                        raise XsError("EAGAIN", "transaction lost in a daemon restart")
                    raise XsError("ENOENT", "no such transaction")
            if txn is None and in_txn:
                txn = Transaction(core.store, implicit=True) if mutates else core.live_view  # type: ignore[assignment]
                implicit = True
            payload = handler(core, conn, msg, txn)  # type: ignore[arg-type]
            if implicit and mutates:
                core.commit(txn)  # type: ignore[arg-type]
            elif txn is not None and not implicit and not conn.privileged and msg.type != Op.TRANSACTION_END:
                _check_transaction_nodes(core, conn, txn)  # reads count too: a read set is memory as well
        except XsError as e:
            if txn is not None and implicit:
                txn.close()
            error = e.name
            conn.error(msg, error)
            return
        except Exception:
            # A bug must cost one request, never the connection or the daemon.
            log.exception("%s: internal error in %s", conn.label, Op(msg.type).name)
            if txn is not None and implicit:
                txn.close()
            error = "EIO"
            conn.error(msg, error)
            return
        if payload is not None and msg.type != Op.WATCH:
            conn.reply(msg, payload)
    finally:
        ns = perf_counter_ns() - start
        metrics = core.metrics
        try:
            h = metrics.latency[msg.type]
        except IndexError:  # a code no op has (ENOSYS): zero-cost for the others, unlike a test
            h = metrics.latency[UNKNOWN_OP]
        try:
            h[BUCKET_TABLE[ns >> TABLE_SHIFT]] += 1
        except IndexError:  # 4 ms or more
            h[bucket_of(ns)] += 1
        if error is not None:
            errors = metrics.errors
            key = conn.domid << 4 | ERROR_INDEX[error]
            errors[key] = errors.get(key, 0) + 1


# Requests of one receive between two of the edge's sends (handle's ``flush``): every 8 or 16
# gave a pipelining client less (more sends for the same replies), 48 no more (bench_socket).
FLUSH_EVERY = 32


def handle(core: Core, conn: Connection, data: bytes, flush: Callable[[], object] | None = None) -> None:
    """Frame ``data`` and run every request it completes, in order: what an edge does with the
    bytes a client sent.  Raises ProtocolError for bytes that are no request at all.

    ``flush`` (the edge's send) is called after every FLUSH_EVERY requests of a long batch, so
    that a pipelining client gets its first replies, and sends more, while the rest are run:
    with one send at the end, client and daemon take turns instead of working at once."""
    n = 0
    for msg in conn.feed(data):
        if conn.closed:
            return
        dispatch(core, conn, msg)
        n += 1
        if n == FLUSH_EVERY and flush is not None:
            n = 0
            flush()


def answer(core: Core, conn: Connection, data: bytes) -> bytes | None:
    """Run ``data`` when it is exactly one request outside a transaction that its in-place
    handler (``IN_PLACE``) answers: its framed reply, for the edge to send or queue; ``b""``
    when the reply was queued here because output is already waiting on the connection (replies
    and events leave in order); None when nothing was done and the edge must take the general
    way (:func:`handle`).

    What libxl, xenbus and every ``xenstore-*`` tool send is one READ or WRITE and a wait: this
    answers it without the parser's buffer, the output queue and :func:`dispatch`'s general
    checks, which together cost a sequential request about a third of our own work.  The
    request's effect and its metrics are :func:`dispatch`'s (the same in-place handlers; the
    same histogram and error counts).  Not taken with part of a message already received (it
    comes first) or a tracer installed (it sees requests as the parser frames them)."""
    if len(data) < HEADER_SIZE:
        return None
    type_, req_id, tx_id, length = HEADER.unpack_from(data)
    in_place = IN_PLACE.get(type_)
    if in_place is None or tx_id or length + HEADER_SIZE != len(data) or not conn.answerable():
        return None
    start = perf_counter_ns()
    msg = Message(type_, req_id, 0, data[HEADER_SIZE:])
    error: str | None = None
    try:
        payload = in_place(core, conn, msg)
    except XsError as e:
        error = e.name
    except Exception:
        log.exception("%s: internal error in %s", conn.label, Op(type_).name)
        error = "EIO"
    else:
        if payload is None:
            return None  # nothing done: the general path chooses the error or does the work
        if len(payload) > PAYLOAD_MAX:
            error = "E2BIG"
    conn.requests += 1
    if error is not None:
        payload = error_payload(error)
        type_ = Op.ERROR
        errors = core.metrics.errors
        key = conn.domid << 4 | ERROR_INDEX[error]
        errors[key] = errors.get(key, 0) + 1
    ns = perf_counter_ns() - start
    h = core.metrics.latency[msg.type]
    try:
        h[BUCKET_TABLE[ns >> TABLE_SHIFT]] += 1
    except IndexError:  # 4 ms or more
        h[bucket_of(ns)] += 1
    if conn.has_output():  # earlier output, or this request's own watch events: it goes behind
        if error is None:
            conn.reply(msg, payload)
        else:
            conn.error(msg, error)
        return b""
    return HEADER.pack(type_, req_id, 0, len(payload)) + payload  # wire.encode, spelt out: hot


def _check_transaction_nodes(core: Core, conn: Connection, txn: Transaction) -> None:
    limit = conn.domain.quotas["transaction-nodes"]
    touched = txn.touched
    if quota.exceeds(limit, touched):
        txn.failed = "ENOSPC"
        raise _refuse(core, conn, "transaction-nodes", limit, touched)


__all__ = ["DOMID_SELF", "HANDLERS", "answer", "dispatch", "handle"]
