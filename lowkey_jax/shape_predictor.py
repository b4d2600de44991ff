"""dlib's 5-point face landmark predictor (regression-tree cascade), in numpy.

A port of ``dlib::shape_predictor::operator()`` (dlib 20.0.1,
``image_processing/shape_predictor.h``; Kazemi & Sullivan, "One millisecond face alignment
with an ensemble of regression trees", CVPR 2014) running the model
``shape_predictor_5_face_landmarks.dat`` converted by :mod:`convert.dlib_shape`
(``load_weights("dlib_shape5")``).

Landmark prediction only *chooses the geometry* of the dlib face chip; it is not
differentiated (the chip itself is warped differentiably by :mod:`lowkey_jax.align`).

Algorithm (all as dlib does it, float32 where dlib uses ``float``):

1. The face rectangle ``(left, top, right, bottom)`` (dlib ``rectangle``: inclusive corners;
   ``tl = (left, top)``, ``br = (right, bottom)``) defines the map from normalised shape
   space to pixels: ``x = left + u * (right - left)``, ``y = top + v * (bottom - top)``.
2. ``shape = initial_shape``. For each of the cascade's stages:

   a. the similarity transform (Umeyama least squares, no translation used) from
      ``initial_shape`` to the current ``shape``, cast to float32;
   b. each feature pixel ``k`` is ``R @ delta[k] + shape[anchor[k]]`` in normalised space,
      mapped to pixels and rounded (``floor(v + 0.5)``); its value is the grey level
      ``(r + g + b) // 3`` of the uint8 image there, or 0 outside the image;
   c. every tree of the stage descends its complete binary tree with the test
      ``pix[idx1] - pix[idx2] > thresh`` (left child ``2i+1``, right ``2i+2``) and its leaf's
      shape increment is added to ``shape``, tree by tree in order (float32).

3. The landmarks are ``shape`` mapped to pixels and rounded to integers (dlib returns
   ``point``, i.e. integer coordinates); :meth:`ShapePredictor.predict` with
   ``round_points=False`` returns the unrounded positions.

Landmark order of the 5-point model (dlib's, not MTCNN's): 0 = outer corner of the eye on
the image's right, 1 = inner corner of that eye, 2 = outer corner of the eye on the image's
left, 3 = its inner corner, 4 = bottom of the nose (under the nose tip).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache

import numpy as np

__all__ = ["ShapePredictor", "gray_u8", "load_shape_predictor", "similarity_lstsq"]

WEIGHTS = "dlib_shape5"


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ A @ src + t`` (Umeyama 1991, rotation det +1).

    The closed form of dlib's ``find_similarity_transform`` for 2-D points (which computes
    the same optimum through an SVD): with centred points ``s``, ``d``,
    ``a = sum(s . d)``, ``b = sum(s_x d_y - s_y d_x)``, ``A = [[a, -b], [b, a]] / sum |s|^2``.
    float64 in and out. Returns ``(A [2, 2], t [2])``.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - ms, dst - md
    var = float(np.sum(s * s))
    if var == 0.0:
        a_mat = np.eye(2)
    else:
        a = float(np.sum(s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]))
        b = float(np.sum(s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]))
        a_mat = np.array([[a, -b], [b, a]]) / var
    return a_mat, md - a_mat @ ms


def gray_u8(image) -> np.ndarray:
    """dlib's grey level of an image: int32 ``[H, W]`` in 0..255.

    ``image``: uint8 ``[H, W, 3]`` RGB (grey = ``(r + g + b) // 3``, dlib's ``rgb_pixel`` to
    ``unsigned char`` conversion) or uint8 ``[H, W]``; floating point input is taken as
    ``[0, 1]`` and converted to uint8 by rounding ``x * 255`` first.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"image dtype must be uint8 or floating point in [0, 1], got {arr.dtype}")
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr.astype(np.int32).sum(axis=2) // 3
    if arr.ndim == 2:
        return arr.astype(np.int32)
    raise ValueError(f"image must be [H, W, 3] RGB or [H, W] grey, got shape {arr.shape}")


class ShapePredictor:
    """A dlib regression-tree cascade shape predictor (numpy, CPU).

    Args:
      params: the converted arrays (see :mod:`convert.dlib_shape`): ``initial_shape``
        ``[P, 2]``, ``anchor_idx`` ``[S, F]``, ``deltas`` ``[S, F, 2]``, ``split_idx1`` /
        ``split_idx2`` / ``split_thresh`` ``[S, T, N]``, ``leaf_values`` ``[S, T, N+1, P, 2]``.
    """

    def __init__(self, params: Mapping[str, np.ndarray]):
        self.initial_shape = np.asarray(params["initial_shape"], np.float32)
        self.anchor_idx = np.asarray(params["anchor_idx"], np.int64)
        self.deltas = np.asarray(params["deltas"], np.float32)
        self.split_idx1 = np.asarray(params["split_idx1"], np.int64)
        self.split_idx2 = np.asarray(params["split_idx2"], np.int64)
        self.split_thresh = np.asarray(params["split_thresh"], np.float32)
        self.leaf_values = np.asarray(params["leaf_values"], np.float32)
        s, t, n = self.split_idx1.shape
        self.num_stages, self.num_trees, self.num_splits = s, t, n
        self.depth = int(np.log2(n + 1))
        if 2**self.depth - 1 != n or self.leaf_values.shape[:3] != (s, t, n + 1):
            raise ValueError("inconsistent shape predictor arrays")

    @property
    def num_parts(self) -> int:
        return self.initial_shape.shape[0]

    def predict(self, image, rect: Sequence[float], *, round_points: bool = True) -> np.ndarray:
        """Landmarks ``float64 [P, 2]`` (x, y) of the face in ``rect``.

        Args:
          image: uint8 ``[H, W, 3]`` RGB (or ``[H, W]`` grey, or float in ``[0, 1]``; see
            :func:`gray_u8`).
          rect: ``(left, top, right, bottom)`` in pixels, dlib's inclusive convention (a dlib
            ``rectangle(l, t, r, b)``); non-integer values are allowed.
          round_points: round the result to integers as dlib does (default).
        """
        gray = gray_u8(image)
        return self.predict_gray(gray, rect, round_points=round_points)

    def predict_gray(self, gray: np.ndarray, rect: Sequence[float], *, round_points: bool = True) -> np.ndarray:
        """:meth:`predict` on a precomputed :func:`gray_u8` image."""
        h, w = gray.shape
        left, top, right, bottom = (float(v) for v in rect)
        scale = np.array([right - left, bottom - top], np.float64)
        offset = np.array([left, top], np.float64)
        flat = gray.reshape(-1).astype(np.float32)
        shape = self.initial_shape.copy()
        tree_ids = np.arange(self.num_trees)
        for st in range(self.num_stages):
            a_mat, _ = similarity_lstsq(self.initial_shape, shape)
            m = a_mat.astype(np.float32)
            d = self.deltas[st]
            anchor = shape[self.anchor_idx[st]]
            # float32 as in dlib: (m @ delta) + anchor, element by element (no FMA).
            px = m[0, 0] * d[:, 0] + m[0, 1] * d[:, 1] + anchor[:, 0]
            py = m[1, 0] * d[:, 0] + m[1, 1] * d[:, 1] + anchor[:, 1]
            # to pixels in double, then dlib's rounding to integer points
            ix = np.floor(scale[0] * px.astype(np.float64) + offset[0] + 0.5)
            iy = np.floor(scale[1] * py.astype(np.float64) + offset[1] + 0.5)
            inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
            lin = np.where(inside, iy * w + ix, 0).astype(np.int64)
            vals = np.where(inside, flat[lin], np.float32(0.0))
            node = np.zeros(self.num_trees, np.int64)
            i1, i2, th = self.split_idx1[st], self.split_idx2[st], self.split_thresh[st]
            for _ in range(self.depth):
                go_left = (vals[i1[tree_ids, node]] - vals[i2[tree_ids, node]]) > th[tree_ids, node]
                node = np.where(go_left, 2 * node + 1, 2 * node + 2)
            inc = self.leaf_values[st, tree_ids, node - self.num_splits]  # [T, P, 2]
            # sequential float32 sum, tree by tree, like dlib's `current_shape += leaf`
            shape = np.add.accumulate(np.concatenate([shape[None], inc]), axis=0)[-1]
        pts = scale * shape.astype(np.float64) + offset
        return np.floor(pts + 0.5) if round_points else pts


@cache
def load_shape_predictor() -> ShapePredictor:
    """The 5-point face landmark model (``load_weights("dlib_shape5")``), loaded once."""
    from lowkey_jax.store import load_weights

    return ShapePredictor(load_weights(WEIGHTS))
