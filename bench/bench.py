"""Benchmarks for lowkey-jax. Each measurement runs in its own process (clean peak memory)
and prints one JSON line; ``all`` runs them in turn and writes a Markdown list plus the
same rows as JSON beside it (``--out docs/benchmarks.md`` also writes ``docs/benchmarks.json``,
from which ``python bench/readme_tables.py`` renders the README's tables).

    python bench/bench.py all --out docs/benchmarks.md     # everything on this machine
    python bench/bench.py lpips                            # one measurement
    python bench/bench.py gpu                              # photos/s on an accelerator
    python bench/bench.py gpu --smoke                      # the same script, tiny, on CPU
    python bench/bench.py quickstart                       # the quick-start command, cold + warm
    python bench/bench.py folder                           # 12 mixed photos through the CLI
    python bench/bench.py crowd                            # a many-face photo: RSS and time
    python bench/bench.py progress                         # one call vs segments with progress

Peak memory is the process's peak resident set size (``ru_maxrss``) on CPU, and the
device's ``peak_bytes_in_use`` where the backend reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWKEY_SHARED", ROOT.parent / "shared"))


def _machine() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)), "devices": jax.device_count(),
            "jax": jax.__version__}


def _peak_mib() -> float:
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, *args, repeat: int = 3) -> tuple[float, float]:
    """(first call incl. compile, best of ``repeat`` later calls), seconds."""
    import jax

    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return first, best


def _flops(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def matmul_peak() -> float:
    """Achieved FLOP/s of a large float32 matmul on the default device (the machine's
    practical matmul peak, measured in the same run as the other figures)."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    _, best = _time(f, a, repeat=5)
    return 2 * n**3 / best


def bench_lpips() -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lowkey_jax import load_lpips

    g, s = nnx.split(load_lpips("alex"))
    x = jax.random.uniform(jax.random.key(0), (8, 512, 512, 3))
    y = jnp.clip(x + 0.01, 0, 1)
    fwd = jax.jit(lambda s, x, y: nnx.merge(g, s)(x, y))
    bwd = jax.jit(jax.grad(lambda x, s, y: jnp.sum(nnx.merge(g, s)(x, y))))
    f_first, f_best = _time(fwd, s, x, y)
    b_first, b_best = _time(bwd, x, s, y)
    return {"what": "lpips-alex batch 8 x 512x512", "forward_s": f_best, "forward_backward_s": b_best,
            "compile_plus_first_s": f_first, "peak_mib": _peak_mib()}


def bench_recognizers() -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lowkey_jax.recognizers import RECOGNIZERS, load_recognizer

    out = []
    for name in RECOGNIZERS:
        rec = load_recognizer(name)
        g, s = nnx.split(rec.module)
        chips = jax.random.uniform(jax.random.key(0), (16, *rec.input_size, 3))
        fwd = jax.jit(lambda s, c: nnx.merge(g, s)(c))
        bwd = jax.jit(jax.grad(lambda c, s: jnp.sum(nnx.merge(g, s)(c) ** 2)))
        _, f_best = _time(fwd, s, chips)
        _, b_best = _time(bwd, chips, s)
        params = sum(int(v.size) for v in jax.tree.leaves(s))
        one = jax.jit(lambda s, c: nnx.merge(g, s)(c))
        out.append({"what": f"recogniser {name} batch 16", "forward_s": f_best, "forward_backward_s": b_best,
                    "params": params, "gflops_per_chip": _flops(one, s, chips[:1]) / 1e9})
    return out


def bench_detect() -> dict:
    import numpy as np
    from PIL import Image

    from lowkey_jax.detect import detect_faces

    img = np.asarray(Image.open(SHARED / "faces" / "celebs" / "img1.jpg").convert("RGB").resize((4000, 3000)))
    t = time.perf_counter()
    faces = detect_faces(img)
    first = time.perf_counter() - t
    t = time.perf_counter()
    detect_faces(img)
    return {"what": "MTCNN detection, 12 MP photo (4000x3000)", "first_s": first,
            "warm_s": time.perf_counter() - t, "faces": len(faces), "peak_mib": _peak_mib()}


def _photo(size: int):
    import numpy as np
    from PIL import Image

    im = Image.open(SHARED / "faces" / "celebs" / "img1.jpg").convert("RGB")
    w, h = im.size
    side = min(w, h)
    im = im.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)).resize((size, size))
    return np.asarray(im)


def bench_attack(batch: int = 1, size: int = 512, *, steps: int = 50, models=("dlib", "facenet", "sface"),
                 precision: str = "highest", peak: float | None = None, level: str | None = None) -> dict:
    """Seconds per photo for the default attack, compile time, FLOP/s vs matmul peak.
    ``level``: a ``--level`` preset's budget and shaping on top (same steps and models)."""

    from lowkey_jax.attack import Attack, Config, prepare
    from lowkey_jax.detect import detect_faces

    kw = dict(batch_size=batch, steps=steps, models=tuple(models), precision=precision)
    cfg = Config(**kw) if level is None else Config.preset(level, **kw)
    img = _photo(size)
    faces = detect_faces(img)
    prepared = [prepare(i, img, faces[:1], cfg) for i in range(batch)]
    attack = Attack(cfg)
    t = time.perf_counter()
    attack.run_batch(prepared, 0)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = attack.run_batch(prepared, 0)
    steady = time.perf_counter() - t
    flops = _attack_flops(cfg, prepared[0]) * batch
    peak = peak or matmul_peak()
    box = faces[0].box
    ss = dict(next(iter(attack.compiled_shapes))[-1])
    return {"what": f"attack {size}x{size}, 1 face ({box[2] - box[0]:.0f} px wide), batch {batch}, {cfg.steps} steps, "
                    f"models {','.join(cfg.models)}, chip supersampling {ss or 'none'}"
                    + (f", level {level}" if level else ""),
            "s_per_photo": steady / batch, "photos_per_s": batch / steady, "compile_plus_first_s": first,
            "gflop_per_photo": flops / 1e9 / batch, "achieved_gflops": flops / steady / 1e9,
            "matmul_peak_gflops": peak / 1e9, "fraction_of_peak": flops / steady / peak, "peak_mib": _peak_mib(),
            "distance": float(out[1][0])}


def _attack_flops(cfg, p) -> float:
    """FLOPs of one photo's whole attack: ``steps`` gradient evaluations of the objective
    plus the clean targets and the final evaluation. (XLA's cost analysis counts a
    ``fori_loop`` body once, so the steps are counted from the gradient program itself.)"""
    import jax
    import jax.numpy as jnp

    from lowkey_jax.objective import Geometry, Model, clean_features, objective
    from lowkey_jax.perceptual import load_lpips
    from lowkey_jax.recognizers import load_recognizer

    from lowkey_jax.attack import chip_supersampling

    ss = dict(chip_supersampling([p], cfg.models))
    models = {n: Model(load_recognizer(n).embed, load_recognizer(n).input_size, ss.get(n, 1)) for n in cfg.models}
    lpips = load_lpips("alex")
    x = jnp.asarray(p.working)
    geom = Geometry({k: jnp.asarray(v) for k, v in p.transforms.items()}, jnp.asarray(p.lpips_transforms),
                    jnp.ones((len(p.faces),), jnp.float32), jnp.float32(1.0))
    targets = clean_features(models, x, geom)
    loss = lambda a: objective(a, x, geom, models, targets, lpips, lpips_max_side=cfg.lpips_max_side)[0]
    step = _flops(jax.jit(jax.grad(loss)), x)
    forward = _flops(jax.jit(loss), x) + _flops(jax.jit(lambda a: clean_features(models, a, geom)), x)
    return cfg.steps * step + forward


def _objective_value(size: int, steps: int, precision: str, models: tuple[str, ...]) -> float:
    """Final ensemble distance of the attack on the standard photo (one face), batch 1."""
    from lowkey_jax.attack import Attack, Config, prepare
    from lowkey_jax.detect import detect_faces

    cfg = Config(batch_size=1, steps=steps, precision=precision, models=models)
    img = _photo(size)
    p = prepare(0, img, detect_faces(img)[:1], cfg)
    return float(Attack(cfg).run_batch([p], 0)[1][0])


def bench_objective_cpu(size: int = 512, steps: int = 5, models: str = "dlib,facenet,sface") -> dict:
    """The reference objective value on the CPU (``gpu`` runs this in a CPU-only child)."""
    return {"what": "objective on cpu", "distance": _objective_value(size, steps, "highest", tuple(models.split(",")))}


def bench_gpu(smoke: bool = False) -> list[dict]:
    """For an accelerator: photos/s at batch 8/32/64/128 for 512x512 and 1024x1024, compile
    time and peak memory per setting, and the objective's value on the device (float32
    "highest" and "default" precision) against the CPU's. One JSON line each.

    ``--smoke``: a tiny setting (256x256, batch 1/2, 2 steps, SFace only) that runs on CPU
    in a minute, to check the script itself."""
    sizes, batches = ((256,), (1, 2)) if smoke else ((512, 1024), (8, 32, 64, 128))
    steps, models = (2, ("sface",)) if smoke else (50, ("dlib", "facenet", "sface"))
    machine = _machine()
    peak = matmul_peak()
    out = [{"what": "matmul peak", "matmul_peak_gflops": peak / 1e9, **machine}]
    print(json.dumps(out[-1]), flush=True)
    for precision in ("highest", "default"):
        for size in sizes:
            for batch in batches:
                try:
                    r = bench_attack(batch, size, steps=steps, models=models, precision=precision, peak=peak)
                except Exception as e:  # e.g. out of memory at the largest batch
                    r = {"what": f"attack {size} batch {batch} precision {precision}", "error": f"{type(e).__name__}: {e}"[:300]}
                r["precision"] = precision
                print(json.dumps({**r, **machine}), flush=True)
                out.append(r)
    # objective value on the device vs the CPU (a CPU-only child process computes the latter)
    size, ref_steps = sizes[0], 2 if smoke else 5
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, "objective-cpu", "--size", str(size), "--steps", str(ref_steps),
                           "--models", ",".join(models)], capture_output=True, text=True, env=env)
    cpu = json.loads(proc.stdout.strip().splitlines()[-1])["distance"] if proc.returncode == 0 else float("nan")
    for precision in ("highest", "default"):
        dev = _objective_value(size, ref_steps, precision, models)
        r = {"what": f"objective after {ref_steps} steps, {size}x{size}, precision {precision}", "device_distance": dev,
             "cpu_distance": cpu, "relative_difference": abs(dev - cpu) / max(abs(cpu), 1e-12), **machine}
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def bench_buckets(folder: Path | None = None) -> dict:
    """How many times a folder of mixed photos compiles: the distinct (batch, bucket shape,
    face slots, chip supersampling) of ``cloak``'s plan (``attack.plan_batches``: grouped by
    compiled shape first, then batched), from detection and preparation only."""
    from lowkey_jax.attack import Config, attack_slots, chip_supersampling, plan_batches, prepare
    from lowkey_jax.detect import DETECT_SIDE, detect_faces
    from lowkey_jax.imageio import read_image

    folder = folder or SHARED / "faces" / "celebs"
    cfg = Config()
    items = []
    for path in sorted(folder.glob("*.jpg")):
        img = read_image(path).rgb
        faces = detect_faces(img, max_side=max(cfg.max_side, DETECT_SIDE))
        if faces:
            items.append(prepare(len(items), img, faces, cfg))
    batches = plan_batches(items, cfg)
    shapes = {(len(b), *b[0].bucket, attack_slots(max(len(p.faces) for p in b)), chip_supersampling(b, cfg.models))
              for b in batches}
    return {"what": f"compiled attack shapes for {len(items)} photos of {folder.name} (batch_size {cfg.batch_size}, max_side {cfg.max_side})",
            "photos": len(items), "buckets": len({p.bucket for p in items}), "batches": len(batches),
            "compiled_shapes": len(shapes)}


def bench_attack_levels() -> list[dict]:
    """The attack at equal steps with and without each preset's budget, colour/texture
    shaping and momentum, in one process (one matmul peak): what the invisible-cloak
    machinery costs per step."""
    from lowkey_jax.presets import LEVELS

    peak = matmul_peak()
    rows = [bench_attack(1, 512, peak=peak)]
    rows += [bench_attack(1, 512, peak=peak, level=lv) for lv, p in LEVELS.items() if p.get("epsilon") is not None]
    mean = (peak + matmul_peak()) / 2
    for r in rows:  # every row against the same peak: the mean of before and after
        r["matmul_peak_gflops"] = mean / 1e9
        r["fraction_of_peak"] = r["achieved_gflops"] * 1e9 / mean
    return rows


def bench_progress() -> dict:
    """The default attack (``mid``) on one 512x512 photo, warm, in one call (no progress:
    the CLI) and in segments of ``PROGRESS_EVERY`` steps with progress reported between
    them (the web app), alternated twice, best of each; one matmul peak before and after."""
    from lowkey_jax import attack as A
    from lowkey_jax.detect import detect_faces

    peak = matmul_peak()
    cfg = A.Config.preset("mid", batch_size=1)
    img = _photo(512)
    p = A.prepare(0, img, detect_faces(img)[:1], cfg)
    attack = A.Attack(cfg)
    seen = []

    def run(segmented: bool) -> tuple[float, float]:
        A._progress_hook[0] = (lambda s, t: seen.append(s)) if segmented else None
        try:
            t = time.perf_counter()
            out = attack.run_batch([p], 0)
            return time.perf_counter() - t, float(out[1][0])
        finally:
            A._progress_hook[0] = None

    first = {"one_call": run(False)[0], "segmented": run(True)[0]}  # compile + first
    best = {"one_call": float("inf"), "segmented": float("inf")}
    dist = {}
    for _ in range(2):
        for k in best:
            s, dist[k] = run(k == "segmented")
            best[k] = min(best[k], s)
    mean = (peak + matmul_peak()) / 2
    return {"what": f"mid, 512x512, 1 face, {cfg.steps} steps: one call vs segments of {A.PROGRESS_EVERY} steps",
            "one_call_s": best["one_call"], "segmented_s": best["segmented"],
            "segmented_over_one_call": best["segmented"] / best["one_call"],
            "compile_plus_first_one_call_s": first["one_call"], "compile_plus_first_segmented_s": first["segmented"],
            "distance_one_call": dist["one_call"], "distance_segmented": dist["segmented"],
            "progress_reports_per_run": len(seen) // 3, "matmul_peak_gflops": mean / 1e9}


def bench_attack_large() -> dict:
    """A 1024x1024 photo whose face spans ~400 pixels: FaceNet and dlib chips are then
    box-filtered from a denser grid (``objective.Model.supersample``), which costs more."""
    return bench_attack(1, 1024)


# --- end-to-end CLI runs (what a user waits for) -------------------------------------------

FOLDER12 = ("img5.jpg", "img10.jpg", "img12.jpg", "img16.jpg", "img20.jpg", "img25.jpg",
            "img27.jpg", "img30.jpg", "img35.jpg", "img44.jpg", "img2.jpg", "img1.jpg")  # 330x512 .. 1382x1868


def _temp_home(tmp: Path) -> Path:
    """A fresh ``$LOWKEY_JAX_HOME`` sharing the converted weights but with an empty
    compilation cache (so "cold" really is cold)."""
    from lowkey_jax.store import home

    h = tmp / "home"
    h.mkdir(parents=True)
    for sub in ("weights", "artifacts"):
        (h / sub).symlink_to(home() / sub, target_is_directory=True)
    return h


def _cli(args: list[str], home: Path) -> dict:
    """Run ``lowkey-jax ARGS`` in a child process: wall seconds, CPU seconds, peak RSS."""
    env = {**os.environ, "LOWKEY_JAX_HOME": str(home), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "from lowkey_jax.cli import main; main()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
            "exit": proc.returncode, "last_line": [ln for ln in out.splitlines() if ln.startswith("Done")][-1:]}


def _normalised(seconds: float, peak: float) -> float:
    """Seconds as they would be on a machine with a 400 GFLOP/s float32 matmul peak."""
    return seconds * peak / 400e9


def bench_quickstart() -> dict:
    """The README's quick-start command twice, end to end: cold (empty compilation cache)
    and warm (second run), with the matmul peak measured before and after."""
    import tempfile

    from lowkey_jax.attack import EXECUTABLES_DIR

    peak0 = matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        home = _temp_home(Path(tmp))
        args = ["cloak", str(SHARED / "faces" / "celebs" / "img1.jpg"), "-o", str(Path(tmp) / "out"), "--overwrite"]
        cold = _cli(args, home)
        warm = _cli(args, home)
        cache = home / "xla-cache"
        files = [p for p in cache.rglob("*") if p.is_file()] if cache.is_dir() else []
        stored = [p for p in files if p.parent.name == EXECUTABLES_DIR]  # whole attack executables
        cache_mib = sum(p.stat().st_size for p in files) / 2**20
        stored_mib = sum(p.stat().st_size for p in stored) / 2**20
    peak = (peak0 + matmul_peak()) / 2
    return {"what": "quick-start command (img1.jpg, 1382x1868, default settings), cold then warm cache",
            "cold": cold, "warm": warm, "cache_entries": len(files), "cache_mib": cache_mib,
            "stored_attacks": len(stored), "stored_attack_mib": stored_mib,
            "matmul_peak_gflops": peak / 1e9, "warm_normalised_s": _normalised(warm["wall_s"], peak)}


def bench_folder() -> dict:
    """12 mixed celebs photos through the CLI twice (cold, then warm cache): seconds per photo
    and peak RSS."""
    import tempfile

    peak0 = matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        home = _temp_home(Path(tmp))
        folder = Path(tmp) / "in"
        folder.mkdir()
        for name in FOLDER12:
            (folder / name).symlink_to(SHARED / "faces" / "celebs" / name)
        args = ["cloak", str(folder), "-o", str(Path(tmp) / "out"), "--overwrite"]
        cold = _cli(args, home)
        warm = _cli(args, home)
    peak = (peak0 + matmul_peak()) / 2
    n = len(FOLDER12)
    return {"what": f"folder of {n} mixed celebs photos (330x512 .. 1382x1868), CLI, cold then warm cache",
            "cold": cold, "warm": warm, "warm_s_per_photo": warm["wall_s"] / n,
            "matmul_peak_gflops": peak / 1e9, "warm_normalised_s_per_photo": _normalised(warm["wall_s"] / n, peak)}


def _crowd(tiles: int = 2):
    """``selfie-many-people.jpg`` tiled ``tiles x tiles``: a crowd photo; and a one-face photo
    of the same size (``img25.jpg`` resized)."""
    import numpy as np
    from PIL import Image

    im = np.asarray(Image.open(SHARED / "faces" / "celebs" / "selfie-many-people.jpg").convert("RGB"))
    crowd = np.concatenate([np.concatenate([im] * tiles, axis=1)] * tiles, axis=0)
    h, w = crowd.shape[:2]
    one = np.asarray(Image.open(SHARED / "faces" / "celebs" / "img25.jpg").convert("RGB").resize((w, h)))
    return crowd, one


def bench_crowd(runs: int = 2) -> dict:
    """Peak RSS and time of the CLI on a many-face photo (tiled selfie) against a one-face
    photo of the same size; each run ``runs`` times (the last reported: with ``runs=2`` the
    second, warm compilation cache; with 1, both cold)."""
    import tempfile

    from PIL import Image

    from lowkey_jax.detect import DETECT_SIDE, detect_faces

    peak0 = matmul_peak()
    crowd, one = _crowd()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = _temp_home(Path(tmp))
        for name, img in (("crowd", crowd), ("one_face", one)):
            path = Path(tmp) / f"{name}.png"
            Image.fromarray(img).save(path)
            args = ["cloak", str(path), "-o", str(Path(tmp) / "out"), "--overwrite"]
            for _ in range(runs):
                out[name] = _cli(args, home)
            out[name]["faces"] = len(detect_faces(img, max_side=DETECT_SIDE))
    peak = (peak0 + matmul_peak()) / 2
    return {"what": f"crowd photo {crowd.shape[1]}x{crowd.shape[0]} (tiled selfie) vs one face, same size, "
                    f"{'warm' if runs > 1 else 'cold'} cache",
            **out, "time_ratio": out["crowd"]["wall_s"] / out["one_face"]["wall_s"], "matmul_peak_gflops": peak / 1e9}


def bench_detect_side() -> list[dict]:
    """``detect_faces(max_side=S)`` against full resolution on every celebs photo: faces
    missed, worst landmark error in % of the inter-ocular distance, time."""
    import numpy as np

    from lowkey_jax.detect import detect_faces
    from lowkey_jax.imageio import read_image
    from lowkey_jax.pipeline import match_faces

    sides = (640, 800, 1024, 1280)
    stats = {s: {"missed": 0, "max_err": 0.0, "t": 0.0} for s in sides}
    t_full, n_faces, n = 0.0, 0, 0
    for path in sorted((SHARED / "faces" / "celebs").glob("*.jpg")):
        img = read_image(path).rgb
        t = time.perf_counter()
        full = detect_faces(img)
        t_full += time.perf_counter() - t
        n_faces += len(full)
        n += 1
        for s in sides:
            t = time.perf_counter()
            red = detect_faces(img, max_side=s)
            stats[s]["t"] += time.perf_counter() - t
            for a, b in zip(full, match_faces(full, red)):
                if b is None:
                    stats[s]["missed"] += 1
                else:
                    err = float(np.max(np.linalg.norm(a.landmarks - b.landmarks, axis=1))) / a.inter_ocular * 100
                    stats[s]["max_err"] = max(stats[s]["max_err"], err)
    return [{"what": f"detection at max_side {s} vs full resolution, {n} celebs photos, {n_faces} faces",
             "faces_missed": v["missed"], "max_landmark_error_pct_iod": v["max_err"], "seconds": v["t"],
             "full_resolution_seconds": t_full} for s, v in stats.items()]


JOBS = {"lpips": bench_lpips, "recognizers": bench_recognizers, "detect": bench_detect,
        "attack": bench_attack, "attack-levels": bench_attack_levels, "attack-large": bench_attack_large, "progress": bench_progress, "gpu": bench_gpu, "buckets": bench_buckets,
        "quickstart": bench_quickstart, "folder": bench_folder, "crowd": bench_crowd, "detect-side": bench_detect_side,
        "objective-cpu": bench_objective_cpu}


def _run_all(out: Path | None) -> None:
    rows = []
    for job in ("lpips", "recognizers", "detect", "attack", "attack-large", "quickstart", "folder", "crowd"):
        proc = subprocess.run([sys.executable, __file__, job], capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"what": job, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rows.append({"job": job, **json.loads(line)})
    machine = json.loads(subprocess.run([sys.executable, __file__, "machine"], capture_output=True, text=True).stdout)
    text = [f"Machine: {machine['cpu']}, {machine['cores']} cores, backend {machine['backend']}, jax {machine['jax']}", ""]
    for r in rows:
        fields = {k: v for k, v in r.items() if k not in ("job", "what")}
        text.append("- " + r["what"] + ": " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()))
    report = "\n".join(text)
    print(report)
    if out:
        out.write_text(report + "\n")
        # The README's tables are rendered from this file: python bench/readme_tables.py
        data = {"format": 1, "command": "python bench/bench.py all --out " + str(out),
                "measured": time.strftime("%Y-%m-%d"), "provenance": "written by bench/bench.py all",
                "machine": machine, "rows": rows}
        out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", choices=[*JOBS, "all", "machine"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="gpu: a tiny setting that runs on CPU")
    ap.add_argument("--runs", type=int, default=2, help="crowd: CLI runs per photo (the last is reported)")
    ap.add_argument("--size", type=int, default=512, help="objective-cpu: photo side")
    ap.add_argument("--steps", type=int, default=5, help="objective-cpu: attack steps")
    ap.add_argument("--models", default="dlib,facenet,sface", help="objective-cpu: recognisers")
    args = ap.parse_args()
    if args.job == "all":
        _run_all(args.out)
    elif args.job == "machine":
        print(json.dumps(_machine()))
    elif args.job == "gpu":
        bench_gpu(args.smoke)
    elif args.job == "crowd":
        print(json.dumps(bench_crowd(args.runs)))
    elif args.job == "objective-cpu":
        print(json.dumps(bench_objective_cpu(args.size, args.steps, args.models)))
    else:
        res = JOBS[args.job]()
        for r in res if isinstance(res, list) else [res]:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
