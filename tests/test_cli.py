"""The ``lowkey-jax cloak`` / ``compare`` commands.

Two kinds of tests:
  * plumbing tests (most of this file): the attack is replaced by ``fake_attack`` (a
    deterministic +-3 pattern, faces only in photos that are not flat), so file handling,
    naming, resumability, metadata, alpha, reports and exit codes are checked in
    milliseconds without touching any model;
  * ``test_attack_*`` (marked ``slow``): the real attack on ONE real photo from
    shared/faces/celebs (plus its RGBA twin) with ``--steps 2``, run once per module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image
from typer.testing import CliRunner

from lowkey_jax import cli
from lowkey_jax.face import Face

runner = CliRunner()


# --------------------------------------------------------------------------------------------
# helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Textured (not flat) uint8 [h, w, 3]: the fake attack 'finds a face' in it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 200 // w, y * 200 // h, (x + y) * 100 // (h + w)], -1)
    return (base + rng.integers(0, 40, (h, w, 3))).astype(np.uint8)


def gps_exif() -> Image.Exif:
    ex = Image.Exif()
    ex[ExifTags.Base.Make] = "TestCam"
    ex[ExifTags.Base.Orientation] = 1
    gps = ex.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (48.0, 51.0, 24.0)
    return ex


def png_header_bomb(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


ALPHA = np.tile(np.linspace(0, 255, 72).astype(np.uint8), (56, 1))


def make_batch_folder(folder: Path) -> dict[str, Path]:
    """Good photos, a photo without a face and every kind of bad file, in one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    f = {}
    f["gps"] = folder / "holiday.jpg"
    Image.fromarray(picture(60, 80, 1)).save(f["gps"], exif=gps_exif(), quality=95)
    f["rgba"] = folder / "sticker.png"
    Image.fromarray(np.dstack([picture(56, 72, 2), ALPHA]), "RGBA").save(f["rgba"])
    f["webp"] = folder / "disguised.jpg"  # WebP content with a .jpg name
    Image.fromarray(picture(40, 48, 3)).save(f["webp"], format="WEBP", quality=90)
    f["flat"] = folder / "wall.png"  # no face (flat grey)
    Image.fromarray(np.full((50, 50, 3), 128, np.uint8)).save(f["flat"])
    f["empty"] = folder / "empty.jpg"
    f["empty"].write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(picture(128, 128, 4)).save(buf, format="JPEG")
    f["truncated"] = folder / "truncated.jpg"
    f["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    f["text"] = folder / "letter.jpg"
    f["text"].write_text("Dear diary, this is not a photo.\n" * 10)
    f["tiny"] = folder / "tiny.png"
    Image.fromarray(picture(12, 12, 5)).save(f["tiny"])
    f["bomb"] = folder / "bomb.png"
    f["bomb"].write_bytes(png_header_bomb(30000, 30000))
    f["notes"] = folder / "notes.txt"  # not a photo suffix: ignored in folders
    f["notes"].write_text("ignore me")
    f["old_output"] = folder / "previous_cloaked.jpg"  # an earlier output: never cloaked again
    Image.fromarray(picture(40, 40, 6)).save(f["old_output"])
    return f


GOOD = ("gps", "rgba", "webp")
BAD = ("empty", "truncated", "text", "tiny", "bomb")


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    steps: int
    alpha: float
    models: tuple
    max_side: int
    seed: int
    batch_size: int
    # the --level preset's shaping (lowkey_jax.presets)
    step_size: float = 0.0025
    epsilon: float | None = None
    chroma: float | None = None
    texture: float = 0.0
    momentum: float = 0.0
    jitter: float = 0.0
    lpips_face_side: int = 112
    step_rule: str = "sign"


@dataclasses.dataclass
class FakeResult:
    image: np.ndarray
    faces: list
    no_face: bool
    similarity: dict
    detected_after: list
    lpips: float
    psnr: float
    seconds: float


class FakeAttack:
    """Stands in for lowkey_jax.attack.cloak in plumbing tests (records every call)."""

    def __init__(self, fail_on_height: int | None = None):
        self.calls: list[list[tuple[int, ...]]] = []
        self.fail_on_height = fail_on_height

    def __call__(self, images, config, progress):
        self.calls.append([im.shape for im in images])
        if self.fail_on_height is not None and any(im.shape[0] == self.fail_on_height for im in images):
            raise RuntimeError("simulated device failure\nsecond line")
        out = []
        for im in images:
            assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
            if progress is not None:
                for s in range(1, config.steps + 1):
                    progress(s, config.steps)
            if int(im.std()) == 0:
                out.append(FakeResult(im, [], True, {}, [], 0.0, math.inf, 0.01))
                continue
            h, w = im.shape[:2]
            pattern = np.where((np.indices((h, w)).sum(0) % 2)[..., None] == 0, 3, -3)
            cloaked = np.clip(im.astype(np.int16) + pattern, 0, 255).astype(np.uint8)
            face = Face(box=[w * 0.2, h * 0.2, w * 0.8, h * 0.8], score=0.99, landmarks=np.full((5, 2), 10.0))
            out.append(FakeResult(cloaked, [face], False, {m: [0.25] for m in config.models}, [True], 0.01, 40.0, 0.02))
        return out

    @property
    def photos(self) -> int:
        return sum(len(c) for c in self.calls)


@pytest.fixture
def fake(monkeypatch):
    attack = FakeAttack()
    monkeypatch.setattr(cli, "_run_attack", attack)
    monkeypatch.setattr(cli, "_make_config", lambda **kw: FakeConfig(**kw))
    return attack


def run(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


# --------------------------------------------------------------------------------------------
# help and usage errors (no attack)


def test_help_has_examples_and_exit_codes():
    r = run("cloak", "--help")
    assert r.exit_code == 0
    for word in ("Example", "lowkey-jax cloak selfie.jpg", "Exit codes", "--overwrite", "--keep-metadata", "--level"):
        assert word in r.output, word
    r = run("compare", "--help")
    assert r.exit_code == 0 and "Example" in r.output and "--out" in r.output


@pytest.mark.parametrize(
    "args",
    [
        ["--models", "dlib,arcface"],
        ["--level", "extreme"],
        ["--format", "gif"],
        ["--steps", "-1"],
        ["--quality", "101"],
        ["--device", "abacus"],
        ["--report", "no_such_folder/report.json"],
    ],
)
def test_usage_errors_exit_2(tmp_path, fake, args):
    Image.fromarray(picture(40, 40)).save(tmp_path / "a.png")
    r = runner.invoke(cli.app, ["cloak", str(tmp_path / "a.png"), *[a.replace("no_such_folder", str(tmp_path / "nope")) for a in args]])
    assert r.exit_code == 2, r.output
    assert fake.photos == 0 and sorted(os.listdir(tmp_path)) == ["a.png"]


def test_no_arguments_is_usage_error():
    assert run("cloak").exit_code == 2


# --------------------------------------------------------------------------------------------
# a batch with every kind of bad file (fake attack)


def test_batch_with_bad_files(tmp_path, fake):
    f = make_batch_folder(tmp_path / "photos")
    before = hashes(tmp_path / "photos")
    report = tmp_path / "report.json"
    r = run("cloak", tmp_path / "photos", "--steps", "3", "--report", report)
    assert r.exit_code == 1, r.output  # some inputs failed, the batch went on

    # one line per problem naming the file (and the reason)
    lines = r.output.splitlines()
    reasons = {"empty": "empty", "truncated": "truncated", "text": "not an image", "tiny": "too small", "bomb": "decompression bomb"}
    for key, reason in reasons.items():
        hit = [ln for ln in lines if str(f[key]) in ln]
        assert len(hit) == 1 and reason in hit[0] and "FAILED" in hit[0], (key, hit)
    assert any(str(f["flat"]) in ln and "no face" in ln for ln in lines)
    assert not any("notes.txt" in ln for ln in lines)
    summary = [ln for ln in lines if ln.startswith("Done:")]
    assert summary and "3 cloaked, 1 no face, 0 skipped, 5 failed of 9" in summary[0], summary

    # the attack saw exactly the readable inputs, never an earlier output
    assert fake.photos == 4
    # outputs: exact sizes, names follow the written format; no output for no-face / bad files
    outs = {
        "gps": tmp_path / "photos" / "holiday_cloaked.jpg",
        "rgba": tmp_path / "photos" / "sticker_cloaked.png",
        "webp": tmp_path / "photos" / "disguised_cloaked.webp",
    }
    for key, out in outs.items():
        with Image.open(f[key]) as a, Image.open(out) as b:
            assert b.size == a.size and b.format == a.format, key
    made = set(hashes(tmp_path / "photos")) - set(before)
    assert made == {p.name for p in outs.values()}
    # inputs untouched
    assert {k: v for k, v in hashes(tmp_path / "photos").items() if k in before} == before
    # GPS / EXIF stripped
    with Image.open(outs["gps"]) as im:
        assert len(im.getexif()) == 0 and not im.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert b"TestCam" not in outs["gps"].read_bytes()
    # alpha kept exactly, cloaked RGB changed
    with Image.open(outs["rgba"]) as im:
        assert im.mode == "RGBA"
        arr = np.asarray(im)
    np.testing.assert_array_equal(arr[..., 3], ALPHA)
    with Image.open(f["rgba"]) as im:
        assert np.abs(arr[..., :3].astype(np.int16) - np.asarray(im)[..., :3].astype(np.int16)).max() == 3

    # report
    rep = json.loads(report.read_text())
    assert rep["versions"]["lowkey-jax"] and rep["versions"]["jax"] and rep["versions"]["flax"]
    assert rep["config"]["steps"] == 3 and rep["config"]["models"] == ["dlib", "facenet", "sface"]
    assert rep["settings"]["level"] == "mid" and rep["settings"]["alpha"] == 0.05
    assert rep["summary"] == {**rep["summary"], "cloaked": 3, "no_face": 1, "skipped": 0, "failed": 5, "total": 9}
    by_input = {Path(p["input"]).name: p for p in rep["photos"]}
    assert set(by_input) == {p.name for k, p in f.items() if k not in ("notes", "old_output")}
    g = by_input["holiday.jpg"]
    assert g["status"] == "cloaked" and g["output"] == str(outs["gps"]) and g["size"] == [80, 60]
    assert g["similarity"] == {"dlib": [0.25], "facenet": [0.25], "sface": [0.25]}
    assert len(g["faces"]) == 1 and set(g["faces"][0]) == {"box", "score", "landmarks"}
    assert g["lpips"] == 0.01 and g["psnr"] == 40.0 and g["seconds"] > 0
    assert by_input["wall.png"]["status"] == "no_face" and by_input["wall.png"]["output"] is None
    assert by_input["bomb.png"]["status"] == "failed" and "bomb.png" in by_input["bomb.png"]["reason"]
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_resume_skips_and_overwrite_redoes(tmp_path, fake):
    folder = tmp_path / "p"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(picture(48, 40 + i, i)).save(folder / f"img{i}.png")
    assert run("cloak", folder, "--steps", "1").exit_code == 0
    assert fake.photos == 3
    outs = hashes(folder)
    assert len(outs) == 6
    # second run: nothing to do, every photo skipped, outputs neither cloaked again nor touched
    r = run("cloak", folder, "--steps", "1")
    assert r.exit_code == 0, r.output
    assert fake.photos == 3 and hashes(folder) == outs
    assert "0 cloaked, 0 no face, 3 skipped, 0 failed of 3" in r.output and "3 *_cloaked outputs" in r.output
    assert sum("skipped" in ln and "already exists" in ln for ln in r.output.splitlines()) == 3
    # a new photo in the folder: only it is cloaked
    Image.fromarray(picture(48, 50, 9)).save(folder / "new.png")
    r = run("cloak", folder, "--steps", "1")
    assert r.exit_code == 0 and fake.photos == 4 and (folder / "new_cloaked.png").is_file()
    # an output named explicitly is not cloaked again either
    r = run("cloak", folder / "img0_cloaked.png")
    assert r.exit_code == 0 and fake.photos == 4 and "already a cloaked output" in r.output
    # --overwrite redoes them (and only the inputs)
    (folder / "img1_cloaked.png").write_bytes(b"stale")
    r = run("cloak", folder, "--steps", "1", "--overwrite")
    assert r.exit_code == 0 and fake.photos == 8
    with Image.open(folder / "img1_cloaked.png") as im:
        assert im.size == (41, 48)
    assert sorted(p.name for p in folder.iterdir() if "_cloaked" in p.name) == [
        "img0_cloaked.png", "img1_cloaked.png", "img2_cloaked.png", "new_cloaked.png"]


def test_output_dir_recursive_and_formats(tmp_path, fake):
    src = tmp_path / "in"
    (src / "trip" / "day1").mkdir(parents=True)
    Image.fromarray(picture(40, 44, 1)).save(src / "a.jpg")
    Image.fromarray(picture(40, 46, 2)).save(src / "trip" / "b.png")
    Image.fromarray(np.dstack([picture(40, 48, 3), ALPHA[:40, :48]]), "RGBA").save(src / "trip" / "day1" / "c.png")
    before = hashes(src)
    out = tmp_path / "out"
    r = run("cloak", src, "-o", out, "--steps", "1")  # not recursive: only a.jpg
    assert r.exit_code == 0 and sorted(hashes(out)) == ["a_cloaked.jpg"]
    r = run("cloak", src, "-r", "-o", out, "--steps", "1", "--format", "jpg", "--quality", "90")
    assert r.exit_code == 0, r.output
    assert sorted(hashes(out)) == ["a_cloaked.jpg", "trip/b_cloaked.jpg", "trip/day1/c_cloaked.jpg"]
    with Image.open(out / "trip" / "day1" / "c_cloaked.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 40)
    assert hashes(src) == before  # nothing written beside the inputs
    r = run("cloak", src / "trip" / "b.png", "-o", out, "--format", "png", "--steps", "1")
    assert r.exit_code == 0 and (out / "b_cloaked.png").is_file()


def test_keep_metadata_option(tmp_path, fake):
    Image.fromarray(picture(60, 80, 1)).save(tmp_path / "m.jpg", exif=gps_exif())
    assert run("cloak", tmp_path / "m.jpg", "--keep-metadata", "--steps", "1").exit_code == 0
    with Image.open(tmp_path / "m_cloaked.jpg") as im:
        ex = im.getexif()
        assert ex[ExifTags.Base.Make] == "TestCam" and ex[ExifTags.Base.Orientation] == 1
        assert ex.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"


def test_one_failing_photo_does_not_stop_the_batch(tmp_path, monkeypatch):
    attack = FakeAttack(fail_on_height=33)
    monkeypatch.setattr(cli, "_run_attack", attack)
    monkeypatch.setattr(cli, "_make_config", lambda **kw: FakeConfig(**kw))
    for name, h in (("a.png", 40), ("b.png", 33), ("c.png", 41)):
        Image.fromarray(picture(h, 40)).save(tmp_path / name)
    r = run("cloak", tmp_path, "--steps", "1", "--batch-size", "4")
    assert r.exit_code == 1, r.output
    line = [ln for ln in r.output.splitlines() if "b.png" in ln]
    assert len(line) == 1 and "FAILED" in line[0] and "simulated device failure" in line[0]
    assert (tmp_path / "a_cloaked.png").is_file() and (tmp_path / "c_cloaked.png").is_file()
    assert not (tmp_path / "b_cloaked.png").exists()
    assert attack.calls[0] == [(40, 40, 3), (33, 40, 3), (41, 40, 3)] and len(attack.calls) == 4  # batch, then one by one


def test_missing_weights_stop_the_run(tmp_path, monkeypatch):
    from lowkey_jax.store import WeightsError

    calls = []

    def no_weights(images, config, progress):
        calls.append(len(images))
        raise WeightsError("cannot download facenet; run `lowkey-jax weights --from DIR`")

    monkeypatch.setattr(cli, "_run_attack", no_weights)
    monkeypatch.setattr(cli, "_make_config", lambda **kw: FakeConfig(**kw))
    for i in range(3):
        Image.fromarray(picture(40, 40, i)).save(tmp_path / f"p{i}.png")
    r = run("cloak", tmp_path, "--batch-size", "1", "--report", tmp_path / "r.json")
    assert r.exit_code == 1 and calls == [3] and "lowkey-jax weights" in r.output  # one call, then stop
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [p["status"] for p in rep["photos"]] == ["failed"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p0.png", "p1.png", "p2.png", "r.json"]


def test_missing_path_is_reported(tmp_path, fake):
    Image.fromarray(picture(40, 40)).save(tmp_path / "a.png")
    r = run("cloak", tmp_path / "a.png", tmp_path / "ghost.jpg", "--steps", "1")
    assert r.exit_code == 1 and "ghost.jpg" in r.output and "no such file" in r.output
    assert (tmp_path / "a_cloaked.png").is_file()


def test_device_cannot_switch_after_start():
    import jax

    jax.devices()  # make sure a backend is running
    current = jax.default_backend()
    other = "tpu" if current != "tpu" else "cpu"
    with pytest.raises(cli._Usage, match="already runs"):
        cli.select_device(other)
    assert jax.default_backend() == current
    cli.select_device(None)  # default: leave JAX alone


def test_empty_folder(tmp_path, fake):
    r = run("cloak", tmp_path)
    assert r.exit_code == 0 and "No photos found" in r.output and fake.photos == 0


# --------------------------------------------------------------------------------------------
# compare: the parts that need no model


def test_side_by_side_panels():
    a = picture(20, 30, 1)
    b = a.copy()
    b[5, 5] = np.clip(b[5, 5].astype(np.int16) + 4, 0, 255).astype(np.uint8)
    s = cli.side_by_side(a, b, amplify=10.0, gap=8)
    assert s.shape == (20, 3 * 30 + 16, 3) and s.dtype == np.uint8
    np.testing.assert_array_equal(s[:, :30], a)
    np.testing.assert_array_equal(s[:, 38:68], b)
    diff = s[:, 76:].astype(np.int16)
    changed = (b[5, 5].astype(np.int16) - a[5, 5].astype(np.int16)) * 10 + 128
    np.testing.assert_array_equal(diff[5, 5], np.clip(changed, 0, 255))
    assert (diff[0, 0] == 128).all() and (s[:, 30:38] == 255).all()


def test_compare_input_errors(tmp_path):
    Image.fromarray(picture(40, 40)).save(tmp_path / "a.png")
    Image.fromarray(picture(40, 44)).save(tmp_path / "b.png")
    (tmp_path / "bad.jpg").write_text("nope")
    r = run("compare", tmp_path / "a.png", tmp_path / "bad.jpg")
    assert r.exit_code == 1 and "bad.jpg" in r.output and "not an image" in r.output
    r = run("compare", tmp_path / "a.png", tmp_path / "b.png", "--out", tmp_path / "s.png")
    assert r.exit_code == 1 and "same size" in r.output and not (tmp_path / "s.png").exists()
    r = run("compare", tmp_path / "a.png", tmp_path / "a.png", "--out", tmp_path / "b.png")
    assert r.exit_code == 2 and "already exists" in r.output
    assert run("compare", tmp_path / "a.png", tmp_path / "a.png", "--models", "x").exit_code == 2


# --------------------------------------------------------------------------------------------
# the real models / attack (slow): one real photo and its RGBA twin, --steps 2


def _attack_available() -> None:
    try:
        from lowkey_jax.attack import Config, cloak  # noqa: F401
        from lowkey_jax.pipeline import compare  # noqa: F401
    except ImportError as e:
        pytest.skip(f"lowkey_jax.attack / pipeline not importable yet: {e}")


REAL_PHOTO = "img25.jpg"  # 400x400, one face: the smallest single-face photo in the set


@pytest.fixture(scope="module")
def attacked(shared, tmp_path_factory):
    """One run of the real attack on a folder: the real photo (with GPS EXIF added), its
    RGBA PNG twin, and two bad files. Returns (folder, CliResult, input hashes, report)."""
    _attack_available()
    folder = tmp_path_factory.mktemp("attack")
    with Image.open(shared / "faces" / "celebs" / REAL_PHOTO) as im:
        rgb = np.asarray(im.convert("RGB"))
    Image.fromarray(rgb).save(folder / "face.jpg", exif=gps_exif(), quality=95)
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, : rgb.shape[1] // 8] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "face_alpha.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (folder / "zero.png").write_bytes(b"")
    before = hashes(folder)
    report = folder.parent / f"{folder.name}_report.json"
    r = run("cloak", folder, "--steps", "2", "--models", "sface", "--max-side", "256", "--report", report)
    return folder, r, before, json.loads(report.read_text()) if report.exists() else None, alpha


@pytest.mark.slow
def test_attack_real_photo_outputs(attacked):
    folder, r, before, rep, alpha = attacked
    assert r.exit_code == 1, r.output  # the two bad files
    assert "broken.jpg" in r.output and "zero.png" in r.output
    assert "2 cloaked, 0 no face, 0 skipped, 2 failed of 4" in r.output
    assert {k: v for k, v in hashes(folder).items() if k in before} == before  # inputs untouched
    for name, out in (("face.jpg", "face_cloaked.jpg"), ("face_alpha.png", "face_alpha_cloaked.png")):
        with Image.open(folder / name) as a, Image.open(folder / out) as b:
            assert a.size == b.size and a.format == b.format
            d = np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16))
            assert d.max() > 0  # something changed
    with Image.open(folder / "face_cloaked.jpg") as im:
        assert len(im.getexif()) == 0  # GPS stripped
    with Image.open(folder / "face_alpha_cloaked.png") as im:
        assert im.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(im)[..., 3], alpha)
    photos = {Path(p["input"]).name: p for p in rep["photos"]}
    for name in ("face.jpg", "face_alpha.png"):
        p = photos[name]
        assert p["status"] == "cloaked" and len(p["faces"]) >= 1
        assert set(p["similarity"]) == {"sface"} and len(p["similarity"]["sface"]) == len(p["faces"])
        assert all(-1.0 <= s <= 1.0 for s in p["similarity"]["sface"])
        assert p["psnr"] > 30 and 0 <= p["lpips"] < 0.2 and p["seconds"] > 0
    assert rep["config"]["steps"] == 2 and rep["config"]["models"] == ["sface"] and rep["device"]


@pytest.mark.slow
def test_attack_rerun_skips_without_attacking(attacked, monkeypatch):
    folder, _, _, _, _ = attacked
    outs = {k: v for k, v in hashes(folder).items() if "_cloaked" in k}

    def boom(*a, **k):
        raise AssertionError("the attack must not run again")

    monkeypatch.setattr(cli, "_run_attack", boom)
    r = run("cloak", folder / "face.jpg", folder / "face_alpha.png", "--steps", "2", "--models", "sface")
    assert r.exit_code == 0, r.output
    assert "0 cloaked, 0 no face, 2 skipped, 0 failed of 2" in r.output
    assert {k: v for k, v in hashes(folder).items() if "_cloaked" in k} == outs


@pytest.mark.slow
def test_attack_compare_command(attacked, tmp_path):
    folder, _, _, _, _ = attacked
    side = tmp_path / "side.png"
    r = run("compare", folder / "face.jpg", folder / "face_cloaked.jpg", "--out", side, "--models", "sface", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["faces"] >= 1 and len(res["recognizers"]["sface"]["similarity"]) == res["faces"]
    assert isinstance(res["recognizers"]["sface"]["matched"][0], bool)
    assert res["psnr"] > 30 and 0 < res["ssim"] <= 1 and res["lpips"] >= 0
    with Image.open(folder / "face.jpg") as a, Image.open(side) as s:
        assert s.size == (3 * a.size[0] + 16, a.size[1])
    r = run("compare", folder / "face.jpg", folder / "face_cloaked.jpg", "--models", "sface")
    assert r.exit_code == 0 and "sface" in r.output and "PSNR" in r.output and "LPIPS" in r.output
