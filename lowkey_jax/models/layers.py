"""Layers shared by the ported networks.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` (and for the
``conv_general_dilated=`` hook of ``nnx.Conv``) with the same results and gradients, but an
input gradient that stays fast inside ``lax.fori_loop``.

Why: the input gradient of a convolution is a convolution of the output gradient with the
spatially flipped, in/out-transposed kernel. XLA folds that transpose into the
convolution's dimension labels. Outside a loop XLA's CPU backend then materialises the
transposed kernel and calls its Eigen convolution. Inside a ``while`` body, where the
attack's 50 steps run, it does not: it falls back to a naive loop emitter, which is about
4x slower (measured with jax/jaxlib 0.10.2 on an AMD EPYC: 10 gradient steps of two 3x3
convs took 2.07 s in ``fori_loop`` against 0.52 s as separate calls). Here the input
gradient is written out explicitly, with the flipped kernel behind an
``optimization_barrier``, so it keeps the standard HWIO layout and the fast path. Weight
gradients use JAX's own rule.

These rewrites are for XLA's CPU backend. On GPU and TPU, where XLA's own convolution
gradients are the fast path, every layer here is plain ``jax.lax``: the choice is made at
trace time by :func:`cpu_rewrites` (``jax.default_backend() == "cpu"`` unless forced with
``$LOWKEY_JAX_CPU_REWRITES=0/1`` or :func:`force_cpu_rewrites`, which the tests use to run
both paths on CPU).
"""

from __future__ import annotations

import contextlib
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["conv_general_dilated", "depthwise_conv", "max_pool", "cpu_rewrites", "force_cpu_rewrites", "scale_gradient",
           "set_branch_gradient"]

_NHWC = ("NHWC", "HWIO", "NHWC")
REWRITES_ENV = "LOWKEY_JAX_CPU_REWRITES"
_forced: list[bool | None] = [None]


def cpu_rewrites() -> bool:
    """Whether layers (and the objective's Gaussian blur) take the CPU-specific path: forced
    by :func:`force_cpu_rewrites` or ``$LOWKEY_JAX_CPU_REWRITES`` (``1``/``0``), otherwise
    only on the CPU backend. Read when a function is traced."""
    if _forced[0] is not None:
        return _forced[0]
    env = os.environ.get(REWRITES_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise ValueError(f"${REWRITES_ENV} must be 0 or 1, got {env!r}")
    return jax.default_backend() == "cpu"


@contextlib.contextmanager
def force_cpu_rewrites(enabled: bool):
    """Trace with the CPU rewrites on or off whatever the backend (functions jitted before
    keep the path they were traced with)."""
    old, _forced[0] = _forced[0], bool(enabled)
    try:
        yield
    finally:
        _forced[0] = old


def _plain(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> jax.Array:
    return _plain(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
    return _plain(x, w, strides, padding), (x, w)


def _input_grad(g: jax.Array, w: jax.Array, x_shape, strides, padding) -> jax.Array:
    """Gradient w.r.t. the input of a strided, padded NHWC/HWIO convolution.

    Written in the space-to-depth view of the convolution: with ``s`` the stride, the
    padded input reshaped to ``[N, H/s, W/s, s*s*C]`` convolved at stride 1 with the kernel
    regrouped to ``[ceil(k/s), ceil(k/s), s*s*C, Cout]`` gives the same output. Its input
    gradient is a stride-1 convolution followed by depth-to-space: no zero-dilated
    gradient (which for a stride-4 11x11 kernel would cost ~13x the FLOPs).
    """
    n, h, wd, c = x_shape
    kh, kw, _, cout = w.shape
    sh, sw = strides
    th, tw = -(-kh // sh), -(-kw // sw)  # taps per phase
    wp = jnp.pad(w, ((0, th * sh - kh), (0, tw * sw - kw), (0, 0), (0, 0)))
    wp = wp.reshape(th, sh, tw, sw, c, cout).transpose(0, 2, 1, 3, 4, 5).reshape(th, tw, sh * sw * c, cout)
    flipped = jax.lax.optimization_barrier(jnp.swapaxes(wp[::-1, ::-1], 2, 3))
    gs = jax.lax.conv_general_dilated(g, flipped, (1, 1), ((th - 1, th - 1), (tw - 1, tw - 1)), dimension_numbers=_NHWC)
    ph, pw = gs.shape[1:3]
    return _unphase(gs.reshape(n, ph, pw, sh, sw, c).transpose(0, 1, 3, 2, 4, 5), x_shape, padding)


def _unphase(gp: jax.Array, shape, padding) -> jax.Array:
    """``[N, ph, sh, pw, sw, C]`` stride phases of the gradient of the padded input ->
    the gradient of the unpadded input, ``shape`` ``[N, H, W, C]``."""
    n, h, w, c = shape
    _, ph, sh, pw, sw, _ = gp.shape
    gp = gp.reshape(n, ph * sh, pw * sw, c)
    (top, _), (left, _) = padding
    gp = jnp.pad(gp, ((0, 0), (0, max(0, top + h - ph * sh)), (0, max(0, left + w - pw * sw)), (0, 0)))
    return gp[:, top : top + h, left : left + w, :]


def _conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    _, weight_vjp = jax.vjp(lambda w: _plain(x, w, strides, padding), w)
    return _input_grad(g, w, x.shape, strides, padding), weight_vjp(g)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` with a loop-friendly input gradient.

    The custom gradient covers what the ported networks use: NHWC input
    ``[N, H, W, Cin]``, HWIO kernel ``[kh, kw, Cin, Cout]``, explicit or string padding, no
    dilation, one group, default precision. Anything else goes to ``jax.lax`` unchanged.
    """
    nhwc = (
        lhs.ndim == 4
        and rhs.ndim == 4
        and dimension_numbers is not None
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    simple = feature_group_count == 1 and batch_group_count == 1 and precision is None
    if not (nhwc and undilated and simple and preferred_element_type is None and out_sharding is None and cpu_rewrites()):
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type, out_sharding=out_sharding,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads)


# --- depthwise convolution ---------------------------------------------------------------


def _depthwise_taps(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding) -> jax.Array:
    """Depthwise conv as a sum of shifted, strided slices times per-channel taps."""
    kh, kw, _, c = kernel.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :] * kernel[i, j, 0].reshape(1, 1, 1, c)
            out = tap if out is None else out + tap
    return out


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, padding):
    return _depthwise_taps(x, kernel, strides, padding)


def _depthwise_fwd(x, kernel, strides, padding):
    return _depthwise_taps(x, kernel, strides, padding), (x, kernel)


def _interleave(phases: list[list[jax.Array]], shape, padding) -> jax.Array:
    """``phases[a][b]`` ``[N, ph, pw, C]``: rows ``a::sh``, columns ``b::sw`` of the
    gradient of the padded input. Interleaves them and crops to the unpadded ``shape``."""
    return _unphase(jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2), shape, padding)


def _depthwise_bwd(strides, padding, residuals, g):
    """Input gradient per output phase (as in :func:`_input_grad`): for stride ``s`` each
    of the ``s*s`` phases of the padded input is a stride-1 depthwise conv of ``g`` with
    the flipped sub-kernel of that phase, so no tap touches a zero."""
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    th, tw = -(-kh // sh), -(-kw // sw)
    kp = jnp.pad(kernel, ((0, th * sh - kh), (0, tw * sw - kw), (0, 0), (0, 0)))
    phases = [
        [
            _depthwise_taps(g, kp[a::sh, b::sw][::-1, ::-1], (1, 1), ((th - 1, th - 1), (tw - 1, tw - 1)))
            for b in range(sw)
        ]
        for a in range(sh)
    ]
    _, kernel_vjp = jax.vjp(lambda k: _depthwise_taps(x, k, strides, padding), kernel)
    return _interleave(phases, x.shape, padding), kernel_vjp(g)[0]


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """Depthwise convolution (``feature_group_count = C``), NHWC, no bias.

    Same result as ``lax.conv_general_dilated(..., feature_group_count=C)`` up to float
    summation order, computed as a sum of shifted strided slices: XLA's CPU backend runs
    grouped convolutions, and especially their gradients, several times slower than this
    fused elementwise form. The input gradient is written out per stride phase, again as
    fused slices (the automatic transpose of strided slices is a zero-interleaving pad).

    Args:
      x: ``[N, H, W, C]``.
      kernel: ``[kh, kw, 1, C]``.
      strides: an int or ``(sh, sw)``.
      padding: ``((top, bottom), (left, right))``.
    Returns:
      ``[N, Ho, Wo, C]``.
    """
    strides = (strides, strides) if isinstance(strides, int) else tuple(int(s) for s in strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if not cpu_rewrites():
        return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC,
                                            feature_group_count=x.shape[-1])
    return _depthwise(x, kernel, strides, pads)


# --- max pooling -------------------------------------------------------------------------


def _max_pool_plain(x, window, stride):
    init = np.array(-np.inf, x.dtype)[()]  # a concrete scalar: JAX's differentiable max monoid
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, window, stride):
    return _max_pool_plain(x, window, stride)


def _max_pool_fwd(x, window, stride):
    y = _max_pool_plain(x, window, stride)
    return y, (x, y)


def _max_pool_bwd(window, stride, residuals, g):
    """Route each output's gradient to the first maximum of its window (row-major, as
    XLA's select-and-scatter does), one stride phase at a time."""
    x, y = residuals
    ho, wo = y.shape[1:3]
    taps = -(-window // stride)
    taken = jnp.zeros(y.shape, bool)
    phases = [[None] * stride for _ in range(stride)]
    for i in range(window):
        for j in range(window):
            tap = x[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
            hit = (tap == y) & ~taken
            taken = taken | hit
            ti, tj = i // stride, j // stride
            part = jnp.pad(jnp.where(hit, g, 0.0), ((0, 0), (ti, taps - 1 - ti), (tj, taps - 1 - tj), (0, 0)))
            a, b = i % stride, j % stride
            phases[a][b] = part if phases[a][b] is None else phases[a][b] + part
    zero = jnp.zeros((y.shape[0], ho + taps - 1, wo + taps - 1, y.shape[3]), g.dtype)
    phases = [[p if p is not None else zero for p in row] for row in phases]
    return (_interleave(phases, x.shape, ((0, 0), (0, 0))),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """``window x window`` max pool at ``stride``, no padding (full windows only), NHWC.

    The forward pass is XLA's ``reduce_window``; the gradient is written out as fused
    slices per stride phase, because XLA's CPU select-and-scatter (the automatic gradient)
    runs ~10x slower than the forward pass.

    Args:
      x: ``[N, H, W, C]``.
    Returns:
      ``[N, (H - window) // stride + 1, (W - window) // stride + 1, C]``.
    """
    if not cpu_rewrites():
        return _max_pool_plain(x, int(window), int(stride))
    return _max_pool(x, int(window), int(stride))


def run_layers(layers, x: jax.Array, mid_index: int) -> tuple[jax.Array, jax.Array]:
    """Apply ``layers`` in order to ``x``; return the output and the map after layer
    ``mid_index`` (the feature-level term's intermediate activation, ``mid=True``)."""
    inner = x
    for i, layer in enumerate(layers):
        x = layer(x)
        if i == mid_index:
            inner = x
    return x, inner


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_gradient(x: jax.Array, factor: float) -> jax.Array:
    return x


def _scale_fwd(x, factor):
    return x, None


def _scale_bwd(factor, _, g):
    return (g * jnp.asarray(factor, g.dtype),)


_scale_gradient.defvjp(_scale_fwd, _scale_bwd)


def scale_gradient(x: jax.Array, factor: float) -> jax.Array:
    """``x`` unchanged; its gradient multiplied by the static ``factor`` (1: a no-op).

    Residual blocks put it on their branch (``branch_grad``): the skip gradient method
    (SGM, Wu et al. 2020, "Skip connections matter") decays the gradient that flows
    through residual branches, so more of it takes the skip connections, which is known to
    make adversarial perturbations transfer better to other networks. The forward pass,
    and so every embedding, is unchanged.
    """
    factor = float(factor)
    return x if factor == 1.0 else _scale_gradient(x, factor)


def set_branch_gradient(module, factor: float) -> int:
    """Set ``branch_grad`` on every residual block of ``module`` (an NNX module tree) to
    ``factor`` (see :func:`scale_gradient`); returns how many blocks have it (0: a network
    without residual branches, left as it is)."""
    from flax import nnx

    n = 0
    for _, sub in nnx.iter_graph(module):
        if isinstance(sub, nnx.Module) and hasattr(sub, "branch_grad"):
            sub.branch_grad = float(factor)
            n += 1
    return n
