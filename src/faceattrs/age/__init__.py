"""Age estimation on top of the multitask model.

The reference's two-stage design (coarse age bins, then one regressor per bin) with
hard and soft routing, measured with the oracle-bin figure beside the honest one, and a
direct age head (per-year softmax, distribution-aware loss) as the alternative; the
better of the two on validation is the default.

Two layers; nothing imports upward (``tests/test_layers.py``):

- the model layer, what prediction loads: ``bins`` (edges, labels), ``direct`` (the
  direct head and its losses), ``conformal`` (the interval), ``regress`` (the per-bin
  regressors, routing), ``networks`` (``AgeModel`` and saving it; loading is
  :mod:`faceattrs.bundle`);
- the stage layer, what trains and measures: ``config`` (``AgeConfig``), ``finetune``
  (head-only then full training from the multitask backbone; the per-bin regressors'
  training), ``evaluate`` (metrics), ``pipeline`` (``train_age``, the whole stage).

Run it::

    faceattrs train-age --model runs/cpu --data ../shared/data/utkface48.csv.gz \\
        --out runs/cpu/age --preset cpu
"""

import importlib

# name -> submodule; loaded on first use, so that importing one submodule (e.g. the age
# model for prediction) does not import the training stage (kornia, matplotlib)
_LAZY = {
    "REFERENCE_EDGES": "bins",
    "assign_bins": "bins",
    "bin_labels": "bins",
    "quantile_edges": "bins",
    "AgeModel": "networks",
    "save_age_model": "networks",
    "PRESETS": "config",
    "AgeConfig": "config",
    "evaluate_age": "evaluate",
    "train_age": "pipeline",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
