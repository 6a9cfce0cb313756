"""Age estimation on top of the multitask model.

The reference's two-stage design (coarse age bins, then one regressor per bin) with
hard and soft routing, measured with the oracle-bin figure beside the honest one, and a
direct age head (per-year softmax, distribution-aware loss) as the alternative; the
better of the two on validation is the default.

Modules: ``bins`` (edges, labels), ``finetune`` (head-only then full training from the
multitask backbone), ``regress`` (per-bin regressors, routing), ``direct`` (the direct
head's losses), ``bundle`` (save / load / ``AgeModel``), ``evaluate`` (metrics),
``pipeline`` (``train_age``, the whole stage).

Run it::

    faceattrs train-age --model runs/cpu --data ../shared/data/utkface48.csv.gz \\
        --out runs/cpu/age --preset cpu
"""

from .bins import REFERENCE_EDGES, assign_bins, bin_labels, quantile_edges
from .bundle import AgeModel, load_age_model, resolve_bundle, save_age_model
from .config import PRESETS, AgeConfig
from .evaluate import evaluate_age
from .pipeline import train_age

__all__ = [
    "PRESETS",
    "REFERENCE_EDGES",
    "AgeConfig",
    "AgeModel",
    "assign_bins",
    "bin_labels",
    "evaluate_age",
    "load_age_model",
    "quantile_edges",
    "resolve_bundle",
    "save_age_model",
    "train_age",
]
