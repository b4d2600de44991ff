"""Face-verification and identification metrics (numpy, host-side).

All functions take L2-normalisable embeddings and integer/str identity labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["cosine_matrix", "paired_cosine", "pair_scores", "eer_threshold", "rank1_accuracy", "match_rate"]


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, D] x [M, D] -> [N, M]`` cosine similarities."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of corresponding rows: ``[..., D] x [..., D] -> [...]`` (a scalar for 1-D)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def pair_scores(emb: np.ndarray, labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of every unordered pair and whether it is a same-identity pair."""
    s = cosine_matrix(emb, emb)
    labels = np.asarray(labels)
    iu = np.triu_indices(len(labels), k=1)
    return s[iu], (labels[:, None] == labels[None, :])[iu]


def eer_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The threshold where false-accept rate equals false-reject rate, and that rate.

    A pair "matches" when ``score >= threshold``. Candidate thresholds are the observed
    scores; the returned threshold is the midpoint between the two scores bracketing the
    crossing, and the EER is the mean of FAR and FRR there.
    """
    scores = np.asarray(scores, np.float64)
    same = np.asarray(same, bool)
    if same.all() or not same.any():
        raise ValueError("need both same-identity and different-identity pairs")
    cands = np.unique(scores)
    far = np.array([np.mean(scores[~same] >= t) for t in cands])
    frr = np.array([np.mean(scores[same] < t) for t in cands])
    i = int(np.argmin(np.abs(far - frr)))
    lo = cands[i - 1] if i > 0 else cands[i] - 1e-6
    return float((lo + cands[i]) / 2), float((far[i] + frr[i]) / 2)


def rank1_accuracy(probe: np.ndarray, probe_labels: Sequence, gallery: np.ndarray, gallery_labels: Sequence) -> float:
    """Fraction of probes whose most similar gallery item has the probe's identity."""
    if len(probe) == 0:
        raise ValueError("no probes")
    s = cosine_matrix(probe, gallery)
    best = np.asarray(gallery_labels)[np.argmax(s, axis=1)]
    return float(np.mean(best == np.asarray(probe_labels)))


def match_rate(probe: np.ndarray, reference: np.ndarray, threshold: float) -> float:
    """Fraction of (probe_i, reference_i) pairs whose cosine reaches ``threshold``."""
    return float(np.mean(paired_cosine(probe, reference) >= threshold))
