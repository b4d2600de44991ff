"""lowkey-jax: LowKey adversarial face cloaking in JAX and Flax NNX.

Public API (imported lazily, so ``import lowkey_jax`` starts no JAX backend)::

    cloak(image_or_images, config=None) -> Result | list[Result]
    Config                                           # frozen attack settings
    Result                                           # .image, .similarity, ...
    load_recognizer("dlib" | "facenet" | "sface")    # .embed(chips) -> [N, D]
    detect_faces(image) -> list[Face]                # MTCNN
    lowkey_jax.align.align(pixels, face, name)       # chip, differentiable in pixels
    load_lpips("alex" | "vgg")                       # lpips(x, y) -> [N]
"""

from __future__ import annotations

import importlib
import os

from lowkey_jax._version import __version__

_EXPORTS = {
    "Config": "lowkey_jax.attack",
    "Result": "lowkey_jax.attack",
    "load_recognizer": "lowkey_jax.recognizers",
    "detect_faces": "lowkey_jax.detect",
    "Face": "lowkey_jax.face",
    "load_lpips": "lowkey_jax.perceptual",
}

__all__ = ["__version__", "cloak", *_EXPORTS]


def _is_single(images) -> bool:
    """One photo: a path, a PIL image, or an array of rank 3 (``[H, W, 3]``)."""
    if isinstance(images, (str, os.PathLike)):
        return True
    if hasattr(images, "convert") and hasattr(images, "size"):  # PIL image
        return True
    return getattr(images, "ndim", None) == 3


def _load(image):
    """Paths are read like the CLI reads them (content sniffing, EXIF orientation)."""
    if isinstance(image, (str, os.PathLike)):
        from lowkey_jax.imageio import read_image

        return read_image(image).rgb
    return image


def cloak(images, config=None, **kwargs):
    """Cloak one photo or several (see :func:`lowkey_jax.attack.cloak` for the keywords).

    Args:
      images: one photo (a uint8 ``[H, W, 3]`` RGB array, a PIL image, or a path as ``str``
        or ``os.PathLike``), or a sequence of them (a ``[N, H, W, 3]`` array counts as N).
      config: a :class:`Config` (default settings when None).
    Returns:
      One :class:`Result` for one photo; a list of them, in order, for a sequence.
    Raises:
      lowkey_jax.imageio.ImageError: a path that cannot be read (names the file and why).
      ValueError: an array that is not a uint8 ``[H, W, 3]`` RGB image.
    """
    from lowkey_jax import attack

    if _is_single(images):
        return attack.cloak([_load(images)], config, **kwargs)[0]
    return attack.cloak([_load(im) for im in images], config, **kwargs)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowkey_jax' has no attribute {name!r}")
