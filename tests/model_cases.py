"""What the radial-attention model tests share: the tiny LoRA'd transformers and their inputs, the forward +
backward they compare, and the oracle: diffusers' own stock processors given the radial mask expanded to
tokens as an explicit attention mask (independent of our processors and kernels)."""

from __future__ import annotations

import torch
from diffusers.models.transformers import transformer_hunyuan_video15 as hy15
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from peft import LoraConfig

from radial_lora.models import build_tiny_pipeline, get_adapter

FRAMES, SIDE = 9, 8  # latent frames and latent side: 9 x (4 x 4 tokens) = 144 video tokens
TEXT, VALID = 10, (7, 4)  # Hunyuan text tokens; valid ones per sample (the rest is padding)
# Cases that are a family with a transformer config other than its tiny default: name -> (family, overrides)
CASES = {"hunyuan-i2v-replace": ("hunyuan-i2v", {"image_condition_type": "token_replace"})}


def family_of_case(case: str) -> str:
    return CASES.get(case, (case, {}))[0]


def model_inputs(
    family: str, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Two samples' latents, timesteps and conditioning (text; image for image-to-video) for a tiny transformer
    of ``family``."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, FRAMES, SIDE, SIDE, generator=g)
    family = family_of_case(family)
    if family in ("hunyuan", "hunyuan-i2v"):  # HunyuanVideo-I2V's Llava text has the image in it: text all the same
        mask = torch.zeros(2, TEXT, dtype=torch.long)
        for row, valid in enumerate(VALID):
            mask[row, :valid] = 1
        text = {
            "encoder_hidden_states": torch.randn(2, TEXT, 16, generator=g),
            "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(2, 8, generator=g),
        }
    elif family.startswith("hunyuan15"):  # Qwen2.5-VL and ByT5 stand-ins, padded; predict adds the 729 image tokens
        mask = torch.zeros(2, TEXT)
        mask_2 = torch.zeros(2, 6)
        for row, valid in enumerate(VALID):
            mask[row, :valid] = 1
            mask_2[row, : valid // 2] = 1
        text = {
            "encoder_hidden_states": torch.randn(2, TEXT, 16, generator=g),
            "encoder_attention_mask": mask,
            "encoder_hidden_states_2": torch.randn(2, 6, 8, generator=g),
            "encoder_attention_mask_2": mask_2,
        }
    else:
        text = {"encoder_hidden_states": torch.randn(2, TEXT, 32, generator=g)}
    if family.endswith("-i2v"):  # the image's latents (channels after the frame mask) and, Wan2.1-I2V, CLIP's
        text["image_latents"] = torch.randn(2, 4, FRAMES, SIDE, SIDE, generator=g)
        if family == "wan-i2v":  # its cross-attention takes the last 512 tokens as text (diffusers hard-codes it)
            text["encoder_hidden_states"] = torch.randn(2, 512, 32, generator=g)
            text["encoder_hidden_states_image"] = torch.randn(2, 17, 16, generator=g)
        if family == "hunyuan15-i2v":  # the tiny SigLIP's 16 tokens, joined to the text
            text["encoder_hidden_states_image"] = torch.randn(2, 16, 8, generator=g)
    timesteps = torch.tensor([700.0, 300.0], device=device)
    return latents.to(device), timesteps, {k: v.to(device) for k, v in text.items()}


def random_frames(n: int, seed: int = 0, side: int = 32) -> list:
    """``n`` random uint8 ``[side, side, 3]`` pictures: the first (and last) frames of image-to-video tests."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def capture_inputs(transformer: torch.nn.Module) -> tuple[list[dict], object]:
    """A hook recording the keyword inputs of each transformer call (what a stock pipeline feeds it), and its
    handle."""
    seen: list[dict] = []

    def hook(_module, _args, kwargs):
        seen.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})

    return seen, transformer.register_forward_pre_hook(hook, with_kwargs=True)


def lora_model(family: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A tiny transformer of ``family`` (or a :data:`CASES` name) with a non-zero LoRA attached (so every LoRA
    grad is non-zero)."""
    family, overrides = CASES.get(family, (family, {}))
    transformer = build_tiny_pipeline(family, **overrides).transformer.to(device)
    transformer.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    if family.startswith("hunyuan"):  # the text stream of the double-stream blocks goes through our processor too
        targets += ["add_q_proj", "add_k_proj", "add_v_proj"]
    if family in ("hunyuan", "hunyuan-i2v"):  # (1.5's last double block's to_add_out is unused: no single blocks)
        targets += ["to_add_out"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g).to(p.device))
    return transformer


def forward_backward(
    family: str, transformer: torch.nn.Module, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Velocity prediction and the LoRA gradients of a fixed random projection of it."""
    latents, timesteps, text = model_inputs(family, device)
    transformer.zero_grad(set_to_none=True)
    out = get_adapter(family_of_case(family)).predict(transformer, latents, timesteps, text)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}
    return out.detach(), grads


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


class OracleHunyuan15(HunyuanVideo15AttnProcessor2_0):
    """Stock HunyuanVideo 1.5 joint attention with the token mask AND-ed into the mask it builds from the
    text mask (its attention call, wrapped for this processor's call only)."""

    def __init__(self, token_mask: torch.Tensor) -> None:
        super().__init__()
        self.token_mask = token_mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        stock = hy15.dispatch_attention_fn

        def masked(query, key, value, attn_mask=None, **kwargs):
            return stock(query, key, value, attn_mask=attn_mask & self.token_mask, **kwargs)

        hy15.dispatch_attention_fn = masked
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            hy15.dispatch_attention_fn = stock


def oracle_processors(family: str, transformer: torch.nn.Module, token_mask: torch.Tensor) -> dict:
    cls = {
        "hunyuan": OracleHunyuan,
        "hunyuan-i2v": OracleHunyuan,
        "hunyuan15": OracleHunyuan15,
        "hunyuan15-i2v": OracleHunyuan15,
    }.get(family, OracleWan)
    procs = dict(transformer.attn_processors)
    for name, _, _ in get_adapter(family).self_attention_modules(transformer):
        procs[f"{name}.processor"] = cls(token_mask)
    return procs
