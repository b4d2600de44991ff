"""Does cloaking protect? Protection evaluation on a labelled photo collection.

Protocol (LowKey's threat model): for each identity with at least two photos, its first
photo (by file name) is the *gallery* photo that the user publishes, so it is cloaked and
put into the adversary's database; its other, clean photos are the *probes* the adversary
later tries to identify. Gallery photos of all other identities are distractors.

For each recogniser, before vs after cloaking the gallery:
- rank-1 identification accuracy of the probes against the gallery;
- verification match rate: the fraction of (probe, own gallery photo) pairs whose cosine
  reaches the threshold that gives equal error rate on the clean data.
Also: the clean-vs-cloaked similarity of each cloaked face (the "would the same photo still
match" view), robustness after JPEG re-encoding (quality 75), downscaling by half and a
mild blur, and image quality (LPIPS alex/vgg, SSIM, PSNR).

Transfer: with ``transfer=True`` each recogniser is also evaluated on galleries cloaked by an
ensemble that leaves it out: the honest estimate against systems the attack never saw.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lowkey_jax.attack import Config, cloak
from lowkey_jax.detect import detect_faces
from lowkey_jax.face import Face
from lowkey_jax.imageio import ImageError, read_image
from lowkey_jax.metrics import eer_threshold, pair_scores, paired_cosine, rank1_accuracy
from lowkey_jax.pipeline import embed_faces, lpips_photos, match_faces, psnr, ssim
from lowkey_jax.quality import face_quality, summarise
from lowkey_jax.verification import matches, operating_points

__all__ = ["Photo", "load_dataset", "evaluate", "write_report", "TRANSFORMS"]


@dataclasses.dataclass(frozen=True)
class Photo:
    path: Path
    identity: str


def load_dataset(data: Path, labels: Path | None = None) -> list[Photo]:
    """A folder of identity subfolders, or a folder plus a ``file,identity`` CSV
    (``labels.csv`` inside the folder is used when present)."""
    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"{data}: not a folder")
    labels = labels or (data / "labels.csv" if (data / "labels.csv").is_file() else None)
    photos = []
    if labels is not None:
        with open(labels, newline="") as f:
            for row in csv.DictReader(f):
                photos.append(Photo(data / row["file"], row["identity"]))
    else:
        for sub in sorted(p for p in data.iterdir() if p.is_dir()):
            for f in sorted(p for p in sub.iterdir() if p.is_file()):
                photos.append(Photo(f, sub.name))
    if not photos:
        raise ValueError(f"{data}: no labelled photos (expected identity subfolders or a labels CSV)")
    return photos


def _jpeg(img: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=75)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _half(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS))


def _blur(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.0)))


# Post-processing a platform might apply to an uploaded photo. Each returns (image, scale)
# where scale maps the original's coordinates onto the transformed image.
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "none": (lambda x: x, 1.0),
    "jpeg75": (_jpeg, 1.0),
    "downscale0.5": (_half, 0.5),
    "blur1": (_blur, 1.0),
    # What platforms do to uploads: halve, then re-encode as JPEG 75.
    "half+jpeg75": (lambda x: _jpeg(_half(x)), 0.5),
}
PLATFORM = "half+jpeg75"


def _scaled(face: Face, s: float) -> Face:
    return Face(face.box * s, face.score, face.landmarks * s)


def _main_face(faces: list[Face]) -> Face:
    """The photo's subject: the largest face."""
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


def _embed_main(img: np.ndarray, reference: Face, models: Sequence[str]) -> dict[str, np.ndarray]:
    """Each recogniser's own pipeline: detect in ``img``, take the face matching
    ``reference`` (falling back to ``reference``'s geometry if none is detected), embed."""
    found = match_faces([reference], detect_faces(img))[0]
    face = found if found is not None else reference
    return {m: embed_faces(img, [face], m)[0] for m in models}


@dataclasses.dataclass
class CleanSet:
    """The readable photos of a labelled set with a face: each photo's subject (largest
    face) and its clean native embedding per recogniser."""

    photos: list[Photo]
    images: dict[Path, np.ndarray]
    faces: dict[Path, Face]
    embeddings: dict[Path, dict[str, np.ndarray]]
    skipped: list[dict]


def clean_set(photos: Sequence[Photo], models: Sequence[str]) -> CleanSet:
    """Read, detect and embed (each recogniser's own pipeline) every photo; unreadable
    photos and photos without a face are listed in ``skipped`` with the reason."""
    images, faces, kept, skipped = {}, {}, [], []
    for p in photos:
        try:
            img = read_image(p.path).rgb
        except ImageError as e:
            skipped.append({"file": str(p.path), "reason": str(e)})
            continue
        found = detect_faces(img)
        if not found:
            skipped.append({"file": str(p.path), "reason": "no face found"})
            continue
        images[p.path], faces[p.path] = img, _main_face(found)
        kept.append(p)
    emb = {p.path: {m: embed_faces(images[p.path], [faces[p.path]], m)[0] for m in models} for p in kept}
    return CleanSet(kept, images, faces, emb, skipped)


def clean_embeddings(photos: Sequence[Photo], models: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray], CleanSet]:
    """``(identities, {recogniser: [N, D] embeddings}, clean set)`` of the photos with a face."""
    cs = clean_set(photos, models)
    labels = [p.identity for p in cs.photos]
    return labels, {m: np.stack([cs.embeddings[p.path][m] for p in cs.photos]) for m in models}, cs


def split_gallery(photos: Sequence[Photo]) -> tuple[list[Photo], list[Photo]]:
    """Each identity's first photo (by file name) is its gallery photo, the others probes."""
    by_id: dict[str, list[Photo]] = {}
    for p in photos:
        by_id.setdefault(p.identity, []).append(p)
    gallery = [sorted(ps, key=lambda p: p.path.name)[0] for ps in by_id.values()]
    probes = [p for ps in by_id.values() if len(ps) >= 2 for p in sorted(ps, key=lambda p: p.path.name)[1:]]
    return gallery, probes


def measure_protection(cs: CleanSet, gallery: Sequence[Photo], probes: Sequence[Photo], cloaked: dict[Path, np.ndarray],
                       eval_models: Sequence[str], eer_thresholds: dict[str, float],
                       transforms: Sequence[str] = tuple(TRANSFORMS)) -> dict:
    """``{transform: {recogniser: {...}}}``: the adversary's database holds the gallery photos
    (cloaked where ``cloaked`` has them), after each platform ``transform``; the clean probes
    are matched against it. Per recogniser: rank-1 identification, the match rate of
    (probe, own gallery photo) pairs at the shipped operating point (``match_rate_shipped``,
    see :mod:`lowkey_jax.verification`; it decides) and at the EER threshold fitted on the
    clean photos (``match_rate``), and each cloaked gallery photo's cosine to its clean self."""
    g_ids = [p.identity for p in gallery]
    own_of = {p.identity: p.path for p in gallery}
    ops = operating_points()
    out = {}
    for tname in transforms:
        fn, scale = TRANSFORMS[tname]
        g_emb = {}
        for p in gallery:
            img = fn(cloaked[p.path]) if p.path in cloaked else fn(cs.images[p.path])
            g_emb[p.path] = _embed_main(img, _scaled(cs.faces[p.path], scale), eval_models)
        per_model = {}
        for m in eval_models:
            gal = np.stack([g_emb[p.path][m] for p in gallery])
            prb = np.stack([cs.embeddings[p.path][m] for p in probes])
            own = np.stack([g_emb[own_of[p.identity]][m] for p in probes])
            cos = paired_cosine(prb, own)
            self_sim = [float(paired_cosine(cs.embeddings[p.path][m], g_emb[p.path][m])) for p in gallery if p.path in cloaked]
            per_model[m] = {
                "rank1": rank1_accuracy(prb, [p.identity for p in probes], gal, g_ids),
                "match_rate": float(np.mean(cos >= eer_thresholds[m])),
                "probe_gallery_cosine_mean": float(np.mean(cos)),
                "clean_vs_cloaked_cosine": self_sim,
            }
            if m in ops:
                per_model[m]["match_rate_shipped"] = float(np.mean(matches(m, prb, own)))
                per_model[m]["clean_vs_cloaked_shipped_match"] = [
                    bool(matches(m, cs.embeddings[p.path][m], g_emb[p.path][m])) for p in gallery if p.path in cloaked]
        out[tname] = per_model
    return out


def _stats(v: Sequence[float]) -> dict:
    return {"mean": float(np.mean(v)), "median": float(np.median(v)), "min": float(np.min(v)),
            "max": float(np.max(v)), "values": [float(x) for x in v]}


def measure_quality(cs: CleanSet, cloaked: dict[Path, np.ndarray], *, whole_photo: bool = True) -> dict:
    """Image quality of the cloaked photos: on the face region of each photo's subject
    (``face``: :mod:`lowkey_jax.quality`, native and 224x224, mean / median / worst face,
    plus every face's values) and, secondary, on the whole photo (LPIPS, SSIM, PSNR)."""
    per_face = []
    for path, img in cloaked.items():
        fq = face_quality(cs.images[path], img, [cs.faces[path]])[0]
        fq["file"] = path.name
        per_face.append(fq)
    out = {"face": {"crop224": summarise(per_face, "crop224"), "native": summarise(per_face, "native"), "faces": per_face}}
    if whole_photo:
        q = {"lpips_alex": [], "lpips_vgg": [], "ssim": [], "psnr": []}
        for path, img in cloaked.items():
            q["lpips_alex"].append(lpips_photos(cs.images[path], img, "alex"))
            q["lpips_vgg"].append(lpips_photos(cs.images[path], img, "vgg"))
            q["ssim"].append(ssim(cs.images[path], img))
            q["psnr"].append(psnr(cs.images[path], img))
        out.update({k: _stats(v) for k, v in q.items()})
    return out


def evaluate(
    data: Path,
    *,
    labels: Path | None = None,
    config: Config | None = None,
    settings: Sequence[tuple[int, float]] = (),
    transfer: bool = True,
    cloak_all: bool = False,
    graders: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """Run the protocol; returns a JSON-able dict with every number.

    Args:
      config: the attack settings for the main (white-box) run.
      settings: extra ``(steps, alpha)`` points for the protection/quality trade-off.
      transfer: also cloak with each leave-one-out ensemble.
      cloak_all: cloak every photo in the main run (not only gallery photos), to report the
        clean-vs-cloaked similarity over the whole collection.
      graders: recognisers outside the attack's ensemble that grade every cloaked set
        too (``report["unseen"]``): transfer to networks the attack never saw.
    """
    config = config or Config()
    models = tuple(config.models)
    unseen = tuple(g for g in graders if g not in models)
    graded = models + unseen
    photos = load_dataset(Path(data), labels)
    cs = clean_set(photos, graded)
    images, faces, kept, skipped, clean = cs.images, cs.faces, cs.photos, cs.skipped, cs.embeddings
    log(f"{len(kept)} photos with a face, {len(skipped)} skipped")

    # Thresholds at equal error rate on all clean pairs.
    labels_ = [p.identity for p in kept]
    thresholds, eers = {}, {}
    for m in graded:
        s, same = pair_scores(np.stack([clean[p.path][m] for p in kept]), labels_)
        thresholds[m], eers[m] = eer_threshold(s, same)

    by_id = {p.identity for p in kept}
    gallery, probes = split_gallery(kept)

    def cloak_set(cfg: Config, targets: list[Photo]) -> tuple[dict, float]:
        t = time.perf_counter()
        res = cloak([images[p.path] for p in targets], cfg, evaluate=False)
        return {p.path: r.image for p, r in zip(targets, res)}, (time.perf_counter() - t) / max(1, len(targets))

    def protection(cloaked: dict[Path, np.ndarray], eval_models: Sequence[str]) -> dict:
        return measure_protection(cs, gallery, probes, cloaked, eval_models, thresholds)

    def quality(cloaked: dict[Path, np.ndarray]) -> dict:
        return measure_quality(cs, cloaked)

    # Before: nothing cloaked.
    report: dict = {
        "data": str(data), "photos": len(kept), "identities": len(by_id), "gallery": len(gallery),
        "probes": len(probes), "skipped": skipped, "config": dataclasses.asdict(config),
        "thresholds": thresholds, "eer": eers,
    }
    log("measuring clean protection baseline")
    report["before"] = protection({}, graded)["none"]

    log(f"cloaking {'all' if cloak_all else len(gallery)} photos with {'+'.join(models)} (white-box)")
    main_targets = kept if cloak_all else gallery
    main, spp = cloak_set(config, main_targets)
    prot = protection(main, graded)
    report["white_box"] = {"seconds_per_photo": spp, "protection": {t: {m: v[m] for m in models} for t, v in prot.items()},
                           "quality": quality(main)}
    if unseen:
        report["unseen"] = {"ensemble": models, "protection": {t: {m: v[m] for m in unseen} for t, v in prot.items()}}
    if cloak_all:
        sims = {m: [] for m in models}
        for p in kept:
            e = _embed_main(main[p.path], faces[p.path], models)
            for m in models:
                sims[m].append(float(paired_cosine(clean[p.path][m], e[m])))
        report["white_box"]["all_photos_clean_vs_cloaked"] = {
            m: {"below_threshold": float(np.mean(np.asarray(v) < thresholds[m])), "mean": float(np.mean(v)), "values": v}
            for m, v in sims.items()
        }

    if transfer and len(models) > 1:
        report["transfer"] = {}
        for held_out in models:
            ens = tuple(m for m in models if m != held_out)
            log(f"cloaking the gallery with {'+'.join(ens)}; evaluating {held_out} (never seen by the attack)")
            cl, spp = cloak_set(dataclasses.replace(config, models=ens), gallery)
            report["transfer"][held_out] = {"ensemble": ens, "seconds_per_photo": spp,
                                            "protection": {t: v[held_out] for t, v in protection(cl, (held_out,)).items()}}

    report["sweep"] = []
    for steps, alpha in settings:
        log(f"sweep point: steps={steps}, alpha={alpha}")
        cfg = dataclasses.replace(config, steps=steps, alpha=alpha)
        cl, spp = cloak_set(cfg, gallery)
        prot = protection(cl, models)["none"]
        qual = quality(cl)
        report["sweep"].append({
            "steps": steps, "alpha": alpha, "seconds_per_photo": spp,
            "match_rate": {m: prot[m]["match_rate"] for m in models},
            "mean_match_rate": float(np.mean([prot[m]["match_rate"] for m in models])),
            "lpips_alex": qual["lpips_alex"]["mean"], "psnr": qual["psnr"]["mean"],
        })
    return report


def pareto_front(points: list[dict], *, x: str, y: str) -> list[bool]:
    """Per point: whether no other point is at least as good on both axes and better on one
    (lower ``x``, higher ``y``)."""
    return [not any(q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y]) for q in points) for p in points]


def scatter_plot(points: list[dict], path: Path, *, x: str, y: str, xlabel: str, ylabel: str,
                 xmin_span: float = 0.05, xline: tuple[float, str] | None = None) -> None:
    """One point per setting: ``point[x]`` against ``point[y]`` (``y`` in [0, 1]), labelled
    with ``point["label"]``; a point with an empty label is drawn small and grey (context,
    not a candidate). ``xline`` draws a labelled vertical reference line."""
    w, h, pad = 760, 520, 70
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.line([(pad, h - pad), (w - 20, h - pad)], fill="black")
    d.line([(pad, h - pad), (pad, 20)], fill="black")
    d.text((w // 2 - 150, h - 35), xlabel, fill="black")
    d.text((5, 5), ylabel, fill="black")
    xmax = max([p[x] for p in points] + [xmin_span]) * 1.15
    px = lambda v: pad + (w - pad - 20) * v / xmax
    for i in range(5):
        d.text((px(xmax * i / 4) - 10, h - pad + 5), f"{xmax * i / 4:.2f}", fill="black")
        d.text((15, h - pad - (h - pad - 20) * i / 4 - 5), f"{i / 4:.2f}", fill="black")
    if xline is not None and xline[0] < xmax:
        d.line([(px(xline[0]), 20), (px(xline[0]), h - pad)], fill=(200, 200, 200))
        d.text((px(xline[0]) + 3, 25), xline[1], fill=(120, 120, 120))
    py = lambda v: h - pad - (h - pad - 20) * v
    # boxes a label must not cover: every labelled point's dot, then the labels drawn so far
    placed: list[tuple[float, float, float, float]] = [(px(p[x]) - 6, py(p[y]) - 6, px(p[x]) + 6, py(p[y]) + 6)
                                                       for p in points if p["label"]]
    for p in sorted(points, key=lambda q: bool(q["label"])):  # labelled ones on top
        cx, cy = px(p[x]), py(p[y])
        r, fill = (5, (31, 119, 180)) if p["label"] else (3, (170, 170, 170))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    for p in sorted((q for q in points if q["label"]), key=lambda q: -q[y]):
        cx, cy = px(p[x]), py(p[y])
        x0, x1 = d.textbbox((cx + 7, 0), p["label"])[0::2]
        ty = cy - 7
        while any(x0 < b[2] and b[0] < x1 and ty < b[3] and b[1] < ty + 12 for b in placed):
            ty += 13  # below the label it would cover, with a leader line to its point
        if ty != cy - 7:
            d.line([(cx + 4, cy + 3), (cx + 7, ty + 6)], fill=(150, 150, 150))
        d.rectangle(d.textbbox((cx + 7, ty), p["label"]), fill="white")  # readable over grey dots
        d.text((cx + 7, ty), p["label"], fill="black")
        placed.append((x0, ty, x1, ty + 12))
    im.save(path)


def _plot(points: list[dict], path: Path) -> None:
    """Protection (1 - mean match rate) against LPIPS, one labelled point per setting."""
    pts = [{**p, "protection": 1.0 - p["mean_match_rate"]} for p in points]
    scatter_plot(pts, path, x="lpips_alex", y="protection", xlabel="LPIPS-alex (lower = less visible)",
                 ylabel="protection = 1 - match rate")


def _transform_rows(models, wb: dict, transfer: dict, key: str) -> list[str]:
    """Markdown rows: per recogniser, ``key`` (a match rate) after each platform transform."""
    fmt = lambda prot: " | ".join(f"{prot[t].get(key, float('nan')):.2f}" for t in TRANSFORMS)
    rows = [f"| {m} (white-box) | " + fmt({t: wb["protection"][t][m] for t in TRANSFORMS}) + " |" for m in models]
    rows += [f"| {m} (held out) | " + fmt(t["protection"]) + " |" for m, t in transfer.items()]
    return rows


TARGETS = {"white_box_match_rate": 0.05, "transfer_match_rate": 0.30, "lpips_alex": 0.10}


def targets(report: dict) -> list[str]:
    """The project's protection targets, each stated as met or missed (and by how much)."""
    out = []
    wb = report["white_box"]["protection"]["none"]
    for m, v in wb.items():
        t = TARGETS["white_box_match_rate"]
        ok = v["match_rate"] <= t
        out.append(f"white-box match rate for {m}: {v['match_rate']:.1%} (target <= {t:.0%}): "
                   + ("met" if ok else f"MISSED by {v['match_rate'] - t:.1%}"))
    for m, tr in report.get("transfer", {}).items():
        v = tr["protection"]["none"]["match_rate"]
        t = TARGETS["transfer_match_rate"]
        out.append(f"leave-one-out match rate for held-out {m}: {v:.1%} (target <= {t:.0%}): "
                   + ("met" if v <= t else f"MISSED by {v - t:.1%}"))
    lp = report["white_box"]["quality"]["lpips_alex"]["mean"]
    t = TARGETS["lpips_alex"]
    out.append(f"mean LPIPS-alex {lp:.4f} (target <= {t}): " + ("met" if lp <= t else (
        f"MISSED by {lp - t:.4f}. To close it: a larger alpha (LPIPS weight) or fewer steps, e.g. "
        "`--level low` (25 steps, alpha 0.10), trades some protection for quality; run `evaluate` with "
        "several --steps/--alpha values to pick the point on the trade-off curve")))
    return out


def write_report(report: dict, out_dir: Path, command: str = "") -> dict[str, Path]:
    """Write ``evaluation.json``, ``evaluation.md`` and ``tradeoff.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "evaluation.json", "md": out_dir / "evaluation.md", "png": out_dir / "tradeoff.png"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    graded = list(report["thresholds"])  # the attacked recognisers, then the unseen graders
    models = list(report["config"]["models"])
    wb = report["white_box"]
    L = [f"# Protection evaluation: {report['data']}", ""]
    if command:
        L += ["Produced by:", "", f"    {command}", ""]
    cfg = report["config"]
    L += [f"{report['photos']} photos of {report['identities']} identities ({report['gallery']} gallery photos cloaked, "
          f"{report['probes']} clean probes); attack: {cfg['steps']} steps, step {cfg['step_size']}, alpha {cfg['alpha']}, "
          f"models {'+'.join(cfg['models'])}, max_side {cfg['max_side']}; {wb['seconds_per_photo']:.1f} s per photo.", ""]
    L += ["## Thresholds (equal error rate on the clean photos)", "", "| recogniser | cosine threshold | EER |", "|---|---|---|"]
    L += [f"| {m} | {report['thresholds'][m]:.3f} | {report['eer'][m]:.3f} |" for m in graded]
    L += ["", "## White-box (all recognisers in the attack)", "",
          "| recogniser | rank-1 before | rank-1 after | match rate before | match rate after |", "|---|---|---|---|---|"]
    for m in models:
        b, a = report["before"][m], wb["protection"]["none"][m]
        L.append(f"| {m} | {b['rank1']:.2f} | {a['rank1']:.2f} | {b['match_rate']:.2f} | {a['match_rate']:.2f} |")
    def _dist(values, t):
        v = np.asarray(values, float)
        return (f"{np.mean(v < t):.0%} below threshold; cosine mean {v.mean():.3f}, median {np.median(v):.3f}, "
                f"min {v.min():.3f}, max {v.max():.3f}")

    L += ["", "Clean vs cloaked similarity of each cloaked gallery photo (same photo, own pipeline):", ""]
    for m in models:
        L.append(f"- {m} (white-box): " + _dist(wb["protection"]["none"][m]["clean_vs_cloaked_cosine"], report["thresholds"][m]))
    for m, t in report.get("transfer", {}).items():
        L.append(f"- {m} (held out): " + _dist(t["protection"]["none"]["clean_vs_cloaked_cosine"], report["thresholds"][m]))
    if "all_photos_clean_vs_cloaked" in wb:
        L += ["", "Clean vs cloaked similarity of the same photo (all photos cloaked):", "",
              "| recogniser | below threshold | mean cosine |", "|---|---|---|"]
        for m, v in wb["all_photos_clean_vs_cloaked"].items():
            L.append(f"| {m} | {v['below_threshold']:.1%} | {v['mean']:.3f} |")
    if "unseen" in report:
        un = report["unseen"]["protection"]
        L += ["", "## Recognisers the attack never saw (not in the ensemble)", "",
              "| recogniser | rank-1 before | rank-1 after | match rate before -> after (shipped point) | same, after halving + JPEG 75 |",
              "|---|---|---|---|---|"]
        for m in un["none"]:
            b, a = report["before"][m], un["none"][m]
            L.append(f"| {m} | {b['rank1']:.2f} | {a['rank1']:.2f} | {b.get('match_rate_shipped', float('nan')):.2f} -> "
                     f"{a.get('match_rate_shipped', float('nan')):.2f} | {un[PLATFORM][m].get('match_rate_shipped', float('nan')):.2f} |")
    if "transfer" in report:
        L += ["", "## Transfer (leave-one-out: the attack never saw the recogniser)", "",
              "| held-out recogniser | ensemble | rank-1 after | match rate after |", "|---|---|---|---|"]
        for m, t in report["transfer"].items():
            p = t["protection"]["none"]
            L.append(f"| {m} | {'+'.join(t['ensemble'])} | {p['rank1']:.2f} | {p['match_rate']:.2f} |")
    if any("match_rate_shipped" in v for v in wb["protection"]["none"].values()):
        L += ["", "## Match rate at each recogniser's shipped operating point (decides; see operating_points.json)", "",
              "| recogniser | " + " | ".join(TRANSFORMS) + " |", "|---" * (len(TRANSFORMS) + 1) + "|"]
        L += _transform_rows(models, wb, report.get("transfer", {}), "match_rate_shipped")
    L += ["", "## Robustness (match rate at the EER threshold after the cloaked gallery is post-processed)", "",
          "| recogniser | " + " | ".join(TRANSFORMS) + " |", "|---" * (len(TRANSFORMS) + 1) + "|"]
    L += _transform_rows(models, wb, report.get("transfer", {}), "match_rate")
    q = wb["quality"]
    if "face" in q:
        L += ["", "## Image quality on the faces (face box grown by 30%; this is what people look at)", "",
              "| metric | view | mean | median | worst face |", "|---|---|---|---|---|"]
        for view in ("crop224", "native"):
            for k, v in q["face"][view].items():
                L.append(f"| {k} | {view} | {v['mean']:.4f} | {v['median']:.4f} | {v['worst']:.4f} |")
    L += ["", "## Image quality on the whole photo (secondary: the background dominates)", "",
          "| metric | mean | median | min | max |", "|---|---|---|---|---|"]
    L += [f"| {k} | {v['mean']:.4f} | {v['median']:.4f} | {v['min']:.4f} | {v['max']:.4f} |" for k, v in q.items() if "mean" in v]
    points = [{"label": "default", "lpips_alex": q["lpips_alex"]["mean"],
               "mean_match_rate": float(np.mean([wb["protection"]["none"][m]["match_rate"] for m in models]))}]
    if report["sweep"]:
        L += ["", "## Trade-off sweep (gallery photos)", "", "| steps | alpha | mean match rate | LPIPS-alex | PSNR | s/photo |",
              "|---|---|---|---|---|---|"]
        for s in report["sweep"]:
            L.append(f"| {s['steps']} | {s['alpha']} | {s['mean_match_rate']:.2f} | {s['lpips_alex']:.4f} | {s['psnr']:.1f} | {s['seconds_per_photo']:.1f} |")
            points.append({"label": f"{s['steps']}/{s['alpha']}", "lpips_alex": s["lpips_alex"], "mean_match_rate": s["mean_match_rate"]})
    L += ["", f"![protection vs quality]({paths['png'].name})", ""]
    L += ["## Targets", ""] + [f"- {line}" for line in targets(report)] + [""]
    paths["md"].write_text("\n".join(L))
    _plot(points, paths["png"])
    return paths
