"""Serve the model: an HTTP API (POST /analyze, GET /health, GET /model) and a web page.

    faceattrs serve --model runs/cpu        # open http://127.0.0.1:8000/

Binds to loopback unless --host says otherwise. The models load once at start-up; the
start-up line gives the URL. Requests go through a bounded queue to one model thread
(full: 503 with Retry-After); see docs/serve.md.
"""

from __future__ import annotations

from ..inputs import MAX_PIXELS
from .predict import add_dtype


def add_arguments(p) -> None:
    p.add_argument("--model", help="run folder (default: the model bundled with the package)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes, each with its own model (default 1)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=10.0,
        help="refuse request bodies over this many MB with 413 (default 10)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"refuse images with more pixels with 413 (default {MAX_PIXELS:,})",
    )
    p.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    p.add_argument(
        "--queue",
        type=int,
        default=32,
        help="requests waiting for the model; more get 503 (default 32)",
    )
    p.add_argument(
        "--batch-images",
        type=int,
        default=8,
        help="images of waiting requests analysed together (default 8)",
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
        "--photo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a detection / crop setting of faceattrs.photo.PhotoConfig (repeatable)",
    )


def run(args) -> int:
    from .. import config as cfgmod
    from ..exceptions import FaceattrsError
    from ..photo.config import PhotoConfig

    try:
        from ..serve import ServeConfig, serve
    except ImportError as e:
        raise FaceattrsError(
            f"serving needs FastAPI and uvicorn ({e.name} is missing): "
            "pip install 'faceattrs[serve]'"
        ) from None
    from ..devices import check_device
    from .predict import check_photo_config, check_photo_overrides

    photo = cfgmod.parse_overrides(args.photo_set)
    check_photo_overrides(photo)
    check_photo_config(cfgmod.replace(PhotoConfig(), photo))  # one line, exit 2
    if not 0 < args.max_upload_mb < 1e6:  # NaN fails too
        raise FaceattrsError(
            f"--max-upload-mb must be a positive number of megabytes, got {args.max_upload_mb}"
        )
    check_device(args.device)
    cfg = ServeConfig(
        model=args.model,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_images=args.max_images,
        queue_size=args.queue,
        batch_images=args.batch_images,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        photo=photo,
    )
    serve(cfg, host=args.host, port=args.port, workers=args.workers)
    return 0
