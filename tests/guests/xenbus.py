"""What xenbus drivers and the toolstack share: XenbusState, the state switch, and libxl's device
and domain bookkeeping, for the emulated split-driver programs (blkback.py, blkfront.py), the
tests and ``bench.bench_domains``.

Why a module of its own: both driver halves must switch state exactly as Linux's
``xenbus_switch_state`` does (a transaction that refuses to re-create a removed ``state`` node),
and the test and the benchmark must build devices exactly as libxl does, or the handshake they
exercise is not the one real hosts put through xenstored.

The store handle may be a :class:`xenstored.client.SyncClient` (dom0 over the socket) or a
:class:`xenstored.guest.Guest` (a domain over its ring): both take ``(path, [value,] tx)``
positionally and ``transaction_start()`` / ``transaction_end(tx, commit)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol, TypeVar

from xenstored.guest import control
from xenstored.wire import Op, XsError

T = TypeVar("T")

TX_ATTEMPTS = 100  # xenbus retries EAGAIN forever; a bound keeps a livelock visible


class State(enum.IntEnum):
    """xen/include/public/io/xenbus.h ``enum xenbus_state``."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class Transactional(Protocol):
    def transaction_start(self) -> int: ...
    def transaction_end(self, tx: int, commit: bool = True, /) -> None: ...


class Store(Transactional, Protocol):
    """The part of SyncClient and Guest the drivers use (positional transaction ids)."""

    def read(self, path: str, tx: int = 0, /) -> bytes: ...
    def write(self, path: str, value: str, tx: int = 0, /) -> None: ...


def parse_state(raw: bytes) -> State:
    """``xenbus_read_driver_state``: anything unreadable or out of range is Unknown."""
    try:
        return State(int(raw.rstrip(b"\0") or b"0"))
    except ValueError:
        return State.UNKNOWN


def read_state(xs: Store, path: str, tx: int = 0) -> State:
    try:
        return parse_state(xs.read(f"{path}/state", tx))
    except XsError as e:
        if e.name == "ENOENT":
            return State.UNKNOWN
        raise


def read_opt(xs: Store, path: str, default: str = "", tx: int = 0) -> str:
    """``xenbus_read_unsigned`` and friends: a missing node is the default, not an error."""
    try:
        return xs.read(path, tx).decode()
    except XsError as e:
        if e.name == "ENOENT":
            return default
        raise


def transact(xs: Transactional, body: Callable[[int], T]) -> T:
    """Run ``body(tx)`` in a transaction and commit, again on EAGAIN (the xenbus ``again:`` loop).

    ``body`` aborts the transaction by raising; its exception propagates after the abort.
    """
    for attempt in range(TX_ATTEMPTS):
        tx = xs.transaction_start()
        try:
            result = body(tx)
        except BaseException:
            try:
                xs.transaction_end(tx, False)
            except (XsError, OSError, TimeoutError):
                pass
            raise
        try:
            xs.transaction_end(tx, True)
        except XsError as e:
            if e.name == "EAGAIN" and attempt < TX_ATTEMPTS - 1:
                continue
            raise
        return result
    raise XsError("EAGAIN")  # pragma: no cover - the loop returns or raises


def switch_state(xs: Store, nodename: str, state: State) -> bool:
    """``__xenbus_switch_state``: write ``<nodename>/state`` only if it still exists.

    Linux reads the node inside the transaction first so that a driver racing with the
    toolstack's removal of the device never re-creates a half directory.  Returns False when the
    device is gone (nothing written).
    """

    def body(tx: int) -> bool:
        try:
            xs.read(f"{nodename}/state", tx)
        except XsError as e:
            if e.name == "ENOENT":
                raise _Gone from None
            raise
        xs.write(f"{nodename}/state", str(int(state)), tx)
        return True

    try:
        return transact(xs, body)
    except _Gone:
        return False


class _Gone(Exception):
    """The device's state node vanished under a state switch (aborts the transaction)."""


# -------------------------------------------------------------------------------- toolstack


class Toolstack(Protocol):
    """What the toolstack needs of dom0's connection: SyncClient's signatures."""

    def read(self, path: str, tx_id: int = 0) -> bytes: ...
    def write(self, path: str, value: str, tx_id: int = 0) -> None: ...
    def mkdir(self, path: str, tx_id: int = 0) -> None: ...
    def rm(self, path: str, tx_id: int = 0) -> None: ...
    def ls(self, path: str, tx_id: int = 0) -> list[str]: ...
    def set_perms(self, path: str, perms: list[str], tx_id: int = 0) -> None: ...
    def request(self, op: int, payload: bytes, tx_id: int = 0) -> bytes: ...
    def transaction_start(self) -> int: ...
    def transaction_end(self, tx_id: int, commit: bool = True) -> None: ...


VBD_DEVID = 768  # libxl_device_disk_dev_number("hda"): IDE major 3 << 8; "xvda" would be 51712
VBD_VDEV = "hda"


def backend_path(domid: int, devid: int = VBD_DEVID, backend_domid: int = 0) -> str:
    return f"/local/domain/{backend_domid}/backend/vbd/{domid}/{devid}"


def frontend_path(domid: int, devid: int = VBD_DEVID) -> str:
    return f"/local/domain/{domid}/device/vbd/{devid}"


def libxl_path(domid: int, devid: int = VBD_DEVID) -> str:
    return f"/libxl/{domid}/device/vbd/{devid}"


def _rm(c: Toolstack, path: str, tx: int) -> None:
    try:
        c.rm(path, tx)
    except XsError as e:
        if e.name != "ENOENT":
            raise


def hypervisor(fx: str, command: str, timeout: float = 30.0) -> str:
    """One emulated-hypervisor command (``create N``...); RuntimeError unless it succeeded.

    The reply comes once the daemon has handled the VIRQ_DOM_EXC the command raises; a daemon
    that rescans every domain on each VIRQ (C xenstored) takes seconds with 1000 of them."""
    reply = control(command, fx, timeout)
    if not reply.startswith("ok"):
        raise RuntimeError(f"fake hypervisor: {command!r} -> {reply!r}")
    return reply


def domain_make(c: Toolstack, fx: str, domid: int, *, introduce: bool = True) -> None:
    """libxl__domain_make, cut to what a PV guest's devices need, then XS_INTRODUCE.

    The home is dom0's and readable by the guest (libxl's ``roperm``); ``device``, ``data`` and
    friends belong to the guest (``rwperm``), so frontend directories made under ``device``
    inherit the guest as owner.
    """
    hypervisor(fx, f"create {domid}")
    dom = f"/local/domain/{domid}"
    ro, rw = ["n0", f"r{domid}"], [f"n{domid}"]

    def make(tx: int) -> None:
        _rm(c, dom, tx)
        c.mkdir(dom, tx)
        c.set_perms(dom, ro, tx)
        for sub in ("device", "data", "drivers", "feature", "attr", "error", "control"):
            c.mkdir(f"{dom}/{sub}", tx)
            c.set_perms(f"{dom}/{sub}", ro if sub == "control" else rw, tx)
        c.write(f"{dom}/name", f"guest{domid}", tx)
        c.write(f"{dom}/domid", str(domid), tx)

    transact(c, make)
    if introduce:
        c.request(Op.INTRODUCE, f"{domid}\0{domid}\0{1}\0".encode())


def vbd_add(c: Toolstack, domid: int, devid: int = VBD_DEVID, backend_domid: int = 0) -> None:
    """libxl__device_generic_add for a disk (libxl_disk.c device_disk_add), in one transaction.

    Frontend directory: owned by the guest, readable by the backend domain.  Backend directory:
    owned by the backend domain, readable by the guest.  Every node under them inherits that.
    """
    fe, be, lp = frontend_path(domid, devid), backend_path(domid, devid, backend_domid), libxl_path(domid, devid)
    bents = {
        "frontend": fe,
        "frontend-id": str(domid),
        "online": "1",
        "removable": "0",
        "bootable": "1",
        "state": str(int(State.INITIALISING)),
        "dev": VBD_VDEV,
        "type": "phy",
        "mode": "w",
        "device-type": "disk",
        "params": f"/dev/vg/guest{domid}",
        "physical-device": "fe:%x" % (domid & 0xFF),
        "physical-device-path": f"/dev/vg/guest{domid}",
        "discard-enable": "1",
        "specification": "xen",
    }
    fents = {
        "backend": be,
        "backend-id": str(backend_domid),
        "state": str(int(State.INITIALISING)),
        "virtual-device": str(devid),
        "device-type": "disk",
    }

    def add(tx: int) -> None:
        _rm(c, fe, tx)
        c.mkdir(fe, tx)
        c.set_perms(fe, [f"n{domid}", f"r{backend_domid}"], tx)
        for k, v in fents.items():
            c.write(f"{fe}/{k}", v, tx)
        _rm(c, be, tx)
        c.mkdir(be, tx)
        c.set_perms(be, [f"n{backend_domid}", f"r{domid}"], tx)
        for k, v in bents.items():
            c.write(f"{be}/{k}", v, tx)
        _rm(c, lp, tx)
        for k, v in (("frontend", fe), ("backend", be), ("params", bents["params"]), ("mode", "w")):
            c.write(f"{lp}/{k}", v, tx)

    transact(c, add)


def vbd_remove_start(c: Toolstack, domid: int, devid: int = VBD_DEVID, backend_domid: int = 0) -> None:
    """libxl__initiate_device_generic_remove: ``online = 0`` and ``state = 5`` in one transaction;
    the toolstack then waits for the backend to reach Closed."""
    be = backend_path(domid, devid, backend_domid)

    def remove(tx: int) -> None:
        c.write(f"{be}/online", "0", tx)
        c.write(f"{be}/state", str(int(State.CLOSING)), tx)

    transact(c, remove)


def vbd_destroy(c: Toolstack, domid: int, devid: int = VBD_DEVID, backend_domid: int = 0) -> None:
    """libxl__device_destroy: both halves and libxl's record go, with parents left empty
    (libxl__xs_path_cleanup), in one transaction."""
    paths = (frontend_path(domid, devid), backend_path(domid, devid, backend_domid), libxl_path(domid, devid))

    def destroy(tx: int) -> None:
        for p in paths:
            _rm(c, p, tx)
        for p in paths[1:]:  # the frontend's parent is the guest's own device/vbd: keep it
            parent = p.rsplit("/", 1)[0]
            try:
                if not c.ls(parent, tx):
                    c.rm(parent, tx)
            except XsError as e:
                if e.name != "ENOENT":
                    raise

    transact(c, destroy)


def domain_destroy(c: Toolstack, fx: str, domid: int, *, release: bool = True) -> None:
    """libxl__destroy_domid's xenstore part: XS_RELEASE, the home and leftovers go, then the
    hypervisor forgets the domain."""
    if release:
        c.request(Op.RELEASE, f"{domid}\0".encode())

    def cleanup(tx: int) -> None:
        for p in (f"/local/domain/{domid}", f"/local/domain/0/backend/vbd/{domid}", f"/libxl/{domid}"):
            _rm(c, p, tx)

    transact(c, cleanup)
    hypervisor(fx, f"destroy {domid}")
