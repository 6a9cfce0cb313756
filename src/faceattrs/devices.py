"""Device names checked up front: a one-line error before any work, never a torch traceback."""

from __future__ import annotations

import os

from .config import ConfigError


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_device_name(name: str) -> None:
    """ConfigError unless ``name`` is ``auto`` or a device string torch can parse."""
    if name == "auto":
        return
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(
            f"device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps"
        ) from None


def check_device(name: str) -> None:
    """ConfigError unless ``name`` names a device this machine has (``auto`` always does)."""
    import torch

    check_device_name(name)
    if name == "auto":
        return
    dev = torch.device(name)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {name!r}: no CUDA GPU here; use cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {name!r}: only {n} CUDA GPU(s) here (0..{n - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            raise ConfigError(f"device {name!r}: MPS is not available here; use cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"device {name!r}: use auto, cpu, cuda, cuda:N or mps")
