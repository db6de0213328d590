"""The write-ahead journal: every change is durable before anyone can see it.

Crash-only, as Candea and Fox put it: the daemon has one way to start, recovery, and a ``kill -9``
is as good a way to stop as any.  What makes that possible is this file:

* Every committed change (a node written or removed, a domain record, the global quotas and the
  special paths' permissions, a ring connection's watches and transaction ids, the output queued
  for a ring and how far its input was consumed) is appended here as a record.
* Records are buffered in memory and copied into the journal file, which is mapped
  (``mmap(MAP_SHARED)``, space reserved ahead with ``posix_fallocate``), once per batch of
  requests (group commit), **before** any reply of that batch leaves.  A copy into the page
  cache costs no system call and survives the process: a ``kill -9`` loses nothing the copy
  finished.  The copy happens the edges call :meth:`Journal.flush` before
  a socket send, before a ring's ``rsp_prod`` moves and before a ring's ``req_cons`` moves.  The
  sync policy then decides about ``msync``, which a power loss needs and a crash does not: ``always`` (each batch), ``batch`` (a worker
  every ``sync_interval`` seconds) or ``none``.
* A periodic snapshot (the same record format, every live record once) starts a new journal
  file; recovery reads the newest complete snapshot and replays the journals written since.
* Each record carries a CRC-32: a torn tail (the process died inside ``write``) is detected and
  dropped, never half-applied.

Ring output is journaled as a byte stream with positions: a record says "these bytes go to the
guest's response ring starting at rsp_prod = P".  The ring page outlives the daemon (it is the
guest's memory), so after a restart the page's ``rsp_prod`` says exactly which of those bytes
the guest already has: the rest is sent, nothing twice, nothing lost.  Input likewise: a request
is consumed from the ring (``req_cons`` advanced) only after its effect, its reply and the new
``req_cons`` are in the journal, so a request read by a process that died is read again, or its
journaled reply is delivered.

File names in the journal directory: ``snapshot.<n>`` and ``journal.<n>`` (decimal ``n``);
``journal.<n>`` holds what happened after ``snapshot.<n>`` was taken.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import mmap
import os
import queue
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .connection import Connection
from .core import Core, Domain
from .paths import ROOT, join
from .perms import Perm, Perms
from .store import Store
from .watches import Watch

log = logging.getLogger("xenstored.journal")

MAGIC = b"XSJOURNAL2\n"
# A file is MAGIC and frames; a frame is one group commit (or a slice of a snapshot): its length
# and CRC-32, then records.  A frame torn by a crash fails its CRC and is dropped whole, so a
# batch of requests is recovered entirely or not at all, never half.
_FRAME = struct.Struct("<II")  # body length, CRC-32 of the body
_REC = struct.Struct("<BI")  # kind, payload length
_NODE_REC = struct.Struct("<BIHIH")  # _REC and _NODE in one pack: the record written most
SNAPSHOT_FRAME = 1 << 16  # bytes of records per frame in a snapshot
_NODE = struct.Struct("<HIH")  # path length, value length, permission count
_NODE_SIZE = _NODE.size
_PERM = struct.Struct("<IB")  # domid, access | 0x80 when the entry is stale (XSA-322)
_RING = struct.Struct("<II")  # domid, stream position
_RING_REC = struct.Struct("<BIII")  # _REC and _RING in one pack: two of these per guest request

NODE = 1
REMOVED = 2
META = 3
RING_OUT = 4  # bytes appended to a ring's output at a position
RING_OUTQ = 5  # a ring's whole pending output from a position (replaces what came before)
RING_IN = 6  # how far a ring's input was consumed, and the partial request read so far

SYNC_POLICIES = ("always", "batch", "none")
DEFAULT_SYNC = "none"  # a crash needs no sync (the page cache keeps what was copied); a tmpfs has none
WINDOW = 1 << 20  # journal file space reserved and mapped at a time
_MASK = 0xFFFFFFFF
_FILE = re.compile(r"^(snapshot|journal)\.(\d+)$")
MADV_POPULATE_WRITE = 23  # linux/mman.h (Linux 5.14): fault a range in writable, as writes would


def _load_madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise through ctypes, which releases the GIL for the call (mmap.madvise holds
    it): None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_madvise = _load_madvise()


def _perm_bytes(perms: Perms) -> bytes:
    return b"".join(_PERM.pack(p.domid, p.access | (0x80 if p.ignore else 0)) for p in perms)


def _perms_from(data: bytes, off: int, count: int) -> Perms:
    out = []
    for _ in range(count):
        domid, acc = _PERM.unpack_from(data, off)
        off += _PERM.size
        out.append(Perm(domid, acc & 0x7F, bool(acc & 0x80)))
    return tuple(out)


def _record(kind: int, payload: bytes) -> bytes:
    return _REC.pack(kind, len(payload)) + payload


def node_record(path: str, value: bytes, perms: Perms) -> bytes:
    p = path.encode("ascii")
    pb = _perm_bytes(perms)
    return _NODE_REC.pack(NODE, _NODE.size + len(p) + len(value) + len(pb), len(p), len(value), len(perms)) + p + value + pb


def frame(body: bytes) -> bytes:
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def frames(records: Iterable[bytes]) -> Iterator[bytes]:
    """Records grouped into frames of about SNAPSHOT_FRAME bytes (a snapshot's file)."""
    chunk: list[bytes] = []
    size = 0
    for r in records:
        chunk.append(r)
        size += len(r)
        if size >= SNAPSHOT_FRAME:
            yield frame(b"".join(chunk))
            chunk, size = [], 0
    if chunk:
        yield frame(b"".join(chunk))


# json.dumps with separators builds an encoder per call: one, kept, writes the same text in
# half the time (a domain's introduction and release write several of these).
_META_JSON = json.JSONEncoder(separators=(",", ":"))


def meta_record(obj: dict[str, object]) -> bytes:
    return _record(META, _META_JSON.encode(obj).encode())


def ring_record(kind: int, domid: int, pos: int, data: bytes) -> bytes:
    return _RING_REC.pack(kind, _RING.size + len(data), domid, pos & _MASK) + data


# ----------------------------------------------------------------------------- recovered state
@dataclass
class Recovered:
    """Everything the journal knew, keyed as the daemon keys it (last record wins)."""

    nodes: dict[str, tuple[bytes, Perms]] = field(default_factory=dict)
    domains: dict[int, dict] = field(default_factory=dict)
    settings: dict | None = None
    # (domid, canonical path, token) -> (path as the guest gave it, depth)
    watches: dict[tuple[int, str, str], tuple[str, int | None]] = field(default_factory=dict)
    transactions: dict[int, dict] = field(default_factory=dict)
    ring_out: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    ring_in: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    perm_cache: dict[bytes, Perms] = field(default_factory=dict)
    records: int = 0
    torn_bytes: int = 0

    def apply(self, kind: int, payload: bytes) -> None:
        """One record other than a node (_replay decodes those inline)."""
        self.records += 1
        if kind == REMOVED:
            self.nodes.pop(payload.decode("ascii"), None)
        elif kind in (RING_OUT, RING_OUTQ, RING_IN):
            domid, pos = _RING.unpack_from(payload)
            data = payload[_RING.size :]
            if kind == RING_IN:
                self.ring_in[domid] = (pos, data)
            elif kind == RING_OUTQ:
                self.ring_out[domid] = [(pos, data)]
            else:
                self.ring_out.setdefault(domid, []).append((pos, data))
        elif kind == META:
            self._meta(json.loads(payload))

    def _meta(self, m: dict) -> None:
        t = m.get("t")
        if t == "dom":
            self.domains[m["d"]] = m
        elif t == "gone":
            d = m["d"]
            self.domains.pop(d, None)
            self.transactions.pop(d, None)
            self.ring_out.pop(d, None)
            self.ring_in.pop(d, None)
            for key in [k for k in self.watches if k[0] == d]:
                del self.watches[key]
        elif t == "settings":
            self.settings = m
        elif t == "w+":
            self.watches[(m["d"], m["c"], m["k"])] = (m["p"], m.get("depth"))
        elif t == "w-":
            self.watches.pop((m["d"], m["c"], m["k"]), None)
        elif t == "w0":
            for key in [k for k in self.watches if k[0] == m["d"]]:
                del self.watches[key]
        elif t == "tx":
            self.transactions[m["d"]] = m


def list_files(directory: str) -> tuple[int | None, list[tuple[int, str]]]:
    """The newest complete snapshot's number (None: none) and the journals to replay after it."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None, []
    snaps, journals = [], []
    for n in names:
        m = _FILE.match(n)
        if m:
            (snaps if m.group(1) == "snapshot" else journals).append(int(m.group(2)))
    base = max(snaps) if snaps else None
    todo = sorted(j for j in journals if base is None or j >= base)
    return base, [(j, os.path.join(directory, f"journal.{j}")) for j in todo]


def read_state(directory: str) -> Recovered | None:
    """What the journal directory holds, or None when it holds nothing (a fresh start)."""
    base, journals = list_files(directory)
    if base is None and not journals:
        return None
    rec = Recovered()
    files = ([os.path.join(directory, f"snapshot.{base}")] if base is not None else []) + [p for _, p in journals]
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            data = f.read()
        torn = _replay(data, rec)
        if torn and base is not None and i == 0:
            # A journal may end torn (its process died inside a write; every process starts a
            # file of its own), a snapshot never: it is renamed into place whole.
            raise JournalError(f"{path}: damaged after {len(data) - torn} bytes")
        rec.torn_bytes += torn
        rec.files.append(path)
    return rec


def _replay(data: bytes, rec: Recovered) -> int:
    """Apply every record of a file, frame by frame, with node records (nearly all of a
    snapshot) decoded inline and each distinct permission list decoded once, the others handed
    to ``rec.apply``.  Returns the bytes at the end that are no whole frame."""
    if not data.startswith(MAGIC):
        return len(data)
    nodes, perm_cache, apply = rec.nodes, rec.perm_cache, rec.apply
    frame_unpack, rec_unpack, node_unpack, crc32 = _FRAME.unpack_from, _REC.unpack_from, _NODE.unpack_from, zlib.crc32
    frame_size, rec_size, head = _FRAME.size, _REC.size, _NODE.size
    off, end, count = len(MAGIC), len(data), 0
    while off + frame_size <= end:
        length, crc = frame_unpack(data, off)
        body_start = off + frame_size
        body_end = body_start + length
        if not length or body_end > end or crc32(data[body_start:body_end]) != crc:
            break
        off = body_end
        pos = body_start
        while pos < body_end:
            kind, plen_total = rec_unpack(data, pos)
            start = pos + rec_size
            pos = start + plen_total
            if kind == NODE:
                plen, vlen, nperms = node_unpack(data, start)
                pstart = start + head
                vstart = pstart + plen
                permstart = vstart + vlen
                pb = data[permstart:pos]
                node_perms = perm_cache.get(pb)
                if node_perms is None:
                    node_perms = perm_cache[pb] = _perms_from(pb, 0, nperms)
                nodes[data[pstart:vstart].decode("ascii")] = (data[vstart:permstart], node_perms)
                count += 1
            else:
                apply(kind, data[start:pos])
    rec.records += count
    return 0 if not data[off:].strip(b"\0") else end - off


class JournalError(Exception):
    """The journal cannot be read back: recovery refuses rather than start with a wrong store."""


# ----------------------------------------------------------------------------- the writer
class _Job:
    """Work handed to the journal's worker thread, and what came of it."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None

    def wait(self) -> object:
        """The result once the worker is done (its exception raised here)."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class _Worker:
    """One long-lived thread for the journal's slow preparations (see Journal._window): fed
    through a queue, because starting a thread per window made the loop wait, on a busy
    machine for milliseconds, until the new thread ran."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], object]) -> _Job:
        job = _Job(fn)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="journal-windows", daemon=True)
            self._thread.start()
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.result = job.fn()
            except Exception as e:  # noqa: BLE001 - handed to whoever waits for the job
                job.error = e
            finally:
                job.done.set()

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None


def _address(m: mmap.mmap) -> int:
    view = (ctypes.c_char * len(m)).from_buffer(m)
    addr = ctypes.addressof(view)
    del view  # the buffer export: a mapping with one cannot be closed
    return addr


class Journal:
    """Appends records for one daemon; installed into the store (``Store.log``) and the daemon
    state (``Core.journal``), which call the hooks below as they change."""

    def __init__(self, directory: str, *, sync: str = DEFAULT_SYNC, sync_interval: float = 0.1) -> None:
        if sync not in SYNC_POLICIES:
            raise ValueError(f"journal sync policy must be one of {', '.join(SYNC_POLICIES)}")
        self.dir = directory
        self.sync = sync
        self.sync_interval = sync_interval
        self.seq = 0
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._worker = _Worker()
        self._prefaulting: dict[int, _Job] = {}  # id of a mapped window -> its prefault
        self._ahead: tuple[int, int, _Job] | None = None  # fd, offset: the next window, prepared
        self._off = self._base = 0  # file offset of the next byte; of the mapped window
        self._buf: list[bytes] = []
        self.dirty = False
        self._domains: dict[int, Domain] = {}
        self._transactions: dict[int, Connection] = {}
        self._settings = False
        self._out_pos: dict[int, int] = {}
        self._perm_cache: dict[Perms, bytes] = {}
        self.core: Core | None = None
        self.size = 0  # bytes in the current journal file
        self.replay_bytes = 0  # older journal files a recovery would replay besides it
        self.snapshot_size = 0
        self.failed: str | None = None  # why the last write failed: the next snapshot repairs it
        self._unsynced = False
        self._sync_lock = threading.Lock()
        self._sync_stop = threading.Event()
        self._syncer: threading.Thread | None = None

    # -- files ---------------------------------------------------------------------------------
    def open(self, core: Core, seq: int | None = None) -> None:
        """Start writing (after recovery, ``seq`` is the journal to continue) and hook in."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.core = core
        core.journal = self
        core.store.log = self
        if seq is None:
            base, journals = list_files(self.dir)
            seq = max([base or 0, *(j for j, _ in journals)]) + 1
        self._open_file(seq)
        if self.sync == "batch" and self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, name="journal-sync", daemon=True)
            self._syncer.start()

    def _open_file(self, seq: int) -> None:
        while os.path.exists(os.path.join(self.dir, f"journal.{seq}")):
            seq += 1  # every process writes files of its own: a tear stays at an end
        path = os.path.join(self.dir, f"journal.{seq}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            m = self._window(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        m[: len(MAGIC)] = MAGIC
        with self._sync_lock:
            old_fd, old_map = self._fd, self._map
            self._fd, self._map, self.seq = fd, m, seq
            self._base, self._off = 0, len(MAGIC)
            if old_map is not None:
                self._unmap(old_map)
            if old_fd >= 0:
                os.close(old_fd)
        self.size = len(MAGIC)

    def _window(self, fd: int, base: int) -> mmap.mmap:
        """Map the WINDOW bytes of the file at ``base``, reserved first (posix_fallocate: a full
        disk is an error here, never a SIGBUS on the copy), and have the worker thread prepare
        the window after it.  At most two windows are mapped at a time (the journal adds at
        most 2 x WINDOW to the daemon's resident memory).

        The worker reserves, maps and faults in (MADV_POPULATE_WRITE) each next window while
        the loop writes into the current one: the loop's copies then take no page fault (one
        per 4 KB, 1 to 4 us each on tmpfs and ext4, a third of a 2 KB WRITE's cost) and moving
        to the next window costs no reservation either (0.4 ms on ext4, once a MB); faulting
        256 pages in one call also costs less CPU than 256 faults."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == fd and ahead[1] == base:
            m: mmap.mmap = ahead[2].wait()  # type: ignore[assignment]
        else:
            if ahead is not None:
                self._drop(ahead[2])
            m = self._map_window(fd, base)
            if _madvise is not None:
                addr = _address(m)
                self._prefaulting[id(m)] = self._worker.submit(lambda: _madvise(addr, WINDOW, MADV_POPULATE_WRITE))
        nxt = base + WINDOW
        self._ahead = (fd, nxt, self._worker.submit(lambda: self._prepared(fd, nxt)))
        return m

    @staticmethod
    def _map_window(fd: int, base: int) -> mmap.mmap:
        os.posix_fallocate(fd, base, WINDOW)
        return mmap.mmap(fd, WINDOW, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)

    @classmethod
    def _prepared(cls, fd: int, base: int) -> mmap.mmap:
        """A window reserved, mapped and faulted in (in the worker thread)."""
        m = cls._map_window(fd, base)
        if _madvise is not None:
            _madvise(_address(m), WINDOW, MADV_POPULATE_WRITE)
        return m

    @staticmethod
    def _drop(job: _Job) -> None:
        """Forget a window prepared ahead (a new file, the end): once the worker is done with
        it, since it uses the file descriptor that the caller is about to close."""
        job.done.wait()
        if isinstance(job.result, mmap.mmap):
            job.result.close()

    def _unmap(self, m: mmap.mmap) -> None:
        """Close a window once its prefault is over (it works on the address, not the object:
        the range must not be unmapped, and maybe mapped anew, under it)."""
        job = self._prefaulting.pop(id(m), None)
        if job is not None:
            job.done.wait()
        m.close()

    def _copy(self, data: bytes) -> None:
        m = self._map
        assert m is not None
        rel = self._off - self._base
        n = len(data)
        if rel + n <= WINDOW:
            m[rel : rel + n] = data
            self._off += n
            return
        view = memoryview(data)
        while view:
            rel = self._off - self._base
            if rel == WINDOW:
                nxt = self._window(self._fd, self._base + WINDOW)
                self._unmap(m)
                self._map = m = nxt
                self._base += WINDOW
                rel = 0
            k = min(WINDOW - rel, len(view))
            m[rel : rel + k] = view[:k]
            self._off += k
            view = view[k:]

    def close(self) -> None:
        self.flush()
        self._sync_stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=2)
            self._syncer = None
        with self._sync_lock:
            if self._map is not None:
                self._unmap(self._map)
                self._map = None
            if self._ahead is not None:
                self._drop(self._ahead[2])
                self._ahead = None
            self._worker.stop()
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.fdatasync(self._fd)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _sync_loop(self) -> None:
        while not self._sync_stop.wait(self.sync_interval):
            if self._unsynced:
                self._unsynced = False
                with self._sync_lock, contextlib.suppress(OSError, ValueError):
                    if self._fd >= 0:
                        os.fdatasync(self._fd)  # writes back the mapped pages; releases the GIL

    # -- hooks: the store ------------------------------------------------------------------------
    def node(self, path: str, value: bytes, perms: Perms) -> None:
        # node_record, spelt out with the permission bytes cached: this runs for every write.
        pb = self._perm_cache.get(perms)
        if pb is None:
            if len(self._perm_cache) > 4096:
                self._perm_cache.clear()
            pb = self._perm_cache[perms] = _perm_bytes(perms)
        p = path.encode("ascii")
        n = len(value)
        # One join: ``+`` would copy the value twice more (a 2 KB value: 0.1 us each).
        self._buf.append(
            b"".join((_NODE_REC.pack(NODE, _NODE_SIZE + len(p) + n + len(pb), len(p), n, len(perms)), p, value, pb))
        )
        self.dirty = True

    def removed(self, path: str) -> None:
        self._buf.append(_record(REMOVED, path.encode("ascii")))
        self.dirty = True

    # -- hooks: the daemon state -----------------------------------------------------------------
    def domain_changed(self, dom: Domain) -> None:
        self._domains[dom.domid] = dom
        self.dirty = True

    def domain_gone(self, domid: int) -> None:
        self._domains.pop(domid, None)
        self._transactions.pop(domid, None)
        self._out_pos.pop(domid, None)
        self._buf.append(meta_record({"t": "gone", "d": domid}))
        self.dirty = True

    def settings_changed(self) -> None:
        self._settings = True
        self.dirty = True

    def watch_added(self, conn: Connection, w: Watch) -> None:
        self._buf.append(meta_record(watch_meta(conn.domid, w)))
        self.dirty = True

    def watch_removed(self, conn: Connection, w: Watch) -> None:
        self._buf.append(meta_record({"t": "w-", "d": conn.domid, "c": w.cpath, "k": w.token}))
        self.dirty = True

    def watches_cleared(self, conn: Connection) -> None:
        self._buf.append(meta_record({"t": "w0", "d": conn.domid}))
        self.dirty = True

    def transactions_changed(self, conn: Connection) -> None:
        self._transactions[conn.domid] = conn
        self.dirty = True

    def ring_attached(self, dom: Domain) -> None:
        """A ring connection exists (INTRODUCE, or a restore): journal its output as it is
        queued, and record where its ring stands now."""
        conn, ring = dom.conn, dom.ring
        if conn is None or ring is None:
            return
        domid = dom.domid
        conn.on_output = lambda data: self._ring_out(domid, data)
        conn.on_output_dropped = lambda: self.ring_state(dom)
        self.domain_changed(dom)
        self.transactions_changed(conn)
        self.ring_state(dom)

    def ring_state(self, dom: Domain) -> None:
        """The ring's whole pending output and input position (after a reset, an expiry of
        unread events, or an attach): replaces what the journal knew of it."""
        conn, ring = dom.conn, dom.ring
        if conn is None or ring is None:
            return
        pending = conn.peek_output()
        pos = ring.out_prod
        self._out_pos[dom.domid] = (pos + len(pending)) & _MASK
        self._buf.append(ring_record(RING_OUTQ, dom.domid, pos, pending))
        self._buf.append(ring_record(RING_IN, dom.domid, ring.in_cons, conn.parser.pending_bytes()))
        self.dirty = True

    def _ring_out(self, domid: int, data: bytes) -> None:
        pos = self._out_pos.get(domid, 0)
        self._out_pos[domid] = (pos + len(data)) & _MASK
        self._buf.append(ring_record(RING_OUT, domid, pos, data))
        self.dirty = True

    def ring_input(self, dom: Domain, cons: int, pending: bytes) -> None:
        self._buf.append(ring_record(RING_IN, dom.domid, cons, pending))
        self.dirty = True

    # -- writing ----------------------------------------------------------------------------------
    def _state_records(self) -> None:
        for dom in self._domains.values():
            self._buf.append(meta_record(domain_meta(dom)))
        self._domains.clear()
        for conn in self._transactions.values():
            self._buf.append(meta_record(transactions_meta(conn)))
        self._transactions.clear()
        if self._settings and self.core is not None:
            self._settings = False
            self._buf.append(meta_record(settings_meta(self.core)))

    def flush(self) -> None:
        """Make everything recorded so far durable (by the sync policy) before it is visible."""
        if not self.dirty:
            return
        self.dirty = False
        if self._domains or self._transactions or self._settings:
            self._state_records()
        buf = self._buf
        if not buf:
            return
        body = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        head = _FRAME.pack(len(body), zlib.crc32(body))
        if self.failed is not None or self._map is None:
            return  # the journal is behind: the next snapshot writes the whole state instead
        size = len(head) + len(body)
        try:
            rel = self._off - self._base
            if rel + size <= WINDOW:  # _copy(head + body), without its checks
                m = self._map
                if size <= 512:  # one copy into the map costs less than two for a small frame
                    m[rel : rel + size] = head + body
                else:  # a big frame: no copy of the body just to join it
                    m[rel : rel + len(head)] = head
                    m[rel + len(head) : rel + size] = body
                self._off += size
            else:
                self._copy(head + body)
            if self.sync == "always":
                os.fdatasync(self._fd)
            else:
                self._unsynced = True
        except OSError as e:
            self.failed = f"{e.strerror or e}"
            log.error(
                "journal: cannot write %s: %s; serving on, but changes are not crash-safe until a "
                "snapshot succeeds (free space or fix permissions there; retried every second)",
                self.dir,
                self.failed,
            )
            return
        self.size += size

    # -- snapshots --------------------------------------------------------------------------------
    def begin_snapshot(self) -> tuple[int, list[bytes]]:
        """Switch to a new journal file and return its number with the records of everything
        but the nodes, as they are at this instant (the caller adds the nodes of a store
        snapshot taken at the same instant, then :meth:`finish_snapshot`)."""
        assert self.core is not None
        self.flush()
        seq = self.seq + 1
        self._open_file(seq)
        core = self.core
        records = [meta_record(settings_meta(core))]
        for dom in core.domains.values():
            records.append(meta_record(domain_meta(dom)))
            conn = dom.conn
            if conn is None or conn.closed or dom.ring is None:
                continue
            records.append(meta_record(transactions_meta(conn)))
            records.extend(meta_record(watch_meta(dom.domid, w)) for w in core.watches.owned_by(conn))
            pending = conn.peek_output()
            pos = dom.ring.out_prod
            records.append(ring_record(RING_OUTQ, dom.domid, pos, pending))
            records.append(ring_record(RING_IN, dom.domid, dom.ring.in_cons, conn.parser.pending_bytes()))
        return seq, records

    def finish_snapshot(self, seq: int, records: Iterable[bytes]) -> None:
        """Write ``snapshot.<seq>`` (temporary file, fsync, rename) and drop what it replaces.
        Runs in a worker thread: nothing here touches the daemon state."""
        path = os.path.join(self.dir, f"snapshot.{seq}")
        tmp = path + ".tmp"
        size = 0
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            for chunk in frames(records):
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        for name in os.listdir(self.dir):
            m = _FILE.match(name)
            if m and int(m.group(2)) < seq:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, name))
        self.snapshot_size = size
        self.replay_bytes = 0
        if self.failed is not None:
            log.warning("journal: writing again to %s (snapshot %d)", self.dir, seq)
            self.failed = None

    def snapshot_now(self) -> None:
        """A whole snapshot, synchronously (at a clean stop, after a restore)."""
        assert self.core is not None
        seq, records = self.begin_snapshot()
        records.extend(node_records(self.core.store))
        self.finish_snapshot(seq, records)

    def wants_snapshot(self, max_bytes: int) -> bool:
        return self.failed is not None or self.replay_bytes + self.size > max(max_bytes, 2 * self.snapshot_size)


def node_records(store: Store, snap: int | None = None) -> Iterator[bytes]:
    """A record for every node, pre-order from '/'; with ``snap`` (an open store snapshot) the
    nodes as they were then, so the walk may be interleaved with requests that change them."""
    stack = [ROOT]
    while stack:
        path = stack.pop()
        node = store.get(path) if snap is None else store.get_at(path, snap)
        if node is None:
            continue
        yield node_record(path, node.value, node.perms)
        stack.extend(join(path, n) for n in reversed(store.child_names(path, snap)))


def watch_meta(domid: int, w: Watch) -> dict[str, object]:
    return {"t": "w+", "d": domid, "c": w.cpath, "p": w.path, "k": w.token, "depth": w.depth}


def domain_meta(dom: Domain) -> dict[str, object]:
    return {
        "t": "dom",
        "d": dom.domid,
        "intro": dom.introduced,
        "gfn": dom.gfn,
        "port": dom.port,
        "lport": dom.local_port,
        "feat": dom.features,
        "target": dom.target,
        "quotas": dict(dom.quotas.values),
        "sr": dom.shutdown_reported,
        "ign": dom.ignored,
    }


def transactions_meta(conn: Connection) -> dict[str, object]:
    return {
        "t": "tx",
        "d": conn.domid,
        "next": conn.next_tx_id,
        "open": sorted(set(conn.transactions) | conn.lost_transactions),
    }


def settings_meta(core: Core) -> dict[str, object]:
    return {
        "t": "settings",
        "quotas": dict(core.config.quotas.values),
        "special": {name: [[p.domid, p.access, p.ignore] for p in sp] for name, sp in core.special_perms.items()},
    }

