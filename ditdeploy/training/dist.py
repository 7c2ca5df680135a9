"""torch.distributed set-up for ``torchrun`` (gloo on CPU, nccl on GPU) and the few collectives training needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ditdeploy.errors import DitDeployError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group if WORLD_SIZE > 1.

    ``device``: "auto" (CUDA if there is a GPU per local rank, else CPU), "cpu" or "cuda". The backend is nccl on
    CUDA, gloo on CPU.
    """
    from ditdeploy.run.shard_workers import dist_env

    rank, world = dist_env() or (0, 1)  # stray RANK/WORLD_SIZE without a launcher: one line, no endless wait
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        # NCCL needs one GPU per rank: more ranks on this node than GPUs train on the CPU (gloo) instead
        device = "cuda" if gpus and local_world <= gpus else "cpu"
    if device == "cuda":
        if not gpus:
            raise DitDeployError("--device cuda but no CUDA GPU is visible: use --device cpu")
        if local_world > gpus:
            raise DitDeployError(f"{local_world} ranks on this node but {gpus} CUDA GPU(s): NCCL needs one GPU per "
                                 f"rank (torchrun --nproc_per_node {gpus}, or --device cpu)")
        torch.cuda.set_device(local % gpus)
        dev = torch.device("cuda", local % gpus)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise DitDeployError(f"unknown device {device!r}: choose auto, cpu or cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def mean_across(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Average a float tensor over ranks (identity for one process)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def any_across(info: DistInfo, flag: bool) -> bool:
    """True if ``flag`` is true on any rank."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
