"""The FastAPI app: ``POST /analyze``, ``GET /health``, ``GET /model``, the web page
(``GET /``, ``/static``) and JSON errors (:func:`create_app`); ``app_from_env`` builds it
in each process of ``faceattrs serve --workers N``."""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..lifeline import exit_with_parent
from .info import model_info
from .limits import ApiError, BodyLimit, CountRejected, ServeConfig
from .uploads import check_upload, read_uploads
from .worker import ModelWorker

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parents[1] / "assets" / "web"
PARENT_ENV = "FACEATTRS_SERVE_PARENT"  # serve --workers N: the pid the workers end with

# POST /analyze's body in the OpenAPI docs: multipart image files, or one raw image
UPLOAD_DOC = {
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


def create_app(cfg: ServeConfig | None = None, analyzer=None) -> FastAPI:
    """The FastAPI app; loads the model (``cfg.model``) unless ``analyzer`` is given."""
    cfg = cfg or ServeConfig()
    cfg.check()
    if analyzer is None:
        analyzer = load_analyzer(cfg)
    worker = ModelWorker(analyzer, cfg)

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
    add_error_handlers(app)
    add_api_routes(app, cfg, analyzer, worker)
    add_page_routes(app)
    return app


def load_analyzer(cfg: ServeConfig):
    """The :class:`faceattrs.FaceAnalyzer` of ``cfg.model``, with the server's photo settings."""
    # the model stack (torch) is imported where the model loads: importing faceattrs.serve
    # (ServeConfig and the checks `faceattrs serve` makes before loading) stays light
    from ..predict import FaceAnalyzer

    return FaceAnalyzer(cfg.model, cfg.inference())


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"error": message}``; no input leaks a stack trace."""

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


def add_api_routes(app: FastAPI, cfg: ServeConfig, analyzer, worker: ModelWorker) -> None:
    """``POST /analyze``, ``GET /health`` and ``GET /model``."""
    info = model_info(analyzer, cfg)

    @app.post("/analyze", openapi_extra=UPLOAD_DOC)
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


def add_page_routes(app: FastAPI) -> None:
    """The web page (``GET /``), its icon and its assets (``/static``): no other host."""

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # where browsers look for it; an SVG (every current browser)
        return FileResponse(WEB_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` (several worker processes): the settings are
    JSON in ``FACEATTRS_SERVE``. With ``FACEATTRS_SERVE_PARENT`` (the pid of ``faceattrs
    serve --workers N``), the process ends when that one does, however it ends: uvicorn's
    workers otherwise outlive a ``kill -9`` of it, serving on, re-parented to init."""
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit():
        exit_with_parent(int(parent))
    return create_app(ServeConfig(**json.loads(os.environ.get("FACEATTRS_SERVE", "{}"))))
