"""Inference backends: the networks of a :class:`~faceattrs.bundle.Bundle` behind one interface.

:class:`Backend` is what the analyzer, ``faceattrs export``'s agreement check and the
command line use; :class:`TorchBackend` (PyTorch) and :class:`OnnxBackend` (onnxruntime,
on a folder from ``faceattrs export``) implement it. Both return raw logits per head and
the age model's prediction after :func:`faceattrs.postprocess.age_prediction`, so
probabilities, temperatures and age post-processing are the same code for both.
A new backend implements these four attributes and three methods, and is added to
:func:`faceattrs.predict.load_models`; :func:`open_onnx` opens the onnx one. ``outputs`` gives both in one call: for a network
with its own age head (three heads) that is one pass instead of two.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from .age.direct import HEAD as AGE_HEAD
from .bundle import ONNX_MANIFEST, Bundle, resolve
from .checkpoint import CheckpointError
from .devices import cpu_cores
from .exceptions import FaceattrsError
from .io import write_json_atomic
from .model import FaceEnsemble, fuse_batchnorm
from .onnx_graphs import write_graphs
from .postprocess import age_prediction, route, softmax

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@runtime_checkable
class Backend(Protocol):
    """The networks of a bundle, ready to run on uint8 faces ``(N, 48, 48)``."""

    bundle: Bundle
    class_names: dict[str, list[str]]  # head -> class names, in the network's head order
    temperatures: dict[str, float]  # calibration per head ({} = not calibrated)
    bin_labels: list[str] | None  # age bins, None without an age model

    def logits(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        """``{head: (N, K) float logits}``."""
        ...

    def age(self, faces: np.ndarray) -> dict[str, np.ndarray] | None:
        """``{"value": (N,), "bin": (N,), "bin_probabilities": (N, K)}`` or None."""
        ...

    def outputs(self, faces: np.ndarray, pool=None) -> tuple[dict[str, np.ndarray], dict | None]:
        """``(logits(faces), age(faces))``. ``pool`` (a thread pool, optional): where the
        backend may run parts of one call at once (torch: an ensemble's members)."""
        ...


def _head_age(meta: dict, year_logits: np.ndarray) -> dict[str, np.ndarray]:
    """The age prediction of a multitask network's own age head (``age.json`` ``meta``)."""
    return age_prediction(
        "direct",
        year_logits=year_logits,
        edges=meta["edges"],
        clip=meta["clip"],
        interval=meta.get("interval"),
        point=meta.get("point", "mean"),
    )


class TorchBackend:
    """The PyTorch backend: the multitask model and, when present, the age model.

    ``model``: a :class:`Bundle` or anything :func:`faceattrs.bundle.resolve` accepts.
    ``dtype="bf16"`` runs under CPU/GPU autocast in bfloat16.
    """

    def __init__(self, model, device: str = "cpu", dtype: str = "fp32", age: bool = True):
        if dtype not in DTYPES:
            raise FaceattrsError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        self.bundle = resolve(model)
        if self.bundle.kind == "onnx":
            raise FaceattrsError(self.bundle.not_torch())
        self.device, self.dtype = torch.device(device), dtype
        self.model, self.meta = self.bundle.load_multitask(self.device)
        self.class_names = {h: list(v) for h, v in self.bundle.heads.items()}
        self.temperatures = dict(self.bundle.temperatures)
        self.age_model = self.bundle.load_age(self.device, self.model) if age else None
        self.bin_labels = list(self.age_model.bin_labels) if self.age_model else None
        self.shared_age = self.age_model is not None and self.age_model.shared
        self.source = self.bundle.source
        # BN folded into the convs (about 5% faster, bench_predict.py), channels-last weights
        # (oneDNN's fast convolutions, about 3x on the 2-core CPUs)
        nets = [self.model] + [getattr(self.age_model, k, None) for k in ("coarse", "direct")]
        for net in {id(n): n for n in nets}.values():
            if isinstance(net, nn.Module):
                fuse_batchnorm(net.eval()).to(memory_format=torch.channels_last)

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=DTYPES[self.dtype], enabled=self.dtype != "fp32"
        )

    @torch.inference_mode()
    def _forward(self, faces: np.ndarray, pool=None) -> dict[str, np.ndarray]:
        x = torch.from_numpy(faces).to(self.device)  # uint8: normalised inside the network
        with self._autocast():
            if pool is not None and isinstance(self.model, FaceEnsemble):
                out = self.model(x, member_map=lambda fn, ms: pool.map(self._in_mode(fn), ms))
            else:
                out = self.model(x)
        return {h: v.float().cpu().numpy() for h, v in out.items()}

    def _in_mode(self, fn):
        """``fn`` run under this backend's inference and autocast modes (both per thread)."""

        def run(*args):
            with torch.inference_mode(), self._autocast():
                return fn(*args)

        return run

    def logits(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        out = self._forward(faces)
        return {h: out[h] for h in self.class_names}

    @torch.inference_mode()
    def age(self, faces: np.ndarray) -> dict[str, np.ndarray] | None:
        if self.age_model is None:
            return None
        if self.shared_age:
            return self.outputs(faces)[1]
        with self._autocast():
            return self.age_model.predict(faces)

    def outputs(self, faces: np.ndarray, pool=None) -> tuple[dict[str, np.ndarray], dict | None]:
        out = self._forward(faces, pool)
        age = _head_age(self.bundle.age, out[AGE_HEAD]) if self.shared_age else self.age(faces)
        return {h: out[h] for h in self.class_names}, age


class OnnxBackend:
    """The onnxruntime backend on an export folder (see :mod:`faceattrs.export`)."""

    def __init__(self, export_dir, age: bool = True, threads: int | None = None):
        try:
            # onnxruntime: an optional dependency, loaded only for an ONNX backend
            import onnxruntime as ort
        except ImportError:
            raise FaceattrsError(
                "the onnx backend needs onnxruntime: pip install 'faceattrs[onnx]'"
            ) from None
        self.bundle = resolve(export_dir)
        if self.bundle.kind != "onnx":
            raise CheckpointError(f"{self.bundle.path}: not a faceattrs ONNX export")
        self.dir = self.bundle.path
        m = self.manifest = self.bundle.meta
        self._ort, self.threads = ort, threads
        self.precision = self.bundle.precision
        self._wide = None  # the multitask graph on every core, for a lone small call

        self.class_names = {h: list(v) for h, v in self.bundle.heads.items()}
        self.temperatures = dict(self.bundle.temperatures)
        self.source = m.get("source")
        self.multitask = self._open("multitask")
        self.age_meta = self.bundle.age if age else None
        self.bin_labels = self.age_meta["bin_labels"] if self.age_meta else None
        self.shared_age = age and self.bundle.shared_age
        two_stage = self.age_meta and not self.shared_age
        self.two_stage = self._open("age_two_stage") if two_stage else None
        has_direct = self.age_meta and "age_direct" in m["graphs"]
        self.direct = self._open("age_direct") if has_direct else None
        self._tmp = None  # a temporary export this backend owns (open_onnx)

    def _open(self, key: str, threads: int | None = None):
        """An onnxruntime session of graph ``key`` on ``threads`` (default: the backend's)."""
        ort, path = self._ort, self.dir / self.manifest["graphs"][key]
        opts = ort.SessionOptions()
        if threads or self.threads:
            opts.intra_op_num_threads = threads or self.threads
        # idle model threads must not spin: decoding and detection need the cores between calls
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not path.exists():
            raise CheckpointError(f"ONNX graph missing: {path}")
        try:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types (bad protobuf, no graph)
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: not a loadable ONNX graph ({why}); export it again"
            ) from None

    def _run(self, faces: np.ndarray, heads: list[str], session=None) -> dict[str, np.ndarray]:
        session = session or self.multitask
        out = session.run(heads, {"faces": np.ascontiguousarray(faces, np.uint8)})
        return dict(zip(heads, out, strict=True))

    def _wide_session(self):
        """The multitask graph on every core the process may use (made on first need)."""
        if self._wide is None:
            self._wide = self._open("multitask", cpu_cores())
        return self._wide

    def logits(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(faces, list(self.class_names))

    def outputs(self, faces: np.ndarray, pool=None) -> tuple[dict[str, np.ndarray], dict | None]:
        """``pool`` given (the analyzer has fewer faces than streams: one photo): the other
        streams are idle, so the multitask graph runs on every core instead of the
        stream's share (a session of its own; torch runs an ensemble's members at once)."""
        wide = pool is not None and self.threads is not None and self.threads < cpu_cores()
        session = self._wide_session() if wide else self.multitask
        if not self.shared_age:
            return self._run(faces, list(self.class_names), session), self.age(faces)
        out = self._run(faces, [*self.class_names, AGE_HEAD], session)
        age = _head_age(self.age_meta, out.pop(AGE_HEAD))
        return out, age

    def age(self, faces: np.ndarray) -> dict[str, np.ndarray] | None:
        """As :meth:`faceattrs.age.AgeModel.predict` with the default approach and routing."""
        if self.age_meta is None:
            return None
        if self.shared_age:
            return self.outputs(faces)[1]
        meta, faces = self.age_meta, np.ascontiguousarray(faces, np.uint8)
        kw = {"edges": meta["edges"], "clip": meta["clip"], "routing": meta["routing"]}
        kw["interval"] = meta.get("interval")
        if meta["approach"] == "direct":
            if self.direct is None:
                raise CheckpointError(
                    f"{self.dir}: age approach is 'direct' but its graph is missing"
                )
            year_logits = self.direct.run(None, {"faces": faces})[0]
            point = meta.get("point", "mean")
            return age_prediction("direct", year_logits=year_logits, point=point, **kw)
        bin_logits, per_bin = self.two_stage.run(None, {"faces": faces})
        return age_prediction("two_stage", bin_logits=bin_logits, per_bin=per_bin, **kw)


class OnnxAgeModel:
    """The age model of an :class:`OnnxBackend` as :func:`faceattrs.age.evaluate_age` reads
    one (``predict_all`` and the settings), so that an export (int8 included) is evaluated
    by the same code as a PyTorch age model."""

    def __init__(self, backend: OnnxBackend, batch_size: int = 256):
        meta = backend.age_meta
        if meta is None:
            raise CheckpointError(f"{backend.dir}: this export has no age model")
        self.backend, self.batch_size, self.meta = backend, batch_size, meta
        self.edges = [float(e) for e in meta["edges"]]
        self.bin_labels = list(meta["bin_labels"])
        self.approach = meta["approach"]
        self.routing = meta.get("routing") or "soft"
        self.clip = tuple(float(c) for c in meta["clip"])
        self.interval = meta.get("interval")

    def predict_all(self, images) -> dict[str, np.ndarray]:
        """As :meth:`faceattrs.age.AgeModel.predict_all` (without the embedding)."""
        return in_batches(self._part, np.ascontiguousarray(images, np.uint8), self.batch_size)

    def _part(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        b, out = self.backend, {}
        if b.two_stage is not None:
            bin_logits, per_bin = b.two_stage.run(None, {"faces": faces})
            probs = softmax(bin_logits)
            per_bin = np.asarray(per_bin, np.float64)
            out = {"bin_probabilities": probs, "per_bin": per_bin}
            for routing in ("hard", "soft"):
                out[routing] = np.clip(route(probs, per_bin, routing), *self.clip)
        year_logits = None
        if b.shared_age:
            year_logits = b._run(faces, [AGE_HEAD])[AGE_HEAD]
        elif b.direct is not None:
            year_logits = b.direct.run(None, {"faces": faces})[0]
        if year_logits is not None:
            d = age_prediction(
                "direct",
                year_logits=year_logits,
                edges=self.edges,
                clip=self.clip,
                point=self.meta.get("point", "mean"),
            )
            out["direct"], out["direct_bin_probabilities"] = d["value"], d["bin_probabilities"]
        return out


def in_batches(fn, images: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """``fn`` (faces -> ``{name: array}``) over ``images`` ``batch`` at a time, joined."""
    parts = [fn(images[i : i + batch]) for i in range(0, len(images), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def open_onnx(model: Bundle | str | Path | None, age: bool = True, threads: int | None = None):
    """The onnxruntime backend of a bundle: an export folder, or a run folder (its graphs
    written now to a temporary folder that lives as long as the backend; ``faceattrs
    export`` keeps them, with the int8 quantization and the agreement check)."""
    bundle = resolve(model)
    if bundle.kind == "onnx":
        return OnnxBackend(bundle, age, threads)
    try:
        import onnx  # noqa: F401  (torch's ONNX exporter needs it; an optional dependency)
    except ImportError:
        raise FaceattrsError("ONNX export needs onnx: pip install 'faceattrs[onnx]'") from None
    tmp = tempfile.TemporaryDirectory(prefix="faceattrs-onnx-")
    log.info(
        "exporting %s to ONNX in %s (use `faceattrs export` to keep it)", bundle.path, tmp.name
    )
    _, manifest = write_graphs(TorchBackend(bundle), Path(tmp.name))
    write_json_atomic(Path(tmp.name) / ONNX_MANIFEST, manifest)
    backend = OnnxBackend(tmp.name, age, threads)
    backend._tmp = tmp
    return backend
