"""Wan image-to-video (``WanImageToVideoPipeline``): Wan2.1-I2V-14B (480P/720P), Wan2.2-I2V-A14B and
Wan2.2-TI2V-5B given an image.

What differs from text-to-video is only the conditioning, built here exactly as the stock pipeline builds it
(diffusers 0.42, ``WanImageToVideoPipeline.prepare_latents`` and ``__call__``):

- the VAE encodes the video ``[image, 0, 0, ...]`` of the clip's length (argmax), normalised with
  ``(z - mean) * (1 / std)``: the ``image_latents``, one per clip and length;
- a 4-channel frame mask, 1 on the first latent frame and 0 elsewhere, goes in front of them, and the
  transformer sees ``cat([x_t, mask, image_latents])`` on channels (16 + 4 + 16 = 36 for the 14B models);
- Wan2.1-I2V also feeds CLIP ViT-H's penultimate hidden states of the image (``image_encoder``) to every
  block's cross-attention (``encoder_hidden_states_image``); Wan2.2-I2V-A14B has no image encoder.

The transformer still generates every latent frame, the first included, so the loss covers every frame, as the
pipeline's denoising does. Wan2.2-TI2V-5B (``expand_timesteps``, one transformer whose input is only the video's
48 channels) works the other way: the VAE encodes the image alone, its latent frame replaces the first latent
frame of ``x_t``, whose tokens get timestep 0 (a per-token timestep), and the pipeline keeps that frame as
given; so the loss leaves the first latent frame out (``given_frames``).

Radial attention replaces ``attn1`` as for text-to-video; the first latent frame, the one the image conditions,
is the mask's attention sink. CLIP's image tokens go into cross-attention only, which stays dense.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from radial_lora.constants import IMAGE_EMBEDS, IMAGE_LATENTS
from radial_lora.models.adapter import unwrap
from radial_lora.models.wan import MASK_CHANNELS, Wan22Adapter, WanAdapter

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def frame_mask(like: torch.Tensor, last: bool = False) -> torch.Tensor:
    """The pipeline's mask for a first-frame condition: ``[B, 4, F, h, w]``, 1 on latent frame 0, else 0. The
    4 channels are the 4 video frames of a latent frame (frame 0 counts 4 times); ``last``: the video's last
    frame is given too, the 4th of the last latent frame (``WanImageToVideoPipeline.prepare_latents``)."""
    b, _, f, h, w = like.shape
    mask = torch.zeros(b, MASK_CHANNELS, f, h, w, dtype=like.dtype, device=like.device)
    mask[:, :, 0] = 1
    if last:
        mask[:, -1, -1] = 1
    return mask


def _first_last(transformer: nn.Module) -> bool:
    """Wan2.1-FLF2V: CLIP tokens of two images (first, last) with a learned position embedding over both."""
    return unwrap(transformer).config.get("pos_embed_seq_len") is not None


def _expands(transformer: nn.Module) -> bool:
    """Wan2.2-TI2V-5B's image mode: the input is the video's channels alone (the image replaces frame 0)."""
    config = unwrap(transformer).config
    return int(config.in_channels) == int(config.out_channels)


def _first_frame_given(
    transformer: nn.Module, latents: torch.Tensor, image: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``expand_timesteps``: x_t with its first latent frame replaced by the image's latent, and the per-token
    timesteps ``[B, S]`` that are 0 on that frame's tokens (``WanImageToVideoPipeline.__call__``)."""
    b, _, f, h, w = latents.shape
    keep = torch.ones(1, 1, f, h, w, dtype=torch.float32, device=latents.device)
    keep[:, :, 0] = 0
    hidden = (1 - keep) * image + keep * latents.float()
    _, ph, pw = unwrap(transformer).config.patch_size
    per_token = keep[0][0][:, ::ph, ::pw].flatten()
    return hidden, timesteps.float()[:, None] * per_token[None]


class WanI2VAdapter(WanAdapter):
    """Wan2.1-I2V-14B-480P / 720P (``WanImageToVideoPipeline`` with a CLIP image encoder)."""

    family = "wan-i2v"
    pipeline_class_name = "WanImageToVideoPipeline"
    encoder_components = ("text_encoder", "tokenizer", "vae", "image_encoder", "image_processor")

    def needs_image_encoder(self, pipe: DiffusionPipeline) -> bool:
        """Wan2.1-I2V's transformer takes CLIP image embeddings (``image_dim``); Wan2.2-I2V-A14B's does not."""
        return self.transformer_config(pipe).get("image_dim") is not None

    def accepts(self, index: Mapping[str, Any]) -> bool:
        """Wan2.2-TI2V-5B's folder says ``WanPipeline`` (text-to-video): the same weights take an image through
        ``WanImageToVideoPipeline``'s ``expand_timesteps`` mode."""
        ti2v = self.architecture == "wan22" and bool(index.get("expand_timesteps"))
        return super().accepts(index) or ti2v

    def given_frames(self, transformer: nn.Module) -> int:
        return 1 if _expands(transformer) else 0

    def conditions_on_last_frame(self, transformer: Mapping[str, Any]) -> bool:
        """Wan2.1-FLF2V's transformer: a position embedding over two images' CLIP tokens (``pos_embed_seq_len``)."""
        return transformer.get("pos_embed_seq_len") is not None

    @torch.no_grad()
    def encode_images(
        self,
        pipe: DiffusionPipeline,
        frames: list[np.ndarray],
        num_frames: int,
        last_frames: list[np.ndarray] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The conditioning of ``num_frames``-frame videos that start from ``frames`` (uint8 ``[H, W, 3]`` each),
        batch-first, exactly as ``WanImageToVideoPipeline`` builds it for those images as PIL pictures of the
        video's size (CLIP embeddings where the model takes them). A first-last-frame model (Wan2.1-FLF2V) also
        takes ``last_frames``: the video ``[first, 0, ..., 0, last]`` and both images' CLIP tokens, first then
        last (``[B, 2 x 257, 1280]``)."""
        from PIL import Image

        images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
        height, width = frames[0].shape[:2]
        device = pipe._execution_device
        lasts = self._last_images(pipe, images, last_frames)
        pixels = pipe.video_processor.preprocess(images, height=height, width=width).to(device, torch.float32)
        video = pixels.unsqueeze(2)  # TI2V-5B (expand_timesteps): the image alone, one latent frame
        if not pipe.config.get("expand_timesteps"):
            gap = num_frames - 1 - (lasts is not None)
            parts = [video, pixels.new_zeros(pixels.shape[0], pixels.shape[1], gap, height, width)]
            if lasts is not None:
                last = pipe.video_processor.preprocess(lasts, height=height, width=width)
                parts.append(last.to(device, torch.float32).unsqueeze(2))
            video = torch.cat(parts, dim=2)
        video = video.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
        latents = pipe.vae.encode(video).latent_dist.mode().to(device, torch.float32)
        mean, std = self._stats(pipe, latents)
        out = {IMAGE_LATENTS: (latents - mean) * (1.0 / std)}  # the pipeline's reciprocal, not a division
        if self.needs_image_encoder(pipe):
            if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "image_processor", None) is None:
                raise ValueError(
                    "this Wan image-to-video transformer takes CLIP image embeddings (image_dim), but the pipeline "
                    "has no image_encoder / image_processor: use the complete model folder (e.g. "
                    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)"
                )
            if lasts is None:
                out[IMAGE_EMBEDS] = pipe.encode_image(images, device).float()
            else:  # one pair per call, as the pipeline encodes [image, last_image]
                pairs = [pipe.encode_image([a, b], device).float() for a, b in zip(images, lasts)]
                out[IMAGE_EMBEDS] = torch.stack([pair.flatten(0, 1) for pair in pairs])
        return out

    def _last_images(self, pipe: DiffusionPipeline, images: list, last_frames: list | None) -> list | None:
        """The last frames as PIL pictures where the model takes them; one line where they are missing or extra."""
        from PIL import Image

        wanted = self.conditions_on_last_frame(self.transformer_config(pipe))
        if wanted and (last_frames is None or len(last_frames) != len(images)):
            raise ValueError("this first-last-frame model (Wan2.1-FLF2V) needs each video's last frame too")
        if not wanted:
            if last_frames is not None:
                raise ValueError("this Wan image-to-video model starts from a first frame only; it takes no last frame")
            return None
        return [Image.fromarray(np.ascontiguousarray(f)) for f in last_frames]

    def predict(
        self, transformer: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``cat([x_t, mask, image_latents])`` as the pipeline's denoising loop feeds it; ``text`` holds the
        clip's text and image tensors, batch-first."""
        if IMAGE_LATENTS not in text:
            raise ValueError(
                f"an image-to-video model needs the clips' {IMAGE_LATENTS!r}; prepare the dataset with this model "
                "(radial-lora data prepare --model ...): it encodes each clip's first frame"
            )
        dtype = unwrap(transformer).dtype
        image = text[IMAGE_LATENTS].to(latents.device, torch.float32)
        first_last = _first_last(transformer)
        if _expands(transformer):
            hidden, timesteps = _first_frame_given(transformer, latents, image, timesteps.to(latents.device))
        else:
            mask = frame_mask(image, last=first_last)
            hidden = torch.cat([latents, torch.cat([mask, image], dim=1).to(latents.dtype)], dim=1)
        embeds = text.get(IMAGE_EMBEDS)
        if embeds is not None and first_last:  # [B, 2 x 257, D] -> the pipeline's [2B, 257, D] (first, last)
            embeds = embeds.reshape(embeds.shape[0] * 2, embeds.shape[1] // 2, embeds.shape[2])
        return transformer(
            hidden_states=hidden.to(dtype),
            timestep=timesteps.to(latents.device),
            encoder_hidden_states=text["encoder_hidden_states"].to(dtype),
            encoder_hidden_states_image=None if embeds is None else embeds.to(dtype),
            return_dict=False,
        )[0]


class Wan22I2VAdapter(Wan22Adapter, WanI2VAdapter):
    """Wan2.2-I2V-A14B: the same conditioning without CLIP, two experts split by ``boundary_ratio``."""

    family = "wan22-i2v"
