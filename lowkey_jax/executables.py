"""Compiled executables kept on disk, so a later process skips tracing as well as compiling.

JAX's persistent compilation cache (``jax_compilation_cache_dir``) saves the XLA compile,
but each process still traces and lowers the attack before it can look the program up:
about 9 s of Python per photo shape on a 2-core machine, on every CLI run. This module
stores the compiled attack itself (``jax.experimental.serialize_executable``) under a key
made of everything the program depends on, and loads it without tracing.

The key (:func:`key`) covers: this package's version and source files, the versions of jax
and jaxlib, the backend (platform, its version, device kinds, device and process counts), the
host CPU's instruction-set flags (an executable compiled for one CPU may not run on another),
``XLA_FLAGS`` and the JAX settings that change programs, plus what the caller adds (the
attack's settings and the shapes, dtypes and shardings of its arguments). A change to any of
these gives a new key, so stale entries are never loaded: they only take space, and
:func:`store` keeps the directory under :data:`MAX_BYTES` by removing the entries used least
recently (loading one marks it used). Deleting the directory is always safe; the next run
compiles again.

An executable that JAX itself read back from its persistent cache cannot be serialised again
(running the reloaded copy fails with "Function ... not found" on CPU, jax 0.10), so
:func:`store` is only given executables compiled in this process (the caller checks with
:class:`CompileWatch`), and the attack's own entries in JAX's cache are removed
(:func:`drop_jax_entries`): they would be served instead of compiled next time.

Loading an executable runs code from the cache directory, exactly as JAX's own persistent
cache does: keep it private (it lives under ``$LOWKEY_JAX_HOME``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import tempfile
import threading
from functools import cache
from pathlib import Path
from typing import Any

import jax

__all__ = ["FORMAT", "MAX_BYTES", "CompileWatch", "key", "load", "store", "prune", "drop_jax_entries", "signature",
           "load_or_compile", "compilation_cache_dir", "own_jax_cache", "stored", "NO_CACHE_ENV"]

FORMAT = 1  # bumped whenever the file layout changes
# Size cap of a directory of stored executables (about 8 MB per photo shape and setting on
# CPU): 60 or so entries; older ones are compiled again when next needed.
MAX_BYTES = 512 * 2**20
NO_CACHE_ENV = "LOWKEY_JAX_NO_COMPILE_CACHE"
PROGRAMS_DIR = "programs"  # executables of :func:`stored` programs (the attack keeps its own)


def compilation_cache_dir() -> Path | None:
    """Where compiled programs are cached: ``$LOWKEY_JAX_HOME/xla-cache`` (default
    ``~/.cache/lowkey-jax/xla-cache``), or None when ``$LOWKEY_JAX_NO_COMPILE_CACHE`` is set
    to anything but ``""``/``0``."""
    if os.environ.get(NO_CACHE_ENV, "") not in ("", "0"):
        return None
    from lowkey_jax.store import home

    return home() / "xla-cache"


def own_jax_cache() -> Path | None:
    """JAX's persistent cache directory when it is ours (:func:`compilation_cache_dir`), else
    None (a directory the user configured is left alone)."""
    cache_dir = jax.config.jax_compilation_cache_dir
    own = compilation_cache_dir()
    return own if cache_dir and own is not None and Path(cache_dir) == own else None


@cache
def _source_digest() -> str:
    """sha256 over every ``.py`` file of the package (names and contents)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _cpu_flags() -> str:
    """The host CPU's feature flags (``/proc/cpuinfo``), or the platform's description."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


@cache
def _environment() -> str:
    import jaxlib

    from lowkey_jax._version import __version__

    backend = jax.devices()[0].client
    return repr((
        FORMAT, jax.__version__, jaxlib.__version__, backend.platform, backend.platform_version,
        tuple(sorted({d.device_kind for d in jax.devices()})), jax.device_count(), jax.process_count(),
        _cpu_flags(), os.environ.get("XLA_FLAGS", ""), bool(jax.config.jax_enable_x64),
        str(jax.config.jax_default_prng_impl), __version__, _source_digest(),
    ))


def signature(args: Any) -> tuple:
    """Shapes, dtypes and shardings of a pytree of arrays (hashable)."""
    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return (tuple(x.shape), str(x.dtype), repr(getattr(sharding, "spec", None)))

    return (str(jax.tree.structure(args)), tuple(leaf(x) for x in jax.tree.leaves(args)))


def key(*parts: Any) -> str:
    """File-name-safe key of ``parts`` (reprs) in this environment (see the module docstring)."""
    h = hashlib.sha256(_environment().encode())
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:40]


def load(path: Path, args: Any) -> jax.stages.Compiled | None:
    """The executable stored at ``path`` for arguments like ``args``, or None when there is
    none or it cannot be used (a damaged or foreign file is removed)."""
    from jax.experimental import serialize_executable

    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        entry = pickle.loads(data)
        in_tree = jax.tree.structure((args, {}))
        if entry.get("format") != FORMAT or entry["in_tree"] != in_tree:
            raise ValueError("stored for other arguments")
        exe = serialize_executable.deserialize_and_load(entry["payload"], in_tree, entry["out_tree"])
    except Exception:  # damaged, truncated or from another build: compile instead
        path.unlink(missing_ok=True)
        return None
    try:
        os.utime(path)  # used now: pruned last
    except OSError:
        pass
    return exe


def prune(directory: Path, max_bytes: int = MAX_BYTES, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used ``*.bin`` entries of ``directory`` (by modification
    time, which :func:`load` refreshes) until the rest fit in ``max_bytes``; never ``keep``.
    Returns the removed paths."""
    entries = []
    for p in Path(directory).glob("*.bin"):
        try:
            st = p.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if keep is not None and p == keep:
            continue
        try:
            p.unlink()
        except OSError:
            continue
        total -= size
        removed.append(p)
    return removed


def store(path: Path, compiled: jax.stages.Compiled, max_bytes: int = MAX_BYTES) -> bool:
    """Write ``compiled`` to ``path`` atomically, then :func:`prune` its directory to
    ``max_bytes``; False if it cannot be stored."""
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        data = pickle.dumps({"format": FORMAT, "payload": payload, "in_tree": in_tree, "out_tree": out_tree})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        prune(path.parent, max_bytes, keep=path)
        return True
    except Exception:  # a read-only or full disk, or a backend that cannot serialise
        return False


def drop_jax_entries(cache_dir: Path, function: str) -> int:
    """Remove JAX's persistent-cache entries of jitted ``function`` (files
    ``jit_<function>-<key>-...``) from ``cache_dir``; returns how many."""
    n = 0
    for p in Path(cache_dir).glob(f"jit_{function}-*"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


class CompileWatch:
    """Counts JAX persistent-cache hits while active: ``with CompileWatch() as w: ...``
    then ``w.hits``."""

    _lock = threading.Lock()
    _active: list["CompileWatch"] = []
    _registered = False

    def __init__(self):
        self.hits = 0

    @classmethod
    def _listen(cls, name: str, **kwargs) -> None:
        if name == "/jax/compilation_cache/cache_hits":
            with cls._lock:
                for w in cls._active:
                    w.hits += 1

    def __enter__(self) -> "CompileWatch":
        with self._lock:
            if not CompileWatch._registered:
                jax.monitoring.register_event_listener(CompileWatch._listen)
                CompileWatch._registered = True
            self._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._active.remove(self)


def load_or_compile(jitted, args: tuple, path: Path, *, jax_cache: Path | None = None,
                    name: str | None = None) -> tuple[jax.stages.Compiled, bool]:
    """``jitted``'s executable for ``args``: read from ``path`` (no tracing) when stored
    there, else traced and compiled here and stored at ``path``. ``jax_cache``/``name``: the
    directory of JAX's own persistent cache (when it is ours) and the jitted function's
    ``__name__``, whose entries there are removed (they would be served instead of compiled
    next time, and such a copy cannot be stored). Returns ``(executable, loaded)``."""
    exe = load(path, args)
    if exe is not None:
        return exe, True
    with CompileWatch() as watch:
        exe = jitted.lower(*args).compile()
    if not watch.hits:  # compiled here (one read back from JAX's cache cannot be stored)
        store(path, exe)
    if jax_cache is not None and name:
        drop_jax_entries(jax_cache, name)
    return exe, False


def stored(jitted, name: str, *key_parts: Any):
    """``jitted`` (a ``jax.jit`` of a function called ``name``) behind the store: each
    argument signature's executable is read from disk in a later process instead of being
    traced again (about a second per network on a 2-core machine), compiled and stored the
    first time. ``key_parts`` tell programs of one function apart (e.g. the network). Plain
    ``jitted`` when there is no compilation cache directory or there are several processes.
    The returned function has ``_cache_size()`` (signatures compiled or loaded) like a jit."""
    cache_dir = jax.config.jax_compilation_cache_dir
    if not cache_dir or jax.process_count() > 1:
        return jitted
    own = own_jax_cache()
    compiled: dict[tuple, tuple] = {}

    def call(*args):
        sig = signature(args)
        if sig not in compiled:
            path = Path(cache_dir) / PROGRAMS_DIR / f"{key(name, *key_parts, sig)}.bin"
            compiled[sig] = (*load_or_compile(jitted, args, path, jax_cache=own, name=name), path)
        exe, loaded, path = compiled[sig]
        try:
            return exe(*args)
        except jax.errors.JaxRuntimeError:
            if not loaded:
                raise
            path.unlink(missing_ok=True)  # loads but does not run: compile afresh
            compiled[sig] = (jitted.lower(*args).compile(), False, path)
            return compiled[sig][0](*args)

    call._cache_size = lambda: len(compiled)
    return call
