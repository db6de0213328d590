"""Domain records: per-domain quotas, features, target, and the ring connection if introduced.

A record exists for every domain the daemon has dealt with: introduced guests, dom0, and domains
named in permissions.  Quotas are copied from the global defaults when the record is created, so
later global changes affect only domains created afterwards (as C-4.22).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .quota import Quotas
from .wire import FEATURES_ALL

if TYPE_CHECKING:
    from .connection import Connection


class Domain:
    def __init__(self, domid: int, quotas: Quotas) -> None:
        self.domid = domid
        self.quotas = quotas
        self.features = FEATURES_ALL
        self.target: int | None = None
        self.conn: Connection | None = None  # ring connection once introduced
        self.introduced = False
        self.shutdown_reported = False
        self.port: int | None = None  # remote event channel port given at INTRODUCE
        self.local_port: int | None = None
        self.gfn = 0
        self.ignored = False  # misbehaved: ring error set, nothing read until re-introduced

    def __repr__(self) -> str:
        return f"<Domain {self.domid}{' introduced' if self.introduced else ''}>"
