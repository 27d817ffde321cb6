"""Several processes: FSDP2 sharding of the transformer and its optimizer state (DDP needs nothing here:
torch's DistributedDataParallel wraps the model in the recipe)."""

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


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded tensors gathered (collective), so a checkpoint is the same
    file under DDP and FSDP and resumes on any number of processes."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in st.items()} for i, st in sd["state"].items()
    }
    return sd


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of full tensors: shard each per-parameter tensor like its parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            st = optimizer.state.get(p, {})
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
