"""A blkback-like block backend in dom0, over the daemon's socket: Linux's xen-blkback xenbus
driver (drivers/block/xen-blkback/xenbus.c) and the backend bus (xenbus_probe_backend.c),
reduced to what they say through XenStore.

Usage: blkback.py [--shard K/N] [--freeze-at STATE] [--verbose]

* One watch on ``/local/domain/0/backend/vbd`` (the bus watch) finds devices: a device is
  probed when its directory holds ``frontend``, ``frontend-id`` and ``state``, it is ``online``
  and its backend state is below Closing.  Linux probes only state 1 (Initialising); accepting
  2-4 too is what a restarted user-space backend (QEMU's qdisk) does, and lets a new backend
  process take over devices whose backend was killed mid-handshake.
* Probe: ``feature-max-indirect-segments``, ``multi-queue-max-queues``, ``max-ring-page-order``,
  then InitWait, then one watch on the frontend's ``state`` (the "otherend" watch).
* Frontend Initialised (or Connected): read ``ring-ref``, ``event-channel``, ``protocol``,
  ``feature-persistent``, ``multi-queue-num-queues``; in one transaction write
  ``feature-flush-cache``, ``feature-discard`` (and its granularity/alignment/secure),
  ``feature-persistent``, ``sectors``, ``info``, ``sector-size``, ``physical-sector-size``;
  then Connected.
* Frontend Closing: Closing.  Frontend Closed: Closed, and if ``online`` is no longer 1 the device
  is unregistered (its watch removed), as blkback's frontend_changed does.

Every state switch is one JSON line on stdout: {"dom", "dev", "state"}; errors are
{"dom", "dev", "error"}.  ``--shard K/N`` serves only frontends with domid % N == K, so several
backend processes can share a host.  ``--freeze-at S``: when the frontend reaches S, print
{"frozen": ...} and stop answering (a backend that hangs, to be killed by the test).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass, field

from xenbus import State, parse_state, read_opt, read_state, switch_state, transact

from xenstored.client import SyncClient
from xenstored.wire import XsError

BUS = "/local/domain/0/backend/vbd"
SECTORS = 2097152  # a 1 GiB disk of 512-byte sectors


@dataclass
class Device:
    """Blkback's view of one vbd: ``dev->state`` is ours, the store's node may lag or lead."""

    domid: int
    devid: str
    nodename: str
    otherend: str
    state: State = State.INITIALISING
    token: str = ""
    ring: dict[str, str] = field(default_factory=dict)


class Backend:
    def __init__(self, c: SyncClient, shard: tuple[int, int], freeze_at: State | None, verbose: bool) -> None:
        self.c = c
        self.shard = shard
        self.freeze_at = freeze_at
        self.verbose = verbose
        self.devices: dict[str, Device] = {}  # by nodename
        self.by_token: dict[str, Device] = {}
        self.errors = 0

    def say(self, **kw: object) -> None:
        print(json.dumps(kw), flush=True)

    # -- the bus ------------------------------------------------------------------------------

    def bus_event(self, path: str) -> None:
        """xenbus_dev_changed: something under the bus changed; probe new devices, drop gone ones."""
        rel = path[len(BUS) :].strip("/")
        parts = rel.split("/") if rel else []
        if len(parts) >= 2:
            nodename = f"{BUS}/{parts[0]}/{parts[1]}"
            dev = self.devices.get(nodename)
            if dev is None:
                self.try_probe(parts[0], parts[1])
            elif len(parts) == 2 and not self.c.exists(nodename):
                self.unregister(dev)
            return
        # The bus itself or one domain's directory: the initial event, or a removal.
        prefix = f"{BUS}/{parts[0]}" if parts else BUS
        for dev in [d for n, d in self.devices.items() if n.startswith(prefix + "/")]:
            if not self.c.exists(dev.nodename):
                self.unregister(dev)
        try:
            domids = [parts[0]] if parts else self.c.ls(BUS)
            for domid in domids:
                for devid in self.c.ls(f"{BUS}/{domid}"):
                    if f"{BUS}/{domid}/{devid}" not in self.devices:
                        self.try_probe(domid, devid)
        except XsError as e:
            if e.name != "ENOENT":
                raise

    def try_probe(self, domid_s: str, devid: str) -> None:
        """xenbus_probe_node + read_otherend_details + xen_blkbk_probe + watch_otherend."""
        try:
            domid = int(domid_s)
        except ValueError:
            return
        if domid % self.shard[1] != self.shard[0]:
            return
        nodename = f"{BUS}/{domid_s}/{devid}"
        try:
            frontend_id = self.c.read(f"{nodename}/frontend-id").decode()
            otherend = self.c.read(f"{nodename}/frontend").decode()
            state = parse_state(self.c.read(f"{nodename}/state"))
            online = read_opt(self.c, f"{nodename}/online", "0")
            # backend_changed: what the disk is (a real blkback opens physical-device here).
            self.c.read(f"{nodename}/physical-device")
            mode = read_opt(self.c, f"{nodename}/mode", "r")
        except XsError as e:
            if e.name == "ENOENT":
                return  # not complete yet, or already gone: a later event tells
            raise
        if frontend_id != domid_s or online != "1" or state >= State.CLOSING or state == State.UNKNOWN:
            return
        dev = Device(domid, devid, nodename, otherend)
        dev.ring["mode"] = mode
        self.devices[nodename] = dev
        c = self.c
        c.write(f"{nodename}/feature-max-indirect-segments", "32")
        c.write(f"{nodename}/multi-queue-max-queues", "2")
        c.write(f"{nodename}/max-ring-page-order", "4")
        self.switch(dev, State.INIT_WAIT)
        dev.token = f"fe:{domid}:{devid}"
        self.by_token[dev.token] = dev
        c.watch(f"{otherend}/state", dev.token)

    def unregister(self, dev: Device) -> None:
        """device_unregister: the otherend watch goes; the nodes stay for the toolstack."""
        self.devices.pop(dev.nodename, None)
        self.by_token.pop(dev.token, None)
        try:
            self.c.unwatch(f"{dev.otherend}/state", dev.token)
        except XsError:
            pass
        if self.verbose:
            self.say(dom=dev.domid, dev=dev.devid, unregistered=True)

    def switch(self, dev: Device, state: State) -> None:
        if switch_state(self.c, dev.nodename, state):
            dev.state = state
            self.say(dom=dev.domid, dev=dev.devid, state=int(state))

    # -- the otherend -------------------------------------------------------------------------

    def frontend_changed(self, dev: Device) -> None:
        fstate = read_state(self.c, dev.otherend)
        if self.verbose:
            self.say(dom=dev.domid, dev=dev.devid, fe=int(fstate))
        if self.freeze_at is not None and fstate == self.freeze_at:
            self.say(frozen=True, dom=dev.domid, dev=dev.devid)
            while True:
                time.sleep(3600)
        if fstate == State.INITIALISING:
            if dev.state == State.CLOSED:  # the frontend wants to reconnect
                self.switch(dev, State.INIT_WAIT)
        elif fstate in (State.INITIALISED, State.CONNECTED):
            if dev.state == State.CONNECTED:
                return  # connect once only
            if self.connect_ring(dev):
                self.connect(dev)
        elif fstate == State.CLOSING:
            self.switch(dev, State.CLOSING)
        elif fstate == State.CLOSED:
            self.switch(dev, State.CLOSED)
            if read_opt(self.c, f"{dev.nodename}/online", "0") != "1":
                self.unregister(dev)
        elif fstate == State.UNKNOWN:
            self.unregister(dev)

    def connect_ring(self, dev: Device) -> bool:
        fe = dev.otherend
        try:
            queues = int(read_opt(self.c, f"{fe}/multi-queue-num-queues", "1"))
            if queues == 1:
                dev.ring["ring-ref"] = self.c.read(f"{fe}/ring-ref").decode()
                dev.ring["event-channel"] = self.c.read(f"{fe}/event-channel").decode()
            else:
                for q in range(queues):
                    dev.ring[f"queue-{q}"] = self.c.read(f"{fe}/queue-{q}/ring-ref").decode()
        except (XsError, ValueError) as e:
            self.errors += 1  # xenbus_dev_fatal: "reading ring-ref"
            self.say(dom=dev.domid, dev=dev.devid, error=f"connect_ring: {e}")
            return False
        dev.ring["protocol"] = read_opt(self.c, f"{fe}/protocol", "x86_64-abi")
        dev.ring["feature-persistent"] = read_opt(self.c, f"{fe}/feature-persistent", "0")
        return True

    def connect(self, dev: Device) -> None:
        be = dev.nodename
        discard = read_opt(self.c, f"{be}/discard-enable", "1") == "1"
        info = "0" if dev.ring.get("mode", "r") == "w" else "4"  # VDISK_READONLY

        def body(tx: int) -> None:
            c = self.c
            c.write(f"{be}/feature-flush-cache", "1", tx)
            if discard:
                c.write(f"{be}/discard-granularity", "4096", tx)
                c.write(f"{be}/discard-alignment", "0", tx)
                c.write(f"{be}/discard-secure", "0", tx)
                c.write(f"{be}/feature-discard", "1", tx)
            c.write(f"{be}/feature-persistent", dev.ring["feature-persistent"], tx)
            c.write(f"{be}/sectors", str(SECTORS), tx)
            c.write(f"{be}/info", info, tx)
            c.write(f"{be}/sector-size", "512", tx)
            c.write(f"{be}/physical-sector-size", "4096", tx)

        transact(self.c, body)
        self.switch(dev, State.CONNECTED)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        self.c.watch(BUS, "backend")
        self.say(ready=True)
        while True:
            path, token = self.c.read_watch(timeout=None)
            try:
                if token == "backend":
                    self.bus_event(path)
                else:
                    dev = self.by_token.get(token)
                    if dev is not None:
                        self.frontend_changed(dev)
            except XsError as e:
                self.errors += 1
                self.say(error=e.name, path=path, token=token)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shard", default="0/1", help="K/N: serve frontends with domid %% N == K")
    ap.add_argument("--freeze-at", type=int, default=None, help="hang when the frontend reaches this state")
    ap.add_argument("--verbose", action="store_true", help="also report frontend states seen")
    a = ap.parse_args()
    k, n = (int(x) for x in a.shard.split("/"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with SyncClient(timeout=60.0) as c:
        Backend(c, (k, n), None if a.freeze_at is None else State(a.freeze_at), a.verbose).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
