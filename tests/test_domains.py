"""Guest domains end to end: real guest processes over emulated rings and event channels.

Each test starts a real daemon (emulated hypervisor in <rundir>/fx) and drives guests as separate
processes, the way domU kernels would: the toolstack (dom0, over the socket) creates and
introduces domains, guests talk over their own ring pages.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import trio
from robustness import GUESTS, fx, genv, hv, introduce

from xenstored import guest as guestlib
from xenstored.client import Client, SyncClient
from xenstored.ring import Ring
from xenstored.wire import Message, Op, Parser, XsError, encode


# The guest helpers are shared with the robustness tests.
def run_guest(daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], check=False, env=genv(daemon), capture_output=True, text=True, timeout=timeout
    )


def spawn_guest(daemon, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args], env=genv(daemon), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def xg(daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """The xenstore-guest command, acting as a guest."""
    return run_guest(daemon, "-m", "xenstored.guest", *args)


@pytest.fixture
def d0(daemon):
    with SyncClient(daemon.socket) as c:
        yield c


# ------------------------------------------------------------------ lifecycle
def test_three_guests_work_concurrently(daemon, d0):
    for domid in (1, 2, 3):
        introduce(d0, daemon, domid)
    procs = [spawn_guest(daemon, f"{GUESTS}/worker.py", str(d), "300") for d in (1, 2, 3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    for r in results:
        assert r["errors"] == {} and r["done"] == 300
    assert d0.read("/local/domain/2/data/k5") == b"v295"
    assert d0.get_perms("/local/domain/2/data/k5") == ["n2"]


def test_guest_cli_uses_relative_paths_and_permissions(daemon, d0):
    introduce(d0, daemon, 5)
    r = xg(daemon, "5", "write", "data/x", "hello")
    assert r.returncode == 0, r.stderr
    assert d0.read("/local/domain/5/data/x") == b"hello"
    r = xg(daemon, "5", "read", "/tool/xenstored")
    assert r.returncode == 1 and "EACCES" in r.stderr
    r = xg(daemon, "5", "ls", "/local/domain/5")
    assert r.stdout.split() == ["data"]


def test_introduce_rules(daemon, d0):
    with pytest.raises(XsError) as e:
        d0.request(Op.INTRODUCE, b"9\x000\x001\x00")  # the hypervisor does not know dom9
    assert e.value.name == "EINVAL"
    hv(daemon, "create 9")
    with pytest.raises(XsError) as e:
        d0.request(Op.INTRODUCE, b"9\x000\x000\x00")  # port 0
    assert e.value.name == "EINVAL"
    assert d0.request(Op.IS_DOMAIN_INTRODUCED, b"9\0") == b"F\0"
    d0.request(Op.INTRODUCE, b"9\x000\x001\x00")
    assert d0.request(Op.IS_DOMAIN_INTRODUCED, b"9\0") == b"T\0"
    with pytest.raises(XsError) as e:
        d0.request(Op.RELEASE, b"0\0")
    assert e.value.name in ("EINVAL", "ENOENT")


async def test_introduce_and_release_fire_special_watches(daemon):
    async with (
        Client(daemon.socket) as c,
        c.watch("@introduceDomain", "in") as intro,
        c.watch("@releaseDomain", "out") as rel,
    ):
        assert await intro.get() == ("@introduceDomain", "in")  # initial events
        assert await rel.get() == ("@releaseDomain", "out")
        await trio.to_thread.run_sync(hv, daemon, "create 4")
        await c.request(Op.INTRODUCE, b"4\x000\x001\x00")
        with trio.fail_after(5):
            assert await intro.get() == ("@introduceDomain", "in")
        await c.request(Op.RELEASE, b"4\0")
        with trio.fail_after(5):
            assert await rel.get() == ("@releaseDomain", "out")


class RawConn:
    """A bare socket client that keeps every watch event, in arrival order."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(5)
        self.parser = Parser()
        self.got: list[tuple[str, str]] = []

    def _take(self) -> list[Message]:
        replies = []
        for m in self.parser.feed(self.sock.recv(65536)):
            if m.type == Op.WATCH_EVENT:
                path, token, _ = m.payload.split(b"\0")
                self.got.append((path.decode(), token.decode()))
            else:
                replies.append(m)
        return replies

    def call(self, op: int, payload: bytes) -> Message:
        self.sock.sendall(encode(op, 1, 0, payload))
        while True:
            replies = self._take()
            if replies:
                return replies[0]

    def events(self, seconds: float) -> list[tuple[str, str]]:
        self.sock.settimeout(0.1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self._take()
            except TimeoutError:
                pass
        return self.got


def test_depth_watches_on_special_paths_name_the_domain(daemon):
    c = RawConn(daemon.socket)
    c.call(Op.WATCH, b"@introduceDomain\0d\x001\0")
    c.call(Op.WATCH, b"@releaseDomain/6\0only6\0")
    c.call(Op.WATCH, b"@releaseDomain/7\0only7\0")
    hv(daemon, "create 6")
    assert c.call(Op.INTRODUCE, b"6\x000\x001\x00").payload == b"OK\0"
    hv(daemon, "destroy 6")
    got = c.events(0.5)
    assert got.count(("@introduceDomain/6", "d")) == 1
    assert got.count(("@releaseDomain/6", "only6")) == 2  # initial event, then the release
    assert got.count(("@releaseDomain/7", "only7")) == 1  # the initial event only


def test_domain_death_removes_its_nodes_and_stale_permissions(daemon, d0):
    introduce(d0, daemon, 7)
    assert xg(daemon, "7", "write", "data/x", "1").returncode == 0
    d0.write("/common", "")
    d0.set_perms("/common", ["n0", "r7"])
    hv(daemon, "destroy 7")  # answered once the daemon has handled VIRQ_DOM_EXC
    assert not d0.exists("/local/domain/7")
    assert d0.get_perms("/common") == ["n0"]
    assert d0.request(Op.IS_DOMAIN_INTRODUCED, b"7\0") == b"F\0"
    # A new domain reusing the id inherits nothing.
    introduce(d0, daemon, 7)
    assert xg(daemon, "7", "read", "/local/domain/7/data/x").returncode == 1


async def test_shutdown_reported_once_until_resume(daemon):
    async with Client(daemon.socket) as c:
        await trio.to_thread.run_sync(hv, daemon, "create 8")
        await c.request(Op.INTRODUCE, b"8\x000\x001\x00")
        async with c.watch("@releaseDomain", "rel") as rel:
            await rel.get()
            await trio.to_thread.run_sync(hv, daemon, "shutdown 8")
            with trio.fail_after(5):
                await rel.get()
            await trio.to_thread.run_sync(hv, daemon, "virq")
            with trio.move_on_after(0.3):
                await rel.get()
                pytest.fail("shutdown reported twice")
            await c.request(Op.RESUME, b"8\0")
            await trio.to_thread.run_sync(hv, daemon, "virq")
            with trio.fail_after(5):
                await rel.get()
            assert await c.request(Op.IS_DOMAIN_INTRODUCED, b"8\0") == b"T\0"
            await trio.to_thread.run_sync(hv, daemon, "dying 8")
            with trio.fail_after(5):
                await rel.get()
            assert await c.request(Op.IS_DOMAIN_INTRODUCED, b"8\0") == b"F\0"


# ------------------------------------------------------------------ features, quotas, target
def test_features_and_quotas_per_domain(daemon, d0):
    hv(daemon, "create 11")
    assert d0.request(Op.GET_FEATURE, b"11\0") == b"15\0"
    d0.request(Op.SET_FEATURE, b"11\x002\0")
    assert d0.request(Op.GET_QUOTA, b"") == (
        b"nodes watches outstanding memory soft-memory transactions transaction-nodes "
        b"node-permissions path-max node-size\0"
    )
    d0.request(Op.SET_QUOTA, b"11\0nodes\x003\0")
    assert d0.request(Op.GET_QUOTA, b"11\0nodes\0") == b"3\0"
    assert d0.request(Op.GET_QUOTA, b"nodes\0") == b"1000\0"
    d0.mkdir("/local/domain/11")
    d0.set_perms("/local/domain/11", ["n11"])
    d0.request(Op.INTRODUCE, b"11\x000\x001\x00")
    with pytest.raises(XsError) as e:
        d0.request(Op.SET_FEATURE, b"11\x002\0")
    assert e.value.name == "EBUSY"
    with guestlib.Guest(11, fx(daemon)) as g:
        assert g.ring.features == 2
        g.write("a", "")
        g.write("b", "")
        with pytest.raises(XsError) as e:
            g.write("c", "")
        assert e.value.name == "ENOSPC"
    assert "domain 11 refused by nodes quota" in daemon.log()


def test_set_target_gives_a_stubdom_its_targets_access(daemon, d0):
    introduce(d0, daemon, 12)
    introduce(d0, daemon, 13)
    d0.write("/local/domain/12/dm", "x")
    with guestlib.Guest(13, fx(daemon)) as stub:
        with pytest.raises(XsError):
            stub.read("/local/domain/12/dm")
        d0.request(Op.SET_TARGET, b"13\x0012\0")
        d0.set_perms("/local/domain/12/dm", ["n12"])
        assert stub.read("/local/domain/12/dm") == b"x"


# ------------------------------------------------------------------ ring protocol
def test_reconnection_resets_the_connection(daemon, d0):
    introduce(d0, daemon, 14)
    with guestlib.Guest(14, fx(daemon)) as g:
        assert g.ring.features & 1
        g.watch("data", "w")
        t = g.transaction_start()
        g.reconnect()
        assert g.ring.connection == 0
        with pytest.raises(XsError) as e:
            g.read("data", t)
        assert e.value.name == "ENOENT"
        g.write("data/after", "1")  # the watch is gone with the reset: no event queued
        assert list(g.events) == []


def test_messages_split_across_the_ring_wrap(daemon, d0):
    introduce(d0, daemon, 15)
    with guestlib.Guest(15, fx(daemon)) as g:
        for size in (1, 1000, 2000, 3000, 4000):
            value = bytes(range(48, 58)) * (size // 10)
            d0.write("/local/domain/15/big", value)
            assert g.read("big") == value


def test_request_in_pieces_and_oversized_header_consume_what_they_did(daemon, d0):
    """A header alone, its payload later, then a header announcing too much: the daemon consumes
    the header and payload in whatever pieces the guest wrote them, and of the oversized one
    exactly its 16 header bytes, flagging the page (XENSTORE_ERROR_PROTO)."""
    introduce(d0, daemon, 16)
    d0.write("/local/domain/16/x", "piecewise")
    with guestlib.Guest(16, fx(daemon)) as g:
        req = encode(Op.READ, 77, 0, b"x\0")
        g.send_raw(req[:16])
        deadline = time.monotonic() + 5
        while g.ring.indexes()[0] != 16:  # req_cons: the header was taken on its own
            assert time.monotonic() < deadline
            time.sleep(0.01)
        g.send_raw(req[16:])
        p = Parser()
        msgs: list[Message] = []
        while not msgs:
            assert time.monotonic() < deadline
            msgs = p.feed(g.ring.read())
            time.sleep(0.01)
        assert (msgs[0].req_id, msgs[0].payload) == (77, b"piecewise")
        cons = g.ring.indexes()[0]
        g.send_raw(encode(Op.READ, 78, 0, b"x\0")[:12] + (5000).to_bytes(4, "little") + b"y" * 40)
        while g.ring.error != 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert g.ring.indexes()[0] == cons + 16


# ------------------------------------------------------------------ hostile guests
@pytest.mark.parametrize("kind,code", [("corrupt-index", 2), ("oversized", 3)])
def test_broken_guest_is_ignored_and_others_unaffected(daemon, d0, kind, code):
    introduce(d0, daemon, 20)
    introduce(d0, daemon, 21)
    with guestlib.Guest(21, fx(daemon)) as good:
        good.write("ok", "1")
        r = run_guest(daemon, f"{GUESTS}/hostile.py", "20", kind)
        assert r.returncode == 0, r.stderr
        with open(os.path.join(fx(daemon), "dom20.ring"), "rb") as f:
            page = Ring(memoryview(bytearray(f.read())))
        assert page.error == code
        assert good.read("ok") == b"1"
        d0.write("/check", "alive")
        assert d0.read("/check") == b"alive"
    # The toolstack can revive it with a fresh ring (beyond C, which never does).
    d0.request(Op.INTRODUCE, b"20\x000\x001\x00")
    r = xg(daemon, "20", "write", "data/x", "back")
    assert r.returncode == 0, r.stderr


def test_garbage_requests_get_errors_and_the_ring_keeps_working(daemon, d0):
    introduce(d0, daemon, 22)
    r = run_guest(daemon, f"{GUESTS}/hostile.py", "22", "garbage")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "yes"


def test_guest_that_never_reads_is_throttled_not_buffered(daemon, d0):
    introduce(d0, daemon, 23)
    introduce(d0, daemon, 24)
    proc = spawn_guest(daemon, f"{GUESTS}/hostile.py", "23", "flood-no-read")
    with guestlib.Guest(24, fx(daemon)) as good:
        for i in range(50):
            good.write("x", str(i))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    # The daemon stopped reading once 'outstanding' replies were queued: the flood is bounded by
    # what fits in the rings plus the quota, not by how long the guest kept writing.
    assert int(out) < 200
    assert d0.read("/local/domain/24/x") == b"49"


# ------------------------------------------------------------------ the point of it all
def test_block_device_negotiation_between_backend_and_frontend(daemon, d0):
    """blkback in dom0 and blkfront in a guest bring a vbd up and down through XenStore."""
    domid, dev = 30, "768"
    introduce(d0, daemon, domid)
    be = f"/local/domain/0/backend/vbd/{domid}/{dev}"
    fe = f"/local/domain/{domid}/device/vbd/{dev}"
    # The toolstack writes both halves in one transaction, with the usual permissions.
    tx = d0.transaction_start()
    d0.write(f"{be}/frontend", fe, tx)
    d0.write(f"{be}/frontend-id", str(domid), tx)
    d0.write(f"{be}/state", "1", tx)
    d0.write(f"{be}/params", "/dev/vg/disk", tx)
    d0.set_perms(be, ["n0", f"r{domid}"], tx)
    d0.write(f"{fe}/backend", be, tx)
    d0.write(f"{fe}/backend-id", "0", tx)
    d0.write(f"{fe}/state", "1", tx)
    d0.write(f"{fe}/virtual-device", dev, tx)
    d0.set_perms(fe, [f"n{domid}", "r0"], tx)
    for sub in ("backend", "backend-id", "state", "virtual-device"):
        d0.set_perms(f"{fe}/{sub}", [f"n{domid}", "r0"], tx)
    for sub in ("frontend", "frontend-id", "state", "params"):
        d0.set_perms(f"{be}/{sub}", ["n0", f"r{domid}"], tx)
    d0.transaction_end(tx)

    frontend = spawn_guest(daemon, f"{GUESTS}/frontend.py", str(domid), dev)

    async def backend() -> list[str]:
        seen: list[str] = []
        async with Client(daemon.socket) as c, c.watch(f"{fe}/state", "fe") as events:
            await c.write(f"{be}/sectors", "2097152")
            await c.write(f"{be}/state", "2")  # InitWait: features published
            async for _ in events:
                state = (await c.read(f"{fe}/state")).decode()
                if seen and seen[-1] == state:
                    continue
                seen.append(state)
                if state == "3":  # frontend Initialised: read its ring details, connect
                    assert await c.read(f"{fe}/ring-ref") == b"8"
                    assert await c.read(f"{fe}/event-channel") == b"11"
                    await c.write(f"{be}/state", "4")
                elif state == "4":  # both Connected; now tear down
                    await c.write(f"{be}/state", "5")
                elif state == "6":
                    await c.write(f"{be}/state", "6")
                    return seen

    async def main() -> list[str]:
        with trio.fail_after(60):
            return await backend()

    backend_seen = trio.run(main)
    out, err = frontend.communicate(timeout=60)
    assert frontend.returncode == 0, err
    assert backend_seen == ["1", "3", "4", "6"]
    assert json.loads(out) == {"seen": ["2", "4", "5", "6"], "sectors": "2097152"}
    # The guest may not touch the backend's half.
    r = xg(daemon, str(domid), "write", f"{be}/state", "4")
    assert r.returncode == 1 and "EACCES" in r.stderr


def test_hundred_domains_at_once(daemon, d0):
    """100 guests introduced at once, each doing 100 operations concurrently: no errors."""
    start = time.perf_counter()
    for domid in range(100, 200):
        introduce(d0, daemon, domid)
    procs = [spawn_guest(daemon, f"{GUESTS}/worker.py", str(d), "100") for d in range(100, 200)]
    errors = {}
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        r = json.loads(out)
        assert r["done"] == 100
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    assert errors == {}
    print(f"100 domains x 100 ops: {time.perf_counter() - start:.1f}s")


# ------------------------------------------------------------------ the death scan's hint
def _emulated_world(tmp_path):  # type: ignore[no-untyped-def]
    from sansio import Peer, make_core

    from xenstored.domains import DomainManager
    from xenstored.hypervisor.emulated import EmulatedHypervisor

    hv = EmulatedHypervisor(tmp_path / "fx", domains="")
    core = make_core()
    mgr = DomainManager(core, hv)
    mgr.on_dom_exc()  # the first scan looks at everything; the next ones take the hint
    return hv, core, mgr, Peer(core)


def test_a_scan_told_what_changed_still_sees_domains_introduced_dying(tmp_path):
    """The emulated hypervisor tells the scan which domains changed; a domain introduced after
    it died (dying, not yet gone) or re-shut down after RESUME changed nothing since, and is
    still cleaned up or reported at the next VIRQ, whichever domain raised it."""
    hv, core, mgr, d0 = _emulated_world(tmp_path)
    try:
        for domid in (5, 6):
            hv.command(f"create {domid}")
        hv.command("dying 5")
        hv.command("shutdown 6")
        mgr.on_dom_exc()
        for domid in (5, 6):
            assert d0.call(Op.INTRODUCE, f"{domid}\0{domid}\0{1}\0".encode()) == b"OK\0"
        released = []
        core.fire_special = lambda name, domid: released.append((name, domid))  # type: ignore[method-assign]
        hv.command("create 9")  # another domain's VIRQ
        mgr.on_dom_exc()
        assert d0.call(Op.IS_DOMAIN_INTRODUCED, b"5\0") == b"F\0"
        assert ("@releaseDomain", 6) in released and ("@releaseDomain", 5) in released
        released.clear()
        hv.command("create 10")
        mgr.on_dom_exc()
        assert released == []  # reported once
        assert d0.call(Op.RESUME, b"6\0") == b"OK\0"
        hv.command("create 11")
        mgr.on_dom_exc()
        assert released == [("@releaseDomain", 6)]  # again after RESUME
    finally:
        hv.close()


def test_a_scan_told_what_changed_strips_permissions_naming_a_dead_domain(tmp_path):
    """A domain never introduced but named in a permission has a record (XSA-417); when the
    hypervisor destroys it, the scan it is told about strips the entry and drops the record."""
    hv, core, mgr, d0 = _emulated_world(tmp_path)
    try:
        hv.command("create 77")
        mgr.on_dom_exc()
        d0.write("/common", "")
        d0.setperms("/common", "n0", "r77")
        assert 77 in core.domains and not core.domains[77].introduced
        hv.command("create 9")
        mgr.on_dom_exc()
        assert d0.getperms("/common") == ["n0", "r77"]
        hv.command("destroy 77")
        mgr.on_dom_exc()
        assert 77 not in core.domains
        assert d0.getperms("/common") == ["n0"]
    finally:
        hv.close()


def test_a_failed_scan_makes_the_next_look_at_every_domain(tmp_path):
    """The hint is spent when a scan starts: one that fails half-way leaves the next to look at
    all domains, so a death it missed is not lost."""
    hv, _core, mgr, d0 = _emulated_world(tmp_path)
    try:
        hv.command("create 5")
        assert d0.call(Op.INTRODUCE, b"5\x005\x001\x00") == b"OK\0"
        mgr.on_dom_exc()
        hv.command("destroy 5")
        real = mgr.destroy

        def failing(dom, why):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

        mgr.destroy = failing  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            mgr.on_dom_exc()
        mgr.destroy = real  # type: ignore[method-assign]
        mgr.on_dom_exc()  # no change since: the hint is empty, the rescan is not
        assert d0.call(Op.IS_DOMAIN_INTRODUCED, b"5\0") == b"F\0"
    finally:
        hv.close()
