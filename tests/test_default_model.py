"""The default model shipped inside the package: it loads with no --model, predicts the
sample photo offline, is small, and reproduces the figures recorded when it was packaged
(tools/package_default_model.py) on a fixed slice of the real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faceattrs import bundle

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "astronaut.jpg"
DEFAULT = bundle.DEFAULT_MODEL_DIR
# every model shipped in the package: the default and those reached by name (--model utk48)
SHIPPED = [DEFAULT] + [d for d in bundle.NAMED_MODELS.values() if (d / "best.json").exists()]
SHIPPED_INT8 = [
    d
    for d in [bundle.DEFAULT_INT8_DIR, *bundle.NAMED_INT8.values()]
    if (d / bundle.ONNX_MANIFEST).exists()
]


def test_all_shipped_weights_fit_in_50_mb():
    files = [p for d in SHIPPED + SHIPPED_INT8 for p in d.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 50e6


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda d: d.name)
def test_shipped_model_is_small_and_self_contained(folder):
    DEFAULT = folder  # noqa: N806  (the checks below read as for the default model)
    files = [p for p in DEFAULT.rglob("*") if p.is_file()]
    names = {str(p.relative_to(DEFAULT)) for p in files}
    for f in ("best.json", "best.safetensors", "calibration.json", "provenance.json"):
        assert f in names, f
    age = json.loads((DEFAULT / "age" / "age.json").read_text())
    if age.get("direct") == "multitask":  # the multitask network's own age head
        assert "age" in json.loads((DEFAULT / "best.json").read_text())["model"]["heads"]
    else:
        assert {"age/coarse.safetensors", "age/regressors.safetensors"} <= names
    assert sum(p.stat().st_size for p in files) < 50e6
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".npz") for p in files)  # no pickles
    assert age["multitask"] == ".." and "multitask_absolute" not in age  # nothing outside
    assert age["interval"]["alpha"] == 0.1 and len(age["interval"]["per_bin"]) == len(
        age["bin_labels"]
    )
    prov = json.loads((DEFAULT / "provenance.json").read_text())
    assert "non-commercial" in prov["licence"]


def test_predict_sample_photo_without_model(tmp_path, capsys):
    from faceattrs.cli import main

    out = tmp_path / "res.jsonl"
    assert main(["predict", str(SAMPLE), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    faces = [r for r in records if "error" not in r]
    assert len(faces) >= 1
    rec = faces[0]
    assert abs(sum(rec["gender"]["probabilities"].values()) - 1) < 1e-3
    low, high = rec["age"]["interval"]
    assert low <= rec["age"]["value"] <= high


def test_python_api_uses_the_default_model():
    import faceattrs

    records = faceattrs.analyze(str(SAMPLE))
    assert records and set(records[0]) >= {"gender", "ethnicity", "age", "box"}


def recorded_and_now(folder: Path, shared_csv: Path, **analyzer) -> tuple[dict, dict]:
    """The check recorded in ``folder/provenance.json`` and the same check computed now
    (``check_figures`` of the packaging script, on the same first validation faces of the
    CSV, or for a model that takes other faces, the same shared photos)."""
    from conftest import SHARED_PHOTOS, load_script

    check = json.loads((folder / "provenance.json").read_text())["check"]
    pdm = load_script("package_default_model")
    data = SHARED_PHOTOS if check["split"] == "photos" else shared_csv
    now = pdm.check_figures(folder, data, check["first_n"], **analyzer)
    assert now["first_n"] == check["first_n"] and now["split"] == check["split"]
    return check, now


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda d: d.name)
def test_shipped_model_reproduces_its_recorded_check(folder, shared_csv):
    check, now = recorded_and_now(folder, shared_csv)
    n = check["first_n"]
    # Tolerance: another CPU's kernels may flip a borderline face or two.
    assert now["gender_accuracy"] == pytest.approx(check["gender_accuracy"], abs=3 / n)
    assert now["ethnicity_accuracy"] == pytest.approx(check["ethnicity_accuracy"], abs=3 / n)
    assert now["age_mae"] == pytest.approx(check["age_mae"], abs=0.05)


def test_commands_without_model_use_the_default(tmp_path):
    """evaluate (on an external CSV), explain (a photo) and export need no --model."""
    from conftest import synthetic_faceset
    from test_evaluate import write_csv

    from faceattrs.cli import main

    csv = tmp_path / "faces.csv"
    write_csv(csv, synthetic_faceset(40, split=False))
    data = csv  # a CSV of 48x48 gray faces, or labelled photos for a model that takes others
    if bundle.resolve(None).input.shape != (48, 48):
        import cv2
        import numpy as np

        data = tmp_path / "photos"
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(40):
            img = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
            cv2.imwrite(str(data / f"{20 + i}_{i % 2}_{i % 5}_{i}.jpg"), img)
    ev = tmp_path / "ev"
    assert main(["evaluate", "--data", str(data), "--split", "all", "--out", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n"] == 40 and metrics["age"]["interval"]["n"] == 40
    ex = tmp_path / "ex"
    assert main(["explain", "--image", str(SAMPLE), "--out", str(ex)]) == 0
    assert any(ex.glob("*.png"))
    onnx = tmp_path / "onnx"
    assert main(["export", "--out", str(onnx)]) == 0
    assert (onnx / "faceattrs-onnx.json").exists()
    assert json.loads((onnx / "faceattrs-onnx.json").read_text())["age"]["interval"]
    # calibrate writes into the model folder: it never defaults to the installed package
    with pytest.raises(SystemExit):
        main(["calibrate", "--data", str(csv)])
    assert not any(p.name.startswith(".") for p in DEFAULT.rglob("*"))


# the shipped int8 exports and the fp32 model each is made from, by the name that reaches it
INT8_PAIRS = [
    (name, folder, bundle.NAMED_MODELS.get(name, DEFAULT))
    for name, folder in [(None, bundle.DEFAULT_INT8_DIR), *bundle.NAMED_INT8.items()]
    if (folder / bundle.ONNX_MANIFEST).exists()
]


@pytest.mark.parametrize("name, INT8, fp32", INT8_PAIRS, ids=lambda v: str(v))
def test_int8_is_shipped_small_and_points_at_its_model(name, INT8, fp32):  # noqa: N803
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    b = bundle.default_int8(name)
    assert b.kind == "onnx" and b.precision == "int8"
    assert b.source.resolve() == fp32.resolve()  # relative: works wherever it is installed
    assert b.torch_bundle().path.resolve() == fp32.resolve()  # Grad-CAM runs in PyTorch
    calib = b.meta["quantization"]["calibration"]
    assert calib["split"] == "train" and calib["faces"] >= 256
    assert b.temperatures == bundle.resolve(fp32).temperatures
    assert b.age["interval"] == bundle.resolve(fp32).age["interval"]
    prov = json.loads((INT8 / "provenance.json").read_text())
    assert "non-commercial" in prov["licence"]


def test_int8_of_a_model_without_one_is_one_line(capsys):
    """The default model has no int8 export when none is shipped: one line naming one that
    is (the 48x48 model's)."""
    from faceattrs.cli import main

    if (bundle.DEFAULT_INT8_DIR / bundle.ONNX_MANIFEST).exists():
        pytest.skip("this installation ships an int8 export of the default model")
    assert main(["predict", str(SAMPLE), "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model utk48 --dtype int8" in err


@pytest.mark.parametrize("name, INT8, fp32", INT8_PAIRS, ids=lambda v: str(v))
def test_predict_sample_photo_int8(name, INT8, fp32, tmp_path):  # noqa: N803
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from faceattrs.cli import main

    out = tmp_path / "res.jsonl"
    cams = tmp_path / "cams"  # Grad-CAM comes from the fp32 network the export points at
    model = ["--model", name] if name else []
    argv = ["predict", str(SAMPLE), *model, "--dtype", "int8", "--out", str(out),
            "--explain", str(cams)]  # fmt: skip
    assert main(argv) == 0
    (int8,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(list(cams.glob("*.png"))) == 1
    assert main(["predict", str(SAMPLE), *model, "--out", str(out)]) == 0
    (fp32,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert int8["box"] == fp32["box"]
    assert int8["gender"]["label"] == fp32["gender"]["label"]
    assert int8["ethnicity"]["label"] == fp32["ethnicity"]["label"]
    assert abs(int8["age"]["value"] - fp32["age"]["value"]) <= 5


@pytest.mark.parametrize("folder", SHIPPED_INT8, ids=lambda d: d.name)
def test_shipped_int8_reproduces_its_recorded_check(folder, shared_csv):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    check, now = recorded_and_now(folder, shared_csv, backend="onnx", dtype="int8")
    n = check["first_n"]
    # int8 kernels differ more between CPUs (VNNI or not) than fp32 ones: a few faces more
    assert now["gender_accuracy"] == pytest.approx(check["gender_accuracy"], abs=6 / n)
    assert now["ethnicity_accuracy"] == pytest.approx(check["ethnicity_accuracy"], abs=6 / n)
    assert now["age_mae"] == pytest.approx(check["age_mae"], abs=0.15)


def test_readme_python_example_runs_after_install(monkeypatch):
    """The README's "From Python" block works with nothing but the package (no trained run
    of one's own): run as written, from the repository root."""
    readme = (REPO / "README.md").read_text()
    after = readme[readme.index("From Python:") :]
    code = after[after.index("```python") + len("```python") : after.index("```\n", 10)]
    monkeypatch.chdir(REPO)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    records = scope["records"]
    assert [r["image"] for r in records] == [0, 1] and "error" not in records[0]
    assert records[0]["gender"] == records[1]["gender"]  # the same photo, as pixels and as a file
