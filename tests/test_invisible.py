"""Invisible cloaks: the perturbation budget, luminance/chroma shaping, the texture mask,
momentum and smoothed gradients (``Config.epsilon / chroma / texture / momentum /
smooth_grad``), and the face-region verdicts on a real photo."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image, ImageOps

from lowkey_jax.attack import Attack, Config, _optimiser, cloak, prepare
from lowkey_jax.detect import detect_faces
from lowkey_jax.models.layers import scale_gradient, set_branch_gradient
from lowkey_jax.objective import (YCBCR_TO_RGB, Geometry, _chips, _denser, budget_map, downscaled_view, face_regions,
                                  isotropy, local_contrast, mid_distance, to_rgb)
from lowkey_jax.recognizers import RECOGNIZERS, load_recognizer

EPS = 3.0 / 255.0
SMALL = dict(steps=4, models=("sface",), max_side=256, batch_size=1)


@pytest.fixture(scope="module")
def photo(shared) -> np.ndarray:
    im = ImageOps.exif_transpose(Image.open(shared / "faces" / "celebs" / "img25.jpg")).convert("RGB")
    im.thumbnail((256, 256))
    return np.asarray(im)


def _delta(photo: np.ndarray, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(working-resolution perturbation after the final clip, working image)."""
    p = prepare(0, photo, detect_faces(photo), cfg)
    delta, dist, _ = Attack(cfg).run_batch([p], 0)
    h, w = p.working.shape[:2]
    assert np.isfinite(dist).all()
    return delta[0, :h, :w], p.working


def _unclipped(x: np.ndarray, margin: float) -> np.ndarray:
    return np.all((x > margin) & (x < 1.0 - margin), axis=-1)


def test_config_validates_the_new_settings():
    for bad in (dict(epsilon=0.0), dict(epsilon=2.0), dict(chroma=-0.1), dict(texture=0.5), dict(texture=1.5, epsilon=0.01),
                dict(momentum=1.0), dict(smooth_grad=-1.0), dict(rescale=-0.1), dict(rescale=0.8), dict(mid_weight=-1.0),
                dict(lpips_face_side=16), dict(skip_grad=0.0), dict(skip_grad=1.5),
                dict(edges=0.5, texture=0.0, epsilon=0.01), dict(edges=1.5, texture=0.5, epsilon=0.01),
                dict(flip="none"), dict(flip="random", mid_weight=1.0), dict(step_rule="l2")):
        with pytest.raises(ValueError):
            Config(**bad)
    Config(epsilon=EPS, chroma=0.25, texture=0.75, edges=1.0, momentum=0.9, smooth_grad=1.0, rescale=0.5)  # valid


def test_ycbcr_round_trip_and_luma_only_is_grey():
    m = np.asarray(YCBCR_TO_RGB)
    rgb = np.asarray(jax.random.uniform(jax.random.key(0), (50, 3), jnp.float32, -1, 1))
    ycc = rgb @ np.linalg.inv(m).T
    np.testing.assert_allclose(np.asarray(to_rgb(jnp.asarray(ycc, jnp.float32), 0.5)), rgb, atol=1e-5)
    z = jnp.zeros((4, 3), jnp.float32).at[:, 0].set(jnp.arange(4.0, dtype=jnp.float32))
    out = np.asarray(to_rgb(z, 0.0))
    np.testing.assert_allclose(out, np.repeat(np.arange(4.0)[:, None], 3, axis=1), atol=1e-6)  # Y offsets are grey
    assert to_rgb(z, None) is z


def test_texture_mask_gives_flat_regions_less_budget():
    flat = jnp.full((32, 32, 3), 0.5, jnp.float32)
    noisy = jnp.clip(0.5 + 0.2 * jax.random.normal(jax.random.key(0), (32, 32, 3)), 0.0, 1.0)
    img = jnp.concatenate([flat, noisy], axis=1)
    c = np.asarray(local_contrast(img))[..., 0]
    assert c[:, :20].max() < 1e-3 < 0.05 < c[:, 44:].min()
    b = np.asarray(budget_map(img, EPS, 0.75, 0.25))
    # Flat: 25% of the budget; textured: all of it; chroma channels a quarter of luminance.
    np.testing.assert_allclose(b[:, :20, 0], 0.25 * EPS, rtol=1e-3)
    np.testing.assert_allclose(b[:, 44:, 0], EPS, rtol=1e-5)
    np.testing.assert_allclose(b[..., 1], 0.25 * b[..., 0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(budget_map(img, EPS, 0.0, None)), EPS, rtol=1e-6)


def test_edge_protection_takes_the_budget_off_edges_but_not_off_texture():
    # Left: a vertical step edge (one direction); right: noise (no main direction).
    step = jnp.concatenate([jnp.full((48, 24, 3), 0.3, jnp.float32), jnp.full((48, 24, 3), 0.7, jnp.float32)], axis=1)
    noisy = jnp.clip(0.5 + 0.2 * jax.random.normal(jax.random.key(1), (48, 48, 3)), 0.0, 1.0)
    img = jnp.concatenate([step, noisy], axis=1)
    iso = np.asarray(isotropy(img))[..., 0]
    assert iso.min() >= 0.0 and iso.max() <= 1.0 + 1e-6
    assert iso[8:40, 22:26].max() < 1e-3  # on the edge
    assert iso[8:40, 2:10].min() > 0.999  # flat: no structure at all
    assert np.median(iso[8:40, 60:90]) > 0.5  # noise
    faint = 0.5 + 1e-5 * jax.random.normal(jax.random.key(2), (16, 16, 3))  # structure too weak to count
    assert np.abs(np.asarray(isotropy(faint)) - 1.0).max() < 1e-6
    plain = np.asarray(budget_map(img, EPS, 0.75, 0.25))[..., 0]
    protected = np.asarray(budget_map(img, EPS, 0.75, 0.25, edges=1.0))[..., 0]
    np.testing.assert_allclose(plain[8:40, 22:26], EPS, rtol=1e-5)  # edges: full budget by contrast alone
    np.testing.assert_allclose(protected[8:40, 22:26], 0.25 * EPS, rtol=1e-2)  # ... smooth skin's with edges=1
    np.testing.assert_allclose(protected[:, :10], plain[:, :10], rtol=1e-6)  # flat: unchanged
    assert np.median(protected[8:40, 60:90]) > 0.75 * EPS  # texture keeps most of it
    half = np.asarray(budget_map(img, EPS, 0.75, 0.25, edges=0.5))[..., 0]
    np.testing.assert_allclose(half[8:40, 22:26], 0.625 * EPS, rtol=1e-2)


def test_downscaled_view_shows_the_same_face_smaller():
    # A smooth photo: the chip read from the shrunk copy through the mapped transform is the
    # chip of the photo itself; the copy is the antialiased resize; factor 1 is the identity.
    yy, xx = np.mgrid[0:96, 0:128].astype(np.float32)
    img = jnp.asarray(np.stack([np.sin(xx / 9.0), np.cos(yy / 7.0), np.sin((xx + yy) / 11.0)], -1) * 0.4 + 0.5)
    t = jnp.asarray([[[0.5, 0.1, 40.0], [-0.1, 0.5, 30.0]]], jnp.float32)  # chip 64x64 inside the photo
    same, moved = downscaled_view(img, {"m": t}, jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(same), np.asarray(img), atol=1e-5)
    np.testing.assert_allclose(np.asarray(moved["m"]), np.asarray(t), atol=1e-6)
    small, moved = downscaled_view(img, {"m": t}, jnp.float32(0.5))
    ref = jax.image.resize(img, (48, 64, 3), "linear", antialias=True)
    np.testing.assert_allclose(np.asarray(small[:48, :64]), np.asarray(ref), atol=1e-4)
    assert float(jnp.max(jnp.abs(small[50:]))) == 0.0 and float(jnp.max(jnp.abs(small[:, 66:]))) == 0.0
    chip = np.asarray(_chips(img, t, (64, 64)))
    chip_small = np.asarray(_chips(small, moved["m"], (64, 64)))
    assert np.abs(chip_small - chip).max() < 0.03 and np.abs(chip_small - chip).mean() < 0.005
    # Differentiable in the factor and the photo (the attack draws a fresh factor each step).
    g = jax.grad(lambda f, x: jnp.sum(_chips(*downscaled_view(x, {"m": t}, f)[:1], downscaled_view(x, {"m": t}, f)[1]["m"],
                                             (64, 64))), argnums=(0, 1))(jnp.float32(0.7), img)
    assert np.isfinite(float(g[0])) and float(jnp.sum(jnp.abs(g[1]))) > 0


@pytest.mark.parametrize("name", sorted(RECOGNIZERS))
def test_every_recogniser_gives_its_intermediate_map(name):
    r = load_recognizer(name)
    chips = jax.random.uniform(jax.random.key(0), (2, *r.input_size, 3), jnp.float32)
    emb, inner = r.module(chips, mid=True)
    np.testing.assert_allclose(np.asarray(emb), np.asarray(r.embed(chips)), rtol=1e-5, atol=1e-6)
    assert inner.ndim == 4 and inner.shape[0] == 2 and 7 <= inner.shape[1] <= 19 and inner.shape[3] >= 64
    assert float(jnp.std(inner[0] - inner[1])) > 0  # depends on the chip


@pytest.mark.parametrize("name, blocks", [("dlib", 14), ("facenet", 21), ("facenet128", 21), ("sface", 0),
                                         ("arcface-mobilenet", 0)])
def test_skip_gradient_keeps_the_embedding_and_damps_the_residual_branches(name, blocks):
    r = load_recognizer(name)
    module = nnx.clone(r.module)
    assert set_branch_gradient(module, 0.5) == blocks
    chips = jax.random.uniform(jax.random.key(0), (2, *r.input_size, 3), jnp.float32)
    np.testing.assert_array_equal(np.asarray(module(chips)), np.asarray(r.module(chips)))  # forward unchanged
    loss = lambda m, c: jnp.sum(m(c)[0] * m(c)[1])
    g0, g1 = (np.asarray(jax.grad(loss, argnums=1)(m, chips)).ravel() for m in (r.module, module))
    cos = float(g0 @ g1 / np.linalg.norm(g0) / np.linalg.norm(g1))
    if blocks:
        assert cos < 0.999 and np.linalg.norm(g1) < np.linalg.norm(g0), cos  # the gradient is another one
    else:
        np.testing.assert_array_equal(g1, g0)
    assert all(getattr(sub, "branch_grad", 1.0) == 1.0 for _, sub in nnx.iter_graph(r.module))  # the shared one untouched


def test_scale_gradient_scales_only_the_gradient():
    x = jnp.arange(4.0, dtype=jnp.float32)
    f = lambda x, k: jnp.sum(scale_gradient(x * x, k))
    assert float(f(x, 0.25)) == float(f(x, 1.0)) == 14.0
    np.testing.assert_allclose(np.asarray(jax.grad(f)(x, 0.25)), 0.25 * 2 * np.arange(4.0))
    assert scale_gradient(x, 1.0) is x


def test_mid_distance_is_relative_and_ignores_padding_slots():
    clean = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 8), jnp.float32)  # [chip/flip, F, ...]
    assert float(mid_distance(clean, clean, jnp.ones((3,)))) == 0.0
    adv = clean.at[:, 0].multiply(1.5)  # face 0 changed by half its size
    np.testing.assert_allclose(float(mid_distance(adv, clean, jnp.asarray([1.0, 0.0, 0.0]))), 0.25, rtol=1e-5)
    np.testing.assert_allclose(float(mid_distance(adv, clean, jnp.ones((3,)))), 0.25 / 3, rtol=1e-5)
    adv2 = clean.at[:, 2].multiply(3.0)  # a padding slot's change does not count
    assert float(mid_distance(adv2, clean, jnp.asarray([1.0, 1.0, 0.0]))) == 0.0


def test_lpips_face_crops_on_a_finer_grid_cover_the_same_area():
    yy, xx = np.mgrid[0:200, 0:240].astype(np.float32)
    img = jnp.asarray(np.stack([np.sin(xx / 13.0), np.cos(yy / 9.0), np.sin((xx - yy) / 17.0)], -1) * 0.4 + 0.5)
    t = jnp.asarray([[[1.1, 0.2, 40.0], [-0.2, 1.1, 30.0]]], jnp.float32)
    c112 = np.asarray(_chips(img, t, (112, 112)))
    c224 = np.asarray(_chips(img, _denser(t, 2.0), (224, 224)))
    pooled = c224.reshape(1, 112, 2, 112, 2, 3).mean(axis=(2, 4))
    assert np.abs(pooled - c112).max() < 0.01  # same area, twice the samples per side


@pytest.mark.parametrize("option", [dict(rescale=0.5), dict(mid_weight=1.0), dict(lpips_face_side=224),
                                    dict(skip_grad=0.5, models=("dlib",)), dict(flip="random"), dict(step_rule="scaled")],
                         ids=["rescale", "mid_weight", "lpips_face_side", "skip_grad", "flip", "step_rule"])
def test_transfer_options_change_the_attack_and_keep_the_budget(photo, option):
    base = dict(SMALL, epsilon=EPS, chroma=0.25, models=option.get("models", SMALL["models"]))
    d0, x = _delta(photo, Config(**base))
    d1, _ = _delta(photo, Config(**{**base, **option}))
    assert np.abs(d1 - d0).max() > 1e-4
    ok = _unclipped(x, 2 * EPS)
    z = d1 @ np.linalg.inv(np.asarray(YCBCR_TO_RGB)).T
    assert np.abs(z[ok][:, 0]).max() <= EPS + 1e-5 and np.abs(z[ok][:, 1:]).max() <= 0.25 * EPS + 1e-5


def test_momentum_optimiser_is_mi_fgsm():
    cfg = Config(step_size=0.1, momentum=0.5)
    opt = _optimiser(cfg)
    params = jnp.zeros((4,), jnp.float32)
    state = opt.init(params)
    g1 = jnp.asarray([1.0, -2.0, 3.0, -4.0], jnp.float32)
    g2 = jnp.asarray([-9.0, 1.0, -1.0, 1.0], jnp.float32)
    u1, state = opt.update(g1, state, params)
    u2, state = opt.update(g2, state, params)
    acc1 = g1 / jnp.mean(jnp.abs(g1))
    acc2 = 0.5 * acc1 + g2 / jnp.mean(jnp.abs(g2))
    np.testing.assert_allclose(np.asarray(u1), -0.1 * np.sign(np.asarray(acc1)), atol=1e-7)
    np.testing.assert_allclose(np.asarray(u2), -0.1 * np.sign(np.asarray(acc2)), atol=1e-7)
    # Without momentum: the reference's plain signed step.
    plain = _optimiser(Config(step_size=0.1))
    u, _ = plain.update(g2, plain.init(params), params)
    np.testing.assert_allclose(np.asarray(u), -0.1 * np.sign(np.asarray(g2)), atol=1e-7)
    assert isinstance(opt, optax.GradientTransformation)


def test_scaled_step_rule_moves_pixels_by_their_gradient():
    # One photo [H=1, W=4, C=2]: channel 0 mixes strong and weak gradients, channel 1 is weaker
    # overall, so it is normalised by its own scale, not by channel 0's.
    g = jnp.asarray([[[4.0, 0.2], [-2.0, -0.1], [1.0, 0.05], [0.0, 0.0]]], jnp.float32)
    opt = _optimiser(Config(step_size=0.1, step_rule="scaled"))
    params = jnp.zeros_like(g)
    u, _ = opt.update(g, opt.init(params), params)
    gn = np.asarray(g, np.float64)
    s = (gn**2).sum(axis=(0, 1)) / np.abs(gn).sum(axis=(0, 1))  # 3.0 and 0.15
    expected = -0.1 * np.clip(gn / s, -1.0, 1.0)
    np.testing.assert_allclose(np.asarray(u), expected, atol=1e-7)
    np.testing.assert_allclose(np.asarray(u)[0, :, 0], [-0.1, 0.2 / 3, -0.1 / 3, 0.0], atol=1e-7)  # 4 -> full, -2 -> 2/3
    assert float(u[0, 3, 0]) == 0.0 and float(u[0, 3, 1]) == 0.0  # no gradient, no step
    assert abs(float(u[0, 0, 1]) + 0.1) < 1e-7  # the weaker channel's strongest pixel: a full step too
    # The sign rule stays the reference's: a full step wherever the gradient is non-zero.
    sign = _optimiser(Config(step_size=0.1))
    v, _ = sign.update(g, sign.init(params), params)
    np.testing.assert_allclose(np.asarray(v), -0.1 * np.sign(gn), atol=1e-7)


def _crop_transform(cx: float, cy: float, side: float) -> list:
    """A 112x112 template crop of side ``side`` photo pixels centred on (cx, cy)."""
    k = side / 112.0
    return [[k, 0.0, cx - 56.0 * k], [0.0, k, cy - 56.0 * k]]


def test_face_regions_give_each_face_the_pixels_nearest_in_its_own_size():
    # A large face (side 40) at x=30, a small one (side 10) at x=80, a padding slot at (50, 50).
    t = jnp.asarray([_crop_transform(30, 30, 40), _crop_transform(80, 30, 10), _crop_transform(50, 50, 40)], jnp.float32)
    geom = Geometry(transforms={}, lpips_transforms=t, mask=jnp.asarray([1.0, 1.0, 0.0]), lpips_scale=jnp.float32(1.0))
    r = np.asarray(face_regions(geom, (60, 100)))
    assert r.shape == (60, 100) and r.dtype == np.int32
    assert r[30, 30] == 0 and r[30, 80] == 1
    assert r[30, 65] == 0  # 35 px from the large face (0.9 of its size), 15 from the small one (1.5 of its)
    assert r[30, 76] == 1  # 46 px (1.15 sizes) vs 4 px (0.4 sizes)
    assert not np.any(r == 2)  # a padding slot owns no pixel
    # Each face's steps on its own scale: the small face's large gradient does not shrink the
    # large face's steps (photo-wide, the large face's strongest pixel would take a tenth of a step).
    g = np.zeros((60, 100, 1), np.float32)
    g[30, 20:30, 0] = 1.0  # large face: weak, uniform gradient
    g[30, 78:82, 0] = 10.0  # small face: ten times stronger
    opt = _optimiser(Config(step_size=0.1, step_rule="scaled"), regions=3)
    params = jnp.zeros_like(jnp.asarray(g))
    u, _ = opt.update(jnp.asarray(g), opt.init(params), params, regions_map=jnp.asarray(r))
    assert np.allclose(np.asarray(u)[30, 20:30, 0], -0.1) and np.allclose(np.asarray(u)[30, 78:82, 0], -0.1)
    whole, _ = opt.update(jnp.asarray(g), opt.init(params), params)  # one region: photo-wide scale
    assert np.allclose(np.asarray(whole)[30, 20:30, 0], -0.1 * (10 * 4 + 10) / (100 * 4 + 10))


def test_budget_is_enforced_and_luma_only_keeps_colour(photo):
    cfg = Config(**SMALL, epsilon=EPS, chroma=0.0, texture=0.5, momentum=0.9, smooth_grad=1.0, step_size=EPS / 2)
    delta, x = _delta(photo, cfg)
    assert np.abs(delta).max() <= EPS + 1e-6
    assert np.abs(delta).max() > 0.5 * EPS  # it does move, up to the budget
    ok = _unclipped(x, EPS + 1e-4)
    # Luminance only: the same offset on R, G and B wherever the final clip did not bite.
    assert np.abs(delta[ok][:, 0] - delta[ok][:, 1]).max() < 1e-6
    assert np.abs(delta[ok][:, 0] - delta[ok][:, 2]).max() < 1e-6


def test_chroma_budget_is_a_fraction_of_luminance(photo):
    cfg = Config(**SMALL, epsilon=EPS, chroma=0.25, step_size=EPS / 2)
    delta, x = _delta(photo, cfg)
    ok = _unclipped(x, 3 * EPS)
    ycc = delta[ok] @ np.linalg.inv(np.asarray(YCBCR_TO_RGB)).T
    assert np.abs(ycc[:, 0]).max() <= EPS + 1e-6
    assert np.abs(ycc[:, 1:]).max() <= 0.25 * EPS + 1e-6
    assert np.abs(ycc[:, 1:]).max() > 0.1 * EPS  # colour still moves a little


def test_cloak_reports_face_quality_and_shipped_verdicts(photo):
    cfg = Config(**SMALL, epsilon=EPS, chroma=0.25, texture=0.75, momentum=0.9, step_size=EPS / 2)
    r = cloak([photo], cfg)[0]
    assert not r.no_face and len(r.face_quality) == len(r.faces) >= 1
    q = r.face_quality[0]
    assert set(q) == {"region", "native", "crop224"}
    assert q["native"]["linf"] <= round(EPS * 255) + 1  # the budget, plus uint8 rounding
    assert 30.0 < q["crop224"]["psnr"] < 80.0 and 0.0 < q["crop224"]["ciede2000_mean"] < 2.0
    assert set(r.matched) == {"sface"} and all(isinstance(v, bool) for v in r.matched["sface"])
