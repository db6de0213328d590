"""The client library's rough edges: domain operations by name, argument types, connection
errors that name the socket, calls that would silently miss a transaction, retry on EAGAIN."""

from __future__ import annotations

import os

import pytest
import trio

from xenstored import guest as guestlib
from xenstored.client import Client, SyncClient, SyncTransaction
from xenstored.wire import Op, XsError


def create_domain(daemon, domid: int) -> None:
    assert guestlib.control(f"create {domid}", os.path.join(daemon.rundir, "fx")) == f"ok create {domid}"


# ------------------------------------------------------------------ domain operations
def test_sync_domain_operations(daemon) -> None:
    create_domain(daemon, 5)
    create_domain(daemon, 6)
    with SyncClient(daemon.socket) as c:
        assert c.get_domain_path(5) == "/local/domain/5"
        assert not c.is_domain_introduced(5)
        c.watch("@introduceDomain", "in")
        c.watch("@releaseDomain", "out")
        assert {c.read_watch(5), c.read_watch(5)} == {("@introduceDomain", "in"), ("@releaseDomain", "out")}
        c.introduce(5, 0, 1)
        assert c.is_domain_introduced(5)
        assert c.read_watch(5) == ("@introduceDomain", "in")
        c.introduce(6, 0, 1)
        c.set_target(6, 5)
        c.resume(5)
        c.release(5)
        assert not c.is_domain_introduced(5)
        assert c.read_watch(5) == ("@introduceDomain", "in")  # dom6's
        assert c.read_watch(5) == ("@releaseDomain", "out")
        with pytest.raises(XsError) as e:
            c.introduce(9, 0, 1)  # the hypervisor does not know dom9
        assert e.value.name == "EINVAL"
        with pytest.raises(XsError) as e:
            c.set_target(6, 77)
        assert e.value.name in ("ENOENT", "EINVAL")


async def test_async_domain_operations(daemon) -> None:
    create_domain(daemon, 7)
    async with Client(daemon.socket) as c:
        assert not await c.is_domain_introduced(7)
        await c.introduce(7, 0, 1)
        assert await c.is_domain_introduced(7)
        assert await c.get_domain_path(7) == "/local/domain/7"
        await c.set_target(7, 0)
        await c.resume(7)
        await c.release(7)
        assert not await c.is_domain_introduced(7)


def test_domain_arguments_are_checked_locally(daemon) -> None:
    with SyncClient(daemon.socket) as c:
        with pytest.raises(TypeError):
            c.introduce("5", 0, 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            c.release(-1)
        with pytest.raises(TypeError):
            c.is_domain_introduced(True)
        assert c.read("/tool/xenstored") == b""  # nothing reached the wire


# ------------------------------------------------------------------ argument types
@pytest.mark.parametrize("bad", [5, None, 1.5, ["a"]])
def test_values_must_be_str_or_bytes(daemon, bad) -> None:
    with SyncClient(daemon.socket) as c:
        with pytest.raises(TypeError) as e:
            c.write("/x", bad)
        assert "str or bytes" in str(e.value)
        with pytest.raises(TypeError):
            c.read(bad)
        assert not c.exists("/x")
        c.write("/x", bytearray(b"ok"))
        assert c.read("/x") == b"ok"


async def test_async_values_must_be_str_or_bytes(client: Client) -> None:
    with pytest.raises(TypeError):
        await client.write("/x", 5)  # type: ignore[arg-type]
    assert not await client.exists("/x")


# ------------------------------------------------------------------ connection errors
def test_missing_socket_is_file_not_found_naming_the_path(tmp_path) -> None:
    path = str(tmp_path / "no-such-socket")
    with pytest.raises(FileNotFoundError) as e:
        SyncClient(path)
    assert e.value.filename == path and path in str(e.value)
    assert "no XenStore socket" in str(e.value)


def test_default_socket_from_environment_is_named_too(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "elsewhere")
    monkeypatch.setenv("XENSTORED_PATH", path)
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        SyncClient()


async def test_async_missing_socket_is_file_not_found_naming_the_path(tmp_path) -> None:
    path = str(tmp_path / "gone")
    with pytest.raises(FileNotFoundError) as e:
        async with Client(path):
            pass
    assert e.value.filename == path and path in str(e.value)


def test_stale_socket_is_connection_refused_naming_the_path(tmp_path) -> None:
    import socket

    path = str(tmp_path / "stale")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # bound, never listening: what a killed daemon leaves
    with pytest.raises(ConnectionRefusedError) as e:
        SyncClient(path)
    assert path in str(e.value) and "not running" in str(e.value)


# ------------------------------------------------------------------ calls that would miss the transaction
def test_sync_client_call_inside_its_transaction_is_loud(daemon) -> None:
    with SyncClient(daemon.socket) as c:
        c.write("/tx/a", "0")
        with pytest.raises(RuntimeError) as e, c.transaction() as t:
            t.write("/tx/a", "1")
            c.write("/tx/b", "oops")  # meant t.write: would have committed on its own
        assert f"transaction {t.tx_id}" in str(e.value) and "WRITE" in str(e.value)
        assert "call it on t" in str(e.value)
        assert c.read("/tx/a") == b"0" and not c.exists("/tx/b")  # aborted, nothing leaked
        for call in (lambda: c.read("/tx/a"), lambda: c.ls("/tx"), lambda: c.exists("/tx"),
                     lambda: c.get_perms("/tx"), lambda: c.rm("/tx/a"), lambda: c.mkdir("/tx/m"),
                     lambda: c.set_perms("/tx", ["n0"])):
            with pytest.raises(RuntimeError), c.transaction():
                call()
        # Not data operations: fine inside, as is a second client.
        with c.transaction() as t, SyncClient(daemon.socket) as other:
            assert c.get_domain_path(0) == "/local/domain/0"
            assert c.control("check") == "OK"
            other.write("/tx/other", "x")
            t.write("/tx/a", "2")
        assert c.read("/tx/a") == b"2"  # usable again after the block


async def test_async_client_call_from_the_transactions_task_is_loud(daemon, client: Client) -> None:
    await client.write("/atx/a", "0")
    with pytest.raises(RuntimeError) as e:
        async with client.transaction() as t:
            await t.write("/atx/a", "1")
            await client.read("/atx/a")
    assert f"transaction {t.tx_id}" in str(e.value) and "READ" in str(e.value)
    assert await client.read("/atx/a") == b"0"


async def test_async_other_tasks_may_use_the_client_during_a_transaction(client: Client) -> None:
    seen: list[bytes] = []
    async with client.transaction() as t:
        await t.write("/para", "in-tx")
        async with trio.open_nursery() as nursery:

            async def outside() -> None:
                await client.write("/parb", "outside")  # another task: rightly not in t
                seen.append(await client.read("/parb"))

            nursery.start_soon(outside)
        assert await client.request_raw(Op.READ, b"/parb\0") == (Op.READ, b"outside")  # unchecked
    assert seen == [b"outside"] and await client.read("/para") == b"in-tx"


# ------------------------------------------------------------------ retry on EAGAIN, sync
def test_sync_transact_retries_on_eagain(daemon) -> None:
    attempts = 0
    with SyncClient(daemon.socket) as c, SyncClient(daemon.socket) as other:
        c.write("/ctr", "0")

        def incr(t: SyncTransaction) -> int:
            nonlocal attempts
            attempts += 1
            v = int(t.read("/ctr"))
            if attempts == 1:
                other.write("/ctr", "100")  # a conflicting write from elsewhere
            t.write("/ctr", str(v + 1))
            return v + 1

        assert c.transact(incr) == 101
        assert attempts == 2 and c.read("/ctr") == b"101"

        def always(t: SyncTransaction) -> None:
            t.read("/ctr")
            other.write("/ctr", "x")
            t.write("/ctr", "mine")

        with pytest.raises(XsError) as e:
            c.transact(always, attempts=3, backoff=0)
        assert e.value.name == "EAGAIN"
        with pytest.raises(ValueError):
            c.transact(always, attempts=0)
