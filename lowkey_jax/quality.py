"""Image quality where people look: on every face, not on the whole photo.

Whole-photo PSNR / LPIPS are dominated by the background, which a cloak barely touches, so
they hide a visibly changed face. Every figure here is taken on the *face region*: the
detector's box grown by 30% (:data:`GROW`, one rule everywhere), made square and kept inside
the photo; once at the photo's native resolution and once resized to 224x224 (what a viewer
sees of a face in a feed, and a size that makes faces of different photos comparable).

Per face region:
- ``psnr`` (dB), ``ssim`` (dm-pix, 11x11 Gaussian window), ``linf`` (largest change of any
  channel, in 1/255 steps);
- ``ciede2000_mean`` / ``ciede2000_p99``: the CIEDE2000 colour difference of each pixel (CIE
  Lab, D65), mean and 99th percentile. 1.0 is about one just-noticeable difference; eye-colour
  or skin-tone shifts show up here long before PSNR moves;
- ``lpips_alex`` / ``lpips_vgg``: LPIPS v0.1 of the crop (native crops larger than
  :data:`LPIPS_MAX_SIDE` = 512 pixels are shrunk to it first: LPIPS-VGG on a 1000-pixel
  face takes gigabytes).

All functions are host-side numpy (plus the LPIPS networks), uint8 RGB in.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image

from lowkey_jax.face import Face

__all__ = [
    "GROW",
    "CROP_SIZE",
    "METRICS",
    "face_region",
    "face_crop",
    "srgb_to_lab",
    "ciede2000",
    "delta_e",
    "NUMPY_DELTA_E_PIXELS",
    "crop_quality",
    "face_quality",
    "summarise",
]

GROW = 0.30  # the face box is grown by 30% (each side length x 1.3, about its centre)
CROP_SIZE = 224  # the resized view
LPIPS_MAX_SIDE = 512  # native crops larger than this are shrunk for LPIPS (VGG's memory grows with area)
METRICS = ("psnr", "ssim", "linf", "ciede2000_mean", "ciede2000_p99", "lpips_alex", "lpips_vgg")
# Which direction is better, for summaries ("worst" face).
HIGHER_IS_BETTER = {"psnr": True, "ssim": True}


def face_region(face: Face, shape: tuple[int, ...], grow: float = GROW) -> tuple[int, int, int, int]:
    """Integer ``(x0, y0, x1, y1)`` of the square face region inside an image of ``shape``.

    The side is ``(1 + grow) * max(box width, box height)``, centred on the box; a region
    that crosses the border is shifted inside, and shrunk only if the photo is smaller.
    """
    h, w = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = (float(v) for v in face.box)
    side = (1.0 + grow) * max(x1 - x0, y1 - y0, 1.0)
    side = int(min(round(side), w, h))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = int(round(cx - side / 2.0))
    top = int(round(cy - side / 2.0))
    left = min(max(left, 0), w - side)
    top = min(max(top, 0), h - side)
    return left, top, left + side, top + side


def face_crop(image: np.ndarray, region: tuple[int, int, int, int], size: int | None = None) -> np.ndarray:
    """The region of a uint8 ``[H, W, 3]`` image, optionally resized (Lanczos) to ``size``."""
    x0, y0, x1, y1 = region
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    if size is not None and crop.shape[:2] != (size, size):
        crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS))
    return crop


def _linearise(c: np.ndarray) -> np.ndarray:
    """sRGB [0, 1] -> linear light (IEC 61966-2-1)."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_SRGB_LINEAR = _linearise(np.arange(256, dtype=np.float64) / 255.0)


_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def _linear_to_lab(xp, lin):
    """Linear-light RGB ``[..., 3]`` -> CIE Lab, with array module ``xp`` (numpy or jax.numpy)."""
    white = xp.asarray(_WHITE_D65, lin.dtype).reshape((1,) * (lin.ndim - 1) + (3,))
    xyz = lin @ xp.asarray(_RGB_TO_XYZ, lin.dtype).T / white
    d = 6.0 / 29.0
    f = xp.where(xyz > d**3, xp.cbrt(xyz), xyz / (3 * d * d) + 4.0 / 29.0)
    L = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return xp.stack([L, a, b], axis=-1)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 (or [0, 1] float) sRGB ``[..., 3]`` -> CIE Lab ``[..., 3]`` (D65, 2 degree)."""
    if np.asarray(rgb).dtype == np.uint8:
        lin = _SRGB_LINEAR[np.asarray(rgb)]  # the same formula, evaluated once per code value
    else:
        lin = _linearise(np.asarray(rgb, np.float64))
    return _linear_to_lab(np, lin)


def _ciede2000(xp, lab1, lab2):
    """CIEDE2000 of Lab arrays ``[..., 3]`` with array module ``xp`` (numpy or jax.numpy)."""
    L1, a1, b1 = xp.moveaxis(lab1, -1, 0)
    L2, a2, b2 = xp.moveaxis(lab2, -1, 0)
    c_bar = (xp.hypot(a1, b1) + xp.hypot(a2, b2)) / 2.0
    g = 0.5 * (1.0 - xp.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = xp.hypot(a1p, b1), xp.hypot(a2p, b2)
    h1p = xp.mod(xp.arctan2(b1, a1p), 2 * np.pi)
    h2p = xp.mod(xp.arctan2(b2, a2p), 2 * np.pi)
    zero = (c1p * c2p) == 0
    dh = h2p - h1p
    dh = xp.where(dh > np.pi, dh - 2 * np.pi, xp.where(dh < -np.pi, dh + 2 * np.pi, dh))
    dh = xp.where(zero, 0.0, dh)
    dL = L2 - L1
    dC = c2p - c1p
    dH = 2.0 * xp.sqrt(c1p * c2p) * xp.sin(dh / 2.0)
    L_bar = (L1 + L2) / 2.0
    cp_bar = (c1p + c2p) / 2.0
    hsum = h1p + h2p
    h_bar = xp.where(xp.abs(h1p - h2p) <= np.pi, hsum / 2.0,
                     xp.where(hsum < 2 * np.pi, (hsum + 2 * np.pi) / 2.0, (hsum - 2 * np.pi) / 2.0))
    h_bar = xp.where(zero, hsum, h_bar)
    t = (1.0 - 0.17 * xp.cos(h_bar - np.radians(30)) + 0.24 * xp.cos(2 * h_bar)
         + 0.32 * xp.cos(3 * h_bar + np.radians(6)) - 0.20 * xp.cos(4 * h_bar - np.radians(63)))
    d_theta = np.radians(30) * xp.exp(-(((h_bar * (180.0 / np.pi) - 275.0) / 25.0) ** 2))
    r_c = 2.0 * xp.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    s_l = 1.0 + 0.015 * (L_bar - 50.0) ** 2 / xp.sqrt(20.0 + (L_bar - 50.0) ** 2)
    s_c = 1.0 + 0.045 * cp_bar
    s_h = 1.0 + 0.015 * cp_bar * t
    r_t = -xp.sin(2 * d_theta) * r_c
    return xp.sqrt((dL / s_l) ** 2 + (dC / s_c) ** 2 + (dH / s_h) ** 2 + r_t * (dC / s_c) * (dH / s_h))


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference of Lab arrays ``[..., 3]`` -> ``[...]`` (kL = kC = kH = 1).

    Sharma, Wu and Dalal (2005), including their notes on hue at zero chroma. float64 numpy.
    """
    return _ciede2000(np, np.asarray(lab1, np.float64), np.asarray(lab2, np.float64))


def _delta_e_kernel(a, b):
    import jax.numpy as jnp

    table = jnp.asarray(_SRGB_LINEAR, jnp.float32)
    return _ciede2000(jnp, _linear_to_lab(jnp, table[a]), _linear_to_lab(jnp, table[b]))


@cache
def _delta_e_compiled():
    import jax

    return jax.jit(_delta_e_kernel)


# Crops of up to this many pixels take the float64 numpy path of :func:`delta_e` (about 0.1 s
# at 512x512 here, and no compiled program to trace in a fresh process, which costs about a
# second); larger ones the compiled float32 kernel.
NUMPY_DELTA_E_PIXELS = 1 << 18


def delta_e(clean: np.ndarray, cloaked: np.ndarray, *, compiled: bool | None = None) -> np.ndarray:
    """Per-pixel CIEDE2000 between two uint8 RGB images ``[..., 3]`` -> float32 ``[...]``.

    The formula of :func:`ciede2000` on :func:`srgb_to_lab`. Images of up to
    :data:`NUMPY_DELTA_E_PIXELS` pixels (every 224x224 view, most native face crops) are
    computed in float64 numpy; larger ones (``compiled=True`` forces it, ``False`` forbids
    it) in float32 by one compiled kernel (pixels padded to a power of two, so a handful of
    shapes serve every crop): 8x faster than the float64 numpy path on a 1110x1110 face crop
    here. Per pixel it is within 1e-3 of that path except near-grey pixels (hue
    ill-defined; at most about one pixel in 10^4, within 0.02), so means and percentiles
    agree to 1e-3 (``tests/test_quality.py``).
    """
    a = np.asarray(clean, np.uint8).reshape(-1, 3)
    b = np.asarray(cloaked, np.uint8).reshape(-1, 3)
    n = len(a)
    if not (compiled if compiled is not None else n > NUMPY_DELTA_E_PIXELS):
        out = ciede2000(srgb_to_lab(a), srgb_to_lab(b)).astype(np.float32)
        return out.reshape(np.shape(clean)[:-1])
    size = max(4096, 1 << max(0, n - 1).bit_length())
    pad = ((0, size - n), (0, 0))
    out = np.asarray(_delta_e_compiled()(np.pad(a, pad), np.pad(b, pad)))[:n]
    return out.reshape(np.shape(clean)[:-1])


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    if min(a.shape[:2]) < 11:  # smaller than the SSIM window
        return float("nan")
    from lowkey_jax.pipeline import ssim

    return ssim(a, b)


def _lpips(a: np.ndarray, b: np.ndarray, net: str) -> float:
    from lowkey_jax.pipeline import lpips_photos

    if min(a.shape[:2]) < 32:  # below AlexNet's receptive field: upsample to 32
        a = np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BICUBIC))
        b = np.asarray(Image.fromarray(b).resize((32, 32), Image.Resampling.BICUBIC))
    return lpips_photos(a, b, net, max_side=LPIPS_MAX_SIDE)


def crop_quality(clean: np.ndarray, cloaked: np.ndarray, *, lpips: bool = True) -> dict[str, float]:
    """Every metric of :data:`METRICS` for two uint8 crops of equal shape (without the two
    LPIPS figures when ``lpips`` is False)."""
    if clean.shape != cloaked.shape:
        raise ValueError(f"crops differ in size: {clean.shape} vs {cloaked.shape}")
    from lowkey_jax.pipeline import psnr

    de = delta_e(clean, cloaked)
    out = {
        "psnr": psnr(clean, cloaked),
        "ssim": _ssim(clean, cloaked),
        "linf": float(np.max(np.abs(clean.astype(np.int16) - cloaked.astype(np.int16)))),
        "ciede2000_mean": float(np.mean(de)),
        "ciede2000_p99": float(np.percentile(de, 99)),
    }
    if lpips:
        out["lpips_alex"] = _lpips(clean, cloaked, "alex")
        out["lpips_vgg"] = _lpips(clean, cloaked, "vgg")
    return out


def face_quality(clean: np.ndarray, cloaked: np.ndarray, faces: Sequence[Face], *, lpips: bool = True,
                 native_lpips: bool = True) -> list[dict]:
    """Per face: ``{"region": [x0, y0, x1, y1], "native": {...}, "crop224": {...}}``.

    ``clean`` and ``cloaked`` are uint8 ``[H, W, 3]`` of the same size; ``faces`` are those
    found in ``clean``. ``lpips=False`` leaves out both LPIPS figures; ``native_lpips=False``
    leaves them out of the native view only. That view's LPIPS costs the most by far (VGG on
    a crop of up to 512x512, compiled anew for every crop size), while the 224x224 view has
    one shape for every face; ``cloak``'s check after the attack takes this cheaper route.
    """
    if clean.shape != cloaked.shape:
        raise ValueError(f"images differ in size: {clean.shape} vs {cloaked.shape}")
    out = []
    for f in faces:
        r = face_region(f, clean.shape)
        out.append({
            "region": list(r),
            "native": crop_quality(face_crop(clean, r), face_crop(cloaked, r), lpips=lpips and native_lpips),
            "crop224": crop_quality(face_crop(clean, r, CROP_SIZE), face_crop(cloaked, r, CROP_SIZE), lpips=lpips),
        })
    return out


def summarise(per_face: Sequence[dict], view: str = "crop224") -> dict[str, dict[str, float]]:
    """Mean, median and worst face of each metric over many faces (``view``: ``"native"``
    or ``"crop224"``). Worst = lowest PSNR/SSIM, highest of the others."""
    out = {}
    for m in METRICS:
        v = np.asarray([f[view][m] for f in per_face if m in f[view]], np.float64)
        v = v[np.isfinite(v)]
        if not len(v):
            continue
        worst = float(v.min() if HIGHER_IS_BETTER.get(m) else v.max())
        out[m] = {"mean": float(v.mean()), "median": float(np.median(v)), "worst": worst, "n": int(len(v))}
    return out
