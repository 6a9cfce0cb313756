"""Faces in photos -> gender, ethnicity and age, with probabilities, one record per face.

:class:`FaceAnalyzer` loads a model bundle once (a multitask run folder, optionally with
its calibration temperatures and its age model; or an ONNX export) and analyses single
images or lists of them (paths, numpy arrays, PIL images, encoded bytes). Faces of many
photos are batched through the models together. ``faceattrs.analyze`` is the one-call
form; ``faceattrs predict`` the command line. A record::

    {"file": "a.jpg", "image": 0, "face": 0, "box": [x, y, w, h], "score": 5.1,
     "detection": "detected",
     "gender": {"label": "Female", "probabilities": {"Male": 0.03, "Female": 0.97}},
     "ethnicity": {"label": "White", "probabilities": {"White": 0.81, ...}},
     "age": {"value": 31.4, "bin": "29-37", "bin_probabilities": {"0-16": 0.01, ...}}}

``age`` is null when the bundle has no age model. A photo that cannot be used gives
``{"file": ..., "error": "..."}`` (or raises :class:`faceattrs.photo.PhotoError`).

>>> import faceattrs  # doctest: +SKIP
>>> faceattrs.analyze("photo.jpg", model="runs/cpu")[0]["gender"]["label"]  # doctest: +SKIP
'Female'
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import multiprocessing
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .backends import Backend, TorchBackend, open_onnx
from .bundle import Bundle, default_int8, is_bundled_name, resolve
from .devices import cpu_cores
from .exceptions import FaceattrsError
from .photo.faces import Item, prepare
from .photo.worker import worker_start
from .postprocess import softmax
from .settings import InferenceSettings

log = logging.getLogger(__name__)

PROCESSES_FROM = 16  # photo paths in a run from which "auto" decodes and detects in processes
_MAIN_LOCK = threading.Lock()  # one submit at a time hides the main script (below)


def load_models(model=None, settings: InferenceSettings | None = None) -> Backend:
    """The backend for ``model`` (anything :func:`faceattrs.bundle.resolve` accepts), as
    ``settings`` say (backend, dtype, device, threads, age; default: torch fp32 on the CPU).

    ``threads``: CPU threads of the models (torch: process-wide ``torch.set_num_threads``).
    """
    s = settings or InferenceSettings()
    if s.dtype == "int8":
        return _load_int8(model, s)
    bundle = resolve(model)
    if s.backend == "onnx":
        return open_onnx(bundle, age=s.age, threads=s.threads)
    if bundle.kind == "onnx":
        raise FaceattrsError(bundle.not_torch())
    if s.threads:
        torch.set_num_threads(s.threads)
    return TorchBackend(bundle, s.device, s.dtype, s.age)


def _load_int8(model, s: InferenceSettings) -> Backend:
    """``dtype="int8"``: an int8 ONNX export on onnxruntime (the bundled one for None)."""
    if model is None or is_bundled_name(model):  # the bundled models' own int8 exports
        bundle = default_int8(model)
    else:
        bundle = resolve(model)
    if bundle.precision != "int8":
        run = bundle.source if bundle.kind == "onnx" else bundle.path
        raise FaceattrsError(
            f"{bundle.path} is not an int8 export: make one with `faceattrs export --int8 "
            f"--model {run} --data CSV --out DIR` and pass --model DIR"
        )
    return open_onnx(bundle, age=s.age, threads=s.threads)


def photo_worker_count() -> int:
    """Threads (or processes) decoding and detecting photos: two, or one on one core."""
    return min(2, cpu_cores())


def photo_processes(paths: int, workers: int) -> bool:
    """The "auto" rule of ``photo_workers``: processes for a run of ``paths`` photo paths
    with ``workers`` photo workers (two on a CPU with two or more cores)."""
    return workers >= 2 and paths >= PROCESSES_FROM


def model_streams(device: str, threads: int | None, streams: int | None) -> tuple[int, int | None]:
    """``(streams, threads per call)`` of an analyzer: given values are kept; by default a
    CPU with two or more cores runs two streams, each on half the cores."""
    cores = cpu_cores()
    if streams is None:
        streams = 2 if str(device) == "cpu" and cores >= 2 and threads is None else 1
    if threads is None and streams > 1 and str(device) == "cpu":
        threads = max(1, cores // streams)
    return streams, threads


# ---------------------------------------------------------------- records


def _dist(names, p) -> dict[str, float]:
    return {n: round(float(v), 4) for n, v in zip(names, p, strict=True)}


def face_predictions(models: Backend, faces: np.ndarray, pool=None) -> list[dict]:
    """Per face ``{head: {"label", "probabilities"}, ..., "age": ...}`` for uint8 (N, 48, 48),
    one entry per head of the bundle (gender and ethnicity for the multitask model)."""
    if len(faces) == 0:
        return []
    logits, age = models.outputs(faces, pool=pool)
    heads = models.class_names
    probs = {h: softmax(logits[h], models.temperatures.get(h, 1.0)) for h in heads}
    out = []
    for i in range(len(faces)):
        rec = {}
        for h in heads:
            names = models.class_names[h]
            rec[h] = {
                "label": names[int(probs[h][i].argmax())],
                "probabilities": _dist(names, probs[h][i]),
            }
        rec["age"] = None
        if age is not None:
            rec["age"] = {
                "value": round(float(age["value"][i]), 1),
                "bin": models.bin_labels[int(age["bin"][i])],
                "bin_probabilities": _dist(models.bin_labels, age["bin_probabilities"][i]),
            }
            if "interval" in age:  # 90 % split-conformal interval (age.json "interval")
                # an end the calibration could not bound (too few validation faces) is
                # null: JSON has no infinity
                ends = (float(age["interval"][0][i]), float(age["interval"][1][i]))
                rec["age"]["interval"] = [round(e, 1) if math.isfinite(e) else None for e in ends]
        out.append(rec)
    return out


# ---------------------------------------------------------------- the analyzer


class FaceAnalyzer:
    """Load the models once, then analyse images: ``FaceAnalyzer("runs/cpu").analyze(x)``.

    ``model``: anything :func:`faceattrs.bundle.resolve` accepts: a run folder (or an age
    run, a checkpoint file, an ONNX export with ``backend="onnx"``, a resolved
    :class:`~faceattrs.bundle.Bundle`); None = the default model bundled in the package
    (docs/MODEL_CARD.md), trained on UTKFace faces, which are for non-commercial research
    only: so is that model.
    ``settings``: how the models run (:class:`faceattrs.settings.InferenceSettings`, which
    checks itself); or, without it, its fields as keywords (``backend`` default "torch"):
    ``dtype``: "fp32" or "bf16" (torch); "int8" with ``backend="onnx"``: an int8 export
    (``faceattrs export --int8``; with ``model=None`` the one bundled in the package).
    ``photo``: detection and crop settings (:class:`faceattrs.photo.PhotoConfig`).
    ``threads``: CPU threads of each model call; ``streams``: model calls run at once, each
    on a part of a batch (default on a CPU with two or more cores: two streams of half the
    cores each, set process-wide with ``torch.set_num_threads``; one stream elsewhere).
    Small networks use two cores better as two one-thread calls than as one two-thread
    call (``benchmarks/bench_predict.py`` measures both).
    ``photo_workers``: where photos are decoded and their faces found while the models
    run: "threads", "processes", or "auto" (default: processes for a run of at least
    :data:`PROCESSES_FROM` photos given as paths, on two or more cores; threads else).
    dlib's detector holds Python's lock, so in threads it stalls the model calls and the
    other detecting thread; worker processes do not (``faceattrs predict`` on
    fairface_dev's 448x448 photos: 1.6x faster). Processes take only photos given as
    paths (other inputs stay in threads), start in about half a second (with
    "processes", here, while the models load; with "auto", at the first such run), and
    import :mod:`faceattrs.photo` only, never the calling script. Should a worker
    process die, the analyzer goes on in threads, with a warning.
    """

    def __init__(self, model=None, settings: InferenceSettings | None = None, **options):
        if settings is not None and options:
            raise FaceattrsError(
                f"give settings or keyword options ({', '.join(options)}), not both"
            )
        if settings is None:  # the keywords: as InferenceSettings, the backend torch
            settings = InferenceSettings(**{"backend": "torch", **options})
        self.settings = settings
        self.streams, threads = model_streams(settings.device, settings.threads, settings.streams)
        self.workers = photo_worker_count()
        self.photo_workers = settings.photo_workers
        self._pool: ThreadPoolExecutor | None = None  # kept: each thread keeps its cascades
        self._procs: ProcessPoolExecutor | None = None  # photo worker processes
        self._model_pool: ThreadPoolExecutor | None = None  # the model streams
        if self.photo_workers == "processes":
            self._process_pool()  # the workers start while the models load
        self.models = load_models(model, dataclasses.replace(settings, threads=threads))
        self.backend, self.batch_size = settings.backend, settings.batch_size
        self.photo = settings.photo
        self.input = self.models.bundle.input  # faces are cropped to the model's contract

    def _photo_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="faceattrs-photo")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def _process_pool(self) -> ProcessPoolExecutor | None:
        """The photo worker processes, started on first use; None when they cannot be
        (a platform without process support: the work then stays in threads)."""
        if self._procs is None and self.photo_workers != "threads":
            try:
                self._procs = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),  # no fork of threads
                    initializer=worker_start,
                    # this process's Pillow guard; its pid: the workers end when it does
                    initargs=(Image.MAX_IMAGE_PIXELS, os.getpid()),
                )
                weakref.finalize(self, self._procs.shutdown, wait=False, cancel_futures=True)
                for _ in range(self.workers):  # spawn them now (a pool starts them on demand)
                    self._submit_to_processes(int)
            except (OSError, BrokenProcessPool) as e:
                self._no_processes(e)
        return self._procs

    def _submit_to_processes(self, fn, *args):
        """``submit`` to the worker processes, without the parent's main script: a spawned
        process runs it again first (its top level, unless guarded by ``if __name__ ==
        "__main__"``: slow, and wrong for a script that writes files). The workers need
        only :mod:`faceattrs.photo`, so ``__main__`` looks like an interactive session
        while a submit may start one."""
        main = sys.modules["__main__"]
        saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
        with _MAIN_LOCK:
            try:
                main.__dict__.pop("__file__", None)
                main.__spec__ = None
                return self._procs.submit(fn, *args)
            finally:
                main.__dict__.pop("__spec__", None)
                main.__dict__.update(saved)

    def _no_processes(self, why: BaseException) -> None:
        """A worker process died (killed, out of memory, a crash in a native library) or
        none could start: the rest of the work goes to threads."""
        if self.photo_workers != "threads":
            log.warning("photo worker processes stopped or could not start (%s): going on "
                        "in threads", why)  # fmt: skip
            self.photo_workers = "threads"
        if self._procs is not None:
            self._procs.shutdown(wait=False, cancel_futures=True)
            self._procs = None

    def _streams_pool(self) -> ThreadPoolExecutor:
        if self._model_pool is None:
            self._model_pool = ThreadPoolExecutor(
                self.streams, thread_name_prefix="faceattrs-model"
            )
            weakref.finalize(self, self._model_pool.shutdown, wait=False)
        return self._model_pool

    def analyze(self, images, *, detect: bool = True, on_error: str = "raise") -> list[dict]:
        """Records of every face of ``images`` (one image or a list), in input order.

        ``on_error="raise"`` raises :class:`PhotoError` for the first unusable image
        (including one without a face); ``"record"`` puts ``{"file", "error"}`` in its place.
        """
        if on_error not in ("raise", "record"):
            raise FaceattrsError(f"on_error must be 'raise' or 'record', got {on_error!r}")
        if not isinstance(detect, bool):  # "no" or "maybe" would read as True
            raise FaceattrsError(f"detect must be True or False, got {detect!r}")
        single = not isinstance(images, list | tuple)
        items = self.run(
            [images] if single else list(images),
            detect=detect,
            keep_images=False,
            raise_errors=on_error == "raise",
        )
        return [r for item in items for r in item.records]

    def run(
        self,
        sources: Iterable,
        *,
        detect: bool = True,
        keep_images: bool = False,
        raise_errors: bool = False,
    ) -> Iterator[Item]:
        """Yield an :class:`Item` per source, in order, with its records filled.

        Images are decoded and their faces found by ``workers`` threads or processes
        (``photo_workers``), up to ``batch_size`` images ahead, while the models run; the
        faces of consecutive images are gathered until ``batch_size`` and go through the
        models together, split over the ``streams``.
        """

        sources = list(sources)
        args = (detect, self.photo, raise_errors, keep_images, self.input)
        use = self.photo_workers == "processes" or (
            self.photo_workers == "auto"
            and photo_processes(
                sum(isinstance(s, str | os.PathLike) for s in sources), self.workers
            )
        )

        def submit(index: int, src):
            if use and isinstance(src, str | os.PathLike):  # the pool is None after a failure
                try:
                    if self._process_pool() is not None:
                        return self._submit_to_processes(prepare, index, src, *args)
                except BrokenProcessPool as e:
                    self._no_processes(e)
            return self._photo_pool().submit(prepare, index, src, *args)

        def result(future, index: int, src) -> Item:
            try:
                return future.result()
            except BrokenProcessPool as e:
                self._no_processes(e)
                return prepare(index, src, *args)

        def prepared() -> Iterator[Item]:
            if len(sources) == 1:  # one image: no thread hop
                yield prepare(0, sources[0], *args)
                return
            ahead = deque()
            try:
                for index, src in enumerate(sources):
                    ahead.append((submit(index, src), index, src))
                    if len(ahead) > self.batch_size:
                        yield result(*ahead.popleft())
                while ahead:
                    yield result(*ahead.popleft())
            finally:
                for future, _, _ in ahead:
                    future.cancel()

        pending: list[Item] = []
        n_faces = 0
        for item in prepared():
            pending.append(item)
            n_faces += len(item.faces)
            if n_faces >= self.batch_size:
                yield from self._flush(pending)
                pending, n_faces = [], 0
        yield from self._flush(pending)

    def _predict(self, faces: np.ndarray) -> list[dict]:
        """:func:`face_predictions` of ``faces``, split into one part per stream, the parts
        run at once; fewer faces than streams (one photo) run an ensemble's members at once."""
        if self.streams == 1:
            return face_predictions(self.models, faces)
        if len(faces) < self.streams:
            return face_predictions(self.models, faces, pool=self._streams_pool())
        size = -(-len(faces) // self.streams)
        parts = [faces[s : s + size] for s in range(0, len(faces), size)]
        done = self._streams_pool().map(lambda part: face_predictions(self.models, part), parts)
        return [rec for part in done for rec in part]

    def _flush(self, items: list[Item]) -> Iterator[Item]:
        faces = [f.crop for item in items for f in item.faces]
        preds = []
        for start in range(0, len(faces), self.batch_size):
            preds.extend(self._predict(np.stack(faces[start : start + self.batch_size])))
        k = 0
        for item in items:
            if item.error is not None:
                item.records = [{**item.head(), "error": item.error}]
            for i, face in enumerate(item.faces):
                item.records.append(
                    {
                        **item.head(),
                        "face": i,
                        "box": list(face.box),
                        "score": face.score,
                        "detection": face.kind,
                        **preds[k],
                    }
                )
                k += 1
            yield item


@functools.lru_cache(maxsize=2)
def _cached_analyzer(model, backend: str, device: str, dtype: str) -> FaceAnalyzer:
    return FaceAnalyzer(model, backend=backend, device=device, dtype=dtype)


def analyze(
    image_or_path,
    model: str | os.PathLike | None = None,
    *,
    detect: bool = True,
    on_error: str = "raise",
    backend: str = "torch",
    device: str = "cpu",
    dtype: str = "fp32",
) -> list[dict]:
    """Records of every face in one image or a list of images (see :class:`FaceAnalyzer`).

    ``model=None``: the default model bundled in the package, for non-commercial research
    only (trained on UTKFace faces; docs/MODEL_CARD.md). The models are loaded on the
    first call and kept for the next calls with the same ``model``, ``backend``,
    ``device`` and ``dtype``.
    """
    if isinstance(model, Bundle):
        model = model.path
    key = None if model is None else str(Path(model).resolve())
    an = _cached_analyzer(key, backend, device, dtype)
    return an.analyze(image_or_path, detect=detect, on_error=on_error)
