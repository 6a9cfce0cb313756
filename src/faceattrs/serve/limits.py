"""What a request may be: the server's settings (:class:`ServeConfig`: upload, pixel,
image and queue limits), the body limit counted as the bytes arrive (:class:`BodyLimit`),
the count of refused requests (:class:`CountRejected`) and the JSON error
(:class:`ApiError`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from .. import config as cfgmod
from ..exceptions import FaceattrsError
from ..inputs import MAX_PIXELS
from ..photo.config import PhotoConfig
from ..settings import InferenceSettings

MB = 1024 * 1024


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
        self.inference()

    def inference(self) -> InferenceSettings:
        """The analyzer's settings (checked: int8 runs on onnxruntime, on the CPU; the rest
        on PyTorch), with the server's photo settings and pixel limit."""
        photo = cfgmod.replace(PhotoConfig(), {**self.photo, "max_pixels": self.max_pixels})
        return InferenceSettings(
            dtype=self.dtype, device=self.device, threads=self.threads, photo=photo, options=True
        )

    @property
    def backend(self) -> str:
        return self.inference().backend


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


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
