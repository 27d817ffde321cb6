"""The oracle of the radial-attention model tests: diffusers' own stock processors given the radial mask
expanded to tokens as an explicit attention mask (independent of our processors and kernels)."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from radial_lora.models import get_adapter


class OracleWan(WanAttnProcessor):
    """Stock Wan self-attention with an explicit token mask."""

    def __init__(self, token_mask: torch.Tensor) -> None:
        super().__init__()
        self.token_mask = token_mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.token_mask, rotary_emb)


class OracleHunyuan(HunyuanVideoAttnProcessor2_0):
    """Stock HunyuanVideo joint attention with the token mask AND-ed into the model's text mask."""

    def __init__(self, token_mask: torch.Tensor) -> None:
        super().__init__()
        self.token_mask = token_mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        mask = self.token_mask[None, None] & attention_mask
        return super().__call__(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


def oracle_processors(family: str, transformer: torch.nn.Module, token_mask: torch.Tensor) -> dict:
    cls = OracleHunyuan if family == "hunyuan" else OracleWan
    procs = dict(transformer.attn_processors)
    for name, _, _ in get_adapter(family).self_attention_modules(transformer):
        procs[f"{name}.processor"] = cls(token_mask)
    return procs
