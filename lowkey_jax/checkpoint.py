"""Strict loading of converted weights into NNX modules.

Converted checkpoints are flat ``{"path.to.param": array}`` dicts whose keys are the
module's own attribute paths joined with ``"."`` (list indices included, e.g.
``"blocks.0.conv.kernel"``). Loading is all-or-nothing: any missing key, unexpected key,
shape or dtype mismatch raises :class:`CheckpointError` listing every problem at once.

Modules are built abstractly (:func:`abstract`: ``nnx.eval_shape``, no random
initialisation) and then filled: building them with real random weights that are thrown
away at once cost one compiled program per distinct initialiser shape (a few hundred small
XLA programs per process, seconds on every CLI start).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["CheckpointError", "abstract", "flat_params", "load_params"]


class CheckpointError(ValueError):
    """A checkpoint does not match the module it is loaded into."""


M = TypeVar("M", bound=nnx.Module)


def abstract(factory: Callable[[], M]) -> M:
    """``factory()`` built without computing anything: every parameter is a
    ``jax.ShapeDtypeStruct`` until :func:`load_params` fills it (which fails listing any
    parameter it cannot fill, so no placeholder survives)."""
    return nnx.eval_shape(factory)


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, jnp.ndarray]:
    """The module's parameters as a flat ``{"a.b.kernel": array}`` dict."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {_key(path): var.get_value() for path, var in flat}


def load_params(model: nnx.Module, params: Mapping[str, np.ndarray], *, name: str = "checkpoint") -> nnx.Module:
    """Replace every ``nnx.Param`` of ``model`` with ``params`` (in place) and return it.

    ``model`` may be concrete or :func:`abstract`. Values are copied to the default device
    with ``jax.device_put`` (``jnp.asarray`` would compile a program per parameter shape).

    Raises:
      CheckpointError: listing missing keys, unexpected keys and shape/dtype mismatches.
    """
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    expected = {_key(path): (path, var) for path, var in flat}
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    mismatched = []
    for key in sorted(set(expected) & set(params)):
        want = expected[key][1].get_value()
        got = np.asarray(params[key])
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            mismatched.append(f"{key}: checkpoint {got.dtype}{list(got.shape)} != model {want.dtype}{list(want.shape)}")
    if missing or unexpected or mismatched:
        lines = [f"{name} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if mismatched:
            lines.append(f"  shape/dtype mismatches ({len(mismatched)}):")
            lines.extend("    " + m for m in mismatched)
        raise CheckpointError("\n".join(lines))
    for key, (_, var) in expected.items():
        var.set_value(jax.device_put(np.asarray(params[key])))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
