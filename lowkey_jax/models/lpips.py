"""LPIPS v0.1 (Zhang et al., CVPR 2018) with torchvision's AlexNet or VGG16 backbone.

Matches the official PyTorch package (``lpips==0.1.4``, ``LPIPS(net=..., version='0.1')``):
inputs in [0, 1] are mapped to [-1, 1], shifted and scaled by the ScalingLayer, passed
through the backbone; at each tapped ReLU the activations are unit-normalised over
channels, squared differences are weighted by a 1x1 linear layer (no bias), averaged over
space and summed over taps. Padding and pooling are torchvision's exactly (explicit pads,
VALID max-pools with floor rounding).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lowkey_jax.models.layers import conv_general_dilated, max_pool

__all__ = ["LPIPS", "AlexNetFeatures", "VGG16Features", "WEIGHTS"]

WEIGHTS = {"alex": "lpips_alex", "vgg": "lpips_vgg"}

_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # lpips.normalize_tensor


def _max_pool(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
    """torch.nn.MaxPool2d(window, stride) on NHWC: no padding, floor rounding."""
    return max_pool(x, window, stride)


def _conv(cin: int, cout: int, k: int, stride: int, pad: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                    conv_general_dilated=conv_general_dilated, rngs=rngs)


class AlexNetFeatures(nnx.Module):
    """torchvision ``alexnet().features``; returns the 5 ReLU outputs relu1..relu5."""

    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self, rngs: nnx.Rngs):
        spec = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
        self.convs = nnx.List([_conv(*s, rngs=rngs) for s in spec])

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):
                x = _max_pool(x)
            x = jax.nn.relu(conv(x))
            taps.append(x)
        return taps


class VGG16Features(nnx.Module):
    """torchvision ``vgg16().features``; returns relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""

    CHANNELS = (64, 128, 256, 512, 512)
    _BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(self, rngs: nnx.Rngs):
        convs, cin = [], 3
        for block in self._BLOCKS:
            for cout in block:
                convs.append(_conv(cin, cout, 3, 1, 1, rngs=rngs))
                cin = cout
        self.convs = nnx.List(convs)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps, i = [], 0
        for b, block in enumerate(self._BLOCKS):
            if b > 0:
                x = _max_pool(x, 2, 2)
            for _ in block:
                x = jax.nn.relu(self.convs[i](x))
                i += 1
            taps.append(x)
        return taps


def _unit_normalise(x: jax.Array) -> jax.Array:
    """x / (||x||_channels + 1e-10), with a finite gradient where the norm is 0."""
    ss = jnp.sum(x * x, axis=-1, keepdims=True)
    positive = ss > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, ss, 1.0)), 0.0)
    return x / (norm + _EPS)


class LPIPS(nnx.Module):
    """LPIPS distance.

    Call with ``x, y``: float32 ``[N, H, W, 3]`` RGB in [0, 1] (H, W >= 32 for AlexNet,
    >= 16 for VGG16); returns float32 ``[N]`` distances (0 for identical images).
    """

    def __init__(self, net: Literal["alex", "vgg"] = "alex", *, rngs: nnx.Rngs):
        if net == "alex":
            self.net = AlexNetFeatures(rngs)
            channels = AlexNetFeatures.CHANNELS
        elif net == "vgg":
            self.net = VGG16Features(rngs)
            channels = VGG16Features.CHANNELS
        else:
            raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
        self.lins = nnx.List([nnx.Conv(c, 1, (1, 1), use_bias=False, rngs=rngs) for c in channels])

    def _scale(self, x: jax.Array) -> jax.Array:
        shift = jnp.asarray(_SHIFT, jnp.float32).reshape(1, 1, 1, 3)
        scale = jnp.asarray(_SCALE, jnp.float32).reshape(1, 1, 1, 3)
        return ((x * 2.0 - 1.0) - shift) / scale

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two [N, H, W, 3] arrays of equal shape, got {x.shape} and {y.shape}")
        # Two passes, not one batch of 2N: when y is fixed (the clean photo in the attack),
        # its pass is loop-invariant and XLA hoists it out of the optimisation loop.
        fx, fy = self.net(self._scale(x)), self.net(self._scale(y))
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for a, b, lin in zip(fx, fy, self.lins, strict=True):
            d = (_unit_normalise(a) - _unit_normalise(b)) ** 2
            total = total + jnp.mean(lin(d), axis=(1, 2, 3))
        return total
