"""The attack: objective purity, jit/vmap equivalence, progress, devices, determinism.

These run the real models on real photos with few steps and a small working resolution
to stay within CI time; the full-strength evaluation is ``lowkey-jax evaluate`` (report in docs/eval).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from lowkey_jax.align import warp_affine as _warp
from lowkey_jax.attack import Attack, Config, bucket_shape, cloak, prepare
from lowkey_jax.detect import detect_faces
from lowkey_jax.objective import Geometry, Model, clean_features, gaussian_smooth, objective, oriented_features
from lowkey_jax.perceptual import load_lpips
from lowkey_jax.recognizers import load_recognizer

FAST = Config(steps=3, models=("facenet", "sface"), max_side=256, batch_size=2)


def _load(path: Path, max_side: int = 640) -> np.ndarray:
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    im.thumbnail((max_side, max_side))
    return np.asarray(im)


@pytest.fixture(scope="module")
def one_face(shared) -> np.ndarray:
    return _load(shared / "faces" / "celebs" / "img1.jpg")


@pytest.fixture(scope="module")
def couple(shared) -> np.ndarray:
    return _load(shared / "faces" / "celebs" / "couple.jpg", 800)


def _geometry(p) -> Geometry:
    return Geometry(
        transforms={k: jnp.asarray(v) for k, v in p.transforms.items()},
        lpips_transforms=jnp.asarray(p.lpips_transforms),
        mask=jnp.ones((len(p.faces),), jnp.float32),
        lpips_scale=jnp.float32(1.0),
    )


def test_objective_jit_equals_eager_and_has_finite_gradient(one_face):
    faces = detect_faces(one_face)
    p = prepare(0, one_face, faces, FAST)
    models = {n: Model(load_recognizer(n).embed, load_recognizer(n).input_size) for n in FAST.models}
    lpips = load_lpips("alex")
    x = jnp.asarray(p.working)
    geom = _geometry(p)
    targets = clean_features(models, x, geom)
    adv = jnp.clip(x + jax.random.uniform(jax.random.key(1), x.shape, jnp.float32, -0.02, 0.02), 0.0, 1.0)

    def f(a):
        return objective(a, x, geom, models, targets, lpips)[0]

    eager = float(f(adv))
    jitted = float(jax.jit(f)(adv))
    assert abs(eager - jitted) <= 1e-5 * max(1.0, abs(eager)), (eager, jitted)
    # At the clean photo the plain branch's distance is zero and so is LPIPS; the blurred
    # branch alone already moves the features a little.
    _, aux0 = objective(x, x, geom, models, targets, lpips, blur=False)
    assert abs(float(aux0["distance"])) < 1e-6 and abs(float(aux0["lpips"])) < 1e-6
    _, aux_blur = objective(x, x, geom, models, targets, lpips)
    assert float(aux_blur["distance"]) > 1e-6
    g = jax.grad(f)(adv)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


def _sface_facenet(image: np.ndarray):
    """SFace + FaceNet on ``image`` at FAST's working size, with a zero LPIPS: (models,
    lpips, working photo, geometry, clean targets)."""
    p = prepare(0, image, detect_faces(image), FAST)
    models = {n: Model(load_recognizer(n).embed, load_recognizer(n).input_size) for n in ("sface", "facenet")}
    x = jnp.asarray(p.working)
    geom = _geometry(p)
    return models, (lambda a, b: jnp.zeros((a.shape[0],), jnp.float32)), x, geom, clean_features(models, x, geom)


def test_random_orientation_compares_each_chip_in_the_orientation_chosen(one_face):
    """``orientation`` (``Config.flip="random"``): each chip is embedded once, flipped where
    chosen, and compared with the clean chip's feature in that orientation. Checked against
    the distance computed by hand from the embeddings of flipped and unflipped chips."""
    models, lpips, x, geom, _ = _sface_facenet(one_face)
    oriented = oriented_features(models, x, geom)
    adv = jnp.clip(x + jax.random.uniform(jax.random.key(5), x.shape, jnp.float32, -0.03, 0.03), 0.0, 1.0)
    blurred = gaussian_smooth(adv)
    f = geom.mask.shape[0]
    choice = {"sface": jnp.asarray([[True] * f, [False] * f]), "facenet": jnp.asarray([[False] * f, [True] * f])}
    got = float(objective(adv, x, geom, models, oriented, lpips, orientation=choice)[1]["distance"])
    unit = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)
    terms = []
    for name, m in models.items():
        t = geom.transforms[name]
        for b, image in enumerate((adv, blurred)):
            chips = np.asarray(jax.vmap(lambda mt: _warp(image, mt, m.chip_size))(t))
            flip = np.asarray(choice[name][b])
            chips = np.where(flip[:, None, None, None], chips[:, :, ::-1], chips)
            feats = unit(np.asarray(m.embed(jnp.asarray(chips))))
            clean = unit(np.asarray(m.embed(jnp.asarray(
                np.asarray(jax.vmap(lambda mt: _warp(x, mt, m.chip_size))(t))[:, :, ::-1 if flip[0] else 1]))))
            np.testing.assert_allclose(clean, np.asarray(oriented[name][int(flip[0])]), atol=1e-5)
            terms.append(np.mean(np.mean((feats - clean) ** 2, axis=-1) / np.linalg.norm(clean, axis=-1)))
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-4)
    # the same photo seen unflipped everywhere is a different, also positive, distance
    plain = {n: jnp.zeros_like(c) for n, c in choice.items()}
    other = float(objective(adv, x, geom, models, oriented, lpips, orientation=plain)[1]["distance"])
    assert other > 0 and abs(other - got) > 1e-3 * got
    # and the clean photo (no blurred branch) is at distance 0 in either orientation
    for b in (0, 1):
        one = {n: c[b:b + 1] for n, c in choice.items()}
        assert float(objective(x, x, geom, models, oriented, lpips, orientation=one, blur=False)[1]["distance"]) < 1e-10


def test_balance_weights_each_recogniser_by_its_feature_dimension(one_face):
    """``balance``: the distance is the mean of per-model terms weighted by D_m / mean(D)
    (FaceNet 512-D counts 4x SFace's 128-D); off, the reference's plain mean."""
    names = ("sface", "facenet")
    models, lpips, x, geom, targets = _sface_facenet(one_face)
    adv = jnp.clip(x + jax.random.uniform(jax.random.key(3), x.shape, jnp.float32, -0.03, 0.03), 0.0, 1.0)
    single = {n: float(objective(adv, x, geom, {n: models[n]}, {n: targets[n]}, lpips, blur=False)[1]["distance"])
              for n in names}
    plain = float(objective(adv, x, geom, models, targets, lpips, blur=False)[1]["distance"])
    balanced = float(objective(adv, x, geom, models, targets, lpips, blur=False, balance=True)[1]["distance"])
    assert targets["sface"].shape[-1] == 128 and targets["facenet"].shape[-1] == 512
    np.testing.assert_allclose(plain, (single["sface"] + single["facenet"]) / 2, rtol=1e-5)
    np.testing.assert_allclose(balanced, (0.4 * single["sface"] + 1.6 * single["facenet"]) / 2, rtol=1e-5)
    assert single["sface"] > 0 and single["facenet"] > 0


def test_smoothed_branch_only(one_face):
    """``plain=False`` (``Config.plain``): the recognisers see the Gaussian-smoothed photo only.
    The reference's distance is the mean over both branches, so it must equal the mean of the
    plain-only and the smoothed-only distances; the smoothed-only one equals the plain-only
    distance of the smoothed photo; neither branch is refused silently."""
    models, lpips, x, geom, targets = _sface_facenet(one_face)
    adv = jnp.clip(x + jax.random.uniform(jax.random.key(4), x.shape, jnp.float32, -0.03, 0.03), 0.0, 1.0)
    d = lambda a, **kw: float(objective(a, x, geom, models, targets, lpips, **kw)[1]["distance"])
    both, plain_only, smooth_only = d(adv), d(adv, blur=False), d(adv, plain=False)
    assert abs(smooth_only - plain_only) > 1e-3 * plain_only  # two different distances
    np.testing.assert_allclose(both, (plain_only + smooth_only) / 2, rtol=1e-5)
    np.testing.assert_allclose(smooth_only, d(gaussian_smooth(adv), blur=False), rtol=1e-5)
    with pytest.raises(ValueError, match="no branch"):
        objective(adv, x, geom, models, targets, lpips, blur=False, plain=False)
    with pytest.raises(ValueError, match="needs blur=True"):
        Config(plain=False, blur=False)
    # through the compiled attack too, with one orientation per chip (branch count 1)
    cfg = dataclasses.replace(FAST, steps=1, plain=False, flip="random", models=("sface",))
    r = cloak([one_face], cfg, evaluate=False)[0]
    assert r.image.shape == one_face.shape and np.abs(r.image.astype(int) - one_face).max() > 0


def test_equalise_gradients_gives_every_recogniser_the_same_gradient_size_per_face():
    """``equalise_gradients`` is the identity forward; backward, each model's chip gradient
    is scaled per face to the mean L1 size of all models' (padding slots stay zero)."""
    from lowkey_jax.objective import equalise_gradients

    k = jax.random.split(jax.random.key(5), 4)
    a = jax.random.normal(k[0], (2 * 3, 4, 4, 3))  # 2 branches x 3 face slots
    b = jax.random.normal(k[1], (2 * 3, 5, 5, 3))
    wa = jax.random.normal(k[2], a.shape) * 10.0  # model A's gradient is ~10x model B's
    wb = jax.random.normal(k[3], b.shape) * jnp.asarray([1.0, 1.0, 0.0] * 2)[:, None, None, None]  # slot 2: padding

    def f(chips):
        ca, cb = chips
        return jnp.sum(ca * wa) + jnp.sum(cb * wb)

    out = equalise_gradients((a, b))
    assert all(bool(jnp.array_equal(o, i)) for o, i in zip(out, (a, b)))
    ga, gb = jax.grad(lambda c: f(equalise_gradients(c)))((a, b))
    l1 = lambda g: np.abs(np.asarray(g)).reshape(2, 3, -1).sum(axis=(0, 2))  # per face slot
    la, lb, ra, rb = l1(ga), l1(gb), l1(wa), l1(wb)
    np.testing.assert_allclose(la[:2], lb[:2], rtol=1e-5)  # equal size per real face
    np.testing.assert_allclose(la[:2], (ra[:2] + rb[:2]) / 2, rtol=1e-5)  # total kept
    assert lb[2] == 0 and la[2] == pytest.approx(ra[2] / 2, rel=1e-5)  # a slot only A sees
    # Direction within each model and face is unchanged (a positive rescale).
    cos = np.sum(np.asarray(ga) * np.asarray(wa)) / np.linalg.norm(ga) / np.linalg.norm(wa)
    assert cos > 0.99


def test_equalise_keeps_the_objective_and_evens_out_the_models_pixel_gradients(one_face):
    """On a real photo: ``equalise=True`` leaves the objective's value as it is; its pixel
    gradient is ``a * g_sface + b * g_facenet`` with the two parts of about equal L1 size,
    where the plain sum is dominated by SFace's larger gradient."""
    names = ("sface", "facenet")
    models, lpips, x, geom, targets = _sface_facenet(one_face)
    z = jax.random.uniform(jax.random.key(4), x.shape, jnp.float32, -0.03, 0.03)

    def f(z, ms=names, equalise=False):
        return objective(x + z, x, geom, {n: models[n] for n in ms}, {n: targets[n] for n in ms}, lpips, blur=False,
                         equalise=equalise)[0]

    assert float(f(z, equalise=True)) == pytest.approx(float(f(z)), rel=1e-6)
    g = {n: np.asarray(jax.grad(f)(z, (n,))).ravel() for n in names}
    ge = np.asarray(jax.grad(f)(z, names, True)).ravel()
    basis = np.stack([g["sface"], g["facenet"]], axis=1)
    (a, b), *_ = np.linalg.lstsq(basis, ge, rcond=None)
    assert np.linalg.norm(basis @ [a, b] - ge) <= 1e-3 * np.linalg.norm(ge)
    l1s, l1f = a * np.abs(g["sface"]).sum(), b * np.abs(g["facenet"]).sum()
    assert a > 0 and b > 0
    assert 0.8 < l1s / l1f < 1.25, (l1s, l1f)  # chip-level equal sizes carry over to pixels
    raw = np.abs(g["sface"]).sum() / np.abs(g["facenet"]).sum()
    assert raw > 2.0, raw  # what equalising corrects: SFace's gradient is the larger


def test_gaussian_smooth_is_a_7x7_sigma3_blur_with_reflect_padding():
    img = np.asarray(jax.random.uniform(jax.random.key(0), (20, 17, 3)), np.float64)
    taps = np.exp(-np.arange(-3, 4) ** 2 / (2 * 3.0**2))
    taps /= taps.sum()
    # Independent reference: numpy reflect padding (torch's "reflect") + separable filter.
    padded = np.pad(img, ((3, 3), (3, 3), (0, 0)), mode="reflect")
    rows = sum(taps[k] * padded[:, k : k + 17] for k in range(7))
    want = sum(taps[k] * rows[k : k + 20] for k in range(7))
    got = np.asarray(gaussian_smooth(jnp.asarray(img, jnp.float32)))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_gaussian_smooth_equals_dm_pix_values_and_gradients():
    import dm_pix as pix

    img = jax.random.uniform(jax.random.key(1), (40, 33, 3))
    ref = lambda x: pix.gaussian_blur(jnp.pad(x, ((3, 3), (3, 3), (0, 0)), mode="reflect"), 3.0, 7, padding="VALID")
    np.testing.assert_allclose(np.asarray(gaussian_smooth(img)), np.asarray(ref(img)), atol=1e-6)
    w = jax.random.normal(jax.random.key(2), img.shape)
    g_ours = jax.grad(lambda x: jnp.sum(gaussian_smooth(x) * w))(img)
    g_ref = jax.grad(lambda x: jnp.sum(ref(x) * w))(img)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), atol=1e-5)


def test_vmap_equals_per_photo_loop(one_face):
    faces = detect_faces(one_face)
    flipped = np.ascontiguousarray(one_face[:, ::-1])
    ps = [prepare(0, one_face, faces, FAST), prepare(1, flipped, detect_faces(flipped), FAST)]
    assert ps[0].bucket == ps[1].bucket
    attack = Attack(FAST)
    batched, dist_b, _ = attack.run_batch(ps, 0)
    for i, p in enumerate(ps):
        alone, dist_a, _ = attack.run_batch([p], 0)
        np.testing.assert_allclose(batched[i], alone[0], atol=1e-6)
        np.testing.assert_allclose(dist_b[i], dist_a[0], rtol=1e-5)


def test_objective_rises_over_the_steps(one_face):
    faces = detect_faces(one_face)
    dists = []
    for steps in (0, 2, 6):
        cfg = dataclasses.replace(FAST, steps=steps)
        _, d, _ = Attack(cfg).run_batch([prepare(0, one_face, faces, cfg)], 0)
        dists.append(float(d[0]))
    assert dists[0] < dists[1] < dists[2], dists


def test_cloak_outputs_every_face_no_face_and_determinism(couple, one_face):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    cfg = dataclasses.replace(FAST, steps=4)
    steps_seen = []
    results = cloak([couple, noise, one_face], cfg, progress=lambda s, t: steps_seen.append((s, t)))
    r_couple, r_noise, r_one = results
    # No face: unchanged and flagged.
    assert r_noise.no_face and np.array_equal(r_noise.image, noise)
    # Outputs keep the input's exact size and dtype; pixels stay in [0, 255] by construction.
    for r, src in ((r_couple, couple), (r_one, one_face)):
        assert not r.no_face and r.image.shape == src.shape and r.image.dtype == np.uint8
        assert not np.array_equal(r.image, src)
        assert 25 < r.psnr < 80
    # Every face of the couple is attacked: each one's similarity dropped, for each model.
    assert len(r_couple.faces) >= 2
    for name in cfg.models:
        sims = r_couple.similarity[name]
        assert len(sims) == len(r_couple.faces)
        assert all(s < 0.995 for s in sims), (name, sims)
    assert steps_seen and max(s for s, _ in steps_seen) == cfg.steps
    # Same seed and input: bit-identical output. Another seed: a different perturbation.
    again = cloak([one_face], cfg, evaluate=False)[0]
    assert np.array_equal(again.image, r_one.image)
    other = cloak([one_face], dataclasses.replace(cfg, seed=1), evaluate=False)[0]
    assert not np.array_equal(other.image, r_one.image)


def test_large_photo_is_attacked_at_working_resolution(shared):
    big = _load(shared / "faces" / "celebs" / "img1.jpg", 10_000)
    cfg = dataclasses.replace(FAST, steps=2)
    faces = detect_faces(big)
    p = prepare(0, big, faces, cfg)
    assert max(p.working.shape[:2]) == cfg.max_side and p.scale < 1
    r = cloak([big], cfg, evaluate=False)[0]
    assert r.image.shape == big.shape
    # Far from the face the photo barely changes: median absolute change there is tiny.
    x0, y0, x1, y1 = faces[0].box.astype(int)
    far = np.ones(big.shape[:2], bool)
    m = int(1.0 * (x1 - x0))
    far[max(0, y0 - m) : y1 + m, max(0, x0 - m) : x1 + m] = False
    diff = np.abs(r.image.astype(int) - big.astype(int))
    assert np.median(diff[far]) <= 2


def test_config_validation():
    with pytest.raises(ValueError, match="models"):
        Config(models=("nope",))
    with pytest.raises(ValueError):
        Config(steps=-1)
    assert bucket_shape(300, 512) == (384, 512)
    assert bucket_shape(683, 1024) == (768, 1024) and bucket_shape(100, 1500) == (256, 1536)


_DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from PIL import Image, ImageOps
    import jax
    from lowkey_jax.attack import Config, cloak
    im = ImageOps.exif_transpose(Image.open(sys.argv[1])).convert("RGB")
    im.thumbnail((320, 320))
    a = np.asarray(im)
    photos = [a, np.ascontiguousarray(a[:, ::-1]), a, np.ascontiguousarray(a[::-1])]
    cfg = Config(steps=2, models=("sface",), max_side=256, batch_size=4)
    out = cloak(photos, cfg, evaluate=False)
    np.save(sys.argv[2], np.stack([r.image for r in out]))
    print("devices", jax.device_count())
    """
)


def test_four_cpu_devices_equal_one(shared, tmp_path):
    photo = shared / "faces" / "celebs" / "img1.jpg"
    outs = {}
    for n in (1, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        dest = tmp_path / f"out{n}.npy"
        proc = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT, str(photo), str(dest)],
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"devices {n}" in proc.stdout
        outs[n] = np.load(dest)
    assert np.array_equal(outs[1], outs[4])


def test_supersampled_chips_box_filter_large_faces_and_match_plain_warp_at_s1():
    from lowkey_jax.align import warp_affine
    from lowkey_jax.attack import MAX_SUPERSAMPLE, supersample_factor
    from lowkey_jax.objective import _chips

    # A 1-pixel checkerboard seen through a chip at 3 photo pixels per chip pixel.
    yy, xx = np.mgrid[0:200, 0:200]
    board = jnp.asarray(np.repeat(((yy + xx) % 2).astype(np.float32)[..., None], 3, axis=2))
    t = jnp.asarray([[[3.0, 0.0, 20.0], [0.0, 3.0, 20.0]]], jnp.float32)
    plain = _chips(board, t, (40, 40), 1)
    np.testing.assert_array_equal(np.asarray(plain[0]), np.asarray(warp_affine(board, t[0], (40, 40))))
    # Plain bilinear sampling aliases (every sample lands on a 0 or a 1); the box filter sees the mean.
    assert float(jnp.std(plain)) > 0.45
    boxed = _chips(board, t, (40, 40), 3)
    assert abs(float(jnp.mean(boxed)) - 0.5) < 0.02 and float(jnp.std(boxed)) < 0.12
    # The static factor: working pixels per chip pixel of the largest real face, rounded up.
    ts = np.zeros((2, 2, 2, 3))
    ts[0, 0, :, :2] = 2.5 * np.eye(2)
    ts[0, 1, :, :2] = 9.0 * np.eye(2)  # a padding slot: ignored
    ts[1, 0, :, :2] = 0.5 * np.eye(2)
    assert supersample_factor(ts, np.array([[1.0, 0.0], [1.0, 0.0]])) == 3
    assert supersample_factor(ts[1:], np.array([[1.0, 0.0]])) == 1
    assert supersample_factor(ts, np.ones((2, 2))) == MAX_SUPERSAMPLE
    # Per batch of prepared photos: the largest real face of each antialiasing model.
    from types import SimpleNamespace

    from lowkey_jax.attack import chip_supersampling

    photos = [SimpleNamespace(transforms={"dlib": ts[0, :1], "facenet": ts[1, :1], "sface": ts[0, 1:]}),
              SimpleNamespace(transforms={"dlib": ts[1, :1], "facenet": ts[1, :1], "sface": ts[0, 1:]})]
    assert chip_supersampling(photos, ("dlib", "facenet", "sface")) == (("dlib", 3), ("facenet", 1))
    assert chip_supersampling(photos, ("sface",)) == ()
    # Config.smooth_chips: every recogniser in the ensemble, in the ensemble's order.
    assert chip_supersampling(photos, ("sface", "dlib"), smooth_all=True) == (("sface", MAX_SUPERSAMPLE), ("dlib", 3))


def test_alignment_jitter_is_bounded_and_fresh_each_step():
    from lowkey_jax.attack import _jitter

    t = jnp.asarray(np.tile(np.array([[2.0, 0.0, 50.0], [0.0, 2.0, 40.0]], np.float32), (3, 1, 1)))
    geom = Geometry({"sface": t}, t, jnp.ones((3,), jnp.float32), jnp.float32(1.0))
    models = {"sface": Model(lambda c: c, (112, 112))}
    centre = jnp.asarray([55.5, 55.5, 1.0], jnp.float32)
    a = _jitter(geom, jax.random.key(0), 0.05, models).transforms["sface"]
    b = _jitter(geom, jax.random.key(1), 0.05, models).transforms["sface"]
    assert not np.allclose(np.asarray(a), np.asarray(b))
    scale = np.asarray(a[:, 0, 0]) / 2.0
    assert np.all(np.abs(scale - 1.0) <= 0.05 + 1e-6)
    np.testing.assert_allclose(np.asarray(a[:, 0, 0]), np.asarray(a[:, 1, 1]))  # isotropic, no rotation
    shift = (np.asarray(a @ centre) - np.asarray(t @ centre)) / 2.0  # in chip pixels
    assert np.all(np.abs(shift) <= 0.05 * 112 + 1e-3) and np.max(np.abs(shift)) > 0.5
