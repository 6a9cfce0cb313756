"""The ONNX graphs of a model bundle: the networks wrapped so that each graph takes uint8
faces and gives what :class:`faceattrs.backends.OnnxBackend` reads, and the manifest that
describes them (:func:`write_graphs`). ``faceattrs export`` (:mod:`faceattrs.export`) adds
the int8 quantization and the agreement check; the onnx backend writes the graphs of a
run folder given to it into a temporary folder (:func:`faceattrs.backends.open_onnx`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .age.direct import HEAD as DIRECT_HEAD
from .age.networks import COARSE_HEAD
from .bundle import ONNX_FORMAT as FORMAT
from .io import write_with

OPSET = 17
MIN_OPSET, MAX_OPSET = 10, 23  # measured with torch 2.13: 9 lacks strided slices (the shortcuts)


class _Multitask(nn.Module):
    def __init__(self, model, heads: list[str]):
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, faces):
        out = self.model(faces)  # uint8: the network normalises its input
        return tuple(out[h] for h in self.heads)


def _with_mirror(net, faces, flip: bool):
    """The faces normalised by ``net``'s input contract, followed by their mirror images
    when ``flip``."""
    x = net.input.normalise(faces)
    return torch.cat([x, torch.flip(x, dims=(-1,))]) if flip else x


def _mean_halves(t, flip: bool):
    if not flip:
        return t
    a, b = t.chunk(2)
    return (a + b) / 2


class _TwoStage(nn.Module):
    def __init__(self, coarse, regressors, head: str, flip: bool = False):
        super().__init__()
        self.coarse, self.regressors, self.head, self.flip = coarse, regressors, head, flip

    def forward(self, faces):
        z = self.coarse.embed(_with_mirror(self.coarse, faces, self.flip))
        logits = self.coarse.forward_head(z)[self.head]
        return _mean_halves(logits, self.flip), _mean_halves(self.regressors(z), self.flip)


class _Direct(nn.Module):
    def __init__(self, direct, head: str, flip: bool = False):
        super().__init__()
        self.direct, self.head, self.flip = direct, head, flip

    def forward(self, faces):
        x = _with_mirror(self.direct, faces, self.flip)
        return _mean_halves(self.direct(x)[self.head], self.flip)


def _export_graph(module: nn.Module, path: Path, outputs: list[str], opset: int, spec) -> None:
    module = module.eval()
    dummy = torch.zeros(2, *spec.shape, dtype=torch.uint8)
    axes = {name: {0: "batch"} for name in ["faces", *outputs]}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                module,
                (dummy,),
                str(tmp),
                input_names=["faces"],
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        module.eval()  # export restores the mode it found; keep eval for later use

    write_with(path, write)


def write_graphs(tm, out_dir: Path, opset: int = OPSET) -> tuple[dict[str, str], dict]:
    """Write the ONNX graphs of ``tm`` (a :class:`faceattrs.backends.TorchBackend`: the
    loaded networks of a bundle) into ``out_dir``; returns ``(graphs, manifest)``: the
    graph file per key and the manifest (not written: the caller adds to it)."""
    heads = list(tm.class_names) + ([DIRECT_HEAD] if tm.shared_age else [])
    graphs = {"multitask": "multitask.onnx"}
    spec = tm.bundle.input
    _export_graph(_Multitask(tm.model, heads), out_dir / graphs["multitask"], heads, opset, spec)
    age_meta = None
    am = tm.age_model
    if am is not None and tm.shared_age:
        age_meta = {k: tm.bundle.age[k] for k in ("edges", "bin_labels", "clip", "interval")}
        age_meta.update(approach="direct", routing="soft", direct="multitask")
        age_meta["flip_tta"] = tm.bundle.flip_tta  # inside the multitask graph
        age_meta["point"] = am.point
    elif am is not None:
        graphs["age_two_stage"] = "age_two_stage.onnx"
        _export_graph(
            _TwoStage(am.coarse, am.regressors, COARSE_HEAD, am.flip_tta),
            out_dir / graphs["age_two_stage"],
            ["age_bin", "per_bin"],
            opset,
            spec,
        )
        if am.direct is not None:
            graphs["age_direct"] = "age_direct.onnx"
            _export_graph(
                _Direct(am.direct, DIRECT_HEAD, am.flip_tta),
                out_dir / graphs["age_direct"],
                ["age_years"],
                opset,
                spec,
            )
        age_meta = {
            "edges": [float(e) for e in am.edges],
            "bin_labels": list(am.bin_labels),
            "approach": am.approach,
            "routing": am.routing,
            "clip": [float(c) for c in am.clip],
            "interval": am.interval,
            "flip_tta": am.flip_tta,  # inside the age graphs
            "point": am.point,
        }
    manifest = {
        "format": FORMAT,
        "source": str(Path(tm.source).resolve()),
        "opset": opset,
        "torch": torch.__version__,
        "input": {
            "name": "faces",
            "dtype": "uint8",
            "shape": ["batch", *spec.shape],
            "normalisation": "inside the graph: (x / 255 - {}) / {}".format(
                *(v[0] if len(v) == 1 else list(v) for v in (spec.mean, spec.std))
            ),
            "spec": spec.to_dict(),
        },
        "graphs": graphs,
        "class_names": tm.class_names,
        "temperatures": tm.temperatures,
        "flip_tta": tm.bundle.flip_tta,  # inside the multitask graph
        "age": age_meta,
    }
    return graphs, manifest
