"""Protection vs visibility sweep on a labelled set (default ``shared/faces/celebs``).

For every setting of :data:`SETTINGS` each identity's gallery photo (its first photo) is
cloaked; then every available recogniser grades it: the clean probes of the identity are
matched against the cloaked gallery photo at the recogniser's *shipped* operating point
(``lowkey_jax/operating_points.json``), raw and after the platform treatment (halved, then
JPEG 75). Recognisers outside the setting's ensemble measure transfer to networks the attack
never saw; the ones inside are white-box. Visibility is measured on the face (face box grown
by 30%, ``lowkey_jax.quality``).

    python bench/sweep.py cloak [NAME ...]   # cloak the gallery per setting (slow; resumable)
    python bench/sweep.py grade              # grade every cloaked setting with every recogniser
    python bench/sweep.py report             # docs/eval/sweep.{json,md}, pareto.png
    python bench/sweep.py sheets NAME ...    # contact sheets of face crops at 1:1

Cloaked photos are kept (PNG, lossless) under ``$LOWKEY_JAX_HOME/sweep/<setting>/`` so that
grading and contact sheets never need to cloak again. Each setting records its seconds per
photo with the float32 matmul peak measured in the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lowkey_jax.attack import Config, cloak
from lowkey_jax.evaluate import (PLATFORM, clean_set, load_dataset, measure_protection, measure_quality, pareto_front,
                                 scatter_plot, split_gallery)
from lowkey_jax.presets import NOT_COMPARED, budgeted
from lowkey_jax.quality import face_crop, face_region
from lowkey_jax.recognizers import RECOGNIZERS
from lowkey_jax.store import home

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWKEY_SHARED", ROOT.parent / "shared"))
OUT = ROOT / "docs" / "eval"
E = 1.0 / 255.0

# name -> Config overrides (presets.budgeted: n/255 shaped with momentum, and what differs). "ref" is the
# released LowKey setting. Every entry here was cloaked and graded (docs/eval/sweep.md); `cloak`
# without names runs the ones missing from the work directory.
SETTINGS: dict[str, dict] = {
    "ref": {},
    "eps8-shaped-mom": budgeted(8),
    "eps6-shaped-mom": budgeted(6),
    "eps6-mom": budgeted(6, chroma=None, texture=0.0),
    "eps4-shaped-mom": budgeted(4),
    "eps12-shaped-mom": budgeted(12),
    "eps10-shaped-mom": budgeted(10),
    "eps10-shaped-mom-smooth": budgeted(10, smooth_chips=True),
    "eps9-shaped-mom-jit": budgeted(9, jitter=0.05),
    "eps10-shaped-mom-jit": budgeted(10, jitter=0.05),
    "eps8-shaped-mom-ti": budgeted(8, smooth_grad=1.0),
    "eps8-shaped-mom-jit": budgeted(8, jitter=0.05),
    "eps8-shaped-mom-jit10": budgeted(8, jitter=0.10),
    "eps8-shaped-mom-jit-bal": budgeted(8, jitter=0.05, balance=True),
    "eps8-shaped-jit": budgeted(8, jitter=0.05, momentum=0.0),
    "eps10-shaped-jit": budgeted(10, jitter=0.05, momentum=0.0),
    "eps9-shaped-jit": budgeted(9, jitter=0.05, momentum=0.0),
    "eps8-shaped-mom-jit-100": budgeted(8, jitter=0.05, steps=100, step_size=0.4 * E),
    "eps8-shaped-mom-jit-rs": budgeted(8, jitter=0.05, rescale=0.5),
    "eps8-shaped-mom-jit-mid": budgeted(8, jitter=0.05, mid_weight=1.0),
    "eps10-shaped-jit-lp224": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=224),
    "eps8-shaped-jit-lp224": budgeted(8, jitter=0.05, momentum=0.0, lpips_face_side=224),
    "eps10-shaped-jit-lp224-a20": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=224, alpha=0.2),
    "eps16-shaped-jit-lp224": budgeted(16, jitter=0.05, momentum=0.0, lpips_face_side=224),
    "eps10-shaped-jit-lp224-eq": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=224, equalise=True),
    "eps10-shaped-jit-lp224-s30": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=224, steps=30),
    "eps10-shaped-jit-lp224-edge": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=224, edges=1.0),
    "eps16-shaped-jit-lp224-edge": budgeted(16, jitter=0.05, momentum=0.0, lpips_face_side=224, edges=1.0),
    "eps10-shaped-jit-lp224-r2": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=224, restarts=2),
    # one orientation per chip and step instead of chip + flip every step: half the recognisers' work
    "eps10-shaped-jit-lp224-rflip": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=224, flip="random"),
    # the plain photo only: no Gaussian-smoothed branch (the reference attacks both)
    "eps10-shaped-jit-lp224-noblur": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=224, blur=False),
    # the Gaussian-smoothed photo only (no plain branch): also half the recognisers' work
    "eps10-shaped-jit-lp224-smoothonly": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=224, plain=False),
    # the LPIPS penalty's face crops at 448 pixels: at or above most faces' working size
    "eps10-shaped-jit-lp448": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=448),
    # the same at `high`'s budget
    "eps16-shaped-jit-lp448": budgeted(16, jitter=0.05, momentum=0.0, lpips_face_side=448),
    # `mid` (448-pixel LPIPS crops) with one orientation per chip and step (Config.flip)
    "eps10-shaped-jit-lp448-rflip": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=448, flip="random"),
    # `mid` with each pixel's step in proportion to its gradient, on each face's own scale
    # (Config.step_rule), with steps of a fifth of the budget (twice `mid`'s), and at 14/255
    "eps10-shaped-jit-lp448-scaled-x2": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=448, step_rule="scaled",
                                                 step_size=2 * E),
    "eps14-shaped-jit-lp448-scaled": budgeted(14, jitter=0.05, momentum=0.0, lpips_face_side=448, step_rule="scaled"),
    "eps11-shaped-jit-lp448-scaled-x2": budgeted(11, jitter=0.05, momentum=0.0, lpips_face_side=448, step_rule="scaled",
                                                 step_size=2.2 * E),
}

# Leave-one-out: ``<setting>-loo-<model>`` is the setting attacking with every recogniser but
# ``<model>`` (four of the five); the held-out one grades transfer. Recognisers already
# outside a setting's own ensemble are graded from the setting itself (a weaker, three-model
# attack, so a stricter test). Kept out of the main table: the ensembles differ.
LOO = "-loo-"
# Variants of `mid` measured by leave-one-out only (their three-model run was not cloaked).
LOO_ONLY = {"eps10-shaped-jit-lp224-sgm": budgeted(10, jitter=0.05, momentum=0.0, lpips_face_side=224, skip_grad=0.5)}
LOO_OF = ("eps10-shaped-jit-lp224", "eps10-shaped-jit-lp224-eq",  # the former `mid`, with equalised gradients,
          "eps10-shaped-jit-lp224-sgm",  # with the skip gradient method
          "eps10-shaped-jit-lp448",  # `mid` since 7 Dec
          "eps11-shaped-jit-lp448-scaled-x2")  # steps in proportion to the gradient
# the variants: only the recogniser `mid` fails for
LOO_HELD = {"eps10-shaped-jit-lp224-eq": ("sface",), "eps10-shaped-jit-lp224-sgm": ("sface",)}


def base_setting(name: str) -> dict:
    """The Config overrides of a setting of :data:`LOO_OF`."""
    return SETTINGS[name] if name in SETTINGS else LOO_ONLY[name]


for _base in LOO_OF:
    for _held in LOO_HELD.get(_base, base_setting(_base).get("models", Config.models)):
        SETTINGS[f"{_base}{LOO}{_held}"] = {**base_setting(_base), "models": tuple(m for m in RECOGNIZERS if m != _held)}

# The recogniser the default transfers to worst (SFace, held out: docs/eval/sweep.md) against
# the budget of the default's recipe (as of 2 Dec: 224-pixel LPIPS crops): the four-model
# attack without SFace at n/255.
HELD_OUT = "sface"
CURVE_BUDGETS = (10, 13, 16)
CURVE = {n: f"eps{n}-shaped-jit-lp224{LOO}{HELD_OUT}" for n in CURVE_BUDGETS}
for _n, _name in CURVE.items():
    SETTINGS.setdefault(_name, {**budgeted(_n, jitter=0.05, momentum=0.0, lpips_face_side=224),
                                "models": tuple(m for m in RECOGNIZERS if m != HELD_OUT)})


def work_dir() -> Path:
    return home() / "sweep"


def _dataset():
    photos = load_dataset(SHARED / "faces" / "celebs")
    return photos


def cmd_cloak(names: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench import matmul_peak  # bench/bench.py

    photos = _dataset()
    cs = clean_set(photos, ())
    gallery, _ = split_gallery(cs.photos)
    for name in names or list(SETTINGS):
        d = work_dir() / name
        meta = d / "meta.json"
        if meta.is_file() or (d / "started").is_file():
            print(f"{name}: already cloaked or being cloaked ({d})")
            continue
        d.mkdir(parents=True, exist_ok=True)
        (d / "started").write_text(str(os.getpid()))
        cfg = Config(**SETTINGS[name])
        peak0 = matmul_peak()
        t = time.perf_counter()
        res = cloak([cs.images[p.path] for p in gallery], cfg, evaluate=False)
        spp = (time.perf_counter() - t) / len(gallery)
        peak1 = matmul_peak()
        d.mkdir(parents=True, exist_ok=True)
        for p, r in zip(gallery, res):
            Image.fromarray(r.image).save(d / (p.path.stem + ".png"))
        meta.write_text(json.dumps({"setting": name, "config": dataclasses.asdict(cfg), "photos": len(gallery),
                                    "seconds_per_photo_incl_compile": spp,
                                    "matmul_peak_gflops": [peak0 / 1e9, peak1 / 1e9]}, indent=1))
        print(f"{name}: {spp:.1f} s/photo incl. compile (matmul peak {peak0 / 1e9:.0f} / {peak1 / 1e9:.0f} GFLOP/s)", flush=True)


def _clean_set_path(graders) -> Path:
    return work_dir() / f"clean_set_{'_'.join(graders)}.pkl"


def _cached_clean_set(photos, graders):
    """:func:`clean_set`, with the detected faces and clean embeddings kept on disk (the
    photos themselves are read again): grading restarts without re-embedding 61 photos."""
    import pickle

    from lowkey_jax.imageio import read_image

    cache = _clean_set_path(graders)
    if cache.is_file():
        kept, faces, emb, skipped = pickle.loads(cache.read_bytes())
        images = {p.path: read_image(p.path).rgb for p in kept}
        from lowkey_jax.evaluate import CleanSet

        return CleanSet(kept, images, faces, emb, skipped)
    cs = clean_set(photos, graders)
    cache.write_bytes(pickle.dumps((cs.photos, cs.faces, cs.embeddings, cs.skipped)))
    return cs


def cmd_grade(wait_for: list[str] = ()) -> None:
    """Grade every cloaked setting; with names, keep waiting (polling) until those are
    cloaked and graded too, so grading overlaps with the cloaking of later settings."""
    from lowkey_jax.pipeline import thresholds

    graders = [m for m in RECOGNIZERS]
    cs = _cached_clean_set(_dataset(), graders)
    gallery, probes = split_gallery(cs.photos)
    eer = {m: thresholds().get(m, float("nan")) for m in graders}
    results = {}
    path = work_dir() / "grades.json"
    if path.is_file():
        results = json.loads(path.read_text())
    while True:
        todo = [p for p in sorted(work_dir().iterdir()) if (p / "meta.json").is_file()
                and results.get(p.name, {}).get("key") != f"{p.name}|{','.join(graders)}"]
        if not todo:
            if all(n in results for n in wait_for):
                return
            time.sleep(30)
            continue
        _grade(todo[0], graders, cs, gallery, probes, eer, results, path)


def _grade(d, graders, cs, gallery, probes, eer, results, path) -> None:
    if True:
        meta = json.loads((d / "meta.json").read_text())
        key = f"{d.name}|{','.join(graders)}"
        cloaked = {p.path: np.asarray(Image.open(d / (p.path.stem + ".png")).convert("RGB")) for p in gallery}
        prot = measure_protection(cs, gallery, probes, cloaked, graders, eer, transforms=("none", PLATFORM))
        qual = measure_quality(cs, cloaked, whole_photo=False)
        ensemble = meta["config"]["models"]
        results[d.name] = {"key": key, "meta": meta, "ensemble": ensemble, "protection": prot, "quality": qual}
        path.write_text(json.dumps(results, indent=1))
        unseen = [m for m in graders if m not in ensemble]
        print(f"{d.name}: " + ", ".join(
            f"{m}{'*' if m in unseen else ''} {prot['none'][m]['match_rate_shipped']:.2f}/{prot[PLATFORM][m]['match_rate_shipped']:.2f}"
            for m in graders) + f"; face PSNR {qual['face']['crop224']['psnr']['mean']:.1f}, "
            f"dE00 {qual['face']['crop224']['ciede2000_mean']['mean']:.2f}/{qual['face']['crop224']['ciede2000_p99']['mean']:.2f}",
            flush=True)


def _row(name: str, r: dict) -> dict:
    graders = list(r["protection"]["none"])
    unseen = [m for m in graders if m not in r["ensemble"]]
    own = [m for m in graders if m in r["ensemble"]]
    q = r["quality"]["face"]["crop224"]
    qn = r["quality"]["face"]["native"]
    mr = lambda t, ms: float(np.mean([r["protection"][t][m]["match_rate_shipped"] for m in ms])) if ms else float("nan")
    worst = lambda t, ms: float(np.max([r["protection"][t][m]["match_rate_shipped"] for m in ms])) if ms else float("nan")
    return {
        "setting": name, "config": {k: v for k, v in r["meta"]["config"].items() if k not in NOT_COMPARED},
        "unseen": unseen, "white_box": own,
        "unseen_match": mr("none", unseen), "unseen_match_platform": mr(PLATFORM, unseen),
        "unseen_worst_platform": worst(PLATFORM, unseen),
        "white_box_match": mr("none", own), "white_box_match_platform": mr(PLATFORM, own),
        "per_model": {m: {"raw": r["protection"]["none"][m]["match_rate_shipped"],
                          "platform": r["protection"][PLATFORM][m]["match_rate_shipped"]} for m in graders},
        "face_psnr": q["psnr"]["mean"], "face_psnr_worst": q["psnr"]["worst"],
        "face_ciede2000_mean": q["ciede2000_mean"]["mean"], "face_ciede2000_p99": q["ciede2000_p99"]["mean"],
        "face_ciede2000_p99_worst": q["ciede2000_p99"]["worst"],
        "face_lpips_alex": q["lpips_alex"]["mean"], "face_linf_native_median": qn["linf"]["median"],
        "seconds_per_photo_incl_compile": r["meta"]["seconds_per_photo_incl_compile"],
        "matmul_peak_gflops": r["meta"]["matmul_peak_gflops"],
    }


def _previous() -> dict:
    """The committed report (``docs/eval/sweep.json``), for rows whose grades are no longer in
    the work directory (a fresh machine): they are carried over as measured then."""
    p = OUT / "sweep.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def merge_rows(fresh: list[dict], previous: list[dict], key) -> list[dict]:
    """``fresh`` rows, plus the ``previous`` ones whose ``key(row)`` no fresh row has."""
    have = {key(r) for r in fresh}
    return fresh + [r for r in previous if key(r) not in have]


def cmd_report() -> None:
    path = work_dir() / "grades.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    prev = _previous()
    from lowkey_jax.presets import LEVELS, matches

    rows = merge_rows([_row(n, r) for n, r in results.items() if LOO not in n],
                      [r for r in prev.get("rows", []) if r["setting"] in SETTINGS], key=lambda r: r["setting"])
    for row in rows:  # which --level preset a setting is
        row["preset"] = next((lv for lv, p in LEVELS.items() if matches(p, row["config"])), None)
    rows.sort(key=lambda r: r["face_ciede2000_mean"])
    OUT.mkdir(parents=True, exist_ok=True)
    loo = merge_rows(leave_one_out(results), prev.get("leave_one_out", []), key=lambda r: (r["setting"], r["held_out"]))
    curve = merge_rows(held_out_curve(results), prev.get("held_out_curve", []), key=lambda r: r["run"])
    # a curve run graded only for the leave-one-out table (before the curve existed): its match
    # rates, without the face quality and time (not kept)
    budget_of = {name: n for n, name in CURVE.items()}
    curve = merge_rows(curve, [{**{k: r[k] for k in _TRANSFER}, "budget": budget_of[r["run"]], **dict.fromkeys(_CURVE_QUALITY)}
                               for r in loo if r["run"] in budget_of], key=lambda r: r["run"])
    curve.sort(key=lambda r: r["budget"])
    carried = sorted({r["setting"] for r in rows} - set(results))
    (OUT / "sweep.json").write_text(json.dumps({"data": "shared/faces/celebs (gallery photo of each identity)",
                                                "rows": rows, "leave_one_out": loo, "held_out_curve": curve,
                                                "carried_over": carried}, indent=1) + "\n")
    L = ["# Protection vs visibility sweep", "", "Produced by `python bench/sweep.py cloak && python bench/sweep.py grade "
         "&& python bench/sweep.py report` on `shared/faces/celebs`: each identity's gallery photo is cloaked, its clean "
         "probes are matched against it at each recogniser's shipped operating point. *Unseen* = recognisers outside the "
         "attack's ensemble (transfer); *platform* = the cloaked photo halved, then re-encoded as JPEG 75. Face quality on "
         "the face box grown by 30%, resized to 224x224 (mean over photos; p99 = 99th percentile of the per-pixel "
         "CIEDE2000). Seconds per photo include compilation, with the float32 matmul peak measured in the same run.", ""]
    if carried:
        L += [f"Rows measured in earlier runs whose grades are no longer in the work directory are carried over from "
              f"the previous report as measured then ({len(carried)} of {len(rows)}).", ""]
    L += ["| setting | unseen match, raw | unseen match, platform (worst model) | white-box match, platform | face PSNR (worst) | face dE00 mean / p99 | face LPIPS | max change (median, /255) | s/photo @ peak GFLOP/s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['setting']} | {r['unseen_match']:.2f} | {r['unseen_match_platform']:.2f} ({r['unseen_worst_platform']:.2f}) | "
                 f"{r['white_box_match_platform']:.2f} | {r['face_psnr']:.1f} ({r['face_psnr_worst']:.1f}) | "
                 f"{r['face_ciede2000_mean']:.2f} / {r['face_ciede2000_p99']:.2f} | {r['face_lpips_alex']:.4f} | "
                 f"{r['face_linf_native_median']:.0f} | {r['seconds_per_photo_incl_compile']:.0f} @ {min(r['matmul_peak_gflops']):.0f} |")
    L += ["", "Per recogniser (match rate at the shipped operating point, raw / platform):", "",
          "| setting | " + " | ".join(rows[0]["per_model"]) + " |", "|---" * (len(rows[0]["per_model"]) + 1) + "|"]
    for r in rows:
        L.append(f"| {r['setting']} | " + " | ".join(
            f"{v['raw']:.2f} / {v['platform']:.2f}{' (unseen)' if m in r['unseen'] else ''}" for m, v in r["per_model"].items()) + " |")
    sys.path.insert(0, str(ROOT / "bench"))
    if loo:
        from readme_tables import render_loo  # the README's rendering of the same rows

        L += ["", f"Leave-one-out of {', '.join(LOO_OF)} (each recogniser held out of the attack, graded at its "
              "shipped operating point; pairs matched of all clean probe pairs):", "", render_loo({"leave_one_out": loo})]
    if curve:
        from readme_tables import _name, render_curve

        L += ["", f"{_name(HELD_OUT)} held out of the default's recipe (four-model attack without it) against the budget:",
              "", render_curve({"held_out_curve": curve})]
    L += ["", "![protection vs visibility](pareto.png)", ""]
    (OUT / "sweep.md").write_text("\n".join(L))
    _pareto(rows, OUT / "pareto.png")
    print((OUT / "sweep.md").read_text())


@functools.cache
def _probes(graders: tuple[str, ...]) -> int:
    """Clean probe pairs of the clean set ``cmd_grade`` graded against (read once)."""
    import pickle

    kept = pickle.loads(_clean_set_path(list(graders)).read_bytes())[0]
    return len(split_gallery(kept)[1])


# the fields of a held-out row (:func:`_transfer`), shared by the leave-one-out and curve rows
_TRANSFER = ("run", "held_out", "ensemble", "probes", "match_raw", "match_platform", "pairs_raw", "pairs_platform")


def _transfer(run: str, r: dict, held_out: str) -> dict:
    """How often ``held_out``, outside run ``run``'s ensemble, still matches (graded ``r``)."""
    assert held_out not in r["ensemble"], (run, held_out)
    n = _probes(tuple(r["protection"]["none"]))
    rate = {t: r["protection"][t][held_out]["match_rate_shipped"] for t in ("none", PLATFORM)}
    return {"run": run, "held_out": held_out, "ensemble": list(r["ensemble"]), "probes": n,
            "match_raw": rate["none"], "match_platform": rate[PLATFORM],
            "pairs_raw": round(rate["none"] * n), "pairs_platform": round(rate[PLATFORM] * n)}


def leave_one_out(results: dict) -> list[dict]:
    """For each setting of :data:`LOO_OF`: one row per recogniser whose run is graded, its
    match rate when the attack never saw it (from ``<setting>-loo-<model>``, or from the
    setting itself when the model is outside its ensemble)."""
    out = []
    defaults = dataclasses.asdict(Config())
    for base in LOO_OF:
        cfg = dataclasses.asdict(Config(**base_setting(base)))
        # a field missing from a stored config did not exist yet: it ran at the default
        same = lambda c: {k: v for k, v in {**defaults, **c}.items() if k not in ("models", *NOT_COMPARED)}
        for m in RECOGNIZERS:
            src = f"{base}{LOO}{m}" if m in cfg["models"] else base
            if src not in results:
                continue
            r = results[src]
            # only the ensemble differs from the setting (JSON turns tuples into lists)
            assert json.loads(json.dumps(same(r["meta"]["config"]))) == json.loads(json.dumps(same(cfg))), (src, m)
            out.append({"setting": base, **_transfer(src, r, m)})
    return out


_CURVE_QUALITY = ("face_psnr", "face_ciede2000_mean", "face_ciede2000_p99", "face_lpips_alex",
                  "seconds_per_photo_incl_compile", "matmul_peak_gflops")


def held_out_curve(results: dict) -> list[dict]:
    """One row per graded run of :data:`CURVE`: the held-out recogniser's match rate at its
    shipped operating point, with the run's face quality and time."""
    out = []
    for n, name in CURVE.items():
        if name in results:
            row = _row(name, results[name])
            out.append({**_transfer(name, results[name], HELD_OUT), "budget": n, **{k: row[k] for k in _CURVE_QUALITY}})
    return out


def _pareto(rows: list[dict], path: Path) -> None:
    """Protection against the worst unseen recogniser after platform processing vs face
    CIEDE2000. Labelled: the presets and the Pareto front (no other setting is both less
    visible and more protective); the other settings are grey dots."""
    pts = [{**r, "protection": 1.0 - r["unseen_worst_platform"]} for r in rows]
    for p, front in zip(pts, pareto_front(pts, x="face_ciede2000_mean", y="protection")):
        p["label"] = (p["setting"] + (f" = {p['preset']}" if p.get("preset") else "")) if front or p.get("preset") else ""
    scatter_plot(pts, path, x="face_ciede2000_mean", y="protection", xmin_span=1.5, xline=(1.0, "1 JND"),
                 xlabel="face colour difference, CIEDE2000 mean (lower = less visible)",
                 ylabel="protection against the worst unseen recogniser after halving + JPEG 75 (1 - match rate); "
                        "grey: not on the front")


def contact_sheet(name: str, out: Path, n: int = 6, window: int = 320, gain: float = 5.0) -> Path:
    """Face crops at 1:1 pixels, one row per photo: clean | cloaked | difference x ``gain``
    (mid-grey = unchanged). Faces larger than ``window`` show their central window."""
    gallery, _ = split_gallery(_dataset())
    cs = clean_set(gallery, ())
    gallery = cs.photos
    d = work_dir() / name
    by_size = sorted(gallery, key=lambda p: cs.faces[p.path].box[2] - cs.faces[p.path].box[0])
    pick = [by_size[round(i * (len(by_size) - 1) / max(1, n - 1))] for i in range(min(n, len(by_size)))]
    rows = []
    for p in pick:
        clean = cs.images[p.path]
        cl = np.asarray(Image.open(d / (p.path.stem + ".png")).convert("RGB"))
        x0, y0, x1, y1 = face_region(cs.faces[p.path], clean.shape)
        if x1 - x0 > window:
            c = (x0 + x1) // 2, (y0 + y1) // 2
            x0, y0 = c[0] - window // 2, c[1] - window // 2
            x1, y1 = x0 + window, y0 + window
        a, b = face_crop(clean, (x0, y0, x1, y1)), face_crop(cl, (x0, y0, x1, y1))
        diff = np.clip(np.rint((b.astype(np.float32) - a) * gain + 127.5), 0, 255).astype(np.uint8)
        rows.append((p.path.name, a, b, diff))
    gap, head = 6, 18
    width = max(r[1].shape[1] for r in rows) * 3 + gap * 4
    height = sum(r[1].shape[0] + head + gap for r in rows) + gap
    sheet = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(sheet)
    y = gap
    for fname, a, b, diff in rows:
        s = a.shape[1]
        dr.text((gap, y), f"{fname} ({s}px, 1:1): clean | cloaked ({name}) | difference x{gain:g}", fill="black")
        y += head
        for k, im in enumerate((a, b, diff)):
            sheet.paste(Image.fromarray(im), (gap + k * (s + gap), y))
        y += a.shape[0] + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main() -> None:
    cmd = sys.argv[1] if len(sys.argv) > 1 else "report"
    args = sys.argv[2:]
    if cmd == "cloak":
        cmd_cloak(args)
    elif cmd == "grade":
        cmd_grade(args)
    elif cmd == "report":
        cmd_report()
    elif cmd == "sheets":
        for name in args:
            print(contact_sheet(name, OUT / f"faces_{name}.png"))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
