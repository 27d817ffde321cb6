"""radial-lora: LoRA length extension for video diffusion transformers under Radial Attention."""

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

# Model integration imports diffusers (seconds): exported lazily so `import radial_lora.mask` stays light.
_LAZY = {"apply_radial_attention", "remove_radial_attention"}


def __getattr__(name: str):
    if name in _LAZY:
        from radial_lora.models import radial

        return getattr(radial, name)
    raise AttributeError(f"module 'radial_lora' has no attribute {name!r}")
