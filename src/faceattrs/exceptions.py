"""The one base class for errors caused by the user's input (printed as one line, exit 2)."""


class FaceattrsError(Exception):
    """Bad input, a missing file, an inconsistent model folder: the message says which."""
