"""The multitask model: shapes, initialisation, gradients, initial loss, overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from faceattrs.model import FaceResNet, ModelConfig
from faceattrs.training import TrainConfig, multitask_loss, resolve_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FaceResNet(ModelConfig(width=0.125))


def test_shapes_embedding_and_cam_layer(model):
    x = torch.randn(3, 1, 48, 48)
    out = model.eval()(x)
    assert set(out) == {"gender", "ethnicity"}
    assert out["gender"].shape == (3, 2) and out["ethnicity"].shape == (3, 5)
    assert model.embed(x).shape == (3, model.embed_dim) == (3, 64)
    assert model.forward_features(x).shape == (3, 64, 6, 6)
    assert isinstance(model.get_submodule(model.cam_layer), torch.nn.Module)
    assert FaceResNet().embed_dim == 512  # full width = the reference's 512-d embedding


def test_architecture_follows_the_reference():
    m = FaceResNet(ModelConfig(width=0.25))
    stem_conv = m.stem[0]
    assert stem_conv.kernel_size == (3, 3) and stem_conv.stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert [len(s) for s in m.stages] == [2, 2, 2, 2]
    # 1x1 projection exactly where the shape changes (first block of stages 2-4)
    proj = [isinstance(b.shortcut, torch.nn.Sequential) for s in m.stages for b in s]
    assert proj == [False, False, True, False, True, False, True, False]
    for head in m.heads.values():
        assert isinstance(head.norm, torch.nn.LayerNorm) and head.drop.p == 0.35


def test_kaiming_normal_init():
    torch.manual_seed(0)
    conv = FaceResNet(ModelConfig(width=1.0)).stages[3][1].conv2  # 512x512x3x3
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)


def test_every_parameter_gets_a_gradient(model):
    x = torch.randn(6, 1, 48, 48)
    batch = {"gender": torch.randint(0, 2, (6,)), "ethnicity": torch.randint(0, 5, (6,))}
    loss, _ = multitask_loss(TrainConfig())(model.train()(x), batch)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_initial_loss_is_log_k(model):
    torch.manual_seed(1)
    x = torch.rand(64, 1, 48, 48) * 2 - 1
    out = model.train()(x)
    for head, k in (("gender", 2), ("ethnicity", 5)):
        ce = F.cross_entropy(out[head], torch.randint(0, k, (64,))).item()
        assert ce == pytest.approx(math.log(k), rel=0.05), head
    batch = {"gender": torch.randint(0, 2, (64,)), "ethnicity": torch.randint(0, 5, (64,))}
    loss, _ = multitask_loss(TrainConfig())(out, batch)
    assert loss.item() == pytest.approx(0.4 * math.log(2) + 2.5 * math.log(5), rel=0.05)


def test_one_batch_can_be_overfit(model):
    torch.manual_seed(2)
    x = torch.rand(16, 1, 48, 48) * 2 - 1
    batch = {"gender": torch.arange(16) % 2, "ethnicity": torch.arange(16) % 5}
    loss_fn = multitask_loss(resolve_config(None, ["ethnicity_smoothing=0"]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(60):
        loss, _ = loss_fn(model(x), batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model.eval()(x)
    assert loss.item() < 0.1 * first
    assert (out["gender"].argmax(1) == batch["gender"]).all()
    assert (out["ethnicity"].argmax(1) == batch["ethnicity"]).all()


def test_fp32_channels_last_backward_at_small_width():
    """PyTorch 2.13's CPU build segfaulted here on AVX-512 (1x1 stride-2 shortcut, 8 -> 16
    channels at 48x48) before the shortcut became ``StridedPointwise``; keep it covered."""
    m = FaceResNet(ModelConfig(width=0.125)).to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 48, 48).contiguous(memory_format=torch.channels_last)
    out = m(x)
    (out["gender"].sum() + out["ethnicity"].sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_strided_shortcut_keeps_the_conv_state_dict_keys():
    keys = set(FaceResNet(ModelConfig(width=0.125)).state_dict())
    assert "stages.1.0.shortcut.0.weight" in keys and "stages.1.0.shortcut.1.running_mean" in keys
