"""ringdump.py's reading of a page (no Xen needed): a stuck guest is diagnosed from what it prints,
so it must name the right side.  The page is written by the daemon's own ring code, both sides."""

from __future__ import annotations

import sys
from pathlib import Path

from xenstored.ring import PAGE_SIZE, RING_SIZE, GuestRing, Ring
from xenstored.wire import HEADER, Op

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ringdump import report  # tests/xen is not a package: import it by path


def frame(op: Op, req_id: int, payload: bytes) -> bytes:
    return HEADER.pack(op, req_id, 0, len(payload)) + payload


def test_idle_ring_has_nothing_waiting() -> None:
    page = bytearray(PAGE_SIZE)
    guest, server = GuestRing(page), Ring(page)
    guest.write(frame(Op.READ, 7, b"data/cmd\0"))
    server.read()
    server.write(frame(Op.READ, 7, b"11:ping"))
    guest.read()
    lines = report(2, bytes(page), last=True)
    assert "requests unconsumed 0 bytes, replies/events unread 0 bytes" in lines[0]
    assert not any("waiting" in ln for ln in lines)
    # What went last is still readable: the request's path and the reply's value.
    assert "data/cmd" in lines[1] and "11:ping" in lines[2]


def test_unconsumed_request_is_the_daemons() -> None:
    page = bytearray(PAGE_SIZE)
    GuestRing(page).write(frame(Op.READ, 9, b"data/cmd\0"))
    lines = report(2, bytes(page), last=False)
    assert "requests unconsumed 25 bytes" in lines[0]
    assert lines[1] == "  request waiting for the daemon: READ req_id=9 tx_id=0 len=9: 'data/cmd '"


def test_unread_event_is_the_guests_and_wraps() -> None:
    page = bytearray(PAGE_SIZE)
    guest, server = GuestRing(page), Ring(page)
    # Move the indexes close to the end of the area so that the event wraps around it.
    filler = b"x" * (RING_SIZE - 10)
    server.write(filler)
    guest.read()
    event = frame(Op.WATCH_EVENT, 0, b"data/cmd\0FFFF888001F4D130\0")
    server.write(event)
    server.write(frame(Op.READ, 3, b"partial")[:20])  # a reply still being written
    lines = report(2, bytes(page), last=False)
    assert f"replies/events unread {len(event) + 20} bytes" in lines[0]
    assert lines[1] == (
        "  reply/event waiting for the guest: WATCH_EVENT req_id=0 tx_id=0 len=26: 'data/cmd FFFF888001F4D130 '"
    )
    assert lines[2] == "  reply/event waiting for the guest: READ req_id=3 tx_id=0 len=7: 'part' (only 4 of 7 bytes yet)"
