"""The guest library and xenstore-guest against the emulated hypervisor and a toy responder.

The responder is a few lines of dict-backed XenStore, so these tests pin the guest side (framing
over the ring, kicks, event queueing, errors, the console command) without the daemon core.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from xenstored import wire
from xenstored.guest import Guest, control, main
from xenstored.hypervisor.emulated import EmulatedHypervisor
from xenstored.ring import Ring
from xenstored.wire import Op, XsError

DOMID = 5


class Toy:
    """Serves one domain's ring: READ/WRITE/DIRECTORY/WATCH from a dict, one event per WRITE."""

    def __init__(self, hv: EmulatedHypervisor) -> None:
        self.hv = hv
        self.data: dict[bytes, bytes] = {}
        self.watches: list[tuple[bytes, bytes]] = []
        self.ring: Ring | None = None
        self.port = 0
        self.parser = wire.Parser()
        self.out = b""
        self.kicked = trio.Event()
        self.answer = True

    def introduce(self) -> None:
        self.ring = Ring(self.hv.map_ring(DOMID, 0))
        self.port = self.hv.bind_interdomain(DOMID, 1)

    def on_port(self, port: int) -> None:
        self.kicked.set()

    def handle(self, m: wire.Message) -> bytes:
        args = wire.split_args(m.payload)
        if m.type == Op.READ:
            if args[0] == b"fail":
                return wire.encode(Op.ERROR, m.req_id, 0, b"EQUOTA\0")  # not a real name
            if args[0] not in self.data:
                return wire.encode(Op.ERROR, m.req_id, 0, b"ENOENT\0")
            return wire.encode(m.type, m.req_id, m.tx_id, self.data[args[0]])
        if m.type == Op.WRITE:
            path, _, value = m.payload.partition(b"\0")
            self.data[path] = value
            events = b"".join(
                wire.encode(Op.WATCH_EVENT, 0, 0, path + b"\0" + tok + b"\0")
                for p, tok in self.watches
                if path.startswith(p)
            )
            return events + wire.encode(m.type, m.req_id, m.tx_id, b"OK\0")
        if m.type == Op.DIRECTORY:
            names = sorted(
                {k[len(args[0]) + 1 :].split(b"/")[0] for k in self.data if k.startswith(args[0] + b"/")}
            )
            return wire.encode(m.type, m.req_id, m.tx_id, b"".join(n + b"\0" for n in names))
        if m.type == Op.WATCH:
            self.watches.append((args[0], args[1]))
            ok = wire.encode(m.type, m.req_id, 0, b"OK\0")
            return ok + wire.encode(Op.WATCH_EVENT, 0, 0, args[0] + b"\0" + args[1] + b"\0")
        if m.type == Op.TRANSACTION_START:
            return wire.encode(m.type, m.req_id, 0, b"42\0")
        return wire.encode(m.type, m.req_id, m.tx_id, b"OK\0")

    async def serve(self) -> None:
        while True:
            await self.kicked.wait()
            self.kicked = trio.Event()
            if self.ring is None or not self.answer:
                continue
            for m in self.parser.feed(self.ring.read()):
                self.out += self.handle(m)
            while self.out:
                n = self.ring.write(self.out)
                self.out = self.out[n:]
                self.hv.notify(self.port)
                if self.out:
                    await self.kicked.wait()  # the guest kicks when it made room
                    self.kicked = trio.Event()


@pytest.fixture
async def toy(tmp_path: Path) -> AsyncIterator[Toy]:
    hv = EmulatedHypervisor(tmp_path / "fx", domains=str(DOMID))
    t = Toy(hv)
    async with trio.open_nursery() as nursery:
        await nursery.start(hv.run, t.on_port, lambda: None)
        nursery.start_soon(t.serve)
        yield t
        nursery.cancel_scope.cancel()
    if t.ring is not None:
        t.ring.release()
    hv.close()


async def test_requests_and_big_values(toy: Toy) -> None:
    fx = str(toy.hv.dir)

    def guest_work() -> None:
        with Guest(DOMID, fx, timeout=5) as g:
            big = bytes(range(256)) * 15  # 3840 bytes: several trips round the 1 KiB ring
            g.write("data/big", big)
            assert g.read("data/big") == big
            g.write("data/x", "1")
            assert g.ls("data") == ["big", "x"]
            assert g.exists("data/x") and not g.exists("data/nope")
            with pytest.raises(XsError) as ei:
                g.read("fail")
            assert ei.value.name == "EIO"  # unknown error names do not crash the client
            with g.transaction() as tx:
                assert tx == 42

    toy.introduce()
    await trio.to_thread.run_sync(guest_work)
    assert toy.data[b"data/x"] == b"1"


async def test_watch_events_queue_while_waiting_for_replies(toy: Toy) -> None:
    fx = str(toy.hv.dir)

    def guest_work() -> list[tuple[str, str]]:
        with Guest(DOMID, fx, timeout=5) as g:
            g.watch("data", "tok")
            g.write("data/a", "1")  # its event arrives before the reply and is queued
            g.write("other", "2")
            return [g.wait_event(), g.wait_event()]

    toy.introduce()
    events = await trio.to_thread.run_sync(guest_work)
    assert events == [("data", "tok"), ("data/a", "tok")]


async def test_timeout_when_nobody_answers(toy: Toy) -> None:
    toy.introduce()
    toy.answer = False

    def guest_work() -> None:
        with Guest(DOMID, str(toy.hv.dir), timeout=0.3) as g, pytest.raises(TimeoutError):
            g.read("x")

    await trio.to_thread.run_sync(guest_work)


async def test_hypervisor_control_helpers(toy: Toy) -> None:
    fx = str(toy.hv.dir)

    def work() -> None:
        with Guest(9, fx, create=True) as g:
            assert g.domain_exists()
            assert g.shutdown(2) == "ok shutdown 9"
            assert g.destroy() == "ok destroy 9"
            assert not g.domain_exists()
        assert control("destroy 0", fx) == "err cannot destroy dom0"

    await trio.to_thread.run_sync(work)
    assert toy.hv.domain_info(9) is None


async def test_console_command(toy: Toy, capsys: pytest.CaptureFixture[str]) -> None:
    fx = str(toy.hv.dir)
    toy.introduce()

    def run(*argv: str) -> int:
        return main(["--fakexen-dir", fx, "--timeout", "5", *argv])

    assert await trio.to_thread.run_sync(run, str(DOMID), "write", "data/a", "1", "data/b", "2") == 0
    assert await trio.to_thread.run_sync(run, str(DOMID), "read", "data/a", "data/b") == 0
    assert capsys.readouterr().out == "1\n2\n"
    assert await trio.to_thread.run_sync(run, str(DOMID), "read", "data/zz") == 1
    assert capsys.readouterr().err.strip() == "ENOENT"
    assert await trio.to_thread.run_sync(run, str(DOMID), "tx", "write", "data/c", "3", "read", "data/a") == 0
    assert capsys.readouterr().out == "1\n"
    assert await trio.to_thread.run_sync(run, str(DOMID), "ls", "data") == 0
    assert capsys.readouterr().out == "a\nb\nc\n"
    assert await trio.to_thread.run_sync(run, str(DOMID), "exists", "data/nope") == 1
    assert await trio.to_thread.run_sync(run, "12", "exists-domain") == 1
    assert await trio.to_thread.run_sync(run, "12", "create") == 0
    assert await trio.to_thread.run_sync(run, "12", "exists-domain") == 0


async def test_console_command_as_a_process(toy: Toy) -> None:
    toy.introduce()
    toy.data[b"data/x"] = b"hello"
    cmd = [sys.executable, "-m", "xenstored.guest", "--fakexen-dir", str(toy.hv.dir), str(DOMID)]
    with trio.fail_after(30):
        r = await trio.run_process([*cmd, "read", "data/x"], capture_stdout=True)
        assert r.stdout == b"hello\n"
        r = await trio.run_process([*cmd, "read", "nope"], capture_stderr=True, check=False)
        assert r.returncode == 1 and r.stderr.strip() == b"ENOENT"
