"""Label names and input geometry shared by every stage (the input contract itself is
:mod:`faceattrs.inputs`; re-exported here for the data stage)."""

from .inputs import ETHNICITIES, GENDERS, IMAGE_SIZE

__all__ = ["AGE_RANGE", "ETHNICITIES", "GENDERS", "IMAGE_SIZE", "SPLITS"]

SPLITS = ("train", "val", "test")  # codes 0, 1, 2 in the prepared ``split`` array
AGE_RANGE = (1, 120)  # valid ages in years, inclusive
