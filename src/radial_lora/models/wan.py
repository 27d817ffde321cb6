"""Wan2.1 / Wan2.2 (``WanPipeline``): the adapters and the radial self-attention processor.

Radial attention replaces only the self-attention ``attn1`` of every ``WanTransformerBlock``;
cross-attention to the text stays stock. The first latent frame is an attention sink (mask model
type "wan"). Wan2.2 A14B has two experts (``transformer`` for high noise, ``transformer_2`` for low
noise, switched at ``boundary_ratio * num_train_timesteps``); both get radial attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import nn

from radial_lora.constants import EXPERTS, FAMILY_BLOCK_SIZE, FAMILY_DECAY
from radial_lora.models.adapter import ModelAdapter, SequencePlan, Split, _check_videos, unwrap
from radial_lora.models.riflex import TemporalRope

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from radial_lora.models.radial import RadialController


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved pairs (the same math as ``WanAttnProcessor``)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class RadialWanAttnProcessor(WanAttnProcessor):
    """``WanAttnProcessor`` for self-attention whose attention product goes through the radial controller.

    Wan's blocks call ``attn1(x, None, None, rotary_emb)``: no mask reaches the processor, so it holds
    the shared controller (geometry, mask cache, dense policy) and its block index.
    """

    def __init__(self, controller: RadialController, block_index: int) -> None:
        super().__init__()
        self.controller = controller
        self.block_index = block_index

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise RuntimeError(
                "RadialWanAttnProcessor is for Wan self-attention (attn1) only; it got cross-attention inputs"
            )
        if getattr(attn, "fused_projections", False):
            if hasattr(attn.to_q, "lora_A"):
                raise RuntimeError(
                    "fused QKV projections bypass the LoRA layers on to_q/to_k/to_v; call "
                    "pipe.unfuse_qkv_projections() (never fuse with LoRA adapters attached)"
                )
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        out = self.controller.attend(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            block_index=self.block_index,
            video_tokens=hidden_states.shape[1],
        )
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


MASK_CHANNELS = 4  # = the VAE's temporal factor: the I2V pipeline folds 4 pixel-frame flags into each latent frame


def is_wan_i2v_config(transformer: Any) -> bool:
    """A Wan transformer config built for image-to-video: its input holds the noise, the frame mask and the
    image latents (``in_channels = 2 * out_channels + 4``: 36 for Wan2.1-I2V and Wan2.2-I2V-A14B)."""
    get = transformer.get if isinstance(transformer, Mapping) else lambda k, d=None: getattr(transformer, k, d)
    cin, cout = get("in_channels"), get("out_channels")
    return cin is not None and cout is not None and int(cin) == 2 * int(cout) + MASK_CHANNELS


WAN22_LATENT_CHANNELS = 48  # TI2V-5B's Wan2.2 VAE: 48 latent channels, 16x spatial compression


def wan22_vae_spatial(in_channels: int | None) -> int:
    """A Wan transformer's spatial VAE factor from its latent channels (the VAE is not in its config)."""
    return 16 if in_channels == WAN22_LATENT_CHANNELS else 8


def is_wan22_config(index: Mapping[str, Any], transformer: Mapping[str, Any]) -> bool:
    """Wan2.2 shares Wan2.1's classes. A pipeline's ``model_index.json`` tells by a second expert (A14B) or
    per-token timesteps (``expand_timesteps``: TI2V-5B); a transformer's config by TI2V-5B's 48 latent
    channels. A lone A14B expert looks like Wan2.1 unless its pipeline tagged it (``adapter.tag_transformers``)."""
    second = index.get("transformer_2") or [None]
    return (
        second[0] is not None
        or bool(index.get("expand_timesteps"))
        or transformer.get("in_channels") == WAN22_LATENT_CHANNELS
    )


class WanAdapter(ModelAdapter):
    """Wan2.1 T2V (1.3B, 14B)."""

    family = "wan"
    mask_model_type = "wan"
    default_decay = FAMILY_DECAY["wan"]
    default_frames = 81  # WanPipeline.__call__(num_frames=81); Wan2.2 A14B keeps it
    pipeline_class_name = "WanPipeline"
    transformer_class_name = "WanTransformer3DModel"
    reference_heads = 40  # Wan2.1-14B and Wan2.2-A14B: 40 x 128
    # The pipeline's default text length: Wan pads T5 embeddings with zeros to 512 tokens.
    max_sequence_length = 512
    # diffusers' WanTransformer3DModel._cp_plan's cut points: RoPE tables [1, S, 1, D], the first block's
    # tokens, Wan2.2 TI2V's per-token timesteps [B, S]; joined after proj_out. Text stays whole on every rank.
    sequence_plan = SequencePlan(
        inputs={"": {"timestep": Split(1, 2)}, "blocks.0": {"hidden_states": Split(1, 3)}},
        outputs={"rope": {0: Split(1, 4), 1: Split(1, 4)}},
        gather={"proj_out": 1},
    )

    def self_attention_modules(self, transformer: nn.Module) -> list[tuple[str, int, nn.Module]]:
        return [(f"blocks.{i}.attn1", i, block.attn1) for i, block in enumerate(transformer.blocks)]

    def make_processor(self, controller: RadialController, block_index: int) -> RadialWanAttnProcessor:
        return RadialWanAttnProcessor(controller, block_index)

    def patch_size(self, transformer: nn.Module) -> tuple[int, int, int]:
        pt, ph, pw = transformer.config.patch_size
        return int(pt), int(ph), int(pw)

    def temporal_rope(self, transformer: nn.Module) -> TemporalRope:
        rope = unwrap(transformer).rope  # WanRotaryPosEmbed: [t | h | w] channels, theta 10000 (diffusers' default)
        return TemporalRope(rope, float(getattr(rope, "theta", 10000.0)), int(rope.t_dim), int(rope.patch_size[0]))

    def lone_vae_factors(self, transformer: Mapping[str, Any]) -> tuple[int, int]:
        """A lone Wan2.2 TI2V-5B transformer (48 channels) has the 16x Wan2.2 VAE; the others Wan2.1's 8x."""
        return 4, wan22_vae_spatial(transformer.get("in_channels"))

    def variant_of(self, index: Mapping[str, Any], transformer: Mapping[str, Any]) -> bool:
        """Wan2.1 and Wan2.2 share their classes: :func:`is_wan22_config` tells them apart."""
        return is_wan22_config(index, transformer) == (self.architecture == "wan22")

    def transformer_task(self, transformer: Mapping[str, Any]) -> str:
        return "i2v" if is_wan_i2v_config(transformer) else "t2v"

    def load_pipeline(self, model_id_or_path, torch_dtype: torch.dtype = torch.bfloat16, *, skip=()):
        """Stock ``from_pretrained``; the VAE goes to float32 as Wan's model cards recommend."""
        pipe = super().load_pipeline(model_id_or_path, torch_dtype, skip=skip)
        if pipe.vae is not None:
            pipe.vae.to(torch.float32)
        return pipe

    @torch.no_grad()
    def encode_prompts(self, pipe: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = pipe.encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=pipe._execution_device,
        )
        return {"encoder_hidden_states": embeds}

    def _stats(self, pipe: DiffusionPipeline, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape).to(like.device)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape).to(like.device)
        return mean, std

    @torch.no_grad()
    def encode_videos(self, pipe: DiffusionPipeline, videos: torch.Tensor) -> torch.Tensor:
        _check_videos(videos)
        vae = pipe.vae
        dist = vae.encode(videos.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = dist.mode().float()
        mean, std = self._stats(pipe, latents)
        # WanPipeline decodes with latents * std + mean; this is its inverse.
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        mean, std = self._stats(pipe, latents)
        raw = latents.float() * std + mean
        video = vae.decode(raw.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
        return video.float().clamp(-1, 1)

    def predict(
        self, transformer: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        dtype = unwrap(transformer).dtype
        return transformer(
            hidden_states=latents.to(dtype),
            timestep=timesteps.to(latents.device),
            encoder_hidden_states=text["encoder_hidden_states"].to(dtype),
            return_dict=False,
        )[0]


class Wan22Adapter(WanAdapter):
    """Wan2.2: A14B's two experts split by ``boundary_ratio`` (radial attention on both), or TI2V-5B's one
    transformer (16x-spatial, 48-channel VAE, read from the pipeline)."""

    family = "wan22"
    # The authors' Wan2.2 scripts (scripts/wan_22_t2v_inference.sh, radial_attn/models/wan2_2/attention.py):
    # decay 0.8 and 64-token mask blocks (128 for Wan2.1 and HunyuanVideo).
    default_decay = FAMILY_DECAY["wan22"]
    default_block_size = FAMILY_BLOCK_SIZE["wan22"]

    def transformers(self, pipe: DiffusionPipeline) -> list[nn.Module]:
        return [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]

    def boundary_timestep(self, pipe: DiffusionPipeline) -> float | None:
        """Timesteps ``>=`` this go to ``transformer``, the rest to ``transformer_2`` (as in ``WanPipeline``)."""
        ratio = pipe.config.boundary_ratio
        return None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps

    def expert_for(self, pipe: DiffusionPipeline, timestep: float) -> nn.Module:
        """The expert ``WanPipeline`` would use at ``timestep``."""
        boundary = self.boundary_timestep(pipe)
        if boundary is None or pipe.transformer_2 is None or timestep >= boundary:
            return pipe.transformer
        return pipe.transformer_2

    def expert_transformer(self, pipe: DiffusionPipeline, expert: str) -> nn.Module:
        """``transformer`` for "high", ``transformer_2`` for "low": the module a LoRA for that expert goes in."""
        if expert not in EXPERTS:
            raise ValueError(f"unknown Wan2.2 expert {expert!r}; expected one of {EXPERTS}")
        if expert == "high":
            return pipe.transformer
        if getattr(pipe, "transformer_2", None) is None or self.boundary_timestep(pipe) is None:
            raise ValueError(
                "the low-noise expert needs a pipeline with transformer_2 and boundary_ratio (Wan2.2 A14B)"
            )
        return pipe.transformer_2

    def expert_sigma_range(self, pipe: DiffusionPipeline, expert: str, margin: float = 1e-6) -> tuple[float, float]:
        """Noise levels ``s`` (timestep ``1000 s``) that ``WanPipeline`` sends to ``expert``.

        "high": ``[boundary, 1)``, "low": ``[0, boundary)``; ``margin`` keeps float32 rounding of
        ``1000 s`` on the expert's side of the boundary. No boundary: the high expert does everything.
        """
        self.expert_transformer(pipe, expert)  # validates the name and that the expert exists
        boundary = self.boundary_timestep(pipe)
        if boundary is None:
            return (0.0, 1.0)
        b = boundary / pipe.scheduler.config.num_train_timesteps
        return (b + margin, 1.0) if expert == "high" else (0.0, b - margin)
