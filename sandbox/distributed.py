"""Data-parallel plumbing for pretraining: one process, or one per device under ``torchrun``.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 the default process group
is started (NCCL on CUDA, Gloo on CPU) and the model is wrapped in DDP, or sharded with FSDP2
(``fully_shard``) when asked. Checkpoints hold full, unsharded tensors in the single-process
layout whatever the wrapping, so a run resumes under any world size.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from sandbox.train import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this module started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> Dist:
    """Read the torchrun environment, pick this process's device, start the process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    return Dist(rank, world, device, owns)


def teardown(d: Dist) -> None:
    if d.owns_group:
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of ``t`` over processes (in place)."""
    if d.world > 1:
        dist.all_reduce(t)
    return t


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """DDP, or FSDP2 with one unit per block plus the root (embedding, head, final norm).
    One process gets the model as is."""
    if d.world == 1:
        return model
    if not fsdp:
        ids = [d.device.index] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether gathering the full state takes every process (FSDP), not only rank 0's copy."""
    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def no_sync(model: nn.Module, sync: bool):
    """Context for one micro-step's backward: gradients are reduced only when ``sync``."""
    if isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule) and not sync:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _full(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the whole tensor (gathers a shard; every process must call it)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights in the unwrapped model's names, a tied weight under its first name only."""
    module = unwrap(model)
    every = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    tied = every - {n for n, _ in module.named_parameters()}
    return {n: _full(t) for n, t in module.state_dict().items() if n not in tied}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with full CPU tensors."""
    state = optimizer.state_dict()
    state["state"] = {
        pid: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        for pid, entry in state["state"].items()
    }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full state saved by :func:`optimizer_state`, sharding it like the parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, entry in state["state"].items():
        p = params[int(pid)]
        if isinstance(p, DTensor):
            for k, v in entry.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    entry[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
    optimizer.load_state_dict(state)
