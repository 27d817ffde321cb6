"""Processes as a ``data x sequence`` grid, and the collectives Ulysses sequence parallelism needs.

Why: the paper's flagship runs (Wan2.1-14B 720p 161 frames, HunyuanVideo 509 frames) keep 100+ GB of
activations per sample; only splitting one sample's tokens over GPUs divides that (DeepSpeed-Ulysses,
arXiv 2309.14509). ``N`` processes of a sequence group hold ``1/N`` of the tokens everywhere except inside
attention, where two all-to-alls trade "my tokens, all heads" for "all tokens, my heads" and back.

Gradients: every process of a sequence group computes the same loss on the gathered output, and
:func:`gather_shards`' backward sums the incoming gradients (its adjoint, an all-reduce then the local slice).
Each process's parameter gradients then sum, over the group, to ``N`` times the true gradient, and the
average over all ``data x sequence`` processes (DDP, FSDP) is exactly the data-parallel average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits: ``rank = data_rank * sequence + sequence_rank`` (a sequence group is
    contiguous ranks, one node's GPUs when ``sequence`` divides the GPUs per node)."""

    world: int
    rank: int
    sequence: int  # processes sharing one sample's tokens
    mesh: Any = None  # torch DeviceMesh ("data", "sequence"); None for one process

    @property
    def data(self) -> int:
        """Data-parallel replicas: distinct samples per micro-step slot."""
        return self.world // self.sequence

    @property
    def data_rank(self) -> int:
        return self.rank // self.sequence

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.sequence

    @property
    def sequence_group(self) -> dist.ProcessGroup | None:
        """The process group of this process's sequence group (None without sequence parallelism)."""
        return None if self.sequence == 1 or self.mesh is None else self.mesh.get_group("sequence")

    def describe(self) -> str:
        return f"{self.world} procs = {self.data} data x {self.sequence} sequence"


def divisors(n: int, up_to: int | None = None) -> list[int]:
    """The degrees that split ``n`` evenly (at most ``up_to``), for the error messages."""
    return [d for d in range(1, min(n, up_to or n) + 1) if n % d == 0]


def check_layout(world: int, sequence: int) -> None:
    """A clear error when ``sequence`` processes per sample cannot tile ``world`` processes."""
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise ValueError(f"sequence parallel degree must be a positive integer; got {sequence!r}")
    if world % sequence:
        raise ValueError(
            f"sequence parallel degree {sequence} does not divide the {world} processes; use one of {divisors(world)} "
            f"or launch a multiple of {sequence} processes"
        )


def make_layout(sequence: int, device: torch.device) -> ParallelLayout:
    """The layout of the running job (``torch.distributed`` initialised by accelerate or torchrun, or one
    process), with its 2-D ``DeviceMesh`` when there are several processes."""
    if not (dist.is_available() and dist.is_initialized()):
        check_layout(1, sequence)
        return ParallelLayout(1, 0, 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_layout(world, sequence)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // sequence, sequence), mesh_dim_names=("data", "sequence"))
    return ParallelLayout(world, rank, sequence, mesh)


def init_distributed(sequence: int, device: str | None) -> tuple[ParallelLayout, str]:
    """Join the job ``torchrun``/``accelerate launch`` started (NCCL on GPUs, gloo on CPUs) for a command that
    is not accelerate's (``generate``); returns the layout and this process's device (``cuda:LOCAL_RANK``)."""
    import os

    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ValueError(
                f"sequence parallel degree {sequence} needs {sequence} processes: launch with "
                f"torchrun --nproc-per-node {sequence} (or accelerate launch --num_processes {sequence})"
            )
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return make_layout(sequence, torch.device(device)), device


def close_distributed() -> None:
    """Leave the ``torch.distributed`` job, if this process joined one: without it gloo's worker threads
    outlive the interpreter and a rank can abort (SIGABRT, 'terminate called without an active exception')
    after the work is done, failing the whole torchrun job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(count: int, what: str, degree: int, hint: str) -> None:
    """A clear error when ``count`` ``what`` do not split over ``degree`` processes."""
    if count % degree:
        raise ValueError(
            f"sequence parallelism over {degree} processes needs the {what} ({count}) to divide by {degree}; "
            f"degrees that divide it: {divisors(count, max(degree * 2, 8))}. {hint}"
        )


# -- collectives with autograd ------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x[n]`` goes to rank ``n`` of ``group``; the result's ``[n]`` came from rank ``n`` (autograd: the
    backward is the same exchange reversed; torch's functional-collectives form, on gloo and NCCL)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), None, None, group))


def tokens_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[B, H, S/N, D]`` (my tokens, all heads) -> ``[B, H/N, S, D]`` (all tokens in rank order, my heads)."""
    n = dist.get_world_size(group)
    b, h, s, d = x.shape
    parts = x.reshape(b, n, h // n, s, d).transpose(0, 1)  # [N(dest), B, H/N, S/N, D]
    got = _all_to_all(parts, group)  # [N(source = token shard), B, H/N, S/N, D]
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def heads_to_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse of :func:`tokens_to_heads`: ``[B, H/N, S, D]`` -> ``[B, H, S/N, D]``."""
    n = dist.get_world_size(group)
    b, h, s, d = x.shape
    parts = x.reshape(b, h, n, s // n, d).permute(2, 0, 1, 3, 4)  # [N(dest = token shard), B, H/N, S/N, D]
    got = _all_to_all(parts, group)  # [N(source = head chunk), B, H/N, S/N, D]
    return got.transpose(0, 1).reshape(b, n * h, s // n, d)


def local_slice(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's contiguous ``1/N`` of ``x`` along ``dim`` (autograd: zeros elsewhere, no exchange)."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    size = x.shape[dim] // n
    return x.narrow(dim, r * size, size)


class _GatherShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # every rank's loss used every shard: sum, keep mine
        return local_slice(grad, ctx.dim, ctx.group).contiguous(), None, None


def gather_shards(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The shards of all ranks concatenated along ``dim`` in rank order (the backward sums, then slices)."""
    return _GatherShards.apply(x, dim, group)
