"""dlib ResNet face descriptor: serialization primitives, converter accounting, parity with dlib.

The reference is dlib itself (the ``dlib-bin`` wheel): ``face_recognition_model_v1(dat)
.compute_face_descriptor(chip)`` on the 55 aligned 150x150 chips of ``faces/johns``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.dlib_serialize import DlibSerializationError, Reader
from lowkey_jax.checkpoint import flat_params, load_params
from lowkey_jax.models import dlib_resnet as dr

DAT_MEMBER = "face_recognition_models-0.3.0/face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"
DAT_SIZE = 22_466_066

MAX_ABS = 1e-3
MIN_COS = 0.9999


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dat(source_file) -> Path:
    """The original ``dlib_face_recognition_resnet_model_v1.dat``."""
    return source_file("face-recognition-models", DAT_MEMBER)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    from lowkey_jax.store import load_weights

    return load_weights(dr.WEIGHTS, quiet=True)


@pytest.fixture(scope="module")
def model(weights) -> dr.DlibResNet:
    return load_params(dr.DlibResNet(rngs=nnx.Rngs(0)), weights, name=dr.WEIGHTS)


@pytest.fixture(scope="module")
def johns(shared) -> tuple[np.ndarray, list[str]]:
    """uint8 [55, 150, 150, 3] RGB chips and their identities (folder names)."""
    from PIL import Image

    files = sorted((shared / "faces" / "johns").glob("*/*.jpg"))
    if not files:
        pytest.skip("faces/johns chips not found in the shared data")
    chips = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert chips.shape == (55, 150, 150, 3) and chips.dtype == np.uint8
    return chips, [f.parent.name for f in files]


@pytest.fixture(scope="module")
def embeddings(model, johns) -> np.ndarray:
    """The JAX model's descriptors of all 55 chips, one jitted batch."""
    chips, _ = johns
    x = jnp.asarray(chips.astype(np.float32) / np.float32(255.0))
    return np.asarray(nnx.jit(lambda m, c: m(c))(model, x))


# ----------------------------------------------------------------------------- primitives


def _enc_int(v: int) -> bytes:
    """dlib's integer encoding (reference implementation of serialize.h's pack_int)."""
    a, neg = abs(v), 0x80 if v < 0 else 0
    body = bytearray()
    while True:
        body.append(a & 0xFF)
        a >>= 8
        if a == 0:
            break
    return bytes([len(body) | neg]) + bytes(body)


def _enc_float(x: float, digits: int = 24) -> bytes:
    """dlib's float_details encoding (mantissa then exponent), as float_details.h does it."""
    if math.isinf(x):
        return _enc_int(0) + _enc_int(32000 if x > 0 else 32001)
    if math.isnan(x):
        return _enc_int(0) + _enc_int(32002)
    m, e = math.frexp(x)
    mant, exp = int(m * (1 << digits)), e - digits
    for _ in range(8):
        if mant & 0xFF:
            break
        mant >>= 8
        exp += 8
    return _enc_int(mant) + _enc_int(exp)


def test_integer_and_bool_primitives():
    values = [0, 1, -1, 127, 255, 256, -300, 2**31 - 1, -(2**40), 2**63 - 1]
    r = Reader(b"".join(_enc_int(v) for v in values) + b"10")
    assert [r.read_int() for _ in values] == values
    assert (r.read_bool(), r.read_bool()) == (True, False)
    r.expect_end()
    assert _enc_int(0) == b"\x01\x00"  # zero takes one value byte; size 0 is invalid
    with pytest.raises(DlibSerializationError, match="control byte"):
        Reader(b"\x00").read_int()
    with pytest.raises(DlibSerializationError, match="control byte"):
        Reader(_enc_int(70000)).read_int(max_bytes=2)  # too wide for a C++ short
    with pytest.raises(DlibSerializationError, match="control byte"):
        Reader(_enc_int(-5)).read_uint()
    with pytest.raises(DlibSerializationError, match="truncated"):
        Reader(_enc_int(2**40)[:-1]).read_int()
    with pytest.raises(DlibSerializationError, match="bool"):
        Reader(b"x").read_bool()


def test_float_string_matrix_tensor_primitives():
    xs = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    specials = [float(np.float32(v)) for v in (0.0, 1.0, -2.5, 1e-30, 3.4e38)] + [math.inf, -math.inf]
    r = Reader(b"".join(_enc_float(float(x)) for x in [*xs, *specials]))
    got = [r.read_float() for _ in range(len(xs) + len(specials))]
    r.expect_end()
    assert np.array_equal(np.array(got[: len(xs)], np.float32), xs)  # bit exact
    assert got[len(xs) :] == specials
    assert math.isnan(Reader(_enc_float(math.nan)).read_double())
    # doubles keep their 53-bit mantissa
    assert Reader(_enc_float(0.1, digits=53)).read_double() == 0.1
    # vectorised bulk path == scalar path
    bulk = Reader(b"".join(_enc_float(float(x)) for x in xs)).read_floats(len(xs))
    assert bulk.dtype == np.float32 and np.array_equal(bulk, xs)

    s = b"con_4"
    mat = np.arange(6, dtype=np.float32).reshape(2, 3) / np.float32(4.0)
    tensor = np.array([0.0, 0.25, 0.75, 1.0], "<f4")
    blob = b"".join(
        [
            _enc_int(len(s)) + s,  # std::string
            _enc_int(-2) + _enc_int(-3) + b"".join(_enc_float(float(v)) for v in mat.ravel()),  # matrix
            _enc_int(2) + b"".join(_enc_int(d) for d in (1, 2, 1, 2)) + tensor.tobytes(),  # tensor
            _enc_int(3) + b"".join(_enc_float(v) for v in (1.5, -2.0, 0.25)),  # std::vector<float>
        ]
    )
    r = Reader(blob, name="blob")
    assert r.expect_string("con_4", "con_5") == "con_4"
    assert np.array_equal(r.read_matrix(), mat)
    t = r.read_tensor()
    assert t.shape == (1, 2, 1, 2) and t.dtype == np.float32
    assert np.array_equal(t.ravel(), tensor)
    assert r.read_vector(Reader.read_float) == [1.5, -2.0, 0.25]
    r.expect_end()
    with pytest.raises(DlibSerializationError, match="unexpected .* tag 'con_4'"):
        Reader(blob).expect_string("relu_")
    r = Reader(blob[:15])  # the string (7 bytes), the matrix header and part of its body
    r.read_string()
    with pytest.raises(DlibSerializationError, match="truncated"):
        r.read_matrix()
    with pytest.raises(DlibSerializationError, match="truncated"):
        Reader(_enc_int(100) + b"abc").read_string()


# ----------------------------------------------------------------------------- converter


def test_parameter_count(model, weights):
    params = flat_params(model)
    n = sum(int(np.prod(v.shape)) for v in params.values())
    assert n == dr.NUM_PARAMS == 5_614_592
    assert set(params) == set(weights)
    assert sum(v.size for v in weights.values()) == dr.NUM_PARAMS
    assert all(v.dtype == np.float32 for v in weights.values())


def test_converter_uses_every_tensor_once(dat, weights):
    """Every source tensor of the file lands in exactly one converted key, unchanged."""
    from convert.dlib import KEY_MAP, TENSOR_MAP, read_resnet

    data = dat.read_bytes()
    assert len(data) == DAT_SIZE
    layers = read_resnet(data)  # consumes the whole file, all cached/gradient tensors empty
    assert [(l.key, l.kind) for l in layers] == list(KEY_MAP)
    kinds = [l.kind for l in layers]
    assert (kinds.count("con"), kinds.count("affine"), kinds.count("fc")) == (29, 29, 1)
    sources = {f"{l.key}.{TENSOR_MAP[l.kind][name][0]}": arr for l in layers for name, arr in l.tensors.items()}
    n_source = sum(len(l.tensors) for l in layers)
    assert n_source == len(sources) == len(weights) == 117
    assert set(sources) == set(weights)
    n_values = sum(a.size for a in sources.values())
    assert n_values == dr.NUM_PARAMS
    # the parameters are raw float32 in the file; everything else (tags, versions,
    # hyper-parameters, empty tensors) is a few kB
    assert 0 < len(data) - 4 * n_values < 10_000
    for key, src in sources.items():
        got = weights[key]
        if src.ndim == 4:  # con filters [O, I, kh, kw] -> HWIO
            src = src.transpose(2, 3, 1, 0)
        assert got.shape == src.shape and np.array_equal(got, src), key


def test_architecture_table_matches_model(model):
    """The converter's layer table and the module agree on every conv's stride/padding."""
    from convert.dlib import LAYERS

    cons = [d for d in LAYERS if d.get("kind") == "con"]
    for spec in cons:
        m = model
        for part in spec["key"].split("."):
            m = m[int(part)] if part.isdigit() else getattr(m, part)
        k = spec["k"]
        assert m.kernel.get_value().shape[:2] == (k, k), spec["key"]
        assert m.stride == spec["stride"], spec["key"]
        assert m.padding == ((spec["pad"],) * 2,) * 2, spec["key"]
    # dlib's defaults: no padding at stride 2, k // 2 at stride 1
    assert [d["pad"] for d in cons if d["stride"] == 2] == [0] * 5
    assert all(d["pad"] == d["k"] // 2 for d in cons if d["stride"] == 1)


def test_corrupted_file_raises(dat, tmp_path):
    from convert.dlib import convert_resnet

    data = dat.read_bytes()

    def convert(blob: bytes, name: str):
        p = tmp_path / name
        p.write_bytes(blob)
        return convert_resnet({"model": p})

    for cut in (5, 1000, len(data) // 2, len(data) - 3, len(data) - 1):
        with pytest.raises(DlibSerializationError, match="truncated|unexpected|invalid"):
            convert(data[:cut], f"cut{cut}.dat")
    with pytest.raises(DlibSerializationError, match="trailing"):
        convert(data + b"\x00", "trailing.dat")
    with pytest.raises(DlibSerializationError, match="loss"):
        convert(data.replace(b"loss_metric_2", b"loss_metricX2", 1), "loss.dat")
    # a layer tag of the wrong kind
    i = data.index(b"relu_")
    with pytest.raises(DlibSerializationError, match="relu"):
        convert(data[:i] + b"relu?" + data[i + 5 :], "relu.dat")
    # the stem conv's stride stored as 3 instead of 2 (con_: tag, params, num_filters, nr, nc, stride_y)
    r = Reader(data)
    r.pos = data.index(b"con_") - 2  # the tag's length prefix: control byte 0x01 + length 5
    r.expect_string("con_4", "con_5", "con_6")
    r.read_tensor()
    assert (r.read_int(), r.read_int(), r.read_int()) == (32, 7, 7)
    assert data[r.pos : r.pos + 2] == b"\x01\x02"
    bad = data[: r.pos + 1] + b"\x03" + data[r.pos + 2 :]
    with pytest.raises(DlibSerializationError, match="stride"):
        convert(bad, "stride.dat")
    # garbage among the layer versions at the start of the stream
    with pytest.raises(DlibSerializationError, match="version|control byte"):
        convert(data[:40] + b"\xff" * 8 + data[48:], "garbage.dat")


# ----------------------------------------------------------------------------- model


def test_add_prev_zero_extends():
    a = jnp.ones((1, 3, 3, 4), jnp.float32)
    b = jnp.full((1, 4, 4, 2), 2.0, jnp.float32)
    out = np.asarray(dr.add_prev(a, b))
    assert out.shape == (1, 4, 4, 4)
    assert (out[0, :3, :3, :2] == 3).all() and (out[0, :3, :3, 2:] == 1).all()
    assert (out[0, 3, :, :2] == 2).all() and (out[0, 3, :, 2:] == 0).all()
    assert (out[0, :, 3, :2] == 2).all() and (out[0, :, 3, 2:] == 0).all()


def test_matches_dlib(dat, johns, embeddings):
    """max-abs <= 1e-3 and cosine >= 0.9999 per chip vs dlib's compute_face_descriptor."""
    dlib = pytest.importorskip("dlib")
    chips, _ = johns
    rec = dlib.face_recognition_model_v1(str(dat))
    ref = np.stack([np.asarray(rec.compute_face_descriptor(c, 0), np.float64) for c in chips])
    got = embeddings.astype(np.float64)
    assert got.shape == ref.shape == (55, dr.EMBED_DIM)
    max_abs = np.abs(got - ref).max()
    cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    print(f"dlib_resnet vs dlib on {len(chips)} chips: max-abs {max_abs:.3g}, 1 - min cosine {1.0 - cos.min():.3g}")
    assert max_abs <= MAX_ABS, f"max-abs {max_abs} > {MAX_ABS}"
    assert cos.min() >= MIN_COS, f"min cosine {cos.min()} < {MIN_COS}"


def test_identity_separation(johns, embeddings):
    """Same-person descriptors are closer than different-person ones (dlib threshold 0.6)."""
    _, ids = johns
    same, diff = [], []
    for i, j in itertools.combinations(range(len(ids)), 2):
        d = float(np.linalg.norm(embeddings[i] - embeddings[j]))
        (same if ids[i] == ids[j] else diff).append(d)
    assert len(set(ids)) == 5 and len(same) == 5 * 55 and len(diff) == 1485 - 275
    print(f"mean distance same {np.mean(same):.3f}, different {np.mean(diff):.3f}")
    assert np.mean(same) < 0.6 < np.mean(diff)
    assert np.mean(same) < np.mean(diff) - 0.2


def test_finite_gradients(model, johns):
    chips, _ = johns
    x = jnp.asarray(chips[:2].astype(np.float32) / np.float32(255.0))

    def loss(m, c):
        e = m(c)
        return jnp.sum(jnp.square(e[0] - e[1]))

    g = np.asarray(nnx.jit(nnx.grad(loss, argnums=1))(model, x))
    assert g.shape == x.shape and np.isfinite(g).all()
    assert np.abs(g).max() > 0.0
    with pytest.raises(ValueError, match="150"):
        model(jnp.zeros((1, 160, 160, 3), jnp.float32))
