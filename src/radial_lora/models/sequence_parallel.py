"""Ulysses sequence parallelism on a radial-patched diffusers transformer, by hooks at its family's cut points.

Every process of the group runs the whole transformer call on the same inputs; the hooks of the family's
:class:`~radial_lora.models.adapter.SequencePlan` cut the tokens to this process's contiguous shard right after
they appear (patch embedding, RoPE tables) and join them after the output projection, so the caller sees the
ordinary full output. In between, projections, norms, FFN, cross-attention to the text and RoPE run on the
shard, and the radial controller swaps tokens for heads around each self-attention
(:meth:`RadialController._attend_sharded`). The collectives: :mod:`radial_lora.parallel`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from radial_lora.models.adapter import Split
from radial_lora.models.radial import radial_controller
from radial_lora.parallel import check_divisible, divisors, gather_shards, local_slice

_SP_ATTR = "_radial_lora_sequence_parallel"


def _cut(value: Any, split: Split, group: dist.ProcessGroup) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim == split.ndim:
        return local_slice(value, split.dim, group)
    return value


def _input_hook(module: nn.Module, splits: dict[str, Split], group: dist.ProcessGroup) -> Any:
    names = list(inspect.signature(module.forward).parameters)

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = list(args)
        for name, split in splits.items():
            if name in kwargs:
                kwargs[name] = _cut(kwargs[name], split, group)
            elif names.index(name) < len(args):
                i = names.index(name)
                args[i] = _cut(args[i], split, group)
        return tuple(args), kwargs

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _output_hook(module: nn.Module, splits: dict[int | None, Split], group: dist.ProcessGroup) -> Any:
    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        if None in splits:
            return _cut(output, splits[None], group)
        out = list(output)
        for index, split in splits.items():
            out[index] = _cut(out[index], split, group)
        return type(output)(out)

    return module.register_forward_hook(hook)


def _gather_hook(module: nn.Module, dim: int, group: dist.ProcessGroup) -> Any:
    return module.register_forward_hook(lambda mod, args, output: gather_shards(output, dim, group))


def enable_sequence_parallel(transformer: nn.Module, group: dist.ProcessGroup) -> None:
    """Split this radial-patched transformer's tokens over the processes of ``group`` (call
    :func:`~radial_lora.models.radial.apply_radial_attention` first; every process of ``group`` must then make
    the same calls with the same inputs). Clear errors when the heads or a call's tokens do not divide."""
    controller = radial_controller(transformer)
    if controller is None:
        raise ValueError("sequence parallelism runs through the radial processors: apply_radial_attention first")
    n = dist.get_world_size(group)
    config = transformer.config
    heads = int(config.num_attention_heads)
    if heads % n:
        raise ValueError(
            f"sequence parallelism over {n} processes needs the attention heads ({heads}) to divide by {n}; "
            f"degrees that work for this model: {divisors(heads)}"
        )
    disable_sequence_parallel(transformer)
    plan = controller.adapter.sequence_plan
    patch = controller.adapter.patch_size(transformer)
    modules = dict(transformer.named_modules())

    def check_tokens(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        f, h, w = (int(s) // p for s, p in zip(latents.shape[2:], patch))
        check_divisible(
            f * h * w,
            f"video tokens of this call ({f} latent frames x {h} x {w} after patching)",
            n,
            "Change the frame count or resolution, or the sequence parallel degree.",
        )

    handles = [transformer.register_forward_pre_hook(check_tokens, with_kwargs=True)]
    for name, splits in plan.inputs.items():
        handles.append(_input_hook(modules[name], splits, group))
    for name, splits in plan.outputs.items():
        handles.append(_output_hook(modules[name], splits, group))
    for name, dim in plan.gather.items():
        handles.append(_gather_hook(modules[name], dim, group))
    handles += controller.adapter.sequence_hooks(transformer, group)
    controller.sequence_group = group
    setattr(transformer, _SP_ATTR, handles)


def disable_sequence_parallel(transformer: nn.Module) -> bool:
    """Remove the hooks (the transformer runs whole again); True if it was split."""
    handles = getattr(transformer, _SP_ATTR, None)
    if not handles:
        return False
    for handle in handles:
        handle.remove()
    setattr(transformer, _SP_ATTR, None)
    controller = radial_controller(transformer)
    if controller is not None:
        controller.sequence_group = None
    return True
