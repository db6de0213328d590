"""Ring transport: wrap-around, index validation, both sides over one shared page."""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

import pytest

from xenstored import wire
from xenstored.ring import (
    CONNECTED,
    ERROR_NONE,
    ERROR_RINGIDX,
    OFFSETS,
    PAGE_SIZE,
    RECONNECT,
    RING_SIZE,
    GuestRing,
    Ring,
    RingError,
)

MASK = 0xFFFFFFFF


def words(buf: bytearray) -> tuple[int, ...]:
    return struct.unpack_from("=8I", buf, 2048)


def set_word(buf: bytearray, off: int, value: int) -> None:
    struct.pack_into("=I", buf, off, value & MASK)


@pytest.fixture
def page() -> bytearray:
    return bytearray(PAGE_SIZE)


def test_layout_offsets(page: bytearray) -> None:
    r = Ring(page)
    r.features = 0xF
    r.connection = RECONNECT
    r.set_error(3)
    r.evtchn_port = 77
    assert struct.unpack_from("=IIII", page, 2064) == (0xF, 1, 3, 77)
    assert (r.features, r.connection, r.error, r.evtchn_port) == (0xF, RECONNECT, 3, 77)
    assert OFFSETS["evtchn_port"] == 2076 and OFFSETS["rsp"] == RING_SIZE


def test_rejects_small_or_readonly_buffers() -> None:
    with pytest.raises(ValueError):
        Ring(bytearray(100))
    with pytest.raises(ValueError):
        Ring(bytes(PAGE_SIZE))


def test_empty_read_and_full_write(page: bytearray) -> None:
    r = Ring(page)
    assert r.read() == b""
    assert r.readable == 0 and r.writable == RING_SIZE
    assert r.write(b"x" * 5000) == RING_SIZE
    assert r.write(b"more") == 0
    assert r.writable == 0 and r.output_pending == RING_SIZE


def test_has_input_never_raises(page: bytearray) -> None:
    r, g = Ring(page), GuestRing(page)
    assert not r.has_input
    g.write(b"abc")
    assert r.has_input and not g.has_input
    r.read()
    assert not r.has_input
    set_word(page, OFFSETS["req_prod"], 5000)  # corrupt: read raises, has_input just says yes
    assert r.has_input
    with pytest.raises(RingError):
        r.read()


@pytest.mark.parametrize("start", [0, 1, 511, 1000, 1023, 1024, 4095, MASK - 10, MASK])
def test_request_roundtrip_with_free_running_indexes(page: bytearray, start: int) -> None:
    for off in (2048, 2052):
        set_word(page, off, start)
    g, r = GuestRing(page), Ring(page)
    payload = bytes(range(256)) * 3
    assert g.write(payload) == len(payload)
    assert r.readable == len(payload)
    assert r.read() == payload
    assert words(page)[0] == (start + len(payload)) & MASK
    assert r.read() == b""


def test_wrap_at_every_offset(page: bytearray) -> None:
    """Every start offset and every length that crosses (or just touches) the 1 KiB boundary."""
    g, r = GuestRing(page), Ring(page)
    for off in range(RING_SIZE):
        for n in (1, RING_SIZE - off, RING_SIZE - off + 1, RING_SIZE):
            if n > RING_SIZE:
                continue
            page[:] = bytes(PAGE_SIZE)
            for idx in (2048, 2052, 2056, 2060):
                set_word(page, idx, off + 7 * RING_SIZE)
            data = os.urandom(n)
            assert g.write(data) == n
            assert r.read() == data
            assert r.write(data) == n
            assert g.read() == data
            assert r.indexes() == ((off + 7 * RING_SIZE + n) & MASK,) * 4


def test_data_lands_at_modulo_positions(page: bytearray) -> None:
    set_word(page, 2056, 1020)
    set_word(page, 2060, 1020)
    r = Ring(page)
    assert r.write(b"ABCDEFGH") == 8
    assert page[1024 + 1020 : 1024 + 1024] == b"ABCD"
    assert page[1024 : 1024 + 4] == b"EFGH"


def test_read_limit_leaves_rest_in_ring(page: bytearray) -> None:
    g, r = GuestRing(page), Ring(page)
    g.write(b"0123456789")
    assert r.read(4) == b"0123"
    assert r.readable == 6
    assert r.read(0) == b""
    assert r.read() == b"456789"


@pytest.mark.parametrize("prod_minus_cons", [RING_SIZE + 1, 5000, MASK, 1 << 31])
def test_corrupt_request_index_is_ringidx(page: bytearray, prod_minus_cons: int) -> None:
    set_word(page, 2048, 100)
    set_word(page, 2052, 100 + prod_minus_cons)
    r = Ring(page)
    with pytest.raises(RingError) as ei:
        r.read()
    assert ei.value.code == ERROR_RINGIDX
    assert r.error == ERROR_RINGIDX  # the server flags the page
    with pytest.raises(RingError):
        _ = r.readable
    assert words(page)[0] == 100  # nothing consumed


def test_corrupt_response_index_is_ringidx(page: bytearray) -> None:
    set_word(page, 2056, 0)
    set_word(page, 2060, RING_SIZE + 1)
    r = Ring(page)
    with pytest.raises(RingError) as ei:
        r.write(b"hello")
    assert ei.value.code == 2
    with pytest.raises(RingError):
        _ = r.writable


def test_exactly_full_is_valid(page: bytearray) -> None:
    set_word(page, 2048, MASK - 3)
    set_word(page, 2052, (MASK - 3 + RING_SIZE) & MASK)
    r = Ring(page)
    assert len(r.read()) == RING_SIZE
    assert r.error == ERROR_NONE


def test_guest_side_does_not_flag_error(page: bytearray) -> None:
    set_word(page, 2060, 5000)
    g = GuestRing(page)
    with pytest.raises(RingError):
        g.read()
    assert g.error == ERROR_NONE


def test_reset(page: bytearray) -> None:
    g, r = GuestRing(page), Ring(page)
    g.write(b"abc")
    r.write(b"defg")
    r.connection = RECONNECT
    r.reset(fill=True)
    assert r.indexes() == (0, 0, 0, 0)
    assert page[:2048] == b"\xff" * 2048
    assert r.connection == RECONNECT  # the handshake moves it, not reset()
    r.connection = CONNECTED
    r.reset()
    assert r.read() == b""


def test_large_messages_stream_through_in_chunks(page: bytearray) -> None:
    """A 4 KiB payload crosses the 1 KiB ring in several chunks and reassembles exactly."""
    g, r = GuestRing(page), Ring(page)
    parser = wire.Parser()
    msgs = [wire.encode(wire.Op.WRITE, i, 0, b"/p\0" + os.urandom(wire.PAYLOAD_MAX - 3)) for i in range(5)]
    stream = b"".join(msgs)
    got: list[wire.Message] = []
    sent = 0
    while sent < len(stream):
        sent += g.write(memoryview(stream)[sent : sent + 1500])
        got += parser.feed(r.read())
    assert [m.encode() for m in got] == msgs
    # and the other direction, with partial writes
    out = stream
    back = bytearray()
    while out:
        out = out[r.write(out) :]
        back += g.read()
    assert bytes(back) == stream


def test_shared_file_mapping_between_two_mappings(tmp_path: Path) -> None:
    """Guest and server mmap the same file separately, as the emulated hypervisor does."""
    path = tmp_path / "dom5.ring"
    with open(path, "wb") as f:
        f.truncate(PAGE_SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        m1 = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED)
        m2 = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    g, r = GuestRing(m1), Ring(memoryview(m2))
    req = wire.encode(wire.Op.READ, 1, 0, b"/local\0")
    assert g.write(req) == len(req)
    assert r.read() == req
    r.features = wire.FEATURES_ALL
    assert g.features == wire.FEATURES_ALL
    r.write(b"reply")
    assert g.read() == b"reply"
    g.release()
    r.release()
    m1.close()
    m2.close()  # release() really dropped every export


def test_speed_of_small_request(page: bytearray) -> None:
    """The per-request ring path must stay in the microsecond range."""
    g, r = GuestRing(page), Ring(page)
    req = wire.encode(wire.Op.READ, 1, 0, b"/local/domain/5/data\0")
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        g.write(req)
        r.read()
        r.write(req)
        g.read()
    per = (time.perf_counter() - t0) / n / 2
    assert per < 50e-6, per  # generous for slow CI; typically ~1 µs
