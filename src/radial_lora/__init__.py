"""radial-lora: LoRA length extension for video diffusion transformers under Radial Attention."""

from radial_lora.mask import attention_cost, mask_density, mask_sparsity, radial_block_mask

__all__ = ["radial_block_mask", "mask_density", "mask_sparsity", "attention_cost"]
__version__ = "0.1.0"
