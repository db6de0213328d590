"""The hub: sequential requests are served without a trio pass, and trio never waits for it.

Each case runs a real trio loop with a Hub and a peer in a thread (a peer that is a trio task
would keep trio busy, and the idle path would never be taken).  A hub that blocked trio while
waiting itself would fail the timer and foreign-fd cases; one that never took the idle path
would fail the first.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio

from xenstored.hub import Hub, TrioInternals

T = TypeVar("T")


def echo_handler(sock: socket.socket, hub: Hub, closed: list[int]) -> Callable[[], None]:
    def on_readable() -> None:
        data = sock.recv(4096)
        if not data:
            hub.remove(sock.fileno())
            closed.append(sock.fileno())
            return
        sock.send(data.upper())

    return on_readable


def sequential_peer(sock: socket.socket, n: int, out: list[bytes]) -> None:
    for i in range(n):
        sock.sendall(b"req%d" % i)
        out.append(sock.recv(4096))


def run(main: Callable[[], Awaitable[T]]) -> T:
    """trio.run with a deadline: a hub that starved trio would hang the test, not fail it."""

    async def guarded() -> T:
        with trio.fail_after(10):
            return await main()

    return trio.run(guarded)


def echo_through_hub(peer: Callable[[socket.socket], object]) -> Hub:
    """A hub serving an echo handler to ``peer(sock)``, run in a thread until it returns."""
    a, b = socket.socketpair()
    a.setblocking(False)
    closed: list[int] = []

    async def main() -> Hub:
        hub = Hub()
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            hub.add(a.fileno(), echo_handler(a, hub, closed), fail)
            await trio.to_thread.run_sync(peer, b)
            nursery.cancel_scope.cancel()
        return hub

    try:
        return run(main)
    finally:
        a.close()
        b.close()


def fail(e: BaseException) -> None:
    raise AssertionError(f"handler failed: {e!r}")


def test_trio_internals_are_found_on_this_trio() -> None:
    async def main() -> TrioInternals | None:
        return TrioInternals.find()

    assert run(main) is not None


PEER = """
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
for i in range(int(sys.argv[2])):
    s.sendall(b"req%d" % i)
    assert s.recv(4096) == b"REQ%d" % i
"""


def test_sequential_requests_are_served_in_idle_mode() -> None:
    """A client in another process (as every real one is: a thread would share our GIL and
    race trio's passes) sending one request at a time is served from epoll_wait directly."""

    def process_peer(sock: socket.socket) -> object:
        argv = [sys.executable, "-c", PEER, str(sock.fileno()), "500"]
        return subprocess.run(argv, pass_fds=[sock.fileno()], check=True)

    hub = echo_through_hub(process_peer)
    assert hub.served_idle >= 490, (hub.served, hub.served_idle)


def test_a_timer_fires_on_time_while_the_hub_waits() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    closed: list[int] = []
    late: list[float] = []

    async def sleeper() -> None:
        for _ in range(5):
            t = trio.current_time()
            await trio.sleep(0.05)
            late.append(trio.current_time() - t - 0.05)

    async def main() -> None:
        hub = Hub()
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            hub.add(a.fileno(), echo_handler(a, hub, closed), fail)
            await trio.lowlevel.checkpoint()
            await sleeper()  # no client traffic at all: only the deadline can wake the hub
            nursery.cancel_scope.cancel()

    run(main)
    assert len(late) == 5
    assert max(late) < 0.04, late
    a.close()
    b.close()


def test_trio_io_wakes_promptly_while_the_hub_waits() -> None:
    """A socket trio itself waits on (an event channel, a listener) is served while the hub is
    blocked in its own epoll_wait: trio's epoll fd is in the hub's set."""
    a, b = socket.socketpair()
    a.setblocking(False)
    x, y = socket.socketpair()
    x.setblocking(False)
    y.settimeout(5)
    closed: list[int] = []
    delays: list[float] = []

    def poke() -> None:
        for _ in range(5):
            time.sleep(0.05)
            sent = time.monotonic()
            y.send(b"!")
            # wait for the trio task's answer
            y.recv(1)
            delays.append(time.monotonic() - sent)

    async def trio_reader() -> None:
        for _ in range(5):
            await trio.lowlevel.wait_readable(x)
            x.recv(1)
            x.send(b"k")

    async def main() -> Hub:
        hub = Hub()
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            hub.add(a.fileno(), echo_handler(a, hub, closed), fail)
            thread = threading.Thread(target=poke, daemon=True)
            thread.start()
            with trio.fail_after(3):  # a hub that starved trio's I/O would wait here for ever
                await trio_reader()
            await trio.to_thread.run_sync(thread.join)
            nursery.cancel_scope.cancel()
        return hub

    run(main)
    assert len(delays) == 5
    assert max(delays) < 0.5, delays
    for s in (a, b, x, y):
        s.close()


def test_a_task_woken_by_a_handler_runs_at_once() -> None:
    """A handler that wakes a task (a watch event for another client) hands the loop back."""
    a, b = socket.socketpair()
    a.setblocking(False)
    woken = trio.Event()
    delays: list[float] = []

    def on_readable() -> None:
        a.recv(4096)
        woken.set()

    def send_later() -> None:
        time.sleep(0.05)
        delays.append(time.monotonic())
        b.send(b"go")

    async def main() -> None:
        hub = Hub()
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            hub.add(a.fileno(), on_readable, fail)
            threading.Thread(target=send_later, daemon=True).start()  # nothing of trio's waits for it
            with trio.fail_after(3):
                await woken.wait()
            delays[0] = time.monotonic() - delays[0]
            nursery.cancel_scope.cancel()

    run(main)
    assert delays[0] < 0.5, delays
    a.close()
    b.close()


def test_a_failing_handler_costs_its_fd_only() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    a.setblocking(False)
    c.setblocking(False)
    failures: list[BaseException] = []
    replies: list[bytes] = []
    closed: list[int] = []

    def broken() -> None:
        a.recv(4096)
        raise RuntimeError("a bug")

    async def main() -> None:
        hub = Hub()
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            hub.add(a.fileno(), broken, failures.append)
            hub.add(c.fileno(), echo_handler(c, hub, closed), fail)
            await trio.to_thread.run_sync(b.send, b"boom")
            await trio.to_thread.run_sync(sequential_peer, d, 20, replies)
            nursery.cancel_scope.cancel()

    run(main)
    assert [type(e) for e in failures] == [RuntimeError]
    assert len(replies) == 20
    for s in (a, b, c, d):
        s.close()


def test_a_paused_fd_is_not_served_until_resumed() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    got: list[bytes] = []

    async def main() -> None:
        hub = Hub()

        def on_readable() -> None:
            got.append(a.recv(4096))

        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            hub.add(a.fileno(), on_readable, fail)
            hub.pause(a.fileno())
            await trio.to_thread.run_sync(b.send, b"one")
            await trio.sleep(0.05)
            assert got == []
            hub.resume(a.fileno())
            with trio.fail_after(1):
                while not got:
                    await trio.sleep(0.001)
            assert got == [b"one"]
            nursery.cancel_scope.cancel()

    run(main)
    a.close()
    b.close()


def test_a_handler_may_shut_the_hub_down() -> None:
    """A request that stops the daemon (a control command) cancels the hub from inside a
    handler: the hub hands back to trio, which unwinds cleanly."""
    a, b = socket.socketpair()
    a.setblocking(False)

    async def main() -> Hub:
        hub = Hub()
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)

            def on_readable() -> None:
                a.recv(4096)
                nursery.cancel_scope.cancel()

            hub.add(a.fileno(), on_readable, fail)
            def send_later() -> None:
                time.sleep(0.05)  # trio is idle by then: the hub waits in epoll_wait itself
                b.send(b"stop")

            threading.Thread(target=send_later, daemon=True).start()
            await trio.sleep_forever()
        return hub

    hub = run(main)
    assert hub.served_idle == 1
    a.close()
    b.close()


def test_without_trio_internals_the_hub_serves_through_trio(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trio whose private parts differ: the hub logs it and serves in busy mode only."""

    def differs(self: TrioInternals) -> None:
        raise AttributeError("no _epoll here")

    monkeypatch.setattr(TrioInternals, "__init__", differs)
    replies: list[bytes] = []
    hub = echo_through_hub(lambda sock: sequential_peer(sock, 100, replies))
    assert replies == [b"REQ%d" % i for i in range(100)]
    assert (hub.served, hub.served_idle) == (100, 0)


def test_a_handler_that_never_drains_its_fd_does_not_starve_trio() -> None:
    """An fd that stays readable (a handler failing the same way each time, say) keeps the hub
    busy, but trio still runs its timers and tasks between rounds."""
    a, b = socket.socketpair()
    a.setblocking(False)
    calls: list[int] = []
    late: list[float] = []

    def send_later() -> None:
        time.sleep(0.05)  # while the hub waits in epoll_wait itself
        b.send(b"never read")

    async def main() -> None:
        hub = Hub()
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            hub.add(a.fileno(), lambda: calls.append(1), fail)
            threading.Thread(target=send_later, daemon=True).start()
            for _ in range(8):
                t = trio.current_time()
                await trio.sleep(0.02)
                late.append(trio.current_time() - t - 0.02)
            nursery.cancel_scope.cancel()

    # In a thread: a hub that spun for ever would keep trio (and its fail_after) from running.
    runner = threading.Thread(target=run, args=(main,), daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "the hub kept the loop for ever"
    assert len(late) == 8 and max(late) < 0.5, late
    assert len(calls) > 3
    a.close()
    b.close()


def test_a_failure_of_the_hub_itself_is_logged_and_it_serves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a handler's bug but the loop's own (an epoll call failing, say): one retry, no end."""
    real = Hub._serve_idle
    broken = [True]

    def flaky(self: Hub, trio_: TrioInternals) -> None:
        if broken:
            broken.clear()
            raise OSError("epoll_wait: a surprise")
        real(self, trio_)

    monkeypatch.setattr(Hub, "_serve_idle", flaky)
    replies: list[bytes] = []
    hub = echo_through_hub(lambda sock: sequential_peer(sock, 50, replies))
    assert hub.failures == 1
    assert replies == [b"REQ%d" % i for i in range(50)]


def test_a_far_deadline_is_waited_for_a_day_at_a_time() -> None:
    """A finite deadline beyond what epoll_wait takes (a task sleeping 1e300 s) is waited for in
    pieces: handed to epoll whole it raises OverflowError, and the idle loop would fail on
    every pass instead of serving."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    closed: list[int] = []
    out: list[bytes] = []

    async def main() -> Hub:
        hub = Hub()
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            nursery.start_soon(trio.sleep, 1e300)
            hub.add(a.fileno(), echo_handler(a, hub, closed), fail)
            await trio.to_thread.run_sync(sequential_peer, b, 50, out)
            nursery.cancel_scope.cancel()
        return hub

    try:
        hub = trio.run(main)
    finally:
        a.close()
        b.close()
    assert out == [b"REQ%d" % i for i in range(50)]
    assert hub.failures == 0
    assert hub.served_idle > 0
