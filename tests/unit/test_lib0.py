"""The one varint implementation (`sync.lib0`) and the bounds each user gives it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unity_crdt.errors import ConfigError, DecodeError
from unity_crdt.sync.lib0 import JS_SAFE, U64, put_varuint, read_varbytes, read_varuint, varuint


def test_known_encodings() -> None:
    assert varuint(0) == b"\x00"
    assert varuint(127) == b"\x7f"
    assert varuint(128) == b"\x80\x01"
    assert varuint(300) == b"\xac\x02"
    assert varuint(U64 - 1) == b"\xff" * 9 + b"\x01"
    with pytest.raises(ConfigError):
        varuint(-1)
    with pytest.raises(ConfigError):
        put_varuint(bytearray(), U64)


@given(st.integers(0, U64 - 1), st.binary(max_size=4))
def test_roundtrip_at_any_offset(value: int, prefix: bytes) -> None:
    data = prefix + varuint(value) + b"tail"
    assert read_varuint(data, len(prefix), minimal=True) == (value, len(data) - 4)


def test_bounds_minimality_and_truncation() -> None:
    with pytest.raises(DecodeError, match="truncated"):
        read_varuint(b"\x80\x80", 0)
    with pytest.raises(DecodeError, match="longer than 10 bytes"):
        read_varuint(b"\x80" * 10 + b"\x01", 0)
    with pytest.raises(DecodeError, match="exceeds 64 bits"):
        read_varuint(b"\xff" * 9 + b"\x02", 0)
    # JavaScript peers read 53 bits: one more is refused when that bound is given.
    assert read_varuint(varuint(JS_SAFE - 1), 0, limit=JS_SAFE)[0] == JS_SAFE - 1
    with pytest.raises(DecodeError, match="53 bits"):
        read_varuint(varuint(JS_SAFE), 0, limit=JS_SAFE)
    # Padding with a zero continuation is legal lib0 but not our codec's canonical form.
    assert read_varuint(b"\x81\x00", 0) == (1, 2)
    with pytest.raises(DecodeError, match="non-minimal"):
        read_varuint(b"\x81\x00", 0, minimal=True)


def test_varbytes_checks_the_length_against_what_is_left() -> None:
    assert read_varbytes(b"\x03abcd", 0) == (b"abc", 4)
    with pytest.raises(DecodeError, match="past the end"):
        read_varbytes(b"\x05abc", 0)
