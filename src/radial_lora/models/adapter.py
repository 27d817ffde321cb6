"""The ``ModelAdapter`` interface: what training, data preparation and radial patching need from a family.

One adapter per model family hides the differences between the diffusers pipelines (text encoders,
VAE normalisation, transformer call signature, where self-attention lives). The registry maps the
family names of ``docs/ARCHITECTURE.md`` ("wan", "wan22", "hunyuan") to adapter instances.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from radial_lora.geometry import LatentGeometry, latent_geometry

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from radial_lora.models.radial import RadialController


class ModelAdapter(ABC):
    """Family-specific glue between a diffusers video pipeline and the rest of radial-lora."""

    family: str
    mask_model_type: str
    default_decay: float
    default_frames: int  # the length the released model was trained for (its pipeline's num_frames default)
    pipeline_class_name: str
    transformer_class_name: str

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

    # -- geometry --------------------------------------------------------------------------------
    def vae_factors(self, pipe_or_transformer: Any) -> tuple[int, int]:
        """``(temporal, spatial)`` VAE compression, read from the pipeline (defaults 4, 8 for a lone transformer)."""
        temporal = getattr(pipe_or_transformer, "vae_scale_factor_temporal", None) or 4
        spatial = getattr(pipe_or_transformer, "vae_scale_factor_spatial", None) or 8
        return int(temporal), int(spatial)

    def geometry(self, pipe_or_transformer: Any, num_frames: int, height: int, width: int) -> LatentGeometry:
        """Latent frames and tokens per frame of a ``num_frames x height x width`` video in this model."""
        transformer = pipe_or_transformer
        if hasattr(pipe_or_transformer, "components"):
            found = self.transformers(pipe_or_transformer)
            if not found or found[0] is None:
                raise ValueError("the pipeline has no transformer: the geometry needs its patch size")
            transformer = found[0]
        temporal, spatial = self.vae_factors(pipe_or_transformer)
        return latent_geometry(
            num_frames, height, width,
            temporal_factor=temporal, spatial_factor=spatial, patch=self.patch_size(transformer),
        )  # fmt: skip

    # -- loading and encoding --------------------------------------------------------------------
    def load_pipeline(self, model_id_or_path: str | os.PathLike, torch_dtype: torch.dtype = torch.bfloat16):
        """Load a pipeline with the stock ``from_pretrained`` and check it is of this family."""
        from diffusers import DiffusionPipeline

        from radial_lora.models.builtin import resolve_model_id

        pipe = DiffusionPipeline.from_pretrained(resolve_model_id(model_id_or_path), torch_dtype=torch_dtype)
        found = detect_family(pipe)
        if found != self.family:
            raise ValueError(
                f"{model_id_or_path} holds a {type(pipe).__name__} of family {found!r}, not {self.family!r}; "
                f"use --family {found} (or get_adapter({found!r}))"
            )
        return pipe

    @abstractmethod
    def encode_prompts(self, pipe: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning exactly as the pipeline computes it, batch-first, keyed by transformer argument."""

    @abstractmethod
    def encode_videos(self, pipe: DiffusionPipeline, videos: torch.Tensor) -> torch.Tensor:
        """``[B,3,F,H,W]`` in [-1, 1] -> latents normalised as the transformer sees them (VAE mode, no sampling)."""

    @abstractmethod
    def decode_latents(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> ``[B,3,F,H,W]`` in [-1, 1]; the exact inverse path of :meth:`encode_videos`."""

    @abstractmethod
    def predict(
        self, transformer: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's flow-velocity prediction; ``timesteps`` ``[B]`` in scheduler units (0..1000)."""


def _check_videos(videos: torch.Tensor) -> None:
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be [batch, 3, frames, height, width] in [-1, 1]; got shape {tuple(videos.shape)}")


_REGISTRY: dict[str, ModelAdapter] = {}
_FAMILY_ATTR = "_radial_lora_family"


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Add an adapter to the registry under ``adapter.family``."""
    _REGISTRY[adapter.family] = adapter
    return adapter


def _ensure_registered() -> None:
    """Import every family module (each registers on import), even when one was imported directly before."""
    import radial_lora.models.hunyuan  # noqa: F401  (registers on import)
    import radial_lora.models.wan  # noqa: F401


def families() -> list[str]:
    """Registered family names."""
    _ensure_registered()
    return sorted(_REGISTRY)


def get_adapter(family: str) -> ModelAdapter:
    """The adapter of ``family`` ("wan", "wan22", "hunyuan")."""
    _ensure_registered()
    try:
        return _REGISTRY[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(sorted(_REGISTRY))}") from None


def detect_family(pipe_or_transformer: Any) -> str:
    """Family of a pipeline, a transformer, or a saved pipeline directory (its ``model_index.json``).

    A lone Wan transformer cannot show whether a second expert exists: detecting a pipeline tags its
    transformers with the family, so a Wan2.2 expert taken out of its pipeline still reports "wan22";
    an untagged Wan transformer reports "wan".
    """
    tagged = getattr(pipe_or_transformer, _FAMILY_ATTR, None)
    if isinstance(pipe_or_transformer, nn.Module) and tagged is not None:
        return tagged
    if isinstance(pipe_or_transformer, str | os.PathLike):
        from radial_lora.models.builtin import resolve_model_id

        index = Path(resolve_model_id(pipe_or_transformer)) / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{pipe_or_transformer} has no model_index.json; pass a diffusers pipeline directory")
        config = json.loads(index.read_text())
        name = config.get("_class_name", "")
        has_second = bool(config.get("transformer_2") and config["transformer_2"][0] is not None)
    else:
        name = type(pipe_or_transformer).__name__
        has_second = getattr(pipe_or_transformer, "transformer_2", None) is not None
    family = None
    if name in ("WanPipeline", "WanTransformer3DModel"):
        family = "wan22" if has_second else "wan"
    elif name in ("HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel"):
        family = "hunyuan"
    if family is not None:
        for attr in ("transformer", "transformer_2"):
            module = getattr(pipe_or_transformer, attr, None) if name.endswith("Pipeline") else None
            if isinstance(module, nn.Module):
                setattr(module, _FAMILY_ATTR, family)
        return family
    raise ValueError(
        f"cannot tell the model family of {name or pipe_or_transformer!r}; supported: WanPipeline (Wan2.1, "
        "Wan2.2), HunyuanVideoPipeline and their transformers"
    )
