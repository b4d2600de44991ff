"""The ``--level`` presets: named attack settings, chosen by measurement.

Each preset is a set of :class:`lowkey_jax.attack.Config` overrides. They come from the
protection/visibility sweep (``bench/sweep.py``, results in ``docs/eval/sweep.md``): ``mid``
(the default) is the least visible measured setting that keeps recognisers the attack never
saw from matching after the photo is halved and re-encoded as JPEG 75; ``low`` is subtler
and weaker, ``high`` stronger and more visible. ``reference`` is the released LowKey code's
setting (visible on faces), kept for comparison. This module imports nothing heavy, so
front ends can list the presets without starting JAX.
"""

from __future__ import annotations

__all__ = ["LEVELS", "DEFAULT_LEVEL", "describe"]

E = 1.0 / 255.0

LEVELS: dict[str, dict[str, float | int | None]] = {
    "low": {"steps": 50, "alpha": 0.05, "epsilon": 4 * E, "step_size": 0.4 * E, "chroma": 0.25, "texture": 0.75,
            "momentum": 0.9},
    "mid": {"steps": 50, "alpha": 0.05, "epsilon": 6 * E, "step_size": 0.6 * E, "chroma": 0.25, "texture": 0.75,
            "momentum": 0.9},
    "high": {"steps": 50, "alpha": 0.05, "epsilon": 8 * E, "step_size": 0.8 * E, "chroma": 0.25, "texture": 0.75,
             "momentum": 0.9},
    "reference": {"steps": 50, "alpha": 0.05, "epsilon": None, "step_size": 0.0025, "chroma": None, "texture": 0.0,
                  "momentum": 0.0},
}
DEFAULT_LEVEL = "mid"


def describe(name: str) -> str:
    """One line for ``--help`` and the web page, e.g. ``"50 steps, budget 6/255"``."""
    p = LEVELS[name]
    if p.get("epsilon") is None:
        return f"{p['steps']} steps of {p['step_size']:g}, no budget (the released LowKey setting)"
    return f"{p['steps']} steps, budget {round(p['epsilon'] * 255)}/255 on brightness, colour {p['chroma']:g}x"
