"""The shared-memory xenstore ring (``struct xenstore_domain_interface``), sans-I/O.

A guest talks to the daemon through one 4 KiB page it shares with us::

    offset  size  field
         0  1024  req[]            requests, guest -> server
      1024  1024  rsp[]            replies and watch events, server -> guest
      2048     4  req_cons         advanced by the server
      2052     4  req_prod         advanced by the guest
      2056     4  rsp_cons         advanced by the guest
      2060     4  rsp_prod         advanced by the server
      2064     4  server_features  XENSTORE_SERVER_FEATURE_* bits, written by the server
      2068     4  connection       0 CONNECTED, 1 RECONNECT (guest asks for a reset)
      2072     4  error            0 none, 1 COMM, 2 RINGIDX, 3 PROTO (diagnostic, server writes)
      2076     4  evtchn_port      filled by Xen for dom0less guests (0 = unused)

Indexes are free-running u32 byte counters (byte ``n`` lives at ``n % 1024``); a ring is sane iff
``prod - cons <= 1024`` in u32 arithmetic, and nothing may assume they start at 0.

Why whole-word access: the other side is a different CPU (or process) reading the same memory
concurrently.  ``struct.pack_into`` stores byte by byte, so a peer could observe a torn index; a
``memoryview`` cast to ``'I'`` loads and stores each aligned word with one 4-byte access.  Ordering:
we load the indexes before touching data and store the new index after copying data.  CPython
executes these as plain loads/stores in program order, and on x86 (TSO) that is the ordering the
ring protocol needs; the interpreter's own locking provides the barriers elsewhere in practice.

How the daemon core drives a domain's ring (this module does no I/O and never blocks)::

    ring = Ring(hv.map_ring(domid, gfn))        # validate nothing yet: guests may be mid-reset
    port = hv.bind_interdomain(domid, remote_port)
    ring.features = wire.FEATURES_ALL           # C-4.21+ writes this on INTRODUCE
    ...
    # on a kick of `port` (and once at start-up):
    try:
        if ring.connection == RECONNECT:        # guest asked for a reset
            conn.reset(); ring.reset(); ring.connection = CONNECTED; hv.notify(port)
        data = ring.read()                      # all pending request bytes ("" if none)
        pending_out = pending_out[ring.write(pending_out):]  # flush what still fits
        if data or wrote: hv.notify(port)
    except RingError as e:                      # corrupt index: error field already set
        ignore the connection until the domain dies or is re-introduced
    ...
    ring.release(); hv.unmap_ring(domid)         # release views before unmapping

``write`` is partial: it takes what fits and returns the count, so the core keeps the rest queued
and retries when the guest kicks us after consuming replies.  ``read(limit)`` lets the core stop
consuming requests it could not yet answer (quota, rate limit), leaving them in the ring.
"""

from __future__ import annotations

PAGE_SIZE = 4096
RING_SIZE = 1024  # XENSTORE_RING_SIZE
_MASK = 0xFFFFFFFF

REQ_OFFSET = 0
RSP_OFFSET = 1024

# Word (u32) indexes into the page for each control field.
_W_REQ_CONS = 2048 // 4
_W_REQ_PROD = 2052 // 4
_W_RSP_CONS = 2056 // 4
_W_RSP_PROD = 2060 // 4
_W_FEATURES = 2064 // 4
_W_CONNECTION = 2068 // 4
_W_ERROR = 2072 // 4
_W_EVTCHN_PORT = 2076 // 4

# Byte offsets, for documentation, tests and the ABI check.
OFFSETS: dict[str, int] = {
    "req": 0,
    "rsp": 1024,
    "req_cons": 2048,
    "req_prod": 2052,
    "rsp_cons": 2056,
    "rsp_prod": 2060,
    "server_features": 2064,
    "connection": 2068,
    "error": 2072,
    "evtchn_port": 2076,
}

# connection field (XENSTORE_CONNECTED / XENSTORE_RECONNECT)
CONNECTED = 0
RECONNECT = 1

# error field (XENSTORE_ERROR_*)
ERROR_NONE = 0
ERROR_COMM = 1
ERROR_RINGIDX = 2
ERROR_PROTO = 3


class RingError(Exception):
    """The peer broke the ring protocol; ``code`` is the XENSTORE_ERROR_* value to report."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(f"ring error {code}" + (f": {detail}" if detail else ""))
        self.code = code
        self.detail = detail


class _RingBase:
    """Shared machinery; subclasses pick which half is input and which is output.

    The server consumes ``req`` and produces ``rsp``; a guest does the opposite.  Writing both
    directions with one implementation keeps the tests of one side meaningful for the other.
    """

    __slots__ = (
        "_in_cons",
        "_in_off",
        "_in_prod",
        "_mem",
        "_out_cons",
        "_out_off",
        "_out_prod",
        "_words",
    )

    _IN_OFF = 0
    _IN_CONS = 0
    _IN_PROD = 0
    _OUT_OFF = 0
    _OUT_CONS = 0
    _OUT_PROD = 0

    def __init__(self, buf: memoryview | bytearray | object) -> None:
        mem = memoryview(buf)  # type: ignore[arg-type]
        if mem.readonly:
            raise ValueError("ring page must be writable")
        if mem.format != "B":
            mem = mem.cast("B")
        if mem.nbytes < PAGE_SIZE:
            raise ValueError(f"ring page needs {PAGE_SIZE} bytes, got {mem.nbytes}")
        self._mem = mem[:PAGE_SIZE]
        self._words = self._mem.cast("I")
        if self._words.itemsize != 4:  # pragma: no cover - only on exotic platforms
            raise RuntimeError("native unsigned int is not 32 bits")
        cls = type(self)
        self._in_off = cls._IN_OFF
        self._in_cons = cls._IN_CONS
        self._in_prod = cls._IN_PROD
        self._out_off = cls._OUT_OFF
        self._out_cons = cls._OUT_CONS
        self._out_prod = cls._OUT_PROD

    # -- data path ---------------------------------------------------------------------------

    def read(self, limit: int | None = None) -> bytes:
        """Consume and return pending input bytes (at most ``limit``), b"" when there are none.

        Raises RingError(RINGIDX) and flags the page when the peer's indexes are inconsistent:
        copying garbage would desynchronise the framing silently instead.
        """
        data = self.peek(limit)
        if data:
            self.advance(len(data))
        return data

    def peek(self, limit: int | None = None) -> bytes:
        """Pending input bytes (at most ``limit``) without consuming them: the crash-only
        daemon consumes a request only once its effect and reply are journaled (:meth:`advance`
        then), so a request read by a process that died is read again by the next."""
        w = self._words
        cons = w[self._in_cons]
        avail = (w[self._in_prod] - cons) & _MASK
        if avail > RING_SIZE:
            self._fail(f"input prod {w[self._in_prod]} cons {cons}")
        if limit is not None and avail > limit:
            avail = max(limit, 0)
        if not avail:
            return b""
        mem = self._mem
        base = self._in_off
        off = cons & (RING_SIZE - 1)
        end = off + avail
        if end <= RING_SIZE:
            return mem[base + off : base + end].tobytes()
        return mem[base + off : base + RING_SIZE].tobytes() + mem[base : base + end - RING_SIZE].tobytes()

    def advance(self, n: int) -> None:
        """Consume ``n`` input bytes returned by :meth:`peek`."""
        w = self._words
        w[self._in_cons] = (w[self._in_cons] + n) & _MASK

    @property
    def in_cons(self) -> int:
        return self._words[self._in_cons]

    @in_cons.setter
    def in_cons(self, value: int) -> None:
        self._words[self._in_cons] = value & _MASK

    @property
    def out_prod(self) -> int:
        return self._words[self._out_prod]

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy as much of ``data`` as fits into the output half; return the number of bytes taken."""
        w = self._words
        cons = w[self._out_cons]
        prod = w[self._out_prod]
        used = (prod - cons) & _MASK
        if used > RING_SIZE:
            self._fail(f"output prod {prod} cons {cons}")
        n = RING_SIZE - used
        n = min(n, len(data))
        if not n:
            return 0
        mem = self._mem
        base = self._out_off
        off = prod & (RING_SIZE - 1)
        first = RING_SIZE - off
        if n <= first:
            mem[base + off : base + off + n] = data[:n]
        else:
            src = memoryview(data)
            mem[base + off : base + RING_SIZE] = src[:first]
            mem[base : base + n - first] = src[first:n]
        w[self._out_prod] = (prod + n) & _MASK
        return n

    @property
    def readable(self) -> int:
        """Input bytes waiting; raises RingError for corrupt indexes like ``read``."""
        w = self._words
        avail = (w[self._in_prod] - w[self._in_cons]) & _MASK
        if avail > RING_SIZE:
            self._fail("input indexes")
        return avail

    @property
    def has_input(self) -> bool:
        """Whether the input indexes differ: a cheap "anything to read?" that never raises (a
        corrupt index also answers True, and ``read`` then reports it)."""
        w = self._words
        return w[self._in_prod] != w[self._in_cons]

    @property
    def writable(self) -> int:
        """Free output space; raises RingError for corrupt indexes like ``write``."""
        w = self._words
        used = (w[self._out_prod] - w[self._out_cons]) & _MASK
        if used > RING_SIZE:
            self._fail("output indexes")
        return RING_SIZE - used

    @property
    def output_pending(self) -> int:
        """Output bytes the peer has not consumed yet (0 means it caught up with us)."""
        w = self._words
        return min((w[self._out_prod] - w[self._out_cons]) & _MASK, RING_SIZE)

    def _fail(self, detail: str) -> None:
        raise RingError(ERROR_RINGIDX, detail)

    # -- control fields ----------------------------------------------------------------------

    @property
    def features(self) -> int:
        return self._words[_W_FEATURES]

    @features.setter
    def features(self, value: int) -> None:
        self._words[_W_FEATURES] = value & _MASK

    @property
    def connection(self) -> int:
        return self._words[_W_CONNECTION]

    @connection.setter
    def connection(self, value: int) -> None:
        self._words[_W_CONNECTION] = value & _MASK

    @property
    def error(self) -> int:
        return self._words[_W_ERROR]

    def set_error(self, code: int) -> None:
        self._words[_W_ERROR] = code & _MASK

    @property
    def evtchn_port(self) -> int:
        return self._words[_W_EVTCHN_PORT]

    @evtchn_port.setter
    def evtchn_port(self, value: int) -> None:
        self._words[_W_EVTCHN_PORT] = value & _MASK

    def indexes(self) -> tuple[int, int, int, int]:
        """(req_cons, req_prod, rsp_cons, rsp_prod), for logs and state dumps."""
        w = self._words
        return w[_W_REQ_CONS], w[_W_REQ_PROD], w[_W_RSP_CONS], w[_W_RSP_PROD]

    def reset(self, fill: bool = False) -> None:
        """Set all four indexes to 0, as on INTRODUCE or a reconnection.

        ``fill`` also overwrites both data areas with 0xFF like oxenstored, so stale bytes never
        look like a valid header to a confused peer.  ``connection`` is left to the caller: only
        the server's reconnect handshake moves it back to CONNECTED.
        """
        if fill:
            self._mem[0 : 2 * RING_SIZE] = b"\xff" * (2 * RING_SIZE)
        w = self._words
        w[_W_REQ_CONS] = 0
        w[_W_REQ_PROD] = 0
        w[_W_RSP_CONS] = 0
        w[_W_RSP_PROD] = 0

    def release(self) -> None:
        """Drop our views of the page so the owner can munmap it (mmap refuses while views live)."""
        self._words.release()
        self._mem.release()


class Ring(_RingBase):
    """Server side: consumes ``req``, produces ``rsp``."""

    __slots__ = ()

    _IN_OFF = REQ_OFFSET
    _IN_CONS = _W_REQ_CONS
    _IN_PROD = _W_REQ_PROD
    _OUT_OFF = RSP_OFFSET
    _OUT_CONS = _W_RSP_CONS
    _OUT_PROD = _W_RSP_PROD

    def _fail(self, detail: str) -> None:
        # The server flags the page before giving up, as C xenstored does, so the guest (and a
        # human reading the page) sees why it was dropped.
        self._words[_W_ERROR] = ERROR_RINGIDX
        raise RingError(ERROR_RINGIDX, detail)


class GuestRing(_RingBase):
    """Guest side: produces ``req``, consumes ``rsp``; never touches the error field itself."""

    __slots__ = ()

    _IN_OFF = RSP_OFFSET
    _IN_CONS = _W_RSP_CONS
    _IN_PROD = _W_RSP_PROD
    _OUT_OFF = REQ_OFFSET
    _OUT_CONS = _W_REQ_CONS
    _OUT_PROD = _W_REQ_PROD
