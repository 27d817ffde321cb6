"""radial-lora: LoRA length extension for video diffusion transformers under Radial Attention."""

import logging

from radial_lora.attention import block_sparse_attention
from radial_lora.mask import attention_cost, mask_density, mask_sparsity, radial_block_mask

__all__ = [
    "block_sparse_attention",
    "radial_block_mask",
    "mask_density",
    "mask_sparsity",
    "attention_cost",
    "apply_radial_attention",
    "remove_radial_attention",
]
__version__ = "0.1.0"

# torchao (the 8-bit base, models/quantize.py) logs at import that its optional CUDA kernels, and diffusers that
# torchao's serialized-checkpoint classes, are unavailable: true on a CPU, irrelevant to weight-only training,
# and noise on every command's stderr.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# Model integration imports diffusers (seconds): exported lazily so `import radial_lora.mask` stays light.
_LAZY = {"apply_radial_attention", "remove_radial_attention"}


def __getattr__(name: str):
    if name in _LAZY:
        from radial_lora.models import radial

        return getattr(radial, name)
    raise AttributeError(f"module 'radial_lora' has no attribute {name!r}")
