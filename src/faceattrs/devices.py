"""Devices: names checked up front (a one-line error before any work, never a torch
traceback), the device a run uses (:func:`select_device`), whether it computes in bf16
(:func:`use_bf16`), and the cores this process may use."""

from __future__ import annotations

import os

import torch

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
    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(
            f"device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps"
        ) from None


def check_device(name: str) -> None:
    """ConfigError unless ``name`` names a device this machine has (``auto`` always does)."""
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


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU (under torchrun: this process's local GPU)."""
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def use_bf16(setting: str, device: torch.device) -> bool:
    """Resolve ``bf16`` = auto / on / off for ``device``.

    auto: on for CUDA with bf16 support and for CPUs with native bf16 (AVX512-BF16/AMX);
    off elsewhere: on AVX2-only CPUs bf16 is emulated (measured ~10x slower on one).
    """
    s = str(setting).lower()
    if s in ("on", "true", "1", "yes"):
        return True
    if s in ("off", "false", "0", "no"):
        return False
    if s != "auto":
        raise ConfigError(f"bf16 must be auto, on or off, not {setting!r}")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()
