"""What each operation does, through the real dispatcher with no I/O (sans-I/O Peer)."""

import logging

import pytest
from sansio import Peer, make_core

from xenstored.wire import Op


@pytest.fixture
def core():
    return make_core()


@pytest.fixture
def d0(core):
    return Peer(core)


def guest(core, domid):
    return Peer(core, domid, socket=False)


# ------------------------------------------------------------------ basics
def test_initial_tree_as_c(d0):
    assert d0.ls("/") == ["tool"]
    assert d0.ls("/tool") == ["xenstored"]
    assert d0.getperms("/") == ["n0"]
    assert d0.getperms("/tool/xenstored") == ["n0"]


def test_write_creates_parents_and_read_returns_exact_bytes(d0):
    d0.write("/a/b/c", b"x\0y")
    assert d0.read("/a/b/c") == b"x\0y"
    assert d0.read("/a/b") == b""
    assert d0.ls("/a") == ["b"]


def test_relative_paths_of_a_socket_client_are_below_dom0_home(d0):
    d0.write("rel", "1")
    assert d0.read("/local/domain/0/rel") == b"1"


def test_directory_of_a_leaf_is_empty_payload(d0):
    d0.write("/leaf", "v")
    assert d0.call(Op.DIRECTORY, b"/leaf\0") == b""


def test_mkdir_existing_is_a_noop(d0):
    d0.write("/m", "keep")
    d0.mkdir("/m")
    assert d0.read("/m") == b"keep"


def test_rm_removes_subtree_and_rm_root_is_einval(d0):
    d0.write("/r/a/b", "1")
    d0.rm("/r")
    assert d0.err(Op.READ, b"/r/a/b\0") == "ENOENT"
    assert d0.err(Op.RM, b"/\0") == "EINVAL"
    d0.rm("/nothing")  # already gone, parent exists: fine (C)
    assert d0.err(Op.RM, b"/nothing/deeper\0") == "ENOENT"


def test_malformed_requests(d0):
    assert d0.err(Op.READ, b"/a") == "EINVAL"
    assert d0.err(Op.READ, b"") == "EINVAL"
    assert d0.err(Op.WRITE, b"/a") == "EINVAL"
    assert d0.err(Op.READ, b"/a/\0") == "EINVAL"
    assert d0.err(Op.READ, b"@introduceDomain\0") == "EINVAL"
    assert d0.err(Op.SET_PERMS, b"/tool\0") == "EINVAL"
    assert d0.err(Op.SET_PERMS, b"/tool\0q0\0") == "EINVAL"
    assert d0.err(Op.GET_DOMAIN_PATH, b"abc\0") == "EINVAL"
    assert d0.err(Op.TRANSACTION_END, b"X\0", 0) == "ENOENT"


@pytest.mark.parametrize("op", [15, 16, 20, 27, 99, 0xFFFF])
def test_unknown_and_server_only_types_are_enosys(d0, op):
    assert d0.err(op, b"") == "ENOSYS"


def test_reply_over_4096_is_e2big(d0):
    for i in range(100):
        d0.write(f"/big/{'n' * 60}{i:03d}", "")
    assert d0.err(Op.DIRECTORY, b"/big\0") == "E2BIG"


def test_directory_part_pages_through_a_big_directory(d0):
    names = sorted(f"{'n' * 60}{i:03d}" for i in range(150))
    for n in names:
        d0.write(f"/big/{n}", "")
    got, offset, gen = b"", 0, None
    while True:
        reply = d0.call(Op.DIRECTORY_PART, b"/big\0" + str(offset).encode() + b"\0")
        g, _, chunk = reply.partition(b"\0")
        assert len(reply) <= 4096
        gen = gen or g
        assert g == gen
        if chunk.endswith(b"\0\0") or chunk == b"\0":
            got += chunk[:-1]
            break
        got += chunk
        offset = len(got)
    assert got.split(b"\0")[:-1] == [n.encode() for n in names]


def test_get_domain_path(d0):
    assert d0.call(Op.GET_DOMAIN_PATH, b"7\0") == b"/local/domain/7\0"


# ------------------------------------------------------------------ transactions
def test_transaction_ids_and_errors(d0):
    t = d0.start()
    assert t != 0
    assert d0.err(Op.TRANSACTION_START, b"\0", t) == "EBUSY"
    assert d0.err(Op.TRANSACTION_START, b"\0", 4242) == "ENOENT"
    assert d0.err(Op.READ, b"/tool\0", 4242) == "ENOENT"
    assert d0.err(Op.TRANSACTION_END, b"maybe\0", t) == "EINVAL"
    d0.end(t)
    assert d0.err(Op.TRANSACTION_END, b"T\0", t) == "ENOENT"


def test_transaction_events_only_at_commit(core, d0):
    w = Peer(core)
    w.watch("/t", "tok")
    w.events.clear()
    t = d0.start()
    d0.write("/t/x", "1", tx=t)
    w.drain()
    assert w.events == []
    d0.end(t)
    w.drain()
    assert w.events == [("/t/x", "tok")]


def test_conflict_is_eagain(d0, core):
    other = Peer(core)
    d0.write("/c", "0")
    t = d0.start()
    assert d0.read("/c", t) == b"0"
    d0.write("/c", "1", tx=t)
    other.write("/c", "2")
    assert d0.err(Op.TRANSACTION_END, b"T\0", t) == "EAGAIN"
    assert d0.read("/c") == b"2"


def test_write_to_an_existing_node_outside_a_transaction(core, d0):
    """The in-place write path: same permissions, children and watches as the general one, and
    an open transaction keeps seeing the value of its snapshot."""
    d0.write("/w/leaf/child", "c")
    d0.setperms("/w/leaf", "n0", "r5")
    watcher = Peer(core)
    watcher.watch("/w", "tok")
    watcher.events.clear()
    t = d0.start()
    assert d0.read("/w/leaf", t) == b""
    gen_before = core.store.gen
    d0.write("/w/leaf", "new")
    assert core.store.gen == gen_before + 1
    assert d0.read("/w/leaf") == b"new"
    assert d0.read("/w/leaf", t) == b""  # the snapshot still sees the old version
    assert d0.getperms("/w/leaf") == ["n0", "r5"]
    assert d0.ls("/w/leaf") == ["child"]
    watcher.drain()
    assert watcher.events == [("/w/leaf", "tok")]
    d0.end(t)  # read-only: commits although the node changed


def test_refused_write_in_place_changes_nothing(core, d0):
    d0.write("/local/domain/5/v", "old")
    d0.setperms("/local/domain/5/v", "n5")
    d0.write("/ro", "keep")
    core.domain(5).quotas.set("node-size", 20)
    g = guest(core, 5)
    gen = core.store.gen
    owned = core.store.owned_bytes[5]
    assert g.err(Op.WRITE, b"/ro\0x") == "EACCES"
    assert g.err(Op.WRITE, b"/local/domain/5/v\0" + b"x" * 13) == "ENOSPC"  # 13 + 8 > 20
    assert core.store.gen == gen and core.store.owned_bytes[5] == owned
    assert d0.read("/local/domain/5/v") == b"old" and d0.read("/ro") == b"keep"
    g.write("/local/domain/5/v", "x" * 12)
    assert core.store.owned_bytes[5] == owned + 9  # charged by the value's growth


def test_create_and_rm_outside_a_transaction_keep_accounting_and_snapshots(core, d0):
    """The in-place create and remove paths: node counts return to where they were, parents'
    child lists move, and an open transaction keeps its snapshot of the removed subtree."""
    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")
    g = guest(core, 5)
    owned = core.store.owned[5], core.store.owned_bytes[5]
    g.write("/local/domain/5/d", "top")  # parent exists: created in place, owned by dom5
    g.write("/local/domain/5/d/a", "1")
    g.write("/local/domain/5/d/b", "2")
    assert g.getperms("/local/domain/5/d/a") == ["n5"]
    assert core.store.owned[5] == owned[0] + 3
    t = d0.start()
    assert d0.ls("/local/domain/5/d", t) == ["a", "b"]
    watcher = Peer(core)
    watcher.watch("/local/domain/5/d/b", "exact")
    watcher.watch("/local/domain/5", "up")
    watcher.events.clear()
    g.rm("/local/domain/5/d")
    assert (core.store.owned[5], core.store.owned_bytes[5]) == owned
    assert d0.ls("/local/domain/5") == []
    assert d0.ls("/local/domain/5/d", t) == ["a", "b"]  # the snapshot still has them
    assert d0.read("/local/domain/5/d/b", t) == b"2"
    d0.end(t)
    watcher.drain()
    assert sorted(watcher.events) == [("/local/domain/5/d", "up"), ("/local/domain/5/d/b", "exact")]
    d0.write("/nope", "")
    assert g.err(Op.RM, b"/nope\0") == "EACCES"
    assert g.err(Op.WRITE, b"/nope/child\0x") == "EACCES"
    assert d0.ls("/nope") == []


def test_mkdir_set_perms_and_rm_missing_outside_a_transaction(core, d0):
    """The in-place MKDIR, SET_PERMS and RM of a missing node: the same accounting, events,
    errors and snapshot isolation as through an implicit transaction."""
    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")
    g = guest(core, 5)
    watcher = Peer(core)
    watcher.watch("/local/domain/5", "w")
    watcher.events.clear()
    t = d0.start()
    assert d0.read("/local/domain/5", t) == b""
    owned = core.store.owned[5]
    g.mkdir("/local/domain/5/m")  # a new node under an existing parent: dom5's
    assert g.getperms("/local/domain/5/m") == ["n5"] and core.store.owned[5] == owned + 1
    g.mkdir("/local/domain/5/m")  # exists: nothing happens
    gen = core.store.gen
    g.setperms("/local/domain/5/m", "n5", "r7")
    assert core.store.gen == gen + 1
    assert d0.getperms("/local/domain/5/m") == ["n5", "r7"]
    assert g.err(Op.SET_PERMS, b"/local/domain/5/m\0n6\0") == "EPERM"  # only dom0 gives away
    d0.setperms("/local/domain/5/m", "n0")  # dom0 may: dom5 loses the node from its count
    assert core.store.owned[5] == owned
    assert g.err(Op.SET_PERMS, b"/local/domain/5/m\0n5\0") == "EACCES"
    assert g.err(Op.SET_PERMS, b"/local/domain/5/gone\0n5\0") == "ENOENT"
    assert d0.ls("/local/domain/5", t) == []  # the snapshot predates the MKDIR
    d0.setperms("/local/domain/5", "n5", "r0")  # the node read by t changes
    d0.write("/tx-write", "x", tx=t)
    assert d0.err(Op.TRANSACTION_END, b"T\0", t) == "EAGAIN"
    t2 = d0.start()
    assert d0.getperms("/local/domain/5/m", t2) == ["n0"]
    d0.setperms("/local/domain/5/m", "n0", "r5")  # only the permissions of what t2 read
    assert d0.getperms("/local/domain/5/m", t2) == ["n0"]  # t2's snapshot keeps the old list
    d0.write("/tx-write", "y", tx=t2)
    assert d0.err(Op.TRANSACTION_END, b"T\0", t2) == "EAGAIN"
    gen = core.store.gen
    g.rm("/local/domain/5/missing")  # gone already, parent there: OK, nothing changes
    assert core.store.gen == gen
    assert g.err(Op.RM, b"/local/domain/5/no/such\0") == "ENOENT"
    d0.write("/private/x", "")
    assert g.err(Op.RM, b"/private/missing\0") == "EACCES"  # ENOENT would disclose
    watcher.drain()
    assert watcher.events == [("/local/domain/5/m", "w")] * 3 + [("/local/domain/5", "w"), ("/local/domain/5/m", "w")]
    assert core.store.audit()[2] == [] and core.store.audit()[0] == core.store.owned


def test_reset_watches_drops_transactions(d0):
    t = d0.start()
    assert d0.call(Op.RESET_WATCHES, b"") == b"OK\0"
    assert d0.err(Op.READ, b"/tool\0", t) == "ENOENT"


# ------------------------------------------------------------------ watches
def test_watch_ok_then_initial_event(d0):
    msgs = d0.send(Op.WATCH, b"/nope\0tk\0")
    assert [m.type for m in msgs] == [Op.WATCH, Op.WATCH_EVENT]
    assert msgs[0].payload == b"OK\0"
    assert msgs[1].payload == b"/nope\0tk\0" and msgs[1].req_id == 0


def test_own_event_precedes_reply(d0):
    d0.watch("/o", "t")
    msgs = d0.send(Op.WRITE, b"/o/x\0v")
    assert [m.type for m in msgs] == [Op.WATCH_EVENT, Op.WRITE]


def test_duplicate_watch_and_unknown_unwatch(d0):
    d0.watch("/w", "t")
    assert d0.err(Op.WATCH, b"/w\0t\0") == "EEXIST"
    d0.watch("/w", "t2")
    assert d0.call(Op.UNWATCH, b"/w\0t\0") == b"OK\0"
    assert d0.err(Op.UNWATCH, b"/w\0t\0") == "ENOENT"


def test_rm_fires_target_ancestors_and_exact_descendants(core, d0):
    d0.write("/r/a/b", "1")
    w = Peer(core)
    for p in ["/", "/r", "/r/a", "/r/a/b", "/r/a/b/ghost"]:
        w.watch(p, p)
    w.events.clear()
    d0.rm("/r/a")
    w.drain()
    assert sorted(w.events) == sorted([("/r/a", "/"), ("/r/a", "/r"), ("/r/a", "/r/a"), ("/r/a/b", "/r/a/b")])


def test_relative_watch_reports_relative_paths(core):
    g = guest(core, 0)
    g.watch("dev", "t")
    g.write("dev/x", "1")
    assert g.events[-1] == ("dev/x", "t")


def test_depth_limited_watch(core, d0):
    d0.watch("/d", "t", depth=1)
    d0.events.clear()
    d0.write("/d/x", "")
    d0.write("/d/x/y", "")
    assert d0.events == [("/d/x", "t")]


def test_special_watches_and_perms(core, d0):
    assert d0.getperms("@releaseDomain") == ["n0", "r32757"]
    assert d0.getperms("@introduceDomain") == ["n0"]
    d0.setperms("@introduceDomain", "n0", "r5")
    assert d0.getperms("@introduceDomain") == ["n0", "r5"]
    d0.watch("@releaseDomain", "rel")
    d0.events.clear()
    core.fire_special("@releaseDomain", 3)
    d0.drain()
    assert d0.events == [("@releaseDomain", "rel")]


# ------------------------------------------------------------------ unprivileged
def test_guest_permission_rules(core, d0):
    d0.write("/local/domain/5/x", "v")
    g = guest(core, 5)
    assert g.err(Op.READ, b"/local/domain/5/x\0") == "EACCES"
    assert g.err(Op.READ, b"/local/domain/5/missing\0") == "EACCES"  # unreadable parent
    d0.setperms("/local/domain/5", "n5")
    assert g.err(Op.READ, b"/local/domain/5/missing\0") == "ENOENT"
    g.write("mine", "1")
    assert g.getperms("mine") == ["n5"]


def test_guest_becomes_owner_but_keeps_others_letter(core, d0):
    d0.write("/common", "")
    d0.setperms("/common", "r0", "b5")
    g = guest(core, 5)
    g.write("/common/c", "")
    assert d0.getperms("/common/c") == ["r5", "b5"]


def test_guest_set_perms_rules(core, d0):
    d0.write("/local/domain/5/n", "")
    d0.setperms("/local/domain/5/n", "n5")
    d0.write("/other", "")
    g = guest(core, 5)
    assert g.err(Op.SET_PERMS, b"/local/domain/5/n\0n6\0") == "EPERM"
    g.setperms("/local/domain/5/n", "n5", "r6")
    assert g.err(Op.SET_PERMS, b"/other\0n5\0") == "EACCES"


def test_set_perms_lists_spelt_again_or_malformed(d0):
    """SET_PERMS remembers lists it parsed (toolstacks send the same few): each node still
    gets exactly the list its request spelt, and a malformed list is refused every time."""
    spellings = [["n0", "r5"], ["n0", "r5", "w6"], ["n0", "r5"], ["n7"], ["n0", "r5", "w6"]]
    for i, entries in enumerate(spellings):
        d0.write(f"/x{i}", "")
        d0.setperms(f"/x{i}", *entries)
    tx = d0.start()
    d0.write("/t", "", tx)
    d0.setperms("/t", "n0", "r5", "w6", tx=tx)
    d0.end(tx)
    assert [d0.getperms(f"/x{i}") for i in range(len(spellings))] == spellings
    assert d0.getperms("/t") == ["n0", "r5", "w6"]
    for _ in range(2):
        assert d0.err(Op.SET_PERMS, b"/x0\0n0\0q5\0") == "EINVAL"
    assert d0.getperms("/x0") == ["n0", "r5"]


def test_privileged_ops_refused_to_guests(core):
    g = guest(core, 5)
    for op in (Op.CONTROL, Op.INTRODUCE, Op.RELEASE, Op.IS_DOMAIN_INTRODUCED, Op.SET_TARGET, Op.SET_QUOTA):
        assert g.err(op, b"1\0") == "EACCES"


def test_watch_events_filtered_by_read_permission(core, d0):
    """XSA-115: a guest watching / must not learn of nodes it cannot read."""
    d0.write("/secret/x", "")
    g = guest(core, 5)
    g.watch("/", "all")
    g.events.clear()
    d0.write("/secret/x", "1")
    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")
    g.drain()
    assert ("/secret/x", "all") not in g.events
    assert ("/local/domain/5", "all") in g.events


def test_path_max_applies_below_guest_home(core, d0):
    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")
    core.domain(5).quotas.set("path-max", 10)
    g = guest(core, 5)
    g.write("a" * 10, "")
    assert g.err(Op.WRITE, b"a" * 11 + b"\0") == "EINVAL"
    # Outside the home the whole path counts: 10 characters pass the length check (and meet the
    # permission check), 11 do not.
    assert g.err(Op.READ, b"/tool/abcd\0") == "EACCES"
    assert g.err(Op.READ, b"/tool/abcde\0") == "EINVAL"
    d0.write("/local/domain/5/" + "b" * 50, "")  # the privileged are exempt


# ------------------------------------------------------------------ quotas
def test_quota_n_allows_exactly_n_and_refusals_are_logged(core, d0, caplog):
    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")  # the home counts: dom5 owns 1 node
    core.domain(5).quotas.set("nodes", 3)
    core.domain(5).quotas.set("watches", 2)
    core.domain(5).quotas.set("transactions", 1)
    core.domain(5).quotas.set("node-permissions", 2)
    core.domain(5).quotas.set("node-size", 100)
    g = guest(core, 5)
    g.write("a", "")
    g.write("b", "")
    with caplog.at_level(logging.WARNING, logger="xenstored.quota"):
        assert g.err(Op.WRITE, b"c\0") == "ENOSPC"
    assert "domain 5" in caplog.text and "nodes" in caplog.text
    g.watch("a", "1")
    g.watch("a", "2")
    assert g.err(Op.WATCH, b"a\0" + b"3\0") == "ENOSPC"
    t = g.start()
    assert g.err(Op.TRANSACTION_START, b"\0") == "ENOSPC"
    g.end(t)
    g.setperms("a", "n5", "r1")
    assert g.err(Op.SET_PERMS, b"a\0n5\0r1\0r2\0") == "ENOSPC"
    g.write("a", "x" * 84)  # 84 + 8 per permission entry: exactly 100
    assert g.err(Op.WRITE, b"a\0" + b"x" * 85) == "ENOSPC"
    assert core.refusals.count >= 5


def test_nodes_quota_rechecked_at_commit(core, d0):
    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")
    core.domain(5).quotas.set("nodes", 2)
    g = guest(core, 5)
    t = g.start()
    g.write("a", "", tx=t)
    g.write("b", "")  # outside: now at the limit
    assert g.err(Op.TRANSACTION_END, b"T\0", t) == "ENOSPC"


def test_transaction_nodes_quota_fails_the_transaction(core, d0):
    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")
    core.domain(5).quotas.set("transaction-nodes", 3)
    g = guest(core, 5)
    t = g.start()
    g.write("a", "", tx=t)
    assert g.err(Op.WRITE, b"b/c/d\0", t) == "ENOSPC"
    assert g.err(Op.TRANSACTION_END, b"T\0", t) == "ENOSPC"


# ------------------------------------------------------------------ control
def test_control(d0, core):
    assert b"print" in d0.call(Op.CONTROL, b"help\0")
    assert d0.call(Op.CONTROL, b"print\0hello\0") == b"OK\0"
    assert d0.call(Op.CONTROL, b"check\0") == b"OK\0"
    assert d0.err(Op.CONTROL, b"bogus\0") == "EINVAL"
    assert b"nodes" in d0.call(Op.CONTROL, b"quota\0")


def test_unread_events_to_guests_expire(core, d0):
    import time

    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")
    g = guest(core, 5)
    g.watch("x", "t")
    g.drain()
    for i in range(5):
        d0.write(f"/local/domain/5/x/{i}", "")
    conn = g.conn
    assert conn.outstanding == 5 and conn.expire_events(10.0) == 0
    time.sleep(0.06)
    before = conn.out_bytes
    assert conn.expire_events(0.05) == 5
    assert conn.outstanding == 0 and conn.out_bytes == 0 < before
    d0.write("/local/domain/5/x/new", "")  # later events still arrive
    assert g.drain()[0].payload == b"x/new\0t\0"


def test_written_events_are_forgotten_by_the_expiry_clock(core, d0):
    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")
    g = guest(core, 5)
    g.watch("y", "t")
    for i in range(100):
        d0.write(f"/local/domain/5/y/{i}", "")
        g.drain()
    assert len(g.conn._event_times) == 0


def test_control_quota_max_and_domain(core, d0):
    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")
    g = guest(core, 5)
    g.write("a", "")
    out = d0.call(Op.CONTROL, b"quota\0max\0").decode()
    assert out.startswith("Max quota usage:\n") and "nodes            :        2" in out
    dom = d0.call(Op.CONTROL, b"quota\x005\0").decode()
    assert dom.startswith("Domain 5:\n") and "(max 1000)" in dom
    assert d0.err(Op.CONTROL, b"quota\x00999\0") == "ENOENT"


def test_transaction_nodes_quota_counts_reads_too(core, d0):
    d0.write("/local/domain/5", "")
    d0.setperms("/local/domain/5", "n5")
    for i in range(10):
        d0.write(f"/local/domain/5/r{i}", "")
        d0.setperms(f"/local/domain/5/r{i}", "n5")
    core.domain(5).quotas.set("transaction-nodes", 4)
    g = guest(core, 5)
    t = g.start()
    for i in range(4):
        g.read(f"r{i}", tx=t)
    assert g.err(Op.READ, b"r4\0", t) == "ENOSPC"  # a fifth distinct node
    assert g.err(Op.TRANSACTION_END, b"T\0", t) == "ENOSPC"


def test_a_long_batch_hands_its_first_replies_out_while_it_runs(core, d0):
    # A pipelining client sends many requests at once; the edge's send (``flush``) gets the
    # replies so far after every FLUSH_EVERY of them, so the client refills while the rest run.
    from xenstored.ops import FLUSH_EVERY, handle
    from xenstored.wire import Parser, encode

    d0.write("/k", "v")
    n = 2 * FLUSH_EVERY + 5
    data = b"".join(encode(Op.READ, 100 + i, 0, b"/k\0") for i in range(n))
    seen: list[list[int]] = []
    parser = Parser()

    def flush() -> None:
        seen.append([m.req_id for m in parser.feed(d0.conn.take_output())])

    handle(core, d0.conn, data, flush)
    rest = [m.req_id for m in parser.feed(d0.conn.take_output())]
    assert seen == [list(range(100, 100 + FLUSH_EVERY)), list(range(100 + FLUSH_EVERY, 100 + 2 * FLUSH_EVERY))]
    assert rest == list(range(100 + 2 * FLUSH_EVERY, 100 + n))
