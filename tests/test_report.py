"""report.html: every section found, every figure embedded, every link resolves offline."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset

from faceattrs.calibrate import calibrate_run
from faceattrs.checkpoint import save_checkpoint
from faceattrs.cli import main
from faceattrs.errors import cluster_errors
from faceattrs.evaluate import evaluate_run
from faceattrs.explain import explain_misclassified
from faceattrs.model import FaceResNet, ModelConfig
from faceattrs.plots.evaluate import roc
from faceattrs.report import build_report
from faceattrs.report.discover import section_of

PNG = b"\x89PNG\r\n\x1a\n"


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.srcs, self.ids = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.hrefs += [a["href"]] if "href" in a else []
        self.srcs += [a["src"]] if "src" in a else []
        self.ids += [a["id"]] if "id" in a else []


def tiny_png(path: Path) -> None:
    roc({"fpr": [0, 1], "tpr": [0, 1], "auc": 0.5}, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with the real outputs of every stage, plus stand-ins for the others."""
    root = tmp_path_factory.mktemp("r")
    run, prepared = root / "run", root / "prepared"
    torch.manual_seed(0)
    save_checkpoint(run, "best", FaceResNet(ModelConfig(width=0.125)), {"epoch": 3, "score": 0.4})
    faces = synthetic_faceset(60)
    faces.split[:] = np.arange(60) % 3
    calibrate_run(run, faces)
    evaluate_run(run, faces, "test", run / "eval", n_grid=4, min_group=1)
    cluster_errors(run, faces, run / "errors", n_examples=3)
    explain_misclassified(run, faces, "Indian,Other", run / "explain", max_faces=2)
    # stand-ins for the data, training and age stages' files
    prepared.mkdir()
    np.savez(prepared / "faces.npz", images=faces.images)
    (prepared / "dedup_report.json").write_text(json.dumps({"rows": 60, "removed": 0}))
    tiny_png(prepared / "label_distribution.png")
    (run / "config.json").write_text(json.dumps({"data": str(prepared), "config": {"lr": 6e-4}}))
    (run / "history.csv").write_text("epoch,train_loss,val_score\n1,2.5,0.3\n2,2.1,0.4\n")
    tiny_png(run / "history.png")
    tiny_png(run / "age" / "age_scatter.png")
    (run / "age" / "age_metrics.json").write_text(json.dumps({"mae": 7.5, "oracle_mae": 5.1}))
    tiny_png(run / "explain" / "my photo_gradcam.png")  # a name that needs URL quoting
    return run


@pytest.fixture(scope="module")
def page(run):
    path = build_report(run)
    assert path == run / "report.html"
    parser = Links()
    parser.feed(path.read_text())
    return path.read_text(), parser


def test_every_link_resolves_to_an_existing_file(run, page):
    _, links = page
    files = [h for h in links.hrefs if not h.startswith("#")]
    assert files
    for href in files:
        assert not urlparse(href).scheme, href  # relative: readable offline
        assert (run / unquote(href)).is_file(), href


def test_every_figure_is_embedded_and_linked(run, page):
    _, links = page
    pngs = sorted(run.rglob("*.png")) + [run.parent / "prepared" / "label_distribution.png"]
    assert len(links.srcs) == len(pngs)
    embedded = {
        base64.b64decode(s.split(",", 1)[1])
        for s in links.srcs
        if s.startswith("data:image/png;base64,")
    }
    assert len(embedded) >= 1 and all(b.startswith(PNG) for b in embedded)
    linked = {(run / unquote(h)).resolve() for h in links.hrefs if not h.startswith("#")}
    for png in pngs:
        assert png.resolve() in linked, png
        assert png.read_bytes() in embedded, png


def test_sections_and_numbers(run, page):
    text, links = page
    for section in (
        "run",
        "data",
        "training-history",
        "evaluation",
        "calibration",
        "fairness",
        "grad-cam",
        "error-clusters",
        "age",
    ):
        assert section in links.ids, section
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert f"{metrics['gender']['accuracy']:.4g}" in text
    low, high = metrics["ci95"]["gender.accuracy"]
    assert f"{low:.4f} - {high:.4f}" in text  # the 95 % interval beside the figure
    clusters = json.loads((run / "errors" / "clusters.json").read_text())
    assert clusters["clusters"][0]["description"] in text
    explained = json.loads((run / "explain" / "misclassified_Indian-Other.json").read_text())
    assert f"{explained['n_shown']} of {explained['n_misclassified']} misclassified" in text
    assert "http://" not in text and "https://" not in text


def test_sections_of_paths():
    assert section_of(Path("eval/fairness.png")) == "Fairness"
    assert section_of(Path("eval_all/confusion_gender.png")) == "Evaluation"
    assert section_of(Path("eval/age/age_grid.png")) == "Age"
    assert section_of(Path("history.png")) == "Training history"
    assert section_of(Path("calibration.json")) == "Calibration"
    assert section_of(Path("somewhere/else.png")) == "Other files"


def test_cli_report(run, capsys):
    assert main(["report", "--run", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert main(["report", "--run", str(run / "missing")]) == 2


def test_data_report_of_a_csv_is_found_in_the_prepare_cache(tmp_path, monkeypatch):
    from faceattrs.prepare import cache_dir

    monkeypatch.setenv("FACEATTRS_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "faces.csv"
    source.write_text("age,ethnicity,gender,img_name,pixels\n")
    for key, src in (("aaa", source), ("bbb", tmp_path / "other" / "faces.csv")):
        folder = cache_dir() / f"faces.csv-{key}"
        folder.mkdir(parents=True)
        (folder / "faces.npz").write_bytes(b"")
        (folder / "manifest.json").write_text(json.dumps({"source": str(src.resolve())}))
        tiny_png(folder / f"label_distribution_{key}.png")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(source)}))
    text = build_report(run).read_text()
    assert "label_distribution_aaa.png" in text and "label_distribution_bbb.png" not in text
    # a run that recorded its data's content key gets that folder, not the newest one
    folder = cache_dir() / "faces.csv-ccc"
    folder.mkdir()
    (folder / "faces.npz").write_bytes(b"")
    (folder / "manifest.json").write_text(json.dumps({"source": str(source.resolve())}))
    tiny_png(folder / "label_distribution_ccc.png")
    assert "label_distribution_ccc.png" in build_report(run).read_text()  # the newest
    (run / "config.json").write_text(json.dumps({"data": str(source), "data_key": "aaa"}))
    text = build_report(run).read_text()
    assert "label_distribution_aaa.png" in text and "label_distribution_ccc.png" not in text
