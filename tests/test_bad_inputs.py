"""Nothing misleading: every bad input, option or setting of prepare, train, predict,
serve and the other stages gives one clear line and exit 2 before any work; bad files among
good ones are records, never lost or overwritten. Crashes: tests/test_crash_consistency.py."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_helpers import csv_of, exactly_one_line, face_png, one_line_error, pix

from faceattrs.cli import main
from faceattrs.prepare import PrepareConfig, prepare

# ---------------------------------------------------- prepare and train: one line, exit 2


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
