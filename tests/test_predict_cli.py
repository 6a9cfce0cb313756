"""``faceattrs predict`` on tiny random-init models: good and bad files, output formats
(JSON lines, CSV, annotated images, Grad-CAM), globs, the choice of photo workers. The
Python API is in test_predict_api.py; ``run_dir``, ``photos`` and ``image_files`` are
session fixtures in conftest.py."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SHARED_PHOTOS  # ../shared/data/photos, or FACEATTRS_SHARED_DATA's
from PIL import Image
from predict_helpers import compose

import faceattrs
from faceattrs.cli import main
from faceattrs.photo import PhotoConfig, load_image
from faceattrs.predict import FaceAnalyzer
from faceattrs.predict_files import expand_inputs


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, photos) -> Path:
    """Two good photos, a multi-face image and every kind of bad input."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "sub").mkdir()
    for p in photos[:2]:
        (d / "sub" / p.name).write_bytes(p.read_bytes())
    Image.fromarray(compose(photos[4:7])).save(d / "group.png")
    (d / "text.jpg").write_text("hello")
    (d / "zero.png").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(photos[2].read_bytes()[:700])
    Image.new("L", (3000, 2000), 90).save(d / "huge.png")  # over --max-pixels 5000000
    noise = cv2.GaussianBlur(np.random.default_rng(0).normal(0, 1, (300, 400)), (0, 0), 6)
    Image.fromarray(cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)).save(
        d / "noface.png"
    )
    (d / "notes.txt").write_text("skipped: not an image extension")
    return d


EXPECTED_ERRORS = {
    "text.jpg": "not an image",
    "zero.png": "empty file (0 bytes)",
    "truncated.jpg": "truncated or corrupt",
    "huge.png": "6.0 megapixels, over the limit of 5",
    "noface.png": "no face found",
    "missing.jpg": "no such file",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_cli_processes_good_files_and_reports_bad_ones(
    run_dir, bad_folder, tmp_path, capsys, workers
):
    out = tmp_path / "r.jsonl"
    args = ["predict", str(bad_folder), str(bad_folder / "missing.jpg"), "--model", str(run_dir)]
    args += ["--photo-workers", workers]
    rc = main([*args, "--out", str(out), "--max-pixels", "5000000", "--batch-size", "2"])
    assert rc == 1  # some files failed
    recs = read_jsonl(out)
    errors = {Path(r["file"]).name: r["error"] for r in recs if "error" in r}
    assert set(errors) == set(EXPECTED_ERRORS)
    for name, message in EXPECTED_ERRORS.items():
        assert message in errors[name], errors[name]
    good = [r for r in recs if "error" not in r]
    assert sorted(Path(r["file"]).name for r in good) == sorted(
        ["group.png"] * 3 + [p.name for p in sorted((bad_folder / "sub").iterdir())]
    )
    # the API gives the same records for the same files
    files = [r["file"] for r in recs]
    api = FaceAnalyzer(run_dir, photo=PhotoConfig(max_pixels=5_000_000))
    assert api.analyze(list(dict.fromkeys(files)), on_error="record") == recs


def test_cli_photo_workers_auto(run_dir, image_files, tmp_path, monkeypatch, capsys):
    """``faceattrs predict`` decodes in processes from PROCESSES_FROM files (on two or more
    cores), in threads below; the records are the same."""
    from faceattrs import predict as predict_mod
    from faceattrs import predict_files as pf

    chosen = []

    class Spy(FaceAnalyzer):
        def __init__(self, model, settings):
            chosen.append(settings.photo_workers)
            super().__init__(model, settings)

    monkeypatch.setattr(pf, "FaceAnalyzer", Spy)
    monkeypatch.setattr(predict_mod, "cpu_cores", lambda: 2)
    files = [str(f) for f in image_files if isinstance(f, str | Path)]
    outs = []
    for n in (len(files), len(files) - 1):
        monkeypatch.setattr(predict_mod, "PROCESSES_FROM", n)
        outs.append(tmp_path / f"r{n}.jsonl")
        args = ["predict", *files, "--model", str(run_dir), "--no-detect", "--out", str(outs[-1])]
        assert main(args) == 1  # bad.jpg
    monkeypatch.setattr(predict_mod, "cpu_cores", lambda: 1)
    assert main([*args[:-1], str(tmp_path / "one.jsonl")]) == 1
    assert chosen == ["processes", "processes", "threads"]
    monkeypatch.setattr(predict_mod, "PROCESSES_FROM", len(files) + 1)
    assert main([*args[:-1], str(tmp_path / "few.jsonl")]) == 1
    assert chosen[-1] == "threads"
    assert read_jsonl(outs[0]) == read_jsonl(tmp_path / "few.jsonl")
    with pytest.raises(SystemExit) as e:  # argparse's choices
        main([*args, "--photo-workers", "fork"])
    assert e.value.code == 2 and "--photo-workers" in capsys.readouterr().err


def test_cli_csv_annotate_explain(run_dir, photos, tmp_path):
    out = tmp_path / "r.csv"
    rc = main(
        [
            "predict",
            str(photos[0]),
            str(photos[1]),
            "--model",
            str(run_dir),
            "--out",
            str(out),
            "--annotate",
            str(tmp_path / "ann"),
            "--explain",
            str(tmp_path / "cam"),
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and rows[0]["gender"] in ("Male", "Female")
    assert {"gender_p_Female", "ethnicity_p_Indian", "age", "age_bin", "age_p_53+"} <= set(rows[0])
    jsonl = FaceAnalyzer(run_dir).analyze([str(photos[0])])[0]["age"]
    # the 90 % interval, in two columns
    assert [float(rows[0]["age_low"]), float(rows[0]["age_high"])] == jsonl["interval"]
    assert (
        abs(sum(float(rows[0][f"ethnicity_p_{e}"]) for e in faceattrs.labels.ETHNICITIES) - 1)
        < 1e-3
    )
    ann = Image.open(tmp_path / "ann" / (photos[0].stem + ".jpg"))
    assert (
        ann.size == (200, 200) and np.abs(np.asarray(ann, int) - load_image(photos[0])).max() > 100
    )
    cams = sorted((tmp_path / "cam").iterdir())
    assert [c.name for c in cams] == [f"{p.stem}_face0.png" for p in photos[:2]]
    assert Image.open(cams[0]).size == (3 * 192, 192 + 22)


def test_cli_globs_no_detect_and_stdout(run_dir, photos, capsys):
    rc = main(["predict", str(SHARED_PHOTOS / "1_*.jpg"), "--model", str(run_dir), "--no-detect"])
    assert rc == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["file"]).name for r in recs] == [
        p.name for p in photos if p.name.startswith("1_")
    ]
    assert recs[0]["box"] == [0, 0, 200, 200] and recs[0]["detection"] == "given"


def test_cli_bad_model_is_one_clear_error(tmp_path, photos, capsys):
    rc = main(["predict", str(photos[0]), "--model", str(tmp_path / "nope")])
    assert rc == 2
    assert capsys.readouterr().err.strip().endswith("does not exist")


def test_expand_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.JPG", "a/y.png", "a/z.txt", "b.webp"):
        (tmp_path / name).write_bytes(b"")
    found = expand_inputs([tmp_path / "a", str(tmp_path / "*.webp"), str(tmp_path / "q*.png")])
    assert [n for _, n in found] == ["x.JPG", "y.png", "b.webp", "q*.png"]


def test_csv_rows_carry_the_age_interval():
    from faceattrs.predict_files import flat_record

    rec = {"file": "a.jpg", "face": 0, "box": [1, 2, 3, 4], "age": {"value": 31.0, "bin": "29-37",
           "bin_probabilities": {"29-37": 1.0}, "interval": [24.5, 40.1]}}  # fmt: skip
    row = flat_record(rec)
    assert (row["age"], row["age_low"], row["age_high"]) == (31.0, 24.5, 40.1)
    del rec["age"]["interval"]
    assert flat_record(rec)["age_low"] is None


def test_a_full_standard_output_is_named_in_the_one_line(monkeypatch, capsys):
    import errno
    import io as _io
    from pathlib import Path

    class Full(_io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    sample = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["predict", str(sample), "--photo-workers", "threads"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: standard output: No space left on device"), err
