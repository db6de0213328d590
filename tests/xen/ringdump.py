"""Print a guest's xenstore ring as the shared page holds it, independently of the daemon.

dom0-init.sh runs this (with the host's interpreter, chrooted like the daemon) when a guest stops
answering dom0's commands, to decide from the log who holds the exchange up:

* ``req_prod != req_cons`` that stays so: the guest wrote a request the daemon does not consume
  (a daemon that ignores the guest or lost a kick and its periodic scan);
* ``rsp_prod != rsp_cons`` that stays so: the daemon wrote replies or events that the guest's
  kernel does not read (a notification lost on the way, or the guest's xenbus reader stuck);
* all four equal: the ring is idle; whatever waits is waiting elsewhere (the daemon's queue, which
  ``xenstore-control stats <domid>`` shows, or inside the guest: its xenwatch thread, a process).

The page is mapped read-only through /dev/xen/gntdev (grant reference 1, as the daemon maps it),
so looking cannot disturb the guest or the daemon.  Usage: ``ringdump.py <domid> [samples]``:
``samples`` looks (default 2), one second apart, so that a ring that moves is told from one that
is stuck.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import sys
import time

from xenstored.hypervisor import xen_abi as abi
from xenstored.ring import OFFSETS, RING_SIZE
from xenstored.wire import HEADER, HEADER_SIZE, op_name

FIELDS = ("req_cons", "req_prod", "rsp_cons", "rsp_prod", "server_features", "connection", "error")
TAIL = 160  # bytes shown before each producer index: the last messages, whatever was consumed


def map_ring(domid: int) -> mmap.mmap:
    fd = os.open(abi.GNTDEV_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        req = bytearray(abi.GNTDEV_MAP_GRANT_REF.pack(1, 0, 0, domid, abi.GNTTAB_RESERVED_XENSTORE))
        fcntl.ioctl(fd, abi.IOCTL_GNTDEV_MAP_GRANT_REF, req, True)
        index = abi.GNTDEV_MAP_GRANT_REF.unpack(req)[2]
        # PROT_READ only: gntdev then asks Xen for a read-only mapping of the grant.
        return mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ, offset=index)
    finally:
        os.close(fd)  # the mapping keeps the grant mapped until it is closed


def fields(page: bytes) -> dict[str, int]:
    return {f: struct.unpack_from("=I", page, OFFSETS[f])[0] for f in FIELDS}


def messages(area: bytes, cons: int, prod: int) -> list[str]:
    """The messages between cons and prod, decoded from their headers (a partial one noted)."""
    data = bytes(area[(cons + i) % RING_SIZE] for i in range((prod - cons) & 0xFFFFFFFF))
    out = []
    while data:
        if len(data) < HEADER_SIZE:
            out.append(f"partial header ({len(data)} bytes)")
            break
        type_, req_id, tx_id, length = HEADER.unpack_from(data)
        body = data[HEADER_SIZE : HEADER_SIZE + length]
        shown = body[:100].replace(b"\0", b" ").decode("latin-1")
        more = "" if len(body) == length else f" (only {len(body)} of {length} bytes yet)"
        out.append(f"{op_name(type_)} req_id={req_id} tx_id={tx_id} len={length}: {shown!r}{more}")
        data = data[HEADER_SIZE + length :]
    return out


def tail(area: bytes, prod: int) -> str:
    """The TAIL bytes written last before ``prod``, printable: the last requests or replies."""
    raw = bytes(area[(prod - TAIL + i) % RING_SIZE] for i in range(TAIL))
    return "".join(chr(b) if 32 <= b < 127 else "." for b in raw)


def report(domid: int, page: bytes, last: bool) -> list[str]:
    """One look at the page: its fields, what waits in each direction, and (``last``) the bytes
    written last in each half."""
    f = fields(page)
    req = page[OFFSETS["req"] : OFFSETS["req"] + RING_SIZE]
    rsp = page[OFFSETS["rsp"] : OFFSETS["rsp"] + RING_SIZE]
    waiting_req = (f["req_prod"] - f["req_cons"]) & 0xFFFFFFFF
    waiting_rsp = (f["rsp_prod"] - f["rsp_cons"]) & 0xFFFFFFFF
    lines = [
        f"dom{domid} ring at {time.strftime('%H:%M:%S')}: "
        + " ".join(f"{k}={v}" for k, v in f.items())
        + f"; requests unconsumed {waiting_req} bytes, replies/events unread {waiting_rsp} bytes"
    ]
    if waiting_req:
        found = messages(req, f["req_cons"], f["req_prod"]) if waiting_req <= RING_SIZE else ["corrupt indexes"]
        lines += [f"  request waiting for the daemon: {m}" for m in found]
    if waiting_rsp:
        found = messages(rsp, f["rsp_cons"], f["rsp_prod"]) if waiting_rsp <= RING_SIZE else ["corrupt indexes"]
        lines += [f"  reply/event waiting for the guest: {m}" for m in found]
    if last:
        lines.append(f"  last request bytes:  {tail(req, f['req_prod'])}")
        lines.append(f"  last response bytes: {tail(rsp, f['rsp_prod'])}")
    return lines


def dump(domid: int, samples: int) -> int:
    try:
        page = map_ring(domid)
    except OSError as e:
        print(f"dom{domid}: cannot map its xenstore ring (grant 1): {e}")
        return 1
    try:
        for n in range(samples):
            if n:
                time.sleep(1)
            print("\n".join(report(domid, page[:], n == samples - 1)), flush=True)
    finally:
        page.close()
    return 0


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or not all(a.isdigit() for a in argv):
        print("usage: ringdump.py <domid> [samples]", file=sys.stderr)
        return 2
    return dump(int(argv[0]), int(argv[1]) if len(argv) > 1 else 2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
