"""Block-sparse attention over a ``[nb, nb]`` block mask, with interchangeable backends.

``block_sparse_attention`` validates once and dispatches; the backends live one per module:
``reference`` (dense oracle), ``flex`` (FlexAttention), ``sparse`` (our trainable exact tile-cover kernel).
"""

from __future__ import annotations

import logging

import torch

from radial_lora.attention.flex import flex_block_attention
from radial_lora.attention.reference import dense_attention, reference_attention
from radial_lora.attention.sparse import mask_digest, sparse_block_attention
from radial_lora.constants import BACKENDS

logger = logging.getLogger(__name__)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend that ``backend`` means on ``device``.

    ``auto``: CUDA -> ``flex`` (compiled FlexAttention, forward and backward); anything else -> ``sparse``.
    The CPU half rests on ``benchmarks/attention.py`` (2 cores, ``benchmarks/RESULTS.md``, 2026-12-02), Wan2.1
    geometries at head_dim 128: ``sparse`` beat dense SDPA in every case, bfloat16 and float32, from density
    0.91 (720p 9 frames: 1.02-1.06x) to 0.24 (480p 161 frames: 3.5x forward, 3.0x forward+backward); at 480p
    81 frames (density 0.34) 2.1-2.7x forward and 2.1-2.7x forward+backward over five runs. Compiled flex on
    CPU has no backward, compiles for 10-50 s per sequence length and ran that forward at 1.23x (bf16) and
    1.58x (fp32) dense in the run where sparse ran 2.24x and 2.16x, so it is never the CPU choice. A mask that
    keeps every block runs as SDPA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "flex" if device.type == "cuda" else "sparse"


def _validate(q, k, v, block_mask, block_size, key_padding_mask) -> None:
    """Shape/dtype checks with messages that name the offending argument and shape."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [batch, heads, seq, head_dim] tensor, got {shape}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "q, k, v must have the same shape (self-attention), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on {q.device}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    seq = q.shape[2]
    nb = -(-seq // block_size)
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a bool tensor, got {getattr(block_mask, 'dtype', type(block_mask))}")
    if tuple(block_mask.shape) != (nb, nb):
        raise ValueError(
            f"block_mask shape {tuple(block_mask.shape)} does not fit seq={seq} with block_size={block_size}: "
            f"expected ({nb}, {nb}) = ceil(seq / block_size) blocks per side"
        )
    arr, _ = mask_digest(block_mask)
    empty = (~arr.any(1)).nonzero()[0]
    if len(empty):
        raise ValueError(
            f"block_mask rows {empty[:8].tolist()}{'...' if len(empty) > 8 else ''} keep no key block: "
            "every query block must attend to at least one key block"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor (True = real key)")
        if tuple(key_padding_mask.shape) != (q.shape[0], seq):
            raise ValueError(
                f"key_padding_mask shape {tuple(key_padding_mask.shape)} must be [batch, seq] = ({q.shape[0]}, {seq})"
            )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention where query block ``p`` sees key block ``j`` only if ``block_mask[p, j]``.

    q, k, v: ``[batch, heads, seq, head_dim]``; any ``seq`` (the last block may be partial);
    ``block_mask``: ``[nb, nb]`` bool, ``nb = ceil(seq / block_size)``, every row keeping a block;
    ``key_padding_mask``: ``[batch, seq]`` bool, True = a real key (all backends honour it; a query
    left with no real key gets a zero output, as SDPA gives). Backends: ``reference`` (SDPA with
    the expanded token mask), ``dense`` (SDPA, block mask ignored), ``flex`` (compiled
    FlexAttention; forward-only on CPU), ``sparse`` (trainable tile-cover kernel, CPU and GPU), and
    ``auto``: ``flex`` on CUDA, ``sparse`` elsewhere (the measurement behind it: :func:`resolve_backend`).
    """
    name = resolve_backend(backend, q.device)
    _validate(q, k, v, block_mask, block_size, key_padding_mask)
    if name == "dense":
        return dense_attention(q, k, v, key_padding_mask)
    if name == "reference":
        return reference_attention(q, k, v, block_mask, block_size, key_padding_mask)
    if name == "flex":
        return flex_block_attention(q, k, v, block_mask, block_size, key_padding_mask)
    return sparse_block_attention(q, k, v, block_mask, block_size, key_padding_mask)


__all__ = ["BACKENDS", "block_sparse_attention", "resolve_backend"]
