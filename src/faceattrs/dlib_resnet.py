"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) in PyTorch.

The network is dlib's ``anet_type`` (examples/dnn_face_recognition_ex.cpp): a ResNet-34
with half the filters (32/64/128/256) on 150x150 colour face chips, whose last layer gives
a 128-d face descriptor. Its author released the model files into the public domain; the
file ships with the ``face_recognition_models`` package. :func:`load_dlib_weights` reads
the weights straight from that file (dlib's own serialization, parsed layer by layer and
checked against the network below), and :meth:`DlibFaceResNet.from_dat` builds the port.

What dlib computes, and the port with it (from dlib's source, dlib/dnn/*.h, cuda/cpu_dlib.cpp):

- input: RGB chips, ``(pixel - mean) / 256`` per channel (:func:`chips_to_input`);
- ``con`` layers have a bias; a strided ``con`` (stride 2) has no padding, a stride-1 one
  pads by half the filter size; each ``con`` is followed by an ``affine`` (batch norm in
  its inference form, ``x * gamma + beta``), folded here into the convolution's weights
  and bias (the same function; fine-tuning the conv trains the same family);
- the stem is conv 7x7 stride 2 (150 -> 72), ReLU, max-pool 3x3 stride 2 unpadded (-> 35);
- a downsampling block adds its conv branch to a 2x2 stride-2 average pool of its input;
  dlib's ``add_prev`` adds tensors of different shapes over the larger one, zeros where
  one is missing: the pooled input gets zero channels, and where the strided conv's map
  is smaller than the pooled one (8 -> 3 vs 4, then 4 -> 1 vs 2) its last rows and
  columns are zero. So the last stages run at 4x4 and 2x2;
- global average pool, then a 256 -> 128 linear layer without bias. The descriptor is
  that layer's output as it is (not normalised; ``loss_metric`` compares L2 distances,
  0.6 being the trained threshold).

>>> import torch
>>> m = DlibFaceResNet().eval()
>>> tuple(m(torch.zeros(2, 3, 150, 150)).shape), m.embed_dim
((2, 128), 128)
>>> tuple(m.forward_features(torch.zeros(1, 3, 150, 150)).shape)
(1, 256, 2, 2)
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .exceptions import FaceattrsError
from .inputs import InputSpec

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150  # dlib's input_rgb_image_sized<150>
DESCRIPTOR_DIM = 128
# the input layer's per-channel means (R, G, B), as float32: the file's values, checked on load
MEAN_RGB = (122.782, 117.001, 104.298)
SCALE = 256.0  # (pixel - mean) / 256
# the network's input contract: dlib's chip, (pixel - mean) / 256 as (x / 255 - m) / s
INPUT = InputSpec(
    size=CHIP_SIZE, channels=3, mean=tuple(m / 255 for m in MEAN_RGB), std=(SCALE / 255,),
    crop="dlib",
)  # fmt: skip
# (channels, blocks, first block downsamples) per stage, input to output
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


class DlibFormatError(FaceattrsError):
    """The file is not dlib's face-recognition ResNet as this port knows it."""


def default_dat_path() -> Path:
    """Where ``face_recognition_models`` installed the model file (found without importing
    the package: its ``__init__`` needs pkg_resources, see ``photo.detect._dlib_model``)."""
    spec = importlib.util.find_spec("face_recognition_models")
    where = spec.submodule_search_locations if spec else None
    if not where:
        raise DlibFormatError(
            "face_recognition_models is not installed (pip install face_recognition_models)"
        )
    return Path(where[0]) / "models" / DAT_NAME


# ---------------------------------------------------------------------------------------
# The network


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


class DlibBlock(nn.Module):
    """dlib's ``ares`` / ``ares_down``: relu(conv2(relu(conv1(x))) + shortcut(x)).

    The shortcut is ``x`` itself, or for a downsampling block its 2x2 stride-2 average
    pool with zero channels appended; where the branch's map is smaller than the
    shortcut's (``pad`` > 0) it gets ``pad`` zero rows and columns at the bottom and right,
    as dlib's ``add_prev`` does.
    """

    def __init__(self, cin: int, cout: int, down: bool, size: int):
        super().__init__()
        stride = 2 if down else 1
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 0 if down else 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.down = down
        self.extra_channels = cout - cin
        branch = _conv_out(size, 3, stride, 0 if down else 1)
        shortcut = (size - 2) // 2 + 1 if down else size
        if branch > shortcut or (not down and cin != cout):
            raise ValueError(f"no dlib block maps {cin}x{size} to {cout}x{branch}")
        self.pad = shortcut - branch
        self.out_size = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        if not self.down:
            return F.relu(out + x)
        skip = F.avg_pool2d(x, 2, 2)
        if self.extra_channels:
            skip = F.pad(skip, (0, 0, 0, 0, 0, self.extra_channels))
        if self.pad:
            out = F.pad(out, (0, self.pad, 0, self.pad))
        return F.relu(out + skip)


class DlibFaceResNet(nn.Module):
    """dlib's face-recognition ResNet: ``(B, 3, 150, 150)`` chips from
    :func:`chips_to_input` -> ``(B, 128)`` descriptors.

    The interface of :class:`faceattrs.model.FaceResNet`'s backbone: ``forward_features``
    (the last stage's maps, ``(B, 256, 2, 2)``), ``embed`` (the descriptor, what a head
    would sit on; ``embed_dim`` = 128) and ``cam_layer``. Randomly initialised here; the
    dlib weights: :meth:`from_dat`.
    """

    # the 4x4 maps of stage 3: the last stage's are 2x2, too coarse to show where it looks
    cam_layer = "stages.3"
    embed_dim = DESCRIPTOR_DIM

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 7, 2, 0)
        size = (_conv_out(CHIP_SIZE, 7, 2, 0) - 3) // 2 + 1  # 72 after the conv, 35 pooled
        stages, cin = [], 32
        for cout, n, down in STAGES:
            blocks = []
            for j in range(n):
                block = DlibBlock(cin, cout, down and j == 0, size)
                size, cin = block.out_size, cout
                blocks.append(block)
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, DESCRIPTOR_DIM, bias=False)

    @classmethod
    def from_dat(cls, path: str | Path | None = None) -> DlibFaceResNet:
        """The port with dlib's weights from ``path`` (default: the installed model file),
        in eval mode."""
        model = cls()
        model.load_state_dict(load_dlib_weights(path))
        return model.eval()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 150, 150)`` -> the last stage's maps ``(B, 256, 2, 2)``."""
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        return self.stages(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 150, 150)`` -> the 128-d descriptor ``(B, 128)``, not normalised."""
        return self.fc(self.forward_features(x).mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def conv_names(self) -> list[str]:
        """The convolutions in dlib's order (input to output), as state-dict prefixes."""
        names = ["stem"]
        for i, stage in enumerate(self.stages):
            for j in range(len(stage)):
                names += [f"stages.{i}.{j}.conv1", f"stages.{i}.{j}.conv2"]
        return names


def chips_to_input(chips: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB chips ``(N, 150, 150, 3)`` (or one ``(150, 150, 3)``, e.g. from
    ``dlib.get_face_chip``) -> the network's input ``(N, 3, 150, 150)`` float32.

    >>> tuple(chips_to_input(np.zeros((150, 150, 3), np.uint8)).shape)
    (1, 3, 150, 150)
    """
    x = torch.as_tensor(chips)
    if x.ndim == 3:
        x = x[None]
    if x.dtype != torch.uint8 or x.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
        raise ValueError(f"expected uint8 chips (N, 150, 150, 3), got {x.dtype} {tuple(x.shape)}")
    mean = torch.tensor(MEAN_RGB, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.permute(0, 3, 1, 2).float() - mean) / SCALE


# ---------------------------------------------------------------------------------------
# dlib's serialization (dlib/serialize.h, dlib/dnn/core.h, layers.h, input.h, loss.h,
# cuda/tensor.h)


class _Reader:
    """dlib's stream primitives over the file's bytes."""

    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: {what} at byte {self.pos}")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail("unexpected end of file")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        # one control byte (low 4 bits: byte count, 0x80: negative), then little-endian bytes
        ctrl = self.take(1)[0]
        n = ctrl & 0x0F
        if n > 8 or ctrl & 0x70:
            raise self.fail(f"bad integer control byte {ctrl:#x}")
        value = int.from_bytes(self.take(n), "little")
        return -value if ctrl & 0x80 else value

    def float(self) -> float:
        # float_details: mantissa (int64) then exponent (int16); value = mantissa * 2**exponent
        mantissa = self.int()
        return math.ldexp(mantissa, self.int())

    def bool(self) -> bool:
        ch = self.take(1)
        if ch not in (b"0", b"1"):
            raise self.fail(f"bad bool {ch!r}")
        return ch == b"1"

    def string(self) -> str:
        return self.take(self.int()).decode("latin-1")

    def expect_string(self, *allowed: str) -> str:
        s = self.string()
        if s not in allowed:
            raise self.fail(f"expected {' or '.join(allowed)}, found {s!r}")
        return s

    def tensor(self) -> np.ndarray:
        # version 2: n, k, nr, nc, then 4-byte little-endian IEEE floats
        version = self.int()
        if version != 2:
            raise self.fail(f"tensor format version {version} is not supported (only 2)")
        shape = tuple(self.int() for _ in range(4))
        count = math.prod(shape)
        return np.frombuffer(self.take(4 * count), "<f4").reshape(shape)

    def alias(self) -> tuple[int, ...]:
        version = self.int()
        if version != 1:
            raise self.fail(f"alias_tensor version {version} is not supported (only 1)")
        return tuple(self.int() for _ in range(4))


@dataclass(frozen=True)
class _Layer:
    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, fc
    arg: tuple = ()  # what the network definition says: see _dlib_layers


def _dlib_layers() -> list[_Layer | str]:
    """The network as dlib nests it, input to output: layers, and "tag" / "skip" wrappers
    (which add nothing to the file but their version number)."""
    con = lambda n, k, s: _Layer("con", (n, k, s))  # noqa: E731
    net: list[_Layer | str] = [con(32, 7, 2), _Layer("affine"), _Layer("relu")]
    net.append(_Layer("max_pool", (3, 3, 2, 2, 0, 0)))
    for n, blocks, down in STAGES:
        for j in range(blocks):
            stride = 2 if down and j == 0 else 1
            net += ["tag", con(n, 3, stride), _Layer("affine"), _Layer("relu")]
            net += [con(n, 3, 1), _Layer("affine")]
            if stride == 2:  # add_prev2<avg_pool<2,2,2,2,skip1<tag2<block>>>>
                net += ["tag", "skip", _Layer("avg_pool", (2, 2, 2, 2, 0, 0))]
            net += [_Layer("add_prev"), _Layer("relu")]
    net += [_Layer("avg_pool", (0, 0, 1, 1, 0, 0)), _Layer("fc", (DESCRIPTOR_DIM,))]
    return net


def _parse(data: bytes, name: str) -> list[dict]:
    """Parse the whole file: ``add_loss_layer<loss_metric_, net>``. Returns the layers'
    details, input to output (con: weight/bias; affine: gamma/beta; fc: weight)."""
    r = _Reader(data, name)
    if r.int() != 1:
        raise r.fail("not a dlib add_loss_layer (version 1)")
    r.expect_string("loss_metric_", "loss_metric_2")
    r.float(), r.float()  # margin, distance threshold
    net = _dlib_layers()
    # every wrapper writes its version, then its subnetwork, then (add_layer) its own
    # state: so the versions come first, outside in, then the input layer, then each
    # layer's details and state, inside out
    versions = []
    for i, item in enumerate(reversed(net)):
        versions.append(r.int())
        innermost = i == len(net) - 1  # core.h's add_layer over the input layer
        ok = {1} if isinstance(item, str) else ({2, 3} if innermost else {1, 2})
        if versions[-1] not in ok:
            what = item if isinstance(item, str) else f"add_layer<{item.kind}>"
            raise r.fail(f"unexpected {what} version {versions[-1]}")
    _read_input(r)
    layers = []
    for item, version in zip(net, reversed(versions), strict=True):
        if isinstance(item, str):
            continue
        layers.append(_read_layer(r, item))
        r.bool(), r.bool(), r.bool()  # set up, gradient stale, output disabled
        r.tensor(), r.tensor()  # x_grad, cached_output
        if item is net[0]:
            r.tensor()  # grad_final
            if version >= 3:
                r.int()  # sample expansion factor
        elif version == 2:
            r.tensor()  # params_grad
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} bytes left after the network")
    return layers


def _read_input(r: _Reader) -> None:
    r.expect_string("input_rgb_image_sized")
    means = tuple(r.float() for _ in range(3))
    size = (r.int(), r.int())
    if size != (CHIP_SIZE, CHIP_SIZE):
        raise r.fail(f"input size {size}, expected {CHIP_SIZE}x{CHIP_SIZE}")
    if not np.array_equal(np.float32(means), np.float32(MEAN_RGB)):
        raise r.fail(f"input means {means}, expected {MEAN_RGB}")


def _read_layer(r: _Reader, layer: _Layer) -> dict:
    kind = layer.kind
    if kind == "con":
        return _read_con(r, *layer.arg)
    if kind == "affine":
        r.expect_string("affine_")
        params, gamma, beta = r.tensor(), r.alias(), r.alias()
        if r.int() != 0:  # layer_mode: CONV_MODE = 0
            raise r.fail("affine layer not in conv mode")
        c = math.prod(gamma)
        if gamma != beta or params.size != 2 * c:
            raise r.fail(f"affine: {params.size} parameters for gamma {gamma}, beta {beta}")
        flat = params.reshape(-1)
        return {"kind": kind, "gamma": flat[:c], "beta": flat[c:]}
    if kind in ("relu", "add_prev"):
        r.expect_string(f"{kind}_")
        return {"kind": kind}
    if kind in ("max_pool", "avg_pool"):
        r.expect_string(f"{kind}_2")
        found = tuple(r.int() for _ in range(6))  # nr, nc, stride y, x, padding y, x
        if found != layer.arg:
            raise r.fail(f"{kind} {found}, expected {layer.arg}")
        return {"kind": kind}
    if kind == "fc":
        r.expect_string("fc_2")
        n_out, n_in = r.int(), r.int()
        params, weights, _biases, bias_mode = r.tensor(), r.alias(), r.alias(), r.int()
        for _ in range(4):
            r.float()  # learning-rate and weight-decay multipliers
        # output = input (N, n_in) @ W (n_in, n_out); fc_no_bias (FC_NO_BIAS = 1): no bias row
        want = (layer.arg[0], 1, (n_in, n_out, 1, 1), n_in * n_out)
        if (n_out, bias_mode, weights, params.size) != want:
            raise r.fail(f"fc: {n_in} -> {n_out}, bias mode {bias_mode}, weights {weights}")
        w = params.reshape(n_in, n_out)
        return {"kind": kind, "weight": w.T}
    raise AssertionError(kind)


def _read_con(r: _Reader, filters: int, size: int, stride: int) -> dict:
    version = r.expect_string("con_4", "con_5")
    params = r.tensor().reshape(-1)
    n, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
    shape, bias_shape = r.alias(), r.alias()
    for _ in range(4):
        r.float()  # learning-rate and weight-decay multipliers
    use_bias = r.bool() if version == "con_5" else True
    pad = size // 2 if stride == 1 else 0  # con_'s default padding
    want = (filters, size, size, stride, stride, pad, pad)
    if (n, nr, nc, sy, sx, py, px) != want or shape[0] != n or shape[2:] != (nr, nc):
        raise r.fail(f"con {(n, nr, nc, sy, sx, py, px)} filters {shape}, expected {want}")
    count = math.prod(shape)
    bias_count = math.prod(bias_shape) if use_bias else 0
    if params.size != count + bias_count or bias_count not in (0, n):
        raise r.fail(f"con: {params.size} parameters for filters {shape}, bias {bias_shape}")
    bias = params[count:] if bias_count else np.zeros(n, np.float32)
    return {"kind": "con", "weight": params[:count].reshape(shape), "bias": bias}


def load_dlib_weights(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The state dict of :class:`DlibFaceResNet` from dlib's model file (default: the one
    ``face_recognition_models`` installed), each ``affine`` folded into its ``con``.

    Raises :class:`DlibFormatError` when the file is missing or is not this network.
    """
    path = Path(path) if path is not None else default_dat_path()
    if not os.path.isfile(path):
        raise DlibFormatError(f"dlib model file not found: {path}")
    layers = _parse(path.read_bytes(), str(path))
    convs = [x for x in layers if x["kind"] == "con"]
    affines = [x for x in layers if x["kind"] == "affine"]
    (fc,) = [x for x in layers if x["kind"] == "fc"]
    state = {}
    for name, con, aff in zip(DlibFaceResNet().conv_names(), convs, affines, strict=True):
        g = aff["gamma"].astype(np.float64)
        w = con["weight"].astype(np.float64) * g[:, None, None, None]
        b = con["bias"].astype(np.float64) * g + aff["beta"]
        state[f"{name}.weight"] = torch.from_numpy(w.astype(np.float32))
        state[f"{name}.bias"] = torch.from_numpy(b.astype(np.float32))
    state["fc.weight"] = torch.from_numpy(np.ascontiguousarray(fc["weight"], np.float32))
    return state
