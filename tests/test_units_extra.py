"""Unit tests for corners of the core modules that the behaviour tests do not reach: quota
names and the refusal log's rate limiting, watch registry bookkeeping and special-path matching,
wire argument helpers, and store maintenance helpers.  Sans-I/O and fast."""

from __future__ import annotations

import pytest

from xenstored import quota, watches
from xenstored.perms import Perm
from xenstored.store import Node, Store
from xenstored.watches import Watch, WatchRegistry
from xenstored.wire import Parser, XsError, atoi, encode, error_payload, parse_domid, single_arg, split_args


# ------------------------------------------------------------------ quota
def test_quota_names_aliases_and_bad_values():
    assert quota.canonical_name("permissions") == "node-permissions"
    assert quota.canonical_name("entry-nb") == "nodes"
    with pytest.raises(XsError) as e:
        quota.canonical_name("bogus")
    assert e.value.name == "EINVAL"
    q = quota.Quotas.defaults()
    c = q.copy()
    c.set("nodes", 7)
    assert c["nodes"] == 7 and q["nodes"] == 1000  # copies are independent
    for bad in (-1, 0xFFFFFFFF):
        with pytest.raises(XsError):
            q.set("nodes", bad)
    assert quota.exceeds(3, 4) and not quota.exceeds(3, 3) and not quota.exceeds(0, 10**9)


def test_refusal_log_rate_limits_per_domain_and_quota(caplog):
    now = [100.0]
    log = quota.RefusalLog(clock=lambda: now[0])
    log.refuse(5, "nodes", 10, 11, "/x")
    log.refuse(5, "nodes", 10, 12)  # within 10 s: counted, not logged
    log.refuse(6, "nodes", 10, 11)  # another domain: logged
    assert log.count == 3 and log.suppressed == 1
    now[0] += quota.LOG_INTERVAL + 1
    log.refuse(5, "nodes", 10, 13)
    assert log.suppressed == 1
    assert caplog.text.count("refused by nodes quota") == 3
    log.warn_soft(5, 100, 150)
    log.warn_soft(5, 100, 160)  # rate-limited too
    assert caplog.text.count("soft memory quota") == 1


def test_refusal_log_memory_is_bounded():
    log = quota.RefusalLog(clock=lambda: 0.0)
    for d in range(5000):
        log.refuse(d, "nodes", 1, 2)
    assert len(log._last) <= 4097


# ------------------------------------------------------------------ watches
def test_watch_registry_bookkeeping():
    r = WatchRegistry()
    a, b = object(), object()
    w = Watch(a, "/x", "/x", "t")
    r.add(w)
    with pytest.raises(XsError) as e:
        r.add(Watch(a, "/x", "/x", "t"))
    assert e.value.name == "EEXIST"
    r.add(Watch(b, "/x", "/x", "t"))  # same path and token, another owner: fine
    assert r.count_of(a) == 1 and r.count_of(object()) == 0
    assert r.owned_by(a) == [w] and r.owned_by(object()) == []
    assert r.bytes[a] == w.size == 5
    with pytest.raises(XsError) as e:
        r.remove(a, "/y", "t")
    assert e.value.name == "ENOENT"
    with pytest.raises(XsError):
        r.remove(object(), "/x", "t")
    assert r.remove(a, "/x", "t") is w
    assert a not in r.bytes and r.count == 1
    assert r.remove_all(a) == 0 and r.remove_all(b) == 1
    assert r.all() == [] and r.count == 0


def test_watch_matching_depth_and_exact():
    r = WatchRegistry()
    o = object()
    r.add(Watch(o, "/a", "/a", "any"))
    r.add(Watch(o, "/a", "/a", "d1", depth=1))
    r.add(Watch(o, "/a/b/c", "/a/b/c", "exact"))
    assert {w.token for w in r.matching("/a/b")} == {"any", "d1"}
    assert {w.token for w in r.matching("/a/b/c")} == {"any", "exact"}
    assert [w.token for w in r.matching("/a/b/c", exact=True)] == ["exact"]
    assert r.matching("/z", exact=True) == []


def test_quiet_paths_are_forgotten_when_watches_change():
    """may_fire remembers paths no watch covers; any watch added or removed must undo that."""
    r = WatchRegistry()
    o = object()
    assert not r.may_fire("/a/b")  # no watches at all
    r.add(Watch(o, "/z", "/z", "t"))
    assert not r.may_fire("/a/b") and "/a/b" in r._quiet
    r.add(Watch(o, "/a", "/a", "deep", depth=0))
    assert not r.may_fire("/a/b")  # depth 0 only covers /a itself
    r.add(Watch(o, "/a", "/a", "any"))
    assert r.may_fire("/a/b")
    r.remove(o, "/a", "any")
    assert not r.may_fire("/a/b")
    r.remove_all(o)
    r.add(Watch(o, "/a/b", "/a/b", "t"))
    assert r.may_fire("/a/b")
    for i in range(watches.QUIET_PATHS_MAX + 10):
        r.may_fire(f"/q/{i}")
    assert len(r._quiet) <= watches.QUIET_PATHS_MAX


def test_special_watch_matching():
    r = WatchRegistry()
    o = object()
    r.add(Watch(o, "@releaseDomain", "@releaseDomain", "plain"))
    r.add(Watch(o, "@releaseDomain", "@releaseDomain", "deep", depth=1))
    r.add(Watch(o, "@releaseDomain/7", "@releaseDomain/7", "only7"))
    got = {(w.token, p) for w, p in r.matching_special("@releaseDomain", 7)}
    assert got == {("plain", "@releaseDomain"), ("deep", "@releaseDomain/7"), ("only7", "@releaseDomain/7")}
    got = {(w.token, p) for w, p in r.matching_special("@releaseDomain", None)}
    assert got == {("plain", "@releaseDomain"), ("deep", "@releaseDomain")}
    assert r.matching_special("@introduceDomain", 3) == []


# ------------------------------------------------------------------ wire helpers
def test_wire_argument_helpers():
    assert error_payload("ENOENT") == b"ENOENT\0"
    assert split_args(b"a\0b\0") == [b"a", b"b"]
    assert single_arg(b"x\0") == b"x"
    for bad in (b"", b"x", b"a\0b\0"):
        with pytest.raises(XsError):
            single_arg(bad)
    assert parse_domid(b"65535") == 65535
    for bad in (b"", b"-1", b"1x", b"123456", b"65536"):
        with pytest.raises(XsError):
            parse_domid(bad)
    assert atoi(b" 42abc") == 42 and atoi(b"-7") == -7 and atoi(b"+3") == 3 and atoi(b"x") == 0


def test_parser_pending_bytes_and_needed():
    p = Parser()
    msg = encode(2, 1, 0, b"abc")
    assert p.needed() == 16
    p.feed(msg[:5])
    assert p.pending_bytes() == msg[:5] and p.needed() == 11
    p.feed(msg[5:17])
    assert p.needed() == 2
    assert [m.payload for m in p.feed(msg[17:])] == [b"abc"]
    p.feed(msg[:3])
    p.reset()
    assert p.pending_bytes() == b""


# ------------------------------------------------------------------ store helpers
def test_store_maintenance_helpers():
    s = Store()
    owner = (Perm(0, 0),)
    s.apply({"/a": Node(b"1", owner, 0, 0), "/a/b": Node(b"2", owner, 0, 0)})
    assert len(s) == 3
    assert sorted(s.paths()) == ["/", "/a", "/a/b"]
    assert list(s.walk("/missing")) == []
    n = s.get("/a")
    assert n is not None and n.owner == 0 and "Node(b'1'" in repr(n)
    snap = s.open_snapshot()
    s.apply({"/a/b": None})
    assert s.get_at("/a/b", snap) is not None and s.get("/a/b") is None
    assert s.version_count() >= 3
    s.close_snapshot(snap)
    s.apply({"/gone": None})  # deleting what never existed is a no-op
    assert s.get("/gone") is None
