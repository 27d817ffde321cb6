"""Block swap (``train.blocks_to_swap``): the last N transformer blocks' frozen weights live in pinned host
memory and visit the GPU one block at a time, the next one copied on a side stream while the current one runs.

Why: with an 8-bit base a 14B model still needs ~14 GB of weights on the card; a one-GPU user at long frame
counts needs that room for activations. Only the frozen base weights move: the LoRA (trained, small) and the
buffers stay on the GPU, so the optimizer and the gradients never see a host tensor.

How: a forward pre-hook on every block installs a swapped block's device copy (waiting for its prefetch, or
copying now) and starts the prefetch of the block that runs next: ``i + 1`` in forward, ``i - 1`` while
backward recomputes the blocks (gradient checkpointing, required: without it autograd would keep every
block's weights for backward). A forward hook puts the host weights back; the device copy is then held only by
what autograd saved from it, and freed with that. The Parameter *objects* are swapped, never their data, so
what autograd saved stays valid. The copies are exact, so results equal no swapping bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from radial_lora.models.quantize import transformer_blocks


def _parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly torchao) tensor stores."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is None or type(t.data) is torch.Tensor:
        return [t]
    return [p for name in inner()[0] for p in _parts(getattr(t, name))]


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` in page-locked memory (asynchronous copies to the GPU); a torchao tensor is rebuilt
    around pinned parts."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is None or type(t.data) is torch.Tensor:
        return t.detach().to("cpu").pin_memory()
    names, meta = inner()
    parts = {name: pinned(getattr(t, name)) for name in names}
    return type(t).__tensor_unflatten__(parts, meta, t.size(), t.stride())


@dataclass
class _Swapped:
    """One swapped block: where its frozen weights sit and their host copies."""

    slots: list[tuple[torch.nn.Module, str]]  # (module, parameter name) of each frozen weight
    host: list[torch.nn.Parameter]
    ready: tuple[list[torch.Tensor], Any] | None = None  # fetched device copies and their copy event


@dataclass
class BlockSwap:
    """The hooks and state of block swapping on one transformer; ``log`` records ``(event, block)`` pairs
    ("prefetch", "install", "install-sync" (not prefetched), "release") for the tests."""

    device: torch.device
    swapped: dict[int, _Swapped]
    count: int  # blocks in the transformer
    stream: Any = None  # the CUDA side stream of the copies
    current: int | None = None  # the swapped block whose device copies are installed
    log: list[tuple[str, int]] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def _copy(self, i: int) -> tuple[list[torch.Tensor], Any]:
        host = self.swapped[i].host
        if self.stream is None:  # CPU (the tests): a real copy, so the install/release path runs as on a GPU
            return [p.data.to(self.device, copy=True) for p in host], None
        with torch.cuda.stream(self.stream):
            copies = [p.data.to(self.device, non_blocking=True) for p in host]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def prefetch(self, i: int) -> None:
        """Start copying block ``i``'s weights to the device (on the side stream), unless already there."""
        if i in self.swapped and self.swapped[i].ready is None and not self._installed(i):
            self.swapped[i].ready = self._copy(i)
            self.log.append(("prefetch", i))

    def _installed(self, i: int) -> bool:
        return self.current == i

    def install(self, i: int) -> None:
        """Put block ``i``'s device copies in place of its host weights (waiting for their prefetch)."""
        s = self.swapped[i]
        if self._installed(i):
            return
        prefetched = s.ready is not None
        copies, event = s.ready if prefetched else self._copy(i)
        s.ready = None
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for part in (p for c in copies for p in _parts(c)):
                part.record_stream(current)  # the allocator must not reuse them before this stream is done
        for (module, name), copy in zip(s.slots, copies):
            module._parameters[name] = torch.nn.Parameter(copy, requires_grad=False)
        self.current = i
        self.log.append(("install" if prefetched else "install-sync", i))

    def release(self, i: int) -> None:
        """Put block ``i``'s host weights back; autograd keeps what it saved of the device copy."""
        s = self.swapped[i]
        for (module, name), host in zip(s.slots, s.host):
            module._parameters[name] = host
        self.current = None
        self.log.append(("release", i))

    def before_block(self, i: int) -> None:
        """Block ``i`` is about to run (forward, or its recompute in backward): install it, prefetch the next.
        A block whose recompute stopped early (torch's checkpoint stops once backward has what it needs, so no
        forward hook runs) is released here, when the next block starts."""
        backward = torch._C._current_graph_task_id() != -1
        if self.current is not None and self.current != i:
            self.release(self.current)
        if i in self.swapped:
            self.install(i)
        self.prefetch(i - 1 if backward else i + 1)

    def after_block(self, i: int) -> None:
        """Block ``i`` has run: release it; after a training forward's last block, prefetch that block again,
        the first one backward recomputes."""
        if self.current != i:
            return
        self.release(i)
        backward = torch._C._current_graph_task_id() != -1
        if i == self.count - 1 and not backward and torch.is_grad_enabled():
            self.prefetch(i)

    def remove(self) -> None:
        """Take the hooks off (the host weights stay where they are)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _frozen_slots(block: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    return [
        (module, name)
        for module in block.modules()
        for name, p in module._parameters.items()
        if p is not None and not p.requires_grad
    ]


def enable_block_swap(model: torch.nn.Module, blocks_to_swap: int, device: torch.device) -> BlockSwap:
    """Move ``model`` to ``device`` except the frozen weights of its last ``blocks_to_swap`` blocks, which go to
    pinned host memory (plain host memory when ``device`` is a CPU), and install the swapping hooks."""
    blocks = [b for _, b in transformer_blocks(model)]
    if not 0 < blocks_to_swap < len(blocks):
        raise ValueError(
            f"train.blocks_to_swap={blocks_to_swap}: the transformer has {len(blocks)} blocks; "
            f"swap 1 to {len(blocks) - 1} (at least one stays on the device)"
        )
    first = len(blocks) - blocks_to_swap
    swapped: dict[int, _Swapped] = {}
    for i in range(first, len(blocks)):
        slots = _frozen_slots(blocks[i])
        host = []
        for module, name in slots:
            p = module._parameters[name]
            data = pinned(p.data) if device.type == "cuda" else p.data.to("cpu")
            host.append(torch.nn.Parameter(data, requires_grad=False))
            module._parameters[name] = None  # not moved by .to() below
        swapped[i] = _Swapped(slots, host)
    model.to(device)
    for s in swapped.values():
        for (module, name), host in zip(s.slots, s.host):
            module._parameters[name] = host
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    swap = BlockSwap(device, swapped, len(blocks), stream)
    for i, block in enumerate(blocks):
        swap.handles.append(block.register_forward_pre_hook(lambda *_, i=i: swap.before_block(i)))
        swap.handles.append(block.register_forward_hook(lambda *_, i=i: swap.after_block(i)))
    return swap
