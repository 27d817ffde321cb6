"""Trainable block-sparse attention in plain torch: compute follows the mask, exactly.

Why this exists: nothing installable gives a trainable arbitrary block-sparse attention on CPU.
The design follows from the radial mask's shape and from what the CPU flash kernel likes:

* The mask is banded by frame distance. The query blocks of one latent frame share a few long
  runs of key blocks (the attention sink and the neighbouring frames), and each query block adds
  short runs of 2-3 blocks in every far frame, shifted one block per query block (the band).
* torch's fused CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, the one
  dense SDPA runs) reads strided inputs in place. Its cost is about ``keys x (queries + 128)``:
  it runs at its whole-sequence rate on tiles of a thousand queries or more and at half of it
  on one 128-query block, forward and (more so) backward, which parallelises over heads only.

So a :class:`SparsePlan` covers every kept query-key block pair exactly once, with no masked
waste:

* **view tiles**: a group of query blocks (about one frame) against each long run of key blocks
  that all of them keep, read in place (views, no copies). A dynamic programme picks the groups.
* **gather items** for what is left (the far bands): their keys and queries are copied into one
  buffer per item, items of one shape run as one batched call. The forward cuts the leftover by
  query block (a merge per item), the backward by key block (long query tiles, the fast case of
  the backward kernel); neighbouring blocks share an item for the runs they both keep.

Each tile returns its output and log-sum-exp, merged into the result by log-sum-exp weights
(as FlashAttention merges its key blocks). Backward runs tiles against the merged output and
log-sum-exp, so any exact cover yields each tile's exact share of dq, dk and dv, summed in the
softmax dtype (FlashAttention-style recompute: autograd saves ``q, k, v, out, lse``, no scores).

The tile math has two interchangeable kernels: ``"flash"`` (the fused CPU kernel and its
backward; CPU only) and ``"matmul"`` (scores by ``matmul``, any device and dtype, memory bounded
by slicing rows and heads).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from radial_lora.attention.reference import dense_attention

KERNELS = ("auto", "matmul", "flash")

# Planner knobs. A key run of at least MIN_VIEW_BLOCKS blocks that a row group keeps is read in
# place; shorter runs are gathered. A row group spans at most MAX_GROUP_ROWS query blocks.
MIN_VIEW_BLOCKS = 8
MAX_GROUP_ROWS = 32
# Two neighbouring leftover rows (columns) that share at least this many blocks share an item.
MIN_SHARED_BLOCKS = 2
# One batched gather call copies at most max(MIN_GATHER_ELEMENTS, q.numel()) key (and value)
# elements, so the extra memory stays of the order of the inputs. The matmul kernel holds at
# most MAX_TILE_ELEMENTS scores at once (it slices query rows and heads to stay under it).
MIN_GATHER_ELEMENTS = 1 << 22
MAX_TILE_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class ViewTile:
    """Query tokens ``[q0, q1)`` against key tokens ``[k0, k1)``: every pair kept, read in place."""

    q0: int
    q1: int
    k0: int
    k1: int
    first: bool = False  # no earlier tile wrote these query rows: the forward stores, no merge


@dataclass
class GatherGroup:
    """``n`` items, each ``Lq`` gathered query tokens against ``Lk`` gathered key tokens, all pairs kept.

    Forward items are one query block (or two neighbours) against the short key runs it keeps;
    backward items are one key block (or two) against the query blocks that keep it (see
    :class:`SparsePlan`).
    """

    q_index: torch.Tensor  # [n, Lq] token indices of each item's queries
    k_index: torch.Tensor  # [n, Lk] token indices of each item's keys

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.q_index.shape[0], self.q_index.shape[1], self.k_index.shape[1])


@dataclass
class SparsePlan:
    """The tiles for one (block mask, sequence length, block size, device): an exact cover.

    ``views`` serve forward and backward. The rest of the mask (the short runs: the far bands)
    is cut two ways, because the CPU flash kernel is fast only on long query tiles and merging
    partial outputs costs more than summing partial gradients:

    * ``row_gathers`` (forward): one query block against its short runs; its output merges once.
    * ``column_gathers`` (backward): one key block against every query block that keeps it, a
      long query tile; dK and dV come out whole, dQ is summed into place.

    In both, two neighbouring blocks share an item for the runs they both keep (:func:`_strips`).
    """

    seq_len: int
    block_size: int
    views: list[ViewTile]
    row_gathers: list[GatherGroup]
    column_gathers: list[GatherGroup]
    kept_pairs: int  # query-key token pairs the mask keeps (= pairs the tiles compute)

    @property
    def view_pairs(self) -> int:
        return sum((t.q1 - t.q0) * (t.k1 - t.k0) for t in self.views)


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of True in a bool vector."""
    edges = np.diff(np.concatenate(([0], row.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _long_runs(row: np.ndarray) -> list[tuple[int, int]]:
    return [(s, e) for s, e in _runs(row) if e - s >= MIN_VIEW_BLOCKS]


def _row_groups(mask: np.ndarray) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Partition of the query blocks into groups ``(start, end, shared runs)`` read as view tiles.

    The CPU flash kernel costs about ``keys x (queries + one block)``: each tile pays one block
    row extra. A run of ``w`` blocks shared by a group of ``h`` rows thus saves ``w * (h - 1)``
    over reading it row by row; a dynamic programme picks the partition that saves the most.
    """
    nb = mask.shape[0]
    best = np.full(nb + 1, -1, dtype=np.int64)
    best[0] = 0
    choice: list[tuple[int, list[tuple[int, int]]]] = [(0, [])] * (nb + 1)
    for start in range(nb):
        shared = mask[start].copy()
        for end in range(start + 1, min(nb, start + MAX_GROUP_ROWS) + 1):
            if end > start + 1:
                shared &= mask[end - 1]
            runs = [(s, e) for s, e in _runs(shared) if (end - start) * (e - s) >= MIN_VIEW_BLOCKS]
            gain = best[start] + (end - start - 1) * sum(e - s for s, e in runs)
            if gain > best[end]:
                best[end], choice[end] = gain, (start, runs)
            if not runs:
                break
    groups, end = [], nb
    while end > 0:
        start, runs = choice[end]
        groups.append((start, end, runs))
        end = start
    return groups[::-1]


def _views(mask: np.ndarray) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
    """Block rectangles ``(p0, p1, c0, c1)`` read in place, and the kept blocks they leave over."""
    rects, left = [], mask.copy()
    for start, end, shared in _row_groups(mask):
        for s, e in shared:
            rects.append((start, end, s, e))
            left[start:end, s:e] = False
        for row in range(start, end):
            for s, e in _long_runs(left[row]):
                rects.append((row, row + 1, s, e))
                left[row, s:e] = False
    return rects, left


def _gather_groups(items: list[tuple[int, np.ndarray, np.ndarray]], device: torch.device) -> list[GatherGroup]:
    """Items ``(first block, query tokens, key tokens)`` batched by shape.

    Two-block items that overlap (blocks p, p+1 and p+1, p+2) go to different groups (by the
    parity of their first block), so no token repeats within a group: its merge writes each
    output row once.
    """
    by_shape: dict[tuple[int, int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for first, q_idx, k_idx in items:
        by_shape.setdefault((len(q_idx), len(k_idx), first % 2), []).append((q_idx, k_idx))
    return [
        GatherGroup(
            q_index=torch.from_numpy(np.stack([m[0] for m in members])).to(device),
            k_index=torch.from_numpy(np.stack([m[1] for m in members])).to(device),
        )
        for members in by_shape.values()
    ]


def _strips(left: np.ndarray) -> list[tuple[list[int], np.ndarray]]:
    """Each row's leftover blocks as ``(rows, blocks)`` items; neighbouring rows share an item.

    The far bands shift one block per row, so two neighbouring rows keep most of their short
    runs in common: that part becomes one item twice as tall (a faster kernel tile), and each
    row keeps only the rest alone.
    """
    left = left.copy()
    items = []
    for row in range(left.shape[0]):
        if row + 1 < left.shape[0]:
            shared = left[row] & left[row + 1]
            if shared.sum() >= MIN_SHARED_BLOCKS:
                items.append(([row, row + 1], np.flatnonzero(shared)))
                left[row : row + 2] &= ~shared
        if left[row].any():
            items.append(([row], np.flatnonzero(left[row])))
    return items


def build_plan(block_mask: np.ndarray, seq_len: int, block_size: int, device: torch.device) -> SparsePlan:
    """Exact tile cover of a validated ``[nb, nb]`` bool block mask."""
    nb = block_mask.shape[0]
    bounds = np.minimum(np.arange(nb + 1, dtype=np.int64) * block_size, seq_len)  # token edge of each block

    def tokens(blocks) -> np.ndarray:
        return np.concatenate([np.arange(bounds[b], bounds[b + 1]) for b in blocks])

    rects, left = _views(block_mask)
    seen = np.zeros(nb, dtype=bool)
    views = []
    for p0, p1, c0, c1 in rects:
        views.append(ViewTile(*(int(bounds[x]) for x in (p0, p1, c0, c1)), first=not seen[p0:p1].any()))
        seen[p0:p1] = True
    rows = [(r[0], tokens(r), tokens(c)) for r, c in _strips(left)]
    columns = [(c[0], tokens(r), tokens(c)) for c, r in _strips(left.T)]
    sizes = np.diff(bounds)
    kept = int(sizes @ block_mask.astype(np.int64) @ sizes)
    return SparsePlan(seq_len, block_size, views, _gather_groups(rows, device), _gather_groups(columns, device), kept)


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


# ---------------------------------------------------------------- tile kernels
#
# A tile is q ``[n, H, Lq, D]``, k and v ``[n, H, Lk, D]`` (any strides), an optional additive
# key bias broadcastable to ``[n, 1, Lq, Lk]``; forward returns (out ``[n, H, Lq, D]``, lse
# ``[n, H, Lq]``), backward (dq, dk, dv) for the given output, its log-sum-exp and dout.


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _flash_forward(q, k, v, bias, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)


def _flash_backward(dout, q, k, v, out, lse, bias, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
    )


def _score_slices(q: torch.Tensor, keys: int) -> list[tuple[slice, slice]]:
    """(heads, rows) slices of a tile whose score block stays under MAX_TILE_ELEMENTS."""
    n, heads, rows, _ = q.shape
    per_row = n * keys
    rows_step = max(1, min(rows, MAX_TILE_ELEMENTS // max(1, per_row)))
    heads_step = max(1, min(heads, MAX_TILE_ELEMENTS // max(1, per_row * rows_step)))
    return [
        (slice(h, min(h + heads_step, heads)), slice(r, min(r + rows_step, rows)))
        for h in range(0, heads, heads_step)
        for r in range(0, rows, rows_step)
    ]


def _scores(q, k, bias, scale, h, r, dtype):
    s = torch.matmul(q[:, h, r], k[:, h].transpose(-1, -2)).to(dtype).mul_(scale)
    if bias is not None:
        s += bias  # [n, 1, 1, Lk]: key padding
    return s


def _matmul_forward(q, k, v, bias, scale):
    sd = _softmax_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=sd, device=q.device)
    for h, r in _score_slices(q, k.shape[2]):
        s = _scores(q, k, bias, scale, h, r, sd)
        m = torch.logsumexp(s, dim=-1)
        lse[:, h, r] = m
        p = s.sub_(m.masked_fill(m == -math.inf, 0.0)[..., None]).exp_()  # no real key: p = 0, out = 0
        out[:, h, r] = torch.matmul(p.to(q.dtype), v[:, h])
    return out, lse


def _matmul_backward(dout, q, k, v, out, lse, bias, scale):
    sd = lse.dtype
    dq = torch.empty(q.shape, dtype=sd, device=q.device)
    dk, dv = (torch.zeros(x.shape, dtype=sd, device=x.device) for x in (k, v))
    delta = (dout.to(sd) * out.to(sd)).sum(-1)
    for h, r in _score_slices(q, k.shape[2]):
        p = _scores(q, k, bias, scale, h, r, sd).sub_(lse[:, h, r, None]).exp_()
        do = dout[:, h, r]
        dv[:, h] += torch.matmul(p.to(q.dtype).transpose(-1, -2), do)
        ds = torch.matmul(do, v[:, h].transpose(-1, -2)).to(sd).sub_(delta[:, h, r, None]).mul_(p).to(q.dtype)
        dq[:, h, r] = torch.matmul(ds, k[:, h]) * scale
        dk[:, h] += torch.matmul(ds.transpose(-1, -2), q[:, h, r]) * scale
    return dq, dk, dv


_KERNEL_FNS = {"matmul": (_matmul_forward, _matmul_backward), "flash": (_flash_forward, _flash_backward)}


# ---------------------------------------------------------------- the tiles over a plan


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """Token-major ``[n, L, H, ...]`` as the kernels' ``[n, H, L, ...]`` (a view)."""
    return x.transpose(1, 2)


class _Workspace:
    """Reusable buffers for one forward or backward pass.

    Gathers into fresh tensors run at a quarter of the copy speed on CPU (page faults on every
    new large allocation); reusing one buffer per role avoids that.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
            buf = self._buffers[role] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


def _gather(x: torch.Tensor, index: torch.Tensor, ws: _Workspace, role: str) -> torch.Tensor:
    """Rows ``index`` (``[n, L]``) of a token-major ``[B, S, H, ...]`` tensor as ``[B * n, L, H, ...]``."""
    flat = index.reshape(-1)
    t = ws.take(role, (x.shape[0], flat.numel(), *x.shape[2:]), x)
    torch.index_select(x, 1, flat, out=t)
    return t.view(t.shape[0] * index.shape[0], index.shape[1], *t.shape[2:])


def _gather_lse(lse: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Columns ``index`` (``[n, L]``) of ``[B, H, S]`` as ``[B * n, H, L]`` (contiguous)."""
    t = lse.index_select(2, index.reshape(-1)).unflatten(2, index.shape)  # [B, H, n, L]
    return t.transpose(1, 2).reshape(-1, lse.shape[1], index.shape[1])


def _group_slices(group: GatherGroup, q: torch.Tensor) -> list[slice]:
    """Item ranges of a gather group whose gathered tokens fit the memory budget above."""
    n, lq, lk = group.shape
    batch, _, heads, dim = q.shape
    step = max(1, max(MIN_GATHER_ELEMENTS, q.numel()) // (batch * heads * max(lq, lk) * dim))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _merge(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold a tile's (out, lse) into accumulated (acc, acc_lse) in place, by log-sum-exp weights.

    ``acc`` and ``out`` are token-major ``[n, L, H, D]``; ``acc_lse`` and ``lse`` ``[n, H, L]``.
    Rows with no real key anywhere keep lse ``-inf`` and output 0.
    """
    total = torch.logaddexp(acc_lse, lse)
    safe = total.masked_fill(total == -math.inf, 0.0)
    w_acc = (acc_lse - safe).exp_().transpose(1, 2).unsqueeze(-1)
    w_new = (lse - safe).exp_().transpose(1, 2).unsqueeze(-1)
    acc.mul_(w_acc).addcmul_(out, w_new)
    acc_lse.copy_(total)


def _no_real_key(kpm: torch.Tensor | None, keys) -> torch.Tensor | None:
    """``[B', 1, 1]`` True where a tile's batch item has no real key (its lse must be -inf)."""
    if kpm is None:
        return None
    dead = ~kpm[:, keys].any(-1)  # [B] for a slice, [B, n] for an index
    return dead.reshape(-1, 1, 1) if dead.any() else None


def _view_bias(pad_bias: torch.Tensor | None, tile: ViewTile) -> torch.Tensor | None:
    return None if pad_bias is None else pad_bias[:, None, None, tile.k0 : tile.k1]


def _gather_bias(pad_bias: torch.Tensor | None, k_index: torch.Tensor) -> torch.Tensor | None:
    return None if pad_bias is None else pad_bias[:, k_index].reshape(-1, 1, 1, k_index.shape[1])


def _forward(q, k, v, plan, kpm, pad_bias, kernel, scale):
    """Merged (out token-major ``[B, S, H, D]`` in q's dtype, lse ``[B, H, S]``) over the plan's tiles."""
    tile_fwd = _KERNEL_FNS[kernel][0]
    sd = _softmax_dtype(q.dtype)
    ws = _Workspace()
    acc = torch.zeros(q.shape, dtype=sd, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf, dtype=sd, device=q.device)

    def fold(rows_acc, rows_lse, out, tile_lse, dead, first=False):
        tile_lse = tile_lse.to(sd)
        if dead is not None:
            tile_lse = tile_lse.masked_fill(dead, -math.inf)
        if first:
            rows_acc.copy_(out.transpose(1, 2))
            rows_lse.copy_(tile_lse)
        else:
            _merge(rows_acc, rows_lse, out.transpose(1, 2), tile_lse)

    for t in plan.views:
        rows, keys = slice(t.q0, t.q1), slice(t.k0, t.k1)
        out, tile_lse = tile_fwd(
            *(_heads_first(x[:, s]) for x, s in ((q, rows), (k, keys), (v, keys))), _view_bias(pad_bias, t), scale
        )
        fold(acc[:, rows], lse[:, :, rows], out, tile_lse, _no_real_key(kpm, keys), t.first)
    batch = q.shape[0]
    for group in plan.row_gathers:
        for items in _group_slices(group, q):
            qi, ki = group.q_index[items], group.k_index[items]
            out, tile_lse = tile_fwd(
                *(_heads_first(_gather(x, i, ws, r)) for x, i, r in ((q, qi, "q"), (k, ki, "k"), (v, ki, "v"))),
                _gather_bias(pad_bias, ki),
                scale,
            )
            rows = qi.reshape(-1)
            part = _gather(acc, qi, ws, "acc")
            part_lse = _gather_lse(lse, qi)
            fold(part, part_lse, out, tile_lse, _no_real_key(kpm, ki))
            acc.index_copy_(1, rows, part.reshape(batch, -1, *part.shape[2:]))
            lse.index_copy_(2, rows, part_lse.unflatten(0, (batch, -1)).transpose(1, 2).flatten(2))
    return acc.to(q.dtype), lse


def _backward(dout, q, k, v, out, lse, plan, pad_bias, kernel, scale):
    """(dq, dk, dv) token-major, each tile's share summed in the softmax dtype."""
    tile_bwd = _KERNEL_FNS[kernel][1]
    sd = lse.dtype
    # A row with no real key has lse -inf; +inf makes its recomputed probabilities 0, not NaN.
    lse = lse.masked_fill(lse == -math.inf, math.inf)
    dq, dk, dv = (torch.zeros(q.shape, dtype=sd, device=q.device) for _ in range(3))
    ws = _Workspace()
    for t in plan.views:
        rows, keys = slice(t.q0, t.q1), slice(t.k0, t.k1)
        gq, gk, gv = tile_bwd(
            *(_heads_first(x[:, rows]) for x in (dout, q)),
            *(_heads_first(x[:, keys]) for x in (k, v)),
            _heads_first(out[:, rows]),
            lse[:, :, rows].contiguous(),
            _view_bias(pad_bias, t),
            scale,
        )
        dq[:, rows] += gq.transpose(1, 2)
        dk[:, keys] += gk.transpose(1, 2)
        dv[:, keys] += gv.transpose(1, 2)
    batch = q.shape[0]
    for group in plan.column_gathers:
        for items in _group_slices(group, q):
            qi, ki = group.q_index[items], group.k_index[items]
            gq, gk, gv = tile_bwd(
                *(_heads_first(_gather(x, qi, ws, r)) for x, r in ((dout, "dout"), (q, "q"))),
                *(_heads_first(_gather(x, ki, ws, r)) for x, r in ((k, "k"), (v, "v"))),
                _heads_first(_gather(out, qi, ws, "out")),
                _gather_lse(lse, qi),
                _gather_bias(pad_bias, ki),
                scale,
            )
            for acc, index, grad in ((dq, qi, gq), (dk, ki, gk), (dv, ki, gv)):
                acc.index_add_(1, index.reshape(-1), grad.transpose(1, 2).reshape(batch, -1, *acc.shape[2:]).to(sd))
    return dq, dk, dv


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, ...]`` -> contiguous ``[B, S, H, ...]`` (free for processor-layout inputs)."""
    return x.transpose(1, 2).contiguous()


class _BlockSparseAttention(torch.autograd.Function):
    """Tiled block-sparse attention; backward recomputes tiles from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, plan, key_padding_mask, kernel):
        # Token-major ([B, S, H, D]) inside: views and gathers then address whole token rows.
        q, k, v = (_token_major(x) for x in (q, k, v))
        scale = 1.0 / math.sqrt(q.shape[-1])
        pad_bias = None
        if key_padding_mask is not None:
            bias_dtype = q.dtype if kernel == "flash" else _softmax_dtype(q.dtype)
            pad_bias = torch.zeros(key_padding_mask.shape, dtype=bias_dtype, device=q.device)
            pad_bias.masked_fill_(~key_padding_mask, -math.inf)
        out, lse = _forward(q, k, v, plan, key_padding_mask, pad_bias, kernel, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.pad_bias, ctx.kernel, ctx.scale = plan, pad_bias, kernel, scale
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        grads = _backward(_token_major(dout), q, k, v, out, lse, ctx.plan, ctx.pad_bias, ctx.kernel, ctx.scale)
        return (*(g.to(q.dtype).transpose(1, 2) for g in grads), None, None, None)


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

    ``kernel="auto"`` takes the fused CPU flash tile on CPU and the matmul tile elsewhere. A mask
    that keeps every block runs as dense SDPA.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if kernel == "auto":
        kernel = "flash" if _flash_available(q.device, q.dtype) else "matmul"
    elif kernel == "flash" and not _flash_available(q.device, q.dtype):
        raise ValueError(f"kernel 'flash' needs a CPU tensor of a float dtype; got {q.device} {q.dtype}")
    plan = get_plan(block_mask, q.shape[2], block_size, q.device)
    if plan.kept_pairs == plan.seq_len**2:  # every block kept: dense SDPA is the same computation
        return dense_attention(q, k, v, key_padding_mask)
    kpm = None if key_padding_mask is None else key_padding_mask.to(q.device)
    return _BlockSparseAttention.apply(q, k, v, plan, kpm, kernel)
