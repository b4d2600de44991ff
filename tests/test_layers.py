"""The shared layers (``lowkey_jax.models.layers``) against ``jax.lax``: same values, same
gradients, on every shape the ported networks use, and fast gradients inside fori_loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowkey_jax.models.layers import conv_general_dilated, depthwise_conv, max_pool

NHWC = ("NHWC", "HWIO", "NHWC")


def _grads(f, *args):
    return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a)) * 1.7), argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize(
    ("size", "k", "stride", "pad", "cin", "cout"),
    [
        (20, 3, 1, ((1, 1), (1, 1)), 5, 7),  # 3x3 same (dlib, facenet, sface)
        (21, 3, 2, ((1, 1), (1, 1)), 5, 7),  # strided, padded
        (21, 3, 2, ((0, 1), (0, 0)), 5, 7),  # asymmetric padding (TF SAME at stride 2)
        (67, 11, 4, ((2, 2), (2, 2)), 3, 8),  # AlexNet conv1
        (40, 7, 2, ((0, 0), (0, 0)), 3, 4),  # dlib stem
        (17, 1, 2, ((0, 0), (0, 0)), 4, 6),  # 1x1 strided projection
        (9, 1, 1, ((0, 0), (0, 0)), 6, 5),  # pointwise
        (13, 7, 1, ((3, 3), (0, 0)), 4, 4),  # 7x1 (facenet)
    ],
)
def test_conv_matches_lax_values_and_gradients(size, k, stride, pad, cin, cout):
    x = jax.random.normal(jax.random.key(0), (2, size, size + 3, cin))
    kw = 1 if pad[1] == (0, 0) and k == 7 and pad[0] == (3, 3) else k
    w = jax.random.normal(jax.random.key(1), (k, kw, cin, cout)) * 0.3
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=NHWC)
    ours = lambda x, w: conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=NHWC)
    np.testing.assert_array_equal(np.asarray(ours(x, w)), np.asarray(ref(x, w)))
    for a, b in zip(_grads(ours, x, w), _grads(ref, x, w), strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6 * scale, rtol=0)


def test_conv_falls_back_to_lax_for_what_it_does_not_cover():
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
    got = conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2)
    want = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    ("size", "k", "stride", "pad"),
    [(20, 3, 1, ((1, 1), (1, 1))), (21, 3, 2, ((1, 1), (1, 1))), (14, 7, 1, ((0, 0), (0, 0))), (15, 3, 2, ((0, 1), (1, 0)))],
)
def test_depthwise_matches_grouped_lax_conv(size, k, stride, pad):
    c = 5
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, c))
    w = jax.random.normal(jax.random.key(1), (k, k, 1, c))
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=NHWC, feature_group_count=c)
    ours = lambda x, w: depthwise_conv(x, w, stride, pad)
    np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(ref(x, w)), atol=1e-5, rtol=0)
    for a, b in zip(_grads(ours, x, w), _grads(ref, x, w), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * float(jnp.max(jnp.abs(b))), rtol=0)


@pytest.mark.parametrize(("shape", "window", "stride"), [((2, 15, 16, 3), 3, 2), ((2, 16, 16, 3), 2, 2), ((1, 17, 12, 4), 3, 1)])
@pytest.mark.parametrize("kind", ["normal", "relu", "rounded"])
def test_max_pool_matches_reduce_window_including_ties(shape, window, stride, kind):
    x = jax.random.normal(jax.random.key(0), shape)
    x = {"normal": x, "relu": jax.nn.relu(x), "rounded": jnp.round(x)}[kind]  # ties: many equal maxima
    init = np.array(-np.inf, np.float32)[()]
    ref = lambda x: jax.lax.reduce_window(x, init, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")
    ours = lambda x: max_pool(x, window, stride)
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(ref(x)))
    # Ties go to the same (first) element of each window as XLA's select-and-scatter.
    (a,), (b,) = _grads(ours, x), _grads(ref, x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    assert np.array_equal(np.asarray(a) != 0, np.asarray(b) != 0)


def _loop_conv_kernel_labels(conv) -> set[str]:
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 8))
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 8)) * 0.1
    f = lambda x: jnp.tanh(conv(jnp.tanh(conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC)), w, (2, 2), "SAME", dimension_numbers=NHWC))
    g = jax.grad(lambda x: jnp.sum(f(x)))
    loop = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, x: x + 1e-3 * g(x), x))
    hlo = loop.lower(x).compile().as_text()
    return set(re.findall(r"dim_labels=b01f_(\w+)->b01f", hlo))


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="asserts XLA:CPU compiler output (kernel layout); GPU/TPU compilers differ")
def test_input_gradient_inside_fori_loop_keeps_the_standard_kernel_layout():
    """Why the custom gradient exists: inside a while loop XLA's CPU backend left the
    automatic input gradient with a transposed (``01oi``) kernel and a naive loop kernel,
    ~4x slower (jax 0.10.2; see the module docstring). Ours keeps ``01io``."""
    assert _loop_conv_kernel_labels(conv_general_dilated) == {"01io"}


def test_run_layers_returns_the_output_and_the_chosen_inner_map():
    from lowkey_jax.models.layers import run_layers

    layers = [lambda v, k=k: v * 10 + k for k in range(1, 5)]
    out, inner = run_layers(layers, jnp.float32(0), 1)
    assert float(out) == 1234.0 and float(inner) == 12.0  # after the second layer
    out, inner = run_layers(layers, jnp.float32(0), 3)
    assert float(inner) == float(out)
