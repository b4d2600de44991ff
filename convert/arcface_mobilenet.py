"""facelib's ArcFace MobileNet (``mobilenet_fp32.tflite``) -> :class:`ArcFaceMobileNet` params.

Walks the TFLite graph (read by :mod:`convert.tflite`) operator by operator and checks it
against the model's layer table :data:`lowkey_jax.models.arcface_mobilenet.LAYERS`: the
input normalisation constants, every ``PAD`` amount, each conv's kind, kernel shape, stride,
padding mode, dilation and fused ReLU6, that every operator consumes the previous one's
output, and the head (``MEAN`` over H, W; batch norm ``MUL``/``ADD``; ``FULLY_CONNECTED``).
Every constant tensor of the graph is used exactly once. Any difference raises ValueError.

Layouts: TFLite ``CONV_2D`` filters are ``[cout, kh, kw, cin]`` (-> HWIO), depthwise filters
``[1, kh, kw, C]`` (-> ``[kh, kw, 1, C]``), dense weights ``[out, in]`` (-> ``[in, out]``).
The head batch norm ``y = x * m + a`` before the dense layer ``W y + b`` is folded (float64)
into ``kernel = (W * m).T``, ``bias = W a + b``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convert.tflite import Graph, read_tflite
from lowkey_jax.models import arcface_mobilenet as am

__all__ = ["convert_graph", "convert", "GRAPH_CONSTANTS"]

#: Constant values in the graph (kernels, biases, BN, dense, pads, axes, scalars).
GRAPH_CONSTANTS = 3_329_324


def convert_graph(g: Graph) -> dict[str, np.ndarray]:
    """Map a decoded graph to flat ``ArcFaceMobileNet`` params (float32)."""
    ops = list(g.operators)
    used: list[int] = []
    out: dict[str, np.ndarray] = {}

    def const(index: int) -> np.ndarray:
        used.append(index)
        return g.constant(index)

    def expect(op, name: str, what: str):
        if op.op != name:
            raise ValueError(f"operator {op.index} ({what}) is {op.op}, expected {name}")

    if len(g.inputs) != 1 or g.tensors[g.inputs[0]].shape != (1, *am.INPUT_SIZE, 3):
        raise ValueError(f"graph input {[g.tensors[i].shape for i in g.inputs]}, expected [1, 112, 112, 3]")
    cur = g.inputs[0]
    pos = 0

    def next_op(name: str, what: str):
        nonlocal pos, cur
        if pos >= len(ops):
            raise ValueError(f"graph ends before {what}")
        op = ops[pos]
        pos += 1
        expect(op, name, what)
        if op.inputs[0] != cur:
            raise ValueError(f"operator {op.index} ({what}) does not consume the previous output")
        if op.options.get("activation", "NONE") not in ("NONE", "RELU6"):
            raise ValueError(f"operator {op.index} ({what}) has activation {op.options['activation']}")
        cur = op.outputs[0]
        return op

    for name, want in (("SUB", am.PIXEL_MEAN), ("MUL", am.PIXEL_SCALE)):
        op = next_op(name, "input normalisation")
        got = const(op.inputs[1])
        if got.shape != () or not np.isclose(float(got), want, rtol=1e-7, atol=0):
            raise ValueError(f"input normalisation {name} constant {got}, model assumes {want}")
        if op.options["activation"] != "NONE":
            raise ValueError(f"input normalisation {name} has a fused activation")

    for i, spec in enumerate(am.LAYERS):
        side = g.tensors[cur].shape[1:3]
        if side != (spec.size_in, spec.size_in):
            raise ValueError(f"{spec.name}: input side {side}, model assumes {spec.size_in}")
        if spec.graph_pad == "PAD":
            op = next_op("PAD", f"{spec.name} padding")
            pads = const(op.inputs[1])
            want = np.array([[0, 0], *spec.pad, [0, 0]])
            if pads.shape != (4, 2) or not np.array_equal(pads, want):
                raise ValueError(f"{spec.name}: PAD {pads.tolist()}, model assumes {want.tolist()}")
            mode = "VALID"
        else:
            mode = "SAME"
            p = am.tf_same_pads(spec.size_in, spec.kernel, spec.stride)
            if spec.pad != (p, p):
                raise ValueError(f"{spec.name}: model pads {spec.pad}, TF SAME gives {(p, p)}")
        kind = "DEPTHWISE_CONV_2D" if spec.depthwise else "CONV_2D"
        op = next_op(kind, spec.name)
        o = op.options
        if (o["padding"], o["stride_h"], o["stride_w"], o["dilation_h"], o["dilation_w"], o["activation"]) != (
            mode, spec.stride, spec.stride, 1, 1, "RELU6"
        ) or (spec.depthwise and o["depth_multiplier"] != 1):
            raise ValueError(f"{spec.name}: graph options {o} differ from the model's layer {spec}")
        w, b = const(op.inputs[1]), const(op.inputs[2])
        k = spec.kernel
        if spec.depthwise:
            if w.shape != (1, k, k, spec.cin):
                raise ValueError(f"{spec.name}: depthwise filter {w.shape}, expected {(1, k, k, spec.cin)}")
            kernel = w.transpose(1, 2, 0, 3)
        else:
            if w.shape != (spec.cout, k, k, spec.cin):
                raise ValueError(f"{spec.name}: filter {w.shape}, expected {(spec.cout, k, k, spec.cin)}")
            kernel = w.transpose(1, 2, 3, 0)
        if b.shape != (spec.cout,):
            raise ValueError(f"{spec.name}: bias {b.shape}, expected {(spec.cout,)}")
        out[f"layers.{i}.kernel"] = np.ascontiguousarray(kernel, np.float32)
        out[f"layers.{i}.bias"] = np.ascontiguousarray(b, np.float32)

    op = next_op("MEAN", "global average pool")
    axes = const(op.inputs[1])
    if sorted(axes.ravel().tolist()) != [1, 2] or op.options["keep_dims"]:
        raise ValueError(f"global pool MEAN over {axes.tolist()} keep_dims={op.options['keep_dims']}")
    op = next_op("MUL", "head batch norm scale")
    m = const(op.inputs[1]).astype(np.float64)
    op = next_op("ADD", "head batch norm shift")
    a = const(op.inputs[1]).astype(np.float64)
    op = next_op("FULLY_CONNECTED", "dense")
    w, b = const(op.inputs[1]).astype(np.float64), const(op.inputs[2]).astype(np.float64)
    if m.shape != (am.FEATURE_DIM,) or a.shape != (am.FEATURE_DIM,):
        raise ValueError(f"head batch norm shapes {m.shape}, {a.shape}, expected ({am.FEATURE_DIM},)")
    if w.shape != (am.EMBED_DIM, am.FEATURE_DIM) or b.shape != (am.EMBED_DIM,):
        raise ValueError(f"dense {w.shape} + {b.shape}, expected ({am.EMBED_DIM}, {am.FEATURE_DIM})")
    if op.options["activation"] != "NONE" or op.options["weights_format"] != 0:
        raise ValueError(f"dense options {op.options}")
    out["fc.kernel"] = np.ascontiguousarray((w * m[None, :]).T, np.float32)
    out["fc.bias"] = (w @ a + b).astype(np.float32)

    if pos != len(ops) or tuple(g.outputs) != (cur,):
        raise ValueError(f"graph has {len(ops) - pos} operators after the dense layer, or other outputs")
    consts = [t.index for t in g.tensors if g.is_constant(t.index)]
    if sorted(used) != sorted(consts):
        raise ValueError(
            f"constants not used exactly once: unused {sorted(set(consts) - set(used))}, "
            f"repeated {sorted({i for i in used if used.count(i) > 1})}"
        )
    total = sum(int(np.prod(g.tensors[i].shape, dtype=np.int64)) for i in consts)
    if total != GRAPH_CONSTANTS:
        raise ValueError(f"graph holds {total} constant values, expected {GRAPH_CONSTANTS}")
    return out


def convert(inputs: dict[str, Path]) -> dict[str, np.ndarray]:
    """Manifest converter: ``{"tflite": mobilenet_fp32.tflite}`` -> flat params (float32)."""
    path = Path(inputs["tflite"])
    try:
        return convert_graph(read_tflite(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
