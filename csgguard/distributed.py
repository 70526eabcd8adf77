"""Data-parallel training across processes (``torchrun``): ranks, shards and replica checks.

Launch ``torchrun --nproc_per_node N -m csgguard train ...`` (add ``--nnodes`` /
``--rdzv-endpoint`` for several machines): torchrun sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``, and :func:`distributed` turns them into a process group
(NCCL on CUDA, Gloo on CPU) and a :class:`DistContext`. With ``WORLD_SIZE`` unset
or 1, everything here is a no-op and training is the single-process code path.

Design (why the result matches a single-process run):

* ``batch_size`` stays the *global* batch. Every rank draws the same shuffled order
  from the same seeded generator, cuts the same global batches, and keeps its own
  contiguous slice of each (:func:`shard`): the shards are disjoint and their union
  is exactly the single-process batch, so the data order does not depend on N.
* Each rank scales its mean loss by ``n_rank * N / n_global``; DDP averages
  gradients over ranks, so the update is the gradient of the global-batch mean,
  even when the last batch does not split evenly.
* Gradients are all-reduced before the optimiser steps, so every rank applies the
  same update to the same weights: after the CSG step and ``gate.normalize_()``
  every rank holds the same G. :func:`replica_divergence` checks it each epoch
  (it is a bug if it is not 0).
* What still differs from one process: BatchNorm statistics are per rank (over
  ``batch_size / N`` images) unless ``--sync-bn`` (CUDA only) is given.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import CsgguardError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job; ``world_size == 1`` means single-process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when absent or malformed)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """True on rank 0 and in a plain single-process run (usable before/after the group exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0


def _local_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type == "cuda":
        if device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise CsgguardError(f"--device {device} names one GPU but torchrun started several processes per "
                                "node; use --device cuda (each process takes the GPU of its LOCAL_RANK)")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise CsgguardError(f"LOCAL_RANK {local_rank} needs GPU {index} but only "
                                f"{torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise CsgguardError(f"multi-process training supports cuda (NCCL) and cpu (Gloo), not {device.type}; "
                            "use --device cpu or cuda")
    return device


def _cpu_threads() -> None:
    """One process per core share: torchrun sets OMP_NUM_THREADS=1; honour it (or split the cores)."""
    want = os.environ.get("OMP_NUM_THREADS")
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    n = int(want) if want and want.isdigit() else max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(max(1, n))


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[tuple[DistContext, torch.device]]:
    """Join the torchrun job if there is one; yield (context, this rank's device).

    Creates the process group from the environment when ``WORLD_SIZE > 1`` and tears
    it down on exit; reuses (and leaves alone) a group the caller already made.
    """
    made = False
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(),
                          int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())
        if ctx.enabled:
            device = _local_device(device, ctx.local_rank)
    elif env_world_size() > 1:
        if not dist.is_available():
            raise CsgguardError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = _local_device(device, local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cpu":
            _cpu_threads()
        kwargs: dict[str, Any] = dict(backend=backend, timeout=timedelta(minutes=30))
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        made = True
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    else:
        yield SINGLE, device
        return
    try:
        yield ctx, device
    except BaseException:
        if made:  # no closing barrier: the other ranks may never reach it
            _release()
            dist.destroy_process_group()
        raise
    _release()
    if made:  # every rank is done with every collective before the group goes
        dist.barrier()
        dist.destroy_process_group()


def _release() -> None:
    """Free DDP wrappers now: a reducer left for interpreter shutdown keeps the group's
    worker threads alive there, and Gloo then aborts the process ("terminate called")."""
    gc.collect()


def shard(indices: torch.Tensor, ctx: DistContext) -> slice:
    """This rank's contiguous slice of one global batch (sizes differ by at most one)."""
    n, w, r = len(indices), ctx.world_size, ctx.rank
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def all_reduce_sum(values: list[float], device: torch.device, ctx: DistContext) -> list[float]:
    """Sum a few numbers over ranks (epoch loss / accuracy counters)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def replica_divergence(tensors: list[torch.Tensor], ctx: DistContext) -> float:
    """Largest |x_rank - x_rank0| over ``tensors`` and ranks (0.0 when replicas agree)."""
    if not ctx.enabled or not tensors:
        return 0.0
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


def broadcast_json(obj: Any, device: torch.device, ctx: DistContext) -> Any:
    """Send rank 0's JSON-able object to every rank (JSON bytes, never pickle)."""
    if not ctx.enabled:
        return obj
    payload = json.dumps(obj).encode() if ctx.is_main else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if ctx.is_main:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def wrap_model(model: torch.nn.Module, device: torch.device, ctx: DistContext, *,
               find_unused: bool) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (the model itself when single-process).

    ``find_unused`` must be true for a gated model trained with STD epochs: the STD
    path leaves the gate out of the graph, and DDP has to be told so.
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    if device.type == "cpu":
        # a conv with one input channel gets (equivalent) odd grad strides on CPU: harmless, noisy
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device, ctx: DistContext) -> torch.nn.Module:
    """BatchNorm statistics over the global batch (CUDA only: PyTorch has no CPU SyncBatchNorm)."""
    if not ctx.enabled:
        return model
    if device.type != "cuda":
        raise CsgguardError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm does not run on CPU)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
