"""Render the README's benchmark and evaluation tables from the committed JSON.

The numbers in README.md between ``<!-- BEGIN: name -->`` and ``<!-- END: name -->`` are
never typed by hand: this script writes them from

    docs/benchmarks.json        written by  python bench/bench.py all --out docs/benchmarks.md
    docs/eval/evaluation.json   written by  lowkey-jax evaluate ... --out docs/eval
    docs/eval/sweep.json        written by  python bench/sweep.py report

and ``tests/test_readme_tables.py`` fails when README.md differs from what it renders.
After a new benchmark or evaluation run:

    python bench/readme_tables.py            # rewrite the marked blocks in README.md
    python bench/readme_tables.py --check    # exit 1 (with a diff) if README.md is stale

Blocks (the name after ``BEGIN:``): ``benchmarks`` (models, detection), ``benchmarks-attack``
(the attack, with the matmul peak measured in the same run), ``evaluation`` (protection per
recogniser), ``evaluation-robustness`` (after JPEG / downscaling / blur) and
``evaluation-quality`` (LPIPS / SSIM / PSNR), ``sweep`` (protection vs visibility per setting) and
``sweep-loo`` (the default, each recogniser held out of the attack) and ``sweep-held-out`` (the
recogniser the default transfers to worst, held out, against the budget). Text outside the markers is
left alone; a missing field in the JSON is an error naming the file and the field.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_JSON = ROOT / "docs" / "benchmarks.json"
EVAL_JSON = ROOT / "docs" / "eval" / "evaluation.json"
SWEEP_JSON = ROOT / "docs" / "eval" / "sweep.json"
README = ROOT / "README.md"

_BLOCK = re.compile(r"(<!-- BEGIN: (?P<name>[\w-]+)[^>]*-->\n)(?P<body>.*?)(<!-- END: (?P=name) -->)", re.S)
_DISPLAY = {"dlib": "dlib", "facenet": "FaceNet", "sface": "SFace"}


class TableError(ValueError):
    """The JSON lacks a field a table needs, or README.md's markers are broken."""


def _get(data: dict, source: Path, *keys):
    cur = data
    for i, k in enumerate(keys):
        try:
            cur = cur[k]
        except (KeyError, IndexError, TypeError):
            raise TableError(f"{source.name}: missing field {'.'.join(map(str, keys[: i + 1]))}") from None
    return cur


def _sig(x: float, digits: int = 3) -> str:
    """``digits`` significant digits, no exponent: 0.0978, 0.588, 13.3, 204."""
    if x == 0:
        return "0"
    s = f"{x:.{digits}g}"
    return f"{float(s):,.0f}" if "e" in s else s


def _name(m: str) -> str:
    return _DISPLAY.get(m, m)


# --------------------------------------------------------------------------------------------
# benchmarks


def _rows(data: dict, src: Path, *jobs: str) -> list[dict]:
    rows = _get(data, src, "rows")
    return [r for r in rows if r.get("job") in jobs and "error" not in r]


def _machine_line(data: dict, src: Path) -> str:
    m = _get(data, src, "machine")
    dev = "" if m.get("backend") == "cpu" else f" ({m.get('devices', 1)} x {m.get('device', '?')})"
    provenance = data.get("provenance", "").strip()
    return (f"Measured {_get(data, src, 'measured')} with `{_get(data, src, 'command')}` on "
            f"{m['cpu']}, {m['cores']} cores, backend {m['backend']}{dev}, jax {m['jax']}. "
            f"Source: [`docs/{src.name}`](docs/{src.name})" + (f" ({provenance.rstrip('.')})." if provenance else "."))


def render_benchmarks(data: dict, src: Path = BENCH_JSON) -> str:
    """Models and detection: one row per measurement."""
    lines = [_machine_line(data, src), "", "| what | forward | forward + backward | other |", "|---|---|---|---|"]
    for r in _rows(data, src, "lpips", "recognizers", "detect"):
        g = lambda k: _get(r, src, k)  # noqa: E731
        if r["job"] == "lpips":
            cells = [f"{_sig(g('forward_s'))} s", f"{_sig(g('forward_backward_s'))} s",
                     f"{_sig(g('compile_plus_first_s'))} s incl. compile; peak {_sig(g('peak_mib') / 1024)} GiB"]
        elif r["job"] == "recognizers":
            cells = [f"{_sig(g('forward_s'))} s", f"{_sig(g('forward_backward_s'))} s",
                     f"{g('params'):,} params, {_sig(g('gflops_per_chip'))} GFLOP/chip"]
        else:
            cells = [f"{_sig(g('warm_s'))} s warm", "",
                     f"{_sig(g('first_s'))} s incl. compile; {g('faces')} faces; peak {_sig(g('peak_mib') / 1024)} GiB"]
        lines.append(f"| {r['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_attack(data: dict, src: Path = BENCH_JSON) -> str:
    """The attack: time, compile, FLOPs and the fraction of the matmul peak of the same run."""
    lines = ["| attack (default settings) | s / photo | compile + first | TFLOP / photo | achieved | "
             "float32 matmul peak (same run) | fraction of peak | peak memory |",
             "|---|---|---|---|---|---|---|---|"]
    for r in _rows(data, src, "attack", "attack-large"):
        g = lambda k: _get(r, src, k)  # noqa: E731
        what = re.sub(r"^attack ", "", r["what"])
        lines.append(f"| {what} | {_sig(g('s_per_photo'))} s | {_sig(g('compile_plus_first_s'))} s | "
                     f"{_sig(g('gflop_per_photo') / 1000)} | {_sig(g('achieved_gflops'))} GFLOP/s | "
                     f"{_sig(g('matmul_peak_gflops'))} GFLOP/s | {g('fraction_of_peak'):.0%} | "
                     f"{_sig(g('peak_mib') / 1024)} GiB |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# evaluation


def render_evaluation(data: dict, src: Path = EVAL_JSON) -> str:
    """Protection per recogniser: before/after white-box, same-photo check, leave-one-out."""
    models = list(_get(data, src, "white_box", "protection", "none"))  # attacked ones (unseen graders: sweep)
    n = _get(data, src, "photos")
    lines = [f"{n} photos, {_get(data, src, 'identities')} identities, {_get(data, src, 'probes')} clean probes; "
             f"{_sig(_get(data, src, 'white_box', 'seconds_per_photo'))} s per cloaked photo "
             f"(source: [`docs/eval/{src.name}`](docs/eval/{src.name})).", "",
             "| recogniser | rank-1 before -> after | match rate before -> after (white-box) | "
             "clean vs cloaked below threshold (all photos) | attack never saw it (leave-one-out): "
             "match rate | same, clean vs cloaked below threshold (gallery photos) |",
             "|---|---|---|---|---|---|"]
    for m in models:
        before = _get(data, src, "before", m)
        after = _get(data, src, "white_box", "protection", "none", m)
        same = _get(data, src, "white_box", "all_photos_clean_vs_cloaked", m)
        k = len(_get(same, src, "values"))
        below = round(_get(same, src, "below_threshold") * k)
        transfer = data.get("transfer", {}).get(m)
        if transfer:
            none = _get(transfer, src, "protection", "none")
            cos = _get(none, src, "clean_vs_cloaked_cosine")
            t = _get(data, src, "thresholds", m)
            hit = sum(c < t for c in cos)
            loo = f"{_get(none, src, 'match_rate'):.2f} | {hit / len(cos):.0%} ({hit}/{len(cos)})"
        else:
            loo = "not run | not run"
        lines.append(f"| {_name(m)} | {before['rank1']:.2f} -> {after['rank1']:.2f} | "
                     f"{before['match_rate']:.2f} -> {after['match_rate']:.2f} | "
                     f"{_get(same, src, 'below_threshold'):.1%} ({below}/{k}), mean cosine {_get(same, src, 'mean'):.2f} | "
                     f"{loo} |")
    return "\n".join(lines) + "\n"


def render_robustness(data: dict, src: Path = EVAL_JSON) -> str:
    """Match rate after the cloaked gallery photos are post-processed."""
    wb = _get(data, src, "white_box", "protection")
    kinds = list(wb)
    lines = ["| match rate after post-processing | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for m in _get(data, src, "white_box", "protection", "none"):
        lines.append(f"| {_name(m)} (white-box) | " + " | ".join(f"{_get(wb, src, k, m, 'match_rate'):.2f}" for k in kinds) + " |")
    for m, t in data.get("transfer", {}).items():
        pr = _get(t, src, "protection")
        lines.append(f"| {_name(m)} (attack never saw it) | "
                     + " | ".join(f"{_get(pr, src, k, 'match_rate'):.2f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def render_quality(data: dict, src: Path = EVAL_JSON) -> str:
    """Visibility of the cloak over every cloaked photo."""
    q = _get(data, src, "white_box", "quality")
    lines = ["| quality (all cloaked photos) | mean | median | min | max |", "|---|---|---|---|---|"]
    labels = {"lpips_alex": "LPIPS-alex (lower = less visible)", "lpips_vgg": "LPIPS-vgg",
              "ssim": "SSIM", "psnr": "PSNR (dB)"}
    for key, label in labels.items():
        if key in q:
            s = q[key]
            fmt = (lambda v: f"{v:.1f}") if key == "psnr" else (lambda v: f"{v:.3f}")
            lines.append(f"| {label} | " + " | ".join(fmt(_get(s, src, f)) for f in ("mean", "median", "min", "max")) + " |")
    return "\n".join(lines) + "\n"


def render_sweep(data: dict, src: Path = SWEEP_JSON) -> str:
    """The protection/visibility sweep (``bench/sweep.py report``), least visible first."""
    lines = ["| setting (`--level`) | unseen recognisers: match rate | same after halving + JPEG 75 (worst model) | "
             "white-box after halving + JPEG 75 | face PSNR, mean (worst) | face CIEDE2000 mean / p99 | face LPIPS-alex | "
             "largest change (median, /255) |", "|---|---|---|---|---|---|---|---|"]
    for r in _get(data, src, "rows"):
        name = _get(r, src, "setting") + (f" (`{r['preset']}`)" if r.get("preset") else "")
        lines.append(
            f"| {name} | {_get(r, src, 'unseen_match'):.2f} | {_get(r, src, 'unseen_match_platform'):.2f} "
            f"({_get(r, src, 'unseen_worst_platform'):.2f}) | {_get(r, src, 'white_box_match_platform'):.2f} | "
            f"{_get(r, src, 'face_psnr'):.1f} ({_get(r, src, 'face_psnr_worst'):.1f}) | "
            f"{_get(r, src, 'face_ciede2000_mean'):.2f} / {_get(r, src, 'face_ciede2000_p99'):.2f} | "
            f"{_get(r, src, 'face_lpips_alex'):.3f} | {_get(r, src, 'face_linf_native_median'):.0f} |")
    return "\n".join(lines) + "\n"


def render_loo(data: dict, src: Path = SWEEP_JSON) -> str:
    """Leave-one-out of the default and its variants (``bench/sweep.py``: each recogniser held
    out of the attack), one row per (setting, held-out recogniser)."""
    lines = ["| setting | held out (never seen by the attack) | attack ensemble | pairs matched, as uploaded | "
             "pairs matched, halved + JPEG 75 |", "|---|---|---|---|---|"]
    for r in _get(data, src, "leave_one_out"):
        n = _get(r, src, "probes")
        lines.append(f"| {_get(r, src, 'setting')} | {_name(_get(r, src, 'held_out'))} | "
                     f"{', '.join(_name(m) for m in _get(r, src, 'ensemble'))} | "
                     f"{_get(r, src, 'pairs_raw')} of {n} | {_get(r, src, 'pairs_platform')} of {n} |")
    return "\n".join(lines) + "\n"


def render_curve(data: dict, src: Path = SWEEP_JSON) -> str:
    """One recogniser held out of the default's recipe, against the budget (``bench/sweep.py``)."""
    lines = ["| budget (brightness, /255) | pairs matched, as uploaded | pairs matched, halved + JPEG 75 | "
             "face dE00 mean / p99 | face PSNR | s/photo @ peak GFLOP/s |", "|---|---|---|---|---|---|"]
    for r in _get(data, src, "held_out_curve"):
        n = _get(r, src, "probes")
        cells = [f"{_get(r, src, 'budget')}", f"{_get(r, src, 'pairs_raw')} of {n}", f"{_get(r, src, 'pairs_platform')} of {n}"]
        if _get(r, src, "face_ciede2000_mean") is None:  # graded for the leave-one-out table only
            cells += ["not kept"] * 3
        else:
            cells += [f"{_get(r, src, 'face_ciede2000_mean'):.2f} / {_get(r, src, 'face_ciede2000_p99'):.2f}",
                      f"{_get(r, src, 'face_psnr'):.1f} dB", f"{_get(r, src, 'seconds_per_photo_incl_compile'):.0f} @ "
                      f"{min(_get(r, src, 'matmul_peak_gflops')):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


BLOCKS: dict[str, tuple[Path, Callable[[dict, Path], str]]] = {
    "sweep": (SWEEP_JSON, render_sweep),
    "sweep-loo": (SWEEP_JSON, render_loo),
    "sweep-held-out": (SWEEP_JSON, render_curve),
    "benchmarks": (BENCH_JSON, render_benchmarks),
    "benchmarks-attack": (BENCH_JSON, render_attack),
    "evaluation": (EVAL_JSON, render_evaluation),
    "evaluation-quality": (EVAL_JSON, render_quality),
    "evaluation-robustness": (EVAL_JSON, render_robustness),
}


def render_readme(text: str, sources: dict[str, Path] | None = None) -> str:
    """``text`` with every marked block re-rendered; ``sources`` overrides JSON paths per block."""
    cache: dict[Path, dict] = {}
    seen = set()

    def block(m: re.Match) -> str:
        name = m["name"]
        if name not in BLOCKS:
            raise TableError(f"README.md: unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        default, render = BLOCKS[name]
        path = (sources or {}).get(name, default)
        if path not in cache:
            try:
                cache[path] = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise TableError(f"{path}: cannot read ({e})") from None
        seen.add(name)
        return m.group(1) + render(cache[path], path) + m.group(4)

    out = _BLOCK.sub(block, text)
    if text.count("<!-- BEGIN:") != len(seen) or text.count("<!-- END:") != len(seen):
        raise TableError("README.md: a <!-- BEGIN: name --> marker has no matching <!-- END: name -->")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="Only compare; exit 1 with a diff if README.md is stale.")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    old = args.readme.read_text()
    try:
        new = render_readme(old)
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       "README.md (committed)", "README.md (from the JSON)"))
            print("README.md tables are stale: run python bench/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.readme.write_text(new)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
