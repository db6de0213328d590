"""Raw-socket protocol conformance: framing, echo rules, ordering and hostile input.

These bypass the client library on purpose: the point is to send exactly the bytes a buggy or
hostile client might, and to observe the exact order of frames the daemon writes back.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import pytest

from xenstored.wire import HEADER, PAYLOAD_MAX, Message, Op, Parser

TIMEOUT = 5.0


class Raw:
    """A blocking raw connection that returns every frame, replies and events alike, in order."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.parser = Parser()
        self.frames: list[Message] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, op: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> None:
        self.sock.sendall(HEADER.pack(op, req_id, tx_id, len(payload)) + payload)

    def recv(self) -> Message:
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("daemon closed the connection")
            self.frames.extend(self.parser.feed(data))
        return self.frames.pop(0)

    def call(self, op: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> Message:
        self.send(op, payload, req_id, tx_id)
        return self.recv()

    def closed_by_peer(self) -> bool:
        """True once the daemon has closed this connection (EOF or reset), within TIMEOUT."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


@pytest.fixture
def raw(daemon):
    conns: list[Raw] = []

    def connect() -> Raw:
        c = Raw(daemon.socket)
        conns.append(c)
        return c

    yield connect
    for c in conns:
        c.close()


def err(name: str) -> bytes:
    return name.encode() + b"\0"


def test_reply_echoes_req_id_and_tx_id(raw) -> None:
    c = raw()
    r = c.call(Op.WRITE, b"/e\0v", req_id=0xDEADBEEF)
    assert (r.type, r.req_id, r.tx_id, r.payload) == (Op.WRITE, 0xDEADBEEF, 0, b"OK\0")
    r = c.call(Op.TRANSACTION_START, b"\0", req_id=7)
    assert (r.type, r.req_id, r.tx_id) == (Op.TRANSACTION_START, 7, 0)
    tx = int(r.payload.rstrip(b"\0"))
    r = c.call(Op.READ, b"/e\0", req_id=0xFFFFFFFF, tx_id=tx)
    assert (r.type, r.req_id, r.tx_id, r.payload) == (Op.READ, 0xFFFFFFFF, tx, b"v")
    r = c.call(Op.READ, b"/missing\0", req_id=42, tx_id=tx)  # errors echo too
    assert (r.type, r.req_id, r.tx_id, r.payload) == (Op.ERROR, 42, tx, err("ENOENT"))
    r = c.call(Op.TRANSACTION_END, b"T\0", req_id=8, tx_id=tx)
    assert (r.type, r.req_id, r.tx_id, r.payload) == (Op.TRANSACTION_END, 8, tx, b"OK\0")


def test_pipelined_replies_in_request_order(raw) -> None:
    c = raw()
    batch = bytearray()
    expected: list[tuple[int, int]] = []
    for i in range(300):
        kind = i % 3
        if kind == 0:
            batch += HEADER.pack(Op.WRITE, 1000 + i, 0, len(f"/p/{i}\0x")) + f"/p/{i}\0x".encode()
            expected.append((Op.WRITE, 1000 + i))
        elif kind == 1:
            batch += HEADER.pack(Op.READ, 1000 + i, 0, len(f"/p/{i - 1}\0")) + f"/p/{i - 1}\0".encode()
            expected.append((Op.READ, 1000 + i))
        else:
            batch += HEADER.pack(Op.READ, 1000 + i, 0, 6) + b"/nope\0"
            expected.append((Op.ERROR, 1000 + i))
    c.sock.sendall(bytes(batch))
    got = [c.recv() for _ in expected]
    assert [(m.type, m.req_id) for m in got] == expected
    assert all(m.payload == b"x" for m in got if m.type == Op.READ)


def test_byte_by_byte_message_is_reassembled(raw) -> None:
    c = raw()
    frame = HEADER.pack(Op.WRITE, 5, 0, 9) + b"/slow\0abc"
    for b in frame:
        c.sock.send(bytes([b]))
    r = c.recv()
    assert (r.type, r.req_id, r.payload) == (Op.WRITE, 5, b"OK\0")
    assert c.call(Op.READ, b"/slow\0").payload == b"abc"


def test_payload_of_exactly_4096_is_accepted(raw) -> None:
    c = raw()
    path = b"/max\0"
    value = b"v" * (PAYLOAD_MAX - len(path))
    r = c.call(Op.WRITE, path + value)
    assert r.payload == b"OK\0"
    assert c.call(Op.READ, path).payload == value


@pytest.mark.parametrize(
    "garbage",
    [
        HEADER.pack(Op.WRITE, 1, 0, PAYLOAD_MAX + 1) + b"x" * 100,
        HEADER.pack(Op.READ, 1, 0, 0xFFFFFFFF),
        b"\xff" * 64,
    ],
    ids=["len-4097", "len-max", "all-ff"],
)
def test_oversized_header_closes_only_that_connection(raw, garbage: bytes) -> None:
    good = raw()
    assert good.call(Op.WRITE, b"/keep\0safe").payload == b"OK\0"
    bad = raw()
    assert bad.call(Op.READ, b"/keep\0").payload == b"safe"  # a working connection first
    bad.sock.sendall(garbage)
    assert bad.closed_by_peer()
    assert good.call(Op.READ, b"/keep\0").payload == b"safe"
    assert good.call(Op.WRITE, b"/keep2\0more").payload == b"OK\0"
    fresh = raw()
    assert fresh.call(Op.READ, b"/keep\0").payload == b"safe"
    assert fresh.call(Op.DIRECTORY, b"/\0").payload == b"keep\0keep2\0tool\0"


@pytest.mark.parametrize(
    ("op", "payload"),
    [
        (Op.READ, b"/tool"),  # missing NUL
        (Op.READ, b""),  # no argument at all
        (Op.READ, b"/tool\0/tool\0"),  # two arguments
        (Op.WRITE, b"/novalue"),  # WRITE needs the path's NUL
        (Op.DIRECTORY, b"/tool"),
        (Op.GET_PERMS, b"/tool"),
        (Op.MKDIR, b"/x"),
        (Op.RM, b"/x"),
        (Op.SET_PERMS, b"/tool\0"),  # no permission entries
        (Op.WATCH, b"/tool\0"),  # no token
        (Op.TRANSACTION_END, b"X\0"),  # neither T nor F (tx id invalid anyway -> checked below)
    ],
)
# SPEC B§1.2 (C-4.22): exactly one trailing NUL for one-argument ops, else EINVAL.  C-4.17 answers
# some of these with ENOENT/ENOMEM instead (its onearg() returns NULL); we follow 4.22.
def test_malformed_arguments_are_einval(raw, op: int, payload: bytes) -> None:
    c = raw()
    r = c.call(op, payload, req_id=3)
    if op == Op.TRANSACTION_END:
        tx = int(c.call(Op.TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
        r = c.call(op, payload, req_id=3, tx_id=tx)
    assert (r.type, r.req_id, r.payload) == (Op.ERROR, 3, err("EINVAL"))
    assert c.call(Op.READ, b"/tool/xenstored\0").payload == b""  # connection still fine


@pytest.mark.parametrize("op", [20, 99, 15, 16, 27, 0xFFFF])
def test_unknown_op_is_enosys(raw, op: int) -> None:
    c = raw()
    r = c.call(op, b"/tool\0", req_id=11)
    assert (r.type, r.req_id, r.payload) == (Op.ERROR, 11, err("ENOSYS"))
    assert c.call(Op.READ, b"/tool/xenstored\0").payload == b""


def test_unknown_tx_id_is_enoent(raw) -> None:
    c = raw()
    r = c.call(Op.READ, b"/tool\0", tx_id=12345)
    assert (r.type, r.tx_id, r.payload) == (Op.ERROR, 12345, err("ENOENT"))
    r = c.call(Op.TRANSACTION_END, b"T\0", tx_id=0)
    assert r.payload == err("ENOENT")
    other = raw()  # transaction ids are per connection
    tx = int(other.call(Op.TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
    assert c.call(Op.READ, b"/tool\0", tx_id=tx).payload == err("ENOENT")


def test_transaction_start_inside_transaction_is_ebusy(raw) -> None:
    c = raw()
    tx = int(c.call(Op.TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
    r = c.call(Op.TRANSACTION_START, b"\0", tx_id=tx)
    assert (r.type, r.payload) == (Op.ERROR, err("EBUSY"))
    assert c.call(Op.TRANSACTION_END, b"F\0", tx_id=tx).payload == b"OK\0"
    assert c.call(Op.TRANSACTION_END, b"F\0", tx_id=tx).payload == err("ENOENT")


def test_reply_larger_than_4096_is_e2big(raw) -> None:
    c = raw()
    for i in range(30):
        name = f"{i:03d}" + "n" * 200
        assert c.call(Op.WRITE, f"/big/{name}\0".encode()).payload == b"OK\0"
    r = c.call(Op.DIRECTORY, b"/big\0", req_id=77)
    assert (r.type, r.req_id, r.payload) == (Op.ERROR, 77, err("E2BIG"))
    assert c.call(Op.READ, b"/tool/xenstored\0").payload == b""


def test_watch_ok_precedes_initial_event(raw) -> None:
    c = raw()
    c.send(Op.WATCH, b"/w\0tok\0", req_id=9)
    first, second = c.recv(), c.recv()
    assert (first.type, first.req_id, first.payload) == (Op.WATCH, 9, b"OK\0")
    assert (second.type, second.req_id, second.tx_id, second.payload) == (Op.WATCH_EVENT, 0, 0, b"/w\0tok\0")


def test_own_write_event_precedes_write_reply(raw) -> None:
    c = raw()
    c.call(Op.WATCH, b"/o\0t\0")
    assert c.recv().type == Op.WATCH_EVENT  # initial
    c.send(Op.WRITE, b"/o/x\0v", req_id=21)
    first, second = c.recv(), c.recv()
    assert (first.type, first.payload) == (Op.WATCH_EVENT, b"/o/x\0t\0")
    assert (second.type, second.req_id, second.payload) == (Op.WRITE, 21, b"OK\0")


def test_commit_events_precede_commit_reply(raw) -> None:
    c = raw()
    c.call(Op.WATCH, b"/tc\0t\0")
    assert c.recv().type == Op.WATCH_EVENT
    tx = int(c.call(Op.TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
    assert c.call(Op.WRITE, b"/tc/a\0v", tx_id=tx).payload == b"OK\0"  # no event before commit
    c.send(Op.TRANSACTION_END, b"T\0", req_id=5, tx_id=tx)
    first, second = c.recv(), c.recv()
    assert (first.type, first.payload) == (Op.WATCH_EVENT, b"/tc/a\0t\0")
    assert (second.type, second.req_id, second.payload) == (Op.TRANSACTION_END, 5, b"OK\0")


def test_other_connections_see_events_from_a_writer(raw) -> None:
    w, c = raw(), raw()
    c.call(Op.WATCH, b"/common\0s\0")
    assert c.recv().type == Op.WATCH_EVENT
    assert w.call(Op.WRITE, b"/common/k\0v").payload == b"OK\0"
    ev = c.recv()
    assert (ev.type, ev.payload) == (Op.WATCH_EVENT, b"/common/k\0s\0")


@pytest.mark.parametrize("cut", [5, HEADER.size, HEADER.size + 3])
def test_client_closing_mid_message_does_not_disturb_others(raw, cut: int) -> None:
    good = raw()
    assert good.call(Op.WRITE, b"/mid\0ok").payload == b"OK\0"
    bad = raw()
    frame = HEADER.pack(Op.WRITE, 1, 0, 20) + b"/mid\0overwritten!!!"
    bad.sock.sendall(frame[:cut])
    bad.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    bad.close()
    assert good.call(Op.READ, b"/mid\0").payload == b"ok"
    assert raw().call(Op.READ, b"/mid\0").payload == b"ok"


def test_killed_client_process_mid_message(daemon, raw) -> None:
    good = raw()
    assert good.call(Op.WRITE, b"/victim\0intact").payload == b"OK\0"
    script = (
        "import socket,struct,sys,time\n"
        "s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1])\n"
        "s.sendall(struct.pack('=IIII',11,1,0,100)+b'/victim\\0half')\n"
        "print('sent',flush=True);time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, daemon.socket], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"sent\n"
        proc.kill()
    finally:
        proc.wait()
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:  # the daemon notices the EOF asynchronously
        assert good.call(Op.READ, b"/victim\0").payload == b"intact"
        time.sleep(0.05)
    assert raw().call(Op.DIRECTORY, b"/\0").payload == b"tool\0victim\0"


def test_rm_missing_child_of_existing_parent_is_ok(raw) -> None:
    c = raw()
    assert c.call(Op.WRITE, b"/par\0").payload == b"OK\0"
    assert c.call(Op.RM, b"/par/none\0").payload == b"OK\0"


def test_rm_missing_parent_is_enoent(raw) -> None:
    c = raw()
    assert c.call(Op.RM, b"/nopar/none\0").payload == err("ENOENT")


def test_replies_a_client_leaves_unread_arrive_whole_and_in_order(raw) -> None:
    """One request at a time, its replies unread until the socket is full: each reply that
    cannot leave at once (or only in part) waits in the queue, and the ones after it queue
    behind it rather than overtaking it."""
    c = raw()
    value = bytes(range(65, 91)) * 150  # 3,900 bytes: 300 replies are far more than a socket buffer
    assert c.call(Op.WRITE, b"/unread\0" + value).payload == b"OK\0"
    for i in range(300):
        c.send(Op.READ, b"/unread\0", req_id=1000 + i)
        time.sleep(0.001)  # one request per recv on the daemon's side, as a sequential client
    for i in range(300):
        r = c.recv()
        assert (r.type, r.req_id, r.payload) == (Op.READ, 1000 + i, value)
    assert c.call(Op.READ, b"/unread\0", req_id=5).payload == value
