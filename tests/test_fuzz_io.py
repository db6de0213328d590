"""Fuzzing the byte-level edges in process: the wire parser, the dispatcher, and the ring pump.

Everything runs sans-I/O (a Core, a Ring over a bytearray, a fake hypervisor) so hypothesis can
try hundreds of inputs per second.  The properties are the robustness rules of the README:
nothing a client sends can crash the daemon or affect another client; a corrupt ring only gets its
own domain ignored; every well-framed request gets exactly one reply with its req_id.

``XS_FUZZ_LONG=1`` multiplies the example counts by 20.
"""

from __future__ import annotations

import contextlib
import logging
import os

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sansio import Peer, make_core

from xenstored.domains import DomainManager
from xenstored.hypervisor.base import DomainInfo, Hypervisor
from xenstored.ops import handle
from xenstored.ring import GuestRing, RingError
from xenstored.ringpump import PROMPT_HIT, PROMPT_MAX, PUMP_ROUNDS, RingPump
from xenstored.wire import ERRORS, HEADER, PAYLOAD_MAX, Op, Parser, ProtocolError, encode

SCALE = 20 if os.environ.get("XS_FUZZ_LONG") else 1


def fuzz(n: int):
    return settings(max_examples=n * SCALE, deadline=None, suppress_health_check=list(HealthCheck))


messages = st.lists(
    st.tuples(
        st.integers(0, 40),
        st.integers(0, 0xFFFFFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=300),
    ),
    max_size=8,
)


# ------------------------------------------------------------------ wire parser
@fuzz(300)
@given(msgs=messages, cuts=st.lists(st.integers(0, 5000), max_size=12))
def test_parser_reassembles_any_chunking(msgs, cuts):
    """Valid frames split at arbitrary points come out whole, in order, exactly once."""
    stream = b"".join(encode(*m) for m in msgs)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    p, out, last = Parser(), [], 0
    for c in [*points, len(stream)]:
        out += p.feed(stream[last:c])
        last = c
    assert [(m.type, m.req_id, m.tx_id, m.payload) for m in out] == msgs
    assert p.pending == 0


@fuzz(300)
@given(data=st.binary(max_size=2000), chunk=st.integers(1, 64))
def test_parser_on_arbitrary_bytes_only_raises_protocol_error(data, chunk):
    """Garbage yields messages or ProtocolError (oversized length), never another exception."""
    p = Parser()
    try:
        for i in range(0, len(data), chunk):
            for m in p.feed(data[i : i + chunk]):
                assert len(m.payload) <= PAYLOAD_MAX
    except ProtocolError:
        length = None
        for off in range(len(data) - 15):
            length = HEADER.unpack_from(data, off)[3]
            if length > PAYLOAD_MAX:
                break
        assert length is not None and length > PAYLOAD_MAX


# ------------------------------------------------------------------ dispatcher
@fuzz(300)
@given(msgs=messages, guest=st.booleans())
def test_dispatcher_answers_every_request_once(msgs, guest, caplog):
    """Any well-framed request, privileged or not: exactly one reply, same req_id, a known error
    name if any, no internal error, and the store stays consistent."""
    core = make_core()
    peer = Peer(core, 5 if guest else None, socket=not guest)
    d0 = Peer(core)
    d0.mkdir("/local/domain/5")
    d0.setperms("/local/domain/5", "n5")
    caplog.set_level(logging.ERROR)
    for i, (op, _rid, tx, payload) in enumerate(msgs):
        if op in (Op.WATCH_EVENT, Op.ERROR):
            continue
        handle(core, peer.conn, encode(op, 1000 + i, tx, payload))
        replies = [m for m in peer.drain() if m.type != Op.WATCH_EVENT]
        assert len(replies) == 1, (op, payload, replies)
        r = replies[0]
        assert r.req_id == 1000 + i
        if r.type == Op.ERROR:
            assert r.payload.rstrip(b"\0").decode() in ERRORS
        else:
            assert r.type == op
    assert "internal error" not in caplog.text, caplog.text
    assert d0.call(Op.CONTROL, b"check\0") == b"OK\0"
    assert "check:" not in caplog.text


# ------------------------------------------------------------------ ring transport
class FakeHypervisor(Hypervisor):
    """Just enough hypervisor for DomainManager: pages are bytearrays, kicks are counted."""

    emulated = True

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.alive: set[int] = set()
        self.kicks = 0
        self._next_port = 10

    def domain_info(self, domid: int) -> DomainInfo | None:
        return DomainInfo(domid) if domid in self.alive or domid == 0 else None

    def domains(self) -> list[DomainInfo]:
        return [DomainInfo(d) for d in sorted(self.alive | {0})]

    def map_ring(self, domid: int, gfn: int) -> memoryview:
        return memoryview(self.pages.setdefault(domid, bytearray(4096)))

    def unmap_ring(self, domid: int) -> None:
        pass

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        self._next_port += 1
        return self._next_port

    def unbind(self, local_port: int) -> None:
        pass

    def notify(self, local_port: int) -> None:
        self.kicks += 1

    def dom0_ring(self):
        return None

    async def run(self, on_port_kicked, on_dom_exc, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()


def ring_world():
    core = make_core()
    hv = FakeHypervisor()
    mgr = RingPump(DomainManager(core, hv))
    d0 = Peer(core)
    for domid in (5, 6):
        hv.alive.add(domid)
        d0.mkdir(f"/local/domain/{domid}")
        d0.setperms(f"/local/domain/{domid}", f"n{domid}")
        d0.call(Op.INTRODUCE, f"{domid}\0{domid}\0{1}\0".encode())
    return core, hv, mgr, d0


def guest_roundtrip(mgr, dom, gring: GuestRing, req_id: int) -> bool:
    """A well-behaved request from a guest; True if the reply came back."""
    req = encode(Op.WRITE, req_id, 0, b"alive\0yes")
    assert gring.write(req) == len(req)
    mgr.pump(dom)
    parser = Parser()
    for _ in range(4):
        for m in parser.feed(gring.read()):
            if m.req_id == req_id:
                return m.type == Op.WRITE
        mgr.pump(dom)
    return False


actions = st.lists(
    st.one_of(
        st.tuples(st.just("req"), st.integers(0, 30), st.binary(max_size=200)),  # framed request
        st.tuples(st.just("bytes"), st.binary(min_size=1, max_size=300)),  # raw request bytes
        st.tuples(st.just("poke"), st.integers(0, 4095), st.binary(min_size=1, max_size=8)),  # page
        st.tuples(st.just("index"), st.integers(512, 519), st.integers(0, 0xFFFFFFFF)),  # index word
        st.tuples(st.just("read"),),
        st.tuples(st.just("reconnect"),),
    ),
    max_size=25,
)


@fuzz(250)
@given(acts=actions)
def test_ring_survives_any_guest_behaviour(acts, caplog):
    """A guest doing anything to its page (indexes, data, reconnect) gets at most itself
    ignored; the pump never raises, the other guest and dom0 keep working, and the toolstack can
    revive the guest with a re-INTRODUCE."""
    caplog.set_level(logging.ERROR)
    core, hv, mgr, d0 = ring_world()
    dom5, dom6 = core.domains[5], core.domains[6]
    page = hv.pages[5]
    g5 = GuestRing(memoryview(page))
    words = memoryview(page).cast("I")
    for act in acts:
        kind = act[0]
        if kind in ("req", "bytes"):
            with contextlib.suppress(RingError):  # the guest's own library may refuse its mess
                g5.write(encode(act[1], 7, 0, act[2]) if kind == "req" else act[1])
        elif kind == "poke":
            off, data = act[1], act[2][: 4096 - act[1]]
            page[off : off + len(data)] = data
        elif kind == "index":
            words[act[1]] = act[2]
        elif kind == "reconnect":
            words[2068 // 4] = 1
        else:
            with contextlib.suppress(RingError):
                g5.read()
        mgr.pump(dom5)  # must never raise
        mgr.flush()
    assert guest_roundtrip(mgr, dom6, GuestRing(memoryview(hv.pages[6])), 99)
    d0.write("/tool/ok", "1")
    # The toolstack revives the guest: a reset ring that works again.
    d0.call(Op.INTRODUCE, b"5\x005\x001\x00")
    assert not dom5.ignored and words[2072 // 4] == 0
    page[2048:2064] = bytes(16)
    assert guest_roundtrip(mgr, dom5, GuestRing(memoryview(page)), 42)
    assert d0.call(Op.CONTROL, b"check\0") == b"OK\0"
    assert "internal error" not in caplog.text and "Traceback" not in caplog.text


@fuzz(150)
@given(
    reqs=st.lists(st.tuples(st.sampled_from([Op.READ, Op.WRITE, Op.DIRECTORY, Op.MKDIR]), st.binary(max_size=64)), max_size=30),
    chunk=st.integers(1, 97),
    read_every=st.integers(1, 5),
)
def test_ring_answers_every_request_whatever_the_chunking(reqs, chunk, read_every):
    """Valid requests trickled through the ring in odd-sized pieces, with replies read only now
    and then, all get their reply in order and nothing is lost or duplicated."""
    core, hv, mgr, _ = ring_world()
    dom = core.domains[5]
    g = GuestRing(memoryview(hv.pages[5]))
    stream = b"".join(encode(op, i + 1, 0, b"data/" + p.replace(b"\0", b"") + b"\0v") for i, (op, p) in enumerate(reqs))
    parser, got, pos, step = Parser(), [], 0, 0
    while pos < len(stream) or len(got) < len(reqs):
        if pos < len(stream):
            pos += g.write(stream[pos : pos + chunk])
        mgr.pump(dom)
        step += 1
        if step % read_every == 0 or pos >= len(stream):
            got += [m.req_id for m in parser.feed(g.read()) if m.type != Op.WATCH_EVENT]
            mgr.pump(dom)
        assert step < 100000
    assert got == list(range(1, len(reqs) + 1))
    assert not dom.ignored


def test_pump_answers_a_guest_that_replies_at_once_without_another_kick():
    """A guest that reads its reply and writes the next request as soon as it is notified (it ran
    on the daemon's CPU) gets that request answered in the same pump, up to PUMP_ROUNDS times;
    then the pump returns and the last request waits for the guest's kick.  Such a guest is
    recognised as prompt and no longer gets the early notification, which would only wake it
    before its reply is there."""
    core, hv, mgr, _ = ring_world()
    dom = core.domains[5]
    g = GuestRing(memoryview(hv.pages[5]))
    parser = Parser()
    answered: list[int] = []
    woken_for_nothing = [0]

    def guest_runs(port: int) -> None:
        FakeHypervisor.notify(hv, port)
        got = [m.req_id for m in parser.feed(g.read())]
        if not got:
            woken_for_nothing[0] += 1
        for rid in got:
            answered.append(rid)
            assert g.write(encode(Op.READ, rid + 1, 0, b"alive\0")) > 0

    hv.notify = guest_runs  # type: ignore[method-assign]
    hv.kicks = 0
    assert dom.prompt == 0
    g.write(encode(Op.READ, 1, 0, b"alive\0"))
    mgr.pump(dom)
    assert answered == list(range(1, PUMP_ROUNDS + 1))
    assert woken_for_nothing[0] == 1  # the early notification, before the first reply
    assert hv.kicks == PUMP_ROUNDS + 1
    assert dom.prompt == min((PUMP_ROUNDS - 1) * PROMPT_HIT, PROMPT_MAX)
    assert g.readable == 0 and g.indexes()[0] != g.indexes()[1]  # the last request still waits
    mgr.pump(dom)
    assert answered == list(range(1, 2 * PUMP_ROUNDS + 1))
    assert woken_for_nothing[0] == 1 and hv.kicks == 2 * PUMP_ROUNDS + 1


def test_early_notification_is_sent_before_the_request_is_read():
    """The pump's first act for a guest slow to wake: its CPU starts waking while the request is
    read and answered (every microsecond before the notification counts on 2 CPUs); the second
    notification follows the reply."""
    core, hv, mgr, _ = ring_world()
    dom = core.domains[5]
    g = GuestRing(memoryview(hv.pages[5]))
    seen: list[tuple[int, int]] = []

    def note(port: int) -> None:
        FakeHypervisor.notify(hv, port)
        seen.append((g.indexes()[0], g.readable))  # (req_cons, reply bytes waiting)

    hv.notify = note  # type: ignore[method-assign]
    assert dom.prompt == 0
    g.write(encode(Op.READ, 1, 0, b"alive\0"))
    mgr.pump(dom)
    assert len(seen) == 2
    assert seen[0] == (0, 0)
    assert seen[1][0] > 0 and seen[1][1] > 0
    seen.clear()
    mgr.pump(dom)  # nothing waiting: nobody notified
    assert seen == []


def test_pump_notifies_early_only_a_guest_that_is_slow_to_wake():
    """Pipelined requests, all answered.  A guest that never answers within the pump gets an
    early notification (requests waiting) besides the one for the replies; one known to
    answer at once gets only the latter, until it has been slow for a while."""
    core, hv, mgr, _ = ring_world()
    dom = core.domains[5]
    g = GuestRing(memoryview(hv.pages[5]))
    parser = Parser()

    def batch(first: int) -> list[int]:
        for i in range(first, first + 5):
            g.write(encode(Op.READ, i, 0, b"alive\0"))
        hv.kicks = 0
        mgr.pump(dom)
        return [m.req_id for m in parser.feed(g.read())]

    assert batch(1) == [1, 2, 3, 4, 5]
    assert hv.kicks == 2
    hv.kicks = 0
    mgr.pump(dom)  # a late kick: nothing to do, nobody notified
    assert hv.kicks == 0
    dom.prompt = 3
    for n in range(3):
        assert batch(10 * n + 10) == list(range(10 * n + 10, 10 * n + 15))
        assert hv.kicks == 1  # each look after the notification finds nothing: prompt goes down
    assert dom.prompt == 0
    assert batch(50) == [50, 51, 52, 53, 54]
    assert hv.kicks == 2
