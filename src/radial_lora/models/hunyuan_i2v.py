"""HunyuanVideo-I2V (``HunyuanVideoImageToVideoPipeline``): the adapter.

The blocks are HunyuanVideo's (``hunyuan.py``: radial joint attention, the same LoRA and ComfyUI names); what
differs is the conditioning, built here exactly as the stock pipeline builds it (diffusers 0.42,
``prepare_latents``, ``_get_llama_prompt_embeds`` and ``__call__``). The transformer's
``image_condition_type`` tells the two published checkpoints apart:

- "latent_concat" (``hunyuanvideo-community/HunyuanVideo-I2V-33ch``): the transformer sees
  ``cat([x_t, image_latents, mask])`` on channels (16 + 16 + 1 = 33), where ``image_latents`` is the image's
  VAE latent (argmax, ``* scaling_factor``) on latent frame 0 and zeros after it, and the mask is 1 on frame
  0. It generates every latent frame, so the loss covers every frame. It has no embedded guidance: the
  pipeline guides by true classifier-free guidance (``true_cfg_scale`` with a negative prompt), and its
  decoded video leaves out the first 4 frames (a call for N frames returns N - 4).
- "token_replace" (``hunyuanvideo-community/HunyuanVideo-I2V``): the image's latent replaces latent frame 0
  of ``x_t``; the transformer modulates that frame's tokens as timestep 0, and the pipeline never updates
  it. That frame is given, not generated: the loss leaves it out (``given_frames``). Embedded guidance, as
  text-to-video HunyuanVideo.

In both, the Llava text encoder reads the image: the prompt's embeddings are the image's tokens (576, every
2nd kept for latent_concat, every 4th for token_replace) followed by the prompt's 256, so a clip's text
depends on its first frame: it comes from :meth:`HunyuanI2VAdapter.encode_prompts_with_images` (``text_sees_image``).
Those image tokens are text-side tokens of the joint attention: radial attention keeps all text rows and
columns dense, so the image tokens attend to and are attended by every video token, as in dense attention.
The empty caption (caption dropout's ``null_text``) is the pipeline's negative branch: the empty prompt
read with a black image.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from radial_lora.constants import IMAGE_LATENTS
from radial_lora.models.adapter import unwrap
from radial_lora.models.hunyuan import HunyuanAdapter

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# HunyuanVideoImageToVideoPipeline.__call__: the image tokens kept by the Llava prompt, 1 in this many
IMAGE_EMBED_INTERLEAVE = {"latent_concat": 2, "token_replace": 4}
IMAGE_TOKENS = 576  # llava-llama-3-8b's CLIP ViT-L/14 at 336 px: 24 x 24 patches (the template's image_emb_len)


def condition_type(config: Mapping[str, Any]) -> str:
    """A HunyuanVideo-I2V transformer config's ``image_condition_type``: "latent_concat" or "token_replace"."""
    kind = config.get("image_condition_type")
    if kind not in IMAGE_EMBED_INTERLEAVE:
        raise ValueError(
            f"HunyuanVideo-I2V's transformer has image_condition_type {kind!r}; expected one of "
            f"{sorted(IMAGE_EMBED_INTERLEAVE)} (a text-to-video transformer belongs to the hunyuan family)"
        )
    return kind


class HunyuanI2VAdapter(HunyuanAdapter):
    """HunyuanVideo-I2V (13B): HunyuanVideo's blocks, a Llava text encoder that reads the image, and the image's
    latent concatenated on channels (33-channel model) or in place of the first latent frame."""

    family = "hunyuan-i2v"
    pipeline_class_name = "HunyuanVideoImageToVideoPipeline"
    encoder_components = (*HunyuanAdapter.encoder_components, "image_processor")
    default_frames = 129  # HunyuanVideoImageToVideoPipeline.__call__(num_frames=129)
    text_sees_image = True
    # The image's 576 / 2 tokens (latent_concat; token_replace keeps 576 / 4) and the prompt's 256 less the 4 of
    # the assistant header the pipeline cuts: what the memory planner and the mask CLI count, the larger case.
    joint_text_tokens = IMAGE_TOKENS // 2 + 256 - 4

    def sequence_hooks(self, transformer: nn.Module, group: Any) -> list[Any]:
        """The token-replace blocks modulate the first ``first_frame_num_tokens`` tokens of their input as
        timestep 0 (the image's latent frame). On a shard those are the first frame's tokens that fall in it, at
        its start (the shards are contiguous and the frame leads the sequence): each block is told that count."""
        import torch.distributed as dist

        if condition_type(transformer.config) != "token_replace" or dist.get_world_size(group) == 1:
            return []
        rank = dist.get_rank(group)

        def share(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            args = list(args)
            shard = args[0].shape[1]  # this rank's video tokens
            if "first_frame_num_tokens" in kwargs:
                kwargs["first_frame_num_tokens"] = min(max(kwargs["first_frame_num_tokens"] - rank * shard, 0), shard)
            else:  # the transformer passes it as the 7th positional argument
                args[6] = min(max(args[6] - rank * shard, 0), shard)
            return tuple(args), kwargs

        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        return [block.register_forward_pre_hook(share, with_kwargs=True) for block in blocks]

    def given_frames(self, transformer: nn.Module) -> int:
        return 1 if condition_type(unwrap(transformer).config) == "token_replace" else 0

    def guidance_passes(self, guidance: float, transformer: nn.Module | None = None) -> int:
        """One with embedded guidance; the 33-channel model guides by true CFG: two passes when ``guidance`` > 1."""
        if transformer is not None and not unwrap(transformer).config.guidance_embeds and guidance > 1.0:
            return 2
        return 1

    def guidance_arguments(self, pipe: DiffusionPipeline, guidance: float) -> dict[str, Any]:
        """Embedded guidance where the transformer has it; otherwise true CFG against the empty prompt (the
        pipeline's negative branch reads a black image), which runs only with a negative prompt."""
        if pipe.transformer.config.guidance_embeds:
            return {"guidance_scale": guidance}
        return {"true_cfg_scale": guidance} | ({"negative_prompt": ""} if guidance > 1.0 else {})

    @torch.no_grad()
    def encode_prompts(self, pipe: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The prompts read with a black image: the pipeline's negative branch (and the dataset's empty caption).
        A clip's own text comes from :meth:`encode_images`, with its first frame."""
        from PIL import Image

        side = _processor_side(pipe)
        black = np.zeros((side, side, 3), dtype=np.uint8)
        return self._encode_text(pipe, [Image.fromarray(black)] * len(prompts), prompts)

    @torch.no_grad()
    def encode_prompts_with_images(
        self, pipe: DiffusionPipeline, prompts: list[str], frames: list
    ) -> dict[str, torch.Tensor]:
        """The text tensors the Llava encoder makes of each (first frame, prompt), batch-first, as the pipeline
        computes them for those images as PIL pictures."""
        from PIL import Image

        if len(prompts) != len(frames):
            raise ValueError(
                "HunyuanVideo-I2V's text encoder reads each image with its prompt: give one prompt per image"
            )
        return self._encode_text(pipe, [Image.fromarray(np.ascontiguousarray(f)) for f in frames], prompts)

    @torch.no_grad()
    def encode_images(
        self, pipe: DiffusionPipeline, frames: list, num_frames: int, last_frames: list | None = None
    ) -> dict[str, torch.Tensor]:
        """The image latents of ``num_frames``-frame videos that start from ``frames`` (uint8 ``[H, W, 3]`` of the
        video's size), batch-first, as the pipeline builds them for those images as PIL pictures. (The text,
        which reads the image too, is :meth:`encode_prompts_with_images`.)"""
        from PIL import Image

        kind = condition_type(self.transformer_config(pipe))
        height, width = frames[0].shape[:2]
        device = pipe._execution_device
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        latents = []
        for frame in frames:  # one image per call, as the pipeline encodes them
            image = Image.fromarray(np.ascontiguousarray(frame))
            pixels = pipe.video_processor.preprocess(image, height, width).to(device, pipe.vae.dtype)
            z = pipe.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
            z = z.to(torch.float32) * pipe.vae_scaling_factor
            if kind == "latent_concat":
                z = z.repeat(1, 1, latent_frames, 1, 1)
                z[:, :, 1:] = 0
            latents.append(z)
        return {IMAGE_LATENTS: torch.cat(latents)}

    def _encode_text(self, pipe: DiffusionPipeline, images: list, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``encode_prompt`` of each (image, prompt): the Llava states ``[image tokens; prompt]`` and their mask,
        and CLIP's pooled prompt. One pair per call: the pipeline's crop of the Llava output takes a batch of 1."""
        interleave = IMAGE_EMBED_INTERLEAVE[condition_type(self.transformer_config(pipe))]
        out: dict[str, list[torch.Tensor]] = defaultdict(list)
        for image, prompt in zip(images, prompts):
            embeds, pooled, mask = pipe.encode_prompt(
                image=image,
                prompt=[prompt],
                device=pipe._execution_device,
                max_sequence_length=self.max_sequence_length,
                image_embed_interleave=interleave,
            )
            out["encoder_hidden_states"].append(embeds)
            out["encoder_attention_mask"].append(mask)
            out["pooled_projections"].append(pooled)
        return {key: torch.cat(values) for key, values in out.items()}

    def predict(
        self, transformer: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``cat([x_t, image latents, mask])`` (latent_concat) or x_t with the image's latent as frame 0
        (token_replace), as the pipeline's denoising loop feeds the transformer."""
        if IMAGE_LATENTS not in text:
            raise ValueError(
                f"an image-to-video model needs the clips' {IMAGE_LATENTS!r}; prepare the dataset with this model "
                "(radial-lora data prepare --model ...): it encodes each clip's first frame"
            )
        image = text[IMAGE_LATENTS].to(latents.device, torch.float32)
        if condition_type(unwrap(transformer).config) == "token_replace":
            hidden = torch.cat([image[:, :, :1], latents[:, :, 1:].float()], dim=2)
        else:
            mask = torch.zeros_like(image[:, :1])
            mask[:, :, 0] = 1
            hidden = torch.cat([latents.float(), image, mask], dim=1)
        return self._forward(transformer, hidden, timesteps, text)


def _processor_side(pipe: DiffusionPipeline) -> int:
    """The Llava image processor's crop side (336 for the published model): the size of the black image."""
    crop = getattr(pipe.image_processor, "crop_size", None) or {"height": 336}
    return int(crop["height"])
