"""One task serving every ready client fd, and serving it without a trio pass while trio idles.

Almost every XenStore client is sequential (libxl, xenbus, the ``xenstore-*`` tools): one request,
then a wait for the reply.  With a task per connection, each request costs a trio scheduler pass
(wake the task, run the batch, re-arm the one-shot epoll registration): about 6 µs of daemon CPU
on this project's machines, as much as C xenstored's whole request on one CPU.

The hub keeps a persistent, level-triggered epoll registration per fd and calls the fd's
synchronous handler when it is readable.  One task serves them, in two ways:

* **idle**: it waits for every other task to block (trio's ``wait_all_tasks_blocked``), then
  blocks in ``epoll_wait`` itself, on the hub's fds *and* trio's own epoll fd, until trio's next
  deadline.  A request is then served by ``epoll_wait``, ``recv``, the handler and ``send``, with
  no scheduler in between.  The moment trio has anything to do (an fd of its own ready, a task
  made runnable by a handler, a deadline due), it returns to trio.  The loop never blocks while
  trio has work: it is trio's own wait, done by us.
* **busy**: if trio does not idle within BUSY_AFTER (other tasks keep running), it waits for the
  hub's epoll through ``trio.lowlevel.wait_readable`` instead and serves every ready fd once per
  wakeup, one trio pass per wakeup however many fds are ready, then tries for idle again (after
  IDLE_RETRY at the latest).  So a client waits at most BUSY_AFTER for service while trio is
  busy.  This is all the hub does
  when the adapter below is unavailable.

The hub's epoll is never in trio's epoll while the task waits for idle: a request arriving then
cannot be mistaken by trio for work of its own, and trio finds idle moments reliably.

The idle mode reads three things trio keeps private (its epoll object, its run queue, its
deadline heap).  :class:`TrioInternals` finds them once and checks their shape; if this trio
differs, the hub logs it once and stays in busy mode, which is correct, only slower.
"""

from __future__ import annotations

import logging
import math
import select
from collections.abc import Callable
from time import perf_counter

import trio

log = logging.getLogger("xenstored.hub")

Handler = Callable[[], None]
OnFail = Callable[[BaseException], None]

_EPOLLIN = select.EPOLLIN
MAX_EVENTS = 256
# Rounds of epoll_wait the idle loop serves before it hands the loop back to trio anyway, a
# backstop: trio's own I/O, a task made runnable and a due deadline already send it back.
IDLE_ROUNDS = 4096
# How long the hub waits for trio to idle before it serves its fds through trio instead, and how
# long it then waits through trio before it tries for idle again (a quiet hub after a busy spell).
BUSY_AFTER = 0.001
IDLE_RETRY = 0.02
# The longest single epoll_wait of the idle loop (trio's own cap): a far but finite deadline
# (a sleep of 1e300 s) is waited for a day at a time, never handed to epoll whole.
MAX_TIMEOUT = 86400.0


class TrioInternals:
    """What idle mode needs from the running trio loop, or None from :meth:`find`."""

    __slots__ = ("epoll", "next_deadline", "now", "runq", "wait_idle")

    def __init__(self) -> None:
        from trio._core import _run

        runner = _run.GLOBAL_RUN_CONTEXT.runner
        epoll = runner.io_manager._epoll
        if not isinstance(epoll, select.epoll) or getattr(runner, "is_guest", False):
            raise TypeError("trio does not run on its own epoll here")
        self.epoll: select.epoll = epoll
        self.runq = runner.runq
        self.next_deadline: Callable[[], float] = runner.deadlines.next_deadline
        self.now: Callable[[], float] = runner.clock.current_time
        self.wait_idle = _run.wait_all_tasks_blocked
        float(self.next_deadline())
        float(self.now())
        len(self.runq)

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
        # Handler calls in each mode (tests: which path really served).
        self.served = 0
        self.served_idle = 0
        self.failures = 0  # the hub's own loop failing (not a handler): logged, retried
        self._trio_registered = False

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
        task_status.started()
        try:
            while True:
                try:
                    await self._run(internals)
                except Exception:  # a bug here must not end the daemon: log, and serve on
                    log.exception("the client hub failed; it serves on: report this with the log")
                    self.failures += 1
                    await trio.sleep(0.01)
        finally:
            self._busy.close()
            self._idle.close()

    async def _run(self, trio_: TrioInternals | None) -> None:
        busy_fd = self._busy.fileno()
        poll = self._busy.poll
        wait_readable = trio.lowlevel.wait_readable
        if trio_ is not None and not self._trio_registered:
            self._idle.register(trio_.epoll.fileno(), _EPOLLIN)
            self._trio_registered = True
        while True:
            if trio_ is not None:
                idle = False
                with trio.move_on_after(BUSY_AFTER):
                    await trio_.wait_idle()
                    idle = True
                if idle:  # alone in this pass of trio's: nothing else runnable, no I/O of its own
                    self._serve_idle(trio_)
                    continue
            with trio.move_on_after(IDLE_RETRY if trio_ is not None else math.inf):
                await wait_readable(busy_fd)
                self._serve(poll(0, MAX_EVENTS))

    def _serve_idle(self, trio_: TrioInternals) -> None:
        """Serve from epoll_wait until trio has work; never longer than trio would have slept."""
        trio_fd = trio_.epoll.fileno()
        poll = self._idle.poll
        runq, next_deadline, now = trio_.runq, trio_.next_deadline, trio_.now
        handlers = self._handlers
        # Trio's next deadline, moved to perf_counter's time scale once (a handler runs no task,
        # so it sets no deadline; it is looked up again every 16 rounds all the same): a round
        # then reads one clock, not trio's deadline heap and its clock.
        deadline = next_deadline()
        limit = deadline - now() + perf_counter()
        for rounds in range(IDLE_ROUNDS):
            if deadline == math.inf:
                timeout = -1.0
            else:
                timeout = limit - perf_counter()
                if timeout <= 0:
                    return  # a deadline is due: trio expires it
                timeout = min(timeout, MAX_TIMEOUT)  # epoll refuses one past time_t (OverflowError)
            events = poll(timeout, MAX_EVENTS)
            if not events:
                return  # the same, found by the timeout
            back = False
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
                return
            if not rounds & 15:
                deadline = next_deadline()
                limit = deadline - now() + perf_counter()
