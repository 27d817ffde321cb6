"""Baselines: dense SDPA, and SDPA with the block mask expanded to tokens (the test oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_block_mask(block_mask: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Token-level ``[seq, seq]`` bool mask from a ``[nb, nb]`` block mask (memory O(seq^2): tests only)."""
    idx = torch.arange(seq_len, device=block_mask.device) // block_size
    return block_mask[idx[:, None], idx[None, :]]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
    """Plain SDPA over all tokens; ``key_padding_mask`` ``[batch, seq]`` (True = attend) if given."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA with the block mask expanded to tokens: slow, obviously right."""
    mask = expand_block_mask(block_mask.to(q.device), q.shape[-2], block_size)[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
