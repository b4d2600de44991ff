"""The top-level Python API: ``lowkey_jax.cloak`` takes one photo or several."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

import lowkey_jax
from lowkey_jax.imageio import ImageError

TINY = dict(steps=1, models=("sface",), max_side=256, batch_size=2)


def test_exports():
    assert lowkey_jax.Config is lowkey_jax.attack.Config
    assert lowkey_jax.Result is lowkey_jax.attack.Result
    assert dataclasses.is_dataclass(lowkey_jax.Config) and lowkey_jax.Config.__dataclass_params__.frozen
    assert {"cloak", "Config", "Result"} <= set(lowkey_jax.__all__)


def test_single_and_list_inputs_without_a_face_need_no_attack(tmp_path):
    """Noise has no face: the shapes of the answers, without compiling the attack."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(noise).save(path)
    cfg = lowkey_jax.Config(**TINY)
    for single in (noise, Image.fromarray(noise), str(path), path):
        r = lowkey_jax.cloak(single, cfg, evaluate=False)
        assert isinstance(r, lowkey_jax.Result) and r.no_face
        np.testing.assert_array_equal(r.image, noise)
    many = lowkey_jax.cloak([noise, path], cfg, evaluate=False)
    assert isinstance(many, list) and len(many) == 2 and all(r.no_face for r in many)
    batch = lowkey_jax.cloak(np.stack([noise, noise]), cfg, evaluate=False)  # [N, H, W, 3] = N photos
    assert isinstance(batch, list) and len(batch) == 2
    assert lowkey_jax.cloak([], cfg) == []


def test_bad_single_inputs_say_what_is_wrong(tmp_path):
    with pytest.raises(ImageError, match="missing.jpg"):
        lowkey_jax.cloak(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="uint8"):
        lowkey_jax.cloak(np.zeros((32, 32, 3), np.float32))


def test_a_photo_path_is_cloaked_like_its_array(shared, tmp_path):
    img = Image.open(shared / "faces" / "celebs" / "img1.jpg")
    img.thumbnail((256, 256))
    arr = np.asarray(img.convert("RGB"))
    path = tmp_path / "face.png"  # lossless: reading it back gives exactly `arr`
    Image.fromarray(arr).save(path)
    cfg = lowkey_jax.Config(**TINY)
    one = lowkey_jax.cloak(path, cfg, evaluate=False)
    listed = lowkey_jax.cloak([arr], cfg, evaluate=False)
    assert isinstance(one, lowkey_jax.Result) and not one.no_face and len(listed) == 1
    assert one.image.shape == arr.shape and one.image.dtype == np.uint8
    np.testing.assert_array_equal(one.image, listed[0].image)  # same photo, same seed, same answer
    assert np.abs(one.image.astype(np.int16) - arr).max() > 0  # it did perturb the photo
