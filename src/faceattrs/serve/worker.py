"""The model thread: a bounded queue of requests, taken together in batches and run
through the analyzer (:class:`ModelWorker`), so the event loop never runs a model."""

from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import functools
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .limits import ApiError, ServeConfig
from .uploads import Upload

log = logging.getLogger(__name__)

TRIM_PIXELS = 4_000_000  # after a batch with more pixels, give freed memory back (glibc)


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
            # Grad-CAM (predict_files, explain: torch, captum): only once a request asks
            from ..predict_files import Explainer

            self.explainer = Explainer(self.analyzer.models)
        return self.explainer
