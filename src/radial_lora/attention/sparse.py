"""Trainable block-sparse attention in plain torch: compute follows the mask density.

Why this exists: nothing installable gives a trainable arbitrary block-sparse attention on CPU,
and per-block gathers are slower than dense SDPA (measured in round 1 of this project). So the
query blocks are grouped into *chunks* of consecutive rows whose kept key blocks nearly coincide
(for the radial mask: the blocks of one latent frame). Each chunk gathers the union of its key
blocks once and runs one attention tile against it; the few dropped blocks inside the union are
masked with an additive ``-inf`` bias. Work is ``sum(rows x union)``, which the planner keeps
close to the number of kept blocks. Chunks of equal tile shape (common: the radial pattern
repeats frame after frame) are stacked into one batched call, so a whole mask takes a handful of
large kernel calls instead of one small call per chunk.

The tile math has two interchangeable kernels:

* ``"matmul"``: scores with ``matmul``, softmax through the log-sum-exp, any device and dtype.
* ``"flash"``: torch's fused CPU flash-attention tile (``aten._scaled_dot_product_flash_attention
  _for_cpu`` and its backward), the same kernel dense SDPA uses on CPU, so each kept block costs
  what it costs dense. CPU only.

Both run inside one ``autograd.Function`` whose backward recomputes each tile from the saved
log-sum-exp (FlashAttention-style): it saves only ``q, k, v, out, lse``, never the scores. Inside,
tensors are token-major (``[B, S, H, D]``) so gathers copy whole contiguous token rows. Extra
memory is the gathered tiles of one batched call, bounded to the order of the inputs (see the
budgets below), never ``seq^2``.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

KERNELS = ("auto", "matmul", "flash")

# Planner knobs: a chunk grows while kept/(rows*union) stays above MIN_EFFICIENCY and it spans at
# most MAX_CHUNK_TOKENS query tokens (keeps tiles cache-sized and the padding bias small).
MIN_EFFICIENCY = 0.8
MAX_CHUNK_TOKENS = 1024
# One batched call gathers at most max(MIN_GATHER_ELEMENTS, q.numel()) key (and value) elements,
# so the extra memory stays of the order of the inputs; the matmul kernel also holds at most
# MAX_TILE_ELEMENTS scores at once. Larger groups run in slices, larger chunks head by head.
MIN_GATHER_ELEMENTS = 1 << 22
MAX_TILE_ELEMENTS = 1 << 25


@dataclass
class _Group:
    """Chunks with the same tile shape: ``n`` runs of ``Gq`` query tokens against ``Uk`` keys each."""

    q_index: torch.Tensor  # [n, Gq] token indices of each chunk's queries (on the plan's device)
    k_index: torch.Tensor  # [n, Uk] token indices of each chunk's key-block union
    allowed: torch.Tensor | None  # [n, G, U] kept blocks within the union; None when all are kept
    block_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.q_index.shape[0], self.q_index.shape[1], self.k_index.shape[1])


@dataclass
class SparsePlan:
    """The chunk schedule for one (block mask, sequence length, block size, device)."""

    seq_len: int
    block_size: int
    num_chunks: int
    groups: list[_Group]
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
    starts = np.arange(len(sizes), dtype=np.int64) * block_size
    by_shape: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    kept_pairs = computed = 0
    chunks = _group_rows(block_mask, block_size)
    for start, end, union in chunks:
        q_idx = np.arange(start * block_size, min(end * block_size, seq_len))
        k_idx = np.concatenate([np.arange(starts[b], starts[b] + sizes[b]) for b in union])
        rows = block_mask[start:end][:, union]
        kept_pairs += int(sizes[start:end] @ rows.astype(np.int64) @ sizes[union])
        computed += len(q_idx) * len(k_idx)
        # Equal token counts imply equal block counts (only the last block can be partial).
        by_shape.setdefault((len(q_idx), len(k_idx)), []).append((q_idx, k_idx, rows))
    groups = []
    for members in by_shape.values():
        allowed = np.stack([m[2] for m in members])
        groups.append(
            _Group(
                q_index=torch.from_numpy(np.stack([m[0] for m in members])).to(device),
                k_index=torch.from_numpy(np.stack([m[1] for m in members])).to(device),
                allowed=None if allowed.all() else torch.from_numpy(allowed).to(device),
                block_size=block_size,
            )
        )
    return SparsePlan(seq_len, block_size, len(chunks), groups, kept_pairs, computed)


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


def _group_bias(group: _Group, rows: slice, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive ``[n, Gq, Uk]`` bias (0 kept, -inf dropped) for a slice of a group's chunks."""
    if group.allowed is None:
        return None
    blocks = torch.zeros(group.allowed[rows].shape, dtype=dtype, device=group.allowed.device)
    blocks.masked_fill_(~group.allowed[rows], -math.inf)
    _, gq, uk = group.shape
    device = blocks.device
    qb = torch.arange(gq, device=device) // group.block_size  # chunks start on block edges
    kb = torch.arange(uk, device=device) // group.block_size  # only the union's last block can be partial
    return blocks[:, qb][:, :, kb]


def _slices(group: _Group, q: torch.Tensor, score_tiles: bool, padded: bool) -> list[slice]:
    """Chunk ranges of a group whose gathers, biases (and matmul scores) fit the budgets above."""
    n, gq, uk = group.shape
    batch, _, heads, dim = q.shape  # token-major
    step = max(1, max(MIN_GATHER_ELEMENTS, q.numel()) // (batch * heads * uk * dim))
    if score_tiles:
        step = min(step, max(1, MAX_TILE_ELEMENTS // (batch * heads * gq * uk)))
    if padded or group.allowed is not None:
        step = min(step, max(1, MAX_TILE_ELEMENTS // (batch * gq * uk)))
    step = min(n, step)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _to_tiles(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (``[n, L]``) of a token-major ``[B, S, H, ...]`` tensor as ``[B * n, H, L, ...]``.

    One ``index_select`` copy of whole token rows, laid out ``[B * n, L, H, ...]``: the CPU flash
    kernel's own layout, so the kernel reads the tiles without another copy.
    """
    t = x.index_select(1, index.reshape(-1))  # [B, n * L, H, ...]
    return t.reshape(t.shape[0] * index.shape[0], index.shape[1], *t.shape[2:]).transpose(1, 2)


def _put_tiles(dst: torch.Tensor, index: torch.Tensor, tiles: torch.Tensor) -> None:
    """Inverse of :func:`_to_tiles` into a token-major ``dst`` (a chunk's query rows are its own)."""
    src = tiles.transpose(1, 2)  # [B * n, L, H, ...]
    dst.index_copy_(1, index.reshape(-1), src.reshape(dst.shape[0], -1, *src.shape[2:]))


def _tile_bias(
    group: _Group, rows: slice, dtype: torch.dtype, batch: int, pad_bias: torch.Tensor | None
) -> torch.Tensor | None:
    """Block bias plus key-padding bias as ``[batch * n, 1, Gq, Uk]`` (broadcast over heads)."""
    bias = _group_bias(group, rows, dtype)
    if bias is not None:
        bias = bias[None]  # [1, n, Gq, Uk]
    if pad_bias is not None:
        pad = pad_bias[:, group.k_index[rows]][:, :, None, :]  # [B, n, 1, Uk]
        bias = pad if bias is None else bias + pad
    if bias is None:
        return None
    bias = bias.expand(batch, -1, group.shape[1], -1)
    return bias.reshape(-1, 1, *bias.shape[2:])


def _scatter_keys(acc: torch.Tensor, index: torch.Tensor, tiles: torch.Tensor) -> None:
    """Accumulate ``[B * n, H, Uk, D]`` key/value gradient tiles into token-major ``acc``."""
    src = tiles.transpose(1, 2)  # [B * n, Uk, H, D]
    acc.index_add_(1, index.reshape(-1), src.reshape(acc.shape[0], -1, *src.shape[2:]))


def _head_slices(heads: int, elements_per_head: int) -> list[slice]:
    """Head ranges that keep one matmul score tile under MAX_TILE_ELEMENTS."""
    step = max(1, min(heads, MAX_TILE_ELEMENTS // max(1, elements_per_head)))
    return [slice(h, min(h + step, heads)) for h in range(0, heads, step)]


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _forward_matmul(q, k, v, plan, pad_bias, scale):
    """Tile forward with matmul + log-sum-exp; returns (out, lse)."""
    batch = q.shape[0]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=_softmax_dtype(q.dtype), device=q.device)
    for group in plan.groups:
        for rows in _slices(group, q, score_tiles=True, padded=pad_bias is not None):
            qi, ki = group.q_index[rows], group.k_index[rows]
            qt, kt, vt = _to_tiles(q, qi) * scale, _to_tiles(k, ki), _to_tiles(v, ki)
            bias = _tile_bias(group, rows, lse.dtype, batch, pad_bias)
            ot, mt = torch.empty_like(qt), torch.empty(qt.shape[:3], dtype=lse.dtype, device=q.device)
            for h in _head_slices(qt.shape[1], qt.shape[0] * qt.shape[2] * kt.shape[2]):
                s = torch.matmul(qt[:, h], kt[:, h].transpose(-1, -2)).to(lse.dtype)
                if bias is not None:
                    s += bias
                m = torch.logsumexp(s, dim=-1)
                m = m.masked_fill(m == -math.inf, 0.0)  # a row with no real key: output 0, like SDPA
                mt[:, h] = m
                ot[:, h] = torch.matmul(s.sub_(m[..., None]).exp_().to(q.dtype), vt[:, h])
            _put_tiles(out, qi, ot)
            _put_tiles(lse, qi, mt)
    return out, lse


def _backward_matmul(dout, q, k, v, out, lse, plan, pad_bias, scale):
    """Tile backward: recompute p from lse, then dV = p^T dO, dS = p (dP - delta), dQ, dK."""
    batch = q.shape[0]
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    for group in plan.groups:
        for rows in _slices(group, q, score_tiles=True, padded=pad_bias is not None):
            qi, ki = group.q_index[rows], group.k_index[rows]
            qt, kt, vt = _to_tiles(q, qi) * scale, _to_tiles(k, ki), _to_tiles(v, ki)
            dot, mt, dt = _to_tiles(dout, qi), _to_tiles(lse, qi), _to_tiles(delta, qi)
            bias = _tile_bias(group, rows, lse.dtype, batch, pad_bias)
            dqt, dkt, dvt = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
            for h in _head_slices(qt.shape[1], qt.shape[0] * qt.shape[2] * kt.shape[2]):
                s = torch.matmul(qt[:, h], kt[:, h].transpose(-1, -2)).to(lse.dtype)
                if bias is not None:
                    s += bias
                p = s.sub_(mt[:, h, :, None]).exp_()
                dvt[:, h] = torch.matmul(p.to(q.dtype).transpose(-1, -2), dot[:, h])
                dp = torch.matmul(dot[:, h], vt[:, h].transpose(-1, -2)).to(lse.dtype)
                ds = dp.sub_(dt[:, h, :, None]).mul_(p).to(q.dtype)
                dqt[:, h] = torch.matmul(ds, kt[:, h]) * scale
                dkt[:, h] = torch.matmul(ds.transpose(-1, -2), qt[:, h])
            _put_tiles(dq, qi, dqt)
            _scatter_keys(dk, ki, dkt)
            _scatter_keys(dv, ki, dvt)
    return dq, dk, dv


def _forward_flash(q, k, v, plan, pad_bias, scale):
    """Tile forward with torch's fused CPU flash kernel; returns (out, lse)."""
    batch = q.shape[0]
    out, lse = torch.empty_like(q), None
    for group in plan.groups:
        for rows in _slices(group, q, score_tiles=False, padded=pad_bias is not None):
            qi, ki = group.q_index[rows], group.k_index[rows]
            ot, mt = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _to_tiles(q, qi),
                _to_tiles(k, ki),
                _to_tiles(v, ki),
                attn_mask=_tile_bias(group, rows, q.dtype, batch, pad_bias),
                scale=scale,
            )
            if lse is None:  # the kernel picks the lse dtype (float32 for half types, else the input's)
                lse = torch.empty(q.shape[:3], dtype=mt.dtype, device=q.device)
            _put_tiles(out, qi, ot)
            _put_tiles(lse, qi, mt)
    return out, lse


def _backward_flash(dout, q, k, v, out, lse, plan, pad_bias, scale):
    batch = q.shape[0]
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for group in plan.groups:
        for rows in _slices(group, q, score_tiles=False, padded=pad_bias is not None):
            qi, ki = group.q_index[rows], group.k_index[rows]
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _to_tiles(dout, qi),
                _to_tiles(q, qi),
                _to_tiles(k, ki),
                _to_tiles(v, ki),
                _to_tiles(out, qi),
                _to_tiles(lse, qi).contiguous(),
                0.0,
                False,
                attn_mask=_tile_bias(group, rows, q.dtype, batch, pad_bias),
                scale=scale,
            )
            _put_tiles(dq, qi, gq)
            _scatter_keys(dk, ki, gk)
            _scatter_keys(dv, ki, gv)
    return dq, dk, dv


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, ...]`` -> contiguous ``[B, S, H, ...]`` (free for processor-layout inputs)."""
    return x.transpose(1, 2).contiguous()


_KERNEL_FNS = {"matmul": (_forward_matmul, _backward_matmul), "flash": (_forward_flash, _backward_flash)}


class _BlockSparseAttention(torch.autograd.Function):
    """Chunked block-sparse attention; backward recomputes tiles from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, plan, pad_bias, kernel):
        # The kernels work token-major ([B, S, H, D]): gathers then copy whole contiguous token rows.
        q, k, v = (_token_major(x) for x in (q, k, v))
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, lse = _KERNEL_FNS[kernel][0](q, k, v, plan, pad_bias, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.pad_bias, ctx.kernel, ctx.scale = plan, pad_bias, kernel, scale
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        grads = _KERNEL_FNS[ctx.kernel][1](_token_major(dout), q, k, v, out, lse, ctx.plan, ctx.pad_bias, ctx.scale)
        return (*(g.transpose(1, 2) for g in grads), None, None, None)


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
