"""The HTTP API and the web page over :class:`faceattrs.FaceAnalyzer` (FastAPI + uvicorn).

    faceattrs serve --model runs/cpu            # then open http://127.0.0.1:8000/

``POST /analyze`` takes one or more images (multipart upload, or the raw bytes with an
``image/*`` type) and answers the records of ``faceattrs predict`` per image;
``?explain=1`` adds a Grad-CAM overlay per face as PNG data. ``GET /health``,
``GET /model``, ``GET /`` (the page), ``GET /docs`` (the OpenAPI docs).

How a request goes: the body is counted as it arrives and refused (413) as soon as it
passes the upload limit (or at once from its ``Content-Length``); each image's header is
checked (type, pixel count) before any pixel is decoded; the request then waits in a
bounded asyncio queue (full: 503 with ``Retry-After``). One model thread takes the waiting
requests together, up to ``batch_images`` images, and runs them through the analyzer as
one batch (decoding and detection in the analyzer's two photo threads), so the event loop
never runs a model and requests never share mutable state. Errors are JSON
``{"error": message}``; no input leaks a stack trace.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import functools
import io
import json
import logging
import os
import socket
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .exceptions import FaceattrsError
from .lifeline import exit_with_parent
from .photo import MAX_PIXELS, PhotoConfig

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "assets" / "web"
MB = 1024 * 1024
# Content types taken as images (the formats docs/photos.md lists); "" and
# application/octet-stream are sniffed from the bytes.
IMAGE_TYPES = {
    f"image/{s}"
    for s in ("jpeg", "jpg", "pjpeg", "png", "webp", "bmp", "x-bmp", "x-ms-bmp", "tiff", "gif")
}
SNIFFED_TYPES = {"", "application/octet-stream"}
SUPPORTED = "JPEG, PNG, WebP, BMP, TIFF or GIF"
HOW_TO_SEND = (
    f"send multipart/form-data with image files, or the image itself with its image/* type "
    f"({SUPPORTED})"
)
PARENT_ENV = "FACEATTRS_SERVE_PARENT"  # serve --workers N: the pid the workers end with
TRIM_PIXELS = 4_000_000  # after a batch with more pixels, give freed memory back (glibc)


@dataclass
class ServeConfig:
    model: str | None = None  # run folder; None = the model bundled in the package
    max_upload_bytes: int = 10 * MB  # refuse request bodies over this (413)
    max_pixels: int = MAX_PIXELS  # refuse images with more pixels than this (413)
    max_images: int = 16  # images in one request
    queue_size: int = 32  # requests waiting for the model; more -> 503
    batch_images: int = 8  # images the model thread takes together from the queue
    batch_pixels: int = 16_000_000  # images decoded together hold at most this (or one image)
    retry_after: int = 1  # seconds, sent with a 503
    device: str = "cpu"
    dtype: str = "fp32"  # or bf16 (torch autocast), int8 (an int8 ONNX export, onnxruntime)
    threads: int | None = None  # CPU threads of the models (default: FaceAnalyzer's streams)
    photo: dict = field(default_factory=dict)  # other PhotoConfig fields

    def check(self) -> None:
        """One line naming the command-line option (the setting's name for the API)."""
        for name, flag in (
            ("max_upload_bytes", "--max-upload-mb"),
            ("max_images", "--max-images"),
            ("queue_size", "--queue"),
            ("batch_images", "--batch-images"),
            ("batch_pixels", "batch_pixels"),
        ):
            if getattr(self, name) < 1:
                raise FaceattrsError(f"{flag} must be at least 1, got {getattr(self, name)}")
        for name, flag in (("max_pixels", "--max-pixels"), ("retry_after", "retry_after")):
            if getattr(self, name) < 0:
                raise FaceattrsError(f"{flag} must not be negative, got {getattr(self, name)}")
        if self.dtype not in ("fp32", "bf16", "int8"):
            raise FaceattrsError(f"--dtype must be fp32, bf16 or int8, got {self.dtype!r}")
        if self.dtype == "int8" and str(self.device) != "cpu":
            raise FaceattrsError("--dtype int8 runs on the CPU (onnxruntime): leave out --device")

    @property
    def backend(self) -> str:
        """int8 runs on onnxruntime, the rest on PyTorch."""
        return "onnx" if self.dtype == "int8" else "torch"


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass
class Upload:
    name: str
    content_type: str
    data: bytes
    pixels: int = 0  # width x height from the header (check_upload)


# ---------------------------------------------------------------- request body limit


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is refused with 413, never held in memory.

    The bytes are counted as the app reads them; past the limit, reading goes on only to
    discard at most ``drain_bytes`` more (for at most ``drain_seconds``), so that a client
    still sending a body a little over the limit gets the 413 rather than a reset
    connection (nginx's lingering close does the same); then the answer goes out and the
    connection closes, the rest unread. A declared ``Content-Length`` over the limit is
    answered at once (its body drained first only when within ``drain_bytes`` of the limit).
    """

    def __init__(self, app, max_bytes: int, drain_bytes: int | None = None, drain_seconds=5.0):
        self.app, self.max_bytes = app, max_bytes
        self.drain_bytes = max_bytes if drain_bytes is None else drain_bytes
        self.drain_seconds = drain_seconds

    def message(self) -> str:
        return f"upload too large: over the limit of {self.max_bytes / MB:g} MB"

    async def drain(self, receive, budget: int) -> None:
        """Read and drop what follows, up to ``budget`` bytes / ``drain_seconds``."""

        async def loop():
            dropped = 0
            while dropped < budget:
                msg = await receive()
                if msg["type"] != "http.request" or not msg.get("more_body"):
                    return
                dropped += len(msg.get("body", b""))

        try:
            await asyncio.wait_for(loop(), self.drain_seconds)
        except TimeoutError:
            pass

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= self.max_bytes + self.drain_bytes:
                await self.drain(receive, int(declared))
            response = JSONResponse({"error": self.message()}, 413, {"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    if msg.get("more_body"):
                        await self.drain(receive, self.drain_bytes)
                    raise ApiError(413, self.message(), {"Connection": "close"})
            return msg

        await self.app(scope, counted, send)


class CountRejected:
    """ASGI middleware: counts in ``stats["rejected"]`` every ``POST /analyze`` answered with a
    refusal: any 4xx (bad input, over a limit, unsupported type), 501 or 503 (queue full),
    including the 413s the :class:`BodyLimit` inside it answers itself. A 500 (a bug) is not
    a refusal."""

    def __init__(self, app, stats: dict, path: str = "/analyze"):
        self.app, self.stats, self.path = app, stats, path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            return await self.app(scope, receive, send)

        async def counting_send(msg):
            if msg["type"] == "http.response.start" and refused(msg["status"]):
                self.stats["rejected"] += 1
            await send(msg)

        await self.app(scope, receive, counting_send)


def refused(status: int) -> bool:
    return 400 <= status < 500 or status in (501, 503)


# ---------------------------------------------------------------- reading and checking


async def read_uploads(request: Request, cfg: ServeConfig) -> list[Upload]:
    """The images of a request: multipart files, or the raw body with an image type."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form(max_files=cfg.max_images, max_fields=100)
        uploads = []
        for _, value in form.multi_items():
            if isinstance(value, str):
                continue
            data = await value.read()
            name = (value.filename or "upload")[:200]
            uploads.append(Upload(name, value.content_type or "", data))
            await value.close()
        if not uploads:
            raise ApiError(400, "no image in the upload: send files in a multipart field")
        return uploads
    if media == "application/octet-stream" or media.startswith("image/"):
        name = (request.query_params.get("name") or "upload")[:200]
        return [Upload(name, media, await request.body())]
    if not await has_body(request):
        raise ApiError(400, f"no image in the request (empty body): {HOW_TO_SEND}")
    what = f"unsupported content type {media!r}" if media else "no Content-Type header"
    raise ApiError(415, f"{what}: {HOW_TO_SEND}")


async def has_body(request: Request) -> bool:
    """Whether the body has a byte: read up to its first non-empty chunk, no further."""
    async for chunk in request.stream():
        if chunk:
            return True
    return False


def check_upload(up: Upload, max_pixels: int) -> tuple[int, int]:
    """Type, emptiness and pixel count from the header, before any pixel is decoded."""
    ctype = up.content_type.split(";")[0].strip().lower()
    if ctype not in IMAGE_TYPES and ctype not in SNIFFED_TYPES:
        raise ApiError(415, f"{up.name}: type {ctype!r} is not supported: send {SUPPORTED}")
    if not up.data:
        raise ApiError(400, f"{up.name}: empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(up.data)) as im:
                w, h = im.size
        except UnidentifiedImageError:
            raise ApiError(
                400, f"{up.name}: not an image (or a format Pillow cannot read)"
            ) from None
        except Image.DecompressionBombError:
            raise ApiError(
                413, f"{up.name}: too many pixels (a decompression-bomb guard)"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ApiError(400, f"{up.name}: truncated or corrupt image ({e})") from None
    if max_pixels and w * h > max_pixels:
        raise ApiError(
            413,
            f"{up.name}: {w}x{h} is {w * h / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:g} megapixels",
        )
    up.pixels = w * h
    return w, h


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``).

    Decoding a large photo allocates and frees tens of MB in several threads; glibc keeps
    freed memory in per-thread arenas, so without this the resident size creeps up with
    each large upload (measured in docs/serve.md) although nothing is leaked."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def png_data(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)  # 2x faster than 6
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------- the model thread


@dataclass
class Job:
    uploads: list[Upload]
    explain: bool
    future: asyncio.Future


class ModelWorker:
    """A bounded queue of requests and one thread that runs the models on them.

    ``submit`` raises a 503 :class:`ApiError` when ``queue_size`` requests already wait.
    The thread takes waiting requests together up to ``batch_images`` images (a request
    with more is taken alone) and analyses them in one :meth:`FaceAnalyzer.run`.
    """

    def __init__(self, analyzer, cfg: ServeConfig):
        self.analyzer, self.cfg = analyzer, cfg
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self._carry: Job | None = None  # taken from the queue, did not fit the last batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="faceattrs-model")
        self.explainer = None
        self._to_explain: list[tuple[dict, np.ndarray]] = []  # (record, 48x48 crop)
        # requests, images and faces analysed, in batches; rejected: POST /analyze refused
        # (4xx, 501, 503: counted by CountRejected); busy: the 503s of a full queue among them
        self.stats = {
            "requests": 0,
            "batches": 0,
            "images": 0,
            "faces": 0,
            "rejected": 0,
            "busy": 0,
        }

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.queue = asyncio.Queue(self.cfg.queue_size)
            self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    def waiting(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, uploads: list[Upload], explain: bool) -> list[dict]:
        self.start()
        job = Job(uploads, explain, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.stats["busy"] += 1
            raise ApiError(
                503,
                f"busy: {self.cfg.queue_size} requests are waiting; retry in "
                f"{self.cfg.retry_after} s",
                {"Retry-After": str(self.cfg.retry_after)},
            ) from None
        return await job.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [self._carry or await self.queue.get()]
            self._carry, n = None, len(jobs[0].uploads)
            while not self.queue.empty():
                nxt = self.queue.get_nowait()
                if n + len(nxt.uploads) > self.cfg.batch_images:
                    self._carry = nxt  # the first of the next batch
                    break
                jobs.append(nxt)
                n += len(nxt.uploads)
            jobs = [j for j in jobs if not j.future.done()]  # the client went away
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.process, jobs)
            except Exception as e:  # a bug, not bad input: logged, answered as 500
                log.exception("analysis failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(
                            ApiError(500, f"internal error ({type(e).__name__})")
                        )
                continue
            for j, res in zip(jobs, results, strict=True):
                if not j.future.done():
                    j.future.set_result(res)

    def process(self, jobs: list[Job]) -> list[list[dict]]:
        """In the model thread: per job, per image ``{"faces": [...], "reason"|"error"}``.

        The images go through the analyzer in runs of at most ``batch_pixels`` pixels (at
        least one image), which bounds the decoded pixels held at once."""
        uploads = [u for j in jobs for u in j.uploads]
        items, run, pixels = [], [], 0
        for i, up in enumerate(uploads):
            run.append(up.data)
            pixels += up.pixels
            nxt = uploads[i + 1].pixels if i + 1 < len(uploads) else None
            if nxt is None or pixels + nxt > self.cfg.batch_pixels:
                for item in self.analyzer.run(run, keep_images=True):
                    decoded, item.image = item.image is not None, None
                    items.append((item, decoded))
                run, pixels = [], 0
        if sum(u.pixels for u in uploads) > TRIM_PIXELS:
            release_memory()
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["images"] += len(uploads)
        out, k, self._to_explain = [], 0, []
        for job in jobs:
            res = []
            for up in job.uploads:
                item, decoded = items[k]
                k += 1
                res.append(self._image_result(up, item, decoded, job.explain))
            out.append(res)
        if self._to_explain:  # the faces of every request that asked, in one Grad-CAM batch
            recs = [r for r, _ in self._to_explain]
            crops = np.stack([c for _, c in self._to_explain])
            for rec, overlay in zip(recs, self._explainer().overlays(crops, recs), strict=True):
                rec["explain"] = png_data(overlay)
        return out

    def _image_result(self, up: Upload, item, decoded: bool, explain: bool) -> dict:
        if item.error is not None and not decoded:  # truncated or corrupt: caught late
            msg = item.error.removeprefix("data: ").removeprefix("data").lstrip(": ")
            return {"file": up.name, "error": msg}
        if item.error is not None:
            reason = item.error.removeprefix("data: ").removeprefix("image: ")
            return {"file": up.name, "faces": [], "reason": reason}
        faces = []
        for rec in item.records:
            rec = {k: v for k, v in rec.items() if k != "image"}
            rec["file"] = up.name
            faces.append(rec)
        self.stats["faces"] += len(faces)
        if explain:
            self._to_explain += [
                (rec, face.crop) for rec, face in zip(faces, item.faces, strict=True)
            ]
        return {"file": up.name, "faces": faces}

    def _explainer(self):
        if self.explainer is None:
            from .predict_files import Explainer

            self.explainer = Explainer(self.analyzer.models)
        return self.explainer


# ---------------------------------------------------------------- model description


def model_info(analyzer, cfg: ServeConfig) -> dict:
    """Heads and classes, age bins, provenance and recorded metrics of the loaded model.

    ``checkpoint`` and ``metrics`` are what the model folder records: for one network,
    ``best.json``'s epoch, score and validation accuracy / macro-F1 per head; for an
    ensemble (``faceattrs ensemble``), each member's epoch and score, the whole validation
    split's mean macro-F1 (``calibration.json``) and the packaging check (``provenance.json``).
    For an ONNX export, those of the run folder it was exported from, when it is here.
    ``licence``: the terms a model folder records (``provenance.json``; the bundled models:
    non-commercial research only, as their training faces), else None."""
    from .bundle import json_or_none, recorded_figures  # the model is loaded: torch is in

    models = analyzer.models
    bundle = getattr(models, "bundle", None)
    source = bundle.source if bundle is not None else getattr(models, "source", None)
    if source is not None:
        source = Path(source).resolve()  # an export's "../run" is relative to the export
    meta = _checkpoint_meta(models, bundle)
    info = {
        "faceattrs": __version__,
        "source": str(source) if source is not None else cfg.model,
        "backend": analyzer.backend,
        "dtype": getattr(analyzer.models, "precision", None) or cfg.dtype,
        "heads": {h: list(n) for h, n in models.class_names.items()},
        "input": analyzer.input.to_dict(),  # the faces the model takes (its input contract)
        "temperatures": dict(getattr(models, "temperatures", {}) or {}),
        "age": {"bins": list(models.bin_labels)} if models.bin_labels else None,
        "checkpoint": _checkpoint(meta),
        "metrics": {"validation": _head_metrics(meta.get("val") or {})},
        "limits": {
            "max_upload_bytes": cfg.max_upload_bytes,
            "max_pixels": cfg.max_pixels,
            "max_images": cfg.max_images,
            "queue_size": cfg.queue_size,
        },
    }
    info["licence"] = None
    if source is not None:
        info["licence"] = (json_or_none(source / "provenance.json") or {}).get("licence")
        if not info["metrics"]["validation"]:  # none in best.json: an ensemble
            info["metrics"].update(recorded_figures(source))
        m = json_or_none(source / "eval" / "metrics.json")
        if m:
            test = info["metrics"]["test"] = {"split": m.get("split"), "n": m.get("n")}
            test.update(_head_metrics(m))
            if isinstance(m.get("age"), dict) and "mae" in m["age"]:
                test["age_mae"] = m["age"]["mae"]
    return info


def _checkpoint_meta(models, bundle) -> dict:
    """The multitask checkpoint's settings (``best.json``); for an export, those of the run
    folder it was exported from ({} when that folder is not here)."""
    meta = getattr(models, "meta", None)
    if isinstance(meta, dict):
        return meta
    if bundle is not None and bundle.kind == "onnx":
        try:
            return bundle.torch_bundle().meta
        except FaceattrsError:
            return {}
    return {}


def _checkpoint(meta: dict) -> dict:
    """One network: its epoch, score and monitor; an ensemble: each member's."""
    out = {k: meta[k] for k in ("epoch", "score", "monitor") if k in meta}
    members = meta.get("members")
    if isinstance(members, list) and members:
        out["members"] = [
            {k: m[k] for k in ("run", "epoch", "score") if k in m}
            for m in members
            if isinstance(m, dict)
        ]
    return out


def _head_metrics(d: dict) -> dict:
    return {
        h: {k: d[h][k] for k in ("accuracy", "macro_f1") if k in d[h]}
        for h in ("gender", "ethnicity")
        if isinstance(d.get(h), dict)
    }


# ---------------------------------------------------------------- the app


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers)


def create_app(cfg: ServeConfig | None = None, analyzer=None) -> FastAPI:
    """The FastAPI app; loads the model (``cfg.model``) unless ``analyzer`` is given."""
    from contextlib import asynccontextmanager

    cfg = cfg or ServeConfig()
    cfg.check()
    if analyzer is None:
        from . import config as cfgmod
        from .predict import FaceAnalyzer

        photo = cfgmod.replace(PhotoConfig(), {**cfg.photo, "max_pixels": cfg.max_pixels})
        analyzer = FaceAnalyzer(
            cfg.model,
            backend=cfg.backend,
            device=cfg.device,
            dtype=cfg.dtype,
            threads=cfg.threads,
            photo=photo,
        )
    worker = ModelWorker(analyzer, cfg)
    info = model_info(analyzer, cfg)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await worker.stop()

    app = FastAPI(
        title="faceattrs",
        version=__version__,
        description="Gender, ethnicity and age of the faces in photos.",
        lifespan=lifespan,
    )
    app.state.worker, app.state.analyzer, app.state.config = worker, analyzer, cfg
    app.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes)
    app.add_middleware(CountRejected, stats=worker.stats)  # outside BodyLimit: sees its 413s

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, f"bad request: {where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.error("internal error on %s: %r", request.url.path, exc)
        return _error(500, f"internal error ({type(exc).__name__})")

    body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    }
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    @app.post("/analyze", openapi_extra=body_doc)
    async def analyze(request: Request, explain: bool = False) -> dict:
        """Faces of one or more images: per image ``{"file", "faces": [records]}`` (records
        as ``faceattrs predict``), or ``"reason"`` when no face was found. ``?explain=1``:
        each face gets ``"explain"``, a PNG data URL of its Grad-CAM overlay."""
        t0 = time.perf_counter()
        uploads = await read_uploads(request, cfg)
        if len(uploads) > cfg.max_images:
            raise ApiError(413, f"too many images ({len(uploads)}); at most {cfg.max_images}")
        for up in uploads:
            check_upload(up, cfg.max_pixels)  # header only: fast
        if explain and getattr(analyzer.models, "model", None) is None:
            raise ApiError(
                501,
                "explanations need the PyTorch model: serve a run folder without --dtype int8",
            )
        images = await worker.submit(uploads, explain)
        failed = next((im for im in images if "error" in im), None)
        if failed is not None:
            raise ApiError(400, f"{failed['file']}: {failed['error']}")
        ms = round((time.perf_counter() - t0) * 1000, 1)
        return {"images": images, "explain": explain, "ms": ms}

    @app.get("/health")
    async def health() -> dict:
        """Up, and how many requests wait for the model."""
        return {"status": "ok", "queue": worker.waiting(), "queue_size": cfg.queue_size}

    @app.get("/model")
    async def model() -> dict:
        """Heads and classes, age bins, provenance, recorded metrics and request limits."""
        return {**info, "stats": dict(worker.stats)}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # where browsers look for it; an SVG (every current browser)
        return FileResponse(WEB_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` (several worker processes): the settings are
    JSON in ``FACEATTRS_SERVE``. With ``FACEATTRS_SERVE_PARENT`` (the pid of ``faceattrs
    serve --workers N``), the process ends when that one does, however it ends: uvicorn's
    workers otherwise outlive a ``kill -9`` of it, serving on, re-parented to init."""
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit():
        exit_with_parent(int(parent))
    return create_app(ServeConfig(**json.loads(os.environ.get("FACEATTRS_SERVE", "{}"))))


def check_port(host: str, port: int) -> None:
    """Fail with one line, before the model loads, when ``host:port`` cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise FaceattrsError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Load the model, print the URL and serve until interrupted."""
    import uvicorn

    if workers < 1:
        raise FaceattrsError(f"--workers must be at least 1, got {workers}")
    if not 0 <= port < 65536:
        raise FaceattrsError(f"--port must be in 0..65535, got {port}")
    cfg.check()
    check_port(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):  # said once the address is known good
        log.warning("listening on %s: reachable from other machines", host)
    shown = f"[{host}]" if ":" in host else host
    if workers == 1:
        app = create_app(cfg)
        print(f"faceattrs serve: http://{shown}:{port}/  (API docs: /docs)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
        return
    os.environ["FACEATTRS_SERVE"] = json.dumps(asdict(cfg))
    os.environ[PARENT_ENV] = str(os.getpid())  # the workers end with this process
    create_app(cfg)  # fail here, with one line, on a bad model rather than in every worker
    print(f"faceattrs serve: http://{shown}:{port}/  ({workers} workers)", flush=True)
    uvicorn.run(
        "faceattrs.serve:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
    )
