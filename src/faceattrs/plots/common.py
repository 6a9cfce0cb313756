"""Shared figure helpers."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from ..io import write_with


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    path = Path(path)
    write_with(path, lambda p: fig.savefig(p, dpi=dpi, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path
