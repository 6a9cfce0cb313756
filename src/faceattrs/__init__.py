"""faceattrs: gender, ethnicity and age from face images.

Stages, one module or package each: ``data`` (read, validate), ``dedup``, ``prepare``
(split, cache), ``augment``, ``model``, ``training/``, ``metrics``, ``plots``, ``evaluate``,
``calibrate``, ``explain``, ``errors``, ``age/``, ``photo/``, ``predict``, ``export``,
``serve/``, ``distributed/``, ``report/``; ``cli`` on top. Underneath: ``inputs`` (the
input contract), ``bundle`` (what ``--model`` names, resolved once), ``backends``
(PyTorch / ONNX), ``postprocess`` (softmax, age routing). See docs/architecture.md.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"analyze": "predict", "FaceAnalyzer": "predict"}  # loaded on first use: keeps import light


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
