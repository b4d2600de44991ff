"""Face-region quality metrics (lowkey_jax.quality): CIEDE2000 against the published test
data and scikit-image, the face-region rule, and per-face measurements."""

from __future__ import annotations

import numpy as np
import pytest

from lowkey_jax.face import Face
from lowkey_jax.quality import (GROW, ciede2000, crop_quality, delta_e, face_quality, face_region, srgb_to_lab,
                                summarise)

# Sharma, Wu and Dalal (2005), Table 1: (Lab1, Lab2, dE00), a selection that covers the
# hue-wrap and zero-chroma cases.
SHARMA = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, -1.3802, -84.2814), (50.0, 0.0, -82.7485), 1.0000),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0009), 7.1792),
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0011), 7.2195),
    ((50.0, 2.5, 0.0), (50.0, 0.0, -2.5), 4.3065),
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((90.9257, -0.5406, -0.9208), (88.6381, -0.8985, -0.7239), 1.5381),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
]


@pytest.mark.parametrize("lab1,lab2,want", SHARMA)
def test_ciede2000_matches_sharma_table(lab1, lab2, want):
    assert abs(float(ciede2000(np.asarray(lab1), np.asarray(lab2))) - want) < 5e-5
    assert abs(float(ciede2000(np.asarray(lab2), np.asarray(lab1))) - want) < 5e-5  # symmetric


def test_lab_and_ciede2000_match_scikit_image():
    color = pytest.importorskip("skimage.color")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(srgb_to_lab(a), color.rgb2lab(a), atol=1e-3)
    np.testing.assert_allclose(ciede2000(srgb_to_lab(a), srgb_to_lab(b)),
                               color.deltaE_ciede2000(color.rgb2lab(a), color.rgb2lab(b)), atol=2e-3)


def test_delta_e_is_ciede2000_in_float32(shared):
    """The compiled float32 path (used for every face measurement) against the float64
    reference formula, on random colour pairs and on a real face crop with a cloak-like
    change: per pixel within 1e-3 dE00 except at most 1 pixel in 10^4 (near-grey pixels,
    whose hue float32 cannot resolve), within 0.02 everywhere, and the mean and 99th
    percentile the face measurements report within 1e-3; shapes that are not a power of two
    are padded and cut."""
    from PIL import Image

    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (333, 77, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
    got = delta_e(a, b, compiled=True)
    assert got.shape == (333, 77) and got.dtype == np.float32
    np.testing.assert_allclose(got, ciede2000(srgb_to_lab(a), srgb_to_lab(b)), rtol=0, atol=1e-3)
    face = np.asarray(Image.open(shared / "faces" / "celebs" / "img25.jpg").convert("RGB"))[80:330, 80:330]
    changed = np.clip(face.astype(int) + rng.integers(-6, 7, face.shape), 0, 255).astype(np.uint8)
    ref = ciede2000(srgb_to_lab(face), srgb_to_lab(changed))
    got = delta_e(face, changed, compiled=True)
    err = np.abs(got - ref)
    np.testing.assert_allclose(delta_e(face, changed), ref.astype(np.float32), rtol=0, atol=1e-6)  # small: float64 path
    assert err.max() < 0.02 and np.mean(err > 1e-3) <= 1e-4, (err.max(), np.mean(err > 1e-3))
    assert abs(got.mean() - ref.mean()) < 1e-3 and abs(np.percentile(got, 99) - np.percentile(ref, 99)) < 1e-3
    assert ref.mean() > 0.5  # a real difference was measured
    assert float(np.max(delta_e(face, face))) == 0.0


def _face(x0, y0, x1, y1) -> Face:
    lm = np.array([[x0 + 0.3 * (x1 - x0), y0 + 0.4 * (y1 - y0)], [x0 + 0.7 * (x1 - x0), y0 + 0.4 * (y1 - y0)],
                   [(x0 + x1) / 2, (y0 + y1) / 2], [x0 + 0.35 * (x1 - x0), y0 + 0.8 * (y1 - y0)],
                   [x0 + 0.65 * (x1 - x0), y0 + 0.8 * (y1 - y0)]])
    return Face(np.array([x0, y0, x1, y1], float), 0.99, lm)


def test_face_region_is_the_box_grown_by_30_percent_square_and_inside():
    assert GROW == 0.30
    x0, y0, x1, y1 = face_region(_face(100, 100, 200, 240), (600, 800, 3))
    assert x1 - x0 == y1 - y0 == round(1.3 * 140)  # square, 1.3 x the longer side
    assert abs((x0 + x1) / 2 - 150) <= 1 and abs((y0 + y1) / 2 - 170) <= 1  # centred on the box
    # At the border: shifted inside, same size.
    x0, y0, x1, y1 = face_region(_face(-10, 5, 90, 105), (300, 400, 3))
    assert (x0, y0) == (0, 0) and x1 - x0 == 130
    # Larger than the photo: clipped to the photo's shorter side.
    x0, y0, x1, y1 = face_region(_face(0, 0, 100, 100), (80, 120, 3))
    assert (x1 - x0, y1 - y0) == (80, 80) and x1 <= 120 and y1 <= 80


def test_face_quality_measures_the_face_not_the_background():
    rng = np.random.default_rng(1)
    clean = rng.integers(40, 200, (300, 400, 3), dtype=np.uint8)
    face = _face(150, 100, 250, 200)
    changed = clean.copy()
    changed[:50, :50] = 255 - changed[:50, :50]  # background only: invisible to the face metrics
    same = face_quality(clean, changed, [face], lpips=False)[0]
    assert same["native"]["psnr"] == float("inf") and same["native"]["linf"] == 0.0
    assert same["crop224"]["ciede2000_mean"] == 0.0
    x0, y0, x1, y1 = same["region"]
    noisy = changed.copy()
    noisy[y0:y1, x0:x1] = np.clip(noisy[y0:y1, x0:x1].astype(int) + rng.choice([-3, 3], (y1 - y0, x1 - x0, 3)), 0, 255)
    q = face_quality(clean, noisy, [face], lpips=True)[0]
    assert q["native"]["linf"] == 3.0
    assert abs(q["native"]["psnr"] - 10 * np.log10(255**2 / 9)) < 0.01  # +-3 everywhere: MSE 9
    assert 0.3 < q["native"]["ciede2000_mean"] < q["native"]["ciede2000_p99"] < 5.0
    assert 0.0 < q["native"]["lpips_alex"] < 0.2 and 0.0 < q["crop224"]["lpips_vgg"] < 0.5
    assert q["crop224"]["psnr"] > q["native"]["psnr"]  # resizing averages the noise down
    cheap = face_quality(clean, noisy, [face], native_lpips=False)[0]  # cloak()'s check after the attack
    assert "lpips_alex" not in cheap["native"] and "lpips_vgg" not in cheap["native"]
    assert cheap["crop224"]["lpips_alex"] == q["crop224"]["lpips_alex"] and cheap["native"]["ssim"] == q["native"]["ssim"]
    with pytest.raises(ValueError, match="differ in size"):
        face_quality(clean, noisy[:-1], [face])


def test_ssim_is_dm_pix_ssim(shared):
    """``pipeline.ssim`` (float64 numpy, no compiled program per size) equals dm-pix's own
    ``dm_pix.ssim`` (float32, jitted here) to 1e-5 on a real photo and a perturbed copy."""
    import dm_pix
    import jax
    from PIL import Image

    from lowkey_jax.pipeline import ssim

    clean = np.asarray(Image.open(shared / "faces" / "celebs" / "img1.jpg").convert("RGB"))[200:520, 300:560]
    rng = np.random.default_rng(4)
    for noise in (2, 12):
        noisy = np.clip(clean.astype(int) + rng.integers(-noise, noise + 1, clean.shape), 0, 255).astype(np.uint8)
        with jax.numpy_dtype_promotion("standard"):  # dm-pix's ssim mixes Python floats and int32
            want = float(jax.jit(dm_pix.ssim)(clean.astype(np.float32) / 255.0, noisy.astype(np.float32) / 255.0))
        assert abs(ssim(clean, noisy) - want) < 1e-5 and want < 0.999
    assert ssim(clean, clean) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="11"):
        ssim(clean[:10], clean[:10])


def test_lab_of_uint8_through_the_lookup_table_equals_the_formula():
    a = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    a[..., 1] = a[..., 1][::-1]
    np.testing.assert_allclose(srgb_to_lab(a), srgb_to_lab(a.astype(np.float64) / 255.0), rtol=0, atol=1e-12)


def test_summarise_reports_the_worst_face_in_the_right_direction():
    faces = [{"crop224": crop_quality(np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), d, np.uint8), lpips=False)}
             for d in (1, 4)]
    s = summarise(faces)
    assert s["psnr"]["worst"] == min(f["crop224"]["psnr"] for f in faces)
    assert s["linf"]["worst"] == 4.0 and s["linf"]["median"] == 2.5 and s["psnr"]["n"] == 2
