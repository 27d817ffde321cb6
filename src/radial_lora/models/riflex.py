"""RIFLEx: training-free length extrapolation by slowing one temporal RoPE component.

Why: the Radial Attention paper's Table 2 compares its LoRA with RIFLEx (Zhao et al., ICML 2025,
arXiv 2502.15894, github thu-ml/RIFLEx). Its finding, restated: the temporal 1-D RoPE has frequencies
``theta_j = b^(-2(j-1)/d)`` with periods ``N_j = 2 pi / theta_j`` (in latent frames); the component whose period
is just past the training length (the "intrinsic frequency" ``k``) is the one that makes a longer video repeat,
so RIFLEx lowers it to ``theta_k = 0.9 * 2 pi / L`` for ``L`` requested latent frames, keeping ``L`` within 90%
of one period. Nothing else changes.

Here ``k`` defaults to the first component whose period covers the training length: for HunyuanVideo (b 256,
d 16, 33 latent frames) that is k = 4, the value the reference code uses. A length the period already covers
keeps its frequency (``min``), so RIFLEx is a no-op at 1x. It is applied as a forward hook on the
transformer's RoPE module that rewrites the two channels of component ``k`` for the latent frames of each call,
so one setting serves every length (generation, held-out loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SAFETY = 0.9  # RIFLEx's margin: the new period is L / 0.9


@dataclass(frozen=True)
class TemporalRope:
    """Where a transformer's temporal RoPE lives and how it is laid out.

    ``module.forward(hidden_states)`` returns ``(cos, sin)`` over video tokens in frame-major order, the last
    dimension the rotary channels with the temporal ones first, each component's value repeated in two
    adjacent channels (diffusers' ``repeat_interleave_real``): Wan and HunyuanVideo both do.
    """

    module: nn.Module
    base: float
    dim: int  # temporal rotary channels (dim / 2 components)
    patch_t: int  # latent frames per token along time


def rope_periods(base: float, dim: int) -> list[float]:
    """Period in latent frames of each temporal component ``j = 1 .. dim/2``: ``2 pi * b^(2(j-1)/d)``."""
    return [2 * math.pi * base ** (2 * j / dim) for j in range(dim // 2)]


def intrinsic_component(base: float, dim: int, train_latent_frames: int) -> int:
    """1-based ``k``: the first component whose period is at least the training length (the last if none)."""
    periods = rope_periods(base, dim)
    return next((j + 1 for j, p in enumerate(periods) if p >= train_latent_frames), len(periods))


def riflex_frequency(base: float, dim: int, k: int, latent_frames: int) -> float:
    """Component ``k``'s frequency for ``latent_frames``: ``min(theta_k, 0.9 * 2 pi / L)``."""
    if not 1 <= k <= dim // 2:
        raise ValueError(f"RIFLEx k={k} is outside the temporal RoPE's components 1..{dim // 2}")
    theta_k = base ** (-2 * (k - 1) / dim)
    return min(theta_k, SAFETY * 2 * math.pi / latent_frames)


def _rewrite(rope: TemporalRope, k: int, hidden_states: torch.Tensor, output: Any) -> Any:
    cos, sin = output
    latent_frames = hidden_states.shape[2] // rope.patch_t
    theta = riflex_frequency(rope.base, rope.dim, k, latent_frames)
    channels = cos.shape[-1]
    tokens = cos.numel() // channels
    t = (torch.arange(tokens, device=cos.device, dtype=torch.float64) // (tokens // latent_frames)) * theta
    cos, sin = cos.clone(), sin.clone()
    flat_cos, flat_sin = cos.view(tokens, channels), sin.view(tokens, channels)
    cols = slice(2 * (k - 1), 2 * k)
    flat_cos[:, cols] = torch.cos(t).to(cos.dtype)[:, None]
    flat_sin[:, cols] = torch.sin(t).to(sin.dtype)[:, None]
    return cos, sin


@contextmanager
def riflex(ropes: Sequence[TemporalRope], k: int | None) -> Iterator[None]:
    """Within the block, every listed RoPE gives component ``k`` its RIFLEx frequency (``k=None``: unchanged)."""
    if k is None:
        yield
        return
    handles = [
        rope.module.register_forward_hook(
            lambda _m, args, out, rope=rope: _rewrite(rope, k, args[0], out), with_kwargs=False
        )
        for rope in ropes
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pipeline_ropes(adapter: Any, pipe: Any) -> list[TemporalRope]:
    """The temporal RoPE of every transformer of a pipeline (both Wan2.2 A14B experts)."""
    return [adapter.temporal_rope(t) for t in adapter.transformers(pipe) if t is not None]


def default_component(rope: TemporalRope, base_frames: int, temporal_factor: int = 4) -> int:
    """:func:`intrinsic_component` for a model trained at ``base_frames`` video frames."""
    latent_frames = 1 + (base_frames - 1) // temporal_factor
    return intrinsic_component(rope.base, rope.dim, max(1, latent_frames // rope.patch_t))


def resolve_component(
    ropes: Sequence[TemporalRope], base_frames: int | None, k: int | None, temporal_factor: int = 4
) -> int | None:
    """The ``k`` to use: the given one, else the rule's for ``base_frames``; None (RIFLEx off) without either."""
    if k is not None:
        for rope in ropes:
            riflex_frequency(rope.base, rope.dim, k, 1)
        return int(k)
    if base_frames is None or not ropes:
        return None
    return default_component(ropes[0], base_frames, temporal_factor)
