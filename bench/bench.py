"""Benchmarks for lowkey-jax. Each measurement runs in its own process (clean peak memory)
and prints one JSON line; ``all`` runs them in turn and writes a Markdown list plus the
same rows as JSON beside it (``--out docs/benchmarks.md`` also writes ``docs/benchmarks.json``,
from which ``python bench/readme_tables.py`` renders the README's tables).

    python bench/bench.py all --out docs/benchmarks.md     # everything on this machine
    python bench/bench.py lpips                            # one measurement
    python bench/bench.py gpu                              # photos/s on an accelerator

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


def bench_attack(batch: int = 1, size: int = 512) -> dict:
    """Seconds per photo for the default attack, compile time, FLOP/s vs matmul peak."""

    from lowkey_jax.attack import Attack, Config, prepare
    from lowkey_jax.detect import detect_faces

    cfg = Config(batch_size=batch)
    img = _photo(size)
    faces = detect_faces(img)
    prepared = [prepare(i, img, faces[:1], cfg) for i in range(batch)]
    attack = Attack(cfg)
    t = time.perf_counter()
    attack.run_batch(prepared, 0)
    first = time.perf_counter() - t
    t = time.perf_counter()
    attack.run_batch(prepared, 0)
    steady = time.perf_counter() - t
    flops = _attack_flops(cfg, prepared[0]) * batch
    peak = matmul_peak()
    box = faces[0].box
    ss = dict(next(iter(attack.compiled_shapes))[-1])
    return {"what": f"attack {size}x{size}, 1 face ({box[2] - box[0]:.0f} px wide), batch {batch}, {cfg.steps} steps, "
                    f"models {','.join(cfg.models)}, chip supersampling {ss or 'none'}",
            "s_per_photo": steady / batch, "photos_per_s": batch / steady, "compile_plus_first_s": first,
            "gflop_per_photo": flops / 1e9 / batch, "achieved_gflops": flops / steady / 1e9,
            "matmul_peak_gflops": peak / 1e9, "fraction_of_peak": flops / steady / peak, "peak_mib": _peak_mib()}


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


def bench_gpu() -> list[dict]:
    """Photos/s at batch 8/32/64 for 512x512 and 1024x1024 (for an accelerator)."""
    out = []
    for size in (512, 1024):
        for batch in (8, 32, 64):
            try:
                r = bench_attack(batch, size)
            except Exception as e:  # e.g. out of memory at the largest batch
                r = {"what": f"attack {size} batch {batch}", "error": f"{type(e).__name__}: {e}"[:300]}
            print(json.dumps({**r, **_machine()}), flush=True)
            out.append(r)
    return out


def bench_buckets(folder: Path | None = None) -> dict:
    """How many times a folder of mixed photos compiles: the distinct (batch, bucket shape,
    face slots, chip supersampling) of ``cloak``'s grouping, from detection and preparation
    only."""
    from lowkey_jax.attack import Config, chip_supersampling, prepare
    from lowkey_jax.face import face_slots
    from lowkey_jax.detect import detect_faces
    from lowkey_jax.imageio import read_image

    folder = folder or SHARED / "faces" / "celebs"
    cfg = Config()
    groups: dict[tuple, list] = {}
    n = 0
    for path in sorted(folder.glob("*.jpg")):
        img = read_image(path).rgb
        faces = detect_faces(img)
        if faces:
            p = prepare(n, img, faces, cfg)
            groups.setdefault(p.bucket, []).append(p)
            n += 1
    shapes = set()
    for bucket, members in groups.items():
        for i in range(0, len(members), cfg.batch_size):
            chunk = members[i : i + cfg.batch_size]
            shapes.add((len(chunk), *bucket, face_slots(max(len(p.faces) for p in chunk)),
                        chip_supersampling(chunk, cfg.models)))
    return {"what": f"compiled attack shapes for {n} photos of {folder.name} (batch_size {cfg.batch_size}, max_side {cfg.max_side})",
            "photos": n, "buckets": len(groups), "compiled_shapes": len(shapes)}


def bench_attack_large() -> dict:
    """A 1024x1024 photo whose face spans ~400 pixels: FaceNet and dlib chips are then
    box-filtered from a denser grid (``objective.Model.supersample``), which costs more."""
    return bench_attack(1, 1024)


JOBS = {"lpips": bench_lpips, "recognizers": bench_recognizers, "detect": bench_detect,
        "attack": bench_attack, "attack-large": bench_attack_large, "gpu": bench_gpu, "buckets": bench_buckets}


def _run_all(out: Path | None) -> None:
    rows = []
    for job in ("lpips", "recognizers", "detect", "attack", "attack-large"):
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
    args = ap.parse_args()
    if args.job == "all":
        _run_all(args.out)
    elif args.job == "machine":
        print(json.dumps(_machine()))
    elif args.job == "gpu":
        bench_gpu()
    else:
        res = JOBS[args.job]()
        for r in res if isinstance(res, list) else [res]:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
