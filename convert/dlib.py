"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``) -> flat params.

The ``.dat`` file is ``dlib::serialize(anet_type)`` (dlib's ``dnn_face_recognition_ex.cpp``
and ``tools/python/src/face_recognition.cpp``)::

    residual<N>      = add_prev1<block<N,1,tag1<S>>>
    residual_down<N> = add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<S>>>>>>
    block<N,stride>  = affine<con<N,3,3,1,1,relu<affine<con<N,3,3,stride,stride,S>>>>>
    ares = relu<residual>, ares_down = relu<residual_down>
    anet_type = loss_metric<fc_no_bias<128,avg_pool_everything<
        ares_down<256,                                  # alevel0
        ares<256,ares<256,ares_down<256,                # alevel1
        ares<128,ares<128,ares_down<128,                # alevel2
        ares<64,ares<64,ares<64,ares_down<64,           # alevel3
        ares<32,ares<32,ares<32,                        # alevel4
        max_pool<3,3,2,2,relu<affine<con<32,7,7,2,2,input_rgb_image_sized<150>>>>>>>>>...>>>

dlib serializes a network outside-in: ``add_loss_layer`` writes its version, the loss, then
its subnetwork; every ``add_layer`` writes its version, then *its subnetwork*, then its own
layer details and bookkeeping (flags, cached tensors); tag and skip layers write a version
and their subnetwork. So the stream holds the versions from the output layer down to the
input, then the input layer, then the layer details from the input up to the output.
:func:`read_resnet` walks this grammar against the expected architecture (:data:`LAYERS`,
built from the :data:`STAGES` table) and fails loudly on any mismatch of layer tag,
filter count, kernel size, stride, padding, tensor shape, or on trailing bytes.

Layer details (dlib 20.0.1 ``dnn/layers.h``, ``input.h``, ``loss.h``):

- ``con_`` (``"con_4"``..``"con_6"``): params tensor (filters ``[O, I, kh, kw]`` then biases
  ``[O]``), num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x, filters and biases
  alias tensors, 4 learning-rate/decay doubles, [use_bias], [use_relu]. dlib's default padding
  is ``k // 2`` for stride 1 and 0 for any other stride (checked against the file).
- ``affine_`` (``"affine_"`` / ``"affine_2"``): params (gamma ``[C]`` then beta ``[C]``),
  gamma and beta alias tensors, mode (0 = CONV_MODE, per channel), [disabled].
- ``relu_`` / ``"relu_2"`` + disabled; ``max_pool_2`` / ``avg_pool_2``: nr, nc, strides, paddings;
  ``add_prev_``; ``fc_2`` / ``fc_3``: num_outputs, num_inputs, params (weights ``[in, out]``),
  alias tensors, bias mode (1 = FC_NO_BIAS), 4 doubles, [use_bias].
- ``input_rgb_image_sized``: avg_red, avg_green, avg_blue (floats), nr, nc.
- ``loss_metric_2``: margin, distance threshold.

The released file (dlib 19.4, March 2017) uses the older tags ``con_4`` (no use_bias /
use_relu fields), ``affine_`` (no disabled flag), ``relu_`` and ``fc_2``; its networks were
``clean()``ed, so every cached output / gradient tensor is empty (checked). The 5,614,592
parameters are raw float32; the rest of the 22,466,066 bytes is 7,698 bytes of structure.

Output keys follow :class:`lowkey_jax.models.dlib_resnet.DlibResNet`: ``conv.kernel`` (HWIO),
``conv.bias``, ``affine.gamma``, ``affine.beta``, ``blocks.<i>.conv{1,2}.{kernel,bias}``,
``blocks.<i>.affine{1,2}.{gamma,beta}``, ``fc.kernel`` (``[256, 128]``: dlib's fc computes
``x @ W`` with ``x`` flattened in CHW order, here over a 1x1 map).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .dlib_serialize import DlibSerializationError, Reader
from lowkey_jax.models.dlib_resnet import EMBED_DIM, INPUT_MEANS, STAGES
from lowkey_jax.models.dlib_resnet import INPUT_SIZE as _INPUT_SIZE

__all__ = [
    "DlibSerializationError",
    "STAGES",
    "LAYERS",
    "KEY_MAP",
    "INPUT_MEANS",
    "ParamLayer",
    "read_resnet",
    "convert_resnet",
]

# The architecture (STAGES: (filters, blocks, first block downsamples), alevel4 .. alevel0)
# and input means are the JAX model's own constants: the file must match them exactly.
STEM_FILTERS = STAGES[0][0]
INPUT_SIZE = _INPUT_SIZE[0]


def _default_pad(k: int, stride: int) -> int:
    """dlib's default padding of con_/max_pool_/avg_pool_: ``k // 2`` if stride 1, else 0."""
    return k // 2 if stride == 1 else 0


def _con(n: int, k: int, stride: int, key: str) -> dict:
    return dict(kind="con", n=n, k=k, stride=stride, pad=_default_pad(k, stride), key=key)


def _build_layers() -> tuple[tuple[dict, ...], tuple[tuple[str, str], ...]]:
    """The expected layer sequence from the input to the output, and the key map.

    Each layer is a dict with ``wrapper`` ("add_layer" | "tag" | "skip") and, for add_layers,
    the ``kind`` of its details plus the expected hyper-parameters. The key map lists
    ``(target key prefix, source layer kind)`` for every layer with parameters, in order.
    """
    layers: list[dict] = []

    def add(**d):
        d.setdefault("wrapper", "add_layer")
        layers.append(d)

    add(**_con(STEM_FILTERS, 7, 2, "conv"))
    add(kind="affine", key="affine")
    add(kind="relu")
    add(kind="max_pool", k=3, stride=2, pad=0)
    b = 0
    for n, count, down in STAGES:
        for j in range(count):
            stride = 2 if down and j == 0 else 1
            p = f"blocks.{b}"
            add(wrapper="tag", id=1)
            add(**_con(n, 3, stride, f"{p}.conv1"))
            add(kind="affine", key=f"{p}.affine1")
            add(kind="relu")
            add(**_con(n, 3, 1, f"{p}.conv2"))
            add(kind="affine", key=f"{p}.affine2")
            if stride == 2:
                add(wrapper="tag", id=2)
                add(wrapper="skip", id=1)
                add(kind="avg_pool", k=2, stride=2, pad=0)
                add(kind="add_prev", id=2)
            else:
                add(kind="add_prev", id=1)
            add(kind="relu")
            b += 1
    add(kind="avg_pool", k=0, stride=1, pad=0)  # avg_pool_everything
    add(kind="fc", n=EMBED_DIM, key="fc")
    key_map = tuple((d["key"], d["kind"]) for d in layers if "key" in d)
    return tuple(layers), key_map


LAYERS, KEY_MAP = _build_layers()


@dataclasses.dataclass
class ParamLayer:
    """One layer's source tensors as stored in the file (dlib layouts, float32)."""

    kind: str  # "con" | "affine" | "fc"
    key: str  # target key prefix
    tensors: dict[str, np.ndarray]  # con: filters [O,I,kh,kw], biases [O]; affine: gamma, beta [C]; fc: weights [in,out]
    offset: int  # byte offset of the layer's details (for error messages)


# ------------------------------------------------------------------------------ details


def _check(r: Reader, what: str, got, want, pos: int) -> None:
    if got != want:
        r.error(f"{what}: file has {got!r}, the dlib_resnet architecture expects {want!r}", pos)


def _read_multipliers(r: Reader) -> None:
    for _ in range(4):  # learning rate / weight decay multipliers: training-only
        r.read_double()


def _split_params(r: Reader, params: np.ndarray, shapes: list[tuple[int, ...]], pos: int) -> list[np.ndarray]:
    flat = params.reshape(-1)
    total = sum(int(np.prod(s)) for s in shapes)
    _check(r, "parameter tensor size", flat.size, total, pos)
    out, start = [], 0
    for s in shapes:
        size = int(np.prod(s))
        out.append(flat[start : start + size].reshape(s).copy())
        start += size
    return out


def _read_con(r: Reader, spec: dict, in_channels: int) -> tuple[ParamLayer, int]:
    pos = r.pos
    version = r.expect_string("con_4", "con_5", "con_6", what="con_ layer")
    params = r.read_tensor()
    num_filters = r.read_int()
    nr, nc = r.read_int(), r.read_int()
    sy, sx = r.read_int(4), r.read_int(4)
    py, px = r.read_int(4), r.read_int(4)
    filters = r.read_alias_tensor()
    biases = r.read_alias_tensor()
    _read_multipliers(r)
    use_bias = r.read_bool() if version in ("con_5", "con_6") else True
    use_relu = r.read_bool() if version == "con_6" else False
    n, k, s, p = spec["n"], spec["k"], spec["stride"], spec["pad"]
    _check(r, f"{spec['key']} num_filters", num_filters, n, pos)
    _check(r, f"{spec['key']} kernel size", (nr, nc), (k, k), pos)
    _check(r, f"{spec['key']} stride", (sy, sx), (s, s), pos)
    _check(r, f"{spec['key']} padding", (py, px), (p, p), pos)
    _check(r, f"{spec['key']} filters shape", filters, (n, in_channels, k, k), pos)
    _check(r, f"{spec['key']} biases shape", biases, (1, n, 1, 1), pos)
    _check(r, f"{spec['key']} use_bias", use_bias, True, pos)
    _check(r, f"{spec['key']} use_relu (fused relu)", use_relu, False, pos)
    w, bias = _split_params(r, params, [filters, (n,)], pos)
    return ParamLayer("con", spec["key"], {"filters": w, "biases": bias}, pos), n


def _read_affine(r: Reader, spec: dict, channels: int) -> ParamLayer:
    pos = r.pos
    version = r.expect_string("affine_", "affine_2", what="affine_ layer (bn_ is not supported)")
    params = r.read_tensor()
    gamma = r.read_alias_tensor()
    beta = r.read_alias_tensor()
    mode = r.read_int(4)
    disabled = r.read_bool() if version == "affine_2" else False
    _check(r, f"{spec['key']} mode (0 = CONV_MODE)", mode, 0, pos)
    _check(r, f"{spec['key']} disabled", disabled, False, pos)
    _check(r, f"{spec['key']} gamma shape", gamma, (1, channels, 1, 1), pos)
    _check(r, f"{spec['key']} beta shape", beta, (1, channels, 1, 1), pos)
    g, b = _split_params(r, params, [(channels,), (channels,)], pos)
    return ParamLayer("affine", spec["key"], {"gamma": g, "beta": b}, pos)


def _read_relu(r: Reader) -> None:
    pos = r.pos
    version = r.expect_string("relu_", "relu_2", what="relu_ layer")
    if version == "relu_2":
        _check(r, "relu disabled", r.read_bool(), False, pos)


def _read_pool(r: Reader, spec: dict) -> None:
    pos = r.pos
    name = spec["kind"]
    r.expect_string(f"{name}_2", what=f"{name}_ layer")
    nr, nc = r.read_int(), r.read_int()
    sy, sx = r.read_int(4), r.read_int(4)
    py, px = r.read_int(4), r.read_int(4)
    k, s, p = spec["k"], spec["stride"], spec["pad"]
    _check(r, f"{name} window", (nr, nc), (k, k), pos)
    _check(r, f"{name} stride", (sy, sx), (s, s), pos)
    _check(r, f"{name} padding", (py, px), (p, p), pos)


def _read_fc(r: Reader, spec: dict, in_channels: int) -> ParamLayer:
    pos = r.pos
    version = r.expect_string("fc_2", "fc_3", what="fc_ layer")
    num_outputs = r.read_uint()
    num_inputs = r.read_uint()
    params = r.read_tensor()
    weights = r.read_alias_tensor()
    biases = r.read_alias_tensor()
    bias_mode = r.read_int(4)
    _read_multipliers(r)
    use_bias = r.read_bool() if version == "fc_3" else True
    n = spec["n"]
    _check(r, "fc num_outputs", num_outputs, n, pos)
    _check(r, "fc num_inputs", num_inputs, in_channels, pos)
    _check(r, "fc bias mode (1 = FC_NO_BIAS)", bias_mode, 1, pos)
    _check(r, "fc weights shape", weights, (in_channels, n, 1, 1), pos)
    _check(r, "fc biases shape (none with FC_NO_BIAS)", biases, (0, 0, 0, 0), pos)
    del use_bias  # irrelevant with FC_NO_BIAS: the params hold the weights only (size checked below)
    (w,) = _split_params(r, params, [(in_channels, n)], pos)
    return ParamLayer("fc", spec["key"], {"weights": w}, pos)


def _read_input(r: Reader) -> tuple[float, float, float]:
    pos = r.pos
    r.expect_string("input_rgb_image_sized", what="input layer")
    means = (r.read_float(), r.read_float(), r.read_float())
    nr, nc = r.read_uint(), r.read_uint()
    _check(r, "input size", (nr, nc), (INPUT_SIZE, INPUT_SIZE), pos)
    want = tuple(float(np.float32(m)) for m in INPUT_MEANS)
    _check(r, "input means (red, green, blue)", means, want, pos)
    return means


def _read_empty_tensor(r: Reader, what: str) -> None:
    pos = r.pos
    t = r.read_tensor()
    if t.size:
        r.error(f"{what} holds a non-empty tensor of shape {t.shape}; expected a cleaned network", pos)


# ------------------------------------------------------------------------------ network


def read_resnet(data: bytes, *, name: str = "dlib_face_recognition_resnet_model_v1.dat") -> list[ParamLayer]:
    """Parse the whole network; return its parametrised layers from the input to the output.

    Raises:
      DlibSerializationError: on truncation, corruption, trailing bytes, or any layer that
        differs from the expected ``anet_type`` (message names the layer and byte offset).
    """
    r = Reader(data, name=name)
    try:
        return _read_resnet(r)
    except DlibSerializationError:
        raise
    except (ValueError, IndexError, OverflowError) as err:  # defensive: never a bare crash
        raise DlibSerializationError(f"{name}: malformed data near byte {r.pos}: {err}") from err


def _read_resnet(r: Reader) -> list[ParamLayer]:
    # add_loss_layer: version, loss details, then the subnetwork
    pos = r.pos
    _check(r, "add_loss_layer version", r.read_int(4), 1, pos)
    loss = r.expect_string("loss_metric_", "loss_metric_2", what="loss layer")
    if loss == "loss_metric_2":
        r.read_float()  # margin (training only)
        r.read_float()  # distance threshold (training only)

    # wrapper versions, outermost (fc) first
    versions: list[int] = [0] * len(LAYERS)
    for i in range(len(LAYERS) - 1, -1, -1):
        spec = LAYERS[i]
        pos = r.pos
        v = r.read_int(4)
        if spec["wrapper"] == "add_layer":
            ok = (2, 3) if i == 0 else (1, 2)  # the add_layer over the input layer has its own versions
        else:
            ok = (1,)
        if v not in ok:
            what = spec.get("kind", spec["wrapper"])
            r.error(f"layer {len(LAYERS) - i} ({spec['wrapper']} {what}): unexpected version {v}, expected {ok}", pos)
        versions[i] = v

    _read_input(r)

    # layer details, innermost (the 7x7 con) first
    out: list[ParamLayer] = []
    channels = 3
    for i, spec in enumerate(LAYERS):
        if spec["wrapper"] != "add_layer":
            continue  # tag and skip layers have nothing after their subnetwork
        kind = spec["kind"]
        if kind == "con":
            layer, channels = _read_con(r, spec, channels)
            out.append(layer)
        elif kind == "affine":
            out.append(_read_affine(r, spec, channels))
        elif kind == "relu":
            _read_relu(r)
        elif kind in ("max_pool", "avg_pool"):
            _read_pool(r, spec)
        elif kind == "add_prev":
            r.expect_string("add_prev_", what="add_prev_ layer")
        elif kind == "fc":
            out.append(_read_fc(r, spec, channels))
        else:  # pragma: no cover - LAYERS only holds the kinds above
            raise AssertionError(kind)
        # add_layer bookkeeping after the details
        for _flag in ("this_layer_setup_called", "gradient_input_is_stale", "get_output_and_gradient_input_disabled"):
            r.read_bool()
        _read_empty_tensor(r, f"{kind} x_grad")
        _read_empty_tensor(r, f"{kind} cached_output")
        if i == 0:
            _read_empty_tensor(r, f"{kind} grad_final")
            if versions[i] >= 3:
                r.read_uint(4)  # _sample_expansion_factor
        elif versions[i] == 2:
            _read_empty_tensor(r, f"{kind} params_grad")
    r.expect_end()
    return out


# ------------------------------------------------------------------------------ converter

# source tensor name -> (target suffix, layout transform), per source layer kind
TENSOR_MAP: dict[str, dict[str, tuple[str, str]]] = {
    "con": {"filters": ("kernel", "oihw_to_hwio"), "biases": ("bias", "none")},
    "affine": {"gamma": ("gamma", "none"), "beta": ("beta", "none")},
    "fc": {"weights": ("kernel", "none")},  # already [in, out]
}

_TRANSFORMS = {
    "none": lambda a: a,
    "oihw_to_hwio": lambda a: a.transpose(2, 3, 1, 0),
}


def convert_resnet(inputs: dict[str, Path]) -> dict[str, np.ndarray]:
    """``{"model": path to dlib_face_recognition_resnet_model_v1.dat}`` -> flat float32 params.

    Every source tensor (con filters and biases, affine gamma and beta, fc weights) is used
    exactly once; the parsed layers must match :data:`KEY_MAP` one to one.
    """
    path = Path(inputs["model"])
    layers = read_resnet(path.read_bytes(), name=path.name)
    got = tuple((layer.key, layer.kind) for layer in layers)
    if got != KEY_MAP:
        raise DlibSerializationError(f"{path.name}: parsed layers {got} do not match the key map")
    out: dict[str, np.ndarray] = {}
    used = 0
    n_source = sum(len(layer.tensors) for layer in layers)
    for layer in layers:
        table = TENSOR_MAP[layer.kind]
        if set(layer.tensors) != set(table):
            raise DlibSerializationError(f"{path.name}: {layer.key}: tensors {sorted(layer.tensors)} != {sorted(table)}")
        for src, arr in layer.tensors.items():
            suffix, transform = table[src]
            key = f"{layer.key}.{suffix}"
            if key in out:
                raise DlibSerializationError(f"{path.name}: duplicate target key {key}")
            out[key] = np.ascontiguousarray(_TRANSFORMS[transform](arr), dtype=np.float32)
            used += 1
    if used != n_source or len(out) != n_source:
        raise DlibSerializationError(f"{path.name}: used {used} of {n_source} source tensors")
    return out
