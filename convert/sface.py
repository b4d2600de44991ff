"""SFace (OpenCV zoo ``face_recognition_sface_2021dec_int8bq.onnx``) -> ``lowkey_jax.models.sface``.

Source (see weights/manifest.json, role ``onnx``): an ONNX ModelProto (opset 21) read with the
wire-format decoder in ``convert/protobuf.py``; no onnx/onnxruntime at conversion time.

What the file contains (checked here, anything else raises):

* ``Sub(data, scalar_op1=127.5) -> Mul(scalar_op2=0.0078125)``: the input normalisation,
  reproduced by the module as constants (the two initializers must equal them).
* 27 layers ``Conv(no bias) -> BatchNormalization -> PRelu`` chained strictly in sequence
  (every intermediate tensor has exactly one consumer: no residual adds), whose kernel,
  stride, pads and group must equal ``lowkey_jax.models.sface.LAYERS``.
* Head ``BatchNormalization(bn1) -> Dropout (ratio from a Constant node; identity at
  inference) -> Flatten(axis 1) -> Gemm(transB=1, alpha=beta=1) -> BatchNormalization(fc1)``.
* Every conv weight and the Gemm weight and bias are int8 block-quantized:
  ``DequantizeLinear(q int8, scale float32, zero_point int8, axis, block_size)`` (opset 21
  blocked form), each conv weight stored as a 2-D ``[O, I/g * kh * kw]`` matrix followed by a
  ``Reshape`` to ``[O, I/g, kh, kw]`` (shape initializer ``*_shape``). The Gemm weight and bias
  also have ``pre_fc1_{weight,bias}_shape`` initializers that no node reads; they are used here
  as the expected shapes of the dequantized tensors.

Dequantization (ONNX DequantizeLinear-21, blocked): for ``q`` of shape ``S`` with blocks of
``B`` elements along ``axis``, ``scale`` and ``zero_point`` have shape ``S`` except
``ceil(S[axis] / B)`` along ``axis``, and for every index ``i``::

    w[i] = (float32(q[i]) - float32(zero_point[j])) * scale[j],  j = i with j[axis] = i[axis] // B

computed in float32 exactly as the ONNX reference does (the difference of two int8 values is
exact in float32, so the one rounding is the product's). Block sizes in this file: 27 (conv_1,
one block per output channel), 9 (depthwise 3x3, one block per channel), 32 (conv_2), 64
(all other pointwise convs, the Gemm weight and bias).

Folding (float64, then rounded once to float32), with ``s = gamma / sqrt(var + eps)``:

* conv + BN: ``kernel = W * s[o]`` (then OIHW -> HWIO), ``bias = beta - mean * s``;
* head: ``bn1`` (per input channel ``c``: ``x * s1[c] + t1[c]``, ``t1 = beta1 - mean1 * s1``),
  the Gemm ``y = x_flat @ W.T + b`` and ``fc1`` (``(y - mean2) * s2 + beta2``) become one dense
  layer: ``K[o, c, h, w] = W[o, chw] * s1[c] * s2[o]`` and
  ``bias = (W @ t1_flat + b - mean2) * s2 + beta2``; ``K`` is permuted from NCHW-flatten
  rows to NHWC-flatten rows and transposed to the ``[in, out]`` layout of ``nnx.Linear``.

Every initializer is consumed exactly once (a quantized weight as its ``(q, scale,
zero_point)`` triple plus its shape), every node exactly once; both are asserted.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .protobuf import as_str, first, message, packed_floats, packed_varints
from lowkey_jax.models.sface import FEATURE_SHAPE, LAYERS, PIXEL_MEAN, PIXEL_SCALE, EMBED_DIM

__all__ = ["OnnxNode", "OnnxGraph", "read_onnx", "dequantize_blocked", "dequantized_weights", "convert", "KEY_MAP"]

# --- ONNX reading ----------------------------------------------------------------------

# TensorProto.DataType -> numpy dtype (the ones this reader accepts).
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("u1"), 3: np.dtype("i1"), 6: np.dtype("<i4"),
           7: np.dtype("<i8"), 11: np.dtype("<f8")}
# Field numbers (onnx.proto).
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_SPARSE_INIT = 1, 5, 11, 12, 15
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP, _NODE_ATTR, _NODE_DOMAIN = 1, 2, 3, 4, 5, 7
_T_DIMS, _T_TYPE, _T_SEGMENT, _T_FLOAT, _T_INT32, _T_INT64, _T_NAME, _T_RAW, _T_DOUBLE, _T_LOCATION = (
    1, 2, 3, 4, 5, 7, 8, 9, 10, 14)
_A_NAME, _A_F, _A_I, _A_S, _A_T, _A_FLOATS, _A_INTS, _A_TYPE = 1, 2, 3, 4, 5, 7, 8, 20
_VALUEINFO_NAME = 1


@dataclass(frozen=True)
class OnnxNode:
    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict = field(hash=False)


@dataclass(frozen=True)
class OnnxGraph:
    nodes: tuple[OnnxNode, ...]
    initializers: dict[str, np.ndarray]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _tensor(buf: bytes) -> tuple[str, np.ndarray]:
    f = message(buf)
    name = as_str(first(f, _T_NAME, b""))
    if first(f, _T_LOCATION, 0) != 0 or _T_SEGMENT in f:
        raise ValueError(f"ONNX tensor {name!r}: external or segmented data is not supported")
    dims = tuple(packed_varints(f.get(_T_DIMS, [])))
    code = first(f, _T_TYPE, 0)
    if code not in _DTYPES:
        raise ValueError(f"ONNX tensor {name!r}: unsupported data_type {code}")
    dtype = _DTYPES[code]
    if _T_RAW in f:
        arr = np.frombuffer(first(f, _T_RAW), dtype).copy()
    elif code == 1:
        arr = packed_floats(f.get(_T_FLOAT, []))
    elif code == 11:
        arr = np.concatenate([np.frombuffer(v, "<f8") if isinstance(v, bytes) else np.array([v], "<u8").view("<f8")
                              for v in f.get(_T_DOUBLE, [])] or [np.zeros((0,), "<f8")])
    elif code == 7:
        arr = np.array(packed_varints(f.get(_T_INT64, [])), np.int64)
    else:  # int8 / uint8 / int32 are stored widened in int32_data
        wide = np.array(packed_varints(f.get(_T_INT32, [])), np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise ValueError(f"ONNX tensor {name!r}: int32_data out of range for {dtype}")
        arr = wide.astype(dtype)
    if arr.size != math.prod(dims):
        raise ValueError(f"ONNX tensor {name!r}: {arr.size} values for dims {dims}")
    return name, arr.astype(dtype, copy=False).reshape(dims)


def _attribute(buf: bytes):
    f = message(buf)
    name = as_str(first(f, _A_NAME))
    kind = first(f, _A_TYPE)
    if kind == 1:  # FLOAT (fixed32)
        value = struct.unpack("<f", struct.pack("<I", first(f, _A_F, 0)))[0]
    elif kind == 2:  # INT
        value = packed_varints(f.get(_A_I, [0]))[0]
    elif kind == 3:  # STRING
        value = first(f, _A_S, b"")
    elif kind == 4:  # TENSOR
        value = _tensor(first(f, _A_T))[1]
    elif kind == 6:  # FLOATS
        value = [float(v) for v in packed_floats(f.get(_A_FLOATS, []))]
    elif kind == 7:  # INTS
        value = packed_varints(f.get(_A_INTS, []))
    else:
        raise ValueError(f"ONNX attribute {name!r}: unsupported type {kind}")
    return name, value


def read_onnx(path: str | Path) -> OnnxGraph:
    """Nodes, initializers and graph input/output names of an ONNX model (no onnx import)."""
    model = message(Path(path).read_bytes())
    if _MODEL_GRAPH not in model:
        raise ValueError(f"{path}: no graph in ModelProto")
    g = message(first(model, _MODEL_GRAPH))
    if _GRAPH_SPARSE_INIT in g:
        raise ValueError(f"{path}: sparse initializers are not supported")
    nodes = []
    for nb in g.get(_GRAPH_NODE, []):
        n = message(nb)
        if as_str(first(n, _NODE_DOMAIN, b"")) not in ("", "ai.onnx"):
            raise ValueError(f"{path}: node from unsupported domain {first(n, _NODE_DOMAIN)!r}")
        nodes.append(OnnxNode(
            op_type=as_str(first(n, _NODE_OP)), name=as_str(first(n, _NODE_NAME, b"")),
            inputs=tuple(as_str(v) for v in n.get(_NODE_INPUT, [])),
            outputs=tuple(as_str(v) for v in n.get(_NODE_OUTPUT, [])),
            attrs=dict(_attribute(a) for a in n.get(_NODE_ATTR, [])),
        ))
    inits: dict[str, np.ndarray] = {}
    for tb in g.get(_GRAPH_INITIALIZER, []):
        name, arr = _tensor(tb)
        if name in inits:
            raise ValueError(f"{path}: duplicate initializer {name!r}")
        inits[name] = arr
    names = lambda key: tuple(as_str(first(message(v), _VALUEINFO_NAME)) for v in g.get(key, []))  # noqa: E731
    return OnnxGraph(tuple(nodes), inits, names(_GRAPH_INPUT), names(_GRAPH_OUTPUT))


# --- dequantization --------------------------------------------------------------------


def dequantize_blocked(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, *, axis: int,
                       block_size: int) -> np.ndarray:
    """ONNX DequantizeLinear-21 with ``block_size > 0``: ``(q - zero_point) * scale`` per block.

    ``q``, ``zero_point``: int8; ``scale``: float32 with ``q``'s shape except
    ``ceil(q.shape[axis] / block_size)`` along ``axis``. Returns float32 of ``q``'s shape.
    """
    if q.dtype != np.int8 or zero_point.dtype != np.int8 or scale.dtype != np.float32:
        raise ValueError(f"expected int8/float32/int8, got {q.dtype}/{scale.dtype}/{zero_point.dtype}")
    if block_size <= 0:
        raise ValueError(f"only blocked DequantizeLinear (block_size > 0) is supported, got {block_size}")
    axis = axis % q.ndim
    want = list(q.shape)
    want[axis] = -(-q.shape[axis] // block_size)
    if list(scale.shape) != want or zero_point.shape != scale.shape:
        raise ValueError(f"blocked dequantization: q {q.shape}, scale {scale.shape}, zero_point "
                         f"{zero_point.shape}, axis {axis}, block_size {block_size}")
    take = lambda a: np.repeat(a, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)  # noqa: E731
    diff = q.astype(np.float32) - take(zero_point).astype(np.float32)  # exact
    return (diff * take(scale)).astype(np.float32)


# --- the SFace graph -------------------------------------------------------------------

# Key map (data): module parameter -> the ONNX initializers it is computed from. ``{n}`` is the
# ONNX layer name of ``LAYERS[i]``; ``_q(x)`` is the quantized triple + shape of ``x``.
def _q(x: str) -> tuple[str, ...]:
    return (f"{x}_quantized", f"{x}_scales", f"{x}_zero_point", f"{x}_shape")


def _bn(x: str) -> tuple[str, ...]:
    return (f"{x}_gamma", f"{x}_beta", f"{x}_moving_mean", f"{x}_moving_var")


KEY_MAP: dict[str, tuple[str, ...]] = {}
for _i, _spec in enumerate(LAYERS):
    KEY_MAP[f"layers.{_i}.conv.kernel"] = (*_q(f"{_spec.name}_conv2d_weight"), *_bn(f"{_spec.name}_batchnorm"))
    KEY_MAP[f"layers.{_i}.conv.bias"] = _bn(f"{_spec.name}_batchnorm")
    KEY_MAP[f"layers.{_i}.alpha"] = (f"{_spec.name}_relu_gamma",)
KEY_MAP["fc.kernel"] = (*_bn("bn1"), *_q("pre_fc1_weight"), *_bn("fc1"))
KEY_MAP["fc.bias"] = (*_bn("bn1"), *_q("pre_fc1_weight"), *_q("pre_fc1_bias"), *_bn("fc1"))
#: Initializers the module holds as constants (checked for equality, not converted).
CONSTANTS = {"scalar_op1": PIXEL_MEAN, "scalar_op2": PIXEL_SCALE}
del _i, _spec


class _Walker:
    """Follows the single-consumer chain of the graph, tracking node and initializer use."""

    def __init__(self, graph: OnnxGraph):
        self.g = graph
        self.producer = {o: n for n in graph.nodes for o in n.outputs}
        self.consumers: dict[str, list[OnnxNode]] = {}
        for n in graph.nodes:
            for i in n.inputs:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.used_nodes: set[int] = set()
        self.used_inits: set[str] = set()

    def use_node(self, node: OnnxNode) -> OnnxNode:
        if id(node) in self.used_nodes:
            raise ValueError(f"node {node.name or node.outputs} visited twice")
        self.used_nodes.add(id(node))
        return node

    def init(self, name: str) -> np.ndarray:
        if name not in self.g.initializers:
            raise ValueError(f"expected initializer {name!r}")
        if name in self.used_inits:
            raise ValueError(f"initializer {name!r} used twice")
        self.used_inits.add(name)
        return self.g.initializers[name]

    def next(self, tensor: str, op_type: str, n_inputs: int | tuple[int, ...]) -> OnnxNode:
        """The sole consumer of ``tensor``, which must be ``op_type`` taking it as input 0."""
        users = self.consumers.get(tensor, [])
        if len(users) != 1:
            raise ValueError(f"tensor {tensor!r} has {len(users)} consumers, expected 1 (a plain chain)")
        node = users[0]
        counts = (n_inputs,) if isinstance(n_inputs, int) else n_inputs
        if node.op_type != op_type or node.inputs[0] != tensor or len(node.inputs) not in counts:
            raise ValueError(f"after {tensor!r}: expected {op_type} with {n_inputs} inputs, got "
                             f"{node.op_type}{list(node.inputs)}")
        if len(node.outputs) != 1:
            raise ValueError(f"{node.op_type} {node.name!r}: expected one output, got {node.outputs}")
        return self.use_node(node)

    def produced(self, tensor: str, op_type: str) -> OnnxNode:
        node = self.producer.get(tensor)
        if node is None or node.op_type != op_type:
            raise ValueError(f"{tensor!r} should be produced by {op_type}, got {node and node.op_type}")
        return self.use_node(node)

    def dequantized(self, tensor: str) -> tuple[np.ndarray, list[str]]:
        """``tensor`` = DequantizeLinear(q, scale, zero_point): float32 array and source names."""
        node = self.produced(tensor, "DequantizeLinear")
        if len(node.inputs) != 3 or set(node.attrs) - {"axis", "block_size"}:
            raise ValueError(f"unsupported DequantizeLinear {node.name!r}: {node.inputs} {node.attrs}")
        q, s, z = (self.init(n) for n in node.inputs)
        w = dequantize_blocked(q, s, z, axis=node.attrs.get("axis", 1), block_size=node.attrs.get("block_size", 0))
        return w, list(node.inputs)

    def bn(self, tensor: str) -> tuple[OnnxNode, np.ndarray, np.ndarray]:
        """BatchNormalization consuming ``tensor`` -> (node, scale, shift) in float64."""
        node = self.next(tensor, "BatchNormalization", 5)
        if node.attrs.get("training_mode", 0) != 0 or set(node.attrs) - {"epsilon", "momentum", "training_mode"}:
            raise ValueError(f"unsupported BatchNormalization attributes {node.attrs}")
        gamma, beta, mean, var = (self.init(n).astype(np.float64) for n in node.inputs[1:])
        eps = float(np.float32(node.attrs.get("epsilon", 1e-5)))
        scale = gamma / np.sqrt(var + eps)
        return node, scale, beta - mean * scale


def _check_names(key: str, got: list[str]) -> None:
    if tuple(got) != KEY_MAP[key]:
        raise ValueError(f"{key}: graph reads {got}, key map expects {list(KEY_MAP[key])}")


def convert(inputs: dict[str, Path]) -> dict[str, np.ndarray]:
    """Flat float32 params for ``lowkey_jax.models.sface.SFace`` from the int8bq ONNX file."""
    g = read_onnx(inputs["onnx"])
    w = _Walker(g)
    out: dict[str, np.ndarray] = {}

    if g.outputs != ("fc1",) or "data" not in g.inputs:
        raise ValueError(f"unexpected graph inputs/outputs: outputs {g.outputs}")
    # Graph inputs other than "data" must be initializers or names no node reads (the file lists
    # 29 pre-quantization weight names as inputs; onnxruntime rejects them, we ignore them).
    for name in g.inputs:
        if name != "data" and name not in g.initializers and name in w.consumers:
            raise ValueError(f"graph input {name!r} is read by a node but has no initializer")

    # Input normalisation: Sub(data, 127.5) -> Mul(1/128).
    x = "data"
    for op, const in (("Sub", "scalar_op1"), ("Mul", "scalar_op2")):
        node = w.next(x, op, 2)
        value = w.init(node.inputs[1])
        if node.inputs[1] != const or value.size != 1 or value.dtype != np.float32 or value.item() != CONSTANTS[const]:
            raise ValueError(f"{op} constant {node.inputs[1]!r} = {value} != {CONSTANTS[const]}")
        x = node.outputs[0]

    for i, spec in enumerate(LAYERS):
        conv = w.next(x, "Conv", 2)
        if conv.outputs[0] != f"{spec.name}_conv2d":
            raise ValueError(f"layer {i}: expected {spec.name}_conv2d, got {conv.outputs[0]}")
        (pt, pb), (pl, pr) = spec.pad
        want = {"kernel_shape": [spec.kernel] * 2, "strides": [spec.stride] * 2, "pads": [pt, pl, pb, pr],
                "dilations": [1, 1], "group": spec.groups}
        got = {k: conv.attrs.get(k, {"dilations": [1, 1], "group": 1}.get(k)) for k in want}
        if got != want or set(conv.attrs) - set(want) - {"auto_pad"} or conv.attrs.get("auto_pad", b"NOTSET") != b"NOTSET":
            raise ValueError(f"{spec.name}: Conv attributes {conv.attrs} != {want}")
        reshape = w.produced(conv.inputs[1], "Reshape")
        weight, names = w.dequantized(reshape.inputs[0])
        shape = w.init(reshape.inputs[1])
        names.append(reshape.inputs[1])
        oihw = (spec.cout, spec.cin // spec.groups, spec.kernel, spec.kernel)
        if tuple(int(v) for v in shape) != oihw or weight.size != math.prod(oihw):
            raise ValueError(f"{spec.name}: weight shape {list(shape)} / {weight.shape} != {oihw}")
        weight = weight.reshape(oihw).astype(np.float64)
        bn, scale, shift = w.bn(conv.outputs[0])
        _check_names(f"layers.{i}.conv.kernel", names + list(bn.inputs[1:]))
        _check_names(f"layers.{i}.conv.bias", list(bn.inputs[1:]))
        prelu = w.next(bn.outputs[0], "PRelu", 2)
        _check_names(f"layers.{i}.alpha", [prelu.inputs[1]])
        slope = w.init(prelu.inputs[1])
        if slope.shape != (spec.cout, 1, 1):
            raise ValueError(f"{spec.name}: PRelu slope shape {slope.shape}")
        out[f"layers.{i}.conv.kernel"] = (weight * scale[:, None, None, None]).transpose(2, 3, 1, 0)  # -> HWIO
        out[f"layers.{i}.conv.bias"] = shift
        out[f"layers.{i}.alpha"] = slope.reshape(spec.cout)
        x = prelu.outputs[0]

    # Head: bn1 -> Dropout -> Flatten -> Gemm -> fc1.
    h, wd, c = FEATURE_SHAPE
    bn1, s1, t1 = w.bn(x)
    drop = w.next(bn1.outputs[0], "Dropout", (1, 2))
    if len(drop.inputs) == 2:  # ratio: irrelevant at inference; must come from a Constant node
        w.produced(drop.inputs[1], "Constant")
    flat = w.next(drop.outputs[0], "Flatten", 1)
    if flat.attrs.get("axis", 1) != 1:
        raise ValueError(f"Flatten axis {flat.attrs}")
    gemm = w.next(flat.outputs[0], "Gemm", 3)
    if {k: gemm.attrs.get(k, d) for k, d in (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0))} != {
            "alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}:
        raise ValueError(f"Gemm attributes {gemm.attrs}")
    gw, gw_names = w.dequantized(gemm.inputs[1])
    gb, gb_names = w.dequantized(gemm.inputs[2])
    # No node reads these two shape initializers; they record the dequantized shapes.
    for arr, names, want in ((gw, gw_names, (EMBED_DIM, h * wd * c)), (gb, gb_names, (EMBED_DIM,))):
        shape_name = names[0].removesuffix("_quantized") + "_shape"
        if tuple(int(v) for v in w.init(shape_name)) != want or arr.shape != want:
            raise ValueError(f"{shape_name}: dequantized shape {arr.shape} != {want}")
        names.append(shape_name)
    fc1, s2, t2 = w.bn(gemm.outputs[0])
    if fc1.outputs[0] != "fc1":
        raise ValueError(f"graph should end at fc1, got {fc1.outputs[0]}")
    _check_names("fc.kernel", list(bn1.inputs[1:]) + gw_names + list(fc1.inputs[1:]))
    _check_names("fc.bias", list(bn1.inputs[1:]) + gw_names + gb_names + list(fc1.inputs[1:]))
    gw = gw.astype(np.float64).reshape(EMBED_DIM, c, h, wd)  # NCHW flatten order
    kernel = gw * s1[None, :, None, None] * s2[:, None, None, None]
    bias = (np.einsum("ochw,c->o", gw, t1) + gb.astype(np.float64)) * s2 + t2
    out["fc.kernel"] = kernel.transpose(2, 3, 1, 0).reshape(h * wd * c, EMBED_DIM)  # [(h, w, c), o]
    out["fc.bias"] = bias

    unused_nodes = [n.op_type + ":" + (n.name or n.outputs[0]) for n in g.nodes if id(n) not in w.used_nodes]
    unused_inits = sorted(set(g.initializers) - w.used_inits)
    if unused_nodes or unused_inits:
        raise ValueError(f"SFace ONNX: unused nodes {unused_nodes}, unused initializers {unused_inits}")
    if set(out) != set(KEY_MAP):
        raise ValueError(f"key map mismatch: {sorted(set(out) ^ set(KEY_MAP))}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def dequantized_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every DequantizeLinear output of the file, by output name (for tests / inspection)."""
    g = read_onnx(path)
    out = {}
    for node in g.nodes:
        if node.op_type == "DequantizeLinear":
            q, s, z = (g.initializers[n] for n in node.inputs)
            out[node.outputs[0]] = dequantize_blocked(
                q, s, z, axis=node.attrs.get("axis", 1), block_size=node.attrs.get("block_size", 0))
    return out
