"""Evaluation math on small synthetic embeddings with known answers."""

import numpy as np
import pytest

from lowkey_jax.metrics import cosine_matrix, eer_threshold, match_rate, pair_scores, rank1_accuracy


def test_eer_threshold_separable_scores():
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    same = np.array([True, True, True, False, False, False])
    t, eer = eer_threshold(scores, same)
    assert eer == 0.0 and 0.3 < t <= 0.7


def test_eer_threshold_overlapping_scores():
    # same: 0.9 0.6 0.4 ; different: 0.5 0.3 0.1 -> at t in (0.4, 0.5]: FRR 1/3, FAR 1/3.
    scores = np.array([0.9, 0.6, 0.4, 0.5, 0.3, 0.1])
    same = np.array([True, True, True, False, False, False])
    t, eer = eer_threshold(scores, same)
    assert eer == pytest.approx(1 / 3) and 0.4 < t <= 0.5


def test_eer_needs_both_kinds():
    with pytest.raises(ValueError):
        eer_threshold(np.array([0.1, 0.2]), np.array([True, True]))


def test_pair_scores_and_rank1():
    e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = ["a", "a", "b", "b"]
    s, same = pair_scores(e, labels)
    assert len(s) == 6 and same.sum() == 2
    np.testing.assert_allclose(cosine_matrix(e, e).diagonal(), 1.0)
    assert rank1_accuracy(e[[1, 3]], ["a", "b"], e[[0, 2]], ["a", "b"]) == 1.0
    assert rank1_accuracy(e[[1, 3]], ["b", "a"], e[[0, 2]], ["a", "b"]) == 0.0


def test_match_rate():
    p = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    r = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert match_rate(p, r, 0.5) == pytest.approx(2 / 3)
