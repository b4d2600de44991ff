"""The local web app: an ASGI (Starlette) front end over :mod:`lowkey_jax.jobs` and the attack.

Everything runs on the user's machine and nothing is fetched from elsewhere. The page
(``static/``) uploads photos to ``POST /api/cloak`` (multipart field ``file``, repeatable;
field ``level``), polls ``GET /api/jobs?batch=...`` for progress, shows the result and
downloads the cloaked photos one by one or as a zip.

Safety rules (all enforced here, tested in ``tests/test_web.py``):

- Host / Origin check: a request whose ``Host`` is not this server's (DNS rebinding) or
  whose ``Origin`` is foreign (a page the user visits trying to drive the app: CSRF) is
  refused with 403; ``/api/`` requests marked ``Sec-Fetch-Site: cross-site``/``same-site``
  too.
- Limits: bytes per file, pixels per photo, files per request, photos waiting in the queue;
  the request body must declare its length. A bad file gets its own clear message and the
  others go on. The type is decided by content, never by name.
- Storage: uploads and outputs live in a private (0700) temporary folder, one sub-folder per
  photo, deleted a short while after the photo is downloaded, after expiry, or when the
  server stops.
- One attack at a time: a single worker thread takes photos from a queue, so two tabs
  cannot run two attacks and exhaust memory.

The worker reads with :func:`lowkey_jax.imageio.read_image`, cloaks with the injected
``cloak`` (default :func:`lowkey_jax.attack.cloak`) and writes with
:func:`lowkey_jax.jobs.store_result`, exactly as the CLI does.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import re
import secrets
import shutil
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from lowkey_jax import jobs as _jobs
from lowkey_jax._version import __version__
from lowkey_jax.imageio import ImageError, read_image, sniff_format, write_image

__all__ = ["Limits", "Service", "create_app", "allowed_hosts_for"]

STATIC = Path(__file__).parent / "static"

# Formats the page can show side by side (the output keeps JPEG/WebP, the rest become PNG).
_VIEW_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}

_SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
     b"connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one server accepts.

    Attributes:
      max_file_bytes: largest upload per photo, bytes.
      max_pixels: largest photo, width x height (checked from the header, then on decoding).
      max_files: photos per request.
      max_queued: photos waiting or running at once; more are refused with 429.
      expire_s: a finished photo's files are deleted this long after it finished.
      after_download_s: ... or this long after its first download, whichever comes first.
    """

    max_file_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_files: int = 20
    max_queued: int = 50
    expire_s: float = 30 * 60
    after_download_s: float = 5 * 60


class Cancelled(Exception):
    """Raised from the progress callbacks to stop a running attack."""


@dataclasses.dataclass
class WebJob:
    """One uploaded photo and its state, as the page sees it."""

    id: str
    batch: str
    name: str
    level: str
    folder: Path
    job: _jobs.Job
    state: str = "queued"  # queued | running | cloaked | no_face | failed | cancelled
    stage: str | None = None  # detecting | compiling | cloaking | checking | writing
    step: int = 0
    total: int = 0
    error: str | None = None
    summary: dict | None = None
    size: tuple[int, int] | None = None
    created: float = dataclasses.field(default_factory=time.monotonic)
    finished: float | None = None
    downloaded: float | None = None
    deleted: bool = False
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.state not in ("queued", "running")

    def output_name(self) -> str | None:
        return self.job.output.name if self.job.output is not None else None

    def public(self, queue_position: int | None = None) -> dict:
        return _jobs.jsonable({
            "id": self.id, "batch": self.batch, "name": self.name, "level": self.level,
            "state": self.state, "stage": self.stage, "step": self.step, "total": self.total,
            "queue_position": queue_position, "error": self.error, "size": self.size,
            "output": self.output_name() if self.state == "cloaked" else None,
            "available": self.state == "cloaked" and not self.deleted,
            "result": self.summary,
        })


def _safe_name(filename: str | None) -> str:
    """A harmless file name from an uploaded one (no folders, no control characters)."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = re.sub(r"[^\w.\- ]", "_", base).strip(" .")[:120]
    return base or "photo"


class Service:
    """The queue, the worker thread and the private storage behind the app."""

    def __init__(self, *, cloak: Callable | None = None, levels: dict | None = None,
                 limits: Limits | None = None, root: Path | None = None,
                 thresholds: dict[str, float] | None = None):
        self.limits = limits or Limits()
        self.levels = dict(levels or _jobs.LEVELS)
        self._cloak = cloak
        self._thresholds = thresholds
        self._root_given = root
        self.root: Path | None = None
        self.jobs: dict[str, WebJob] = {}
        self.queue: collections.deque[WebJob] = collections.deque()
        self.cond = threading.Condition()
        self.current: WebJob | None = None
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- lifecycle
    def start(self) -> None:
        if self._root_given is not None:
            self._root_given.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix="lowkey-web-", dir=self._root_given))
        else:
            self.root = Path(tempfile.mkdtemp(prefix="lowkey-web-"))  # mode 0700
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="lowkey-web-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            for j in self.jobs.values():
                j.cancel.set()
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    # ---- the attack (lazy imports: the page comes up before JAX loads)
    def cloak(self, images, config, progress, stage):
        if self._cloak is not None:
            return self._cloak(images, config, progress=progress, stage=stage)
        from lowkey_jax.attack import cloak

        return cloak(images, config, progress=progress, stage=stage)

    def thresholds(self) -> dict[str, float]:
        if self._thresholds is None:
            from lowkey_jax.pipeline import thresholds

            self._thresholds = thresholds()
        return self._thresholds

    def config(self, level: str):
        from lowkey_jax.attack import Config

        return Config(**_jobs.level_settings(level, levels=self.levels))

    # ---- submitting
    def add(self, batch: str, filename: str | None, data: bytes, level: str) -> WebJob:
        """Store one upload privately and queue it, or record why it was refused."""
        name = _safe_name(filename)
        jid = secrets.token_urlsafe(12)
        folder = self.root / jid
        (folder / "in").mkdir(parents=True, mode=0o700)
        (folder / "out").mkdir(mode=0o700)
        path = folder / "in" / name
        wj = WebJob(id=jid, batch=batch, name=name, level=level, folder=folder,
                    job=_jobs.Job(input=path, out_dir=folder / "out"))
        error = self._check(path, name, data)
        if error is None:
            _jobs.plan(wj.job, "same", False, {})
            if wj.job.status != "pending":
                error = wj.job.reason
        with self.cond:
            self.jobs[jid] = wj
            if error is not None:
                wj.state, wj.error, wj.finished = "failed", error, time.monotonic()
                self._delete_files(wj)
            else:
                self.queue.append(wj)
                self.cond.notify_all()
        return wj

    def _check(self, path: Path, name: str, data: bytes) -> str | None:
        lim = self.limits
        if not data:
            return "the file is empty"
        if len(data) > lim.max_file_bytes:
            return f"the file is {len(data) / 2**20:.1f} MiB; the limit is {lim.max_file_bytes / 2**20:.0f} MiB per photo"
        path.write_bytes(data)
        path.chmod(0o600)
        fmt = sniff_format(path)  # by content, whatever the name says
        if fmt is None:
            return "not a photo this app can read (JPEG, PNG, WebP, TIFF, ...); the type is taken from the content, not the name"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    w, h = im.size
        except Image.DecompressionBombError:
            return f"the image has too many pixels; the limit is {lim.max_pixels / 1e6:.0f} megapixels"
        except Exception as e:  # noqa: BLE001 - reported to the user
            return f"cannot read the image header ({type(e).__name__})"
        if w * h > lim.max_pixels:
            return f"the image is {w}x{h} ({w * h / 1e6:.1f} megapixels); the limit is {lim.max_pixels / 1e6:.0f} megapixels"
        return None

    def queue_position(self, wj: WebJob) -> int | None:
        if wj.state != "queued":
            return None
        try:
            return list(self.queue).index(wj) + 1
        except ValueError:
            return None

    def cancel(self, wj: WebJob) -> None:
        with self.cond:
            wj.cancel.set()
            if wj.state == "queued":
                try:
                    self.queue.remove(wj)
                except ValueError:
                    pass
                wj.state, wj.stage, wj.finished = "cancelled", None, time.monotonic()
                self._delete_files(wj)
            self.cond.notify_all()

    def mark_downloaded(self, wj: WebJob) -> None:
        if wj.downloaded is None:
            wj.downloaded = time.monotonic()
        with self.cond:
            self.cond.notify_all()

    # ---- the worker
    def _work(self) -> None:
        while True:
            with self.cond:
                while not self._stop and not self.queue:
                    self._sweep()
                    self.cond.wait(timeout=1.0)
                if self._stop:
                    return
                wj = self.queue.popleft()
                self.current = wj
                wj.state = "running"
            try:
                self._run(wj)
            finally:
                with self.cond:
                    self.current = None
                    wj.finished = time.monotonic()
                    if wj.state != "cloaked":
                        self._delete_files(wj)
                    self._sweep()

    def _run(self, wj: WebJob) -> None:
        def check():
            if wj.cancel.is_set():
                raise Cancelled

        def stage(name: str) -> None:
            check()
            wj.stage = name
            if name in ("compiling", "cloaking"):
                wj.step = 0

        def progress(step: int, total: int) -> None:
            check()
            wj.stage, wj.step, wj.total = "cloaking", int(step), int(total)

        try:
            wj.stage = "reading"
            loaded = read_image(wj.job.input, max_pixels=self.limits.max_pixels)
            wj.size = loaded.size
            wj.job.size, wj.job.format = loaded.size, loaded.format
            config = self.config(wj.level)
            wj.total = int(config.steps)
            check()
            (result,) = self.cloak([loaded.rgb], config, progress, stage)
            check()
            wj.stage = "writing"
            _jobs.store_result(wj.job, loaded, result, "same", 95, False, False)
            if wj.job.status == "cloaked":
                # The "before" picture: the same pixels path as the output (upright, no
                # metadata, same format), so the comparison shows only the cloak.
                view = wj.folder / ("original" + wj.job.output.suffix.lower())
                write_image(view, loaded.rgb, alpha=loaded.alpha, format="same", source_format=loaded.format,
                            quality=95, icc_profile=loaded.icc_profile)
            wj.summary = _jobs.result_summary(result, self.thresholds())
            wj.state = {"cloaked": "cloaked", "no_face": "no_face"}.get(wj.job.status, "failed")
            if wj.state == "no_face":
                wj.error = "no face found in this photo; nothing to cloak"
            elif wj.state == "failed":
                wj.error = wj.job.reason
        except Cancelled:
            wj.state, wj.error = "cancelled", None
        except ImageError as e:
            wj.state, wj.error = "failed", e.reason  # the reason only: no private paths
        except Exception as e:  # noqa: BLE001 - one photo's failure never stops the server
            if wj.cancel.is_set():  # raised through the compiled loop by a cancel
                wj.state, wj.error = "cancelled", None
            else:
                first = (str(e).strip().splitlines() or [""])[0][:300]
                wj.state, wj.error = "failed", f"cloaking failed ({type(e).__name__}: {first})"
        wj.stage = None

    # ---- storage
    def _delete_files(self, wj: WebJob) -> None:
        shutil.rmtree(wj.folder, ignore_errors=True)
        wj.deleted = True

    def _sweep(self) -> None:
        """Delete expired or downloaded photos (call with the lock held)."""
        now = time.monotonic()
        lim = self.limits
        for jid, wj in list(self.jobs.items()):
            if not wj.done or wj.finished is None:
                continue
            if wj.downloaded is not None and now - wj.downloaded >= lim.after_download_s:
                self._delete_files(wj)
            if now - wj.finished >= lim.expire_s:
                self._delete_files(wj)
                del self.jobs[jid]

    def files(self, wj: WebJob) -> tuple[Path, Path] | None:
        """(original view, cloaked output) while they exist."""
        if wj.state != "cloaked" or wj.deleted or wj.job.output is None:
            return None
        view = wj.folder / ("original" + wj.job.output.suffix.lower())
        if not (view.is_file() and wj.job.output.is_file()):
            return None
        return view, wj.job.output


# --------------------------------------------------------------------------------------------
# Host / Origin check


def allowed_hosts_for(host: str, port: int) -> set[str]:
    """Host header values this server answers to when bound to ``host:port``."""
    names = {host, "localhost", "127.0.0.1", "[::1]"} if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::") else {host}
    names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
    out = {f"{n}:{port}" for n in names}
    if port == 80:
        out |= names
    return {h.lower() for h in out}


class OriginGuard:
    """ASGI middleware: refuse requests from other hosts and origins (403).

    - ``Host`` must be one of ``allowed`` (DNS rebinding: an attacker's name resolving to
      127.0.0.1 still sends the attacker's name).
    - ``Origin``, when sent, must be ``http://<allowed host>`` (a foreign page's fetch or
      form post carries its own origin; ``null`` is refused too).
    - ``/api/`` requests must not be marked ``Sec-Fetch-Site`` ``cross-site`` or
      ``same-site``.
    """

    def __init__(self, app: ASGIApp, allowed: set[str]):
        self.app = app
        self.allowed = {h.lower() for h in allowed}
        self.origins = {f"http://{h}" for h in self.allowed}

    def refusal(self, scope: Scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "").strip().lower()
        if host not in self.allowed:
            return f"refused: Host {host or '(none)'} is not this server"
        origin = headers.get("origin")
        if origin is not None and origin.strip().lower() not in self.origins:
            return f"refused: requests from {origin} are not accepted"
        site = headers.get("sec-fetch-site", "").lower()
        if scope["path"].startswith("/api/") and site in ("cross-site", "same-site"):
            return "refused: cross-site request"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            why = self.refusal(scope)
            if why is not None:
                await JSONResponse({"error": why}, status_code=403)(scope, receive, send)
                return

            async def send_with_headers(message):
                if message["type"] == "http.response.start":
                    message.setdefault("headers", [])
                    message["headers"] = list(message["headers"]) + _SECURITY_HEADERS
                    if scope["path"].startswith("/api/"):
                        message["headers"].append((b"cache-control", b"no-store"))
                await send(message)

            await self.app(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------------------------
# the app


def create_app(*, allowed_hosts: set[str], cloak: Callable | None = None, levels: dict | None = None,
               limits: Limits | None = None, root: Path | None = None,
               thresholds: dict[str, float] | None = None) -> ASGIApp:
    """The ASGI app.

    Args:
      allowed_hosts: ``Host`` values to answer (see :func:`allowed_hosts_for`).
      cloak: ``cloak(images, config, progress=, stage=) -> [Result]``; default
        :func:`lowkey_jax.attack.cloak`. Tests inject cheaper ones.
      levels: the level presets (default: the CLI's ``--level`` table).
      limits: upload and storage limits.
      root: parent of the private temporary folder (default: the system's).
      thresholds: per-recogniser thresholds (default: :func:`lowkey_jax.pipeline.thresholds`).
    """
    service = Service(cloak=cloak, levels=levels, limits=limits, root=root, thresholds=thresholds)
    lim = service.limits

    def err(msg: str, status: int) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    def get_job(request: Request) -> WebJob | None:
        return service.jobs.get(request.path_params["job"])

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def info(request: Request) -> Response:
        return JSONResponse({
            "version": __version__,
            "levels": service.levels,
            "default_level": "mid" if "mid" in service.levels else next(iter(service.levels)),
            "limits": dataclasses.asdict(lim),
        })

    async def upload(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is None:
            return err("the request must declare its Content-Length", 411)
        budget = lim.max_files * (lim.max_file_bytes + 16384) + 65536
        if not length.isdigit() or int(length) > budget:
            return err(f"request too large: at most {lim.max_files} photos of {lim.max_file_bytes / 2**20:.0f} MiB each", 413)
        try:
            form = await request.form(max_files=lim.max_files + 1, max_fields=10)
        except Exception as e:  # noqa: BLE001 - a malformed body is the client's error
            if "too many files" in str(getattr(e, "detail", e)).lower():
                return err(f"too many files: at most {lim.max_files} per request", 413)
            return err(f"cannot read the upload ({getattr(e, 'detail', None) or type(e).__name__}): send multipart/form-data with field 'file'", 400)
        try:
            files = [f for f in form.getlist("file") if hasattr(f, "read")]
            if not files:
                return err("no photo: send one or more files in the multipart field 'file'", 400)
            if len(files) > lim.max_files:
                return err(f"too many files: at most {lim.max_files} per request", 413)
            level = str(form.get("level") or "mid")
            if level not in service.levels:
                return err(f"unknown level {level!r}; choose from {', '.join(service.levels)}", 400)
            with service.cond:
                waiting = len(service.queue) + (service.current is not None)
            if waiting + len(files) > lim.max_queued:
                return err(f"busy: {waiting} photos are waiting; try again when they are done", 429)
            batch = secrets.token_urlsafe(9)
            out = []
            for f in files:
                data = await f.read(lim.max_file_bytes + 1)  # one byte more tells "too large"
                wj = await run_in_threadpool(service.add, batch, f.filename, data, level)
                out.append(wj.public(service.queue_position(wj)))
        finally:
            await form.close()
        accepted = any(j["state"] != "failed" for j in out)
        return JSONResponse({"batch": batch, "jobs": out}, status_code=202 if accepted else 422)

    async def list_jobs(request: Request) -> Response:
        batch = request.query_params.get("batch")
        if not batch:
            return err("give ?batch=<id>", 400)
        with service.cond:
            service._sweep()  # also while the worker is busy with a long attack
            items = [j.public(service.queue_position(j)) for j in service.jobs.values() if j.batch == batch]
        return JSONResponse({"batch": batch, "jobs": items})

    async def job_status(request: Request) -> Response:
        wj = get_job(request)
        if wj is None:
            return err("no such photo (finished photos are deleted after download or expiry)", 404)
        with service.cond:
            return JSONResponse(wj.public(service.queue_position(wj)))

    async def cancel(request: Request) -> Response:
        wj = get_job(request)
        if wj is None:
            return err("no such photo", 404)
        service.cancel(wj)
        return JSONResponse(wj.public())

    async def image_response(request: Request, which: str, attachment: bool) -> Response:
        wj = get_job(request)
        files = service.files(wj) if wj is not None else None
        data = None
        if files is not None:
            path = files[0] if which == "original" else files[1]
            try:  # read into memory: the file may be deleted right after this download
                data = await run_in_threadpool(path.read_bytes)
            except FileNotFoundError:
                data = None
        if data is None:
            return err("not available: not cloaked (yet), or already deleted after download or expiry", 404)
        media = _VIEW_TYPES.get(path.suffix.lower(), "application/octet-stream")
        headers = {}
        if attachment:
            service.mark_downloaded(wj)
            name = wj.output_name() or "cloaked"
            ascii_name = name.encode("ascii", "replace").decode().replace("?", "_")
            headers["content-disposition"] = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"
        return Response(data, media_type=media, headers=headers)

    async def original(request: Request) -> Response:
        return await image_response(request, "original", False)

    async def cloaked(request: Request) -> Response:
        return await image_response(request, "cloaked", False)

    async def download(request: Request) -> Response:
        return await image_response(request, "cloaked", True)

    async def zip_batch(request: Request) -> Response:
        """The cloaked photos of one batch (``/api/batches/{batch}/zip``) or of several
        (``/api/zip?batch=a&batch=b``) as one zip."""
        batches = {request.path_params["batch"]} if "batch" in request.path_params else set(request.query_params.getlist("batch"))
        with service.cond:
            members = [j for j in service.jobs.values() if j.batch in batches]
        ready = [(j, service.files(j)) for j in members]
        ready = [(j, f[1]) for j, f in ready if f is not None]
        if not ready:
            return err("nothing to download in this batch (yet)", 404)

        def build() -> bytes:  # in memory: the files may be deleted right after this download
            buf = io.BytesIO()
            used: set[str] = set()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # photos are compressed already
                for j, path in ready:
                    name, k = path.name, 1
                    while name.lower() in used:
                        k += 1
                        name = f"{path.stem}-{k}{path.suffix}"
                    used.add(name.lower())
                    try:
                        z.write(path, name)
                    except FileNotFoundError:  # deleted (expired) meanwhile
                        continue
            return buf.getvalue()

        data = await run_in_threadpool(build)
        for j, _ in ready:
            service.mark_downloaded(j)
        return Response(data, media_type="application/zip",
                        headers={"content-disposition": 'attachment; filename="lowkey-cloaked.zip"'})

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/cloak", upload, methods=["POST"]),
        Route("/api/jobs", list_jobs),
        Route("/api/jobs/{job}", job_status),
        Route("/api/jobs/{job}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job}/original", original),
        Route("/api/jobs/{job}/cloaked", cloaked),
        Route("/api/jobs/{job}/download", download),
        Route("/api/batches/{batch}/zip", zip_batch),
        Route("/api/zip", zip_batch),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    guarded = OriginGuard(app, allowed_hosts)
    guarded.service = service  # for tests and serve()
    return guarded
