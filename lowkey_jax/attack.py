"""The LowKey attack on whole photos: the one place with jit, vmap, fori_loop, sharding, optax.

``cloak(images, config)`` detects every face, prepares the geometry at a working
resolution, groups photos into a few bucket shapes, runs the whole signed-gradient-ascent
loop as one compiled function vmapped over a batch of photos (and sharded over all local
devices; with a progress callback, as compiled segments of ``PROGRESS_EVERY`` steps with
progress reported between them), then applies the perturbation at full resolution and
measures the result.

Multi-device: the batch axis is sharded over ``jax.devices()`` with a 1-D
``Mesh(("batch",))`` and ``NamedSharding``; parameters are replicated. On several hosts
(a TPU pod slice, several GPU machines) call ``jax.distributed.initialize()`` in every
process before the first ``cloak`` call and give each process its own photos: the global
batch is assembled with ``jax.make_array_from_process_local_data``, and each process reads
back its own rows from its addressable shards (``tests/test_multihost.py`` runs two CPU
processes). The compiled calls are collective, so every process must make the same calls
with the same shapes: give every process the same number of photos of the same bucket
shape, face-slot count and chip supersampling (e.g. photos of one size with one face each).

Compilation: :func:`enable_compilation_cache` (called by :func:`cloak`) stores compiled
programs under ``$LOWKEY_JAX_HOME/xla-cache``, so later processes skip compilation; the
attack itself is stored there as a whole executable (:mod:`lowkey_jax.executables`, in
``xla-cache/attack``), so later processes skip tracing it too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lowkey_jax import align as _align
from lowkey_jax import executables
from lowkey_jax.detect import DETECT_SIDE, detect_faces
from lowkey_jax.face import Face, face_slots
from lowkey_jax.models.layers import set_branch_gradient
from lowkey_jax.objective import (YCBCR_TO_RGB, Geometry, Model, budget_map, clean_features, clean_mid_features,
                                  face_regions, gaussian_smooth, objective, oriented_features, to_rgb)
from lowkey_jax.perceptual import load_lpips
from lowkey_jax.pipeline import psnr, verdicts_many
from lowkey_jax.quality import face_quality
from lowkey_jax.recognizers import RECOGNIZERS, load_recognizer

__all__ = ["Config", "Result", "Attack", "cloak", "prepare", "bucket_shape", "enable_compilation_cache"]

# Working images are padded up to one of these side lengths (then multiples of 512), so a
# folder of mixed photos compiles a handful of times rather than once per photo.
BUCKET_SIDES = (256, 384, 512, 768, 1024)
PRECISIONS = ("highest", "high", "default")
FLIPS = ("both", "random")
STEP_RULES = ("sign", "scaled")


@dataclasses.dataclass(frozen=True)
class Config:
    """Attack settings. Defaults are those of the released LowKey code; the product's
    presets (``Config.preset("mid")``, the CLI's ``--level``) add a perturbation budget and
    perceptual shaping on top (:mod:`lowkey_jax.presets`).

    Attributes:
      steps: signed-gradient-ascent steps.
      step_size: per-step change of each pixel, on [0, 1] images.
      init_range: uniform random start in [-init_range, +init_range].
      alpha: weight of the LPIPS-AlexNet penalty.
      blur: attack the Gaussian-smoothed photo (as well as the plain one, unless ``plain``
        is off).
      plain: attack the plain photo (the reference). ``False`` (with ``blur``): the
        recognisers see the Gaussian-smoothed photo only, half their work; measured on the
        sweep and not adopted (README).
      blur_sigma, blur_kernel: that Gaussian (sigma 3, 7x7 in the reference).
      models: the recogniser ensemble, any of "dlib", "facenet", "sface", "facenet128",
        "arcface-mobilenet" (``recognizers.RECOGNIZERS``).
      restarts: independent random starts; the one with the largest feature distance wins.
      seed: base random seed (each photo's start also depends on its pixels, so results do
        not depend on batch composition).
      max_side: photos larger than this (longest side, pixels) are attacked at this working
        resolution and the perturbation is upsampled to full resolution.
      batch_size: photos per compiled call.
      lpips_max_side: the whole-photo LPIPS term is computed on the photo downscaled to at
        most this many pixels (see ``objective.lpips_term``).
      lpips_face_side: side (pixels) of the aligned face crops of the LPIPS term's face half
        (112 as the reference; larger sees a face of typical photo size closer to its
        native resolution, at (side / 112)^2 times that half's cost: ``mid`` uses 448).
      jitter: expectation over alignment: each step sees every chip shifted by up to this
        fraction of its size and scaled by up to ``1 +- jitter`` (0: off, as the reference).
        A scraper re-detects faces in the cloaked photo, and its boxes move by a few percent.
      epsilon: L-inf budget of the perturbation on [0, 1] images (e.g. 8/255), enforced after
        every step by projection (``optax.projections.projection_box``). None: no budget, as
        the reference (its size then follows from ``steps * step_size``).
      chroma: None optimises the perturbation in RGB (the reference). A number optimises it
        in (Y, Cb, Cr) coordinates, with colour steps and budget ``chroma`` times those of
        luminance: 0 changes brightness only, keeping eye colour and skin tone.
      texture: 0..1, strength of the just-noticeable-difference mask on the budget (see
        ``objective.budget_map``): less change on smooth skin, more on hair and edges. Needs
        ``epsilon``.
      edges: 0..1, how far the texture mask treats edges like smooth skin (``objective.isotropy``;
        0: edges count as texture, full budget). 1 keeps the outlines of brows, eyes, nose and
        mouth at the smooth-skin budget, where a change reads as a reshaped feature. Needs
        ``texture``.
      momentum: decay of the accumulated, L1-normalised gradient (MI-FGSM, Dong et al. 2018;
        0: plain signed gradient as the reference). Momentum steadies the direction over
        steps and is known to make small perturbations transfer better.
      smooth_grad: sigma (pixels) of a Gaussian applied to the gradient before each step
        (translation-invariant attack, Dong et al. 2019; 0: off). Yields lower-frequency
        perturbations.
      precision: float32 matmul / convolution precision of the attack
        (``jax.default_matmul_precision``): ``"highest"`` (default: true float32 on every
        backend), ``"high"`` (TF32-like 3-pass bf16) or ``"default"`` (TF32 on NVIDIA
        Ampere+, single-pass bf16 on TPU; faster). CPU computes float32 whatever is set.
        ``tests/test_speed_accel.py`` bounds the objective's change between them.
      smooth_chips: box-filter the chips of large faces for every recogniser (see
        ``objective.Model.supersample``), also for those whose own pipeline samples plainly
        (SFace's ``cv2.warpAffine``). Plain sampling of a face several times larger than the
        chip reads one photo pixel in every few, and the attack then prints a visible
        lattice of dots on those pixels, which halving or JPEG wipe out anyway.
      rescale: resolution diversity (the resize half of input diversity, Xie et al. 2019;
        the shift half is ``jitter``): each step the recognisers see the photo shrunk by a
        fresh random factor in ``[1 - rescale, 1]`` (``objective.downscaled_view``), as a
        platform's resize or a scraper's thumbnail would show it (0: off, as the reference).
      mid_weight: weight of a feature-level term: the relative change of each recogniser's
        intermediate activation map half-way through the network
        (``objective.objective(mid_weight=...)``; 0: off, as the reference). Attacks on
        intermediate layers are known to transfer better to unseen networks.
      balance: weight each recogniser's feature distance by its dimension, so every model of
        the ensemble counts alike (``objective.objective(balance=...)``; off: the reference's
        mean over dims, which under-weights FaceNet's 512-D features 4x).
      equalise: rescale each recogniser's gradient to the same size (L1, per face) before
        the signed step (``objective.equalise_gradients``; off: the reference's plain sum, in
        which SFace's 10-45x larger gradient decides the sign of most pixels and FaceNet and
        dlib are barely attacked on some faces).
      skip_grad: the skip gradient method (SGM, Wu et al. 2020): the gradient through every
        residual branch of the recognisers that have them (dlib, FaceNet, FaceNet-128) is
        multiplied by this factor, so more of it takes the skip connections
        (``models.layers.scale_gradient``; 1: off, as the reference). Known to make
        perturbations transfer to unseen networks. The embeddings are unchanged.
      flip: ``"both"`` (the reference): every step every recogniser sees each chip and its
        horizontal flip, and compares the normalised sum of their embeddings. ``"random"``:
        every step each chip is seen in one orientation drawn at random (each with its own
        clean target, ``objective.oriented_features``), so the flip is averaged over steps
        rather than within each: half the recognisers' work per step. Not with
        ``mid_weight``.
      step_rule: ``"sign"`` (the reference): every pixel moves ``step_size`` each step, in
        the direction of its gradient's sign. ``"scaled"``: each pixel moves in proportion to
        its gradient, a full ``step_size`` from the gradient's magnitude-weighted mean
        magnitude up (``scale_by_weighted_magnitude``, per face region and channel:
        ``objective.face_regions``), so pixels whose gradient is weak, or changes sign from
        step to step, drift less.
    """

    steps: int = 50
    step_size: float = 0.0025
    init_range: float = 0.005
    alpha: float = 0.05
    blur: bool = True
    plain: bool = True
    blur_sigma: float = 3.0
    blur_kernel: int = 7
    models: tuple[str, ...] = ("dlib", "facenet", "sface")
    restarts: int = 1
    seed: int = 0
    max_side: int = 1024
    batch_size: int = 4
    lpips_max_side: int = 512
    lpips_face_side: int = 112
    jitter: float = 0.0
    epsilon: float | None = None
    chroma: float | None = None
    texture: float = 0.0
    edges: float = 0.0
    momentum: float = 0.0
    smooth_grad: float = 0.0
    precision: str = "highest"
    smooth_chips: bool = False
    balance: bool = False
    rescale: float = 0.0
    mid_weight: float = 0.0
    equalise: bool = False
    skip_grad: float = 1.0
    flip: str = "both"
    step_rule: str = "sign"

    @classmethod
    def preset(cls, level: str = "mid", **overrides) -> "Config":
        """The settings of a ``--level`` preset (:mod:`lowkey_jax.presets`: ``low``,
        ``mid`` (the CLI's default), ``high`` or ``reference``), with ``overrides``."""
        from lowkey_jax.presets import LEVELS

        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}; choose from {', '.join(LEVELS)}")
        return cls(**{**LEVELS[level], **overrides})

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        unknown = [m for m in self.models if m not in RECOGNIZERS]
        if unknown or not self.models:
            raise ValueError(f"models must be a non-empty subset of {sorted(RECOGNIZERS)}, got {self.models}")
        if self.steps < 0 or self.restarts < 1 or self.batch_size < 1:
            raise ValueError("steps must be >= 0, restarts and batch_size >= 1")
        if self.step_size <= 0 or self.init_range < 0 or self.alpha < 0:
            raise ValueError("step_size must be > 0, init_range and alpha >= 0")
        if self.max_side < 64:
            raise ValueError("max_side must be at least 64")
        if not 0.0 <= self.jitter < 0.5:
            raise ValueError("jitter must be in [0, 0.5)")
        if not (self.plain or self.blur):
            raise ValueError("plain=False attacks the Gaussian-smoothed photo only: it needs blur=True")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError("blur_kernel must be a positive odd integer")
        if self.epsilon is not None and not 0.0 < self.epsilon <= 1.0:
            raise ValueError("epsilon must be in (0, 1] (a budget on [0, 1] images) or None")
        if self.chroma is not None and not 0.0 <= self.chroma <= 2.0:
            raise ValueError("chroma must be in [0, 2] or None")
        if not 0.0 <= self.texture <= 1.0:
            raise ValueError("texture must be in [0, 1]")
        if self.texture > 0 and self.epsilon is None:
            raise ValueError("texture shapes the budget: set epsilon as well")
        if not 0.0 <= self.edges <= 1.0:
            raise ValueError("edges must be in [0, 1]")
        if self.edges > 0 and self.texture == 0:
            raise ValueError("edges shapes the texture mask: set texture as well")
        if not 32 <= self.lpips_face_side <= 512:
            raise ValueError("lpips_face_side must be in [32, 512] pixels")
        if not 0.0 <= self.rescale <= 0.75:
            raise ValueError("rescale must be in [0, 0.75]")
        if not 0.0 < self.skip_grad <= 1.0:
            raise ValueError("skip_grad must be in (0, 1]")
        if not 0.0 <= self.mid_weight <= 100.0:
            raise ValueError("mid_weight must be in [0, 100]")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        if not 0.0 <= self.smooth_grad <= 10.0:
            raise ValueError("smooth_grad must be in [0, 10] pixels")
        if self.flip not in FLIPS:
            raise ValueError(f"flip must be one of {FLIPS}, got {self.flip!r}")
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}, got {self.step_rule!r}")
        if self.flip != "both" and self.mid_weight > 0:
            raise ValueError("mid_weight needs flip='both' (the feature-level term compares both orientations)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclasses.dataclass
class Result:
    """The outcome for one photo.

    Attributes:
      image: the cloaked photo, uint8 ``[H, W, 3]``, exactly the input's size (the input
        itself when no face was found).
      faces: the faces found in the clean photo.
      no_face: True when no face was found (the photo is returned unchanged).
      similarity: ``{recogniser: [cosine per face]}`` between the clean and the cloaked
        embeddings, each through that model's own detect + align + embed pipeline.
      matched: ``{recogniser: [bool per face]}``: would that recogniser, at the threshold its
        own software ships (``lowkey_jax.verification``), still match the cloaked face to the
        clean one? False everywhere = protected.
      detected_after: per face, whether the detector still finds it in the cloaked photo.
      face_quality: per face, how visible the cloak is where people look (the face box
        grown by 30%, natively and at 224x224): PSNR, SSIM, L-inf, CIEDE2000 mean / 99th
        percentile, and at 224x224 LPIPS alex / vgg (``lowkey_jax.quality``; LPIPS of the
        native crop, the slowest figure, comes from ``quality.face_quality`` or ``compare``).
      lpips: LPIPS-AlexNet between clean and cloaked photo (at working resolution).
      psnr: PSNR in dB between clean and cloaked photo (full resolution).
      distance: the final ensemble feature distance of the objective.
      seconds: wall time spent on this photo (its share of its batch).
      working_shape: ``(h, w)`` the perturbation was optimised at.
    """

    image: np.ndarray
    faces: list[Face]
    no_face: bool
    similarity: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    detected_after: list[bool] = dataclasses.field(default_factory=list)
    matched: dict[str, list[bool]] = dataclasses.field(default_factory=dict)
    face_quality: list[dict] = dataclasses.field(default_factory=list)
    lpips: float = 0.0
    psnr: float = float("inf")
    distance: float = 0.0
    seconds: float = 0.0
    working_shape: tuple[int, int] = (0, 0)


# --- persistent compilation cache --------------------------------------------------------

# Compiled programs are written to disk and reused by later processes, so a second run
# spends its time cloaking, not compiling. Only programs that took at least this long to
# compile are stored: all of them (the attack takes tens of seconds; MTCNN's networks,
# the embedders and the many small eager ops take 0.01-1 s each; the whole cache holds a
# few MB for a handful of photo shapes).
CACHE_MIN_COMPILE_SECONDS = 0.0
EXECUTABLES_DIR = "attack"  # whole compiled attacks, under the compilation cache directory
NO_CACHE_ENV = executables.NO_CACHE_ENV
compilation_cache_dir = executables.compilation_cache_dir


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache under :func:`compilation_cache_dir`.

    Called by :func:`cloak` (and so by the CLI) before anything is compiled. Does nothing
    when the user opted out (``$LOWKEY_JAX_NO_COMPILE_CACHE=1``) or already configured
    ``jax_compilation_cache_dir`` themselves (that setting is kept). Returns the directory in
    use, or None. No attack program contains a host callback (JAX never stores those):
    progress is reported between compiled segments (``Attack._run_segments``).
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return str(current)
    path = compilation_cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(path)


# --- geometry --------------------------------------------------------------------------


def _bucket_side(n: int) -> int:
    for side in BUCKET_SIDES:
        if n <= side:
            return side
    return math.ceil(n / 512) * 512


def bucket_shape(h: int, w: int) -> tuple[int, int]:
    """The padded shape a working image of ``h x w`` is compiled at."""
    return (_bucket_side(h), _bucket_side(w))


def _to_working(matrix: np.ndarray, scale: float) -> np.ndarray:
    """Re-express a chip->photo affine map in working-resolution pixel coordinates.

    Pixel centres sit at integer coordinates, so full-res ``x`` maps to working
    ``(x + 0.5) * scale - 0.5``.
    """
    s = np.array([[scale, 0.0, 0.5 * scale - 0.5], [0.0, scale, 0.5 * scale - 0.5], [0.0, 0.0, 1.0]])
    m = np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])
    return (s @ m)[:2]


@dataclasses.dataclass
class Prepared:
    """One photo ready for the compiled attack (host-side numpy)."""

    index: int
    image: np.ndarray  # uint8 [H, W, 3] original
    faces: list[Face]
    scale: float
    working: np.ndarray  # float32 [h, w, 3]
    transforms: dict[str, np.ndarray]  # name -> [n, 2, 3] (working coords)
    lpips_transforms: np.ndarray  # [n, 2, 3]

    @property
    def bucket(self) -> tuple[int, int]:
        return bucket_shape(*self.working.shape[:2])


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Antialiased resize of a float32 ``[H, W, 3]`` image (downscaling to working size)."""
    out = jax.image.resize(jnp.asarray(image), (*shape, image.shape[2]), "linear", antialias=True)
    return np.asarray(out, np.float32)


def prepare(index: int, image: np.ndarray, faces: list[Face], config: Config) -> Prepared:
    """Working-resolution image and per-model alignment transforms for one photo."""
    h, w = image.shape[:2]
    scale = min(1.0, config.max_side / max(h, w))
    full = image.astype(np.float32) / np.float32(255.0)
    if scale < 1.0:
        working = _resize(full, (max(1, round(h * scale)), max(1, round(w * scale))))
        # Use the exact ratio of the rounded shape for coordinates.
        scale = working.shape[1] / w
    else:
        working = full
    transforms = {
        name: np.stack([_to_working(_align.chip_transform(f, name, image), scale) for f in faces]).astype(np.float32)
        for name in config.models
    }
    lpips_t = np.stack([_to_working(_align.chip_transform(f, "sface", image), scale) for f in faces]).astype(np.float32)
    return Prepared(index, image, faces, scale, working, transforms, lpips_t)


def _pad_faces(t: np.ndarray, slots: int) -> np.ndarray:
    pad = np.repeat(t[:1], slots - len(t), axis=0)  # copies of a real face, masked out
    return np.concatenate([t, pad]) if len(pad) else t


def _stack_batch(items: Sequence[Prepared], bucket: tuple[int, int], slots: int, models: Sequence[str]):
    """Host arrays of one batch: images padded to ``bucket``, faces padded to ``slots``."""
    hb, wb = bucket
    clean, pmask, tr, lt, mask, scale = [], [], {m: [] for m in models}, [], [], []
    for p in items:
        h, w = p.working.shape[:2]
        img = np.pad(p.working, ((0, hb - h), (0, wb - w), (0, 0)), mode="edge")
        pm = np.zeros((hb, wb, 1), np.float32)
        pm[:h, :w] = 1.0
        clean.append(img)
        pmask.append(pm)
        for m in models:
            tr[m].append(_pad_faces(p.transforms[m], slots))
        lt.append(_pad_faces(p.lpips_transforms, slots))
        mk = np.zeros((slots,), np.float32)
        mk[: len(p.faces)] = 1.0
        mask.append(mk)
        scale.append(np.float32(hb * wb / (h * w)))
    geometry = Geometry(
        transforms={m: np.stack(v) for m, v in tr.items()},
        lpips_transforms=np.stack(lt),
        mask=np.stack(mask),
        lpips_scale=np.asarray(scale, np.float32),
    )
    return np.stack(clean), np.stack(pmask), geometry


# Faces attacked together in one photo: memory grows with the face slots of a compiled
# call, so a crowd is attacked in passes of at most this many faces (peak RSS stays flat
# however many faces a photo has). Measured on a 1200x1208 photo with 22 faces (default
# level, CLI): 8 slots per pass peaked at 4.1-4.2 GiB RSS, 6 at 3.5 GiB.
MAX_FACES_PER_PASS = 6
# Face slots per compiled call, summed over its photos: photos with many faces go in
# smaller batches (never fewer than one photo).
FACE_SLOTS_PER_CALL = 16


def face_passes(n_faces: int) -> int:
    """How many passes a photo with ``n_faces`` faces is attacked in."""
    return max(1, -(-n_faces // MAX_FACES_PER_PASS))


def _pass_bounds(n_faces: int) -> list[int]:
    """Where each pass's faces start and end: passes as even as possible (22 faces in
    passes of at most 6: 6, 6, 5, 5), so they share one compiled shape."""
    k = face_passes(n_faces)
    return [round(i * n_faces / k) for i in range(k + 1)]


def attack_slots(n_faces: int) -> int:
    """Face slots of the compiled call for a photo (or pass) with ``n_faces`` faces: a
    power of two (counts share programs), but never more than :data:`MAX_FACES_PER_PASS`
    (so a full pass computes no empty slots)."""
    return min(face_slots(n_faces), max(n_faces, MAX_FACES_PER_PASS))


def _face_subset(p: Prepared, k: int, working: np.ndarray) -> Prepared:
    """Pass ``k`` of photo ``p``: its ``k``-th group of faces, starting from ``working``.

    Each pass optimises a fresh perturbation on top of the photo as the previous passes
    left it (their perturbation is part of its "clean" input, so the LPIPS term keeps it
    and later passes do not undo it); the faces of earlier passes only see that pass's
    LPIPS-driven changes, which the signed steps keep within a few ``step_size`` of zero.
    """
    if face_passes(len(p.faces)) == 1:
        return p
    b = _pass_bounds(len(p.faces))
    sl = slice(b[k], b[k + 1])
    return dataclasses.replace(
        p, faces=p.faces[sl], working=working.astype(np.float32),
        transforms={m: t[sl] for m, t in p.transforms.items()}, lpips_transforms=p.lpips_transforms[sl],
    )


def plan_batches(items: Sequence[Prepared], config: Config) -> list[list[Prepared]]:
    """Group photos by compiled shape first (bucket, face slots, chip supersampling), then
    cut each group into batches of ``config.batch_size`` photos (fewer for photos with many
    faces: at most ``FACE_SLOTS_PER_CALL`` face slots per call). A folder of mixed photos
    then runs in full batches and compiles once per distinct shape."""
    groups: dict[tuple, list[Prepared]] = {}
    for p in items:
        key = (p.bucket, attack_slots(len(p.faces)), chip_supersampling([p], config.models, config.smooth_chips))
        groups.setdefault(key, []).append(p)
    batches = []
    for (_, slots, _), members in groups.items():
        size = max(1, min(config.batch_size, FACE_SLOTS_PER_CALL // slots))
        batches += [members[i : i + size] for i in range(0, len(members), size)]
    return batches


def _photo_seed(image: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(image).data) & 0x7FFFFFFF


# --- the compiled attack ----------------------------------------------------------------

# Recognisers whose own pipelines antialias when they shrink a face (FaceNet: antialiased
# resize; dlib: image pyramid). For them the attack box-filters chips of large faces
# (``objective.Model.supersample``); SFace's pipeline (cv2.warpAffine) samples plainly.
ANTIALIASED = ("dlib", "facenet", "facenet128")
MAX_SUPERSAMPLE = 4


def supersample_factor(transforms: np.ndarray, mask: np.ndarray) -> int:
    """Static supersampling for a batch: working pixels per chip pixel of its largest real
    face, rounded up, in ``[1, MAX_SUPERSAMPLE]``. ``transforms`` ``[B, F, 2, 3]``."""
    a = np.asarray(transforms, np.float64)[..., :2]
    scale = np.sqrt(np.abs(a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]))
    scale = np.where(np.asarray(mask) > 0, scale, 0.0)
    return int(np.clip(math.ceil(float(np.max(scale)) - 1e-6), 1, MAX_SUPERSAMPLE))


def chip_supersampling(items: Sequence[Prepared], models: Sequence[str], smooth_all: bool = False
                       ) -> tuple[tuple[str, int], ...]:
    """``((model, factor), ...)`` for a batch of prepared photos: the static setting its
    compiled attack uses (one compile per distinct value). ``smooth_all``
    (``Config.smooth_chips``): every recogniser's chips, not only the antialiasing ones'."""
    out = []
    for m in (models if smooth_all else ANTIALIASED):
        if m in models:
            t = np.concatenate([p.transforms[m] for p in items])[None]
            out.append((m, supersample_factor(t, np.ones(t.shape[:2]))))
    return tuple(out)

_progress_hook: list[Callable[[int, int], None] | None] = [None]
_stage_hook: list[Callable[[str], None] | None] = [None]


def _report_stage(name: str) -> None:
    hook = _stage_hook[0]
    if hook is not None:
        hook(name)


def _report_step(step, total):
    hook = _progress_hook[0]
    if hook is not None:
        hook(int(np.max(step)), int(np.max(total)))


class Attack:
    """Loaded models plus the compiled attack, cached per (bucket, face slots, batch)."""

    def __init__(self, config: Config | None = None):
        self.config = config or Config()
        self.recognizers = {name: load_recognizer(name) for name in self.config.models}
        self.lpips = load_lpips("alex")
        graphdefs, params = {}, {}
        for name, rec in self.recognizers.items():
            module = rec.module
            if self.config.skip_grad != 1.0:  # a copy: the loaded recogniser is shared
                module = nnx.clone(module)
                set_branch_gradient(module, self.config.skip_grad)
            graphdefs[name], params[name] = nnx.split(module)
        graphdefs["lpips"], params["lpips"] = nnx.split(self.lpips)
        self._graphdefs = graphdefs
        self.mesh = Mesh(np.asarray(jax.devices()), ("batch",))
        self._batch_sharding = NamedSharding(self.mesh, P("batch"))
        self._replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(params, self._replicated)
        self._fns: dict[tuple, Callable] = {}
        self._executables: dict[tuple, Callable] = {}
        self._loaded: dict[tuple, Path] = {}  # executables read from the store, by signature
        self._used: list[tuple] = []  # signatures of the executables the current batch ran
        self._lpips_fn: Callable | None = None
        self.compiled_shapes: set[tuple] = set()

    def _compiled(self, supersample: tuple[tuple[str, int], ...], program: str = "attack") -> Callable:
        """A jitted program for one choice of per-model supersampling (a static setting):
        ``"attack"`` (all steps in one call) or, when progress is reported, the segments
        ``"start"``, ``"steps"`` (up to ``PROGRESS_EVERY`` steps per call) and ``"finish"``.
        None contains a host callback, so every one can be stored (``_executable``)."""
        key = (supersample, program)
        if key not in self._fns:
            fn, spec, donate = _PROGRAMS[program]
            chips = {n: (r.input_size, dict(supersample).get(n, 1)) for n, r in self.recognizers.items()}
            shardings = {"r": self._replicated, "b": self._batch_sharding}
            self._fns[key] = jax.jit(partial(fn, config=self.config, graphdefs=self._graphdefs, chips=chips),
                                     in_shardings=tuple(shardings[c] for c in spec),
                                     out_shardings=self._batch_sharding, donate_argnums=donate)
        return self._fns[key]

    def _executable(self, supersample: tuple[tuple[str, int], ...], args: tuple, program: str = "attack") -> Callable:
        """The compiled ``program`` (see ``_compiled``) for ``args``: from memory, else from
        the executable store (no tracing), else traced and compiled here and stored.
        Without a compilation cache directory (opted out) or on several processes, this is
        the plain jitted function."""
        sig = (supersample, executables.signature(args)) + ((program,) if program != "attack" else ())
        self._used.append(sig)
        if sig in self._executables:
            return self._executables[sig]
        fn = self._compiled(supersample, program)
        cache_dir = jax.config.jax_compilation_cache_dir
        if not cache_dir or jax.process_count() > 1:
            return fn
        config = dataclasses.replace(self.config, seed=0, restarts=1, batch_size=1)
        path = Path(cache_dir) / EXECUTABLES_DIR / f"{executables.key(config, sig)}.bin"
        exe, loaded = executables.load_or_compile(fn, args, path, jax_cache=executables.own_jax_cache(),
                                                  name=_PROGRAMS[program][0].__name__)
        if loaded:
            self._loaded[sig] = path
        self._executables[sig] = exe
        return exe

    def photo_lpips(self, clean: np.ndarray, adv: np.ndarray) -> float:
        """LPIPS-AlexNet between two float32 ``[h, w, 3]`` working-resolution photos."""
        if self._lpips_fn is None:
            graphdef = self._graphdefs["lpips"]
            self._lpips_fn = jax.jit(lambda params, a, b: nnx.merge(graphdef, params)(a[None], b[None])[0])
        return float(self._lpips_fn(self.params["lpips"], jnp.asarray(clean), jnp.asarray(adv)))

    @property
    def n_devices(self) -> int:
        return len(self.mesh.devices.flat)

    @property
    def n_local_devices(self) -> int:
        """Devices of this process in the mesh: each process pads its rows to a multiple."""
        return sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)

    def _put(self, x):
        if jax.process_count() > 1:
            return jax.tree.map(lambda a: jax.make_array_from_process_local_data(self._batch_sharding, a), x)
        return jax.device_put(x, self._batch_sharding)

    def _local(self, x) -> np.ndarray:
        """This process's rows of a batch-sharded result, as numpy. (``np.asarray`` cannot
        read an array spanning several processes: each reads its addressable shards.)"""
        if jax.process_count() > 1:
            shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
            return np.concatenate([np.asarray(s.data) for s in shards])
        return np.asarray(x)

    def run_batch(self, items: Sequence[Prepared], restart: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Attack one batch of prepared photos sharing a bucket. Returns
        (delta [B, hb, wb, 3], distance [B], lpips [B]) as numpy."""
        bucket = items[0].bucket
        slots = attack_slots(max(len(p.faces) for p in items))
        n = len(items)
        padded = list(items) + [items[-1]] * ((-n) % self.n_local_devices)
        clean, pmask, geometry = _stack_batch(padded, bucket, slots, self.config.models)
        keys = jnp.stack([
            jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), _photo_seed(p.image)), restart)
            for p in padded
        ])
        ss = chip_supersampling(items, self.config.models, self.config.smooth_chips)
        shape = (len(padded), *bucket, slots, ss)
        _report_stage("cloaking" if shape in self.compiled_shapes else "compiling")
        self.compiled_shapes.add(shape)
        fresh = lambda: (self.params, *self._put((clean, pmask, geometry, keys)))  # donated: put anew to retry
        rows = lambda out: tuple(self._local(x)[:n] for x in out)  # (delta, distance, lpips)
        segmented = _progress_hook[0] is not None
        self._used = []
        try:
            if segmented:
                return rows(self._run_segments(ss, fresh()))
            args = fresh()
            return rows(self._executable(ss, args)(*args))
        except jax.errors.JaxRuntimeError:
            # A stored executable that loads but does not run (it should not happen: only
            # executables compiled in-process are stored): drop the ones this batch read
            # from the store and attack it again with programs compiled afresh.
            if not self._forget_loaded(self._used):
                raise
            if segmented:
                return rows(self._run_segments(ss, fresh(), stored=False))
            return rows(self._compiled(ss)(*fresh()))

    def _forget_loaded(self, sigs) -> bool:
        """Delete those of the executables ``sigs`` that were read from the store (files
        and memory); whether there were any."""
        stale = [sig for sig in sigs if sig in self._loaded]
        for sig in stale:
            self._loaded.pop(sig).unlink(missing_ok=True)
            self._executables.pop(sig, None)
        return bool(stale)

    def _run_segments(self, ss: tuple[tuple[str, int], ...], args: tuple, stored: bool = True):
        """The attack as ``start``, ``steps`` x ceil(steps / PROGRESS_EVERY), ``finish``,
        reporting progress on the host between segments (no host callback compiled in, so
        these programs are stored like the one-call attack). ``start`` also computes the
        clean photo's features, which the other two take as inputs. Same steps, same random
        draws: the result equals the one-call attack's up to float rounding. ``stored``
        False: programs compiled here, none read from the store (the retry after a stored
        one failed to run)."""
        get = (lambda a, program: self._executable(ss, a, program)) if stored else (
            lambda a, program: self._compiled(ss, program))
        z, state, targets = get(args, "start")(*args)
        for s0 in range(0, self.config.steps, PROGRESS_EVERY):
            seg = (*args, z, state, targets, np.int32(s0))
            z, state = get(seg, "steps")(*seg)
            jax.block_until_ready(z)
            _report_step(min(s0 + PROGRESS_EVERY, self.config.steps), self.config.steps)
        fin = (*args[:4], z, targets)
        return get(fin, "finish")(*fin)


def _jitter(geom: Geometry, key: jax.Array, amount: float, models: dict[str, Model]) -> Geometry:
    """Each face's chip shifted by up to ``amount`` of the chip size and scaled by up to
    ``1 +- amount`` about the chip centre, independently per recogniser and face."""
    out = {}
    for n, (name, t) in enumerate(sorted(geom.transforms.items())):
        h, w = models[name].chip_size
        u = jax.random.uniform(jax.random.fold_in(key, n), (t.shape[0], 3), jnp.float32, -amount, amount)
        s, dx, dy = 1.0 + u[:, 0], u[:, 1] * w, u[:, 2] * h
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        zero = jnp.zeros_like(s)
        j = jnp.stack([jnp.stack([s, zero, cx - s * cx + dx], -1), jnp.stack([zero, s, cy - s * cy + dy], -1),
                       jnp.stack([zero, zero, jnp.ones_like(s)], -1)], axis=1)  # [F, 3, 3] chip -> chip
        out[name] = t @ j
    return geom._replace(transforms=out)


def _project_to_budget(working: np.ndarray, perturbed: np.ndarray, config: Config) -> np.ndarray:
    """``perturbed`` with its change from ``working`` (float32 ``[h, w, 3]`` in [0, 1])
    projected into the budget of ``config`` (``epsilon``, ``chroma``, ``texture``), in the
    coordinates the attack optimises."""
    x = jnp.asarray(working)
    bound = _budget(x, config)
    delta = jnp.asarray(perturbed) - x
    z = delta if config.chroma is None else delta @ jnp.linalg.inv(jnp.asarray(YCBCR_TO_RGB, jnp.float32)).T
    z = jnp.clip(z, -bound, bound)
    return np.asarray(jnp.clip(x + to_rgb(z, config.chroma), 0.0, 1.0))


def _odd_kernel(sigma: float) -> int:
    """Gaussian support: 2 * ceil(2 sigma) + 1 taps (at least 3)."""
    return max(3, 2 * math.ceil(2.0 * sigma) + 1)


def _normalise_l1() -> optax.GradientTransformation:
    """Divide the gradient by its mean absolute value (MI-FGSM's normalisation)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: g / jnp.maximum(jnp.mean(jnp.abs(g)), jnp.float32(1e-12)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_weighted_magnitude(regions: int = 1) -> optax.GradientTransformationExtraArgs:
    """Each update ``g`` ``[H, W, C]`` divided by ``s = sum(g^2) / sum(|g|)`` of its channel
    and region (the mean magnitude, each pixel weighted by its own magnitude, so pixels with
    no gradient do not dilute it) and clipped to [-1, 1]: pixels at or above ``s`` take a
    full step, weaker ones a proportionally smaller one (``Config.step_rule="scaled"``).

    ``update(..., regions_map=r)`` takes an int ``[H, W]`` map of pixels to ``regions`` regions
    (``objective.face_regions``: each face its own scale, so a small face, whose pixels each
    carry a large gradient, does not shrink a large face's steps); without it, one region.
    """

    def update(updates, state, params=None, *, regions_map=None):
        del params

        def one(g):
            h, w, c = g.shape
            if regions_map is None:
                seg, n = jnp.zeros((h * w,), jnp.int32), 1
            else:
                seg, n = regions_map.reshape(h * w), regions
            flat = g.reshape(h * w, c)
            num = jax.ops.segment_sum(flat * flat, seg, num_segments=n)  # [n, C]
            den = jax.ops.segment_sum(jnp.abs(flat), seg, num_segments=n)
            s = num / jnp.maximum(den, jnp.float32(1e-30))
            return jnp.clip(flat / jnp.maximum(s[seg], jnp.float32(1e-30)), -1.0, 1.0).reshape(h, w, c)

        return jax.tree.map(one, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _optimiser(config: Config, regions: int = 1) -> optax.GradientTransformationExtraArgs:
    """Signed (or, with ``step_rule="scaled"``, magnitude-scaled over ``regions`` face
    regions) gradient descent on the negated objective (ascent on the objective), with
    optional momentum over L1-normalised gradients (MI-FGSM)."""
    parts = []
    if config.momentum > 0:
        parts += [_normalise_l1(), optax.trace(decay=config.momentum)]
    direction = optax.scale_by_sign() if config.step_rule == "sign" else scale_by_weighted_magnitude(regions)
    return optax.chain(*parts, direction, optax.scale(-config.step_size))


PROGRESS_EVERY = 5  # steps per compiled segment when progress is reported (``Attack._run_segments``)


def _setup(params, config: Config, graphdefs, chips):
    """(models, LPIPS, objective keyword arguments) inside a traced attack program."""
    models = {
        name: Model(embed=(net := nnx.merge(graphdefs[name], params[name])), chip_size=chips[name][0],
                    supersample=chips[name][1], embed_mid=partial(net, mid=True))
        for name in config.models
    }
    lpips = nnx.merge(graphdefs["lpips"], params["lpips"])
    kwargs = dict(alpha=config.alpha, blur=config.blur, plain=config.plain, blur_sigma=config.blur_sigma,
                  blur_kernel=config.blur_kernel, lpips_max_side=config.lpips_max_side, balance=config.balance,
                  mid_weight=config.mid_weight, lpips_face_side=config.lpips_face_side, equalise=config.equalise)
    return models, lpips, kwargs


def _targets(x, geom, models, config: Config):
    """The clean photo's features (and intermediate maps when ``mid_weight``), constants."""
    features = oriented_features if config.flip == "random" else clean_features
    targets = jax.tree.map(jax.lax.stop_gradient, features(models, x, geom))
    mids = None
    if config.mid_weight > 0:
        mids = jax.tree.map(jax.lax.stop_gradient, clean_mid_features(models, x, geom))
    return targets, mids


def _budget(x, config: Config):
    """``objective.budget_map`` of the clean photo ``x`` with ``config``'s shaping."""
    return budget_map(x, config.epsilon, config.texture, config.chroma, config.edges)


def _bound(x, mask, config: Config):
    """Per-pixel budget of the optimisation variables, or None (no budget)."""
    if config.epsilon is None:
        return None
    return _budget(x, config) * mask


def _start_one(x, mask, key, config: Config):
    """Uniform initial perturbation (projected into the budget) and optimiser state.
    z: the optimisation variables (RGB, or YCbCr offsets when config.chroma is set)."""
    z = jax.random.uniform(key, x.shape, jnp.float32, -config.init_range, config.init_range) * mask
    bound = _bound(x, mask, config)
    if bound is not None:
        z = optax.projections.projection_box(z, -bound, bound)
    return z, _optimiser(config).init(z)


def _orientation(key, config: Config, geom: Geometry) -> dict[str, jax.Array]:
    """A random orientation (True: flipped) for every recogniser, branch and face slot."""
    shape = (int(config.plain) + int(config.blur), geom.mask.shape[0])
    return {name: jax.random.bernoulli(jax.random.fold_in(key, n), 0.5, shape) for n, name in enumerate(config.models)}


def _steps_one(x, mask, geom, key, z, state, targets, first, last, setup, config: Config):
    """Steps ``first <= i < last`` of the signed ascent on one photo: ``(z, state)`` after.
    ``targets``: ``_targets`` of the clean photo."""
    models, lpips, kwargs = setup
    targets, mids = targets
    bound = _bound(x, mask, config)
    optimiser = _optimiser(config, regions=geom.mask.shape[0])
    extra = {}
    if config.step_rule == "scaled":  # each face's steps on its own scale (scale_by_weighted_magnitude)
        extra["regions_map"] = face_regions(geom, x.shape[:2])

    def negative(z, g=geom, view_scale=None, orientation=None):
        loss, aux = objective(x + to_rgb(z, config.chroma), x, g, models, targets, lpips, view_scale=view_scale,
                              mid_targets=mids, orientation=orientation, **kwargs)
        return -loss, aux

    def step(i, carry):
        z, state = carry
        g = geom
        if config.jitter > 0:  # a fresh small misalignment each step (see Config.jitter)
            g = _jitter(geom, jax.random.fold_in(jax.random.fold_in(key, 1), i), config.jitter, models)
        view_scale = None
        if config.rescale > 0:  # a fresh smaller view each step (see Config.rescale)
            u = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, 2), i), (), jnp.float32)
            view_scale = 1.0 - config.rescale * u
        orientation = None
        if config.flip == "random":  # each chip in one orientation, fresh each step (Config.flip)
            orientation = _orientation(jax.random.fold_in(jax.random.fold_in(key, 3), i), config, geom)
        grad, _ = jax.grad(negative, has_aux=True)(z, g, view_scale, orientation)
        if config.smooth_grad > 0:  # translation-invariant gradient (see Config.smooth_grad)
            grad = gaussian_smooth(grad, config.smooth_grad, _odd_kernel(config.smooth_grad))
        updates, state = optimiser.update(grad * mask, state, z, **extra)
        z = optax.apply_updates(z, updates)
        if bound is not None:
            z = optax.projections.projection_box(z, -bound, bound)
        return z, state

    return jax.lax.fori_loop(first, last, step, (z, state))


def _finish_one(x, geom, z, targets, setup, config: Config):
    """(perturbation of the clamped photo, final distance, whole-photo LPIPS)."""
    models, lpips, kwargs = setup
    targets, mids = targets
    adv = jnp.clip(x + to_rgb(z, config.chroma), 0.0, 1.0)
    orientation = None
    if config.flip == "random":  # the final distance of the chips as they are (not flipped)
        orientation = jax.tree.map(jnp.zeros_like, _orientation(jax.random.key(0), config, geom))
    _, aux = objective(adv, x, geom, models, targets, lpips, mid_targets=mids, orientation=orientation, **kwargs)
    whole_photo_lpips = lpips(adv[None], x[None])[0] * geom.lpips_scale
    return adv - x, aux["distance"], whole_photo_lpips


def _attack_batch(params, clean, pmask, geometry, keys, *, config: Config, graphdefs, chips):
    """[B, H, W, 3] clean photos -> (perturbation, final distance, final LPIPS), vmapped:
    the whole attack in one call."""
    setup = _setup(params, config, graphdefs, chips)

    def one(x, mask, geom, key):
        targets = _targets(x, geom, setup[0], config)
        z, state = _start_one(x, mask, key, config)
        z, _ = _steps_one(x, mask, geom, key, z, state, targets, 0, config.steps, setup, config)
        return _finish_one(x, geom, z, targets, setup, config)

    with jax.default_matmul_precision(config.precision):
        return jax.vmap(one)(clean, pmask, geometry, keys)


def _attack_start(params, clean, pmask, geometry, keys, *, config: Config, graphdefs, chips):
    """Segmented attack, first call: batched ``(z, state, targets)`` (see
    ``Attack._run_segments``)."""
    setup = _setup(params, config, graphdefs, chips)

    def one(x, mask, geom, key):
        return (*_start_one(x, mask, key, config), _targets(x, geom, setup[0], config))

    with jax.default_matmul_precision(config.precision):
        return jax.vmap(one)(clean, pmask, geometry, keys)


def _attack_steps(params, clean, pmask, geometry, keys, z, state, targets, start, *, config: Config, graphdefs,
                  chips, length: int = PROGRESS_EVERY):
    """Segmented attack: steps ``start .. min(start + length, steps) - 1`` (``start`` traced,
    so one program serves every segment); batched ``(z, state)`` after them."""
    setup = _setup(params, config, graphdefs, chips)
    stop = jnp.minimum(start + length, config.steps)

    def one(x, mask, geom, key, z, state, targets):
        return _steps_one(x, mask, geom, key, z, state, targets, start, stop, setup, config)

    with jax.default_matmul_precision(config.precision):
        return jax.vmap(one)(clean, pmask, geometry, keys, z, state, targets)


def _attack_finish(params, clean, pmask, geometry, z, targets, *, config: Config, graphdefs, chips):
    """Segmented attack, last call: as ``_attack_batch``'s outputs."""
    setup = _setup(params, config, graphdefs, chips)
    fin = lambda x, geom, z, targets: _finish_one(x, geom, z, targets, setup, config)
    with jax.default_matmul_precision(config.precision):
        return jax.vmap(fin)(clean, geometry, z, targets)


# program -> (traced function, argument shardings: "r"eplicated / "b"atch-sharded, donated
# arguments); ``Attack._compiled`` jits them, ``Attack._executable`` stores them.
_PROGRAMS = {
    "attack": (_attack_batch, "rbbbb", (1,)),
    "start": (_attack_start, "rbbbb", ()),
    "steps": (_attack_steps, "rbbbbbbbr", (5, 6)),
    "finish": (_attack_finish, "rbbbbb", (4,)),
}


# --- photos in, photos out --------------------------------------------------------------

_attacks: dict[Config, Attack] = {}


def _get_attack(config: Config) -> Attack:
    key = dataclasses.replace(config, seed=0, restarts=1, batch_size=1)  # same compiled fn
    if key not in _attacks:
        _attacks.clear()
        _attacks[key] = Attack(config)
    attack = _attacks[key]
    attack.config = config
    return attack


def _as_uint8(image) -> np.ndarray:
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image or a PIL image, got {arr.dtype}{list(arr.shape)}")
    return arr


def _apply(p: Prepared, delta: np.ndarray) -> np.ndarray:
    """Add the working-resolution perturbation to the full-resolution photo."""
    h, w = p.working.shape[:2]
    d = delta[:h, :w]
    H, W = p.image.shape[:2]
    if (h, w) != (H, W):
        d = np.asarray(jax.image.resize(jnp.asarray(d), (H, W, 3), "linear"))
    out = np.clip(p.image.astype(np.float32) / np.float32(255.0) + d, 0.0, 1.0)
    return np.round(out * np.float32(255.0)).astype(np.uint8)


def cloak(
    images: Sequence,
    config: Config | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    evaluate: bool = True,
    stage: Callable[[str], None] | None = None,
) -> list[Result]:
    """Cloak photos against face recognition.

    Args:
      images: uint8 ``[H, W, 3]`` RGB arrays or PIL images.
      config: attack settings (default: ``Config.preset("mid")``, the CLI's default level;
        a bare ``Config()`` is the released LowKey code's setting).
      progress: optional ``callback(step, total_steps)`` called during each batch, after
        every ``PROGRESS_EVERY`` steps (the attack then runs in segments; raising from it
        stops the attack between two segments).
      evaluate: measure per-recogniser similarity, LPIPS and PSNR (slower).
      stage: optional ``callback(name)`` called when a stage starts: ``"detecting"``,
        then per batch ``"compiling"`` (a new compiled shape; its steps follow) or
        ``"cloaking"``, then ``"checking"`` (the similarity measurement).
    Returns:
      One :class:`Result` per input, in order. Photos without a face come back unchanged
      with ``no_face=True``.
    """
    config = config or Config.preset("mid")
    enable_compilation_cache()
    arrays = [_as_uint8(im) for im in images]
    results: list[Result | None] = [None] * len(arrays)
    if stage is not None:
        stage("detecting")
    prepared: list[Prepared] = []
    for i, img in enumerate(arrays):
        faces = detect_faces(img, max_side=max(config.max_side, DETECT_SIDE))
        if not faces:
            results[i] = Result(image=img, faces=[], no_face=True, working_shape=img.shape[:2])
        else:
            prepared.append(prepare(i, img, faces, config))
    if not prepared:
        return results  # type: ignore[return-value]
    attack = _get_attack(config)
    current = {p.index: p.working for p in prepared}  # the photo as perturbed so far
    distance = {p.index: 0.0 for p in prepared}
    lpips_last = {p.index: 0.0 for p in prepared}
    seconds = {p.index: 0.0 for p in prepared}
    _progress_hook[0], _stage_hook[0] = progress, stage
    try:
        # Crowded photos are attacked in passes of at most MAX_FACES_PER_PASS faces, each
        # pass starting from the previous pass's perturbed photo (see ``face_passes``).
        for k in range(max(face_passes(len(p.faces)) for p in prepared)):
            items = [_face_subset(p, k, current[p.index]) for p in prepared if face_passes(len(p.faces)) > k]
            for batch in plan_batches(items, config):
                tb = time.perf_counter()
                best = None
                for r in range(config.restarts):
                    delta, dist, lp = attack.run_batch(batch, r + k * config.restarts)
                    if best is None:  # writable copies (arrays read from JAX are read-only)
                        best = [np.array(delta), np.array(dist), np.array(lp)]
                    else:
                        better = dist > best[1]
                        best[0][better], best[1][better], best[2][better] = delta[better], dist[better], lp[better]
                share = (time.perf_counter() - tb) / len(batch)
                for j, it in enumerate(batch):
                    h, w = it.working.shape[:2]
                    current[it.index] = np.clip(it.working + best[0][j][:h, :w], 0.0, 1.0)
                    distance[it.index] += float(best[1][j]) * len(it.faces)  # face-weighted mean below
                    lpips_last[it.index] = float(best[2][j])
                    seconds[it.index] += share
    finally:
        _progress_hook[0] = _stage_hook[0] = None
    for p in prepared:
        if face_passes(len(p.faces)) > 1 and config.epsilon is not None:
            # Passes over different faces add up where their perturbations overlap: the
            # photo's total change is projected back into the budget.
            current[p.index] = _project_to_budget(p.working, current[p.index], config)
        out = _apply(p, current[p.index] - p.working)
        lp = lpips_last[p.index]
        if face_passes(len(p.faces)) > 1:  # the last pass measured LPIPS against its own start
            lp = attack.photo_lpips(p.working, current[p.index])
        results[p.index] = Result(
            image=out, faces=p.faces, no_face=False, lpips=lp, psnr=psnr(p.image, out),
            distance=distance[p.index] / len(p.faces), seconds=seconds[p.index],
            working_shape=p.working.shape[:2],
        )
    if evaluate:
        if stage is not None:
            stage("checking")
        te = time.perf_counter()
        measured = verdicts_many([(p.image, results[p.index].image, p.faces) for p in prepared], config.models,
                                 detect_side=max(config.max_side, DETECT_SIDE))
        share = (time.perf_counter() - te) / len(prepared)
        for p, v in zip(prepared, measured):
            r = results[p.index]
            tq = time.perf_counter()
            r.similarity, r.matched, r.detected_after = v["similarity"], v["matched"], v["detected"]
            r.face_quality = face_quality(p.image, r.image, p.faces, native_lpips=False)
            r.seconds += share + time.perf_counter() - tq
    return results  # type: ignore[return-value]
