"""The ``ModelAdapter`` interface: what training, data preparation and radial patching need from a family.

One adapter per model family hides the differences between the diffusers pipelines (text encoders,
VAE normalisation, transformer call signature, where self-attention lives). ``registry.py`` lists the
adapters by family name ("wan", "wan22", "hunyuan") and tells which one a pipeline is.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from radial_lora.constants import ARCHITECTURE, FAMILY_TASK
from radial_lora.geometry import LatentGeometry, latent_geometry

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from radial_lora.models.radial import RadialController
    from radial_lora.models.riflex import TemporalRope


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

    @property
    def architecture(self) -> str:
        """The transformer's kind ("wan", "wan22", "hunyuan"): ComfyUI keys, memory model, mask CLI."""
        return ARCHITECTURE[self.family]

    @property
    def task(self) -> str:
        """ "t2v" or "i2v": what the pipeline generates from (an image-to-video family is a family of its own)."""
        return FAMILY_TASK[self.family]

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
    def vae_factors(self, pipe_or_transformer: Any) -> tuple[int, int]:
        """``(temporal, spatial)`` VAE compression, read from the pipeline (defaults 4, 8 for a lone transformer)."""
        temporal = getattr(pipe_or_transformer, "vae_scale_factor_temporal", None) or 4
        spatial = getattr(pipe_or_transformer, "vae_scale_factor_spatial", None) or 8
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
        from radial_lora.models.registry import family_of_index, tag_transformers

        path = resolve_model_id(model_id_or_path)
        index = DiffusionPipeline.load_config(path)
        found = family_of_index(index, where=str(model_id_or_path))
        if not self.accepts(index, found):
            raise ValueError(
                f"{model_id_or_path} holds a {index.get('_class_name')} of family {found!r}, not {self.family!r}; "
                f"use --family {found} (or get_adapter({found!r}))"
            )
        skipped = {name: None for name in skip if isinstance(index.get(name), list | tuple) and index[name][0]}
        # The concrete class, not DiffusionPipeline: only it knows its optional components (Wan's transformers),
        # which DiffusionPipeline.from_pretrained would load even when passed None.
        pipe = getattr(diffusers, self.pipeline_class_name).from_pretrained(path, torch_dtype=torch_dtype, **skipped)
        tag_transformers(pipe, found)
        return pipe

    def accepts(self, index: dict[str, Any], found: str) -> bool:
        """Whether a pipeline whose ``model_index.json`` says family ``found`` loads as this family."""
        return found == self.family

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

    def encode_images(self, pipe: DiffusionPipeline, frames: list, num_frames: int) -> dict[str, torch.Tensor]:
        """Image conditioning of videos starting from ``frames`` (image-to-video families only)."""
        raise ValueError(f"the {self.family} family generates from text only; it takes no image")

    def pipeline_inputs(self, frames: list) -> dict[str, Any]:
        """Extra arguments of the stock pipeline call for videos starting from ``frames`` (image-to-video)."""
        raise ValueError(f"the {self.family} family generates from text only; it takes no image")

    def prefix(self, text: dict[str, torch.Tensor], latent_frames: int) -> dict[str, torch.Tensor]:
        """The conditioning of a clip's first ``latent_frames`` latent frames alone (text does not depend on
        the length; an image's latents do)."""
        return text

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
