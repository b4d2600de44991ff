"""Would a recogniser still match two faces? Each recogniser at its *shipped* operating point.

Protection is decided where the software people actually run draws the line, not at a
threshold fitted to our own photos (that one, the equal error rate of ``thresholds.json``,
is still reported beside it). ``operating_points.json`` holds, per recogniser:

- ``metric``: ``"euclidean"`` (match when the distance between the raw embeddings is at most
  the threshold) or ``"cosine"`` (match when the cosine similarity is at least it);
- ``threshold`` and ``source``: where the number comes from. Shipped values are quoted from
  the original software; a model whose software ships none gets the threshold at a 0.1%
  false-accept rate on the clean impostor pairs of ``shared/faces/celebs``, fitted by
  ``bench/operating_points.py`` (``"fitted": true``).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

from lowkey_jax.metrics import paired_cosine

__all__ = ["OperatingPoint", "operating_points", "scores", "matches", "far_threshold"]

PATH = Path(__file__).parent / "operating_points.json"


class OperatingPoint(dict):
    """``{"metric", "threshold", "source", ...}`` with attribute access for the two that
    decide."""

    @property
    def metric(self) -> str:
        return self["metric"]

    @property
    def threshold(self) -> float:
        return float(self["threshold"])


@cache
def operating_points() -> dict[str, OperatingPoint]:
    """``{recogniser: OperatingPoint}`` from ``operating_points.json`` (validated)."""
    raw = json.loads(PATH.read_text())["recognizers"]
    out = {}
    for name, v in raw.items():
        if v.get("metric") not in ("cosine", "euclidean") or not isinstance(v.get("threshold"), (int, float)):
            raise ValueError(f"{PATH}: {name}: needs metric 'cosine'|'euclidean' and a numeric threshold")
        out[name] = OperatingPoint(v)
    return out


def scores(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Similarity of corresponding rows, ``[..., D] x [..., D] -> [...]``: the cosine, or the
    *negated* Euclidean distance of the raw embeddings (so that higher is always closer)."""
    if metric == "cosine":
        return paired_cosine(a, b)
    if metric == "euclidean":
        return -np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)
    raise ValueError(f"unknown metric {metric!r}")


def matches(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether recogniser ``name`` at its operating point matches corresponding rows of its
    native embeddings ``a`` and ``b`` (bool ``[...]``)."""
    op = operating_points()[name]
    s = scores(a, b, op.metric)
    return s >= (op.threshold if op.metric == "cosine" else -op.threshold)


def far_threshold(impostor_scores: np.ndarray, far: float = 0.001) -> float:
    """The smallest threshold (on a higher-is-closer score) at which at most ``far`` of the
    impostor scores reach it: midway between the impostor score just above the allowed
    count and the next one up."""
    s = np.sort(np.asarray(impostor_scores, np.float64))[::-1]
    if not len(s):
        raise ValueError("no impostor scores")
    k = int(np.floor(far * len(s)))  # impostors allowed to reach the threshold
    if k >= len(s):
        return float(s[-1])
    hi = s[k - 1] if k > 0 else s[0] + 1e-6
    return float((s[k] + hi) / 2.0) if k > 0 else float(s[0] + 1e-6)
