"""The analyzer, the Python API and ``faceattrs predict`` on tiny random-init models."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import (
    SHARED_PHOTOS,  # ../shared/data/photos, or FACEATTRS_SHARED_DATA's
    child_env,
    descendants,
    outliving,
    read_line,
)
from PIL import Image

import faceattrs
from faceattrs.checkpoint import CheckpointError, load_model, save_checkpoint
from faceattrs.cli import main
from faceattrs.exceptions import FaceattrsError
from faceattrs.model import FaceResNet, ModelConfig
from faceattrs.photo import PhotoConfig, PhotoError, extract_faces, load_image
from faceattrs.predict import FaceAnalyzer, softmax
from faceattrs.predict_files import expand_inputs

EDGES = np.array([16, 26, 29, 37, 53])


def make_run(run_dir: Path, age: bool = True, temperatures: dict | None = None) -> Path:
    """A tiny random-init bundle: multitask model, optionally an age model and calibration."""
    torch.manual_seed(0)
    save_checkpoint(
        run_dir, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 0, "score": 0.0}
    )
    if temperatures:
        (run_dir / "calibration.json").write_text(json.dumps({"temperatures": temperatures}))
    if age:
        from faceattrs.age import AgeModel, save_age_model
        from faceattrs.age.direct import HEAD
        from faceattrs.age.regress import BinRegressors

        coarse = FaceResNet(ModelConfig(width=0.125, heads={"age_bin": 6})).eval()
        reg = BinRegressors(coarse.embed_dim, 6, 16).eval()
        with torch.no_grad():
            reg.center.copy_(torch.tensor([8.0, 21, 27, 33, 45, 65]))
            reg.scale.fill_(5.0)
        direct = FaceResNet(ModelConfig(width=0.125, heads={HEAD: 101})).eval()
        # a 90 % interval of different half-widths per bin, as calibration fits one
        interval = {"method": "test", "alpha": 0.1, "global": 9.0,
                    "per_bin": [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}  # fmt: skip
        model = AgeModel(coarse=coarse, regressors=reg, edges=EDGES, direct=direct)
        model.interval = interval
        save_age_model(run_dir / "age", model, run_dir, {})
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), temperatures={"gender": 2.0})


@pytest.fixture(scope="module")
def analyzer(run_dir) -> FaceAnalyzer:
    return FaceAnalyzer(run_dir)


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    if not SHARED_PHOTOS.is_dir():
        pytest.skip(f"real photos not available: {SHARED_PHOTOS} is absent (outside the repo)")
    return sorted(SHARED_PHOTOS.glob("*.jpg"))


def compose(paths, size=(500, 900)) -> np.ndarray:
    """Photos shrunk to 150 px and pasted in a row on a grey background."""
    img = np.full((*size, 3), 128, np.uint8)
    for i, p in enumerate(paths):
        x = 40 + i * 210
        img[150:300, x : x + 150] = cv2.resize(
            load_image(p), (150, 150), interpolation=cv2.INTER_AREA
        )
    return img


def check_record(rec: dict, analyzer: FaceAnalyzer) -> None:
    for head, names in analyzer.models.class_names.items():
        probs = rec[head]["probabilities"]
        assert list(probs) == names and abs(sum(probs.values()) - 1) < 1e-3
        assert probs[rec[head]["label"]] == max(probs.values())  # (rounded: ties possible)
    age = rec["age"]
    assert set(age) == {"value", "bin", "bin_probabilities", "interval"}
    assert 1 <= age["value"] <= 100
    low, high = age["interval"]  # value -/+ the half-width of the predicted bin, cut at 0
    half = dict(zip(["0-16", "16-26", "26-29", "29-37", "37-53", "53+"], range(3, 9), strict=True))[
        age["bin"]
    ]
    want = (max(age["value"] - half, 0.0), age["value"] + half)
    assert (low, high) == pytest.approx(want, abs=0.06)  # each rounded to 0.1 on its own
    assert age["bin_probabilities"][age["bin"]] == max(age["bin_probabilities"].values())
    assert len(rec["box"]) == 4 and rec["face"] >= 0


# ---------------------------------------------------------------- Python API


def test_records_for_every_shared_photo(analyzer, photos):
    recs = analyzer.analyze(photos)
    assert [r["file"] for r in recs] == [str(p) for p in photos]  # one face each, in order
    for r in recs:
        check_record(r, analyzer)


def test_probabilities_are_the_models(analyzer, run_dir, photos):
    """Temperature-scaled softmax of the multitask model's logits, age from the age model."""
    from faceattrs.bundle import load_age_model

    faces = np.stack([extract_faces(load_image(p))[0].crop for p in photos[:5]])
    model, _ = load_model(run_dir)
    from faceattrs.model import predict

    logits = predict(model, faces)
    age = load_age_model(run_dir).predict(faces)
    recs = analyzer.analyze(photos[:5])
    for i, r in enumerate(recs):
        g = softmax(logits["gender"][i : i + 1], 2.0)[0]  # calibration.json: T = 2 for gender
        e = softmax(logits["ethnicity"][i : i + 1])[0]
        assert np.allclose(list(r["gender"]["probabilities"].values()), g, atol=1e-4)
        assert np.allclose(list(r["ethnicity"]["probabilities"].values()), e, atol=1e-4)
        assert abs(r["age"]["value"] - age["value"][i]) < 0.051


def test_inputs_of_every_kind_agree(analyzer, photos):
    p = photos[3]
    by_path = analyzer.analyze(p)
    for src in (str(p), load_image(p), Image.open(p), p.read_bytes()):
        rec = analyzer.analyze(src)[0]
        assert rec["gender"] == by_path[0]["gender"] and rec["age"] == by_path[0]["age"]
    assert analyzer.analyze(load_image(p))[0]["file"] is None
    assert faceattrs.analyze(p, model=analyzer.models.source)[0]["gender"] == by_path[0]["gender"]


def test_batching_does_not_change_results(run_dir, photos):
    one = FaceAnalyzer(run_dir, batch_size=1).analyze(photos[:7])
    many = FaceAnalyzer(run_dir, batch_size=5).analyze(photos[:7])
    for a, b in zip(one, many, strict=True):
        for head in ("gender", "ethnicity"):
            pa, pb = a[head]["probabilities"], b[head]["probabilities"]
            assert max(abs(pa[k] - pb[k]) for k in pa) <= 1e-4


def test_streams_give_the_same_records_in_order(run_dir, monkeypatch):
    """Two model streams (the CPU default) and one give the same records, in input order,
    errors included, over several batches; a model failure in a stream is raised."""
    from faceattrs import predict as predict_mod

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60 + i, 50, 3), dtype=np.uint8) for i in range(11)]
    images[4] = b"not an image"
    one = FaceAnalyzer(run_dir, batch_size=2, streams=1)
    two = FaceAnalyzer(run_dir, batch_size=2, streams=2, threads=1)
    a = one.analyze(images, detect=False, on_error="record")
    b = two.analyze(images, detect=False, on_error="record")
    assert [r.get("image") for r in b] == list(range(11)) and "error" in b[4]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for head in ("gender", "ethnicity"):
            if head in ra:
                pa, pb = ra[head]["probabilities"], rb[head]["probabilities"]
                assert max(abs(pa[k] - pb[k]) for k in pa) <= 1e-4
    calls = []

    def broken(faces, pool=None):
        calls.append(len(faces))
        raise RuntimeError("model failed")

    monkeypatch.setattr(two.models, "outputs", broken)
    with pytest.raises(RuntimeError, match="model failed"):
        two.analyze(images[:4], detect=False)
    assert calls  # the failure came from a stream
    assert predict_mod.model_streams("cuda", None, None) == (1, None)
    assert predict_mod.model_streams("cpu", 3, None) == (1, 3)  # threads given: one stream
    assert predict_mod.model_streams("cpu", None, 4)[0] == 4
    for bad in (0, -1, 1.5, True):
        with pytest.raises(FaceattrsError, match="streams must be"):
            FaceAnalyzer(run_dir, streams=bad)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list:
    """Ten random images as files, one bad file, and two in-memory arrays (CI has no photos)."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    files = []
    for i in range(10):
        f = d / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (50 + 3 * i, 48, 3), dtype=np.uint8)).save(f)
        files.append(f)
    (d / "bad.jpg").write_text("not an image")
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    return [*files[:4], arrays[0], d / "bad.jpg", str(files[4]), *files[5:], arrays[1]]


def test_photo_worker_processes_give_the_same_records(run_dir, image_files, caplog):
    """Worker processes (paths) and threads (arrays) together give the records of threads
    alone, in order, errors included; a worker process that dies leaves the rest to
    threads, with a warning, and loses nothing."""
    threads = FaceAnalyzer(run_dir, batch_size=3, photo_workers="threads")
    procs = FaceAnalyzer(run_dir, batch_size=3, photo_workers="processes")
    want = threads.analyze(image_files, detect=False, on_error="record")
    assert len(want) == 13 and "error" in want[5] and want[4]["image"] == 4
    assert procs.analyze(image_files, detect=False, on_error="record") == want
    items = list(procs.run(image_files[:3], detect=False, keep_images=True))
    assert all(i.image is not None and i.image.shape[2] == 3 for i in items)
    with pytest.raises(PhotoError, match="not an image"):
        procs.analyze(image_files, detect=False)
    pid = next(iter(procs._procs._processes))
    os.kill(pid, signal.SIGKILL)
    got = procs.analyze(image_files, detect=False, on_error="record")
    assert got == want
    assert "photo worker processes stopped or could not start" in caplog.text
    assert procs.photo_workers == "threads" and procs._procs is None
    caplog.clear()

    def no_processes(*a, **k):  # a platform without process support
        raise OSError(38, "Function not implemented")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("faceattrs.predict.ProcessPoolExecutor", no_processes)
        none = FaceAnalyzer(run_dir, batch_size=3, photo_workers="processes")
        assert "could not start" in caplog.text and none.photo_workers == "threads"
        assert none.analyze(image_files, detect=False, on_error="record") == want
    with pytest.raises(FaceattrsError, match="photo_workers must be one of"):
        FaceAnalyzer(run_dir, photo_workers="fork")


def test_photo_workers_auto_takes_processes_for_many_paths(run_dir, image_files, monkeypatch):
    from faceattrs import predict as predict_mod

    auto = FaceAnalyzer(run_dir)  # "auto"
    auto.workers = 2  # as on a two-core CPU
    want = FaceAnalyzer(run_dir, photo_workers="threads").analyze(
        image_files, detect=False, on_error="record"
    )
    monkeypatch.setattr(predict_mod, "PROCESSES_FROM", 12)  # 11 paths: threads
    assert auto.analyze(image_files, detect=False, on_error="record") == want
    assert auto._procs is None
    monkeypatch.setattr(predict_mod, "PROCESSES_FROM", 11)
    assert auto.analyze(image_files, detect=False, on_error="record") == want
    assert auto._procs is not None and auto.photo_workers == "auto"


def test_photo_worker_processes_do_not_run_the_calling_script(run_dir, image_files, tmp_path):
    """A script without an ``if __name__ == "__main__"`` guard: its worker processes do not
    run its top level again (spawn would), and its records are those of threads."""
    marker, out = tmp_path / "ran.txt", tmp_path / "out.json"
    files = [str(f) for f in image_files if isinstance(f, str | Path)]
    script = tmp_path / "script.py"
    script.write_text(
        "import json, sys\n"
        "from faceattrs.predict import FaceAnalyzer\n"
        f"open({str(marker)!r}, 'a').write('ran\\n')\n"
        f"an = FaceAnalyzer({str(run_dir)!r}, photo_workers='processes')\n"
        f"recs = an.analyze({files!r}, detect=False, on_error='record')\n"
        f"json.dump(recs, open({str(out)!r}, 'w'))\n"
    )
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    assert marker.read_text() == "ran\n"
    want = FaceAnalyzer(run_dir).analyze(files, detect=False, on_error="record")
    assert json.loads(out.read_text()) == json.loads(json.dumps(want))


KILLED_PARENT = """
import sys, time
from faceattrs.predict import FaceAnalyzer
an = FaceAnalyzer(sys.argv[1], photo_workers="processes", threads=1)
an.analyze(sys.argv[2:], detect=False, on_error="record")  # the workers are up and idle
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree in /proc")
def test_photo_worker_processes_end_when_their_parent_is_killed(run_dir, image_files):
    """``kill -9`` of a program whose analyzer has worker processes (``faceattrs predict``
    on 16 photos or more): the workers and the resource tracker end within seconds, not
    wait on their pipes forever."""
    files = [str(f) for f in image_files if isinstance(f, str | Path)]
    cmd = [sys.executable, "-c", KILLED_PARENT, str(run_dir), *files]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert read_line(proc, 120) == "ready\n"
        children = descendants(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert len(children) >= 2  # the photo workers (two on two cores) and the resource tracker
    assert outliving(children, 5.0) == []


def test_multi_face_image(analyzer, photos):
    recs = analyzer.analyze(compose(photos[:4]))
    assert [r["face"] for r in recs] == [0, 1, 2, 3]
    assert [r["box"][0] for r in recs] == sorted(r["box"][0] for r in recs)
    for r in recs:
        check_record(r, analyzer)


def test_errors_raise_or_become_records(analyzer, photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    noise = cv2.GaussianBlur(np.random.default_rng(0).normal(0, 1, (300, 400)), (0, 0), 6)
    with pytest.raises(PhotoError, match="not an image"):
        analyzer.analyze([photos[0], bad])
    with pytest.raises(PhotoError, match="no face found"):
        analyzer.analyze(cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8))
    recs = analyzer.analyze([photos[0], bad, photos[1]], on_error="record")
    assert [("error" in r) for r in recs] == [False, True, False]
    assert [r["image"] for r in recs] == [0, 1, 2]  # the position in the input, paths too
    assert recs[1] == {
        "file": str(bad),
        "image": 1,
        "error": f"{bad}: not an image (or a format Pillow cannot read)",
    }


def test_no_detect_and_lists_of_arrays(analyzer, photos):
    imgs = [load_image(p) for p in photos[:3]]
    recs = analyzer.analyze(imgs, detect=False)
    assert [r["image"] for r in recs] == [0, 1, 2]
    assert all(r["box"] == [0, 0, 200, 200] and r["detection"] == "given" for r in recs)


def test_without_age_model_age_is_null(tmp_path, photos):
    recs = FaceAnalyzer(make_run(tmp_path, age=False)).analyze(photos[:2])
    assert all(r["age"] is None for r in recs)


def test_bf16_gives_close_probabilities(run_dir, photos):
    a = FaceAnalyzer(run_dir).analyze(photos[:3])
    b = FaceAnalyzer(run_dir, dtype="bf16").analyze(photos[:3])
    for ra, rb in zip(a, b, strict=True):
        pa, pb = ra["ethnicity"]["probabilities"], rb["ethnicity"]["probabilities"]
        assert max(abs(pa[k] - pb[k]) for k in pa) < 0.05


def test_model_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        FaceAnalyzer(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a model folder"):
        FaceAnalyzer(tmp_path)
    run = make_run(tmp_path / "run", age=False)
    (run / "best.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights missing"):
        FaceAnalyzer(run)
    run = make_run(tmp_path / "run2", age=False)
    meta = json.loads((run / "best.json").read_text())
    meta["model"]["width"] = 0.25  # settings that do not match the weights
    (run / "best.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="match its settings"):
        FaceAnalyzer(run)
    monkeypatch.setattr("faceattrs.bundle.DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FaceattrsError, match=r"faceattrs run --data CSV --out RUN --preset cpu"):
        FaceAnalyzer()


def test_default_model_is_used_when_bundled(tmp_path, monkeypatch, photos):
    monkeypatch.setattr("faceattrs.bundle.DEFAULT_MODEL_DIR", make_run(tmp_path, age=False))
    assert len(FaceAnalyzer().analyze(photos[0])) == 1


def test_import_stays_light():
    code = "import sys, faceattrs; assert 'torch' not in sys.modules and 'cv2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert faceattrs.FaceAnalyzer is FaceAnalyzer and callable(faceattrs.analyze)
    with pytest.raises(AttributeError):
        faceattrs.no_such_name  # noqa: B018


# ---------------------------------------------------------------- command line


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


def test_bad_analyze_options_are_one_clear_error(analyzer):
    face = np.full((48, 48), 128, np.uint8)
    with pytest.raises(FaceattrsError, match="detect must be True or False, got 'maybe'"):
        analyzer.analyze(face, detect="maybe")
    with pytest.raises(FaceattrsError, match="on_error must be"):
        analyzer.analyze(face, on_error="ignore")
    assert analyzer.analyze(face, detect=False)[0]["detection"] == "given"


def test_photo_workers_decode_under_the_callers_pillow_guard(run_dir, tmp_path):
    """Worker processes take the calling process's Pillow guard: a program keeps it in its
    workers too (the same answer as in threads), a faceattrs command lifts it in both."""
    from photo_helpers import png_header

    from faceattrs.photo import PhotoConfig, pillow_limit_lifted

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))  # 400 megapixels in the header, no pixels
    cfg = PhotoConfig(max_pixels=0)
    for workers in ("threads", "processes"):
        an = FaceAnalyzer(run_dir, photo=cfg, photo_workers=workers)
        (rec,) = an.analyze([str(bomb)], on_error="record")
        assert "refused by Pillow's own pixel limit" in rec["error"], (workers, rec)
        with pillow_limit_lifted():
            an = FaceAnalyzer(run_dir, photo=cfg, photo_workers=workers)
            (rec,) = an.analyze([str(bomb)], on_error="record")
        assert "truncated or corrupt" in rec["error"], (workers, rec)


def test_an_unbounded_interval_end_is_null_in_strict_json():
    """A model calibrated on too few validation faces has an infinite half-width: the
    record says null for that end, and the record is valid (strict) JSON."""
    import json
    from types import SimpleNamespace

    from faceattrs.predict import face_predictions

    def outputs(faces, pool=None):
        n = len(faces)
        age = {
            "value": np.array([30.0, 50.0]),
            "bin": np.array([0, 1]),
            "bin_probabilities": np.array([[0.9, 0.1], [0.2, 0.8]]),
            "interval": (np.array([25.0, 0.0]), np.array([35.0, np.inf])),
        }
        return {"gender": np.zeros((n, 2))}, age

    models = SimpleNamespace(
        outputs=outputs, class_names={"gender": ["Male", "Female"]}, temperatures={},
        bin_labels=["0-40", "40+"],
    )  # fmt: skip
    recs = face_predictions(models, np.zeros((2, 48, 48), np.uint8))
    assert [r["age"]["interval"] for r in recs] == [[25.0, 35.0], [0.0, None]]
    json.dumps(recs, allow_nan=False)  # raises on inf / nan
