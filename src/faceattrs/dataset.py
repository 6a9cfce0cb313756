"""The prepared dataset every later stage reads: uint8 faces, labels and the split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .exceptions import FaceattrsError
from .labels import SPLITS

# the labels every prepared folder holds, each an array of ``faces.npz`` under its name;
# another head's labels are the array ``label_NAME`` (:meth:`FaceSet.to_arrays`)
BASE_LABELS = ("age", "gender", "ethnicity")
EXTRA_PREFIX = "label_"


@dataclass
class FaceSet:
    """Faces and labels held as numpy arrays, one row per face.

    images: ``(N, 48, 48)`` uint8 (or another model input's shape: ``(N, S, S, 3)`` RGB
    for a colour model; :meth:`require`); labels: ``{name: (N,) array}``, the labels of
    the heads a model can train on: always age (int16 years), gender (int8: 0 male, 1
    female) and ethnicity (int8: 0..4, see ``labels.ETHNICITIES``), read also as
    ``faces.age`` etc.; another head's labels (class indices) under its name;
    split: ``(N,)`` int8 (0 train, 1 val, 2 test; -1 when unsplit, e.g. external data);
    names: ``(N,)`` str, the source ``img_name`` (not a key: names repeat).

    >>> import numpy as np
    >>> f = FaceSet.of(np.zeros((2, 48, 48), np.uint8), age=np.array([30, 40]),
    ...                gender=np.array([0, 1]), ethnicity=np.array([2, 3]),
    ...                split=np.array([0, 1]), names=np.array(["a", "b"]),
    ...                smile=np.array([1, 0]))
    >>> list(f.labels), f.subset("val").labels["smile"].tolist(), f.gender.tolist()
    (['age', 'gender', 'ethnicity', 'smile'], [0], [0, 1])
    >>> sorted(f.to_arrays())
    ['age', 'ethnicity', 'gender', 'images', 'label_smile', 'names', 'split']
    """

    images: np.ndarray
    labels: dict[str, np.ndarray]
    split: np.ndarray
    names: np.ndarray

    @classmethod
    def of(cls, images, age, gender, ethnicity, split, names, **extra) -> FaceSet:
        """A FaceSet from its arrays (``extra``: other heads' labels by name)."""
        return cls(images, {"age": age, "gender": gender, "ethnicity": ethnicity, **extra},
                   split, names)  # fmt: skip

    @classmethod
    def from_arrays(cls, arrays) -> FaceSet:
        """Inverse of :meth:`to_arrays` (a ``faces.npz``); a missing array: ``KeyError``."""
        extra = {k[len(EXTRA_PREFIX) :]: arrays[k] for k in arrays if k.startswith(EXTRA_PREFIX)}
        return cls.of(*(arrays[k] for k in ("images", *BASE_LABELS, "split", "names")), **extra)

    @property
    def age(self) -> np.ndarray:
        return self.labels["age"]

    @property
    def gender(self) -> np.ndarray:
        return self.labels["gender"]

    @property
    def ethnicity(self) -> np.ndarray:
        return self.labels["ethnicity"]

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
        labels = {k: v[idx] for k, v in self.labels.items()}
        return FaceSet(self.images[idx], labels, self.split[idx], self.names[idx])

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
        """The arrays of ``faces.npz``: images, age, gender, ethnicity, split, names (in
        this order, as always), then ``label_NAME`` per other head."""
        extra = {f"{EXTRA_PREFIX}{k}": v for k, v in self.labels.items() if k not in BASE_LABELS}
        return {"images": self.images, **{k: self.labels[k] for k in BASE_LABELS},
                "split": self.split, "names": self.names, **extra}  # fmt: skip
