"""Shipped operating points (lowkey_jax.verification): the numbers, their direction, and
the false-accept-rate threshold rule."""

from __future__ import annotations

import numpy as np
import pytest

from lowkey_jax.recognizers import RECOGNIZERS
from lowkey_jax.verification import far_threshold, matches, operating_points, scores


def test_shipped_values_and_every_recogniser_has_one():
    ops = operating_points()
    assert set(ops) == set(RECOGNIZERS)
    assert (ops["dlib"].metric, ops["dlib"].threshold) == ("euclidean", 0.6)  # face_recognition's tolerance
    assert (ops["sface"].metric, ops["sface"].threshold) == ("cosine", 0.363)  # OpenCV FaceRecognizerSF
    for name, op in ops.items():
        assert op["source"], name
        if op.get("fitted"):  # set by bench/operating_points.py at 0.1% FAR
            assert op["fitted_on"]["far"] == 0.001 and op["fitted_on"]["impostor_pairs"] > 1000
        check = op.get("clean_check")
        if check:  # measured on clean photos: a usable operating point rejects few genuine pairs
            assert check["far"] <= 0.02 and check["frr"] < 0.5, (name, check)


def test_match_direction_for_both_metrics():
    a = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    close = a + 0.05
    far = -a
    assert matches("dlib", a, close).tolist() == [True, True]  # distance ~0.087 <= 0.6
    assert matches("dlib", a, a + 0.5).tolist() == [False, False]  # distance ~0.87
    assert matches("sface", a, close).tolist() == [True, True]
    assert matches("sface", a, far).tolist() == [False, False]
    np.testing.assert_allclose(scores(a, a + 1.0, "euclidean"), -np.sqrt(3.0))
    with pytest.raises(ValueError):
        scores(a, a, "manhattan")


def test_far_threshold_admits_exactly_the_allowed_share():
    rng = np.random.default_rng(0)
    imp = rng.normal(size=5000)
    t = far_threshold(imp, 0.001)
    assert np.sum(imp >= t) == 5  # floor(0.001 * 5000)
    t0 = far_threshold(imp[:900], 0.001)  # fewer than 1000 pairs: none may pass
    assert np.sum(imp[:900] >= t0) == 0
