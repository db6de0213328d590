"""Model-based fuzzing of the RUNNING daemon: several real connections, one reference model.

Hypothesis drives two privileged socket clients (A, B, with transactions) and one unprivileged
guest (dom5, over its emulated ring) through node operations, permission changes, transactions and
a guest reboot (destroy + re-introduce), and checks every reply and every watch event against a
plain-dict model of the store:

* replies: values, listings, permissions, and the exact error name (EACCES vs ENOENT, §3.5);
* watch events: after each step every watcher connection gets a round-trip "barrier" request, so
  all events a step caused have arrived; their multiset must equal the model's prediction,
  including the XSA-115 visibility filter for the guest and relative paths for its relative watch;
* transactions: a commit that succeeds must replay identically at its commit point (serializable);
  an EAGAIN must be explained by a concurrent change to something the transaction looked at, and
  read-only transactions never fail (SPEC Part A).

CI runs 20 programs of 25 steps (~6 s); ``XS_FUZZ_LONG=1`` runs 400 of 60 steps, ``XS_FUZZ_EXAMPLES=N`` sets the count.
"""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
from conftest import start_daemon, stop_daemon_process
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from robustness import fx

from xenstored import guest as guestlib
from xenstored.client import SyncClient
from xenstored.wire import Op, XsError

LONG = bool(os.environ.get("XS_FUZZ_LONG"))
HOME = "/local/domain/5"
NAMES = ("a", "b", "c")
# A small universe of paths so that operations collide often.
TREE = ["/t/" + "/".join(p) for n in (1, 2, 3) for p in itertools.product(NAMES[:2], repeat=n)]
GUEST_TREE = [HOME + "/" + "/".join(p) for n in (1, 2) for p in itertools.product(NAMES, repeat=n)]
PATHS = TREE + GUEST_TREE + ["/t"]
PERM_CHOICES = (("n0",), ("n0", "r5"), ("n0", "b5"), ("r0",), ("n0", "w5"))

Perms = tuple[str, ...]


def parent(p: str) -> str:
    return p.rsplit("/", 1)[0] or "/"


def ancestors(p: str) -> list[str]:
    out = []
    while p != "/":
        p = parent(p)
        out.append(p)
    return out


def access(perms: Perms, domid: int) -> str:
    """Letters ("r", "w") ``domid`` has on a node: owner gets both, then its own entry, else the
    owner entry's letter ("others") — the upstream rule, written out independently."""
    if domid == 0:
        return "rw"
    letter = {"n": "", "r": "r", "w": "w", "b": "rw"}
    if int(perms[0][1:]) == domid:
        return "rw"
    for p in perms[1:]:
        if int(p[1:]) == domid:
            return letter[p[0]]
    return letter[perms[0][0]]


class Store:
    """The reference: path -> (value, perms), plus per-path versions for conflict reasoning."""

    def __init__(self, nodes: dict[str, tuple[bytes, Perms]]) -> None:
        self.nodes = dict(nodes)
        self.ver: dict[str, int] = {}
        self.cver: dict[str, int] = {}
        self.changes: dict[str, list] = {}  # path -> [exact, old perms, new perms], in order

    def copy(self) -> Store:
        s = Store(self.nodes)
        s.ver, s.cver = dict(self.ver), dict(self.cver)
        return s

    def children(self, p: str) -> list[str]:
        pre = p.rstrip("/") + "/"
        return sorted({q[len(pre) :] for q in self.nodes if q.startswith(pre) and "/" not in q[len(pre) :]})

    def _bump(self, p: str) -> None:
        self.ver[p] = self.ver.get(p, 0) + 1

    def _note(self, p: str, exact: bool, old: Perms | None, new: Perms | None) -> None:
        prev = self.changes.get(p)
        if prev is None:
            self.changes[p] = [exact, old, new]
        else:
            prev[0] = prev[0] and exact
            prev[2] = new

    def _disclose(self, p: str, domid: int, want: str) -> str:
        if domid == 0:
            return "ENOENT"
        q = p
        while q != "/":
            q = parent(q)
            if q in self.nodes:
                return "ENOENT" if any(c in access(self.nodes[q][1], domid) for c in want) else "EACCES"
        return "ENOENT"

    # Each op returns the reply (bytes / list) or raises XsError, exactly as the daemon should.
    def read(self, p: str, domid: int) -> bytes:
        if p not in self.nodes:
            raise XsError(self._disclose(p, domid, "r"))
        if "r" not in access(self.nodes[p][1], domid):
            raise XsError("EACCES")
        return self.nodes[p][0]

    def ls(self, p: str, domid: int) -> list[str]:
        self.read(p, domid)
        return self.children(p)

    def get_perms(self, p: str, domid: int) -> list[str]:
        self.read(p, domid)
        return list(self.nodes[p][1])

    def write(self, p: str, value: bytes, domid: int) -> None:
        if p in self.nodes:
            old = self.nodes[p][1]
            if "w" not in access(old, domid):
                raise XsError("EACCES")
            self.nodes[p] = (value, old)
            self._bump(p)
            self._note(p, False, old, old)
            return
        missing, q = [p], parent(p)
        while q not in self.nodes:
            missing.append(q)
            q = parent(q)
        anc = self.nodes[q][1]
        if "w" not in access(anc, domid):
            raise XsError("EACCES")
        new = anc if domid == 0 else (f"{anc[0][0]}{domid}",) + anc[1:]
        for m in reversed(missing):
            self.nodes[m] = (value if m == p else b"", new)
            self._bump(m)
            self.cver[parent(m)] = self.cver.get(parent(m), 0) + 1
        self._note(p, False, None, new)

    def mkdir(self, p: str, domid: int) -> None:
        if p in self.nodes:
            if "w" not in access(self.nodes[p][1], domid):
                raise XsError("EACCES")
            return
        self.write(p, b"", domid)

    def rm(self, p: str, domid: int) -> None:
        if p not in self.nodes:
            err = self._disclose(p, domid, "w")
            if err == "ENOENT" and parent(p) in self.nodes:
                return
            raise XsError(err)
        if "w" not in access(self.nodes[p][1], domid):
            raise XsError("EACCES")
        self._note(p, False, self.nodes[p][1], None)
        for q in sorted(self.subtree(p)):
            if q != p:
                self._note(q, True, self.nodes[q][1], None)
            del self.nodes[q]
            self._bump(q)
            self.cver[q] = self.cver.get(q, 0) + 1
        self.cver[parent(p)] = self.cver.get(parent(p), 0) + 1

    def set_perms(self, p: str, perms: Perms, domid: int) -> None:
        assert domid == 0
        if p not in self.nodes:
            raise XsError("ENOENT")
        old = self.nodes[p][1]
        self.nodes[p] = (self.nodes[p][0], perms)
        self._bump(p)
        self._note(p, False, old, perms)

    def subtree(self, p: str) -> list[str]:
        return [q for q in self.nodes if q == p or q.startswith(p + "/")]

    def take_changes(self) -> dict[str, list]:
        ch, self.changes = self.changes, {}
        return ch


def _call(fn, *args):
    """Run a model or daemon op, normalising the outcome to ("ok", result) or ("err", name)."""
    try:
        return ("ok", fn(*args))
    except XsError as e:
        return ("err", e.name)


class SockConn:
    """A privileged socket client; its watch events are kept until a barrier collects them."""

    def __init__(self, path: str) -> None:
        self.c = SyncClient(path)

    def take_events(self) -> list[tuple[str, str]]:
        self.c.request(Op.GET_DOMAIN_PATH, b"0\0")  # barrier: earlier events precede the reply
        out = list(self.c._events)
        self.c._events.clear()
        return out

    def close(self) -> None:
        self.c.close()


class DaemonMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.daemon = start_daemon()
        self.a = SockConn(self.daemon.socket)
        self.b = SockConn(self.daemon.socket)
        self.g: guestlib.Guest | None = None
        self.tx: dict[str, tuple[int, Store, Store, list, set, set, bool]] = {}
        # watches: (connection name, path, token, relative)
        self.watches: list[tuple[str, str, str, bool]] = []

    # ------------------------------------------------------------------ setup
    @initialize()
    def setup(self) -> None:
        c = self.a.c
        c.write("/t", "")
        self.boot_guest(first=True)
        self.model = Store(
            {
                "/": (b"", ("n0",)),
                "/tool": (b"", ("n0",)),
                "/tool/xenstored": (b"", ("n0",)),
                "/local": (b"", ("n0",)),
                "/local/domain": (b"", ("n0",)),
                HOME: (b"", ("n5",)),
                "/t": (b"", ("n0", "r5")),
            }
        )
        for conn, path, token in (("a", "/t", "A1"), ("a", HOME, "A2"), ("b", "/t/a", "B1")):
            getattr(self, conn).c.watch(path, token)
            self.watches.append((conn, path, token, False))
        self.guest_watches()
        self.collect()  # drop the initial events

    def boot_guest(self, first: bool = False) -> None:
        c = self.a.c
        if first:
            guestlib.control("create 5", fx(self.daemon))
        c.mkdir(HOME)
        c.set_perms(HOME, ["n5"])
        if first:
            c.set_perms("/t", ["n0", "r5"])
        c.request(Op.INTRODUCE, b"5\x001005\x001\x00")
        self.g = guestlib.Guest(5, fx(self.daemon), timeout=5.0)

    def guest_watches(self) -> None:
        assert self.g is not None
        self.g.watch("/t", "G1")
        self.g.watch("a", "G2")  # relative: events come relative to the home
        self.watches += [("g", "/t", "G1", False), ("g", HOME + "/a", "G2", True)]

    def teardown(self) -> None:
        try:
            if self.g is not None:
                self.g.close()
            self.a.close()
            self.b.close()
            assert self.daemon.proc.poll() is None, self.daemon.log()
            log = self.daemon.log()
            assert "Traceback" not in log and "internal error" not in log, log
        finally:
            stop_daemon_process(self.daemon.proc)
            shutil.rmtree(self.daemon.rundir, ignore_errors=True)

    # ------------------------------------------------------------------ events
    def expected_events(self, changes: dict[str, list], model: Store) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {"a": [], "b": [], "g": []}
        for path, (exact, old, new) in changes.items():
            for conn, wpath, token, relative in self.watches:
                hit = wpath == path if exact else (path == wpath or path.startswith(wpath.rstrip("/") + "/"))
                if not hit:
                    continue
                if conn == "g":
                    par = model.nodes.get(parent(path))
                    visible = (
                        (new is not None and "r" in access(new, 5))
                        or (old is not None and "r" in access(old, 5))
                        or (par is not None and "r" in access(par[1], 5))
                    )
                    if not visible:
                        continue
                epath = path[len(HOME) + 1 :] if relative else path
                out[conn].append((epath, token))
        return out

    def guest_events(self) -> list[tuple[str, str]]:
        assert self.g is not None
        self.g.request(Op.GET_DOMAIN_PATH, b"5\0")
        out = list(self.g.events)
        self.g.events.clear()
        return out

    def collect(self) -> dict[str, list[tuple[str, str]]]:
        return {"a": self.a.take_events(), "b": self.b.take_events(), "g": self.guest_events()}

    def check_events(self, changes: dict[str, list]) -> None:
        want = self.expected_events(changes, self.model)
        got = self.collect()
        for conn in ("a", "b", "g"):
            assert sorted(got[conn]) == sorted(want[conn]), (conn, got[conn], want[conn], changes)

    # ------------------------------------------------------------------ plain operations
    def run(self, who: str, op: str, path: str, *args) -> None:
        domid = 5 if who == "g" else 0
        model_out = _call(getattr(self.model, op), path, *args, domid)
        conn = self.g if who == "g" else getattr(self, who).c
        daemon_out = _call(getattr(conn, op), path, *args)
        if daemon_out[0] == "ok" and model_out[0] == "ok" and isinstance(model_out[1], list):
            daemon_out = ("ok", list(daemon_out[1]))
        if daemon_out == ("ok", None) or daemon_out == ("ok", b"OK\0"):
            daemon_out = ("ok", None)
        assert daemon_out == model_out, (who, op, path, args, daemon_out, model_out)
        self.check_events(self.model.take_changes())

    who = st.sampled_from(["a", "b", "g"])
    path = st.sampled_from(PATHS)
    value = st.sampled_from([b"", b"x", b"yy", b"\x00\xffbin"])

    @rule(who=who, path=path, value=value)
    def write(self, who: str, path: str, value: bytes) -> None:
        self.run(who, "write", path, value)

    @rule(who=who, path=path)
    def mkdir(self, who: str, path: str) -> None:
        self.run(who, "mkdir", path)

    @rule(who=who, path=path)
    def rm(self, who: str, path: str) -> None:
        self.run(who, "rm", path)

    @rule(who=who, path=path)
    def read(self, who: str, path: str) -> None:
        self.run(who, "read", path)

    @rule(who=who, path=path)
    def ls(self, who: str, path: str) -> None:
        self.run(who, "ls", path)

    @rule(who=who, path=path)
    def get_perms(self, who: str, path: str) -> None:
        self.run(who, "get_perms", path)

    @rule(who=st.sampled_from(["a", "b"]), path=st.sampled_from(TREE + ["/t"]), perms=st.sampled_from(PERM_CHOICES))
    def set_perms(self, who: str, path: str, perms: Perms) -> None:
        self.run(who, "set_perms", path, perms)

    # ------------------------------------------------------------------ transactions (A and B)
    @precondition(lambda self: len(self.tx) < 2)
    @rule(who=st.sampled_from(["a", "b"]))
    def tx_start(self, who: str) -> None:
        if who in self.tx:
            return
        tx_id = getattr(self, who).c.transaction_start()
        # (id, snapshot model, tx view, op log, looked-at paths, listed paths, wrote)
        self.tx[who] = (tx_id, self.model.copy(), self.model.copy(), [], set(), set(), False)

    @precondition(lambda self: bool(self.tx))
    @rule(data=st.data(), op=st.sampled_from(["write", "mkdir", "rm", "read", "ls"]), path=path, value=value)
    def tx_op(self, data, op: str, path: str, value: bytes) -> None:
        who = data.draw(st.sampled_from(sorted(self.tx)))
        tx_id, snap, view, log, looked, listed, wrote = self.tx[who]
        args = (value,) if op == "write" else ()
        before, before_ver = dict(view.nodes), dict(view.ver)
        model_out = _call(getattr(view, op), path, *args, 0)
        view.take_changes()
        c = getattr(self, who).c
        daemon_out = _call(getattr(c, op), path, *args, tx_id)
        if daemon_out[0] == "ok" and isinstance(model_out[1], list):
            daemon_out = ("ok", list(daemon_out[1]))
        if daemon_out == ("ok", b"OK\0"):
            daemon_out = ("ok", None)
        assert daemon_out == model_out, ("tx", who, op, path, daemon_out, model_out)
        looked |= {path, *ancestors(path)}
        if op == "ls":
            listed.add(path)
        if op == "rm":
            sub = [q for q in before if q == path or q.startswith(path + "/")]
            looked |= set(sub)
            listed |= set(sub)
        log.append((op, path, args, model_out))
        self.tx[who] = (tx_id, snap, view, log, looked, listed, wrote or before_ver != view.ver)
        self.check_events({})  # nothing fires before the commit

    @precondition(lambda self: bool(self.tx))
    @rule(data=st.data(), commit=st.booleans())
    def tx_end(self, data, commit: bool) -> None:
        who = data.draw(st.sampled_from(sorted(self.tx)))
        tx_id, snap, _view, log, looked, listed, wrote = self.tx.pop(who)
        out = _call(getattr(self, who).c.transaction_end, tx_id, commit)
        if not commit:
            assert out[0] == "ok", out
            self.check_events({})
            return
        if out == ("err", "EAGAIN"):
            assert wrote, "a read-only transaction failed"
            changed = [p for p in looked if snap.ver.get(p, 0) != self.model.ver.get(p, 0)]
            changed += [p for p in listed if snap.cver.get(p, 0) != self.model.cver.get(p, 0)]
            assert changed, f"spurious EAGAIN: nothing looked at changed ({log})"
            self.check_events({})
            return
        assert out[0] == "ok", out
        if not wrote:
            # A read-only transaction serialises at its snapshot (SPEC Part A), not at its
            # commit: replaying it there gives exactly the answers it got, and it fires nothing.
            at_snapshot = snap.copy()
            for op, path, args, result in log:
                assert _call(getattr(at_snapshot, op), path, *args, 0) == result, ("not serializable", log)
            self.check_events({})
            return
        # Serializable: replaying the transaction now gives exactly the answers it got.
        for op, path, args, result in log:
            assert _call(getattr(self.model, op), path, *args, 0) == result, ("not serializable", log)
        self.check_events(self.model.take_changes())

    # ------------------------------------------------------------------ domain lifecycle
    @rule()
    def reboot_guest(self) -> None:
        """The guest dies and comes back: its nodes go (events fire), entries naming it vanish."""
        assert self.g is not None
        self.g.close()
        self.g = None
        guestlib.control("destroy 5", fx(self.daemon))
        m = self.model
        gone = sorted(p for p, (_, perms) in m.nodes.items() if int(perms[0][1:]) == 5)
        for p in gone:
            if p in m.nodes:
                m.rm(p, 0)
        for p, (v, perms) in list(m.nodes.items()):
            kept = (perms[0],) + tuple(x for x in perms[1:] if int(x[1:]) != 5)
            m.nodes[p] = (v, kept)
            if kept != perms:
                m._bump(p)
        self.watches = [w for w in self.watches if w[0] != "g"]
        changes = m.take_changes()
        want = self.expected_events(changes, m)
        got = {"a": self.a.take_events(), "b": self.b.take_events()}
        for conn in ("a", "b"):
            assert sorted(got[conn]) == sorted(want[conn]), (conn, got[conn], want[conn])
        guestlib.control("create 5", fx(self.daemon))
        self.boot_guest()
        m.write(HOME, b"", 0)
        m.set_perms(HOME, ("n5",), 0)
        self.guest_watches()
        m.take_changes()
        self.collect()  # the toolstack's own events and the initial watch events

    @invariant()
    def daemon_alive(self) -> None:
        assert self.daemon.proc.poll() is None, self.daemon.log()


DaemonMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("XS_FUZZ_EXAMPLES") or (400 if LONG else 20)),
    stateful_step_count=60 if LONG else 25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestDaemonModel = DaemonMachine.TestCase

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
