"""LPIPS port: reference distances, jit/vmap/grad behaviour."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lowkey_jax import load_lpips


def _image(path) -> jnp.ndarray:
    return jnp.asarray(np.asarray(Image.open(path).convert("RGB"), np.float32) / np.float32(255.0))[None]


@pytest.fixture(scope="module")
def pairs(shared):
    ref = shared / "lpips"
    expected = json.loads((ref / "expected.json").read_text())
    out = []
    for key, value in expected["pairs"].items():
        a, b = key.split("|")
        out.append((_image(ref / a), _image(ref / b), value))
    return out, expected["tolerance"]


def test_alex_reproduces_reference_distances(pairs):
    items, tol = pairs
    lpips = load_lpips("alex")
    for x, y, want in items:
        got = float(lpips(x, y)[0])
        assert abs(got - want) <= tol, f"LPIPS-alex {got:.5f} vs official {want} (tol {tol})"


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_identical_images_have_zero_distance(net, pairs):
    x = pairs[0][0][0]
    assert float(load_lpips(net)(x, x)[0]) == 0.0


def test_vgg_orders_the_reference_pairs_like_alex(pairs):
    (ref, p0, _), (_, p1, _) = pairs[0]
    alex, vgg = load_lpips("alex"), load_lpips("vgg")
    # Both backbones agree on which distortion is closer to the reference.
    assert (float(alex(ref, p0)[0]) > float(alex(ref, p1)[0])) == (float(vgg(ref, p0)[0]) > float(vgg(ref, p1)[0]))


def _stack(pairs_):
    items, _ = pairs_
    xs = jnp.concatenate([x for x, _, _ in items] + [items[0][1]])
    ys = jnp.concatenate([y for _, y, _ in items] + [items[0][0]])
    return xs, ys


def test_jit_equals_eager(pairs):
    lpips = load_lpips("alex")
    xs, ys = _stack(pairs)
    graphdef, state = nnx.split(lpips)
    jitted = jax.jit(lambda s, x, y: nnx.merge(graphdef, s)(x, y))
    np.testing.assert_allclose(np.asarray(jitted(state, xs, ys)), np.asarray(lpips(xs, ys)), rtol=1e-5, atol=1e-6)


def test_vmap_equals_python_loop(pairs):
    lpips = load_lpips("alex")
    xs, ys = _stack(pairs)
    graphdef, state = nnx.split(lpips)

    def one(x, y):
        return nnx.merge(graphdef, state)(x[None], y[None])[0]

    batched = jax.vmap(one)(xs, ys)
    looped = jnp.stack([one(x, y) for x, y in zip(xs, ys)])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_gradients_finite_and_nonzero(net, pairs):
    lpips = load_lpips(net)
    graphdef, state = nnx.split(lpips)
    (x, y, _), _ = pairs[0][0], None
    loss = lambda x_, y_: jnp.sum(nnx.merge(graphdef, state)(x_, y_))
    g = jax.grad(loss)(x, y)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0
    # At x == y (the start of every attack) the gradient must still be finite.
    g0 = jax.grad(loss)(x, x + jnp.float32(0.0))
    assert bool(jnp.all(jnp.isfinite(g0)))


def test_rejects_mismatched_shapes():
    lpips = load_lpips("alex")
    with pytest.raises(ValueError, match="equal shape"):
        lpips(jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 65, 3)))
