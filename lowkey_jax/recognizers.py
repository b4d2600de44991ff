"""The face recognisers of the attack ensemble, behind one small interface."""

from __future__ import annotations

import dataclasses
import importlib
from functools import cache

import jax
from flax import nnx

from lowkey_jax.checkpoint import abstract, load_params
from lowkey_jax.store import load_weights

__all__ = ["RECOGNIZERS", "Recognizer", "load_recognizer"]

# name -> (module, class, configuration). Each module defines WEIGHTS, INPUT_SIZE and
# EMBED_DIM; a configuration (the name of a module attribute with ``weights`` and
# ``embed_dim``, passed to the class as ``config=``) overrides WEIGHTS and EMBED_DIM, so that
# one network serves several pretrained models.
RECOGNIZERS: dict[str, tuple[str, str, str | None]] = {
    "dlib": ("lowkey_jax.models.dlib_resnet", "DlibResNet", None),
    "facenet": ("lowkey_jax.models.facenet", "FaceNet", None),
    "sface": ("lowkey_jax.models.sface", "SFace", None),
    "facenet128": ("lowkey_jax.models.facenet", "FaceNet", "FACENET128"),
    "arcface-mobilenet": ("lowkey_jax.models.arcface_mobilenet", "ArcFaceMobileNet", None),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Recognizer:
    """A pretrained face recogniser.

    Attributes:
      name: a key of :data:`RECOGNIZERS` (``"dlib"``, ``"facenet"``, ``"sface"``,
        ``"facenet128"``, ``"arcface-mobilenet"``).
      input_size: ``(H, W)`` of the aligned chip it expects.
      embed_dim: length of its embedding.
      module: the NNX module; ``module(chips)`` is the same as :meth:`embed`.
    """

    name: str
    input_size: tuple[int, int]
    embed_dim: int
    module: nnx.Module

    def embed(self, chips: jax.Array) -> jax.Array:
        """``[N, H, W, 3]`` float32 RGB chips in [0, 1], aligned as the model's original
        pipeline aligns them (see :func:`lowkey_jax.align.align`) -> ``[N, D]`` native
        embeddings (dlib: raw 128-D; FaceNet: L2-normalised 512-D; SFace: raw 128-D;
        facenet128: raw 128-D; arcface-mobilenet: raw 128-D).
        Jittable and differentiable."""
        return self.module(chips)


@cache
def load_recognizer(name: str) -> Recognizer:
    """Load a recogniser with its pretrained weights (fetched and converted on first use)."""
    if name not in RECOGNIZERS:
        raise ValueError(f"unknown recogniser {name!r}; choose from {', '.join(RECOGNIZERS)}")
    module_name, cls_name, config_name = RECOGNIZERS[name]
    mod = importlib.import_module(module_name)
    if config_name is None:
        model = abstract(lambda: getattr(mod, cls_name)(rngs=nnx.Rngs(0)))
        weights, embed_dim = mod.WEIGHTS, mod.EMBED_DIM
    else:
        config = getattr(mod, config_name)
        model = abstract(lambda: getattr(mod, cls_name)(rngs=nnx.Rngs(0), config=config))
        weights, embed_dim = config.weights, config.embed_dim
    load_params(model, load_weights(weights), name=f"weights {weights}")
    return Recognizer(name, tuple(mod.INPUT_SIZE), int(embed_dim), model)
