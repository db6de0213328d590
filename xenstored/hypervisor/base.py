"""What the daemon needs from a hypervisor, and nothing more.

The core is sans-I/O and calls the synchronous methods from inside request dispatch (INTRODUCE
maps the ring and binds the event channel before it replies), so every non-async method here must
return promptly and never wait on a peer.  Events flow the other way through :meth:`Hypervisor.run`,
which invokes plain callbacks: the core decides what a kick means.

Two backends implement this: :mod:`.emulated` (files and datagram sockets, compatible with the
oracle's fakexen shim) and :mod:`.xen` (the real /dev/xen devices).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

# SHUTDOWN_* reasons from xen/include/public/sched.h, for logs and DomainInfo.shutdown_reason.
SHUTDOWN_POWEROFF = 0
SHUTDOWN_REBOOT = 1
SHUTDOWN_SUSPEND = 2
SHUTDOWN_CRASH = 3
SHUTDOWN_WATCHDOG = 4
SHUTDOWN_SOFT_RESET = 5

# The virtual IRQ raised when any domain changes state (xen.h VIRQ_DOM_EXC).
VIRQ_DOM_EXC = 3


class HypervisorError(RuntimeError):
    """The backend cannot be used (folder locked by another daemon, Xen library missing, device
    not openable).  The message is meant for the operator as is: it says what is wrong, where,
    and what to do; the daemon prints it and exits with status 1."""


@dataclass(slots=True, frozen=True)
class DomainInfo:
    """A domain's state as xenstored cares about it (subset of xc_dominfo_t).

    ``shutdown`` is also true for a crashed domain, as in libxenctrl, so "has this domain stopped
    running" is one test; ``crashed`` tells the two apart for logs.
    """

    domid: int
    shutdown: bool = False
    crashed: bool = False
    dying: bool = False
    shutdown_reason: int = 0

    @property
    def running(self) -> bool:
        return not (self.shutdown or self.crashed or self.dying)


PortCallback = Callable[[int], None]
DomExcCallback = Callable[[], "None | Awaitable[None]"]


class Hypervisor(abc.ABC):
    """Event channels, ring mappings and domain state.

    Ports are the daemon's *local* event-channel ports; the core keys its per-domain pumps by the
    value :meth:`bind_interdomain` returns and gets exactly those values back from ``run``.
    """

    #: True when domains and event channels are emulated (tests, unprivileged runs).
    emulated: bool = False

    @abc.abstractmethod
    def domain_info(self, domid: int) -> DomainInfo | None:
        """Current state of ``domid``; None when the hypervisor does not know it (destroyed)."""

    @abc.abstractmethod
    def domains(self) -> list[DomainInfo]:
        """Every existing domain, by ascending domid (for the VIRQ_DOM_EXC rescan)."""

    def changed_domains(self) -> set[int] | None:
        """The domains whose state changed since the last call, or None when that is not known
        (Xen's VIRQ_DOM_EXC does not say which domain): the daemon then rescans them all."""
        return None

    def domain_exists(self, domid: int) -> bool:
        return self.domain_info(domid) is not None

    @abc.abstractmethod
    def map_ring(self, domid: int, gfn: int) -> memoryview:
        """Map ``domid``'s 4 KiB xenstore page writable; XsError("EINVAL") if that is impossible."""

    @abc.abstractmethod
    def unmap_ring(self, domid: int) -> None:
        """Undo :meth:`map_ring`; release any Ring built on the view first (ring.release())."""

    @abc.abstractmethod
    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind a local port to ``domid``'s ``remote_port``; XsError on failure."""

    @abc.abstractmethod
    def unbind(self, local_port: int) -> None:
        """Release a port; unknown ports are ignored so that cleanup paths never fail."""

    @abc.abstractmethod
    def notify(self, local_port: int) -> None:
        """Kick the peer of ``local_port``; never blocks, a vanished peer is not an error."""

    @abc.abstractmethod
    def dom0_ring(self) -> tuple[memoryview, int] | None:
        """The store domain's own page and the *remote* port to bind for it, or None.

        Upstream reads /proc/xen/xsd_kva and /proc/xen/xsd_port.  The core introduces it like any
        other domain: ``port = bind_interdomain(0, remote)``, ``Ring(view)``.
        """

    @abc.abstractmethod
    async def run(
        self,
        on_port_kicked: PortCallback,
        on_dom_exc: DomExcCallback,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver events until cancelled: ``on_port_kicked(local_port)`` for each pending port
        (coalesced, at most once per port per batch), ``on_dom_exc()`` on VIRQ_DOM_EXC.

        ``on_dom_exc`` may return an awaitable, which is awaited before anything else happens;
        the emulated backend only acknowledges a domain-changing command after that.
        """

    def event_fd(self) -> int | None:
        """An fd that is readable while events are pending, for an edge that waits for it
        itself and then calls :meth:`handle_events` (server.serve_domains, through the hub:
        a guest's request then costs no trio pass); None if only :meth:`run` can wait."""
        return None

    def handle_events(self, on_port_kicked: PortCallback, on_dom_exc: Callable[[], None]) -> None:
        """Deliver what is pending now, as :meth:`run` does, without waiting; ``on_dom_exc``
        must be synchronous here.  Only called when :meth:`event_fd` gave an fd."""
        raise NotImplementedError

    def close(self) -> None:
        """Release devices, sockets and mappings; the object is unusable afterwards."""
