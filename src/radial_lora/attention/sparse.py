"""Trainable block-sparse attention in plain torch: compute and memory follow the mask density.

Why this exists: nothing installable gives a trainable arbitrary block-sparse attention on CPU,
and per-block gathers are slower than dense SDPA (``shared/spec/attention-backends.md``). So the
query blocks are grouped into *chunks* of consecutive rows whose kept key blocks nearly coincide
(for the radial mask: the blocks of one latent frame). Each chunk gathers the union of its key
blocks once and runs one attention tile against it; the few dropped blocks inside the union are
masked with an additive ``-inf`` bias. Work is ``sum(rows x union)``, which the planner keeps
close to the number of kept blocks.

The tile math has two interchangeable kernels:

* ``"matmul"``: scores with ``matmul``, softmax through the log-sum-exp, any device and dtype.
* ``"flash"``: torch's fused CPU flash-attention tile (``aten._scaled_dot_product_flash_attention
  _for_cpu`` and its backward), the same kernel dense SDPA uses on CPU, so each kept block costs
  what it costs dense. CPU only.

Both run inside one ``autograd.Function`` whose backward recomputes each tile from the saved
log-sum-exp (FlashAttention-style): it saves only ``q, k, v, out, lse``, never the scores.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

KERNELS = ("auto", "matmul", "flash")

# Planner knobs: a chunk grows while kept/(rows*union) stays above MIN_EFFICIENCY and it spans at
# most MAX_CHUNK_TOKENS query tokens (keeps tiles cache-sized and the padding bias small).
MIN_EFFICIENCY = 0.8
MAX_CHUNK_TOKENS = 1024
# The matmul kernel splits heads so that one score tile holds at most this many elements.
MAX_TILE_ELEMENTS = 1 << 27
# Additive biases of all chunks are cached per dtype up to this many elements in total.
MAX_CACHED_BIAS_ELEMENTS = 1 << 24


@dataclass
class _Chunk:
    """One attention tile: a run of query tokens against the union of their kept key blocks."""

    q_start: int
    q_end: int
    k_index: torch.Tensor | None  # token indices of the union (None when it is one contiguous run)
    k_start: int
    k_end: int
    allowed: torch.Tensor | None  # [q_tokens, k_tokens] bool on CPU, None when every pair is kept
    biases: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)


@dataclass
class SparsePlan:
    """The chunk schedule for one (block mask, sequence length, block size, device)."""

    seq_len: int
    block_size: int
    chunks: list[_Chunk]
    kept_pairs: int  # query-key token pairs the mask keeps
    computed_pairs: int  # pairs the tiles compute (>= kept_pairs)

    @property
    def efficiency(self) -> float:
        """Fraction of computed score entries that the mask keeps (1.0 = no waste)."""
        return self.kept_pairs / self.computed_pairs if self.computed_pairs else 1.0


def _group_rows(mask: np.ndarray, block_size: int) -> list[tuple[int, int, np.ndarray]]:
    """Greedy contiguous grouping of query blocks: (start, end, union of kept key blocks)."""
    nb = mask.shape[0]
    max_rows = max(1, MAX_CHUNK_TOKENS // block_size)
    counts = mask.sum(1)
    groups = []
    start = 0
    while start < nb:
        union, kept, end = mask[start].copy(), int(counts[start]), start + 1
        while end < nb and end - start < max_rows:
            grown = union | mask[end]
            grown_kept = kept + int(counts[end])
            if grown_kept < MIN_EFFICIENCY * (end - start + 1) * int(grown.sum()):
                break
            union, kept, end = grown, grown_kept, end + 1
        groups.append((start, end, np.flatnonzero(union)))
        start = end
    return groups


def build_plan(block_mask: np.ndarray, seq_len: int, block_size: int, device: torch.device) -> SparsePlan:
    """Chunk schedule and gather indices for a validated ``[nb, nb]`` bool block mask."""
    sizes = np.full(block_mask.shape[0], block_size, dtype=np.int64)
    sizes[-1] = seq_len - (len(sizes) - 1) * block_size
    chunks, kept_pairs, computed = [], 0, 0
    for start, end, union in _group_rows(block_mask, block_size):
        q_start, q_end = start * block_size, min(end * block_size, seq_len)
        rows = block_mask[start:end][:, union]
        k_sizes = sizes[union]
        kept_pairs += int(sizes[start:end] @ rows.astype(np.int64) @ k_sizes)
        computed += (q_end - q_start) * int(k_sizes.sum())
        contiguous = bool(np.all(np.diff(union) == 1))
        k_start, k_end = int(union[0]) * block_size, min((int(union[-1]) + 1) * block_size, seq_len)
        k_index = None
        if not contiguous:
            idx = np.concatenate([np.arange(b * block_size, b * block_size + sizes[b]) for b in union])
            k_index = torch.from_numpy(idx).to(device)
        allowed = None
        if not rows.all():
            tok = np.repeat(np.repeat(rows, sizes[start:end], axis=0), k_sizes, axis=1)
            allowed = torch.from_numpy(tok)
        chunks.append(_Chunk(q_start, q_end, k_index, k_start, k_end, allowed))
    return SparsePlan(seq_len, block_size, chunks, kept_pairs, computed)


_PLAN_CACHE: dict[tuple, SparsePlan] = {}
_PLAN_CACHE_SIZE = 32


_DIGEST_MEMO: dict[int, tuple[weakref.ref, int, np.ndarray, str]] = {}


def mask_digest(block_mask: torch.Tensor) -> tuple[np.ndarray, str]:
    """The block mask as a CPU bool array and a content hash (cache key that survives new tensors).

    Memoised by tensor identity and version, so a mask on the GPU is copied to the host once,
    not on every attention call.
    """
    memo = _DIGEST_MEMO.get(id(block_mask))
    if memo is not None and memo[0]() is block_mask and memo[1] == block_mask._version:
        return memo[2], memo[3]
    arr = np.ascontiguousarray(block_mask.detach().to("cpu", torch.bool).numpy())
    digest = f"{arr.shape}:{hashlib.blake2b(np.packbits(arr).tobytes(), digest_size=16).hexdigest()}"
    for key in [key for key, m in _DIGEST_MEMO.items() if m[0]() is None]:
        del _DIGEST_MEMO[key]
    _DIGEST_MEMO[id(block_mask)] = (weakref.ref(block_mask), block_mask._version, arr, digest)
    return arr, digest


def get_plan(block_mask: torch.Tensor, seq_len: int, block_size: int, device: torch.device) -> SparsePlan:
    """Cached :func:`build_plan` keyed by mask content, sequence length, block size and device."""
    arr, digest = mask_digest(block_mask)
    key = (digest, seq_len, block_size, str(device))
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
        plan = _PLAN_CACHE[key] = build_plan(arr, seq_len, block_size, device)
    return plan


def _chunk_bias(
    plan: SparsePlan, chunk: _Chunk, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Additive ``[q_tokens, k_tokens]`` bias (0 kept, -inf dropped), cached when small enough."""
    if chunk.allowed is None:
        return None
    bias = chunk.biases.get(dtype)
    if bias is None:
        bias = torch.zeros(chunk.allowed.shape, dtype=dtype)
        bias.masked_fill_(~chunk.allowed, -math.inf)
        bias = bias.to(device)
        cached = sum(c.allowed.numel() for c in plan.chunks if c.allowed is not None)
        if cached <= MAX_CACHED_BIAS_ELEMENTS:
            chunk.biases[dtype] = bias
    return bias


def _gather(x: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
    """Keys or values of a chunk's union: a view when the union is contiguous, else one copy."""
    if chunk.k_index is None:
        return x[:, :, chunk.k_start : chunk.k_end]
    return x.index_select(2, chunk.k_index)


def _scatter_add(dst: torch.Tensor, chunk: _Chunk, src: torch.Tensor) -> None:
    """Accumulate a chunk's key/value gradients back into the full tensor."""
    if chunk.k_index is None:
        dst[:, :, chunk.k_start : chunk.k_end] += src
    else:
        dst.index_add_(2, chunk.k_index, src)


def _full_bias(
    plan: SparsePlan, chunk: _Chunk, dtype: torch.dtype, device: torch.device, pad_bias: torch.Tensor | None
) -> torch.Tensor | None:
    """Block bias plus key-padding bias, broadcastable to ``[batch, heads, q_tokens, k_tokens]``."""
    bias = _chunk_bias(plan, chunk, dtype, device)
    if pad_bias is None:
        return bias
    if chunk.k_index is None:
        pad = pad_bias[:, chunk.k_start : chunk.k_end]
    else:
        pad = pad_bias.index_select(1, chunk.k_index)
    pad = pad[:, None, None, :]  # [B, 1, 1, k_tokens]
    return pad if bias is None else bias + pad


def _head_slices(q: torch.Tensor, q_tokens: int, k_tokens: int) -> list[slice]:
    """Head ranges that keep one matmul score tile under MAX_TILE_ELEMENTS."""
    batch, heads = q.shape[:2]
    per_head = max(1, batch * q_tokens * k_tokens)
    step = max(1, min(heads, MAX_TILE_ELEMENTS // per_head))
    return [slice(h, min(h + step, heads)) for h in range(0, heads, step)]


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _forward_matmul(q, k, v, plan, pad_bias, scale):
    """Tile forward with matmul + log-sum-exp; returns (out, lse)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=_softmax_dtype(q.dtype), device=q.device)
    qs = q * scale
    for chunk in plan.chunks:
        a, b = chunk.q_start, chunk.q_end
        ku, vu = _gather(k, chunk), _gather(v, chunk)
        bias = _full_bias(plan, chunk, lse.dtype, q.device, pad_bias)
        for h in _head_slices(q, b - a, ku.shape[2]):
            s = torch.matmul(qs[:, h, a:b], ku[:, h].transpose(-1, -2)).to(lse.dtype)
            if bias is not None:
                s += bias
            m = torch.logsumexp(s, dim=-1)
            m = m.masked_fill(m == -math.inf, 0.0)  # a row with no real key: output 0, like SDPA
            lse[:, h, a:b] = m
            p = s.sub_(m[..., None]).exp_().to(q.dtype)
            out[:, h, a:b] = torch.matmul(p, vu[:, h])
    return out, lse


def _backward_matmul(dout, q, k, v, out, lse, plan, pad_bias, scale):
    """Tile backward: recompute p from lse, then dV = p^T dO, dS = p (dP - delta), dQ, dK."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    qs = q * scale
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    for chunk in plan.chunks:
        a, b = chunk.q_start, chunk.q_end
        ku, vu = _gather(k, chunk), _gather(v, chunk)
        dku, dvu = torch.zeros_like(ku), torch.zeros_like(vu)
        bias = _full_bias(plan, chunk, lse.dtype, q.device, pad_bias)
        for h in _head_slices(q, b - a, ku.shape[2]):
            s = torch.matmul(qs[:, h, a:b], ku[:, h].transpose(-1, -2)).to(lse.dtype)
            if bias is not None:
                s += bias
            p = s.sub_(lse[:, h, a:b, None]).exp_()
            do = dout[:, h, a:b]
            dvu[:, h] = torch.matmul(p.to(q.dtype).transpose(-1, -2), do)
            dp = torch.matmul(do, vu[:, h].transpose(-1, -2)).to(lse.dtype)
            ds = dp.sub_(delta[:, h, a:b, None]).mul_(p).to(q.dtype)
            dq[:, h, a:b] = torch.matmul(ds, ku[:, h]) * scale
            dku[:, h] = torch.matmul(ds.transpose(-1, -2), qs[:, h, a:b])
        _scatter_add(dk, chunk, dku)
        _scatter_add(dv, chunk, dvu)
    return dq, dk, dv


def _forward_flash(q, k, v, plan, pad_bias, scale):
    """Tile forward with torch's fused CPU flash kernel; returns (out, lse)."""
    out = torch.empty_like(q)
    lse = None
    for chunk in plan.chunks:
        a, b = chunk.q_start, chunk.q_end
        bias = _full_bias(plan, chunk, q.dtype, q.device, pad_bias)
        o, m = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, :, a:b], _gather(k, chunk), _gather(v, chunk), attn_mask=bias, scale=scale
        )
        if lse is None:  # the kernel picks the lse dtype (float32 for half types, else the input's)
            lse = torch.empty(q.shape[:3], dtype=m.dtype, device=q.device)
        out[:, :, a:b] = o
        lse[:, :, a:b] = m
    return out, lse


def _backward_flash(dout, q, k, v, out, lse, plan, pad_bias, scale):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for chunk in plan.chunks:
        a, b = chunk.q_start, chunk.q_end
        bias = _full_bias(plan, chunk, q.dtype, q.device, pad_bias)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout[:, :, a:b].contiguous(),
            q[:, :, a:b],
            _gather(k, chunk),
            _gather(v, chunk),
            out[:, :, a:b],
            lse[:, :, a:b],
            0.0,
            False,
            attn_mask=bias,
            scale=scale,
        )
        dq[:, :, a:b] = gq
        _scatter_add(dk, chunk, gk)
        _scatter_add(dv, chunk, gv)
    return dq, dk, dv


_KERNEL_FNS = {"matmul": (_forward_matmul, _backward_matmul), "flash": (_forward_flash, _backward_flash)}


class _BlockSparseAttention(torch.autograd.Function):
    """Chunked block-sparse attention; backward recomputes tiles from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, plan, pad_bias, kernel):
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, lse = _KERNEL_FNS[kernel][0](q, k, v, plan, pad_bias, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.pad_bias, ctx.kernel, ctx.scale = plan, pad_bias, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _KERNEL_FNS[ctx.kernel][1](dout, q, k, v, out, lse, ctx.plan, ctx.pad_bias, ctx.scale)
        return dq, dk, dv, None, None, None


def _flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    )


def sparse_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int = 128,
    key_padding_mask: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Block-sparse attention with inputs already validated by ``block_sparse_attention``.

    ``kernel="auto"`` takes the fused CPU flash tile on CPU and the matmul tile elsewhere.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if kernel == "auto":
        kernel = "flash" if _flash_available(q.device, q.dtype) else "matmul"
    elif kernel == "flash" and not _flash_available(q.device, q.dtype):
        raise ValueError(f"kernel 'flash' needs a CPU tensor of a float dtype; got {q.device} {q.dtype}")
    plan = get_plan(block_mask, q.shape[2], block_size, q.device)
    pad_bias = None
    if key_padding_mask is not None:
        bias_dtype = q.dtype if kernel == "flash" else _softmax_dtype(q.dtype)
        pad_bias = torch.zeros(key_padding_mask.shape, dtype=bias_dtype, device=q.device)
        pad_bias.masked_fill_(~key_padding_mask.to(q.device), -math.inf)
    return _BlockSparseAttention.apply(q, k, v, plan, pad_bias, kernel)
