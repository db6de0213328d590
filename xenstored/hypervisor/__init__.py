"""Hypervisor backends: real Xen devices, or an emulation for unprivileged runs and tests."""

from __future__ import annotations

import os

from .base import DomainInfo, Hypervisor, HypervisorError

__all__ = ["DomainInfo", "Hypervisor", "HypervisorError", "choose", "fakexen_dir"]

EVTCHN_DEVICE = "/dev/xen/evtchn"


def fakexen_dir(rundir: str | os.PathLike[str]) -> str:
    """Where emulated state lives: $FAKEXEN_DIR, else <rundir>/fx (the oracle's convention)."""
    return os.environ.get("FAKEXEN_DIR") or os.path.join(os.fspath(rundir), "fx")


def choose(emulate: bool | None, rundir: str | os.PathLike[str]) -> Hypervisor:
    """The real backend when Xen's event-channel device exists, unless emulation is forced.

    ``emulate=None`` means auto-detect; ``False`` insists on real Xen (and fails loudly without
    it rather than silently serving fake domains on a real host).
    """
    if emulate is None:
        emulate = not os.path.exists(EVTCHN_DEVICE)
    if emulate:
        from .emulated import EmulatedHypervisor

        return EmulatedHypervisor(fakexen_dir(rundir))
    from .xen import XenHypervisor

    return XenHypervisor()
