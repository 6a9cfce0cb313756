"""Model bundles: what ``--model`` names, resolved once into one typed object.

Every command and the Python API hand their ``--model`` value (or ``model=``) to
:func:`resolve`; nothing else reads model folders. A bundle is one of:

- a multitask **run** folder from ``faceattrs train``: ``best.safetensors`` + ``best.json``
  (+ ``config.json``), with its calibration (``calibration.json``, from ``faceattrs
  calibrate``) and its age model (``age/``, from ``faceattrs train-age``) when present;
- an **age run** folder (``age.json``): the bundle of the multitask run it was trained
  from, found by the path relative to the age run that ``age.json`` records (a copied
  age run must be copied with its multitask run; the absolute path recorded at training
  is only quoted in the error, never used);
- a **checkpoint** file (``NAME.json`` or ``NAME.safetensors``): that network alone;
- an **onnx** export folder (``faceattrs-onnx.json``, from ``faceattrs export``);
- ``None``: the default model shipped in the package, :data:`DEFAULT_MODEL_DIR` (a run
  folder as above); its int8 ONNX export, :data:`DEFAULT_INT8_DIR`, is what
  :func:`default_int8` returns (``--backend onnx --dtype int8`` without ``--model``).

A multitask network may have a third head, ``age`` (per-year logits): it is then the
bundle's age model (``age/age.json`` with ``"direct": "multitask"``, written by
``faceattrs calibrate``), never a classification head: :attr:`Bundle.heads` leaves it out.

>>> resolve("no/such/folder")
Traceback (most recent call last):
...
faceattrs.checkpoint.CheckpointError: model folder no/such/folder does not exist
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import config as cfgmod
from .age.direct import HEAD as AGE_HEAD
from .age.networks import (
    AGE_JSON,
    AgeModel,
    has_age_head,
    load_age_folder,
    read_age_json,
    shared_age_model,
)
from .checkpoint import CheckpointError, load_model, read_meta
from .exceptions import FaceattrsError
from .inputs import InputSpec
from .model import FaceResNet, ModelConfig
from .run_folder import BEST, read_calibration

ASSETS = Path(__file__).parent / "assets"
# The default model shipped in the package: used when no --model is given (``model=None``).
DEFAULT_MODEL_DIR = ASSETS / "default_model"
# Its int8 ONNX export (tools/package_int8_model.py): the fast path on CPUs.
DEFAULT_INT8_DIR = ASSETS / "default_model_int8"
# Other models shipped in the package, by name: ``--model NAME`` (model="NAME"); a folder
# of that name where the command runs is taken instead. utk48: the 48x48 grayscale model
# (v5), for faces from the public CSV.
NAMED_MODELS = {"utk48": ASSETS / "utk48_model"}
NAMED_INT8 = {"utk48": ASSETS / "utk48_model_int8"}  # their int8 exports

RUN_CONFIG = "config.json"  # the training run's settings, with its data path
ONNX_MANIFEST = "faceattrs-onnx.json"
ONNX_FORMAT = "faceattrs-onnx-1"
KINDS = ("run", "checkpoint", "onnx")


@dataclass
class Bundle:
    """A resolved model bundle; see the module docstring for the kinds.

    ``heads``: class names per classification head, in the network's head order (not
    the ``age`` head). ``temperatures``: calibration per head (``{}`` when not
    calibrated). ``age``: the age model's settings (``age.json``, or the ONNX manifest's
    ``"age"``), None without one.
    """

    kind: str
    path: Path  # the folder or file that was named
    run_dir: Path | None  # the multitask run folder (None for a checkpoint file or an export)
    checkpoint: Path | None  # the multitask checkpoint's JSON (None for an export)
    meta: dict[str, Any]  # that checkpoint's settings, or the ONNX manifest
    heads: dict[str, list[str]]
    temperatures: dict[str, float] = field(default_factory=dict)
    flip_tta: bool = False  # mirror-image averaging chosen by `faceattrs calibrate`
    age_dir: Path | None = None
    age: dict[str, Any] | None = None

    @property
    def source(self) -> Path:
        """The folder the multitask model comes from (for an export: the folder exported;
        a relative ``source`` in the manifest is relative to the export folder)."""
        if self.kind == "onnx":
            src = self.meta.get("source")
            return (
                self.path / src if src and not Path(src).is_absolute() else Path(src or self.path)
            )
        return self.run_dir or self.checkpoint.parent

    @property
    def input(self) -> InputSpec:
        """The faces the model takes (its input contract): from the checkpoint's model
        settings, or an ONNX manifest's ``input.spec`` (none recorded: 48x48 grayscale)."""
        try:
            if self.kind == "onnx":
                return InputSpec.from_dict((self.meta.get("input") or {}).get("spec"))
            return cfgmod.from_dict(ModelConfig, self.meta.get("model") or {}).input
        except (TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{self.path}: bad input settings: {e}") from None

    @property
    def precision(self) -> str:
        """The precision of an export's graphs: ``int8`` (``faceattrs export --int8``) or
        ``fp32`` (every other bundle)."""
        if self.kind != "onnx":
            return "fp32"
        return str((self.meta.get("quantization") or {}).get("precision", "fp32"))

    @property
    def age_head(self) -> bool:
        """The multitask network has the ``age`` head (three heads in one pass)."""
        return has_age_head(self.meta) or (self.kind == "onnx" and self.shared_age)

    @property
    def shared_age(self) -> bool:
        """The age model is the multitask network's own ``age`` head."""
        return bool(self.age) and self.age.get("direct") == "multitask"

    @property
    def bin_labels(self) -> list[str] | None:
        return list(self.age["bin_labels"]) if self.age else None

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the bundle's parts come from, for logs and records."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "multitask": str(self.checkpoint or self.source),
            "age": str(self.age_dir) if self.age_dir else None,
            "epoch": self.meta.get("epoch"),
            "data": self.meta.get("data"),
            "calibrated": bool(self.temperatures),
            "flip_tta": self.flip_tta,
        }

    def torch_bundle(self) -> Bundle:
        """The PyTorch bundle: this one, or for an export the run folder it came from."""
        if self.kind != "onnx":
            return self
        src = self.meta.get("source") and self.source
        if not src or not Path(src).exists():
            raise CheckpointError(
                f"{self.path} is an ONNX export and its run folder ({src}) is not here: "
                "pass the run folder"
            )
        return resolve(src)

    def not_torch(self) -> str:
        """Why an ONNX export cannot serve where a PyTorch network is needed, and the ways on."""
        src = self.meta.get("source") and self.source
        run = f"the run folder it was exported from ({src})" if src else "its run folder"
        return (
            f"{self.path} is an ONNX export and this needs the PyTorch network: pass {run}, "
            "or run the export on onnxruntime (faceattrs predict --backend onnx; "
            'FaceAnalyzer(backend="onnx"))'
        )

    def load_multitask(self, device: str | torch.device = "cpu") -> tuple[FaceResNet, dict]:
        """The multitask network in eval mode, and its checkpoint settings."""
        if self.checkpoint is None:
            raise FaceattrsError(self.not_torch())
        model, meta = load_model(self.checkpoint, device=device)
        model.flip_tta = self.flip_tta
        return model, meta

    def load_age(
        self, device: str | torch.device = "cpu", multitask: FaceResNet | None = None
    ) -> AgeModel | None:
        """The age model (coarse classifier, per-bin regressors, direct head), or None.
        For a shared age head, ``multitask`` is the network already loaded (else one is)."""
        if self.age_dir is None or self.age is None:
            return None
        if self.shared_age:
            net = multitask if multitask is not None else self.load_multitask(device)[0]
            return shared_age_model(self.age_dir, self.age, net, self.flip_tta)
        return load_age_folder(self.age_dir, self.age, device)

    def _run_config(self) -> tuple[Path, dict]:
        """The run's ``config.json`` (path, contents; {} when absent)."""
        cfg = (self.torch_bundle().run_dir or self.source) / RUN_CONFIG
        return cfg, (_read_json(cfg) if cfg.exists() else {})

    def recorded_data(self) -> Path:
        """The data path recorded in the run's ``config.json`` (relative to the run when
        it is not found as recorded)."""
        cfg, config = self._run_config()
        recorded, run = config.get("data"), self.torch_bundle().run_dir
        if not isinstance(recorded, str):
            raise FaceattrsError(f"{cfg} records no data path: pass --data PREPARED_FOLDER_or_CSV")
        path = Path(recorded)
        if not path.exists() and run is not None and (run / path).exists():
            path = run / path
        return path

    def recorded_data_key(self) -> str | None:
        """The content key of the prepared data the run was trained on: as recorded in its
        ``config.json``, else read from the recorded folder when it is on this machine."""
        # the data stage (OpenCV, CSV parsing): only for this check, never on the inference path
        from .prepare import data_key

        key = self._run_config()[1].get("data_key")
        if isinstance(key, str) and key:
            return key
        try:
            return data_key(self.recorded_data())
        except FaceattrsError:
            return None


def resolve(model: str | os.PathLike | Bundle | None) -> Bundle:
    """``--model`` (a folder, a checkpoint file, an export, or None) -> a :class:`Bundle`."""
    if isinstance(model, Bundle):
        return model
    if model is None:
        if not (DEFAULT_MODEL_DIR / f"{BEST}.json").exists():
            raise FaceattrsError(
                "no model given and no default model is bundled with this installation: "
                "train one with `faceattrs run --data CSV --out RUN --preset cpu` and pass "
                "`--model RUN` (Python: model='RUN')"
            )
        model = DEFAULT_MODEL_DIR
    elif isinstance(model, str) and model in NAMED_MODELS and not os.path.exists(model):
        model = _named(model, NAMED_MODELS)
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"model folder {path} does not exist")
    if path.is_file() and path.name in (AGE_JSON, ONNX_MANIFEST):
        path = path.parent
    if path.is_file():
        return _checkpoint_file(path)
    if (path / ONNX_MANIFEST).exists():
        return _export(path)
    if (path / f"{BEST}.json").exists():
        return _run(path, path)
    if (path / AGE_JSON).exists():
        return _run(_multitask_of_age_run(path), path, age_dir=path)
    raise CheckpointError(
        f"{path}: not a model folder (expected best.json from `faceattrs train`, age.json "
        f"from `faceattrs train-age` or {ONNX_MANIFEST} from `faceattrs export`)"
    )


def _named(name: str, folders: dict[str, Path]) -> Path:
    """The bundled model called ``name``; one line when this installation lacks it."""
    if (
        not (folders[name] / f"{BEST}.json").exists()
        and not (folders[name] / ONNX_MANIFEST).exists()
    ):
        raise FaceattrsError(f"the bundled model {name!r} is not in this installation")
    return folders[name]


def is_bundled_name(model) -> bool:
    """``model`` names a model shipped in the package (and no folder of that name is here)."""
    return isinstance(model, str) and model in NAMED_MODELS and not os.path.exists(model)


def default_int8(name: str | None = None) -> Bundle:
    """The int8 ONNX export of the default model (or of the bundled model ``name``),
    shipped in the package."""
    if name is not None:
        return resolve(_named(name, NAMED_INT8))
    if not (DEFAULT_INT8_DIR / ONNX_MANIFEST).exists():
        also = (
            " (the bundled 48x48 model has one: --model utk48 --dtype int8)"
            if (NAMED_INT8["utk48"] / ONNX_MANIFEST).exists()
            else ""
        )
        raise FaceattrsError(
            "no int8 export of the default model is bundled with this installation: make "
            f"one with `faceattrs export --int8 --data DATA --out DIR` and pass `--model DIR`{also}"
        )
    return resolve(DEFAULT_INT8_DIR)


def resolve_bundle(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(multitask run folder or checkpoint file, age run folder or None)`` of ``path``."""
    b = resolve(path)
    if b.kind == "onnx":
        raise CheckpointError(f"{b.path} is an ONNX export, not a run folder")
    return (b.run_dir or b.checkpoint), b.age_dir


def load_age_model(path, device: str | torch.device = "cpu") -> AgeModel | None:
    """The age model of a bundle (an age run, or a run holding ``age/``), or None."""
    return resolve(path).load_age(device)


def is_export(path: str | os.PathLike) -> bool:
    return (Path(path) / ONNX_MANIFEST).exists()


# ---------------------------------------------------------------- the kinds


def _heads(meta: dict, where: Path) -> dict[str, list[str]]:
    try:
        order = [h for h in meta["model"]["heads"] if h != AGE_HEAD]
        names = meta["class_names"]
        heads = {h: [str(n) for n in names[h]] for h in order}
        sizes = meta["model"]["heads"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: bad or missing heads / class names ({e})") from None
    for h, n in sizes.items():
        if h in heads and len(heads[h]) != n:
            raise CheckpointError(f"{where}: head {h!r} has {n} classes but {len(heads[h])} names")
    return heads


def _run(run_dir: Path, path: Path, age_dir: Path | None = None) -> Bundle:
    ckpt = run_dir / f"{BEST}.json"
    meta = read_meta(ckpt)
    if age_dir is None and (run_dir / "age" / AGE_JSON).exists():
        age_dir = run_dir / "age"
    temperatures, flip_tta = read_calibration(run_dir)
    age = read_age_json(age_dir) if age_dir is not None else None
    if age is not None and age.get("direct") == "multitask":
        if not has_age_head(meta):
            raise CheckpointError(
                f"{age_dir / AGE_JSON} names the multitask network's age head, but {ckpt} has none"
            )
    return Bundle(
        kind="run",
        path=path,
        run_dir=run_dir,
        checkpoint=ckpt,
        meta=meta,
        heads=_heads(meta, ckpt),
        temperatures=temperatures,
        flip_tta=flip_tta,
        age_dir=age_dir,
        age=age,
    )


def _checkpoint_file(path: Path) -> Bundle:
    if path.suffix not in (".json", ".safetensors"):
        raise CheckpointError(
            f"{path}: not a model (pass a run folder, or a checkpoint's .json / .safetensors)"
        )
    ckpt = path.with_suffix(".json")
    meta = read_meta(ckpt)
    heads = _heads(meta, ckpt)
    return Bundle("checkpoint", path, None, ckpt, meta, heads)


def _export(path: Path) -> Bundle:
    try:
        m = _read_json(path / ONNX_MANIFEST)
    except CheckpointError as e:
        raise CheckpointError(f"unreadable ONNX manifest: {e}") from None
    if m.get("format") != ONNX_FORMAT:
        raise CheckpointError(f"{path / ONNX_MANIFEST}: not a faceattrs ONNX export")
    try:
        heads = {h: [str(n) for n in v] for h, v in m["class_names"].items()}
        temps = {str(k): float(v) for k, v in (m.get("temperatures") or {}).items()}
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path / ONNX_MANIFEST}: bad class names ({e})") from None
    flip = m.get("flip_tta") is True  # baked into the graph; recorded for describe()
    return Bundle("onnx", path, None, None, m, heads, temps, flip, age=m.get("age"))


def _multitask_of_age_run(age_dir: Path) -> Path:
    """The multitask run of an age run: the path ``age.json`` records relative to it."""
    meta = read_age_json(age_dir)
    rel = meta.get("multitask")
    cand = age_dir / rel if isinstance(rel, str) and rel else None
    if cand is not None and (cand / f"{BEST}.json").exists():
        return cand.resolve()
    recorded = meta.get("multitask_absolute")
    raise CheckpointError(
        f"{age_dir}: its multitask model is missing (looked for {cand}; at training it was "
        f"{recorded}); copy the age run together with its multitask run, keeping their "
        "relative places, or pass the multitask run folder holding age/"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object (got a {type(data).__name__})")
    return data
