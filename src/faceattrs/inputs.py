"""The input contract: what a face must look like for a model, carried by the model.

An :class:`InputSpec` (size, channels, mean/std, the face's framing) lives in every
model's settings (:class:`faceattrs.model.ModelConfig`) and checkpoint, as timm's
``pretrained_cfg`` does: the photo path crops to it, preparation stores faces in it,
augmentation, export and Grad-CAM read it from the model they serve. Faces are uint8,
``(N, S, S)`` grayscale or ``(N, S, S, 3)`` RGB; the network itself turns them into
``(pixels / 255 - mean) / std`` (:meth:`InputSpec.normalise`, called inside the model).
:data:`GRAY48` is the reference's contract (48x48 grayscale in [-1, 1], the public CSV);
a checkpoint without input settings is one of those.

:data:`DEFAULT_HEADS` are the multitask model's heads and class names (the CSV's codes,
in order); a checkpoint records its own heads, so a model with other heads needs no
change here. This module imports nothing (``normalise`` uses only tensor methods), so
the data stage and the command line can read it without loading PyTorch.

>>> import torch
>>> normalise(torch.tensor([[[0, 255]]], dtype=torch.uint8)).tolist()
[[[[-1.0, 1.0]]]]
>>> rgb = InputSpec(size=8, channels=3)
>>> tuple(rgb.normalise(torch.zeros(5, 8, 8, 3, dtype=torch.uint8)).shape)
(5, 3, 8, 8)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

CROPS = ("utkface", "dlib")  # face framings the photo path can cut (see InputSpec.crop)


@dataclass(frozen=True)
class InputSpec:
    """The faces a model takes. Immutable; ``to_dict`` / ``from_dict`` for JSON."""

    size: int = 48  # side in pixels (square faces)
    channels: int = 1  # 1 = grayscale (ITU-R 601 luma), 3 = RGB
    mean: tuple[float, ...] = (0.5,)  # per channel (or one for all), pixels / 255 scale
    std: tuple[float, ...] = (0.5,)
    # the face's framing: "utkface" = UTKFace's aligned & cropped chips (face centred, eyes
    # level, about 40 % margin), what the CSV was made from and the photo path aligns to;
    # "dlib" = dlib's face chip (dlib.get_face_chip from the 5 landmarks, padding 0.25), what
    # dlib's face-recognition network was trained on
    crop: str = "utkface"

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"input size must be a whole number of pixels >= 8, got {self.size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"input channels must be 1 (gray) or 3 (RGB), got {self.channels!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, self.channels):
                raise ValueError(f"input {key} needs 1 or {self.channels} values")
        if min(self.std) <= 0:
            raise ValueError(f"input std must be positive, got {self.std}")
        if self.crop not in CROPS:
            raise ValueError(f"input crop must be one of {', '.join(CROPS)}, got {self.crop!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """One face's uint8 array shape: ``(S, S)`` gray or ``(S, S, 3)`` RGB."""
        return (self.size, self.size) if self.channels == 1 else (self.size, self.size, 3)

    def describe(self) -> str:
        """``48x48 grayscale`` / ``96x96 RGB``."""
        return f"{self.size}x{self.size} {'grayscale' if self.channels == 1 else 'RGB'}"

    def normalise(self, images):
        """uint8 faces ``(B, S, S)``, ``(B, S, S, 3)`` or ``(B, C, S, S)`` -> float
        ``(B, C, S, S)``, ``(pixels / 255 - mean) / std`` per channel."""
        return self.standardise(self.channels_first(images).float().div_(255.0))

    def channels_first(self, images):
        """``(B, S, S)`` -> ``(B, 1, S, S)``; ``(B, S, S, 3)`` -> ``(B, 3, S, S)`` (a view);
        ``(B, C, S, S)`` unchanged."""
        if images.dim() == 3:
            return images.unsqueeze(1)
        if images.shape[1] != self.channels and images.shape[-1] == self.channels:
            return images.permute(0, 3, 1, 2)  # HWC -> CHW (a view: channels-last memory)
        return images

    def standardise(self, x):
        """Float ``(B, C, S, S)`` in [0, 1] -> ``(x - mean) / std``, in place."""
        if len(self.mean) == 1 and len(self.std) == 1:
            return x.sub_(self.mean[0]).div_(self.std[0])
        mean = x.new_tensor(self.mean).view(1, -1, 1, 1)
        std = x.new_tensor(self.std).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict | None) -> InputSpec:
        """The spec a checkpoint records; None or ``{}`` (older checkpoints) = :data:`GRAY48`.
        Unknown keys are an error (``ValueError``)."""
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown input settings: {', '.join(sorted(unknown))}")
        for key in ("mean", "std"):
            if key in values and not isinstance(values[key], list | tuple):
                values[key] = (values[key],)
        return cls(**values)


GRAY48 = InputSpec()  # the reference: 48x48 grayscale faces in [-1, 1], as in the public CSV
IMAGE_SIZE = GRAY48.size  # the CSV's face size (the CSV reader and the paper preset)
NORMALISATION = {"mean": 0.5, "std": 0.5}  # GRAY48's, as older checkpoints record it
MAX_PIXELS = 50_000_000  # decompression-bomb guard: images over this many pixels are refused
GENDERS = ("Male", "Female")  # CSV code 0 = male, 1 = female
ETHNICITIES = ("White", "Black", "Asian", "Indian", "Other")  # CSV codes 0..4
# head name -> class names; the order of the dict is the order of the network's heads
DEFAULT_HEADS: dict[str, tuple[str, ...]] = {"gender": GENDERS, "ethnicity": ETHNICITIES}


def normalise(images):
    """:data:`GRAY48`'s: uint8 ``(B, 48, 48)`` or ``(B, 1, 48, 48)`` -> float in [-1, 1]."""
    return GRAY48.normalise(images)


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
