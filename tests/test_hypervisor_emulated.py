"""The emulated hypervisor's fakexen-compatible protocol: commands, replies, kicks, rings."""

from __future__ import annotations

import mmap
import os
import select
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from xenstored import fxtable
from xenstored.hypervisor import choose
from xenstored.hypervisor.emulated import EmulatedHypervisor, parse_domain_list
from xenstored.ring import GuestRing, Ring
from xenstored.wire import XsError


class Recorder:
    """Callbacks that log what the hypervisor reported, in order."""

    def __init__(self) -> None:
        self.log: list[object] = []
        self.kicked = trio.Event()

    def on_port(self, port: int) -> None:
        self.log.append(("kick", port))
        self.kicked.set()

    def on_dom_exc(self) -> None:
        self.log.append("virq")


class Harness:
    def __init__(self, hv: EmulatedHypervisor, rec: Recorder) -> None:
        self.hv = hv
        self.rec = rec
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        raw.bind("")  # autobind: an address, so replies come back (trio's bind rejects "")
        self.client = trio.socket.from_stdlib_socket(raw)

    async def start(self) -> None:
        await trio.lowlevel.checkpoint()

    async def cmd(self, text: str | bytes) -> str:
        data = text.encode() if isinstance(text, str) else text
        with trio.fail_after(5):
            await self.client.sendto(data, self.hv.sock_path)
            return (await self.client.recv(512)).decode()


@pytest.fixture
def fxdir(tmp_path: Path) -> Path:
    return tmp_path / "fx"


@pytest.fixture
async def harness(fxdir: Path) -> AsyncIterator[Harness]:
    hv = EmulatedHypervisor(fxdir, domains="")
    rec = Recorder()
    h = Harness(hv, rec)
    await h.start()
    async with trio.open_nursery() as nursery:
        await nursery.start(hv.run, rec.on_port, rec.on_dom_exc)
        yield h
        nursery.cancel_scope.cancel()
    h.client.close()
    hv.close()


def test_parse_domain_list() -> None:
    assert parse_domain_list("1-3,42") == {1, 2, 3, 42}
    assert parse_domain_list("0 5, 7-6,x,0x10") == {0, 5, 16}
    assert parse_domain_list(None) == set()
    assert parse_domain_list("") == set()


def test_prepopulated_domains(fxdir: Path) -> None:
    hv = EmulatedHypervisor(fxdir, domains="1-3,42")
    try:
        assert [d.domid for d in hv.domains()] == [0, 1, 2, 3, 42]
        assert hv.domain_info(4) is None
        info = hv.domain_info(42)
        assert info is not None and info.running
    finally:
        hv.close()
    assert not (fxdir / "evtchn.sock").exists()


def test_domain_table_is_a_log_replayed_by_the_next_process(fxdir: Path) -> None:
    """Each change appends one line to the table file; the next process (or fxtable.load)
    replays them: a domain's last line is its state, a destroy removes it."""
    hv = EmulatedHypervisor(fxdir, domains="1-3")
    try:
        lines = (fxdir / fxtable.FILE).read_bytes().count(b"\n")
        hv.create_domain(7)
        hv.command("shutdown 7 2")
        hv.command("crash 2")
        hv.command("dying 3")
        hv.destroy_domain(1)
        assert (fxdir / fxtable.FILE).read_bytes().count(b"\n") == lines + 5
        want = [(d.domid, d.shutdown, d.crashed, d.dying, d.shutdown_reason) for d in hv.domains()]
    finally:
        hv.close()
    assert fxtable.load(fxdir) == {
        0: (fxtable.EXISTS, 0),
        2: (fxtable.EXISTS | fxtable.CRASHED, fxtable.SHUTDOWN_CRASH),
        3: (fxtable.EXISTS | fxtable.DYING, 0),
        7: (fxtable.EXISTS | fxtable.SHUTDOWN, 2),
    }
    hv = EmulatedHypervisor(fxdir, domains="9")  # the table wins over FAKEXEN_DOMAINS
    try:
        got = [(d.domid, d.shutdown, d.crashed, d.dying, d.shutdown_reason) for d in hv.domains()]
        assert got == want and [g[0] for g in got] == [0, 2, 3, 7]
    finally:
        hv.close()


def test_domain_table_log_is_compacted(fxdir: Path) -> None:
    """Churn does not grow the file without bound: past twice the live domains (plus some
    slack) it is rewritten as one line per domain, and reads back the same."""
    hv = EmulatedHypervisor(fxdir, domains="1-5")
    try:
        most = 0
        for i in range(500):
            hv.create_domain(100 + i % 3)
            hv.destroy_domain(100 + i % 3)
            most = max(most, (fxdir / fxtable.FILE).read_bytes().count(b"\n"))
        assert most <= fxtable.COMPACT_FACTOR * 9 + fxtable.COMPACT_SLACK + 1
        assert most > fxtable.COMPACT_SLACK  # it did append rather than rewrite each time
    finally:
        hv.close()
    assert sorted(fxtable.load(fxdir) or {}) == [0, 1, 2, 3, 4, 5]


def test_old_snapshot_tables_still_load(fxdir: Path) -> None:
    """A table written before the log existed (one line per domain) is a log already."""
    fxdir.mkdir()
    (fxdir / fxtable.FILE).write_text("0 1 0\n4 5 3\n6 1 0\n")
    assert fxtable.load(fxdir) == {0: (1, 0), 4: (5, 3), 6: (1, 0)}


def test_a_torn_last_line_is_ignored_and_compacted_away(fxdir: Path) -> None:
    """A crash in the middle of an append leaves part of a line: it is not read, and the next
    writer rewrites the file instead of gluing its line onto the fragment."""
    fxdir.mkdir()
    path = fxdir / fxtable.FILE
    path.write_bytes(b"0 1 0\n5 1 0\n5 0 0\n1")  # "5 0 0" destroyed 5; "1..." is torn
    assert fxtable.load(fxdir) == {0: (1, 0)}
    assert fxtable.apply_offline(fxdir, "create 8") == "ok create 8"
    assert path.read_bytes() == b"0 1 0\n8 1 0\n"
    assert fxtable.apply_offline(fxdir, "destroy 8") == "ok destroy 8"
    assert path.read_bytes() == b"0 1 0\n8 1 0\n8 0 0\n"  # appended
    assert fxtable.apply_offline(fxdir, "exists 8") == "ok 0"
    path.write_bytes(path.read_bytes() + b"3 1")
    hv = EmulatedHypervisor(fxdir, domains="")
    try:
        assert [d.domid for d in hv.domains()] == [0]
        hv.create_domain(3)
        assert path.read_bytes() == b"0 1 0\n3 1 0\n"
    finally:
        hv.close()


def test_domains_from_environment(fxdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKEXEN_DOMAINS", "7")
    hv = EmulatedHypervisor(fxdir)
    try:
        assert hv.domain_exists(7) and hv.domain_exists(0) and not hv.domain_exists(1)
    finally:
        hv.close()


def test_choose_emulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAKEXEN_DIR", raising=False)
    hv = choose(True, tmp_path)
    try:
        assert hv.emulated and (tmp_path / "fx" / "evtchn.sock").exists()
    finally:
        hv.close()
    monkeypatch.setenv("FAKEXEN_DIR", str(tmp_path / "elsewhere"))
    hv = choose(True, tmp_path)
    try:
        assert (tmp_path / "elsewhere" / "evtchn.sock").exists()
    finally:
        hv.close()


async def test_domain_commands(harness: Harness) -> None:
    hv, rec = harness.hv, harness.rec
    assert await harness.cmd("exists 5") == "ok 0"
    assert rec.log == []
    assert await harness.cmd("create 5") == "ok create 5"
    assert rec.log == ["virq"]  # the daemon reacted before the reply was sent
    assert await harness.cmd("exists 5") == "ok 1"
    info = hv.domain_info(5)
    assert info is not None and info.running

    assert await harness.cmd("shutdown 5 2") == "ok shutdown 5"
    info = hv.domain_info(5)
    assert info is not None and info.shutdown and not info.crashed and info.shutdown_reason == 2

    assert await harness.cmd("crash 5") == "ok crash 5"
    info = hv.domain_info(5)
    assert info is not None and info.crashed and info.shutdown and info.shutdown_reason == 3

    assert await harness.cmd("dying 5") == "ok dying 5"
    info = hv.domain_info(5)
    assert info is not None and info.dying and not info.running

    assert await harness.cmd("destroy 5") == "ok destroy 5"
    assert hv.domain_info(5) is None
    assert await harness.cmd("create 5") == "ok create 5"
    info = hv.domain_info(5)
    assert info is not None and info.running  # a fresh domain, flags cleared

    assert await harness.cmd("destroy 0") == "err cannot destroy dom0"
    assert hv.domain_exists(0)
    assert await harness.cmd("virq") == f"ok virq {hv.virq_port}"
    assert rec.log.count("virq") == 7


async def test_reply_waits_for_async_dom_exc(fxdir: Path) -> None:
    hv = EmulatedHypervisor(fxdir, domains="")
    log: list[str] = []

    async def on_dom_exc() -> None:
        await trio.sleep(0.05)
        log.append("cleaned")

    h = Harness(hv, Recorder())
    await h.start()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.run, lambda p: None, on_dom_exc)
            assert await h.cmd("create 3") == "ok create 3"
            assert log == ["cleaned"]
            nursery.cancel_scope.cancel()
    finally:
        h.client.close()
        hv.close()


@pytest.mark.parametrize(
    "garbage, reply",
    [
        (b"", "err empty"),
        (b"   \n", "err empty"),
        (b"\xff\xfe\x00", "err bad command"),
        (b"create", "err bad command"),
        (b"create abc", "err bad command"),
        (b"create -1", "err bad command"),
        (b"create 32752", "err bad command"),
        (b"frobnicate 3", "err unknown command frobnicate"),
        (b"notify", "err bad command"),
        (b"notify 5 x", "err bad command"),
        (b"notify 9", "err no binding for dom9"),
        (b"port 77", "err unknown command port"),
        (b"x" * 5000, "err bad command"),
    ],
    ids=repr,
)
async def test_garbage_gets_err_and_service_continues(harness: Harness, garbage: bytes, reply: str) -> None:
    assert await harness.cmd(garbage) == reply
    assert await harness.cmd("exists 0") == "ok 1"
    assert harness.rec.log == []


async def test_ring_mapping_shared_with_guest(harness: Harness, fxdir: Path) -> None:
    hv = harness.hv
    with pytest.raises(XsError) as ei:
        hv.map_ring(5, 1234)
    assert ei.value.name == "EINVAL"
    await harness.cmd("create 5")
    # the guest creates and sizes its page first, as xsring.py does
    path = fxdir / "dom5.ring"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4096)
    gm = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
    os.close(fd)
    view = hv.map_ring(5, 0)
    server, guest = Ring(view), GuestRing(gm)
    guest.write(b"hello")
    assert server.read() == b"hello"
    server.write(b"world")
    assert guest.read() == b"world"
    server.release()
    hv.unmap_ring(5)
    hv.unmap_ring(5)  # idempotent
    guest.release()
    gm.close()


def test_map_ring_creates_missing_page(fxdir: Path) -> None:
    hv = EmulatedHypervisor(fxdir, domains="4")
    try:
        view = hv.map_ring(4, 0)
        assert len(view) == 4096 and (fxdir / "dom4.ring").stat().st_size == 4096
        # unmapping while a Ring still holds the page must not raise
        ring = Ring(view)
        hv.unmap_ring(4)
        ring.release()
    finally:
        hv.close()


def test_dom0_ring_and_xsd_port(fxdir: Path) -> None:
    hv = EmulatedHypervisor(fxdir, domains="")
    try:
        got = hv.dom0_ring()
        assert got is not None
        view, port = got
        assert port == 1 and (fxdir / "xsd_port").read_text() == "1"
        assert (fxdir / "dom0.ring").stat().st_size == 4096 and len(view) == 4096
    finally:
        hv.close()
    (fxdir / "xsd_port").write_text("7\n")
    hv = EmulatedHypervisor(fxdir, domains="")
    try:
        got = hv.dom0_ring()
        assert got is not None and got[1] == 7
    finally:
        hv.close()


async def test_kicks_both_ways(harness: Harness, fxdir: Path) -> None:
    hv, rec = harness.hv, harness.rec
    await harness.cmd("create 5")
    with pytest.raises(XsError):
        hv.bind_interdomain(6, 1)
    port = hv.bind_interdomain(5, 9)
    assert port != hv.virq_port
    assert hv.bound_ports() == {port: (5, 9)}

    # daemon -> guest: nobody listening yet is fine
    hv.notify(port)
    guest = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await guest.bind(str(fxdir / "dom5.evtchn"))
    hv.notify(port)
    with trio.fail_after(5):
        assert await guest.recv(64) == b"notify 9"

    # guest -> daemon, from the guest's bound socket (xsring.py style): reply goes there too
    await guest.sendto(b"notify 5 9", hv.sock_path)
    with trio.fail_after(5):
        assert await guest.recv(64) == f"ok notify {port}".encode()
        await rec.kicked.wait()
    assert rec.log == ["virq", ("kick", port)]
    assert await harness.cmd("notify 5") == f"ok notify {port}"
    assert await harness.cmd("notify 5 8") == "err no binding for dom5"
    assert await harness.cmd(f"port {port}") == f"ok port {port}"
    assert rec.log[-2:] == [("kick", port), ("kick", port)]

    hv.unbind(port)
    hv.unbind(port)  # unknown ports are ignored
    hv.notify(port)  # no-op
    assert await harness.cmd("notify 5") == "err no binding for dom5"
    guest.close()


async def test_kicks_coalesce_per_port(fxdir: Path) -> None:
    hv = EmulatedHypervisor(fxdir, domains="1,2")
    rec = Recorder()
    p1 = hv.bind_interdomain(1, 1)
    p2 = hv.bind_interdomain(2, 1)
    kicker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # unbound: no replies
    try:
        # queued before the hypervisor task runs: one batch
        for msg in (b"notify 1", b"notify 2 1", b"notify 1 1", b"notify 1", b"virq", b"notify 2"):
            kicker.sendto(msg, hv.sock_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.run, rec.on_port, rec.on_dom_exc)
            with trio.fail_after(5):
                while len(rec.log) < 3:
                    await trio.sleep(0.01)
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        # Each port is pumped at its first kick; the kicks read after that pump (they may have
        # been sent after it looked at the ring) coalesce into one more pump after the drain.
        assert rec.log == [("kick", p1), ("kick", p2), ("kick", p1), ("kick", p2), "virq"]
    finally:
        kicker.close()
        hv.close()


async def test_a_kick_is_pumped_before_the_rest_of_the_queue_is_read(fxdir: Path) -> None:
    """The guest waits for its kick's pump; reading the rest of the queue first would only
    delay its reply (the last read of a drain finds the queue empty: a wasted syscall)."""
    hv = EmulatedHypervisor(fxdir, domains="1,2")
    p1 = hv.bind_interdomain(1, 1)
    p2 = hv.bind_interdomain(2, 1)
    seen: list[tuple[int, bool]] = []

    def on_port(port: int) -> None:
        unread = bool(select.select([hv._sock], [], [], 0)[0])
        seen.append((port, unread))

    kicker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for msg in (b"notify 1 1", b"notify 2 1"):
            kicker.sendto(msg, hv.sock_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.run, on_port, lambda: None)
            with trio.fail_after(5):
                while len(seen) < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert seen == [(p1, True), (p2, False)]
    finally:
        kicker.close()
        hv.close()


async def test_repeated_kicks_follow_rebinding(fxdir: Path) -> None:
    """A guest's usual kick is resolved from a cache after the first time; the cache must follow
    unbind/rebind, other spellings of the same command, and still answer addressed senders."""
    hv = EmulatedHypervisor(fxdir, domains="5")
    rec = Recorder()
    kicker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # unbound: no replies
    asker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    asker.bind("")
    asker.settimeout(5)

    async def kicks(*msgs: bytes) -> list[object]:
        rec.log.clear()
        for m in msgs:
            kicker.sendto(m, hv.sock_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.run, rec.on_port, rec.on_dom_exc)
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        return rec.log[:]

    try:
        blocker = hv.bind_interdomain(5, 1)  # takes the lowest port
        p = hv.bind_interdomain(5, 9)
        for _ in range(3):
            assert await kicks(b"notify 5 9") == [("kick", p)]
        assert await kicks(b"notify 0x5 9", b"notify 5 09") == [("kick", p)]
        asker.sendto(b"notify 5 9", hv.sock_path)
        assert await kicks() == [("kick", p)]
        assert asker.recv(64) == f"ok notify {p}".encode()
        hv.unbind(p)
        assert await kicks(b"notify 5 9") == []
        hv.unbind(blocker)
        q = hv.bind_interdomain(5, 9)
        assert q != p
        assert await kicks(b"notify 5 9") == [("kick", q)]
        r = hv.bind_interdomain(5, 9)  # a second binding of the pair: kicks still go to the first
        assert await kicks(b"notify 5 9") == [("kick", q)]
        hv.unbind(q)
        assert await kicks(b"notify 5 9") == [("kick", r)]
    finally:
        kicker.close()
        asker.close()
        hv.close()


async def test_port_numbers_follow_fakexen(fxdir: Path) -> None:
    """Lowest free port first, VIRQ on port 1, freed ports are reused."""
    hv = EmulatedHypervisor(fxdir, domains="1-3")
    try:
        a, b = hv.bind_interdomain(0, 1), hv.bind_interdomain(1, 1)
        assert (hv.virq_port, a, b) == (1, 2, 3)
        hv.unbind(a)
        assert hv.bind_interdomain(3, 4) == 2
    finally:
        hv.close()
