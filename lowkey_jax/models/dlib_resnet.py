"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1``, 128-D, CC0).

A Flax NNX re-implementation of dlib's ``anet_type`` (``dnn_face_recognition_ex.cpp``),
weights converted from the original ``.dat`` by :mod:`convert.dlib`. The network (29 conv
layers + fc, 5,614,592 parameters), NHWC, on a ``150 x 150`` chip::

    conv 7x7/2 (32, pad 0) -> affine -> relu -> max_pool 3x3/2 (pad 0)       150 -> 72 -> 35
    3 x block(32)                                                              35
    block_down(64)  + 3 x block(64)                                            17
    block_down(128) + 2 x block(128)                                            8
    block_down(256) + 2 x block(256)                                            4 (!)
    block_down(256)                                                             2 (!)
    global average pool -> fc (256 -> 128, no bias)

``block(N)``: ``relu(x + affine(conv3x3(relu(affine(conv3x3(x))))))`` with stride-1 convs
padded by 1. ``block_down(N)``: the first conv has stride 2 and, as dlib's default for any
stride != 1, **no padding**; the shortcut is a 2x2 stride-2 average pool of ``x``.

dlib details reproduced here (``dnn/layers.h``, ``cuda/cpu_dlib.cpp``):

- pooling and convolution output size ``1 + (in + 2 pad - k) // stride``;
- ``add_prev`` of tensors of different shapes (dlib ``tt::add``): the output has the
  elementwise maximum of both shapes and each input is zero-extended at the high end
  (more channels, extra bottom rows / right columns). This happens in every downsampling
  block with a channel increase, and spatially twice: 8x8 -> conv 3x3 (3x3 map) vs. the
  avg-pooled shortcut (4x4 map), giving a 4x4 map whose last row and column hold only the
  shortcut; and 4x4 -> 1x1 vs. 2x2 -> 2x2;
- ``affine`` = per-channel ``x * gamma + beta`` (batch norm folded at training time);
- input: ``input_rgb_image_sized<150>``: ``(pixel - mean) / 256`` per channel, red, green,
  blue means ``(122.782, 117.001, 104.298)``, pixel in 0..255;
- the descriptor is the raw fc output (``loss_metric`` does not normalise it); dlib
  compares descriptors with a Euclidean distance threshold of 0.6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowkey_jax.models.layers import conv_general_dilated, max_pool, run_layers, scale_gradient

__all__ = [
    "DlibResNet",
    "ResBlock",
    "Conv",
    "Affine",
    "WEIGHTS",
    "INPUT_SIZE",
    "EMBED_DIM",
    "INPUT_MEANS",
    "STAGES",
    "NUM_PARAMS",
    "add_prev",
    "normalize",
]

WEIGHTS = "dlib_resnet"
INPUT_SIZE = (150, 150)
EMBED_DIM = 128
NUM_PARAMS = 5_614_592
# input_rgb_image_sized's per-channel means, red, green, blue (0..255 scale)
INPUT_MEANS = (122.782, 117.001, 104.298)
# (filters, blocks, first block downsamples), input to output: dlib's alevel4 .. alevel0
STAGES: tuple[tuple[int, int, bool], ...] = (
    (32, 3, False),
    (64, 4, True),
    (128, 3, True),
    (256, 3, True),
    (256, 1, True),
)

# Residual blocks before the intermediate map of ``mid=True``: the end of the 64-filter
# stage, [N, 19, 19, 64], half-way through the 14 blocks.
MID_BLOCKS = 7

Pads = tuple[tuple[int, int], tuple[int, int]]


def _dlib_pad(k: int, stride: int) -> Pads:
    """dlib's default conv/pool padding: ``k // 2`` on both sides for stride 1, else none."""
    p = k // 2 if stride == 1 else 0
    return ((p, p), (p, p))


def normalize(chips: jax.Array) -> jax.Array:
    """dlib's input layer on ``[N, H, W, 3]`` float32 RGB in [0, 1]: ``(255 x - mean) / 256``."""
    means = jnp.asarray(np.array(INPUT_MEANS, np.float32).reshape(1, 1, 1, 3))
    return (chips * jnp.float32(255.0) - means) / jnp.float32(256.0)


def add_prev(a: jax.Array, b: jax.Array) -> jax.Array:
    """dlib's ``add_prev`` (``tt::add``) of two NHWC tensors of possibly different shapes.

    The result has the elementwise maximum shape; each input is zero-padded at the end of
    every axis (bottom rows, right columns, last channels). Shapes are static, so this is
    plain ``jnp.pad`` under jit.
    """
    shape = tuple(max(x, y) for x, y in zip(a.shape, b.shape, strict=True))

    def ext(t: jax.Array) -> jax.Array:
        if t.shape == shape:
            return t
        return jnp.pad(t, [(0, s - d) for s, d in zip(shape, t.shape, strict=True)])

    return ext(a) + ext(b)


def _max_pool(x: jax.Array, k: int, stride: int) -> jax.Array:
    """``k x k`` stride ``stride`` max pool without padding, NHWC."""
    return max_pool(x, k, stride)


def _avg_pool(x: jax.Array, k: int, stride: int) -> jax.Array:
    """``k x k`` stride ``stride`` average pool without padding (full windows only), NHWC."""
    init = np.array(0, x.dtype)[()]
    s = jax.lax.reduce_window(x, init, jax.lax.add, (1, k, k, 1), (1, stride, stride, 1), ((0, 0),) * 4)
    return s / jnp.float32(k * k)


class Conv(nnx.Module):
    """dlib ``con_``: 2-D cross-correlation + per-filter bias, NHWC.

    Params: ``kernel`` float32 ``[k, k, cin, cout]`` (HWIO), ``bias`` float32 ``[cout]``,
    created as zeros (the model only makes sense with converted weights). Padding is dlib's
    default for the stride (``k // 2`` if stride 1, else 0).
    """

    def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, rngs: nnx.Rngs):
        del rngs  # zero placeholders; load converted weights with load_params
        self.kernel = nnx.Param(jnp.asarray(np.zeros((k, k, cin, cout), np.float32)))
        self.bias = nnx.Param(jnp.asarray(np.zeros((cout,), np.float32)))
        self.stride = stride
        self.padding = _dlib_pad(k, stride)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv_general_dilated(
            x,
            self.kernel.get_value(),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias.get_value()[None, None, None, :]


class Affine(nnx.Module):
    """dlib ``affine_`` in CONV_MODE: ``x * gamma + beta`` per channel (float32 ``[c]`` each)."""

    def __init__(self, c: int):
        self.gamma = nnx.Param(jnp.asarray(np.ones((c,), np.float32)))
        self.beta = nnx.Param(jnp.asarray(np.zeros((c,), np.float32)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma.get_value()[None, None, None, :] + self.beta.get_value()[None, None, None, :]


class ResBlock(nnx.Module):
    """dlib ``ares`` (stride 1) / ``ares_down`` (stride 2) residual block, NHWC.

    ``relu(add_prev(affine2(conv2(relu(affine1(conv1(x))))), shortcut))`` where the
    shortcut is ``x`` (stride 1) or ``avg_pool 2x2/2 (x)`` (stride 2), zero-extended by
    :func:`add_prev` where shapes differ.
    """

    def __init__(self, cin: int, cout: int, *, stride: int, rngs: nnx.Rngs):
        if stride == 1 and cin != cout:
            raise ValueError("a stride-1 block keeps the channel count in this network")
        self.conv1 = Conv(cin, cout, 3, stride=stride, rngs=rngs)
        self.affine1 = Affine(cout)
        self.conv2 = Conv(cout, cout, 3, stride=1, rngs=rngs)
        self.affine2 = Affine(cout)
        self.stride = stride
        self.branch_grad = 1.0  # gradient factor on the residual branch (layers.scale_gradient)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.affine1(self.conv1(x)))
        y = scale_gradient(self.affine2(self.conv2(y)), self.branch_grad)
        if self.stride == 1:
            return jax.nn.relu(y + x)
        return jax.nn.relu(add_prev(y, _avg_pool(x, 2, 2)))


class DlibResNet(nnx.Module):
    """dlib's 128-D face descriptor network.

    ``model(chips)``: ``chips`` float32 ``[N, 150, 150, 3]``, RGB in [0, 1], aligned like
    dlib's ``get_face_chip(size=150, padding=0.25)`` -> float32 ``[N, 128]``, the raw
    (not normalised; norm about 1.4 on face chips) descriptor, equal to dlib's ``compute_face_descriptor``.
    Jittable and differentiable.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = Conv(3, 32, 7, stride=2, rngs=rngs)
        self.affine = Affine(32)
        blocks = []
        cin = 32
        for n, count, down in STAGES:
            for j in range(count):
                blocks.append(ResBlock(cin, n, stride=2 if down and j == 0 else 1, rngs=rngs))
                cin = n
        self.blocks = nnx.List(blocks)
        self.fc = nnx.Linear(cin, EMBED_DIM, use_bias=False, rngs=rngs)

    def __call__(self, chips: jax.Array, *, mid: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``mid=True``: also return the map after :data:`MID_BLOCKS` residual blocks (the
        attack's feature-level term, ``Config.mid_weight``)."""
        if chips.shape[1:] != (*INPUT_SIZE, 3):
            raise ValueError(f"expected [N, {INPUT_SIZE[0]}, {INPUT_SIZE[1]}, 3] chips, got {chips.shape}")
        x = normalize(chips.astype(jnp.float32))
        x = _max_pool(jax.nn.relu(self.affine(self.conv(x))), 3, 2)
        x, inner = run_layers(self.blocks, x, MID_BLOCKS - 1)
        x = jnp.mean(x, axis=(1, 2))  # avg_pool_everything -> [N, 256]
        return (self.fc(x), inner) if mid else self.fc(x)
