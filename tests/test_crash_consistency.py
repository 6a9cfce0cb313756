"""Nothing lost: crash consistency of prepare, train, predict and the age bundle (a "kill"
injected at every rename or write, in process and in a child killed with ``os._exit``),
stale temp files of dead writers, SIGTERM. Bad inputs: tests/test_bad_inputs.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset
from reliability_helpers import csv_of, face_png, one_line_error
from safetensors.torch import load_file, save_file

from faceattrs import io as fio
from faceattrs import training as T
from faceattrs.cli import main
from faceattrs.data import DataError
from faceattrs.prepare import load_prepared, prepare
from faceattrs.training import run as training_run

REPO = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands for a kill: no ``except Exception`` catches it."""


def kill_at(monkeypatch, n: int) -> list[int]:
    """Make the ``n``-th ``os.replace`` (every atomic write ends with one) die right after
    it renamed; returns the call counter."""
    real = os.replace
    calls = [0]

    def replace(a, b):
        calls[0] += 1
        real(a, b)
        if calls[0] == n:
            raise Killed(f"killed after rename {n}: {b}")

    monkeypatch.setattr(fio.os, "replace", replace)
    return calls


# ------------------------------------------------------------------ prepare: crashes


def faces_equal(a, b) -> bool:
    return all(
        np.array_equal(getattr(a, k), getattr(b, k))
        for k in ("images", "age", "gender", "ethnicity", "split")
    )


def cheap_figures(monkeypatch):
    """Figures as one small atomic write each (matplotlib costs seconds; the write points,
    which are what a kill can fall between, stay)."""
    import faceattrs.prepare as P

    def figures(out, *args):
        for name in ("label_distribution.png", "duplicate_pairs.png"):
            fio.write_bytes_atomic(out / name, b"png")

    monkeypatch.setattr(P, "_figures", figures)


def test_prepare_killed_at_any_write_never_serves_mixed_or_stale_data(tmp_path, monkeypatch):
    cheap_figures(monkeypatch)
    big, small = csv_of(tmp_path / "big.csv", 60), csv_of(tmp_path / "small.csv", 20, seed=1)
    prepare(big, tmp_path / "ref_big")
    prepare(small, tmp_path / "ref_small")
    ref_big, ref_small = load_prepared(tmp_path / "ref_big"), load_prepared(tmp_path / "ref_small")
    calls = kill_at(monkeypatch, 0)
    prepare(small, tmp_path / "count")
    writes = calls[0]
    assert writes >= 5  # manifest marker, faces, removed.csv, report, figures, manifest
    for n in range(1, writes + 1):
        out = tmp_path / f"x{n}"
        prepare(big, out)
        kill_at(monkeypatch, n)
        with pytest.raises(Killed):
            prepare(small, out)
        monkeypatch.undo()
        cheap_figures(monkeypatch)
        # a reader sees the old data whole, or a clear error: never the new faces as if done
        try:
            seen = load_prepared(out)
            assert faces_equal(seen, ref_big) or (n == writes and faces_equal(seen, ref_small))
        except DataError as e:
            assert "run `faceattrs prepare` again" in str(e)
        prepare(big, out)  # the cache check must see through it
        assert faces_equal(load_prepared(out), ref_big), n


def test_prepare_killed_in_a_subprocess_then_cached_correctly(tmp_path):
    """The issue's case, with a real kill (os._exit) between write and rename: the big
    file's cache is not served for stale data and the killed run's temp file is removed."""
    big, small = csv_of(tmp_path / "big.csv", 60), csv_of(tmp_path / "small.csv", 20, seed=1)
    out = tmp_path / "x"
    prepare(big, out)
    before = load_prepared(out)
    rc = crash_subprocess(["prepare", "--data", str(small), "--out", str(out)], at=2, mode="before")
    assert rc == 86
    assert [p.name for p in out.glob(".faces.npz.*")]  # the killed writer's temp file
    prepare(big, out)
    assert not list(out.glob(".faces.npz.*"))  # cleaned on the next start
    assert faces_equal(load_prepared(out), before)


CRASH = textwrap.dedent(
    """
    import os, sys
    n, mode = int(os.environ["CRASH_AT"]), os.environ["CRASH_MODE"]
    real, calls = os.replace, [0]
    def replace(a, b):
        calls[0] += 1
        if calls[0] == n and mode == "before":
            os._exit(86)
        real(a, b)
        if calls[0] == n:
            os._exit(86)
    os.replace = replace
    from faceattrs.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def crash_subprocess(argv: list[str], at: int, mode: str = "after") -> int:
    """Run the CLI in a child that dies (``os._exit``) at the ``at``-th ``os.replace``."""
    env = {**os.environ, "CRASH_AT": str(at), "CRASH_MODE": mode}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", CRASH, *argv], env=env, capture_output=True, timeout=300
    ).returncode


def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return int(child.stdout)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = dead_pid()
    stale = tmp_path / f".faces.npz.{dead}.tmpabcd1234.npz"
    stage = tmp_path / f".export.{dead}.tmpabcd1234"  # a staging folder (atomic_folder)
    live = tmp_path / f".faces.npz.{os.getpid()}.tmpabcd1234.npz"
    old = tmp_path / ".res.jsonl.k3j4h5g6.jsonl"  # written before the pid was in the name
    mine = tmp_path / ".notes.txt"  # not ours
    (stage / "sub").mkdir(parents=True)
    for p in (stale, live, old, mine, stage / "sub" / "model.onnx"):
        p.write_bytes(b"x")
    os.utime(old, (1, 1))
    # tagged with a dead pid: removed whatever the name; untagged: only the names given
    assert sorted(fio.clean_stale_temps(tmp_path, ["other.csv"])) == sorted([stale, stage])
    assert fio.clean_stale_temps(tmp_path) == [old]
    assert live.exists() and mine.exists() and not stage.exists()


def test_a_write_removes_every_stale_temp_file_of_its_folder(tmp_path, tiny_run):
    """docs/failures.md: a killed writer's temp files go at the next run that writes in
    the folder, whatever it writes (a killed ``--out results.jsonl``, then ``--out
    results.csv``; a killed export, then evaluate's metrics)."""
    dead = dead_pid()
    jsonl = tmp_path / f".results.jsonl.{dead}.tmpk3j4h5g6.jsonl"
    stage = tmp_path / f".onnx.{dead}.tmp_9abcdef"
    npz = tmp_path / "eval" / f".predictions.npz.{dead}.tmpabcd1234.npz"
    stage.mkdir()
    for p in (jsonl, npz):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half a file")
    face_png(tmp_path / "in" / "a.png")
    args = ["predict", str(tmp_path / "in"), "--model", str(tiny_run), "--no-detect"]
    assert main([*args, "--out", str(tmp_path / "results.csv")]) == 0
    assert not jsonl.exists() and not stage.exists() and npz.exists()
    fio.write_json_atomic(tmp_path / "eval" / "metrics.json", {})
    assert not npz.exists()


# ------------------------------------------------------------------ train: crashes

TINY = {"width": 0.125, "batch_size": 16, "epochs": 2, "warmup_epochs": 1.0, "device": "cpu",
        "eval_batch_size": 64, "threads": 1, "patience": 10}  # fmt: skip


def run_files(run: Path) -> dict:
    out = {n: load_file(str(run / f"{n}.safetensors")) for n in ("best", "last")}
    out["best.json"] = json.loads((run / "best.json").read_text())["epoch"]
    out["last.json"] = json.loads((run / "last.json").read_text())["epoch"]
    with (run / "history.csv").open() as f:
        out["history"] = [
            {k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
            for r in csv.DictReader(f)
        ]
    return out


def same_run(a: dict, b: dict) -> bool:
    for n in ("best", "last"):
        if a[n].keys() != b[n].keys() or any(not torch.equal(a[n][k], b[n][k]) for k in a[n]):
            return False
    return all(a[k] == b[k] for k in ("best.json", "last.json", "history"))


def test_train_killed_at_any_write_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    # a figure, not the run's state
    monkeypatch.setattr(training_run, "_plot", lambda out_dir: None)
    faces = synthetic_faceset(40)
    cfg = T.resolve_config("paper", TINY)
    T.fit(faces, tmp_path / "full", cfg, progress=False)
    full = run_files(tmp_path / "full")
    calls = kill_at(monkeypatch, 0)
    T.fit(faces, tmp_path / "count", cfg, progress=False)
    writes = calls[0]
    assert writes >= 2 * 5  # per epoch: state, history, best (2), last (2)
    for n in range(1, writes + 1):
        run = tmp_path / f"cut{n}"
        kill_at(monkeypatch, n)
        with pytest.raises(Killed):
            T.fit(faces, run, cfg, progress=False)
        monkeypatch.undo()
        monkeypatch.setattr(training_run, "_plot", lambda out_dir: None)
        if (run / T.STATE_FILE).exists():  # something to resume: it must resume exactly
            T.fit(faces, run, cfg, resume=True, progress=False)
        else:  # killed before the first epoch was complete: a clean start is allowed
            assert not (run / "last.json").exists() and not (run / "best.json").exists()
            T.fit(faces, run, cfg, progress=False)
        assert same_run(run_files(run), full), n


def test_train_killed_right_after_the_state_file_is_replaced_resumes(tmp_path):
    """The issue's case: a real kill after ``last_state`` is replaced, before ``last.json``."""
    faces = synthetic_faceset(40)
    data = tmp_path / "prep"
    data.mkdir()
    np.savez(data / "faces.npz", **faces.to_arrays())
    args = ["train", "--data", str(data), "--no-progress"]
    args += [f"{k}={v}" for k, v in TINY.items()]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    # epoch 1 writes config.json, then state, history, best x2, last x2: the 8th rename is
    # epoch 2's state file
    assert crash_subprocess([*args, "--out", str(tmp_path / "cut")], at=8) == 86
    last = json.loads((tmp_path / "cut" / "last.json").read_text())
    assert last["epoch"] == 1  # last.json still from epoch 1, the state from epoch 2
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    assert same_run(run_files(tmp_path / "cut"), run_files(tmp_path / "full"))


def test_train_resume_without_a_complete_state_file_is_one_line(tmp_path, capsys):
    """Only a complete ``last_state.safetensors`` resumes a run: without one, or with one
    in the old format (the optimizer's tensors alone, the rest in ``last.json``), a resume
    is refused in one line and leaves the run as it was."""
    faces = synthetic_faceset(40)
    data = tmp_path / "prep"
    data.mkdir()
    np.savez(data / "faces.npz", **faces.to_arrays())
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--no-progress", "epochs=1"]
    assert main(args + [f"{k}={v}" for k, v in TINY.items() if k != "epochs"]) == 0
    resume = ["train", "--resume", str(run), "--no-progress", "epochs=2"]
    state = run / T.STATE_FILE
    optim = {k: v for k, v in load_file(str(state)).items() if k.startswith("optim.")}
    state.rename(tmp_path / "complete")
    one_line_error(capsys, resume, f"no {T.STATE_FILE}")
    # the old format: the optimizer's tensors, the epoch in the metadata, no "format"
    save_file({k[len("optim.") :]: v for k, v in optim.items()}, str(state), {"epoch": "1"})
    before = run_files(run)
    one_line_error(capsys, resume, "not a complete resume state")
    assert same_run(run_files(run), before)
    (tmp_path / "complete").replace(state)  # the complete state resumes
    assert main(resume) == 0
    assert json.loads((run / "last.json").read_text())["epoch"] == 2


# ------------------------------------------------------ predict, age bundle: crashes


def test_predict_killed_keeps_the_old_results_whole(tmp_path, tiny_run):
    d = tmp_path / "in"
    for i in range(3):
        face_png(d / f"{i}.png", i)
    out = tmp_path / "r.csv"
    argv = ["predict", str(d), "--model", str(tiny_run), "--no-detect", "--out", str(out)]
    assert main(argv) == 0
    before = out.read_bytes()
    face_png(d / "3.png", 3)
    # killed between writing the new results and renaming them: the old file is intact,
    # the temp file is removed by the next run
    assert crash_subprocess(argv, at=1, mode="before") == 86
    assert out.read_bytes() == before and list(tmp_path.glob(".r.csv.*"))
    assert main(argv) == 0
    assert not list(tmp_path.glob(".r.csv.*")) and len(out.read_text().splitlines()) == 5


def test_age_bundle_killed_while_saving_is_no_bundle_not_a_mixed_one(tmp_path, monkeypatch):
    from faceattrs.age import AgeModel, save_age_model
    from faceattrs.age.networks import AGE_JSON
    from faceattrs.age.regress import BinRegressors
    from faceattrs.model import FaceResNet, ModelConfig

    coarse = FaceResNet(ModelConfig(width=0.125, heads={"age_bin": 6})).eval()
    reg = BinRegressors(coarse.embed_dim, 6, 16).eval()
    edges = np.array([16, 26, 29, 37, 53])
    model = AgeModel(coarse=coarse, regressors=reg, edges=edges)
    save_age_model(tmp_path / "age", model, tmp_path, {})
    kill_at(monkeypatch, 1)  # the first weights file of the next save
    with pytest.raises(Killed):
        save_age_model(tmp_path / "age", model, tmp_path, {})
    assert not (tmp_path / "age" / AGE_JSON).exists()


# ------------------------------------------------------ signals, changed files


def test_sigterm_is_clean_like_ctrl_c(tmp_path, monkeypatch, capsys):
    import signal

    import faceattrs.prepare as P

    def savez_then_terminated(path, arrays):
        path.write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
        for _ in range(1000):
            pass

    monkeypatch.setattr(P, "_savez", savez_then_terminated)
    data = csv_of(tmp_path / "d.csv", 30)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["prepare", "--data", str(data), "--out", str(tmp_path / "o")]) == 143
    assert "terminated" in capsys.readouterr().err
    assert not [p.name for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_a_changed_prepared_file_is_refused_and_prepared_again(tmp_path):
    data = csv_of(tmp_path / "d.csv", 30)
    out = tmp_path / "o"
    prepare(data, out)
    good = load_prepared(out)
    other = tmp_path / "other"
    prepare(csv_of(tmp_path / "e.csv", 30, seed=5), other)
    (out / "faces.npz").write_bytes((other / "faces.npz").read_bytes())  # a valid npz, not ours
    with pytest.raises(DataError, match="run `faceattrs prepare` again"):
        load_prepared(out)
    prepare(data, out)  # no cache hit: the hash does not match
    assert faces_equal(load_prepared(out), good)
