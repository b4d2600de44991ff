"""ArcFace MobileNet port (facelib ``mobilenet_fp32.tflite``): flatbuffer reading, conversion
checks and parity with the original graph run by LiteRT (``ai-edge-litert``, test-only) on
real faces from ``shared/faces/celebs``, detected and aligned by this package."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import celebs_chips
from flax import nnx

from convert.arcface_mobilenet import GRAPH_CONSTANTS, convert_graph
from convert.tflite import read_tflite
from lowkey_jax.checkpoint import flat_params
from lowkey_jax.models import arcface_mobilenet as am
from lowkey_jax.recognizers import load_recognizer

MEMBER = "facelib/facerec/feature_extraction/data/mobilenet_fp32.tflite"
NAME = "arcface-mobilenet"
MIN_COS = 0.9999
MAX_ABS = 1e-4  # embedding entries up to ~2; measured 3.3e-6 on 26 celebs faces (min cosine 0.9999999)
PHOTOS_PER_ID = 2


@pytest.fixture(scope="module")
def tflite_path(source_file):
    return source_file("facelib", MEMBER)


@pytest.fixture(scope="module")
def graph(tflite_path):
    return read_tflite(tflite_path)


@pytest.fixture(scope="module")
def chips(shared) -> np.ndarray:
    """``[N, 112, 112, 3]`` float32 in [0, 1]: the smallest photos of each celebs identity,
    detected by our MTCNN and aligned to the ArcFace template by ``align``."""
    return celebs_chips(shared, NAME, PHOTOS_PER_ID)


def test_reader_decodes_the_graph(graph):
    ops = [o.op for o in graph.operators]
    assert len(ops) == 38
    assert ops.count("CONV_2D") == 14 and ops.count("DEPTHWISE_CONV_2D") == 13 and ops.count("PAD") == 5
    assert graph.tensors[graph.inputs[0]].shape == (1, 112, 112, 3)
    assert graph.tensors[graph.outputs[0]].shape == (1, 128)
    assert all(o.options["activation"] == "RELU6" for o in graph.operators if o.op.endswith("CONV_2D"))
    consts = [t.index for t in graph.tensors if graph.is_constant(t.index)]
    assert sum(int(np.prod(graph.tensors[i].shape)) for i in consts) == GRAPH_CONSTANTS


def test_converted_keys_and_shapes_match_the_model(graph):
    params = convert_graph(graph)
    model = flat_params(am.ArcFaceMobileNet(rngs=nnx.Rngs(0)))
    assert set(params) == set(model)
    for k, v in params.items():
        assert v.shape == tuple(model[k].shape) and v.dtype == np.float32, k
    assert sum(v.size for v in params.values()) == 3_327_232


def test_converter_refuses_a_changed_graph(graph):
    pad_op = next(o for o in graph.operators if o.op == "PAD")
    buffers = list(graph.buffers)
    t = graph.tensors[pad_op.inputs[1]]
    buffers[t.buffer] = np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32).tobytes()
    with pytest.raises(ValueError, match="PAD"):
        convert_graph(dataclasses.replace(graph, buffers=buffers))
    ops = list(graph.operators)
    conv = next(i for i, o in enumerate(ops) if o.op == "DEPTHWISE_CONV_2D")
    for change, message in (({"activation": "RELU"}, "activation RELU"), ({"stride_h": 2}, "graph options")):
        changed = list(ops)
        changed[conv] = dataclasses.replace(ops[conv], options={**ops[conv].options, **change})
        with pytest.raises(ValueError, match=message):
            convert_graph(dataclasses.replace(graph, operators=changed))


def test_reader_rejects_a_non_tflite_file(tmp_path):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.tflite.*not a TFLite"):
        read_tflite(bad)


@pytest.mark.parametrize("size,kernel,stride", [(112, 3, 2), (7, 3, 2), (8, 3, 2), (56, 3, 1), (7, 1, 1), (9, 5, 3)])
def test_tf_same_pads_equal_xla_same(size, kernel, stride):
    x = jnp.arange(size * size, dtype=jnp.float32).reshape(1, size, size, 1)
    w = jnp.ones((kernel, kernel, 1, 1), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    p = am.tf_same_pads(size, kernel, stride)
    ref = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn)
    ours = jax.lax.conv_general_dilated(x, w, (stride, stride), (p, p), dimension_numbers=dn)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_parity_with_litert_on_aligned_faces(tflite_path, chips):
    """The original graph in LiteRT, fed raw 0..255 pixels (its normalisation is inside)."""
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter")
    it = interpreter_mod.Interpreter(model_path=str(tflite_path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    ref = []
    for c in chips:
        it.set_tensor(inp, (c[None] * np.float32(255.0)).astype(np.float32))
        it.invoke()
        ref.append(np.array(it.get_tensor(out)[0]))
    ref = np.stack(ref)
    ours = np.asarray(load_recognizer(NAME).embed(jnp.asarray(chips)))
    cos = np.sum(ref * ours, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(ours, axis=1))
    max_abs = float(np.abs(ref - ours).max())
    print(f"arcface-mobilenet parity on {len(chips)} faces: min cosine {cos.min():.7f}, max-abs {max_abs:.2e}, "
          f"max |ref| {np.abs(ref).max():.2f}")
    assert len(chips) >= 20
    assert cos.min() >= MIN_COS, f"min cosine {cos.min():.6f}"
    assert max_abs <= MAX_ABS, f"max-abs {max_abs:.2e} (|ref| up to {np.abs(ref).max():.2f})"
    # facelib's own wrapper normalises a second time; that input collapses the embeddings,
    # which is why this port takes raw pixels into the graph's own normalisation.
    twice = []
    for c in chips[:4]:
        it.set_tensor(inp, ((c[None] * np.float32(255.0) - np.float32(127.5)) / np.float32(128.0)).astype(np.float32))
        it.invoke()
        twice.append(np.array(it.get_tensor(out)[0]))
    tw = np.stack(twice)
    tw = tw / np.linalg.norm(tw, axis=1, keepdims=True)
    assert float((tw @ tw.T).min()) > 0.99, "double normalisation should collapse embeddings"


def test_embedding_gradient_is_finite(chips):
    rec = load_recognizer(NAME)
    x = jnp.asarray(chips[:2])
    g = jax.grad(lambda c: jnp.sum(rec.embed(c)[:, 0]))(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0.0
