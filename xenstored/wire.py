"""The XenStore wire protocol: ``xsd_sockmsg`` framing, operation codes and error names.

Sans-I/O: bytes in, :class:`Message` objects out, and back.  The same framing runs over the Unix
socket and the shared ring page, both of which are plain byte streams that may split a message
anywhere, so :class:`Parser` accepts any chunking.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("=IIII")  # type, req_id, tx_id, len; host byte order like the C struct
HEADER_SIZE = HEADER.size
PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX, for requests and replies alike

# Special domain ids from xen.h.
DOMID_SELF = 0x7FF0
DOMID_INVALID = 0x7FF4
DOMID_ANY = 0x7FF5


class Op(enum.IntEnum):
    """Operation codes (enum xsd_sockmsg_type)."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESTRICT = 20
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26


def op_name(op: int) -> str:
    """Name of an op code for logs; unknown codes print as numbers rather than failing."""
    try:
        return Op(op).name
    except ValueError:
        return f"OP{op}"


# The only error names a client understands (xsd_errors[] order in xs_wire.h).
ERRORS: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)
_ERRORS = frozenset(ERRORS)

# Server features advertised in the ring page (xs_wire.h XENSTORE_SERVER_FEATURE_*).
FEATURE_RECONNECTION = 1
FEATURE_ERROR = 2
FEATURE_WATCHDEPTH = 4
FEATURE_DOMID_ANY = 8
FEATURES_ALL = FEATURE_RECONNECTION | FEATURE_ERROR | FEATURE_WATCHDEPTH | FEATURE_DOMID_ANY


class XsError(Exception):
    """A request failed with one of the protocol's error names; becomes an XS_ERROR reply."""

    def __init__(self, name: str, detail: str = "") -> None:
        if name not in _ERRORS:
            raise ValueError(f"not a XenStore error name: {name}")
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail


class ProtocolError(Exception):
    """The byte stream cannot be framed any more (len > 4096); the connection must be dropped."""


@dataclass(slots=True)
class Message:
    """One framed message.  Treated as immutable; not declared frozen because a frozen
    dataclass's __init__ sets each field through object.__setattr__, a measurable cost on
    every request."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload


def encode(type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """Frame one message; the caller enforces PAYLOAD_MAX where it matters (replies)."""
    return HEADER.pack(type, req_id, tx_id, len(payload)) + payload


def error_payload(name: str) -> bytes:
    return name.encode("ascii") + b"\0"


class Parser:
    """Incremental framer: feed any chunks, get whole messages.

    The buffer never holds more than one header plus one maximal payload beyond what ``feed`` was
    just given, because complete messages are cut off immediately and a header announcing more
    than PAYLOAD_MAX raises at once instead of waiting for the bytes.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back (for state dumps and memory accounting)."""
        return len(self._buf)

    def needed(self) -> int:
        """Bytes still missing to complete the next message (header first, then its payload).

        A ring reader uses it to consume exactly one request at a time, so it can stop reading a
        domain whose replies are not being collected without swallowing requests it will not
        answer yet.
        """
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return HEADER_SIZE - len(buf)
        length = HEADER.unpack_from(buf, 0)[3]
        return HEADER_SIZE + min(length, PAYLOAD_MAX + 1) - len(buf)

    def pending_bytes(self) -> bytes:
        return bytes(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        buf = self._buf
        if buf:
            buf += data
            view = bytes(buf)
        else:
            view = bytes(data)
        out: list[Message] = []
        pos = 0
        end = len(view)
        unpack = HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            type_, req_id, tx_id, length = unpack(view, pos)
            if length > PAYLOAD_MAX:
                self._buf = bytearray()
                raise ProtocolError(f"payload length {length} exceeds {PAYLOAD_MAX}")
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            out.append(Message(type_, req_id, tx_id, view[pos + HEADER_SIZE : stop]))
            pos = stop
        if pos < end:
            self._buf = bytearray(view[pos:])
        elif buf:
            self._buf = bytearray()
        # (else the buffer is the empty one it was: no new one per request)
        return out

    def reset(self) -> None:
        self._buf = bytearray()


def split_args(payload: bytes) -> list[bytes]:
    """NUL-terminated strings of a payload, as C's get_strings counts them.

    Bytes after the last NUL are not an argument (C ignores them), so ``b"a\\0b"`` is one
    argument.
    """
    if not payload:
        return []
    parts = payload.split(b"\0")
    parts.pop()  # whatever follows the final NUL: empty, or an unterminated fragment
    return parts


def single_arg(payload: bytes) -> bytes:
    """The one argument of READ/RM/...: exactly one NUL and it is the last byte, else EINVAL."""
    end = len(payload) - 1
    if payload.find(0) != end or end < 0:  # the first NUL is the last byte (one find, no count)
        raise XsError("EINVAL", "expected exactly one NUL-terminated argument")
    return payload[:end]


def parse_domid(raw: bytes) -> int:
    """Strict decimal domain id (C-4.22): the whole string, at most 65535, else EINVAL."""
    if not raw or not raw.isdigit() or len(raw) > 5:
        raise XsError("EINVAL", "bad domain id")
    domid = int(raw)
    if domid > 0xFFFF:
        raise XsError("EINVAL", "domain id out of range")
    return domid


def atoi(raw: bytes) -> int:
    """C's atoi, for the arguments upstream parses with it: leading digits, garbage ignored."""
    s = raw.strip()
    neg = s[:1] == b"-"
    if s[:1] in (b"+", b"-"):
        s = s[1:]
    n = 0
    for b in s:
        if not 48 <= b <= 57:
            break
        n = n * 10 + b - 48
    return -n if neg else n
