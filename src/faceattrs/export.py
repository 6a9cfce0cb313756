"""ONNX export of a model bundle and the onnxruntime backend of ``faceattrs predict``.

``export_onnx(RUN, DIR)`` writes, with a dynamic batch dimension:

- ``multitask.onnx``: uint8 faces ``(N, 48, 48)`` -> ``gender`` ``(N, 2)`` and
  ``ethnicity`` ``(N, 5)`` logits (normalisation is inside the graph), and ``age``
  per-year logits when the network has its own age head (then no age graph follows);
- ``age_two_stage.onnx`` (when the bundle has an age model): faces -> ``age_bin`` logits
  ``(N, K)`` and ``per_bin`` ages ``(N, K)`` (each bin's regressor); routing and clipping
  are done after, as in :class:`faceattrs.age.AgeModel`;
- ``age_direct.onnx`` (when the age model has the direct head): faces -> per-year logits;
- ``faceattrs-onnx.json``: class names, calibration temperatures, age bins and settings,
  and the agreement with PyTorch measured at export.

``int8=True`` (``faceattrs export --int8``) quantizes every graph after export: static
int8 with onnxruntime's quantizer (QDQ format, int8 weights per output channel, uint8
activations), its activation ranges measured on ``calib_faces``, faces from the
**training** split (never validation or test). About 2x faster on two AVX2 cores; what
it costs in accuracy is measured by ``tools/compare_backends.py`` on the validation
split (``docs/MODEL_CARD.md``, Speed). The manifest records the calibration, and the
agreement with PyTorch on ``check_faces`` (argmax agreement per head besides the largest
differences).

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

from .backends import OnnxBackend, TorchBackend
from .bundle import ONNX_MANIFEST as MANIFEST
from .bundle import resolve
from .exceptions import FaceattrsError
from .io import atomic_folder, write_json_atomic, write_with
from .onnx_graphs import MAX_OPSET, MIN_OPSET, OPSET, write_graphs
from .postprocess import softmax

log = logging.getLogger(__name__)


def export_onnx(
    model: str | Path | None,
    out_dir: str | Path,
    opset: int = OPSET,
    check_faces: np.ndarray | None = None,
    int8: bool = False,
    calib_faces: np.ndarray | None = None,
    calibration: dict | None = None,
) -> Path:
    """Export the bundle at ``model`` to ``out_dir``; returns the manifest path.

    The exported graphs are run once on ``check_faces`` (uint8 (N, 48, 48); default 32
    random faces) against PyTorch; the largest probability difference is saved in the
    manifest and a warning is logged when it exceeds 1e-3 (fp32) or when a head's argmax
    agrees on fewer than 95 % of the faces (int8).

    ``int8``: quantize the graphs with activation ranges from ``calib_faces`` (uint8
    (N, 48, 48), training faces); ``calibration`` (where those faces came from) is
    recorded in the manifest.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise FaceattrsError("ONNX export needs onnx: pip install 'faceattrs[onnx]'") from None
    bundle = resolve(model)
    if bundle.kind == "onnx":
        raise FaceattrsError(f"{bundle.path} is already an ONNX export; pass the run folder")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise FaceattrsError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    if int8 and (calib_faces is None or len(calib_faces) == 0):
        raise FaceattrsError("int8 export needs calibration faces (--data: training faces)")
    quant = None
    if int8:
        calib_faces = _faces_array(calib_faces, "calibration faces", bundle.input)
        quant = {"faces": calib_faces, "record": dict(calibration or {})}
    out = Path(out_dir)
    _check_out(out)
    tm = TorchBackend(bundle)
    with atomic_folder(out) as stage:  # the old export or the new one, never a mix
        graphs = _export_all(tm, stage, opset, check_faces, quant)
    log.info("exported %s -> %s (%s)", bundle.path, out, ", ".join(graphs.values()))
    return out / MANIFEST


def _check_out(out: Path) -> None:
    """``out`` new, empty, or a former export holding only its own files (it is replaced
    whole, so nothing else may be lost with it)."""
    if out.exists() and not out.is_dir():
        raise FaceattrsError(f"--out {out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    own = {MANIFEST}
    if (out / MANIFEST).is_file():
        try:
            own |= set(json.loads((out / MANIFEST).read_text()).get("graphs", {}).values())
        except (OSError, ValueError, AttributeError):
            pass
    other = sorted(p.name for p in out.iterdir() if p.name not in own)
    if other:
        raise FaceattrsError(
            f"--out {out} holds other files than a former export ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}); choose a new or empty folder"
        )


def calibration_draw(train_idx: np.ndarray, n: int, seed: int, n_check: int = 256):
    """``(calibration rows, check rows)`` for an int8 export: ``n`` training rows drawn with
    ``seed``, and up to ``n_check`` other training rows to check the export on (the
    calibration rows themselves when there are no others). Both sorted."""
    pick = np.random.default_rng(seed).permutation(train_idx)
    calib, check = pick[:n], pick[n : n + n_check]
    return np.sort(calib), np.sort(check if len(check) else calib)


def _faces_array(faces, what: str, spec) -> np.ndarray:
    a = np.asarray(faces)
    if a.ndim != 1 + len(spec.shape) or a.shape[1:] != spec.shape or a.dtype != np.uint8:
        want = ", ".join(map(str, spec.shape))
        raise FaceattrsError(f"{what}: expected uint8 (N, {want}), got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def quantize_int8(path: Path, faces: np.ndarray, batch: int = 64) -> None:
    """Replace the fp32 graph at ``path`` by its static int8 version (QDQ, per-channel int8
    weights, uint8 activations), activation ranges (min/max) measured on ``faces``."""
    # onnxruntime: an optional dependency, loaded only to quantize
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                [{"faces": faces[i : i + batch]} for i in range(0, len(faces), batch)]
            )

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="faceattrs-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)

        def write(dst: Path) -> None:
            quantize_static(
                str(pre),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                op_types_to_quantize=["Conv", "Gemm", "MatMul"],  # the compute; norms stay fp32
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_with(path, write)


def _export_all(tm, out_dir: Path, opset: int, check_faces, quant=None) -> dict[str, str]:
    graphs, manifest = write_graphs(tm, out_dir, opset)
    spec = tm.bundle.input
    if quant is not None:
        # onnxruntime: an optional dependency, loaded only for export checks
        import onnxruntime

        for name in graphs.values():
            quantize_int8(out_dir / name, quant["faces"])
        manifest["quantization"] = {
            "precision": "int8",
            "method": "static, QDQ, int8 weights per output channel, uint8 activations, "
            "min/max activation ranges",
            "onnxruntime": onnxruntime.__version__,
            "calibration": {"faces": len(quant["faces"]), **quant["record"]},
        }
    write_json_atomic(out_dir / MANIFEST, manifest)
    if check_faces is None:
        shape = (32, *spec.shape)
        check_faces = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    diffs = agreement(tm, OnnxBackend(out_dir), check_faces)
    manifest["check"] = {"faces": len(check_faces), **diffs}
    write_json_atomic(out_dir / MANIFEST, manifest)
    if quant is not None:
        heads = [f"{h}_agreement" for h in tm.class_names]  # age bins: near-ties at edges
        low = {k: diffs[k] for k in heads if diffs[k] < 0.95}
        if low:
            log.warning("int8 and PyTorch choose the same class on only %s", low)
    else:
        worst = max(v for k, v in diffs.items() if k.endswith("probabilities"))
        if worst > 1e-3:
            log.warning("onnxruntime and PyTorch differ by up to %.2g", worst)
    return graphs


def agreement(a, b, faces: np.ndarray) -> dict[str, float]:
    """How two backends differ on ``faces``: the largest absolute difference of the logits
    and probabilities of each head (temperature-scaled), of the age bin probabilities and
    of the age (years); and the share of faces where both choose the same class
    (``HEAD_agreement``, ``age_bin_agreement``)."""
    out = {}
    la, lb = a.logits(faces), b.logits(faces)
    for h in a.class_names:
        t = a.temperatures.get(h, 1.0)
        out[f"{h}_probabilities"] = float(np.abs(softmax(la[h], t) - softmax(lb[h], t)).max())
        out[f"{h}_logits"] = float(np.abs(la[h] - lb[h]).max())
        out[f"{h}_agreement"] = float(np.mean(la[h].argmax(1) == lb[h].argmax(1)))
    aa, ab = a.age(faces), b.age(faces)
    if aa is not None and ab is not None:
        out["age_bin_probabilities"] = float(
            np.abs(aa["bin_probabilities"] - ab["bin_probabilities"]).max()
        )
        out["age_years"] = float(np.abs(aa["value"] - ab["value"]).max())
        out["age_bin_agreement"] = float(np.mean(aa["bin"] == ab["bin"]))
    return {k: round(v, 7) for k, v in out.items()}
