"""The input contract shared by training, inference, export and explanation.

Faces are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` grayscale uint8; the network sees
``(pixels / 255 - mean) / std`` with :data:`NORMALISATION`, i.e. values in [-1, 1].
:data:`DEFAULT_HEADS` are the multitask model's heads and class names (the CSV's codes,
in order); a checkpoint records its own heads, so a model with other heads needs no
change here. This module imports nothing (``normalise`` uses only tensor methods), so
the data stage and the command line can read it without loading PyTorch.

>>> import torch
>>> normalise(torch.tensor([[[0, 255]]], dtype=torch.uint8)).tolist()
[[[[-1.0, 1.0]]]]
"""

from __future__ import annotations

IMAGE_SIZE = 48  # faces are 48x48 grayscale, as in the public CSV
NORMALISATION = {"mean": 0.5, "std": 0.5}  # pixels / 255 in [0, 1] -> [-1, 1]
MAX_PIXELS = 50_000_000  # decompression-bomb guard: images over this many pixels are refused
GENDERS = ("Male", "Female")  # CSV code 0 = male, 1 = female
ETHNICITIES = ("White", "Black", "Asian", "Indian", "Other")  # CSV codes 0..4
# head name -> class names; the order of the dict is the order of the network's heads
DEFAULT_HEADS: dict[str, tuple[str, ...]] = {"gender": GENDERS, "ethnicity": ETHNICITIES}


def normalise(images):
    """uint8 ``(B, 48, 48)`` or ``(B, 1, 48, 48)`` tensor -> float ``(B, 1, 48, 48)`` in [-1, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    x = images.float().div_(255.0)
    return x.sub_(NORMALISATION["mean"]).div_(NORMALISATION["std"])


def class_names(heads: dict[str, int]) -> dict[str, list[str]]:
    """Class names for ``{head: n_classes}``: the known names, else ``"0", "1", ...``.

    >>> class_names({"gender": 2, "glasses": 3})
    {'gender': ['Male', 'Female'], 'glasses': ['0', '1', '2']}
    """
    out = {}
    for head, n in heads.items():
        known = DEFAULT_HEADS.get(head)
        out[head] = list(known) if known and len(known) == n else [str(i) for i in range(n)]
    return out


def links_not_searched(folder, linked) -> str:
    """The note for symbolic links to folders found while walking ``folder``: they are not
    followed (one may loop), and this says which, and what to do.

    >>> from pathlib import Path
    >>> links_not_searched(Path("ph"), [Path("ph/a"), Path("ph/b")])
    'not searched: 2 symlinked folder(s) (a, b); pass their targets to include them'
    """
    names = ", ".join(str(d.relative_to(folder)) for d in linked[:3])
    return f"not searched: {len(linked)} symlinked folder(s) ({names}); pass their targets to include them"
