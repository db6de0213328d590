"""The MVCC node table: versions, snapshots, child index, reclamation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sortedcontainers import SortedList

from xenstored import store as store_mod
from xenstored.perms import owner_only
from xenstored.store import Store
from xenstored.transactions import Conflict, Transaction

P = owner_only(0)


def write(store: Store, path: str, value: bytes = b"") -> None:
    t = Transaction(store, implicit=True)
    t.put(path, value, P, existed=store.get(path) is not None)
    t.commit()


def delete(store: Store, path: str) -> None:
    t = Transaction(store, implicit=True)
    t.delete(path)
    t.commit()


def test_initial_store_has_only_root():
    s = Store()
    assert s.get("/") is not None and s.child_names("/") == []


def test_children_in_byte_order_and_no_interleaving_with_similar_names():
    s = Store()
    for p in ["/b", "/a", "/a-x", "/a/z", "/a/y", "/A", "/a_b", "/aa"]:
        write(s, p)
    assert s.child_names("/") == ["A", "a", "a-x", "a_b", "aa", "b"]
    assert s.child_names("/a") == ["y", "z"]
    assert list(s.walk("/a")) == ["/a", "/a/y", "/a/z"]


def test_snapshot_sees_old_versions_until_closed():
    s = Store()
    write(s, "/x", b"1")
    snap = s.open_snapshot()
    write(s, "/x", b"2")
    write(s, "/y", b"new")
    delete(s, "/x")
    assert s.get_at("/x", snap).value == b"1"
    assert s.get_at("/y", snap) is None
    assert s.child_names("/", snap) == ["x"]
    assert s.get("/x") is None and s.child_names("/") == ["y"]
    assert s.version_count() > 3
    s.close_snapshot(snap)
    assert s.version_count() == 2  # '/' and '/y': every shadowed version reclaimed


def test_snapshot_start_copies_nothing():
    s = Store()
    for i in range(2000):
        write(s, f"/n{i}")
    before = s.version_count()
    t = Transaction(s)
    assert s.version_count() == before
    assert t.get("/n5") is not None
    t.close()


def test_child_change_moves_cgen_not_vgen():
    s = Store()
    write(s, "/p", b"v")
    n1 = s.get("/p")
    write(s, "/p/c")
    n2 = s.get("/p")
    assert n2.vgen == n1.vgen and n2.cgen > n1.cgen and n2.gen > n1.gen


def test_blind_creates_under_one_parent_merge():
    s = Store()
    write(s, "/p")
    a, b = Transaction(s), Transaction(s)
    for t, name in ((a, "/p/a"), (b, "/p/b")):
        assert t.get("/p") is not None and t.get(name) is None
        t.put(name, b"", P, existed=False)
    a.commit()
    b.commit()
    assert s.child_names("/p") == ["a", "b"]


def test_listing_conflicts_with_a_new_child():
    s = Store()
    write(s, "/p")
    a, b = Transaction(s), Transaction(s)
    assert a.children("/p") == []
    a.put("/q", b"", P, existed=False)
    b.get("/p/x")
    b.put("/p/x", b"", P, existed=False)
    b.commit()
    with pytest.raises(Conflict):
        a.commit()


def test_read_only_transactions_always_commit():
    s = Store()
    write(s, "/p", b"1")
    t = Transaction(s)
    assert t.get("/p").value == b"1"
    write(s, "/p", b"2")
    assert t.commit() == []


def test_owner_counts_follow_commits():
    s = Store()
    t = Transaction(s, implicit=True)
    t.put("/a", b"", owner_only(5), existed=False)
    t.put("/a/b", b"", owner_only(5), existed=False)
    t.commit()
    assert s.owned[5] == 2
    delete(s, "/a/b")
    assert s.owned[5] == 1


def test_overwrites_keep_the_byte_accounting_exact():
    from xenstored.store import node_bytes

    s = Store()
    p5 = owner_only(5)
    t = Transaction(s, implicit=True)
    t.put("/a", b"", p5, existed=False)
    t.commit()
    for value in (b"x" * 10, b"y" * 3, b"", b"z" * 100):
        node = s.get("/a")
        t = Transaction(s, implicit=True)
        t.put("/a", value, node.perms, existed=True)  # same list object: the fast path
        t.commit()
        assert s.owned[5] == 1
        assert s.owned_bytes[5] == node_bytes("/a", s.get("/a"))
    t = Transaction(s, implicit=True)
    t.put("/a", b"v", owner_only(6), existed=True)  # a new owner: moved between the two
    t.commit()
    assert 5 not in s.owned and s.owned[6] == 1 and s.owned_bytes[6] == node_bytes("/a", s.get("/a"))


_NAMES = st.sampled_from(["a", "b", "a-x", "a_b", "aa", "A", "ab"])


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "delete", "snap", "close"]),
                              st.lists(_NAMES, min_size=1, max_size=3), st.binary(max_size=3)),
                    max_size=40))
def test_directories_and_snapshots_agree_with_a_model(ops):
    """Each directory is a sorted list of packed entries, with tombstones while a snapshot may
    read a deleted node: against a plain dict of paths, every live and snapshot view agrees,
    names come in byte order, and closing every snapshot leaves no shadowed version."""
    _run_model(ops)


_MANY = st.sampled_from(["a", "b", "a-x", "a_b", "aa", "A", "ab", "c", "ca", "c0", "d", "e", "e1",
                         "f", "g", "h", "hh", "i", "j", "k"])


class _SmallSortedList(SortedList):
    DEFAULT_LOAD_FACTOR = 2  # sublists of 2-4 entries: a few names span several


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "delete", "snap", "close"]),
                              st.lists(_MANY, min_size=1, max_size=2), st.binary(max_size=3)),
                    max_size=80))
def test_big_directories_agree_with_the_model_too(ops):
    """The same with every directory of more than two children a SortedList of tiny sublists:
    the search inside its sublists (_slot) across their boundaries."""
    saved = store_mod._BIG, store_mod.SortedList
    store_mod._BIG, store_mod.SortedList = 2, _SmallSortedList
    try:
        _run_model(ops)
    finally:
        store_mod._BIG, store_mod.SortedList = saved


def _run_model(ops: list[tuple[str, list[str], bytes]]) -> None:
    s = Store()
    model: dict[str, bytes] = {"/": b""}
    snaps: list[tuple[int, dict[str, bytes]]] = []

    def check(view: dict[str, bytes], snap: int | None) -> None:
        for path in {*view, *s.paths()} | {p + "/x" for p in view}:
            node = s.get(path) if snap is None else s.get_at(path, snap)
            assert (node.value if node else None) == view.get(path), (path, snap)
            kids = sorted({q[len(path.rstrip("/")) + 1 :].split("/")[0] for q in view
                           if q.startswith(path.rstrip("/") + "/") and q != path}, key=str.encode)
            if path in view:
                assert s.child_names(path, snap) == kids, (path, snap)

    for op, names, value in ops:
        path = "/" + "/".join(names)
        if op == "write":
            for i in range(1, len(names) + 1):  # ancestors first, as a WRITE creates them
                anc = "/" + "/".join(names[:i])
                if anc not in model or anc == path:
                    write(s, anc, value if anc == path else b"")
                    model[anc] = value if anc == path else b""
        elif op == "delete" and path in model:
            t = Transaction(s, implicit=True)
            t.remove_tree(path)
            t.commit()
            for q in [q for q in model if q == path or q.startswith(path + "/")]:
                del model[q]
        elif op == "snap":
            snaps.append((s.open_snapshot(), dict(model)))
        elif op == "close" and snaps:
            s.close_snapshot(snaps.pop(0)[0])
        check(model, None)
        for snap, view in snaps:
            check(view, snap)
    for snap, _view in snaps:
        s.close_snapshot(snap)
    assert s.version_count() == len(model) and sorted(s.paths()) == sorted(model)
    counts, _sizes, broken = s.audit()
    assert counts == s.owned and broken == []


def test_live_child_names_skip_removed_keys_kept_for_a_snapshot():
    s = Store()
    write(s, "/d/a")
    write(s, "/d/b")
    snap = s.open_snapshot()
    delete(s, "/d/a")
    assert s.child_names("/d") == ["b"]
    assert s.child_names("/d", snap) == ["a", "b"]
    s.close_snapshot(snap)
    assert s.child_names("/d") == ["b"]


def test_audit_recounts_owners_and_finds_orphans_a_walk_cannot_reach():
    s = Store()
    write(s, "/a")
    write(s, "/a/b", b"xy")
    write(s, "/c")
    counts, sizes, broken = s.audit()
    assert counts == s.owned and sizes == s.owned_bytes and broken == []
    root_dir = s._dirs["/"]  # corrupt: /a vanishes from the table, /a/b is left hanging
    root_dir.remove(next(e for e in root_dir if e.startswith(b"a\0")))
    counts, _sizes, broken = s.audit()
    assert broken == ["/a/b"] and counts[0] == 3  # /, /c and the orphan, still counted
