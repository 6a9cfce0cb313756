"""Distributed training: DDP with two gloo processes (metrics across ranks), torchrun (one
log, one set of files, the same weights on every rank), torchrun runs only train."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import synthetic_faceset
from safetensors.torch import load_file
from train_helpers import TINY, read_history

from faceattrs import training as T
from faceattrs.checkpoint import load_model
from faceattrs.training.loop import evaluate_heads
from faceattrs.training.run import split_tensors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    from faceattrs import training as TT
    from faceattrs.training.loop import evaluate_heads as ev
    from faceattrs.training.run import split_tensors as split

    faces = synthetic_faceset(80)
    cfg = TT.resolve_config("paper", {**TINY, "epochs": 1, "batch_size": 8})
    summary = TT.fit(faces, Path(tmp) / "run", cfg, progress=False)
    # metrics across ranks: each rank scores its shard, the result is the whole set's
    best, _ = load_model(Path(tmp) / "run", "best")
    val = split(faces, "val", 0, 0, torch.device("cpu"))
    shard = torch.arange(rank, len(val["image"]), world)
    result = ev(best, val, TT.HEADS, indices=shard)
    out = {"summary": summary, "eval": result}
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["summary"]["world_size"] == 2
    assert r0["summary"]["best_score"] == r1["summary"]["best_score"]  # same metrics on ranks
    assert r0["eval"] == r1["eval"]
    # the sharded, all-reduced evaluation equals one process scoring the whole split
    best, _ = load_model(tmp_path / "run", "best")
    faces = synthetic_faceset(80)
    val = split_tensors(faces, "val", 0, 0, torch.device("cpu"))
    whole = evaluate_heads(best, val, T.HEADS)
    assert r0["eval"]["ethnicity"]["confusion"] == whole["ethnicity"]["confusion"]
    assert r0["eval"]["gender"]["macro_f1"] == pytest.approx(whole["gender"]["macro_f1"])
    rows = read_history(tmp_path / "run" / "history.csv")
    assert len(rows) == 1 and math.isfinite(float(rows[-1]["train_loss"]))
    # each rank trained on half the epoch: 64 train faces / 2 ranks / batch 8 = 4 steps
    assert json.loads((tmp_path / "run" / "last.json").read_text())["resume"]["scheduler"][
        "last_epoch"] == 4  # fmt: skip


def test_torchrun_two_processes_one_log_one_set_of_files(tmp_path):
    """``torchrun --nproc_per_node=2 -m faceattrs train`` on CPU (gloo): one log (rank 0's),
    one set of files (those of a one-process run), the same weights on both ranks."""
    import subprocess
    import sys

    from conftest import tiny_csv

    from faceattrs.cli import main

    prepared = tmp_path / "prepared"
    assert main(["prepare", "--data", str(tiny_csv(tmp_path)), "--out", str(prepared)]) == 0
    settings = [f"{k}={v}" for k, v in {**TINY, "epochs": 1, "batch_size": 8}.items()]
    one = tmp_path / "one"
    assert main(["train", "--data", str(prepared), "--out", str(one), *settings]) == 0
    run, dump = tmp_path / "two", tmp_path / "dump"
    dump.mkdir()
    script = Path(__file__).with_name("torchrun_train.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), str(dump), "train", "--data", str(prepared), "--out", str(run),
         *settings],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    for line in ("training ", "epoch 1/1 ", "best epoch 1"):
        assert sum(row.startswith(line) for row in log.splitlines()) == 1, (line, log)
    assert "[rank 1]" not in log, log
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in one.iterdir())
    ranks = [load_file(dump / f"rank{r}.safetensors") for r in (0, 1)]
    saved = load_file(run / "last.safetensors")
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 10
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name  # parameters and BatchNorm statistics
        if name in saved:
            assert torch.equal(value, saved[name]), name
    assert json.loads((run / "config.json").read_text())["world_size"] == 2


def test_torchrun_runs_only_train(monkeypatch, capsys):
    from faceattrs.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", "--model", "runs/none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "under torchrun only train" in err, err
