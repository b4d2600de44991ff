"""Each recogniser's own full pipeline (detect, align, embed) outside the attack.

Used to measure protection: the similarity between a clean photo and its cloaked version
as a face-recognition system would compute it, plus image-quality metrics.
"""

from __future__ import annotations

import json
import math
from functools import cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowkey_jax import align as _align
from lowkey_jax import executables
from lowkey_jax.detect import detect_faces
from lowkey_jax.face import Face, face_slots
from lowkey_jax.metrics import paired_cosine
from lowkey_jax.recognizers import load_recognizer
from lowkey_jax.verification import matches, operating_points

__all__ = ["embed_faces", "match_faces", "verdicts", "verdicts_many", "similarities", "similarities_many", "thresholds",
           "compare", "lpips_photos", "psnr", "ssim"]


@cache
def _embedder(name: str):
    graphdef, state = nnx.split(load_recognizer(name).module)

    def embed_program(s, chips):
        return nnx.merge(graphdef, s)(chips)

    fn = executables.stored(jax.jit(embed_program), "embed_program", name)
    return lambda chips: fn(state, chips)


# Chips per embedding call (padded to a power of two up to this): bounded memory, few
# compiled shapes, whatever the number of photos and faces.
EMBED_CHUNK = 32


def _chips(image: np.ndarray, faces: list[Face], name: str) -> list[np.ndarray]:
    return [_align.align_photo(image, f, name) for f in faces]


def _embed_chips(chips: list[np.ndarray], name: str) -> np.ndarray:
    """``[N, D]`` embeddings of aligned chips, in calls of at most ``EMBED_CHUNK`` chips."""
    if not chips:
        return np.zeros((0, load_recognizer(name).embed_dim), np.float32)
    out = []
    for start in range(0, len(chips), EMBED_CHUNK):
        part = np.stack(chips[start : start + EMBED_CHUNK])
        slots = face_slots(len(part))  # bucketed batch: few compiles
        part = np.concatenate([part, np.repeat(part[:1], slots - len(part), axis=0)])
        out.append(np.asarray(_embedder(name)(jnp.asarray(part)))[: min(EMBED_CHUNK, len(chips) - start)])
    return np.concatenate(out)


def embed_faces(image: np.ndarray, faces: list[Face], name: str) -> np.ndarray:
    """Native embeddings ``[F, D]`` of ``faces`` in uint8 ``image`` for recogniser ``name``."""
    return _embed_chips(_chips(image, faces, name), name)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def match_faces(reference: list[Face], found: list[Face], min_iou: float = 0.3) -> list[Face | None]:
    """For each reference face, the found face overlapping it best (IoU >= min_iou) or None."""
    out: list[Face | None] = []
    for r in reference:
        best = max(found, key=lambda f: _iou(r.box, f.box), default=None)
        out.append(best if best is not None and _iou(r.box, best.box) >= min_iou else None)
    return out


def verdicts(clean: np.ndarray, cloaked: np.ndarray, faces: list[Face], models) -> dict:
    """Per recogniser and face: would its own pipeline still match the cloaked face?

    The cloaked photo goes through detection again. Where the detector no longer finds a
    face, the clean face's geometry is used instead (the conservative choice: it measures
    the recogniser as if detection had still succeeded). Returns ``{"similarity": {name:
    [cosine per face]}, "matched": {name: [bool per face at the shipped operating point,
    see lowkey_jax.verification]}, "detected": [bool per face]}``.
    """
    return verdicts_many([(clean, cloaked, faces)], models)[0]


def verdicts_many(items, models, detect_side: int | None = None) -> list[dict]:
    """:func:`verdicts` for many ``(clean, cloaked, faces)`` photos at once: detection runs
    per photo, but every recogniser embeds the chips of all photos together (in batches of
    ``EMBED_CHUNK``), so the verification pass costs a few compiled calls rather than two
    per photo and recogniser. ``detect_side``: ``detect_faces(max_side=...)`` for the
    re-detection (``cloak`` passes the setting its own detection used; ``None``: full
    resolution). Returns one verdict dict per item."""
    items = list(items)
    afters, detected = [], []
    for clean, cloaked, faces in items:
        found = match_faces(faces, detect_faces(cloaked, max_side=detect_side)) if faces else []
        detected.append([f is not None for f in found])
        afters.append([f if f is not None else c for f, c in zip(found, faces)])
    out = [{"similarity": {}, "matched": {}, "detected": d} for d in detected]
    ops = operating_points()
    for name in models:
        before, after = [], []
        for (clean, cloaked, faces), moved in zip(items, afters):
            before += _chips(clean, faces, name)
            after += _chips(cloaked, moved, name)
        if before:
            a, b = _embed_chips(before, name), _embed_chips(after, name)
            cos = paired_cosine(a, b)
            hit = matches(name, a, b) if name in ops else None
        k = 0
        for o, (_, _, faces) in zip(out, items):
            n = len(faces)
            o["similarity"][name] = [float(v) for v in cos[k : k + n]] if n else []
            if name in ops:
                o["matched"][name] = [bool(v) for v in hit[k : k + n]] if n else []
            k += n
    return out


def similarities(clean: np.ndarray, cloaked: np.ndarray, faces: list[Face], models) -> tuple[dict[str, list[float]], list[bool]]:
    """Per recogniser and face: cosine between the clean and the cloaked embedding, and per
    face whether it is still detected (see :func:`verdicts`)."""
    v = verdicts(clean, cloaked, faces, models)
    return v["similarity"], v["detected"]


def similarities_many(items, models, detect_side: int | None = None) -> list[tuple[dict[str, list[float]], list[bool]]]:
    """``(similarity, detected)`` of :func:`verdicts_many` for each item."""
    return [(v["similarity"], v["detected"]) for v in verdicts_many(items, models, detect_side)]


@cache
def thresholds() -> dict[str, float]:
    """Same-person cosine thresholds per recogniser (equal error rate on clean photos).

    Measured by ``bench/thresholds.py`` on ``shared/faces/celebs``; see the JSON's notes.
    """
    data = json.loads((Path(__file__).parent / "thresholds.json").read_text())
    return {k: float(v) for k, v in data["thresholds"].items()}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_valid(z: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """1-D "valid" convolution of ``z`` with symmetric ``taps`` along ``axis``."""
    windows = np.lib.stride_tricks.sliding_window_view(z, len(taps), axis=axis)
    return windows @ taps


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 RGB images ``[H, W, 3]`` (at least 11x11): dm-pix's
    ``dm_pix.ssim`` (11x11 Gaussian window, sigma 1.5, k1 0.01, k2 0.03, "valid" filtering,
    on [0, 1]) computed in float64 numpy. ``tests/test_quality.py`` checks it against dm-pix
    itself; numpy needs no compiled program per image size (each costs about a second)."""
    x = np.asarray(a, np.float64) / 255.0
    y = np.asarray(b, np.float64) / 255.0
    if x.shape != y.shape or x.ndim != 3 or min(x.shape[:2]) < 11:
        raise ValueError(f"ssim needs two [H, W, C] images of one shape, H and W >= 11; got {x.shape}, {y.shape}")
    u = (np.arange(11) - 5) / 1.5
    taps = np.exp(-0.5 * u * u)
    taps /= taps.sum()
    filt = lambda z: _gaussian_valid(_gaussian_valid(z, taps, 1), taps, 0)
    mu0, mu1 = filt(x), filt(y)
    mu00, mu11, mu01 = mu0 * mu0, mu1 * mu1, mu0 * mu1
    eps = float(np.finfo(np.float32).eps) ** 2  # dm-pix's floor of the variances
    s00 = np.maximum(eps, filt(x * x) - mu00)
    s11 = np.maximum(eps, filt(y * y) - mu11)
    s01 = filt(x * y) - mu01
    s01 = np.sign(s01) * np.minimum(np.sqrt(s00 * s11), np.abs(s01))  # as dm-pix: |s01| <= sqrt(s00 s11)
    c1, c2 = 0.01**2, 0.03**2
    cs = (2 * s01 + c2) / (s00 + s11 + c2)
    return float(np.mean((2 * mu01 + c1) / (mu00 + mu11 + c1) * cs))


@cache
def _lpips_fn(net: str):
    """LPIPS of two uint8 photos resized to a static shape, as one compiled program per
    shape (called op by op, the networks cost a compiled program per layer and shape)."""
    from lowkey_jax.perceptual import load_lpips

    graphdef, state = nnx.split(load_lpips(net))

    @partial(jax.jit, static_argnames=("shape",))
    def fn(state, a, b, shape):
        f = lambda im: jax.image.resize(im.astype(jnp.float32) / jnp.float32(255.0), shape, "linear", antialias=True)
        return nnx.merge(graphdef, state)(f(a)[None], f(b)[None])[0]

    return lambda a, b, shape: fn(state, a, b, shape)


def lpips_photos(a: np.ndarray, b: np.ndarray, net: str = "alex", max_side: int = 1024) -> float:
    """LPIPS between two uint8 photos of equal size, both resized (antialiased) so the
    longest side is at most ``max_side`` (the attack's default working resolution)."""
    if net not in ("alex", "vgg"):
        raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
    scale = min(1.0, max_side / max(a.shape[:2]))
    shape = (max(32, round(a.shape[0] * scale)), max(32, round(a.shape[1] * scale)), 3)
    return float(_lpips_fn(net)(np.asarray(a), np.asarray(b), shape))


def compare(original: np.ndarray, cloaked: np.ndarray, models=("dlib", "facenet", "sface")) -> dict:
    """How a cloaked photo fares against each recogniser, and how it looks.

    Returns ``{"faces": n, "recognizers": {name: {"similarity": [...], "threshold": t,
    "matched": [...], "operating_point": {...}}}, "detected_after": [...],
    "face_quality": [...], "lpips": x, "psnr": x, "ssim": x}``. ``matched`` is the decision
    at the recogniser's shipped operating point (:mod:`lowkey_jax.verification`);
    ``threshold`` is the cosine at equal error rate on our clean photos (secondary,
    ``matched_eer``). ``face_quality`` is per face (:mod:`lowkey_jax.quality`); the
    whole-photo LPIPS / PSNR / SSIM are secondary.
    """
    from lowkey_jax.quality import face_quality

    if original.shape != cloaked.shape:
        raise ValueError(f"images differ in size: {original.shape} vs {cloaked.shape}")
    faces = detect_faces(original)
    v = verdicts(original, cloaked, faces, models) if faces else {"similarity": {m: [] for m in models}, "matched": {m: [] for m in models}, "detected": []}
    th = thresholds()
    ops = operating_points()
    recs = {}
    for m in models:
        eer = [s >= th[m] for s in v["similarity"][m]]
        recs[m] = {"similarity": v["similarity"][m], "threshold": th[m], "matched_eer": eer,
                   "matched": v["matched"].get(m, eer), "operating_point": dict(ops[m]) if m in ops else None}
    return {
        "faces": len(faces),
        "recognizers": recs,
        "detected_after": v["detected"],
        "face_quality": face_quality(original, cloaked, faces),
        "lpips": lpips_photos(original, cloaked),
        "psnr": psnr(original, cloaked),
        "ssim": ssim(original, cloaked),
    }
