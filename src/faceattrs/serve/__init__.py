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

By concept: ``limits`` (:class:`ServeConfig`, the body limit, :class:`ApiError`),
``uploads`` (reading a request's images, header checks), ``worker`` (the model thread,
:class:`ModelWorker`), ``info`` (``GET /model``), ``app`` (:func:`create_app`, the routes,
``app_from_env``), ``server`` (the port check and uvicorn: :func:`serve`). Web page assets:
``faceattrs/assets/web/``.
"""

from .app import PARENT_ENV, WEB_DIR, app_from_env, create_app, load_analyzer
from .info import model_info
from .limits import MB, ApiError, BodyLimit, CountRejected, ServeConfig, refused
from .server import check_port, serve
from .uploads import IMAGE_TYPES, SUPPORTED, Upload, check_upload, has_body, read_uploads
from .worker import TRIM_PIXELS, Job, ModelWorker, png_data, release_memory

__all__ = [
    "IMAGE_TYPES",
    "MB",
    "PARENT_ENV",
    "SUPPORTED",
    "TRIM_PIXELS",
    "WEB_DIR",
    "ApiError",
    "BodyLimit",
    "CountRejected",
    "Job",
    "ModelWorker",
    "ServeConfig",
    "Upload",
    "app_from_env",
    "check_port",
    "check_upload",
    "create_app",
    "has_body",
    "load_analyzer",
    "model_info",
    "png_data",
    "read_uploads",
    "refused",
    "release_memory",
    "serve",
]
