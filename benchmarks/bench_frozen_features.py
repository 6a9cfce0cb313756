"""Speed of the frozen-backbone fast path's one pass: the backbone's features of ``--n``
prepared faces, as ``fit`` computes them with ``freeze=backbone augment.enabled=false``
(:func:`faceattrs.training.weights.backbone_features`: eval mode, no gradients, batches of
``eval_batch_size``, channels-last, bf16 autocast or not), for the network a preset builds
from its ``init`` (``dlib-heads``: dlib's weights). One warm-up batch of 8 faces first;
then one timed pass per ``--bf16`` value. Reads only the first ``--n`` faces of an
uncompressed ``faces.npz`` (what ``faceattrs prepare`` writes).

Run: ``PYTHONPATH=src python benchmarks/bench_frozen_features.py --data local/prepared_dlib``
"""

from __future__ import annotations

import argparse
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npformat

from faceattrs import training as T
from faceattrs.model import build_model
from faceattrs.training.weights import backbone_features


def first_faces(folder: Path, n: int) -> np.ndarray:
    """The first ``n`` images of ``folder/faces.npz`` without reading the rest."""
    with zipfile.ZipFile(folder / "faces.npz") as z, z.open("images.npy") as f:
        version = npformat.read_magic(f)
        read = (
            npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        )
        shape, _, dtype = read(f)
        n = min(n, shape[0])
        count = n * int(np.prod(shape[1:]))
        return np.frombuffer(f.read(count * dtype.itemsize), dtype).reshape(n, *shape[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a prepared folder")
    ap.add_argument("--preset", default="dlib-heads")
    ap.add_argument("--n", type=int, default=256, help="faces to pass")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", default="off,on", help="comma-separated: off, on")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = torch.from_numpy(first_faces(args.data, args.n).copy())
    cfg = T.resolve_config(args.preset, {"device": "cpu"})
    net = build_model(T.model_config(cfg))
    if cfg.init:
        T.load_init(net, cfg.init, cfg.init_member)
    net = net.to(memory_format=torch.channels_last)
    for word in args.bf16.split(","):
        bf16 = word.strip() == "on"
        settings = {"bf16": bf16, "channels_last": True}
        backbone_features(net, {"image": images[:8]}, lambda b: b["image"], batch_size=8,
                          **settings)  # fmt: skip
        t0 = time.perf_counter()
        out = backbone_features(net, {"image": images}, lambda b: b["image"],
                                batch_size=cfg.eval_batch_size, **settings)  # fmt: skip
        seconds = time.perf_counter() - t0
        print(f"{args.preset} bf16={'on' if bf16 else 'off'}: {len(images)} faces in "
              f"{seconds:.2f} s ({len(images) / seconds:.0f} faces/s, {args.threads} thread(s)), "
              f"features {tuple(out.shape)} {out.dtype}")  # fmt: skip


if __name__ == "__main__":
    main()
