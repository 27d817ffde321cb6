"""FlexAttention backend: the block mask becomes a ``BlockMask`` directly, no token mask built.

Kept blocks go in as *full* blocks so the compiled kernel skips ``mask_mod`` for them. With a
key-padding mask, kept blocks that contain a padded key become *partial* blocks whose ``mask_mod``
reads the padding mask. The partial last block needs no ``mask_mod``: the exact ``seq_lengths``
bound it. The ``mask_mod`` also looks the block mask up, because *uncompiled* flex attention
ignores the block lists and evaluates only ``mask_mod`` (torch FlexAttention docs);
so the eager path is correct too, just dense-cost. CPU: forward only; CUDA: forward and backward.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from radial_lora.attention.sparse import mask_digest

logger = logging.getLogger(__name__)

_BLOCK_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
_BLOCK_CACHE_SIZE = 32
_FLEX_MASK_CACHE: OrderedDict[tuple, object] = OrderedDict()
_compiled = None


def compiled_flex_attention():
    """``torch.compile``d ``flex_attention`` (created once; compiles per shape on first call)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _kept_blocks(block_mask: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached (block mask on device, row counts int32 [nb], kept columns first int32 [nb, nb])."""
    _, digest = mask_digest(block_mask)
    key = (digest, str(device))
    hit = _BLOCK_CACHE.get(key)
    if hit is None:
        blk = block_mask.to(device=device, dtype=torch.bool)
        counts = blk.sum(-1, dtype=torch.int32)
        # Stable sort of "dropped?" puts kept columns first, in ascending order.
        indices = torch.argsort((~blk).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        hit = (blk, counts, indices)
        if len(_BLOCK_CACHE) >= _BLOCK_CACHE_SIZE:
            _BLOCK_CACHE.popitem(last=False)
        _BLOCK_CACHE[key] = hit
    return hit


def make_block_mask(
    block_mask: torch.Tensor,
    seq_len: int,
    block_size: int,
    device: torch.device,
    key_padding_mask: torch.Tensor | None = None,
):
    """``BlockMask`` for ``seq_len`` tokens; batch dimension 1 unless a key-padding mask is given."""
    from torch.nn.attention.flex_attention import BlockMask

    blk, counts, indices = _kept_blocks(block_mask, device)
    nb = blk.shape[0]
    if key_padding_mask is None:
        full_counts, full_idx = counts[None, None], indices[None, None]
        part_counts = torch.zeros_like(full_counts)
        part_idx = torch.zeros_like(full_idx)
        real = None
    else:
        real = key_padding_mask.to(device=device, dtype=torch.bool)
        batch = real.shape[0]
        padded = torch.nn.functional.pad(real, (0, nb * block_size - seq_len), value=True)
        clean = padded.view(batch, nb, block_size).all(-1)  # [B, nb]: key block has no padded key
        full = blk[None] & clean[:, None, :]
        part = blk[None] & ~clean[:, None, :]
        full_counts = full.sum(-1, dtype=torch.int32)[:, None]
        part_counts = part.sum(-1, dtype=torch.int32)[:, None]
        full_idx = torch.argsort((~full).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        part_idx = torch.argsort((~part).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = blk[q_idx // block_size, kv_idx // block_size]
        if real is not None:
            keep = keep & real[b, kv_idx]
        return keep

    return BlockMask.from_kv_blocks(
        part_counts,
        part_idx,
        full_counts,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
        compute_q_blocks=True,
    )


def flex_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int = 128,
    key_padding_mask: torch.Tensor | None = None,
    *,
    compile: bool = True,
) -> torch.Tensor:
    """Flex attention over validated inputs. ``compile=False`` runs eager (correct, dense cost)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(
            "backend 'flex' has no backward on CPU (FlexAttention limitation); "
            "use backend='sparse' (or 'auto') for training on CPU"
        )
    if q.device.type == "cpu" and compile and q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"backend 'flex' on CPU supports float32/bfloat16/float16, got {q.dtype}")
    if key_padding_mask is None:  # padding changes every call; the plain mask is worth caching
        key = (mask_digest(block_mask)[1], q.shape[2], block_size, str(q.device))
        bm = _FLEX_MASK_CACHE.get(key)
        if bm is None:
            bm = make_block_mask(block_mask, q.shape[2], block_size, q.device)
            if len(_FLEX_MASK_CACHE) >= _BLOCK_CACHE_SIZE:
                _FLEX_MASK_CACHE.popitem(last=False)
            _FLEX_MASK_CACHE[key] = bm
    else:
        bm = make_block_mask(block_mask, q.shape[2], block_size, q.device, key_padding_mask)
    if compile:
        return compiled_flex_attention()(q, k, v, block_mask=bm)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=bm)
