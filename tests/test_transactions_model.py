"""Serializability of the MVCC transactions, checked against a plain dict model.

Random READ/WRITE/MKDIR/RM/DIRECTORY requests from several connections, inside interleaved
transactions and outside any, go to the real dispatcher.  The model checks three things:

* snapshot isolation: inside a transaction every reply equals what the same request gives on a
  private copy of the model taken at TRANSACTION_START plus the transaction's own requests;
* serializability: a transaction that commits, replayed on the model at its commit point, gives
  exactly the replies it got (so committed history equals a serial run in commit order, and no
  write is lost); afterwards the store equals the model;
* no spurious conflicts: EAGAIN only when something the transaction read (a node's content or
  existence, or a child list it listed) was changed by a commit since it started.  Read-only
  transactions always commit.
"""

from __future__ import annotations

import os

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sansio import Peer, XsErr, make_core

from xenstored import paths
from xenstored.wire import Op

PATHS = ["/a", "/a/b", "/a/c", "/a/b/d", "/e", "/e/f"]
VALUES = ["", "0", "1", "x"]
EXAMPLES = int(os.environ.get("XS_MODEL_EXAMPLES", "500"))


class Model:
    """The tree as a dict, plus per-path version counters that say what a commit changed."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {"/": "", "/tool": "", "/tool/xenstored": ""}
        self.vver: dict[str, int] = {}
        self.cver: dict[str, int] = {}
        self.mutations = 0

    def copy(self) -> Model:
        m = Model()
        m.nodes = dict(self.nodes)
        m.vver = dict(self.vver)
        m.cver = dict(self.cver)
        return m

    def _bump(self, table: dict[str, int], path: str) -> None:
        table[path] = table.get(path, 0) + 1
        self.mutations += 1

    def children(self, path: str) -> list[str]:
        return sorted(
            paths.basename(p) for p in self.nodes if p != "/" and paths.parent(p) == path
        )

    def _create(self, path: str, value: str) -> None:
        missing = []
        p = path
        while p not in self.nodes:
            missing.append(p)
            p = paths.parent(p)
        for q in reversed(missing):
            self.nodes[q] = value if q == path else ""
            self._bump(self.vver, q)
            self._bump(self.cver, paths.parent(q))

    def apply(self, op: str, path: str, value: str, reads: set | None = None) -> str:
        """Run one request; return its reply as text and add what it read to ``reads``."""
        reads = reads if reads is not None else set()
        exists = path in self.nodes
        reads.add(("v", path))
        if op == "read":
            return self.nodes[path] if exists else "ENOENT"
        if op == "ls":
            if not exists:
                return "ENOENT"
            reads.add(("c", path))
            return ",".join(self.children(path))
        if op in ("write", "mkdir"):
            if exists:
                if op == "write":
                    self.nodes[path] = value
                    self._bump(self.vver, path)
                return "OK"
            p = path
            while p not in self.nodes:
                p = paths.parent(p)
                reads.add(("v", p))
            self._create(path, value if op == "write" else "")
            return "OK"
        if op == "rm":
            if not exists:
                parent = paths.parent(path)
                reads.add(("v", parent))
                return "OK" if parent in self.nodes else "ENOENT"
            doomed = [p for p in self.nodes if paths.is_descendant_or_self(p, path)]
            for p in doomed:
                reads.add(("v", p))
                reads.add(("c", p))
            for p in doomed:
                del self.nodes[p]
                self._bump(self.vver, p)
                self._bump(self.cver, paths.parent(p))
            return "OK"
        raise AssertionError(op)


def run(peer: Peer, op: str, path: str, value: str, tx: int) -> str:
    try:
        if op == "read":
            return peer.read(path, tx).decode()
        if op == "ls":
            return ",".join(peer.ls(path, tx))
        if op == "write":
            peer.write(path, value, tx)
        elif op == "mkdir":
            peer.mkdir(path, tx)
        elif op == "rm":
            peer.rm(path, tx)
        return "OK"
    except XsErr as e:
        return e.name


class Txn:
    def __init__(self, peer_index: int, tx_id: int, model: Model) -> None:
        self.peer_index = peer_index
        self.tx_id = tx_id
        self.view = model.copy()
        self.start_vver = dict(model.vver)
        self.start_cver = dict(model.cver)
        self.ops: list[tuple[str, str, str, str]] = []
        self.reads: set = set()


class TransactionMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.core = make_core()
        self.peers = [Peer(self.core) for _ in range(3)]
        self.model = Model()
        self.txns: list[Txn] = []

    @precondition(lambda self: len(self.txns) < 4)
    @rule(who=st.integers(0, 2))
    def start(self, who: int) -> None:
        tx_id = self.peers[who].start()
        self.txns.append(Txn(who, tx_id, self.model))

    @rule(
        which=st.integers(0, 5),
        op=st.sampled_from(["read", "ls", "write", "mkdir", "rm"]),
        path=st.sampled_from(PATHS),
        value=st.sampled_from(VALUES),
    )
    def request(self, which: int, op: str, path: str, value: str) -> None:
        if which < 4 and which >= len(self.txns):
            self.start(which % 3)  # transactions open on first use: more of them, and busier
        if which < len(self.txns):
            t = self.txns[which]
            got = run(self.peers[t.peer_index], op, path, value, t.tx_id)
            want = t.view.apply(op, path, value, t.reads)
            assert got == want, f"in transaction: {op} {path} -> {got}, snapshot model says {want}"
            t.ops.append((op, path, value, got))
        else:
            got = run(self.peers[which % 3], op, path, value, 0)
            want = self.model.apply(op, path, value)
            assert got == want, f"{op} {path} -> {got}, model says {want}"

    @precondition(lambda self: self.txns)
    @rule(which=st.integers(0, 3), abort=st.integers(0, 3))
    def end(self, which: int, abort: int) -> None:
        commit = abort != 0
        t = self.txns.pop(which % len(self.txns))
        peer = self.peers[t.peer_index]
        if not commit:
            peer.end(t.tx_id, commit=False)
            return
        try:
            peer.end(t.tx_id)
        except XsErr as e:
            assert e.name == "EAGAIN", e.name
            event("EAGAIN")
            assert t.view.mutations, "a read-only transaction must never conflict"
            changed = [
                r
                for r in t.reads
                if (self.model.vver if r[0] == "v" else self.model.cver).get(r[1], 0)
                != (t.start_vver if r[0] == "v" else t.start_cver).get(r[1], 0)
            ]
            assert changed, f"EAGAIN although nothing it read changed: {t.ops}"
            return
        event("commit with writes" if t.view.mutations else "read-only commit")
        # Committed: replaying it now, serially, must give exactly what it saw.
        if t.view.mutations:
            for op, path, value, got in t.ops:
                want = self.model.apply(op, path, value)
                assert got == want, f"commit not serializable: {op} {path} saw {got}, serial run {want}"

    @invariant()
    def store_equals_model(self) -> None:
        store = self.core.store
        live = {p: store.get(p).value.decode() for p in store.walk()}  # type: ignore[union-attr]
        assert live == self.model.nodes

    @invariant()
    def old_versions_are_reclaimed(self) -> None:
        if not self.txns:
            assert self.core.store.open_snapshots == 0
            assert self.core.store.version_count() == len(self.model.nodes)

    def teardown(self) -> None:
        for t in self.txns:
            self.peers[t.peer_index].call(Op.TRANSACTION_END, b"F\0", t.tx_id)


TransactionMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=50, deadline=None
)
test_transactions_serializable = TransactionMachine.TestCase
