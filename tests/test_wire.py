"""Wire codec: framing under any chunking, op codes, error names, argument splitting."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstored.wire import (
    ERRORS,
    HEADER_SIZE,
    PAYLOAD_MAX,
    Message,
    Op,
    Parser,
    ProtocolError,
    XsError,
    encode,
    op_name,
    single_arg,
    split_args,
)


def test_header_is_16_native_bytes():
    assert HEADER_SIZE == 16
    assert encode(2, 7, 9, b"ab") == struct.pack("=IIII", 2, 7, 9, 2) + b"ab"


def test_every_op_code_has_its_xs_wire_name():
    names = [Op(i).name for i in range(27)]
    assert names[:4] == ["CONTROL", "DIRECTORY", "READ", "GET_PERMS"]
    assert names[15:17] == ["WATCH_EVENT", "ERROR"]
    assert names[20:] == [
        "RESTRICT", "RESET_WATCHES", "DIRECTORY_PART", "GET_FEATURE", "SET_FEATURE", "GET_QUOTA", "SET_QUOTA",
    ]
    assert op_name(99) == "OP99"


def test_the_sixteen_error_names_in_xs_wire_order():
    assert len(ERRORS) == 16
    assert ERRORS[0] == "EINVAL" and ERRORS[-1] == "EPERM" and "E2BIG" in ERRORS
    with pytest.raises(ValueError):
        XsError("EQUOTA")


def test_parser_waits_for_whole_messages():
    p = Parser()
    data = encode(2, 1, 0, b"/a\0")
    assert p.feed(data[:5]) == []
    assert p.feed(data[5:17]) == []
    assert p.pending == 17
    assert p.feed(data[17:]) == [Message(2, 1, 0, b"/a\0")]
    assert p.pending == 0


def test_parser_rejects_oversized_payload_at_the_header():
    p = Parser()
    with pytest.raises(ProtocolError):
        p.feed(struct.pack("=IIII", 2, 1, 0, PAYLOAD_MAX + 1))
    # exactly the maximum is fine
    assert len(p.feed(encode(11, 1, 0, b"x" * PAYLOAD_MAX))) == 1


messages = st.lists(
    st.builds(
        Message,
        st.integers(0, 30),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=300),
    ),
    max_size=8,
)


@settings(max_examples=300)
@given(messages, st.lists(st.integers(1, 200), max_size=20))
def test_parser_accepts_any_chunking(msgs, cuts):
    stream = b"".join(m.encode() for m in msgs)
    p = Parser()
    got = []
    pos = 0
    for c in cuts:
        got += p.feed(stream[pos : pos + c])
        pos += c
    got += p.feed(stream[pos:])
    assert got == msgs
    assert p.pending == 0


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.lists(st.integers(1, 300), max_size=10))
def test_parser_on_arbitrary_bytes_only_raises_protocol_error(data, cuts):
    p = Parser()
    pos = 0
    try:
        for c in [*cuts, len(data)]:
            for m in p.feed(data[pos : pos + c]):
                assert len(m.payload) <= PAYLOAD_MAX
            pos += c
    except ProtocolError:
        pass
    assert p.pending <= HEADER_SIZE + PAYLOAD_MAX


def test_split_args_counts_nul_terminated_strings_like_c():
    assert split_args(b"") == []
    assert split_args(b"a\0") == [b"a"]
    assert split_args(b"a\0b") == [b"a"]  # trailing unterminated bytes are not an argument
    assert split_args(b"a\0\0") == [b"a", b""]


@pytest.mark.parametrize("payload", [b"", b"/a", b"/a\0b\0", b"\0\0", b"/a\0x"])
def test_single_arg_requires_exactly_one_final_nul(payload):
    with pytest.raises(XsError) as e:
        single_arg(payload)
    assert e.value.name == "EINVAL"
    assert single_arg(b"/a\0") == b"/a"
