"""MTCNN P-Net, R-Net and O-Net weights from the facenet-pytorch 2.6.0 wheel.

Sources (see weights/manifest.json): ``facenet_pytorch/data/{pnet,rnet,onet}.pt``, torch
zip-format ``state_dict`` files (read without torch by :func:`convert.pickles.load_torch`).
They hold the original MTCNN weights of Zhang et al. (via davidsandberg/facenet).

Output: one flat dict for :class:`lowkey_jax.models.mtcnn.MTCNN`, keys ``"<net>.<layer>.<param>"``
(``"pnet.conv1.kernel"``, ``"rnet.prelu4.alpha"``, ``"onet.dense6_3.bias"``, ...).

Layout changes, all done here once:
- convolutions: torch OIHW -> HWIO;
- PReLU slopes: ``[C]`` unchanged;
- dense layers: torch ``[out, in]`` -> ``[in, out]``. The first dense layer of R-Net and O-Net
  reads a flattened feature map; facenet-pytorch flattens it as ``x.permute(0, 3, 2, 1)``
  of NCHW, i.e. in (W, H, C) order. The NHWC modules flatten in (H, W, C) order, so those
  kernels' input axis is reordered from (W, H, C) to (H, W, C).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .pickles import load_torch

__all__ = ["convert", "KEY_MAP"]

# Layer tables: (source layer name, kind). kind: "conv" | "prelu" | "dense" |
# ("dense_whc", H, W, C) for a dense layer reading a flattened (W, H, C) feature map.
_LAYERS: dict[str, tuple] = {
    "pnet": (
        ("conv1", "conv"), ("prelu1", "prelu"),
        ("conv2", "conv"), ("prelu2", "prelu"),
        ("conv3", "conv"), ("prelu3", "prelu"),
        ("conv4_1", "conv"), ("conv4_2", "conv"),
    ),
    "rnet": (
        ("conv1", "conv"), ("prelu1", "prelu"),
        ("conv2", "conv"), ("prelu2", "prelu"),
        ("conv3", "conv"), ("prelu3", "prelu"),
        ("dense4", ("dense_whc", 3, 3, 64)), ("prelu4", "prelu"),
        ("dense5_1", "dense"), ("dense5_2", "dense"),
    ),
    "onet": (
        ("conv1", "conv"), ("prelu1", "prelu"),
        ("conv2", "conv"), ("prelu2", "prelu"),
        ("conv3", "conv"), ("prelu3", "prelu"),
        ("conv4", "conv"), ("prelu4", "prelu"),
        ("dense5", ("dense_whc", 3, 3, 128)), ("prelu5", "prelu"),
        ("dense6_1", "dense"), ("dense6_2", "dense"), ("dense6_3", "dense"),
    ),
}


def _key_map() -> dict[tuple[str, str], tuple[str, object]]:
    """``(role, source key) -> (module key, transform)`` for every expected source tensor."""
    table: dict[tuple[str, str], tuple[str, object]] = {}
    for net, layers in _LAYERS.items():
        for layer, kind in layers:
            if kind == "prelu":
                table[(net, f"{layer}.weight")] = (f"{net}.{layer}.alpha", "prelu")
                continue
            table[(net, f"{layer}.weight")] = (f"{net}.{layer}.kernel", kind)
            table[(net, f"{layer}.bias")] = (f"{net}.{layer}.bias", "bias")
    return table


KEY_MAP = _key_map()


def _transform(x: np.ndarray, kind: object, name: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if kind == "conv":
        if x.ndim != 4:
            raise ValueError(f"{name}: expected an OIHW conv kernel, got shape {x.shape}")
        return x.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if kind in ("bias", "prelu"):
        if x.ndim != 1:
            raise ValueError(f"{name}: expected a vector, got shape {x.shape}")
        return x
    if kind == "dense":
        if x.ndim != 2:
            raise ValueError(f"{name}: expected a [out, in] matrix, got shape {x.shape}")
        return x.T
    if isinstance(kind, tuple) and kind[0] == "dense_whc":
        _, h, w, c = kind
        if x.ndim != 2 or x.shape[1] != h * w * c:
            raise ValueError(f"{name}: expected [out, {h * w * c}], got shape {x.shape}")
        out = x.shape[0]
        # [out, W, H, C] (facenet-pytorch's flatten order) -> [H, W, C, out] -> [H*W*C, out]
        return x.reshape(out, w, h, c).transpose(2, 1, 3, 0).reshape(h * w * c, out)
    raise ValueError(f"{name}: unknown transform {kind!r}")


def convert(inputs: dict[str, Path]) -> dict[str, np.ndarray]:
    """``{"pnet"|"rnet"|"onet": path to facenet-pytorch .pt}`` -> flat MTCNN params (float32)."""
    if set(inputs) != set(_LAYERS):
        raise ValueError(f"MTCNN converter needs roles {sorted(_LAYERS)}, got {sorted(inputs)}")
    out: dict[str, np.ndarray] = {}
    used: set[tuple[str, str]] = set()
    for net in _LAYERS:
        state = load_torch(inputs[net])
        expected = {src for (role, src) in KEY_MAP if role == net}
        unexpected = sorted(set(state) - expected)
        missing = sorted(expected - set(state))
        if unexpected or missing:
            raise ValueError(f"MTCNN {net}: unexpected source tensors {unexpected}, missing {missing}")
        for src, value in state.items():
            key, kind = KEY_MAP[(net, src)]
            if key in out or (net, src) in used:
                raise ValueError(f"MTCNN {net}: {src} maps to {key} twice")
            used.add((net, src))
            out[key] = np.ascontiguousarray(_transform(value, kind, f"{net}/{src}"))
    if used != set(KEY_MAP):
        raise ValueError(f"MTCNN: source tensors not used: {sorted(set(KEY_MAP) - used)}")
    return out
