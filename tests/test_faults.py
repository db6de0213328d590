"""Faults: clients and guests that die at the worst moment.

Socket clients killed mid-message and mid-transaction, guests destroyed with a half-written
request in their ring or a transaction open: the daemon keeps serving everyone else, nothing of
the dead client's unfinished work becomes visible, and CONTROL ``check`` finds the store consistent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from robustness import GUESTS, W_ERROR_OFFSET, assert_healthy, guest, hv, introduce, quota_usage, spawn

from xenstored.client import SyncClient
from xenstored.wire import HEADER, Op, encode


@pytest.fixture
def d0(daemon):
    with SyncClient(daemon.socket) as c:
        yield c


def _victim(sock: str, script: str) -> subprocess.Popen[bytes]:
    """A socket client in its own process, so it can be SIGKILLed like a crashing tool."""
    code = textwrap.dedent(
        f"""
        import socket, struct, sys, time
        from xenstored.wire import encode, HEADER, Op
        s = socket.socket(socket.AF_UNIX); s.connect({sock!r})
        def call(op, payload, tx=0):
            s.sendall(encode(op, 1, tx, payload)); return s.recv(65536)
        """
    ) + textwrap.dedent(script) + "\nprint('ready', flush=True)\ntime.sleep(60)\n"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return p


@pytest.mark.parametrize(
    "script",
    [
        "s.sendall(HEADER.pack(Op.WRITE, 1, 0, 100)[:7])",  # half a header
        "s.sendall(HEADER.pack(Op.WRITE, 1, 0, 100) + b'/tool/half\\0' + b'v' * 20)",  # half a payload
        # mid-transaction, with writes done and a commit half sent
        """
        tx = int(call(Op.TRANSACTION_START, b'\\0')[16:].rstrip(b'\\0'))
        for i in range(20):
            call(Op.WRITE, b'/tool/txnode%d\\0v' % i, tx)
        s.sendall(HEADER.pack(Op.TRANSACTION_END, 2, tx, 2) + b'T')
        """,
        # many watches and a pile of requests it never reads the replies of
        """
        for i in range(50):
            call(Op.WATCH, b'/tool\\0w%d\\0' % i)
        s.sendall(encode(Op.READ, 5, 0, b'/tool\\0') * 2000)
        """,
    ],
    ids=["half-header", "half-payload", "mid-transaction", "unread-replies"],
)
def test_socket_client_killed_mid_work(daemon, d0, script):
    """SIGKILL a socket client in the middle of a request or transaction."""
    d0.watch("/tool", "mine")
    d0.read_watch(2)
    p = _victim(daemon.socket, script)
    p.send_signal(signal.SIGKILL)
    p.wait()
    for _ in range(3):
        d0.write("/tool/after", "1")
    assert not d0.exists("/tool/half") and not d0.exists("/tool/txnode0")
    assert_healthy(daemon)


def test_guest_destroyed_with_half_written_request(daemon, d0):
    """A guest dies with a partial request sitting in its ring; a new domain with the same id
    starts clean (no leftover bytes are parsed as the start of its first request)."""
    introduce(d0, daemon, 5)
    with guest(daemon, 5) as g:
        g.write("x", "1")
        g.ring.write(HEADER.pack(Op.WRITE, 9, 0, 200) + b"data/partial\0abc")
        g.kick()
        time.sleep(0.1)
    hv(daemon, "destroy 5")
    assert not d0.exists("/local/domain/5")
    introduce(d0, daemon, 5)
    with guest(daemon, 5) as g:
        assert g.ring._words[W_ERROR_OFFSET // 4] == 0
        g.write("fresh", "yes")
        assert g.read("fresh") == b"yes"
        assert not g.exists("data")
        assert quota_usage(d0, 5)["nodes"] == 2
        assert_healthy(daemon, g)


def test_guest_process_killed_mid_transaction_then_destroyed(daemon, d0):
    """A guest kernel dies (process SIGKILLed) while running transactions; the toolstack then
    destroys the domain: none of its open transactions leak, its nodes go."""
    for domid in (5, 6):
        introduce(d0, daemon, domid)
    procs = [spawn(daemon, f"{GUESTS}/worker.py", str(d), "100000") for d in (5, 6)]
    time.sleep(0.8)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    hv(daemon, "destroy 5")
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    assert not d0.exists("/local/domain/5")
    assert d0.exists("/local/domain/6/data")
    with guest(daemon, 6) as g:
        g.reconnect()  # the dead kernel's half-finished exchange is reset
        assert_healthy(daemon, g)
    usage = quota_usage(d0, 6)
    assert usage["transactions"] == 0


def test_many_clients_come_and_go_abruptly(daemon, d0):
    """Dozens of connections opened, used and dropped without goodbye, in bursts."""
    import socket

    for burst in range(5):
        socks = []
        for i in range(40):
            s = socket.socket(socket.AF_UNIX)
            s.connect(daemon.socket)
            s.sendall(encode(Op.TRANSACTION_START, 1, 0, b"\0") + encode(Op.WATCH, 2, 0, b"/tool\0t\0"))
            socks.append(s)
        d0.write(f"/tool/burst{burst}", "")
        for s in socks:
            s.close()
    assert_healthy(daemon)
    assert os.path.exists(daemon.socket)


def test_a_failing_domain_state_lookup_costs_that_scan_not_the_daemon(caplog):
    """On real Xen a VIRQ_DOM_EXC once raised out of the hypervisor layer through the domain
    loop and ended the daemon: now each failing step is logged and retried, and the loop lives."""
    import trio
    from sansio import make_core

    from xenstored.domains import DomainManager
    from xenstored.hypervisor.base import DomainInfo, Hypervisor
    from xenstored.ringpump import RingPump
    from xenstored.server import serve_domains

    class Failing(Hypervisor):
        calls = 0

        def domain_info(self, domid: int) -> DomainInfo | None:
            Failing.calls += 1
            if Failing.calls < 4:
                raise OSError(13, "xc_domain_getinfolist: Permission denied")
            return DomainInfo(domid)

        def domains(self):
            return []

        def map_ring(self, domid, gfn):
            raise OSError("no")

        def unmap_ring(self, domid):
            pass

        def bind_interdomain(self, domid, port):
            return 1

        def unbind(self, port):
            pass

        def notify(self, port):
            pass

        def dom0_ring(self):
            return None

        async def run(self, on_port_kicked, on_dom_exc, *, task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            on_dom_exc()  # raises inside: must be contained
            on_port_kicked(99)
            await trio.sleep_forever()

    core = make_core(ring_scan_interval=0.01)
    mgr = DomainManager(core, Failing())
    core.domain(5).introduced = True  # a domain whose state the scan must look up

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(serve_domains, RingPump(mgr), mgr.hv)
            await trio.sleep(0.2)
            n.cancel_scope.cancel()

    trio.run(main)
    assert "the domain-state scan (VIRQ_DOM_EXC) failed" in caplog.text
    assert "works again" in caplog.text  # retried by the scanner until it succeeded
