"""Guards against per-request work that scans all connections, all watches or all nodes.

These count operations, not time, so they are deterministic on a loaded machine.  Each guard runs
the same request against a small daemon core and a large one (10,000 nodes, watches or
connections) and asserts that the request touches exactly as many entries in both: per-request
work must be O(1) in those sizes (O(depth) in the path, which is the same in both cores).

The counting works by swapping the core's own containers for dict subclasses that count every
lookup and fail on any full iteration while armed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sansio import Peer, make_core
from xenstored.connection import Connection
from xenstored.core import Core
from xenstored.wire import Op

BIG = 10_000
SMALL = 10


class ScanError(AssertionError):
    pass


class CountingDict(dict):  # type: ignore[type-arg]
    """A dict that counts keyed access and refuses whole-container scans while ``armed``."""

    def __init__(self, name: str, src: dict[Any, Any], counter: Counter[str], violations: list[str]) -> None:
        super().__init__(src)
        self.name = name
        self.counter = counter
        self.violations = violations
        self.armed = False

    def _hit(self) -> None:
        if self.armed:
            self.counter[self.name] += 1

    def _scan(self, how: str) -> None:
        if self.armed:
            # Recorded as well as raised: the dispatcher turns exceptions into an EIO reply.
            msg = f"{self.name}: {how} over all {len(self)} entries during one request"
            self.violations.append(msg)
            raise ScanError(msg)

    def __getitem__(self, k: Any) -> Any:
        self._hit()
        return super().__getitem__(k)

    def get(self, k: Any, default: Any = None) -> Any:
        self._hit()
        return super().get(k, default)

    def __contains__(self, k: object) -> bool:
        self._hit()
        return super().__contains__(k)

    def __setitem__(self, k: Any, v: Any) -> None:
        self._hit()
        super().__setitem__(k, v)

    def __delitem__(self, k: Any) -> None:
        self._hit()
        super().__delitem__(k)

    def pop(self, k: Any, *default: Any) -> Any:
        self._hit()
        return super().pop(k, *default)

    def setdefault(self, k: Any, default: Any = None) -> Any:
        self._hit()
        return super().setdefault(k, default)

    def __iter__(self) -> Iterator[Any]:
        self._scan("iteration")
        return super().__iter__()

    def keys(self) -> Any:
        self._scan("keys()")
        return super().keys()

    def values(self) -> Any:
        self._scan("values()")
        return super().values()

    def items(self) -> Any:
        self._scan("items()")
        return super().items()


class Probe:
    """Instruments one core: its node table, watch indexes and connection table."""

    def __init__(self, core: Core) -> None:
        self.counter: Counter[str] = Counter()
        self.violations: list[str] = []
        self.dicts: list[CountingDict] = []
        store, watches = core.store, core.watches
        store._dirs = self._wrap("store._dirs", store._dirs)
        watches._by_path = self._wrap("watches._by_path", watches._by_path)
        watches._by_owner = self._wrap("watches._by_owner", watches._by_owner)
        core.connections = self._wrap("core.connections", core.connections)
        self._events = 0
        self._orig_event = Connection.event

    def _wrap(self, name: str, d: dict[Any, Any]) -> CountingDict:
        cd = CountingDict(name, d, self.counter, self.violations)
        self.dicts.append(cd)
        return cd

    def measure(self, fn: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
        """Counts of keyed accesses (and Connection.event calls) made by ``fn``."""
        self.counter.clear()
        orig = self._orig_event
        counter = self.counter

        def counting_event(conn: Connection, path: str, token: str) -> None:
            counter["Connection.event"] += 1
            orig(conn, path, token)

        with monkeypatch.context() as m:
            m.setattr(Connection, "event", counting_event)
            for d in self.dicts:
                d.armed = True
            try:
                fn()
            except AssertionError:
                if not self.violations:
                    raise
            finally:
                for d in self.dicts:
                    d.armed = False
        if self.violations:
            raise ScanError("; ".join(self.violations))
        return Counter(self.counter)


def _domain_tree(peer: Peer, domains: int, per: int = 10) -> None:
    for d in range(domains):
        for j in range(per - 1):
            peer.write(f"/local/domain/{d + 1}/n{j}", "v")


def _core_with_nodes(n: int) -> tuple[Core, Peer]:
    core = make_core()
    p = Peer(core)
    _domain_tree(p, n // 10)
    p.write("/bench/target/x", "value")
    return core, p


def _core_with_watches(n: int) -> tuple[Core, Peer]:
    core = make_core()
    p = Peer(core)
    holders = [Peer(core) for _ in range(10)]
    for i in range(n):
        holders[i % 10].watch(f"/unrelated/h{i % 10}/p{i}", f"t{i}")
    for h in holders:
        h.drain()
    p.write("/bench/target/x", "value")
    return core, p


def _core_with_connections(n: int) -> tuple[Core, Peer]:
    core = make_core()
    p = Peer(core)
    others = [Peer(core) for _ in range(n)]
    for o in others[:: max(1, n // 10)]:
        o.read("/tool/xenstored")
    p.write("/bench/target/x", "value")
    return core, p


REQUESTS: dict[str, Callable[[Peer], object]] = {
    "read": lambda p: p.read("/bench/target/x"),
    "write": lambda p: p.write("/bench/target/x", "new"),
    "create": lambda p: p.write("/bench/target/new", "v"),
    "directory": lambda p: p.ls("/bench/target"),
    "get_perms": lambda p: p.getperms("/bench/target/x"),
    "rm": lambda p: p.rm("/bench/target/x"),
    "transaction": lambda p: p.end(_tx_write(p)),
    "watch": lambda p: (p.watch("/bench/target", "tok"), p.drain()),
}


def _tx_write(p: Peer) -> int:
    tx = p.start()
    p.read("/bench/target/x", tx)
    p.write("/bench/target/y", "v", tx)
    return tx


BUILDERS = {"nodes": _core_with_nodes, "watches": _core_with_watches, "connections": _core_with_connections}


@pytest.mark.parametrize("what", list(BUILDERS))
@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_request_work_independent_of_size(what: str, request_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request touches as many entries with 10,000 nodes/watches/connections as with 10."""
    req = REQUESTS[request_name]
    counts = []
    for n in (SMALL, BIG):
        core, peer = BUILDERS[what](n)
        probe = Probe(core)
        counts.append(probe.measure(lambda peer=peer: req(peer), monkeypatch))
    small, big = counts
    assert big == small, f"{request_name} with {BIG} {what}: {dict(big)} vs {SMALL}: {dict(small)}"


def test_unrelated_watches_fire_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 watches elsewhere: a write queues no events and looks up only its ancestors."""
    core, peer = _core_with_watches(BIG)
    probe = Probe(core)
    counts = probe.measure(lambda: peer.write("/bench/target/x", "again"), monkeypatch)
    assert counts["Connection.event"] == 0
    # /bench/target/x, /bench/target, /bench and /: one lookup each, whatever the registry size.
    assert counts["watches._by_path"] <= 4, counts


def test_fan_out_touches_only_watchers(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 10,000 idle connections and 100 watchers, a write queues exactly 100 events."""
    core, peer = _core_with_connections(BIG)
    watchers = [Peer(core) for _ in range(100)]
    for i, w in enumerate(watchers):
        w.watch("/bench/target", f"w{i}")
        w.drain()
    probe = Probe(core)
    counts = probe.measure(lambda: peer.write("/bench/target/x", "fan"), monkeypatch)
    assert counts["Connection.event"] == 100
    assert counts["core.connections"] == 0, counts


def test_transaction_start_copies_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRANSACTION_START is O(1): it reads no node at all, however big the store."""
    core, peer = _core_with_nodes(BIG)
    probe = Probe(core)
    counts = probe.measure(lambda: peer.call(Op.TRANSACTION_START, b"\0"), monkeypatch)
    assert counts["store._dirs"] == 0, counts


def test_a_domain_death_touches_only_the_nodes_naming_it() -> None:
    """Releasing a domain (or its death) finds the nodes to delete or strip through the store's
    index of permission lists, not a walk of the whole tree: the same count of node lookups with
    10 or 10,000 unrelated nodes."""
    from xenstored.domains import DomainManager

    counts = []
    for n in (SMALL, BIG):
        core = make_core()
        d0 = Peer(core)
        for i in range(n):
            d0.write(f"/bulk/n{i}", "x")
        d0.write("/local/domain/5/data", "mine")
        d0.setperms("/local/domain/5", "n5")
        d0.write("/shared", "s")
        d0.setperms("/shared", "n0", "r5")
        mgr = DomainManager(core, object())  # type: ignore[arg-type]
        store = core.store
        real_get, real_latest = store.get, store._latest
        calls = Counter[str]()

        def get(path: str, _real: Callable[[str], Any] = real_get, _calls: Counter[str] = calls) -> Any:
            _calls["get"] += 1
            return _real(path)

        def latest(path: str, _real: Callable[[str], Any] = real_latest, _calls: Counter[str] = calls) -> Any:
            _calls["_latest"] += 1  # naming() finds each listed name's record here
            return _real(path)

        store.get = get  # type: ignore[method-assign]
        store._latest = latest  # type: ignore[method-assign]
        mgr.remove_domain_nodes(5)
        store.get = real_get  # type: ignore[method-assign]
        store._latest = real_latest  # type: ignore[method-assign]
        assert real_get("/local/domain/5") is None and real_get("/local/domain/5/data") is None
        assert [p.format() for p in real_get("/shared").perms] == ["n0"]
        assert real_get(f"/bulk/n{n - 1}") is not None
        assert calls["get"] + calls["_latest"] > 0  # the probes see the lookups at all
        counts.append(calls["get"] + calls["_latest"])
    assert counts[0] == counts[1], counts


def test_a_domain_release_does_not_scan_the_other_domains_homes() -> None:
    """A domain's home sits among every other domain's in /local/domain, each with its own
    permission list: finding the nodes naming the released domain looks at its own entries and
    its own lists, not at its siblings' or every domain's lists (RELEASE stays O(1) in the
    number of domains)."""
    from xenstored.domains import DomainManager

    class CountingDirs(dict):  # type: ignore[type-arg]
        scanned = 0

        def get(self, key: object, *default: object) -> Any:
            v = dict.get(self, key, *default)
            if default:  # naming()'s directory scans pass a default; lookups do not
                CountingDirs.scanned += len(v)  # type: ignore[arg-type]
            return v

    class CountingLists(list):  # type: ignore[type-arg]
        walked = 0

        def __iter__(self) -> Any:
            CountingLists.walked += len(self)
            return list.__iter__(self)

    scanned = []
    for n in (SMALL, BIG // 10):
        core = make_core()
        d0 = Peer(core)
        for domid in range(1, n + 1):
            d0.write(f"/local/domain/{domid}/name", f"guest{domid}")
            d0.setperms(f"/local/domain/{domid}", f"n{domid}")
            d0.setperms(f"/local/domain/{domid}/name", f"n{domid}")
        store = core.store
        store._dirs = CountingDirs(store._dirs)  # type: ignore[attr-defined]
        store._perm_lists = CountingLists(store._perm_lists)  # type: ignore[attr-defined]
        CountingDirs.scanned = CountingLists.walked = 0
        DomainManager(core, object()).remove_domain_nodes(5)  # type: ignore[arg-type]
        assert store.get("/local/domain/5") is None and store.get("/local/domain/6") is not None
        scanned.append((CountingDirs.scanned, CountingLists.walked))
    assert scanned[0] == scanned[1], scanned


def _bytes_written() -> int:
    """This process's bytes passed to write(2) and its kin so far (``wchar``): whatever path the
    writes take (an append, a temporary file and a rename), they are counted."""
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def test_emulated_domain_changes_write_o1_bytes_in_the_number_of_domains(tmp_path: Path) -> None:
    """Creating and destroying a domain in the emulated hypervisor keeps its table on disk (it
    outlives the daemon) by appending a line, not by rewriting the table: the bytes written per
    change, compactions included (amortized over enough changes for the big table to compact
    at least once), are about the same with 1,000 domains as with 10.  Rewriting the whole
    table wrote ~100 times more per change at 1,000 domains."""
    from xenstored.hypervisor.emulated import EmulatedHypervisor

    cycles = 1_200  # 2,400 changes: more than the 1,000-domain log holds before compacting
    per_change = {}
    for n in (SMALL, BIG // 10):
        hv = EmulatedHypervisor(tmp_path / f"fx{n}", domains=f"1-{n}")
        try:
            before = _bytes_written()
            for _ in range(cycles):
                hv.create_domain(30_000)
                hv.destroy_domain(30_000)
            per_change[n] = (_bytes_written() - before) / (2 * cycles)
            assert [d.domid for d in hv.domains()][-2:] == [n - 1, n]
        finally:
            hv.close()
        hv = EmulatedHypervisor(tmp_path / f"fx{n}", domains="")  # the table outlives it
        try:
            assert len(hv.domains()) == n + 1 and not hv.domain_exists(30_000)
        finally:
            hv.close()
    assert per_change[BIG // 10] <= 3 * per_change[SMALL], per_change


def test_emulated_event_channel_binding_does_not_scan_the_bound_ports(tmp_path: Path) -> None:
    """INTRODUCE binds an event channel and RELEASE unbinds it: with 1,000 domains bound, finding
    the lowest free port, the next binding of a pair and the kick cache's stale entry must not
    look at every bound port (that made INTRODUCE and RELEASE grow with the domains)."""
    from xenstored.hypervisor.emulated import EmulatedHypervisor

    counts = []
    for n in (SMALL, BIG // 10):
        hv = EmulatedHypervisor(tmp_path / f"fx{n}", domains=f"1-{n + 1}")
        try:
            for d in range(1, n + 1):
                hv._kicks[b"notify %d 1" % d] = hv.bind_interdomain(d, 1)  # as _learn_kick leaves it
            counter: Counter[str] = Counter()
            violations: list[str] = []
            hv._ports = CountingDict("hv._ports", hv._ports, counter, violations)  # type: ignore[assignment]
            hv._kicks = CountingDict("hv._kicks", hv._kicks, counter, violations)  # type: ignore[assignment]
            for cd in (hv._ports, hv._kicks):
                cd.armed = True  # type: ignore[attr-defined]
            p = hv.bind_interdomain(n + 1, 1)
            q = hv.bind_interdomain(n + 1, 1)  # a second binding of the same pair
            hv.unbind(p)
            assert hv.command(f"notify {n + 1} 1")[0] == f"ok notify {q}"
            hv.unbind(q)
            hv.unbind(5)
            assert hv.bind_interdomain(n + 1, 1) == 5  # the lowest free port, as fakexen
            for cd in (hv._ports, hv._kicks):
                cd.armed = False  # type: ignore[attr-defined]
            assert not violations, violations
            assert len(hv._kicks) == n - 1  # only dom4's (port 5) cached kick went
            counts.append(counter)
        finally:
            hv.close()
    assert counts[0] == counts[1], counts


def test_a_domain_death_scan_looks_only_at_the_domains_that_changed(tmp_path: Path) -> None:
    """VIRQ_DOM_EXC after the emulated hypervisor creates or destroys one domain: the daemon
    asks about that domain (and records new since the last scan), not about each of 1,000
    introduced domains (which cost ~1 ms per VIRQ, twice per guest's life)."""
    from xenstored.domains import DomainManager
    from xenstored.hypervisor.emulated import EmulatedHypervisor

    asked = []
    for n in (SMALL, BIG // 10):
        hv = EmulatedHypervisor(tmp_path / f"fx{n}", domains="")
        try:
            core = make_core()
            mgr = DomainManager(core, hv)
            d0 = Peer(core)
            for domid in range(1, n + 1):
                hv.command(f"create {domid}")
                d0.call(Op.INTRODUCE, f"{domid}\0{domid}\0{1}\0".encode())
            mgr.on_dom_exc()
            calls: list[int] = []
            real = hv.domain_info

            def counting(domid: int, real: Any = real, calls: list[int] = calls) -> Any:
                calls.append(domid)
                return real(domid)

            hv.domain_info = counting  # type: ignore[method-assign]
            hv.command("destroy 3")
            mgr.on_dom_exc()
            hv.command("create 30000")
            mgr.on_dom_exc()
            assert d0.call(Op.IS_DOMAIN_INTRODUCED, b"3\0") == b"F\0"
            assert d0.call(Op.IS_DOMAIN_INTRODUCED, b"4\0") == b"T\0"
            asked.append(sorted(calls))
        finally:
            hv.close()
    assert asked[0] == asked[1], asked
