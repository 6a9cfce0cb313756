"""Every stage in order: prepare, train, calibrate, age, evaluate, errors, explain, report.

    faceattrs run --data ../shared/data/utkface48.csv.gz --out runs/cpu --preset cpu

Each stage writes into the run folder exactly what its own command would, so the run can
be continued or re-done stage by stage with the individual commands.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .age import PRESETS as AGE_PRESETS
from .age import AgeConfig, train_age
from .calibrate import calibrate_run
from .config import resolve
from .errors import cluster_errors
from .evaluate import evaluate_run
from .explain import explain_misclassified
from .prepare import PrepareConfig, load_prepared, prepare
from .report import build_report
from .training import fit, resolve_config, resume_settings

log = logging.getLogger(__name__)

STAGES = ("prepare", "train", "calibrate", "age", "evaluate", "errors", "explain", "report")


def run_all(
    data: str | Path,
    out: str | Path,
    preset: str = "cpu",
    overrides=(),
    age: bool = True,
    age_overrides=(),
    explain_classes: str = "Indian,Other",
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Run every stage into ``out``; returns the path of ``report.html``.

    ``overrides`` are training settings (``["epochs=3"]``), ``age_overrides`` age settings.
    """

    out = Path(out)
    timings = {}

    def stage(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        log.info("== %s", name)
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    prepared = out / "data"
    stage("prepare", prepare, data, prepared, PrepareConfig())
    faces = load_prepared(prepared)
    resume = resume and (out / "last.json").exists()
    # resuming continues the run's saved settings (changed by ``overrides``), as `train --resume`
    cfg = resume_settings(out, overrides)[0] if resume else resolve_config(preset, overrides)
    stage("train", fit, faces, out, cfg, resume=resume, data_ref=str(prepared.resolve()),
          progress=progress)  # fmt: skip
    # the reference has no test-time flip: the paper preset keeps it off
    stage("calibrate", calibrate_run, out, faces, flip_tta="off" if preset == "paper" else "auto")
    if age and cfg.age_head:  # the network's own age head is the age model (calibrate wrote it)
        log.info("age: the network's own age head (age_head=true); no two-stage age model")
    elif age:
        age_preset = preset if preset in AGE_PRESETS else None
        age_cfg = resolve(AgeConfig, AGE_PRESETS, age_preset, age_overrides)
        stage(
            "age",
            train_age,
            out,
            faces,
            out / "age",
            age_cfg,
            info={"data": str(prepared.resolve())},
            overwrite=True,
        )
    stage("evaluate", evaluate_run, out, faces, "test", out / "eval")
    stage("errors", cluster_errors, out, faces, out / "errors")
    stage("explain", explain_misclassified, out, faces, explain_classes, out / "explain")
    report = stage("report", build_report, out)
    log.info("stage seconds: %s", timings)
    return report
