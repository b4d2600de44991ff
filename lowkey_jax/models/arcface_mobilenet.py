"""ArcFace-trained MobileNet (v1, width 1.0) face embedder, 128-D: facelib's ``mobilenet_fp32.tflite``.

The network, as read from the TFLite graph shipped in the ``facelib==1.0`` wheel
(``facelib/facerec/feature_extraction/data/mobilenet_fp32.tflite``; a Keras
``keras.applications.MobileNet`` body exported through TF 2): per its README trained with the
ArcFace loss on MS1M, input 112x112 RGB faces aligned to the ArcFace 5-point template.

Graph (38 operators, in order):

- input normalisation inside the graph: ``SUB 127.5``, ``MUL 0.0078125`` (so the graph takes
  raw 0..255 pixels; facelib's own ``FeatureExtractor.predict`` normalises a second time,
  which this port does not copy);
- ``conv1``: [Keras ``ZeroPadding2D(((0, 1), (0, 1)))`` = TFLite ``PAD``] 3x3 stride-2
  ``VALID`` conv 3 -> 32, batch norm folded into a bias, fused ReLU6;
- 13 depthwise-separable blocks ``conv_dw_i`` (3x3 depthwise, ReLU6) + ``conv_pw_i`` (1x1,
  ReLU6). Stride-1 depthwise layers are ``SAME``; the four stride-2 ones (blocks 2, 4, 6, 12)
  are ``PAD ((0, 1), (0, 1))`` + ``VALID``. Channels 32 -> 64 -> 128 -> 128 -> 256 -> 256 ->
  512 (x6) -> 1024 -> 1024; maps 112 -> 56 -> 28 -> 14 -> 7 -> 3;
- global mean over the 3x3 map, a batch norm (``MUL``, ``ADD``) and a dense 1024 -> 128 with
  bias (``FULLY_CONNECTED``); the converter folds that batch norm into the dense layer.

Padding is explicit: TF's ``SAME`` for a stride-``s`` window ``k`` on size ``n`` pads
``max((ceil(n / s) - 1) * s + k - n, 0)`` in total, the smaller half first
(:func:`tf_same_pads`); the graph's ``PAD`` amounts are stored in :data:`LAYERS` and checked
by the converter. Output: raw 128-D embeddings (no L2 normalisation in the graph; compare by
cosine).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowkey_jax.models.layers import conv_general_dilated, depthwise_conv, run_layers

__all__ = ["ArcFaceMobileNet", "ConvReLU6", "LayerSpec", "LAYERS", "tf_same_pads", "WEIGHTS",
           "INPUT_SIZE", "EMBED_DIM", "FEATURE_DIM", "PIXEL_MEAN", "PIXEL_SCALE"]

WEIGHTS = "arcface_mobilenet"
INPUT_SIZE = (112, 112)  # (height, width) of an aligned chip
EMBED_DIM = 128
FEATURE_DIM = 1024

# The graph's own input normalisation (the SUB and MUL constants; checked by the converter).
PIXEL_MEAN = 127.5
PIXEL_SCALE = 0.0078125  # 1 / 128

Pads = tuple[tuple[int, int], tuple[int, int]]


def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/TFLite ``SAME`` padding ``(before, after)`` of one spatial axis.

    Output size ``ceil(size / stride)``; total padding ``max((out - 1) * stride + kernel -
    size, 0)``, of which ``total // 2`` goes before and the rest after.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class LayerSpec(NamedTuple):
    """One conv layer: ``name`` is the Keras layer name (``conv1``, ``conv_dw_3``, ...).

    ``pad`` is the explicit ``((top, bottom), (left, right))``; ``graph_pad`` says how the
    graph expresses it: ``"PAD"`` (a separate PAD op, then VALID) or ``"SAME"``.
    """

    name: str
    depthwise: bool
    cin: int
    cout: int
    kernel: int
    stride: int
    size_in: int  # input map side
    pad: Pads
    graph_pad: str


def _layers() -> tuple[LayerSpec, ...]:
    pad_s2: Pads = ((0, 1), (0, 1))  # Keras MobileNet's ZeroPadding2D before every stride-2 layer
    out = [LayerSpec("conv1", False, 3, 32, 3, 2, 112, pad_s2, "PAD")]
    # (block, channels out of the pointwise conv, depthwise stride)
    blocks = [(1, 64, 1), (2, 128, 2), (3, 128, 1), (4, 256, 2), (5, 256, 1), (6, 512, 2),
              (7, 512, 1), (8, 512, 1), (9, 512, 1), (10, 512, 1), (11, 512, 1), (12, 1024, 2),
              (13, 1024, 1)]
    c, size = 32, 56
    for i, cout, stride in blocks:
        if stride == 2:
            out.append(LayerSpec(f"conv_dw_{i}", True, c, c, 3, 2, size, pad_s2, "PAD"))
            size = (size + 1 - 3) // 2 + 1
        else:
            p = tf_same_pads(size, 3, 1)
            out.append(LayerSpec(f"conv_dw_{i}", True, c, c, 3, 1, size, (p, p), "SAME"))
        p = tf_same_pads(size, 1, 1)
        out.append(LayerSpec(f"conv_pw_{i}", False, c, cout, 1, 1, size, (p, p), "SAME"))
        c = cout
    return tuple(out)


#: The 27 conv layers in graph order; ``ArcFaceMobileNet.layers[i]`` is ``LAYERS[i]``.
LAYERS: tuple[LayerSpec, ...] = _layers()
MID_LAYER = 12  # conv_pw_6: [N, 7, 7, 512], the middle of the 27 layers (``mid=True``)


class ConvReLU6(nnx.Module):
    """Conv (batch norm folded into ``bias``) + ReLU6, the graph's fused activation.

    Params: ``kernel`` float32 ``[k, k, cin, cout]`` (HWIO) or, depthwise, ``[k, k, 1, C]``;
    ``bias`` float32 ``[cout]``. Zero placeholders until ``load_params``. NHWC in and out.
    """

    def __init__(self, spec: LayerSpec, *, rngs: nnx.Rngs):
        del rngs  # zero placeholders (host-built: no per-shape compile); load converted weights
        shape = (spec.kernel, spec.kernel, 1, spec.cin) if spec.depthwise else (spec.kernel, spec.kernel, spec.cin, spec.cout)
        self.kernel = nnx.Param(jnp.asarray(np.zeros(shape, np.float32)))
        self.bias = nnx.Param(jnp.asarray(np.zeros((spec.cout,), np.float32)))
        self.depthwise = spec.depthwise
        self.strides = (spec.stride, spec.stride)
        self.padding = spec.pad

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.depthwise:
            y = depthwise_conv(x, self.kernel.get_value(), self.strides, self.padding)
        else:
            y = conv_general_dilated(x, self.kernel.get_value(), window_strides=self.strides,
                                     padding=self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + self.bias.get_value().reshape(1, 1, 1, -1)
        return jnp.clip(y, 0.0, 6.0)


class ArcFaceMobileNet(nnx.Module):
    """The ArcFace MobileNet embedding network.

    Call with ``chips``: float32 ``[N, 112, 112, 3]`` RGB in [0, 1], faces aligned to the
    ArcFace 5-point template (:func:`lowkey_jax.align.sface_transform`). Returns float32
    ``[N, 128]`` raw embeddings (not L2-normalised). Jittable, vmappable and differentiable
    with respect to ``chips``.

    3,327,232 parameters: the graph's 3,329,324 constant values minus the 2,048 of the head
    batch norm (folded into the dense layer) and 44 structural values (PAD amounts, MEAN
    axes, the two normalisation scalars).
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.layers = nnx.List([ConvReLU6(spec, rngs=rngs) for spec in LAYERS])
        # Dense 1024 -> 128; the head batch norm (MUL, ADD) is folded in by the converter.
        self.fc = nnx.Linear(FEATURE_DIM, EMBED_DIM, use_bias=True,
                             kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, chips: jax.Array, *, mid: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``mid=True``: also return the map after layer :data:`MID_LAYER` (the attack's
        feature-level term, ``Config.mid_weight``)."""
        if chips.ndim != 4 or tuple(chips.shape[1:]) != (*INPUT_SIZE, 3):
            raise ValueError(f"ArcFaceMobileNet expects [N, {INPUT_SIZE[0]}, {INPUT_SIZE[1]}, 3] chips, got {chips.shape}")
        x = (chips.astype(jnp.float32) * jnp.float32(255.0) - jnp.float32(PIXEL_MEAN)) * jnp.float32(PIXEL_SCALE)
        x, inner = run_layers(self.layers, x, MID_LAYER)
        out = self.fc(jnp.mean(x, axis=(1, 2)))
        return (out, inner) if mid else out
