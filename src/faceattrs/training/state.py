"""A run folder's state, saved so that a kill at any instant leaves a resumable run.

Each epoch ends with :func:`save_epoch`: first ``last_state.safetensors``
(:func:`save_train_state`: weights, optimizer, weight average, scheduler, early stopping,
history and the checkpoints' settings, in one atomic write: the epoch's commit point),
then the files derived from it (``history.csv``, ``best``, ``last``). :func:`resume_run`
reads it back (:func:`read_train_state`) and rewrites the derived files a kill left
behind; a run folder without a complete state file cannot be resumed (one line).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..age.direct import HEAD as AGE_HEAD
from ..checkpoint import CheckpointError, read_meta, save_checkpoint
from ..io import write_with
from .config import HEADS, TrainError
from .loop import write_history

log = logging.getLogger(__name__)

STATE_FILE = "last_state.safetensors"
STATE_FORMAT = "faceattrs-train-state-2"

# --------------------------------------------------------------------------- history

# three-head runs only: the age head's training loss, validation MAE and CS@5
AGE_COLUMNS = (f"train_loss_{AGE_HEAD}", f"val_{AGE_HEAD}_mae", f"val_{AGE_HEAD}_cs5")


def history_fields(heads=HEADS, age: bool = False) -> list[str]:
    """Columns of ``history.csv``: per epoch, losses and validation scores of every head;
    ``age``: also the age head's training loss and its validation MAE and CS@5 (median of
    its years, unclipped)."""
    return [
        "epoch", "lr", "seconds", "images_per_s", "train_loss",
        *(f"train_loss_{h}" for h in heads), "val_loss",
        *(f"val_{h}_{m}" for h in heads for m in ("accuracy", "macro_f1")), "val_score",
        *(AGE_COLUMNS if age else ()),
    ]  # fmt: skip


HISTORY_FIELDS = history_fields()


def _fields(rows: list[dict]) -> list[str]:
    """The columns for these history rows: their heads' (the reference's when none), with
    the age columns when any row has them."""
    keys = dict.fromkeys(k for r in rows for k in r)
    heads = [k.removeprefix("train_loss_") for k in keys
             if k.startswith("train_loss_") and k not in AGE_COLUMNS]  # fmt: skip
    return history_fields(heads or HEADS, age=any(AGE_COLUMNS[1] in r for r in rows))


# --------------------------------------------------------------------------- the state file


def save_train_state(
    run_dir: Path,
    epoch: int,
    optimizer,
    scheduler,
    stopper,
    model: torch.nn.Module,
    record: dict[str, Any],
    ema: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Everything a resume needs -> ``last_state.safetensors``, in one atomic write;
    returns the JSON-able part (the caller copies it into ``last.json``, for reading).

    The file is complete on its own: the model's weights (``model.*``), the optimizer's
    tensors (``optim.PID.NAME``), the weight average's state when there is one
    (``ema.*``), and in its metadata the epoch, the scheduler, early-stopping and optimizer
    settings and ``record`` (history rows and checkpoint settings of the epoch). One file
    replaced in one rename is the commit point of an epoch: a kill at any instant leaves
    the previous epoch's complete state or the new one, never a mix (``best``/``last`` are
    rebuilt from it on resume).
    """
    sd = optimizer.state_dict()
    tensors = {
        f"optim.{pid}.{k}": v.detach().to("cpu").contiguous()
        for pid, st in sd["state"].items()
        for k, v in st.items()
        if torch.is_tensor(v)
    }
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    resume = {
        "state_file": STATE_FILE,
        "epoch": epoch,
        "optimizer_param_groups": sd["param_groups"],
        "scheduler": sched,
        "early_stopping": stopper.state_dict(),
    }
    inner = getattr(model, "module", model)  # unwrap DDP / compiled models
    inner = getattr(inner, "_orig_mod", inner)
    tensors.update(
        {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in inner.state_dict().items()}
    )
    if ema is not None:
        tensors.update(
            {f"ema.{k}": v.detach().to("cpu").contiguous() for k, v in ema.state_dict().items()}
        )
    metadata = {
        "epoch": str(epoch),
        "format": STATE_FORMAT,
        "resume": json.dumps(resume, default=_jsonable),
        "record": json.dumps(record, default=_jsonable),
    }
    write_with(run_dir / STATE_FILE, lambda p: save_file(tensors, str(p), metadata=metadata))
    return resume


def read_train_state(run_dir: Path) -> dict[str, Any]:
    """The saved resume state: ``{"epoch", "resume", "record", "model", "optim", "ema"}``
    (``ema``: empty without a weight average). TrainError when ``run_dir`` holds no
    complete state file of this format (killed before its first epoch ended, or saved by
    an older version)."""
    path = run_dir / STATE_FILE
    if not path.exists():
        raise TrainError(
            f"cannot resume {run_dir}: no {STATE_FILE} (the run ended before its first epoch "
            "did, or an older version saved it); train it again with another --out"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise TrainError(f"cannot resume: {path} is unreadable ({e})") from None
    if meta.get("format") != STATE_FORMAT:
        raise TrainError(
            f"cannot resume {run_dir}: {path} is not a complete resume state of this "
            "version (an older version saved it); train it again with another --out"
        )
    try:
        flat = load_file(str(path))
        resume, record = json.loads(meta["resume"]), json.loads(meta["record"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise TrainError(f"cannot resume: {path} is unreadable ({e})") from None
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        if key.startswith("optim."):
            pid, name = key[len("optim.") :].split(".", 1)
            optim.setdefault(int(pid), {})[name] = v
    model = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
    ema = {k[len("ema.") :]: v for k, v in flat.items() if k.startswith("ema.")}
    return {"epoch": int(meta["epoch"]), "resume": resume, "record": record, "model": model,
            "optim": optim, "ema": ema}  # fmt: skip


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------- an epoch's files


def save_epoch(
    out_dir, epoch, model, optimizer, scheduler, stopper, meta, history, improved, ema=None
):
    """Write an epoch's files so that a kill at any instant leaves a resumable run.

    1. ``last_state.safetensors``: the complete resume state (weights, optimizer, weight
       average, history, settings) in one atomic write: the epoch's commit point;
    2. ``history.csv``, ``best`` (when improved) and ``last``: derived from it; each
       checkpoint's JSON is removed first and written last, so a reader never pairs one
       epoch's JSON with another's weights. A kill among them is repaired on resume.
       With a weight average (``ema``), the checkpoints hold the average, the model that
       was evaluated.
    """
    record = {"history": history, "meta": meta}
    resume = save_train_state(out_dir, epoch, optimizer, scheduler, stopper, model, record, ema)
    write_history(out_dir / "history.csv", history, _fields(history))
    served = ema.module if ema is not None else model
    if improved:
        _save_pair(out_dir, "best", served, {**meta, "kind": "best"})
    _save_pair(out_dir, "last", served, {**meta, "kind": "last", "resume": resume})


def _save_pair(out_dir: Path, name: str, model, meta: dict) -> None:
    (out_dir / f"{name}.json").unlink(missing_ok=True)
    save_checkpoint(out_dir, name, model, meta)


def _json_epoch(path: Path) -> int | None:
    try:
        return int(read_meta(path)["epoch"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def check_fresh(out_dir: Path) -> None:
    """TrainError when ``out_dir`` already holds a run (a fresh run never overwrites one)."""
    held = ("last.json", "best.json", STATE_FILE)
    if any((out_dir / name).exists() for name in held):
        raise TrainError(
            f"{out_dir} already holds a run: continue it with --resume {out_dir}, "
            "or choose another --out"
        )


def resume_run(
    out_dir: Path, model, optimizer, scheduler, stopper, main: bool = True, ema=None
) -> tuple[int, list[dict]]:
    """Load the saved state into the objects; returns (first epoch to run, history so far).

    The files derived from the state that a kill left behind (``history.csv``, ``best``,
    ``last``) are rewritten first (by rank 0: ``main``).
    """
    snap = read_train_state(out_dir)
    model.load_state_dict(snap["model"])
    resume = snap["resume"]
    try:
        optimizer.load_state_dict(
            {"state": snap["optim"], "param_groups": resume["optimizer_param_groups"]}
        )
    except ValueError:  # another number of trained weights than the saved state's
        raise TrainError(
            f"cannot resume {out_dir}: its optimiser state is for other trained weights; "
            "keep its freeze setting"
        ) from None
    scheduler.load_state_dict(
        {**resume["scheduler"], "lr_lambdas": scheduler.state_dict()["lr_lambdas"]}
    )
    stopper.load_state_dict(resume["early_stopping"])
    if (ema is not None) != bool(snap["ema"]):
        raise TrainError(
            f"cannot resume {out_dir}: it was trained {'with' if snap['ema'] else 'without'}"
            " a weight average (ema); keep its ema setting"
        )
    served = model
    if ema is not None:
        ema.load_state_dict(snap["ema"])
        served = ema.module
    epoch, rows, meta = snap["epoch"], snap["record"]["history"], snap["record"]["meta"]
    if main:
        write_history(out_dir / "history.csv", rows, _fields(rows))
        if stopper.best_epoch == epoch and _json_epoch(out_dir / "best.json") != epoch:
            log.info("rebuilding best (epoch %d) from the saved state", epoch)
            _save_pair(out_dir, "best", served, {**meta, "kind": "best"})
        if _json_epoch(out_dir / "last.json") != epoch:
            log.info("rebuilding last (epoch %d) from the saved state", epoch)
            _save_pair(out_dir, "last", served, {**meta, "kind": "last", "resume": resume})
    log.info("resuming %s after epoch %d (best %s at epoch %d)", out_dir, epoch,
             stopper.best, stopper.best_epoch)  # fmt: skip
    return epoch + 1, rows
