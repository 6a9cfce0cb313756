"""Cluster the misclassified ethnicity test faces (or another head's, --head) by their
embeddings (k-means) and describe each cluster with measured numbers: size, class mix,
brightness, contrast; montage and PCA.

    faceattrs errors --model runs/paper
    faceattrs errors --model runs/paper --head gender

Writes RUN/errors/clusters.json, montage.png and pca.png.
"""

from __future__ import annotations

from pathlib import Path

from .evaluate import add_common


def add_arguments(p) -> None:
    add_common(p)
    p.add_argument(
        "--k", type=int, default=3, help="number of clusters (default 3, as the reference)"
    )
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    p.add_argument(
        "--head",
        default="ethnicity",
        help="the head whose mistakes are clustered (default ethnicity)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN/errors)")


def run(args) -> int:
    from ..errors import cluster_errors
    from ..evaluate import default_out, load_data, resolve_device
    from ..exceptions import FaceattrsError

    if args.k < 1:
        raise FaceattrsError(f"--k must be at least 1, got {args.k}")
    device = resolve_device(args.device)  # a bad device: one line, before any work
    faces = load_data(args.model, args.data, args.split)
    out = Path(args.out) if args.out else default_out(args.model, "errors", args.split)
    result = cluster_errors(
        args.model, faces, out, k=args.k, seed=args.seed, split=args.split, device=device,
        head=args.head,
    )  # fmt: skip
    for cl in result["clusters"]:
        print(f"cluster {cl['cluster']} (n={cl['size']}): {cl['description']}")
    print(out / "clusters.json")
    return 0
