"""Training, by concept:

- :mod:`.config`: the settings (:class:`TrainConfig`, ``PRESETS``, :func:`resolve_config`,
  :func:`resume_settings`) and the network they build (:func:`model_config`);
- :mod:`.losses`: the multitask loss, distillation from teacher runs, the age head's term;
- :mod:`.loop`: the loop every training stage shares (sampling, AdamW with warm-up +
  cosine, :class:`EarlyStopping`, :func:`train_one_epoch`, :func:`evaluate_heads`,
  :func:`run_epochs`, history rows);
- :mod:`.weights`: where the weights start (``init``) and their moving average (``ema``);
- :mod:`.state`: the run folder's crash-consistent epoch files and the resume state;
- :mod:`.ddp`: data parallelism under ``torchrun``;
- :mod:`.run`: :func:`fit`, one run of the multitask model, all of the above in order.
"""

from .config import (
    AGE_YEARS,
    HEADS,
    PRESETS,
    HeadSpec,
    TrainConfig,
    TrainError,
    class_heads,
    config_from_dict,
    model_config,
    resolve_config,
    resume_settings,
    train_heads,
)
from .loop import (
    EarlyStopping,
    epoch_order,
    evaluate_heads,
    lr_factor,
    make_optimizer,
    make_scheduler,
    run_epochs,
    sampler_weights,
    seed_epoch,
    train_one_epoch,
    write_history,
)
from .losses import (
    TEACHERS_FILE,
    distill_loss,
    heads_loss,
    multitask_loss,
    teacher_targets,
    with_age_head,
)
from .run import fit
from .state import HISTORY_FIELDS, STATE_FILE, history_fields, read_train_state
from .weights import load_init, make_ema

__all__ = [
    "AGE_YEARS", "HEADS", "HISTORY_FIELDS", "PRESETS", "STATE_FILE", "TEACHERS_FILE",
    "EarlyStopping", "HeadSpec", "TrainConfig", "TrainError", "class_heads",
    "config_from_dict", "distill_loss",
    "epoch_order", "evaluate_heads", "fit", "heads_loss", "history_fields", "load_init",
    "lr_factor", "make_ema", "make_optimizer", "make_scheduler", "model_config",
    "multitask_loss", "read_train_state", "resolve_config",
    "resume_settings", "run_epochs", "sampler_weights", "seed_epoch", "teacher_targets",
    "train_heads", "train_one_epoch", "with_age_head", "write_history",
]  # fmt: skip
