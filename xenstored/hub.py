"""One task serving every ready client fd, and serving it without a trio pass while trio idles.

Almost every XenStore client is sequential (libxl, xenbus, the ``xenstore-*`` tools): one request,
then a wait for the reply.  With a task per connection, each request costs a trio scheduler pass
(wake the task, run the batch, re-arm the one-shot epoll registration): about 6 µs of daemon CPU
on this project's machines, as much as C xenstored's whole request on one CPU.

The hub keeps a persistent, level-triggered epoll registration per fd and calls the fd's
synchronous handler when it is readable.  It serves in two ways:

* **busy**: one task waits for the hub's epoll through ``trio.lowlevel.wait_readable``, then
  serves every ready fd once.  One pass per wakeup, however many fds are ready; trio's other
  tasks interleave as usual.  This is all the hub does when the adapter below is unavailable.
* **idle**: when every other task is blocked (trio's ``wait_all_tasks_blocked``), a second task
  blocks in ``epoll_wait`` itself, on the hub's fds *and* trio's own epoll fd, until trio's next
  deadline.  A request is then served by ``epoll_wait``, ``recv``, the handler and ``send``, with
  no scheduler in between.  The moment trio has anything to do (an fd of its own ready, a task
  made runnable by a handler, a deadline due), the task returns to trio.  The loop never blocks
  while trio has work: it is trio's own wait, done by us.

The idle mode reads three things trio keeps private (its epoll object, its run queue, its
deadline heap).  :class:`TrioInternals` finds them once and checks their shape; if this trio
differs, the hub logs it once and stays in busy mode, which is correct, only slower.
"""

from __future__ import annotations

import logging
import math
import select
from collections.abc import Callable

import trio

log = logging.getLogger("xenstored.hub")

Handler = Callable[[], None]
OnFail = Callable[[BaseException], None]

_EPOLLIN = select.EPOLLIN
MAX_EVENTS = 256


class TrioInternals:
    """What idle mode needs from the running trio loop, or None from :meth:`find`."""

    __slots__ = ("epoll", "next_deadline", "now", "registered", "runq", "wait_idle")

    def __init__(self) -> None:
        from trio._core import _run

        runner = _run.GLOBAL_RUN_CONTEXT.runner
        epoll = runner.io_manager._epoll
        if not isinstance(epoll, select.epoll) or getattr(runner, "is_guest", False):
            raise TypeError("trio does not run on its own epoll here")
        self.epoll: select.epoll = epoll
        # fd -> its waiters (read_task, write_task): who trio still thinks waits on an fd.
        self.registered: dict[int, object] = runner.io_manager._registered
        self.runq = runner.runq
        self.next_deadline: Callable[[], float] = runner.deadlines.next_deadline
        self.now: Callable[[], float] = runner.clock.current_time
        self.wait_idle = _run.wait_all_tasks_blocked
        float(self.next_deadline())
        float(self.now())
        len(self.runq)
        self.registered.get(-1)

    @classmethod
    def find(cls) -> TrioInternals | None:
        try:
            found = cls()
        except Exception as e:  # noqa: BLE001 - any mismatch means: do without
            log.warning(
                "trio %s: serving clients without the idle fast path (%s); requests cost a trio "
                "pass each, correct but slower: report this trio version",
                trio.__version__,
                e,
            )
            return None
        log.info("trio %s: idle clients are served from epoll_wait directly", trio.__version__)
        return found


class Hub:
    """Persistent epoll registrations and their handlers.  ``run`` serves them."""

    def __init__(self) -> None:
        # The busy epoll is what trio waits for; the idle epoll holds the same fds plus trio's own
        # epoll fd.  Two, because trio's epoll holds the busy one: one epoll holding the other
        # both ways is a loop the kernel refuses.
        self._busy = select.epoll()
        self._idle = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._on_fail: dict[int, OnFail] = {}
        self._busy_parked = False
        # Handler calls in each mode (tests and metrics: which path really served).
        self.served = 0
        self.served_idle = 0

    def add(self, fd: int, handler: Handler, on_fail: OnFail) -> None:
        """Call ``handler()`` whenever ``fd`` is readable, until :meth:`remove`.  The handler
        must not block and must leave ``fd`` non-blocking; it reads what it wants each call.
        Should it raise, ``fd`` is removed and ``on_fail(exc)`` told: a bug costs that one fd."""
        if self._busy.closed:
            raise OSError(f"fd {fd}: the hub has shut down")
        self._handlers[fd] = handler
        self._on_fail[fd] = on_fail
        self._busy.register(fd, _EPOLLIN)
        self._idle.register(fd, _EPOLLIN)

    def pause(self, fd: int) -> None:
        """Stop calling ``fd``'s handler (its connection wants no input) until :meth:`resume`."""
        if fd in self._handlers and not self._busy.closed:
            self._busy.modify(fd, 0)
            self._idle.modify(fd, 0)

    def resume(self, fd: int) -> None:
        if fd in self._handlers and not self._busy.closed:
            self._busy.modify(fd, _EPOLLIN)
            self._idle.modify(fd, _EPOLLIN)

    def remove(self, fd: int) -> None:
        """Forget ``fd`` (before it is closed); removing one that is not here does nothing."""
        self._on_fail.pop(fd, None)
        if self._handlers.pop(fd, None) is not None:
            for ep in (self._busy, self._idle):
                try:
                    ep.unregister(fd)
                except (OSError, ValueError):  # fd closed by its owner, or the hub shut down
                    pass

    def _serve(self, events: list[tuple[int, int]]) -> None:
        handlers = self._handlers
        for fd, _ in events:
            handler = handlers.get(fd)
            if handler is not None:  # an earlier handler of this batch may have removed it
                self.served += 1
                try:
                    handler()
                except Exception as e:  # noqa: BLE001 - contained: it costs this fd only
                    self._fail(fd, e)

    def _fail(self, fd: int, e: Exception) -> None:
        on_fail = self._on_fail.get(fd)
        self.remove(fd)
        if on_fail is None:  # pragma: no cover - add() always gives one
            log.error("fd %d: handler failed: %r", fd, e)
        else:
            on_fail(e)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        internals = TrioInternals.find()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_busy)
                if internals is not None:
                    nursery.start_soon(self._run_idle, internals)
                task_status.started()
        finally:
            self._busy.close()
            self._idle.close()

    async def _run_busy(self) -> None:
        fd = self._busy.fileno()
        poll = self._busy.poll
        wait_readable = trio.lowlevel.wait_readable
        while True:
            self._busy_parked = True
            try:
                await wait_readable(fd)
            finally:
                self._busy_parked = False
            self._serve(poll(0, MAX_EVENTS))

    async def _run_idle(self, trio_: TrioInternals) -> None:
        busy_fd = self._busy.fileno()
        trio_fd = trio_.epoll.fileno()
        self._idle.register(trio_fd, _EPOLLIN)
        poll = self._idle.poll
        runq, next_deadline, now = trio_.runq, trio_.next_deadline, trio_.now
        while True:
            await trio_.wait_idle()
            if not self._busy_parked:  # pragma: no cover - every task is blocked: it is parked
                continue
            # The busy task's registration in trio's epoll would make trio's fd readable with
            # every request: disarm it while we wait ourselves (trio's books still say armed,
            # and are right again before trio runs).
            trio_.epoll.modify(busy_fd, select.EPOLLONESHOT)
            try:
                while True:
                    deadline = next_deadline()
                    timeout = -1.0 if deadline == math.inf else max(0.0, deadline - now())
                    events = poll(timeout, MAX_EVENTS)
                    if not events:
                        break  # a deadline is due: trio expires it
                    back = False
                    handlers = self._handlers
                    for fd, _ in events:
                        if fd == trio_fd:
                            back = True
                            continue
                        handler = handlers.get(fd)
                        if handler is not None:
                            self.served_idle += 1
                            try:
                                handler()
                            except Exception as e:  # noqa: BLE001 - contained: this fd only
                                self._fail(fd, e)
                    if back or runq:
                        break
            finally:
                # Re-armed as trio's books say, unless a handler cancelled the busy task's wait
                # meanwhile (trio then disarmed it itself and expects no event).
                waiters = trio_.registered.get(busy_fd)
                if getattr(waiters, "read_task", None) is not None:
                    trio_.epoll.modify(busy_fd, _EPOLLIN | select.EPOLLONESHOT)
