"""Data-parallel training under ``torchrun``: join the process group, this process's rank,
sums over ranks, the model wrapped in ``DistributedDataParallel``. Alone (no ``torchrun``)
every function is a no-op: rank 0 of 1."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    NCCL on CUDA, gloo elsewhere. Returns ``(rank, world_size)``; ``(0, 1)`` alone.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    return world()[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (unchanged alone)."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank."""
    if world()[1] > 1:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` when ``world_size`` > 1, else itself."""
    if world_size <= 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
