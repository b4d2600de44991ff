"""lowkey-jax: LowKey adversarial face cloaking in JAX and Flax NNX.

Public API (imported lazily, so ``import lowkey_jax`` starts no JAX backend)::

    cloak(images, config=None) -> list[Result]      # lowkey_jax.attack
    Config                                           # frozen attack settings
    load_recognizer("dlib" | "facenet" | "sface")    # .embed(chips) -> [N, D]
    detect_faces(image) -> list[Face]                # MTCNN
    lowkey_jax.align.align(pixels, face, name)       # chip, differentiable in pixels
    load_lpips("alex" | "vgg")                       # lpips(x, y) -> [N]
"""

from __future__ import annotations

import importlib

from lowkey_jax._version import __version__

_EXPORTS = {
    "cloak": "lowkey_jax.attack",
    "Config": "lowkey_jax.attack",
    "Result": "lowkey_jax.attack",
    "load_recognizer": "lowkey_jax.recognizers",
    "detect_faces": "lowkey_jax.detect",
    "Face": "lowkey_jax.face",
    "load_lpips": "lowkey_jax.perceptual",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowkey_jax' has no attribute {name!r}")
