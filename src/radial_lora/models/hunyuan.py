"""HunyuanVideo (``HunyuanVideoPipeline``): the adapter and the radial joint-attention processor.

HunyuanVideo attends jointly over ``[video; text]`` tokens in its double-stream blocks and in its
single-stream blocks. Radial attention sparsifies only video -> video (mask model type "hunyuan",
no attention sink); text rows and columns stay dense (``num_text_tokens`` of ``radial_block_mask``)
and padded text keys are masked with the model's own text mask as ``key_padding_mask``. The token
refiner inside the context embedder keeps its stock processors.

Block indices count the double-stream blocks first, then the single-stream blocks (HunyuanVideo
13B: 0..19 double, 20..59 single), so ``dense_layers=2`` makes the first two double blocks dense.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from torch import nn

from radial_lora.constants import FAMILY_DECAY
from radial_lora.models.adapter import ModelAdapter, SequencePlan, Split, _check_videos, unwrap
from radial_lora.models.riflex import TemporalRope

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from radial_lora.models.radial import RadialController


class RadialHunyuanAttnProcessor(HunyuanVideoAttnProcessor2_0):
    """``HunyuanVideoAttnProcessor2_0`` whose joint attention goes through the radial controller.

    The joint-attention math of every HunyuanVideo generation (double-stream blocks: video and text projected
    apart, then ``[video; text]``; single-stream: one projection of the joined tokens; RoPE on video only).
    A family whose mask arrives in another form overrides :meth:`key_padding_mask` only."""

    def __init__(self, controller: RadialController, block_index: int) -> None:
        super().__init__()
        self.controller = controller
        self.block_index = block_index

    def key_padding_mask(self, attention_mask: torch.Tensor, tokens: int) -> torch.Tensor:
        """``[B, video + text]`` bool, True for the keys to attend: HunyuanVideo passes it as ``[B,1,1,S]``."""
        batch = attention_mask.shape[0]
        if attention_mask.dtype != torch.bool or attention_mask.numel() != batch * tokens:
            raise ValueError(
                "HunyuanVideo's attention_mask must be a bool [B,1,1,video+text] mask of valid tokens; got "
                f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
            )
        return attention_mask.reshape(batch, -1)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise RuntimeError("RadialHunyuanAttnProcessor needs the text stream (joint [video; text] attention)")
        batch, video_tokens = hidden_states.shape[:2]
        text_tokens = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        joint = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single_stream else hidden_states

        query, key, value = (proj(joint).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # RoPE on the video tokens only
            query = torch.cat(
                [apply_rotary_emb(query[:, :video_tokens], image_rotary_emb, sequence_dim=1), query[:, video_tokens:]],
                dim=1,
            )
            key = torch.cat(
                [apply_rotary_emb(key[:, :video_tokens], image_rotary_emb, sequence_dim=1), key[:, video_tokens:]],
                dim=1,
            )
        if not single_stream:
            text = [
                proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            ]
            if attn.norm_added_q is not None:
                text[0] = attn.norm_added_q(text[0])
            if attn.norm_added_k is not None:
                text[1] = attn.norm_added_k(text[1])
            query, key, value = (torch.cat([a, b], dim=1) for a, b in zip((query, key, value), text))

        key_padding_mask = None if attention_mask is None else self.key_padding_mask(attention_mask, query.shape[1])
        out = self.controller.attend(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            block_index=self.block_index,
            video_tokens=video_tokens,
            num_text_tokens=text_tokens,
            key_padding_mask=key_padding_mask,
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        video_out, text_out = out[:, :video_tokens], out[:, video_tokens:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


class HunyuanAdapter(ModelAdapter):
    """HunyuanVideo T2V (13B): Llama + CLIP text encoders, embedded guidance, joint attention."""

    family = "hunyuan"
    mask_model_type = "hunyuan"

    def guidance_passes(self, guidance: float, transformer: nn.Module | None = None) -> int:
        """One: HunyuanVideo's guidance is distilled into the transformer (an embedded input, no second pass)."""
        return 1

    def transformer_task(self, transformer: Mapping[str, Any]) -> str:
        """Its config says: an ``image_condition_type`` makes it HunyuanVideo-I2V's."""
        return "i2v" if transformer.get("image_condition_type") else "t2v"

    default_decay = FAMILY_DECAY["hunyuan"]
    default_frames = 129  # HunyuanVideoPipeline.__call__(num_frames=129)
    # diffusers has no _cp_plan for HunyuanVideo: the video tokens are cut after the patch embedding (and the
    # RoPE tables [S, D] with them) and joined after proj_out. The text stream stays whole on every rank and
    # joins every rank's attention, as USP does for joint attention; the attention mask it builds then covers
    # [my video tokens; text], which the controller widens to all video tokens.
    sequence_plan = SequencePlan(
        outputs={"x_embedder": {None: Split(1, 3)}, "rope": {0: Split(0, 2), 1: Split(0, 2)}}, gather={"proj_out": 1}
    )
    encoder_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")
    pipeline_class_name = "HunyuanVideoPipeline"
    transformer_class_name = "HunyuanVideoTransformer3DModel"
    reference_heads = 24  # HunyuanVideo 13B: 24 x 128
    joint_text_tokens = 256  # its Llama prompt, appended to the video in every block
    max_sequence_length = 256  # the pipeline's default Llama text length (after the template crop)
    guidance_scale = 6.0  # the pipeline's default embedded guidance; training conditions match inference

    def self_attention_modules(self, transformer: nn.Module) -> list[tuple[str, int, nn.Module]]:
        double = [(f"transformer_blocks.{i}.attn", i, b.attn) for i, b in enumerate(transformer.transformer_blocks)]
        n = len(double)
        single = [
            (f"single_transformer_blocks.{j}.attn", n + j, b.attn)
            for j, b in enumerate(transformer.single_transformer_blocks)
        ]
        return double + single

    def make_processor(self, controller: RadialController, block_index: int) -> RadialHunyuanAttnProcessor:
        return RadialHunyuanAttnProcessor(controller, block_index)

    def patch_size(self, transformer: nn.Module) -> tuple[int, int, int]:
        p, pt = int(transformer.config.patch_size), int(transformer.config.patch_size_t)
        return pt, p, p

    def temporal_rope(self, transformer: nn.Module) -> TemporalRope:
        rope = unwrap(transformer).rope  # HunyuanVideoRotaryPosEmbed: rope_dim [t, h, w], theta 256
        return TemporalRope(rope, float(rope.theta), int(rope.rope_dim[0]), int(rope.patch_size_t))

    @torch.no_grad()
    def encode_prompts(self, pipe: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, mask = pipe.encode_prompt(
            prompt=list(prompts), device=pipe._execution_device, max_sequence_length=self.max_sequence_length
        )
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "pooled_projections": pooled}

    @torch.no_grad()
    def encode_videos(self, pipe: DiffusionPipeline, videos: torch.Tensor) -> torch.Tensor:
        _check_videos(videos)
        vae = pipe.vae
        dist = vae.encode(videos.to(device=vae.device, dtype=vae.dtype)).latent_dist
        # HunyuanVideoPipeline decodes latents / scaling_factor; this is its inverse.
        return dist.mode().float() * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        raw = latents.float() / vae.config.scaling_factor
        video = vae.decode(raw.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
        return video.float().clamp(-1, 1)

    def predict(
        self, transformer: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return self._forward(transformer, latents, timesteps, text)

    def _forward(
        self, transformer: nn.Module, hidden: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer on ``hidden`` (x_t, or the image-to-video input built from it) as the pipelines call it:
        the text and its mask in the transformer's dtype, the embedded guidance where the model has it."""
        inner, batch, device = unwrap(transformer), hidden.shape[0], hidden.device
        dtype = inner.dtype
        guidance = None
        if inner.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_scale * 1000.0, device=device, dtype=dtype)
        return transformer(
            hidden_states=hidden.to(dtype),
            timestep=timesteps.to(device=device, dtype=dtype),
            encoder_hidden_states=text["encoder_hidden_states"].to(dtype),
            encoder_attention_mask=text["encoder_attention_mask"].to(device=device, dtype=dtype),
            pooled_projections=text["pooled_projections"].to(dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
