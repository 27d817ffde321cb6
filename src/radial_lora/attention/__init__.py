"""Block-sparse attention over a ``[nb, nb]`` block mask, with interchangeable backends.

``block_sparse_attention`` validates once and dispatches; the backends live one per module:
``reference`` (dense oracle), ``flex`` (FlexAttention), ``sparse`` (our trainable chunked kernel).
"""

from __future__ import annotations

import logging

import torch

from radial_lora.attention.flex import flex_block_attention
from radial_lora.attention.reference import dense_attention, reference_attention
from radial_lora.attention.sparse import mask_digest, sparse_block_attention

BACKENDS = ("auto", "flex", "sparse", "dense", "reference")
logger = logging.getLogger(__name__)


# auto on CPU takes compiled flex for forward-only calls from this many tokens on: below it the
# one-off compile (10-50 s per sequence length here) outweighs the gain, e.g. in tiny-model tests.
AUTO_FLEX_MIN_SEQ_CPU = 8192
_FLEX_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_flex_cpu_failed = False  # set once compiled flex has failed on this machine (no compiler, ...)


def resolve_backend(
    backend: str,
    device: torch.device,
    *,
    needs_grad: bool = False,
    seq_len: int = 0,
    dtype: torch.dtype = torch.float32,
) -> str:
    """The concrete backend that ``backend`` means for a call on ``device``.

    ``auto``: CUDA -> ``flex`` (compiled FlexAttention, forward and backward). CPU with gradients ->
    ``sparse`` (FlexAttention has no CPU backward). CPU forward-only -> compiled ``flex`` when
    ``seq_len >= AUTO_FLEX_MIN_SEQ_CPU``, the dtype is one CPU flex supports and compiled flex has
    not failed here before (the first failure is remembered and falls back); otherwise ``sparse``.
    Measured on the 2-core machine (``benchmarks/RESULTS.md``, 21/41/81 x 256 tokens): compiled flex
    forward ran 1.1x/1.6x/2.6x faster than dense SDPA, ``sparse`` 1.0x/1.5x/2.6x, so flex is the
    forward to take once its compile is paid. Other devices -> ``sparse``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "flex"
    flex_ok = device.type == "cpu" and dtype in _FLEX_CPU_DTYPES and not _flex_cpu_failed
    if flex_ok and not needs_grad and seq_len >= AUTO_FLEX_MIN_SEQ_CPU:
        return "flex"
    return "sparse"


def _validate(q, k, v, block_mask, block_size, key_padding_mask) -> None:
    """Shape/dtype checks with messages that name the offending argument and shape."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [batch, heads, seq, head_dim] tensor, got {shape}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k, v must have the same shape (self-attention), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on {q.device}"
        )
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    seq = q.shape[2]
    nb = -(-seq // block_size)
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise ValueError(
            f"block_mask must be a bool tensor, got {getattr(block_mask, 'dtype', type(block_mask))}"
        )
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
    FlexAttention; forward-only on CPU), ``sparse`` (trainable chunked kernel, CPU and GPU), and
    ``auto``: ``flex`` on CUDA; on CPU ``sparse`` for training and small inputs, compiled ``flex`` for
    large forward-only calls (rule and numbers: :func:`resolve_backend`).
    """
    global _flex_cpu_failed
    if backend not in BACKENDS:
        resolve_backend(backend, torch.device("cpu"))  # raises the error listing valid backends
    _validate(q, k, v, block_mask, block_size, key_padding_mask)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name = resolve_backend(backend, q.device, needs_grad=needs_grad, seq_len=q.shape[2], dtype=q.dtype)
    if name == "dense":
        return dense_attention(q, k, v, key_padding_mask)
    if name == "reference":
        return reference_attention(q, k, v, block_mask, block_size, key_padding_mask)
    if name == "flex" and backend == "auto" and q.device.type == "cpu":
        try:
            return flex_block_attention(q, k, v, block_mask, block_size, key_padding_mask)
        except Exception as exc:  # compile toolchain missing or broken: remember, use sparse from now on
            _flex_cpu_failed = True
            logger.warning("compiled flex attention failed on CPU (%s); auto uses 'sparse' from now on", exc)
            name = "sparse"
    if name == "flex":
        return flex_block_attention(q, k, v, block_mask, block_size, key_padding_mask)
    return sparse_block_attention(q, k, v, block_mask, block_size, key_padding_mask)


__all__ = ["BACKENDS", "block_sparse_attention", "resolve_backend"]
