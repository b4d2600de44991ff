"""Planning, file safety and reports shared by every front end (the CLI and the web app).

Front ends stay thin: they turn their input (paths, uploads) into :class:`Job` rows, call
:func:`plan`, read with :func:`lowkey_jax.imageio.read_image`, run
:func:`lowkey_jax.attack.cloak` and hand each result to :func:`store_result`, which writes the
cloaked photo with the same rules everywhere (metadata stripped unless asked, colour profile
and transparency kept, same format, atomic write). :func:`result_summary` turns a result
into the per-recogniser verdicts and quality figures that both report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lowkey_jax import presets as _presets
from lowkey_jax._version import __version__
from lowkey_jax.imageio import (
    LoadedImage,
    atomic_write_bytes,
    is_cloaked_output,
    output_path,
    sniff_format,
    write_image,
)

__all__ = [
    "RECOGNIZER_NAMES", "LEVELS", "PHOTO_SUFFIXES", "Job", "collect_inputs", "plan", "store_result",
    "write_report", "level_settings", "result_summary", "jsonable", "versions",
]

RECOGNIZER_NAMES = ("dlib", "facenet", "sface")

# --level presets: lowkey_jax.presets (chosen by measurement; explicit --steps/--alpha win).
LEVELS = _presets.LEVELS

# Files taken from folders (explicitly named files are always tried, whatever their name).
PHOTO_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".mpo", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".jp2", ".j2k", ".jpx", ".avif", ".heic", ".heif",
})


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"lowkey-jax": __version__, "python": sys.version.split()[0]}
    for dist in ("jax", "jaxlib", "flax", "numpy", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _finite(x):
    """JSON-safe floats: inf/nan become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, float)):
        return _finite(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj


@dataclasses.dataclass
class Job:
    """One input photo and what became of it (a row of the --report)."""

    input: Path
    output: Path | None = None
    status: str = "pending"  # cloaked | no_face | skipped | failed
    reason: str | None = None
    size: tuple[int, int] | None = None  # (width, height)
    format: str | None = None
    faces: list = dataclasses.field(default_factory=list)
    similarity: dict = dataclasses.field(default_factory=dict)
    detected_after: list = dataclasses.field(default_factory=list)
    matched: dict = dataclasses.field(default_factory=dict)  # at each recogniser's shipped operating point
    face_quality: list = dataclasses.field(default_factory=list)  # per face, lowkey_jax.quality
    lpips: float | None = None
    psnr: float | None = None
    seconds: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    out_dir: Path | None = dataclasses.field(default=None, repr=False)

    def record(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("out_dir")
        return jsonable(d)


def collect_inputs(paths: Sequence[Path], output_dir: Path | None, recursive: bool) -> tuple[list[Job], int]:
    """Expand files and folders into jobs (inputs in order, duplicates removed).

    Folders contribute their files with a photo suffix (``PHOTO_SUFFIXES``), sorted, hidden
    files and folders excluded; sub-folders only with ``recursive`` (their structure is
    mirrored under ``output_dir``). Outputs of this tool (``*_cloaked.*``) found in folders
    are left out and counted; named explicitly they become skipped jobs. A path that does not
    exist becomes a failed job.

    Returns:
      ``(jobs, number of *_cloaked files left out of folders)``.
    """
    jobs: list[Job] = []
    ignored = 0
    seen: set[Path] = set()

    def add(p: Path, out_dir: Path | None) -> None:
        key = p.resolve()
        if key in seen:
            return
        seen.add(key)
        jobs.append(Job(input=p, out_dir=out_dir))

    for root in paths:
        if root.is_dir():
            if recursive:
                walk = sorted(
                    (Path(d), sorted(f)) for d, dirs, f in os.walk(root) if not any(part.startswith(".") for part in Path(d).relative_to(root).parts)
                )
            else:
                walk = [(root, sorted(f.name for f in root.iterdir() if f.is_file()))]
            for folder, names in walk:
                rel = folder.relative_to(root)
                out_dir = (output_dir / rel) if output_dir is not None else None
                for name in names:
                    f = folder / name
                    if name.startswith(".") or f.suffix.lower() not in PHOTO_SUFFIXES or not f.is_file():
                        continue
                    if is_cloaked_output(f):
                        ignored += 1
                        continue
                    add(f, out_dir)
        elif root.exists() or root.is_symlink():
            add(root, output_dir)
        else:
            jobs.append(Job(input=root, status="failed", reason="no such file or folder"))
    return jobs, ignored


def plan(job: Job, fmt: str, overwrite: bool, planned: dict[Path, Path]) -> None:
    """Decide the output path; mark the job skipped/failed when it must not be cloaked."""
    if job.status != "pending":
        return
    if is_cloaked_output(job.input):
        job.status, job.reason = "skipped", "already a cloaked output (name ends in _cloaked)"
        return
    source_format = sniff_format(job.input)
    try:
        out = output_path(job.input, job.out_dir, format=fmt, source_format=source_format or "")
    except ValueError as e:
        job.status, job.reason = "failed", str(e)
        return
    job.output = out
    key = out.resolve()
    if key in planned:
        job.status, job.reason = "failed", f"output name {out} collides with the output of {planned[key]}"
        return
    planned[key] = job.input
    if not overwrite and (out.exists() or out.is_symlink()):
        job.status, job.reason = "skipped", f"output {out} already exists (use --overwrite to redo it)"


def store_result(job: Job, loaded: LoadedImage, result, fmt: str, quality: int, keep_metadata: bool, overwrite: bool) -> None:
    job.faces = [f.to_dict() for f in getattr(result, "faces", [])]
    if getattr(result, "no_face", False):
        job.status, job.reason = "no_face", "no face found; nothing written"
        job.output = None
        job.seconds = float(getattr(result, "seconds", 0.0))
        return
    image = np.asarray(result.image)
    if image.shape != loaded.rgb.shape or image.dtype != np.uint8:
        job.status, job.reason = "failed", f"internal error: cloaked image is {image.dtype}{list(image.shape)}, input {list(loaded.rgb.shape)}"
        return
    job.similarity = {k: [float(v) for v in vs] for k, vs in getattr(result, "similarity", {}).items()}
    job.detected_after = [bool(v) for v in getattr(result, "detected_after", [])]
    job.matched = {k: [bool(v) for v in vs] for k, vs in getattr(result, "matched", {}).items()}
    job.face_quality = list(getattr(result, "face_quality", []))
    job.lpips = float(result.lpips)
    job.psnr = float(result.psnr)
    job.seconds = float(result.seconds)
    job.output.parent.mkdir(parents=True, exist_ok=True)  # mirrored sub-folder of --output
    written = write_image(
        job.output,
        image,
        alpha=loaded.alpha,
        format=fmt,
        source_format=loaded.format,
        quality=quality,
        icc_profile=loaded.icc_profile,
        exif=loaded.exif,
        keep_metadata=keep_metadata,
        overwrite=overwrite,
    )
    job.notes.extend(written.notes)
    job.status = "cloaked"


def write_report(path: Path, jobs: list[Job], settings: dict, config, device: str | None, elapsed: float, interrupted: bool, ignored: int = 0) -> None:
    counts = {s: sum(j.status == s for j in jobs) for s in ("cloaked", "no_face", "skipped", "failed")}
    report = {
        "tool": "lowkey-jax",
        "versions": versions(),
        "device": device,
        "settings": settings,
        "config": (dataclasses.asdict(config) if dataclasses.is_dataclass(config) else vars(config)) if config is not None else None,
        "summary": {**counts, "total": len(jobs), "seconds": round(elapsed, 3), "interrupted": interrupted, "outputs_left_alone": ignored},
        "photos": [j.record() for j in jobs],
    }
    data = json.dumps(jsonable(report), indent=2, allow_nan=False).encode() + b"\n"
    atomic_write_bytes(path, data, overwrite=True)


def level_settings(level: str, steps: int | None = None, alpha: float | None = None,
                   levels: dict[str, dict] | None = None) -> dict:
    """The :class:`lowkey_jax.attack.Config` overrides of a ``--level`` preset
    (:mod:`lowkey_jax.presets`); explicit ``steps`` / ``alpha`` win.

    Raises:
      ValueError: unknown level (the message lists the known ones).
    """
    table = LEVELS if levels is None else levels
    if level not in table:
        raise ValueError(f"unknown level {level!r}; choose from {', '.join(table)}")
    out = dict(table[level])
    out["steps"] = int(steps if steps is not None else table[level]["steps"])
    out["alpha"] = float(alpha if alpha is not None else table[level]["alpha"])
    return out


# Result fields that are not quality figures (everything else numeric is reported).
_NOT_QUALITY = frozenset({"image", "faces", "no_face", "similarity", "detected_after", "working_shape", "seconds",
                          "matched", "face_quality"})
# Per-face figures of Result.face_quality shown by front ends: name -> (view, metric).
FACE_QUALITY = {
    "face_psnr": ("crop224", "psnr"),
    "face_colour_difference": ("crop224", "ciede2000_mean"),
    "face_colour_difference_p99": ("crop224", "ciede2000_p99"),
    "face_lpips": ("crop224", "lpips_alex"),
    "face_max_change": ("native", "linf"),
}


def _number(v) -> float | None:
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return _finite(float(v))
    return None


def result_summary(result, thresholds: dict[str, float]) -> dict:
    """Verdicts and quality figures of one :class:`lowkey_jax.attack.Result`, JSON-ready.

    Returns:
      ``{"faces": [face dicts], "recognizers": {name: {"threshold": t, "rule": text or None, "similarity": [per
      face], "matched": [per face], "verdict": str}}, "quality": {field: number or [number
      per face]}, "detected_after": [...], "seconds": s}``. ``quality`` lists every numeric
      field of the result (whole-photo scalars such as ``lpips`` and ``psnr``, and per-face
      lists), so fields added to ``Result`` later appear without changes here. A
      similarity at or above the recogniser's threshold means it would still match.
    """
    from lowkey_jax.verification import operating_points

    faces = [f.to_dict() for f in getattr(result, "faces", [])]
    recs = {}
    shipped = getattr(result, "matched", None) or {}
    ops = operating_points()
    for name, sims in (getattr(result, "similarity", None) or {}).items():
        t = thresholds.get(name)
        sims = [float(s) for s in sims]
        matched = [t is not None and s >= t for s in sims]
        rule = None
        if name in shipped and name in ops:  # decided at the recogniser's shipped operating point
            matched = [bool(m) for m in shipped[name]]
            op = ops[name]
            t = op.threshold
            rule = f"{'embedding distance <=' if op.metric == 'euclidean' else 'cosine >='} {op.threshold:.3f}"
        if t is None:
            verdict = "no threshold known"
        elif not any(matched):
            verdict = "would no longer match"
        elif all(matched):
            verdict = "would still match"
        else:
            verdict = f"would still match {sum(matched)} of {len(sims)} faces"
        recs[name] = {"threshold": t, "rule": rule, "similarity": sims, "matched": matched, "verdict": verdict}
    quality: dict = {}
    fields = [f.name for f in dataclasses.fields(result)] if dataclasses.is_dataclass(result) else list(vars(result))
    for name in fields:
        if name in _NOT_QUALITY or name.startswith("_"):
            continue
        v = getattr(result, name)
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if isinstance(v, (list, tuple)):
            nums = [_number(x) for x in v]
            if v and all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)) for x in v):
                quality[name] = nums
        elif _number(v) is not None or isinstance(v, float):
            quality[name] = _number(v)
    for q in getattr(result, "face_quality", None) or []:  # per face, on the face region at 224x224
        for key, (view, metric) in FACE_QUALITY.items():
            quality.setdefault(key, []).append(_number(q[view][metric]))
    return jsonable({
        "faces": faces,
        "recognizers": recs,
        "quality": quality,
        "detected_after": [bool(v) for v in getattr(result, "detected_after", [])],
        "seconds": float(getattr(result, "seconds", 0.0)),
    })

