"""The accelerator path, run on CPU: plain ``jax.lax`` layers and dm-pix's blur (what GPU /
TPU trace) equal the CPU rewrites, and the attack's matmul precision choices keep the
objective within a stated tolerance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowkey_jax.models import layers
from lowkey_jax.objective import gaussian_smooth

NHWC = ("NHWC", "HWIO", "NHWC")


def _both(f, *args):
    """(value, grads) of ``sum(sin(f))`` traced with the CPU rewrites on and off."""
    loss = lambda *a: jnp.sum(jnp.sin(f(*a)) * 1.3)
    out = []
    for enabled in (True, False):
        with layers.force_cpu_rewrites(enabled):
            g = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
            out.append(g(*args))
    return out


def _close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def test_default_path_follows_the_backend(monkeypatch):
    monkeypatch.delenv(layers.REWRITES_ENV, raising=False)
    assert layers.cpu_rewrites() == (jax.default_backend() == "cpu")
    monkeypatch.setenv(layers.REWRITES_ENV, "0")
    assert not layers.cpu_rewrites()
    with layers.force_cpu_rewrites(True):
        assert layers.cpu_rewrites()
    monkeypatch.setenv(layers.REWRITES_ENV, "maybe")
    with pytest.raises(ValueError, match="LOWKEY_JAX_CPU_REWRITES"):
        layers.cpu_rewrites()


def test_plain_path_is_plain_lax():
    x = jnp.ones((1, 9, 9, 3))
    with layers.force_cpu_rewrites(False):
        text = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool(x, 3, 2)))).lower(x).as_text()
    assert "select_and_scatter" in text  # XLA's own max-pool gradient, not the sliced one
    with layers.force_cpu_rewrites(True):
        text = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool(x, 3, 2)))).lower(x).as_text()
    assert "select_and_scatter" not in text


@pytest.mark.parametrize(("k", "stride", "pad"), [(3, 1, ((1, 1), (1, 1))), (11, 4, ((2, 2), (2, 2))), (3, 2, ((0, 1), (0, 1)))])
def test_conv_paths_agree(k, stride, pad):
    x = jax.random.normal(jax.random.key(0), (2, 23, 26, 4))
    w = jax.random.normal(jax.random.key(1), (k, k, 4, 6)) * 0.3
    f = lambda x, w: layers.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=NHWC)
    on, off = _both(f, x, w)
    _close(on, off, 1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_and_max_pool_paths_agree(stride):
    x = jax.random.normal(jax.random.key(2), (2, 15, 17, 5))
    kern = jax.random.normal(jax.random.key(3), (3, 3, 1, 5))
    on, off = _both(lambda x, k: layers.depthwise_conv(x, k, stride, ((1, 1), (1, 1))), x, kern)
    _close(on, off, 1e-4)
    on, off = _both(lambda x: layers.max_pool(x, 3, stride), x)
    _close(on, off, 1e-6)


def test_gaussian_smooth_dm_pix_path_equals_fused():
    img = jax.random.uniform(jax.random.key(4), (37, 41, 3))
    w = jax.random.normal(jax.random.key(5), (37, 41, 3))
    out = {}
    for enabled in (True, False):
        with layers.force_cpu_rewrites(enabled):
            out[enabled] = jax.jit(jax.value_and_grad(lambda x: jnp.sum(gaussian_smooth(x) * w)))(img)
            blurred = np.asarray(jax.jit(gaussian_smooth)(img))
            out[(enabled, "v")] = blurred
    np.testing.assert_allclose(out[(True, "v")], out[(False, "v")], atol=1e-6)
    _close(out[True], out[False], 1e-5)


def test_recogniser_embedding_paths_agree():
    """A whole network (SFace: convs, depthwise convs) traced both ways: same embeddings
    (max-abs 1e-4, cosine > 0.99999) and input gradients (relative L2 1e-2, cosine 0.9999)."""
    from lowkey_jax.recognizers import load_recognizer

    rec = load_recognizer("sface")
    chips = jax.random.uniform(jax.random.key(6), (2, *rec.input_size, 3))
    res = {}
    for enabled in (True, False):
        with layers.force_cpu_rewrites(enabled):
            res[enabled] = jax.jit(jax.value_and_grad(lambda c: jnp.sum(rec.embed(c) ** 2)))(chips)
            emb = np.asarray(jax.jit(rec.embed)(chips))
            res[(enabled, "e")] = emb
    a, b = res[(True, "e")], res[(False, "e")]
    np.testing.assert_allclose(a, b, atol=1e-4)
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert float(np.min(cos)) > 0.99999
    # input gradients: PReLU kinks turn summation-order differences into a few larger
    # differences (~0.5% of the largest entry at ~0.2% of pixels), so compare in L2
    ga, gb = np.asarray(res[True][1]).ravel(), np.asarray(res[False][1]).ravel()
    assert np.linalg.norm(ga - gb) <= 1e-2 * np.linalg.norm(gb)
    assert float(np.dot(ga, gb) / (np.linalg.norm(ga) * np.linalg.norm(gb))) > 0.9999


def test_precision_choices_keep_the_objective():
    """The attack's objective under each ``Config.precision``: within 1e-3 (relative) of
    "highest". On CPU all three compute float32, so this pins the plumbing; on a GPU/TPU
    ``bench/bench.py gpu`` reports the same comparison against the CPU value."""
    from lowkey_jax.attack import PRECISIONS
    from lowkey_jax.objective import Geometry, Model, clean_features, objective
    from lowkey_jax.perceptual import load_lpips
    from lowkey_jax.recognizers import load_recognizer

    rec = load_recognizer("sface")
    models = {"sface": Model(rec.embed, rec.input_size, 1)}
    lpips = load_lpips("alex")
    x = jax.random.uniform(jax.random.key(7), (96, 96, 3))
    t = jnp.asarray([[[0.5, 0.0, 20.0], [0.0, 0.5, 20.0]]], jnp.float32)
    geom = Geometry({"sface": t}, t, jnp.ones((1,), jnp.float32), jnp.float32(1.0))
    targets = clean_features(models, x, geom)
    adv = jnp.clip(x + 0.03 * jax.random.normal(jax.random.key(8), x.shape), 0.0, 1.0)
    values = {}
    for p in PRECISIONS:
        with jax.default_matmul_precision(p):
            values[p] = float(jax.jit(lambda a: objective(a, x, geom, models, targets, lpips)[0])(adv))
    for p in PRECISIONS:
        assert abs(values[p] - values["highest"]) <= 1e-3 * abs(values["highest"]) + 1e-6, values


def test_config_rejects_unknown_precision():
    from lowkey_jax.attack import Config

    assert Config().precision == "highest"
    with pytest.raises(ValueError, match="precision"):
        Config(precision="fp8")
