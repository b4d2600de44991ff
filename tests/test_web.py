"""The web app's API (Starlette TestClient): upload, progress, result, download, zip, bad
files, limits, the Host/Origin guard, cancel, deletion, and one real cloak of a real photo.

Most tests inject ``counterfeit_cloak``: a test double for ``lowkey_jax.attack.cloak`` that
reports the same stages and steps, returns a real ``Result`` with a slightly changed image
and made-up similarities, and can be held at a step. It tests the web layer only; the
attack itself is tested in test_attack.py and, through the app, in
``test_real_cloak_of_a_real_photo`` below and in test_web_e2e.py.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):  # under CI: fail, never skip
    pytest.importorskip("starlette", reason="the web extra is not installed: pip install -e '.[test]'")
from starlette.testclient import TestClient  # noqa: E402

from lowkey_jax import jobs  # noqa: E402
from lowkey_jax.web.app import STATIC, Limits, allowed_hosts_for, create_app  # noqa: E402

HOST = "testserver"
FAST_LEVELS = {"low": {"steps": 3, "alpha": 0.1}, "mid": {"steps": 4, "alpha": 0.05}}
GPS = 0x8825


class Counterfeit:
    """A stand-in attack: stages, steps, a changed image, one face; optionally held."""

    def __init__(self, hold: bool = False):
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.running = 0
        self.max_running = 0
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, images, config, *, progress=None, stage=None):
        from lowkey_jax.attack import Result
        from lowkey_jax.face import Face

        with self.lock:
            self.running += 1
            self.calls += 1
            self.max_running = max(self.max_running, self.running)
        try:
            stage("detecting")
            stage("compiling")
            out = []
            for step in range(1, config.steps + 1):
                progress(step, config.steps)
                while not self.gate.wait(0.05):
                    progress(step, config.steps)  # raises when cancelled
            stage("checking")
            for img in images:
                h, w = img.shape[:2]
                rng = np.random.default_rng(0)
                noise = rng.integers(-3, 4, img.shape)
                cl = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
                face = Face(box=np.array([w * 0.3, h * 0.25, w * 0.7, h * 0.75]), score=0.99,
                            landmarks=np.tile([[w * 0.5, h * 0.5]], (5, 1)))
                out.append(Result(image=cl, faces=[face], no_face=False,
                                  similarity={"dlib": [0.70], "facenet": [0.60], "sface": [-0.2]},
                                  detected_after=[True], lpips=0.05, psnr=38.0, distance=1.5, seconds=0.01))
            return out
        finally:
            with self.lock:
                self.running -= 1


def jpeg_with_gps(w=96, h=80) -> tuple[bytes, bytes]:
    """A JPEG carrying EXIF GPS and an sRGB ICC profile. Returns (file bytes, icc)."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif.get_ifd(GPS)[2] = (48.0, 51.0, 30.0)  # GPSLatitude
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif.tobytes(), icc_profile=icc)
    return buf.getvalue(), icc


def png_bytes(w=64, h=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def make_client(tmp_path):
    made = []

    def make(cloak="counterfeit", limits=None, levels=FAST_LEVELS, **kw):
        cloak = Counterfeit() if cloak == "counterfeit" else cloak  # None: the real attack
        app = create_app(allowed_hosts={HOST}, cloak=cloak, levels=levels,
                         limits=limits, root=tmp_path / "store", **kw)
        client = TestClient(app, base_url=f"http://{HOST}")
        client.__enter__()
        made.append(client)
        client.service = app.service
        return client

    yield make
    for c in made:
        c.__exit__(None, None, None)


def wait(client, jid, until, timeout=60.0):
    t0 = time.monotonic()
    while True:
        j = client.get(f"/api/jobs/{jid}").json()
        if until(j):
            return j
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting; last state {j}")
        time.sleep(0.02)


def done(j):
    return j["state"] not in ("queued", "running")


def test_upload_progress_result_download(make_client):
    fake = Counterfeit(hold=True)
    c = make_client(cloak=fake)
    data, icc = jpeg_with_gps()
    r = c.post("/api/cloak", files={"file": ("holiday.jpg", data, "image/jpeg")}, data={"level": "low"})
    assert r.status_code == 202, r.text
    (job,) = r.json()["jobs"]
    assert job["name"] == "holiday.jpg" and job["state"] in ("queued", "running")
    # progress: held at step 1, the page sees stage and step count
    j = wait(c, job["id"], lambda j: j["stage"] == "cloaking" and j["step"] == 1)
    assert j["state"] == "running" and j["total"] == FAST_LEVELS["low"]["steps"]
    listed = c.get("/api/jobs", params={"batch": r.json()["batch"]}).json()["jobs"]
    assert [x["id"] for x in listed] == [job["id"]]
    fake.gate.set()
    j = wait(c, job["id"], done)
    assert j["state"] == "cloaked", j
    assert j["step"] == j["total"] == 3 and j["output"] == "holiday_cloaked.jpg"
    res = j["result"]
    assert res["recognizers"]["dlib"]["threshold"] == pytest.approx(0.925, abs=0.01)
    assert res["recognizers"]["dlib"]["verdict"] == "would no longer match"  # 0.70 < 0.925
    assert res["recognizers"]["facenet"]["verdict"] == "would still match"  # 0.60 >= 0.45
    assert res["quality"]["lpips"] == pytest.approx(0.05) and res["quality"]["psnr"] == pytest.approx(38.0)
    assert len(res["faces"]) == 1
    # download: same size, JPEG, no EXIF/GPS, colour profile kept, pixels changed
    d = c.get(f"/api/jobs/{job['id']}/download")
    assert d.status_code == 200 and d.headers["content-type"] == "image/jpeg"
    assert "holiday_cloaked.jpg" in d.headers["content-disposition"]
    out = Image.open(io.BytesIO(d.content))
    assert out.format == "JPEG" and out.size == (96, 80)
    assert out.info.get("icc_profile") == icc
    assert not out.getexif() and GPS not in out.getexif()
    orig = c.get(f"/api/jobs/{job['id']}/original")
    assert orig.status_code == 200 and Image.open(io.BytesIO(orig.content)).size == (96, 80)
    a = np.asarray(Image.open(io.BytesIO(orig.content)).convert("RGB"), np.int16)
    b = np.asarray(out.convert("RGB"), np.int16)
    assert np.abs(a - b).max() > 0


def test_zip_of_a_batch_and_names_by_content(make_client):
    c = make_client()
    data, _ = jpeg_with_gps()
    files = [("file", ("a.png", png_bytes(), "image/png")),
             ("file", ("b.jpg", data, "image/jpeg")),
             ("file", ("webp-named.jpg", _webp(), "image/jpeg"))]  # type by content, not name
    r = c.post("/api/cloak", files=files, data={"level": "mid"})
    assert r.status_code == 202
    ids = [j["id"] for j in r.json()["jobs"]]
    finals = [wait(c, i, done) for i in ids]
    assert [f["state"] for f in finals] == ["cloaked"] * 3
    assert [f["output"] for f in finals] == ["a_cloaked.png", "b_cloaked.jpg", "webp-named_cloaked.webp"]
    z = c.get(f"/api/batches/{r.json()['batch']}/zip")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        assert sorted(zf.namelist()) == ["a_cloaked.png", "b_cloaked.jpg", "webp-named_cloaked.webp"]
        assert Image.open(io.BytesIO(zf.read("webp-named_cloaked.webp"))).format == "WEBP"
        assert Image.open(io.BytesIO(zf.read("a_cloaked.png"))).size == (64, 48)
    # a second batch from the same page: one zip of both, same names made unique
    r2 = c.post("/api/cloak", files={"file": ("a.png", png_bytes(40, 40), "image/png")})
    assert wait(c, r2.json()["jobs"][0]["id"], done)["state"] == "cloaked"
    z = c.get("/api/zip", params=[("batch", r.json()["batch"]), ("batch", r2.json()["batch"])])
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        names = zf.namelist()
        assert len(names) == 4 and "a_cloaked-2.png" in names
        assert sorted(Image.open(io.BytesIO(zf.read(n))).size for n in ("a_cloaked.png", "a_cloaked-2.png")) == [(40, 40), (64, 48)]
    assert c.get("/api/zip", params={"batch": "nope"}).status_code == 404


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def test_bad_files_get_a_message_and_the_rest_go_on(make_client):
    c = make_client()
    truncated = png_bytes()[:60]
    files = [("file", ("notes.jpg", b"this is text, not a photo", "image/jpeg")),
             ("file", ("empty.png", b"", "image/png")),
             ("file", ("cut.png", truncated, "image/png")),
             ("file", ("../../etc/ok.png", png_bytes(), "image/png"))]
    r = c.post("/api/cloak", files=files)
    assert r.status_code == 202
    js = r.json()["jobs"]
    assert js[0]["state"] == "failed" and "not a photo" in js[0]["error"]
    assert js[1]["state"] == "failed" and "empty" in js[1]["error"]
    assert js[3]["name"] == "ok.png"  # no folders from the client's name
    finals = [wait(c, j["id"], done) for j in js]
    assert finals[2]["state"] == "failed" and finals[2]["error"]  # truncated: read_image's reason
    assert str(c.service.root) not in finals[2]["error"]  # no private paths in messages
    assert finals[3]["state"] == "cloaked"
    # all refused -> 422, with the reasons
    r = c.post("/api/cloak", files={"file": ("x.gif", b"GIF89a-not-really", "image/gif")})
    assert r.status_code == 422 and r.json()["jobs"][0]["error"]
    # not multipart / no file field / unknown level
    assert c.post("/api/cloak", data={"level": "low"}).status_code == 400
    assert c.post("/api/cloak", files={"file": ("a.png", png_bytes(), "image/png")}, data={"level": "extreme"}).status_code == 400


def test_limits_size_pixels_files_queue(make_client):
    lim = Limits(max_file_bytes=4000, max_pixels=3000, max_files=2, max_queued=3)
    c = make_client(limits=lim, cloak=Counterfeit(hold=True))
    big = np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    assert len(buf.getvalue()) > 4000
    small_many_pixels = png_bytes(80, 60)  # 4800 px > 3000, but a small file
    assert len(small_many_pixels) < 4000
    r = c.post("/api/cloak", files=[("file", ("big.png", buf.getvalue(), "image/png")),
                                    ("file", ("wide.png", small_many_pixels, "image/png"))])
    js = r.json()["jobs"]
    assert r.status_code == 422
    assert "MiB" in js[0]["error"] and "limit" in js[0]["error"]
    assert "megapixels" in js[1]["error"] and "80x60" in js[1]["error"]
    # files per request
    r = c.post("/api/cloak", files=[("file", (f"{i}.png", png_bytes(40, 40), "image/png")) for i in range(3)])
    assert r.status_code == 413 and "at most 2" in r.json()["error"]
    r = c.post("/api/cloak", files=[("file", (f"{i}.png", png_bytes(40, 40), "image/png")) for i in range(6)])
    assert r.status_code == 413 and "at most 2" in r.json()["error"]
    # queue: 3 waiting or running at most
    ok = [c.post("/api/cloak", files={"file": ("q.png", png_bytes(40, 40), "image/png")}) for _ in range(3)]
    assert [o.status_code for o in ok] == [202, 202, 202]
    busy = c.post("/api/cloak", files={"file": ("q.png", png_bytes(40, 40), "image/png")})
    assert busy.status_code == 429 and "busy" in busy.json()["error"]
    # the body must be bounded: a declared length over the budget is refused before reading
    r = c.post("/api/cloak", content=b"x", headers={"content-length": str(10**9), "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_one_attack_at_a_time_queue_and_cancel(make_client):
    fake = Counterfeit(hold=True)
    c = make_client(cloak=fake)
    r = c.post("/api/cloak", files=[("file", (f"p{i}.png", png_bytes(40 + i, 40), "image/png")) for i in range(3)])
    a, b, d = (j["id"] for j in r.json()["jobs"])
    wait(c, a, lambda j: j["stage"] == "cloaking")
    jb = c.get(f"/api/jobs/{b}").json()
    assert jb["state"] == "queued" and jb["queue_position"] == 1
    assert c.get(f"/api/jobs/{d}").json()["queue_position"] == 2
    # cancel a queued photo: it never runs
    assert c.post(f"/api/jobs/{d}/cancel").json()["state"] == "cancelled"
    # cancel the running one: the progress callback stops the attack
    c.post(f"/api/jobs/{a}/cancel")
    ja = wait(c, a, done)
    assert ja["state"] == "cancelled" and ja["available"] is False
    jb = wait(c, b, lambda j: j["stage"] == "cloaking")
    assert jb["state"] == "running"
    fake.gate.set()
    assert wait(c, b, done)["state"] == "cloaked"
    assert fake.max_running == 1 and fake.calls == 2
    assert c.get(f"/api/jobs/{a}/download").status_code == 404
    assert not (c.service.jobs[a].folder).exists() and not c.service.jobs[d].folder.exists()


def test_files_deleted_after_download_and_expiry(make_client):
    c = make_client(limits=Limits(after_download_s=0.0, expire_s=3.0))
    r = c.post("/api/cloak", files={"file": ("x.png", png_bytes(), "image/png")})
    jid = r.json()["jobs"][0]["id"]
    assert wait(c, jid, done)["state"] == "cloaked"
    folder = c.service.jobs[jid].folder
    assert folder.is_dir() and oct(folder.parent.stat().st_mode & 0o777) == "0o700"
    assert c.get(f"/api/jobs/{jid}/download").status_code == 200
    t0 = time.monotonic()
    while folder.exists() and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not folder.exists()
    assert c.get(f"/api/jobs/{jid}/download").status_code == 404
    assert c.get(f"/api/jobs/{jid}").json()["available"] is False
    t0 = time.monotonic()
    while c.get(f"/api/jobs/{jid}").status_code == 200 and time.monotonic() - t0 < 15:
        time.sleep(0.1)
    assert c.get(f"/api/jobs/{jid}").status_code == 404  # expired and forgotten


def test_server_stop_deletes_the_private_folder(make_client):
    c = make_client()
    r = c.post("/api/cloak", files={"file": ("x.png", png_bytes(), "image/png")})
    wait(c, r.json()["jobs"][0]["id"], done)
    root = c.service.root
    assert root.is_dir() and any(root.iterdir())
    c.__exit__(None, None, None)
    assert not root.exists()


def test_origin_and_host_are_checked(make_client):
    c = make_client()
    f = {"file": ("x.png", png_bytes(), "image/png")}
    assert c.get("/").status_code == 200
    # a foreign page posting to the app (CSRF), or fetching results
    r = c.post("/api/cloak", files=f, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "evil.example" in r.json()["error"]
    assert c.post("/api/cloak", files=f, headers={"origin": "null"}).status_code == 403
    assert c.get("/api/info", headers={"sec-fetch-site": "cross-site"}).status_code == 403
    # DNS rebinding: the attacker's name resolving to 127.0.0.1 still sends its own Host
    assert c.get("/", headers={"host": "evil.example"}).status_code == 403
    assert c.get("/api/info", headers={"host": "evil.example:8000"}).status_code == 403
    # the page itself: same origin
    ok = c.post("/api/cloak", files=f, headers={"origin": f"http://{HOST}", "sec-fetch-site": "same-origin"})
    assert ok.status_code == 202
    hosts = allowed_hosts_for("127.0.0.1", 8765)
    assert hosts == {"127.0.0.1:8765", "localhost:8765", "[::1]:8765"}
    assert "evil.example:8765" not in allowed_hosts_for("127.0.0.1", 8765)


def test_page_and_headers_reference_nothing_external(make_client):
    c = make_client()
    page = c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "http" not in csp
    texts = {"/": page.text}
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        if ref.startswith("/static/"):
            resp = c.get(ref)
            assert resp.status_code == 200, ref
            texts[ref] = resp.text
    assert {"/static/app.js", "/static/app.css"} <= set(texts)
    for path in STATIC.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_text()
    url = re.compile(r"(https?:|wss?:|ftp:)?//[\w.-]+\.[a-z]{2,}|@import|@font-face", re.I)
    for name, text in texts.items():
        assert not url.search(text), f"{name} references {url.search(text).group(0)}"
        for ref in re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)', text):
            assert ref.startswith(("/", "data:", "#")) or ref == "", f"{name}: {ref}"


def test_levels_are_the_cli_presets():
    from lowkey_jax import cli

    assert cli.LEVELS is jobs.LEVELS
    app = create_app(allowed_hosts={HOST}, cloak=Counterfeit())
    with TestClient(app, base_url=f"http://{HOST}") as c:
        assert c.get("/api/info").json()["levels"] == jobs.LEVELS
    from lowkey_jax import presets

    assert jobs.LEVELS is presets.LEVELS
    assert jobs.level_settings("high") == presets.LEVELS["high"]
    low = jobs.level_settings("low", steps=7)
    assert low["steps"] == 7 and low["alpha"] == presets.LEVELS["low"]["alpha"]
    assert low["epsilon"] == presets.LEVELS["low"]["epsilon"]
    with pytest.raises(ValueError, match="choose from low, mid, high"):
        jobs.level_settings("extreme")


def test_result_summary_lists_every_numeric_result_field():
    from lowkey_jax.attack import Result
    from lowkey_jax.face import Face

    # A Result with quality fields added later (whole-photo and per face) shows them too.
    Extended = dataclasses.make_dataclass(
        "Extended", [("face_ssim", list, dataclasses.field(default_factory=list)), ("face_psnr_db", float, 0.0)],
        bases=(Result,))
    face = Face(box=np.array([1.0, 2, 30, 40]), score=0.9, landmarks=np.zeros((5, 2)))
    r = Extended(image=np.zeros((8, 8, 3), np.uint8), faces=[face, face], no_face=False,
                 similarity={"dlib": [0.95, 0.5], "sface": [0.1, 0.2]}, lpips=0.1, psnr=float("inf"),
                 face_ssim=[0.9, 0.8], face_psnr_db=41.5)
    s = jobs.result_summary(r, {"dlib": 0.925, "sface": 0.451})
    assert s["quality"]["face_ssim"] == [0.9, 0.8] and s["quality"]["face_psnr_db"] == 41.5
    assert s["quality"]["lpips"] == 0.1 and s["quality"]["psnr"] is None  # inf -> null (JSON)
    assert "image" not in s["quality"] and "working_shape" not in s["quality"]
    assert s["recognizers"]["dlib"]["verdict"] == "would still match 1 of 2 faces"
    assert s["recognizers"]["sface"]["verdict"] == "would no longer match"
    assert s["recognizers"]["dlib"]["matched"] == [True, False]


def test_serve_help_teaches():
    from typer.testing import CliRunner

    from lowkey_jax import cli

    r = CliRunner().invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 0
    for word in ("--host", "127.0.0.1", "--port", "--no-browser", "8000"):
        assert word in r.output


SHARED = Path(os.environ.get("LOWKEY_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REAL_PHOTO = SHARED / "faces" / "celebs" / "img25.jpg"  # 400x400, one face
# The real attack, few steps: the e2e test (test_web_e2e.py) uses the same setting, so the
# compiled attack is shared within a pytest run.
REAL_LEVELS = {"low": {"steps": 3, "alpha": 0.10}}


@pytest.mark.slow
def test_real_cloak_of_a_real_photo(make_client):
    if not REAL_PHOTO.is_file():
        pytest.fail(f"missing {REAL_PHOTO}: set LOWKEY_SHARED")
    from lowkey_jax.attack import cloak as real_cloak

    stages = []

    def recorded(images, config, *, progress, stage):  # the real attack, stages noted
        return real_cloak(images, config, progress=progress, stage=lambda n: (stages.append(n), stage(n)))

    c = make_client(cloak=recorded, levels=REAL_LEVELS)
    data = REAL_PHOTO.read_bytes()
    r = c.post("/api/cloak", files={"file": ("img25.jpg", data, "image/jpeg")}, data={"level": "low"})
    assert r.status_code == 202, r.text
    jid = r.json()["jobs"][0]["id"]
    seen = set()

    def watch(j):
        seen.add((j["stage"], j["step"] if j["stage"] == "cloaking" else None))
        return done(j)

    j = wait(c, jid, watch, timeout=600)
    assert j["state"] == "cloaked", j
    res = j["result"]
    assert len(res["faces"]) == 1
    assert set(res["recognizers"]) == {"dlib", "facenet", "sface"}
    for name, rec in res["recognizers"].items():
        assert -1.0 <= rec["similarity"][0] < 1.0 and rec["threshold"] > 0
        assert rec["verdict"] in ("would no longer match", "would still match")
    assert 0 < res["quality"]["lpips"] < 0.5 and res["quality"]["psnr"] > 25
    assert any(s == "cloaking" for s, _ in seen)
    # attack.cloak's stage hook: detecting, then compiling (new shape) or cloaking, checking
    assert stages[0] == "detecting" and stages[1] in ("compiling", "cloaking") and stages[-1] == "checking", stages
    with Image.open(REAL_PHOTO) as im:
        rgb = np.asarray(im.convert("RGB"))
    again = []
    real_cloak([rgb], c.service.config("low"), stage=again.append, evaluate=False)
    assert again == ["detecting", "cloaking"]  # compiled above: no "compiling"; no check asked
    d = c.get(f"/api/jobs/{jid}/download")
    out = Image.open(io.BytesIO(d.content))
    with Image.open(REAL_PHOTO) as src:
        assert out.format == "JPEG" and out.size == src.size
        assert np.abs(np.asarray(out.convert("RGB"), np.int16) - np.asarray(src.convert("RGB"), np.int16)).max() > 0
