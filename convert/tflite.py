"""A small reader for TFLite flatbuffer models (float32 graphs), without TensorFlow.

Only what the converters need: the operator list (builtin code, inputs, outputs and the
options table of the ops below), the tensors (name, shape, type, buffer) and the buffers'
raw bytes. Schema: ``tensorflow/lite/schema/schema.fbs``; field numbers are vtable slots.

FlatBuffers layout (little-endian): the file starts with a ``uoffset`` (uint32) to the root
table. A table starts with an ``soffset`` (int32) back to its vtable (``vtable = table -
soffset``); the vtable holds ``uint16`` vtable size, table size, then one ``uint16`` offset
per field (0 = absent: the schema default). Offsets to sub-tables, vectors and strings are
``uoffset`` relative to where they are stored; a vector is a ``uint32`` length followed by its
elements.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np

__all__ = ["Operator", "Tensor", "Graph", "read_tflite", "BUILTIN", "ACTIVATION", "PADDING"]

#: BuiltinOperator codes (schema.fbs) of the operators this reader decodes options for.
BUILTIN = {0: "ADD", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D", 9: "FULLY_CONNECTED", 18: "MUL",
           34: "PAD", 40: "MEAN", 41: "SUB", 54: "PRELU", 22: "RESHAPE"}
#: ActivationFunctionType.
ACTIVATION = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}
#: Padding.
PADDING = {0: "SAME", 1: "VALID"}
#: TensorType -> numpy dtype.
_TYPES = {0: np.dtype("<f4"), 2: np.dtype("<i4"), 4: np.dtype("<i8")}

# Option fields per op: (slot, name, struct format, default); formats b=int8, i=int32, ?=bool.
_OPTIONS = {
    "CONV_2D": [(0, "padding", "b", 0), (1, "stride_w", "i", 0), (2, "stride_h", "i", 0),
                (3, "activation", "b", 0), (4, "dilation_w", "i", 1), (5, "dilation_h", "i", 1)],
    "DEPTHWISE_CONV_2D": [(0, "padding", "b", 0), (1, "stride_w", "i", 0), (2, "stride_h", "i", 0),
                          (3, "depth_multiplier", "i", 0), (4, "activation", "b", 0),
                          (5, "dilation_w", "i", 1), (6, "dilation_h", "i", 1)],
    "FULLY_CONNECTED": [(0, "activation", "b", 0), (1, "weights_format", "b", 0),
                        (2, "keep_num_dims", "?", False)],
    "ADD": [(0, "activation", "b", 0)],
    "MUL": [(0, "activation", "b", 0)],
    "SUB": [(0, "activation", "b", 0)],
    "MEAN": [(0, "keep_dims", "?", False)],
    "PAD": [],
    "PRELU": [],
    "RESHAPE": [],
}


class _Buf:
    """Typed little-endian reads of flatbuffer tables, vectors and strings."""

    def __init__(self, data: bytes):
        self.data = data

    def u32(self, pos: int) -> int:
        return struct.unpack_from("<I", self.data, pos)[0]

    def field(self, table: int, slot: int) -> int | None:
        """Absolute position of field ``slot`` of the table at ``table`` (None: absent)."""
        vtable = table - struct.unpack_from("<i", self.data, table)[0]
        vsize = struct.unpack_from("<H", self.data, vtable)[0]
        at = 4 + 2 * slot
        if at >= vsize:
            return None
        off = struct.unpack_from("<H", self.data, vtable + at)[0]
        return table + off if off else None

    def scalar(self, table: int, slot: int, fmt: str, default):
        pos = self.field(table, slot)
        return default if pos is None else struct.unpack_from("<" + fmt, self.data, pos)[0]

    def ref(self, table: int, slot: int) -> int | None:
        pos = self.field(table, slot)
        return None if pos is None else pos + self.u32(pos)

    def vector(self, table: int, slot: int) -> tuple[int, int]:
        """``(start of elements, length)``; ``(0, 0)`` when absent."""
        pos = self.ref(table, slot)
        return (0, 0) if pos is None else (pos + 4, self.u32(pos))

    def tables(self, table: int, slot: int) -> list[int]:
        start, n = self.vector(table, slot)
        return [start + 4 * i + self.u32(start + 4 * i) for i in range(n)]

    def ints(self, table: int, slot: int) -> tuple[int, ...]:
        start, n = self.vector(table, slot)
        return struct.unpack_from(f"<{n}i", self.data, start) if n else ()

    def string(self, table: int, slot: int) -> str:
        pos = self.ref(table, slot)
        if pos is None:
            return ""
        return self.data[pos + 4: pos + 4 + self.u32(pos)].decode("utf-8")


@dataclasses.dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    buffer: int


@dataclasses.dataclass(frozen=True)
class Operator:
    index: int
    op: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict


@dataclasses.dataclass(frozen=True)
class Graph:
    """The (single) subgraph of a TFLite model, with its constant tensors' data."""

    tensors: list[Tensor]
    operators: list[Operator]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    buffers: list[bytes]

    def constant(self, index: int) -> np.ndarray:
        """The data of constant tensor ``index`` (ValueError if it has none)."""
        t = self.tensors[index]
        raw = self.buffers[t.buffer]
        if not raw:
            raise ValueError(f"tensor {index} ({t.name}) is not a constant")
        count = int(np.prod(t.shape, dtype=np.int64))
        if len(raw) != count * t.dtype.itemsize:
            raise ValueError(f"tensor {t.name}: {len(raw)} bytes for shape {t.shape} {t.dtype}")
        return np.frombuffer(raw, t.dtype).astype(t.dtype.newbyteorder("=")).reshape(t.shape)

    def is_constant(self, index: int) -> bool:
        return bool(self.buffers[self.tensors[index].buffer])


def read_tflite(path: str | Path) -> Graph:
    """Decode a ``.tflite`` file with one subgraph and builtin float32 operators.

    Raises ValueError naming the file for anything else (custom ops, several subgraphs,
    unknown operators, quantised or external-buffer tensors)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
    b = _Buf(data)
    model = b.u32(0)
    codes = []
    for oc in b.tables(model, 1):
        code = max(b.scalar(oc, 0, "b", 0), b.scalar(oc, 3, "i", 0))  # deprecated / new slot
        if b.string(oc, 1):
            raise ValueError(f"{path}: custom operator {b.string(oc, 1)!r} is not supported")
        codes.append(code)
    subgraphs = b.tables(model, 2)
    if len(subgraphs) != 1:
        raise ValueError(f"{path}: {len(subgraphs)} subgraphs, expected 1")
    buffers = []
    for buf in b.tables(model, 4):
        start, n = b.vector(buf, 0)
        if b.scalar(buf, 1, "Q", 0):
            raise ValueError(f"{path}: external buffer offsets are not supported")
        buffers.append(data[start: start + n])
    sg = subgraphs[0]
    tensors = []
    for i, t in enumerate(b.tables(sg, 0)):
        ttype = b.scalar(t, 1, "b", 0)
        if ttype not in _TYPES:
            raise ValueError(f"{path}: tensor {i} has unsupported type {ttype}")
        tensors.append(Tensor(i, b.string(t, 3), tuple(b.ints(t, 0)), _TYPES[ttype], b.scalar(t, 2, "I", 0)))
    operators = []
    for i, o in enumerate(b.tables(sg, 3)):
        code = codes[b.scalar(o, 0, "I", 0)]
        if code not in BUILTIN:
            raise ValueError(f"{path}: operator {i} has unsupported builtin code {code}")
        name = BUILTIN[code]
        opts = {}
        table = b.ref(o, 4)
        for slot, key, fmt, default in _OPTIONS[name]:
            opts[key] = default if table is None else b.scalar(table, slot, fmt, default)
        if "padding" in opts:
            opts["padding"] = PADDING[opts["padding"]]
        if "activation" in opts:
            opts["activation"] = ACTIVATION[opts["activation"]]
        operators.append(Operator(i, name, tuple(b.ints(o, 1)), tuple(b.ints(o, 2)), opts))
    return Graph(tensors, operators, tuple(b.ints(sg, 1)), tuple(b.ints(sg, 2)), buffers)
