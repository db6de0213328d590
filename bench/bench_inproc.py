"""The daemon's own Python work per sequential request, in process: no socket, no trio.

    python -m bench.bench_inproc [--reps 3000] [--rounds 5] [--profile OP] [--no-journal]

What an edge does with one request from a privileged socket client, and nothing else:
``ops.answer(core, conn, frame)`` (or, for what it does not answer, ``ops.handle``), the journal flush a send waits for (``core.durable()``) and
taking the reply off the connection (what ``server.send_now`` hands to ``send``).  The daemon
state is built as the service builds it: a ``Core`` with the default configuration and an open
``Journal`` (sync policy ``none``, the default), in a temporary directory.

The requests are the ones Xen's ``test-xenstore`` times (paths relative to the client's home,
as it sends them: ``xenstore-test/<pid>/a``) plus MKDIR, GET_PERMS, SET_PERMS and a transaction
start/end.  Cases needing a fresh node (``rm node``, ``rm dir``, ``mkdir``) recreate it between
two timed requests, untimed.  Each figure is the median over ``--reps`` timed requests, and the
reported value the median of ``--rounds`` such medians (µs), with the median of the rounds'
means beside it; the machine is shared, so compare
figures of one run, or runs close in time.

``--profile OP`` runs that case under cProfile instead and prints the top of its profile.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import shutil
import statistics
import tempfile
from collections.abc import Callable
from time import perf_counter_ns

from xenstored import ops
from xenstored.config import Config
from xenstored.connection import Connection
from xenstored.core import Core
from xenstored.journal import Journal
from xenstored.wire import Op, encode

BASE = "xenstore-test/4148"  # test-xenstore's directory, relative to the client's home


def frame(op: int, *args: bytes, tx_id: int = 0, raw: bytes | None = None) -> bytes:
    payload = raw if raw is not None else b"".join(a + b"\0" for a in args)
    return encode(op, 1, tx_id, payload)


def write_frame(path: str, value: bytes, tx_id: int = 0) -> bytes:
    return frame(Op.WRITE, raw=path.encode() + b"\0" + value, tx_id=tx_id)


class Bench:
    def __init__(self, journal: bool) -> None:
        self.dir = tempfile.mkdtemp(prefix="xsinproc")
        self.core = Core(Config())
        self.journal: Journal | None = None
        if journal:
            self.journal = Journal(self.dir)
            self.journal.open(self.core)
            self.journal.snapshot_now()
        self.conn: Connection = self.core.new_connection()
        self.run(write_frame(BASE, b""))
        self.run(write_frame(f"{BASE}/a", b"a"))
        self.run(write_frame(f"{BASE}/big", b"a" * 2000))
        self.run(write_frame(f"{BASE}/d", b""))
        for c in "abcdefghij":
            self.run(write_frame(f"{BASE}/d/{c}", c.encode()))
        self._start_tx: Callable[[], None] = lambda: None
        self._end_open: Callable[[], None] = lambda: None
        self._cases = self.cases()

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, data: bytes) -> bytes:
        """One request as the socket edge serves it; returns the reply bytes."""
        reply = ops.answer(self.core, self.conn, data)
        if reply is None:
            ops.handle(self.core, self.conn, data)
        self.core.durable()
        return reply or self.conn.take_output()

    def tx_id(self, reply: bytes) -> int:
        return int(reply[16:-1])

    # Each case: (setup run untimed before every timed request, or None; the timed request).
    def cases(self) -> dict[str, tuple[Callable[[], object] | None, Callable[[], bytes]]]:
        run = self.run
        read1 = frame(Op.READ, f"{BASE}/a".encode())
        read2000 = frame(Op.READ, f"{BASE}/big".encode())
        write1 = write_frame(f"{BASE}/a", b"a")
        write2000 = write_frame(f"{BASE}/big", b"a" * 2000)
        create = write_frame(f"{BASE}/n", b"n")
        rm_n = frame(Op.RM, f"{BASE}/n".encode())
        rm_r = frame(Op.RM, f"{BASE}/r".encode())
        mk_r = write_frame(f"{BASE}/r", b"")
        mk_ra = write_frame(f"{BASE}/r/a", b"a")
        directory = frame(Op.DIRECTORY, f"{BASE}/d".encode())
        mkdir = frame(Op.MKDIR, f"{BASE}/m".encode())
        rm_m = frame(Op.RM, f"{BASE}/m".encode())
        get_perms = frame(Op.GET_PERMS, f"{BASE}/a".encode())
        set_perms = frame(Op.SET_PERMS, f"{BASE}/a".encode(), b"n0", b"r1")
        ta_start = frame(Op.TRANSACTION_START, b"")
        state = {"tx": 0}

        def start_tx() -> None:
            state["tx"] = self.tx_id(run(ta_start))

        self._start_tx = start_tx

        def started() -> bytes:
            reply = run(ta_start)
            state["tx"] = self.tx_id(reply)
            return reply

        def end_tx() -> bytes:
            return run(frame(Op.TRANSACTION_END, b"T", tx_id=state["tx"]))

        def read_in_tx() -> bytes:
            return run(frame(Op.READ, f"{BASE}/a".encode(), tx_id=state["tx"]))

        def end_open() -> None:
            if state["tx"] in self.conn.transactions:
                run(frame(Op.TRANSACTION_END, b"F", tx_id=state["tx"]))

        self._end_open = end_open

        def rm_dir_setup() -> None:
            run(mk_r)
            run(mk_ra)

        return {
            "read 1": (None, lambda: run(read1)),
            "read 2000": (None, lambda: run(read2000)),
            "write 1": (None, lambda: run(write1)),
            "write 2000": (None, lambda: run(write2000)),
            "write new": (lambda: run(rm_n), lambda: run(create)),
            "dir": (None, lambda: run(directory)),
            "rm node": (lambda: run(create), lambda: run(rm_n)),
            "rm dir": (rm_dir_setup, lambda: run(rm_r)),
            "rm missing": (None, lambda: run(rm_n)),
            "mkdir": (lambda: run(rm_m), lambda: run(mkdir)),
            "get_perms": (None, lambda: run(get_perms)),
            "set_perms": (None, lambda: run(set_perms)),
            "ta start": (end_open, started),
            "ta end empty": (start_tx, end_tx),
            "ta read": (None, read_in_tx),
        }

    def measure(self, name: str, reps: int) -> tuple[float, float]:
        """Median and mean µs of ``reps`` timed requests of one case (a cost paid once in a
        while, such as a page fault, shows in the mean); leaves no transaction open."""
        setup, timed = self._cases[name]
        if name == "ta read":
            self._start_tx()  # one open transaction, read over and over
        samples = []
        for _ in range(reps):
            if setup is not None:
                setup()
            t0 = perf_counter_ns()
            timed()
            samples.append(perf_counter_ns() - t0)
        if name in ("ta read", "ta start"):
            self._end_open()
        assert not self.conn.transactions, name
        return statistics.median(samples) / 1000, statistics.fmean(samples) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", action="append", help="case name (repeatable)")
    ap.add_argument("--profile", help="profile one case instead of timing")
    ap.add_argument("--no-journal", action="store_true")
    a = ap.parse_args()
    b = Bench(journal=not a.no_journal)
    try:
        names = a.only or list(b._cases)
        if a.profile:
            setup, timed = b._cases[a.profile]
            if a.profile == "ta read":
                b._start_tx()
            prof = cProfile.Profile()
            for _ in range(a.reps):
                if setup is not None:
                    setup()
                prof.enable()
                timed()
                prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return
        # Sanity: every timed request succeeds (an error reply would time the error path).
        for name in names:
            setup, timed = b._cases[name]
            if name == "ta read":
                b._start_tx()
            if setup is not None:
                setup()
            reply = timed()
            if reply[:4] == encode(Op.ERROR, 0, 0, b"")[:4]:
                raise SystemExit(f"{name}: the request failed: {reply[16:]!r}")
            b._end_open()
        gc.collect()
        results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for _ in range(a.rounds):
            for name in names:  # rounds interleave the cases: a noisy moment hits them all
                results[name].append(b.measure(name, a.reps))
        width = max(len(n) for n in names)
        print(f"{'case':<{width}}  median µs  (min..max of {a.rounds} round medians)  mean µs")
        for name in names:
            r = [m for m, _ in results[name]]
            mean = statistics.median(x for _, x in results[name])
            print(f"{name:<{width}}  {statistics.median(r):8.2f}  ({min(r):.2f}..{max(r):.2f}){mean:14.2f}")
    finally:
        b.close()


if __name__ == "__main__":
    main()
