"""Process-group set-up under torchrun (NCCL on GPUs, gloo on CPUs), and the few collectives the stages use.
Without torchrun everything here is a no-op for a world of one."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0  # global rank of this process
    world: int = 1  # number of processes
    local_rank: int = 0  # rank on this machine (picks the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(backend: str = "auto", device: str = "cpu") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        uses_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if backend == "auto":
            backend = "nccl" if uses_cuda else "gloo"
        if uses_cuda:
            # NCCL's object collectives and barrier use the current device: without this every process on
            # a machine would pick cuda:0.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def active() -> bool:
    """A process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every process, in place (returned for chaining)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_floats(values: dict[str, float], device: str | torch.device = "cpu") -> dict[str, float]:
    """Each key's value summed over every process (every process must pass the same keys)."""
    if not active() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def sum_gradients(params) -> None:
    """Sum the .grad of `params` over every process, as DDP would (without its hooks: it suits losses that
    already divide by the whole batch's counts, double backward, and a process whose slice never touched
    a module). A parameter keeps grad None only where every process left it None, as a single process
    would for the whole batch."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    used = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not used:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in used])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for p in used:
        n = p.grad.numel()
        p.grad.copy_(flat[i: i + n].view_as(p.grad))
        i += n


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # DDP reducers and pending work objects in reference cycles go while the group still exists
        dist.destroy_process_group()


def pick_device(spec: str, info: DistInfo) -> str:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and info.world > 1:
        spec = f"cuda:{info.local_rank}"
    return spec
