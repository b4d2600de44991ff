"""MTCNN (Zhang et al. 2016) P-Net, R-Net and O-Net in Flax NNX.

The three networks of facenet-pytorch 2.6.0 (``facenet_pytorch/models/mtcnn.py``), which carry
the original MTCNN weights; converted by :mod:`convert.mtcnn` (weights entry ``"mtcnn"``).
The detection pipeline (pyramid, NMS, box calibration) is in :mod:`lowkey_jax.detect`.

Conventions: NHWC float32 RGB in ``[0, 1]``; each network normalises inside as
facenet-pytorch does, ``(255 * x - 127.5) * 0.0078125`` (so the networks see ``[-1, 1]``).
All convolutions are unpadded (``VALID``). The max pools use torch's ``ceil_mode=True``,
reproduced with explicit bottom/right padding by ``-inf`` (:func:`max_pool_ceil`).

Attribute names follow facenet-pytorch's, so converted keys look like ``"pnet.conv1.kernel"``,
``"rnet.prelu4.alpha"``, ``"onet.dense6_3.bias"``. The first dense layer of R-Net / O-Net
reads the NHWC feature map flattened in (H, W, C) order (the converter reorders the kernel).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["PReLU", "PNet", "RNet", "ONet", "MTCNN", "max_pool_ceil", "normalize", "WEIGHTS",
           "PNET_CELL", "PNET_STRIDE", "RNET_SIZE", "ONET_SIZE"]

WEIGHTS = "mtcnn"
PNET_CELL = 12  # P-Net's receptive field (pixels of the pyramid level)
PNET_STRIDE = 2  # P-Net's output stride
RNET_SIZE = 24
ONET_SIZE = 48

_VALID = ((0, 0), (0, 0))


def normalize(x: jax.Array) -> jax.Array:
    """``[0, 1]`` RGB -> MTCNN's input range: ``(255 x - 127.5) / 128``, float32."""
    x = jnp.asarray(x, jnp.float32)
    return (x * jnp.float32(255.0) - jnp.float32(127.5)) * jnp.float32(0.0078125)


def _ceil_pool_size(n: int, k: int, s: int) -> tuple[int, int]:
    """torch ``ceil_mode=True`` output length and the bottom/right padding it implies."""
    out = math.ceil((n - k) / s) + 1
    if (out - 1) * s >= n:  # torch: the last window must start inside the input
        out -= 1
    return out, max((out - 1) * s + k - n, 0)


def max_pool_ceil(x: jax.Array, k: int, s: int) -> jax.Array:
    """Max pool ``k x k`` stride ``s`` of NHWC ``x``, as torch ``MaxPool2d(k, s, ceil_mode=True)``.

    Output ``[N, ceil((H - k) / s) + 1, ceil((W - k) / s) + 1, C]``; windows that run past the
    bottom/right edge see ``-inf`` there (explicit padding ``((0, 0), (0, ph), (0, pw), (0, 0))``).
    """
    _, h, w, _ = x.shape
    _, ph = _ceil_pool_size(h, k, s)
    _, pw = _ceil_pool_size(w, k, s)
    return jax.lax.reduce_window(
        x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, k, k, 1), (1, s, s, 1),
        ((0, 0), (0, ph), (0, pw), (0, 0)),
    )


class PReLU(nnx.Module):
    """Per-channel PReLU: ``x if x > 0 else alpha * x``; ``alpha`` float32 ``[C]``."""

    def __init__(self, channels: int):
        self.alpha = nnx.Param(jnp.full((channels,), 0.25, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.alpha.get_value().reshape((1,) * (x.ndim - 1) + (-1,))
        return jnp.where(x > 0, x, a * x)


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, kernel_size=(k, k), padding=_VALID, rngs=rngs)


class PNet(nnx.Module):
    """Proposal network, fully convolutional.

    Input ``[N, H, W, 3]`` float32 RGB in ``[0, 1]`` (H, W >= 12). Output cell ``(i, j)`` looks
    at the input window rows ``[2i, 2i + 12)``, cols ``[2j, 2j + 12)``; the output is
    ``[N, h, w]`` with ``h = ceil((H - 2) / 2) - 4`` (same for ``w``).
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = _conv(3, 10, 3, rngs)
        self.prelu1 = PReLU(10)
        self.conv2 = _conv(10, 16, 3, rngs)
        self.prelu2 = PReLU(16)
        self.conv3 = _conv(16, 32, 3, rngs)
        self.prelu3 = PReLU(32)
        self.conv4_1 = _conv(32, 2, 1, rngs)
        self.conv4_2 = _conv(32, 4, 1, rngs)

    def __call__(self, x: jax.Array, valid_hw: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Face probability and box regression per output cell.

        Args:
          x: ``[N, H, W, 3]`` float32 in ``[0, 1]``.
          valid_hw: optional int32 ``[N, 2]``: only the top-left ``valid_hw[n]`` pixels of image
            ``n`` are real (the rest is padding). Outputs of cells inside the valid area's own
            output grid (``ceil((valid - 2) / 2) - 4`` per axis) then equal those of the
            unpadded image exactly, including the ceil-mode pool at its border; other cells are
            meaningless.

        Returns:
          ``prob`` float32 ``[N, h, w]`` in ``[0, 1]`` and ``reg`` float32 ``[N, h, w, 4]``
          (``dx1, dy1, dx2, dy2`` in units of the 12-pixel cell).
        """
        x = self.prelu1(self.conv1(normalize(x)))
        if valid_hw is not None:
            n, h, w, _ = x.shape
            valid_hw = jnp.asarray(valid_hw, jnp.int32)
            rows = jax.lax.broadcasted_iota(jnp.int32, (n, h, w, 1), 1)
            cols = jax.lax.broadcasted_iota(jnp.int32, (n, h, w, 1), 2)
            keep = (rows < valid_hw[:, 0].reshape(n, 1, 1, 1) - 2) & (cols < valid_hw[:, 1].reshape(n, 1, 1, 1) - 2)
            x = jnp.where(keep, x, jnp.float32(-jnp.inf))
            x = max_pool_ceil(x, 2, 2)
            x = jnp.where(jnp.isfinite(x), x, jnp.float32(0.0))  # fully padded windows
        else:
            x = max_pool_ceil(x, 2, 2)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        prob = jax.nn.softmax(self.conv4_1(x), axis=-1)[..., 1]
        reg = self.conv4_2(x)
        return prob, reg


class RNet(nnx.Module):
    """Refinement network: ``[N, 24, 24, 3]`` float32 RGB in ``[0, 1]`` crops.

    Returns ``prob`` float32 ``[N]`` in ``[0, 1]`` and ``reg`` float32 ``[N, 4]`` (``dx1, dy1,
    dx2, dy2`` in units of the crop's box size).
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = _conv(3, 28, 3, rngs)
        self.prelu1 = PReLU(28)
        self.conv2 = _conv(28, 48, 3, rngs)
        self.prelu2 = PReLU(48)
        self.conv3 = _conv(48, 64, 2, rngs)
        self.prelu3 = PReLU(64)
        self.dense4 = nnx.Linear(576, 128, rngs=rngs)
        self.prelu4 = PReLU(128)
        self.dense5_1 = nnx.Linear(128, 2, rngs=rngs)
        self.dense5_2 = nnx.Linear(128, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.prelu1(self.conv1(normalize(x)))  # 22
        x = max_pool_ceil(x, 3, 2)  # 11
        x = self.prelu2(self.conv2(x))  # 9
        x = max_pool_ceil(x, 3, 2)  # 4
        x = self.prelu3(self.conv3(x))  # 3
        x = self.prelu4(self.dense4(x.reshape(x.shape[0], -1)))
        prob = jax.nn.softmax(self.dense5_1(x), axis=-1)[:, 1]
        return prob, self.dense5_2(x)


class ONet(nnx.Module):
    """Output network: ``[N, 48, 48, 3]`` float32 RGB in ``[0, 1]`` crops.

    Returns ``prob`` float32 ``[N]`` in ``[0, 1]``, ``reg`` float32 ``[N, 4]`` (as R-Net) and
    ``landmarks`` float32 ``[N, 5, 2]``: ``(x, y)`` of the 5 points as fractions of the crop's
    width / height, in MTCNN's order (image-left eye, image-right eye, nose, image-left and
    image-right mouth corners).
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = _conv(3, 32, 3, rngs)
        self.prelu1 = PReLU(32)
        self.conv2 = _conv(32, 64, 3, rngs)
        self.prelu2 = PReLU(64)
        self.conv3 = _conv(64, 64, 3, rngs)
        self.prelu3 = PReLU(64)
        self.conv4 = _conv(64, 128, 2, rngs)
        self.prelu4 = PReLU(128)
        self.dense5 = nnx.Linear(1152, 256, rngs=rngs)
        self.prelu5 = PReLU(256)
        self.dense6_1 = nnx.Linear(256, 2, rngs=rngs)
        self.dense6_2 = nnx.Linear(256, 4, rngs=rngs)
        self.dense6_3 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = self.prelu1(self.conv1(normalize(x)))  # 46
        x = max_pool_ceil(x, 3, 2)  # 23
        x = self.prelu2(self.conv2(x))  # 21
        x = max_pool_ceil(x, 3, 2)  # 10
        x = self.prelu3(self.conv3(x))  # 8
        x = max_pool_ceil(x, 2, 2)  # 4
        x = self.prelu4(self.conv4(x))  # 3
        x = self.prelu5(self.dense5(x.reshape(x.shape[0], -1)))
        prob = jax.nn.softmax(self.dense6_1(x), axis=-1)[:, 1]
        pts = self.dense6_3(x)  # x1..x5, y1..y5
        landmarks = jnp.stack([pts[:, :5], pts[:, 5:]], axis=-1)
        return prob, self.dense6_2(x), landmarks


class MTCNN(nnx.Module):
    """The three networks together (the unit the ``"mtcnn"`` weights are converted for)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.pnet = PNet(rngs=rngs)
        self.rnet = RNet(rngs=rngs)
        self.onet = ONet(rngs=rngs)
