"""lib0 varuints: the one varint implementation of the library (sans-IO, stdlib only).

Yjs (lib0), our wire codec and the y-websocket framing all use unsigned LEB128. They differ
only in their bounds: our codec and yrs read up to 64 bits, JavaScript peers only 53, and our
codec also insists on the minimal encoding (so one value has one encoding).
"""

from __future__ import annotations

from ..errors import ConfigError, DecodeError

U64 = 1 << 64
JS_SAFE = 1 << 53  # lib0 varuints decoded by JavaScript are Numbers


def put_varuint(out: bytearray, value: int) -> None:
    """Append `value` (0 <= value < 2**64) as a varuint; ConfigError otherwise."""
    if not 0 <= value < U64:
        raise ConfigError(f"integer out of varuint range: {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def varuint(value: int) -> bytes:
    """`value` as varuint bytes."""
    out = bytearray()
    put_varuint(out, value)
    return bytes(out)


def varbytes(data: bytes) -> bytes:
    """`data` with its varuint length in front (also how strings go: UTF-8 bytes)."""
    return varuint(len(data)) + data


def read_varuint(
    data: bytes, pos: int, *, limit: int = U64, minimal: bool = False
) -> tuple[int, int]:
    """Decode the varuint at `pos` -> (value, next position).

    Raises DecodeError when it is truncated, longer than 10 bytes, not below `limit`, or (with
    `minimal`) padded with a zero byte. The one-byte case is the hot path of the Yjs guard.
    """
    try:
        b = data[pos]
        if b < 0x80:
            return b, pos + 1
        value, shift = b & 0x7F, 7
        for _ in range(9):
            pos += 1
            b = data[pos]
            value |= (b & 0x7F) << shift
            if b < 0x80:
                if minimal and b == 0:
                    raise DecodeError("non-minimal varuint")
                if value >= limit:
                    raise DecodeError(f"varuint exceeds {limit.bit_length() - 1} bits")
                return value, pos + 1
            shift += 7
    except IndexError:
        raise DecodeError("truncated varuint") from None
    raise DecodeError("varuint longer than 10 bytes")


def read_varbytes(data: bytes, pos: int) -> tuple[bytes, int]:
    """Decode the length-prefixed bytes at `pos` -> (bytes, next position)."""
    size, pos = read_varuint(data, pos)
    if size > len(data) - pos:
        raise DecodeError("length runs past the end of the message")
    return data[pos : pos + size], pos + size


def put_varbytes(out: bytearray, data: bytes) -> None:
    """Append `data` with its varuint length (also how strings go: UTF-8 bytes)."""
    put_varuint(out, len(data))
    out += data
