"""Loading LPIPS with its converted weights."""

from __future__ import annotations

from functools import cache
from typing import Literal

from flax import nnx

from lowkey_jax.checkpoint import abstract, load_params
from lowkey_jax.models.lpips import LPIPS, WEIGHTS
from lowkey_jax.store import load_weights

__all__ = ["load_lpips"]


@cache
def load_lpips(net: Literal["alex", "vgg"] = "alex") -> LPIPS:
    """LPIPS v0.1 with pretrained weights (fetched and converted on first use).

    Returns an NNX module: ``lpips(x, y) -> [N]`` with x, y float32 ``[N, H, W, 3]`` RGB in
    [0, 1]. Jittable (``nnx.jit`` or split/merge), vmappable and differentiable.
    """
    if net not in WEIGHTS:
        raise ValueError(f"net must be one of {sorted(WEIGHTS)}, got {net!r}")
    model = abstract(lambda: LPIPS(net, rngs=nnx.Rngs(0)))
    return load_params(model, load_weights(WEIGHTS[net]), name=f"weights {WEIGHTS[net]}")
