"""Nothing lost, nothing misleading: crash consistency of prepare, train and predict (a
"kill" injected at every rename), and one clear line (exit 2) for every bad input."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset
from PIL import Image
from safetensors.torch import load_file, save_file

from faceattrs import io as fio
from faceattrs import training as T
from faceattrs.cli import main
from faceattrs.data import DataError
from faceattrs.prepare import PrepareConfig, load_prepared, prepare
from faceattrs.training import run as training_run

REPO = Path(__file__).resolve().parents[1]
HEADER = "age,ethnicity,gender,img_name,pixels"


def pix(img: np.ndarray) -> str:
    return " ".join(map(str, img.ravel().tolist()))


def csv_of(path: Path, n: int, seed: int = 0, rows=()) -> Path:
    """``n`` distinct random faces with every class present, then ``rows`` as given."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 48, 48)).astype(np.uint8)
    lines = [HEADER]
    lines += [
        f"{20 + i % 50},{i % 5},{(i // 5) % 2},f{i}.jpg,{pix(im)}" for i, im in enumerate(imgs)
    ]
    lines += list(rows)
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def cli_logging():
    """Log records on stderr as the CLI shows them (INFO and up, the message alone): under
    pytest its ``logging.basicConfig`` does nothing (pytest's handlers are already there),
    so without this a warning printed before the error line would go unseen."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # capsys's stream, while it captures
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def one_line_error(capsys, argv, words: str) -> str:
    """Run the CLI: exit 2, exactly one non-empty line on stderr (no warning or traceback
    before it), naming ``words``."""
    with cli_logging():
        assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    (line,) = lines
    assert words in line and line.startswith(f"faceattrs {argv[0]}: error: "), line
    return line


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


# ------------------------------------------------------------------ one line, exit 2


@pytest.mark.parametrize("n", [1, 3, 5])
def test_prepare_too_few_rows(tmp_path, capsys, n):
    data = csv_of(tmp_path / "d.csv", n)
    one_line_error(capsys, ["prepare", "--data", str(data), "--out", str(tmp_path / "o")],
                   "too few to split")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_prepare_all_copies(tmp_path, capsys):
    rng = np.random.default_rng(0)
    row = f"30,1,0,a.jpg,{pix(rng.integers(0, 256, (48, 48)))}"
    data = csv_of(tmp_path / "d.csv", 0, rows=[row] * 20)
    one_line_error(capsys, ["prepare", "--data", str(data), "--out", str(tmp_path / "o")],
                   "1 face(s) left")  # fmt: skip


def test_prepare_skip_when_every_row_is_bad(tmp_path, capsys):
    rows = [f"200,1,0,a{i}.jpg,{' '.join(['1'] * 2304)}" for i in range(4)]
    data = csv_of(tmp_path / "d.csv", 0, rows=rows)
    argv = ["prepare", "--data", str(data), "--out", str(tmp_path / "o"), "--on-bad-row", "skip"]
    one_line_error(capsys, argv, "every one of the 4 rows is invalid")


def test_prepare_out_is_a_file_refused_before_any_work(tmp_path, capsys, monkeypatch):
    data = csv_of(tmp_path / "d.csv", 30)
    (tmp_path / "taken").write_text("mine")
    import faceattrs.data as D

    monkeypatch.setattr(D, "read_csv", lambda *a: pytest.fail("read before checking --out"))
    one_line_error(capsys, ["prepare", "--data", str(data), "--out", str(tmp_path / "taken")],
                   "is a file, not a folder")  # fmt: skip
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("value", ["0", "-1", "2", "nan"])
def test_near_threshold_range(tmp_path, capsys, value):
    data = csv_of(tmp_path / "d.csv", 30)
    argv = [
        "prepare",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
        f"--near-threshold={value}",
    ]
    one_line_error(capsys, argv, "near_threshold")
    assert not (tmp_path / "o").exists()


def photo_folder(d: Path) -> Path:
    """Ten labelled photos and every kind of bad entry: a broken and a looping link, a
    folder named like a photo, a 0-byte photo, a symlinked folder."""
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        img = rng.integers(0, 256, (60, 60), dtype=np.uint8)
        Image.fromarray(img).save(d / f"{20 + i}_{i % 2}_{i % 5}_x{i}.png")
    (d / "30_1_2_broken.jpg").symlink_to(d / "nowhere.jpg")
    (d / "31_0_1_loop.jpg").symlink_to(d / "31_0_1_loop.jpg")
    (d / "32_1_1_dir.jpg").mkdir()
    (d / "40_0_0_empty.jpg").write_bytes(b"")
    (d / "linked").symlink_to(d / "32_1_1_dir.jpg")
    return d


def test_photos_only_in_a_symlinked_folder_are_named_in_the_one_line(tmp_path, capsys):
    """The photos sit in a symbolic link to a folder, which is not followed: the error
    line says so, rather than only "no labelled photos"."""
    real = tmp_path / "real"
    real.mkdir()
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(real / "20_0_0_a.png")
    d = tmp_path / "top"
    d.mkdir()
    (d / "inner").symlink_to(real)
    one_line_error(capsys, ["prepare", "--data", str(d), "--out", str(tmp_path / "o")],
                   "no labelled photos named AGE_GENDER_ETHNICITY_*.jpg (not searched: 1 "
                   "symlinked folder(s) (inner); pass their targets to include them)")  # fmt: skip


def test_photo_folder_bad_entries_are_one_line_or_records(tmp_path, capsys, caplog):
    d = photo_folder(tmp_path / "ph")
    out = tmp_path / "o"
    one_line_error(capsys, ["prepare", "--data", str(d), "--out", str(out)],
                   "30_1_2_broken.jpg: column 'image': broken or looping symbolic link")  # fmt: skip
    assert main(["prepare", "--data", str(d), "--out", str(out), "--on-bad-row", "skip"]) == 0
    assert "1 symlinked folder(s) (linked)" in caplog.text
    report = json.loads((out / "dedup_report.json").read_text())
    assert report["rows_read"] == 13 and report["rows_kept"] == 10
    assert report["invalid_reasons"] == {
        "image: broken or looping symbolic link": 2,
        "image: empty file (0 bytes)": 1,
    }
    with (out / "removed.csv").open() as f:
        removed = {r["img_name"]: r["reason"] for r in csv.DictReader(f)}
    assert removed == {
        "30_1_2_broken.jpg": "invalid image: broken or looping symbolic link",
        "31_0_1_loop.jpg": "invalid image: broken or looping symbolic link",
        "40_0_0_empty.jpg": "invalid image: empty file (0 bytes)",
    }


def test_removed_csv_lists_skipped_rows_and_reasons_keep_the_rule(tmp_path):
    good = " ".join(["7"] * 2304)
    bad = [
        f"200,1,0,old.jpg,{good}",  # line 32
        f"300,1,0,older.jpg,{good}",
        "x,1,0,word.jpg," + good,
        "y,1,0,word2.jpg," + good,
        "30,1,0,short.jpg,1 2 3",
    ]
    data = csv_of(tmp_path / "d.csv", 30, rows=bad)
    rep = prepare(data, tmp_path / "o", PrepareConfig(on_bad_row="skip"))
    assert rep["invalid_reasons"] == {
        "age: outside 1..120": 2,
        "age: not an integer": 2,
        "pixels: not 2304 pixel values": 1,
    }
    with (tmp_path / "o" / "removed.csv").open() as f:
        rows = list(csv.DictReader(f))
    skipped = {r["img_name"]: (r["line"], r["reason"]) for r in rows}
    assert skipped["old.jpg"] == ("32", "invalid age: 200 is outside 1..120")
    assert skipped["word.jpg"][1] == "invalid age: not an integer: 'x'"
    assert skipped["short.jpg"][1] == "invalid pixels: 3 pixel values, expected 2304"
    assert len(rows) == 5


@pytest.mark.parametrize(
    "setting, words",
    [
        ("epochs=0", "'epochs' must be at least 1"),
        ("batch_size=0", "'batch_size' must be at least 1"),
        ("width=0", "'width' must be in (0, 16]"),
        ("limit=-5", "'limit' must be at least 0"),
        ("threads=-2", "'threads' must be at least 0"),
        ("lr=nan", "'lr' must be above 0"),
        ("device=bogus", "'bogus' is not a device name"),
        ("device=cuda:7", "cuda:7"),
        ("bf16=maybe", "'bf16' must be auto, on or off"),
    ],
)
def test_train_settings_checked_before_any_work(tmp_path, capsys, setting, words):
    if setting == "device=cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    out = tmp_path / "run"
    one_line_error(capsys, ["train", "--data", str(tmp_path / "nowhere"), "--out", str(out),
                            setting], words)  # fmt: skip
    assert not out.exists()  # no config.json left behind


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "epochs=0"]
    assert main(["--debug", *argv]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main([*argv, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------ predict


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from faceattrs.checkpoint import save_checkpoint
    from faceattrs.model import FaceResNet, ModelConfig

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    save_checkpoint(run, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 0})
    return run


def face_png(path: Path, seed: int = 0) -> Path:
    img = np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def test_annotate_never_overwrites_an_input(tmp_path, tiny_run, capsys):
    d = tmp_path / "in"
    a = face_png(d / "a.jpg")
    before = a.read_bytes()
    for target in (d, d.parent):  # the input folder itself; a file given inside it
        args = [str(a)] if target == d else [str(d)]
        one_line_error(
            capsys,
            ["predict", *args, "--model", str(tiny_run), "--no-detect", "--annotate", str(d)],
            "would overwrite an input photo",
        )
    assert a.read_bytes() == before
    one_line_error(capsys, ["predict", str(d / "a.jpg"), "--model", str(tiny_run), "--no-detect",
                            "--explain", str(d / "a.jpg")], "is a file, not a folder")  # fmt: skip


def test_same_stem_inputs_get_distinct_outputs(tmp_path, tiny_run):
    d = tmp_path / "in"
    face_png(d / "face.jpg", 1), face_png(d / "face.png", 2), face_png(d / "other.png", 3)
    face_png(tmp_path / "in2" / "other.png", 4)  # the same name under a second folder
    ann = tmp_path / "ann"
    argv = ["predict", str(d), str(tmp_path / "in2"), "--model", str(tiny_run), "--no-detect"]
    assert main([*argv, "--annotate", str(ann), "--out", str(tmp_path / "r.jsonl")]) == 0
    names = sorted(p.name for p in ann.iterdir())
    assert names == ["face.jpg.jpg", "face.png.jpg", "other.png-2.jpg", "other.png.jpg"]


def test_non_utf8_file_name_in_csv_loses_nothing(tmp_path, tiny_run):
    d = tmp_path / "in"
    face_png(d / "ok.png", 1)
    odd = os.fsdecode(bytes(d) + b"/caf\xe9.png")  # Latin-1 name: not UTF-8
    face_png(Path(odd), 2)
    for out in (tmp_path / "x.csv", tmp_path / "x.jsonl"):
        assert (
            main(["predict", str(d), "--model", str(tiny_run), "--no-detect", "--out", str(out)])
            == 0
        )
        text = out.read_text(encoding="utf-8")  # valid UTF-8
        assert "ok.png" in text and "caf\\udce9.png" in text
    with (tmp_path / "x.csv").open(encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_broken_and_looping_links_are_records_and_linked_folders_a_warning(
    tmp_path, tiny_run, caplog
):
    d = tmp_path / "in"
    face_png(d / "ok.png")
    (d / "broken.jpg").symlink_to(d / "gone.jpg")
    (d / "loop.jpg").symlink_to(d / "loop.jpg")
    face_png(tmp_path / "elsewhere" / "x.png")
    (d / "linked").symlink_to(tmp_path / "elsewhere")
    out = tmp_path / "r.jsonl"
    assert (
        main(["predict", str(d), "--model", str(tiny_run), "--no-detect", "--out", str(out)]) == 1
    )
    recs = {Path(r["file"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {"ok.png", "broken.jpg", "loop.jpg"}
    assert recs["broken.jpg"]["error"].endswith("broken.jpg: broken symbolic link (to "
                                                f"{d / 'gone.jpg'}, which does not exist)")  # fmt: skip
    assert recs["loop.jpg"]["error"].endswith("loop.jpg: symbolic link loop")
    assert "1 symlinked folder(s) (linked)" in caplog.text


def test_predict_lists_each_failed_file_on_stderr(tmp_path, tiny_run, capsys):
    """With --out, which files failed and why shows on stderr, one line each as compilers
    list errors: the first 20, then how many more."""
    from faceattrs.predict_files import FAILURES_SHOWN

    d = tmp_path / "in"
    face_png(d / "ok.png")
    bad = [d / f"bad{i:02d}.jpg" for i in range(FAILURES_SHOWN + 3)]
    for p in bad:
        p.write_text("not a photo")
    (d / "a_loop.jpg").symlink_to(d / "a_loop.jpg")
    out = tmp_path / "results.csv"
    argv = ["predict", str(d), "--model", str(tiny_run), "--no-detect", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{d / 'a_loop.jpg'}: symbolic link loop"  # in input order: by name
    assert err[1:FAILURES_SHOWN] == [
        f"{p}: not an image (or a format Pillow cannot read)" for p in bad[: FAILURES_SHOWN - 1]
    ]
    assert err[FAILURES_SHOWN] == (
        f"... and 4 more failed file(s): see their error records in {out}"
    )
    assert len(err) == FAILURES_SHOWN + 1


@pytest.mark.parametrize(
    "option, words",
    [
        (["--threads", "-1"], "--threads must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--device", "bogus"], "'bogus' is not a device name"),
        (["--device", "cuda:7"], "cuda:7"),
        (["--max-pixels", "-5"], "--max-pixels must be at least 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--out", "r.txt"], "use a .jsonl or .csv"),
    ],
)
def test_predict_options_checked_before_any_work(tmp_path, tiny_run, capsys, option, words):
    if "cuda:7" in option and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    face_png(tmp_path / "a.png")
    one_line_error(capsys, ["predict", str(tmp_path / "a.png"), "--model", str(tiny_run),
                            *option], words)  # fmt: skip


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


@pytest.mark.parametrize(
    "setting, words",
    [
        ("scale_factor=1", "'scale_factor' must be above 1"),
        ("min_face=0", "'min_face' must be at least 1"),
        ("overlap=nan", "'overlap' must be in [0, 1]"),
        ("cascade=nope.xml", "nope.xml"),
    ],
)
def test_photo_settings_checked_before_any_work(tmp_path, tiny_run, capsys, setting, words):
    face_png(tmp_path / "a.png")
    one_line_error(capsys, ["predict", str(tmp_path / "a.png"), "--model", str(tiny_run),
                            "--photo-set", setting], words)  # fmt: skip


@pytest.mark.parametrize(
    "setting, words",
    [
        ("finetune_epochs=0", "head_epochs + finetune_epochs"),
        ("n_bins=1", "'n_bins' must be at least 2"),
        ("max_age=0.5", "'max_age' must be above 1"),
        ("reg_loss=l3", "'reg_loss' must be one of huber, l1"),
        ("batch_size=0", "'batch_size' must be at least 1"),
    ],
)
def test_age_settings_checked_before_any_work(tmp_path, capsys, setting, words):
    if setting.startswith("finetune"):
        setting = "finetune_epochs=0 head_epochs=0"
    argv = ["train-age", "--model", str(tmp_path), "--data", str(tmp_path / "nowhere")]
    argv += [w for s in setting.split() for w in ("--set", s)]
    one_line_error(capsys, argv, words)
    assert not (tmp_path / "age").exists()


def test_evaluate_and_train_age_devices_checked(tmp_path, capsys):
    one_line_error(capsys, ["evaluate", "--model", str(tmp_path), "--device", "bogus"],
                   "not a device name")  # fmt: skip
    one_line_error(capsys, ["train-age", "--model", str(tmp_path), "--data", str(tmp_path),
                            "--device", "cuda:9"], "cuda:9")  # fmt: skip


def test_explain_never_overwrites_an_input_overlay_name(tmp_path, tiny_run, capsys):
    d = tmp_path / "in"
    face_png(d / "a.png")
    face_png(d / "a_face0.png", 1)  # what --explain DIR writes for a.png's first face
    one_line_error(capsys, ["predict", str(d), "--model", str(tiny_run), "--no-detect",
                            "--explain", str(d)], "would overwrite an input photo")  # fmt: skip


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


def test_non_utf8_photo_names_in_prepare_reports(tmp_path):
    d = tmp_path / "ph"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        img = rng.integers(0, 256, (60, 60), dtype=np.uint8)
        Image.fromarray(img).save(d / f"{20 + i}_{i % 2}_{i % 5}_x{i}.png")
    Path(os.fsdecode(bytes(d) + b"/30_1_2_caf\xe9.jpg")).write_bytes(b"")
    prepare(d, tmp_path / "o", PrepareConfig(on_bad_row="skip"))
    removed = (tmp_path / "o" / "removed.csv").read_text(encoding="utf-8")
    assert "30_1_2_caf\\udce9.jpg" in removed


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


def exactly_one_line(capsys, argv, words: str) -> str:
    """Exit 2 and exactly one line on stderr (no warning before it), naming ``words``."""
    with cli_logging():
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err and err.startswith(f"faceattrs {argv[0]}: error: "), err
    return err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--annotate", ""], "--annotate needs a folder name"),
        (["--out", "TMP/r.jsonl", "--annotate", "TMP/r.jsonl"], "the same path as --out"),
        (["--backend", "onnx", "--dtype", "bf16"], "the onnx backend runs on the CPU"),
        (["--photo-set", "target_nose=nan,nan"], "target_nose must be two numbers"),
        (["--photo-set", "target_nose=inf,0"], "target_nose must be two numbers"),
        (["--photo-set", "rotations=400"], "rotations must be angles"),
        (["--photo-set", "tight_pad=1e9"], "'tight_pad' must be in [0, 4]"),
        (["--photo-set", "margin_scale=inf"], "'margin_scale' must be in (0, 10]"),
        (["--photo-set", "cascade=../../x.xml"], "must be a file name ending .xml"),
        (["--photo-set", "cascade=nope.xml"], "no cascade 'nope.xml' in"),
        (["--photo-set", "max_pixels=-1"], "with --max-pixels, not --photo-set"),
    ],
)
def test_predict_bad_settings_are_exactly_one_line(tmp_path, tiny_run, capsys, extra, words):
    face_png(tmp_path / "a.png")
    extra = [a.replace("TMP", str(tmp_path)) for a in extra]
    argv = ["predict", str(tmp_path / "a.png"), "--model", str(tiny_run), *extra]
    exactly_one_line(capsys, argv, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # nothing written


def test_predict_empty_folder_is_one_line_and_twice_named_files_are_read_once(
    tmp_path, tiny_run, capsys
):
    (tmp_path / "empty").mkdir()
    exactly_one_line(
        capsys, ["predict", str(tmp_path / "empty"), "--model", str(tiny_run)], "no image files"
    )
    # images only behind a symbolic link to a folder (not followed): the one line says so
    face_png(tmp_path / "real" / "x.png")
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "inner").symlink_to(tmp_path / "real")
    exactly_one_line(
        capsys, ["predict", str(tmp_path / "top"), "--model", str(tiny_run)],
        "no image files (.jpg .jpeg .png .webp .bmp .tif .tiff .gif) in it (not searched: 1 "
        "symlinked folder(s) (inner); pass their targets to include them)",
    )  # fmt: skip
    d = tmp_path / "in"
    face_png(d / "a" / "x.png")
    face_png(d / "y.png", 1)
    out = tmp_path / "r.jsonl"
    argv = ["predict", str(d), str(d / "a" / "x.png"), str(d / "*" / "x.png"), "--no-detect"]
    assert main([*argv, "--model", str(tiny_run), "--out", str(out)]) == 0
    files = [json.loads(line)["file"] for line in out.read_text().splitlines()]
    assert sorted(files) == sorted({str(d / "a" / "x.png"), str(d / "y.png")})


@pytest.mark.parametrize(
    "argv, words",
    [
        (["explain", "--misclassified", "Other", "--device", "foo"], "'foo' is not a device"),
        (["explain", "--misclassified", ",,"], "no ethnicity given"),
        (["explain", "--misclassified", "Other", "--max-faces", "0"], "--max-faces must be"),
        (["errors", "--k", "0"], "--k must be at least 1"),
        (["errors", "--device", "foo"], "'foo' is not a device"),
        (["calibrate", "--device", "foo"], "'foo' is not a device"),
        (["export", "--out", "OUT", "--opset", "9"], "--opset must be in 10..23"),
        (["export", "--out", "OUT", "--opset", "99"], "--opset must be in 10..23"),
    ],
)
def test_stage_options_are_exactly_one_line(tmp_path, tiny_run, capsys, argv, words):
    csv = csv_of(tmp_path / "f.csv", 40)
    argv = [a.replace("OUT", str(tmp_path / "x")) for a in argv]
    if argv[0] != "export":
        argv += ["--data", str(csv)]
    exactly_one_line(capsys, [*argv, "--model", str(tiny_run)], words)
    assert not (tmp_path / "x").exists()  # nothing written


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-upload-mb", "nan"], "--max-upload-mb must be a positive number"),
        (["--max-upload-mb", "inf"], "--max-upload-mb must be a positive number"),
        (["--device", "foo"], "'foo' is not a device"),
        (["--photo-set", "target_nose=nan,nan"], "target_nose must be two numbers"),
        (["--photo-set", "tight_pad=1e9"], "'tight_pad' must be in [0, 4]"),
        (["--queue", "0"], "--queue must be at least 1"),
        (["--max-pixels", "-1"], "--max-pixels must not be negative"),
    ],
)
def test_serve_options_are_exactly_one_line(tiny_run, capsys, argv, words):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    exactly_one_line(capsys, ["serve", "--model", str(tiny_run), "--port", "0", *argv], words)


def test_report_on_a_file_says_so(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    exactly_one_line(
        capsys, ["report", "--run", str(tmp_path / "f")], "is a file, not a run folder"
    )


@pytest.mark.parametrize(
    "setting, words",
    [
        ({"min_face": 0}, "'min_face' must be at least 1"),
        ({"overlap": float("nan")}, "'overlap' must be in [0, 1]"),
        ({"margin_shift_y": 2.0}, "'margin_shift_y' must be in [-1, 1]"),
    ],
)
def test_photo_config_checks_its_own_ranges(setting, words):
    """The Python API (PhotoConfig, FaceAnalyzer(photo=...)) gets the same checks as the
    command line: the settings object checks itself."""
    from faceattrs.config import ConfigError
    from faceattrs.photo.config import PhotoConfig

    with pytest.raises(ConfigError, match=re.escape(words)):
        PhotoConfig(**setting)
    PhotoConfig()  # the defaults are in range
