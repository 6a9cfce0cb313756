"""Age estimation on top of the multitask model.

The reference's two-stage design (coarse age bins, then one regressor per bin) with
hard and soft routing, measured with the oracle-bin figure beside the honest one, and a
direct age head (per-year softmax, distribution-aware loss) as the alternative; the
better of the two on validation is the default.

Modules: ``bins`` (edges, labels), ``finetune`` (head-only then full training from the
multitask backbone), ``regress`` (per-bin regressors, routing), ``direct`` (the direct
head's losses), ``bundle`` (``AgeModel`` and saving it; loading is :mod:`faceattrs.bundle`), ``evaluate`` (metrics),
``pipeline`` (``train_age``, the whole stage).

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
    "AgeModel": "bundle",
    "save_age_model": "bundle",
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
