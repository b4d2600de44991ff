"""Throughput plumbing: persistent compilation cache and stored attack executables, no host
callback (progress between segments), group-then-batch planning, crowds attacked in passes, batched
verification, --no-verify."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowkey_jax import attack as A
from lowkey_jax import executables as X
from lowkey_jax.face import Face

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(models=("sface",), steps=2, blur=False)


def _prepared(index: int, h: int, w: int, n_faces: int, face_px: float = 60.0) -> A.Prepared:
    """A synthetic prepared photo (no detection): ``n_faces`` identical small faces."""
    t = np.array([[face_px / 112, 0.0, 10.0], [0.0, face_px / 112, 10.0]], np.float32)
    faces = [Face([10, 10, 10 + face_px, 10 + face_px], 0.99, np.full((5, 2), 20.0)) for _ in range(n_faces)]
    return A.Prepared(index, np.zeros((h, w, 3), np.uint8), faces, 1.0, np.zeros((h, w, 3), np.float32),
                      {"sface": np.repeat(t[None], n_faces, 0)}, np.repeat(t[None], n_faces, 0))


def test_plan_batches_groups_first_then_batches():
    cfg = A.Config(models=("sface",), batch_size=4)
    # interleaved sizes, as in a folder sorted by name
    items = [_prepared(i, *((300, 300) if i % 2 else (700, 500)), 1) for i in range(10)]
    batches = A.plan_batches(items, cfg)
    assert sorted(len(b) for b in batches) == [1, 1, 4, 4]  # 5 + 5 photos, not ten batches of one
    for b in batches:
        assert len({p.bucket for p in b}) == 1
    assert sorted(p.index for b in batches for p in b) == list(range(10))


def test_plan_batches_bounds_face_slots_per_call():
    cfg = A.Config(models=("sface",), batch_size=4)
    batches = A.plan_batches([_prepared(i, 300, 300, 5) for i in range(5)], cfg)  # 6 slots each
    assert A.attack_slots(5) == 6
    assert max(len(b) for b in batches) * 6 <= A.FACE_SLOTS_PER_CALL
    assert sum(len(b) for b in batches) == 5


def test_attack_slots_are_powers_of_two_up_to_a_full_pass():
    assert A.MAX_FACES_PER_PASS == 6
    assert [A.attack_slots(n) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert A.attack_slots(9) >= 9  # never fewer slots than faces


def test_face_passes_split_a_crowd():
    assert [A.face_passes(n) for n in (1, 6, 7, 22, 25)] == [1, 1, 2, 4, 5]
    p = _prepared(0, 300, 300, 19)
    start = np.full((300, 300, 3), 0.5, np.float32)
    parts = [A._face_subset(p, k, start) for k in range(A.face_passes(19))]
    assert [len(q.faces) for q in parts] == [5, 5, 4, 5]  # even passes: one compiled shape (6 slots)
    got = [f for q in parts for f in q.faces]
    assert len(got) == len(p.faces) and all(a is b for a, b in zip(got, p.faces))  # each face once, in order
    assert all(q.transforms["sface"].shape[0] == len(q.faces) == q.lpips_transforms.shape[0] for q in parts)
    assert all(q.working is not p.working and float(q.working[0, 0, 0]) == 0.5 for q in parts)


def _lowered_texts() -> dict[str, str]:
    """StableHLO of the one-call attack and of the three programs of the segmented one."""
    import jax

    attack = A.Attack(A.Config(**TINY))
    p = _prepared(0, 64, 64, 1, face_px=40.0)
    clean, pmask, geometry = A._stack_batch([p], p.bucket, 1, ("sface",))
    clean, pmask, geometry, keys = attack._put((clean, pmask, geometry, jax.random.key(0)[None]))
    whole = (attack.params, clean, pmask, geometry, keys)
    z, state, targets = attack._compiled((), "start")(*whole)
    args = {"attack": whole, "start": whole, "steps": (*whole, z, state, targets, np.int32(0)),
            "finish": (*whole[:4], z, targets)}
    return {k: attack._compiled((), k).lower(*a).as_text() for k, a in args.items()}


def test_no_host_callback_in_any_attack_program():
    """No attack program has a host round-trip, with or without progress (progress is
    reported between the segmented attack's calls), so each can be stored; the step loop
    runs inside the compiled program in both forms."""
    texts = _lowered_texts()
    assert all("callback" not in t for t in texts.values())
    assert "stablehlo.while" in texts["attack"] and "stablehlo.while" in texts["steps"]


def test_segmented_attack_equals_the_one_call_attack():
    """With a progress callback the attack runs in segments of ``PROGRESS_EVERY`` steps
    (start, steps x k, finish); the steps, their random draws (jitter keyed by the step
    index) and the result are those of the one-call attack, progress arrives after each
    segment, and a callback that raises stops the attack between segments."""
    cfg = A.Config(models=("sface",), steps=A.PROGRESS_EVERY + 2, blur=False, epsilon=8 / 255, chroma=0.25,
                   texture=0.75, jitter=0.05, step_size=1 / 255)
    rng = np.random.default_rng(0)
    p = _prepared(0, 64, 64, 1, face_px=40.0)
    p = dataclasses.replace(p, working=rng.random((64, 64, 3), dtype=np.float32))
    attack = A.Attack(cfg)
    one_call = attack.run_batch([p], 0)
    seen = []
    A._progress_hook[0] = lambda s, t: seen.append((s, t))
    try:
        segmented = attack.run_batch([p], 0)
    finally:
        A._progress_hook[0] = None
    assert seen == [(A.PROGRESS_EVERY, cfg.steps), (cfg.steps, cfg.steps)]
    d1, d2 = one_call[0][0], segmented[0][0]
    assert np.abs(d1).max() > 0.5 / 255  # it moved
    # signed steps: a float-rounding sign flip moves a pixel by 2 steps; allow a few
    assert np.mean(np.abs(d1 - d2) > 1e-5) < 0.002, np.mean(np.abs(d1 - d2) > 1e-5)
    np.testing.assert_allclose(segmented[1], one_call[1], rtol=1e-3)
    np.testing.assert_allclose(segmented[2], one_call[2], rtol=1e-3, atol=1e-6)

    class Stop(Exception):
        pass

    def stop(s, t):
        seen.append(("stop", s))
        raise Stop

    A._progress_hook[0] = stop
    try:
        with pytest.raises(Stop):
            attack.run_batch([p], 0)
    finally:
        A._progress_hook[0] = None
    assert seen[-1] == ("stop", A.PROGRESS_EVERY)


def _face_photo(shared: Path, side: int = 256) -> np.ndarray:
    im = Image.open(shared / "faces" / "celebs" / "img25.jpg").convert("RGB")  # 400x400, one face
    return np.asarray(im.resize((side, side), Image.BILINEAR))


_CHILD = r"""
import json, sys, time
import numpy as np
import jax
events = {"hits": 0, "misses": 0, "saved": 0.0}
jax.monitoring.register_event_listener(
    lambda name, **kw: events.__setitem__("hits", events["hits"] + 1) if name == "/jax/compilation_cache/cache_hits"
    else events.__setitem__("misses", events["misses"] + 1) if name == "/jax/compilation_cache/cache_misses" else None)
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: events.__setitem__("saved", events["saved"] + secs)
    if name == "/jax/compilation_cache/compile_time_saved_sec" else None)
import logging, re
missed = []
class H(logging.Handler):
    def emit(self, record):
        m = re.search(r"CACHE MISS for '([^']+)'", record.getMessage())
        if m:
            missed.append(m.group(1))
logging.getLogger("jax").addHandler(H())
jax.config.update("jax_explain_cache_misses", True)
from lowkey_jax.attack import Config, cloak
img = np.load(sys.argv[1])
t = time.perf_counter()
r = cloak([img], Config(models=("sface",), steps=2, blur=False), evaluate=False)[0]
events["seconds"] = time.perf_counter() - t
events["faces"] = len(r.faces)
import hashlib
events["sha"] = hashlib.sha256(r.image.tobytes()).hexdigest()
events["missed"] = missed
print(json.dumps(events))
"""


def _run_child(home: Path, photo: Path, **env) -> dict:
    e = {**os.environ, "LOWKEY_JAX_HOME": str(home), "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(photo)], env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _home_with_weights(tmp_path: Path) -> Path:
    from lowkey_jax.store import home as real_home

    home = tmp_path / "home"
    home.mkdir(parents=True)
    for sub in ("weights", "artifacts"):
        (home / sub).symlink_to(real_home() / sub, target_is_directory=True)
    return home


def test_second_process_reuses_the_compiled_attack(tmp_path, shared):
    """The first process compiles the attack and stores the executable; the second loads it
    without tracing (no jit cache miss for the attack at all) and cloaks identically; a
    damaged stored executable is replaced, not fatal; opting out writes nothing."""
    photo = tmp_path / "face.npy"
    np.save(photo, _face_photo(shared))
    home = _home_with_weights(tmp_path)
    cache = home / "xla-cache"
    first = _run_child(home, photo)
    stored = sorted((cache / A.EXECUTABLES_DIR).glob("*.bin"))
    assert first["faces"] == 1 and len(stored) == 1, stored
    assert not list(cache.glob("jit__attack_batch-*"))  # JAX's own copy is dropped (it would shadow ours)
    # the detector's three networks are stored the same way (executables.stored)
    programs = sorted((cache / X.PROGRAMS_DIR).glob("*.bin"))
    assert len(programs) >= 3 and not list(cache.glob("jit_pnet-*")), programs
    n_files = len(list(cache.iterdir()))
    second = _run_child(home, photo)
    # neither the attack nor the detector is even traced; the rest comes from JAX's cache
    attack_missed = lambda run: [m for m in run["missed"] if "_attack_batch" in m]
    detector_missed = lambda run: [m for m in run["missed"] if m in ("jit_pnet", "jit_rnet", "jit_onet")]
    assert attack_missed(first) and not attack_missed(second), second
    assert detector_missed(first) and not detector_missed(second), second
    assert second["sha"] == first["sha"]
    assert sorted((cache / X.PROGRAMS_DIR).glob("*.bin")) == programs
    others = first["misses"] - 1 - len(programs)  # compiled by JAX's cache in the first run
    assert second["misses"] <= 2 and second["hits"] >= 0.9 * others, (first, second)
    assert sorted((cache / A.EXECUTABLES_DIR).glob("*.bin")) == stored
    assert len(list(cache.iterdir())) <= n_files + second["misses"]
    # a damaged entry: compiled again, same result, entry rewritten
    stored[0].write_bytes(b"not an executable")
    third = _run_child(home, photo)
    assert third["sha"] == first["sha"] and attack_missed(third)
    assert stored[0].stat().st_size > 1_000_000
    # opting out: nothing read or written
    off = _home_with_weights(tmp_path / "off")
    fourth = _run_child(off, photo, LOWKEY_JAX_NO_COMPILE_CACHE="1")
    assert fourth["hits"] == 0 and not (off / "xla-cache").exists()
    assert fourth["sha"] == first["sha"]


@pytest.mark.parametrize("segmented", [False, True], ids=["one-call", "progress-segments"])
def test_a_stored_executable_that_fails_to_run_is_replaced(monkeypatch, segmented):
    """Should a stored attack load but fail when run, the batch is still attacked (compiled
    afresh, same result) and the entry is deleted; also for the segments run when progress
    is reported (``start`` fails: the whole attack is run again, compiled here)."""
    import jax

    A.enable_compilation_cache()
    if not jax.config.jax_compilation_cache_dir:
        pytest.skip("compilation cache turned off in this environment")
    if segmented:
        steps = []
        monkeypatch.setattr(A, "_progress_hook", [lambda step, total: steps.append(step)])
    cfg = A.Config(**TINY)
    p = _prepared(0, 64, 64, 1, face_px=40.0)
    want = A.Attack(cfg).run_batch([p], 0)
    if segmented:
        assert steps and steps[-1] == cfg.steps
    seen = []

    class Broken:
        def __call__(self, *args):
            raise jax.errors.JaxRuntimeError("INTERNAL: simulated stale executable")

    def fake_load(path, args):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"stale")
        seen.append(path)
        return Broken()

    monkeypatch.setattr(A.executables, "load", fake_load)
    got = A.Attack(cfg).run_batch([p], 0)
    assert len(seen) == 1 and not seen[0].exists()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_crowd_in_passes_perturbs_every_face(monkeypatch, shared):
    """A crowd attacked two faces per pass: every face's region gets its own perturbation,
    later passes keep what earlier ones did, and the result matches the photo's size."""
    img = np.asarray(Image.open(shared / "faces" / "celebs" / "selfie-many-people.jpg").convert("RGB"))
    monkeypatch.setattr(A, "MAX_FACES_PER_PASS", 2)
    cfg = A.Config(**TINY)
    r = A.cloak([img], cfg, evaluate=False)[0]
    n = len(r.faces)
    assert n >= 4 and A.face_passes(n) >= 2
    assert r.image.shape == img.shape and np.isfinite(r.distance) and r.distance > 0 and r.lpips > 0
    diff = np.abs(r.image.astype(np.int16) - img.astype(np.int16))
    for f in r.faces:  # each face's box changed noticeably (the attack's chips cover it)
        x0, y0, x1, y1 = (int(round(v)) for v in f.box)
        region = diff[max(0, y0) : y1, max(0, x0) : x1]
        assert region.mean() > 0.3, (f.box, region.mean())
    # and no pixel moved further than the passes' steps allow (plus rounding)
    bound = 255 * (A.face_passes(n) * cfg.steps * cfg.step_size + cfg.init_range * A.face_passes(n)) + 1
    assert diff.max() <= bound


def test_batched_verification_equals_per_photo(shared):
    from lowkey_jax.detect import detect_faces
    from lowkey_jax.metrics import paired_cosine
    from lowkey_jax.pipeline import embed_faces, similarities_many

    photos = [_face_photo(shared, 200), np.asarray(Image.open(shared / "faces" / "celebs" / "img5.jpg").convert("RGB"))]
    rng = np.random.default_rng(0)
    noisy = [np.clip(p.astype(np.int16) + rng.integers(-6, 7, p.shape), 0, 255).astype(np.uint8) for p in photos]
    faces = [detect_faces(p) for p in photos]
    got = similarities_many(list(zip(photos, noisy, faces)), ("sface",))
    for p, q, f, (sims, detected) in zip(photos, noisy, faces, got):
        assert len(sims["sface"]) == len(f) == len(detected) and all(detected)
        ref = paired_cosine(embed_faces(p, f, "sface"), embed_faces(q, f, "sface"))
        # same faces re-detected in a lightly noised photo: within 0.02 of the clean-box cosine
        np.testing.assert_allclose(sims["sface"], ref, atol=0.02)
        assert min(sims["sface"]) > 0.8


def test_cli_no_verify(tmp_path, monkeypatch):
    import dataclasses

    from typer.testing import CliRunner

    from lowkey_jax import cli

    calls = []

    @dataclasses.dataclass
    class R:
        image: np.ndarray
        faces: list
        no_face: bool = False
        similarity: dict = dataclasses.field(default_factory=dict)
        detected_after: list = dataclasses.field(default_factory=list)
        lpips: float = 0.0
        psnr: float = 40.0
        seconds: float = 0.0

    def fake(images, config, progress, evaluate=True):
        calls.append((len(images), progress, evaluate))
        return [R(np.clip(im.astype(np.int16) + 2, 0, 255).astype(np.uint8),
                  [Face([1, 1, 9, 9], 0.9, np.full((5, 2), 5.0))],
                  similarity={} if not evaluate else {"sface": [0.1]}) for im in images]

    monkeypatch.setattr(cli, "_run_attack", fake)
    for i in range(6):
        Image.fromarray(np.full((40 + i, 50, 3), 40 * i, np.uint8)).save(tmp_path / f"p{i}.png")
    runner = CliRunner()
    r = runner.invoke(cli.app, ["cloak", str(tmp_path), "--no-verify", "--batch-size", "2", "--steps", "1"])
    assert r.exit_code == 0, r.output
    assert calls == [(6, None, False)]  # one call for the folder (cloak batches), no step callback
    assert "similarity" not in r.output and len(list(tmp_path.glob("*_cloaked.png"))) == 6
    calls.clear()
    r = runner.invoke(cli.app, ["cloak", str(tmp_path), "--overwrite", "--steps", "1"])
    assert r.exit_code == 0 and calls == [(6, None, True)] and "similarity to the original sface 0.10" in r.output


def test_reduced_resolution_detection_keeps_the_faces(shared):
    """On large photos ``max_side`` only drops the finest pyramid levels: the same faces,
    the same landmarks (within 0.1% of the inter-ocular distance) as full resolution."""
    from lowkey_jax.detect import DETECT_SIDE, detect_faces
    from lowkey_jax.imageio import read_image
    from lowkey_jax.pipeline import match_faces

    for name in ("img1.jpg", "couple.jpg"):  # 1382x1868, 2280x1588 (two faces)
        img = read_image(shared / "faces" / "celebs" / name).rgb
        assert max(img.shape[:2]) > DETECT_SIDE
        full, reduced = detect_faces(img), detect_faces(img, max_side=DETECT_SIDE)
        assert len(reduced) == len(full) >= 1
        for a, b in zip(full, match_faces(full, reduced)):
            assert b is not None
            err = np.max(np.linalg.norm(a.landmarks - b.landmarks, axis=1)) / a.inter_ocular
            assert err < 1e-3, (name, err)
    with pytest.raises(ValueError, match="max_side"):
        detect_faces(np.zeros((64, 64, 3), np.uint8), max_side=8)


def test_restarts_keep_the_start_with_the_larger_distance(shared):
    """Config.restarts=2 runs (it once failed writing into read-only result arrays) and keeps,
    per photo, the restart whose feature distance is larger."""
    img = _face_photo(shared, 200)
    one = A.cloak([img], A.Config(**TINY), evaluate=False)[0]
    two = A.cloak([img], A.Config(**TINY, restarts=2), evaluate=False)[0]
    assert two.image.shape == img.shape and np.isfinite(two.distance)
    assert two.distance >= one.distance - 1e-6  # restart 0 is the single run; the better one is kept
