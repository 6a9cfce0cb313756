"""The prepared dataset every later stage reads: uint8 faces, labels and the split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .exceptions import FaceattrsError
from .labels import SPLITS


@dataclass
class FaceSet:
    """Faces and labels held as numpy arrays, one row per face.

    images: ``(N, 48, 48)`` uint8 (or another model input's shape: ``(N, S, S, 3)`` RGB
    for a colour model; :meth:`require`); age: ``(N,)`` int16 years; gender: ``(N,)`` int8
    (0 male, 1 female); ethnicity: ``(N,)`` int8 (0..4, see ``labels.ETHNICITIES``);
    split: ``(N,)`` int8 (0 train, 1 val, 2 test; -1 when unsplit, e.g. external data);
    names: ``(N,)`` str, the source ``img_name`` (not a key: names repeat).
    """

    images: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    ethnicity: np.ndarray
    split: np.ndarray
    names: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def indices(self, split: str) -> np.ndarray:
        """Row indices of ``split`` ('train', 'val', 'test' or 'all')."""
        if split == "all":
            return np.arange(len(self))
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS + ('all',)}")
        return np.flatnonzero(self.split == SPLITS.index(split))

    def take(self, idx: np.ndarray) -> FaceSet:
        return FaceSet(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def subset(self, split: str) -> FaceSet:
        return self.take(self.indices(split))

    def require(self, spec, what: str = "the data") -> None:
        """The faces must be in ``spec``'s (an :class:`~faceattrs.inputs.InputSpec`) size
        and channels; else one line (:class:`FaceattrsError`) saying how to get them."""
        have = tuple(self.images.shape[1:])
        if have == spec.shape:
            return
        held = "x".join(map(str, have[:2])) + (" RGB" if len(have) == 3 else " grayscale")
        raise FaceattrsError(
            f"the model takes {spec.describe()} faces, but {what} holds {held} faces: "
            f"prepare photos with `faceattrs prepare --size {spec.size}"
            f"{' --color' if spec.channels == 3 else ''}` (a CSV holds 48x48 grayscale)"
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}
