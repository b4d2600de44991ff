"""The store of compiled executables (lowkey_jax.executables): round trip, keys, damaged
files, JAX's entries. The attack's use of it across processes is in test_speed.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lowkey_jax import executables as X


def _compiled(args):
    """Compiled in this process: a salt unique to the call keeps JAX's persistent cache (if
    an earlier test enabled it) from serving a copy, which could not be stored again."""
    salt = float(np.random.default_rng().integers(1, 2**30))
    with X.CompileWatch() as watch:
        exe = jax.jit(lambda a, b: (jnp.sin(a) @ b + salt, jnp.sum(b))).lower(*args).compile()
    assert watch.hits == 0
    return exe


def test_stored_executable_runs_like_the_original(tmp_path):
    args = (np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((4, 2), np.float32))
    exe = _compiled(args)
    path = tmp_path / "sub" / "entry.bin"
    assert X.store(path, exe) and path.stat().st_size > 0
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]  # atomic: no leftovers
    loaded = X.load(path, args)
    assert loaded is not None
    for got, want in zip(loaded(*args), exe(*args)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_unusable_entries_are_removed_not_fatal(tmp_path):
    args = (np.zeros((3, 4), np.float32), np.zeros((4, 2), np.float32))
    missing = tmp_path / "missing.bin"
    assert X.load(missing, args) is None
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(b"\x80\x04not a pickle of an executable")
    assert X.load(damaged, args) is None and not damaged.exists()
    other = tmp_path / "other.bin"  # stored for arguments of another structure
    X.store(other, _compiled(args))
    assert X.load(other, (args[0],)) is None and not other.exists()


def test_key_depends_on_every_part_and_on_shapes():
    a = (np.zeros((2, 3), np.float32),)
    b = (np.zeros((2, 4), np.float32),)
    assert X.key("cfg", X.signature(a)) == X.key("cfg", X.signature(a))
    assert X.key("cfg", X.signature(a)) != X.key("cfg", X.signature(b))
    assert X.key("cfg", X.signature(a)) != X.key("cfg2", X.signature(a))
    assert len(X.key("x")) == 40 and all(c in "0123456789abcdef" for c in X.key("x"))


def test_drop_jax_entries_removes_only_that_function(tmp_path):
    for name in ("jit__attack_batch-abc-cache", "jit__attack_batch-def-cache", "jit_stage-abc-cache", "other"):
        (tmp_path / name).write_bytes(b"x")
    assert X.drop_jax_entries(tmp_path, "_attack_batch") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jit_stage-abc-cache", "other"]


def test_compile_watch_counts_persistent_cache_hits():
    with X.CompileWatch() as outer:
        X.CompileWatch._listen("/jax/compilation_cache/cache_hits")
        with X.CompileWatch() as inner:
            X.CompileWatch._listen("/jax/compilation_cache/cache_hits")
            X.CompileWatch._listen("/jax/compilation_cache/cache_misses")
    X.CompileWatch._listen("/jax/compilation_cache/cache_hits")  # after both ended: counted by none
    assert (outer.hits, inner.hits) == (2, 1)


def test_the_store_keeps_its_size_cap_dropping_the_least_recently_used(tmp_path):
    import os

    args = (np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((4, 2), np.float32))
    exe = _compiled(args)
    paths = [tmp_path / f"e{i}.bin" for i in range(3)]
    for i, p in enumerate(paths):
        assert X.store(p, exe)
        os.utime(p, (1000.0 + i, 1000.0 + i))  # stored in order 0, 1, 2
    size = paths[0].stat().st_size
    assert X.load(paths[0], args) is not None  # loading marks e0 used: now the newest
    new = tmp_path / "e3.bin"
    assert X.store(new, exe, max_bytes=int(2.5 * size))  # room for two
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["e0.bin", "e3.bin"]  # e1, e2 were least recent
    (tmp_path / "notes.txt").write_text("not an entry")
    assert X.prune(tmp_path, max_bytes=0, keep=new) == [tmp_path / "e0.bin"]  # never the one just stored
    assert new.exists() and (tmp_path / "notes.txt").exists()


def test_stored_program_is_loaded_not_traced_in_a_later_process(tmp_path):
    """``executables.stored``: the first process traces, compiles and stores the program; a
    second process with the same cache directory runs it without tracing the function (its
    Python body never runs) and gets the same result; a damaged entry is compiled again."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    child = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
from lowkey_jax import executables as X
traced = []
def program(a, b):
    traced.append(1)
    return jnp.tanh(a) @ b
fn = X.stored(jax.jit(program), "program", "test")
a = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
out = np.asarray(fn(a, np.ones((4, 2), np.float32)))
out2 = np.asarray(fn(a, np.ones((4, 2), np.float32)))
print(json.dumps({"traced": len(traced), "out": out.tolist(), "same": bool((out == out2).all()),
                  "sizes": fn._cache_size()}))
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = lambda: json.loads(subprocess.run([sys.executable, "-c", child, str(tmp_path)], env=env, check=True,
                                            capture_output=True, text=True, timeout=300).stdout.splitlines()[-1])
    first = run()
    entries = sorted((tmp_path / X.PROGRAMS_DIR).glob("*.bin"))
    assert first["traced"] == 1 and first["same"] and first["sizes"] == 1 and len(entries) == 1
    second = run()
    assert second["traced"] == 0 and second["out"] == first["out"]
    entries[0].write_bytes(b"damaged")
    third = run()
    assert third["traced"] == 1 and third["out"] == first["out"] and entries[0].stat().st_size > 1000
