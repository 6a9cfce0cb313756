"""Grad-CAM heat maps of the gender and ethnicity heads, for the faces in an ordinary photo
or for misclassified test faces of some ethnicity classes.

    faceattrs explain --model runs/paper --image ../shared/data/photos/26_0_3_20170119183349137.jpg
    faceattrs explain --model runs/paper --misclassified Indian,Other

Overlays (with predicted labels and probabilities), the 48x48 maps and a JSON go to RUN/explain.
"""

from __future__ import annotations

from pathlib import Path

from ..inputs import MAX_PIXELS
from .evaluate import add_common


def add_arguments(p) -> None:
    add_common(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", metavar="PHOTO", help="a photo: find its faces and explain them")
    what.add_argument(
        "--misclassified",
        metavar="CLASSES",
        help="comma-separated ethnicities, e.g. Indian,Other: explain their test mistakes",
    )
    p.add_argument(
        "--max-faces", type=int, default=16, help="faces in the misclassified grid (default 16)"
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN/explain)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help="with --image: refuse larger photos (decompression-bomb guard; 0 = no limit; "
        f"default {MAX_PIXELS:,})",
    )


def run(args) -> int:
    from ..evaluate import load_data, resolve_device
    from ..exceptions import FaceattrsError
    from ..explain import explain_misclassified, explain_photo, parse_classes

    out = Path(args.out) if args.out else Path(args.model or ".") / "explain"
    device = resolve_device(args.device)
    if args.max_faces < 1:
        raise FaceattrsError(f"--max-faces must be at least 1, got {args.max_faces}")
    if args.max_pixels is not None and args.max_pixels < 0:
        raise FaceattrsError(
            f"--max-pixels must be at least 0 (0 = no limit), got {args.max_pixels}"
        )
    if args.image:
        result = explain_photo(args.model, args.image, out, device, args.max_pixels)
        for i, face in enumerate(result["faces"]):
            g, e = face["gender"], face["ethnicity"]
            print(
                f"face {i} at {face['box']}: {g['label']} ({g['probability']:.2f}), "
                f"{e['label']} ({e['probability']:.2f})"
            )
    else:
        parse_classes(args.misclassified)  # a typo fails before the data is read
        faces = load_data(args.model, args.data, args.split)
        result = explain_misclassified(
            args.model,
            faces,
            args.misclassified,
            out,
            split=args.split,
            max_faces=args.max_faces,
            device=device,
        )
        print(f"{result['n_shown']} of {result['n_misclassified']} misclassified faces shown")
    for name in result.get("figures", []):
        print(out / name)
    return 0
