"""ONNX export of a model bundle and the onnxruntime backend of ``faceattrs predict``.

``export_onnx(RUN, DIR)`` writes, with a dynamic batch dimension:

- ``multitask.onnx``: uint8 faces ``(N, 48, 48)`` -> ``gender`` ``(N, 2)`` and
  ``ethnicity`` ``(N, 5)`` logits (normalisation is inside the graph);
- ``age_two_stage.onnx`` (when the bundle has an age model): faces -> ``age_bin`` logits
  ``(N, K)`` and ``per_bin`` ages ``(N, K)`` (each bin's regressor); routing and clipping
  are done after, as in :class:`faceattrs.age.AgeModel`;
- ``age_direct.onnx`` (when the age model has the direct head): faces -> per-year logits;
- ``faceattrs-onnx.json``: class names, calibration temperatures, age bins and settings,
  and the agreement with PyTorch measured at export.

Command: ``faceattrs export --model runs/cpu --out runs/cpu/onnx``, then
``faceattrs predict photos/ --model runs/cpu/onnx --backend onnx``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .augment import normalise
from .checkpoint import CheckpointError
from .exceptions import FaceattrsError
from .io import write_json_atomic, write_with
from .labels import IMAGE_SIZE

log = logging.getLogger(__name__)

MANIFEST = "faceattrs-onnx.json"
FORMAT = "faceattrs-onnx-1"
OPSET = 17
HEADS = ("gender", "ethnicity")


def is_export(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).exists()


class _Multitask(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, faces):
        out = self.model(normalise(faces))
        return tuple(out[h] for h in HEADS)


class _TwoStage(nn.Module):
    def __init__(self, coarse, regressors, head: str):
        super().__init__()
        self.coarse, self.regressors, self.head = coarse, regressors, head

    def forward(self, faces):
        z = self.coarse.embed(normalise(faces))
        return self.coarse.forward_head(z)[self.head], self.regressors(z)


class _Direct(nn.Module):
    def __init__(self, direct, head: str):
        super().__init__()
        self.direct, self.head = direct, head

    def forward(self, faces):
        return self.direct(normalise(faces))[self.head]


def _export_graph(module: nn.Module, path: Path, outputs: list[str], opset: int) -> None:
    module = module.eval()
    dummy = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    axes = {name: {0: "batch"} for name in ["faces", *outputs]}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                module,
                (dummy,),
                str(tmp),
                input_names=["faces"],
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        module.eval()  # export restores the mode it found; keep eval for later use

    write_with(path, write)


def export_onnx(
    model: str | Path | None,
    out_dir: str | Path,
    opset: int = OPSET,
    check_faces: np.ndarray | None = None,
) -> Path:
    """Export the bundle at ``model`` to ``out_dir``; returns the manifest path.

    The exported graphs are run once on ``check_faces`` (uint8 (N, 48, 48); default 32
    random faces) against PyTorch; the largest probability difference is saved in the
    manifest and a warning is logged when it exceeds 1e-3.
    """
    from .predict import TorchModels, resolve_model_dir

    try:
        import onnx  # noqa: F401
    except ImportError:
        raise FaceattrsError("ONNX export needs onnx: pip install 'faceattrs[onnx]'") from None
    src = resolve_model_dir(model)
    if is_export(src):
        raise FaceattrsError(f"{src} is already an ONNX export; pass the run folder")
    tm = TorchModels(src)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs = {"multitask": "multitask.onnx"}
    _export_graph(_Multitask(tm.model), out_dir / graphs["multitask"], list(HEADS), opset)
    age_meta = None
    am = tm.age_model
    if am is not None:
        from .age.bundle import COARSE_HEAD
        from .age.direct import HEAD as DIRECT_HEAD

        graphs["age_two_stage"] = "age_two_stage.onnx"
        _export_graph(
            _TwoStage(am.coarse, am.regressors, COARSE_HEAD),
            out_dir / graphs["age_two_stage"],
            ["age_bin", "per_bin"],
            opset,
        )
        if am.direct is not None:
            graphs["age_direct"] = "age_direct.onnx"
            _export_graph(
                _Direct(am.direct, DIRECT_HEAD),
                out_dir / graphs["age_direct"],
                ["age_years"],
                opset,
            )
        age_meta = {
            "edges": [float(e) for e in am.edges],
            "bin_labels": list(am.bin_labels),
            "approach": am.approach,
            "routing": am.routing,
            "clip": [float(c) for c in am.clip],
        }
    manifest = {
        "format": FORMAT,
        "source": str(Path(tm.source).resolve()),
        "opset": opset,
        "torch": torch.__version__,
        "input": {
            "name": "faces",
            "dtype": "uint8",
            "shape": ["batch", IMAGE_SIZE, IMAGE_SIZE],
            "normalisation": "inside the graph: (x / 255 - 0.5) / 0.5",
        },
        "graphs": graphs,
        "class_names": tm.class_names,
        "temperatures": tm.temperatures,
        "age": age_meta,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    if check_faces is None:
        check_faces = np.random.default_rng(0).integers(0, 256, (32, 48, 48), dtype=np.uint8)
    diffs = agreement(tm, OnnxModels(out_dir), check_faces)
    manifest["check"] = {"faces": len(check_faces), **diffs}
    write_json_atomic(out_dir / MANIFEST, manifest)
    worst = max(v for k, v in diffs.items() if k.endswith("probabilities"))
    if worst > 1e-3:
        log.warning("onnxruntime and PyTorch differ by up to %.2g (check %s)", worst, out_dir)
    log.info("exported %s -> %s (%s)", src, out_dir, ", ".join(graphs.values()))
    return out_dir / MANIFEST


def agreement(a, b, faces: np.ndarray) -> dict[str, float]:
    """Largest absolute difference per output between two backends on ``faces``: logits and
    probabilities of each head (temperature-scaled), age bin probabilities, age (years)."""
    from .predict import softmax

    out = {}
    la, lb = a.logits(faces), b.logits(faces)
    for h in HEADS:
        t = a.temperatures.get(h, 1.0)
        out[f"{h}_probabilities"] = float(np.abs(softmax(la[h], t) - softmax(lb[h], t)).max())
        out[f"{h}_logits"] = float(np.abs(la[h] - lb[h]).max())
    aa, ab = a.age(faces), b.age(faces)
    if aa is not None and ab is not None:
        out["age_bin_probabilities"] = float(
            np.abs(aa["bin_probabilities"] - ab["bin_probabilities"]).max()
        )
        out["age_years"] = float(np.abs(aa["value"] - ab["value"]).max())
    return {k: round(v, 7) for k, v in out.items()}


class OnnxModels:
    """The onnxruntime backend, same interface as :class:`faceattrs.predict.TorchModels`."""

    def __init__(self, export_dir: str | Path, age: bool = True, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FaceattrsError(
                "the onnx backend needs onnxruntime: pip install 'faceattrs[onnx]'"
            ) from None
        self.dir = Path(export_dir)
        try:
            m = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{self.dir / MANIFEST}: unreadable ONNX manifest ({e})"
            ) from None
        if m.get("format") != FORMAT:
            raise CheckpointError(f"{self.dir / MANIFEST}: not a faceattrs ONNX export")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # idle model threads must not spin: decoding and detection need the cores between calls
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(key):
            path = self.dir / m["graphs"][key]
            if not path.exists():
                raise CheckpointError(f"ONNX graph missing: {path}")
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        self.manifest = m
        self.class_names = {h: list(m["class_names"][h]) for h in HEADS}
        self.temperatures = {k: float(v) for k, v in m.get("temperatures", {}).items()}
        self.source = m.get("source")
        self.multitask = session("multitask")
        self.age_meta = m.get("age") if age else None
        self.bin_labels = self.age_meta["bin_labels"] if self.age_meta else None
        self.two_stage = session("age_two_stage") if self.age_meta else None
        has_direct = self.age_meta and "age_direct" in m["graphs"]
        self.direct = session("age_direct") if has_direct else None
        self._tmp = None  # a temporary export made by open()

    @classmethod
    def open(cls, path: str | Path, age: bool = True, threads: int | None = None) -> OnnxModels:
        """An export folder, or a run folder (exported now to a temporary folder)."""
        path = Path(path)
        if is_export(path):
            return cls(path, age, threads)
        tmp = tempfile.TemporaryDirectory(prefix="faceattrs-onnx-")
        log.info("exporting %s to ONNX in %s (use `faceattrs export` to keep it)", path, tmp.name)
        export_onnx(path, tmp.name)
        models = cls(tmp.name, age, threads)
        models._tmp = tmp
        return models

    def logits(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        out = self.multitask.run(list(HEADS), {"faces": np.ascontiguousarray(faces, np.uint8)})
        return dict(zip(HEADS, out, strict=True))

    def age(self, faces: np.ndarray) -> dict[str, np.ndarray] | None:
        """As :meth:`faceattrs.age.AgeModel.predict` with the default approach and routing."""
        if self.age_meta is None:
            return None
        from .age.direct import year_probs_to_bins
        from .age.regress import route
        from .predict import softmax

        meta, faces = self.age_meta, np.ascontiguousarray(faces, np.uint8)
        lo, hi = meta["clip"]
        if meta["approach"] == "direct":
            if self.direct is None:
                raise CheckpointError(
                    f"{self.dir}: age approach is 'direct' but its graph is missing"
                )
            years = softmax(self.direct.run(None, {"faces": faces})[0])
            value = years @ np.arange(years.shape[1], dtype=np.float64)
            probs = year_probs_to_bins(years, np.asarray(meta["edges"]))
        else:
            bin_logits, per_bin = self.two_stage.run(None, {"faces": faces})
            probs = softmax(bin_logits)
            value = route(probs, per_bin.astype(np.float64), meta["routing"])
        return {
            "value": np.clip(value, lo, hi).astype(np.float64),
            "bin": probs.argmax(1),
            "bin_probabilities": probs,
        }
