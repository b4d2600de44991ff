"""SFace face recognizer (OpenCV model zoo ``face_recognition_sface_2021dec``), 128-D embeddings.

The network, read from the ONNX graph (``face_recognition_sface_2021dec_int8bq.onnx``), is a
plain MobileNet-v1-style stack (its tensor names follow insightface's MXNet "fmobilenet"):
27 conv layers, each ``Conv (no bias) -> BatchNormalization (eps 1e-3) -> PRelu``, alternating
3x3 depthwise and 1x1 pointwise convolutions, with no residual connections. The head is
``BatchNormalization (eps 2e-5) -> Dropout (inference: identity) -> Flatten (NCHW) ->
Gemm 50176 -> 128 -> BatchNormalization (eps 2e-5)``.

In this port every BatchNormalization is folded at conversion time (``convert/sface.py``):
each conv's BN into the conv's kernel and a bias, and the two head BNs into a single dense
layer, whose rows are also permuted from ONNX's NCHW flatten order to NHWC. Strides, pads and
groups equal the ONNX attributes (all pads explicit and symmetric: 1 for 3x3, 0 for 1x1).

Input convention of the ONNX graph: ``data`` float32 [N, 3, 112, 112], RGB in 0..255 (OpenCV's
``FaceRecognizerSF::feature`` calls ``blobFromImage(img, 1, Size(112, 112), Scalar(), swapRB=true)``
on a BGR chip), normalised inside the graph as ``(data - 127.5) * 0.0078125``. This module
takes RGB in [0, 1] NHWC and applies ``(255 * x - 127.5) * 0.0078125``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lowkey_jax.models.layers import conv_general_dilated, depthwise_conv, run_layers

__all__ = ["SFace", "ConvPReLU", "LayerSpec", "LAYERS", "WEIGHTS", "INPUT_SIZE", "EMBED_DIM"]

WEIGHTS = "sface"
INPUT_SIZE = (112, 112)  # (height, width) of an aligned chip
EMBED_DIM = 128

# The graph's own input normalisation (initializers ``scalar_op1`` / ``scalar_op2``).
PIXEL_MEAN = 127.5
PIXEL_SCALE = 0.0078125  # 1 / 128


class LayerSpec(NamedTuple):
    """One ``Conv -> BN -> PRelu`` layer; ``name`` is the ONNX prefix (``conv_2_dw``...)."""

    name: str
    cin: int
    cout: int
    kernel: int
    stride: int
    pad: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
    groups: int


def _layers() -> tuple[LayerSpec, ...]:
    p1, p0 = ((1, 1), (1, 1)), ((0, 0), (0, 0))
    # (index, channels in, channels out, depthwise stride) of conv_2 .. conv_14.
    blocks = [(2, 32, 64, 1), (3, 64, 128, 2), (4, 128, 128, 1), (5, 128, 256, 2),
              (6, 256, 256, 1), (7, 256, 512, 2), (8, 512, 512, 1), (9, 512, 512, 1),
              (10, 512, 512, 1), (11, 512, 512, 1), (12, 512, 512, 1), (13, 512, 1024, 2),
              (14, 1024, 1024, 1)]
    out = [LayerSpec("conv_1", 3, 32, 3, 1, p1, 1)]
    for i, cin, cout, stride in blocks:
        out.append(LayerSpec(f"conv_{i}_dw", cin, cin, 3, stride, p1, cin))
        out.append(LayerSpec(f"conv_{i}", cin, cout, 1, 1, p0, 1))
    return tuple(out)


#: The 27 conv layers in graph order; ``SFace.layers[i]`` is ``LAYERS[i]``.
LAYERS: tuple[LayerSpec, ...] = _layers()
MID_LAYER = 12  # conv_7 (pointwise): [N, 14, 14, 512], the middle of the 27 layers (``mid=True``)
FEATURE_SHAPE = (7, 7, 1024)  # (H, W, C) after conv_14 for a 112x112 input
FLAT_DIM = FEATURE_SHAPE[0] * FEATURE_SHAPE[1] * FEATURE_SHAPE[2]  # 50176

# Pretrained-only model: parameters start as zeros (placeholders for ``load_params``), which
# avoids compiling a random initializer per parameter shape (~15 s on CPU).
_ZEROS = nnx.initializers.zeros_init()


class ConvPReLU(nnx.Module):
    """Conv (BatchNorm folded into ``kernel``/``bias``) followed by per-channel PReLU.

    ``alpha`` [C] is the PReLU slope for negative inputs: ``y if y >= 0 else alpha * y``.
    """

    def __init__(self, spec: LayerSpec, *, precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            spec.cin, spec.cout, (spec.kernel, spec.kernel), strides=(spec.stride, spec.stride),
            padding=spec.pad, feature_group_count=spec.groups, use_bias=True, precision=precision,
            kernel_init=_ZEROS, conv_general_dilated=conv_general_dilated, rngs=rngs,
        )
        self.alpha = nnx.Param(jnp.zeros((spec.cout,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv.feature_group_count > 1:
            y = depthwise_conv(x, self.conv.kernel[...], self.conv.strides, self.conv.padding)
            y = y + self.conv.bias[...].reshape(1, 1, 1, -1)
        else:
            y = self.conv(x)
        alpha = self.alpha[...].reshape((1,) * (y.ndim - 1) + (-1,))
        return jnp.where(y >= 0, y, alpha * y)


class SFace(nnx.Module):
    """SFace embedding network.

    Call with ``chips``: float32 ``[N, 112, 112, 3]`` RGB in [0, 1], faces aligned to the
    standard ArcFace 5-point template (as ``cv2.FaceRecognizerSF.alignCrop`` does). Returns
    float32 ``[N, 128]`` raw embeddings (not L2-normalised; compare them by cosine similarity).
    Jittable, vmappable and differentiable with respect to ``chips``.

    Parameters are zero placeholders until ``lowkey_jax.checkpoint.load_params`` fills them with
    the converted weights ``WEIGHTS``.

    Args:
      precision: passed to every conv and the dense layer (``None``: XLA's default; use
        ``jax.lax.Precision.HIGHEST`` to rule out TF32 on GPUs).
    """

    def __init__(self, *, precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
        self.layers = nnx.List([ConvPReLU(spec, precision=precision, rngs=rngs) for spec in LAYERS])
        self.fc = nnx.Linear(FLAT_DIM, EMBED_DIM, use_bias=True, precision=precision, kernel_init=_ZEROS, rngs=rngs)

    def __call__(self, chips: jax.Array, *, mid: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``mid=True``: also return the map after layer :data:`MID_LAYER` (the attack's
        feature-level term, ``Config.mid_weight``)."""
        if chips.ndim != 4 or tuple(chips.shape[1:]) != (*INPUT_SIZE, 3):
            raise ValueError(f"SFace expects [N, {INPUT_SIZE[0]}, {INPUT_SIZE[1]}, 3] chips, got {chips.shape}")
        x = (chips.astype(jnp.float32) * jnp.float32(255.0) - jnp.float32(PIXEL_MEAN)) * jnp.float32(PIXEL_SCALE)
        x, inner = run_layers(self.layers, x, MID_LAYER)
        # NHWC flatten; the converter permuted the dense rows from ONNX's NCHW order.
        out = self.fc(x.reshape(x.shape[0], FLAT_DIM))
        return (out, inner) if mid else out
