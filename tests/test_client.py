"""The client library against the real daemon: every method, pipelining, transactions, watches."""

from __future__ import annotations

import pytest
import trio

from xenstored.client import Client, ConnectionClosed, SyncClient, Transaction
from xenstored.wire import Op, XsError


async def test_write_read_binary_and_str(client: Client) -> None:
    await client.write("/t/a", "hello")
    await client.write(b"/t/b", b"\x00\x01\xffbin")
    await client.write("/t/empty", "")
    assert await client.read("/t/a") == b"hello"
    assert await client.read("/t/b") == b"\x00\x01\xffbin"
    assert await client.read("/t/empty") == b""
    assert await client.read("/t") == b""  # implicitly created parent


async def test_errors_raise_xserror_with_protocol_name(client: Client) -> None:
    with pytest.raises(XsError) as e:
        await client.read("/no/such/node")
    assert e.value.name == "ENOENT"
    with pytest.raises(XsError) as e:
        await client.read("/bad//path")
    assert e.value.name == "EINVAL"


async def test_mkdir_ls_rm_exists(client: Client) -> None:
    await client.mkdir("/d")
    await client.mkdir("/d")  # existing: no error
    for name in ("c", "a", "b"):
        await client.write(f"/d/{name}", name)
    assert await client.ls("/d") == ["a", "b", "c"]
    assert await client.directory("/d/a") == []
    assert await client.exists("/d/a")
    await client.rm("/d/a")
    assert not await client.exists("/d/a")
    await client.rm("/d")
    assert not await client.exists("/d/b")
    assert "d" not in await client.ls("/")


async def test_perms_roundtrip(client: Client) -> None:
    await client.write("/p", "x")
    assert await client.get_perms("/p") == ["n0"]
    await client.set_perms("/p", ["b0", "r5", "w7"])
    assert await client.get_perms("/p") == ["b0", "r5", "w7"]
    with pytest.raises(ValueError):
        await client.set_perms("/p", [])


async def test_domain_path_control_and_raw_request(client: Client) -> None:
    assert await client.get_domain_path(7) == "/local/domain/7"
    assert await client.control("check") == "OK"
    assert "check" in await client.control("help")
    assert await client.request(Op.READ, b"/tool/xenstored\0") == b""
    msg_type, payload = await client.request_raw(Op.READ, b"/nope\0")
    assert (msg_type, payload) == (Op.ERROR, b"ENOENT\0")


async def test_oversized_request_refused_locally(client: Client) -> None:
    with pytest.raises(XsError) as e:
        await client.write("/big", b"x" * 5000)
    assert e.value.name == "E2BIG"
    assert await client.read("/tool/xenstored") == b""  # connection still fine


async def test_argument_with_nul_refused(client: Client) -> None:
    with pytest.raises(ValueError):
        await client.read("/a\0b")


async def test_pipelined_reads_on_one_connection(client: Client) -> None:
    for i in range(20):
        await client.write(f"/pipe/{i}", str(i))
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = await client.read(f"/pipe/{i % 20}")

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert results == {i: str(i % 20).encode() for i in range(200)}


async def test_pipelined_mixed_errors_and_writes(client: Client) -> None:
    errors: list[str] = []

    async def writer(i: int) -> None:
        await client.write(f"/mix/{i}", str(i))

    async def bad(i: int) -> None:
        try:
            await client.read(f"/missing/{i}")
        except XsError as e:
            errors.append(e.name)

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(writer, i)
            nursery.start_soon(bad, i)
    assert errors == ["ENOENT"] * 50
    assert sorted(await client.ls("/mix"), key=int) == [str(i) for i in range(50)]


async def test_cancelled_request_does_not_break_connection(client: Client) -> None:
    with trio.move_on_after(0):
        await client.read("/tool")  # cancelled at its first checkpoint
    assert await client.read("/tool/xenstored") == b""


async def test_transaction_commit_and_isolation(daemon, client: Client) -> None:
    async with Client(daemon.socket) as other:
        async with client.transaction() as t:
            assert isinstance(t, Transaction) and t.tx_id != 0
            await t.write("/tx/a", "1")
            assert await t.read("/tx/a") == b"1"
            assert await t.ls("/tx") == ["a"]
            assert not await other.exists("/tx/a")  # not visible before commit
        assert await other.read("/tx/a") == b"1"


async def test_transaction_aborts_when_body_raises(client: Client) -> None:
    with pytest.raises(RuntimeError):
        async with client.transaction() as t:
            await t.write("/abort/a", "1")
            raise RuntimeError("boom")
    assert not await client.exists("/abort/a")


async def test_transaction_all_methods(client: Client) -> None:
    await client.write("/txm/old", "o")
    async with client.transaction() as t:
        await t.mkdir("/txm/dir")
        await t.set_perms("/txm/dir", ["n0", "r3"])
        assert await t.get_perms("/txm/dir") == ["n0", "r3"]
        await t.rm("/txm/old")
        assert not await t.exists("/txm/old")
        assert await t.directory("/txm") == ["dir"]
    assert await client.ls("/txm") == ["dir"]
    assert await client.get_perms("/txm/dir") == ["n0", "r3"]


async def test_transaction_conflict_gives_eagain(daemon, client: Client) -> None:
    await client.write("/counter", "0")
    async with Client(daemon.socket) as other:
        with pytest.raises(XsError) as e:
            async with client.transaction() as t1:
                v1 = int(await t1.read("/counter"))
                async with other.transaction() as t2:
                    v2 = int(await t2.read("/counter"))
                    await t2.write("/counter", str(v2 + 1))
                await t1.write("/counter", str(v1 + 1))
        assert e.value.name == "EAGAIN"
    assert await client.read("/counter") == b"1"


async def test_transaction_end_unknown_and_explicit(client: Client) -> None:
    tx = await client.transaction_start()
    await client.transaction_end(tx, commit=False)
    with pytest.raises(XsError) as e:
        await client.transaction_end(tx)
    assert e.value.name == "ENOENT"


async def test_transact_retries_on_eagain(daemon, client: Client) -> None:
    await client.write("/ctr", "0")
    attempts = 0
    async with Client(daemon.socket) as other:

        async def incr(t: Transaction) -> int:
            nonlocal attempts
            attempts += 1
            v = int(await t.read("/ctr"))
            if attempts == 1:
                await other.write("/ctr", "100")  # a conflicting write from elsewhere
            await t.write("/ctr", str(v + 1))
            return v + 1

        assert await client.transact(incr) == 101
    assert attempts == 2
    assert await client.read("/ctr") == b"101"


async def test_transact_gives_up_after_bounded_attempts(daemon, client: Client) -> None:
    await client.write("/hot", "0")
    attempts = 0
    async with Client(daemon.socket) as other:

        async def always_conflicts(t: Transaction) -> None:
            nonlocal attempts
            attempts += 1
            await t.read("/hot")
            await other.write("/hot", str(attempts))
            await t.write("/hot", "mine")

        with pytest.raises(XsError) as e:
            await client.transact(always_conflicts, attempts=3, backoff=0)
    assert e.value.name == "EAGAIN"
    assert attempts == 3


async def test_transact_concurrent_increments_lose_nothing(daemon, client: Client) -> None:
    await client.write("/sum", "0")

    async def incr(t: Transaction) -> None:
        await t.write("/sum", str(int(await t.read("/sum")) + 1))

    async def worker(c: Client) -> None:
        for _ in range(15):
            await c.transact(incr, attempts=100)

    async with Client(daemon.socket) as c2, trio.open_nursery() as nursery:
        nursery.start_soon(worker, client)
        nursery.start_soon(worker, c2)
    assert await client.read("/sum") == b"30"


async def test_watch_initial_event_then_changes(client: Client) -> None:
    async with client.watch("/w", "tok") as events:
        assert await events.get() == ("/w", "tok")  # initial event, node need not exist
        await client.write("/w/x", "1")
        assert await events.get() == ("/w/x", "tok")
        await client.write("/w", "2")
        assert await events.get() == ("/w", "tok")
        await client.rm("/w")
        assert await events.get() == ("/w", "tok")
        await client.write("/elsewhere", "1")
        assert events.get_nowait() is None


async def test_watch_async_iteration(client: Client) -> None:
    seen: list[tuple[str, str]] = []
    async with client.watch("/it") as events:
        await client.write("/it/a", "1")
        await client.write("/it/b", "1")
        async for event in events:
            seen.append(event)
            if len(seen) == 3:
                break
    token = seen[0][1]
    assert seen == [("/it", token), ("/it/a", token), ("/it/b", token)]


async def test_watch_relative_path(client: Client) -> None:
    home = await client.get_domain_path(0)
    async with client.watch("rel", "r") as events:
        assert await events.get() == ("rel", "r")
        await client.write(f"{home}/rel/x", "1")
        assert await events.get() == ("rel/x", "r")


async def test_unwatch_on_exit(client: Client) -> None:
    async with client.watch("/uw", "t1") as events:
        await events.get()
    # The daemon forgot it: unwatching again is ENOENT and re-registering is allowed.
    with pytest.raises(XsError) as e:
        await client.request(Op.UNWATCH, b"/uw\0t1\0")
    assert e.value.name == "ENOENT"
    async with client.watch("/uw", "t1") as events:
        assert await events.get() == ("/uw", "t1")


async def test_duplicate_watch_is_eexist(client: Client) -> None:
    async with client.watch("/dup", "t") as events:
        with pytest.raises(XsError) as e:
            async with client.watch("/dup", "t"):
                pass
        assert e.value.name == "EEXIST"
        await client.write("/dup", "1")
        assert await events.get() == ("/dup", "t")
        assert await events.get() == ("/dup", "t")


async def test_two_watches_distinct_tokens(client: Client) -> None:
    async with client.watch("/m/a", "ta") as ea, client.watch("/m", "tm") as em:
        assert await ea.get() == ("/m/a", "ta")
        assert await em.get() == ("/m", "tm")
        await client.write("/m/a", "1")
        assert await ea.get() == ("/m/a", "ta")
        assert await em.get() == ("/m/a", "tm")
        await client.write("/m/b", "1")
        assert await em.get() == ("/m/b", "tm")
        assert ea.get_nowait() is None


async def test_watch_queue_overflow_drops_then_signals_rescan(client: Client) -> None:
    async with client.watch("/of", "o", maxsize=3) as events:
        for i in range(10):
            await client.write(f"/of/{i}", "x")
        # Events precede each write's reply, so all 11 have reached the client by now.
        assert len(events) == 3
        assert events.dropped == 8
        got = [await events.get() for _ in range(4)]
        assert got == [("/of", "o"), ("/of/0", "o"), ("/of/1", "o"), ("/of", "o")]
        assert events.get_nowait() is None


async def test_closed_connection_fails_pending_and_new_requests(daemon) -> None:
    c = await Client.connect(daemon.socket)
    async with c.watch("/gone") as events:
        await events.get()
        await c.aclose()
        with pytest.raises(ConnectionClosed):
            await events.get()
    with pytest.raises(ConnectionClosed):
        await c.read("/tool")


async def test_daemon_exit_surfaces_as_connection_closed(daemon, client: Client) -> None:
    await client.read("/tool")
    daemon.stop()
    with pytest.raises(ConnectionClosed):
        await client.read("/tool")


def test_sync_client_basic(daemon) -> None:
    with SyncClient(daemon.socket) as c:
        c.write("/s/a", "1")
        c.write(b"/s/b", b"\xff")
        assert c.read("/s/a") == b"1"
        assert c.read("/s/b") == b"\xff"
        c.mkdir("/s/d")
        assert c.ls("/s") == ["a", "b", "d"]
        assert c.directory("/s/d") == []
        assert c.exists("/s/d") and not c.exists("/s/zz")
        c.set_perms("/s/a", ["n0", "r2"])
        assert c.get_perms("/s/a") == ["n0", "r2"]
        assert c.get_domain_path(3) == "/local/domain/3"
        assert c.control("check") == "OK"
        c.rm("/s/d")
        with pytest.raises(XsError) as e:
            c.read("/s/d")
        assert e.value.name == "ENOENT"
        assert c.request(Op.READ, b"/s/a\0") == b"1"


def test_sync_client_transactions(daemon) -> None:
    with SyncClient(daemon.socket) as c, SyncClient(daemon.socket) as other:
        with c.transaction() as t:
            t.write("/st/a", "1")
            t.mkdir("/st/b")
            t.set_perms("/st/b", ["n0"])
            assert t.ls("/st") == ["a", "b"]
            assert t.get_perms("/st/b") == ["n0"]
            assert t.exists("/st/a")
            assert not other.exists("/st/a")
        assert other.read("/st/a") == b"1"
        with pytest.raises(KeyError), c.transaction() as t:
            t.rm("/st/a")
            raise KeyError
        assert c.read("/st/a") == b"1"
        with pytest.raises(XsError) as e, c.transaction() as t:
            t.read("/st/a")
            other.write("/st/a", "2")
            t.write("/st/a", "3")
        assert e.value.name == "EAGAIN"
        assert c.read("/st/a") == b"2"


def test_sync_client_watches(daemon) -> None:
    with SyncClient(daemon.socket) as c:
        c.watch("/sw", "k")
        assert c.read_watch(timeout=5) == ("/sw", "k")
        c.write("/sw/x", "1")  # its event arrives before the reply and is queued
        assert c.read_watch(timeout=5) == ("/sw/x", "k")
        with pytest.raises(TimeoutError):
            c.read_watch(timeout=0.05)
        c.unwatch("/sw", "k")
        c.write("/sw/y", "1")
        with pytest.raises(TimeoutError):
            c.read_watch(timeout=0.05)
        assert c.read("/sw/y") == b"1"  # still usable after a timeout


def test_sync_client_uses_xenstored_path(daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENSTORED_PATH", daemon.socket)
    with SyncClient() as c:
        assert c.read("/tool/xenstored") == b""


async def test_shared_token_routes_by_path(client: Client) -> None:
    async with client.watch("/sa", "same") as ea, client.watch("/sb", "same") as eb:
        assert await ea.get() == ("/sa", "same")
        assert await eb.get() == ("/sb", "same")
        await client.write("/sa/x", "1")
        await client.write("/sb/y", "1")
        assert await ea.get() == ("/sa/x", "same")
        assert await eb.get() == ("/sb/y", "same")
        assert ea.get_nowait() is None and eb.get_nowait() is None


async def test_consumer_task_and_writer_task_share_a_connection(client: Client) -> None:
    seen: list[str] = []

    async def consume(events) -> None:
        async for path, _token in events:
            seen.append(path)
            if path == "/cw/last":
                return

    async with client.watch("/cw") as events, trio.open_nursery() as nursery:
        nursery.start_soon(consume, events)
        for i in range(20):
            await client.write(f"/cw/{i}", "x")
        await client.write("/cw/last", "x")
    assert seen == ["/cw"] + [f"/cw/{i}" for i in range(20)] + ["/cw/last"]


async def test_cancelled_transaction_body_aborts(daemon, client: Client) -> None:
    tx_id = 0
    with trio.move_on_after(0.05):
        async with client.transaction() as t:
            tx_id = t.tx_id
            await t.write("/cx", "1")
            await trio.sleep(10)
    assert tx_id != 0
    assert not await client.exists("/cx")
    with pytest.raises(XsError) as e:  # aborted on the daemon side, not just forgotten locally
        await client.request(Op.READ, b"/tool\0", tx_id=tx_id)
    assert e.value.name == "ENOENT"
