"""The ``--level`` presets: named attack settings, chosen by measurement.

Each preset is a set of :class:`lowkey_jax.attack.Config` overrides, chosen from the
protection/visibility sweep (``bench/sweep.py``; results in ``docs/eval/sweep.md``). The rule
for the default, ``mid``: the least visible measured setting that keeps recognisers the
attack never saw at or below a 10% match rate after the cloaked photo is halved and
re-encoded as JPEG 75. On the settings measured so far only the released LowKey setting
meets it, so ``mid`` is that setting and it is visible on faces; ``low`` is the best subtle
setting measured (a budget of 8/255 on brightness, 2/255 on colour, shaped to the photo's
texture): it defeats the recognisers in the attack but not reliably the ones it never saw.
``high`` runs longer with a lighter visibility penalty. This module imports nothing heavy, so
front ends can list the presets without starting JAX.
"""

from __future__ import annotations

__all__ = ["LEVELS", "DEFAULT_LEVEL", "describe"]

E = 1.0 / 255.0
_PLAIN = {"epsilon": None, "step_size": 0.0025, "chroma": None, "texture": 0.0, "momentum": 0.0}

LEVELS: dict[str, dict[str, float | int | None]] = {
    "low": {"steps": 50, "alpha": 0.05, "epsilon": 8 * E, "step_size": 0.8 * E, "chroma": 0.25, "texture": 0.75,
            "momentum": 0.9},
    "mid": {"steps": 50, "alpha": 0.05, **_PLAIN},  # the released LowKey setting
    "high": {"steps": 100, "alpha": 0.025, **_PLAIN},
}
DEFAULT_LEVEL = "mid"


def describe(name: str) -> str:
    """One line for ``--help`` and the web page, e.g. ``"50 steps, budget 8/255"``."""
    p = LEVELS[name]
    if p.get("epsilon") is None:
        return f"{p['steps']} steps of {p['step_size']:g}, alpha {p['alpha']:g}, no budget"
    return f"{p['steps']} steps, budget {round(p['epsilon'] * 255)}/255 on brightness, colour {p['chroma']:g}x"
