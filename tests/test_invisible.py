"""Invisible cloaks: the perturbation budget, luminance/chroma shaping, the texture mask,
momentum and smoothed gradients (``Config.epsilon / chroma / texture / momentum /
smooth_grad``), and the face-region verdicts on a real photo."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image, ImageOps

from lowkey_jax.attack import Attack, Config, _optimiser, cloak, prepare
from lowkey_jax.detect import detect_faces
from lowkey_jax.objective import YCBCR_TO_RGB, budget_map, local_contrast, to_rgb

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
                dict(momentum=1.0), dict(smooth_grad=-1.0)):
        with pytest.raises(ValueError):
            Config(**bad)
    Config(epsilon=EPS, chroma=0.25, texture=0.75, momentum=0.9, smooth_grad=1.0)  # valid


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
