"""A blkfront-like block frontend in one or many guest domains, each over its own emulated ring:
Linux's xen-blkfront xenbus driver (drivers/block/xen-blkfront.c) and the frontend bus
(xenbus_probe_frontend.c), reduced to what they say through XenStore.

Usage: blkfront.py DOMAINS [--exit-when-unplugged] [--verbose]   (DOMAINS: "5" or "100-349,400")

One process may act as many domains (the benchmark runs 1000 of them in a few processes): every
domain has its own :class:`xenstored.guest.Guest` (a :class:`MuxGuest`, which keeps reading every
domain's event channel while one of them waits for a reply) and the process multiplexes their
event channels with select, so it is only ever driven by watch events, never by re-reading states.

Per domain, as Linux does:

* a watch on ``/local/domain/<N>/device`` (the bus watch) finds ``device/vbd/<devid>``; once its
  ``backend`` and ``backend-id`` can be read the device is probed and a watch is set on the
  backend's ``state`` (the "otherend" watch);
* backend InitWait, while we are Initialising: talk_to_blkback, i.e. one transaction with
  ``ring-ref``, ``event-channel``, ``protocol`` and ``feature-persistent`` (``ring-page-order``
  and ``multi-queue-num-queues`` are not needed for one single-page ring), then Initialised;
* backend Connected: blkfront_connect reads ``sectors``, ``info``, ``sector-size``,
  ``physical-sector-size``, ``feature-flush-cache``, ``feature-discard``, ``feature-persistent``
  and ``feature-max-indirect-segments``, then Connected;
* backend Closing (hot-unplug): Closing while the disk is "in use", then Closed once released;
* the device directory removed: the otherend watch goes and the device is forgotten.

Stdout, one JSON line each: {"dom", "dev", "state"} for every switch of ours (with the disk's
geometry on Connected), {"dom", "dev", "be"} for every backend state seen (--verbose),
{"dom", "dev", "error"} for anything unexpected, {"exit": ...} at the end.
With --exit-when-unplugged the process exits once every domain has had a device and none is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

from xenbus import State, read_opt, read_state, switch_state, transact

from xenstored.guest import Guest
from xenstored.wire import XsError

PROTOCOL = "x86_64-abi"  # XEN_IO_PROTO_ABI_NATIVE on x86-64


class MuxGuest(Guest):
    """A Guest that, while it waits for its own reply, also drains the event channels of every
    other domain of the process (and remembers which were kicked).

    Why: a kick nobody reads is a datagram held in the sender's socket buffer.  Our daemon sends
    each port's kicks from its own socket, but the oracle's fakexen shim sends all of them, and
    its replies to hypervisor commands, from one: with ~130 domains each holding one unread kick
    its buffer is full, further kicks and replies are dropped, and every request then waits for
    the 0.25 s ring poll.  A real guest has no such problem (an event channel is a bit).
    """

    peers: ClassVar[dict[int, MuxGuest]] = {}  # by event socket fd: all the process's guests
    kicked: ClassVar[set[MuxGuest]] = set()

    def __init__(self, domid: int, timeout: float) -> None:
        super().__init__(domid, timeout=timeout)
        MuxGuest.peers[self._ev.fileno()] = self

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._ev.recv(64):
                pass

    def _wait(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            super()._wait(deadline)  # raises the TimeoutError
        ready, _, _ = select.select(list(MuxGuest.peers), [], [], min(remaining, 0.25))
        for fd in ready:
            peer = MuxGuest.peers[fd]
            peer.drain()
            if peer is not self:
                MuxGuest.kicked.add(peer)


@dataclass
class Device:
    nodename: str
    devid: str
    otherend: str
    otherend_id: str
    token: str
    state: State = State.INITIALISING
    disk: dict[str, str] = field(default_factory=dict)


class Domain:
    """One guest kernel's xenbus frontend, over its ring."""

    def __init__(self, proc: Frontends, domid: int, timeout: float) -> None:
        self.proc = proc
        self.domid = domid
        self.home = f"/local/domain/{domid}"
        self.g = MuxGuest(domid, timeout=timeout)
        self.devices: dict[str, Device] = {}
        self.by_token: dict[str, Device] = {}
        self.had_device = False

    def start(self) -> None:
        self.g.watch(f"{self.home}/device", "device")

    def say(self, dev: Device, **kw: object) -> None:
        self.proc.say(dom=self.domid, dev=dev.devid, **kw)

    def pending(self) -> bool:
        return bool(self.g.events)

    def handle_events(self) -> None:
        while self.g.events:
            path, token = self.g.events.popleft()
            try:
                if token == "device":
                    self.bus_event(path)
                else:
                    dev = self.by_token.get(token)
                    if dev is not None:
                        self.backend_changed(dev)
            except XsError as e:
                self.proc.error(self.domid, f"{e.name} handling {path} {token}")

    # -- the bus ------------------------------------------------------------------------------

    def bus_event(self, path: str) -> None:
        base = f"{self.home}/device"
        parts = path[len(base) :].strip("/").split("/") if path.startswith(base) else []
        parts = [p for p in parts if p]
        if len(parts) >= 2 and parts[0] != "vbd":
            return  # not our driver's class
        if len(parts) >= 2:
            nodename = f"{base}/vbd/{parts[1]}"
            dev = self.devices.get(nodename)
            if dev is None:
                self.try_probe(parts[1])
            elif len(parts) == 2 and not self.g.exists(nodename):
                self.remove(dev)
            return
        for dev in list(self.devices.values()):  # "device" or "device/vbd" itself changed
            if not self.g.exists(dev.nodename):
                self.remove(dev)
        try:
            for devid in self.g.ls(f"{base}/vbd"):
                if f"{base}/vbd/{devid}" not in self.devices:
                    self.try_probe(devid)
        except XsError as e:
            if e.name != "ENOENT":
                raise

    def try_probe(self, devid: str) -> None:
        """xenbus_probe_node (only devices in Initialising are new) + read_otherend_details +
        blkfront_probe (virtual-device) + watch_otherend."""
        nodename = f"{self.home}/device/vbd/{devid}"
        g = self.g
        try:
            if read_state(g, nodename) != State.INITIALISING:
                return  # a device going away after Closed, not a new one
            g.read(f"{nodename}/virtual-device")
            otherend = g.read(f"{nodename}/backend").decode()
            otherend_id = g.read(f"{nodename}/backend-id").decode()
        except XsError as e:
            if e.name == "ENOENT":
                return
            raise
        dev = Device(nodename, devid, otherend, otherend_id, token=f"be:{devid}")
        self.devices[nodename] = dev
        self.by_token[dev.token] = dev
        self.had_device = True
        g.watch(f"{otherend}/state", dev.token)

    def remove(self, dev: Device) -> None:
        self.devices.pop(dev.nodename, None)
        self.by_token.pop(dev.token, None)
        try:
            self.g.unwatch(f"{dev.otherend}/state", dev.token)
        except XsError:
            pass
        if self.proc.verbose:
            self.say(dev, removed=True)

    def switch(self, dev: Device, state: State, **extra: object) -> None:
        if switch_state(self.g, dev.nodename, state):
            dev.state = state
            self.say(dev, state=int(state), **extra)

    # -- the otherend -------------------------------------------------------------------------

    def backend_changed(self, dev: Device) -> None:
        bstate = read_state(self.g, dev.otherend)
        if self.proc.verbose:
            self.say(dev, be=int(bstate))
        if bstate == State.INIT_WAIT:
            if dev.state != State.INITIALISING:
                return
            self.talk_to_blkback(dev)
        elif bstate == State.CONNECTED:
            if dev.state == State.CONNECTED:
                return  # a resize would re-read sectors here
            if dev.state != State.INITIALISED:
                self.talk_to_blkback(dev)
            self.blkfront_connect(dev)
        elif bstate in (State.CLOSING, State.CLOSED):
            if dev.state in (State.CLOSING, State.CLOSED):
                return
            self.switch(dev, State.CLOSING)  # the disk is still open
            self.switch(dev, State.CLOSED)  # ... and now released: xenbus_frontend_closed

    def talk_to_blkback(self, dev: Device) -> None:
        g, fe = self.g, dev.nodename
        ring_ref = str(8 + int(dev.devid) % 1000)  # a grant reference and a port of "ours"
        port = str(10 + int(dev.devid) % 1000)

        def body(tx: int) -> None:
            g.write(f"{fe}/ring-ref", ring_ref, tx)
            g.write(f"{fe}/event-channel", port, tx)
            g.write(f"{fe}/protocol", PROTOCOL, tx)
            g.write(f"{fe}/feature-persistent", "1", tx)

        transact(g, body)
        self.switch(dev, State.INITIALISED)

    def blkfront_connect(self, dev: Device) -> None:
        g, be = self.g, dev.otherend
        try:
            disk = {
                "sectors": g.read(f"{be}/sectors").decode(),
                "info": g.read(f"{be}/info").decode(),
                "sector-size": g.read(f"{be}/sector-size").decode(),
            }
        except XsError as e:
            self.proc.error(self.domid, f"reading backend fields at {be}: {e.name}")
            return
        disk["physical-sector-size"] = read_opt(g, f"{be}/physical-sector-size", disk["sector-size"])
        for feature in ("feature-flush-cache", "feature-discard", "feature-persistent",
                        "feature-max-indirect-segments"):
            disk[feature] = read_opt(g, f"{be}/{feature}", "0")
        dev.disk = disk
        self.switch(dev, State.CONNECTED, disk=disk)


class Frontends:
    """The process: many domains, one select loop over their event channels."""

    def __init__(self, domids: list[int], verbose: bool, timeout: float) -> None:
        self.verbose = verbose
        self.errors = 0
        self.domains = [Domain(self, d, timeout) for d in domids]
        self.by_fd = {dom.g._ev.fileno(): dom for dom in self.domains}

    def say(self, **kw: object) -> None:
        print(json.dumps(kw), flush=True)

    def error(self, domid: int, what: str) -> None:
        self.errors += 1
        self.say(dom=domid, error=what)

    def unplugged(self) -> bool:
        return all(d.had_device and not d.devices for d in self.domains)

    def run(self, exit_when_unplugged: bool) -> None:
        for dom in self.domains:
            dom.start()
        fds = list(self.by_fd)
        while not (exit_when_unplugged and self.unplugged()):
            kicked, MuxGuest.kicked = MuxGuest.kicked, set()
            busy = bool(kicked) or any(d.pending() for d in self.domains)
            ready, _, _ = select.select(fds, [], [], 0 if busy else 1.0)
            # The event channel only says "look at your ring"; after a second of silence look at
            # every ring anyway (a kick lost to a full socket queue must not strand a domain).
            guests = {self.by_fd[fd].g for fd in ready} | kicked
            if not busy and not ready:
                guests = {d.g for d in self.domains}
            for g in guests:
                g.drain()
                g._poll()
            for dom in self.domains:
                if dom.pending():
                    dom.handle_events()

    def close(self) -> None:
        for dom in self.domains:
            dom.g.close()


def parse_domids(spec: str) -> list[int]:
    out: list[int] = []
    for tok in spec.split(","):
        lo, sep, hi = tok.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("domains", help='domids, e.g. "5" or "100-349,400"')
    ap.add_argument("--exit-when-unplugged", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="also report backend states seen")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fe = Frontends(parse_domids(a.domains), a.verbose, a.timeout)
    try:
        fe.run(a.exit_when_unplugged)
    finally:
        fe.close()
        fe.say(exit=True, errors=fe.errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
