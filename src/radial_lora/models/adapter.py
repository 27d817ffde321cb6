"""The ``ModelAdapter`` interface: what training, data preparation and radial patching need from a family.

One adapter per model family hides the differences between the diffusers pipelines (text encoders,
VAE normalisation, transformer call signature, where self-attention lives). This module knows no family:
each family's file subclasses :class:`ModelAdapter` and says which classes and configs are its own
(:meth:`ModelAdapter.claims`); ``registry.py`` lists the adapters and asks them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from radial_lora.constants import ARCHITECTURE, FAMILY_TASK, IMAGE_LATENTS
from radial_lora.geometry import LatentGeometry, latent_geometry

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from radial_lora.models.radial import RadialController
    from radial_lora.models.riflex import TemporalRope


# The transformer config of a pipeline loaded without its transformer, read once (ModelAdapter.transformer_config)
_CONFIG_ATTR = "_radial_lora_transformer_config"
# A transformer taken out of its pipeline keeps the family its pipeline had (a Wan2.2 expert is a plain
# WanTransformer3DModel): loading or detecting a pipeline tags its transformers with this attribute.
FAMILY_ATTR = "_radial_lora_family"


def tag_transformers(pipe: Any, family: str) -> None:
    """Mark a pipeline's transformers with its family, so a transformer taken out of it still reports that family."""
    for attr in ("transformer", "transformer_2"):
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            setattr(module, FAMILY_ATTR, family)


@dataclass(frozen=True)
class Split:
    """Cut a tensor to this process's token shard along ``dim`` when it has ``ndim`` dimensions (Wan's
    per-token timestep ``[B, S]`` is cut, a per-sample ``[B]`` one is not)."""

    dim: int
    ndim: int


@dataclass(frozen=True)
class SequencePlan:
    """Where a transformer's token sequence is cut and joined for sequence parallelism, by module name
    ("" is the transformer itself). The same idea as diffusers' ``_cp_plan``, for our hooks: diffusers'
    context-parallel processors never see radial attention, and ``enable_parallelism`` needs an accelerator.

    ``inputs``: arguments cut before the module runs (by parameter name); ``outputs``: outputs cut after it
    runs (by tuple index, None for a lone tensor); ``gather``: the module whose output is joined again."""

    inputs: dict[str, dict[str, Split]] = field(default_factory=dict)
    outputs: dict[str, dict[int | None, Split]] = field(default_factory=dict)
    gather: dict[str, int] = field(default_factory=dict)


class ModelAdapter(ABC):
    """Family-specific glue between a diffusers video pipeline and the rest of radial-lora."""

    family: str
    mask_model_type: str
    default_decay: float
    default_block_size: int = 128  # mask block, tokens (the authors' code: 128; their Wan2.2 code: 64)
    default_frames: int  # the length the released model was trained for (its pipeline's num_frames default)
    pipeline_class_name: str
    transformer_class_name: str
    sequence_plan: SequencePlan  # where sequence parallelism cuts and joins the tokens
    # What ``radial-lora mask`` assumes of the family without a model at hand: the text tokens its radial
    # attention appends to the video (0: self-attention over video alone), the heads of its reference model
    # (for FLOPs) and the patch of its transformers.
    joint_text_tokens: int = 0
    reference_heads: int
    default_patch: tuple[int, int, int] = (1, 2, 2)
    one_video_per_call: bool = False  # the stock pipeline cannot render a batch (generate then renders one by one)

    @property
    def architecture(self) -> str:
        """The transformer's kind (``constants.ARCHITECTURE``): ComfyUI keys, memory model, mask CLI."""
        return ARCHITECTURE[self.family]

    @property
    def task(self) -> str:
        """ "t2v" or "i2v": what the pipeline generates from (an image-to-video family is a family of its own)."""
        return FAMILY_TASK[self.family]

    # -- identity --------------------------------------------------------------------------------
    def claims(self, class_name: str, index: Mapping[str, Any], transformer: Mapping[str, Any]) -> bool:
        """Whether a pipeline class with its ``model_index.json`` (``index``), or a transformer class with its
        config (``transformer``; ``index`` empty for a lone transformer), is this family's. Families that share
        classes (Wan2.1 / Wan2.2, text- / image-to-video) tell themselves apart in :meth:`variant_of` and
        :meth:`transformer_task`."""
        if class_name == self.pipeline_class_name:
            return self.variant_of(index, transformer)
        return (
            class_name == self.transformer_class_name
            and self.transformer_task(transformer) == self.task
            and self.variant_of(index, transformer)
        )

    def variant_of(self, index: Mapping[str, Any], transformer: Mapping[str, Any]) -> bool:
        """Whether these configs are this family's rather than another family's with the same classes."""
        return True

    def transformer_task(self, transformer: Mapping[str, Any]) -> str:
        """ "t2v" or "i2v": what a lone transformer of this family's class generates from, by its config."""
        return "t2v"

    def sequence_hooks(self, transformer: nn.Module, group: Any) -> list[Any]:
        """Hooks (their handles) a transformer needs beyond :attr:`sequence_plan`'s cuts when its tokens are split
        over ``group``: where a block reads a token position the shard no longer starts from (HunyuanVideo-I2V)."""
        return []

    # -- structure -------------------------------------------------------------------------------
    def transformers(self, pipe: DiffusionPipeline) -> list[nn.Module]:
        """The denoising transformers of a pipeline (Wan2.2 A14B has two experts)."""
        return [pipe.transformer]

    @abstractmethod
    def self_attention_modules(self, transformer: nn.Module) -> list[tuple[str, int, nn.Module]]:
        """``(module name, block index, attention module)`` of every attention radial attention replaces."""

    @abstractmethod
    def make_processor(self, controller: RadialController, block_index: int) -> Any:
        """A radial attention processor for one block, sharing ``controller``."""

    @abstractmethod
    def patch_size(self, transformer: nn.Module) -> tuple[int, int, int]:
        """The transformer's ``(temporal, height, width)`` patch size."""

    @abstractmethod
    def temporal_rope(self, transformer: nn.Module) -> TemporalRope:
        """The transformer's RoPE module and its temporal layout (what RIFLEx changes)."""

    # -- geometry --------------------------------------------------------------------------------
    def lone_vae_factors(self, transformer: Mapping[str, Any]) -> tuple[int, int]:
        """``(temporal, spatial)`` VAE compression of the VAE this transformer config is paired with (its
        pipeline is not at hand: a lone transformer, a transformer config file)."""
        return 4, 8

    def vae_factors(self, pipe_or_transformer: Any) -> tuple[int, int]:
        """``(temporal, spatial)`` VAE compression, read from the pipeline (a lone transformer:
        :meth:`lone_vae_factors` of its config)."""
        temporal = getattr(pipe_or_transformer, "vae_scale_factor_temporal", None)
        spatial = getattr(pipe_or_transformer, "vae_scale_factor_spatial", None)
        if temporal is None or spatial is None:
            lone = self.lone_vae_factors(dict(getattr(pipe_or_transformer, "config", None) or {}))
            temporal, spatial = temporal or lone[0], spatial or lone[1]
        return int(temporal), int(spatial)

    def geometry(
        self, pipe_or_transformer: Any, num_frames: int, height: int, width: int, *, transformer: Any = None
    ) -> LatentGeometry:
        """Latent frames and tokens per frame of a ``num_frames x height x width`` video in this model.

        ``transformer``: anything with the transformer's ``config`` (its patch size), for a pipeline loaded
        without its transformers."""
        if transformer is None:
            transformer = pipe_or_transformer
        if transformer is pipe_or_transformer and hasattr(pipe_or_transformer, "components"):
            found = self.transformers(pipe_or_transformer)
            if not found or found[0] is None:
                raise ValueError("the pipeline has no transformer: the geometry needs its patch size")
            transformer = found[0]
        temporal, spatial = self.vae_factors(pipe_or_transformer)
        return latent_geometry(
            num_frames,
            height,
            width,
            temporal_factor=temporal,
            spatial_factor=spatial,
            patch=self.patch_size(transformer),
        )

    # -- loading and encoding --------------------------------------------------------------------
    # Components by role: what ``data prepare`` needs (encoding) and what training needs (denoising).
    encoder_components: tuple[str, ...] = ("text_encoder", "tokenizer", "vae")
    denoiser_components: tuple[str, ...] = ("transformer", "transformer_2")

    def load_pipeline(
        self,
        model_id_or_path: str | os.PathLike,
        torch_dtype: torch.dtype = torch.bfloat16,
        *,
        skip: Iterable[str] = (),
    ):
        """Load a pipeline with the stock ``from_pretrained`` and check it is of this family (from its
        ``model_index.json``, before any weights load). ``skip``: components not to load (left ``None``), e.g.
        :attr:`encoder_components` for training, where a 14B Wan's UMT5-XXL text encoder would be 11 GB for
        nothing, or :attr:`denoiser_components` for ``data prepare``."""
        import diffusers
        from diffusers import DiffusionPipeline

        from radial_lora.models.builtin import resolve_model_id

        path = resolve_model_id(model_id_or_path)
        index = DiffusionPipeline.load_config(path)
        if not self.accepts(index):
            raise ValueError(
                f"{model_id_or_path} holds a {index.get('_class_name')} that is not of family {self.family!r} "
                f"({self.pipeline_class_name}); leave --family out to detect its family from model_index.json"
            )
        skipped = {name: None for name in skip if isinstance(index.get(name), list | tuple) and index[name][0]}
        # The concrete class, not DiffusionPipeline: only it knows its optional components (Wan's transformers),
        # which DiffusionPipeline.from_pretrained would load even when passed None.
        pipe = getattr(diffusers, self.pipeline_class_name).from_pretrained(path, torch_dtype=torch_dtype, **skipped)
        tag_transformers(pipe, self.family)
        return pipe

    def accepts(self, index: Mapping[str, Any]) -> bool:
        """Whether the pipeline of this ``model_index.json`` loads as this family (:meth:`claims`, or another
        family's pipeline whose weights this family's pipeline also runs)."""
        return self.claims(index.get("_class_name", ""), index, {})

    def given_frames(self, transformer: nn.Module) -> int:
        """Leading latent frames the pipeline takes as given instead of generating them (so no loss there)."""
        return 0

    @abstractmethod
    def encode_prompts(self, pipe: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning exactly as the pipeline computes it, batch-first, keyed by transformer argument."""

    @abstractmethod
    def encode_videos(self, pipe: DiffusionPipeline, videos: torch.Tensor) -> torch.Tensor:
        """``[B,3,F,H,W]`` in [-1, 1] -> latents normalised as the transformer sees them (VAE mode, no sampling)."""

    @abstractmethod
    def decode_latents(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> ``[B,3,F,H,W]`` in [-1, 1]; the exact inverse path of :meth:`encode_videos`."""

    # Whether the text encoder reads the image too (HunyuanVideo-I2V's Llava): then a clip's text tensors depend
    # on its first frame and come from :meth:`encode_prompts_with_images`.
    text_sees_image: bool = False

    def encode_prompts_with_images(
        self, pipe: DiffusionPipeline, prompts: list[str], frames: list
    ) -> dict[str, torch.Tensor]:
        """Text conditioning of videos that start from ``frames`` (uint8 ``[H, W, 3]``), as the pipeline computes it
        where its text encoder reads the image with the prompt (:attr:`text_sees_image`); else the prompts'."""
        return self.encode_prompts(pipe, prompts)

    def conditions_on_last_frame(self, transformer: Mapping[str, Any]) -> bool:
        """Whether a transformer of this config generates between a first and a last frame (Wan2.1-FLF2V)."""
        return False

    def transformer_config(self, pipe: DiffusionPipeline) -> Mapping[str, Any]:
        """The config of a pipeline's transformer, read from its folder (once: kept on the pipeline) where the
        pipeline was loaded without it (``data prepare`` loads the encoders alone)."""
        for transformer in self.transformers(pipe):
            if transformer is not None:
                return unwrap(transformer).config
        config = getattr(pipe, _CONFIG_ATTR, None)
        if config is None:
            import diffusers

            cls = getattr(diffusers, self.transformer_class_name)
            config = cls.load_config(pipe.name_or_path, subfolder="transformer")
            setattr(pipe, _CONFIG_ATTR, config)
        return config

    def encode_images(
        self, pipe: DiffusionPipeline, frames: list, num_frames: int, last_frames: list | None = None
    ) -> dict[str, torch.Tensor]:
        """Image conditioning of videos starting from ``frames`` (image-to-video families only); ``last_frames``
        where the model :meth:`conditions_on_last_frame`."""
        raise ValueError(f"the {self.family} family generates from text only; it takes no image")

    def size_arguments(self, pipe: DiffusionPipeline, height: int, width: int) -> dict[str, Any]:
        """The stock call's arguments for a ``height x width`` video."""
        return {"height": height, "width": width}

    def guidance_arguments(self, pipe: DiffusionPipeline, guidance: float) -> dict[str, Any]:
        """The stock call's arguments for classifier-free guidance ``guidance`` (1: none)."""
        return {"guidance_scale": guidance}

    def prefix(self, text: dict[str, torch.Tensor], latent_frames: int) -> dict[str, torch.Tensor]:
        """The conditioning of a clip's first ``latent_frames`` latent frames alone. Text does not depend on the
        length; an image's latents are cut: every image-to-video family's condition is causal in time (the
        image, then zeros, through a causal VAE), so a shorter clip's is the first frames of a longer one's."""
        return {k: (v[:, :, :latent_frames] if k == IMAGE_LATENTS else v) for k, v in text.items()}

    def guidance_passes(self, guidance: float, transformer: nn.Module | None = None) -> int:
        """Transformer calls per denoising step: two under classifier-free guidance (``guidance`` > 1).
        ``transformer``: where the answer depends on the checkpoint (HunyuanVideo-I2V: embedded or true CFG)."""
        return 2 if guidance > 1.0 else 1

    @abstractmethod
    def predict(
        self, transformer: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's flow-velocity prediction; ``timesteps`` ``[B]`` in scheduler units (0..1000)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The transformer inside a ``DistributedDataParallel`` wrapper: its ``config`` and ``dtype`` live there,
    while the forward must go through the wrapper for the gradient sync."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _check_videos(videos: torch.Tensor) -> None:
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(
            f"videos must be [batch, 3, frames, height, width] in [-1, 1]; got shape {tuple(videos.shape)}"
        )
