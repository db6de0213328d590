"""Quotas: per-domain limits with C-4.22's names and defaults, and the refusal log.

A quota of N allows exactly N (the N+1st is refused) and 0 means unlimited, the same rule for
every quota, unlike upstream's per-version off-by-ones.  Privileged connections are exempt.
Every refusal is logged with domain, quota, limit and value, rate-limited per (domain, quota),
because silent refusals are the top operator complaint about upstream.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .wire import XsError

log = logging.getLogger("xenstored.quota")

# Order of GET_QUOTA's name list (C-4.22).
NAMES: tuple[str, ...] = (
    "nodes",
    "watches",
    "outstanding",
    "memory",
    "soft-memory",
    "transactions",
    "transaction-nodes",
    "node-permissions",
    "path-max",
    "node-size",
)

DEFAULTS: dict[str, int] = {
    "nodes": 1000,
    "watches": 128,
    "outstanding": 20,
    "memory": 2560 * 1024,
    "soft-memory": 2048 * 1024,
    "transactions": 10,
    "transaction-nodes": 1024,
    "node-permissions": 5,
    "path-max": 2048,
    "node-size": 2048,
}

DESCRIPTIONS: dict[str, str] = {
    "nodes": "Nodes per domain",
    "watches": "Watches per domain",
    "outstanding": "Outstanding requests per domain",
    "memory": "Memory used per domain (hard limit)",
    "soft-memory": "Memory used per domain (warning only)",
    "transactions": "Open transactions per domain",
    "transaction-nodes": "Nodes accessed per transaction",
    "node-permissions": "Permission entries per node",
    "path-max": "Path length below the domain home",
    "node-size": "Node size (value, children, permissions)",
}

# cxenstored 4.17 spelling accepted as an alias.
ALIASES = {"permissions": "node-permissions", "entry-nb": "nodes"}

LOG_INTERVAL = 10.0  # seconds between two refusal lines for the same domain and quota


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in DEFAULTS:
        raise XsError("EINVAL", f"unknown quota {name!r}")
    return name


@dataclass
class Quotas:
    """A set of limits: the global defaults, or one domain's copy of them."""

    values: dict[str, int]

    @classmethod
    def defaults(cls) -> Quotas:
        return cls(dict(DEFAULTS))

    def copy(self) -> Quotas:
        return Quotas(dict(self.values))

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    def set(self, name: str, value: int) -> None:
        name = canonical_name(name)
        if not 0 <= value < 0xFFFFFFFF:
            raise XsError("EINVAL", f"bad quota value {value}")
        self.values[name] = value


class RefusalLog:
    """Rate-limited warnings for quota refusals, counted so an operator (and a test) can see them."""

    def __init__(self, clock: object = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[tuple[int, str], float] = {}
        self.count = 0
        self.suppressed = 0
        # (domid, quota name) -> refusals, for the metrics (xenstored_quota_refusals_total).
        self.counts: dict[tuple[int, str], int] = {}

    def warn_soft(self, domid: int, limit: int, value: int) -> None:
        """Soft memory quota: a warning only, rate-limited like refusals."""
        now = self._clock()  # type: ignore[operator]
        key = (domid, "soft-memory")
        last = self._last.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            return
        self._last[key] = now
        log.warning("quota: domain %d exceeds soft memory quota (limit %d, uses %d)", domid, limit, value)

    def refuse(self, domid: int, name: str, limit: int, value: int, what: str = "") -> None:
        self.count += 1
        key = (domid, name)
        self.counts[key] = self.counts.get(key, 0) + 1
        now = self._clock()  # type: ignore[operator]
        last = self._last.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            self.suppressed += 1
            return
        if len(self._last) > 4096:  # bounded: forget the oldest
            self._last.pop(next(iter(self._last)))
        self._last[key] = now
        log.warning(
            "quota: domain %d refused by %s quota (limit %d, would be %d)%s",
            domid,
            name,
            limit,
            value,
            f": {what}" if what else "",
        )

    def forget(self, domid: int) -> None:
        """A domain is gone: its refusal counts go with it (see metrics.Metrics.forget)."""
        for key in [k for k in self.counts if k[0] == domid]:
            del self.counts[key]


def exceeds(limit: int, value: int) -> bool:
    """``value`` (the count after the operation) is over ``limit``; 0 means unlimited."""
    return limit != 0 and value > limit
