"""The radial block mask of Radial Attention (arXiv 2506.19852), and what it costs.

Pure math: no model, no device. The definition is ``docs/RADIAL_MASK.md`` (the
authors' construction for Wan and HunyuanVideo). The authors build a ``T x T`` token mask
for every frame pair and shrink it to blocks; here each frame pair's block pattern is
computed in closed form from per-column counts and cached by what it depends on
(frame distance class, band width, and the two frame offsets inside a block), so the
Wan2.1 720p 2x mask takes milliseconds instead of minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

MODEL_TYPES = ("wan", "hunyuan")

# Per-pair pattern kinds (the token mask L of the spec).
_FULL, _EMPTY, _BAND = 0, 1, 2


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _pair_kind(i: int, j: int, tokens_per_frame: int, block_size: int, decay: float, sink: bool):
    """Which token mask a (query frame i, key frame j) pair gets: (kind, integer band half-width)."""
    if sink and j == 0:
        return _FULL, 0
    d = abs(i - j)
    if d <= 1:
        return _FULL, 0
    g = d.bit_length()
    p = 2 ** tokens_per_frame.bit_length()
    w0 = p / 2**g
    if w0 < block_size:
        k = int(block_size / w0)
        if d % k != 0:
            return _EMPTY, 0
    w = max(w0 * decay, block_size)
    # |c - r| <= w for integers r, c is |c - r| <= floor(w).
    return _BAND, int(math.floor(w))


@lru_cache(maxsize=4096)
def _pair_blocks(kind: int, half_width: int, rr: int, rc: int, tokens_per_frame: int, block_size: int) -> np.ndarray:
    """The ``c x c`` block pattern of one frame pair, from column counts in closed form.

    Block ``a`` of the canvas covers token rows ``[a*B - rr, a*B + B - 1 - rr]`` of L; column
    ``C`` of the canvas is token column ``C - rc`` of L. A column's count is how many of the
    block's rows are True in that column: an interval intersection, no T x T mask needed.
    """
    t, b = tokens_per_frame, block_size
    c = -(-t // b)
    if kind == _EMPTY:
        return np.zeros((c, c), dtype=bool)
    a = np.arange(c, dtype=np.int64)[:, None]
    lo = np.maximum(a * b - rr, 0)
    hi = np.minimum(a * b + b - 1 - rr, t - 1)
    col = np.arange(c * b, dtype=np.int64)[None, :] - rc
    valid = (col >= 0) & (col < t)
    if kind == _FULL:
        count = np.broadcast_to(hi - lo + 1, (c, c * b))
    else:
        count = np.minimum(hi, col + half_width) - np.maximum(lo, col - half_width) + 1
    count = np.where(valid, np.maximum(count, 0), 0).reshape(c, c, b)
    nonzero = (count > 0).sum(-1)
    dense_cols = (3 * count > b).sum(-1)  # count / B > 1/3, exactly
    return 5 * dense_cols > 3 * nonzero  # hi / nz > 0.6, exactly; empty blocks are never kept


def radial_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    model_type: str = "wan",
    num_text_tokens: int = 0,
) -> torch.Tensor:
    """Boolean ``[nb, nb]`` block mask, ``nb = ceil((frames*tokens + text) / block_size)``.

    ``num_frames`` are *latent* frames; ``M[p, q]`` says whether query block ``p`` attends to
    key block ``q``. Bit-for-bit the construction of ``docs/RADIAL_MASK.md``.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}")
    _check_positive("num_frames", num_frames)
    _check_positive("tokens_per_frame", tokens_per_frame)
    _check_positive("block_size", block_size)
    if not isinstance(num_text_tokens, int | np.integer) or num_text_tokens < 0:
        raise ValueError(f"num_text_tokens must be a non-negative integer, got {num_text_tokens!r}")
    if not (isinstance(decay_factor, int | float) and math.isfinite(decay_factor) and decay_factor > 0):
        raise ValueError(f"decay_factor must be a positive finite number, got {decay_factor!r}")

    f, t, b = int(num_frames), int(tokens_per_frame), int(block_size)
    n = f * t
    nb = -(-(n + int(num_text_tokens)) // b)
    mask = np.zeros((nb, nb), dtype=bool)
    border = n // b
    mask[border:, :] = True
    mask[:, border:] = True

    sink = model_type == "wan"
    for i in range(f):
        rr, oi = (i * t) % b, (i * t) // b
        for j in range(f):
            kind, width = _pair_kind(i, j, t, b, float(decay_factor), sink)
            if kind == _EMPTY:
                continue
            blocks = _pair_blocks(kind, width, rr, (j * t) % b, t, b)
            oj = (j * t) // b
            view = mask[oi : oi + blocks.shape[0], oj : oj + blocks.shape[1]]
            view |= blocks[: view.shape[0], : view.shape[1]]
    return torch.from_numpy(mask)


def block_sizes(seq_len: int, block_size: int) -> np.ndarray:
    """Tokens in each block of a sequence (the last block may be partial)."""
    nb = -(-seq_len // block_size)
    sizes = np.full(nb, block_size, dtype=np.int64)
    sizes[-1] = seq_len - (nb - 1) * block_size
    return sizes


def mask_density(block_mask: torch.Tensor, seq_len: int | None = None, block_size: int = 128) -> float:
    """Fraction of query-key pairs computed. With ``seq_len``, partial last blocks weigh what they hold."""
    m = block_mask.detach().cpu().numpy().astype(bool)
    if seq_len is None:
        return float(m.mean())
    sizes = block_sizes(seq_len, block_size)
    if len(sizes) != m.shape[0]:
        raise ValueError(f"block mask has {m.shape[0]} blocks but seq_len={seq_len} needs {len(sizes)}")
    kept = float(sizes @ m.astype(np.float64) @ sizes)
    return kept / float(seq_len) ** 2


def mask_sparsity(block_mask: torch.Tensor, seq_len: int | None = None, block_size: int = 128) -> float:
    """Fraction of attention skipped: ``1 - density``."""
    return 1.0 - mask_density(block_mask, seq_len, block_size)


@dataclass(frozen=True)
class AttentionCost:
    """Attention FLOPs of one attention layer (QK^T and PV, 2 FLOPs per multiply-add)."""

    seq_len: int
    density: float
    dense_flops: float
    radial_flops: float

    @property
    def ideal_speedup(self) -> float:
        return self.dense_flops / self.radial_flops if self.radial_flops else float("inf")


def attention_cost(
    block_mask: torch.Tensor, seq_len: int, *, head_dim: int, num_heads: int, block_size: int = 128, batch: int = 1
) -> AttentionCost:
    """Dense vs radial attention FLOPs for one layer's forward pass."""
    density = mask_density(block_mask, seq_len, block_size)
    dense = 4.0 * batch * num_heads * head_dim * float(seq_len) ** 2
    return AttentionCost(seq_len=seq_len, density=density, dense_flops=dense, radial_flops=dense * density)
