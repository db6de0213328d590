"""dom0's own ring (upstream /proc/xen/xsd_kva) at start-up: what is already in it is answered.

On real Xen, a libxenstore client whose connect() to the daemon's socket is refused (the daemon
has bound the path but not yet listen()ed) falls back to /dev/xen/xenbus: dom0's kernel writes the
request into this page and kicks a port that nobody has bound yet.  C xenstored's dom0_init keeps
the page's indexes, so the request is answered once it runs; zeroing them (as INTRODUCE does for a
guest) dropped it and left xen-init-dom0 blocked for ever under QEMU (tests/xen/README.md).
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import time

from conftest import start_daemon, stop_daemon_process

from xenstored.client import SyncClient
from xenstored.ring import PAGE_SIZE, GuestRing
from xenstored.wire import Op, Parser, encode


def test_a_request_queued_in_dom0s_ring_before_the_daemon_starts_is_answered():
    rundir = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    fx = os.path.join(rundir, "fx")
    os.makedirs(fx)
    with open(os.path.join(fx, "dom0.ring"), "wb") as f:
        f.write(bytes(PAGE_SIZE))
    with open(os.path.join(fx, "dom0.ring"), "r+b") as f:
        page = mmap.mmap(f.fileno(), PAGE_SIZE)
    ring = GuestRing(memoryview(page))
    req = encode(Op.WRITE, 77, 0, b"/tool/early\0queued")
    assert ring.write(req) == len(req)
    daemon = start_daemon(rundir=rundir)
    try:
        parser, msgs = Parser(), []
        deadline = time.monotonic() + 10
        while not msgs and time.monotonic() < deadline:
            data = ring.read()
            if data:
                msgs = parser.feed(data)
            else:
                time.sleep(0.05)
        assert [(m.type, m.req_id, m.payload) for m in msgs] == [(Op.WRITE, 77, b"OK\0")]
        with SyncClient(daemon.socket) as c:
            assert c.read("/tool/early") == b"queued"
        assert daemon.proc.poll() is None
    finally:
        stop_daemon_process(daemon.proc)
        log = daemon.log()
        ring.release()
        page.close()
        shutil.rmtree(rundir, ignore_errors=True)
    assert "Traceback" not in log, log
