"""The state stream: round trips through encode/decode, and a Core dumped and restored."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sansio import Peer, make_core

from xenstored import migration
from xenstored.migration import ConnectionData, NodeData, QuotaData, State, StreamError, WatchData
from xenstored.perms import Perm

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_@", min_size=1, max_size=12)
perm = st.builds(Perm, st.integers(0, 0xFFFF), st.integers(0, 3), st.booleans())


@st.composite
def states(draw):
    nodes = [NodeData("/", b"", (Perm(0, 0),))]
    known = ["/"]
    for _ in range(draw(st.integers(0, 30))):
        parent = draw(st.sampled_from(known))
        path = ("/" if parent == "/" else parent + "/") + draw(names)
        if path in known:
            continue
        known.append(path)
        nodes.append(NodeData(path, draw(st.binary(max_size=300)), tuple(draw(st.lists(perm, min_size=1, max_size=5)))))
    conns = []
    watches = []
    for cid in range(1, draw(st.integers(0, 4)) + 1):
        sock = draw(st.booleans())
        conns.append(
            ConnectionData(
                cid,
                sock,
                domid=0 if sock else draw(st.integers(1, 0x7FEF)),
                target=None if sock else draw(st.one_of(st.none(), st.integers(0, 100))),
                evtchn=0 if sock else draw(st.integers(1, 1000)),
                socket_fd=draw(st.integers(3, 1000)) if sock else -1,
                in_data=draw(st.binary(max_size=100)),
                out_data=draw(st.binary(max_size=100)),
            )
        )
        for _ in range(draw(st.integers(0, 3))):
            watches.append(WatchData(cid, draw(st.sampled_from(known)), draw(names), draw(st.one_of(st.none(), st.integers(0, 100)))))
    doms = [
        QuotaData({"nodes": draw(st.integers(0, 5000)), "watches": 128}, domid=d, features=draw(st.integers(0, 15)))
        for d in draw(st.lists(st.integers(1, 100), unique=True, max_size=3))
    ]
    return State(
        migration.GlobalData(draw(st.integers(-1, 100)), draw(st.integers(-1, 100))),
        conns,
        watches,
        nodes,
        QuotaData({"nodes": 1000, "watches": 128}, global_values={"soft-memory": 7}),
        doms,
        hv_state=draw(st.binary(max_size=50)),
    )


@settings(max_examples=200, deadline=None)
@given(states())
def test_stream_round_trips(state):
    assert migration.decode(migration.encode_bytes(state)) == state


def test_records_are_8_byte_aligned_and_header_as_upstream():
    data = migration.encode_bytes(State(nodes=[NodeData("/", b"abc", (Perm(0, 0),))]))
    assert data[:8] == b"xenstore"
    assert struct.unpack(">I", data[8:12])[0] == 2
    pos = 16
    while pos < len(data):
        _rtype, length = struct.unpack_from("<II", data, pos)
        assert length % 8 == 0
        pos += 8 + length
    assert pos == len(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_a_clean_stream_error(data):
    try:
        migration.decode(b"xenstore" + data)
    except StreamError:
        pass


def test_unknown_records_are_skipped():
    data = migration.encode_bytes(State(nodes=[NodeData("/", b"", (Perm(0, 0),))]))
    extra = struct.pack("<II", 0x1234, 8) + b"12345678"
    spliced = data[:16] + extra + data[16:]
    assert migration.decode(spliced).nodes[0].path == "/"


def test_core_dump_and_restore_keeps_nodes_perms_quotas_and_special_perms():
    core = make_core()
    d0 = Peer(core)
    d0.write("/local/domain/5/data", b"v\0x")
    d0.setperms("/local/domain/5", "n5", "r0")
    d0.setperms("@introduceDomain", "n0", "r5")
    core.config.quotas.set("nodes", 77)
    core.domain(5).quotas.set("watches", 3)
    data = migration.encode_bytes(migration.dump_core(core))

    fresh = make_core()
    migration.restore_tree(fresh, migration.decode(data))
    p = Peer(fresh)
    assert p.read("/local/domain/5/data") == b"v\0x"
    assert p.getperms("/local/domain/5") == ["n5", "r0"]
    assert p.getperms("@introduceDomain") == ["n0", "r5"]
    assert fresh.config.quotas["nodes"] == 77
    assert fresh.domain(5).quotas["watches"] == 3
    assert fresh.store.owned == core.store.owned


def test_restore_rejects_orphan_nodes():
    state = State(nodes=[NodeData("/a/b", b"", (Perm(0, 0),))])
    with pytest.raises(StreamError):
        migration.restore_tree(make_core(), state)


def test_snapshot_walk_is_consistent_while_the_tree_changes():
    core = make_core()
    d0 = Peer(core)
    for i in range(50):
        d0.write(f"/a/n{i:02d}/leaf", str(i))
    before = [(n.path, n.value) for n in migration.snapshot_nodes(core)]
    snap = core.store.open_snapshot()
    walk = migration.snapshot_nodes(core, snap)
    got = [next(walk) for _ in range(10)]
    d0.rm("/a/n30")
    d0.write("/a/n05/leaf", "changed")
    d0.write("/a/zzz", "new")
    got += list(walk)
    core.store.close_snapshot(snap)
    assert [(n.path, n.value) for n in got] == before


def _c_record(rtype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 8)
    return struct.pack("<II", rtype, len(body)) + body


def test_a_stream_laid_out_as_cxenstored_4_17_writes_it_is_accepted():
    """Built byte by byte from docs/designs/xenstore-migration.md, not with our encoder: version 1,
    special nodes first (C-4.17's order), WATCH_DATA without depth, a socket connection."""
    def node(path: bytes, value: bytes, perms: list[tuple[bytes, int]]) -> bytes:
        head = struct.pack("<IIHHHH", 0, 0, len(path) + 1, len(value), 0, len(perms))
        return _c_record(5, head + b"".join(struct.pack("<BBH", a[0], 0, d) for a, d in perms) + path + b"\0" + value)

    stream = b"xenstore" + struct.pack(">I", 1) + struct.pack("<I", 0)
    stream += _c_record(1, struct.pack("<ii", 5, 6))
    stream += node(b"@releaseDomain", b"", [(b"n", 0)])
    stream += node(b"@introduceDomain", b"", [(b"n", 0), (b"r", 3)])
    stream += node(b"/", b"", [(b"n", 0)])
    stream += node(b"/tool", b"", [(b"n", 0)])
    stream += node(b"/tool/xenstored", b"", [(b"n", 0)])
    stream += node(b"/local", b"", [(b"n", 0)])
    stream += node(b"/local/domain", b"", [(b"n", 0)])
    stream += node(b"/local/domain/3", b"", [(b"n", 3), (b"r", 0)])
    stream += node(b"/local/domain/3/name", b"guest3", [(b"n", 3), (b"r", 0)])
    conn = struct.pack("<IHH", 7, 1, 0) + struct.pack("<iI", 9, 0) + struct.pack("<HHI", 0, 0, 0)
    stream += _c_record(2, conn)
    stream += _c_record(3, struct.pack("<IHH", 7, 6, 3) + b"/local\0" + b"w\0")
    stream += _c_record(0, b"")
    state = migration.decode(stream)
    assert state.globals.socket_fd == 5 and state.connections[0].socket_fd == 9
    assert state.watches[0].path == "/local" and state.watches[0].depth is None
    core = make_core()
    migration.restore_tree(core, state)
    p = Peer(core)
    assert p.read("/local/domain/3/name") == b"guest3"
    assert p.getperms("/local/domain/3") == ["n3", "r0"]
    assert p.getperms("@introduceDomain") == ["n0", "r3"]
