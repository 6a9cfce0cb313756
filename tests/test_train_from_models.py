"""Training from other models: distillation (the teachers' soft targets, the loss, kept for
a resume) and init= (the first weights are another run's, an ensemble member's or the
bundled model's)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import synthetic_faceset
from safetensors.torch import load_file
from train_helpers import tiny_cfg

from faceattrs import config as cfgmod
from faceattrs import training as T
from faceattrs.checkpoint import load_model
from faceattrs.model import FaceResNet
from faceattrs.training import losses, state


def test_distill_loss_blends_hard_and_soft_targets():
    torch.manual_seed(0)
    out = {"gender": torch.randn(6, 2), "ethnicity": torch.randn(6, 5)}
    batch = {"gender": torch.randint(0, 2, (6,)), "ethnicity": torch.randint(0, 5, (6,))}
    soft = {f"teacher_{h}": torch.rand(6, k).softmax(1) for h, k in T.HEADS.items()}
    w, sm = {"gender": 0.4, "ethnicity": 2.5}, {"ethnicity": 0.12}
    plain, _ = T.heads_loss(w, sm)(out, batch)
    assert T.distill_loss(w, sm, 0.0, 2.0)(out, {**batch, **soft})[0] == pytest.approx(plain)
    assert T.distill_loss(w, sm, 0.7, 2.0)(out, batch)[0] == pytest.approx(plain)  # no teacher
    got, parts = T.distill_loss(w, sm, 1.0, 2.0)(out, {**batch, **soft})
    p = soft["teacher_gender"]
    kl = (p * (p.log() - torch.log_softmax(out["gender"] / 2, 1))).sum(1).mean() * 4
    assert parts["gender"] == pytest.approx(kl.item(), rel=1e-5)
    assert got == pytest.approx(sum(w[h] * parts[h] for h in w))


def test_fit_distils_from_a_teacher_run(tmp_path):
    faces = synthetic_faceset(80)
    T.fit(faces, tmp_path / "teacher", tiny_cfg(epochs=1))
    images = torch.from_numpy(faces.images[:10])
    soft = T.teacher_targets(f"{tmp_path / 'teacher'}, {tmp_path / 'teacher'}", images, 2.0)
    model, _ = load_model(tmp_path / "teacher", "best")
    from faceattrs.model import predict

    a, b = predict(model, images), predict(model, images.flip(-1))
    for h in T.HEADS:
        want = (torch.from_numpy(a[h] / 2).softmax(1) + torch.from_numpy(b[h] / 2).softmax(1)) / 2
        assert torch.allclose(soft[f"teacher_{h}"], want, atol=1e-6)
    cfg = tiny_cfg(epochs=1, teachers=str(tmp_path / "teacher"))
    T.fit(faces, tmp_path / "student", cfg)
    saved = json.loads((tmp_path / "student" / "config.json").read_text())["config"]
    assert saved["teachers"] == str(tmp_path / "teacher") and saved["distill_weight"] == 0.5
    with pytest.raises(T.TrainError, match="teacher"):
        T.fit(faces, tmp_path / "s2", tiny_cfg(epochs=1, teachers=str(tmp_path / "none")))


def test_teacher_targets_are_kept_for_a_resume(tmp_path, monkeypatch):
    faces = synthetic_faceset(80)
    T.fit(faces, tmp_path / "teacher", tiny_cfg(epochs=1))
    cfg = tiny_cfg(epochs=1, teachers=str(tmp_path / "teacher"))
    T.fit(faces, tmp_path / "student", cfg)
    images = torch.from_numpy(faces.images[faces.indices("train")])
    saved = load_file(str(tmp_path / "student" / T.TEACHERS_FILE))
    want = T.teacher_targets(cfg.teachers, images, cfg.distill_temperature)
    assert saved.keys() == want.keys()
    assert all(torch.allclose(saved[k], want[k], atol=1e-6) for k in want)

    calls = []
    real = losses.teacher_targets
    monkeypatch.setattr(losses, "teacher_targets", lambda *a: calls.append(a) or real(*a))
    soft, _, cached = losses.teacher_targets_cached(tmp_path / "student", cfg, images)
    assert cached and not calls and all(torch.equal(soft[k], saved[k]) for k in saved)
    # another temperature, other images or retrained teachers: computed again
    hot = tiny_cfg(epochs=1, teachers=cfg.teachers, distill_temperature=3.0)
    assert not losses.teacher_targets_cached(tmp_path / "student", hot, images)[2]
    assert not losses.teacher_targets_cached(tmp_path / "student", cfg, images[:-1])[2]
    T.fit(faces, tmp_path / "teacher2", tiny_cfg(epochs=1, seed=1))
    (tmp_path / "teacher" / "best.safetensors").write_bytes(
        (tmp_path / "teacher2" / "best.safetensors").read_bytes()
    )
    assert not losses.teacher_targets_cached(tmp_path / "student", cfg, images)[2]
    assert len(calls) == 3


def test_init_starts_from_another_models_weights(tmp_path, monkeypatch):
    """init=RUN (or an ensemble's member, or "default"): the first weights are that
    network's, recorded with its file hash, kept through a resume; a network of another
    design, a missing folder or a member out of range is one clear error."""
    from faceattrs.ensemble import build_ensemble

    faces = synthetic_faceset(80)
    for seed in (0, 1):
        T.fit(faces, tmp_path / f"a{seed}", tiny_cfg(epochs=1, seed=seed))
    build_ensemble([tmp_path / "a0", tmp_path / "a1"], tmp_path / "pair")

    def fresh(**kw):
        torch.manual_seed(7)
        return FaceResNet(T.model_config(tiny_cfg(**kw)))

    for source, member, want in (("a1", 0, "a1"), ("pair", 1, "a1"), ("pair", 0, "a0")):
        model = fresh()
        rec = T.load_init(model, str(tmp_path / source), member)
        ref = load_file(str(tmp_path / want / "best.safetensors"))
        got = model.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), (source, member)
        assert rec["member"] == member and len(rec["weights_sha256"]) == 64
    # the bundled 48x48 model's members (by name): width 0.5, three heads
    model = fresh(width=0.5, age_head=True)
    T.load_init(model, "utk48", 1)
    from faceattrs.bundle import resolve

    bundled = resolve("utk48").load_multitask()[0].members[1].state_dict()
    assert all(torch.equal(model.state_dict()[k], bundled[k].float()) for k in bundled)

    for kw, match in (
        (
            {"width": 0.25},
            "width 0.125 with heads gender, ethnicity; these settings give width 0.25",
        ),
        ({"age_head": True}, "set width= and age_head= to match"),
    ):
        with pytest.raises(T.TrainError, match=match):
            T.load_init(fresh(**kw), str(tmp_path / "a0"))
    with pytest.raises(T.TrainError, match="holds 2 network"):
        T.load_init(fresh(), str(tmp_path / "pair"), 2)
    with pytest.raises(T.TrainError, match="init .*does not exist"):
        T.load_init(fresh(), str(tmp_path / "none"))
    with pytest.raises(cfgmod.ConfigError, match="init_member"):
        tiny_cfg(init_member=-1)

    # a run trains from those weights: with a learning rate of ~0 it ends where a1 was
    T.fit(faces, tmp_path / "still", tiny_cfg(epochs=1, lr=1e-12, weight_decay=0.0,
                                              init=str(tmp_path / "a1")))  # fmt: skip
    still = load_file(str(tmp_path / "still" / "best.safetensors"))
    a0, a1 = (load_file(str(tmp_path / f"a{i}" / "best.safetensors")) for i in (0, 1))
    learned = [k for k in a1 if "running" not in k and "num_batches" not in k]
    assert all(torch.allclose(still[k], a1[k], atol=1e-6) for k in learned)
    assert not all(torch.allclose(still[k], a0[k], atol=1e-3) for k in learned)

    # a run started from a0 records it, and a resume keeps the record
    cfg = tiny_cfg(epochs=2, patience=10, init=str(tmp_path / "a0"))
    real_save = state.save_checkpoint

    def crash_after_epoch_1(run_dir, name, model, meta):
        real_save(run_dir, name, model, meta)
        if name == "last":
            raise KeyboardInterrupt

    monkeypatch.setattr(state, "save_checkpoint", crash_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        T.fit(faces, tmp_path / "b", cfg)
    monkeypatch.undo()
    first = json.loads((tmp_path / "b" / "config.json").read_text())["init"]
    assert first["source"] == str(tmp_path / "a0") and first["member"] == 0
    T.fit(faces, tmp_path / "b", cfg, resume=True)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["init"] == first
