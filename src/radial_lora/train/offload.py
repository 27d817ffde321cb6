"""CPU offload of the block inputs gradient checkpointing keeps, for single-GPU users short of memory.

With checkpointing, what a transformer keeps for backward is mostly each block's input stream ``[B, S, D]``
(Wan2.1-14B: 10 KB per token per block in bf16). This checkpoint function copies that input to host memory
at the end of the block's forward, frees the device copy, and brings it back when backward recomputes the
block: the device holds one block's worth, the host the rest (at the cost of a host round trip per block).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def _is_stream(x: Any) -> bool:
    """A block's running token stream: ``[B, S, D]`` and carrying the LoRA's gradient. Shared tables (RoPE,
    timestep embeddings, Wan's frozen text) are neither, are held by the caller anyway, and stay put."""
    return isinstance(x, torch.Tensor) and x.ndim == 3 and x.requires_grad and x.is_floating_point()


def offloaded_checkpoint(function: Callable, *args: Any, offload_to: torch.device, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint`` (non-reentrant) of ``function(*args)`` whose saved stream inputs live on
    ``offload_to``; the copies are autograd ops, so gradients flow exactly as without offload."""
    device = next((a.device for a in args if _is_stream(a)), None)
    if device is None or device == offload_to:
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    flags = tuple(_is_stream(a) for a in args)
    pin = offload_to.type == "cpu" and device.type == "cuda"  # pinned host memory: asynchronous copies back
    moved = tuple(a.to(offload_to, non_blocking=pin) if f else a for a, f in zip(args, flags))

    def run(*held: Any) -> Any:
        return function(*(h.to(device, non_blocking=True) if f else h for h, f in zip(held, flags)), **kwargs)

    return checkpoint(run, *moved, use_reentrant=False)


def checkpoint_offloading(offload_to: str = "cpu") -> dict[str, Any]:
    """``enable_gradient_checkpointing`` keyword arguments that offload the block inputs to ``offload_to``
    (from whichever device each block runs on)."""
    return {"gradient_checkpointing_func": functools.partial(offloaded_checkpoint, offload_to=torch.device(offload_to))}
