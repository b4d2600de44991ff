"""A minimal protobuf wire-format decoder (enough for TF GraphDef and ONNX ModelProto).

Messages are decoded into ``{field_number: [values...]}``; a value is an ``int`` for
varint/fixed fields and ``bytes`` for length-delimited ones (sub-messages, strings, packed
repeated scalars). Callers apply their own schema: ``message(buf)[3]`` etc.
"""

from __future__ import annotations

import struct
from collections import defaultdict

import numpy as np

__all__ = ["ProtobufError", "message", "read_varint", "packed_varints", "packed_floats", "as_str", "first"]


class ProtobufError(ValueError):
    """Malformed protobuf data."""


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ProtobufError("varint too long")


def message(buf: bytes | memoryview) -> dict[int, list]:
    """Decode one message into ``{field: [values]}`` (wire types 0, 1, 2, 5)."""
    buf = memoryview(buf)
    fields: dict[int, list] = defaultdict(list)
    pos = 0
    n = len(buf)
    while pos < n:
        tag, pos = read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            if pos + 8 > n:
                raise ProtobufError("truncated fixed64")
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > n:
                raise ProtobufError(f"truncated length-delimited field {field}")
            value = bytes(buf[pos : pos + length])
            pos += length
        elif wire == 5:
            if pos + 4 > n:
                raise ProtobufError("truncated fixed32")
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ProtobufError(f"unsupported wire type {wire} (field {field})")
        fields[field].append(value)
    return dict(fields)


def packed_varints(values: list) -> list[int]:
    """Repeated int field that may be packed (bytes) or unpacked (ints), signed int64."""
    out: list[int] = []
    for v in values:
        if isinstance(v, bytes):
            pos = 0
            while pos < len(v):
                x, pos = read_varint(v, pos)
                out.append(x - (1 << 64) if x >= 1 << 63 else x)
        else:
            out.append(v - (1 << 64) if v >= 1 << 63 else v)
    return out


def packed_floats(values: list) -> np.ndarray:
    """Repeated float field, packed (bytes) or unpacked (fixed32 ints)."""
    parts = []
    for v in values:
        if isinstance(v, bytes):
            parts.append(np.frombuffer(v, "<f4"))
        else:
            parts.append(np.array([v], "<u4").view("<f4"))
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def as_str(value: bytes) -> str:
    return value.decode("utf-8")


def first(fields: dict[int, list], field: int, default=None):
    values = fields.get(field)
    return values[0] if values else default
