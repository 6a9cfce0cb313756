"""Train the multitask (gender + ethnicity) model.

    faceattrs train --data local/prepared --out runs/cpu --preset cpu
    faceattrs train --data local/prepared --out runs/paper --preset paper batch_size=256
    faceattrs train --resume runs/cpu                      # continue an interrupted run
    torchrun --nproc_per_node=4 -m faceattrs train --data local/prepared --out runs/p --preset paper

Settings are ``KEY=VALUE`` words after the options (``lr=1e-3 epochs=20
augment.rotation=5``); command line > preset > defaults; the resolved settings are saved
in RUN/config.json. See docs/training.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..exceptions import FaceattrsError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="prepared folder or CSV (as `faceattrs prepare` reads it)")
    p.add_argument("--out", help="run folder to create (holds best/last checkpoints, history)")
    p.add_argument(
        "--preset", default="paper",
        help="paper (the reference), cpu, rgb, dlib or dlib-heads: docs/training.md "
        "(default: paper)",
    )  # fmt: skip
    p.add_argument("--resume", metavar="RUN", help="continue the interrupted run in RUN")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings, e.g. epochs=10")
    p.add_argument("--set", dest="more", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting (same as a KEY=VALUE word; may repeat)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ..devices import check_device
    from ..prepare import load_faces
    from ..training import fit, resolve_config, resume_settings

    overrides = list(args.overrides) + list(args.more)
    if args.resume:
        out = Path(args.resume)
        if args.out and Path(args.out) != out:
            raise FaceattrsError("--resume RUN continues RUN in place; drop --out or make it RUN")
        cfg, data = resume_settings(out, overrides, args.data)  # overrides: e.g. epochs=60
    else:
        if not args.data or not args.out:
            raise FaceattrsError("--data and --out are required (or --resume RUN)")
        cfg = resolve_config(args.preset, overrides)
        out, data = Path(args.out), args.data
    check_device(cfg.device)  # before any work (load_faces may prepare a CSV)
    faces = load_faces(data)
    summary = fit(faces, out, cfg, resume=bool(args.resume),
                  data_ref=str(Path(data).resolve()), progress=not args.no_progress)  # fmt: skip
    if summary.get("world_size", 1) == 1 or _rank0():
        print(
            f"best epoch {summary['best_epoch']}: val mean macro-F1 {summary['best_score']:.4f} "
            f"({summary['epochs_run']} epochs, {summary['seconds']:.0f} s this session) -> {out}"
        )
    return 0


def _rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
