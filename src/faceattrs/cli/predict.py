"""Faces in photos -> gender, ethnicity and age, one record per face.

    faceattrs predict ../shared/data/photos --model runs/cpu --out results.jsonl

PATH: files, folders (searched recursively for image files) and globs. Records go to
--out (.jsonl or .csv; JSON lines on stdout without it). A file that cannot be used
(not an image, truncated, too large, unreadable, no face) gets an error record and a
line on stderr, and the others are still processed; the exit status is 1 when any file failed, 2 for a missing
or inconsistent model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys

from .. import config as cfgmod
from ..inputs import MAX_PIXELS

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or globs")
    p.add_argument(
        "--model",
        help="run folder (or ONNX export with --backend onnx); "
        "default: the model bundled with the package",
    )
    p.add_argument("--out", help="results file: .jsonl or .csv (default: JSON lines on stdout)")
    p.add_argument(
        "--annotate", metavar="DIR", help="save copies of the photos with boxes and labels"
    )
    p.add_argument("--explain", metavar="DIR", help="save Grad-CAM overlays, one PNG per face")
    p.add_argument("--batch-size", type=int, default=64, help="faces per model call (default 64)")
    p.add_argument(
        "--no-detect",
        action="store_true",
        help="each image is one already-cropped face (no detection)",
    )
    p.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        help="torch (default) or onnx (onnxruntime; the default with --dtype int8)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    add_dtype(p)
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads of the models, in one stream (default: two streams of half the "
        "cores each)",
    )
    p.add_argument(
        "--photo-workers",
        choices=("auto", "threads", "processes"),
        default="auto",
        help="decode and detect in threads or in worker processes (default auto: processes "
        "for 16 files or more, on two or more cores)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"refuse larger images (decompression-bomb guard; default {MAX_PIXELS:,})",
    )
    p.add_argument(
        "--photo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a detection / crop setting of faceattrs.photo.PhotoConfig, e.g. min_face=40 "
        "(repeat for more)",
    )
    add_engine(p)


def add_engine(p) -> None:
    """``--engine ray`` and its options (docs/distributed.md)."""
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (default: this process) or ray: a pool of Ray workers (pip install -e "
        "'.[ray]'); it also reads list files (.txt) and Parquet tables, writes .parquet",
    )
    p.add_argument(
        "--address",
        help="ray: join this cluster (auto, ray://HOST:10001; default: start a local Ray)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        help="ray: workers, one model each (default: the cluster's CPUs / --threads)",
    )


def add_dtype(p) -> None:
    """``--dtype``, as predict and serve take it."""
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="fp32 (default); bf16: torch autocast; int8: an int8 ONNX export on "
        "onnxruntime, about 2x faster on CPUs (without --model: the one bundled)",
    )


def check_options(args) -> None:
    """The ranges of the options that are not inference settings, before any work (one
    line, exit 2); :func:`inference_settings` checks the rest."""
    if args.max_pixels < 0:
        raise cfgmod.ConfigError(
            f"--max-pixels must be at least 0 (0 = no limit), got {args.max_pixels}"
        )
    for flag, value in (("--annotate", args.annotate), ("--explain", args.explain)):
        if value is not None and not str(value).strip():
            raise cfgmod.ConfigError(f"{flag} needs a folder name, got an empty one")
    if args.engine == "ray":
        check_engine(args)
    elif args.address is not None or args.num_workers is not None:
        raise cfgmod.ConfigError("--address and --num-workers go with --engine ray")


def inference_settings(args):
    """The :class:`faceattrs.settings.InferenceSettings` of the options (checked: one line
    naming the option), the device checked on this machine for the torch backend."""
    from ..devices import check_device
    from ..settings import InferenceSettings

    settings = InferenceSettings(
        backend=args.backend,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
        photo_workers=args.photo_workers,
        options=True,
    )
    if settings.backend == "torch" and args.engine == "local":  # with ray: the workers'
        check_device(settings.device)
    return settings


def check_engine(args) -> None:
    """What ``--engine ray`` does not do (the pictures are written by this process)."""
    for flag, value in (("--annotate", args.annotate), ("--explain", args.explain)):
        if value is not None:
            raise cfgmod.ConfigError(f"{flag} is not available with --engine ray")
    if args.num_workers is not None and args.num_workers < 1:
        raise cfgmod.ConfigError(f"--num-workers must be at least 1, got {args.num_workers}")


def check_photo_overrides(overrides) -> None:
    """``--photo-set`` must not carry what has its own option (it would be overwritten)."""
    if "max_pixels" in overrides:
        raise cfgmod.ConfigError("set the pixel limit with --max-pixels, not --photo-set")


def check_photo_config(photo) -> None:
    """The cascades ``photo`` names are present (its ranges it checks itself)."""
    photo.check_cascades()  # PhotoError naming the file when missing


def run(args) -> int:
    from ..photo.config import PhotoConfig
    from ..predict_files import failure_lines, predict_files

    settings = inference_settings(args)  # its errors first, as the options are listed
    check_options(args)
    check_photo_overrides(cfgmod.parse_overrides(args.photo_set))
    photo = cfgmod.resolve(PhotoConfig, {}, None, args.photo_set)
    photo = cfgmod.replace(photo, {"max_pixels": args.max_pixels})
    check_photo_config(photo)
    predict = predict_files
    if args.engine == "ray":  # the same arguments, and the cluster's
        from ..distributed import predict_ray

        predict = functools.partial(predict_ray, address=args.address, num_workers=args.num_workers)
    counts = predict(
        args.paths,
        args.model,
        out=args.out,
        annotate_dir=args.annotate,
        explain_dir=args.explain,
        detect=not args.no_detect,
        settings=dataclasses.replace(settings, photo=photo),
    )
    for line in failure_lines(counts, args.out):
        print(line, file=sys.stderr)
    log.info(
        "%d file(s), %d face(s), %d failed%s",
        counts["files"],
        counts["faces"],
        counts["failed"],
        f" -> {args.out}" if args.out else "",
    )
    return 1 if counts["failed"] else 0
