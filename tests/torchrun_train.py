"""``faceattrs train`` as torchrun runs it, keeping each rank's final weights for
tests/test_train_ddp.py (``torchrun ... tests/torchrun_train.py DUMP_DIR TRAIN_ARGS...``):
after training, every rank writes its model's weights to ``DUMP_DIR/rankN.safetensors``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from faceattrs.cli import main
from faceattrs.training import run as train_run

built = []
_network = train_run.build_model


def _keep(*args, **kwargs):
    built.append(_network(*args, **kwargs))
    return built[-1]


if __name__ == "__main__":
    train_run.build_model = _keep  # the network fit() trains, seen from outside
    dump, argv = Path(sys.argv[1]), sys.argv[2:]
    status = main(argv)
    weights = {k: v.detach().contiguous() for k, v in built[0].state_dict().items()}
    save_file(weights, dump / f"rank{os.environ['RANK']}.safetensors")
    sys.exit(status)
