"""Faces in photos -> gender, ethnicity and age, with probabilities, one record per face.

:class:`FaceAnalyzer` loads a model bundle once (a multitask run folder, optionally with
its calibration temperatures and its age model; or an ONNX export) and analyses single
images or lists of them (paths, numpy arrays, PIL images, encoded bytes). Faces of many
photos are batched through the models together. ``faceattrs.analyze`` is the one-call
form; ``faceattrs predict`` the command line. A record::

    {"file": "a.jpg", "face": 0, "box": [x, y, w, h], "score": 5.1, "detection": "detected",
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

import functools
import logging
import os
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends import Backend, TorchBackend
from .bundle import Bundle, resolve
from .exceptions import FaceattrsError
from .photo import Face, PhotoConfig, PhotoError, extract_faces, load_image
from .postprocess import softmax

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")


def load_models(
    model=None,
    backend: str = "torch",
    device: str = "cpu",
    dtype: str = "fp32",
    age: bool = True,
    threads: int | None = None,
) -> Backend:
    """The backend for ``model`` (anything :func:`faceattrs.bundle.resolve` accepts).

    ``threads``: CPU threads of the models (torch: process-wide ``torch.set_num_threads``).
    """
    if backend not in BACKENDS:
        raise FaceattrsError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    bundle = resolve(model)
    if backend == "onnx":
        from .export import open_onnx  # exports a run folder on the fly (needs onnx)

        return open_onnx(bundle, age=age, threads=threads)
    if bundle.kind == "onnx":
        raise FaceattrsError(f"{bundle.path} is an ONNX export: use it with --backend onnx")
    if threads:
        torch.set_num_threads(threads)
    return TorchBackend(bundle, device, dtype, age)


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
                low, high = age["interval"]
                rec["age"]["interval"] = [round(float(low[i]), 1), round(float(high[i]), 1)]
        out.append(rec)
    return out


@dataclass
class Item:
    """One input image on its way through the analyzer."""

    index: int  # position in the input
    file: str | None  # the path, None for in-memory images
    image: np.ndarray | None = None  # decoded pixels (kept for annotation)
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    records: list[dict] = field(default_factory=list)

    def head(self) -> dict:
        return {"file": self.file} if self.file is not None else {"file": None, "image": self.index}


# ---------------------------------------------------------------- the analyzer


class FaceAnalyzer:
    """Load the models once, then analyse images: ``FaceAnalyzer("runs/cpu").analyze(x)``.

    ``model``: anything :func:`faceattrs.bundle.resolve` accepts: a run folder (or an age
    run, a checkpoint file, an ONNX export with ``backend="onnx"``, a resolved
    :class:`~faceattrs.bundle.Bundle`); None = the default model bundled in the package. ``dtype``: "fp32" or "bf16" (torch).
    ``photo``: detection and crop settings (:class:`faceattrs.photo.PhotoConfig`).
    ``threads``: CPU threads of each model call; ``streams``: model calls run at once, each
    on a part of a batch (default on a CPU with two or more cores: two streams of half the
    cores each, set process-wide with ``torch.set_num_threads``; one stream elsewhere).
    Small networks use two cores better as two one-thread calls than as one two-thread
    call (``scripts/bench_predict.py`` measures both).
    """

    def __init__(
        self,
        model=None,
        *,
        backend: str = "torch",
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 64,
        photo: PhotoConfig | None = None,
        age: bool = True,
        threads: int | None = None,
        streams: int | None = None,
    ):
        if batch_size < 1:
            raise FaceattrsError(f"batch size must be at least 1, got {batch_size}")
        for name, value in (("threads", threads), ("streams", streams)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):  # fmt: skip
                raise FaceattrsError(f"{name} must be a whole number of at least 1, got {value!r}")
        self.streams, threads = model_streams(device, threads, streams)
        self.models = load_models(model, backend, device, dtype, age, threads)
        self.backend, self.batch_size = backend, batch_size
        self.photo = photo or PhotoConfig()
        self.workers = min(2, cpu_cores())  # threads decoding and detecting
        self._pool: ThreadPoolExecutor | None = None  # kept: each thread keeps its cascades
        self._model_pool: ThreadPoolExecutor | None = None  # the model streams

    def _photo_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="faceattrs-photo")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

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

        Images are decoded and their faces found in ``workers`` threads (Pillow and
        OpenCV release the GIL), up to ``batch_size`` images ahead, while the models run;
        the faces of consecutive images are gathered until ``batch_size`` and go through
        the models together, split over the ``streams``.
        """

        sources = list(sources)

        def prepared() -> Iterator[Item]:
            if len(sources) == 1:  # one image: no thread hop
                yield self.prepare(0, sources[0], detect, raise_errors)
                return
            pool, ahead = self._photo_pool(), deque()
            try:
                for index, src in enumerate(sources):
                    ahead.append(pool.submit(self.prepare, index, src, detect, raise_errors))
                    if len(ahead) > self.batch_size:
                        yield ahead.popleft().result()
                while ahead:
                    yield ahead.popleft().result()
            finally:
                for future in ahead:
                    future.cancel()

        pending: list[Item] = []
        n_faces = 0
        for item in prepared():
            if not keep_images:
                item.image = None
            pending.append(item)
            n_faces += len(item.faces)
            if n_faces >= self.batch_size:
                yield from self._flush(pending)
                pending, n_faces = [], 0
        yield from self._flush(pending)

    def prepare(self, index: int, src, detect: bool, raise_errors: bool) -> Item:
        """Decode and detect; an error is kept in the item (or raised)."""
        is_path = isinstance(src, str | os.PathLike)
        item = Item(index, str(src) if is_path else None)
        try:
            item.image = load_image(src, self.photo.max_pixels)
            item.faces = extract_faces(item.image, detect=detect, cfg=self.photo)
            if not item.faces:
                raise PhotoError(f"{src if is_path else 'image'}: no face found")
        except PhotoError as e:
            if raise_errors:
                raise
            item.error, item.faces = str(e), []
        return item

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

    The models are loaded on the first call and kept for the next calls with the same
    ``model``, ``backend``, ``device`` and ``dtype``.
    """
    if isinstance(model, Bundle):
        model = model.path
    key = None if model is None else str(Path(model).resolve())
    an = _cached_analyzer(key, backend, device, dtype)
    return an.analyze(image_or_path, detect=detect, on_error=on_error)
