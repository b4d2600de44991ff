"""lowkey-jax: LowKey adversarial face cloaking in JAX and Flax NNX."""

from lowkey_jax._version import __version__
from lowkey_jax.perceptual import load_lpips

__all__ = ["__version__", "load_lpips"]
