"""Devices and processes: which device a run uses, the ``torchrun`` process group, and the
collectives the trainer needs (all-gather with gradient, label gather, loss-gradient average).

Under ``torchrun`` (``WORLD_SIZE > 1``) every process joins one group (NCCL on CUDA, gloo on the
CPU); outside it everything here is the identity.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ProcessGroup", "resolve_device", "setup_distributed", "gather_with_grad",
           "gather_labels", "average_loss_gradients", "all_reduce_mean", "autocast"]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda if available, else mps if available, else cpu; others are checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu' "
                         f"or 'auto'")
    if device == "mps" and not _mps_available():
        raise ValueError("device='mps' but Apple MPS is not available here; use 'cpu' or 'auto'")
    return torch.device(device)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


@dataclass
class ProcessGroup:
    """The process group this run is part of (world_size 1: not distributed)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the group if this process created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str) -> ProcessGroup:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return ProcessGroup(dist.get_world_size(), dist.get_rank(),
                            int(os.environ.get("LOCAL_RANK", dist.get_rank())), False)
    if world <= 1:
        return ProcessGroup()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return ProcessGroup(world, rank, local, True)


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` [b, ...] from every rank into [world * b, ...] (rank order).

    The local block keeps its autograd graph; the other ranks' blocks are constants. Because
    every rank then computes the same global loss and DistributedDataParallel *averages* the
    gradients over ranks, the local block's gradient is scaled by the world size: the averaged
    gradient is then exactly that of the global loss (the "concat trick" of SimCLR / MoCo code,
    which needs no reduce-scatter and so works with gloo). Outside a process group: ``x``.
    """
    if not _in_group():
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = _ScaleGrad.apply(x, float(world)) if x.requires_grad else x
    return torch.cat(parts, dim=0)


def gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """All-gather a label vector (rank order); outside a process group: ``labels``."""
    if not _in_group():
        return labels
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)


def average_loss_gradients(loss: nn.Module, world: int) -> None:
    """Loss parameters (margin beta, proxies) are outside DDP: average their gradients (every
    rank computes the same global loss, so this only guards against drift)."""
    for p in loss.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def all_reduce_mean(value: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """The mean of ``value`` over the ranks (``value`` itself outside a group)."""
    if not group.active:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / group.world_size


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` in ``amp`` ("bf16" / "fp16") on CUDA; a no-op elsewhere or for "none"."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)
