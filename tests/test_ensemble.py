"""faceattrs ensemble: trained runs of one design joined into one model averaging their
logits; the result is a run folder every command takes (calibrate, predict, explain, ONNX)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import synthetic_faceset

from faceattrs import bundle as B
from faceattrs.checkpoint import load_model, save_checkpoint
from faceattrs.cli import main
from faceattrs.ensemble import build_ensemble
from faceattrs.model import FaceEnsemble, FaceResNet, ModelConfig

CFG = ModelConfig(width=0.125, heads={"gender": 2, "ethnicity": 5, "age": 117})


def make_member(path, seed, cfg=CFG, **meta):
    torch.manual_seed(seed)
    net = FaceResNet(cfg).eval()
    path.mkdir(parents=True)
    save_checkpoint(path, "best", net, {"epoch": seed, "score": 0.5, **meta})
    (path / "config.json").write_text(json.dumps({"data": "prepared"}))
    return net


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    nets = [make_member(root / f"m{i}", i, age_edges=[17, 26, 30, 38, 54]) for i in range(3)]
    return root, nets


def test_ensemble_averages_its_members(members, tmp_path):
    root, nets = members
    path = build_ensemble([root / "m0", root / "m1", root / "m2"], tmp_path / "ens")
    model, meta = load_model(path.parent)
    assert isinstance(model, FaceEnsemble) and model.cfg.members == 3
    assert [m["epoch"] for m in meta["members"]] == [0, 1, 2] and meta["age_edges"][0] == 17
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        want = {h: torch.stack([n(x)[h] for n in nets]).mean(0) for h in CFG.heads}
        got = model(x)
        for h in CFG.heads:
            torch.testing.assert_close(got[h], want[h], atol=1e-5, rtol=0)
        # flip TTA: the mean over face and mirror of the ensemble's logits
        model.flip_tta = True
        both = {
            h: (want[h] + torch.stack([n(x.flip(-1))[h] for n in nets]).mean(0)) / 2
            for h in CFG.heads
        }
        torch.testing.assert_close(model(x)["gender"], both["gender"], atol=1e-5, rtol=0)
    assert json.loads((path.parent / "config.json").read_text())["data"].endswith("prepared")


def test_ensemble_is_a_bundle_for_every_command(members, tmp_path):
    pytest.importorskip("captum")
    from faceattrs.backends import TorchBackend
    from faceattrs.calibrate import calibrate_run
    from faceattrs.explain import explain_faces

    root, _ = members
    run = build_ensemble([root / "m0", root / "m1"], tmp_path / "ens").parent
    faces = synthetic_faceset(80, seed=1)
    calibrate_run(run, faces, flip_tta="on")
    b = B.resolve(run)
    assert b.shared_age and list(b.heads) == ["gender", "ethnicity"]
    logits, age = TorchBackend(b).outputs(faces.images[:5])  # BatchNorm fused in members
    net, _ = b.load_multitask()
    with torch.no_grad():
        ref = net(torch.from_numpy(faces.images[:5]).float().div(127.5).sub(1)[:, None])
    np.testing.assert_allclose(logits["gender"], ref["gender"].numpy(), atol=1e-4)
    assert age["value"].shape == (5,) and "interval" in age
    ex = explain_faces(net, faces.images[:2], b.temperatures)  # Grad-CAM over both members
    assert ex["cams"]["gender"].shape == (2, 48, 48) and ex["cams"]["gender"].max() == 1.0


def test_ensemble_onnx_agrees(members, tmp_path):
    pytest.importorskip("onnxruntime")
    from faceattrs.backends import OnnxBackend, TorchBackend
    from faceattrs.calibrate import calibrate_run
    from faceattrs.export import export_onnx

    root, _ = members
    run = build_ensemble([root / "m0", root / "m1"], tmp_path / "ens").parent
    faces = synthetic_faceset(80, seed=2)
    calibrate_run(run, faces, flip_tta="on")  # the mirror pass goes into the graph
    check = json.loads(export_onnx(run, tmp_path / "onnx").read_text())["check"]
    assert check["gender_probabilities"] < 1e-4 and check["age_years"] < 0.05
    for n in (1, 7):  # batch sizes other than the trace's
        (lo, ao), (lt, at) = (
            b.outputs(faces.images[:n]) for b in (OnnxBackend(tmp_path / "onnx"), TorchBackend(run))
        )
        np.testing.assert_allclose(lo["ethnicity"], lt["ethnicity"], atol=1e-3)
        np.testing.assert_allclose(ao["value"], at["value"], atol=0.05)


def test_bad_ensembles_are_one_line(members, tmp_path, capsys):
    root, _ = members
    make_member(tmp_path / "other", 5, replace(CFG, width=0.25), age_edges=[17, 26, 30, 38, 54])
    make_member(tmp_path / "edges", 6, age_edges=[16, 26, 29, 37, 53])
    cases = {
        "2 or more": [str(root / "m0")],
        "another design": [str(root / "m0"), str(tmp_path / "other")],
        "age_edges differ": [str(root / "m0"), str(tmp_path / "edges")],
        "does not exist": [str(root / "m0"), str(tmp_path / "absent")],
    }
    for message, runs in cases.items():
        assert main(["ensemble", *runs, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "best.json").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert (
        main(["ensemble", str(root / "m0"), str(root / "m1"), "--out", str(tmp_path / "full")]) == 2
    )
    assert "not empty" in capsys.readouterr().err


def test_members_run_at_once_for_one_face(members, tmp_path):
    """One face through an analyzer with two model streams: the ensemble's members run in
    the streams' threads (under inference and bf16 autocast there too), same records."""
    from concurrent.futures import ThreadPoolExecutor

    from faceattrs.backends import TorchBackend
    from faceattrs.predict import FaceAnalyzer

    root, _ = members
    run = build_ensemble([root / "m0", root / "m1", root / "m2"], tmp_path / "ens").parent
    calibrate_faces = synthetic_faceset(60, seed=2)
    from faceattrs.calibrate import calibrate_run

    calibrate_run(run, calibrate_faces, flip_tta="on")
    face = calibrate_faces.images[:1]
    for dtype in ("fp32", "bf16"):
        backend = TorchBackend(run, dtype=dtype)
        plain = backend.outputs(face)
        seen = []

        class Pool(ThreadPoolExecutor):
            def map(self, fn, *its, seen=seen):
                def watched(*a):
                    logits, z = fn(*a)  # one member's logits and embedding, in a pool thread
                    seen.append((z.is_inference(), z.dtype))
                    return logits, z

                return super().map(watched, *its)

        with Pool(2) as pool:
            both = backend.outputs(face, pool=pool)
        want = (True, torch.float32 if dtype == "fp32" else torch.bfloat16)
        assert seen == [want] * 3  # every member, in the backend's modes in its thread
        for h in ("gender", "ethnicity"):
            np.testing.assert_allclose(both[0][h], plain[0][h], atol=1e-5 if dtype == "fp32" else 0)
        np.testing.assert_allclose(both[1]["value"], plain[1]["value"], atol=1e-4)
    one = FaceAnalyzer(run, streams=1).analyze(face[0], detect=False)
    two = FaceAnalyzer(run, streams=2, threads=1).analyze(face[0], detect=False)
    assert one[0]["gender"] == two[0]["gender"] and one[0]["age"] == two[0]["age"]


def test_fp16_ensemble_is_half_the_file_and_runs_in_fp32(members, tmp_path):
    from safetensors.torch import load_file

    root, _ = members
    full = build_ensemble([root / "m0", root / "m1"], tmp_path / "full")
    assert main(["ensemble", str(root / "m0"), str(root / "m1"), "--out", str(tmp_path / "h"),
                 "--fp16"]) == 0  # fmt: skip
    half = tmp_path / "h" / "best.json"
    stored = load_file(str(half.with_suffix(".safetensors")))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    ratio = (
        half.with_suffix(".safetensors").stat().st_size
        / full.with_suffix(".safetensors").stat().st_size
    )
    assert 0.45 < ratio < 0.55
    assert json.loads(half.read_text())["weights_dtype"] == "float16"
    a, _ = load_model(full.parent)
    b, _ = load_model(half.parent)
    assert next(b.parameters()).dtype == torch.float32
    x = torch.randn(6, 1, 48, 48)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    for h in CFG.heads:
        torch.testing.assert_close(yb[h], ya[h], atol=2e-2, rtol=2e-2)
        assert not torch.equal(yb[h], ya[h])  # the weights were rounded


def test_same_data_is_judged_by_content_not_by_path(members, tmp_path, capsys):
    """Runs trained on other machines record other folders: the prepared data's content key
    decides (recorded by training, or read from the folder's manifest when it is here)."""
    root, _ = members
    here = tmp_path / "prepared"
    here.mkdir()
    (here / "manifest.json").write_text(json.dumps({"key": "k1", "state": "complete"}))
    (here / "faces.npz").write_bytes(b"")  # only its manifest is read

    def member(name, seed, config):
        make_member(tmp_path / name, seed, age_edges=[17, 26, 30, 38, 54])
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return str(tmp_path / name)

    gpu = member("gpu", 7, {"data": "/elsewhere/prep", "data_key": "k1"})
    cpu = member("cpu", 8, {"data": str(here)})  # no key recorded: read from the folder
    other = member("other", 9, {"data": "/elsewhere/prep2", "data_key": "k2"})
    unknown = member("unknown", 10, {"data": "/elsewhere/prep"})  # no key, not here

    path = build_ensemble([gpu, cpu], tmp_path / "ens")
    config = json.loads((path.parent / "config.json").read_text())
    assert config["data_key"] == "k1" and config["data"] == str(here)  # the path that is here
    assert B.resolve(path.parent).recorded_data_key() == "k1"
    for runs in ([gpu, other], [cpu, unknown]):
        assert main(["ensemble", *runs, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "different data" in err[0], err
    assert not (tmp_path / "bad" / "best.json").exists()
