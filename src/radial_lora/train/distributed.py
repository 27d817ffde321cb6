"""Several processes: FSDP2 sharding of the transformer, and optimizer state that reads and writes the same
under one process, DDP and FSDP (torch.distributed.checkpoint's state-dict helpers)."""

from __future__ import annotations

from typing import Any

import torch


def shard_model(transformer: torch.nn.Module) -> None:
    """FSDP2 (``fully_shard``): one unit per transformer block, then the root, over all processes.

    The frozen base and the LoRA are both sharded; each block's weights are gathered only while it
    runs, so a 14B base no longer has to fit on every GPU. Tested with gloo on CPU; not yet on NCCL/GPUs.
    """
    from torch.distributed.fsdp import fully_shard

    for child in transformer.children():
        if isinstance(child, torch.nn.ModuleList):  # Wan: blocks; HunyuanVideo: (single_)transformer_blocks
            for block in child:
                fully_shard(block)
    fully_shard(transformer)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state as one full, CPU, parameter-name-keyed dict (torch.distributed.checkpoint's
    ``get_optimizer_state_dict``): the same file from one process, DDP or FSDP (collective under FSDP; the
    full dict lands on rank 0), and it resumes on any number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an :func:`optimizer_state` dict, sharding it like the parameters under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
