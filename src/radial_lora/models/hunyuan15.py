"""HunyuanVideo 1.5 (``HunyuanVideo15Pipeline``, ``HunyuanVideo15ImageToVideoPipeline``): the adapters and
their radial processor.

What differs from HunyuanVideo (``hunyuan.py``), and all this file says:

- 54 double-stream blocks and no single-stream ones; every block attends jointly over ``[video; text]`` where
  the text is the transformer's own concatenation of SigLIP image tokens (729, all zero and masked for
  text-to-video), ByT5 glyph tokens (256) and Qwen2.5-VL tokens (1000), valid ones first. Radial attention
  sparsifies video -> video only; the text rows and columns stay dense (mask model type "hunyuan"), and the
  padded text keys are masked with the mask the blocks receive (``[B, text]``; video is always valid).
- its VAE compresses 16x spatially with 32 latent channels, and the transformer's patch is 1 x 1 x 1: a
  480p frame (848 x 480) is 53 x 30 = 1590 tokens, a latent frame per 4 frames (read from the configs).
- the transformer's input is ``cat([x_t, cond_latents, cond_mask])`` on channels (32 + 32 + 1 = 65); for
  text-to-video the pipeline passes zeros for both, and zeros for ``image_embeds``. :meth:`predict` does the
  same, so training sees the inputs the pipeline's denoising loop gives.
- no embedded guidance: classifier-free guidance lives in the pipeline's ``guider`` component
  (``ClassifierFreeGuidance``), and the call takes no ``guidance_scale``. No ``load_lora_weights`` either: a
  LoRA loads with ``pipe.transformer.load_lora_adapter(folder, prefix="transformer")``.

The mask defaults (decay 0.95, 128-token blocks) are HunyuanVideo's: the authors published none for 1.5
(``constants.FAMILY_DECAY``; docs/RADIAL_MASK.md says why and how to tune them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from radial_lora.constants import FAMILY_BLOCK_SIZE, FAMILY_DECAY, IMAGE_EMBEDS, IMAGE_LATENTS
from radial_lora.models.adapter import ModelAdapter, unwrap
from radial_lora.models.hunyuan import HunyuanAdapter, RadialHunyuanAttnProcessor

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from radial_lora.models.radial import RadialController

# HunyuanVideo15Pipeline.__init__: SigLIP tokens of the (for text-to-video: zero) image condition
VISION_TOKENS = 729


class RadialHunyuan15AttnProcessor(RadialHunyuanAttnProcessor):
    """HunyuanVideo's radial joint attention with 1.5's mask: ``[B, text]`` (True or 1 = valid), the video
    in front of it always valid, as ``HunyuanVideo15AttnProcessor2_0`` pads it."""

    def key_padding_mask(self, attention_mask: torch.Tensor, tokens: int) -> torch.Tensor:
        if attention_mask.ndim != 2 or attention_mask.shape[1] > tokens:
            raise ValueError(
                "HunyuanVideo 1.5's attention_mask must be a [B, text tokens] mask of valid text tokens; got "
                f"{tuple(attention_mask.shape)} for {tokens} tokens"
            )
        return F.pad(attention_mask.bool(), (tokens - attention_mask.shape[1], 0), value=True)


class Hunyuan15Adapter(HunyuanAdapter):
    """HunyuanVideo 1.5 T2V (8.3B): Qwen2.5-VL + ByT5 text encoders, guider CFG, 16x VAE, patch 1."""

    family = "hunyuan15"
    default_decay = FAMILY_DECAY["hunyuan15"]
    default_block_size = FAMILY_BLOCK_SIZE["hunyuan15"]
    default_frames = 121  # HunyuanVideo15Pipeline.__call__(num_frames=121)
    # HunyuanVideo's plan: video cut after the patch embedding with the RoPE tables, joined after proj_out;
    # the text (built inside the transformer) stays whole on every rank and joins every rank's attention.
    one_video_per_call = True  # the stock decode of a batch hits the VAE bug below
    pipeline_class_name = "HunyuanVideo15Pipeline"
    transformer_class_name = "HunyuanVideo15Transformer3DModel"
    encoder_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")
    # The text tokens of every joint attention (Qwen2.5-VL 1000 + ByT5 256 + SigLIP 729, padding included):
    # what the memory planner counts. The pipeline's encoders pad to these lengths themselves.
    max_sequence_length = joint_text_tokens = 1000 + 256 + VISION_TOKENS
    reference_heads = 16  # 8.3B: 16 x 128
    default_patch = (1, 1, 1)

    def transformer_task(self, transformer: Mapping[str, Any]) -> str:
        """Its config says: ``task_type`` "t2v" or "i2v" (diffusers' default is "i2v")."""
        return str(transformer.get("task_type", "i2v"))

    def lone_vae_factors(self, transformer: Mapping[str, Any]) -> tuple[int, int]:
        return 4, 16  # AutoencoderKLHunyuanVideo15: 4x temporal, 16x spatial

    def self_attention_modules(self, transformer: nn.Module) -> list[tuple[str, int, nn.Module]]:
        return [(f"transformer_blocks.{i}.attn", i, b.attn) for i, b in enumerate(transformer.transformer_blocks)]

    def make_processor(self, controller: RadialController, block_index: int) -> RadialHunyuan15AttnProcessor:
        return RadialHunyuan15AttnProcessor(controller, block_index)

    @torch.no_grad()
    def encode_prompts(self, pipe: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Both encoders' outputs, as the pipeline computes them: Qwen2.5-VL's and ByT5's (the glyph text in
        quotes; zeros and a zero mask when the prompt quotes none)."""
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(
            prompt=list(prompts), device=pipe._execution_device, batch_size=len(prompts)
        )
        return {
            "encoder_hidden_states": embeds,
            "encoder_attention_mask": mask,
            "encoder_hidden_states_2": embeds_2,
            "encoder_attention_mask_2": mask_2,
        }

    def guidance_passes(self, guidance: float, transformer: nn.Module | None = None) -> int:
        """1.5 guides by classifier-free guidance again (its guider), unlike HunyuanVideo's embedded guidance."""
        return ModelAdapter.guidance_passes(self, guidance)

    def guidance_arguments(self, pipe: DiffusionPipeline, guidance: float) -> dict[str, Any]:
        """None: the call takes no ``guidance_scale``; its ``guider`` component (``ClassifierFreeGuidance``)
        guides, and is set here (guidance 1 runs the conditional pass alone, as the guider decides)."""
        pipe.guider.guidance_scale = float(guidance)
        return {}

    # diffusers 0.42's AutoencoderKLHunyuanVideo15 attention broadcasts its [B, S, S] causal mask against
    # [B, 1, S, C] queries: a batch of two fails. One video at a time is the same computation.
    @torch.no_grad()
    def encode_videos(self, pipe: DiffusionPipeline, videos: torch.Tensor) -> torch.Tensor:
        return torch.cat([super(Hunyuan15Adapter, self).encode_videos(pipe, v[None]) for v in videos])

    @torch.no_grad()
    def decode_latents(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([super(Hunyuan15Adapter, self).decode_latents(pipe, z[None]) for z in latents])

    def predict(
        self, transformer: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``cat([x_t, 0, 0])`` with zero image embeddings, as ``HunyuanVideo15Pipeline``'s loop feeds it."""
        inner = unwrap(transformer)
        b, c, f, h, w = latents.shape
        image = torch.zeros(b, VISION_TOKENS, inner.config.image_embed_dim, device=latents.device)
        return self._call(transformer, latents, latents.new_zeros(b, c + 1, f, h, w), image, timesteps, text)

    def _call(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        condition: torch.Tensor,
        image_embeds: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The transformer on ``cat([x_t, condition])`` (condition latents and mask), as the pipelines call it."""
        inner = unwrap(transformer)
        if inner.config.use_meanflow:
            raise ValueError("step-distilled HunyuanVideo 1.5 models (use_meanflow, timestep_r) are not supported")
        dtype, device = inner.dtype, latents.device
        hidden = torch.cat([latents, condition.to(device, latents.dtype)], dim=1)
        return transformer(
            hidden_states=hidden.to(dtype),
            timestep=timesteps.to(device=device, dtype=dtype),
            encoder_hidden_states=text["encoder_hidden_states"].to(dtype),
            encoder_attention_mask=text["encoder_attention_mask"].to(device=device, dtype=dtype),
            encoder_hidden_states_2=text["encoder_hidden_states_2"].to(dtype),
            encoder_attention_mask_2=text["encoder_attention_mask_2"].to(device=device, dtype=dtype),
            image_embeds=image_embeds.to(device=device, dtype=dtype),
            return_dict=False,
        )[0]


class Hunyuan15I2VAdapter(Hunyuan15Adapter):
    """HunyuanVideo 1.5 I2V (``HunyuanVideo15ImageToVideoPipeline``): the first frame's VAE latents on channels
    and its SigLIP tokens joined to the text, built as the pipeline builds them (diffusers 0.42,
    ``prepare_cond_latents_and_mask``, ``encode_image``):

    - the VAE encodes the image alone (argmax, ``* scaling_factor``); the condition latents are it on latent
      frame 0 and zeros on the others, with a 1-channel mask, 1 on frame 0: the transformer sees
      ``cat([x_t, condition, mask])`` (32 + 32 + 1 = 65 channels);
    - SigLIP's last hidden states of the image (729 tokens at its 384 px) are ``image_embeds``, valid tokens
      of the joint attention's text part (dense, as all text is under radial attention).

    The transformer generates every latent frame, the first included, so the loss covers every frame. The
    pipeline takes no height or width: it renders at the size bucket of the image for its ``target_size``
    (:meth:`size_arguments` checks that it is the requested size).
    """

    family = "hunyuan15-i2v"
    pipeline_class_name = "HunyuanVideo15ImageToVideoPipeline"
    encoder_components = (*Hunyuan15Adapter.encoder_components, "image_encoder", "feature_extractor")

    @torch.no_grad()
    def encode_images(
        self, pipe: DiffusionPipeline, frames: list, num_frames: int, last_frames: list | None = None
    ) -> dict[str, torch.Tensor]:
        """The conditioning of ``num_frames``-frame videos that start from ``frames`` (uint8 ``[H, W, 3]`` of the
        video's size), batch-first, exactly as the pipeline builds it for those images as PIL pictures."""
        import numpy as np
        from PIL import Image

        height, width = frames[0].shape[:2]
        device = pipe._execution_device
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        latents, embeds = [], []
        for frame in frames:  # one image per call, as the pipeline (and the VAE's batch bug) has it
            image = Image.fromarray(np.ascontiguousarray(frame))
            z = pipe._get_image_latents(pipe.vae, pipe.video_processor, image, height, width, device)
            condition = z.repeat(1, 1, latent_frames, 1, 1)
            condition[:, :, 1:] = 0
            latents.append(condition.float())
            embeds.append(pipe._get_image_embeds(pipe.image_encoder, pipe.feature_extractor, image, device).float())
        return {IMAGE_LATENTS: torch.cat(latents), IMAGE_EMBEDS: torch.cat(embeds)}

    def predict(
        self, transformer: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``cat([x_t, condition latents, mask])`` and the SigLIP tokens, as the pipeline's loop feeds them."""
        if IMAGE_LATENTS not in text or IMAGE_EMBEDS not in text:
            raise ValueError(
                f"an image-to-video model needs the clips' {IMAGE_LATENTS!r} and {IMAGE_EMBEDS!r}; prepare the "
                "dataset with this model (radial-lora data prepare --model ...): it encodes each clip's first frame"
            )
        condition = text[IMAGE_LATENTS].to(latents.device, torch.float32)
        mask = torch.zeros_like(condition[:, :1])
        mask[:, :, 0] = 1
        return self._call(transformer, latents, torch.cat([condition, mask], 1), text[IMAGE_EMBEDS], timesteps, text)

    def size_arguments(self, pipe: DiffusionPipeline, height: int, width: int) -> dict[str, Any]:
        """None: the call takes no size; it renders at the image's bucket for ``target_size``, which must be the
        requested size."""
        bucket = pipe.video_processor.calculate_default_height_width(height, width, pipe.target_size)
        if tuple(bucket) != (height, width):
            raise ValueError(
                f"HunyuanVideo 1.5 image-to-video renders an image of {width}x{height} at its size bucket "
                f"{bucket[1]}x{bucket[0]} (target_size {pipe.target_size}); "
                f"pass --width {bucket[1]} --height {bucket[0]}"
            )
        return {}
