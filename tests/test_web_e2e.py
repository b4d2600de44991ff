"""End to end in a real browser: Playwright drives Debian's chromium against `lowkey-jax
serve`'s app running the real attack on a real photo.

The browser is /usr/bin/chromium (``apt-get install chromium``); Playwright never
downloads one (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1). Without it the test is skipped, except
under CI (``CI=true``, set by .ci/run, which installs chromium), where it fails.

The page is saved as ``web.png`` in the test's temporary folder, or where
``LOWKEY_WEB_SCREENSHOT`` points; then the real ``--level`` presets are used (how
docs/web.png is made: ``LOWKEY_WEB_SCREENSHOT=/tmp/web.png pytest tests/test_web_e2e.py``).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
CHROMIUM = Path("/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SHARED = Path(os.environ.get("LOWKEY_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PHOTO = SHARED / "faces" / "celebs" / "img25.jpg"  # 400x400, one face
# Few steps keep the test short on a CPU; the same setting as test_web.py's real cloak, so
# the compiled attack is shared within one pytest run.
LEVELS = {"low": {"steps": 3, "alpha": 0.10}}
if os.environ.get("LOWKEY_WEB_SCREENSHOT"):  # the README's picture: the real presets ("low": the subtle one)
    from lowkey_jax.jobs import LEVELS
GPS = 0x8825
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _need(ok: bool, why: str) -> None:
    if not ok:
        (pytest.fail if IN_CI else pytest.skip)(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    uvicorn = pytest.importorskip("uvicorn") if not IN_CI else __import__("uvicorn")
    from lowkey_jax.web.app import allowed_hosts_for, create_app

    port = _free_port()
    app = create_app(allowed_hosts=allowed_hosts_for("127.0.0.1", port), levels=LEVELS, root=tmp_path / "store")
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none", http="h11",
                            lifespan="on", proxy_headers=False, server_header=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not srv.started:
        assert thread.is_alive() and time.monotonic() - t0 < 30, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", app.service
    srv.should_exit = True
    thread.join(timeout=60)


@pytest.mark.slow
def test_browser_uploads_waits_for_the_verdict_and_downloads(server, tmp_path):
    _need(CHROMIUM.is_file(), f"{CHROMIUM} is missing: apt-get install chromium")
    _need(PHOTO.is_file(), f"missing {PHOTO}: set LOWKEY_SHARED")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed: pip install -e '.[test]'")
    url, service = server

    # The upload: a real photo, with GPS in its EXIF that must not survive.
    with Image.open(PHOTO) as im:
        src = im.convert("RGB")
    exif = Image.Exif()
    exif.get_ifd(GPS)[2] = (48.0, 51.0, 30.0)
    upload = tmp_path / "me.jpg"
    src.save(upload, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(upload) as im:
        assert GPS in im.getexif()
        original = np.asarray(im.convert("RGB"), np.int16)

    shot = Path(os.environ.get("LOWKEY_WEB_SCREENSHOT") or tmp_path / "web.png")
    profile = tmp_path / "chromium-profile"
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            accept_downloads=True, viewport={"width": 1120, "height": 900})
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("#levels input[value=low]")
            page.set_input_files("#files", str(upload))
            page.check("#levels input[value=low]")
            page.click("#go")
            page.wait_for_selector(".photo .state", timeout=30_000)
            page.wait_for_selector(".photo.done", timeout=600_000)
            state = page.inner_text(".photo .state")
            assert "cloaked" in state, f"{state}: {page.inner_text('.photo .error')}"
            page.wait_for_selector(".photo .verdict", timeout=10_000)
            verdicts = page.locator(".photo .verdict").all_inner_texts()
            assert len(verdicts) == 3 and all(v in ("would no longer match", "would still match") for v in verdicts)
            assert page.locator(".photo .faces .zoom").count() == 2  # one face: original | cloaked
            page.wait_for_function("() => [...document.querySelectorAll('.frame img')].every(i => i.complete && i.naturalWidth > 0)")
            page.fill(".slider", "35")
            page.dispatch_event(".slider", "input")
            page.screenshot(path=str(shot), full_page=True)
            with page.expect_download() as info:
                page.click(".photo .download")
            download = info.value
            assert download.suggested_filename == "me_cloaked.jpg"
            got = tmp_path / "downloaded.jpg"
            download.save_as(str(got))
            assert not errors, errors
        finally:
            ctx.close()

    with Image.open(got) as out:
        assert out.format == "JPEG" and out.size == src.size
        assert GPS not in out.getexif() and not out.getexif()
        cloaked = np.asarray(out.convert("RGB"), np.int16)
    assert np.abs(cloaked - original).max() > 0  # the cloak changed pixels
    assert np.abs(cloaked - original).mean() < 10  # ... and only slightly
    with Image.open(shot) as im:
        assert im.size[0] >= 1000
        if os.environ.get("LOWKEY_WEB_SCREENSHOT"):  # for the README: 256 colours, well under 300 KB
            small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    if os.environ.get("LOWKEY_WEB_SCREENSHOT"):
        small.save(shot, optimize=True)
    shutil.rmtree(profile, ignore_errors=True)
